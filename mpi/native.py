"""`mpi`: the MPI library's own `Allreduce` (in place) on a float32 host buffer."""
from __future__ import annotations

from mpi4py import MPI

from .comm import HostCommunicator


class MPICommunicator(HostCommunicator):
    name = "mpi"

    def __init__(self, group):
        super().__init__(group)
        self.native = group.Dup()

    def reduce_host(self, buf):
        self.native.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        return buf
