"""`auto`: NCCL when every rank of the group computes on a GPU; otherwise ring or native MPI by message size.

Without GPUs the choice comes from a table of crossover sizes: `thresholds` given by the caller (a stored table:
{"ring_from_bytes": N}, ring for messages of N bytes and more, native MPI below), or measured at start-up: rank 0
times both backends on a few sizes (4 KiB .. 4 MiB, best of 3 each, max over ranks) and broadcasts the smallest size
from which ring is faster on this very job, so every rank picks the same backend for the same message.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from . import control
from .comm import Communicator, check_tensor
from .native import MPICommunicator
from .ring import RingCommunicator

PROBE_BYTES = (4 << 10, 64 << 10, 1 << 20, 4 << 20)
NEVER = 1 << 62


class AutoCommunicator(Communicator):
    name = "auto"

    def __init__(self, group, world, device: torch.device | None, thresholds: dict | None = None):
        super().__init__(group)
        on_gpu = device is not None and device.type == "cuda"
        everyone = control.allgather(group, bool(on_gpu))
        self.nccl = None
        if all(everyone):
            from .nccl import NCCLCommunicator
            self.nccl = NCCLCommunicator(group, world, device)
            self.ring_from_bytes = NEVER
            self.host = None
            return
        self.ring = RingCommunicator(group)
        self.mpi = MPICommunicator(group)
        self.host = self.mpi
        if thresholds is not None:
            self.ring_from_bytes = int(thresholds["ring_from_bytes"])
            self.measured = None
        else:
            self.ring_from_bytes, self.measured = self._measure()

    def _measure(self) -> tuple[int, dict]:
        timings = {}
        for nbytes in PROBE_BYTES:
            buf = np.ones(nbytes // 4, np.float32)
            row = {}
            for backend in (self.ring, self.mpi):
                best = float("inf")
                for _ in range(3):
                    self.group.Barrier()
                    start = time.perf_counter()
                    backend.reduce_host(buf)
                    best = min(best, time.perf_counter() - start)
                row[backend.name] = best
            timings[nbytes] = row
        # Each rank's view of the times can differ; agree on the slowest rank's, then on rank 0's verdict.
        worst = control.allgather(self.group, {str(k): v for k, v in timings.items()})
        merged = {k: {b: max(w[str(k)][b] for w in worst) for b in ("ring", "mpi")} for k in timings}
        faster = [k for k in PROBE_BYTES if merged[k]["ring"] < merged[k]["mpi"]]
        # The crossover: the smallest probed size from which ring wins at every larger probed size.
        cut = NEVER
        for k in reversed(PROBE_BYTES):
            if k in faster:
                cut = k
            else:
                break
        cut = control.bcast(self.group, cut)
        return cut, {str(k): v for k, v in merged.items()}

    def choose(self, nbytes: int) -> str:
        """The backend an all-reduce of nbytes goes through."""
        if self.nccl is not None:
            return "nccl"
        return "ring" if nbytes >= self.ring_from_bytes else "mpi"

    def _backend(self, tensor) -> Communicator:
        if self.nccl is not None:
            return self.nccl
        return self.ring if tensor.numel() * 4 >= self.ring_from_bytes else self.mpi

    def all_reduce(self, tensor):
        check_tensor(tensor, "all_reduce")
        return self._backend(tensor).all_reduce(tensor)

    def row_parallel_linear(self, x, w):
        if self.nccl is not None:  # the same backend as the reduce_add_rms_norm that follows
            return self.nccl.row_parallel_linear(x, w)
        return super().row_parallel_linear(x, w)

    def reduce_add_rms_norm(self, x, residual, weight, eps):
        return self._backend(x).reduce_add_rms_norm(x, residual, weight, eps)

    def vocab_parallel_logits(self, x, w):
        if self.nccl is not None:
            return self.nccl.vocab_parallel_logits(x, w)
        return super().vocab_parallel_logits(x, w)

    def broadcast(self, tensor, root=0):
        return (self.nccl or self.host).broadcast(tensor, root)

    def all_gather(self, tensor):
        return (self.nccl or self.host).all_gather(tensor)

    def barrier(self):
        (self.nccl or self.host).barrier()

    def describe(self) -> dict:
        return {"backend": "auto", "size": self.size, "nccl": self.nccl is not None,
                "ring_from_bytes": None if self.nccl is not None or self.ring_from_bytes == NEVER
                else self.ring_from_bytes, "measured_s": getattr(self, "measured", None)}
