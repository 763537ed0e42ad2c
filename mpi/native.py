"""`mpi`: the MPI library's own `Allreduce` (in place) on a float32 host buffer."""
from __future__ import annotations

from mpi4py import MPI

from .comm import HostCommunicator, check_tensor, from_host, to_host


class MPICommunicator(HostCommunicator):
    name = "mpi"

    def __init__(self, group):
        super().__init__(group)
        self.native = group.Dup()

    def all_reduce(self, tensor):
        check_tensor(tensor, "all_reduce")
        if self.size == 1 or tensor.numel() == 0:
            return tensor
        buf = to_host(tensor)
        self.reduce_host(buf)
        return from_host(tensor, buf)

    def reduce_host(self, buf):
        self.native.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        return buf
