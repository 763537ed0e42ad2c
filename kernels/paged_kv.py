"""Writing this step's keys and values into the paged KV cache."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, INDEX_DTYPES, check_tensor
from ._dispatch import use_triton


@triton.jit
def _write_kv_kernel(
    k_ptr,  # [T, Hk, Dh] keys, last dim contiguous
    v_ptr,  # [T, Hk, Dh] values, last dim contiguous
    k_cache_ptr,  # [num_pages * page_size, Hk, Dh] contiguous
    v_cache_ptr,  # [num_pages * page_size, Hk, Dh] contiguous
    slot_mapping_ptr,  # [T] flat cache row of each token, negative to skip it
    Hk,  # kv heads
    head_dim,  # Dh
    stride_kt, stride_kh,  # k strides (token, head)
    stride_vt, stride_vh,  # v strides (token, head)
    BLOCK_H: tl.constexpr,  # power of two >= Hk
    BLOCK_D: tl.constexpr,  # power of two >= Dh
):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + row).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_D)[None, :]
    # A padding row (slot < 0) gets no heads: nothing is read or written.
    mask = (heads < tl.where(slot >= 0, Hk, 0)) & (cols < head_dim)
    dst = (slot * Hk + heads) * head_dim + cols
    k = tl.load(k_ptr + row * stride_kt + heads * stride_kh + cols, mask=mask)
    tl.store(k_cache_ptr + dst, k, mask=mask)
    v = tl.load(v_ptr + row * stride_vt + heads * stride_vh + cols, mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Copy token t's keys and values into cache row slot_mapping[t] = page * page_size + offset, in place.

    k, v [T, Hk, Dh] fp16/bf16/fp32, any token/head strides with a contiguous last dim; k_cache, v_cache
    [num_pages, page_size, Hk, Dh] contiguous, k's dtype; slot_mapping [T] int32/int64, negative entries
    (padding rows) are skipped. Slots must be distinct and < num_pages * page_size.
    """
    if not use_triton(k):
        return write_kv_ref(k, v, k_cache, v_cache, slot_mapping)
    check_tensor("k", k, (None, None, None), FLOAT_DTYPES)
    t, hk, dh = k.shape
    check_tensor("v", v, (t, hk, dh), (k.dtype,), k.device)
    check_tensor("k_cache", k_cache, (None, None, hk, dh), (k.dtype,), k.device, layout="contiguous")
    check_tensor("v_cache", v_cache, tuple(k_cache.shape), (k.dtype,), k.device, layout="contiguous")
    check_tensor("slot_mapping", slot_mapping, (t,), INDEX_DTYPES, k.device, layout="contiguous")
    if t == 0:
        return None
    _write_kv_kernel[(t,)](
        k, v, k_cache, v_cache, slot_mapping,
        hk, dh, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        BLOCK_H=triton.next_power_of_2(hk), BLOCK_D=triton.next_power_of_2(dh), num_warps=4,
    )
    return None


def write_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """Torch reference for `write_kv`."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep]
