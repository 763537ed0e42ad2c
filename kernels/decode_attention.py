"""Paged flash-decoding: one query token per sequence, the key sequence split across programs, partials merged by
log-sum-exp."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_tensor
from ._dispatch import sm_count, use_triton
from ._paged import load_kv_tile

# Aim for this many split programs per SM so that uneven splits still balance across the GPU.
_PROGRAMS_PER_SM = 4
# Never split finer than this many keys: each split's partial costs a write and a read in the merge.
_MIN_SPLIT_KEYS = 128
# Off the GPU (the interpreter in tests) use a fixed split count, so the merge of several partials is exercised.
_SPLITS_OFF_GPU = 4


@triton.jit
def _split_key_range(split, split_len, seq_len):
    """Key positions [start, end) of one split; empty past the sequence. The one place the key loop bounds are
    decided."""
    start = split * split_len
    return start, tl.minimum(start + split_len, seq_len)


@triton.jit
def _decode_split_kernel(
    q_ptr,  # [B, Hq, Dh] queries, last dim contiguous
    k_cache_ptr,  # [num_pages, PAGE_SIZE, Hk, Dh] contiguous
    v_cache_ptr,  # [num_pages, PAGE_SIZE, Hk, Dh] contiguous
    block_tables_ptr,  # [B, max_pages] int32 page ids
    seq_lens_ptr,  # [B] keys of each sequence
    o_part_ptr,  # [B, Hq, S, Dh] float32 partial outputs, normalized per split
    lse_part_ptr,  # [B, Hq, S] float32 partial log2-sum-exp2, -inf for an empty split
    qk_scale,  # softmax scale * log2(e)
    split_len,  # keys per split, a multiple of BLOCK_N
    stride_qb, stride_qh,  # q strides (sequence, head)
    stride_bt,  # block table row stride
    stride_page, stride_slot, stride_kvh,  # cache strides (page, token row, kv head)
    GROUP: tl.constexpr,  # query heads per kv head, all handled by this program
    BLOCK_G: tl.constexpr,  # power of two >= max(GROUP, 16) (tl.dot needs 16 rows)
    HEAD_DIM: tl.constexpr,  # Dh, a power of two
    PAGE_SIZE: tl.constexpr,  # tokens per page
    BLOCK_N: tl.constexpr,  # keys per inner step
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs, else ignored
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    group = tl.arange(0, BLOCK_G)
    group_valid = group < GROUP
    heads = kv_head * GROUP + group
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=group_valid[:, None], other=0.0)

    start, end = _split_key_range(split, split_len, tl.load(seq_lens_ptr + seq))
    table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    head_offset = kv_head * stride_kvh
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    # The first tile of a non-empty split holds key `start`, so m_i is finite from the first step on.
    for block_start in range(start, end, BLOCK_N):
        keys = block_start + tl.arange(0, BLOCK_N)
        k = load_kv_tile(k_cache_ptr, table_ptr, keys, end, head_offset, stride_page, stride_slot, dims,
                         PAGE_SIZE, True)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        qk = tl.where(keys[None, :] < end, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        v = load_kv_tile(v_cache_ptr, table_ptr, keys, end, head_offset, stride_page, stride_slot, dims,
                         PAGE_SIZE, True)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    nonempty = l_i > 0
    lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    part = (seq * (tl.num_programs(1) * GROUP) + heads) * num_splits + split
    tl.store(lse_part_ptr + part, lse, mask=group_valid)
    tl.store(o_part_ptr + part[:, None].to(tl.int64) * HEAD_DIM + dims[None, :], out, mask=group_valid[:, None])


@triton.jit
def _decode_merge_kernel(
    o_part_ptr,  # [B * Hq, S, Dh] float32 partial outputs
    lse_part_ptr,  # [B * Hq, S] float32 partial log2-sum-exp2
    out_ptr,  # [B * Hq, Dh] contiguous, q's dtype
    num_splits,  # S
    HEAD_DIM: tl.constexpr,  # Dh
    BLOCK_S: tl.constexpr,  # power of two >= S
):
    row = tl.program_id(0).to(tl.int64)
    splits = tl.arange(0, BLOCK_S)
    split_valid = splits < num_splits
    dims = tl.arange(0, HEAD_DIM)
    lse = tl.load(lse_part_ptr + row * num_splits + splits, mask=split_valid, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    # A sequence of length 0 (a padding row) has only empty splits: every weight is 0 and the output is 0.
    weights = tl.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max))
    total = tl.sum(weights, 0)
    parts = tl.load(o_part_ptr + (row * num_splits + splits)[:, None] * HEAD_DIM + dims[None, :],
                    mask=split_valid[:, None], other=0.0)
    out = tl.sum(parts * weights[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty))


def _num_splits(batch: int, kv_heads: int, max_keys: int, block_n: int, device: torch.device) -> int:
    """Splits of each sequence's keys, from shapes alone (reading seq_lens would sync the host and break CUDA
    graph capture): enough programs to fill the GPU, each split at least _MIN_SPLIT_KEYS keys."""
    if device.type != "cuda":
        return max(1, min(_SPLITS_OFF_GPU, triton.cdiv(max_keys, block_n)))
    wanted = triton.cdiv(_PROGRAMS_PER_SM * sm_count(device), batch * kv_heads)
    return max(1, min(wanted, triton.cdiv(max_keys, _MIN_SPLIT_KEYS)))


def _config(head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) for this head size and dtype."""
    if device.type != "cuda":
        return 16, 4, 1
    if dtype == torch.float32 or head_dim > 128:
        return 32, 4, 2
    return 64, 4, 3


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one query per sequence over all of its paged keys and values (flash-decoding).

    q [B, Hq, Dh] fp16/bf16/fp32 (last dim contiguous; Dh a power of two in 16..256); k_cache, v_cache
    [num_pages, page_size, Hk, Dh] contiguous, q's dtype; Hq a multiple of Hk; block_tables [B, max_pages] int32
    (entries past a sequence's pages are never read); seq_lens [B] int32: sequence b's query sits at position
    seq_lens[b] - 1 and sees all seq_lens[b] keys; 0 marks a padding row, whose output is zeros.
    Returns out [B, Hq, Dh] contiguous, q's dtype. The split count comes from block_tables.shape[1] and the SM
    count, never from seq_lens, so the launch is CUDA-graph capturable; pass a table no wider than the longest
    sequence needs, or splits past the real lengths idle.
    """
    if not use_triton(q):
        return decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale)
    check_tensor("q", q, (None, None, None), FLOAT_DTYPES)
    b, hq, dh = q.shape
    check_tensor("k_cache", k_cache, (None, None, None, dh), (q.dtype,), q.device, layout="contiguous")
    check_tensor("v_cache", v_cache, tuple(k_cache.shape), (q.dtype,), q.device, layout="contiguous")
    check_tensor("block_tables", block_tables, (b, None), (torch.int32,), q.device)
    check_tensor("seq_lens", seq_lens, (b,), (torch.int32,), q.device, layout="contiguous")
    page_size, hk = k_cache.shape[1], k_cache.shape[2]
    if dh not in (16, 32, 64, 128, 256):
        raise ValueError(f"head_dim must be a power of two in 16..256, got q of shape {tuple(q.shape)}")
    if hq % hk:
        raise ValueError(f"q heads ({hq}) must be a multiple of cache kv heads ({hk})")
    out = torch.empty((b, hq, dh), dtype=q.dtype, device=q.device)
    max_keys = block_tables.shape[1] * page_size
    if b == 0 or max_keys == 0:
        return out.zero_()
    block_n, num_warps, num_stages = _config(dh, q.dtype, q.device)
    splits = _num_splits(b, hk, max_keys, block_n, q.device)
    split_len = triton.cdiv(triton.cdiv(max_keys, splits), block_n) * block_n
    splits = triton.cdiv(max_keys, split_len)
    o_part = torch.empty((b, hq, splits, dh), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((b, hq, splits), dtype=torch.float32, device=q.device)
    group = hq // hk
    _decode_split_kernel[(b, hk, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, o_part, lse_part,
        scale * math.log2(math.e), split_len,
        q.stride(0), q.stride(1), block_tables.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=dh, PAGE_SIZE=page_size,
        BLOCK_N=block_n, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    _decode_merge_kernel[(b * hq,)](o_part, lse_part, out, splits, HEAD_DIM=dh,
                                    BLOCK_S=triton.next_power_of_2(splits), num_warps=4)
    return out


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                         seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Torch reference for `decode_attention` (one sequence at a time, float32)."""
    _, hq, dh = q.shape
    page_size, hk = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    for b, seq_len in enumerate(seq_lens.tolist()):
        if seq_len == 0:
            continue
        pages = block_tables[b, :triton.cdiv(seq_len, page_size)].long()
        k = k_cache[pages].reshape(-1, hk, dh)[:seq_len].float().repeat_interleave(hq // hk, dim=1)
        v = v_cache[pages].reshape(-1, hk, dh)[:seq_len].float().repeat_interleave(hq // hk, dim=1)
        probs = (torch.einsum("hd,khd->hk", q[b].float(), k) * scale).softmax(-1)
        out[b] = torch.einsum("hk,khd->hd", probs, v).to(q.dtype)
    return out
