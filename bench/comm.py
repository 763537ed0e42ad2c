"""All-reduce latency and bandwidth of ringlet's communicators (ring, native MPI, NCCL) on 2 GPUs, with an
alpha-beta fit per backend and the backend `auto` picks for each size.

    mpirun -n 2 python3 bench/comm.py [--out bench/results/comm-<gpu>-<date>.json]
    mpirun -n 2 python3 bench/comm.py --smoke        # CPU tensors, small sizes, no NCCL: checks the script runs

bf16 tensors on each rank's GPU, 16 KiB .. 64 MiB. ring and mpi stage through host memory (what they cost for
per-layer GPU tensors); nccl is torch.distributed on the device. Time per call = the slowest rank's mean over
`--iters` calls after warm-up and a barrier. Bus bandwidth = 2 (p - 1) / p x bytes / time (NCCL's convention).
Fit: time = alpha + bytes / beta, least squares over the sizes. Two NCCL rows: `nccl` is torch.distributed alone
(one_shot_bytes=0), `nccl_one_shot` the default communicator (symmetric-memory one-shot up to 512 KiB, see
ringlet/mpi/nccl.py). For those two, `*_graph_us` is the time per all-reduce replayed inside a CUDA graph of
GRAPH_CALLS calls, as the decode step runs them (launch costs gone). On GPUs, `reduce_add_rms_norm` rows time the
fused all-reduce + residual add + RMSNorm kernel (what a tensor-parallel block calls after wo and w2) against the
one-shot all-reduce followed by `fused_add_rms_norm`, at 1 to 48 rows of dim 5120, after checking they agree.
`vocab_parallel_logits` rows time a 13B-shaped LM head split by vocabulary rows (16000 x 5120 per rank, bf16):
the staged gather (GEMV sending its logits as it writes them, then `gather_rows`) against the GEMV followed by an
NCCL all-gather, and against the whole head (32000 x 5120) on one rank, after checking the two gathers agree.
"""
from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI
from ringlet.kernels import fused_add_rms_norm, linear
from ringlet.mpi import control
from ringlet.mpi.comm import Communicator, make_communicator
from ringlet.mpi.ranks import device_for, discover
from result_files import write_results

GPU_SIZES = [16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]
SMOKE_SIZES = [16 << 10, 64 << 10, 256 << 10]
GRAPH_CALLS = 32
GRAPH_MAX_BYTES = 4 << 20
REDUCE_NORM_ROWS = [1, 4, 16, 32, 48]
REDUCE_NORM_DIM = 5120
HEAD_ROWS = [1, 4, 16, 17]  # 17: past the GEMV's rows, so the gather kernel sends the words itself
HEAD_SHAPE = (32000, 5120)  # Llama-13B's vocabulary x dim


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_all_reduce(comm, world, x: torch.Tensor, iters: int) -> float:
    for _ in range(3):
        comm.all_reduce(x)
    sync(x.device)
    world.Barrier()
    start = time.perf_counter()
    for _ in range(iters):
        comm.all_reduce(x)
    sync(x.device)
    mine = (time.perf_counter() - start) / iters
    return max(control.allgather(world, mine))


def time_in_graph(call, world, device: torch.device, iters: int) -> float:
    """Seconds per call() when GRAPH_CALLS of them are replayed from one CUDA graph (slowest rank)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_CALLS):
            call()
    graph.replay()
    sync(device)
    world.Barrier()
    start = time.perf_counter()
    for _ in range(iters):
        graph.replay()
    sync(device)
    mine = (time.perf_counter() - start) / (iters * GRAPH_CALLS)
    return max(control.allgather(world, mine))


def reduce_norm_rows(fused, plain, world, device: torch.device, iters: int) -> list[dict]:
    """`fused.reduce_add_rms_norm` (one kernel) against what it replaces, `plain.all_reduce` then
    `fused_add_rms_norm`, on decode-sized rows of a 13B-shaped model (dim 5120, bf16), in CUDA graphs. Checks
    first that both give the same residual and output (bf16 tolerance) and that every rank holds the same bits."""
    rows = []
    for t in REDUCE_NORM_ROWS:
        g = torch.Generator(device=device).manual_seed(world.Get_rank())
        x = torch.randn(t, REDUCE_NORM_DIM, generator=g, device=device).to(torch.bfloat16)
        g.manual_seed(1234)  # the residual stream and the weight are replicated: the same on every rank
        residual = torch.randn(t, REDUCE_NORM_DIM, generator=g, device=device).to(torch.bfloat16)
        weight = torch.randn(REDUCE_NORM_DIM, generator=g, device=device).to(torch.bfloat16)
        out, new_residual = fused.reduce_add_rms_norm(x.clone(), residual, weight, 1e-5)
        ref_out, ref_residual = fused_add_rms_norm(plain.all_reduce(x.clone()), residual, weight, 1e-5)
        tol = 2 * torch.finfo(torch.bfloat16).eps
        torch.testing.assert_close(new_residual.float(), ref_residual.float(), rtol=tol, atol=tol * 4)
        torch.testing.assert_close(out.float(), ref_out.float(), rtol=tol, atol=tol * 4)
        sums = control.allgather(world, [float(out.double().sum()), float(new_residual.double().sum())])
        if any(s != sums[0] for s in sums):
            raise RuntimeError(f"reduce_add_rms_norm: ranks disagree on {t} rows: {sums}")
        xs = x.clone()
        rows.append({"rows": t, "dim": REDUCE_NORM_DIM,
                     "fused_graph_us": round(time_in_graph(
                         lambda: fused.reduce_add_rms_norm(xs, residual, weight, 1e-5), world, device, iters) * 1e6, 2),
                     "one_shot_then_norm_graph_us": round(time_in_graph(
                         lambda: fused_add_rms_norm(fused.all_reduce(xs), residual, weight, 1e-5), world, device,
                         iters) * 1e6, 2)})
        if world.Get_rank() == 0:
            print(json.dumps(rows[-1]), flush=True)
    return rows


def vocab_parallel_rows(fused, plain, world, device: torch.device, iters: int) -> list[dict]:
    """`fused.vocab_parallel_logits` against the base implementation on `plain` (GEMV, NCCL all-gather) and the
    whole head on one rank, in CUDA graphs. Checks first that the two gathers give the same bits on every rank."""
    vocab, dim = HEAD_SHAPE
    size, rank = world.Get_size(), world.Get_rank()
    g = torch.Generator(device=device).manual_seed(1234)  # the same head and inputs on every rank
    head = (torch.randn(vocab, dim, generator=g, device=device) * 0.02).to(torch.bfloat16)
    mine = head[rank * vocab // size:(rank + 1) * vocab // size]
    rows = []
    for t in HEAD_ROWS:
        x = torch.randn(t, dim, generator=g, device=device).to(torch.bfloat16)
        for _ in range(3):  # both parities of the staging, then the first again
            got = fused.vocab_parallel_logits(x, mine)
            want = Communicator.vocab_parallel_logits(plain, x, mine)
            if not torch.equal(got, want):
                raise RuntimeError(f"vocab_parallel_logits: the staged gather differs from NCCL's at {t} rows: "
                                   f"{(got - want).abs().max().item()}")
        sums = control.allgather(world, float(got.double().sum()))
        if any(s != sums[0] for s in sums):
            raise RuntimeError(f"vocab_parallel_logits: ranks disagree on {t} rows: {sums}")
        rows.append({"rows": t, "head": list(HEAD_SHAPE), "ranks": size,
                     "staged_gather_graph_us": round(time_in_graph(
                         lambda: fused.vocab_parallel_logits(x, mine), world, device, iters) * 1e6, 2),
                     "nccl_all_gather_graph_us": round(time_in_graph(
                         lambda: Communicator.vocab_parallel_logits(plain, x, mine), world, device, iters) * 1e6, 2),
                     "whole_head_one_rank_graph_us": round(time_in_graph(
                         lambda: linear(x, head).float(), world, device, iters) * 1e6, 2)})
        if rank == 0:
            print(json.dumps(rows[-1]), flush=True)
    return rows


def fit(sizes: list[int], times: list[float]) -> dict:
    a = np.stack([np.ones(len(sizes)), np.array(sizes, float)], axis=1)
    (alpha, inv_beta), *_ = np.linalg.lstsq(a, np.array(times), rcond=None)
    return {"alpha_us": round(alpha * 1e6, 2), "beta_GBps": round(1 / inv_beta / 1e9, 2) if inv_beta > 0 else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU tensors, small sizes, no NCCL")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    info = discover()
    world = MPI.COMM_WORLD
    if info.world_size < 2:
        ap.error("run under mpirun -n 2 (or more)")
    device = torch.device("cpu") if args.smoke else device_for(info, torch)
    if not args.smoke and device.type != "cuda":
        ap.error("no CUDA GPU on this rank: run on GPUs, or pass --smoke")
    sizes = SMOKE_SIZES if args.smoke else GPU_SIZES
    comms = {name: make_communicator(name, world, world, device) for name in ("ring", "mpi")}
    if device.type == "cuda":
        comms["nccl"] = make_communicator("nccl", world, world, device, one_shot_bytes=0)
        comms["nccl_one_shot"] = make_communicator("nccl", world, world, device)
    backends = list(comms)
    auto = make_communicator("auto", world, world, device)
    rows = []
    for nbytes in sizes:
        x = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
        row = {"bytes": nbytes, "auto_choice": auto.choose(nbytes * 2 if auto.nccl is None else nbytes)}
        for name, comm in comms.items():
            t = time_all_reduce(comm, world, x, args.iters if nbytes < (16 << 20) else max(3, args.iters // 4))
            row[f"{name}_us"] = round(t * 1e6, 2)
            row[f"{name}_busbw_GBps"] = round(2 * (info.world_size - 1) / info.world_size * nbytes / t / 1e9, 2)
            if name.startswith("nccl") and nbytes <= GRAPH_MAX_BYTES:
                row[f"{name}_graph_us"] = round(time_in_graph(lambda: comm.all_reduce(x), world, device,
                                                              args.iters) * 1e6, 2)
        rows.append(row)
        if info.rank == 0:
            print(json.dumps(row), flush=True)
    fits = {name: fit(sizes, [r[f"{name}_us"] * 1e-6 for r in rows]) for name in backends}
    reduce_norm = reduce_norm_rows(comms["nccl_one_shot"], comms["nccl"], world, device, args.iters) \
        if device.type == "cuda" else None
    heads = vocab_parallel_rows(comms["nccl_one_shot"], comms["nccl"], world, device, args.iters) \
        if device.type == "cuda" else None
    if info.rank == 0:
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu-smoke"
        date = datetime.date.today().isoformat()
        out = write_results("comm", gpu, date, args.out, {
            "gpu": gpu, "date": date, "torch": torch.__version__, "ranks": info.world_size,
            "mpi": MPI.Get_library_version().splitlines()[0].strip(), "dtype": "bfloat16", "fit": fits,
            "auto": auto.describe(), "nccl_one_shot": comms["nccl_one_shot"].describe() if "nccl_one_shot" in comms
            else None, "runs": rows, "reduce_add_rms_norm": reduce_norm,
            "vocab_parallel_logits": heads})
        print(json.dumps({"fit": fits}))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
