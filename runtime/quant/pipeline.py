"""The quantize pipeline: calibration statistics, held-out perplexity, and one call from checkpoint to a
quantized model with its measured quality (what `python -m ringlet quantize` runs and saves)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from ..checkpoint import Checkpoint
from .apply import LayerPlan, Plan, model_nbytes, quantize_weights, uniform_plan
from .calibration import CalibrationText, LinearStats, collect_stats, load_calibration_text, token_windows
from .registry import QuantConfig

DENSE_DTYPE = torch.bfloat16  # dense tensors of a quantized checkpoint are stored (and measured) in bf16


@dataclass
class QuantContext:
    """What the methods share: the float checkpoint, the calibration text, held-out windows, cached statistics,
    and the measurements (not the weights) of every plan run so far."""

    checkpoint: Checkpoint
    text: CalibrationText
    calib_tokens: int = 4096
    eval_tokens: int = 2048
    context: int = 512
    _stats: dict[str, LinearStats] | None = field(default=None, repr=False)
    _measured: dict[str, Run] = field(default_factory=dict, repr=False)  # weights None

    def __post_init__(self) -> None:
        self.heldout = token_windows(self.checkpoint.tokenizer, self.text.heldout, self.eval_tokens, self.context,
                                     "held-out")
        self.calibration = token_windows(self.checkpoint.tokenizer, self.text.calibration, self.calib_tokens,
                                         self.context, "calibration")  # too short: fail before any work

    def engine(self, weights: dict, kv_tokens: int | None = None):
        """A float32 Engine on the default device over `weights` (scoring only: a KV cache of one window).

        Without a GPU, quant_linear runs its torch reference, x @ dequantize(W)^T, which re-expands the weight on
        every call; the same product is computed here from weights dequantized once (same values, same matmul).
        """
        from ..engine import Engine, EngineConfig
        if not torch.cuda.is_available():
            weights = {name: _dequantized(w) for name, w in weights.items()}
        ckpt = Checkpoint(self.checkpoint.config, weights, self.checkpoint.tokenizer, self.checkpoint.source)
        return Engine(ckpt, EngineConfig(dtype="float32", kv_cache_tokens=kv_tokens or self.context,
                                         cuda_graphs=False))

    def stats(self) -> dict[str, LinearStats]:
        if self._stats is None:
            self._stats = collect_stats(self.engine(self.checkpoint.weights), self.text.calibration,
                                        self.calib_tokens, self.context)
        return self._stats

    def loss(self, weights: dict, windows: list[list[int]] | None = None) -> float:
        """Mean negative log-likelihood (nats/token) of the held-out windows (or `windows`) under `weights`."""
        engine = self.engine(weights)
        total, count = 0.0, 0
        for window in windows or self.heldout:
            lp = engine.score(window)
            total -= float(lp.double().sum())
            count += lp.numel()
        return total / count

    def reference(self) -> dict:
        """The dense model with its tensors rounded to DENSE_DTYPE: the baseline every plan is compared with."""
        return quantize_weights(self.checkpoint.weights, self.checkpoint.config, {}, dense_dtype=DENSE_DTYPE)[0]

    def quantize(self, plan: Plan) -> tuple[dict, list[LayerPlan]]:
        calibrated = any(m is not None and m.calibrated for m in plan.values())
        return quantize_weights(self.checkpoint.weights, self.checkpoint.config, plan,
                                self.stats() if calibrated else None, DENSE_DTYPE, progress=True)

    def size(self, weights: dict) -> int:
        return model_nbytes(weights, self.checkpoint.config, DENSE_DTYPE)

    def run(self, method: QuantConfig) -> Run:
        """`method` applied to the model (uniformly, or by its own `choose` for mixed/auto) and measured on the
        held-out windows. The weights belong to the caller and the context remembers only the measurement (see
        `measured`): a context that kept every candidate's model (dense tensors in float32) grew by about 200 MB a
        candidate on the bundled model, and auto's process was OOM-killed."""
        if hasattr(method, "choose"):
            weights, plan, report = method.choose(self)
        else:
            weights, plan = self.quantize(uniform_plan(self.checkpoint.config, method))
            report = {}
        return self._measure(repr(method), weights, plan, report)

    def _measure(self, key: str, weights: dict, plan: list[LayerPlan], report: dict) -> Run:
        """The Run of `weights`, measured; remembered under `key` without its weights."""
        run = Run(weights, plan, report, self.loss(weights), self.size(weights))
        self._measured[key] = replace(run, weights=None)
        return run

    def measured(self, method: QuantConfig) -> Run:
        """`method`'s measurement, shared by auto, mixed and a benchmark table: remembered, with weights None, when
        it was run before in this context; else run now, with its weights."""
        return self._measured.get(repr(method)) or self.run(method)

    def baseline(self) -> Run:
        """`reference()` measured on the held-out windows: with its weights the first time, then remembered
        without them (`reference()` rebuilds them in seconds)."""
        if "reference" in self._measured:
            return self._measured["reference"]
        return self._measure("reference", self.reference(), [], {})


def _dequantized(w) -> torch.Tensor:
    """A weight of any model.Linear kind as a float32 tensor [N, K]."""
    if isinstance(w, torch.Tensor):
        return w
    if isinstance(w, tuple):
        return torch.cat([_dequantized(part) for part in w])
    return w.dequantize(torch.float32)


@dataclass
class Run:
    """One measured plan: weights for `Llama` (None in a remembered measurement), plan rows, the method's report,
    held-out loss (nats/token), bytes."""

    weights: dict | None
    plan: list[LayerPlan]
    report: dict
    loss: float
    size: int


@dataclass
class QuantizedModel:
    """A quantized model with its plan and measured quality, ready for quant.checkpoint.save_quantized."""

    weights: dict
    plan: list[LayerPlan]
    method: dict
    quality: dict
    calibration: dict


def quantize_model(checkpoint: Checkpoint, method: QuantConfig, calib_file: str | None = None,
                   calib_tokens: int = 4096, eval_tokens: int = 2048, context: int = 512) -> QuantizedModel:
    """Quantize `checkpoint` with `method`, measuring held-out perplexity before and after."""
    ctx = QuantContext(checkpoint, load_calibration_text(calib_file), calib_tokens, eval_tokens, context)
    before = ctx.baseline().loss
    run = ctx.run(method)
    quality = {"context": context, "heldout_tokens": eval_tokens, "perplexity_before": math.exp(before),
               "perplexity_after": math.exp(run.loss), "relative_change": math.exp(run.loss - before) - 1,
               "size_bytes": run.size, "reference_size_bytes": ctx.baseline().size, **run.report}
    calibration = {"source": ctx.text.source, "sha256": ctx.text.sha256, "calibration_tokens": calib_tokens,
                   "heldout_fraction": "last 25% of non-empty lines"}
    return QuantizedModel(run.weights, run.plan, method.to_dict(), quality, calibration)
