"""mpi/rank_guard.py, the parent launch.sh gives every rank under MPICH's hydra, and launch.sh's use of its record
to name the rank that failed first even when hydra names another (a stand-in mpirun that reports the wrong pid)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mpi_util import LAUNCH, clean_env

GUARD = [sys.executable, "-m", "ringlet.mpi.rank_guard"]


def guarded(deaths: Path, code: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([*GUARD, str(deaths), "--", sys.executable, "-c", code], env=clean_env(), **kwargs)


def wait_for(path: Path, timeout: float = 20) -> str:
    end = time.monotonic() + timeout
    while not (path.exists() and path.read_text().endswith("\n")):
        assert time.monotonic() < end, f"{path} was not written within {timeout} s"
        time.sleep(0.05)
    return path.read_text()


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_rank_killed_by_a_signal_is_recorded_and_the_guard_ends_alike(tmp_path):
    deaths = tmp_path / "deaths"
    proc = guarded(deaths, "import os, signal; print(os.getpid(), flush=True); os.kill(os.getpid(), signal.SIGKILL)",
                   stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert deaths.read_text() == f"{out.split()[0]} signal 9\n"


def test_exit_codes_are_recorded_and_passed_on(tmp_path):
    deaths = tmp_path / "deaths"
    assert guarded(deaths, "import sys; sys.exit(3)").wait(timeout=30) == 3
    assert guarded(deaths, "pass").wait(timeout=30) == 0  # a clean exit adds nothing
    [line] = deaths.read_text().splitlines()
    assert line.endswith(" exit 3")


def test_guard_forwards_sigterm_once(tmp_path):
    deaths, seen, ready = tmp_path / "deaths", tmp_path / "seen", tmp_path / "ready"
    code = (f"import signal, sys, time\n"
            f"signal.signal(signal.SIGTERM, lambda *a: open({str(seen)!r}, 'a').write('term\\n'))\n"
            f"open({str(ready)!r}, 'w').write('ready\\n')\n"
            f"time.sleep(2)\nsys.exit(4)\n")
    proc = guarded(deaths, code)
    wait_for(ready)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 4
    assert seen.read_text() == "term\n"


def test_rank_dies_with_its_guard(tmp_path):
    deaths, pid_file = tmp_path / "deaths", tmp_path / "pid"
    proc = guarded(deaths, f"import os, time; open({str(pid_file)!r}, 'w').write(f'{{os.getpid()}}\\n'); "
                           f"time.sleep(120)")
    rank = int(wait_for(pid_file))
    proc.kill()
    proc.wait(timeout=30)
    end = time.monotonic() + 20
    while not gone(rank):
        assert time.monotonic() < end, "the rank outlived its guard"
        time.sleep(0.05)
    assert not deaths.exists()  # the rank did not fail first: its guard did


# A stand-in for hydra's mpiexec: ranks 0 and 1 (pids 111 and 222, guards 1110 and 2220), rank 1 recorded as killed
# by its guard, and hydra's report naming rank 0's guard, as CI once saw.
FAKE_HYDRA = """#!/usr/bin/env bash
if [[ $1 == --version ]]; then echo "HYDRA build details:"; exit 0; fi
printf '111 node7 0 1110\\n222 node7 1 2220\\n' > "$RINGLET_RANK_MAP"
[[ -n ${FAKE_DEATH:-} ]] && echo "$FAKE_DEATH" >> "$RINGLET_DEATHS"
printf '=====\\n=   BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES\\n=   PID %s RUNNING AT node7\\n' "$FAKE_PID"
printf '=   EXIT CODE: 9\\n=   CLEANING UP REMAINING PROCESSES\\n=====\\n'
exit 9
"""


def fake_hydra_job(tmp_path, **env) -> subprocess.CompletedProcess:
    mpirun = tmp_path / "mpiexec"
    mpirun.write_text(FAKE_HYDRA)
    mpirun.chmod(0o755)
    return subprocess.run([LAUNCH, "-n", "2", "batch"], env=clean_env(RINGLET_MPIRUN=str(mpirun), **env),
                          capture_output=True, text=True, timeout=60)


def test_launch_names_the_rank_its_guard_saw_fail(tmp_path):
    res = fake_hydra_job(tmp_path, FAKE_PID="1110", FAKE_DEATH="222 signal 9")
    assert res.returncode == 9
    assert "ringlet: rank 1 (pid 222 on node7) was killed (SIGKILL); mpirun ended the other ranks" in res.stderr
    assert "rank 0" not in res.stderr


def test_launch_names_an_exit_code_and_other_signals(tmp_path):
    res = fake_hydra_job(tmp_path, FAKE_PID="1110", FAKE_DEATH="222 exit 3")
    assert "ringlet: rank 1 (pid 222 on node7) exited with code 3" in res.stderr
    res = fake_hydra_job(tmp_path, FAKE_PID="1110", FAKE_DEATH="222 signal 11")
    assert "ringlet: rank 1 (pid 222 on node7) was killed by signal 11 (SIGSEGV)" in res.stderr


def test_launch_falls_back_to_hydras_pid_without_a_record(tmp_path):
    res = fake_hydra_job(tmp_path, FAKE_PID="2220")  # the guard's pid, as hydra knows it
    assert "ringlet: rank 1 (pid 222 on node7) was killed (SIGKILL)" in res.stderr
