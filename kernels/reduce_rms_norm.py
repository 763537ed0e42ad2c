"""All-reduce fused with the residual add and RMSNorm that follow it in a tensor-parallel Llama block.

Under tensor parallelism every row-parallel projection (wo, w2) leaves a partial sum on each rank, and the next
thing the block does is `x, residual = fused_add_rms_norm(sum of partials, residual, weight)`. At decode sizes
(a few rows of dim 4096-8192) the all-reduce is pure latency, so one kernel does all of it, one program per row:

1. write this rank's partial row into every peer's staging buffer, in the slot that peer keeps for this rank
   (`PeerBuffers`: memory every rank has mapped, CUDA symmetric memory on GPUs, plain tensors in tests). The row
   travels as 64-bit words, each two 16-bit values beside the call's count (a "low-latency" protocol, as NCCL's
   LL): a 64-bit store lands whole, so a word whose count is the current one carries this call's values, and no
   memory fence or separate flag has to cross NVLink after the data;
2. spin on its own staging until every peer's words for this row carry the current count;
3. sum every rank's row in float32 in rank order (so every rank computes the same bits), round to the activation
   dtype as an all-reduce would, add the residual and normalize, as `fused_add_rms_norm` does.

Step 1 may instead be done earlier, by the kernel that computes x: `gemv.linear_staged` writes the words of each
output tile as it finishes (`stage_tile`), so they cross NVLink while the rest of the projection runs, and this
call, made with staged=True, only waits, sums and normalizes.

Counts are per row (this rank's `counters`) and only compared for equality, so staging never needs resetting and
the count may wrap. Staging alternates between two halves by the count's parity: a rank writes half c & 1 again
only at call c + 2, after every peer's words for call c + 1 arrived, which they sent after their call c had
finished reading. Every rank must make the same sequence of calls with the same row counts (tensor-parallel ranks
replay one plan).

Measured on 2 H200s (NVLink, 2026-11-27), rows of dim 5120 bf16 in a CUDA graph (bench/comm.py): 4.6 / 5.3 /
7.0 us at 1 / 16 / 48 rows, against 9.4 / 10.7 / 12.6 us for the unfused copy + one-shot all-reduce + norm.
Plain rows followed by a flag raised by a release at system scope took 5.2 / 6.2 / 7.5 us; reading the peers'
rows remotely after their flag, 6.0 / 9.4 / 17.1 us.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from ._checks import check_tensor
from ._dispatch import use_triton
from .rms_norm import _MAX_DIM, fused_add_rms_norm_ref

# Rows one call may reduce: every program of the grid waits on its peers' program of the same row, so the whole
# grid must be resident at once (one program per row, 2+ programs per SM on an H100/H200).
MAX_ROWS = 128
# The activations it packs two to a word.
DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class PeerBuffers:
    """Memory a group of `world` ranks shares, as seen from `rank`.

    buffers[r]: rank r's staging area, uint8 [nbytes] (every rank the same nbytes, zero before the first call),
        addressable from this rank: int64 words [2 parities, world sources, rows, ceil(D / 2)];
    counters: this rank's own calls per row, int32 [MAX_ROWS], zero before the first call.
    """

    rank: int
    buffers: list[torch.Tensor]
    counters: torch.Tensor
    table: torch.Tensor = field(init=False)  # int64 [world]: the buffers' addresses, for the kernel
    # int32 [MAX_ROWS]: programs of the current call that are done with a row, for kernels that split a row over
    # several programs (gather_rows); the last one advances the row's counter and puts this back to zero.
    tickets: torch.Tensor = field(init=False)

    def __post_init__(self):
        world = len(self.buffers)
        if not 0 <= self.rank < world:
            raise ValueError(f"PeerBuffers: rank {self.rank} of a group of {world} buffers")
        nbytes = self.buffers[0].numel()
        for r, b in enumerate(self.buffers):
            check_tensor(f"buffers[{r}]", b, (nbytes,), (torch.uint8,), self.counters.device, layout="contiguous")
        check_tensor("counters", self.counters, (MAX_ROWS,), (torch.int32,), layout="contiguous")
        self.table = torch.tensor([b.data_ptr() for b in self.buffers], dtype=torch.int64,
                                  device=self.counters.device)
        self.tickets = torch.zeros_like(self.counters)

    @property
    def world(self) -> int:
        return len(self.buffers)

    def max_rows(self, dim: int) -> int:
        """Rows of `dim` 16-bit values one call can take (both parities, one slot per source rank)."""
        return min(MAX_ROWS, self.buffers[0].numel() // (2 * self.world * _words(dim) * 8))

    def staging(self, r: int, dim: int) -> torch.Tensor:
        """Rank r's staging as int64 words [2, world, max_rows(dim), ceil(dim / 2)] (a view)."""
        rows, words = self.max_rows(dim), _words(dim)
        return self.buffers[r][:2 * self.world * rows * words * 8].view(torch.int64).view(2, self.world, rows, words)


def _words(dim: int) -> int:
    return (dim + 1) // 2


@triton.jit
def send_tile(
    vals,  # [BLOCK_M, BLOCK_N] 16-bit floats: columns n0 .. n0 + BLOCK_N - 1 of rows `rows` (past D: ignored)
    count,  # [BLOCK_M] int32 the call these rows belong to
    rows,  # [BLOCK_M] int32 row numbers
    row_mask,  # [BLOCK_M] rows to write
    n0,  # first column, even
    D,  # row length
    table_ptr,  # [WORLD] int64 addresses of every rank's staging (PeerBuffers.table)
    rows_cap,  # rows each (parity, source rank) slot holds (PeerBuffers.max_rows(D))
    RANK: tl.constexpr,  # this rank
    WORLD: tl.constexpr,  # ranks in the group
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # even
):
    """Step 1 of the module docstring for a tile: word i = count << 32 | bits of x[2i + 1] << 16 | bits of x[2i],
    written into every peer's staging, in the slot it keeps for this rank."""
    parity = count & 1
    bits = vals.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    lo, hi = tl.split(tl.reshape(bits, [BLOCK_M, BLOCK_N // 2, 2]))
    words = (count.to(tl.int64) << 32)[:, None] | ((hi << 16) | lo).to(tl.int64) & 0xFFFFFFFF
    WD = (D + 1) // 2
    pairs = n0 // 2 + tl.arange(0, BLOCK_N // 2)
    mask = row_mask[:, None] & (pairs < WD)[None, :]
    for r in tl.static_range(WORLD):
        if r != RANK:
            peer = tl.load(table_ptr + r).to(tl.pointer_type(tl.int64))
            slot = ((parity * WORLD + RANK) * rows_cap + rows).to(tl.int64) * WD
            tl.store(peer + slot[:, None] + pairs[None, :], words, mask=mask)


@triton.jit
def stage_tile(
    vals,  # [BLOCK_M, BLOCK_N] 16-bit floats: columns n0 .. n0 + BLOCK_N - 1 of rows `rows` (past D: ignored)
    rows,  # [BLOCK_M] int32 row numbers
    row_mask,  # [BLOCK_M] rows to write
    n0,  # first column, even
    D,  # row length
    table_ptr,  # [WORLD] int64 addresses of every rank's staging (PeerBuffers.table)
    counters_ptr,  # [MAX_ROWS] int32 this rank's calls per row (read, not advanced)
    rows_cap,  # rows each (parity, source rank) slot holds (PeerBuffers.max_rows(D))
    RANK: tl.constexpr,  # this rank
    WORLD: tl.constexpr,  # ranks in the group
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # even
):
    """Write a tile of this rank's partial rows into every peer's staging, as words of the call that
    `_reduce_add_rms_norm_kernel` makes next on those rows (step 1 of the module docstring, done early)."""
    count = tl.load(counters_ptr + rows, mask=row_mask, other=0) + 1
    send_tile(vals, count, rows, row_mask, n0, D, table_ptr, rows_cap, RANK, WORLD, BLOCK_M, BLOCK_N)


@triton.jit
def receive_words(
    src,  # [BLOCK_W] pointers to int64 words of this rank's staging
    mask,  # [BLOCK_W] words to read
    count,  # int32 the call they must carry
    dtype: tl.constexpr,  # the 16-bit float type they pack
    BLOCK_W: tl.constexpr,
):
    """Step 2 of the module docstring for a block of words: spin until every masked word carries `count`, then
    unpack -> [2 BLOCK_W] float32 values (those of masked-off words are zero)."""
    stamp = count.to(tl.int64) << 32
    # volatile: a peer writes these words; every read must go to memory, never to a cached line
    got = tl.load(src, mask=mask, other=stamp, volatile=True)
    while tl.sum(((got >> 32).to(tl.int32) != count).to(tl.int32), axis=0) > 0:
        got = tl.load(src, mask=mask, other=stamp, volatile=True)
    data = got.to(tl.int32)  # the low 32 bits (zero in masked-off words, which hold the bare stamp)
    lo_vals = data.to(tl.int16).to(dtype, bitcast=True)
    hi_vals = (data >> 16).to(tl.int16).to(dtype, bitcast=True)
    return tl.reshape(tl.join(lo_vals, hi_vals), [2 * BLOCK_W]).to(tl.float32)


@triton.jit
def _reduce_add_rms_norm_kernel(
    x_ptr,  # [T, D] this rank's partial sums, 16-bit floats
    residual_ptr,  # [T, D] residual stream
    weight_ptr,  # [D] norm scale
    out_ptr,  # [T, D] contiguous normalized output
    residual_out_ptr,  # [T, D] contiguous new residual (all-reduced x + residual)
    table_ptr,  # [WORLD] int64 addresses of every rank's staging: int64 [2, WORLD, rows_cap, WD]
    counters_ptr,  # [MAX_ROWS] int32 this rank's calls per row
    D,  # row length
    rows_cap,  # rows each (parity, source rank) slot holds
    stride_xt,  # row stride of x
    stride_rt,  # row stride of residual
    eps,  # added to the mean square
    RANK: tl.constexpr,  # this rank
    WORLD: tl.constexpr,  # ranks in the group
    BLOCK_D: tl.constexpr,  # power of two >= max(D, 2)
    STAGED: tl.constexpr,  # x's words are already in the peers' staging (gemv.linear_staged): skip step 1
):
    row = tl.program_id(0)
    HALF: tl.constexpr = BLOCK_D // 2
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    pairs = tl.arange(0, HALF)
    WD = (D + 1) // 2
    pair_mask = pairs < WD
    dtype = x_ptr.dtype.element_ty
    count = tl.load(counters_ptr + row) + 1
    tl.store(counters_ptr + row, count)
    parity = count & 1

    x = tl.load(x_ptr + row.to(tl.int64) * stride_xt + cols, mask=mask, other=0.0)
    if not STAGED:
        one = tl.zeros([1], dtype=tl.int32)
        send_tile(tl.reshape(x, [1, BLOCK_D]), count + one, row + one, one == 0, 0, D, table_ptr, rows_cap, RANK,
                   WORLD, 1, BLOCK_D)

    mine = tl.load(table_ptr + RANK).to(tl.pointer_type(tl.int64))
    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    for r in tl.static_range(WORLD):
        if r == RANK:
            total += x.to(tl.float32)
        else:
            src = mine + ((parity * WORLD + r) * rows_cap + row).to(tl.int64) * WD + pairs
            total += receive_words(src, pair_mask, count, dtype, HALF)
    reduced = total.to(dtype).to(tl.float32)
    res = tl.load(residual_ptr + row.to(tl.int64) * stride_rt + cols, mask=mask, other=0.0).to(tl.float32)
    summed = (reduced + res).to(residual_out_ptr.dtype.element_ty)
    tl.store(residual_out_ptr + row.to(tl.int64) * D + cols, summed, mask=mask)
    h = summed.to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(h * h, axis=0) / D + eps)
    tl.store(out_ptr + row.to(tl.int64) * D + cols, (h * inv_rms * w).to(out_ptr.dtype.element_ty), mask=mask)


def check_rows(x: torch.Tensor, peers: PeerBuffers) -> None:
    """x [T, D] fp16/bf16 rows that one call can move through peers' staging (ValueError otherwise)."""
    check_tensor("x", x, (None, None), DTYPES)
    if peers.counters.device != x.device:
        raise ValueError(f"peers must live on {x.device} (x's device), got {peers.counters.device}")
    t, d = x.shape
    cap = peers.max_rows(d)
    if t > cap:
        raise ValueError(f"{t} rows of {d} values do not fit the peers' staging buffers ({cap} rows at most)")


def _check(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, peers: PeerBuffers) -> None:
    check_rows(x, peers)
    t, d = x.shape
    check_tensor("residual", residual, (t, d), (x.dtype,), x.device)
    check_tensor("weight", weight, (d,), (torch.float16, torch.bfloat16, torch.float32), x.device,
                 layout="contiguous")
    if d > _MAX_DIM:
        raise ValueError(f"x rows must have at most {_MAX_DIM} elements, got {d}")


def reduce_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                        peers: PeerBuffers, staged: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """With s = the sum of every rank's x (float32, rank order, rounded to x's dtype): new_residual = s + residual
    and out = rms_norm(new_residual) * weight, as `fused_add_rms_norm(s, residual, weight, eps)`.

    x, residual [T, D] fp16/bf16 of one dtype (last dims contiguous), T <= peers.max_rows(D); weight [D] ->
    (out, new_residual), new contiguous [T, D] tensors of x's dtype. Every rank of the group calls it with the
    same T (it waits for them); the counters of rows [0, T) advance by one. staged: x came from
    `gemv.linear_staged` with these peers (returning True), which already sent its words.
    """
    if not use_triton(x):
        return reduce_add_rms_norm_ref(x, residual, weight, eps, peers, staged)
    _check(x, residual, weight, peers)
    t, d = x.shape
    out = torch.empty((t, d), dtype=x.dtype, device=x.device)
    residual_out = torch.empty_like(out)
    if t == 0:
        return out, residual_out
    block_d = max(2, triton.next_power_of_2(d))
    _reduce_add_rms_norm_kernel[(t,)](
        x, residual, weight, out, residual_out, peers.table, peers.counters,
        d, peers.max_rows(d), x.stride(0), residual.stride(0), eps,
        RANK=peers.rank, WORLD=peers.world, BLOCK_D=block_d, STAGED=staged,
        num_warps=min(max(block_d // 512, 1), 16),
    )
    return out, residual_out


def pack_words(x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x [T, D] 16-bit floats and counts [T] int32 -> the staging words [T, ceil(D / 2)] int64 that carry them."""
    bits = x.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    if bits.shape[1] % 2:
        bits = torch.nn.functional.pad(bits, (0, 1))
    pairs = bits.view(bits.shape[0], -1, 2)
    return (counts.to(torch.int64)[:, None] << 32) | (pairs[..., 1] << 16) | pairs[..., 0]


def unpack_words(words: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `pack_words`: words [T, ceil(dim / 2)] int64 -> values [T, dim] of dtype."""
    halves = torch.stack([words & 0xFFFF, (words >> 16) & 0xFFFF], dim=-1).to(torch.int16)
    return halves.view(words.shape[0], -1).view(dtype)[:, :dim]


def stage_rows_ref(x: torch.Tensor, peers: PeerBuffers) -> None:
    """Torch reference of what `stage_tile` does over all of x [T, D]: x's words for the next call on rows [0, T)
    into every peer's staging (the counters are not advanced)."""
    t, d = x.shape
    count = peers.counters[:t] + 1
    parity = (count & 1).long()
    rows = torch.arange(t, device=x.device)
    words = pack_words(x, count)
    for r in range(peers.world):
        if r != peers.rank:
            peers.staging(r, d)[parity, peers.rank, rows] = words


def exchange_rows_ref(x: torch.Tensor, peers: PeerBuffers, staged: bool, caller: str) -> list[torch.Tensor]:
    """One call of the protocol on x [T, D] (16-bit), by torch: stage x's words for the peers (unless `staged`),
    advance the counters of rows [0, T), and read the peers' words for this call -> every rank's rows [T, D], x's
    dtype, in rank order (x itself at this rank's place). The peers must already have staged theirs (a reference
    rank cannot wait): RuntimeError names `caller` and the first rank that has not."""
    t, d = x.shape
    if not staged:
        stage_rows_ref(x, peers)
    count = peers.counters[:t] + 1
    peers.counters[:t] = count
    parity = (count & 1).long()
    rows = torch.arange(t, device=x.device)
    mine = peers.staging(peers.rank, d)
    every = []
    for r in range(peers.world):
        if r == peers.rank:
            every.append(x)
            continue
        got = mine[parity, r, rows]
        if bool(((got >> 32).to(torch.int32) != count[:, None]).any()):
            raise RuntimeError(f"{caller}: rank {r} has not staged its rows for this call")
        every.append(unpack_words(got, d, x.dtype))
    return every


def reduce_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                            peers: PeerBuffers, staged: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference for `reduce_add_rms_norm`: the same staging words and counters, step by step (see
    `exchange_rows_ref`)."""
    _check(x, residual, weight, peers)
    total = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for rows in exchange_rows_ref(x, peers, staged, "reduce_add_rms_norm_ref"):  # summed in rank order
        total += rows.float()
    return fused_add_rms_norm_ref(total.to(x.dtype), residual, weight, eps)
