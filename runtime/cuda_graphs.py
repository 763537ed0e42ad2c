"""CUDA graphs for the decode step, one per batch-size bucket, captured on first use.

A graph replays fixed kernels on fixed buffers, so each step's inputs are copied into static tensors sized for the
largest bucket; rows past the real batch are padding (slot -1: nothing written; sequence length 0: zero output).
"""
from __future__ import annotations

from typing import Callable

import torch

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class DecodeGraphs:
    def __init__(self, forward: Callable[..., torch.Tensor], max_num_seqs: int, max_pages: int,
                 device: torch.device):
        """forward(tokens [B] int64, positions [B] int32, slots [B] int64, block_tables [B, max_pages] int32,
        seq_lens [B] int32) -> logits [B, vocab] float32."""
        self.forward = forward
        self.buckets = [b for b in BUCKETS if b < max_num_seqs] + [max_num_seqs]
        self.max_batch = max_num_seqs
        n = self.max_batch
        self.tokens = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int32, device=device)
        self.slots = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(n, max_pages, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None

    def run(self, tokens: list[int], positions: list[int], slots: list[int], block_tables: list[list[int]],
            seq_lens: list[int]) -> torch.Tensor:
        n = len(tokens)
        b = next(x for x in self.buckets if x >= n)
        pad = b - n
        self.tokens[:b].copy_(torch.tensor(tokens + [0] * pad), non_blocking=True)
        self.positions[:b].copy_(torch.tensor(positions + [0] * pad, dtype=torch.int32), non_blocking=True)
        self.slots[:b].copy_(torch.tensor(slots + [-1] * pad), non_blocking=True)
        self.seq_lens[:b].copy_(torch.tensor(seq_lens + [0] * pad, dtype=torch.int32), non_blocking=True)
        self.block_tables[:n].copy_(torch.tensor(block_tables, dtype=torch.int32), non_blocking=True)
        self.block_tables[n:b].zero_()
        if b not in self.graphs:
            self._capture(b)
        self.graphs[b].replay()
        return self.logits[b][:n]

    def _args(self, b: int):
        return self.tokens[:b], self.positions[:b], self.slots[:b], self.block_tables[:b], self.seq_lens[:b]

    def _capture(self, b: int) -> None:
        # Eager runs first, on a side stream, so Triton compiles and autotunes outside the capture.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.forward(*self._args(b))
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.logits[b] = self.forward(*self._args(b))
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[b] = graph
