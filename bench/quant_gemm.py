"""Weight-only quantized linears (int8, int4 g128 sym/asym, ternary) on the GPU, beside cuBLAS bf16 and torch's int4
tinygemm, in one process on one GPU; also the GPU correctness check of kernels/quant_gemm.py.

    python bench/quant_gemm.py [--out DIR_OR_PATH]   # on an H100/H200: about 2 minutes (most of it autotuning)
    python bench/quant_gemm.py --batches 1           # decode GEMV only (checked and timed at M = 1): ~1 minute
    python bench/quant_gemm.py --smoke               # on the CPU through Triton's interpreter, tiny sizes

Every format is first checked against quant_linear_ref on fresh random codes (each timed M on every shape, plus M = 3, a
partial decode tile, and M = 100, the prefill tiles, on the first when a timed M is above 1; bf16 activations; the run
exits non-zero when ||out - ref|| / ||ref|| is past 2 eps of bf16). Timing is bench/kernels.py's: one CUDA graph
replaying the op over copies of its inputs that overflow L2 three times, median replay / launches. Bytes moved = packed
weight + scales (+ zeros) + x + out, each once; cuBLAS and tinygemm are charged their own bytes. Rows: Llama-7B
projections (N x K), batch 1 and 16. Targets (DESIGN.md section 4): int4 batch 1 >= 75% of copy bandwidth, >= 2.5x
tinygemm, >= 3x cuBLAS; int4 batch 16 >= 2.5x cuBLAS; int8 batch 1 >= 1.8x cuBLAS; ternary batch 1 >= 5x cuBLAS. The
batch-1 int4 and ternary rows are also timed as a bare read of their bytes (bench/read_bound.py), and each target
beside what that read would score: a target it misses no kernel can meet. JSON to
--out (a directory gets quant_gemm-<gpu>-<date>.json inside; default bench/results/), a table last.
"""
import argparse
import importlib.util
import os
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

if "--smoke" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("RINGLET_KERNELS", "triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ringlet.kernels.quant_formats import Int4Weight, Int8Weight, TernaryWeight  # noqa: E402
from ringlet.kernels.quant_gemm import quant_linear, quant_linear_ref  # noqa: E402

from read_bound import read_bound_us  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_kernels", Path(__file__).with_name("kernels.py"))
bench_kernels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_kernels)
Bench = bench_kernels.Bench

GROUP = 128
TINYGEMM_INNER_K_TILES = 8


@dataclass
class Sizes:
    copy_mib: list  # device-to-device copies for the bandwidth baseline
    shapes: dict  # name -> (N, K)
    batches: list  # timed M
    check_small_m: int  # an extra checked M on the first shape (decode tiles, mostly padding)
    check_wide_m: int  # an extra checked M on the first shape (prefill tiles)
    dtype: torch.dtype  # activations


SHAPES_7B = {"wqkv": (12288, 4096), "wo": (4096, 4096), "w13": (22016, 4096), "w2": (4096, 11008)}
GPU = Sizes(copy_mib=[256, 1024], shapes=SHAPES_7B, batches=[1, 16], check_small_m=3, check_wide_m=100,
            dtype=torch.bfloat16)
# tl.dot on bf16 is wrong under the interpreter (triton-lang/triton#11584), so the smoke run uses fp16.
SMOKE = Sizes(copy_mib=[1], shapes={"a": (48, 256), "b": (40, 384)}, batches=[1, 16], check_small_m=3,
              check_wide_m=20, dtype=torch.float16)


def make_weight(fmt: str, n: int, k: int, device: torch.device):
    """Random codes of a format, with fp16 group scales (as GPTQ/AWQ files hold them) and integer zeros."""
    if fmt == "int8":
        return Int8Weight.from_codes(torch.randint(-128, 128, (n, k), dtype=torch.int8, device=device),
                                     torch.rand(n, device=device) * 0.002 + 0.001)
    if fmt.startswith("int4"):
        scales = (torch.rand(n, k // GROUP, device=device) * 0.02 + 0.01).half()
        zeros = torch.randint(0, 16, (n, k // GROUP), device=device).half() if "asym" in fmt else None
        return Int4Weight.from_codes(torch.randint(0, 16, (n, k), dtype=torch.uint8, device=device), scales, zeros,
                                     GROUP)
    return TernaryWeight.from_codes(torch.randint(-1, 2, (n, k), dtype=torch.int8, device=device),
                                    torch.tensor([0.02], device=device), None)


FORMATS = ["int8", "int4-g128-sym", "int4-g128-asym", "ternary"]


def copy_of(weight):
    """The same weight in fresh memory (another input set for timing)."""
    return type(weight).from_state_dict({name: t.clone() for name, t in weight.state_dict().items()})


def tinygemm(bench: Bench, n: int, k: int):
    """(fn, make_inputs) for torch's int4 tinygemm at group 128, or (None, reason) where this torch lacks it."""
    def make():
        codes = torch.randint(0, 16, (n, k), dtype=torch.int32, device=bench.device)
        packed = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
        weight = torch.ops.aten._convert_weight_to_int4pack(packed, TINYGEMM_INNER_K_TILES)
        scales_zeros = (torch.rand(k // GROUP, n, 2, device=bench.device) * 0.02).to(torch.bfloat16)
        return weight, scales_zeros

    def fn(x, weight, scales_zeros):
        return torch.ops.aten._weight_int4pack_mm(x, weight, GROUP, scales_zeros)

    try:
        weight, scales_zeros = make()
        fn(torch.zeros(1, k, dtype=torch.bfloat16, device=bench.device), weight, scales_zeros)
    except (RuntimeError, AttributeError, TypeError, NotImplementedError) as err:
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
    return fn, make


def check(bench: Bench, s: Sizes) -> None:
    for i, (name, (n, k)) in enumerate(s.shapes.items()):
        for fmt in FORMATS:
            weight = make_weight(fmt, n, k, bench.device)
            ms = s.batches + ([s.check_small_m, s.check_wide_m] if i == 0 and max(s.batches) > 1 else [])
            for m in ms:
                x = bench.rand(m, k, dtype=s.dtype)
                bench.check(f"quant_linear {fmt} M={m} N={n} K={k}", quant_linear(x, weight),
                            quant_linear_ref(x, weight))
            del weight
            bench.free()


def bench_shapes(bench: Bench, s: Sizes, copy_gbps: float) -> dict:
    rows = {}
    elt = s.dtype.itemsize
    for name, (n, k) in s.shapes.items():
        tiny_fn, tiny_make = tinygemm(bench, n, k) if s.dtype == torch.bfloat16 else (None, "needs bf16")
        for m in s.batches:
            io_bytes = (m * k + m * n) * elt
            cublas_bytes = n * k * elt + io_bytes
            cublas_sets = bench.input_sets(lambda m=m: (bench.rand(m, k, dtype=s.dtype),
                                                        bench.rand(n, k, dtype=s.dtype, scale=k ** -0.5)),
                                           cublas_bytes)
            cublas_us = None
            tiny_us = None
            if tiny_fn is not None:
                tiny_bytes = n * k // 2 + (k // GROUP) * n * 2 * 2 + io_bytes
                tiny_sets = bench.input_sets(lambda m=m: (bench.rand(m, k, dtype=s.dtype), *tiny_make()),
                                             tiny_bytes)
                tiny_us = bench.time_us(tiny_fn, tiny_sets)
                del tiny_sets
            for fmt in FORMATS:
                weight = make_weight(fmt, n, k, bench.device)
                nbytes = weight.nbytes + io_bytes
                sets = bench.input_sets(lambda m=m, w=weight: (bench.rand(m, k, dtype=s.dtype), copy_of(w)), nbytes)
                peers = {} if cublas_us is not None else {"cublas bf16": F.linear}
                row = bench.compare(f"quant_linear {fmt} M={m} N={n} K={k} ({name})", quant_linear, peers, sets,
                                    cublas_sets, work=nbytes)
                if cublas_us is None:
                    cublas_us = row["peers"]["cublas bf16"]
                row["peers"]["cublas bf16"] = cublas_us
                row["peer_bytes"] = {"cublas bf16": cublas_bytes}
                if tiny_us is not None and fmt.startswith("int4"):
                    row["peers"]["tinygemm int4"] = tiny_us
                    row["peer_bytes"]["tinygemm int4"] = tiny_bytes
                # Each peer's rate on its own bytes (compare() charged them ours).
                row["peer_rates"] = {p: row["peer_bytes"][p] / us * 1e-3 for p, us in row["peers"].items()}
                row["fraction_of_copy"] = row["rate"] / copy_gbps
                if (fmt, m) in BOUND_ROWS and bench.device.type == "cuda":
                    row["read_bound_us"] = read_bound_us(bench, nbytes)
                row["speedup"] = {p: us / row["us"] for p, us in row["peers"].items()}
                rows[fmt, name, m] = row
                speedups = "  ".join(f"{x:.2f}x {p}" for p, x in row["speedup"].items())
                print(f"     {row['rate']:.0f} GB/s = {row['fraction_of_copy']:.0%} of copy; {speedups}", flush=True)
                del sets, weight
                bench.free()
            del cublas_sets
            bench.free()
        if tiny_fn is None:
            print(f"tinygemm int4 not timed for {name}: {tiny_make}", flush=True)
    return rows


# Rows also timed as a bare read of their bytes (bench/read_bound.py): the targets no kernel can beat.
BOUND_ROWS = {("int4-g128-sym", 1), ("int4-g128-asym", 1), ("ternary", 1)}
# (format, M, peer or "copy", target ratio)
TARGETS = [("int4-g128-sym", 1, "copy", 0.75), ("int4-g128-sym", 1, "tinygemm int4", 2.5),
           ("int4-g128-sym", 1, "cublas bf16", 3.0), ("int4-g128-sym", 16, "cublas bf16", 2.5),
           ("int4-g128-asym", 1, "copy", 0.75), ("int4-g128-asym", 16, "cublas bf16", 2.5),
           ("int8", 1, "cublas bf16", 1.8), ("ternary", 1, "cublas bf16", 5.0)]


def summarize(rows: dict, s: Sizes, copy_gbps: float) -> list[dict]:
    """Each target against the sum over the shapes (one layer's projections): total peer time / total ours, or
    total bytes / total time / copy."""
    out = []
    for fmt, m, peer, target in TARGETS:
        picked = [rows[fmt, name, m] for name in s.shapes if (fmt, name, m) in rows]
        if not picked or (peer != "copy" and any(peer not in r["peers"] for r in picked)):
            out.append({"format": fmt, "M": m, "against": peer, "target": target, "measured": None})
            continue

        def ratio(key: str) -> float:
            ours = sum(r[key] for r in picked)
            if peer == "copy":
                return sum(r["work"] for r in picked) / ours * 1e-3 / copy_gbps
            return sum(r["peers"][peer] for r in picked) / ours

        measured = ratio("us")
        bound = ratio("read_bound_us") if all("read_bound_us" in r for r in picked) else None
        out.append({"format": fmt, "M": m, "against": peer, "target": target, "measured": measured,
                    "met": measured >= target, "bare_read": bound})
    return out


def _summary_table(summary: list[dict]) -> str:
    lines = [f"{'target (sum over the shapes)':<52} {'want':>6} {'got':>7}           {'a bare read':>11}"]
    for t in summary:
        what = f"{t['format']} M={t['M']} vs {t['against']}"
        got = "n/a" if t["measured"] is None else f"{t['measured']:.2f}" + ("" if t["met"] else " (missed)")
        bound = "" if t.get("bare_read") is None else f"{t['bare_read']:.2f}"
        lines.append(f"{what:<52} {t['target']:>6.2f} {got:<17} {bound:>11}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny sizes")
    parser.add_argument("--out", type=Path,
                        help="JSON path, or a directory for quant_gemm-<gpu>-<date>.json (default bench/results/)")
    parser.add_argument("--batches", type=lambda v: [int(b) for b in v.split(",")],
                        help="comma-separated M to check and time (default 1,16)")
    args = parser.parse_args()
    bench, gpu, date = bench_kernels.start(parser, args)
    out = args.out
    if out is not None and (out.is_dir() or out.suffix != ".json"):
        out = out / f"quant_gemm-{re.sub(r'[^a-z0-9]+', '-', gpu.lower()).strip('-')}-{date}.json"
    sizes = SMOKE if args.smoke else GPU
    if args.batches:
        sizes = replace(sizes, batches=args.batches)
    start = time.perf_counter()
    copies = bench_kernels.copy_bandwidth(bench, sizes)
    copy_gbps = max(copies.values())
    check(bench, sizes)
    rows = bench_shapes(bench, sizes, copy_gbps)
    summary = summarize(rows, sizes, copy_gbps)
    table = (f"copy baseline {copy_gbps:.0f} GB/s (best of {', '.join(copies)})\n"
             + bench_kernels._table(bench.timings) + "\n\n" + _summary_table(summary))
    return bench_kernels.finish(bench, "quant_gemm", gpu, date, out, time.perf_counter() - start, table,
                                copy_gbps=copies, timings=bench.timings, targets=summary)


if __name__ == "__main__":
    sys.exit(main())
