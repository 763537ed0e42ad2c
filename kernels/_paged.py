"""Reading the paged KV cache inside Triton kernels, shared by prefill and decode attention.

Token `pos` of a sequence lives at row `pos % PAGE_SIZE` of page `block_table[pos // PAGE_SIZE]`; gathering each
tile's rows through the table keeps the attention kernels' BLOCK_N independent of the page size, and lets a tile
hold keys that are not contiguous (strided summary columns, listed blocks).

FP8 (e4m3) caches carry one float16 scale per (token, kv head) beside the pages, laid out [num_pages, Hk,
PAGE_SIZE] so that one head's scales of a page are 32 contiguous bytes: a key or value row is `row_e4m3 * scale`.
Over FP8 pages the tensor-core products run in float16, whatever the query dtype: e4m3 converts to float16
exactly in one instruction (bfloat16 takes several), and float16's 10 mantissa bits hold queries and
probabilities more finely than bfloat16's 7. Key scales multiply the scores after Q @ K^T: folded into the keys
they would round each key to float16, which on data like the tests' (keys ~50 with 8x outlier channels, queries
0.02-0.1) costs 0.4-1.7x the float16 output tolerance, against 0.12-0.15x for scaled scores. Value scales:
`attend_tile` (decode) multiplies the probabilities by scale * 448 (the row's absolute maximum) before P @ V and
divides the product by 448 after, so that they stay out of float16's subnormals; prefill multiplies the value rows
by their scales in float16 instead, with the same output error on that data (0.12-0.16x the tolerance), so that
P @ V accumulates straight into the output and the scale is a row vector of the value tile. Queries, scores times
row maxima and values must stay below float16's 65504.
"""
import triton
import triton.language as tl

from ._checks import FP8_MAX as _FP8_MAX

# Largest finite e4m3 value, as a compile-time constant for the kernels.
FP8_MAX = tl.constexpr(_FP8_MAX)


@triton.jit
def cache_rows(
    table_ptr,  # this sequence's row of the block table
    keys,  # [BLOCK_N] key positions
    valid,  # [BLOCK_N] keys to read; the others are not looked up
    PAGE_SIZE: tl.constexpr,  # tokens per page
    MASKED: tl.constexpr,  # False when every key is valid
):
    """int64 [BLOCK_N] flat cache row (page * PAGE_SIZE + slot) of each key (page 0 for invalid keys)."""
    if MASKED:
        page = tl.load(table_ptr + keys // PAGE_SIZE, mask=valid, other=0)
    else:
        page = tl.load(table_ptr + keys // PAGE_SIZE)
    return page.to(tl.int64) * PAGE_SIZE + keys % PAGE_SIZE


@triton.jit
def attend_tile(
    acc, l_i, m_i,  # running output [M, Dh], softmax denominator and max [M] (log2 domain)
    q,  # [M, Dh] queries in the dot dtype (float16 over FP8 pages)
    rows,  # [N] flat cache rows of the tile's keys (from cache_rows)
    valid,  # [N] keys that exist; invalid rows read as 0 when MASKED
    seen,  # [M, N] bool: query sees key (used when APPLY_SEEN)
    k_cache_ptr, v_cache_ptr,  # [num_pages * PAGE_SIZE, Hk, Dh] contiguous
    k_scale_ptr, v_scale_ptr,  # [num_pages, Hk, PAGE_SIZE] float16 (when HAS_SCALE)
    kv_head, num_kv_heads,
    qk_scale,  # softmax scale * log2(e)
    dims,  # [Dh] arange
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,  # tokens per page
    MASKED: tl.constexpr,  # some keys of the tile may be invalid
    APPLY_SEEN: tl.constexpr,  # apply `seen` (else every query sees every valid key)
    HAS_SCALE: tl.constexpr,  # FP8 cache: dequantize with the per-(token, head) scales
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 queries, else ignored
):
    """One flash-attention step over a gathered tile of keys; returns the updated (acc, l_i, m_i)."""
    slots = rows * num_kv_heads + kv_head
    ptrs = slots[:, None] * HEAD_DIM + dims[None, :]
    if MASKED:
        k = tl.load(k_cache_ptr + ptrs, mask=valid[:, None], other=0.0)
    else:
        k = tl.load(k_cache_ptr + ptrs)
    if HAS_SCALE:
        # Both scale loads are issued with the key tile, so their latency overlaps it.
        scale_idx = ((rows // PAGE_SIZE) * num_kv_heads + kv_head) * PAGE_SIZE + rows % PAGE_SIZE
        k_scale = tl.load(k_scale_ptr + scale_idx, mask=valid, other=0.0).to(tl.float32)
        v_scale = tl.load(v_scale_ptr + scale_idx, mask=valid, other=0.0).to(tl.float32)
    qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION)
    if HAS_SCALE:
        qk = qk * (k_scale * qk_scale)[None, :]
    else:
        qk = qk * qk_scale
    if APPLY_SEEN:
        qk = tl.where(seen, qk, float("-inf"))
    elif MASKED:
        qk = tl.where(valid[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # A query that has seen no key yet keeps m = -inf; subtracting 0 instead keeps its terms 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_cache_ptr + ptrs, mask=valid[:, None], other=0.0)
    else:
        v = tl.load(v_cache_ptr + ptrs)
    if HAS_SCALE:
        p = p * (v_scale * FP8_MAX)[None, :]
        pv = tl.dot(p.to(q.dtype), v.to(q.dtype)) * (1.0 / FP8_MAX)
    else:
        pv = tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
    acc = acc * alpha[:, None] + pv
    return acc, l_i, m_new


def gather_kv(cache, scale, table_row, seq_len: int):
    """Torch side, for the references: float32 [seq_len, Hk, Dh] rows of one sequence, dequantized when `scale`
    ([num_pages, Hk, page_size] float16, FP8 caches) is given."""
    page_size = cache.shape[1]
    pages = table_row[:triton.cdiv(seq_len, page_size)].long()
    rows = cache[pages].float()
    if scale is not None:
        rows = rows * scale[pages].float().transpose(1, 2)[..., None]
    return rows.reshape(-1, *cache.shape[2:])[:seq_len]
