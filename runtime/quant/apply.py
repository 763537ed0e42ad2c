"""Quantize a model's weights under a plan: one method config (or None = keep dense) per projection.

Input: checkpoint weights under ringlet's per-projection names (checkpoint.py), CPU tensors. Output: the same
dict with each layer's four projections replaced by fused `model.LINEARS` entries ("layers.{i}.attention.wqkv",
...) holding a quantized weight or a dense tensor, plus one `LayerPlan` row per planned tensor. Norms stay dense; the
token embedding (tied to the output head in SmolLM2) and an untied output head are planned like projections when
the method says `embeddings="int8"` (they then get rtn-int8), else they stay dense.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..config import ModelConfig
from ..model import LINEARS, fuse_dense
from .calibration import LinearStats
from .registry import QuantConfig
from .rtn import RtnInt8

Plan = dict[str, QuantConfig | None]  # linear name -> its method (None: dense)


@dataclass
class LayerPlan:
    """One row of a quantized model's plan: which method a projection got, its error, group size and bytes."""

    name: str
    method: str
    error: float | None
    group_size: int | None
    nbytes: int


def linear_names(config: ModelConfig) -> list[str]:
    return [f"layers.{i}.{kind}" for i in range(config.n_layers) for kind in LINEARS]


def embedding_names(config: ModelConfig) -> list[str]:
    """The [vocab, dim] tensors: the token embedding, and the output head when it is not tied to it."""
    return ["tok_embeddings.weight"] + ([] if config.tie_embeddings else ["output.weight"])


def uniform_plan(config: ModelConfig, method: QuantConfig | None) -> Plan:
    """`method` on every projection; per-row int8 on the embeddings when method.embeddings is "int8"."""
    plan: Plan = {name: method for name in linear_names(config)}
    if method is not None and method.embeddings == "int8":
        plan.update(dict.fromkeys(embedding_names(config), RtnInt8()))
    return plan


def fused_weights(weights: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """`weights` with each layer's projections fused under LINEARS names (norms and embeddings as they are)."""
    projections = {"attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
                   "feed_forward.w1.weight", "feed_forward.w3.weight", "feed_forward.w2.weight"}
    out = {k: v for k, v in weights.items() if k.split(".", 2)[-1] not in projections or not k.startswith("layers.")}
    for i in range(config.n_layers):
        out.update(fuse_dense(weights, i))
    return out


def quantize_weights(weights: dict[str, torch.Tensor], config: ModelConfig, plan: Plan,
                     stats: dict[str, LinearStats] | None = None, dense_dtype: torch.dtype = torch.bfloat16,
                     progress: bool = False) -> tuple[dict, list[LayerPlan]]:
    """Quantize every projection as `plan` says. A method with a `prepare` step (AWQ) rescales the whole fused
    model first (every projection whose plan uses it). Dense tensors are rounded to `dense_dtype` (what the
    checkpoint stores) and kept in the dtype given. Returns (weights for `Llama`, plan rows)."""
    fused = fused_weights(weights, config)
    stats = dict(stats or {})
    for method in {type(m): m for m in plan.values() if m is not None and hasattr(m, "prepare")}.values():
        fused, stats = method.prepare(fused, stats, config)
    out, rows = {}, []
    names = set(plan)
    for name, w in fused.items():
        if name not in names:
            out[name] = w.to(dense_dtype).to(w.dtype)
    for name in tqdm(list(plan), desc="quantizing", unit="linear", disable=not progress):
        method, w = plan[name], fused[name]
        if method is None:
            out[name] = w.to(dense_dtype).to(w.dtype)
            rows.append(LayerPlan(name, "dense", None, None, w.numel() * dense_dtype.itemsize))
            continue
        res = method.quantize(w.float(), stats.get(name))
        out[name] = res.weight
        rows.append(LayerPlan(name, method.name, res.error, res.group_size, res.weight.nbytes))
    return out, rows


def model_nbytes(weights: dict, config: ModelConfig, dense_dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the model's weights as stored: quantized weights' own bytes, dense tensors in dense_dtype."""
    total = 0
    for name, w in weights.items():
        if name == "output.weight" and config.tie_embeddings:
            continue
        parts = w if isinstance(w, tuple) else (w,)
        total += sum(p.numel() * dense_dtype.itemsize if isinstance(p, torch.Tensor) else p.nbytes for p in parts)
    return total


def quantize_at_load(weights: dict[str, torch.Tensor], config: ModelConfig, method: QuantConfig) -> dict:
    """The weights quantized with a quick (uncalibrated) method, for `LLM(..., quant=...)`. Dense tensors keep
    their precision. ConfigError for a method that needs calibration."""
    from ..errors import ConfigError
    if method.calibrated:
        raise ConfigError(f"quantization method {method.name!r} needs calibration: run `python -m ringlet quantize "
                          f"--method {method.name} --out DIR` and load DIR")
    return quantize_weights(weights, config, uniform_plan(config, method), dense_dtype=torch.float32)[0]
