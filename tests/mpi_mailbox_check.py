"""Run under mpirun -n 2 by tests/test_mpi_comm.py: control.Mailbox receives without waiting on its sender.

Rank 1 sends five messages with tag DATA (small ones and 2 MiB ones, alternating) and one with tag OTHER, then
computes for COMPUTE_S seconds without entering MPI (as a replica does during an engine step), then flushes. Rank 0
polls for DATA only, timing every poll, then asks for OTHER. It prints one JSON line: the DATA payloads in the
order they came out, the longest single poll, and the OTHER payload.
"""
import json
import time

from mpi4py import MPI
from ringlet.mpi.control import Mailbox

DATA, OTHER = 5, 6
COMPUTE_S = 1.0
BIG = 2 << 20


def payload(i: int) -> dict:
    return {"i": i, "pad": b"x" * (BIG if i % 2 else 16)}


def main() -> None:
    world = MPI.COMM_WORLD
    mailbox = Mailbox(world.Dup())
    if world.Get_rank() == 1:
        for i in range(5):
            mailbox.send(payload(i), 0, DATA)
        mailbox.send("other", 0, OTHER)
        time.sleep(COMPUTE_S)
        mailbox.flush()
    else:
        order, longest = [], 0.0
        deadline = time.monotonic() + 60
        while len(order) < 5 and time.monotonic() < deadline:
            start = time.perf_counter()
            got = mailbox.poll(tag=DATA)
            longest = max(longest, time.perf_counter() - start)
            if got is None:
                time.sleep(0.001)
                continue
            source, tag, message = got
            assert (source, tag) == (1, DATA) and message["pad"] == payload(message["i"])["pad"]
            order.append(message["i"])
        other = mailbox.receive(source=1, tag=OTHER)[2]
        print(json.dumps({"order": order, "longest_poll_s": longest, "other": other}), flush=True)
    world.Barrier()


if __name__ == "__main__":
    main()
