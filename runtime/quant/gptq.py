"""GPTQ (Frantar et al. 2022): int4 with group scales (or, bits=8, per-channel int8), columns quantized one at a
time in the order of the Cholesky factor of the inverse Hessian, each one's rounding error pushed onto the columns
not yet quantized.

H = 2 X^T X / n from the calibration inputs of the linear (calibration.LinearStats). Standard recipe: dead
columns (H_jj = 0) zeroed, `percdamp` x mean(diag H) added to the diagonal, optional act-order (columns by
decreasing H_jj; groups are then contiguous in that order, and the permutation is stored for the kernel),
lazy batch updates over blocks of `block_size` columns.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ringlet.kernels.quant_gemm import Int4Weight, Int8Weight

from ..errors import ConfigError
from . import grids
from .calibration import LinearStats
from .registry import INT4_GROUP_SIZES, QuantConfig, QuantResult, check_bool, check_choice, check_fraction, register


@register
@dataclass
class Gptq(QuantConfig):
    name = "gptq"
    calibrated = True
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = True
    percdamp: float = 0.01
    block_size: int = 128

    def validate(self) -> None:
        check_choice(self.name, "bits", self.bits, (4, 8))
        check_choice(self.name, "group_size", self.group_size, INT4_GROUP_SIZES)
        check_bool(self.name, "sym", self.sym)
        check_bool(self.name, "act_order", self.act_order)
        check_fraction(self.name, "percdamp", self.percdamp)
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ConfigError(f"gptq: block_size={self.block_size!r} must be a positive integer")

    def quantize(self, w: torch.Tensor, stats: LinearStats | None = None) -> QuantResult:
        """w float32 [N, K] -> Int4Weight (bits 4) or Int8Weight (bits 8: per-channel, group_size and sym unused);
        the error is the output error on the calibration Hessian."""
        if stats is None:
            raise ConfigError("gptq needs calibration statistics (run `python -m ringlet quantize --method gptq`)")
        if self.bits == 8:
            codes, scales, q = gptq_int8(w, stats.hessian, self.act_order, self.percdamp, self.block_size)
            return QuantResult(Int8Weight.from_codes(codes, scales.half()), grids.relative_error(w, q, stats.hessian),
                               None)
        group = grids.group_size_for(w.shape[1], self.group_size)
        codes, scales, zeros, perm, q = gptq_int4(w, stats.hessian, group, self.sym, self.act_order,
                                                  self.percdamp, self.block_size)
        weight = Int4Weight.from_codes(codes, scales.half(), None if zeros is None else zeros.half(), group, perm)
        return QuantResult(weight, grids.relative_error(w, q, stats.hessian), group)


def gptq_int4(w: torch.Tensor, hessian: torch.Tensor, group_size: int, sym: bool, act_order: bool,
              percdamp: float, block_size: int):
    """GPTQ onto the int4 group grid. w float32 [N, K], hessian float32 [K, K].

    Returns codes uint8 [N, K] (stored column order), scales float32 [N, K//G], zeros float32 [N, K//G] or None,
    perm int64 [K] or None (stored column j holds original column perm[j]), and the dequantized weight float32
    [N, K] in the original column order.
    """
    n, k = w.shape
    codes = torch.zeros(n, k, dtype=torch.uint8)
    scales = torch.zeros(n, k // group_size)
    zeros = None if sym else torch.zeros_like(scales)

    def column(col: int, x: torch.Tensor, upcoming) -> torch.Tensor:
        g = col // group_size
        if col % group_size == 0:  # group parameters from the (already updated) columns of this group
            p = grids.int4_params(upcoming(group_size), group_size, sym)
            scales[:, g] = p.scales[:, 0]
            if zeros is not None:
                zeros[:, g] = p.zeros[:, 0]
        z = None if zeros is None else zeros[:, g]
        codes[:, col] = grids.int4_quant_columns(x[:, None], scales[:, g], z)[:, 0]
        return (codes[:, col].float() - (8 if z is None else z)) * scales[:, g]

    perm, q = _gptq(w, hessian, act_order, percdamp, block_size, column)
    return codes, scales, zeros, perm, q


def gptq_int8(w: torch.Tensor, hessian: torch.Tensor, act_order: bool, percdamp: float, block_size: int):
    """GPTQ onto the per-channel int8 grid (scale = absmax(row) / 127, fixed before the loop). w float32 [N, K].

    Returns codes int8 [N, K] and scales float32 [N] in the original column order (a per-row scale does not care
    about column order, so no permutation is stored), and the dequantized weight float32 [N, K].
    """
    codes8, scales = grids.int8_quant(w)
    codes = torch.zeros_like(codes8)

    def column(col: int, x: torch.Tensor, upcoming) -> torch.Tensor:
        codes[:, col] = torch.round(x / scales).clamp(-127, 127).to(torch.int8)
        return codes[:, col].float() * scales

    perm, q = _gptq(w, hessian, act_order, percdamp, block_size, column)
    return (codes if perm is None else codes[:, torch.argsort(perm)]), scales, q


def _gptq(w: torch.Tensor, hessian: torch.Tensor, act_order: bool, percdamp: float, block_size: int,
          column) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The GPTQ loop over w float32 [N, K]. column(j, x [N], upcoming) quantizes stored column j (its current
    values x) and returns its dequantized values [N]; upcoming(c) gives the current values of columns j..j+c-1
    (for group parameters). Returns (perm or None, dequantized weight [N, K] in the original column order)."""
    n, k = w.shape
    W = w.clone().float()
    H = hessian.clone().double()  # factorized in float64; the column loop runs in float32, as reference GPTQ does
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    H += percdamp * torch.diag(H).mean() * torch.eye(k, dtype=H.dtype)
    try:
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    except torch.linalg.LinAlgError as e:
        raise ConfigError(f"gptq: the Hessian is not positive definite even after dampening ({e}); "
                          f"raise percdamp or calibrate on more text") from None
    Q = torch.zeros_like(W)
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        W1, Hinv1 = W[:, b0:b1].clone(), Hinv[b0:b1, b0:b1]
        Err1 = torch.zeros_like(W1)
        for i in range(b1 - b0):
            q = column(b0 + i, W1[:, i], lambda c, i=i: torch.cat([W1[:, i:], W[:, b1:]], 1)[:, :c])
            Q[:, b0 + i] = q
            err = (W1[:, i] - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, b1:] -= Err1 @ Hinv[b0:b1, b1:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return perm, Q
