"""Builds each step's input tensors from scheduled sequences and runs the model on them."""
from __future__ import annotations

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
        self.device = model.device
        self.max_pages = kv.pages_needed(max_model_len)
        self.graphs = DecodeGraphs(self._decode_forward, max_num_seqs, self.max_pages, self.device) \
            if cuda_graphs else None

    def _tensor(self, data, dtype) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype).to(self.device, non_blocking=True)

    def _slots(self, pages: list[int], start: int, n: int) -> list[int]:
        ps = self.kv.page_size
        return [pages[p // ps] * ps + p % ps for p in range(start, start + n)]

    def _block_table(self, seqs: list[Sequence], width: int) -> torch.Tensor:
        rows = [s.pages + [0] * (width - len(s.pages)) for s in seqs]
        return self._tensor(rows, torch.int32)

    def prefill(self, chunks: list[tuple[Sequence, int]], all_logits: bool = False) -> torch.Tensor:
        """Compute `n` more prompt tokens of each sequence (its pages already hold room for them).

        Returns float32 logits [len(chunks), vocab] at each chunk's last token, or [sum(n), vocab] when all_logits.
        """
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
        meta = AttentionMetadata(self._block_table([s for s, _ in chunks], width), self._tensor(seq_lens, torch.int32),
                                 is_decode=False, q_start=self._tensor(q_start, torch.int32),
                                 q_lens=self._tensor(q_lens, torch.int32), max_q_len=max(q_lens))
        last = None if all_logits else self._tensor([s + n - 1 for s, n in zip(q_start, q_lens)], torch.int64)
        return self.model.forward(self._tensor(tokens, torch.int64), self._tensor(positions, torch.int32),
                                  self._tensor(slots, torch.int64), meta, self.kv, last)

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token for each sequence (the last one it sampled). Returns float32 logits [len(seqs), vocab]."""
        tokens = [s.token_ids[-1] for s in seqs]
        positions = [s.num_computed for s in seqs]
        slots = [self._slots(s.pages, s.num_computed, 1)[0] for s in seqs]
        seq_lens = [s.num_computed + 1 for s in seqs]
        if self.graphs is not None and len(seqs) <= self.graphs.max_batch:
            return self.graphs.run(tokens, positions, slots, [s.pages for s in seqs], seq_lens)
        return self._decode_forward(self._tensor(tokens, torch.int64), self._tensor(positions, torch.int32),
                                    self._tensor(slots, torch.int64), self._block_table(seqs, self.max_pages),
                                    self._tensor(seq_lens, torch.int32))

    def _decode_forward(self, tokens, positions, slots, block_tables, seq_lens) -> torch.Tensor:
        meta = AttentionMetadata(block_tables, seq_lens, is_decode=True)
        return self.model.forward(tokens, positions, slots, meta, self.kv)
