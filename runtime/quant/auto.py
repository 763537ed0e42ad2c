"""`auto`: try candidate methods, measure each on the held-out split, keep the smallest within the budget.

Prints the table it chose from (method, size, held-out perplexity, change against the dense reference). When no
candidate is within the budget, the dense (bf16) model is kept and the report says so. Candidates are method
specs separated by ";" (each spec's own options after ":", e.g. "gptq:group_size=128,embeddings=int8").

Memory: only the best candidate so far keeps its weights; each other one is freed once measured. A candidate
already measured in the same QuantContext is not run again (only re-run if it is the one chosen). `mixed` comes
before the two uniform plans it is built from, so its own runs of them are reused as their measurements.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass

from ..errors import ConfigError
from .registry import QuantConfig, check_fraction, parse_method, register

DEFAULT_CANDIDATES = ("bitnet", "rtn-int4:group_size=128,sym=true", "rtn-int4:group_size=128,sym=false",
                      "gptq:group_size=128", "awq:group_size=128", "rtn-int8", "mixed:embeddings=int8",
                      "gptq:group_size=128,embeddings=int8", "rtn-int8:embeddings=int8")


@register
@dataclass
class Auto(QuantConfig):
    name = "auto"
    calibrated = True
    budget: float = 0.01
    candidates: tuple = DEFAULT_CANDIDATES

    def validate(self) -> None:
        check_fraction(self.name, "budget", self.budget, 0.0, 10.0)
        if self.embeddings != "bf16":
            raise ConfigError("auto: set embeddings per candidate (e.g. candidates=gptq:embeddings=int8;rtn-int8)")
        if isinstance(self.candidates, str):
            self.candidates = tuple(self.candidates.split(";"))
        for spec in self.candidates:
            if parse_method(spec).name == "auto":
                raise ConfigError(f"auto: candidate {spec!r} cannot itself be auto")

    def choose(self, ctx) -> tuple[dict, list, dict]:
        """-> (weights, plan rows, report with the table) for a pipeline.QuantContext."""
        baseline = ctx.baseline()
        table = [{"method": "bf16 (reference)", "size_bytes": baseline.size,
                  "perplexity": math.exp(baseline.loss), "relative_change": 0.0}]
        best = None  # (spec, method, run) of the smallest candidate within the budget so far
        for spec in self.candidates:
            method = parse_method(spec)
            if method.name == "mixed" and "budget=" not in spec:  # mixed aims at auto's budget unless told
                method = dataclasses.replace(method, budget=self.budget)
            run = ctx.measured(method)
            table.append({"method": spec, "size_bytes": run.size, "perplexity": math.exp(run.loss),
                          "relative_change": math.exp(run.loss - baseline.loss) - 1})
            if table[-1]["relative_change"] <= self.budget and (best is None or run.size < best[2].size):
                best = (spec, method, run)
            del run  # else a rejected candidate's weights stay alive while the next one is quantized
        chosen = best[0] if best else "bf16 (reference)"
        print_table(table, chosen, self.budget)
        report = {"chosen": chosen, "candidates": table, "budget_met": best is not None}
        if best is None:
            return ctx.reference(), [], report
        run = best[2] if best[2].weights is not None else ctx.run(best[1])  # measured earlier: weights freed
        return run.weights, run.plan, report


def print_table(table: list[dict], chosen: str, budget: float, out=None) -> None:
    """The candidates table, to `out` (default: the current sys.stderr)."""
    out = out or sys.stderr
    print(f"{'method':<40} {'MB':>8} {'ppl':>9} {'change':>8}", file=out)
    for row in table:
        mark = "  <- chosen" if row["method"] == chosen else ""
        print(f"{row['method']:<40} {row['size_bytes'] / 1e6:8.1f} {row['perplexity']:9.3f} "
              f"{100 * row['relative_change']:+7.2f}%{mark}", file=out)
    print(f"budget: +{100 * budget:.2f}% perplexity", file=out)
