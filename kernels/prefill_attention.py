"""Causal flash attention for packed variable-length prefill chunks, reading keys and values from the paged cache."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_tensor
from ._dispatch import use_triton
from ._paged import load_kv_tile


@triton.jit
def _causal_key_range(m_block, q_len, context, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key positions a query block reads: [0, full_end) is visible to all of its rows, [full_end, end) needs the
    causal mask, nothing past `end`. The one place the key-block loop bounds are decided."""
    first = m_block * BLOCK_M
    end = tl.where(first < q_len, context + tl.minimum(first + BLOCK_M, q_len), 0)
    full_end = tl.minimum((context + first) // BLOCK_N * BLOCK_N, end)
    return full_end, end


@triton.jit
def _attend_keys(
    acc, l_i, m_i,  # running output [BLOCK_M, Dh], softmax denominator and max [BLOCK_M] (log2 domain)
    q,  # [BLOCK_M, Dh] queries
    q_pos,  # [BLOCK_M] query positions
    k_cache_ptr, v_cache_ptr, table_ptr,  # caches and this sequence's block-table row
    start, end,  # key positions [start, end), start a multiple of BLOCK_N
    head_offset,  # kv head * stride of the head dim
    qk_scale,  # softmax scale * log2(e)
    stride_page, stride_slot,  # cache strides (page, token row)
    dims,  # [Dh] arange
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs, else ignored
    CAUSAL: tl.constexpr,  # apply the causal mask (and bounds checks) to these tiles
):
    for block_start in range(start, end, BLOCK_N):
        keys = block_start + tl.arange(0, BLOCK_N)
        k = load_kv_tile(k_cache_ptr, table_ptr, keys, end, head_offset, stride_page, stride_slot, dims,
                         PAGE_SIZE, CAUSAL)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if CAUSAL:
            qk = tl.where(keys[None, :] <= q_pos[:, None], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        v = load_kv_tile(v_cache_ptr, table_ptr, keys, end, head_offset, stride_page, stride_slot, dims,
                         PAGE_SIZE, CAUSAL)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _prefill_attention_kernel(
    q_ptr,  # [Tq, Hq, Dh] queries, last dim contiguous
    k_cache_ptr,  # [num_pages, PAGE_SIZE, Hk, Dh] contiguous
    v_cache_ptr,  # [num_pages, PAGE_SIZE, Hk, Dh] contiguous
    block_tables_ptr,  # [B, max_pages] int32 page ids
    q_start_ptr,  # [B] first query row of each sequence
    q_lens_ptr,  # [B] query rows of each sequence
    seq_lens_ptr,  # [B] keys of each sequence, this chunk included
    out_ptr,  # [Tq, Hq, Dh] contiguous
    qk_scale,  # softmax scale * log2(e)
    stride_qt, stride_qh,  # q strides (token, head)
    stride_bt,  # block table row stride
    stride_page, stride_slot, stride_kvh,  # cache strides (page, token row, kv head)
    GROUP: tl.constexpr,  # query heads per kv head
    HEAD_DIM: tl.constexpr,  # Dh, a power of two
    PAGE_SIZE: tl.constexpr,  # tokens per page
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per inner step
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
    q_pos = context + rows

    table_ptr = block_tables_ptr + seq * stride_bt
    head_offset = (head // GROUP) * stride_kvh
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    full_end, end = _causal_key_range(m_block, q_len, context, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, table_ptr, 0, full_end,
                                 head_offset, qk_scale, stride_page, stride_slot, dims,
                                 PAGE_SIZE, BLOCK_N, DOT_PRECISION, CAUSAL=False)
    acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, table_ptr, full_end, end,
                                 head_offset, qk_scale, stride_page, stride_slot, dims,
                                 PAGE_SIZE, BLOCK_N, DOT_PRECISION, CAUSAL=True)

    # Every valid row saw key 0, so l_i > 0 there; rows past q_len are not stored.
    out = acc / tl.where(row_valid, l_i, 1.0)[:, None]
    out_rows = (first_row + rows) * num_heads + head
    tl.store(out_ptr + out_rows[:, None] * HEAD_DIM + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_valid[:, None])


def _config(head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for this head size and dtype."""
    if device.type != "cuda":
        return 16, 16, 4, 1  # the interpreter: small tiles keep tests fast and cover multi-block paths
    if dtype == torch.float32 or head_dim > 128:
        return 64, 32, 4, 2
    if head_dim == 128:
        return 128, 128, 8, 3  # measured best on H200 for 1K-4K causal prompts (bf16)
    return 128, 64, 4, 3


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      q_start: torch.Tensor, q_lens: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                      max_q_len: int) -> torch.Tensor:
    """Causal attention of B packed query chunks over their sequences' paged keys and values.

    q [Tq, Hq, Dh] fp16/bf16/fp32 (last dim contiguous; Dh a power of two in 16..256); k_cache, v_cache
    [num_pages, page_size, Hk, Dh] contiguous, q's dtype, already holding this chunk's keys and values; Hq a
    multiple of Hk (query head h reads kv head h // (Hq // Hk)); block_tables [B, max_pages] int32 (entries past a
    sequence's pages are never read); q_start, q_lens, seq_lens [B] int32: sequence b's queries are rows
    q_start[b] .. q_start[b] + q_lens[b] - 1 of q, at positions seq_lens[b] - q_lens[b] + i, each seeing the keys
    at positions up to its own. max_q_len (host int) >= every q_lens[b] sizes the grid. Returns out [Tq, Hq, Dh]
    contiguous, q's dtype; rows outside every sequence are left unwritten.
    """
    if not use_triton(q):
        return prefill_attention_ref(q, k_cache, v_cache, block_tables, q_start, q_lens, seq_lens, scale,
                                     max_q_len)
    check_tensor("q", q, (None, None, None), FLOAT_DTYPES)
    tq, hq, dh = q.shape
    check_tensor("k_cache", k_cache, (None, None, None, dh), (q.dtype,), q.device, layout="contiguous")
    check_tensor("v_cache", v_cache, tuple(k_cache.shape), (q.dtype,), q.device, layout="contiguous")
    check_tensor("block_tables", block_tables, (None, None), (torch.int32,), q.device)
    b = block_tables.shape[0]
    for name, t in (("q_start", q_start), ("q_lens", q_lens), ("seq_lens", seq_lens)):
        check_tensor(name, t, (b,), (torch.int32,), q.device, layout="contiguous")
    page_size, hk = k_cache.shape[1], k_cache.shape[2]
    if dh not in (16, 32, 64, 128, 256):
        raise ValueError(f"head_dim must be a power of two in 16..256, got q of shape {tuple(q.shape)}")
    if hq % hk:
        raise ValueError(f"q heads ({hq}) must be a multiple of cache kv heads ({hk})")
    out = torch.empty((tq, hq, dh), dtype=q.dtype, device=q.device)
    if tq == 0 or b == 0 or max_q_len <= 0:
        return out
    block_m, block_n, num_warps, num_stages = _config(dh, q.dtype, q.device)
    _prefill_attention_kernel[(triton.cdiv(max_q_len, block_m), hq, b)](
        q, k_cache, v_cache, block_tables, q_start, q_lens, seq_lens, out,
        scale * math.log2(math.e),
        q.stride(0), q.stride(1), block_tables.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=hq // hk, HEAD_DIM=dh, PAGE_SIZE=page_size, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          block_tables: torch.Tensor, q_start: torch.Tensor, q_lens: torch.Tensor,
                          seq_lens: torch.Tensor, scale: float, max_q_len: int) -> torch.Tensor:
    """Torch reference for `prefill_attention` (one sequence at a time, float32; rows outside sequences are 0)."""
    _, hq, dh = q.shape
    page_size, hk = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    for b, (start, n, seq_len) in enumerate(zip(q_start.tolist(), q_lens.tolist(), seq_lens.tolist())):
        if n == 0:
            continue
        pages = block_tables[b, :triton.cdiv(seq_len, page_size)].long()
        k = k_cache[pages].reshape(-1, hk, dh)[:seq_len].float().repeat_interleave(hq // hk, dim=1)
        v = v_cache[pages].reshape(-1, hk, dh)[:seq_len].float().repeat_interleave(hq // hk, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start:start + n].float(), k) * scale
        q_pos = torch.arange(seq_len - n, seq_len, device=q.device)
        visible = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[start:start + n] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
    return out
