"""One request's state inside the engine: its tokens, its pages, and what it has streamed so far."""
from __future__ import annotations

import time

import torch

from .outputs import CompletionOutput, StreamChunk, TokenLogprob
from .sampling_params import SamplingParams
from .tokenizer import DetokenizeStream, Tokenizer


class Sequence:
    """A request being generated.

    `token_ids` is prompt + output. `num_computed` counts the leading tokens whose K/V sit in the cache;
    `pages` are this sequence's cache pages in order. A sequence is decoding when exactly one token (the last
    sampled one) is not yet computed.
    """

    def __init__(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams,
                 arrival: int, tokenizer: Tokenizer | None, max_model_len: int, device: torch.device):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.arrival = arrival
        self.max_model_len = max_model_len
        self.token_ids = list(prompt_ids)
        self.num_computed = 0
        self.pages: list[int] = []
        self.num_preemptions = 0
        self.finish_reason: str | None = None
        self.text = ""
        self._emitted = 0
        self._new_ids: list[int] = []
        self._new_logprobs: list[TokenLogprob] = []
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        # A tokenizer-free engine (random-weight benchmarks) streams token ids only.
        self._detok = DetokenizeStream(tokenizer) if tokenizer is not None else None
        self._stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos and tokenizer is not None:
            self._stop_ids |= set(tokenizer.eos_ids)
        self._holdback = max((len(s) for s in params.stop), default=1) - 1
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)
        self.arrival_time = time.perf_counter()
        self.first_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids):]

    @property
    def is_decoding(self) -> bool:
        return self.num_tokens - self.num_computed == 1

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append_token(self, token_id: int, logprob: TokenLogprob | None) -> None:
        """Record a sampled token and decide whether the request is done."""
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        self.token_ids.append(token_id)
        self._new_ids.append(token_id)
        if logprob is not None and self.logprobs is not None:
            self.logprobs.append(logprob)
            self._new_logprobs.append(logprob)
        if token_id in self._stop_ids:
            self._finish("stop")
            return
        self._add_text(self._detok.push(token_id) if self._detok is not None else "")
        if not self.finished and (self.num_tokens - len(self.prompt_ids) >= self.params.max_tokens
                                  or self.num_tokens >= self.max_model_len):
            self._finish("length")

    def _add_text(self, new: str) -> None:
        """Append decoded text, ending the request at the first stop string (which is cut off)."""
        before = len(self.text)
        self.text += new
        if self.params.stop and new:
            start = max(0, before - self._holdback)
            hits = [i for i in (self.text.find(s, start) for s in self.params.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.finish_reason = "stop"

    def _finish(self, reason: str) -> None:
        # Text the detokenizer still holds (an unfinished multi-byte character) is released at the end.
        if self._detok is not None:
            self._add_text(self._detok.flush())
        if self.finish_reason is None:
            self.finish_reason = reason

    def abort(self) -> None:
        self.finish_reason = "abort"

    def take_chunk(self) -> StreamChunk | None:
        """The text and tokens produced since the last call, or None if there is nothing new to report.

        While running, the last characters that could begin a stop string are held back.
        """
        end = len(self.text) if self.finished else max(self._emitted, len(self.text) - self._holdback)
        if end == self._emitted and not self._new_ids and not self.finished:
            return None
        chunk = StreamChunk(self.request_id, self.text[self._emitted:end], self._new_ids,
                            self._new_logprobs if self.logprobs is not None else None, self.finish_reason)
        self._emitted = end
        self._new_ids, self._new_logprobs = [], []
        return chunk

    def to_output(self) -> CompletionOutput:
        now = time.perf_counter()
        ttft = (self.first_token_time or now) - self.arrival_time
        return CompletionOutput(self.request_id, self.prompt, self.prompt_ids, self.text, self.output_ids,
                                self.finish_reason or "abort", self.logprobs, ttft, now - self.arrival_time,
                                self.num_preemptions)
