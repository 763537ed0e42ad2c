"""`batch` over real mpirun: data-parallel output equals one rank's; kill-and-resume loses and duplicates nothing."""
import json
import os
import signal
import time

import pytest
from mpi_util import (
    LAUNCH,
    batch,
    finish,
    read_jsonl,
    start,
    write_jsonl,
    write_random_model,
)
from ringlet.batch import Journal, Line, load_finished_output, read_input


@pytest.fixture(scope="module")
def model(tmp_path_factory, checkpoint):
    return write_random_model(tmp_path_factory.mktemp("batch") / "model", checkpoint.tokenizer, seed=5)


def rows(n: int) -> list[dict]:
    # Different lengths, so lines finish at different steps and the journal grows one line at a time.
    return [{"id": f"q{i}", "prompt": [100 + (11 * i + 5 * j) % 3000 for j in range(2 + i % 5)],
             "max_tokens": 3 + (i * 7) % 13, "ignore_eos": True} for i in range(n)]


def test_dp_output_equals_one_rank(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "a", "prompt": "Once upon a time", "max_tokens": 4},
        {"id": "b", "prompt": "The capital of France is", "max_tokens": 3},
        {"custom_id": "c", "body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}},
        {"id": "d", "prompt": "", "max_tokens": 3},  # refused by the engine: an error line, not a failed job
        {"id": "e", "prompt": "1, 2, 3,", "max_tokens": 5, "temperature": 0.8, "seed": 7}])
    one = batch(1, "--input", src, "--output", tmp_path / "one.jsonl")
    assert one.returncode == 0, one.stderr
    two = batch(2, "--input", src, "--output", tmp_path / "two.jsonl")
    assert two.returncode == 0, two.stderr
    assert '"dp": 2' in two.stdout
    expected = read_jsonl(tmp_path / "one.jsonl")
    assert read_jsonl(tmp_path / "two.jsonl") == expected
    assert [r.get("id", r.get("custom_id")) for r in expected] == ["a", "b", "c", "d", "e"]
    assert "error" in expected[3] and "empty" in expected[3]["error"]


def test_kill_and_resume_loses_and_duplicates_nothing(tmp_path, model):
    src = write_jsonl(tmp_path / "in.jsonl", rows(16))
    ref = batch(1, "--model", model, "--input", src, "--output", tmp_path / "ref.jsonl")
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "out.jsonl"
    journal = tmp_path / "out.jsonl.journal"
    proc = start([LAUNCH, "-n", "2", "batch", "--model", str(model), "--input", str(src), "--output", str(out),
                  "--max-num-seqs", "1", "--no-progress"])
    deadline = time.monotonic() + 100
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the batch finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job at once, as a node failure or scancel would
    finish(proc, 30)
    assert not out.exists()
    kept = journal.read_text().count("\n")
    assert 3 <= kept < 16
    res = batch(2, "--model", model, "--input", src, "--output", out)
    assert res.returncode == 0, res.stderr
    resumed = json.loads(res.stdout.splitlines()[-1])["resumed"]
    assert resumed >= 3 and f"resuming: {resumed} of 16 lines already done" in res.stderr
    got = read_jsonl(out)
    assert [r["id"] for r in got] == [f"q{i}" for i in range(16)]
    assert got == read_jsonl(tmp_path / "ref.jsonl")
    assert not journal.exists()
    again = batch(2, "--model", model, "--input", src, "--output", out)  # complete: nothing left to run
    assert again.returncode == 0 and json.loads(again.stdout.splitlines()[-1])["resumed"] == 16
    assert read_jsonl(out) == got


# --- the journal alone (no MPI) -------------------------------------------------------------------------------

def test_journal_drops_a_torn_record_and_changed_lines(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"},
                                              {"id": "c", "prompt": "z"}])
    lines = read_input(str(src), {"max_tokens": 2})
    out = tmp_path / "out.jsonl"
    j = Journal(out)
    j.append(lines[0], {"id": "a", "index": 0, "text": "1"})
    j.append(lines[1], {"id": "b", "index": 1, "text": "2"})
    j.close()
    with open(j.path, "a") as f:
        f.write('{"index": 2, "digest": "')  # killed mid-write
    assert set(Journal(out).load(lines)) == {0, 1}
    assert j.path.read_text().endswith("\n")  # the torn tail is cut before anything is appended
    changed = read_input(str(write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x"},
                                                                 {"id": "b", "prompt": "CHANGED"},
                                                                 {"id": "c", "prompt": "z"}])), {"max_tokens": 2})
    assert set(Journal(out).load(changed)) == {0}


def test_finished_output_counts_only_when_ids_match(tmp_path):
    lines = [Line(0, "d0", "a", "id", {}), Line(1, "d1", "b", "id", {})]
    out = write_jsonl(tmp_path / "out.jsonl", [{"id": "a", "index": 0}, {"id": "b", "index": 1}])
    assert set(load_finished_output(out, lines)) == {0, 1}
    write_jsonl(out, [{"id": "a", "index": 0}, {"id": "x", "index": 1}])
    assert load_finished_output(out, lines) == {}


def test_router_starts_the_longest_requests_first(checkpoint):
    """One replica, one slot: items run one at a time, so the order results arrive in is the dispatch order."""
    from ringlet.engine import Engine, EngineConfig
    from ringlet.mpi.router import ReplicaServer, route

    lengths = [2, 5, 3, 5, 1]
    items = [{"i": i, "prompt": [100 + i, 200], "params": {"max_tokens": n, "ignore_eos": True}}
             for i, n in enumerate(lengths)]
    items.append({"i": 5, "prompt": [300], "params": {"max_tokens": "many"}})  # rejected, never fatal
    finished = []
    route(ReplicaServer(Engine(checkpoint, EngineConfig(device="cpu", max_num_seqs=1))), items, finished.append,
          capacity=1)
    ran = [r for r in finished if "error" not in r]
    assert [r["i"] for r in ran] == [1, 3, 2, 0, 4]
    assert [len(r["token_ids"]) for r in ran] == [5, 5, 3, 2, 1]
    assert [r["i"] for r in finished if "error" in r] == [5]
