"""ringlet.mpi communicators under real mpirun: ring, native MPI and auto all-reduce against a numpy sum."""
import json
import sys

import pytest
from mpi_util import REPO, clean_env, mpirun_path, run

BACKENDS = ["ring", "mpi", "auto"]
CASES = len(BACKENDS) * 3 * 5 + 3 * 4  # (backend, dtype, length) + ring-chunked at lengths <= 1000


@pytest.mark.parametrize("n", [2, 3, 4])
def test_all_reduce_equals_numpy_sum(n):
    res = run([mpirun_path(), "-n", str(n), "-bind-to", "none", sys.executable,
               str(REPO / "tests" / "mpi_comm_check.py"), ",".join(BACKENDS)], timeout=110, env=clean_env())
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    reduces = [r for r in rows if "n" in r]
    assert len(reduces) == CASES
    assert {(r["backend"], r["dtype"]) for r in reduces} >= {(b, d) for b in BACKENDS
                                                             for d in ("float32", "float16", "bfloat16")}
    assert {r["n"] for r in reduces} == {1, 2, 7, 1000, 1 << 20}
    bad = [r for r in reduces if not (r["ok"] and r["same_on_all"] and r["inplace"])]
    assert not bad, bad
    others = [r for r in rows if r.get("op") == "broadcast+all_gather"]
    assert len(others) == 2 * (len(BACKENDS) + 1) and all(r["ok"] for r in others), others
    heads = [r for r in rows if r.get("op") == "vocab_parallel_logits"]
    assert len(heads) == len(BACKENDS) + 1 and all(r["ok"] for r in heads), heads
    [auto] = [r["auto"] for r in rows if "auto" in r]
    assert auto["nccl"] is False and set(auto["measured_s"]) == {"4096", "65536", "1048576", "4194304"}


def test_mailbox_never_waits_on_a_computing_sender():
    """Messages from one sender and tag come out in order, a poll for one tag keeps the others, and no poll waits
    for a sender that is computing outside MPI. The last matters on transports that need the sender's help to move
    a large message: under Open MPI 4.1 (two ranks of one node, 2026-11-27) the previous Mailbox, which received
    by a blocking Recv after a probe, held one poll for 1.007 s, this one at most 3 ms. MPICH, which CI runs, moves
    the message alone, so there the test checks order and tag filtering."""
    res = run([mpirun_path(), "-n", "2", "-bind-to", "none", sys.executable,
               str(REPO / "tests" / "mpi_mailbox_check.py")], timeout=110, env=clean_env())
    assert res.returncode == 0, res.stderr
    [row] = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert row["order"] == [0, 1, 2, 3, 4]
    assert row["other"] == "other"
    assert row["longest_poll_s"] < 0.5, row  # the sender computes for 1 s after sending
