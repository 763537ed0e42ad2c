"""`mixed`: per-layer precision chosen by measured sensitivity.

1. Quantize the whole model with `low` and, separately, with `high` ("bf16" keeps the projections dense); both
   carry mixed's own `embeddings` setting.
2. Sensitivity of decoder layer i: the loss increase, on the first `probe_tokens` calibration tokens (not the
   held-out text), when only layer i's four projections are at `low` and every other layer is at `high`.
3. Promote layers to `high`, most sensitive first: start from the fewest whose promotion leaves the summed
   sensitivities of the rest within the budget, then measure the whole plan on the held-out split and promote
   `step` more at a time until its perplexity is within `budget` (relative) of the dense reference.

Whole layers, not single projections, are the unit: the bundled model has 30 layers and 120 projections, and each
sensitivity is one forward pass over the probe, so per-layer keeps the search to minutes on a CPU.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from tqdm import tqdm

from ..errors import ConfigError
from .apply import uniform_plan
from .registry import QuantConfig, check_fraction, parse_method, register


@register
@dataclass
class Mixed(QuantConfig):
    name = "mixed"
    calibrated = True
    low: str = "gptq"
    high: str = "rtn-int8"
    budget: float = 0.01
    probe_tokens: int = 512
    step: int = 2

    def validate(self) -> None:
        low = parse_method(self.low)
        if hasattr(low, "prepare") or hasattr(low, "choose"):
            raise ConfigError(f"mixed: low={self.low!r}: use rtn-int4, gptq or bitnet (a method that rescales the "
                              f"whole model cannot be mixed per layer)")
        if self.high != "bf16" and parse_method(self.high).name not in ("rtn-int8", "rtn-int4", "gptq"):
            raise ConfigError(f"mixed: high={self.high!r} must be bf16, rtn-int8, rtn-int4 or gptq")
        check_fraction(self.name, "budget", self.budget, 0.0, 10.0)
        for name in ("probe_tokens", "step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name[0] == "p" else 1):
                raise ConfigError(f"mixed: {name}={value!r} must be a positive integer")

    def choose(self, ctx) -> tuple[dict, list, dict]:
        """-> (weights, plan rows, report) for a pipeline.QuantContext."""
        n_layers = ctx.checkpoint.config.n_layers
        low = ctx.run(dataclasses.replace(parse_method(self.low), embeddings=self.embeddings))
        if self.high == "bf16":
            high_weights, high_rows = ctx.quantize(uniform_plan(ctx.checkpoint.config, None))
        else:
            high = ctx.run(dataclasses.replace(parse_method(self.high), embeddings=self.embeddings))
            high_weights, high_rows = high.weights, high.plan
        probe = _first_tokens(ctx.calibration, self.probe_tokens)

        def merged(promoted: set[int]) -> dict:
            """low's weights with the layers in `promoted` taken from high (embeddings and norms from low)."""
            return {**low.weights, **{k: w for k, w in high_weights.items() if _layer(k) in promoted}}

        everything = set(range(n_layers))
        base = ctx.loss(merged(everything), probe)
        sensitivity = [ctx.loss(merged(everything - {i}), probe) - base
                       for i in tqdm(range(n_layers), desc="sensitivity", unit="layer")]
        order = sorted(range(n_layers), key=sensitivity.__getitem__, reverse=True)
        allowed = math.log1p(self.budget)
        reference = ctx.baseline().loss
        count = next(c for c in range(n_layers + 1) if sum(sensitivity[i] for i in order[c:]) <= allowed)
        measured = []
        while True:
            weights = merged(set(order[:count]))
            loss = low.loss if count == 0 else ctx.loss(weights)
            measured.append({"promoted": count, "perplexity": math.exp(loss)})
            if loss - reference <= allowed or count == n_layers:
                break
            count = min(n_layers, count + self.step)
        promoted = sorted(order[:count])
        rows = {row.name: row for row in low.plan}
        rows.update({row.name: row for row in high_rows if _layer(row.name) in promoted})
        report = {"promoted_layers": promoted, "sensitivity": sensitivity, "measured": measured,
                  "budget_met": loss - reference <= allowed}
        return weights, list(rows.values()), report


def _layer(name: str) -> int | None:
    """The decoder layer of a weight name ("layers.3.attention.wqkv" -> 3), None for embeddings and norms."""
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "layers" else None


def _first_tokens(windows: list[list[int]], tokens: int) -> list[list[int]]:
    out, left = [], tokens
    for window in windows:
        if left < 2:
            break
        out.append(window[:left])
        left -= len(out[-1])
    return out
