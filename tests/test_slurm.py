"""ringlet under a real SLURM: a one-node cluster (tests/slurm_cluster.py, the `slurm` fixture) runs the README's
sbatch example (mpi/examples/batch.sbatch, submitted unchanged; only sbatch options and its environment variables
fit it to this node) with `sbatch --wait`: its output equals one rank's, it survives scancel and resubmission, a
failing rank fails the job with the cause in its log, and launch.sh starts the ranks with srun, never mpirun."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from datetime import datetime
from types import SimpleNamespace

import pytest
from mpi_util import (
    LAUNCH,
    REPO,
    finish,
    read_jsonl,
    run,
    start,
    write_jsonl,
    write_random_model,
)

EXAMPLE = REPO / "mpi" / "examples" / "batch.sbatch"
# The example asks for 2 nodes of 2 ranks and 2 GPUs; these options fit it to one node without GPUs (a GPU request
# there is refused at submission: "Invalid generic resource (gres) specification"); its 2 ranks per node stay.
ON_THIS_NODE = ("--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1")
LINES = 24
BOUND = 60  # seconds within which a failing rank must have ended its job
MPIRUN_SHIM = """#!/bin/sh
echo "mpirun shim: $0 was called inside a SLURM allocation" >&2
exit 97
"""


def rows(n: int) -> list[dict]:
    # Different lengths, so lines finish at different steps and the journal grows one line at a time.
    return [{"id": f"q{i}", "prompt": [100 + (13 * i + 7 * j) % 3000 for j in range(2 + i % 5)],
             "max_tokens": 20 + (i * 7) % 40, "ignore_eos": True} for i in range(n)]


@pytest.fixture(scope="module")
def work(tmp_path_factory, checkpoint):
    """A small random model, a JSONL of LINES prompts, the single-rank output (`python -m ringlet batch` without
    MPI) to compare with, and a PATH whose mpirun and mpiexec fail loudly."""
    d = tmp_path_factory.mktemp("slurm")
    model = write_random_model(d / "model", checkpoint.tokenizer, seed=7)
    src = write_jsonl(d / "in.jsonl", rows(LINES))
    ref = run([sys.executable, "-m", "ringlet", "batch", "--model", str(model), "--input", str(src),
               "--output", str(d / "ref.jsonl"), "--no-progress"], timeout=120)
    assert ref.returncode == 0, ref.stderr
    shims = d / "shims"
    shims.mkdir()
    for name in ("mpirun", "mpiexec"):
        (shims / name).write_text(MPIRUN_SHIM)
        (shims / name).chmod(0o755)
    return SimpleNamespace(model=model, src=src, ref=read_jsonl(d / "ref.jsonl"),
                           path=f"{shims}{os.pathsep}{os.environ['PATH']}")


def submit_example(slurm, work, tmp_path, *batch_flags):
    """`sbatch --wait` the README example, as the README says to, with its settings in the environment; returns
    the running sbatch (its first stdout line is the job id), the output and the job's log paths."""
    out, log = tmp_path / "out.jsonl", tmp_path / "job.log"
    env = slurm.env(MODEL=str(work.model), INPUT=str(work.src), OUTPUT=str(out), TP="1", DP="2", PATH=work.path)
    proc = start(["sbatch", "--parsable", "--wait", *ON_THIS_NODE, f"--output={log}", str(EXAMPLE),
                  "--no-progress", *batch_flags], env)
    job = proc.stdout.readline().strip()
    assert job.isdigit(), finish(proc, 10)
    return proc, job, out, log


def run_example(slurm, work, tmp_path, *batch_flags):
    """Submit the example and wait for it; returns (sbatch's exit code, output path, log text, completion record)."""
    proc, job, out, log = submit_example(slurm, work, tmp_path, *batch_flags)
    res = finish(proc, 150)
    return res.returncode, out, log.read_text(), slurm.wait_ended(job)


def lines_of(path) -> int:
    """Complete lines in a file (a journal), 0 while it does not exist."""
    return path.read_text().count("\n") if path.exists() else 0


def duration(record: dict) -> float:
    """Seconds from the job's start to its end, from its completion record."""
    start_time, end = (datetime.fromisoformat(record[k]) for k in ("StartTime", "EndTime"))
    return (end - start_time).total_seconds()


def test_example_job_output_equals_one_rank(slurm, work, tmp_path):
    rc, out, log, record = run_example(slurm, work, tmp_path)
    assert rc == 0 and record["JobState"] == "COMPLETED", log
    assert "launch.sh: srun --mpi=pmi2 (srun offers: " in log and "mpi4py's MPI: mpich" in log
    assert "mpirun shim" not in log
    assert '"ranks": 2' in log and '"dp": 2' in log
    got = read_jsonl(out)
    assert [r["id"] for r in got] == [f"q{i}" for i in range(LINES)]
    assert got == work.ref


def test_scancel_then_resubmit_loses_and_duplicates_nothing(slurm, work, tmp_path):
    # One sequence per replica at a time, so the journal grows line by line while the job runs.
    proc, job, out, log = submit_example(slurm, work, tmp_path, "--max-num-seqs", "1")
    journal = out.with_name(out.name + ".journal")
    deadline = time.monotonic() + 100
    while lines_of(journal) < 3:
        assert proc.poll() is None, f"the job ended before it could be cancelled:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no 3 lines done within 100 s:\n{log.read_text()}"
        time.sleep(0.05)
    slurm.run("scancel", job)
    cancelled = finish(proc, 60)
    record = slurm.wait_ended(job)  # every process of the job is gone: the journal is final
    assert cancelled.returncode != 0 and record["JobState"] == "CANCELLED", log.read_text()
    assert not out.exists()
    kept = lines_of(journal)
    assert 3 <= kept < LINES, "the job finished before scancel took effect: make its lines longer"

    rc, out, log_text, record = run_example(slurm, work, tmp_path, "--max-num-seqs", "1")
    assert rc == 0 and record["JobState"] == "COMPLETED", log_text
    assert f"resuming: {kept} of {LINES} lines already done" in log_text
    got = read_jsonl(out)
    assert [r["id"] for r in got] == [f"q{i}" for i in range(LINES)]
    assert got == work.ref
    assert not journal.exists()


def test_killed_rank_fails_the_job(slurm, work, tmp_path):
    # Heartbeats would end the job only after 120 s: within BOUND only srun (--kill-on-bad-exit) can have ended it.
    proc, job, out, log = submit_example(slurm, work, tmp_path, "--max-num-seqs", "1", "--heartbeat-timeout", "120")
    journal = out.with_name(out.name + ".journal")
    deadline = time.monotonic() + 100
    while lines_of(journal) < 1:
        assert proc.poll() is None, f"the job ended early:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no line done within 100 s:\n{log.read_text()}"
        time.sleep(0.05)
    # `scontrol listpids`: PID JOBID STEPID LOCALID GLOBALID; step 0 is launch.sh's srun, GLOBALID its rank.
    listed = [line.split() for line in slurm.run("scontrol", "listpids", job).stdout.splitlines()[1:]]
    rank1 = [int(f[0]) for f in listed if f[2] == "0" and f[4] == "1"]
    assert rank1, listed
    for pid in rank1:  # the rank and any process it started, as a lost node would take them
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    res = finish(proc, BOUND + 30)
    record = slurm.wait_ended(job)
    assert time.monotonic() - killed < BOUND
    text = log.read_text()
    assert res.returncode != 0 and record["JobState"] == "FAILED", text
    assert "task 1: Killed" in text, text  # srun's report names the rank (task = rank)


def test_rank_that_raises_fails_the_job(slurm, tmp_path, work):
    log = tmp_path / "job.log"
    env = slurm.env(PYTHONPATH=str(REPO / "tests"), PATH=work.path)
    began = time.monotonic()
    # tests/mpi_fail_check.py: rank 1 raises a second after start-up while rank 0 waits for it.
    res = run(["sbatch", "--parsable", "--wait", "--ntasks=2", f"--output={log}",
               "--wrap", f"{LAUNCH} --module mpi_fail_check 1"], timeout=BOUND + 30, env=env)
    record = slurm.wait_ended(res.stdout.split()[0])
    text = log.read_text()
    assert res.returncode != 0 and record["JobState"] == "FAILED", text
    assert time.monotonic() - began < BOUND + 10 and duration(record) < BOUND
    assert "ringlet: rank 1 failed: ValueError: boom on purpose; ending all ranks" in text, text
    assert "launch.sh: srun --mpi=pmi2" in text and "mpirun shim" not in text


def test_launch_in_salloc_uses_srun_and_the_allocation(slurm, work):
    res = run(["salloc", "--ntasks=3", "--overcommit", LAUNCH, "--module", "ringlet.mpi"], timeout=60,
              env=slurm.env(PATH=work.path))
    assert res.returncode == 0, res.stderr
    assert "launch.sh: srun --mpi=pmi2 (srun offers: " in res.stderr and "mpirun shim" not in res.stderr
    ranks = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert [r["rank"] for r in ranks] == [0, 1, 2]
    assert {r["world_size"] for r in ranks} == {3}
    assert len({r["pid"] for r in ranks}) == 3


def test_srun_plugin_from_environment(slurm, work):
    # A plugin that gives MPICH no process manager: every rank comes up alone, which ringlet.mpi refuses.
    res = run(["salloc", "--ntasks=2", LAUNCH, "--module", "ringlet.mpi"], timeout=60,
              env=slurm.env(PATH=work.path, RINGLET_SRUN_MPI="none"))
    assert res.returncode != 0
    assert "launch.sh: srun --mpi=none (from RINGLET_SRUN_MPI)" in res.stderr
    assert "started 2 ranks (SLURM_STEP_NUM_TASKS=2) but MPI sees a world of 1" in res.stderr, res.stderr
