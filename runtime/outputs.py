"""What the engine hands back: per-step deltas while streaming, whole completions at the end."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """Log-probability of a generated token and of the `top` most likely tokens at that step (id -> logprob)."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


@dataclass
class StreamChunk:
    """New output of one request from one engine step.

    `text` is only the newly completed text (never a partial UTF-8 character, never a possible start of a stop
    string); `finish_reason` is None until the last chunk, then "stop", "length" or "abort".
    """

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class CompletionOutput:
    """A finished request: the prompt's token ids, the generated text and ids, and timings in seconds."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
    time_to_first_token: float = 0.0
    total_time: float = 0.0
    num_preemptions: int = 0
