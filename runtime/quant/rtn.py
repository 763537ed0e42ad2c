"""Round-to-nearest methods: `rtn-int8` (per-channel, symmetric) and `rtn-int4` (group scales, sym or asym).

Both are quick (no calibration), so `LLM(..., quant="rtn-int8")` applies them at load.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ringlet.kernels.quant_gemm import Int4Weight, Int8Weight

from . import grids
from .calibration import LinearStats
from .registry import INT4_GROUP_SIZES, QuantConfig, QuantResult, check_bool, check_choice, register


@register
@dataclass
class RtnInt8(QuantConfig):
    """Weight-only int8: codes = round(w / s), s = absmax(row) / 127."""

    name = "rtn-int8"

    def quantize(self, w: torch.Tensor, stats: LinearStats | None = None) -> QuantResult:
        """w float32 [N, K] -> Int8Weight."""
        codes, scales = grids.int8_quant(w)
        q = grids.int8_dequant(codes, scales)
        return QuantResult(Int8Weight.from_codes(codes, scales.half()), _error(w, q, stats), None)


@register
@dataclass
class RtnInt4(QuantConfig):
    """Weight-only int4 with one scale (and, asym, one zero point) per `group_size` input columns.

    A linear whose K is not a multiple of group_size uses the largest kernel group size that divides it
    (grids.group_size_for); the plan records the size used.
    """

    name = "rtn-int4"
    group_size: int = 128
    sym: bool = True

    def validate(self) -> None:
        check_choice(self.name, "group_size", self.group_size, INT4_GROUP_SIZES)
        check_bool(self.name, "sym", self.sym)

    def quantize(self, w: torch.Tensor, stats: LinearStats | None = None) -> QuantResult:
        """w float32 [N, K] -> Int4Weight."""
        return int4_rtn(w, grids.group_size_for(w.shape[1], self.group_size), self.sym, stats)


def int4_rtn(w: torch.Tensor, group_size: int, sym: bool, stats: LinearStats | None) -> QuantResult:
    p = grids.int4_params(w, group_size, sym)
    codes = grids.int4_quant(w, p)
    weight = Int4Weight.from_codes(codes, p.scales.half(), _half(p.zeros), group_size)
    return QuantResult(weight, _error(w, grids.int4_dequant(codes, p), stats), group_size)


def _error(w: torch.Tensor, q: torch.Tensor, stats: LinearStats | None) -> float:
    return grids.relative_error(w, q, None if stats is None else stats.hessian)


def _half(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.half()
