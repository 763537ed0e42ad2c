"""ringlet's quantized checkpoint directory, and AutoGPTQ / AutoAWQ directories read into Int4Weight.

ringlet's directory (loads alone, no calibration):
    config.json            HF Llama keys + "quantization_config": {"quant_method": "ringlet"}
    tokenizer.json, tokenizer_config.json
    model.safetensors      dense tensors (bf16) under ringlet names; each quantized projection's state_dict under
                           "{linear}.{key}"; header metadata "ringlet" = JSON {format, method, plan, calibration,
                           quality}, the plan listing every projection's class, shape and tensor keys.
AutoGPTQ / AutoAWQ: config.json with quantization_config (quant_method gptq / awq) or quantize_config.json,
qweight/qzeros/scales(/g_idx) per projection; q/k/v and gate/up stay separate parts (model.Linear tuples).
"""
from __future__ import annotations

import json
from pathlib import Path

import safetensors
import torch
from safetensors.torch import save_file

from ..checkpoint import Checkpoint, weight_shapes
from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from ..hf_loader import config_from_hf, load_hf_tokenizer, read_json_object
from ..model import LINEARS

FORMAT = "ringlet-quant-1"
WEIGHTS_FILE = "model.safetensors"


def _classes() -> dict[str, type]:
    from ringlet.kernels.quant_gemm import Int4Weight, Int8Weight, TernaryWeight
    return {"Int8Weight": Int8Weight, "Int4Weight": Int4Weight, "TernaryWeight": TernaryWeight}


def hf_config(config: ModelConfig) -> dict:
    """config.json keys (HF Llama) for `config`."""
    raw = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
           "hidden_size": config.dim, "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
           "num_key_value_heads": config.n_kv_heads, "intermediate_size": config.ffn_dim,
           "head_dim": config.head_dim, "rms_norm_eps": config.rms_eps, "rope_theta": config.rope_theta,
           "max_position_embeddings": config.max_seq_len, "tie_word_embeddings": config.tie_embeddings,
           "hidden_act": "silu", "_name_or_path": config.name}
    scaling = config.rope_scaling
    if scaling is not None:
        if scaling.type == "ntk":
            raise ConfigError("ntk rope scaling has no config.json form; quantize without --rope-scaling")
        raw["rope_scaling"] = {"rope_type": scaling.type, "factor": scaling.factor,
                               "original_max_position_embeddings": scaling.original_max_position}
    return raw


def save_quantized(qm, checkpoint: Checkpoint, out: str | Path) -> Path:
    """Write a pipeline.QuantizedModel (weights from `checkpoint`) as a ringlet quantized directory."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors, plan = {}, []
    rows = {row.name: row for row in qm.plan}
    for name, w in qm.weights.items():
        if isinstance(w, torch.Tensor):
            tensors[name] = w.to(torch.bfloat16).contiguous()
            continue
        state = {f"{name}.{k}": v.contiguous() for k, v in w.state_dict().items()}
        tensors.update(state)
        row = rows[name]
        plan.append({"name": name, "class": type(w).__name__, "method": row.method, "shape": [w.out_features,
                     w.in_features], "group_size": row.group_size, "error": row.error, "nbytes": row.nbytes,
                     "tensors": sorted(state)})
    meta = {"format": FORMAT, "method": qm.method, "plan": plan, "calibration": qm.calibration,
            "quality": qm.quality}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"ringlet": json.dumps(meta)})
    config = hf_config(checkpoint.config)
    config["quantization_config"] = {"quant_method": "ringlet", "format": FORMAT, "method": qm.method}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    tok = checkpoint.tokenizer
    (out / "tokenizer.json").write_text(tok.backend.to_str())
    tok_config = {"bos_token": tok._token(tok.bos_id), "eos_token": tok._token(tok.eos_id),
                  "add_bos_token": tok.add_bos}
    if tok.chat_template:
        tok_config["chat_template"] = tok.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=1))
    return out


def quantization_kind(directory: Path) -> str | None:
    """"ringlet", "gptq" or "awq" for a quantized HF-style directory, else None."""
    raw = read_json_object(directory / "config.json")
    qc = raw.get("quantization_config") or (read_json_object(directory / "quantize_config.json")
                                           if (directory / "quantize_config.json").is_file() else None)
    if not qc:
        return None
    kind = str(qc.get("quant_method", "gptq")).lower()
    if kind not in ("ringlet", "gptq", "awq"):
        raise ConfigError(f"{directory / 'config.json'}: quantization_config.quant_method={kind!r} is not supported "
                          f"(ringlet, gptq, awq)")
    return kind


def load_quantized_dir(directory: Path, dtype: torch.dtype = torch.float32) -> Checkpoint:
    """Load a quantized directory (see module docstring) into a Checkpoint whose weights hold quantized
    projections under model.LINEARS names."""
    kind = quantization_kind(directory)
    raw = read_json_object(directory / "config.json")
    config = config_from_hf({k: v for k, v in raw.items() if k != "quantization_config"}, directory / "config.json")
    tokenizer = load_hf_tokenizer(directory, raw)
    if kind == "ringlet":
        weights = _load_ringlet(directory / WEIGHTS_FILE, config, dtype)
    else:
        qc = raw.get("quantization_config") or read_json_object(directory / "quantize_config.json")
        from .hf_formats import load_autoquant
        weights = load_autoquant(directory, config, qc, kind, dtype)
    return Checkpoint(config=config, weights=weights, tokenizer=tokenizer, source=str(directory))


def _load_ringlet(path: Path, config: ModelConfig, dtype: torch.dtype) -> dict:
    tensors, header = read_safetensors(path)
    if "ringlet" not in header:
        raise CheckpointError(f"{path}: no 'ringlet' metadata entry in the safetensors header")
    try:
        meta = json.loads(header["ringlet"])
        plan = meta["plan"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: the 'ringlet' metadata is not valid ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: metadata format {meta.get('format')!r}; this ringlet reads {FORMAT!r}")
    classes, weights, claimed = _classes(), {}, set()
    for row in plan:
        name = row.get("name")
        if row.get("class") not in classes:
            raise CheckpointError(f"{path}: plan entry {name!r} has unknown class {row.get('class')!r}")
        keys = row.get("tensors", [])
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise CheckpointError(f"{path}: tensor {missing[0]!r} listed in the metadata plan is not in the file")
        state = {k[len(name) + 1:]: tensors[k] for k in keys}
        try:
            w = classes[row["class"]].from_state_dict(state)
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"{path}: tensors of {name!r} do not form a {row['class']} ({e})") from None
        if [w.out_features, w.in_features] != row.get("shape"):
            raise CheckpointError(f"{path}: tensor {name!r} is {[w.out_features, w.in_features]} but the metadata "
                                  f"says {row.get('shape')}")
        weights[name] = w
        claimed.update(keys)
    expected = _dense_shapes(config)
    for name, t in tensors.items():
        if name in claimed:
            continue
        if name not in expected or (name in weights):
            raise CheckpointError(f"{path}: tensor {name!r} is not in the metadata plan or the model")
        if tuple(t.shape) != expected[name]:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {list(t.shape)}, the config needs "
                                  f"{list(expected[name])}")
        weights[name] = t.to(dtype)
    for name, shape in expected.items():
        if name not in weights:
            raise CheckpointError(f"{path}: tensor {name!r} (shape {list(shape)}) is missing")
        w = weights[name]
        actual = tuple(w.shape) if isinstance(w, torch.Tensor) else (w.out_features, w.in_features)
        if actual != shape:
            raise CheckpointError(f"{path}: tensor {name!r} is {list(actual)}, the config needs {list(shape)}")
    return weights


def _dense_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of a quantized model's tensors: norms, embeddings and the fused projections (LINEARS names)."""
    shapes = {k: v for k, v in weight_shapes(config).items()
              if not (k.startswith("layers.") and (".attention.w" in k or ".feed_forward.w" in k))}
    q, kv, d, f = config.q_size, config.kv_size, config.dim, config.ffn_dim
    for i in range(config.n_layers):
        for kind, shape in zip(LINEARS, ((q + 2 * kv, d), (d, q), (2 * f, d), (d, f))):
            shapes[f"layers.{i}.{kind}"] = shape
    return shapes


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the header metadata of one safetensors file; CheckpointError naming it if unreadable."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except (safetensors.SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
