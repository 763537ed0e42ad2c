"""Attention patterns: which earlier keys each query sees, one frozen object per layer.

Every pattern is causal (a query at position p never sees a key after p) and defines itself in `mask`, the pure
torch definition the references and tests use. The kernels receive `kernel_params(pattern)`: a constexpr pattern id
plus two runtime ints, and decide visibility with the @triton.jit helpers at the bottom of this file, shared by
prefill and decode attention.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Pattern ids the kernels branch on (constexpr, so that @triton.jit code can read them; host code uses .value).
DENSE_ID = tl.constexpr(0)
LOCAL_ID = tl.constexpr(1)
STRIDED_ID = tl.constexpr(2)
BLOCK_SPARSE_ID = tl.constexpr(3)
# The only block size the kernels support: the KV cache page.
SPARSE_BLOCK = tl.constexpr(16)


def _check_int(owner: str, name: str, value, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{owner}.{name} must be an int >= {least}, got {value!r}")


def _causal(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    return k_pos[None, :] <= q_pos[:, None]


def head_masks(pattern, q_pos: torch.Tensor, k_pos: torch.Tensor, n_heads: int) -> torch.Tensor:
    """bool [n_heads, n, L] masks of `pattern` for every head, or [1, n, L] (broadcastable) when the pattern is
    the same for all heads: only block-sparse layouts differ per head."""
    if isinstance(pattern, BlockSparse):
        return torch.stack([pattern.mask(q_pos, k_pos, h) for h in range(n_heads)])
    return pattern.mask(q_pos, k_pos)[None]


def _causal_pairs(seq_len: int) -> int:
    return seq_len * (seq_len + 1) // 2


@dataclass(frozen=True)
class Dense:
    """Every query sees every earlier key."""

    def mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor, head: int = 0) -> torch.Tensor:
        """bool [n, L]: query at q_pos[i] sees key at k_pos[j]."""
        return _causal(q_pos, k_pos)

    def keep_fraction(self, seq_len: int, n_heads: int = 1, decode: bool = False) -> float:
        return 1.0


def _sink_and_window(p: torch.Tensor, window: int, sink: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For queries at positions p: (keys in the local window, sink keys left of the window)."""
    before = (p - window + 1).clamp(min=0)  # keys left of the window
    return (p + 1).clamp(max=window), before.clamp(max=sink)


@dataclass(frozen=True)
class Local:
    """The query at position p sees keys k with p - window < k <= p, plus the first `sink` keys (attention sinks,
    Xiao et al. 2023: the first tokens soak up attention that has nowhere else to go, and dropping them from the
    window costs far more quality than their count suggests)."""
    window: int
    sink: int = 0

    def __post_init__(self):
        _check_int("Local", "window", self.window, 1)
        _check_int("Local", "sink", self.sink, 0)

    def mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor, head: int = 0) -> torch.Tensor:
        local = k_pos[None, :] > q_pos[:, None] - self.window
        return _causal(q_pos, k_pos) & (local | (k_pos < self.sink)[None, :])

    def _kept(self, p: torch.Tensor) -> torch.Tensor:
        window, sink = _sink_and_window(p, self.window, self.sink)
        return window + sink

    def keep_fraction(self, seq_len: int, n_heads: int = 1, decode: bool = False) -> float:
        """Fraction of the causal (query, key) pairs of a seq_len prompt kept (decode: of the keys seen by one
        query at position seq_len - 1)."""
        if decode:
            return self._kept(torch.tensor([seq_len - 1])).item() / seq_len
        return self._kept(torch.arange(seq_len, dtype=torch.int64)).sum().item() / _causal_pairs(seq_len)


@dataclass(frozen=True)
class Strided:
    """The local window plus every key k <= p with k % stride == stride - 1: the "fixed" pattern of Child et al.
    2019, whose summary columns are shared by all queries (so kernels load them directly, stride apart); plus
    the first `sink` keys, as in Local."""
    stride: int
    window: int
    sink: int = 0

    def __post_init__(self):
        _check_int("Strided", "stride", self.stride, 2)
        _check_int("Strided", "window", self.window, 1)
        _check_int("Strided", "sink", self.sink, 0)

    def mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor, head: int = 0) -> torch.Tensor:
        local = k_pos[None, :] > q_pos[:, None] - self.window
        summary = (k_pos % self.stride == self.stride - 1) | (k_pos < self.sink)
        return _causal(q_pos, k_pos) & (local | summary[None, :])

    def _kept(self, p: torch.Tensor) -> torch.Tensor:
        """Keys seen by queries at positions p: the window, the sink keys before it, and the summary columns
        between the two."""
        window, sink = _sink_and_window(p, self.window, self.sink)
        before = (p - self.window + 1).clamp(min=0)
        summary = torch.div(before, self.stride, rounding_mode="floor") - torch.div(sink, self.stride,
                                                                                     rounding_mode="floor")
        return window + sink + summary

    def keep_fraction(self, seq_len: int, n_heads: int = 1, decode: bool = False) -> float:
        if decode:
            return self._kept(torch.tensor([seq_len - 1])).item() / seq_len
        return self._kept(torch.arange(seq_len, dtype=torch.int64)).sum().item() / _causal_pairs(seq_len)


@dataclass(frozen=True)
class BlockSparse:
    """On blocks of `block` tokens, query block i of head h sees key block j <= i when i - j < local_blocks or
    (j + h) % vert_stride == vert_stride - 1 (vertical stripes offset per head, as in Phi-3-small), causal inside
    the diagonal block. Kernels visit only the blocks of `lookup`."""
    block: int = 16
    local_blocks: int = 4
    vert_stride: int = 8

    def __post_init__(self):
        if isinstance(self.block, bool) or self.block != SPARSE_BLOCK.value:
            raise ValueError(f"BlockSparse.block: block size {self.block!r} not supported: kernels support "
                             f"{SPARSE_BLOCK.value}")
        _check_int("BlockSparse", "local_blocks", self.local_blocks, 1)
        _check_int("BlockSparse", "vert_stride", self.vert_stride, 1)

    def block_mask(self, q_block: torch.Tensor, k_block: torch.Tensor, head: int) -> torch.Tensor:
        """bool [n, L]: query block q_block[i] of `head` sees key block k_block[j] (causal on blocks)."""
        qb, kb = q_block[:, None], k_block[None, :]
        stripe = (kb + head) % self.vert_stride == self.vert_stride - 1
        return (kb <= qb) & ((qb - kb < self.local_blocks) | stripe)

    def mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor, head: int = 0) -> torch.Tensor:
        return _causal(q_pos, k_pos) & self.block_mask(q_pos // self.block, k_pos // self.block, head)

    def _kept(self, p: torch.Tensor, head: int) -> torch.Tensor:
        i = p // self.block
        band = i.clamp(max=self.local_blocks - 1)  # earlier blocks of the local band
        first_stripe = (self.vert_stride - 1 - head) % self.vert_stride
        stripes = (torch.div(i - self.local_blocks - first_stripe, self.vert_stride, rounding_mode="floor") + 1)
        return p - i * self.block + 1 + self.block * (band + stripes.clamp(min=0))

    def keep_fraction(self, seq_len: int, n_heads: int = 1, decode: bool = False) -> float:
        p = torch.tensor([seq_len - 1]) if decode else torch.arange(seq_len, dtype=torch.int64)
        total = seq_len if decode else _causal_pairs(seq_len)
        return sum(self._kept(p, h).sum().item() for h in range(n_heads)) / (n_heads * total)

    def lookup(self, n_heads: int, n_blocks: int, device, span: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The non-empty key blocks of every (head, query block), ascending: (block_ids [n_heads, n_blocks,
        max_nnz] int32, counts [n_heads, n_blocks] int32); entries past counts are 0. With span > 1, row i lists
        the blocks any of query blocks i .. i + span - 1 sees (a prefill tile's union). Cached per arguments."""
        return _lookup(self, n_heads, n_blocks, torch.device(device), span)


@functools.lru_cache(maxsize=32)
def _lookup(pattern: BlockSparse, n_heads: int, n_blocks: int, device: torch.device,
            span: int) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = torch.arange(n_blocks, device=device)
    rows = []
    for head in range(n_heads):
        seen = pattern.block_mask(blocks, blocks, head)
        union = seen.clone()
        for d in range(1, min(span, n_blocks)):
            union[:-d] |= seen[d:]
        rows.append(union)
    union = torch.stack(rows)  # [H, nb, nb]
    counts = union.sum(-1, dtype=torch.int32)
    width = max(1, int(counts.max().item()) if counts.numel() else 1)
    # Visible blocks sort first (ascending), the rest after them; keep the first `width` columns.
    order = torch.where(union, blocks, blocks + n_blocks).sort(-1).values[..., :width]
    ids = torch.where(order < n_blocks, order, 0).to(torch.int32).contiguous()
    return ids, counts.contiguous()


Pattern = Dense | Local | Strided | BlockSparse
DENSE = Dense()


def kernel_params(pattern: Pattern) -> tuple[int, int, int, int]:
    """(PATTERN id, P0, P1, P2) the kernels take: local (window, 1, sink), strided (window, stride, sink),
    block-sparse (local_blocks, vert_stride, 0), dense (0, 1, 0)."""
    if isinstance(pattern, Dense):
        return DENSE_ID.value, 0, 1, 0
    if isinstance(pattern, Local):
        return LOCAL_ID.value, pattern.window, 1, pattern.sink
    if isinstance(pattern, Strided):
        return STRIDED_ID.value, pattern.window, pattern.stride, pattern.sink
    if isinstance(pattern, BlockSparse):
        return BLOCK_SPARSE_ID.value, pattern.local_blocks, pattern.vert_stride, 0
    raise ValueError(f"pattern must be Dense, Local, Strided or BlockSparse, got {pattern!r}")


def gathers_keys(pattern: Pattern) -> bool:
    """Whether a query can see keys left of its window (`keys_before`: sink keys, strided summary columns), which
    the kernels gather: strided always, local with sink keys."""
    return isinstance(pattern, Strided) or (isinstance(pattern, Local) and pattern.sink > 0)


def lookup_blocks(max_pages: int) -> int:
    """Query blocks a lookup is built for: a power of two >= max_pages, so that growing block tables reuse a few
    cached lookups (a row depends only on its own block index, so a longer lookup serves shorter sequences)."""
    return max(16, triton.next_power_of_2(max_pages))


def summary_bound(pattern: Pattern, max_keys: int) -> int:
    """Most keys a decode query visits for sequences of at most max_keys keys (sizes the split grid)."""
    if isinstance(pattern, Local):
        return min(pattern.window + pattern.sink, max_keys)
    if isinstance(pattern, Strided):
        return min(min(pattern.window, max_keys) + pattern.sink + max_keys // pattern.stride, max_keys)
    return max_keys


# ---- kernel side -------------------------------------------------------------------------------------------


@triton.jit
def visible(q_pos, keys, head, P0, P1, P2, PATTERN: tl.constexpr):
    """bool [M, N]: query at q_pos [M] sees key at keys [N] (the kernels' form of `mask`)."""
    seen = keys[None, :] <= q_pos[:, None]
    if PATTERN == LOCAL_ID:
        seen = seen & ((keys[None, :] > q_pos[:, None] - P0) | (keys < P2)[None, :])
    elif PATTERN == STRIDED_ID:
        summary = ((keys % P1) == P1 - 1) | (keys < P2)
        seen = seen & ((keys[None, :] > q_pos[:, None] - P0) | summary[None, :])
    elif PATTERN == BLOCK_SPARSE_ID:
        q_block = q_pos[:, None] // SPARSE_BLOCK
        k_block = keys[None, :] // SPARSE_BLOCK
        seen = seen & ((q_block - k_block < P0) | ((k_block + head) % P1 == P1 - 1))
    return seen


@triton.jit
def window_start(q_pos, P0, PATTERN: tl.constexpr):
    """First key of the local window of the query at q_pos (0 for dense and block-sparse)."""
    if PATTERN == LOCAL_ID or PATTERN == STRIDED_ID:
        return tl.maximum(q_pos - P0 + 1, 0)
    else:
        return q_pos * 0


@triton.jit
def keys_before(lo, P1, P2, PATTERN: tl.constexpr):
    """(n_sink, n_summary): the keys left of a window starting at `lo` that a query still sees, as counts: the sink
    keys 0 .. n_sink - 1, then (strided) the n_summary summary columns between the sink and the window."""
    n_sink = tl.minimum(lo, P2)
    n_summary = n_sink * 0
    if PATTERN == STRIDED_ID:
        n_summary = lo // P1 - n_sink // P1
    return n_sink, n_summary


@triton.jit
def virtual_keys(v, valid, lo, n_sink, n_summary, P1, ids_ptr, PATTERN: tl.constexpr):
    """Key positions of virtual indices v [N] of a key list. Local and strided: indices < n_sink are the sink keys
    0 .. n_sink - 1, the next n_summary (strided) the summary columns after the sink (key (j + 1) * stride - 1 for
    j from n_sink // stride), the rest run contiguously from the window start `lo`. Block-sparse: index i is token
    i % 16 of listed block ids_ptr[i // 16]. Dense: lo + v."""
    if PATTERN == BLOCK_SPARSE_ID:
        block = tl.load(ids_ptr + v // SPARSE_BLOCK, mask=valid, other=0)
        return block * SPARSE_BLOCK + v % SPARSE_BLOCK
    elif PATTERN == STRIDED_ID:
        summary = (n_sink // P1 + v - n_sink + 1) * P1 - 1
        window = lo + v - n_sink - n_summary
        return tl.where(v < n_sink, v, tl.where(v < n_sink + n_summary, summary, window))
    elif PATTERN == LOCAL_ID:
        return tl.where(v < n_sink, v, lo + v - n_sink)
    else:
        return lo + v


__all__ = ["DENSE", "BlockSparse", "Dense", "Local", "Pattern", "Strided", "kernel_params"]
