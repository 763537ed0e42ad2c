"""AWQ (Lin et al. 2023): activation-aware per-input-channel scales, then int4 round-to-nearest.

For each linear, scales s = mean|x|^alpha (normalised to geometric mean 1) over a grid of alpha in [0, 1]; the
alpha whose quantized weight Q(W diag s) diag(1/s) gives the smallest output error on the calibration inputs
(measured exactly through H = 2 X^T X / n) wins. alpha = 0 is plain RTN, so AWQ's error never exceeds RTN's.

The stored weight dequantizes to W diag(s); the 1/s is folded into what produces the linear's input, so the
forward pass is unchanged:
    wqkv  <- attention_norm weight / s          w13 <- ffn_norm weight / s
    wo    <- the V rows of wqkv / s (s tied across the query heads sharing a KV head, since under GQA one V row
             feeds every head of its group)
    w2    <- the up (w3) rows of w13 / s (silu(w1 x) * (w3 x) is linear in w3)
Within a block the order is wo, w2 (their folds change wqkv's and w13's rows), then wqkv, w13.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..errors import ConfigError
from . import grids
from .calibration import LinearStats
from .registry import INT4_GROUP_SIZES, QuantConfig, QuantResult, check_bool, check_choice, register
from .rtn import int4_rtn


@register
@dataclass
class Awq(QuantConfig):
    name = "awq"
    calibrated = True
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    grid: int = 20

    def validate(self) -> None:
        check_choice(self.name, "bits", self.bits, (4,))
        check_choice(self.name, "group_size", self.group_size, INT4_GROUP_SIZES)
        check_bool(self.name, "sym", self.sym)
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 1:
            raise ConfigError(f"awq: grid={self.grid!r} must be a positive integer")

    def prepare(self, weights: dict[str, torch.Tensor], stats: dict[str, LinearStats], config: ModelConfig
                ) -> tuple[dict[str, torch.Tensor], dict[str, LinearStats]]:
        """Scale every linear of `weights` (fused LINEARS names + norms) and fold 1/s as above. Returns new
        weights and the statistics of the scaled inputs (x / s)."""
        weights, stats = dict(weights), dict(stats)
        rep = config.n_heads // config.n_kv_heads
        v_rows = slice(config.q_size + config.kv_size, config.q_size + 2 * config.kv_size)
        up_rows = slice(config.ffn_dim, 2 * config.ffn_dim)
        for i in range(config.n_layers):
            p = f"layers.{i}."
            wqkv, w13 = weights[p + "attention.wqkv"].clone(), weights[p + "feed_forward.w13"].clone()
            s = self._scale(p + "attention.wo", weights, stats, tie=(config.n_kv_heads, rep, config.head_dim))
            wqkv[v_rows] /= s.view(config.n_kv_heads, rep, config.head_dim)[:, 0].reshape(-1)[:, None]
            s = self._scale(p + "feed_forward.w2", weights, stats)
            w13[up_rows] /= s[:, None]
            weights[p + "attention.wqkv"], weights[p + "feed_forward.w13"] = wqkv, w13
            for linear, norm in (("attention.wqkv", "attention_norm.weight"), ("feed_forward.w13", "ffn_norm.weight")):
                s = self._scale(p + linear, weights, stats)
                weights[p + norm] = weights[p + norm] / s
        return weights, stats

    def _scale(self, name: str, weights: dict, stats: dict, tie: tuple[int, int, int] | None = None) -> torch.Tensor:
        """Search s for `name`, replace its weight by W diag(s) and its stats by those of x / s; return s."""
        w, st = weights[name].float(), stats[name]
        s = search_scale(w, st, grids.group_size_for(w.shape[1], self.group_size), self.sym, self.grid, tie)
        weights[name] = w * s
        stats[name] = LinearStats(st.hessian / s[:, None] / s[None, :], st.act_mean / s, st.tokens)
        return s

    def quantize(self, w: torch.Tensor, stats: LinearStats | None = None) -> QuantResult:
        """w float32 [N, K], already scaled by `prepare` -> Int4Weight (RTN on the scaled weight)."""
        return int4_rtn(w, grids.group_size_for(w.shape[1], self.group_size), self.sym, stats)


def search_scale(w: torch.Tensor, stats: LinearStats, group_size: int, sym: bool, grid: int,
                 tie: tuple[int, int, int] | None = None) -> torch.Tensor:
    """The per-input-channel scale float32 [K] minimising the output error of int4 RTN over alpha in
    {0, 1/grid, ..., 1}. `tie` = (n_kv_heads, heads per KV head, head_dim): channels of query heads that share a
    KV head get the same scale (their mean activation)."""
    x = stats.act_mean.clamp_min(1e-6)
    if tie is not None:
        n_kv, rep, hd = tie
        x = x.view(n_kv, rep, hd).mean(dim=1, keepdim=True).expand(n_kv, rep, hd).reshape(-1)
    h = stats.hessian
    best, best_err = torch.ones_like(x), float("inf")
    for alpha in torch.linspace(0, 1, grid + 1).tolist():
        s = x.pow(alpha)
        s = s / torch.sqrt(s.max() * s.min())
        ws = w * s
        p = grids.int4_params(ws, group_size, sym)
        d = w - grids.int4_dequant(grids.int4_quant(ws, p), p) / s
        err = float(((d @ h) * d).sum())
        if err < best_err:
            best, best_err = s, err
    return best
