"""`ring`: all-reduce as a reduce-scatter then an all-gather around the ranks, on host buffers.

With p ranks the float32 staging buffer is cut into p segments (segment i = elements [i*n//p, (i+1)*n//p), some
empty when n < p). Reduce-scatter: in step s each rank sends segment (rank - s) % p to its right neighbour and adds
the segment (rank - s - 1) % p that arrives from its left one; after p - 1 steps rank r holds the full sum of
segment (r + 1) % p. All-gather: p - 1 more steps pass the finished segments around. Each rank moves
2 (p - 1) / p of the buffer, whatever p is.

Every exchange is one `Sendrecv` when a segment fits in one chunk. Larger segments go as chunks of at most
`chunk_elems` floats, all posted at once (`Isend`/`Irecv`): the addition of chunk k overlaps the arrival of the
chunks after it, so a large message pipelines instead of waiting for the whole segment. Partial sums travel in
float32, so 16-bit inputs are rounded once, at the end, and every rank ends with the same bits (each segment's sum
is computed on one rank and copied to the others).
"""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from .comm import HostCommunicator

CHUNK_ELEMS = 1 << 18  # 1 MiB of float32 per message


class RingCommunicator(HostCommunicator):
    name = "ring"

    def __init__(self, group, chunk_elems: int = CHUNK_ELEMS):
        super().__init__(group)
        if chunk_elems < 1:
            raise ValueError(f"chunk_elems must be >= 1, got {chunk_elems}")
        self.chunk_elems = chunk_elems
        self.ring = group.Dup()  # own message space: no tag can meet a control message or another backend's
        self.right = (self.rank + 1) % self.size
        self.left = (self.rank - 1) % self.size

    def reduce_host(self, buf: np.ndarray) -> np.ndarray:
        """Sum the 1-D float32/float64 array `buf` over the ranks, in place."""
        p, r, n = self.size, self.rank, buf.size
        bounds = [i * n // p for i in range(p + 1)]
        seg = [(bounds[i], bounds[i + 1]) for i in range(p)]
        scratch = np.empty(max(b - a for a, b in seg), buf.dtype)
        for s in range(p - 1):  # reduce-scatter
            self._exchange(buf, seg[(r - s) % p], seg[(r - s - 1) % p], scratch, add=True)
        for s in range(p - 1):  # all-gather
            self._exchange(buf, seg[(r - s + 1) % p], seg[(r - s) % p], scratch, add=False)
        return buf

    def _chunks(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """Message k of a segment carries [a, b); an empty segment is one empty message, as Sendrecv sends it, so
        both sides of every exchange agree on the messages whichever path each takes."""
        return [(a, min(a + self.chunk_elems, hi)) for a in range(lo, hi, self.chunk_elems)] or [(lo, hi)]

    def _exchange(self, buf, send, recv, scratch, add: bool) -> None:
        """Send buf[send] to the right, receive the left neighbour's copy of buf[recv], add or store it."""
        (s0, s1), (r0, r1) = send, recv
        if s1 - s0 <= self.chunk_elems and r1 - r0 <= self.chunk_elems:
            tmp = scratch[:r1 - r0] if add else buf[r0:r1]
            self.ring.Sendrecv(buf[s0:s1], self.right, 0, tmp, self.left, 0)
            if add:
                buf[r0:r1] += tmp
            return
        recv_chunks = self._chunks(r0, r1)
        # Partial sums land in scratch and are added; finished segments land straight in their place.
        views = [scratch[a - r0:b - r0] if add else buf[a:b] for a, b in recv_chunks]
        rreqs = [self.ring.Irecv(view, self.left, k) for k, view in enumerate(views)]
        sreqs = [self.ring.Isend(buf[a:b], self.right, k) for k, (a, b) in enumerate(self._chunks(s0, s1))]
        if add:
            for req, view, (a, b) in zip(rreqs, views, recv_chunks):
                req.Wait()
                buf[a:b] += view
        else:
            MPI.Request.Waitall(rreqs)
        MPI.Request.Waitall(sreqs)
