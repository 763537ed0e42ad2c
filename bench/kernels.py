"""GPU checks and timings of ringlet.kernels beside their torch peers, in one process on one GPU.

    python bench/kernels.py [--out PATH]   # on an H100/H200: about 3 minutes
    python bench/kernels.py --smoke        # on the CPU through Triton's interpreter, tiny sizes: does it run?
    python bench/kernels.py --only rope_write_kv,write_kv   # a subset (names: BENCHES)

Each kernel is first checked against its torch reference on fresh random inputs (max abs error and
||out - ref|| / ||ref||; the run exits non-zero when one is past 2 eps of its dtype), then timed beside its peer.
Timing, as the runtime runs decode: one CUDA graph launches the op back to back over enough copies of its inputs
to overflow L2 three times (at most 16 copies), so launch overhead is excluded for every contender and weights and
caches come from HBM; the median graph replay over about 100 ms, divided by its launches, is the op's time.
Bandwidths count each byte read and written once; the copy baseline is the best device-to-device copy of 256 MiB
or 1 GiB. Prints a table last and writes every number to JSON (default bench/results/kernels-<gpu>-<date>.json).
"""
import argparse
import datetime
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if "--smoke" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("RINGLET_KERNELS", "triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

import ringlet.kernels as rk  # noqa: E402
from result_files import write_results  # noqa: E402


@dataclass
class Sizes:
    copy_mib: list  # device-to-device copies for the bandwidth baseline
    norm: list  # (T, D)
    rope: tuple  # (T, H, Dh)
    rope_kv: list  # (T, Hq, Hk, Dh)
    silu: tuple  # (T, F)
    decode: list  # (B, context)
    prefill: list  # T, one sequence
    heads: int
    head_dim: int
    gemv_m: list
    gemv: dict  # name -> (N, K)
    gemv_split_k: tuple  # (N, K) small enough in N that linear splits K: checked, not timed
    glu: dict  # name -> (2F, K) of a fused gate/up projection, for linear_silu_mul
    dtypes: list  # all are checked; the first is timed
    compile_peer: bool


# Llama-7B's linears; a decode step runs the first four once per layer (32) and the output head once.
LLAMA_7B_LINEARS = {"wqkv": (12288, 4096), "wo": (4096, 4096), "w13": (22016, 4096), "w2": (4096, 11008),
                    "output": (32000, 4096)}
LLAMA_7B_LAYERS = 32
GPU = Sizes(copy_mib=[256, 1024], norm=[(1, 4096), (4096, 4096)], rope=(4096, 32, 128),
            rope_kv=[(1, 32, 32, 128), (16, 32, 32, 128), (1, 20, 20, 128), (4096, 32, 32, 128)], silu=(4096, 11008),
            decode=[(b, c) for b in (1, 16) for c in (1024, 4096, 32768)], prefill=[1024, 4096], heads=32,
            head_dim=128, gemv_m=[1, 16], gemv=LLAMA_7B_LINEARS, gemv_split_k=(256, 16384),
            glu={"7B w13": (22016, 4096), "13B TP-2 w13": (13824, 5120)},
            dtypes=[torch.bfloat16, torch.float16], compile_peer=True)
# tl.dot on bf16 is wrong under the interpreter (triton-lang/triton#11584), so the smoke run checks fp16.
SMOKE = Sizes(copy_mib=[1], norm=[(5, 96)], rope=(5, 4, 32), rope_kv=[(5, 4, 2, 32)], silu=(5, 100),
              decode=[(1, 32), (3, 48)],
              prefill=[32], heads=2, head_dim=32, gemv_m=[1, 16], gemv={"a": (48, 256), "b": (96, 128)},
              gemv_split_k=(33, 2100), glu={"a": (96, 256)}, dtypes=[torch.float16], compile_peer=False)
PAGE_SIZE = 16
EPS = 1e-5


class Bench:
    def __init__(self, device: torch.device):
        self.device = device
        self.l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
        self.checks: list[dict] = []
        self.timings: list[dict] = []
        self.copy_gbps = 0.0  # the copy baseline (copy_bandwidth's best), which the gemv rows are a share of

    def free(self) -> None:
        """Return cached GPU memory between sizes, so large cases do not fail on fragmentation."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def rand(self, *shape, dtype=torch.float32, scale=1.0) -> torch.Tensor:
        return (torch.randn(*shape, device=self.device) * scale).to(dtype)

    def input_sets(self, make, nbytes: int) -> list[tuple]:
        """make() called often enough that one pass over the results moves 3x the L2 size (at most 16 sets)."""
        count = min(16, max(1, math.ceil(3 * self.l2_bytes / nbytes)))
        return [make() for _ in range(count)]

    def check(self, name: str, out: torch.Tensor, ref: torch.Tensor) -> None:
        out, ref_f = out.float(), ref.float()
        rel = ((out - ref_f).norm() / ref_f.norm().clamp_min(1e-30)).item()
        max_abs = (out - ref_f).abs().max().item()
        limit = 2 * torch.finfo(ref.dtype).eps
        ok = math.isfinite(rel) and rel <= limit
        self.checks.append({"name": name, "dtype": str(ref.dtype), "max_abs_err": max_abs, "rel_err": rel,
                            "limit": limit, "ok": ok})
        print(f"{'ok  ' if ok else 'FAIL'} {name:<48} {ref.dtype!s:<15} max abs {max_abs:.3e}  rel {rel:.3e}",
              flush=True)

    def time_us(self, fn, sets: list[tuple]) -> float:
        """Time of one fn(*inputs), cycling over the input sets (see the module docstring)."""
        if self.device.type != "cuda":
            start = time.perf_counter()
            for inputs in sets:
                fn(*inputs)
            return (time.perf_counter() - start) / len(sets) * 1e6
        launches = max(len(sets), 8)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile, autotune and size the allocator outside the capture
            for inputs in sets:
                fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(launches):
                fn(*sets[i % len(sets)])
        graph.replay()
        torch.cuda.synchronize()
        start = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        replays = max(5, min(200, int(0.1 / (time.perf_counter() - start))))
        for _ in range(replays // 4):  # let the clocks settle
            graph.replay()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)]
        for begin, end in events:
            begin.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(begin.elapsed_time(end) for begin, end in events) / launches * 1e3

    def compare(self, name: str, ours, peers: dict, sets: list[tuple], peer_sets: list[tuple] | None = None,
                work: float = 0.0, unit: str = "GB/s") -> dict:
        """Time ours(*inputs) and each peer (on peer_sets, default the same sets); `work` is bytes (GB/s) or
        flops (TFLOP/s) of one call."""
        row = {"name": name, "us": self.time_us(ours, sets), "unit": unit, "work": work,
               "peers": {p: self.time_us(fn, peer_sets or sets) for p, fn in peers.items()}}
        scale = 1e-3 if unit == "GB/s" else 1e-6  # work / us -> GB/s or TFLOP/s
        row["rate"] = work / row["us"] * scale if work else None
        row["peer_rates"] = {p: work / us * scale for p, us in row["peers"].items()} if work else {}
        self.timings.append(row)
        peer_text = "  ".join(f"{p} {us:9.1f} us ({us / row['us']:.2f}x)" for p, us in row["peers"].items())
        print(f"time {name:<48} ours {row['us']:9.1f} us  {peer_text}", flush=True)
        return row


def copy_bandwidth(bench: Bench, s: Sizes) -> dict:
    gbps = {}
    for mib in s.copy_mib:
        src = bench.rand(mib << 19, dtype=torch.bfloat16)
        us = bench.time_us(lambda a, b: b.copy_(a), [(src, torch.empty_like(src))])
        gbps[f"{mib} MiB"] = 2 * src.numel() * src.element_size() / us * 1e-3
        print(f"copy {mib} MiB device to device: {gbps[f'{mib} MiB']:.0f} GB/s (read + write)", flush=True)
        del src
    return gbps


def bench_rms_norm(bench: Bench, s: Sizes) -> None:
    def eager(x, w):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS) * w.float()).to(x.dtype)

    def eager_fused(x, r, w):
        h = x + r
        return eager(h, w), h

    peers = {"eager": (eager, eager_fused)}
    if s.compile_peer:
        peers["torch.compile"] = (torch.compile(eager, dynamic=False), torch.compile(eager_fused, dynamic=False))
    for t, d in s.norm:
        for dtype in s.dtypes:
            x, r, w = bench.rand(t, d, dtype=dtype), bench.rand(t, d, dtype=dtype), bench.rand(d, dtype=dtype)
            bench.check(f"rms_norm T={t} D={d}", rk.rms_norm(x, w, EPS), rk.rms_norm_ref(x, w, EPS))
            out, res = rk.fused_add_rms_norm(x, r, w, EPS)
            ref_out, ref_res = rk.fused_add_rms_norm_ref(x, r, w, EPS)
            bench.check(f"fused_add_rms_norm T={t} D={d} (out)", out, ref_out)
            bench.check(f"fused_add_rms_norm T={t} D={d} (residual)", res, ref_res)
        dtype = s.dtypes[0]
        size = t * d * dtype.itemsize
        sets = bench.input_sets(lambda: (bench.rand(t, d, dtype=dtype), bench.rand(t, d, dtype=dtype),
                                         bench.rand(d, dtype=dtype)), 3 * size)
        bench.compare(f"rms_norm T={t} D={d}", lambda x, r, w: rk.rms_norm(x, w, EPS),
                      {p: (lambda x, r, w, f=f: f[0](x, w)) for p, f in peers.items()}, sets, work=2 * size)
        bench.compare(f"fused_add_rms_norm T={t} D={d}", lambda x, r, w: rk.fused_add_rms_norm(x, r, w, EPS),
                      {p: (lambda x, r, w, f=f: f[1](x, r, w)) for p, f in peers.items()}, sets, work=4 * size)


def bench_rope(bench: Bench, s: Sizes) -> None:
    t, h, dh = s.rope
    cos_sin = rk.rope_cos_sin(8192, dh, 10000.0, bench.device)

    def inputs(dtype):
        qkv = bench.rand(t, 3 * h * dh, dtype=dtype)  # q and k are column slices of the fused projection
        positions = torch.randint(0, 8192, (t,), device=bench.device, dtype=torch.int32)
        return qkv[:, :h * dh].view(t, h, dh), qkv[:, h * dh:2 * h * dh].view(t, h, dh), positions

    def hf_eager(q, k, positions):
        """HF Llama's formulation, in the activation dtype."""
        table = cos_sin[positions].to(q.dtype)[:, None, :]
        cos = torch.cat([table[..., :dh // 2]] * 2, -1)
        sin = torch.cat([table[..., dh // 2:]] * 2, -1)

        def rotate_half(x):
            return torch.cat([-x[..., dh // 2:], x[..., :dh // 2]], -1)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    for dtype in s.dtypes:
        q, k, positions = inputs(dtype)
        for name, out, ref in zip("qk", rk.apply_rope(q, k, positions, cos_sin),
                                  rk.apply_rope_ref(q, k, positions, cos_sin)):
            bench.check(f"apply_rope {name} T={t} H={h} Dh={dh}", out, ref)
    nbytes = 4 * t * h * dh * s.dtypes[0].itemsize
    bench.compare(f"apply_rope T={t} H={h}+{h} Dh={dh}", lambda q, k, p: rk.apply_rope(q, k, p, cos_sin),
                  {"eager (HF)": hf_eager}, bench.input_sets(lambda: inputs(s.dtypes[0]), nbytes), work=nbytes)


def bench_silu_mul(bench: Bench, s: Sizes) -> None:
    t, f = s.silu
    for dtype in s.dtypes:
        gate_up = bench.rand(t, 2 * f, dtype=dtype)
        bench.check(f"silu_mul T={t} F={f}", rk.silu_mul(gate_up), rk.silu_mul_ref(gate_up))
    nbytes = 3 * t * f * s.dtypes[0].itemsize
    bench.compare(f"silu_mul T={t} F={f}", rk.silu_mul, {"eager": lambda gu: F.silu(gu[:, :f]) * gu[:, f:]},
                  bench.input_sets(lambda: (bench.rand(t, 2 * f, dtype=s.dtypes[0]),), nbytes), work=nbytes)


def _paged(bench: Bench, batch: int, context: int, heads: int, head_dim: int, dtype: torch.dtype):
    """Caches holding `batch` sequences of `context` tokens on shuffled pages, and their block tables."""
    pages = triton.cdiv(context, PAGE_SIZE)
    k_cache = bench.rand(batch * pages, PAGE_SIZE, heads, head_dim, dtype=dtype)
    v_cache = bench.rand(batch * pages, PAGE_SIZE, heads, head_dim, dtype=dtype)
    tables = torch.randperm(batch * pages, device=bench.device).view(batch, pages).int()
    return k_cache, v_cache, tables


def _dense(cache: torch.Tensor, tables: torch.Tensor, context: int) -> torch.Tensor:
    """[B, H, context, Dh] contiguous copy of each sequence's cached rows, for SDPA."""
    b, h, dh = tables.shape[0], cache.shape[2], cache.shape[3]
    return cache[tables.long()].view(b, -1, h, dh)[:, :context].transpose(1, 2).contiguous()


def bench_write_kv(bench: Bench, s: Sizes) -> None:
    t, h, dh = s.rope

    def inputs(dtype):
        k_cache, v_cache, _ = _paged(bench, 1, 2 * t, h, dh, dtype)
        slots = torch.randperm(2 * t, device=bench.device)[:t]
        return bench.rand(t, h, dh, dtype=dtype), bench.rand(t, h, dh, dtype=dtype), k_cache, v_cache, slots

    for dtype in s.dtypes:
        k, v, k_cache, v_cache, slots = inputs(dtype)
        slots[::7] = -1  # padding rows
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        rk.write_kv(k, v, k_cache, v_cache, slots)
        rk.write_kv_ref(k, v, k_ref, v_ref, slots)
        bench.check(f"write_kv T={t} H={h} Dh={dh} (k cache)", k_cache, k_ref)
        bench.check(f"write_kv T={t} H={h} Dh={dh} (v cache)", v_cache, v_ref)

    def index_copy(k, v, k_cache, v_cache, slots):
        k_cache.view(-1, h, dh).index_copy_(0, slots, k)
        v_cache.view(-1, h, dh).index_copy_(0, slots, v)

    nbytes = 4 * t * h * dh * s.dtypes[0].itemsize
    bench.compare(f"write_kv T={t} H={h} Dh={dh}", rk.write_kv, {"index_copy_": index_copy},
                  bench.input_sets(lambda: inputs(s.dtypes[0]), nbytes), work=nbytes)


def bench_rope_write_kv(bench: Bench, s: Sizes) -> None:
    """The fused rope + cache write against the two kernels it replaces (16-bit caches), at decode and prefill
    sizes: at decode sizes both are launch latency, which the CUDA-graph timing keeps (one node each)."""
    for t, hq, hk, dh in s.rope_kv:
        cos_sin = rk.rope_cos_sin(8192, dh, 10000.0, bench.device)

        def inputs(dtype):
            qkv = bench.rand(t, (hq + 2 * hk) * dh, dtype=dtype)
            q, k, v = qkv.split([hq * dh, hk * dh, hk * dh], dim=1)
            positions = torch.randint(0, 8192, (t,), device=bench.device, dtype=torch.int32)
            k_cache, v_cache, _ = _paged(bench, 1, max(2 * t, PAGE_SIZE), hk, dh, dtype)
            slots = torch.randperm(max(2 * t, PAGE_SIZE), device=bench.device)[:t]
            return q.view(t, hq, dh), k.view(t, hk, dh), v.view(t, hk, dh), positions, k_cache, v_cache, slots

        def ours(q, k, v, positions, k_cache, v_cache, slots):
            return rk.rope_write_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slots)

        def unfused(q, k, v, positions, k_cache, v_cache, slots):
            q_out, k_out = rk.apply_rope(q, k, positions, cos_sin)
            rk.write_kv(k_out, v, k_cache, v_cache, slots)
            return q_out

        name = f"rope_write_kv T={t} Hq={hq} Hk={hk} Dh={dh}"
        for dtype in s.dtypes:
            q, k, v, positions, k_cache, v_cache, slots = inputs(dtype)
            k_ref, v_ref = k_cache.clone(), v_cache.clone()
            bench.check(f"{name} (q)", ours(q, k, v, positions, k_cache, v_cache, slots),
                        rk.rope_write_kv_ref(q, k, v, positions, cos_sin, k_ref, v_ref, slots))
            bench.check(f"{name} (k cache)", k_cache, k_ref)
            bench.check(f"{name} (v cache)", v_cache, v_ref)
        nbytes = 2 * t * (hq + 2 * hk) * dh * s.dtypes[0].itemsize
        bench.compare(name, ours, {"apply_rope + write_kv": unfused},
                      bench.input_sets(lambda: inputs(s.dtypes[0]), nbytes), work=nbytes)


def bench_decode(bench: Bench, s: Sizes) -> None:
    h, dh = s.heads, s.head_dim
    scale = dh ** -0.5
    for batch, context in s.decode:
        for dtype in s.dtypes:
            k_cache, v_cache, tables = _paged(bench, batch, context, h, dh, dtype)
            q = bench.rand(batch, h, dh, dtype=dtype)
            seq_lens = torch.randint(context // 2, context + 1, (batch,), device=bench.device, dtype=torch.int32)
            if batch > 1:
                seq_lens[-1] = 0  # a padding row, as in CUDA-graph batches
            bench.check(f"decode_attention B={batch} ctx={context}",
                        rk.decode_attention(q, k_cache, v_cache, tables, seq_lens, scale),
                        rk.decode_attention_ref(q, k_cache, v_cache, tables, seq_lens, scale))
            del k_cache, v_cache

        def inputs():
            full = torch.full((batch,), context, device=bench.device, dtype=torch.int32)
            return (bench.rand(batch, h, dh, dtype=s.dtypes[0]),
                    *_paged(bench, batch, context, h, dh, s.dtypes[0]), full)

        kv_bytes = 2 * batch * context * h * dh * s.dtypes[0].itemsize
        sets = bench.input_sets(inputs, kv_bytes)
        dense = [(q[:, :, None], _dense(kc, bt, context), _dense(vc, bt, context)) for q, kc, vc, bt, _ in sets]
        bench.compare(f"decode_attention B={batch} H={h} Dh={dh} ctx={context}",
                      lambda q, kc, vc, bt, lens: rk.decode_attention(q, kc, vc, bt, lens, scale),
                      {"sdpa dense": F.scaled_dot_product_attention}, sets, dense, work=kv_bytes)
        del sets, dense
        bench.free()


def bench_prefill(bench: Bench, s: Sizes) -> None:
    h, dh = s.heads, s.head_dim
    scale = dh ** -0.5
    kv_heads = max(1, h // 4)
    for dtype in s.dtypes:  # a mixed batch of chunks, some with cached context, GQA
        seq_lens, q_lens = [37, 300, 129, 64], [37, 100, 1, 64]
        k_cache, v_cache, tables = _paged(bench, 4, max(seq_lens), kv_heads, dh, dtype)
        q = bench.rand(sum(q_lens), h, dh, dtype=dtype)
        args = (q, k_cache, v_cache, tables, torch.tensor([0, 37, 137, 138], device=bench.device).int(),
                torch.tensor(q_lens, device=bench.device).int(), torch.tensor(seq_lens, device=bench.device).int(),
                scale, max(q_lens))
        bench.check(f"prefill_attention chunked batch, GQA {h // kv_heads}", rk.prefill_attention(*args),
                    rk.prefill_attention_ref(*args))
    for t in s.prefill:
        def inputs(dtype):
            lens = torch.tensor([t], device=bench.device, dtype=torch.int32)
            return (bench.rand(t, h, dh, dtype=dtype), *_paged(bench, 1, t, h, dh, dtype), lens * 0, lens, lens)

        for dtype in s.dtypes:
            args = (*inputs(dtype), scale, t)
            bench.check(f"prefill_attention T={t}", rk.prefill_attention(*args), rk.prefill_attention_ref(*args))
        sets = bench.input_sets(lambda: inputs(s.dtypes[0]), 4 * t * h * dh * s.dtypes[0].itemsize)
        dense = [(q.transpose(0, 1)[None].contiguous(), _dense(kc, bt, t), _dense(vc, bt, t))
                 for q, kc, vc, bt, *_ in sets]
        bench.compare(f"prefill_attention B=1 H={h} Dh={dh} T={t} causal",
                      lambda *a: rk.prefill_attention(*a, scale, t),
                      {"sdpa causal": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)},
                      sets, dense, work=2 * h * t * t * dh, unit="TFLOP/s")  # 4*h*t*t*dh flops, halved by causality
        del sets, dense
        bench.free()


def bench_gemv(bench: Bench, s: Sizes) -> None:
    copy_gbps = bench.copy_gbps
    rows = {}
    for name, (n, k) in {**s.gemv, "split-K": s.gemv_split_k}.items():
        for dtype in s.dtypes:
            w = bench.rand(n, k, dtype=dtype, scale=k ** -0.5)
            for m in s.gemv_m:
                x = bench.rand(m, k, dtype=dtype)
                bench.check(f"linear M={m} N={n} K={k}", rk.linear(x, w), rk.linear_ref(x, w))
        if name == "split-K":
            continue
        for m in s.gemv_m:
            nbytes = (n * k + m * k + m * n) * s.dtypes[0].itemsize
            sets = bench.input_sets(lambda: (bench.rand(m, k, dtype=s.dtypes[0]),
                                             bench.rand(n, k, dtype=s.dtypes[0], scale=k ** -0.5)), nbytes)
            row = bench.compare(f"linear M={m} N={n} K={k} ({name})", rk.linear, {"cublas": F.linear}, sets,
                                work=nbytes)
            row["fraction_of_copy"] = row["rate"] / copy_gbps
            rows[name, m] = row
            print(f"     {row['rate']:.0f} GB/s = {row['fraction_of_copy']:.0%} of copy; cuBLAS "
                  f"{row['peer_rates']['cublas']:.0f} GB/s", flush=True)
            del sets
            bench.free()
    if set(s.gemv) == set(LLAMA_7B_LINEARS):  # the linears of one Llama-7B decode step, from the rows above
        for m in s.gemv_m:
            counts = {name: (1 if name == "output" else LLAMA_7B_LAYERS) for name in s.gemv}
            total = {"us": 0.0, "cublas": 0.0, "work": 0.0}
            for name, count in counts.items():
                row = rows[name, m]
                total["us"] += count * row["us"]
                total["cublas"] += count * row["peers"]["cublas"]
                total["work"] += count * row["work"]
            step = {"name": f"linear M={m} Llama-7B decode step (sum of the rows above)", "us": total["us"],
                    "unit": "GB/s", "work": total["work"], "peers": {"cublas": total["cublas"]},
                    "rate": total["work"] / total["us"] * 1e-3,
                    "peer_rates": {"cublas": total["work"] / total["cublas"] * 1e-3}}
            step["fraction_of_copy"] = step["rate"] / copy_gbps
            bench.timings.append(step)
            print(f"step {step['name']}: {step['rate']:.0f} GB/s = {step['fraction_of_copy']:.0%} of copy; "
                  f"cuBLAS {step['peer_rates']['cublas']:.0f} GB/s", flush=True)


def bench_linear_silu_mul(bench: Bench, s: Sizes) -> None:
    """The gate/up projection with SwiGLU's gate in its epilogue, against ringlet's two kernels (what the model ran
    before) and cuBLAS + eager torch."""
    def two_kernels(x, w):
        return rk.silu_mul(rk.linear(x, w))

    def cublas_eager(x, w):
        gate, up = F.linear(x, w).chunk(2, dim=-1)
        return F.silu(gate) * up

    for name, (n, k) in s.glu.items():
        for dtype in s.dtypes:
            w = bench.rand(n, k, dtype=dtype, scale=k ** -0.5)
            for m in s.gemv_m:
                x = bench.rand(m, k, dtype=dtype)
                bench.check(f"linear_silu_mul M={m} 2F={n} K={k}", rk.linear_silu_mul(x, w),
                            rk.linear_silu_mul_ref(x, w))
        for m in s.gemv_m:
            nbytes = (n * k + m * k + m * n // 2) * s.dtypes[0].itemsize
            sets = bench.input_sets(lambda: (bench.rand(m, k, dtype=s.dtypes[0]),
                                             bench.rand(n, k, dtype=s.dtypes[0], scale=k ** -0.5)), nbytes)
            bench.compare(f"linear_silu_mul M={m} 2F={n} K={k} ({name})", rk.linear_silu_mul,
                          {"linear+silu_mul": two_kernels, "cublas+eager": cublas_eager}, sets, work=nbytes)
            del sets
            bench.free()


def _table(timings: list[dict]) -> str:
    lines = [f"{'kernel':<60} {'ours us':>9} {'peer':<14} {'peer us':>9} {'speedup':>8} {'ours rate':>16}"]
    for row in timings:
        for peer, us in row["peers"].items():
            rate = f"{row['rate']:.0f} {row['unit']}" if row["rate"] is not None else ""
            lines.append(f"{row['name']:<60} {row['us']:>9.1f} {peer:<14} {us:>9.1f} {us / row['us']:>7.2f}x "
                         f"{rate:>16}")
    return "\n".join(lines)


def start(parser: argparse.ArgumentParser, args) -> tuple[Bench, str, str]:
    """Shared start of the GPU benchmarks: (Bench on the GPU, or on the CPU for --smoke; GPU name; date)."""
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA GPU: run on an H100/H200, or pass --smoke")
    device = torch.device("cpu" if args.smoke else "cuda")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu-interpreter"
    torch.manual_seed(0)
    print(f"{gpu}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    return Bench(device), gpu, datetime.date.today().isoformat()


def finish(bench: Bench, name: str, gpu: str, date: str, out: Path | None, elapsed: float, table: str,
           **results) -> int:
    """Write the JSON (default bench/results/<name>-<gpu>-<date>.json), print the table and the checks' verdict;
    returns the exit code (1 when a check failed)."""
    out = write_results(name, gpu, date, out, {"gpu": gpu, "date": date, "torch": torch.__version__,
                                               "triton": triton.__version__, "seconds": elapsed,
                                               "checks": bench.checks, **results})
    print("\n" + table)
    failed = [c["name"] + " " + c["dtype"] for c in bench.checks if not c["ok"]]
    print(f"\n{len(bench.checks) - len(failed)}/{len(bench.checks)} checks passed in {elapsed:.0f} s; wrote {out}")
    if failed:
        print("FAILED: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


BENCHES = {"rms_norm": bench_rms_norm, "rope": bench_rope, "silu_mul": bench_silu_mul, "write_kv": bench_write_kv,
           "rope_write_kv": bench_rope_write_kv, "decode": bench_decode, "prefill": bench_prefill,
           "gemv": bench_gemv, "linear_silu_mul": bench_linear_silu_mul}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny sizes")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/kernels-<gpu>-<date>.json)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHES)} (default: all)")
    args = parser.parse_args()
    only = args.only.split(",") if args.only else list(BENCHES)
    if set(only) - set(BENCHES):
        parser.error(f"--only: unknown {sorted(set(only) - set(BENCHES))}; choose from {', '.join(BENCHES)}")
    bench, gpu, date = start(parser, args)
    sizes = SMOKE if args.smoke else GPU
    start_s = time.perf_counter()
    copies = copy_bandwidth(bench, sizes)
    bench.copy_gbps = copy_gbps = max(copies.values())
    for name in only:
        BENCHES[name](bench, sizes)
    table = f"copy baseline {copy_gbps:.0f} GB/s (best of {', '.join(copies)})\n" + _table(bench.timings)
    return finish(bench, "kernels", gpu, date, args.out, time.perf_counter() - start_s, table,
                  copy_gbps=copies, timings=bench.timings)


if __name__ == "__main__":
    sys.exit(main())
