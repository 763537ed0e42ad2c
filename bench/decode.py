"""Decode throughput of ringlet's engine against a torch.compile(mode="reduce-overhead") Llama, same weights.

Llama-7B shape (32 layers, dim 4096, FFN 11008, 32 heads), random bf16 weights, prompts of --context tokens, batch
1 and 16. The baseline is gpt-fast style: static KV cache, SDPA, fused QKV and gate/up, greedy sampling on the GPU
with no host sync per token; ringlet runs its whole engine step (scheduler, CUDA-graph decode, sampler, detokenizer
skipped: token-id prompts), with async scheduling (its default on GPUs: each decode step queued before the
previous step's tokens are read) and, as ringlet_waiting_*, without. Also checks ringlet's first-decode-step
logits, and the bf16 peer's, against a float32 peer on the same weights.

    python bench/decode.py [--out bench/results/decode-<gpu>-<date>.json] [--shape llama-7b]
"""
from __future__ import annotations

import argparse
import datetime
import json
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import triton

from ringlet.checkpoint import Checkpoint
from ringlet.config import ModelConfig
from ringlet.engine import Engine, EngineConfig
from ringlet.model import Llama, LlamaLayer, random_weights
from ringlet.sampling_params import SamplingParams


class CompiledLlama(torch.nn.Module):
    """The peer: a plain PyTorch Llama over ringlet's weight tensors, static KV cache [B, H, max_len, Dh]."""

    def __init__(self, engine: Engine, batch: int, max_len: int, weights: Llama | SimpleNamespace | None = None):
        super().__init__()
        m, cfg = weights or engine.model, engine.model_config
        self.m, self.cfg = m, cfg
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.randn(shape, dtype=m.dtype, device=m.device) for _ in range(cfg.n_layers)]
        self.v = [torch.randn(shape, dtype=m.dtype, device=m.device) for _ in range(cfg.n_layers)]
        half = cfg.head_dim // 2
        self.cos = m.cos_sin[:, :half].to(m.dtype)
        self.sin = m.cos_sin[:, half:].to(m.dtype)
        self.max_len = max_len

    def _norm(self, x, w):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.cfg.rms_eps)).to(x.dtype) * w

    def _rope(self, x, pos):
        cos, sin = self.cos[pos].view(1, 1, 1, -1), self.sin[pos].view(1, 1, 1, -1)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tokens [B, 1] int64, pos [1] int64 (every sequence at the same position) -> logits [B, vocab] fp32."""
        cfg, m = self.cfg, self.m
        b = tokens.shape[0]
        h = m.tok_embeddings[tokens]
        mask = (torch.arange(self.max_len, device=tokens.device) <= pos).view(1, 1, 1, -1)
        for i, layer in enumerate(m.layers):
            x = self._norm(h, layer.attention_norm)
            qkv = F.linear(x, layer.wqkv)
            q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
            q = self._rope(q.view(b, 1, cfg.n_heads, cfg.head_dim), pos).transpose(1, 2)
            k = self._rope(k.view(b, 1, cfg.n_kv_heads, cfg.head_dim), pos).transpose(1, 2)
            v = v.view(b, 1, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
            self.k[i].index_copy_(2, pos, k)
            self.v[i].index_copy_(2, pos, v)
            y = F.scaled_dot_product_attention(q, self.k[i], self.v[i], attn_mask=mask,
                                               enable_gqa=cfg.n_heads != cfg.n_kv_heads)
            h = h + F.linear(y.transpose(1, 2).reshape(b, 1, cfg.q_size), layer.wo)
            x = self._norm(h, layer.ffn_norm)
            gate, up = F.linear(x, layer.w13).chunk(2, dim=-1)
            h = h + F.linear(F.silu(gate) * up, layer.w2)
        return F.linear(self._norm(h, m.norm), m.output)[:, 0].float()


def weight_bytes(cfg: ModelConfig, elem: int) -> int:
    """Bytes of weights one decode step reads (every projection and the LM head; embeddings are a gather)."""
    per_layer = cfg.dim * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * cfg.dim + 3 * cfg.dim * cfg.ffn_dim
    return elem * (cfg.n_layers * per_layer + cfg.vocab_size * cfg.dim)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _start_decode(engine: Engine, batch: int, context: int, steps: int) -> list[int]:
    """Prefill `batch` prompts of `context` random token ids (room for `steps` decode steps after a warm-up) and
    run 3 decode steps (the bucket's graph captured); returns the request ids."""
    g = torch.Generator().manual_seed(batch)
    vocab = engine.model_config.vocab_size
    ids = [engine.add_request(torch.randint(0, vocab, (context,), generator=g).tolist(),
                              SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True))
           for _ in range(batch)]
    while any(s.num_computed < context for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    for _ in range(3):  # capture this bucket's graph, warm up
        engine.step()
    _sync(engine.device)
    return ids


def _end_decode(engine: Engine, ids: list[int]) -> None:
    for i in ids:
        engine.abort(i)
        engine.pop_finished(i)


def bench_ringlet(engine: Engine, batch: int, context: int, steps: int) -> tuple[float, float]:
    """(tokens/s, seconds per step) over `steps` decode engine steps after prefilling `batch` prompts of `context`
    tokens (also used by bench/tp_decode.py, on the CPU too)."""
    ids = _start_decode(engine, batch, context, steps)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    _sync(engine.device)
    elapsed = time.perf_counter() - start
    _end_decode(engine, ids)
    return batch * steps / elapsed, elapsed / steps


def profile_ringlet(engine: Engine, batch: int, context: int, steps: int) -> dict:
    """GPU kernel time of `steps` decode engine steps (set up as bench_ringlet's), from torch.profiler: the span
    from the first kernel's start to the last one's end and the time kernels ran, each per step, and per kernel
    name its calls and microseconds per step (the profiler adds some host time between steps, not to kernels).
    Off the GPU it runs the steps and reports no kernels."""
    from torch.profiler import ProfilerActivity, profile

    ids = _start_decode(engine, batch, context, steps)
    cuda = engine.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
        _sync(engine.device)
    _end_decode(engine, ids)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not kernels:  # the CPU (--smoke runs): no kernels to report
        return {"steps": steps, "kernels": {}}
    span = max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)
    per_name: dict[str, list[float]] = {}
    for e in kernels:
        per_name.setdefault(e.name[:80], []).append(e.time_range.end - e.time_range.start)
    table = {name: {"calls_per_step": round(len(d) / steps, 2), "us_per_step": round(sum(d) / steps, 1)}
             for name, d in sorted(per_name.items(), key=lambda kv: -sum(kv[1]))}
    busy = sum(sum(d) for d in per_name.values())
    return {"steps": steps, "span_ms_per_step": round(span / steps / 1e3, 3),
            "busy_ms_per_step": round(busy / steps / 1e3, 3), "kernels": table}


def bench_compiled(model: CompiledLlama, step_fn, batch: int, context: int, steps: int) -> float:
    tokens = torch.zeros(batch, 1, dtype=torch.int64, device=model.m.device)
    for i in range(3):
        tokens = step_fn(tokens, torch.tensor([context + i], device=tokens.device))
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        tokens = step_fn(tokens, torch.tensor([context + 3 + i], device=tokens.device))
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start), (time.perf_counter() - start) / steps


def _float32_copy(m: Llama) -> SimpleNamespace:
    """The same model's weights upcast to float32, shaped like Llama for CompiledLlama."""
    def f(t):
        return t.float()
    layers = [LlamaLayer(f(l.wqkv), f(l.wo), f(l.w13), f(l.w2), f(l.attention_norm), f(l.ffn_norm))
              for l in m.layers]
    return SimpleNamespace(tok_embeddings=f(m.tok_embeddings), layers=layers, norm=f(m.norm), output=f(m.output),
                           cos_sin=m.cos_sin, dtype=torch.float32, device=m.device)


def check_logits(engine: Engine, batch: int, context: int) -> dict:
    """First-decode-step logits of ringlet and of the bf16 peer, each against a float32 peer on the same weights
    and the same cached context (the peers' caches are filled from ringlet's pages after ringlet's prefill).
    Returns the relative L2 errors; ringlet's should be no larger than the bf16 peer's."""
    cfg = engine.model_config
    engine.async_scheduling = False  # no decode step may run between the prefill and the one checked here
    prompt = torch.randint(0, cfg.vocab_size, (context,), generator=torch.Generator().manual_seed(7)).tolist()
    rid = engine.add_request(prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    seq = engine.scheduler.waiting[0]
    while seq.num_computed < context:
        engine.step()
    seq.pages += engine.kv.allocator.allocate(1)  # room for the decoded token's K/V
    pages = torch.tensor(seq.pages, device=engine.device)
    last = torch.tensor([[seq.token_ids[context]]], device=engine.device)
    logits = {}
    for name, weights in (("bf16", engine.model), ("fp32", _float32_copy(engine.model))):
        peer = CompiledLlama(engine, batch, context + 1, weights)
        for i in range(cfg.n_layers):
            for src, dst in ((engine.kv.k[i], peer.k[i]), (engine.kv.v[i], peer.v[i])):
                flat = src[pages].reshape(-1, cfg.n_kv_heads, cfg.head_dim)[:context]
                dst[0, :, :context] = flat.transpose(0, 1).to(dst.dtype)
        logits[name] = peer(last.expand(batch, 1), torch.tensor([context], device=engine.device))[0]
        del peer, weights
        torch.cuda.empty_cache()
    ours = engine.runner.decode([seq])[0]
    engine.abort(rid)
    engine.pop_finished(rid)
    ref = logits["fp32"]
    return {"ringlet_vs_fp32": float((ours - ref).norm() / ref.norm()),
            "bf16_peer_vs_fp32": float((logits["bf16"] - ref).norm() / ref.norm())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-7b")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--out")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    cfg = ModelConfig.from_name(args.shape)
    dev = torch.device("cuda", torch.cuda.current_device())
    weights = random_weights(cfg, torch.bfloat16, dev)
    max_len = args.context + args.steps + 32
    engine = Engine(Checkpoint(cfg, weights, None, "random"),
                    EngineConfig(max_num_seqs=max(batches), kv_cache_tokens=(max(batches) + 1) * (max_len + 16),
                                 max_model_len=min(cfg.max_seq_len, max_len + 16)))
    del weights
    torch.cuda.empty_cache()
    results = {"gpu": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
               "torch": torch.__version__, "triton": triton.__version__, "shape": args.shape,
               "context": args.context, "steps": args.steps, "weight_bytes": weight_bytes(cfg, 2), "runs": []}
    results["logits_rel_err"] = check_logits(engine, 1, args.context)
    for batch in batches:
        peer = CompiledLlama(engine, batch, max_len)
        compiled = torch.compile(peer, mode="reduce-overhead", fullgraph=True)

        def step_fn(tokens, pos):
            return torch.argmax(compiled(tokens, pos), dim=-1, keepdim=True)

        engine.async_scheduling = False
        waiting, waiting_step = bench_ringlet(engine, batch, args.context, args.steps)
        engine.async_scheduling = True  # the default on GPUs: each decode step queued before the last is read
        ours, ours_step = bench_ringlet(engine, batch, args.context, args.steps)
        theirs, theirs_step = bench_compiled(peer, step_fn, batch, args.context, args.steps)
        kv_bytes = 2 * cfg.n_layers * cfg.kv_size * 2 * args.context * batch
        run = {"batch": batch, "ringlet_tok_s": round(ours, 1), "torch_compile_tok_s": round(theirs, 1),
               "ratio": round(ours / theirs, 3), "ringlet_step_ms": round(ours_step * 1e3, 3),
               "torch_compile_step_ms": round(theirs_step * 1e3, 3), "ringlet_waiting_tok_s": round(waiting, 1),
               "ringlet_waiting_step_ms": round(waiting_step * 1e3, 3),
               "ringlet_GBps": round((results["weight_bytes"] + kv_bytes) / ours_step / 1e9, 1),
               "torch_compile_GBps": round((results["weight_bytes"] + kv_bytes) / theirs_step / 1e9, 1)}
        results["runs"].append(run)
        del peer, compiled
        torch.cuda.empty_cache()
    gpu = results["gpu"].replace(" ", "-")
    out = args.out or f"bench/results/decode-{gpu}-{results['date']}.json"
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print("logits rel err vs a float32 peer:", results["logits_rel_err"])
    print(f"{'batch':>5} {'ringlet tok/s':>14} {'compile tok/s':>14} {'ratio':>6} {'ringlet GB/s':>12}")
    for r in results["runs"]:
        print(f"{r['batch']:>5} {r['ringlet_tok_s']:>14} {r['torch_compile_tok_s']:>14} {r['ratio']:>6} "
              f"{r['ringlet_GBps']:>12}")


if __name__ == "__main__":
    main()
