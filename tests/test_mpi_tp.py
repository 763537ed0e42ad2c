"""Tensor parallel under real mpirun: greedy output token for token equal to one rank's; clear refusals."""
import json
import sys

import pytest
from mpi_util import (
    LAUNCH,
    batch,
    clean_env,
    mpirun_path,
    read_jsonl,
    run,
    write_jsonl,
    write_random_model,
)

PROMPTS = [{"id": "a", "prompt": "Once upon a time", "max_tokens": 5},
           {"id": "b", "messages": [{"role": "user", "content": "What is 7 times 8?"}], "max_tokens": 4},
           {"id": "c", "prompt": "The capital of France is", "max_tokens": 3}]


@pytest.fixture(scope="module")
def bundled_reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp_bundled")
    src = write_jsonl(d / "in.jsonl", PROMPTS)
    res = batch(1, "--input", src, "--output", d / "one.jsonl")
    assert res.returncode == 0, res.stderr
    return src, read_jsonl(d / "one.jsonl")


@pytest.mark.parametrize("comm", ["ring", "mpi"])
def test_bundled_model_tp3_equals_one_rank(bundled_reference, tmp_path, comm):
    # SmolLM2-135M: 9 query heads and 3 KV heads, 3 and 1 per rank.
    src, expected = bundled_reference
    res = batch(3, "--tp", 3, "--comm", comm, "--input", src, "--output", tmp_path / "tp3.jsonl")
    assert res.returncode == 0, res.stderr
    got = read_jsonl(tmp_path / "tp3.jsonl")
    assert [r["token_ids"] for r in got] == [r["token_ids"] for r in expected]
    assert got == expected
    assert '"tp": 3' in res.stdout


@pytest.fixture(scope="module")
def random_model(tmp_path_factory, checkpoint):
    d = tmp_path_factory.mktemp("tp_random")
    model = write_random_model(d / "model", checkpoint.tokenizer, seed=3)
    rows = [{"id": f"r{i}", "prompt": [(7 * i + j * 13) % 4000 + 100 for j in range(3 + i)], "max_tokens": 4 + i,
             "ignore_eos": True} for i in range(4)]
    src = write_jsonl(d / "in.jsonl", rows)
    res = batch(1, "--model", model, "--input", src, "--output", d / "one.jsonl")
    assert res.returncode == 0, res.stderr
    return model, src, read_jsonl(d / "one.jsonl")


@pytest.mark.parametrize("n,tp", [(2, 2), (4, 4), (4, 2)], ids=["tp2", "tp4-kv-replicated", "tp2xdp2"])
def test_random_model_tp_equals_one_rank(random_model, tmp_path, n, tp):
    model, src, expected = random_model
    res = batch(n, "--model", model, "--tp", tp, "--comm", "auto", "--input", src, "--output", tmp_path / "o.jsonl")
    assert res.returncode == 0, res.stderr
    got = read_jsonl(tmp_path / "o.jsonl")
    assert [len(r["token_ids"]) for r in got] == [4, 5, 6, 7]
    assert got == expected


@pytest.mark.parametrize("comm", ["ring", "mpi"])
def test_random_model_tp2_with_async_scheduling_equals_one_rank(random_model, tmp_path, comm):
    """The leader queues each decode step before it reads the last one's tokens; the plan it sends then carries
    no tokens, and the worker takes them from an all-reduce (its zeros plus the leader's tokens)."""
    model, src, expected = random_model
    res = batch(2, "--model", model, "--tp", 2, "--comm", comm, "--async-scheduling", "on", "--input", src,
                "--output", tmp_path / "o.jsonl")
    assert res.returncode == 0, res.stderr
    assert read_jsonl(tmp_path / "o.jsonl") == expected
    assert json.loads(res.stdout.splitlines()[-1])["steps_ahead"] > 0


def test_heads_that_do_not_split_fail_at_start(bundled_reference, tmp_path):
    src, _ = bundled_reference
    res = batch(2, "--tp", 2, "--input", src, "--output", tmp_path / "o.jsonl", timeout=60)
    assert res.returncode == 1
    lines = [line for line in res.stderr.splitlines() if line.startswith("ringlet")]
    assert len(lines) == 1 and "9 attention heads do not split evenly over 2 ranks" in lines[0], res.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_tp_times_dp_must_be_the_world(bundled_reference, tmp_path):
    src, _ = bundled_reference
    res = batch(2, "--tp", 1, "--dp", 3, "--input", src, "--output", tmp_path / "o.jsonl", timeout=60)
    assert res.returncode == 1
    assert "--tp 1 x --dp 3 = 3 ranks, but the job has 2" in res.stderr


def _mpmd(first: list, second: list, src, out):
    common = [sys.executable, "-m", "ringlet", "batch", "--input", str(src), "--output", str(out), "--no-progress"]
    return run([mpirun_path(), "-bind-to", "none", "-n", "1", *common, *map(str, first), ":", "-n", "1", *common,
                *map(str, second)], timeout=90, env=clean_env())


def test_ranks_with_different_weights_refuse(random_model, tmp_path, checkpoint):
    model, src, _ = random_model
    other = write_random_model(tmp_path / "other", checkpoint.tokenizer, seed=4)
    res = _mpmd(["--model", model], ["--model", other], src, tmp_path / "o.jsonl")
    assert res.returncode != 0
    assert "ranks disagree on the model weights: rank 1 has" in res.stderr, res.stderr


def test_ranks_with_different_settings_refuse(random_model, tmp_path):
    model, src, _ = random_model
    res = _mpmd(["--model", model], ["--model", model, "--kv-dtype", "fp32"], src, tmp_path / "o.jsonl")
    assert res.returncode != 0
    assert "ranks disagree on the configuration: rank 1 has" in res.stderr, res.stderr


def test_generate_tp2_equals_one_rank(random_model):
    model = random_model[0]
    flags = ["--model", str(model), "--prompt", "Once upon a time", "--max-tokens", "6", "--json"]
    one = run([sys.executable, "-m", "ringlet", "generate", *flags], env=clean_env())
    assert one.returncode == 0, one.stderr
    two = run([LAUNCH, "-n", "2", "generate", "--tp", "2", *flags])
    assert two.returncode == 0, two.stderr
    want, got = json.loads(one.stdout), json.loads(two.stdout)
    assert len(got["token_ids"]) == 6
    assert got["token_ids"] == want["token_ids"] and got["text"] == want["text"]


@pytest.mark.parametrize("launch,flags,message", [
    (["-n", "4"], ["--tp", "2"], "--dp must be 1, got 2"),
    (["-n", "1"], ["--tp", "2"], "--tp 2 needs 2 ranks: `./launch.sh -n 2 generate --tp 2 ...`"),
], ids=["two-replicas", "tp-without-ranks"])
def test_generate_refuses_a_layout_it_cannot_run(random_model, launch, flags, message):
    res = run([LAUNCH, *launch, "generate", "--model", str(random_model[0]), "--prompt", "hi", *flags])
    assert res.returncode == 1
    assert res.stderr.count("ringlet: error:") == 1 and message in res.stderr, res.stderr
