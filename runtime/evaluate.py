"""Quality measurements: perplexity over a text file in non-overlapping windows."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .engine import Engine
from .errors import RequestError


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float
    tokens_scored: int
    windows: int
    context: int

    def to_dict(self) -> dict:
        return asdict(self)


def perplexity(engine: Engine, text: str, context: int, max_tokens: int | None = None) -> PerplexityResult:
    """Tokenize `text`, keep the first `max_tokens` tokens, cut them into non-overlapping windows of `context`
    tokens (a shorter last window of at least 2 tokens is kept) and score every token but each window's first."""
    if context < 2:
        raise RequestError(f"context must be >= 2 tokens, got {context}")
    if context > engine.max_model_len:
        raise RequestError(f"context {context} exceeds the engine's context length {engine.max_model_len}")
    ids = engine.tokenizer.encode(text)
    if max_tokens is not None:
        if max_tokens < 2:
            raise RequestError(f"max_tokens must be >= 2, got {max_tokens}")
        ids = ids[:max_tokens]
    windows = [ids[i:i + context] for i in range(0, len(ids), context)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise RequestError("text is too short to score: it has fewer than 2 tokens")
    total, count = 0.0, 0
    for window in windows:
        logprobs = engine.score(window)
        total -= float(logprobs.double().sum())
        count += logprobs.numel()
    mean = total / count
    return PerplexityResult(math.exp(mean), mean, count, len(windows), context)
