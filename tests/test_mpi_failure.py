"""A rank that raises, is killed or stops ends the whole job within 30 s, with a message naming the rank."""
import os
import signal
import sys
import time

import pytest
from mpi_util import (
    LAUNCH,
    REPO,
    clean_env,
    finish,
    mpirun_path,
    rank_pid,
    run,
    start,
    write_jsonl,
    write_random_model,
)

BOUND = 30


@pytest.fixture(scope="module")
def job(tmp_path_factory, checkpoint):
    d = tmp_path_factory.mktemp("failure")
    model = write_random_model(d / "model", checkpoint.tokenizer, seed=6)
    src = write_jsonl(d / "in.jsonl", [{"id": f"q{i}", "prompt": [100 + i, 200, 300], "max_tokens": 400,
                                        "ignore_eos": True} for i in range(64)])
    return model, src, d


def _start_batch(job, tmp_path, *extra):
    model, src, _ = job
    out = tmp_path / "out.jsonl"
    proc = start([LAUNCH, "-n", "2", "batch", "--model", str(model), "--input", str(src), "--output", str(out),
                  "--max-num-seqs", "2", "--no-progress", *extra])
    journal = tmp_path / "out.jsonl.journal"
    deadline = time.monotonic() + 100
    while not (journal.exists() and journal.stat().st_size > 0):  # set-up is over, work is flowing
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no line finished within 100 s"
        time.sleep(0.1)
    return proc


def test_killed_rank_ends_the_job_and_is_named(job, tmp_path):
    proc = _start_batch(job, tmp_path)
    pid = rank_pid(proc.pid, 1)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    res = finish(proc, BOUND + 10)
    assert time.monotonic() - killed < BOUND
    assert res.returncode != 0
    assert f"ringlet: rank 1 (pid {pid} on" in res.stderr and "killed (SIGKILL)" in res.stderr, res.stderr


def test_stopped_rank_ends_the_job_and_is_named(job, tmp_path):
    proc = _start_batch(job, tmp_path, "--heartbeat-timeout", "8")
    pid = rank_pid(proc.pid, 1)
    os.kill(pid, signal.SIGSTOP)  # alive but silent: only the heartbeats can tell
    stopped = time.monotonic()
    try:
        res = finish(proc, BOUND + 10)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert time.monotonic() - stopped < BOUND
    assert res.returncode != 0
    assert f"ringlet: rank 1 (pid {pid} on" in res.stderr and "sent no heartbeat" in res.stderr, res.stderr


def test_rank_that_raises_ends_every_rank(tmp_path):
    began = time.monotonic()
    res = run([mpirun_path(), "-n", "3", "-bind-to", "none", sys.executable, str(REPO / "tests" / "mpi_fail_check.py"),
               "2"], timeout=BOUND + 30, env=clean_env())
    assert time.monotonic() - began < BOUND + 20  # start-up included
    assert res.returncode != 0
    assert "ringlet: rank 2 failed: ValueError: boom on purpose; ending all ranks" in res.stderr, res.stderr
