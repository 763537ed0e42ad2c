"""`python -m ringlet.mpi.rank_guard DEATHS -- COMMAND...`: run one MPI rank as a child and record how it ended.

launch.sh starts every rank through this under MPICH's hydra, whose report of a failed job names one process by
pid, and not always the one that failed: when a rank dies, hydra kills the others, and which of the dead it then
names depends on the order it collects them in (CI once saw it name the rank it had killed itself). Only a parent
knows how its child ended, so the guard is the rank's parent: when the rank exits non-zero or dies by a signal,
the guard appends `PID signal N` or `PID exit N` (the rank's pid) to the file DEATHS in one write, then ends the
same way. launch.sh names the first rank listed there.

The rank runs in a process group of its own with SIGKILL as its parent-death signal: hydra's clean-up kills the
guard's group, which then ends the rank without a line in DEATHS (it did not fail first). Signals the guard gets
(Ctrl-C forwarded by hydra, SIGTERM) are passed to the rank once. Imports neither torch nor MPI.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
_PR_SET_PDEATHSIG = 1


def _as_orphan_killed(guard: int):
    """preexec_fn of the rank: its own process group, and SIGKILL when the guard dies (checked once more after
    arming, in case the guard died before)."""
    def setup():
        os.setpgid(0, 0)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0 or os.getppid() != guard:
            os._exit(125)
    return setup


def _record(path: str, pid: int, returncode: int) -> None:
    line = f"{pid} signal {-returncode}\n" if returncode < 0 else f"{pid} exit {returncode}\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError:
        pass  # the report is a courtesy: never let it change how the rank ends


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m ringlet.mpi.rank_guard DEATHS -- COMMAND...", file=sys.stderr)
        return 2
    deaths, command = argv[0], argv[2:]
    started: list[subprocess.Popen] = []

    def forward(signum, frame):
        if started:
            started[0].send_signal(signum)
        else:  # no rank yet: end the guard as the signal would have
            _end_by(signum)

    for sig in _FORWARDED:  # before the start, so that no signal can end the guard with its rank left running
        signal.signal(sig, forward)
    try:
        child = subprocess.Popen(command, close_fds=False, preexec_fn=_as_orphan_killed(os.getpid()))
    except OSError as e:
        print(f"ringlet: cannot start rank {command[0]!r}: {e}", file=sys.stderr)
        return 127
    started.append(child)
    returncode = child.wait()
    if returncode != 0:
        _record(deaths, child.pid, returncode)
    if returncode < 0:  # end as the rank did, so that mpirun sees the same status
        _end_by(-returncode)
    return returncode & 0xFF


def _end_by(signum: int) -> None:
    if signum in _FORWARDED:
        signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
