"""Attention over the paged KV cache, one object per layer, and the `--attention` pattern strings.

Each layer's `Attention` holds one pattern from `ringlet.kernels.patterns` (Dense, Local, Strided, BlockSparse) and
hands it, with the FP8 cache's scales when there are any, to the prefill and decode kernels.

Pattern strings (`parse_attention`), the same in the API (`LLM(attention=...)`) and the CLI (`--attention`):

    dense                           every earlier token
    local:W[,sink=N]                the previous W tokens (W >= 1), plus the first N tokens (attention sinks)
    strided:S,W[,sink=N]            the local window W plus every earlier key k with k % S == S - 1 (S >= 2),
                                    plus the first N tokens
    block:B,local=L,stride=V        B x B blocks, per head: the L latest key blocks plus every V-th block
                                    (`block` alone: block=16, local=4, stride=8)

followed by per-layer overrides, separated by `;`: `I=PATTERN` gives layer I (0-based; negative counts from the
end, -1 is the last layer) its own pattern. `local:256;0=dense;-1=dense` is local attention with dense first and
last layers.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import torch

from ringlet.kernels import decode_attention, prefill_attention
from ringlet.kernels.patterns import DENSE, BlockSparse, Dense, Local, Pattern, Strided

from .errors import ConfigError

_INT = r"\s*(-?\d+)\s*"
_OVERRIDE = re.compile(rf"^{_INT}=(.*)$", re.S)


def _int(text: str, what: str, piece: str, spec: str) -> int:
    if not re.fullmatch(_INT, text):
        raise ConfigError(f"attention {spec!r}: in {piece!r}, {what} {text.strip()!r} is not an integer")
    return int(text)


def _sink(values: list[str], piece: str, spec: str) -> tuple[list[str], dict[str, int]]:
    """Split an optional trailing `sink=N` off a pattern's comma-separated arguments."""
    if values and values[-1].strip().startswith("sink"):
        key, eq, value = values[-1].partition("=")
        if key.strip() != "sink" or not eq:
            raise ConfigError(f"attention {spec!r}: in {piece.strip()!r}, {values[-1].strip()!r} must be sink=N")
        return values[:-1], {"sink": _int(value, "sink", piece, spec)}
    return values, {}


def parse_pattern(piece: str, spec: str | None = None) -> Pattern:
    """One pattern (`dense`, `local:W[,sink=N]`, `strided:S,W[,sink=N]`, `block:B,local=L,stride=V`) -> its
    pattern object.

    Raises ConfigError naming `piece` (and the whole `spec` it came from) for anything that does not parse or that
    the pattern refuses (window < 1, stride < 2, sink < 0, a block size the kernels do not support).
    """
    spec = piece if spec is None else spec
    text = piece.strip()
    kind, colon, args = text.partition(":")
    kind = kind.strip()
    try:
        if kind == "dense" and not colon:
            return DENSE
        if kind == "local" and colon:
            values, sink = _sink(args.split(","), piece, spec)
            if len(values) != 1:
                raise ConfigError(f"attention {spec!r}: {piece.strip()!r} must be local:WINDOW[,sink=N]")
            return Local(window=_int(values[0], "window", piece, spec), **sink)
        if kind == "strided" and colon:
            values, sink = _sink(args.split(","), piece, spec)
            if len(values) != 2:
                raise ConfigError(f"attention {spec!r}: {piece.strip()!r} must be strided:STRIDE,WINDOW[,sink=N]")
            return Strided(stride=_int(values[0], "stride", piece, spec),
                           window=_int(values[1], "window", piece, spec), **sink)
        if kind == "block":
            fields: dict[str, int] = {}
            names = {"block": "block", "local": "local_blocks", "stride": "vert_stride"}
            for i, item in enumerate(args.split(",") if colon else []):
                key, eq, value = item.partition("=")
                if not eq and i == 0:
                    key, value = "block", key
                key = key.strip()
                if key not in names or names[key] in fields:
                    raise ConfigError(f"attention {spec!r}: in {piece.strip()!r}, {item.strip()!r} is not one of "
                                      "B (block size, first), local=L, stride=V (each at most once)")
                fields[names[key]] = _int(value, key, piece, spec)
            return BlockSparse(**fields)
    except ValueError as e:  # the pattern's own validation: names the field
        raise ConfigError(f"attention {spec!r}: {piece.strip()!r}: {e}") from None
    raise ConfigError(f"attention {spec!r}: {piece.strip()!r} is not a pattern; expected dense, local:W[,sink=N], "
                      "strided:S,W[,sink=N] or block:B,local=L,stride=V")


def _split_spec(spec: str) -> tuple[Pattern, list[tuple[int, str, Pattern]]]:
    """`BASE[;I=PATTERN]...` -> (the base pattern, [(I, the override's text, its pattern)]): every check that
    needs no layer count. Raises ConfigError naming the offending piece."""
    if not isinstance(spec, str):
        raise ConfigError(f"attention must be a pattern string such as 'local:256', got {spec!r}")
    base, *pieces = spec.split(";")
    if _OVERRIDE.match(base):
        raise ConfigError(f"attention {spec!r}: starts with a layer override {base.strip()!r}; "
                          "put the pattern for all layers first, e.g. local:256;0=dense")
    overrides = []
    for piece in pieces:
        m = _OVERRIDE.match(piece)
        if m is None:
            raise ConfigError(f"attention {spec!r}: override {piece.strip()!r} is not LAYER=PATTERN "
                              "(e.g. 0=dense or -1=dense)")
        overrides.append((int(m.group(1)), piece.strip(), parse_pattern(m.group(2), spec)))
    return parse_pattern(base, spec), overrides


def check_attention_spec(spec: str) -> None:
    """Refuse (ConfigError) what `parse_attention` would refuse for any model: everything but layer indices out of
    range and layers given two overrides, which need the model's layer count. Lets a bad string fail before a
    model is loaded."""
    _split_spec(spec)


def parse_attention(spec: str, n_layers: int) -> list[Pattern]:
    """`BASE[;I=PATTERN]...` -> one pattern per layer (see the module docstring for the syntax).

    Raises ConfigError naming the offending piece: an unparsable pattern, a bad value, a layer index outside
    [-n_layers, n_layers), or a layer given two overrides.
    """
    base, overrides = _split_spec(spec)
    patterns = [base] * n_layers
    seen: dict[int, str] = {}
    for index, piece, pattern in overrides:
        if not -n_layers <= index < n_layers:
            raise ConfigError(f"attention {spec!r}: layer {index} in {piece!r} is out of range for a model "
                              f"of {n_layers} layers (use 0..{n_layers - 1}, or -1..-{n_layers} from the end)")
        layer = index % n_layers
        if layer in seen:
            raise ConfigError(f"attention {spec!r}: {piece!r} and {seen[layer]!r} both set layer {layer}")
        seen[layer] = piece
        patterns[layer] = pattern
    return patterns


def pattern_spec(pattern: Pattern) -> str:
    """The string `parse_pattern` reads back into `pattern`."""
    if isinstance(pattern, Dense):
        return "dense"
    sink = f",sink={pattern.sink}" if getattr(pattern, "sink", 0) else ""
    if isinstance(pattern, Local):
        return f"local:{pattern.window}{sink}"
    if isinstance(pattern, Strided):
        return f"strided:{pattern.stride},{pattern.window}{sink}"
    if isinstance(pattern, BlockSparse):
        return f"block:{pattern.block},local={pattern.local_blocks},stride={pattern.vert_stride}"
    raise TypeError(f"not an attention pattern: {pattern!r}")


def format_attention(patterns: list[Pattern]) -> str:
    """The shortest `parse_attention` string for these per-layer patterns: the commonest one, then overrides."""
    base = Counter(patterns).most_common(1)[0][0]
    return ";".join([pattern_spec(base)] + [f"{i}={pattern_spec(p)}" for i, p in enumerate(patterns) if p != base])


@dataclass
class AttentionMetadata:
    """Where each sequence's queries and keys are, for one forward pass. All tensors int32 on the model's device.

    block_tables [B, max_pages]: page ids of each sequence. seq_lens [B]: tokens in the cache for each sequence,
    this step's included. For prefill also q_start [B], q_lens [B] (rows of each sequence in the packed batch)
    and max_q_len (host int). For decode every sequence has exactly one query row.
    """

    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    is_decode: bool
    q_start: torch.Tensor | None = None
    q_lens: torch.Tensor | None = None
    max_q_len: int = 1


class Attention:
    """Causal attention of one layer under its pattern (dense, local, strided or block-sparse)."""

    def __init__(self, head_dim: int, pattern: Pattern = DENSE):
        self.pattern = pattern
        self.scale = head_dim ** -0.5

    @property
    def name(self) -> str:
        return pattern_spec(self.pattern)

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                 k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
        """q [T, Hq, Dh] -> out [T, Hq, Dh]; this step's keys and values are already in the cache.

        k_scale, v_scale [num_pages, Hk, page_size] float16: the dequantization scales of an FP8 cache, else None.
        """
        if meta.is_decode:
            return decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, self.scale,
                                    pattern=self.pattern, k_scale=k_scale, v_scale=v_scale)
        return prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.q_start, meta.q_lens,
                                 meta.seq_lens, self.scale, meta.max_q_len, pattern=self.pattern,
                                 k_scale=k_scale, v_scale=v_scale)
