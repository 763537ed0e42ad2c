"""DP-2 offline batch throughput against one rank, in the same job: the router and replica code `batch` runs,
on a Llama-7B-shaped model with random bf16 weights (one whole replica per GPU).

    mpirun -n 2 python3 bench/dp_batch.py [--out bench/results/dp_batch-<gpu>-<date>.json]
    mpirun -n 2 python3 bench/dp_batch.py --smoke      # tiny model on the CPU: checks the script runs

The workload: --requests prompts of random token ids (lengths uniform in [--min-prompt, --max-prompt]) asking for
uniform [--min-tokens, --max-tokens] new tokens each (greedy, ignore_eos), fixed seed, so both phases do the same
work. Phase 1: rank 0 alone routes every request to its own engine (`ringlet.mpi.router.route`, one replica;
longest max_tokens first, as `batch` does), then rank 1 alone does the same on its GPU. Phase 2: rank 0 routes to
both replicas (least-loaded first, results back over MPI), rank 1 follows. Before any phase each rank
runs a warm-up pass whose batch shrinks from --max-num-seqs to 1 and whose prompts span the workload's lengths, so
CUDA graphs are captured and kernels compiled before the clock starts. Reported: generated tokens per second of
each phase; `ratio`, DP-2 against the mean of the two ranks alone (DESIGN.md target: >= 1.95x), and `ratio_vs_rank0`
against rank 0 alone: the two GPUs need not run equally fast (alone, 10.80 and 10.96 ms an engine step in
bench/results/dp_batch-2xH200-2026-11-27-512-per-rank-baseline.json), and a one-GPU baseline counts their
difference as DP's gain or loss; and per replica its requests, engine steps, tokens per step and milliseconds per
step.
"""
from __future__ import annotations

import argparse
import datetime
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI
from ringlet.checkpoint import Checkpoint
from ringlet.config import ModelConfig
from ringlet.engine import Engine, EngineConfig
from ringlet.model import random_weights
from ringlet.mpi.control import Mailbox
from ringlet.mpi.ranks import device_for, discover
from ringlet.mpi.router import ReplicaServer, follow, route

from result_files import write_results

SMOKE = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=512,
                    name="smoke")
TARGET = 1.95


def workload(args, vocab: int) -> list[dict]:
    """The timed requests: router items {"i", "prompt" (token ids), "params"}."""
    rng = random.Random(0)
    items = []
    for i in range(args.requests):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(args.min_prompt, args.max_prompt))]
        params = {"max_tokens": rng.randint(args.min_tokens, args.max_tokens), "temperature": 0.0,
                  "ignore_eos": True}
        items.append({"i": i, "prompt": prompt, "params": params})
    return items


def warm_up_items(args) -> list[dict]:
    """max_num_seqs requests asking for 1..max_num_seqs tokens, so the batch passes every graph bucket, with prompt
    lengths spread over the workload's range, so the prefill kernels for those lengths compile here and not in a
    timed phase."""
    n = args.max_num_seqs
    lengths = [args.min_prompt + (args.max_prompt - args.min_prompt) * i // max(1, n - 1) for i in range(n)]
    return [{"i": i, "prompt": [5 + (i + j) % 97 for j in range(length)],
             "params": {"max_tokens": i + 1, "temperature": 0.0, "ignore_eos": True}}
            for i, length in enumerate(lengths)]


class CountingServer(ReplicaServer):
    """A ReplicaServer that also counts, per phase, its engine steps, the seconds spent inside them and what it
    finished: a DP phase slower than its share shows whether replicas ran fewer sequences per step (idle slots)
    or slower steps."""

    def __init__(self, engine: Engine):
        super().__init__(engine)
        self.reset()

    def reset(self) -> None:
        self.requests, self.tokens, self.steps, self.step_s = 0, 0, 0, 0.0

    def step(self) -> None:
        start = time.perf_counter()
        super().step()
        self.step_s += time.perf_counter() - start
        self.steps += 1

    def take(self) -> list[dict]:
        done = super().take()
        self.requests += len(done)
        self.tokens += sum(len(r.get("token_ids", ())) for r in done)
        return done

    def counts(self) -> np.ndarray:
        return np.array([self.requests, self.tokens, self.steps, self.step_s], dtype=np.float64)


def replica_stats(counts: np.ndarray, seconds: float) -> dict:
    """One replica's phase from CountingServer.counts(); seconds: the phase's wall time."""
    requests, tokens, steps, step_s = counts.tolist()
    return {"requests": int(requests), "generated_tokens": int(tokens), "steps": int(steps),
            "tokens_per_step": round(tokens / max(steps, 1), 2), "ms_per_step": round(1e3 * step_s / max(steps, 1), 3),
            "outside_steps_s": round(seconds - step_s, 3)}


def run_phase(server: ReplicaServer, items: list[dict], capacity: int, mailbox, leaders) -> tuple[float, int]:
    """Rank 0: route items over the replicas; (seconds, generated tokens)."""
    generated = 0

    def count(result: dict) -> None:
        nonlocal generated
        generated += len(result["token_ids"])

    start = time.perf_counter()
    route(server, items, count, capacity, mailbox, leaders)
    return time.perf_counter() - start, generated


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--shape", default="llama-7b")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--min-prompt", type=int, default=None)
    ap.add_argument("--max-prompt", type=int, default=None)
    ap.add_argument("--min-tokens", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=None, help="sequences each replica runs at once")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    smoke_defaults = {"requests": 12, "min_prompt": 4, "max_prompt": 24, "min_tokens": 4, "max_tokens": 12,
                      "max_num_seqs": 4}
    gpu_defaults = {"requests": 512, "min_prompt": 64, "max_prompt": 512, "min_tokens": 64, "max_tokens": 256,
                    "max_num_seqs": 64}
    for k, v in (smoke_defaults if args.smoke else gpu_defaults).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    info = discover()
    world = MPI.COMM_WORLD
    if info.world_size != 2:
        ap.error("run under mpirun -n 2")
    device = torch.device("cpu") if args.smoke else device_for(info, torch)
    if not args.smoke and device.type != "cuda":
        ap.error("no CUDA GPU on this rank: run on 2 GPUs, or pass --smoke")
    if args.smoke:
        torch.set_num_threads(1)
    else:
        torch.cuda.set_device(device)  # Triton launches on the current device
    cfg = SMOKE if args.smoke else ModelConfig.from_name(args.shape)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    max_len = args.max_prompt + args.max_tokens + 16
    engine = Engine(Checkpoint(cfg, random_weights(cfg, dtype, device), None, "random"),
                    EngineConfig(device=str(device), dtype="bf16" if device.type == "cuda" else "fp32",
                                 max_num_seqs=args.max_num_seqs, max_model_len=max_len,
                                 kv_cache_tokens=(args.max_num_seqs + 1) * max_len))
    server = CountingServer(engine)
    items = workload(args, cfg.vocab_size)
    mailbox = Mailbox(world.Dup())
    result = {}

    # Phase 1: each rank's replica alone, rank 0 first; the other rank waits.
    run_phase(server, warm_up_items(args), args.max_num_seqs, None, None)
    for rank in (0, 1):
        world.Barrier()
        server.reset()
        if info.rank == rank:
            seconds, tokens = run_phase(server, items, args.max_num_seqs, None, None)
            alone = np.array([seconds, tokens, *server.counts()])
    # Each rank's phase to rank 0 as numbers (Gather), not pickled objects: seconds, tokens, then its counts.
    rows = np.zeros((2, len(alone))) if info.rank == 0 else None
    world.Gather(alone, rows, root=0)
    if info.rank == 0:
        result["one_rank"] = [{"rank": rank, "seconds": round(row[0], 3), "generated_tokens": int(row[1]),
                               "tok_s": round(row[1] / row[0], 1), "replica": replica_stats(row[2:], row[0])}
                              for rank, row in enumerate(rows)]
        print(json.dumps({"one_rank": result["one_rank"]}), flush=True)
    world.Barrier()
    server.reset()

    # Phase 2: both replicas, rank 0 routing.
    if info.rank == 0:
        seconds, tokens = run_phase(server, items, args.max_num_seqs, mailbox, [0, 1])
        result["dp2"] = {"seconds": round(seconds, 3), "generated_tokens": tokens, "tok_s": round(tokens / seconds, 1)}
        one = [r["tok_s"] for r in result["one_rank"]]
        result["ratio"] = round(2 * result["dp2"]["tok_s"] / sum(one), 3)
        result["ratio_vs_rank0"] = round(result["dp2"]["tok_s"] / one[0], 3)
    else:
        seconds = 0.0
        follow(server, mailbox)
    # Each rank's counts to rank 0 as numbers (Gather), not pickled objects.
    every = np.zeros((2, 4)) if info.rank == 0 else None
    world.Gather(server.counts(), every, root=0)
    if info.rank == 0:
        result["dp2"]["replicas"] = [replica_stats(c, seconds) for c in every]
        print(json.dumps({"dp2": result["dp2"], "ratio": result["ratio"], "ratio_vs_rank0": result["ratio_vs_rank0"]}),
              flush=True)
    world.Barrier()
    if info.rank == 0:
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu-smoke"
        date = datetime.date.today().isoformat()
        out = write_results("dp_batch", gpu, date, args.out, {
            "gpu": gpu, "date": date, "torch": torch.__version__, "shape": cfg.name, "target": TARGET,
            "workload": {k: getattr(args, k) for k in gpu_defaults}, **result})
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
