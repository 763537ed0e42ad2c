"""Flash attention for packed variable-length prefill chunks under an attention pattern, reading keys and values
from the paged cache (bf16/fp16/fp32, or FP8 e4m3 with per-(token, head) scales).

A query tile visits only the keys its pattern can show it: dense, everything up to its last query; local, the band
of keys overlapping its queries' windows plus the sink keys left of it; strided, those plus the summary columns
left of the band, gathered stride apart in tiles of BLOCK_N; block-sparse, the blocks its lookup row lists.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_kv_caches, check_tensor
from ._dispatch import use_triton
from ._paged import attend_tile, cache_rows, gather_kv
from .patterns import (
    BLOCK_SPARSE_ID,
    DENSE,
    DENSE_ID,
    SPARSE_BLOCK,
    BlockSparse,
    Pattern,
    head_masks,
    keys_before,
    kernel_params,
    lookup_blocks,
    virtual_keys,
    visible,
    window_start,
)


@triton.jit
def _attend_range(
    acc, l_i, m_i, q, q_pos,  # running state, queries [BLOCK_M, Dh] and their positions
    v_start, v_end,  # virtual key indices [v_start, v_end) (see patterns.virtual_keys)
    lo, n_sink, n_summary, ids_ptr,  # virtual_keys arguments
    key_end,  # keys >= key_end are not read
    head, kv_head, num_kv_heads, P0, P1, P2,
    k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table_ptr, qk_scale, dims,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    PATTERN: tl.constexpr,  # the pattern, for the visibility mask
    KEY_MAP: tl.constexpr,  # the pattern id whose virtual_keys mapping this range uses
    MASKED: tl.constexpr,  # check bounds (v < v_end, key < key_end)
    APPLY_SEEN: tl.constexpr,  # apply the pattern's visibility mask (else every key is visible to every query)
    HAS_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    for v0 in range(v_start, v_end, BLOCK_N):
        v = v0 + tl.arange(0, BLOCK_N)
        valid = v < v_end
        keys = virtual_keys(v, valid, lo, n_sink, n_summary, P1, ids_ptr, KEY_MAP)
        valid = valid & (keys < key_end)
        rows = cache_rows(table_ptr, keys, valid, PAGE_SIZE, MASKED)
        seen = valid[None, :]
        if APPLY_SEEN:
            seen = seen & visible(q_pos, keys, head, P0, P1, P2, PATTERN)
        acc, l_i, m_i = attend_tile(acc, l_i, m_i, q, rows, valid, seen, k_cache_ptr, v_cache_ptr,
                                    k_scale_ptr, v_scale_ptr, kv_head, num_kv_heads, qk_scale, dims,
                                    HEAD_DIM, PAGE_SIZE, MASKED, APPLY_SEEN, HAS_SCALE, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _prefill_attention_kernel(
    q_ptr,  # [Tq, Hq, Dh] queries, last dim contiguous
    k_cache_ptr,  # [num_pages, PAGE_SIZE, Hk, Dh] contiguous
    v_cache_ptr,  # [num_pages, PAGE_SIZE, Hk, Dh] contiguous
    k_scale_ptr,  # [num_pages, Hk, PAGE_SIZE] float16 (FP8 caches; else unused)
    v_scale_ptr,  # [num_pages, Hk, PAGE_SIZE] float16 (FP8 caches; else unused)
    block_tables_ptr,  # [B, max_pages] int32 page ids
    q_start_ptr,  # [B] first query row of each sequence
    q_lens_ptr,  # [B] query rows of each sequence
    seq_lens_ptr,  # [B] keys of each sequence, this chunk included
    ids_ptr,  # [Hq, n_rows, width] block-sparse lookup (span BLOCK_M // 16 + 1; else unused)
    counts_ptr,  # [Hq, n_rows] listed blocks per lookup row
    out_ptr,  # [Tq, Hq, Dh] contiguous
    qk_scale,  # softmax scale * log2(e)
    P0, P1, P2,  # pattern parameters (patterns.kernel_params)
    num_kv_heads,  # Hk
    lookup_rows, lookup_width,  # lookup shape (n_rows, width)
    stride_qt, stride_qh,  # q strides (token, head)
    stride_bt,  # block table row stride
    PATTERN: tl.constexpr,  # pattern id (patterns.DENSE_ID, ...)
    GROUP: tl.constexpr,  # query heads per kv head
    HEAD_DIM: tl.constexpr,  # Dh, a power of two
    PAGE_SIZE: tl.constexpr,  # tokens per page
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per inner step
    HAS_SCALE: tl.constexpr,  # FP8 cache with scales
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs, else ignored
):
    # Query blocks run last-first: the late blocks of a causal sequence have the most keys, so they start early.
    m_block = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    num_heads = tl.num_programs(1)
    q_len = tl.load(q_lens_ptr + seq)
    context = tl.load(seq_lens_ptr + seq) - q_len  # keys cached before this chunk
    first_row = tl.load(q_start_ptr + seq).to(tl.int64)

    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < q_len
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (first_row + rows)[:, None] * stride_qt + head * stride_qh + dims[None, :],
                mask=row_valid[:, None], other=0.0)
    if HAS_SCALE:
        q = q.to(tl.float16)  # products over FP8 pages run in float16 (_paged.py)
    q_pos = context + rows

    # The tile's queries sit at positions [q_first, end); an empty tile (past q_len) gets end 0 and visits nothing.
    tile_valid = m_block * BLOCK_M < q_len
    q_first = context + m_block * BLOCK_M
    end = tl.where(tile_valid, context + tl.minimum((m_block + 1) * BLOCK_M, q_len), 0)
    table_ptr = block_tables_ptr + seq * stride_bt
    kv_head = head // GROUP
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    if PATTERN == BLOCK_SPARSE_ID:
        # Every listed block, masked: the row lists the union over the tile's query blocks.
        lookup_row = head * lookup_rows + q_first // SPARSE_BLOCK
        count = tl.load(counts_ptr + lookup_row, mask=tile_valid, other=0)
        acc, l_i, m_i = _attend_range(acc, l_i, m_i, q, q_pos, 0, count * SPARSE_BLOCK, 0, 0, 0,
                                      ids_ptr + lookup_row.to(tl.int64) * lookup_width, end,
                                      head, kv_head, num_kv_heads, P0, P1, P2,
                                      k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table_ptr, qk_scale, dims,
                                      HEAD_DIM, PAGE_SIZE, BLOCK_N, PATTERN, BLOCK_SPARSE_ID, True, True,
                                      HAS_SCALE, DOT_PRECISION)
    else:
        if PATTERN == DENSE_ID:
            # Keys before the tile's first query, whole BLOCK_N tiles: visible to every query, no mask.
            band_start = tl.minimum(q_first // BLOCK_N * BLOCK_N, end)
            acc, l_i, m_i = _attend_range(acc, l_i, m_i, q, q_pos, 0, band_start, 0, 0, 0, ids_ptr, end,
                                          head, kv_head, num_kv_heads, P0, P1, P2,
                                          k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table_ptr, qk_scale,
                                          dims, HEAD_DIM, PAGE_SIZE, BLOCK_N, PATTERN, DENSE_ID, False, False,
                                          HAS_SCALE, DOT_PRECISION)
        else:
            # Local and strided: the band from the first query's window start, after the keys left of it that
            # every query of the tile sees (sink keys, then strided summary columns: patterns.keys_before).
            band_start = tl.minimum(window_start(q_first, P0, PATTERN), end)
            n_sink, n_summary = keys_before(band_start, P1, P2, PATTERN)
            n_before = tl.where(tile_valid, n_sink + n_summary, 0)
            acc, l_i, m_i = _attend_range(acc, l_i, m_i, q, q_pos, 0, n_before, 0, n_sink, n_summary, ids_ptr, end,
                                          head, kv_head, num_kv_heads, P0, P1, P2,
                                          k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table_ptr,
                                          qk_scale, dims, HEAD_DIM, PAGE_SIZE, BLOCK_N, PATTERN, PATTERN,
                                          True, False, HAS_SCALE, DOT_PRECISION)
        # The band up to the tile's last query: causal and pattern masks.
        acc, l_i, m_i = _attend_range(acc, l_i, m_i, q, q_pos, band_start, end, 0, 0, 0, ids_ptr, end,
                                      head, kv_head, num_kv_heads, P0, P1, P2,
                                      k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table_ptr, qk_scale, dims,
                                      HEAD_DIM, PAGE_SIZE, BLOCK_N, PATTERN, DENSE_ID, True, True,
                                      HAS_SCALE, DOT_PRECISION)

    # Every valid row sees its own key, so l_i > 0 there; rows past q_len are not stored.
    out = acc / tl.where(row_valid, l_i, 1.0)[:, None]
    out_rows = (first_row + rows) * num_heads + head
    tl.store(out_ptr + out_rows[:, None] * HEAD_DIM + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_valid[:, None])


def _config(head_dim: int, dtype: torch.dtype, device: torch.device, pattern_id: int,
            fp8: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for this head size, dtype, pattern and cache kind."""
    if device.type != "cuda":
        return 16, 16, 4, 1  # the interpreter: small tiles keep tests fast and cover multi-block paths
    if dtype == torch.float32 or head_dim > 128:
        return 64, 32, 4, 2
    if fp8:
        # H200, 32 heads x 128, FP8 pages: 64 x 128 tiles with 2 stages: dense 4K 633 us, 32K 33.2 ms, local:256
        # at 32K 1.22 ms, against 861 us, 43.7 ms, 1.88 ms with the bf16 tiles below.
        return 64, 128, 4, 2
    if pattern_id != DENSE_ID.value:
        # Sparse tiles are partly masked at a band's edges; on an H200 (bf16, 32 heads x 128) local:256 at 32K
        # takes 784 us with 64 x 32 tiles, 904 us with 64 x 64 and 1.06 ms with 128 x 128.
        return 64, 32, 4, 3
    if head_dim == 128:
        return 128, 128, 8, 3  # measured best on H200 for 1K-4K causal prompts (bf16)
    return 128, 64, 4, 3


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      q_start: torch.Tensor, q_lens: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                      max_q_len: int, pattern: Pattern = DENSE, k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of B packed query chunks over their sequences' paged keys and values, under `pattern`.

    q [Tq, Hq, Dh] fp16/bf16/fp32 (last dim contiguous; Dh a power of two in 16..256); k_cache, v_cache
    [num_pages, page_size, Hk, Dh] contiguous, q's dtype or float8_e4m3fn, already holding this chunk's keys and
    values; for FP8 caches k_scale, v_scale [num_pages, Hk, page_size] float16 contiguous (row = e4m3 * scale),
    else None; Hq a multiple of Hk (query head h reads kv head h // (Hq // Hk), and is head h of a block-sparse
    pattern); block_tables [B, max_pages] int32 (entries past a sequence's pages are never read); q_start,
    q_lens, seq_lens [B] int32: sequence b's queries are rows q_start[b] .. q_start[b] + q_lens[b] - 1 of q, at
    positions seq_lens[b] - q_lens[b] + i, each seeing the earlier keys its pattern keeps (patterns.py).
    max_q_len (host int) >= every q_lens[b] sizes the grid. Returns out [Tq, Hq, Dh] contiguous, q's dtype;
    rows outside every sequence are left unwritten.
    """
    if not use_triton(q):
        return prefill_attention_ref(q, k_cache, v_cache, block_tables, q_start, q_lens, seq_lens, scale,
                                     max_q_len, pattern, k_scale, v_scale)
    check_tensor("q", q, (None, None, None), FLOAT_DTYPES)
    tq, hq, dh = q.shape
    has_scale = check_kv_caches(k_cache, v_cache, k_scale, v_scale, dh, q.dtype, q.device)
    check_tensor("block_tables", block_tables, (None, None), (torch.int32,), q.device)
    b = block_tables.shape[0]
    for name, t in (("q_start", q_start), ("q_lens", q_lens), ("seq_lens", seq_lens)):
        check_tensor(name, t, (b,), (torch.int32,), q.device, layout="contiguous")
    page_size, hk = k_cache.shape[1], k_cache.shape[2]
    if dh not in (16, 32, 64, 128, 256):
        raise ValueError(f"head_dim must be a power of two in 16..256, got q of shape {tuple(q.shape)}")
    if hq % hk:
        raise ValueError(f"q heads ({hq}) must be a multiple of cache kv heads ({hk})")
    pattern_id, p0, p1, p2 = kernel_params(pattern)
    out = torch.empty((tq, hq, dh), dtype=q.dtype, device=q.device)
    if tq == 0 or b == 0 or max_q_len <= 0:
        return out
    block_m, block_n, num_warps, num_stages = _config(dh, q.dtype, q.device, pattern_id, has_scale)
    if isinstance(pattern, BlockSparse):
        if page_size != SPARSE_BLOCK.value:
            raise ValueError(f"block-sparse attention needs pages of {SPARSE_BLOCK.value} tokens, got {page_size}")
        ids, counts = pattern.lookup(hq, lookup_blocks(block_tables.shape[1]), q.device,
                                     span=block_m // SPARSE_BLOCK.value + 1)
    else:
        ids = counts = block_tables  # unused
    _prefill_attention_kernel[(triton.cdiv(max_q_len, block_m), hq, b)](
        q, k_cache, v_cache, k_scale if has_scale else k_cache, v_scale if has_scale else v_cache,
        block_tables, q_start, q_lens, seq_lens, ids, counts, out,
        scale * math.log2(math.e), p0, p1, p2, hk, counts.shape[-1] if isinstance(pattern, BlockSparse) else 0,
        ids.shape[-1] if isinstance(pattern, BlockSparse) else 0,
        q.stride(0), q.stride(1), block_tables.stride(0),
        PATTERN=pattern_id, GROUP=hq // hk, HEAD_DIM=dh, PAGE_SIZE=page_size, BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_SCALE=has_scale, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          block_tables: torch.Tensor, q_start: torch.Tensor, q_lens: torch.Tensor,
                          seq_lens: torch.Tensor, scale: float, max_q_len: int, pattern: Pattern = DENSE,
                          k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference for `prefill_attention` (one sequence at a time, float32, FP8 pages dequantized, the
    pattern applied as an explicit mask; rows outside sequences are 0)."""
    hq = q.shape[1]
    hk = k_cache.shape[2]
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    for b, (start, n, seq_len) in enumerate(zip(q_start.tolist(), q_lens.tolist(), seq_lens.tolist())):
        if n == 0:
            continue
        k = gather_kv(k_cache, k_scale, block_tables[b], seq_len).repeat_interleave(hq // hk, dim=1)
        v = gather_kv(v_cache, v_scale, block_tables[b], seq_len).repeat_interleave(hq // hk, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start:start + n].float(), k) * scale
        q_pos = torch.arange(seq_len - n, seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        visible = head_masks(pattern, q_pos, k_pos, hq)
        scores = scores.masked_fill(~visible, float("-inf"))
        out[start:start + n] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
    return out
