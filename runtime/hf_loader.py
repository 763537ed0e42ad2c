"""HF Llama-style checkpoint directories -> Checkpoint.

A directory holds config.json (LlamaForCausalLM / MistralForCausalLM keys), one or more *.safetensors files
(with or without model.safetensors.index.json) and tokenizer.json (+ tokenizer_config.json). Tensors are read
through safetensors' memory map; pickle files (*.bin, *.pt, *.pth) are refused.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import safetensors
import torch

from .checkpoint import PICKLE_SUFFIXES, Checkpoint, collect_weights
from .config import ModelConfig, RopeScaling
from .errors import CheckpointError, ConfigError
from .tokenizer import Tokenizer

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_MODEL_TYPES = ("llama", "mistral")

# ringlet name (per layer, after "layers.{i}.") -> HF name (after "model.layers.{i}.").
_LAYER_NAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}

_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def hf_name(name: str) -> str:
    """The HF tensor name of a ringlet weight name."""
    if name.startswith("layers."):
        _, index, rest = name.split(".", 2)
        return f"model.layers.{index}.{_LAYER_NAMES[rest]}"
    return _GLOBAL_NAMES[name]


def load_hf_dir(directory: Path, dtype: torch.dtype = torch.float32) -> Checkpoint:
    """Load an HF checkpoint directory (see module docstring). Weights are CPU tensors in `dtype`."""
    config_path = directory / "config.json"
    raw = read_json_object(config_path)
    config = config_from_hf(raw, config_path)
    source = _SafetensorsTensors(directory)  # finds the weight files first: refuses pickles before anything else
    tokenizer = load_hf_tokenizer(directory, raw)
    # Old exports carry the RoPE frequency table as a buffer; tied checkpoints may still store lm_head.
    with source:
        ignored = {n for n in source.names() if n.endswith(".rotary_emb.inv_freq")}
        if config.tie_embeddings:
            ignored.add("lm_head.weight")
        weights = collect_weights(config, source, hf_name, dtype, ignored)
    return Checkpoint(config=config, weights=weights, tokenizer=tokenizer, source=str(directory))


def load_hf_tokenizer(directory: Path, model_config: dict[str, Any]) -> Tokenizer:
    """tokenizer.json with what tokenizer_config.json, generation_config.json and chat_template.jinja add."""
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise CheckpointError(f"{directory}: no tokenizer.json (ringlet reads the `tokenizers` JSON format; "
                              f"a sentencepiece tokenizer.model alone is not supported)")
    template_file = directory / "chat_template.jinja"
    return Tokenizer.from_hf(
        tokenizer_file, read_json_object(directory / "tokenizer_config.json", optional=True),
        model_config=model_config,
        generation_config=read_json_object(directory / "generation_config.json", optional=True),
        chat_template=template_file.read_text(encoding="utf-8") if template_file.is_file() else None)


def config_from_hf(raw: dict[str, Any], path: Path) -> ModelConfig:
    """ModelConfig from a parsed config.json. Unsupported options raise ConfigError naming the key."""
    architectures = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if architectures:
        if not any(a in SUPPORTED_ARCHITECTURES for a in architectures):
            raise CheckpointError(f"{path}: architectures={architectures} not supported; supported: "
                                  f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    elif model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{path}: model_type={model_type!r} not supported; supported: "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)}")

    def value(key: str, default: Any = None, kind: type = int) -> Any:
        v = raw.get(key)
        v = default if v is None else v
        if v is None:
            raise CheckpointError(f"{path}: missing {key!r}")
        if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
            raise CheckpointError(f"{path}: {key}={v!r} is not a{'' if kind is float else 'n'} {kind.__name__}")
        return kind(v)

    def unsupported(key: str, why: str) -> ConfigError:
        return ConfigError(f"{path}: {key}={raw[key]!r} is not supported{why}")

    if raw.get("hidden_act", "silu") != "silu":
        raise unsupported("hidden_act", " (ringlet's MLP is SwiGLU: silu)")
    for key in ("attention_bias", "mlp_bias"):
        if raw.get(key):
            raise unsupported(key, " (ringlet's projections have no bias)")
    if raw.get("quantization_config"):
        raise unsupported("quantization_config", " yet")
    max_len = value("max_position_embeddings", 2048)
    window = raw.get("sliding_window")
    if window is not None and window < max_len:
        raise unsupported("sliding_window", f" (shorter than max_position_embeddings={max_len})")

    # RoPE: transformers 4 writes rope_theta + rope_scaling, transformers 5 writes rope_parameters.
    rope_theta = value("rope_theta", 10000.0, kind=float)
    rope_scaling = None
    for key in ("rope_scaling", "rope_parameters"):
        rope = raw.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise CheckpointError(f"{path}: {key}={rope!r} is not an object")
        theta = rope.get("rope_theta", rope_theta)
        if isinstance(theta, bool) or not isinstance(theta, (int, float)):
            raise CheckpointError(f"{path}: {key}.rope_theta={theta!r} is not a number")
        rope_theta = float(theta)
        scaling = _rope_scaling_from_hf(rope, key, max_len, path)
        rope_scaling = scaling if scaling is not None else rope_scaling

    n_heads = value("num_attention_heads")
    dim = value("hidden_size")
    try:
        return ModelConfig(
            vocab_size=value("vocab_size"), dim=dim, n_layers=value("num_hidden_layers"), n_heads=n_heads,
            n_kv_heads=value("num_key_value_heads", n_heads), ffn_dim=value("intermediate_size"),
            head_dim=value("head_dim", dim // n_heads if n_heads else 0),
            rms_eps=value("rms_norm_eps", 1e-6, kind=float), rope_theta=rope_theta, max_seq_len=max_len,
            rope_scaling=rope_scaling,
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            name=str(raw.get("_name_or_path") or model_type or architectures[0]),
            extra={"format": "hf", "architectures": architectures},
        )
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


# HF rope types ringlet computes the same table for, and the HF keys each reads (HF name -> RopeScaling field).
_HF_ROPE_TYPES = {
    "linear": {"factor": "factor"},
    "yarn": {"factor": "factor", "original_max_position_embeddings": "original_max_position",
             "beta_fast": "beta_fast", "beta_slow": "beta_slow", "attention_factor": "attention_factor"},
    "llama3": {"factor": "factor", "original_max_position_embeddings": "original_max_position",
               "low_freq_factor": "low_freq_factor", "high_freq_factor": "high_freq_factor"},
}


def _rope_scaling_from_hf(rope: dict[str, Any], key: str, max_len: int, path: Path) -> RopeScaling | None:
    """RopeScaling from an HF rope_scaling / rope_parameters object; None for default RoPE. A type whose table
    ringlet does not build the same way raises ConfigError (dynamic NTK changes with the sequence length, so it is
    refused rather than replaced by ringlet's static `ntk`)."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind not in _HF_ROPE_TYPES:
        hint = " (for a fixed NTK-aware stretch pass --rope-scaling ntk:FACTOR)" if kind == "dynamic" else ""
        raise ConfigError(f"{path}: {key}={rope!r}: rope_type {kind!r} is not supported; supported: default, "
                          f"{', '.join(_HF_ROPE_TYPES)}{hint}")
    if kind == "yarn":
        for extra in ("mscale", "mscale_all_dim"):
            if rope.get(extra):
                raise ConfigError(f"{path}: {key}.{extra}={rope[extra]!r} (DeepSeek-style YaRN) is not supported")
        if rope.get("truncate", True) is False:
            raise ConfigError(f"{path}: {key}.truncate=false (untruncated YaRN ramp) is not supported")
    fields: dict[str, Any] = {"type": kind, "original_max_position": max_len}
    for hf_key, field_name in _HF_ROPE_TYPES[kind].items():
        if rope.get(hf_key) is not None:
            fields[field_name] = rope[hf_key]
    if "factor" not in fields:
        raise CheckpointError(f"{path}: {key} of rope_type {kind!r} has no 'factor'")
    try:
        return RopeScaling(**fields)
    except ConfigError as e:
        raise ConfigError(f"{path}: {key}: {str(e).removeprefix('rope scaling: ')}") from None


class _SafetensorsTensors(contextlib.ExitStack):
    """Every tensor of a directory's safetensors files as a `checkpoint.TensorSource` (a context manager:
    the files stay open, memory-mapped, until exit)."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.path = directory
        self._files = _weight_files(directory)
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}

    def __enter__(self) -> _SafetensorsTensors:
        super().__enter__()
        try:
            for file in self._files:
                self._open(file)
        except CheckpointError:
            self.close()  # __exit__ does not run when __enter__ raises
            raise
        return self

    def _open(self, file: Path) -> None:
        try:
            handle = self.enter_context(safetensors.safe_open(str(file), framework="pt"))
        except (safetensors.SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: not a valid safetensors file (truncated or corrupted? {e})") from e
        self._handles[file] = handle
        for name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            if name in self._where:
                raise CheckpointError(f"{file}: tensor {name!r} is also in {self._where[name]}")
            self._where[name] = file

    def names(self) -> set[str]:
        return set(self._where)

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def read(self, name: str) -> torch.Tensor:
        file = self._where[name]
        kind = self._handles[file].get_slice(name).get_dtype()
        if kind not in _FLOAT_DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r} has dtype {kind}; expected one of {_FLOAT_DTYPES} "
                                  f"(quantized safetensors are not supported yet)")
        try:
            return self._handles[file].get_tensor(name)
        except safetensors.SafetensorError as e:
            raise CheckpointError(f"{file}: tensor {name!r} cannot be read ({e})") from e


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint: those the index names, else every *.safetensors."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no 'weight_map' object")
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: lists {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                                  f"not in {directory}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(f"{directory}: weights only as pickle files ({', '.join(pickles)}); ringlet never "
                              f"loads pickles (they can run code): convert them to safetensors")
    raise CheckpointError(f"{directory}: no *.safetensors weight files")


def read_json_object(path: Path, optional: bool = False) -> dict[str, Any]:
    """The JSON object in `path` ({} for a missing optional file); CheckpointError naming the file otherwise."""
    if optional and not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
