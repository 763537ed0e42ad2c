"""launch.sh, rank discovery and .ci/run, with real processes: real mpirun (the pip `mpich` wheel's hydra) for
the multi-rank paths; for SLURM only launch.sh's own choice of srun arguments, through a stand-in `srun` that
records them (tests/test_slurm.py runs them on a real one-node SLURM cluster)."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import types
from pathlib import Path

import pytest

from mpi_util import LAUNCH, REPO, clean_env, mpirun_path
from ringlet.mpi.ranks import RankInfo, device_for


@pytest.fixture
def mpirun():
    """Fails, never skips, without mpirun: the MPI tests are part of what CI must prove."""
    return mpirun_path()


def run(args, env, timeout=60) -> subprocess.CompletedProcess:
    """Run args in a new process group; on timeout kill the whole group (mpirun and its ranks) and fail."""
    proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{args} hung for {timeout} s\nstdout:\n{out}\nstderr:\n{err}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def rank_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


# --- real launches ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 3])
def test_mpirun_ranks(n, mpirun):
    res = run([LAUNCH, "-n", str(n), "--module", "ringlet.mpi"], clean_env())
    assert res.returncode == 0, res.stderr
    lines = rank_lines(res.stdout)
    assert [line["rank"] for line in lines] == list(range(n))
    assert {line["world_size"] for line in lines} == {n}
    # One host: every rank is in the same shared-memory domain, and local ranks follow ranks.
    assert len({line["host"] for line in lines}) == 1
    assert [line["local_rank"] for line in lines] == list(range(n))
    assert {line["local_size"] for line in lines} == {n}
    assert len({line["pid"] for line in lines}) == n


def test_single_process():
    res = run([LAUNCH, "--module", "ringlet.mpi"], clean_env())
    assert res.returncode == 0, res.stderr
    [line] = rank_lines(res.stdout)
    assert (line["rank"], line["world_size"], line["local_rank"], line["local_size"]) == (0, 1, 0, 1)


@pytest.mark.parametrize("env", [{}, {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"},
                                 {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "1"}],
                         ids=["plain", "sbatch-script", "one-task-step"])
def test_discover_without_launcher_skips_mpi(env):
    code = ("import sys; from ringlet.mpi.ranks import discover; i = discover(); "
            "print(i.rank, i.world_size, i.local_rank, i.local_size, 'mpi4py' in sys.modules)")
    res = run([sys.executable, "-c", code], clean_env(**env))
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["0", "1", "0", "1", "False"]


@pytest.mark.parametrize("env", [{"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2"},
                                 {"PMI_RANK": "0", "PMI_SIZE": "2"}], ids=["srun-without-pmi", "pmi-without-server"])
def test_discover_rejects_world_size_mismatch(env):
    # MPI comes up as a singleton while the launcher announced 2 ranks: each rank would think it is alone.
    res = run([sys.executable, "-m", "ringlet.mpi"], clean_env(**env))
    assert res.returncode == 1
    assert res.stdout == ""
    # mpi4py may warn first (Open MPI's, on seeing PMI_SIZE); ringlet's own error is the last line.
    line = res.stderr.splitlines()[-1]
    assert line.startswith("ringlet.mpi: error:") and "started 2 ranks" in line and "world of 1" in line


def test_discover_names_the_fix_when_mpi4py_is_missing(tmp_path):
    (tmp_path / "mpi4py.py").write_text("raise ImportError(\"No module named 'mpi4py'\")\n")
    env = clean_env(PYTHONPATH=str(tmp_path), SLURM_JOB_ID="7", SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="2")
    res = run([sys.executable, "-m", "ringlet.mpi"], env)
    assert res.returncode == 1
    [line] = res.stderr.splitlines()
    assert "pip install mpi4py" in line


def test_launch_refuses_ranks_without_mpi4py(tmp_path, mpirun):
    (tmp_path / "mpi4py.py").write_text("raise ImportError(\"No module named 'mpi4py'\")\n")
    res = run([LAUNCH, "-n", "2", "--module", "ringlet.mpi"], clean_env(PYTHONPATH=str(tmp_path)))
    assert res.returncode == 2
    [line] = res.stderr.splitlines()
    assert "pip install mpi4py" in line


# --- argument errors ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["0", "-1", "abc", "2.5", "", "01", "1e3"])
def test_bad_rank_count(value):
    res = run([LAUNCH, "-n", value, "generate"], clean_env())
    assert res.returncode == 2
    assert res.stdout == ""
    [line] = res.stderr.splitlines()
    assert "-n needs a positive integer" in line


def test_n_without_value():
    res = run([LAUNCH, "-n"], clean_env())
    assert res.returncode == 2
    assert "-n needs a positive integer" in res.stderr


@pytest.mark.parametrize("args", [[], ["-n", "2"], ["--mpi-args", "-v"]], ids=["bare", "n-only", "mpi-args-only"])
def test_missing_command_prints_usage(args):
    res = run([LAUNCH, *args], clean_env())
    assert res.returncode == 2
    assert res.stderr.startswith("usage: ./launch.sh")


def test_help():
    res = run([LAUNCH, "--help"], clean_env())
    assert res.returncode == 0
    assert res.stdout.startswith("usage: ./launch.sh") and "RINGLET_SRUN_MPI" in res.stdout


def test_unknown_option():
    res = run([LAUNCH, "--ranks", "2", "generate"], clean_env())
    assert res.returncode == 2
    assert "unknown option '--ranks'" in res.stderr


def test_missing_mpirun_names_the_fix():
    res = run([LAUNCH, "-n", "2", "generate"], clean_env(RINGLET_MPIRUN="ringlet-no-such-mpirun"))
    assert res.returncode == 2
    [line] = res.stderr.splitlines()
    assert "not found" in line and "pip install mpich" in line


# --- SLURM: launch.sh's choice of srun arguments --------------------------------------------------------------------

# `srun --mpi=list` as Debian 12's Slurm 22.05 prints it (stdout), and as older releases do (stderr, prefixed).
LIST_22_05 = "MPI plugin types are...\n\tpmix\n\tnone\n\tcray_shasta\n\tpmi2\nspecific pmix plugin versions available: pmix_v4\n"
LIST_OLD_PMIX_ONLY = "srun: MPI types are...\nsrun: none\nsrun: pmix\nsrun: pmix_v3\n"

FAKE_SRUN = """#!/usr/bin/env bash
if [[ $1 == --mpi=list ]]; then
    echo list >> "$FAKE_SRUN_DIR/calls"
    cat "$FAKE_SRUN_DIR/list.out"
    cat "$FAKE_SRUN_DIR/list.err" >&2
    exit 0
fi
echo run >> "$FAKE_SRUN_DIR/calls"
printf '%s\\n' "$@" > "$FAKE_SRUN_DIR/args"
"""

# Answer launch.sh's probe of the MPI library that mpi4py loads, as a python with that MPI would (srun's argv only
# records the python, never runs it).
FAKE_MPICH_PYTHON = """#!/usr/bin/env bash
echo "MPICH Version: 4.2.0"
"""
FAKE_OPENMPI_PYTHON = """#!/usr/bin/env bash
echo "Open MPI v5.0.3, package: Open MPI Distribution, ident: 5.0.3, repo rev: v5.0.3, Apr 08, 2024"
"""


def _script(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def fake_srun(tmp_path, args, listing_out="", listing_err="", **env):
    """Run launch.sh inside a pretend SLURM allocation; returns (result, srun's argv or None, srun calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _script(bin_dir / "srun", FAKE_SRUN)
    (tmp_path / "list.out").write_text(listing_out)
    (tmp_path / "list.err").write_text(listing_err)
    environment = clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_SRUN_DIR=str(tmp_path),
                            SLURM_JOB_ID="42", SLURM_NTASKS="4")
    environment.update(env)
    res = run([LAUNCH, *args], environment)
    argv = (tmp_path / "args").read_text().splitlines() if (tmp_path / "args").exists() else None
    calls = (tmp_path / "calls").read_text().split() if (tmp_path / "calls").exists() else []
    return res, argv, calls


def test_srun_prefers_pmi2_for_mpich(tmp_path):
    python = _script(tmp_path / "python-mpich", FAKE_MPICH_PYTHON)
    res, argv, calls = fake_srun(tmp_path, ["-n", "4", "generate", "--prompt", "hi"], LIST_22_05, PYTHON=python)
    assert res.returncode == 0, res.stderr
    assert argv == ["--mpi=pmi2", "--kill-on-bad-exit=1", "-n", "4", python, "-m", "ringlet", "generate", "--prompt",
                    "hi"]
    assert calls == ["list", "run"]
    assert res.stderr == "launch.sh: srun --mpi=pmi2 (srun offers: pmix none cray_shasta pmi2; mpi4py's MPI: mpich)\n"


def test_srun_without_n_uses_the_allocation(tmp_path):
    python = _script(tmp_path / "python-mpich", FAKE_MPICH_PYTHON)
    res, argv, _ = fake_srun(tmp_path, ["--mpi-args", "--overlap -N 1", "batch"], LIST_22_05, PYTHON=python)
    assert res.returncode == 0, res.stderr
    assert argv == ["--mpi=pmi2", "--kill-on-bad-exit=1", "--overlap", "-N", "1", python, "-m", "ringlet", "batch"]


def test_srun_takes_pmix_for_open_mpi(tmp_path):
    python = _script(tmp_path / "python-openmpi", FAKE_OPENMPI_PYTHON)
    res, argv, _ = fake_srun(tmp_path, ["-n", "2", "serve"], LIST_22_05, PYTHON=python)
    assert res.returncode == 0, res.stderr
    assert argv == ["--mpi=pmix", "--kill-on-bad-exit=1", "-n", "2", python, "-m", "ringlet", "serve"]


def test_srun_takes_pmix_when_only_pmix_is_offered(tmp_path):
    res, argv, _ = fake_srun(tmp_path, ["serve"], listing_err=LIST_OLD_PMIX_ONLY)
    assert res.returncode == 0, res.stderr
    assert argv[0] == "--mpi=pmix"


def test_srun_falls_back_to_pmi2_on_an_empty_list(tmp_path):
    res, argv, _ = fake_srun(tmp_path, ["serve"])
    assert res.returncode == 0, res.stderr
    assert argv[0] == "--mpi=pmi2"


def test_srun_plugin_from_environment(tmp_path):
    res, argv, calls = fake_srun(tmp_path, ["-n", "3", "serve"], LIST_22_05, RINGLET_SRUN_MPI="pmix_v4")
    assert res.returncode == 0, res.stderr
    assert argv[:4] == ["--mpi=pmix_v4", "--kill-on-bad-exit=1", "-n", "3"]
    assert calls == ["run"]
    assert res.stderr == "launch.sh: srun --mpi=pmix_v4 (from RINGLET_SRUN_MPI)\n"


def test_inside_an_srun_step_runs_the_rank_itself(tmp_path):
    res, argv, calls = fake_srun(tmp_path, ["--module", "ringlet.mpi"], LIST_22_05,
                                 SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="1", SLURM_PROCID="0")
    assert res.returncode == 0, res.stderr
    assert calls == [] and argv is None
    [line] = rank_lines(res.stdout)
    assert line["world_size"] == 1


def test_inside_an_srun_step_refuses_more_ranks(tmp_path):
    res, _, calls = fake_srun(tmp_path, ["-n", "2", "serve"], LIST_22_05, SLURM_STEP_ID="0")
    assert res.returncode == 2
    assert calls == []
    assert "already inside srun step 42.0" in res.stderr


# --- device choice and CI ---------------------------------------------------------------------------------------

def test_device_for():
    import torch

    info = RankInfo(rank=5, world_size=8, local_rank=3, local_size=4)
    if not torch.cuda.is_available():
        assert device_for(info, torch) == torch.device("cpu")
    two_gpus = types.SimpleNamespace(device=torch.device,
                                     cuda=types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 2))
    assert device_for(info, two_gpus) == torch.device("cuda:1")
    no_gpu = types.SimpleNamespace(device=torch.device,
                                   cuda=types.SimpleNamespace(is_available=lambda: False, device_count=lambda: 0))
    assert device_for(info, no_gpu) == torch.device("cpu")


def test_ci_runs_the_readme_test_command():
    res = run(["bash", str(REPO / ".ci" / "run"), "--print"], clean_env())
    assert res.returncode == 0, res.stderr
    [command] = res.stdout.splitlines()
    assert "pytest" in command
