"""Reading the paged KV cache inside Triton kernels, shared by prefill and decode attention.

Token `pos` of a sequence lives at row `pos % PAGE_SIZE` of page `block_table[pos // PAGE_SIZE]`; gathering each
tile's rows through the table keeps the attention kernels' BLOCK_N independent of the page size, and lets a tile
hold keys that are not contiguous (strided summary columns, listed blocks).

FP8 (e4m3) caches carry one float32 scale per (token, kv head) beside the pages: a key or value row is
`row_e4m3 * scale`. Key scales multiply the scores after Q @ K^T and value scales the probabilities before P @ V
(one multiply per score, not per element); for float16 queries the value tile is scaled instead, in float32, so
that P * scale cannot fall into float16's subnormals.
"""
import triton
import triton.language as tl


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
    q,  # [M, Dh] queries (the dot dtype)
    rows,  # [N] flat cache rows of the tile's keys (from cache_rows)
    valid,  # [N] keys that exist; invalid rows read as 0 when MASKED
    seen,  # [M, N] bool: query sees key (used when APPLY_SEEN)
    k_cache_ptr, v_cache_ptr,  # [num_pages * PAGE_SIZE, Hk, Dh] contiguous
    k_scale_ptr, v_scale_ptr,  # [num_pages * PAGE_SIZE, Hk] float32 (when HAS_SCALE)
    kv_head, num_kv_heads,
    qk_scale,  # softmax scale * log2(e)
    dims,  # [Dh] arange
    HEAD_DIM: tl.constexpr,
    MASKED: tl.constexpr,  # some keys of the tile may be invalid
    APPLY_SEEN: tl.constexpr,  # apply `seen` (else every query sees every valid key)
    HAS_SCALE: tl.constexpr,  # FP8 cache: dequantize with the per-(token, head) scales
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 queries, else ignored
    USE_DOT: tl.constexpr = True,  # tensor-core products; False (M == 1 only): float32 multiply-and-sum, which
    # lets the compiler load the tile in wide, coalesced rows (decode of one query head is a GEMV)
):
    """One flash-attention step over a gathered tile of keys; returns the updated (acc, l_i, m_i)."""
    slots = rows * num_kv_heads + kv_head
    ptrs = slots[:, None] * HEAD_DIM + dims[None, :]
    if MASKED:
        k = tl.load(k_cache_ptr + ptrs, mask=valid[:, None], other=0.0)
    else:
        k = tl.load(k_cache_ptr + ptrs)
    if USE_DOT:
        qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION)
    else:
        qk = tl.sum(k.to(tl.float32) * q.to(tl.float32), 1)[None, :]
    if HAS_SCALE:
        k_scale = tl.load(k_scale_ptr + slots, mask=valid, other=0.0)
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
        v_scale = tl.load(v_scale_ptr + slots, mask=valid, other=0.0)
        if USE_DOT and q.dtype == tl.float16:
            # p * scale could fall into float16's subnormals: scale the values instead.
            v = v.to(tl.float32) * v_scale[:, None]
        else:
            p = p * v_scale[None, :]
    if USE_DOT:
        pv = tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
    else:
        pv = tl.sum(tl.sum(p, 0)[:, None] * v.to(tl.float32), 0)[None, :]
    acc = acc * alpha[:, None] + pv
    return acc, l_i, m_new


def gather_kv(cache, scale, table_row, seq_len: int):
    """Torch side, for the references: float32 [seq_len, Hk, Dh] rows of one sequence, dequantized when `scale`
    ([num_pages, page_size, Hk] float32, FP8 caches) is given."""
    page_size = cache.shape[1]
    pages = table_row[:triton.cdiv(seq_len, page_size)].long()
    rows = cache[pages].float()
    if scale is not None:
        rows = rows * scale[pages][..., None]
    return rows.reshape(-1, *cache.shape[2:])[:seq_len]
