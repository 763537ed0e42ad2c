"""Serving load: throughput and latency of `ringlet serve` under 1, 8, 32 and 64 concurrent streams.

    python bench/serve_load.py --shape llama-7b [--out bench/results/serve_load-<gpu>-<date>.json]
    python bench/serve_load.py --shape llama-7b --dp 2        # ./launch.sh -n 2 serve --dp 2 (one GPU per rank)
    python bench/serve_load.py --model DIR [--dp 2]           # a checkpoint of your own
    python bench/serve_load.py --url http://127.0.0.1:8000    # a server that is already running
    python bench/serve_load.py --smoke --out /tmp/s.json      # CPU: a tiny random model, 1 and 4 streams

--shape writes a random-weight HF checkpoint of that shape (bf16, ringlet.config's named shapes, a synthetic
word-level tokenizer) to --model-dir once, in a child process so this one never holds the GPU, and serves it.
Every request is a streamed /v1/completions of --prompt-tokens random token ids (fixed seed), --max-tokens
tokens, greedy, ignore_eos, so every request does the same work. Per concurrency level C: C short warm-up
requests (not measured: they capture that batch size's CUDA graphs), then max(--min-requests, --rounds x C)
requests, C in flight at a time.

Measured at the client (asyncio + httpx, server-sent events read as they arrive):
  throughput     generated tokens (usage.completion_tokens) / wall time of the level's measured requests
  TTFT           request sent -> first token's chunk received, p50 and p99 over requests
  ITL            between consecutive token chunks of one stream, p50 and p99 over all gaps
and, from the server's /metrics over the same requests, its preemptions and its own mean TTFT and ITL.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from result_files import write_results

REPO = Path(__file__).resolve().parents[1]
GPU_LEVELS = [1, 8, 32, 64]
SMOKE_LEVELS = [1, 4]


# ----------------------------------------------------------------------------------------------- the model

def write_random_model(directory: Path, shape: str, smoke: bool) -> None:
    """A random-weight HF Llama directory of `shape` (or a 2-layer dim-64 one with --smoke) and a synthetic
    word-level tokenizer over the same vocabulary (token i is "wI"; decoding joins with spaces), made with the
    `tokenizers` package alone, so no bundled model is needed. Runs in a child process: weights are drawn on its
    GPU when it has one."""
    import torch
    from ringlet.config import ModelConfig
    from ringlet.hf_loader import hf_name
    from ringlet.model import random_weights
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    if smoke:
        cfg = ModelConfig(vocab_size=4096, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, head_dim=16,
                          max_seq_len=1024, name="smoke")
    else:
        cfg = ModelConfig.from_name(shape)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if smoke else torch.bfloat16
    weights = random_weights(cfg, dtype, device)
    tmp = directory.with_name(directory.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.dim,
              "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
              "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
              "rms_norm_eps": cfg.rms_eps, "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_seq_len,
              "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
              "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32" if smoke else "bfloat16"}
    (tmp / "config.json").write_text(json.dumps(config))
    save_file({hf_name(n): t.contiguous().cpu() for n, t in weights.items()}, str(tmp / "model.safetensors"))
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(cfg.vocab_size)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps({"bos_token": "w1", "eos_token": "w2",
                                                            "add_bos_token": False}))
    tmp.rename(directory)  # only a complete directory ever has the final name


def ensure_model(args) -> Path:
    """The checkpoint to serve: --model, else --shape's (or --smoke's) random one, written unless already there."""
    if args.model:
        return Path(args.model)
    if args.smoke:
        directory = Path(tempfile.mkdtemp(prefix="ringlet-serve-smoke-")) / "model"
    else:
        directory = Path(args.model_dir or Path(tempfile.gettempdir()) / f"ringlet-{args.shape}-random")
    if not (directory / "config.json").is_file():
        print(f"writing a random {'smoke' if args.smoke else args.shape} checkpoint to {directory}", flush=True)
        child = multiprocessing.get_context("spawn").Process(target=write_random_model,
                                                            args=(directory, args.shape, args.smoke))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"writing the random checkpoint failed (exit {child.exitcode})")
    return directory


# ---------------------------------------------------------------------------------------------- the server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, model: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    serve = ["serve", "--model", str(model), "--served-model-name", "bench", "--port", str(port),
             "--max-num-seqs", str(args.max_num_seqs), "--max-queue", "4096",
             "--max-model-len", str(args.prompt_tokens + args.max_tokens + 16), *args.serve_args.split()]
    if args.dp > 1:
        command = [str(REPO / "launch.sh"), "-n", str(args.dp), *serve, "--dp", str(args.dp)]
    else:
        command = [sys.executable, "-m", "ringlet", *serve]
    env = dict(os.environ)
    if args.smoke:
        env["OMP_NUM_THREADS"] = "1"
    print("starting:", " ".join(command), flush=True)
    proc = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} before answering")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(1)
    stop_server(proc)
    raise SystemExit(f"the server did not answer /health within {args.start_timeout} s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def server_metrics(url: str) -> dict[str, float]:
    """Sums over labels of the server's counters and histograms we report ({sample name: value})."""
    wanted = ("ringlet_preemptions_total", "ringlet_time_to_first_token_seconds_sum",
              "ringlet_time_to_first_token_seconds_count", "ringlet_inter_token_latency_seconds_sum",
              "ringlet_inter_token_latency_seconds_count", "ringlet_generation_tokens_total")
    out = dict.fromkeys(wanted, 0.0)
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in family.samples:
            if s.name in out:
                out[s.name] += s.value
    return out


# ------------------------------------------------------------------------------------------------ the load

async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    arrivals: list[float] = []
    usage = None
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return {"error": f"{response.status_code}: {(await response.aread()).decode()[:200]}"}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                arrivals.append(time.perf_counter())
            elif chunk.get("usage"):
                usage = chunk["usage"]
    if not arrivals or usage is None:
        return {"error": "the stream ended without tokens or usage"}
    return {"ttft": arrivals[0] - start, "gaps": [b - a for a, b in zip(arrivals, arrivals[1:])],
            "tokens": usage["completion_tokens"], "end": arrivals[-1], "start": start}


async def run_level(url: str, model: str, prompts: list[list[int]], concurrency: int, requests: int,
                    max_tokens: int) -> list[dict]:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        queue = list(range(requests))
        results: list[dict] = []

        async def worker():
            while queue:
                i = queue.pop()
                results.append(await one_request(client, url, model, prompts[i % len(prompts)], max_tokens))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def summarize(results: list[dict], wall: float, before: dict, after: dict) -> dict:
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    ttft = [r["ttft"] for r in ok]
    gaps = [g for r in ok for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in ok)

    def delta(name):
        return after[name] - before[name]

    def mean(kind):
        n = delta(f"ringlet_{kind}_seconds_count")
        return round(delta(f"ringlet_{kind}_seconds_sum") / n * 1e3, 3) if n else None

    return {"requests": len(ok), "errors": len(errors), "first_error": errors[0] if errors else None,
            "generated_tokens": tokens, "wall_s": round(wall, 3), "throughput_tok_s": round(tokens / wall, 1),
            "requests_per_s": round(len(ok) / wall, 3),
            "ttft_ms": {"p50": round(percentile(ttft, 50) * 1e3, 2), "p99": round(percentile(ttft, 99) * 1e3, 2),
                        "mean": round(statistics.fmean(ttft) * 1e3, 2)} if ttft else None,
            "itl_ms": {"p50": round(percentile(gaps, 50) * 1e3, 3), "p99": round(percentile(gaps, 99) * 1e3, 3),
                       "mean": round(statistics.fmean(gaps) * 1e3, 3)} if gaps else None,
            "server": {"preemptions": delta("ringlet_preemptions_total"),
                       "generated_tokens": delta("ringlet_generation_tokens_total"),
                       "ttft_mean_ms": mean("time_to_first_token"), "itl_mean_ms": mean("inter_token_latency")}}


def gpu_name(dp: int) -> str:
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=30).stdout.split("\n")
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"
    name = names[0].strip().removeprefix("NVIDIA ").split()[0] if names and names[0].strip() else "cpu"
    return f"{dp}x{name}" if dp > 1 else name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = ap.add_mutually_exclusive_group()
    source.add_argument("--model", help="checkpoint to serve (an HF directory, a .gguf file, or 'default')")
    source.add_argument("--shape", help="serve a random-weight checkpoint of this shape, e.g. llama-7b")
    source.add_argument("--url", help="load an already running server instead of starting one")
    ap.add_argument("--model-dir", help="where --shape writes (and later reuses) its checkpoint "
                                        "(default: $TMPDIR/ringlet-SHAPE-random)")
    ap.add_argument("--smoke", action="store_true", help="CPU: a tiny random model, 1 and 4 streams")
    ap.add_argument("--dp", type=int, default=1, help="data-parallel replicas: ./launch.sh -n DP serve --dp DP")
    ap.add_argument("--levels", help="comma-separated concurrency levels (default 1,8,32,64; smoke 1,4)")
    ap.add_argument("--prompt-tokens", type=int, help="prompt length (default 256; smoke 16)")
    ap.add_argument("--max-tokens", type=int, help="tokens generated per request (default 256; smoke 16)")
    ap.add_argument("--rounds", type=int, default=2, help="measured requests per level = rounds x concurrency")
    ap.add_argument("--min-requests", type=int, default=8, help="at least this many measured requests per level")
    ap.add_argument("--max-num-seqs", type=int, default=64, help="the server's --max-num-seqs (per replica)")
    ap.add_argument("--serve-args", default="", help="more flags for `ringlet serve`, e.g. '--kv-dtype fp8'")
    ap.add_argument("--start-timeout", type=float, default=900, help="seconds to wait for the server to load")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if not (args.model or args.shape or args.url or args.smoke):
        ap.error("give --shape, --model, --url or --smoke")
    levels = [int(c) for c in (args.levels or ",".join(map(str, SMOKE_LEVELS if args.smoke else GPU_LEVELS))
                               ).split(",")]
    args.prompt_tokens = args.prompt_tokens or (16 if args.smoke else 256)
    args.max_tokens = args.max_tokens or (16 if args.smoke else 256)

    proc = None
    model_path = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        model_path = ensure_model(args)
        proc, url = start_server(args, model_path)
    try:
        model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        rng = random.Random(0)
        vocab = 4096  # ids every model here has (the smoke model's whole vocabulary)
        prompts = [[rng.randrange(3, vocab) for _ in range(args.prompt_tokens)] for _ in range(256)]
        runs = []
        for c in levels:
            asyncio.run(run_level(url, model, prompts, c, c, 16))  # warm-up: fills this batch size's graphs
            requests = max(args.min_requests, args.rounds * c)
            before = server_metrics(url)
            start = time.perf_counter()
            results = asyncio.run(run_level(url, model, prompts, c, requests, args.max_tokens))
            wall = time.perf_counter() - start
            row = {"concurrency": c, **summarize(results, wall, before, server_metrics(url))}
            runs.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if proc is not None:
            stop_server(proc)
            if args.smoke and model_path is not None:
                shutil.rmtree(model_path.parent, ignore_errors=True)
    gpu = "cpu-smoke" if args.smoke else gpu_name(args.dp)
    date = datetime.date.today().isoformat()
    out = write_results("serve_load", gpu, date, args.out, {
        "gpu": gpu, "date": date, "dp": args.dp, "model": args.shape or args.model or args.url or "smoke",
        "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "max_num_seqs": args.max_num_seqs,
        "serve_args": args.serve_args, "levels": levels, "runs": runs})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
