"""Sparse-pattern and FP8 paged attention on the GPU, beside torch SDPA and beside our own dense kernel.

    python bench/attention.py [--out PATH]   # on an H100/H200: about 3 minutes
    python bench/attention.py --only decode  # only the decode rows (every pattern, and the SDPA peers)
    python bench/attention.py --only decode-peer  # only dense decode at 32K (bf16, FP8) against SDPA: seconds
    python bench/attention.py --only splits  # decode at batch 8 / 16, short contexts: chosen vs forced split counts
    python bench/attention.py --smoke        # on the CPU through Triton's interpreter, tiny sizes: does it run?
    python bench/attention.py --fp8-granularity  # CPU: FP8 scale granularity, attention error on the bundled model

Timing is bench/kernels.py's (one CUDA graph replaying the op over rotating inputs, median replay / launches).
The rotating inputs here are block tables: every set draws its pages at random from one page pool at least 3x the
L2 size, so a sparse pattern's few pages come from HBM as a dense pass's do, without a cache copy per set.

Rows: FP8 and bf16 paged dense decode at 32K against SDPA on dense contiguous bf16 K/V (target FP8 >= 1.7x);
every pattern (local, strided, block-sparse) in decode and prefill at 4K and 32K with bf16 and FP8 pages, each
beside our dense kernel at the same size: keep = pattern.keep_fraction, ratio = time / (dense time * keep)
(target <= 1.25), and on the GPU, as bound_ratio, the same ratio for a bare read of the kept bytes in one launch
(bench/read_bound.py: no kernel can score below it); prefill also against SDPA causal (flash). Kernels are first
checked against their references (prefill at 4K only: the reference holds the whole score matrix). JSON to --out
(default bench/results/attention-<gpu>-<date>.json), a table last.
"""
import argparse
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

if "--smoke" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("RINGLET_KERNELS", "triton")

import ringlet.kernels as rk
import torch
import torch.nn.functional as F
import triton
from ringlet.kernels.paged_kv import FP8_SCALE_DTYPE, quantize_fp8_ref

from read_bound import read_bound_us

_spec = importlib.util.spec_from_file_location("bench_kernels", Path(__file__).with_name("kernels.py"))
bench_kernels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_kernels)
Bench = bench_kernels.Bench

FP8 = torch.float8_e4m3fn
PAGE_SIZE = 16


@dataclass
class Sizes:
    heads: int
    head_dim: int
    contexts: list  # decode and prefill lengths
    decode_batches: list
    dtype: torch.dtype  # query / float page dtype
    patterns: dict  # name -> pattern
    fp8_peer_context: int  # the FP8-vs-SDPA decode rows
    check_prefill_max: int  # prefill checked against the reference up to this length
    sets: int  # rotating block tables per timing


GPU = Sizes(heads=32, head_dim=128, contexts=[4096, 32768], decode_batches=[1, 16], dtype=torch.bfloat16,
            patterns={"local:256": rk.Local(256), "local:256,sink=4": rk.Local(256, sink=4),
                      "strided:128,256": rk.Strided(128, 256), "strided:128,256,sink=4": rk.Strided(128, 256, sink=4),
                      "block:16,local=4,stride=8": rk.BlockSparse(16, 4, 8)},
            fp8_peer_context=32768, check_prefill_max=4096, sets=16)
# tl.dot on bf16 is wrong under the interpreter (triton-lang/triton#11584), so the smoke run uses fp16.
SMOKE = Sizes(heads=2, head_dim=32, contexts=[40, 70], decode_batches=[1, 3], dtype=torch.float16,
              patterns={"local:8": rk.Local(8), "local:8,sink=3": rk.Local(8, sink=3), "strided:8,8": rk.Strided(8, 8),
                        "block:16,local=1,stride=2": rk.BlockSparse(16, 1, 2)},
              fp8_peer_context=70, check_prefill_max=70, sets=2)


class Pool:
    """One page pool (bf16 or FP8 with scales) and `sets` random block tables drawn from it."""

    def __init__(self, bench: Bench, s: Sizes, batch: int, context: int, fp8: bool):
        pages = triton.cdiv(context, PAGE_SIZE)
        page_bytes = PAGE_SIZE * s.heads * s.head_dim * 2 * (1 if fp8 else s.dtype.itemsize)
        self.num_pages = max(batch * pages, math.ceil(3 * bench.l2_bytes / page_bytes))
        shape = (self.num_pages, PAGE_SIZE, s.heads, s.head_dim)
        if fp8:  # e4m3 values of any magnitude and per-(token, head) scales around 1/448 .. 4/448
            self.k = torch.randn(shape, device=bench.device).to(FP8)
            self.v = torch.randn(shape, device=bench.device).to(FP8)
            scale_shape = (self.num_pages, s.heads, PAGE_SIZE)
            self.scales = {name: ((torch.rand(scale_shape, device=bench.device) + 0.3) / 448).to(FP8_SCALE_DTYPE)
                           for name in ("k_scale", "v_scale")}
        else:
            self.k = bench.rand(*shape, dtype=s.dtype)
            self.v = bench.rand(*shape, dtype=s.dtype)
            self.scales = {}
        self.tables = [torch.randperm(self.num_pages, device=bench.device)[:batch * pages].view(batch, pages).int()
                       for _ in range(s.sets)]
        self.bytes_per_token = 2 * s.heads * s.head_dim * (1 if fp8 else s.dtype.itemsize)


def _dense_kv(pool: Pool, table: torch.Tensor, context: int, dtype: torch.dtype) -> tuple:
    """[B, H, context, Dh] contiguous dequantized K and V of each sequence, for SDPA."""
    out = []
    for cache, scale in ((pool.k, pool.scales.get("k_scale")), (pool.v, pool.scales.get("v_scale"))):
        rows = cache[table.long()].to(dtype)
        if scale is not None:
            rows = (rows.float() * scale[table.long()].float().transpose(-1, -2)[..., None]).to(dtype)
        b, h, dh = table.shape[0], cache.shape[2], cache.shape[3]
        out.append(rows.view(b, -1, h, dh)[:, :context].transpose(1, 2).contiguous())
    return tuple(out)


def _row(bench: Bench, rows: list, name: str, us: float, **extra) -> dict:
    row = {"name": name, "us": us, **extra}
    rows.append(row)
    text = "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in extra.items())
    print(f"time {name:<58} {us:9.1f} us  {text}", flush=True)
    return row


def bench_decode(bench: Bench, s: Sizes, rows: list) -> None:
    h, dh = s.heads, s.head_dim
    scale = dh ** -0.5
    for context in s.contexts:
        for batch in s.decode_batches:
            lens = torch.full((batch,), context, device=bench.device, dtype=torch.int32)
            queries = [bench.rand(batch, h, dh, dtype=s.dtype) for _ in range(s.sets)]
            dense_us = {}
            for cache in ("bf16" if s.dtype == torch.bfloat16 else "fp16", "fp8"):
                pool = Pool(bench, s, batch, context, cache == "fp8")
                sets = list(zip(queries, pool.tables))
                for pname, pattern in {"dense": rk.DENSE, **s.patterns}.items():
                    def run(q, table, pattern=pattern, pool=pool, lens=lens):
                        return rk.decode_attention(q, pool.k, pool.v, table, lens, scale, pattern, **pool.scales)

                    tag = f"decode {pname} {cache} B={batch} ctx={context}"
                    ref_lens = lens.clone()
                    if batch > 1:
                        ref_lens[-1] = context // 2 + 3  # a shorter sequence too
                    bench.check(tag, rk.decode_attention(queries[0], pool.k, pool.v, pool.tables[0], ref_lens,
                                                         scale, pattern, **pool.scales),
                                rk.decode_attention_ref(queries[0], pool.k, pool.v, pool.tables[0], ref_lens, scale,
                                                        pattern, **pool.scales))
                    us = bench.time_us(run, sets)
                    keep = pattern.keep_fraction(context, h, decode=True)
                    extra = {"keep": keep, "kv_bytes": batch * context * pool.bytes_per_token}
                    if pname == "dense":
                        dense_us[cache] = us
                        extra["GB/s"] = extra["kv_bytes"] / us * 1e-3
                    else:
                        extra["dense_us"] = dense_us[cache]
                        extra["ratio"] = us / (dense_us[cache] * keep)
                        if bench.device.type == "cuda":  # a bare read of the kept bytes, and its ratio
                            extra["read_bound_us"] = read_bound_us(bench, round(keep * extra["kv_bytes"]))
                            extra["bound_ratio"] = extra["read_bound_us"] / (dense_us[cache] * keep)
                    _row(bench, rows, tag, us, kind="decode", pattern=pname, cache=cache, batch=batch,
                         context=context, **extra)
                if context == s.fp8_peer_context:
                    sdpa_sets = bench.input_sets(lambda pool=pool, q=queries[0], context=context: (
                                                     q[:, :, None], *_dense_kv(pool, pool.tables[0], context, s.dtype)),
                                                 batch * context * 2 * h * dh * s.dtype.itemsize)
                    if cache == "fp8":
                        sdpa = bench.time_us(F.scaled_dot_product_attention, sdpa_sets)
                        for c, us in dense_us.items():
                            _row(bench, rows, f"decode dense {c} B={batch} ctx={context} vs SDPA bf16", us,
                                 kind="decode-peer", cache=c, batch=batch, context=context, sdpa_us=sdpa,
                                 speedup=sdpa / us)
                    del sdpa_sets
                del pool, sets
                bench.free()


def bench_prefill(bench: Bench, s: Sizes, rows: list) -> None:
    h, dh = s.heads, s.head_dim
    scale = dh ** -0.5
    for context in s.contexts:
        lens = torch.tensor([context], device=bench.device, dtype=torch.int32)
        queries = [bench.rand(context, h, dh, dtype=s.dtype) for _ in range(2)]
        flops = 2 * h * context * context * dh  # 4 h t^2 dh, halved by causality
        dense_us = {}
        for cache in ("bf16" if s.dtype == torch.bfloat16 else "fp16", "fp8"):
            pool = Pool(bench, s, 1, context, cache == "fp8")
            sets = list(zip(queries, pool.tables[:2]))
            for pname, pattern in {"dense": rk.DENSE, **s.patterns}.items():
                def run(q, table, pattern=pattern, pool=pool, lens=lens, context=context):
                    return rk.prefill_attention(q, pool.k, pool.v, table, lens * 0, lens, lens, scale, context,
                                                pattern, **pool.scales)

                tag = f"prefill {pname} {cache} ctx={context}"
                if context <= s.check_prefill_max:
                    args = (queries[0], pool.k, pool.v, pool.tables[0], lens * 0, lens, lens, scale, context, pattern)
                    bench.check(tag, rk.prefill_attention(*args, **pool.scales),
                                rk.prefill_attention_ref(*args, **pool.scales))
                    bench.free()
                us = bench.time_us(run, sets)
                keep = pattern.keep_fraction(context, h)
                extra = {"keep": keep, "TFLOP/s": flops * keep / us * 1e-6}
                if pname == "dense":
                    dense_us[cache] = us
                else:
                    extra["dense_us"] = dense_us[cache]
                    extra["ratio"] = us / (dense_us[cache] * keep)
                _row(bench, rows, tag, us, kind="prefill", pattern=pname, cache=cache, context=context, **extra)
            if cache != "fp8":
                sdpa_sets = [(q.transpose(0, 1)[None].contiguous(), *_dense_kv(pool, t, context, s.dtype))
                             for q, t in sets[:1]]
                sdpa = bench.time_us(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                     sdpa_sets)
                _row(bench, rows, f"prefill dense {cache} ctx={context} vs SDPA causal", dense_us[cache],
                     kind="prefill-peer", cache=cache, context=context, sdpa_us=sdpa, speedup=sdpa / dense_us[cache])
                del sdpa_sets
            del pool, sets
            bench.free()


SPLIT_SHAPES = [(heads, context, batch) for heads in (20, 32, 40) for context in (1024, 2048) for batch in (8, 16)]
FORCED_SPLITS = [1, 2, 3, 4, 6, 8]


def bench_splits(bench: Bench, rows: list) -> None:
    """Dense decode at batch 8 and 16, 1K and 2K keys, 20 / 32 / 40 heads of 128 (a TP-2 13B rank, 7B, 13B), bf16
    and FP8 pages: the launcher's own split count against each forced one (decode_attention._num_splits)."""
    splits_module = sys.modules[rk.decode_attention.__module__]
    chosen = splits_module._num_splits
    for heads, context, batch in SPLIT_SHAPES:
        s = replace(GPU, heads=heads, contexts=[context], decode_batches=[batch])
        lens = torch.full((batch,), context, device=bench.device, dtype=torch.int32)
        queries = [bench.rand(batch, heads, s.head_dim, dtype=s.dtype) for _ in range(s.sets)]
        for cache in ("bf16", "fp8"):
            pool = Pool(bench, s, batch, context, cache == "fp8")
            sets = list(zip(queries, pool.tables))
            times = {}
            try:
                for forced in [None, *FORCED_SPLITS]:
                    splits_module._num_splits = chosen if forced is None else (lambda *args, n=forced: n)
                    times[forced or "auto"] = bench.time_us(
                        lambda q, t, pool=pool, lens=lens: rk.decode_attention(q, pool.k, pool.v, t, lens,
                                                                               s.head_dim ** -0.5, **pool.scales),
                        sets)
            finally:
                splits_module._num_splits = chosen
            best = min(FORCED_SPLITS, key=lambda n: times[n])
            _row(bench, rows, f"splits dense {cache} H={heads} B={batch} ctx={context}", times["auto"],
                 kind="splits", cache=cache, heads=heads, batch=batch, context=context, best_splits=best,
                 best_us=times[best], vs_best=times["auto"] / times[best],
                 forced_us={str(n): times[n] for n in FORCED_SPLITS})
            del pool, sets
            bench.free()


def _table(rows: list) -> str:
    lines = [f"{'row':<62} {'us':>9} {'dense us':>9} {'keep':>7} {'ratio':>6} {'bound':>6} {'SDPA us':>9} "
             f"{'speedup':>7}"]
    for r in rows:
        def fmt(key, spec, r=r):
            return format(r[key], spec) if key in r else ""
        lines.append(f"{r['name']:<62} {r['us']:>9.1f} {fmt('dense_us', '9.1f'):>9} {fmt('keep', '7.4f'):>7} "
                     f"{fmt('ratio', '6.2f'):>6} {fmt('bound_ratio', '6.2f'):>6} {fmt('sdpa_us', '9.1f'):>9} "
                     f"{fmt('speedup', '6.2f') + 'x' if 'speedup' in r else '':>7}")
    return "\n".join(lines)


def fp8_granularity(args) -> int:
    """Attention output error of FP8 K/V at three scale granularities, on the bundled model's real K/V and on
    synthetic activations with outlier channels. Runs on the CPU through the torch references."""
    import ringlet.attention as attention_module
    from ringlet import LLM

    captured = []  # (q, k, v) per prefill call: [T, H, Dh] float32

    real_prefill = attention_module.prefill_attention

    def capture(q, k_cache, v_cache, block_tables, q_start, q_lens, seq_lens, scale, max_q_len, *rest, **kw):
        n = int(seq_lens[0])
        if int(q_lens[0]) == n:  # a whole prompt (a later chunk's queries would need their offset)
            k = rk._paged.gather_kv(k_cache, kw.get("k_scale"), block_tables[0], n)
            v = rk._paged.gather_kv(v_cache, kw.get("v_scale"), block_tables[0], n)
            captured.append((q[:n].float().clone(), k.clone(), v.clone(), scale))
        return real_prefill(q, k_cache, v_cache, block_tables, q_start, q_lens, seq_lens, scale, max_q_len, *rest,
                            **kw)

    attention_module.prefill_attention = capture
    sentence = "The quick brown fox jumps over the lazy dog."
    text = Path(args.text).read_text()[:6000] if args.text else " ".join([sentence] * 150)
    llm = LLM("default")
    for start in (0, 2000, 4000):  # three prompts of ~300 tokens: 3 x layers captures
        llm.generate([text[start:start + 1400]], rk_sampling(max_tokens=1))
    attention_module.prefill_attention = real_prefill
    torch.manual_seed(0)
    synthetic = []
    for _ in range(4):
        t, hk, dh = 512, 4, 64
        gain = torch.ones(dh)
        gain[torch.randperm(dh)[:4]] = 20.0  # outlier channels, as in real keys
        tok = torch.exp(torch.randn(t, 1, 1) * 0.5)  # tokens of varying norm
        synthetic.append((torch.randn(t, hk * 2, dh), torch.randn(t, hk, dh) * gain * tok,
                          torch.randn(t, hk, dh) * tok, dh ** -0.5))
    results = {}
    for source, items in (("bundled model", captured), ("synthetic outliers", synthetic)):
        errs = {g: [] for g in ("per token-head", "per page-head (amax of 16 tokens)", "per head (static)")}
        for q, k, v, scale in items:
            exact = _attend(q, k, v, scale)
            for g in errs:
                out = _attend(q, _fake_fp8(k, g), _fake_fp8(v, g), scale)
                errs[g].append(((out - exact).norm() / exact.norm()).item())
        results[source] = {g: {"mean_rel_err": sum(e) / len(e), "max_rel_err": max(e), "layers": len(e)}
                           for g, e in errs.items()}
        print(f"\n{source} ({len(items)} layers): attention output ||fp8 - exact|| / ||exact||")
        for g, r in sorted(results[source].items()):
            print(f"  {g:<36} mean {r['mean_rel_err']:.5f}  max {r['max_rel_err']:.5f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


def rk_sampling(max_tokens: int):
    from ringlet import SamplingParams
    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


def _attend(q, k, v, scale):
    """Causal attention, float32: q [T, Hq, Dh], k, v [T, Hk, Dh]."""
    group = q.shape[1] // k.shape[1]
    q4, k4, v4 = (x.transpose(0, 1)[None] for x in (q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)))
    return F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale)[0]


def _fake_fp8(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """x [T, H, Dh] float32 through e4m3 with one scale per token-head, per 16-token page and head, or per head."""
    if granularity == "per token-head":
        q, s = quantize_fp8_ref(x)
        return q.float() * s[..., None]
    t, h, dh = x.shape
    if granularity.startswith("per page"):
        pad = (-t) % PAGE_SIZE
        xp = torch.cat([x, x.new_zeros(pad, h, dh)]).view(-1, PAGE_SIZE, h, dh)
        amax = xp.abs().amax(dim=(1, 3), keepdim=True).clamp_min(1e-30)
        deq = (xp * (448 / amax)).clamp(-448, 448).to(FP8).float() * (amax / 448)
        return deq.view(-1, h, dh)[:t]
    amax = x.abs().amax(dim=(0, 2), keepdim=True).clamp_min(1e-30)
    return (x * (448 / amax)).clamp(-448, 448).to(FP8).float() * (amax / 448)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny sizes")
    parser.add_argument("--fp8-granularity", action="store_true", help="CPU: FP8 scale granularity study")
    parser.add_argument("--text", help="text file for --fp8-granularity (default: a repeated sentence)")
    parser.add_argument("--only", choices=["decode", "decode-peer", "splits"],
                        help="decode: every decode row, no prefill; decode-peer: only dense decode at the "
                             "FP8-vs-SDPA context (bf16 and FP8 pages, SDPA); splits: decode at batch 8 and 16, "
                             "short contexts, the launcher's split count against forced ones")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/attention-<gpu>-<date>.json)")
    args = parser.parse_args()
    if args.fp8_granularity:
        return fp8_granularity(args)
    bench, gpu, date = bench_kernels.start(parser, args)
    sizes = SMOKE if args.smoke else GPU
    if args.only == "decode-peer":
        sizes = replace(sizes, contexts=[sizes.fp8_peer_context], patterns={})
    rows = []
    start = time.perf_counter()
    if args.only == "splits":
        bench_splits(bench, rows)
    else:
        bench_decode(bench, sizes, rows)
    if not args.only:
        bench_prefill(bench, sizes, rows)
    return bench_kernels.finish(bench, "attention", gpu, date, args.out, time.perf_counter() - start,
                                _table(rows), rows=rows)


if __name__ == "__main__":
    sys.exit(main())
