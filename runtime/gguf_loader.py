"""GGUF files (llama.cpp's format) -> Checkpoint.

Metadata gives the config (`{arch}.*` keys) and the tokenizer (`tokenizer.ggml.*`); tensors are dequantized on
load with the `gguf` package (Q4_0/Q4_1/Q5_x/Q8_0, K-quants, F16, BF16, F32). GGUF lists dimensions innermost
first (ne0 = row length); shapes here are reversed to torch order. llama.cpp's converter permutes the rows of
attn_q/attn_k for interleaved-pair RoPE; `unpermute_rope_rows` restores the HF rotate-half layout.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from .checkpoint import Checkpoint, collect_weights
from .config import ModelConfig, RopeScaling
from .errors import CheckpointError, ConfigError
from .tokenizer import Tokenizer

SUPPORTED_ARCHITECTURES = ("llama",)

# ringlet name (per layer, after "layers.{i}.") -> GGUF name (after "blk.{i}.").
_LAYER_NAMES = {
    "attention_norm.weight": "attn_norm.weight",
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
}
_GLOBAL_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                 "output.weight": "output.weight"}

# What a truncated or corrupted file makes GGUFReader raise: it parses with numpy views of a memory map, so a
# short file shows up as a failed reshape (ValueError), an index past the end (IndexError), a huge count
# (OverflowError/MemoryError), an unknown enum value (ValueError/KeyError), or bad UTF-8 (UnicodeDecodeError).
_PARSE_ERRORS = (ValueError, IndexError, KeyError, TypeError, OverflowError, MemoryError, struct.error, OSError)


def gguf_name(name: str) -> str:
    """The GGUF tensor name of a ringlet weight name."""
    if name.startswith("layers."):
        _, index, rest = name.split(".", 2)
        return f"blk.{index}.{_LAYER_NAMES[rest]}"
    return _GLOBAL_NAMES[name]


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: [n_heads*head_dim, dim] interleaved-pair rows -> rotate-half rows.

    The converter wrote `w.reshape(n_heads, 2, head_dim//2, dim).swapaxes(1, 2)`: within each head, row 2j came
    from row j and row 2j+1 from row j + head_dim/2. Reading back pairs them up again.
    """
    rows, dim = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, dim).swapaxes(1, 2).reshape(rows, dim)


class _Reader(gguf.GGUFReader):
    """GGUFReader that parses through a plain ndarray view of its memory map.

    The reader slices its map about a million times for a 49k-token vocabulary, and numpy's memmap subclass
    costs microseconds per slice (2.4 s -> 0.7 s to open the bundled model). The view shares the map's buffer
    and keeps it alive. Should gguf stop assigning `self.data`, this is merely not used.
    """

    @property
    def data(self) -> np.ndarray:
        return self._plain_data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._plain_data = value.view(np.ndarray)


def open_gguf(path: Path) -> gguf.GGUFReader:
    """GGUFReader over `path` (memory-mapped); CheckpointError when the file does not parse."""
    try:
        return _Reader(path)
    except _PARSE_ERRORS as e:
        raise CheckpointError(f"{path}: not a valid GGUF file (truncated or corrupted? {type(e).__name__}: {e})") from e


class _GGUFTensors:
    """The tensors of one GGUF file as a `checkpoint.TensorSource`."""

    def __init__(self, path: Path, reader: gguf.GGUFReader, config: ModelConfig) -> None:
        self.path = path
        self.config = config
        self.tensors = {t.name: t for t in reader.tensors}

    def names(self) -> set[str]:
        return set(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))

    def file_of(self, name: str) -> Path:
        return self.path

    def read(self, name: str) -> torch.Tensor:
        t = self.tensors[name]
        try:
            # Garbage blocks may overflow; the caller rejects non-finite results with the tensor's name.
            with np.errstate(all="ignore"):
                values = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise CheckpointError(f"{self.path}: tensor {name!r} has type {t.tensor_type.name}, which ringlet "
                                  f"cannot dequantize ({e})") from e
        except _PARSE_ERRORS as e:
            raise CheckpointError(f"{self.path}: tensor {name!r} ({t.tensor_type.name}) is corrupted "
                                  f"({type(e).__name__}: {e})") from e
        values = values.reshape(self.shape(name))
        if name.endswith(".attn_q.weight"):
            values = unpermute_rope_rows(values, self.config.n_heads)
        elif name.endswith(".attn_k.weight"):
            values = unpermute_rope_rows(values, self.config.n_kv_heads)
        # F32 tensors come back as read-only views of the file's memory map: copy those out (only those).
        return torch.from_numpy(np.require(values, np.float32, ["C_CONTIGUOUS", "WRITEABLE"]))


def load_gguf(path: Path, dtype: torch.dtype = torch.float32) -> Checkpoint:
    """Load a GGUF file (see module docstring). Weights are CPU tensors in `dtype`."""
    reader = open_gguf(path)
    try:
        fields = {key: field.contents() for key, field in reader.fields.items()}
    except _PARSE_ERRORS as e:
        raise CheckpointError(f"{path}: not a valid GGUF file (metadata: {type(e).__name__}: {e})") from e
    config = config_from_gguf(fields, path, {t.name for t in reader.tensors})
    tokenizer = Tokenizer.from_gguf(fields, source=str(path))
    weights = collect_weights(config, _GGUFTensors(path, reader, config), gguf_name, dtype)
    return Checkpoint(config=config, weights=weights, tokenizer=tokenizer, source=str(path))


def config_from_gguf(fields: dict[str, Any], path: Path, tensor_names: set[str]) -> ModelConfig:
    """ModelConfig from GGUF metadata values (key -> Python value). tie_embeddings: no `output.weight`."""
    arch = fields.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} (general.architecture) is not supported; "
                              f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")

    def number(key: str, default: Any = None, kind: type = int) -> Any:
        full = f"{arch}.{key}"
        value = fields.get(full, default)
        if value is None:
            raise CheckpointError(f"{path}: GGUF metadata has no {full!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            raise CheckpointError(f"{path}: GGUF metadata {full}={value!r} is not a single {kind.__name__}")
        if kind is float and float(np.float32(value)) == value:
            # Stored as float32: take the shortest decimal that rounds to it (1e-05, not 9.999999747378752e-06).
            return float(str(np.float32(value)))
        return kind(value)

    if number("expert_count", 0) > 0:
        raise ConfigError(f"{path}: {arch}.expert_count={fields[f'{arch}.expert_count']} (mixture of experts) "
                          f"is not supported")
    if "rope_freqs.weight" in tensor_names:
        raise ConfigError(f"{path}: tensor 'rope_freqs.weight' (llama3-style rope scaling) is not supported yet")

    dim = number("embedding_length")
    n_heads = number("attention.head_count")
    head_dim = number("attention.key_length", dim // n_heads if n_heads else 0)
    if number("attention.value_length", head_dim) != head_dim:
        raise ConfigError(f"{path}: {arch}.attention.value_length differs from key_length={head_dim}")
    if number("rope.dimension_count", head_dim) != head_dim:
        raise ConfigError(f"{path}: {arch}.rope.dimension_count={fields[f'{arch}.rope.dimension_count']} "
                          f"(partial rotary) differs from head_dim={head_dim}; not supported")
    context = number("context_length")
    rope_scaling = None
    scaling = fields.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling not in ("linear", "yarn"):
            raise ConfigError(f"{path}: {arch}.rope.scaling.type={scaling!r} is not supported; supported: "
                              f"none, linear, yarn")
        try:
            rope_scaling = RopeScaling(type=scaling, factor=number("rope.scaling.factor", kind=float),
                                       original_max_position=number("rope.scaling.original_context_length",
                                                                    context))
        except ConfigError as e:
            raise ConfigError(f"{path}: {arch}.rope.scaling: {str(e).removeprefix('rope scaling: ')}") from None
    tokens = fields.get("tokenizer.ggml.tokens")
    vocab = number("vocab_size", len(tokens) if isinstance(tokens, list) else None)
    try:
        return ModelConfig(
            vocab_size=vocab, dim=dim, n_layers=number("block_count"), n_heads=n_heads,
            n_kv_heads=number("attention.head_count_kv", n_heads), ffn_dim=number("feed_forward_length"),
            head_dim=head_dim, rms_eps=number("attention.layer_norm_rms_epsilon", kind=float),
            rope_theta=number("rope.freq_base", 10000.0, kind=float),
            max_seq_len=context, rope_scaling=rope_scaling,
            tie_embeddings="output.weight" not in tensor_names,
            name=str(fields.get("general.name") or arch),
            extra={"format": "gguf", "architecture": arch, "file_type": fields.get("general.file_type")},
        )
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
