"""Writing this step's keys and values into the paged KV cache, quantizing them for FP8 (e4m3) caches."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import (
    FLOAT_DTYPES,
    FP8_DTYPE,
    FP8_MAX,
    FP8_SCALE_DTYPE,
    INDEX_DTYPES,
    check_kv_caches,
    check_tensor,
)
from ._dispatch import use_triton

_E4M3_MAX = tl.constexpr(FP8_MAX)


@triton.jit
def _round_to_e4m3_mantissa(x):
    """x (float32) rounded to nearest-even at e4m3's 3 mantissa bits, so the cast to e4m3 that follows is exact for
    normal values. Triton's interpreter mis-rounds casts that carry into an odd exponent (e.g. 127.5 -> 64; its
    _convert_float ORs the mantissa carry into the exponent); this makes the GPU and the interpreter agree, and
    costs four integer ops per element in a kernel bound by memory."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _store_row(
    x_ptr, cache_ptr, scale_ptr,  # source row (all heads), destination cache and scales
    row, slot, stride_t, stride_h, heads, cols, mask,
    Hk, head_dim,
    PAGE_SIZE: tl.constexpr,  # tokens per page (the scales' last dim)
    QUANTIZE: tl.constexpr,  # FP8 cache: quantize with one scale per head
):
    x = tl.load(x_ptr + row * stride_t + heads * stride_h + cols, mask=mask, other=0.0)
    dst = (slot * Hk + heads) * head_dim + cols
    if QUANTIZE:
        x = x.to(tl.float32)
        amax = tl.max(tl.abs(x), 1)  # [BLOCK_H]
        # The scale is rounded to its stored dtype first and the row divided by the rounded scale, so that
        # e4m3 * stored scale reproduces x. A zero row (or a padding head) gets scale 0 and stores zeros.
        scale = tl.div_rn(amax, tl.full(amax.shape, _E4M3_MAX, tl.float32)).to(scale_ptr.dtype.element_ty)
        scale32 = scale.to(tl.float32)
        inv = tl.where(scale32 > 0, tl.div_rn(tl.full(amax.shape, 1.0, tl.float32),
                                              tl.where(scale32 > 0, scale32, 1.0)), 0.0)
        y = tl.minimum(tl.maximum(x * inv[:, None], -_E4M3_MAX), _E4M3_MAX)
        tl.store(cache_ptr + dst, _round_to_e4m3_mantissa(y).to(cache_ptr.dtype.element_ty), mask=mask)
        head = tl.reshape(heads, [heads.shape[0]])
        page = slot // PAGE_SIZE
        tl.store(scale_ptr + (page * Hk + head) * PAGE_SIZE + slot % PAGE_SIZE, scale,
                 mask=head < tl.where(slot >= 0, Hk, 0))
    else:
        tl.store(cache_ptr + dst, x, mask=mask)


@triton.jit
def _write_kv_kernel(
    k_ptr,  # [T, Hk, Dh] keys, last dim contiguous
    v_ptr,  # [T, Hk, Dh] values, last dim contiguous
    k_cache_ptr,  # [num_pages * page_size, Hk, Dh] contiguous
    v_cache_ptr,  # [num_pages * page_size, Hk, Dh] contiguous
    k_scale_ptr,  # [num_pages, Hk, PAGE_SIZE] float16 (QUANTIZE; else unused)
    v_scale_ptr,  # [num_pages, Hk, PAGE_SIZE] float16 (QUANTIZE; else unused)
    slot_mapping_ptr,  # [T] flat cache row of each token, negative to skip it
    Hk,  # kv heads
    head_dim,  # Dh
    stride_kt, stride_kh,  # k strides (token, head)
    stride_vt, stride_vh,  # v strides (token, head)
    BLOCK_H: tl.constexpr,  # power of two >= Hk
    BLOCK_D: tl.constexpr,  # power of two >= Dh
    PAGE_SIZE: tl.constexpr,  # tokens per page
    QUANTIZE: tl.constexpr,  # FP8 caches: x / scale in e4m3, scale = amax(|x|) / 448 per (token, head)
):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + row).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_D)[None, :]
    # A padding row (slot < 0) gets no heads: nothing is read or written.
    mask = (heads < tl.where(slot >= 0, Hk, 0)) & (cols < head_dim)
    _store_row(k_ptr, k_cache_ptr, k_scale_ptr, row, slot, stride_kt, stride_kh, heads, cols, mask, Hk, head_dim,
               PAGE_SIZE, QUANTIZE)
    _store_row(v_ptr, v_cache_ptr, v_scale_ptr, row, slot, stride_vt, stride_vh, heads, cols, mask, Hk, head_dim,
               PAGE_SIZE, QUANTIZE)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None) -> None:
    """Copy token t's keys and values into cache row slot_mapping[t] = page * page_size + offset, in place.

    k, v [T, Hk, Dh] fp16/bf16/fp32, any token/head strides with a contiguous last dim; k_cache, v_cache
    [num_pages, page_size, Hk, Dh] contiguous, k's dtype, or float8_e4m3fn: then k_scale, v_scale
    [num_pages, Hk, page_size] float16 contiguous are required and each (token, head) row is stored as
    e4m3(x / s) with s = float16(amax(|x|) / 448) written to its scale (0 for an all-zero row); slot_mapping [T]
    int32/int64, negative entries (padding rows) are skipped. Slots must be distinct and < num_pages * page_size.
    """
    if not use_triton(k):
        return write_kv_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    check_tensor("k", k, (None, None, None), FLOAT_DTYPES)
    t, hk, dh = k.shape
    check_tensor("v", v, (t, hk, dh), (k.dtype,), k.device)
    quantize = check_kv_caches(k_cache, v_cache, k_scale, v_scale, dh, k.dtype, k.device)
    if k_cache.shape[2] != hk:
        raise ValueError(f"k_cache must have {hk} kv heads like k, got shape {tuple(k_cache.shape)}")
    check_tensor("slot_mapping", slot_mapping, (t,), INDEX_DTYPES, k.device, layout="contiguous")
    if t == 0:
        return None
    _write_kv_kernel[(t,)](
        k, v, k_cache, v_cache, k_scale if quantize else k_cache, v_scale if quantize else v_cache, slot_mapping,
        hk, dh, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        BLOCK_H=triton.next_power_of_2(hk), BLOCK_D=triton.next_power_of_2(dh), PAGE_SIZE=k_cache.shape[1],
        QUANTIZE=quantize, num_warps=4,
    )
    return None


def quantize_fp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., Dh] -> (e4m3 [..., Dh], float16 scale [...]): x ~ e4m3 * scale, scale = float16(amax(|x|) / 448) per
    row (the row is divided by the rounded scale)."""
    x = x.float()
    scale = (x.abs().amax(-1) / FP8_MAX).to(FP8_SCALE_DTYPE)
    s = scale.float()
    inv = torch.where(s > 0, 1.0 / torch.where(s > 0, s, 1.0), 0.0)
    q = (x * inv[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_fp8_pages_ref(pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pages [num_pages, page_size, Hk, Dh] -> (e4m3 pages, scales [num_pages, Hk, page_size] float16), the
    layout `write_kv` produces."""
    q, scale = quantize_fp8_ref(pages)
    return q, scale.transpose(1, 2).contiguous()


def write_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None) -> None:
    """Torch reference for `write_kv`."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    page_size = k_cache.shape[1]
    for x, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        if cache.dtype == FP8_DTYPE:
            if scale is None:
                raise ValueError(f"{'k_scale' if cache is k_cache else 'v_scale'} is required for an FP8 cache")
            q, s = quantize_fp8_ref(x[keep])
            cache.view(-1, *cache.shape[2:])[slots] = q
            scale[slots // page_size, :, slots % page_size] = s
        else:
            cache.view(-1, *cache.shape[2:])[slots] = x[keep]
