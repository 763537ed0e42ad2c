"""Failure handling: no rank waits forever on a rank that died, hung or raised.

- A rank that raises prints `ringlet: rank R failed: TYPE: MESSAGE` and calls MPI Abort, which ends every rank.
- A rank that is killed (SIGKILL, the OOM killer) is noticed by the launcher, which ends the others: MPICH's hydra
  and Open MPI's mpirun both do, and SLURM ends the step. Under hydra, launch.sh names the rank (see there and
  rank_guard.py).
- A rank that stops without dying (a hang, SIGSTOP, a lost node under a launcher that does not notice) stops
  sending heartbeats: a thread on every rank sends one per `interval` seconds on a private communicator, rank 0
  hears from every rank and every other rank hears from rank 0; after `timeout` seconds of silence the listener
  prints `ringlet: rank R (pid P on HOST) sent no heartbeat for T s ...` and calls MPI Abort.

Errors raised by every rank at once during set-up (a bad flag, a model that cannot be split) go through
`collective` instead, which turns them into one clean error on every rank and no Abort.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time

from mpi4py import MPI
from ringlet.errors import RingletError

from . import control

HEARTBEAT_TAG = 77
# Seconds between printing why the job ends and calling MPI Abort. Hydra's proxy forwards a rank's stderr from a
# pipe and handles the abort on a socket; without the pause it could tear the job down with the message still in
# the pipe, and the user would see an exit code and no reason (seen in CI).
ABORT_GRACE = 1.0


class RankError(RingletError):
    """Set-up failed on some rank; raised on every rank with the first failing rank's message."""


def identify(comm) -> list[dict]:
    """Every rank's {"rank", "pid", "ppid", "host"}, in rank order (one allgather)."""
    return control.allgather(comm, {"rank": comm.Get_rank(), "pid": os.getpid(), "ppid": os.getppid(),
                                    "host": socket.gethostname()})


class Watchdog:
    """Heartbeats over a private duplicate of `comm`; see the module docstring. Use as a context manager."""

    def __init__(self, comm, interval: float = 1.0, timeout: float = 20.0, startup_timeout: float = 180.0):
        """timeout: allowed silence once `ready()` was called; startup_timeout: before that, while ranks load
        checkpoints (long GIL-holding parsing on a crowded node can starve the heartbeat thread for a while)."""
        if not 0 < interval < timeout:
            raise ValueError(f"need 0 < interval < timeout, got interval={interval}, timeout={timeout}")
        self.comm = comm.Dup()
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.interval, self.timeout = interval, max(timeout, startup_timeout)
        self._steady_timeout = timeout
        self._last: dict[int, float] = {}
        self.ranks = identify(comm)
        path = os.environ.get("RINGLET_RANK_MAP")
        if path and self.rank == 0:  # launch.sh names a dead rank from this map (see there)
            try:
                with open(path, "w") as f:
                    f.writelines(f"{r['pid']} {r['host']} {r['rank']} {r['ppid']}\n" for r in self.ranks)
            except OSError:
                pass
        self.peers = [r for r in range(self.size) if r != self.rank] if self.rank == 0 else [0]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ringlet-watchdog", daemon=True)

    def __enter__(self):
        if self.size > 1:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def ready(self) -> None:
        """Set-up is over on this rank: from now on `timeout` seconds of silence end the job."""
        now = time.monotonic()
        for p in self._last:
            self._last[p] = max(self._last[p], now)
        self.timeout = self._steady_timeout

    def stop(self) -> None:
        """Stop sending; called by every rank once its work is done (before the final barrier)."""
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()

    def _run(self) -> None:
        beat = bytearray(1)
        sink = bytearray(1)
        last = self._last
        last.update({p: time.monotonic() for p in self.peers})
        sends: list = []
        status = MPI.Status()
        while not self._stop.is_set():
            for p in self.peers:
                sends.append(self.comm.Isend([beat, MPI.BYTE], dest=p, tag=HEARTBEAT_TAG))
            sends = [r for r in sends if not r.Test()]
            while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=HEARTBEAT_TAG, status=status):
                self.comm.Recv([sink, MPI.BYTE], source=status.Get_source(), tag=HEARTBEAT_TAG)
                last[status.Get_source()] = time.monotonic()
            now = time.monotonic()
            for p, seen in last.items():
                if now - seen > self.timeout:
                    who = self.ranks[p]
                    print(f"ringlet: rank {p} (pid {who['pid']} on {who['host']}) sent no heartbeat for "
                          f"{now - seen:.0f} s (hung, stopped or lost); rank {self.rank} is ending all "
                          f"{self.size} ranks", file=sys.stderr, flush=True)
                    abort(3)
            self._stop.wait(self.interval)


def fail(exc: BaseException, comm=None) -> None:
    """Report this rank's error and end every rank (MPI Abort). Never returns."""
    rank = (comm or MPI.COMM_WORLD).Get_rank()
    cause = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    print(f"ringlet: rank {rank} failed: {cause}; ending all ranks", file=sys.stderr, flush=True)
    abort(1)


def abort(code: int) -> None:
    """End every rank with exit code `code` once the launcher has had time to forward what was printed."""
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(ABORT_GRACE)
    MPI.COMM_WORLD.Abort(code)


def collective(comm, fn, *args, **kwargs):
    """Run fn on every rank; if it raised on any rank, raise RankError on every rank (the lowest failing rank's
    message), so a set-up error that every rank meets ends the job cleanly, with one message and no Abort."""
    error = None
    result = None
    try:
        result = fn(*args, **kwargs)
    except RingletError as e:
        error = str(e)
    except Exception as e:  # a bug still has to reach the other ranks, or they would wait for this one
        error = f"{type(e).__name__}: {e}"
    errors = control.allgather(comm, error)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        rank, message = failed[0]
        if len(failed) == len(errors) and len({e for _, e in failed}) == 1:
            raise RankError(message)  # every rank met the same error: it is the job's, not one rank's
        others = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
        raise RankError(f"rank {rank}{others}: {message}")
    return result
