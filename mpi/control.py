"""Control messages between ranks: msgpack bytes over MPI uppercase calls, never pickle.

mpi4py's lowercase calls (send/recv/bcast/gather) pickle their objects; ringlet never uses them, so no rank ever
unpickles bytes another process sent. Messages are plain msgpack values (dicts, lists, str, int, float, bytes).
"""
from __future__ import annotations

import time

import msgpack
import numpy as np
from mpi4py import MPI


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data) -> object:
    return msgpack.unpackb(bytes(data), raw=False, strict_map_key=False)


def bcast(comm, obj=None, root: int = 0, poll: bool = False, spin: float = 0.0):
    """root's obj on every rank (the length by Ibcast, then the bytes by Bcast).

    poll=True waits for the length with a non-blocking Ibcast and short sleeps instead of MPI's busy wait, for
    ranks that idle between messages (tensor-parallel workers), so they leave the CPU to the ranks that compute;
    for the first `spin` seconds it tests without sleeping (a GPU worker expecting the next step's plan within a
    millisecond: a sleep there is added to every step).
    """
    size = np.zeros(1, np.int64)
    data = b""
    if comm.Get_rank() == root:
        data = pack(obj)
        size[0] = len(data)
    # The length always goes by Ibcast on every rank: a blocking and a non-blocking collective never match.
    request = comm.Ibcast(size, root=root)
    if poll and comm.Get_rank() != root:
        wait(request, spin=spin)
    else:
        request.Wait()
    buf = bytearray(data) if comm.Get_rank() == root else bytearray(int(size[0]))
    comm.Bcast([buf, MPI.BYTE], root=root)
    return obj if comm.Get_rank() == root else unpack(buf)


def allgather(comm, obj) -> list:
    """Every rank's obj, in rank order, on every rank."""
    data = pack(obj)
    sizes = np.zeros(comm.Get_size(), np.int64)
    comm.Allgather(np.array([len(data)], np.int64), sizes)
    out = bytearray(int(sizes.sum()))
    displs = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    comm.Allgatherv([bytearray(data), MPI.BYTE], [out, (sizes.tolist(), displs.tolist()), MPI.BYTE])
    return [unpack(out[int(d):int(d) + int(s)]) for d, s in zip(displs, sizes)]


def wait(request, max_sleep: float = 0.002, spin: float = 0.0) -> None:
    """Complete an MPI request: tests back to back for `spin` seconds, then sleeps between tests (growing to
    max_sleep s) rather than spinning."""
    if spin > 0:
        end = time.perf_counter() + spin
        while time.perf_counter() < end:
            if request.Test():
                return
    pause = 1e-5
    while not request.Test():
        time.sleep(pause)
        pause = min(pause * 2, max_sleep)


class Mailbox:
    """Point-to-point msgpack messages on one communicator: non-blocking sends, non-blocking receives.

    Neither side ever blocks on the other: sends are `Isend`s whose buffers are kept until they complete, and a
    message is received by a matched probe and an `Irecv` that `poll` completes later. Over some transports a
    message larger than MPI's eager limit moves only while its sender is inside MPI (Open MPI 4.1 between two ranks
    of one node: a blocking receive there waited out the sender's engine step, 10-70 ms on a 7B model), while MPICH
    moves it without the sender. Messages from one source with one tag come out in the order they were sent.
    """

    def __init__(self, comm):
        self.comm = comm
        self._pending: list = []
        self._incoming: list = []  # [request, buffer, source, tag] in arrival order

    def send(self, obj, dest: int, tag: int) -> None:
        data = bytearray(pack(obj))
        self._pending.append((self.comm.Isend([data, MPI.BYTE], dest=dest, tag=tag), data))
        self._pending = [(r, d) for r, d in self._pending if not r.Test()]

    def poll(self, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG):
        """(source, tag, obj) of one received message matching source and tag, or None."""
        status = MPI.Status()
        while (message := self.comm.Improbe(status=status)) is not None:
            buf = bytearray(status.Get_count(MPI.BYTE))
            self._incoming.append([message.Irecv([buf, MPI.BYTE]), buf, status.Get_source(), status.Get_tag()])
        waiting = set()  # (source, tag) with an earlier message still arriving: later ones wait behind it
        for i, (request, buf, src, tg) in enumerate(self._incoming):
            if source not in (MPI.ANY_SOURCE, src) or tag not in (MPI.ANY_TAG, tg) or (src, tg) in waiting:
                continue
            if request.Test():
                del self._incoming[i]
                return src, tg, unpack(buf)
            waiting.add((src, tg))
        return None

    def receive(self, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG, max_sleep: float = 0.002):
        """Wait (sleeping between probes) for one message; (source, tag, obj)."""
        pause = 1e-5
        while True:
            got = self.poll(source, tag)
            if got is not None:
                return got
            time.sleep(pause)
            pause = min(pause * 2, max_sleep)

    def flush(self) -> None:
        """Wait until every message this mailbox sent has been delivered."""
        for request, _ in self._pending:
            wait(request)
        self._pending = []
