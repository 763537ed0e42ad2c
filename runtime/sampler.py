"""Turning logits into tokens: greedy, temperature, top-k, top-p, per-request seeds, logprobs."""
from __future__ import annotations

import torch

from .outputs import TokenLogprob
from .sampling_params import SamplingParams


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                  default_generator: torch.Generator) -> torch.Tensor:
    """Pick one token per row, on the logits' device, without waiting for it.

    logits [B, vocab] float32; params and generators have B entries (a request's own generator when it has a
    seed, else None to use `default_generator`). Returns token ids [B] int64 on the logits' device.
    """
    tokens = torch.argmax(logits, dim=-1)
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    for i in sampled_rows:
        p = params[i]
        probs = _filtered_probs(logits[i] / p.temperature, p.top_k, p.top_p)
        gen = generators[i] if generators[i] is not None else default_generator
        tokens[i] = torch.multinomial(probs, 1, generator=gen)[0]
    return tokens


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, token_list: list[int],
                   params: list[SamplingParams]) -> list[TokenLogprob | None]:
    """For rows whose params ask for logprobs (else None): the chosen token's log-probability under the model
    (before temperature and filters) and the top-n. logits [B, vocab] float32; tokens [B] int64 on the logits'
    device, token_list the same ids on the host."""
    want = [i for i, p in enumerate(params) if p.logprobs is not None]
    logprobs: list[TokenLogprob | None] = [None] * len(params)
    if want:
        lp = torch.log_softmax(logits[want], dim=-1)
        n_top = max(params[i].logprobs for i in want)
        top_v, top_i = lp.topk(max(n_top, 1), dim=-1) if n_top else (None, None)
        chosen = lp.gather(1, tokens[want].unsqueeze(1)).squeeze(1).tolist()
        for row, i in enumerate(want):
            n = params[i].logprobs
            top = dict(zip(top_i[row, :n].tolist(), top_v[row, :n].tolist())) if n else {}
            logprobs[i] = TokenLogprob(token_list[i], chosen[row], top)
    return logprobs


def _filtered_probs(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Softmax of one row [vocab] after keeping the top_k largest and the smallest set with mass >= top_p."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # Drop a token when the mass before it already reaches top_p; the most likely token always stays.
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return probs


class TokenReadback:
    """Sampled token ids copied to the host without stalling the stream: `start` queues the copy (into pinned
    memory on a GPU, with an event after it), `wait` blocks until it has landed. Work queued after `start` (the
    next step's forward) does not delay `wait`, as `tokens.tolist()` would."""

    def __init__(self, max_rows: int, device: torch.device):
        cuda = device.type == "cuda"
        self._host = torch.empty(max_rows, dtype=torch.int64, pin_memory=cuda)
        self._event = torch.cuda.Event() if cuda else None
        self._n = 0

    def start(self, tokens: torch.Tensor) -> None:
        """Queue the copy of tokens [n <= max_rows] int64 (on the engine's device)."""
        self._n = len(tokens)
        self._host[:self._n].copy_(tokens, non_blocking=self._event is not None)
        if self._event is not None:
            self._event.record()

    def wait(self) -> list[int]:
        """The token ids of the last `start`."""
        if self._event is not None:
            self._event.synchronize()
        return self._host[:self._n].tolist()
