"""Rotary embedding and the KV-cache write in one launch, for 16/32-bit caches: each token's queries are rotated
into a new tensor, its keys rotated straight into their cache row, its values copied beside them.

At decode sizes both kernels it replaces (`rope.apply_rope`, `paged_kv.write_kv`) are pure launch latency (a
few KiB each, once per layer): one launch per layer instead of two. FP8 caches keep the separate kernels (keys
are rotated by a Hadamard matrix between the two, kv_rotation.py, and quantized on the way in).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, INDEX_DTYPES, check_tensor
from ._dispatch import use_triton
from .paged_kv import write_kv_ref
from .rope import _cos_sin, _rotate_heads, apply_rope_ref


@triton.jit
def _rope_write_kv_kernel(
    q_ptr,  # [T, Hq, Dh] queries, last dim contiguous
    k_ptr,  # [T, Hk, Dh] keys, last dim contiguous
    v_ptr,  # [T, Hk, Dh] values, last dim contiguous
    positions_ptr,  # [T] position of each token
    cos_sin_ptr,  # [max_pos, Dh] float32 table from rope_cos_sin
    slot_mapping_ptr,  # [T] flat cache row of each token, negative to skip it
    q_out_ptr,  # [T, Hq, Dh] contiguous rotated queries
    k_cache_ptr,  # [num_pages * page_size, Hk, Dh] contiguous
    v_cache_ptr,  # [num_pages * page_size, Hk, Dh] contiguous
    Hq, Hk,  # query and kv heads
    stride_qt, stride_qh,  # q strides (token, head)
    stride_kt, stride_kh,  # k strides (token, head)
    stride_vt, stride_vh,  # v strides (token, head)
    HALF: tl.constexpr,  # Dh // 2
    BLOCK_HQ: tl.constexpr,  # power of two >= Hq
    BLOCK_HK: tl.constexpr,  # power of two >= Hk
    BLOCK_HALF: tl.constexpr,  # power of two >= HALF
):
    row = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin(positions_ptr, cos_sin_ptr, row, HALF, BLOCK_HALF)
    _rotate_heads(q_ptr, q_out_ptr, row, row, Hq, Hq, stride_qt, stride_qh, cos, sin, HALF, BLOCK_HQ, BLOCK_HALF)
    slot = tl.load(slot_mapping_ptr + row).to(tl.int64)
    live = tl.where(slot >= 0, Hk, 0)  # a padding row (slot < 0) writes nothing
    _rotate_heads(k_ptr, k_cache_ptr, row, slot, Hk, live, stride_kt, stride_kh, cos, sin, HALF, BLOCK_HK, BLOCK_HALF)
    heads = tl.arange(0, BLOCK_HK)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < live) & (cols < HALF)
    src = v_ptr + row * stride_vt + heads * stride_vh + cols
    dst = v_cache_ptr + (slot * Hk + heads) * (2 * HALF) + cols
    tl.store(dst, tl.load(src, mask=mask, other=0.0), mask=mask)
    tl.store(dst + HALF, tl.load(src + HALF, mask=mask, other=0.0), mask=mask)


def rope_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """`apply_rope(q, k, positions, cos_sin)`, then `write_kv(rotated k, v, k_cache, v_cache, slot_mapping)`;
    returns the rotated queries.

    q [T, Hq, Dh], k and v [T, Hk, Dh] of one fp16/bf16/fp32 dtype, any token/head strides with a contiguous last
    dim (column slices of a fused qkv tensor); positions [T] int32/int64, each < max_pos; cos_sin [max_pos, Dh]
    float32 from `rope_cos_sin`; k_cache, v_cache [num_pages, page_size, Hk, Dh] contiguous, q's dtype (FP8 caches:
    use the two kernels); slot_mapping [T] int32/int64, distinct, negative entries skipped. Returns q_out
    [T, Hq, Dh] contiguous; the caches are written in place.
    """
    if not use_triton(q):
        return rope_write_kv_ref(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping)
    check_tensor("q", q, (None, None, None), FLOAT_DTYPES)
    t, hq, dh = q.shape
    check_tensor("k", k, (t, None, dh), (q.dtype,), q.device)
    hk = k.shape[1]
    check_tensor("v", v, (t, hk, dh), (q.dtype,), q.device)
    check_tensor("positions", positions, (t,), INDEX_DTYPES, q.device, layout="contiguous")
    check_tensor("cos_sin", cos_sin, (None, dh), (torch.float32,), q.device, layout="contiguous")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, cache, (None, None, hk, dh), (q.dtype,), q.device, layout="contiguous")
    if dh % 2:
        raise ValueError(f"head_dim must be even, got q of shape {tuple(q.shape)}")
    check_tensor("slot_mapping", slot_mapping, (t,), INDEX_DTYPES, q.device, layout="contiguous")
    q_out = torch.empty((t, hq, dh), dtype=q.dtype, device=q.device)
    if t == 0:
        return q_out
    _rope_write_kv_kernel[(t,)](
        q, k, v, positions, cos_sin, slot_mapping, q_out, k_cache, v_cache, hq, hk,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        HALF=dh // 2, BLOCK_HQ=triton.next_power_of_2(hq), BLOCK_HK=triton.next_power_of_2(hk),
        BLOCK_HALF=triton.next_power_of_2(dh // 2), num_warps=4,
    )
    return q_out


def rope_write_kv_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                      cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> torch.Tensor:
    """Torch reference for `rope_write_kv`: the two references in turn."""
    q_out, k_out = apply_rope_ref(q, k, positions, cos_sin)
    write_kv_ref(k_out, v, k_cache, v_cache, slot_mapping)
    return q_out
