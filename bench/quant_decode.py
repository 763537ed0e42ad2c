"""End-to-end decode with weight-only quantization against bf16, same process: a Llama-7B-shaped model (random bf16
weights) quantized at load (`EngineConfig(quant=...)`), whole engine steps (scheduler, CUDA-graph decode, sampler)
at batch 1 and 16 over prompts of --context tokens.

    python bench/quant_decode.py [--formats rtn-int8,rtn-int4,bitnet] [--out bench/results/quant_decode-<gpu>-<date>.json]
    python bench/quant_decode.py --smoke      # tiny model on the CPU: checks the script runs

Reported per format and batch: tokens/s, milliseconds per step, the bytes of projection and head weights one step
reads (embeddings: one row per token, not counted) and the GB/s that makes, and the speedup over bf16.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
from pathlib import Path

import torch
from ringlet.checkpoint import Checkpoint
from ringlet.config import ModelConfig
from ringlet.engine import Engine, EngineConfig
from ringlet.model import random_weights
from ringlet.quant.apply import model_nbytes

from decode import bench_ringlet
from result_files import write_results

SMOKE = ModelConfig(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256, max_seq_len=512,
                    name="smoke")


def step_weight_bytes(engine: Engine) -> int:
    """Bytes of the weights one decode step streams: every layer's four projections and the LM head, packed
    (quantized weights' codes, scales and zero points) or dense."""
    model = engine.model
    streamed = {f"layers.{i}.{name}": getattr(layer, name) for i, layer in enumerate(model.layers)
                for name in ("wqkv", "wo", "w13", "w2")}
    streamed["lm_head"] = model.output  # counted even when tied to the embeddings, which a step only gathers
    return model_nbytes(streamed, engine.model_config, model.dtype)


def run_format(cfg: ModelConfig, quant: str | None, device: torch.device, batches: list[int], context: int,
               steps: int) -> list[dict]:
    """Build the engine for one format (None: bf16), time every batch, free it."""
    max_len = context + steps + 32
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    engine = Engine(Checkpoint(cfg, random_weights(cfg, dtype, device), None, "random"),
                    EngineConfig(device=str(device), dtype="bf16" if device.type == "cuda" else "fp32", quant=quant,
                                 max_num_seqs=max(batches), kv_cache_tokens=(max(batches) + 1) * (max_len + 16),
                                 max_model_len=min(cfg.max_seq_len, max_len + 16)))
    weight_bytes = step_weight_bytes(engine)
    runs = []
    for batch in batches:
        tok_s, step = bench_ringlet(engine, batch, context, steps)
        runs.append({"format": quant or "bf16", "batch": batch, "tok_s": round(tok_s, 1),
                     "step_ms": round(step * 1e3, 3), "weight_bytes": weight_bytes,
                     "weight_GBps": round(weight_bytes / step / 1e9, 1)})
        print(json.dumps(runs[-1]), flush=True)
    del engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--shape", default="llama-7b")
    ap.add_argument("--formats", default="rtn-int8,rtn-int4,bitnet", help="EngineConfig.quant specs beside bf16")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--context", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        ap.error("no CUDA GPU: run on an H100/H200, or pass --smoke")
    device = torch.device("cpu") if args.smoke else torch.device("cuda", torch.cuda.current_device())
    cfg = SMOKE if args.smoke else ModelConfig.from_name(args.shape)
    context = args.context or (16 if args.smoke else 1024)
    steps = args.steps or (4 if args.smoke else 64)
    batches = [int(b) for b in args.batches.split(",")]
    runs = run_format(cfg, None, device, batches, context, steps)
    base = {r["batch"]: r["tok_s"] for r in runs}
    for quant in filter(None, args.formats.split(",")):
        for r in run_format(cfg, quant, device, batches, context, steps):
            r["speedup_vs_bf16"] = round(r["tok_s"] / base[r["batch"]], 3)
            runs.append(r)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu-smoke"
    date = datetime.date.today().isoformat()
    out = write_results("quant_decode", gpu, date, args.out, {
        "gpu": gpu, "date": date, "torch": torch.__version__, "shape": cfg.name, "context": context,
        "steps": steps, "runs": runs})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
