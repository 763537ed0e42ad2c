"""Flash attention for packed variable-length prefill chunks under an attention pattern, reading keys and values
from the paged cache (bf16/fp16/fp32, or FP8 e4m3 with per-(token, head) scales).

A query tile visits only the keys its pattern can show it: dense, everything up to its last query; local, the band
of keys overlapping its queries' windows plus the sink keys left of it; strided, those plus the summary columns
left of the band, gathered stride apart in tiles of BLOCK_N; block-sparse, the blocks its lookup row lists. Tiles
whose keys every query of the program sees (whole tiles left of the diagonal, inside every query's window, strided
summary columns, vertical stripes left of every local band) skip the mask.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_kv_caches, check_scale_words, check_tensor
from ._dispatch import use_triton
from ._paged import gather_kv
from .patterns import (
    BLOCK_SPARSE_ID,
    DENSE,
    DENSE_ID,
    SPARSE_BLOCK,
    BlockSparse,
    Pattern,
    gathers_keys,
    head_masks,
    keys_before,
    kernel_params,
    lookup_blocks,
    virtual_keys,
    visible,
    window_start,
)


@triton.jit
def _attend_tile(
    acc, l_i, m_i,  # running output [M, Dh], softmax denominator and max [M] (log2 domain)
    q, q_pos,  # queries [M, Dh] in the dot dtype (float16 over FP8 pages) and their positions [M]
    keys, valid,  # [N] key positions of the tile and which exist (the others are not read)
    full,  # every query sees every key of the tile: no mask
    head, kv_head, num_kv_heads, P0, P1, P2,
    k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table_ptr, qk_scale, dims,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    PATTERN: tl.constexpr,  # the pattern, for the visibility mask
    HAS_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One flash-attention step over a gathered tile of keys; returns the updated (acc, l_i, m_i)."""
    page = tl.load(table_ptr + keys // PAGE_SIZE, mask=valid, other=0)
    slot = keys % PAGE_SIZE
    offs = ((page.to(tl.int64) * PAGE_SIZE + slot) * num_kv_heads + kv_head)[:, None] * HEAD_DIM + dims[None, :]
    k = tl.load(k_cache_ptr + offs, mask=valid[:, None], other=0.0)
    if HAS_SCALE:
        scale_idx = (page * num_kv_heads + kv_head) * PAGE_SIZE + slot  # 32-bit: the launcher checks the size
        k_scale = tl.load(k_scale_ptr + scale_idx, mask=valid, other=0.0).to(tl.float32)
        # The value scale is read as the aligned 32-bit word holding it: the software pipeliner copies loads of
        # 4 bytes and more ahead asynchronously, with the value tile.
        v_word = tl.load(v_scale_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + (scale_idx >> 1), mask=valid,
                         other=0)
        v_scale = (v_word >> ((scale_idx & 1) * 16)).to(tl.int16).to(tl.float16, bitcast=True)
    qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION)
    if HAS_SCALE:
        qk = qk * (k_scale * qk_scale)[None, :]
    if not full:
        qk = tl.where(valid[None, :] & visible(q_pos, keys, head, P0, P1, P2, PATTERN), qk, float("-inf"))
    if HAS_SCALE:
        m_new = tl.maximum(m_i, tl.max(qk, 1))
    else:
        # Float pages: the softmax scale is applied after the row max (scale > 0), so that scaling and
        # subtracting the max below are one fused multiply-add per score.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    # A query that has seen no key yet keeps m = -inf; subtracting 0 instead keeps its terms 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    if HAS_SCALE:
        p = tl.exp2(qk - m_safe[:, None])
    else:
        p = tl.exp2(qk * qk_scale - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_cache_ptr + offs, mask=valid[:, None], other=0.0)
    if HAS_SCALE:
        # Value scales multiply the value rows in float16 (see _paged.py).
        v = v.to(tl.float16) * v_scale[:, None]
    acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attend_keys(
    acc, l_i, m_i, q, q_pos,  # running state, queries [BLOCK_M, Dh] and their positions
    v_end,  # virtual key indices [0, v_end) (see patterns.virtual_keys)
    free_a, free_b, free_c,  # tiles inside [0, free_a) or [free_b, free_c) are visible to every query
    lo, n_sink, n_summary, ids_ptr,  # virtual_keys arguments
    key_end,  # keys >= key_end are not read
    head, kv_head, num_kv_heads, P0, P1, P2,
    k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table_ptr, qk_scale, dims,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    PATTERN: tl.constexpr,  # the pattern, for the visibility mask
    KEY_MAP: tl.constexpr,  # the pattern id whose virtual_keys mapping this range uses
    HAS_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Masks are applied under a branch, tile by tile, not in loops of their own: each loop drains the software
    # pipeline and refills it. H200, 32 heads x 128, bf16 4K: dense 441 us with an unmasked loop then a masked
    # one, 416 us with one loop; local:256 137 us with a loop each for the window's left edge, inside and
    # diagonal, 108 us with one.
    for v0 in range(0, v_end, BLOCK_N):
        v = v0 + tl.arange(0, BLOCK_N)
        valid = v < v_end
        keys = virtual_keys(v, valid, lo, n_sink, n_summary, P1, ids_ptr, KEY_MAP)
        valid = valid & (keys < key_end)
        full = (v0 + BLOCK_N <= free_a) | ((v0 >= free_b) & (v0 + BLOCK_N <= free_c))
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, q_pos, keys, valid, full, head, kv_head, num_kv_heads,
                                     P0, P1, P2, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table_ptr,
                                     qk_scale, dims, HEAD_DIM, PAGE_SIZE, PATTERN, HAS_SCALE, DOT_PRECISION)
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
    GATHERED: tl.constexpr,  # the pattern keeps keys left of the window (patterns.gathers_keys)
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
    end = tl.where(tile_valid, context + tl.minimum((m_block + 1) * BLOCK_M, q_len), 0)
    q_first = tl.minimum(context + m_block * BLOCK_M, end)
    table_ptr = block_tables_ptr + seq * stride_bt
    kv_head = head // GROUP
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    if PATTERN == BLOCK_SPARSE_ID:
        # The row lists the union over the tile's query blocks, ascending. Its first entries, left of every query's
        # local band, are vertical stripes, which every query sees.
        lookup_row = head * lookup_rows + q_first // SPARSE_BLOCK
        count = tl.load(counts_ptr + lookup_row, mask=tile_valid, other=0)
        band_block = tl.maximum(q_first // SPARSE_BLOCK - P0 + 1, 0)
        n_stripes = (band_block + head) // P1 - head // P1
        acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, q_pos, count * SPARSE_BLOCK, n_stripes * SPARSE_BLOCK, 0, 0,
                                     0, 0, 0, ids_ptr + lookup_row.to(tl.int64) * lookup_width, end,
                                     head, kv_head, num_kv_heads, P0, P1, P2,
                                     k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table_ptr, qk_scale, dims,
                                     HEAD_DIM, PAGE_SIZE, BLOCK_N, PATTERN, BLOCK_SPARSE_ID, HAS_SCALE,
                                     DOT_PRECISION)
    else:
        # The window [lo, end) from the first query's window start (0 for dense): keys [lo, a) are visible to
        # some queries only (a: the last query's window start), [a, q_first] to every query, the rest causally.
        lo = tl.minimum(window_start(q_first, P0, PATTERN), end)
        a = tl.minimum(tl.maximum(window_start(end - 1, P0, PATTERN), lo), q_first)
        n_sink, n_summary = keys_before(lo, P1, P2, PATTERN)
        n_before = n_sink + n_summary
        if PATTERN != DENSE_ID and HAS_SCALE:
            # Over FP8 pages one loop covers the keys left of the window (sink keys, then strided summary columns,
            # gathered) and the window: their 128-key tiles would make a separate loop's padded last tile costly.
            # H200: strided:128,256 4K 176 us, 32K 1.71 ms, against 225 us, 1.86 ms with a loop each;
            # local:256,sink=4 142 us, 1.06 ms against 191 us, 1.47 ms; local:256 1-2% faster than through the
            # window loop alone.
            acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, q_pos, n_before + end - lo, n_before,
                                         n_before + a - lo, n_before + q_first - lo + 1, lo, n_sink, n_summary,
                                         ids_ptr, end, head, kv_head, num_kv_heads, P0, P1, P2,
                                         k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table_ptr, qk_scale,
                                         dims, HEAD_DIM, PAGE_SIZE, BLOCK_N, PATTERN, PATTERN, HAS_SCALE,
                                         DOT_PRECISION)
        else:
            if GATHERED:
                # Left of the window, the keys every query sees, gathered, in a loop of their own, so that the
                # window's keys are mapped as contiguous ones, not through the pattern's where-chains in every
                # tile. bf16 strided:128,256: 4K 144 us, 32K 1.24 ms, against 152 us, 1.30 ms with one loop;
                # local:256,sink=4 124 us, 933 us against 125, 948. Without such keys the loop is not compiled
                # at all: an empty one cost bf16 local:256 7% (4K 107 us against 100, 32K 800 against 749).
                acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, q_pos, n_before, n_before, 0, 0, lo, n_sink,
                                             n_summary, ids_ptr, end, head, kv_head, num_kv_heads, P0, P1, P2,
                                             k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table_ptr,
                                             qk_scale, dims, HEAD_DIM, PAGE_SIZE, BLOCK_N, PATTERN, PATTERN,
                                             HAS_SCALE, DOT_PRECISION)
            acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, q_pos, end - lo, 0, a - lo, q_first - lo + 1, lo, 0, 0,
                                         ids_ptr, end, head, kv_head, num_kv_heads, P0, P1, P2,
                                         k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table_ptr, qk_scale,
                                         dims, HEAD_DIM, PAGE_SIZE, BLOCK_N, PATTERN, DENSE_ID, HAS_SCALE,
                                         DOT_PRECISION)

    # Every valid row sees its own key, so l_i > 0 there; rows past q_len are not stored.
    out = acc / tl.where(row_valid, l_i, 1.0)[:, None]
    out_rows = (first_row + rows) * num_heads + head
    tl.store(out_ptr + out_rows[:, None] * HEAD_DIM + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_valid[:, None])


def _config(head_dim: int, dtype: torch.dtype, device: torch.device, pattern_id: int,
            fp8: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for this head size, dtype, pattern and cache kind. Timings: H200,
    32 heads x 128, one 4K or 32K prompt (bench/attention.py)."""
    if device.type != "cuda":
        return 16, 16, 4, 1  # the interpreter: small tiles keep tests fast and cover multi-block paths
    if dtype == torch.float32 or head_dim > 128:
        return 64, 32, 4, 2
    if fp8:
        # Every pattern: dense 4K 592 us, 32K 30.8 ms; block-sparse at 32K 4.67 ms against 6.84 ms with 64 x 64
        # tiles. Eight warps over 128 x 64 tiles took 838 us at 4K: each thread then converts fewer keys and
        # values, but computes and loads the key scales of as many score columns.
        return 64, 128, 4, 3
    if pattern_id != DENSE_ID.value:
        # Tiles at a band's edges are partly masked: block-sparse at 4K 160 us against 203 us with 128 x 128
        # tiles; local:256 at 32K 811 us against 875 us with 64 x 32 (both before sink and summary keys got a
        # loop of their own; 806 us after).
        return 64, 64, 4, 3
    if head_dim == 128:
        # 4K 416 us, 32K 20.9 ms. The pipeliner fetches the keys and values (num_stages - 1) // 2 tiles ahead
        # (2: their chain of loads, block table then rows), so 5 stages fetch two tiles ahead (three 128 x 128
        # buffers, 225 KB of shared memory): no faster (414 against 416 us, both 20.7 ms at 32K). 128 x 64 tiles
        # were slower: 4K 454 us with 5 stages, 529 us with 3, where these took 441 us.
        return 128, 128, 8, 3
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
    if has_scale:
        check_scale_words(k_scale, v_scale)
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
        HAS_SCALE=has_scale, GATHERED=gathers_keys(pattern),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=num_warps, num_stages=num_stages,
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
