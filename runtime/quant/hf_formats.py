"""AutoGPTQ / AutoAWQ checkpoint directories -> ringlet weights with Int4Weight projections.

Per projection the directory holds `{hf}.qweight`, `{hf}.qzeros`, `{hf}.scales` (and for GPTQ `{hf}.g_idx`);
norms and embeddings are float tensors. q/k/v and gate/up stay separate Int4Weights, held as tuples (model.Linear)
since each may carry its own act-order permutation.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import weight_shapes
from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from ..hf_loader import hf_name
from ..model import LINEARS
from .checkpoint import read_safetensors

# ringlet fused projection -> its HF parts (after "model.layers.{i}.")
_PARTS = dict(zip(LINEARS, (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                            ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))))


def load_autoquant(directory: Path, config: ModelConfig, qc: dict, kind: str, dtype: torch.dtype) -> dict:
    """Read every *.safetensors of `directory` (quantization_config `qc`, kind "gptq" or "awq")."""
    from ringlet.kernels.quant_gemm import Int4Weight
    bits = qc.get("bits", qc.get("w_bit", 4))
    if bits != 4:
        raise ConfigError(f"{directory}: {kind} bits={bits!r}; ringlet's kernels read 4-bit {kind} checkpoints")
    tensors, where = {}, {}
    for file in sorted(directory.glob("*.safetensors")):
        found, _ = read_safetensors(file)
        tensors.update(found)
        where.update(dict.fromkeys(found, file))
    if not tensors:
        raise CheckpointError(f"{directory}: no *.safetensors weight files")
    weights = {}
    for i in range(config.n_layers):
        for kind_name, parts in _PARTS.items():
            loaded = []
            for part in parts:
                base = f"model.layers.{i}.{part}."
                names = ["qweight", "qzeros", "scales"] + (["g_idx"] if kind == "gptq" and base + "g_idx" in tensors
                                                          else [])
                missing = [base + n for n in names if base + n not in tensors]
                if missing:
                    raise CheckpointError(f"{directory}: tensor {missing[0]!r} is missing ({kind} checkpoint)")
                t = {n: tensors[base + n] for n in names}
                try:
                    if kind == "gptq":
                        loaded.append(Int4Weight.from_gptq(t["qweight"], t["qzeros"], t["scales"], t.get("g_idx"),
                                                           bits=4, sym=qc.get("sym")))
                    else:
                        loaded.append(Int4Weight.from_awq(t["qweight"], t["qzeros"], t["scales"]))
                except (ValueError, RuntimeError) as e:
                    raise CheckpointError(f"{where[base + 'qweight']}: tensor {base + 'qweight'!r} and its "
                                          f"zeros/scales are not a valid {kind} layer ({e})") from None
            weights[f"layers.{i}.{kind_name}"] = tuple(loaded) if len(loaded) > 1 else loaded[0]
    for name, shape in weight_shapes(config).items():
        if name.startswith("layers.") and (".attention.w" in name or ".feed_forward.w" in name):
            continue
        theirs = hf_name(name)
        if theirs not in tensors:
            raise CheckpointError(f"{directory}: tensor {theirs!r} is missing")
        if tuple(tensors[theirs].shape) != shape:
            raise CheckpointError(f"{where[theirs]}: tensor {theirs!r} has shape {list(tensors[theirs].shape)}, "
                                  f"the config needs {list(shape)}")
        weights[name] = tensors[theirs].to(dtype)
    _check_shapes(weights, config, directory)
    return weights


def _check_shapes(weights: dict, config: ModelConfig, directory: Path) -> None:
    q, kv, d, f = config.q_size, config.kv_size, config.dim, config.ffn_dim
    for i in range(config.n_layers):
        for kind, (n, k) in zip(LINEARS, ((q + 2 * kv, d), (d, q), (2 * f, d), (d, f))):
            w = weights[f"layers.{i}.{kind}"]
            parts = w if isinstance(w, tuple) else (w,)
            got = (sum(p.out_features for p in parts), parts[0].in_features)
            if got != (n, k) or any(p.in_features != k for p in parts):
                raise CheckpointError(f"{directory}: layer {i} {kind} is {list(got)} from its qweight tensors, the "
                                      f"config needs {[n, k]}")
