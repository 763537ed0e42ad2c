"""`python -m ringlet` as a user runs it: real subprocesses, one clear line and a non-zero exit on bad input."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ringlet(*args, stdin=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "ringlet", *args], capture_output=True, text=True,
                          input=stdin, timeout=timeout, cwd=ROOT)


def test_generate_json_gives_text_ids_and_timings(llm):
    out = ringlet("generate", "--prompt", "The capital of France is", "--max-tokens", "8", "--json")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert len(res["token_ids"]) <= 8 and res["finish_reason"] in ("stop", "length")
    assert res["prompt_token_ids"] == llm.tokenizer.encode("The capital of France is")
    from ringlet import SamplingParams
    api = llm.generate("The capital of France is", SamplingParams(max_tokens=8, temperature=0.0))[0]
    assert res["token_ids"] == api.token_ids and res["text"] == api.text
    assert res["timings"]["total_s"] > 0


def test_generate_streams_plain_text():
    out = ringlet("generate", "--prompt", "Hello", "--max-tokens", "4", "--chat")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_chat_reads_turns_from_stdin():
    out = ringlet("chat", "--max-tokens", "6", "--temperature", "0", stdin="Hi there\nWhat is 2+2?\n")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.strip().splitlines()) >= 2


@pytest.mark.parametrize("args, needle", [
    (["generate", "--prompt", "x", "--model", "/no/such/model.gguf"], "/no/such/model.gguf"),
    (["generate", "--prompt", ""], "prompt is empty"),
    (["generate", "--prompt", "x", "--max-tokens", "0"], "max_tokens"),
    (["generate", "--prompt", "x", "--temperature", "-1"], "temperature"),
    (["generate", "--prompt", "x", "--top-p", "1.5"], "top_p"),
    (["generate", "--prompt", "x", "--attention", "local:0"], "local:0"),
    (["eval", "README.md", "--attention", "local:256;99=dense"], "layer 99"),
    (["generate", "--prompt", "x", "--rope-scaling", "yarn:x"], "yarn:x"),
    (["generate", "--prompt", "x", "--rope-scaling", "yarn:2", "--max-model-len", "20000"], "16384"),
    (["generate", "--prompt", "word " * 9000], "context"),
    (["eval", "/no/such/file.txt"], "/no/such/file.txt"),
])
def test_bad_input_is_one_line_and_exit_1(args, needle):
    out = ringlet(*args)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in out.stderr, out.stderr


def test_generate_json_reports_attention_and_kv_memory():
    out = ringlet("generate", "--prompt", "The capital of France is", "--max-tokens", "4", "--json",
                  "--attention", "local:64;0=dense", "--kv-dtype", "fp8")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)["info"]
    assert info["attention"] == "local:64;0=dense" and info["kv_dtype"] == "float8_e4m3fn"
    assert info["kv_bytes_per_token"] == 11880  # 2 x 30 layers x 3 kv heads x (64 + 2 scale bytes)


def test_eval_json_reports_the_pattern(lee_path):
    out = ringlet("eval", "--data", lee_path, "--context", "64", "--limit-tokens", "128", "--json",
                  "--attention", "strided:8,16", "--kv-dtype", "fp8", "--rope-scaling", "yarn:2")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["attention"] == "strided:8,16" and res["kv_bytes_per_token"] == 11880
    assert res["rope_scaling"] == "yarn:2" and res["tokens_scored"] == 126 and res["perplexity"] > 1


def test_truncated_gguf_is_one_line(tmp_path):
    from ringlet.checkpoint import default_model_path
    bad = tmp_path / "cut.gguf"
    with open(default_model_path(), "rb") as f:
        bad.write_bytes(f.read(1 << 20))
    out = ringlet("generate", "--prompt", "x", "--model", str(bad))
    assert out.returncode == 1 and str(bad) in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_launch_sh_with_three_ranks_runs_the_work_once():
    out = subprocess.run([os.path.join(ROOT, "launch.sh"), "-n", "3", "generate", "--prompt", "Hi",
                          "--max-tokens", "3", "--json"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and len(json.loads(lines[0])["token_ids"]) <= 3
