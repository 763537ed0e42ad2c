"""Round-to-nearest grids shared by the methods: int8 per output channel, int4 per group (sym or asym), ternary.

All take a float32 weight w [N, K] (rows = output features) and return integer codes plus float32 scales (and
zero points); `*_dequant` maps them back to float32 [N, K]. Group g of row n covers columns g*G .. g*G+G-1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .registry import INT4_GROUP_SIZES

_TINY = 1e-7  # keeps an all-zero row or group from dividing by zero (its codes are then all zero)


def stored(scales: torch.Tensor) -> torch.Tensor:
    """Scales rounded to float16, the precision the checkpoint keeps them in (codes are computed against these)."""
    return scales.clamp(min=_TINY, max=65504.0).half().float()


@dataclass
class Int4Params:
    """scales float32 [N, K//G]; zeros float32 [N, K//G] of integers 0..15 (asym) or None (sym: zero point 8)."""

    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int


def group_size_for(in_features: int, group_size: int) -> int:
    """`group_size` when it divides in_features, else the largest kernel group size below it that does.

    (SmolLM2's dim 576 is not a multiple of 128: its K=576 projections use group 64 under a g128 plan.)
    """
    for g in sorted((g for g in INT4_GROUP_SIZES if g <= group_size), reverse=True):
        if in_features % g == 0:
            return g
    raise ConfigError(f"in_features={in_features} is not a multiple of any int4 group size <= {group_size} "
                      f"({', '.join(map(str, INT4_GROUP_SIZES))})")


def int8_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-channel int8: codes int8 [N, K] in -127..127, scales float32 [N] (absmax / 127, float16-exact;
    every scale below is float16-exact too)."""
    scales = stored(w.abs().amax(dim=1) / 127)
    codes = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scales


def int8_dequant(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return codes.float() * scales[:, None]


def int4_params(w: torch.Tensor, group_size: int, sym: bool) -> Int4Params:
    """Group scales (and zeros) for w [N, K] as AutoGPTQ computes them: sym scale = 2 absmax / 15 with the zero
    point fixed at 8; asym scale = (max - min) / 15 over a range that always includes 0, zero = round(-min/scale)."""
    n, k = w.shape
    groups = w.reshape(n, k // group_size, group_size)
    lo = groups.amin(dim=2).clamp(max=0)
    hi = groups.amax(dim=2).clamp(min=0)
    if sym:
        return Int4Params(stored(2 * torch.maximum(-lo, hi) / 15), None, group_size)
    scales = stored((hi - lo) / 15)
    return Int4Params(scales, torch.round(-lo / scales).clamp(0, 15), group_size)


def int4_quant_columns(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """Codes uint8 [N, C] in 0..15 of columns w [N, C] that share one group's scales/zeros [N] (or [N, C])."""
    if scales.dim() == 1:
        scales = scales[:, None]
        zeros = None if zeros is None else zeros[:, None]
    zero = 8 if zeros is None else zeros
    return torch.clamp(torch.round(w / scales) + zero, 0, 15).to(torch.uint8)


def int4_quant(w: torch.Tensor, p: Int4Params) -> torch.Tensor:
    """Codes uint8 [N, K] of w under the group parameters p."""
    return int4_quant_columns(w, _expand(p.scales, p.group_size), _expand(p.zeros, p.group_size))


def int4_dequant(codes: torch.Tensor, p: Int4Params) -> torch.Tensor:
    zero = 8 if p.zeros is None else _expand(p.zeros, p.group_size)
    return (codes.float() - zero) * _expand(p.scales, p.group_size)


def ternary_quant(w: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet b1.58 absmean: scale = mean |w| (per tensor, or per group of `group_size` columns), codes int8 in
    {-1, 0, 1} = clamp(round(w / scale)). Scales float32 [1] or [N, K//G]."""
    if group_size is None:
        scales = stored(w.abs().mean()).reshape(1)
        full = scales
    else:
        n, k = w.shape
        scales = stored(w.reshape(n, k // group_size, group_size).abs().mean(dim=2))
        full = _expand(scales, group_size)
    return torch.round(w / full).clamp(-1, 1).to(torch.int8), scales


def ternary_dequant(codes: torch.Tensor, scales: torch.Tensor, group_size: int | None) -> torch.Tensor:
    return codes.float() * (scales if group_size is None else _expand(scales, group_size))


def relative_error(w: torch.Tensor, q: torch.Tensor, hessian: torch.Tensor | None = None) -> float:
    """||W - Q|| / ||W|| in the Frobenius norm, or, given H = X^T X [K, K], the output error
    sqrt(tr(dW H dW^T) / tr(W H W^T)) = ||X dW^T|| / ||X W^T||."""
    d = (w - q).double()
    if hessian is None:
        return float(d.norm() / w.double().norm().clamp_min(_TINY))
    h = hessian.double()
    return float(torch.sqrt(((d @ h) * d).sum() / ((w.double() @ h) * w.double()).sum().clamp_min(_TINY)))


def _expand(t: torch.Tensor | None, group_size: int) -> torch.Tensor | None:
    return None if t is None else t.repeat_interleave(group_size, dim=1)
