"""RMSNorm, alone or fused with the residual add that precedes it in every Llama block."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_tensor
from ._dispatch import use_triton

# One program holds a whole row in registers; past this the row would spill.
_MAX_DIM = 32768


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [T, D] input rows
    residual_ptr,  # [T, D] residual added to x first (read only when HAS_RESIDUAL)
    weight_ptr,  # [D] scale
    out_ptr,  # [T, D] contiguous normalized output
    residual_out_ptr,  # [T, D] contiguous x + residual (written only when HAS_RESIDUAL)
    D,  # row length
    stride_xt,  # row stride of x
    stride_rt,  # row stride of residual
    eps,  # added to the mean square
    HAS_RESIDUAL: tl.constexpr,  # fuse the residual add
    BLOCK_D: tl.constexpr,  # power of two >= D
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * stride_xt + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_rt + cols, mask=mask, other=0.0).to(tl.float32)
        # Round the sum to the residual's dtype, as an unfused `x + residual` would, and normalize that.
        summed = (x + r).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * D + cols, summed, mask=mask)
        x = summed.to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    tl.store(out_ptr + row * D + cols, (x * inv_rms * w).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    check_tensor("x", x, (None, None), FLOAT_DTYPES)
    t, d = x.shape
    check_tensor("weight", weight, (d,), FLOAT_DTYPES, x.device, layout="contiguous")
    if residual is not None:
        check_tensor("residual", residual, (t, d), (x.dtype,), x.device)
    if d > _MAX_DIM:
        raise ValueError(f"x rows must have at most {_MAX_DIM} elements, got {d}")
    out = torch.empty((t, d), dtype=x.dtype, device=x.device)
    residual_out = torch.empty_like(out) if residual is not None else None
    if t == 0:
        return out, residual_out
    block_d = triton.next_power_of_2(d)
    _rms_norm_kernel[(t,)](
        x, residual, weight, out, residual_out,
        d, x.stride(0), 0 if residual is None else residual.stride(0), eps,
        HAS_RESIDUAL=residual is not None, BLOCK_D=block_d,
        num_warps=min(max(block_d // 512, 1), 16),
    )
    return out, residual_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim, in float32.

    x [T, D] fp16/bf16/fp32 (last dim contiguous), weight [D] any float dtype -> out [T, D] contiguous, x's dtype.
    """
    if not use_triton(x):
        return rms_norm_ref(x, weight, eps)
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """new_residual = x + residual (summed in float32, rounded to residual's dtype); out = rms_norm(new_residual).

    x, residual [T, D] of one dtype (last dims contiguous), weight [D] -> (out, new_residual), both new contiguous
    [T, D] tensors of x's dtype; the inputs are left untouched.
    """
    if not use_triton(x):
        return fused_add_rms_norm_ref(x, residual, weight, eps)
    return _launch(x, residual, weight, eps)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Torch reference for `rms_norm`."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference for `fused_add_rms_norm`."""
    new_residual = (x.float() + residual.float()).to(residual.dtype)
    return rms_norm_ref(new_residual, weight, eps), new_residual
