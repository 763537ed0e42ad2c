"""Builds each step's input tensors from scheduled sequences and runs the model on them."""
from __future__ import annotations

from typing import Callable

import torch

from .attention import AttentionMetadata
from .cuda_graphs import DecodeGraphs
from .kv_cache import KVCache
from .model import Llama
from .sequence import Sequence


class ModelRunner:
    """Runs prefill chunks eagerly and decode batches eagerly or through CUDA graphs (one per batch bucket)."""

    def __init__(self, model: Llama, kv: KVCache, max_model_len: int, max_num_seqs: int, cuda_graphs: bool):
        self.model, self.kv = model, kv
        # Called with each forward's plan before it runs (tensor parallel: the leader broadcasts it).
        self.on_plan: Callable[[dict], None] | None = None
        self._device_tokens: torch.Tensor | None = None  # decode's `tokens` until `run` takes them
        self.device = model.device
        self.max_pages = kv.pages_needed(max_model_len)
        self.graphs = DecodeGraphs(self._decode_forward, max_num_seqs, self.max_pages, self.device) \
            if cuda_graphs else None

    def _tensor(self, data, dtype) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype).to(self.device, non_blocking=True)

    def _slots(self, pages: list[int], start: int, n: int) -> list[int]:
        ps = self.kv.page_size
        return [pages[p // ps] * ps + p % ps for p in range(start, start + n)]

    def prefill(self, chunks: list[tuple[Sequence, int]], all_logits: bool = False) -> torch.Tensor:
        """Compute `n` more prompt tokens of each sequence (its pages already hold room for them).

        Returns float32 logits [len(chunks), vocab] at each chunk's last token, or [sum(n), vocab] when all_logits.
        """
        plan = self.prefill_plan(chunks, all_logits)
        if self.on_plan is not None:
            self.on_plan(plan)
        return self.run(plan)

    def decode(self, seqs: list[Sequence], tokens: torch.Tensor | None = None) -> torch.Tensor:
        """One token for each sequence: the last one it sampled, or tokens [len(seqs)] int64 on the device when
        given (sampled by a step the host has not read back yet). Returns float32 logits [len(seqs), vocab]."""
        plan = self.decode_plan(seqs, tokens_on_device=tokens is not None)
        self._device_tokens = tokens
        if self.on_plan is not None:
            self.on_plan(plan)
        return self.run(plan)

    # A plan is one forward's inputs as plain lists (msgpack-ready): what a tensor-parallel leader sends its
    # workers, which replay it with `run` on their own shard and KV cache. A decode plan's tokens are None when
    # they are on the leader's device (`decode`'s tokens): `run` then shares them over the group first.

    def prefill_plan(self, chunks: list[tuple[Sequence, int]], all_logits: bool = False) -> dict:
        tokens, positions, slots, q_start, q_lens, seq_lens = [], [], [], [], [], []
        for seq, n in chunks:
            start = seq.num_computed
            q_start.append(len(tokens))
            q_lens.append(n)
            seq_lens.append(start + n)
            tokens += seq.token_ids[start:start + n]
            positions += range(start, start + n)
            slots += self._slots(seq.pages, start, n)
        width = max(len(s.pages) for s, _ in chunks)
        return {"op": "prefill", "tokens": tokens, "positions": list(positions), "slots": slots,
                "pages": [s.pages + [0] * (width - len(s.pages)) for s, _ in chunks], "seq_lens": seq_lens,
                "q_start": q_start, "q_lens": q_lens,
                "last": None if all_logits else [s + n - 1 for s, n in zip(q_start, q_lens)]}

    def decode_plan(self, seqs: list[Sequence], tokens_on_device: bool = False) -> dict:
        return {"op": "decode", "tokens": None if tokens_on_device else [s.token_ids[-1] for s in seqs],
                "positions": [s.num_computed for s in seqs],
                "slots": [self._slots(s.pages, s.num_computed, 1)[0] for s in seqs],
                "pages": [list(s.pages) for s in seqs], "seq_lens": [s.num_computed + 1 for s in seqs]}

    def run(self, plan: dict) -> torch.Tensor:
        """Run the forward a plan describes; float32 logits as `prefill` / `decode` return them."""
        if plan["op"] == "decode":
            n = len(plan["positions"])
            tokens = plan["tokens"] if plan["tokens"] is not None else self._shared_tokens(n)
            if self.graphs is not None and n <= self.graphs.max_batch:
                return self.graphs.run(tokens, plan["positions"], plan["slots"], plan["pages"], plan["seq_lens"])
            rows = [p + [0] * (self.max_pages - len(p)) for p in plan["pages"]]
            if isinstance(tokens, list):
                tokens = self._tensor(tokens, torch.int64)
            return self._decode_forward(tokens,
                                        self._tensor(plan["positions"], torch.int32),
                                        self._tensor(plan["slots"], torch.int64), self._tensor(rows, torch.int32),
                                        self._tensor(plan["seq_lens"], torch.int32))
        meta = AttentionMetadata(self._tensor(plan["pages"], torch.int32), self._tensor(plan["seq_lens"], torch.int32),
                                 is_decode=False, q_start=self._tensor(plan["q_start"], torch.int32),
                                 q_lens=self._tensor(plan["q_lens"], torch.int32), max_q_len=max(plan["q_lens"]))
        last = None if plan["last"] is None else self._tensor(plan["last"], torch.int64)
        return self.model.forward(self._tensor(plan["tokens"], torch.int64),
                                  self._tensor(plan["positions"], torch.int32),
                                  self._tensor(plan["slots"], torch.int64), meta, self.kv, last)

    def _shared_tokens(self, n: int) -> torch.Tensor:
        """A decode plan's device tokens [n] int64 on this rank: `decode`'s own on a single rank; under tensor
        parallelism the leader's, summed with the workers' zeros over the group (in float32, exact for token ids
        below 2^24, which Engine checks before it sends such a plan)."""
        tokens, self._device_tokens = self._device_tokens, None
        comm = self.model.comm
        if comm is None:
            return tokens
        mine = tokens.to(torch.float32) if tokens is not None else torch.zeros(n, dtype=torch.float32,
                                                                                 device=self.device)
        return comm.all_reduce(mine).to(torch.int64)

    def _decode_forward(self, tokens, positions, slots, block_tables, seq_lens) -> torch.Tensor:
        meta = AttentionMetadata(block_tables, seq_lens, is_decode=True)
        return self.model.forward(tokens, positions, slots, meta, self.kv)
