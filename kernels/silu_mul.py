"""SwiGLU's gate: silu(gate) * up, reading both from the fused gate/up projection's output."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_tensor
from ._dispatch import use_triton


@triton.jit
def _silu_mul_kernel(
    gate_up_ptr,  # [T, 2F]: gate in columns [0, F), up in [F, 2F)
    out_ptr,  # [T, F] contiguous
    F,  # output width
    stride_t,  # row stride of gate_up
    BLOCK_F: tl.constexpr,  # columns per program
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = cols < F
    src = gate_up_ptr + row * stride_t + cols
    gate = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(src + F, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * F + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in float32.

    gate_up [T, 2F] fp16/bf16/fp32 (last dim contiguous): gate is the first F columns, up the next F.
    Returns out [T, F] contiguous, gate_up's dtype.
    """
    if not use_triton(gate_up):
        return silu_mul_ref(gate_up)
    check_tensor("gate_up", gate_up, (None, None), FLOAT_DTYPES)
    t, two_f = gate_up.shape
    if two_f % 2:
        raise ValueError(f"gate_up must have an even number of columns, got shape {tuple(gate_up.shape)}")
    f = two_f // 2
    out = torch.empty((t, f), dtype=gate_up.dtype, device=gate_up.device)
    if t == 0 or f == 0:
        return out
    block_f = min(triton.next_power_of_2(f), 2048)
    _silu_mul_kernel[(t, triton.cdiv(f, block_f))](gate_up, out, f, gate_up.stride(0), BLOCK_F=block_f,
                                                   num_warps=4)
    return out


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """Torch reference for `silu_mul`."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(gate_up.dtype)
