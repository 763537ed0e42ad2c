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
        self.max_batch = n = max_num_seqs
        self.max_pages = max_pages
        # All inputs travel in two pinned host buffers and two copies per step: [tokens | slots] as int64 and
        # [positions | seq_lens | block_tables] as int32. The device buffers are sliced into the graph's inputs.
        # Steps take turns between two such pairs, and a pair is refilled only once the copies from it (two steps
        # back) have run: the host may prepare a step while the one before it has not started (Engine.step's
        # async scheduling, and tensor-parallel workers, which do not wait for their forwards).
        self._host64 = [torch.zeros(2 * n, dtype=torch.int64, pin_memory=True) for _ in range(2)]
        self._host32 = [torch.zeros(2 * n + n * max_pages, dtype=torch.int32, pin_memory=True) for _ in range(2)]
        self._copied = [torch.cuda.Event(), torch.cuda.Event()]
        self._turn = 0
        self._dev64 = torch.zeros(2 * n, dtype=torch.int64, device=device)
        self._dev32 = torch.zeros(2 * n + n * max_pages, dtype=torch.int32, device=device)
        self.tokens, self.slots = self._dev64[:n], self._dev64[n:]
        self.positions, self.seq_lens = self._dev32[:n], self._dev32[n:2 * n]
        self.block_tables = self._dev32[2 * n:].view(n, max_pages)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None

    def run(self, tokens: list[int] | torch.Tensor, positions: list[int], slots: list[int], pages: list[list[int]],
            seq_lens: list[int]) -> torch.Tensor:
        """Decode len(positions) sequences (pages: each one's page ids); returns logits [len(positions), vocab].
        tokens: their input ids, on the host or as [n] int64 on the device."""
        n, cap = len(positions), self.max_batch
        b = next(x for x in self.buckets if x >= n)
        turn, self._turn = self._turn, 1 - self._turn
        self._copied[turn].synchronize()
        host64, host32 = self._host64[turn], self._host32[turn]
        h64, h32 = host64.numpy(), host32.numpy()
        h64[:b] = 0
        if isinstance(tokens, list):
            h64[:n] = tokens
        h64[cap:cap + n], h64[cap + n:cap + b] = slots, -1
        h32[:n], h32[n:b] = positions, 0
        h32[cap:cap + n], h32[cap + n:cap + b] = seq_lens, 0
        tables = h32[2 * cap:].reshape(cap, self.max_pages)
        tables[:b] = 0
        for row, p in zip(tables, pages):
            row[:len(p)] = p
        self._dev64.copy_(host64, non_blocking=True)
        self._dev32[:2 * cap + b * self.max_pages].copy_(host32[:2 * cap + b * self.max_pages], non_blocking=True)
        self._copied[turn].record()
        if not isinstance(tokens, list):
            self.tokens[:n].copy_(tokens)
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
