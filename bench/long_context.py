"""End-to-end decode at long context: a Llama-7B-shaped model (random bf16 weights) decoding at 32K context with an
FP8 KV cache and sparse attention, against its own rate at 1K context with a bf16 cache and dense attention.

Target (DESIGN.md section 4): >= 0.8x the 1K rate with sparse attention + FP8 KV. The model is trained for 4096
positions (llama-7b), so the 32K runs also exercise RoPE scaling: yarn with factor long / 4096. Each run builds a
fresh engine over the same weights (pattern, KV dtype and RoPE table are per engine), prefills one prompt of random
token ids, then times --steps whole engine steps (scheduler, CUDA-graph decode, sampler; batch 1, greedy).
Also reported per run: prefill seconds, KV bytes per token, the fraction of keys the pattern keeps for the last
query, and the bytes a decode step reads (weights + kept KV) per second.

    python bench/long_context.py [--out bench/results/long_context-<gpu>-<date>.json]
    python bench/long_context.py --smoke       # tiny model on the CPU: checks that every run works
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import time

import torch
import triton

from ringlet.attention import parse_attention
from ringlet.checkpoint import Checkpoint
from ringlet.config import ModelConfig
from ringlet.engine import Engine, EngineConfig
from ringlet.model import random_weights
from ringlet.sampling_params import SamplingParams

TINY = ModelConfig(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256, max_seq_len=256,
                   name="tiny")


def weight_bytes(cfg: ModelConfig, elem: int) -> int:
    """Bytes of weights one decode step reads (every projection and the LM head; embeddings are a gather)."""
    per_layer = cfg.dim * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * cfg.dim + 3 * cfg.dim * cfg.ffn_dim
    return elem * (cfg.n_layers * per_layer + cfg.vocab_size * cfg.dim)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(cfg: ModelConfig, weights: dict, device: torch.device, prompt_len: int, steps: int, attention: str,
            kv_dtype: str, rope_scaling: str | None, prefill_chunk: int) -> dict:
    """Build an engine, prefill one random prompt of prompt_len tokens, time `steps` decode steps."""
    total = prompt_len + steps + 16
    engine = Engine(Checkpoint(cfg, weights, None, "random"),
                    EngineConfig(device=str(device), attention=attention, kv_dtype=kv_dtype, rope_scaling=rope_scaling,
                                 max_model_len=total, kv_cache_tokens=total + 16, max_num_seqs=1,
                                 max_num_batched_tokens=prefill_chunk))
    prompt = torch.randint(0, cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    rid = engine.add_request(prompt, SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True))
    seq = engine.scheduler.waiting[0]
    _sync(device)
    start = time.perf_counter()
    while seq.num_computed < prompt_len:
        engine.step()
    _sync(device)
    prefill_s = time.perf_counter() - start
    for _ in range(3):  # capture the decode graph, warm up
        engine.step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    _sync(device)
    step_s = (time.perf_counter() - start) / steps
    engine.abort(rid)
    engine.pop_finished(rid)
    position = prompt_len + 3 + steps // 2  # the middle of the timed steps
    patterns = parse_attention(attention, cfg.n_layers)
    keep = sum(p.keep_fraction(position, cfg.n_heads, decode=True) for p in patterns) / len(patterns)
    kv_read = keep * position * engine.kv_bytes_per_token
    elem = torch.empty((), dtype=engine.dtype).element_size()
    result = {"attention": attention, "kv_dtype": engine.info()["kv_dtype"], "rope_scaling": rope_scaling,
              "prompt_tokens": prompt_len, "decode_positions": [prompt_len + 3, prompt_len + 3 + steps],
              "prefill_s": round(prefill_s, 3), "decode_step_ms": round(step_s * 1e3, 3),
              "decode_tok_s": round(1 / step_s, 1), "kv_bytes_per_token": engine.kv_bytes_per_token,
              "keys_kept_fraction": round(keep, 5),
              "GBps": round((weight_bytes(cfg, elem) + kv_read) / step_s / 1e9, 1)}
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama-7b")
    ap.add_argument("--short", type=int, default=1024, help="prompt tokens of the baseline run")
    ap.add_argument("--long", type=int, default=32768, help="context (prompt + decoded tokens) of the long runs")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--patterns", default="local:256|strided:64,256|dense",
                    help="'|'-separated attention patterns for the long FP8 runs (dense: for reference)")
    ap.add_argument("--prefill-chunk", type=int, default=4096)
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU, short contexts: checks it runs")
    ap.add_argument("--out")
    args = ap.parse_args()

    if args.smoke:
        cfg, device, dtype = TINY, torch.device("cpu"), torch.float32
        args.short, args.long, args.steps, args.prefill_chunk = 64, 600, 4, 128
        args.patterns = "local:32|strided:8,32|block:16,local=2,stride=4|local:32;0=dense"
    else:
        cfg, device, dtype = ModelConfig.from_name(args.shape), torch.device("cuda", torch.cuda.current_device()), \
            torch.bfloat16
    weights = random_weights(cfg, dtype, device)
    long_prompt = args.long - args.steps - 16
    factor = math.ceil(args.long / cfg.max_seq_len)
    rope = f"yarn:{factor}" if factor > 1 else None

    results = {"gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "date": datetime.date.today().isoformat(), "torch": torch.__version__, "triton": triton.__version__,
               "shape": cfg.name, "trained_context": cfg.max_seq_len, "steps": args.steps, "batch": 1,
               "weight_bytes": weight_bytes(cfg, torch.empty((), dtype=dtype).element_size()), "runs": []}
    base = run_one(cfg, weights, device, args.short, args.steps, "dense", "auto", None, args.prefill_chunk)
    results["runs"].append(base)
    for pattern in args.patterns.split("|"):
        run = run_one(cfg, weights, device, long_prompt, args.steps, pattern, "fp8", rope, args.prefill_chunk)
        run["ratio_vs_short"] = round(run["decode_tok_s"] / base["decode_tok_s"], 3)
        results["runs"].append(run)
        print(f"{pattern:>32} fp8 @ {long_prompt}: {run['decode_tok_s']} tok/s "
              f"({run['ratio_vs_short']}x the {args.short}-token dense rate {base['decode_tok_s']}), "
              f"prefill {run['prefill_s']} s", flush=True)
    results["target"] = ">= 0.8x the short-context rate with sparse attention + FP8 KV"

    gpu = results["gpu"].replace(" ", "-")
    out = args.out or (None if args.smoke else f"bench/results/long_context-{gpu}-{results['date']}.json")
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
