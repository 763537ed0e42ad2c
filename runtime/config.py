"""Model configuration for the Llama family: one dataclass plus a table of named shapes."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of a Llama-style decoder (RMSNorm, RoPE, GQA, SwiGLU).

    `head_dim` defaults to dim // n_heads. `max_seq_len` is the longest context the model was trained for.
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
