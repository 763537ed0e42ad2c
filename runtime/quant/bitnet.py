"""`bitnet`: ternary b1.58 weights (BitNet b1.58, Ma et al. 2024): codes in {-1, 0, 1} with an absmean scale per
tensor or per group of input columns.

Applied after training to an ordinary model this loses a great deal (the model never learned to live with three
levels); ringlet measures and reports that loss rather than hiding it. A model trained for b1.58 loads from a
ringlet ternary checkpoint (quant.checkpoint), where its ternary weights are stored as they are.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ringlet.kernels.quant_gemm import TernaryWeight

from . import grids
from .calibration import LinearStats
from .registry import INT4_GROUP_SIZES, QuantConfig, QuantResult, check_choice, register


@register
@dataclass
class Bitnet(QuantConfig):
    """group_size None: one scale per tensor (as BitNet trains); else one per group of that many columns."""

    name = "bitnet"
    group_size: int | None = None

    def validate(self) -> None:
        if self.group_size is not None:
            check_choice(self.name, "group_size", self.group_size, INT4_GROUP_SIZES)

    def quantize(self, w: torch.Tensor, stats: LinearStats | None = None) -> QuantResult:
        """w float32 [N, K] -> TernaryWeight."""
        group = None if self.group_size is None else grids.group_size_for(w.shape[1], self.group_size)
        codes, scales = grids.ternary_quant(w, group)
        q = grids.ternary_dequant(codes, scales, group)
        error = grids.relative_error(w, q, None if stats is None else stats.hessian)
        return QuantResult(TernaryWeight.from_codes(codes, scales.half(), group), error, group)
