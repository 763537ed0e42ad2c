"""TP-2 decode against one GPU, in the same job: Llama-13B shape (40 layers, dim 5120, FFN 13824, 40 heads),
random bf16 weights, whole engine steps at batch 1 and 16.

    mpirun -n 2 python3 bench/tp_decode.py [--comm nccl] [--out bench/results/tp_decode-<gpu>-<date>.json]
    mpirun -n 2 python3 bench/tp_decode.py --smoke      # tiny model on the CPU (ring): checks the script runs
    mpirun -n 2 python3 bench/tp_decode.py --no-one-shot --no-spin   # what each of the two costs
    mpirun -n 2 python3 bench/tp_decode.py --profile 8   # also each kernel's GPU time (one GPU, TP-2 rank 0)
    mpirun -n 2 python3 bench/tp_decode.py --batches 16 --tp-splits 4   # TP-2 with decode attention split 4 ways

Phase 1: rank 0 alone runs the whole model on its GPU (rank 1 waits). Phase 2: both ranks build a TP-2 replica
(`ringlet.mpi.parallel.Replica`, the same code `batch --tp 2` runs): rank 0 schedules, samples and broadcasts each
step's plan, rank 1 replays it; the two all-reduces per layer go through --comm (nccl: captured in the decode CUDA
graphs). Reported: tokens/s and step time for each, and their ratio (targets in DESIGN.md: >= 1.65x at batch 1,
>= 1.8x at batch 16), each measured with async scheduling (the engine's default on GPUs: each decode step queued
before the previous one's tokens are read) and, beside it under "waiting", without. Token-id prompts of --context
tokens; greedy; ignore_eos. --no-one-shot sends every
all-reduce through NCCL (no symmetric-memory one-shot, see ringlet/mpi/nccl.py); --no-spin makes the worker sleep
while it waits for the next plan (see ringlet/mpi/parallel.py): for measuring what each saves.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import sys
from pathlib import Path

import torch
from mpi4py import MPI
from ringlet.checkpoint import Checkpoint
from ringlet.config import ModelConfig
from ringlet.engine import Engine, EngineConfig
from ringlet.kernels import decode_attention
from ringlet.model import random_weights
from ringlet.mpi import nccl, parallel
from ringlet.mpi.parallel import Replica, make_layout
from ringlet.mpi.ranks import device_for, discover

from result_files import write_results

# Decode timing is shared with bench/decode.py.
_spec = importlib.util.spec_from_file_location("bench_decode", Path(__file__).with_name("decode.py"))
bench_decode = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_decode)

SMOKE = ModelConfig(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=256, max_seq_len=512,
                    name="smoke")


def force_decode_splits(n: int) -> None:
    """Every decode attention launch from now on splits its keys n ways (the rule's choice is measured against
    forced counts this way; see also bench/attention.py --only splits)."""
    module = sys.modules[decode_attention.__module__]
    module._num_splits = lambda *args: n


def engine_config(args, device, batches) -> EngineConfig:
    max_len = args.context + args.steps + 32
    return EngineConfig(device=str(device), dtype="bf16" if device.type == "cuda" else "fp32",
                        max_num_seqs=max(batches), kv_cache_tokens=(max(batches) + 1) * (max_len + 16),
                        max_model_len=max_len + 16)


def timed_modes(engine: Engine, batch: int, args) -> list[tuple[float, float]]:
    """bench_ringlet's (tokens/s, seconds per step) without async scheduling, then with it."""
    results = []
    for on in (False, True):
        engine.async_scheduling = on
        results.append(bench_decode.bench_ringlet(engine, batch, args.context, args.steps))
    return results


def compared(one: tuple[float, float], tp2: tuple[float, float]) -> dict:
    """The report of one mode from bench_ringlet's (tokens/s, seconds per step) on one GPU and under TP-2."""
    return {"one_gpu_tok_s": round(one[0], 1), "tp2_tok_s": round(tp2[0], 1), "ratio": round(tp2[0] / one[0], 3),
            "one_gpu_step_ms": round(one[1] * 1e3, 3), "tp2_step_ms": round(tp2[1] * 1e3, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--comm", default=None, help="communicator (default: nccl on GPUs, ring with --smoke)")
    ap.add_argument("--context", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--no-one-shot", action="store_true", help="all-reduces through NCCL only")
    ap.add_argument("--no-spin", action="store_true", help="the worker sleeps while waiting for a plan")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="after the timing, profile this many steps of each (torch.profiler): kernel time per step")
    ap.add_argument("--tp-splits", type=int, default=0, metavar="N",
                    help="force decode attention's split count to N in the TP-2 phase (one GPU keeps its rule)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.no_one_shot:
        nccl.ONE_SHOT_BYTES = 0
    if args.no_spin:
        parallel.PLAN_SPIN_S = 0.0
    info = discover()
    world = MPI.COMM_WORLD
    if info.world_size != 2:
        ap.error("run under mpirun -n 2")
    device = torch.device("cpu") if args.smoke else device_for(info, torch)
    if not args.smoke and device.type != "cuda":
        ap.error("no CUDA GPU on this rank: run on 2 GPUs, or pass --smoke")
    cfg = SMOKE if args.smoke else ModelConfig.from_name("llama-13b")
    args.comm = args.comm or ("ring" if args.smoke else "nccl")
    args.context = args.context or (32 if args.smoke else 1024)
    args.steps = args.steps or (4 if args.smoke else 64)
    batches = [int(b) for b in args.batches.split(",")]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    runs = {}

    # Phase 1: one GPU (rank 0), rank 1 idle.
    if info.rank == 0:
        weights = random_weights(cfg, dtype, device)
        engine = Engine(Checkpoint(cfg, weights, None, "random"), engine_config(args, device, batches))
        del weights
        for b in batches:
            runs[b] = {"batch": b, "one_gpu": timed_modes(engine, b, args)}
            if args.profile:
                runs[b]["one_gpu_profile"] = bench_decode.profile_ringlet(engine, b, args.context, args.profile)
            print(json.dumps({"batch": b, "one_gpu_tok_s": [round(r[0], 1) for r in runs[b]["one_gpu"]]}), flush=True)
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
    world.Barrier()

    # Phase 2: TP-2, both ranks.
    if args.tp_splits:
        force_decode_splits(args.tp_splits)
    layout = make_layout(2, info.rank, tp=2, dp=1)
    group = world.Split(color=0, key=info.rank)
    weights = random_weights(cfg, dtype, device)  # the same seed on both ranks: the same model
    replica = Replica(layout, group, world, Checkpoint(cfg, weights, None, "random"),
                      engine_config(args, device, batches), args.comm, device)
    del weights
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if info.rank == 0:
        for b in batches:
            (one_w, one_a), (tp2_w, tp2_a) = runs[b].pop("one_gpu"), timed_modes(replica.engine, b, args)
            runs[b].update(waiting=compared(one_w, tp2_w), **compared(one_a, tp2_a))
            print(json.dumps(runs[b]), flush=True)
            if args.profile:
                runs[b]["tp2_rank0_profile"] = bench_decode.profile_ringlet(replica.engine, b, args.context,
                                                                            args.profile)
        replica.stop_workers()
    else:
        replica.serve_plans()
    world.Barrier()
    if info.rank == 0:
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu-smoke"
        date = datetime.date.today().isoformat()
        out = write_results("tp_decode", gpu, date, args.out, {
            "gpu": gpu, "date": date, "torch": torch.__version__, "shape": cfg.name, "comm": replica.comm.describe(),
            "worker_spin_s": parallel.PLAN_SPIN_S, "tp_decode_splits": args.tp_splits or "rule",
            "context": args.context, "steps": args.steps, "targets": {"1": 1.65, "16": 1.8},
            "runs": list(runs.values())})
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
