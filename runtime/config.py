"""Model configuration for the Llama family: one dataclass plus a table of named shapes."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from .errors import ConfigError

ROPE_SCALING_TYPES = ("linear", "ntk", "yarn", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """How RoPE is stretched past the context a model was trained for (`kernels.rope.rope_cos_sin` builds the table).

    type: "linear" (position interpolation: every frequency divided by `factor`), "ntk" (NTK-aware, static:
    theta multiplied by factor ** (d / (d - 2)), so the lowest frequency is interpolated by `factor` and the
    highest kept), "yarn" (YaRN, Peng et al. 2023: NTK-by-parts between `beta_fast` and `beta_slow` rotations over
    the original context, plus an attention temperature folded into cos/sin), "llama3" (Llama 3.1's frequency
    bands, read from checkpoints). `factor` >= 1; `original_max_position` is the trained context the factor
    stretches, so the usable context becomes factor x original_max_position.
    """

    type: str
    factor: float
    original_max_position: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None  # yarn's cos/sin multiplier; None: 0.1 * ln(factor) + 1
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only

    def __post_init__(self) -> None:
        if self.type not in ROPE_SCALING_TYPES:
            raise ConfigError(f"rope scaling: type {self.type!r} is not one of {', '.join(ROPE_SCALING_TYPES)}")
        for name in ("factor", "beta_fast", "beta_slow", "low_freq_factor", "high_freq_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"rope scaling: {name} must be a number, got {value!r}")
        if self.factor < 1:
            raise ConfigError(f"rope scaling: factor must be >= 1, got {self.factor!r}")
        if isinstance(self.original_max_position, bool) or not isinstance(self.original_max_position, int) \
                or self.original_max_position < 1:
            raise ConfigError(f"rope scaling: original_max_position must be a positive integer, "
                              f"got {self.original_max_position!r}")
        if not self.beta_fast > self.beta_slow > 0:
            raise ConfigError(f"rope scaling: need beta_fast > beta_slow > 0, got beta_fast={self.beta_fast!r}, "
                              f"beta_slow={self.beta_slow!r}")
        if not self.high_freq_factor > self.low_freq_factor > 0:
            raise ConfigError(f"rope scaling: need high_freq_factor > low_freq_factor > 0, got "
                              f"{self.high_freq_factor!r} and {self.low_freq_factor!r}")
        if self.attention_factor is not None and not self.attention_factor > 0:
            raise ConfigError(f"rope scaling: attention_factor must be > 0, got {self.attention_factor!r}")

    @property
    def max_context(self) -> int:
        """The context this scaling is meant to reach: factor x original_max_position."""
        return int(self.factor * self.original_max_position)

    def spec(self) -> str:
        """The short form `parse_rope_scaling` reads, e.g. "yarn:4" (defaults left out)."""
        return f"{self.type}:{self.factor:g}"


# Keys of `TYPE:FACTOR,key=value` accepted by parse_rope_scaling, and the RopeScaling field each one sets.
_ROPE_KEYS = {"original": ("original_max_position", int), "beta_fast": ("beta_fast", float),
              "beta_slow": ("beta_slow", float), "attention_factor": ("attention_factor", float),
              "low_freq_factor": ("low_freq_factor", float), "high_freq_factor": ("high_freq_factor", float)}


def parse_rope_scaling(spec: str, trained_context: int) -> RopeScaling | None:
    """`none` -> None; `TYPE:FACTOR[,original=N][,beta_fast=X][,beta_slow=Y][,attention_factor=A]` -> RopeScaling.

    TYPE is linear, ntk, yarn (or llama3); `original` (the trained context the factor stretches) defaults to
    `trained_context`. Raises ConfigError naming the piece that does not parse.
    """
    if not isinstance(spec, str):
        raise ConfigError(f"rope scaling must be a string such as 'yarn:4', got {spec!r}")
    text = spec.strip()
    if text.lower() == "none":
        return None
    kind, colon, rest = text.partition(":")
    kind = kind.strip().lower()
    if kind not in ROPE_SCALING_TYPES or not colon:
        raise ConfigError(f"rope scaling {spec!r}: expected TYPE:FACTOR with TYPE one of "
                          f"{', '.join(ROPE_SCALING_TYPES)} (e.g. yarn:4), or none")
    factor_text, *options = [piece.strip() for piece in rest.split(",")]
    fields: dict = {"type": kind, "original_max_position": trained_context}
    try:
        fields["factor"] = float(factor_text)
    except ValueError:
        raise ConfigError(f"rope scaling {spec!r}: factor {factor_text!r} is not a number") from None
    for piece in options:
        key, eq, value = piece.partition("=")
        key = key.strip()
        if not eq or key not in _ROPE_KEYS:
            raise ConfigError(f"rope scaling {spec!r}: option {piece!r} is not KEY=VALUE with KEY one of "
                              f"{', '.join(_ROPE_KEYS)}")
        name, kind_of = _ROPE_KEYS[key]
        try:
            fields[name] = kind_of(value.strip())
        except ValueError:
            raise ConfigError(f"rope scaling {spec!r}: {key}={value.strip()!r} is not "
                              f"{'an integer' if kind_of is int else 'a number'}") from None
    try:
        return RopeScaling(**fields)
    except ConfigError as e:
        raise ConfigError(f"rope scaling {spec!r}: {str(e).removeprefix('rope scaling: ')}") from None


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of a Llama-style decoder (RMSNorm, RoPE, GQA, SwiGLU).

    `head_dim` defaults to dim // n_heads. `max_seq_len` is the longest context the model was trained for;
    `rope_scaling` (None: plain RoPE) stretches the positions so that `max_context` can exceed it.
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: int = 0
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    name: str = "llama"
    rope_scaling: RopeScaling | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.head_dim == 0 and self.n_heads > 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first field that cannot work."""
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "head_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads != 0:
            raise ConfigError(
                f"model config: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2 != 0:
            raise ConfigError(f"model config: head_dim={self.head_dim} must be even for RoPE")
        if not self.rms_eps > 0:
            raise ConfigError(f"model config: rms_eps must be > 0, got {self.rms_eps!r}")
        if not self.rope_theta > 0:
            raise ConfigError(f"model config: rope_theta must be > 0, got {self.rope_theta!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ConfigError(f"model config: rope_scaling must be a RopeScaling or None, got {self.rope_scaling!r}")

    @property
    def max_context(self) -> int:
        """The longest context RoPE allows: max_seq_len, or factor x the original context under rope scaling."""
        if self.rope_scaling is None:
            return self.max_seq_len
        return max(self.max_seq_len, self.rope_scaling.max_context)

    def with_rope_scaling(self, scaling: RopeScaling | None) -> "ModelConfig":
        """This config with its RoPE scaling replaced. A checkpoint that was already scaled goes back to its
        original (trained) context first, so the new factor stretches what the model was trained on."""
        trained = self.rope_scaling.original_max_position if self.rope_scaling is not None else self.max_seq_len
        return replace(self, max_seq_len=trained, rope_scaling=scaling)

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    def num_parameters(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        per_layer = (self.dim * (self.q_size + 2 * self.kv_size) + self.q_size * self.dim
                     + 3 * self.dim * self.ffn_dim + 2 * self.dim)
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + self.n_layers * per_layer + self.dim + head

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        """A config from the table below, e.g. `ModelConfig.from_name("llama-7b")`."""
        if name not in NAMED_CONFIGS:
            raise ConfigError(f"unknown model shape {name!r}; known: {', '.join(sorted(NAMED_CONFIGS))}")
        return replace(NAMED_CONFIGS[name], **overrides)


NAMED_CONFIGS: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
                                rms_eps=1e-5, rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True,
                                name="smollm2-135m"),
    "llama-7b": ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008,
                            max_seq_len=4096, name="llama-7b"),
    "llama-13b": ModelConfig(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824,
                             max_seq_len=4096, name="llama-13b"),
}
