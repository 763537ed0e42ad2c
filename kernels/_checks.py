"""Argument checks shared by the launchers: each raises ValueError (TypeError for a non-tensor) naming the argument
and the offending value."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(name: str, t: torch.Tensor, shape: tuple, dtypes: tuple, device: torch.device | None = None,
                 layout: str = "rows") -> None:
    """Check `t`'s shape (None matches any size), dtype, device and layout.

    layout "rows": the last dim is contiguous (other strides free); "contiguous": the whole tensor is; "any".
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(shape) or any(want is not None and want != got for want, got in zip(shape, t.shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    if layout == "rows" and t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dim, got strides {t.stride()}")
    if layout == "contiguous" and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()} for shape {tuple(t.shape)}")

FP8_DTYPE = torch.float8_e4m3fn
# Largest finite e4m3 value: a row's absolute maximum maps to it.
FP8_MAX = 448.0
# FP8 caches' scales: float16 keeps them at 2 bytes a (token, head) (float32 would add 3% to a 128-dim head's
# bytes) and rounds them by 2^-11, far below e4m3's own 2^-4; rows are quantized with the rounded scale.
FP8_SCALE_DTYPE = torch.float16


def check_scale_words(k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
    """FP8 scales that a kernel reads as int32 words (two float16 scales each) with int32 indices: each tensor must
    start 4-byte aligned and hold an even number of scales, fewer than 2^31."""
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s.data_ptr() % 4 or s.numel() % 2 or s.numel() >= 2 ** 31:
            raise ValueError(f"{name} is read as 32-bit words with 32-bit indices here: it must start 4-byte aligned "
                             f"and hold an even number of scales below 2^31, got address {s.data_ptr()} and "
                             f"{s.numel()} scales")


def check_kv_caches(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None,
                    v_scale: torch.Tensor | None, head_dim: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Check a pair of paged caches [num_pages, page_size, Hk, head_dim] (contiguous, `dtype` or FP8 e4m3) and
    their scales; returns True for FP8 caches, whose k_scale, v_scale must be float16 [num_pages, Hk, page_size]
    contiguous (a page's scales of one head side by side; None for other caches)."""
    check_tensor("k_cache", k_cache, (None, None, None, head_dim), (dtype, FP8_DTYPE), device, layout="contiguous")
    check_tensor("v_cache", v_cache, tuple(k_cache.shape), (k_cache.dtype,), device, layout="contiguous")
    if k_cache.dtype != FP8_DTYPE:
        for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
            if scale is not None:
                raise ValueError(f"{name} must be None for a {k_cache.dtype} cache (scales are for FP8 caches)")
        return False
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is None:
            raise ValueError(f"{name} is required for an FP8 ({FP8_DTYPE}) cache")
        num_pages, page_size, hk = k_cache.shape[:3]
        check_tensor(name, scale, (num_pages, hk, page_size), (FP8_SCALE_DTYPE,), device, layout="contiguous")
    return True
