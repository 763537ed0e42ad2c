"""The Llama forward pass over ringlet.kernels, reading and writing the paged KV cache."""
from __future__ import annotations

import torch

from ringlet.kernels import apply_rope, fused_add_rms_norm, linear, rms_norm, rope_cos_sin, silu_mul, write_kv
from ringlet.kernels.patterns import DENSE

from .attention import Attention, AttentionMetadata, Pattern
from .config import ModelConfig
from .errors import CheckpointError
from .kv_cache import FP8, KVCache
from .kv_rotation import hadamard


class LlamaLayer:
    """One decoder block's weights: fused QKV [q+2kv, dim], O, fused gate/up [2*ffn, dim], down [dim, ffn]."""

    def __init__(self, wqkv, wo, w13, w2, attention_norm, ffn_norm):
        self.wqkv, self.wo, self.w13, self.w2 = wqkv, wo, w13, w2
        self.attention_norm, self.ffn_norm = attention_norm, ffn_norm


class Llama:
    """A Llama-family decoder on one device. Weights are held in `dtype`; logits come back in float32.

    `patterns` gives each layer its attention pattern (default: dense everywhere); the RoPE table covers
    `config.max_context` positions under `config.rope_scaling`.
    """

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], device: torch.device,
                 dtype: torch.dtype, patterns: list[Pattern] | None = None):
        self.config, self.device, self.dtype = config, device, dtype

        def take(name: str) -> torch.Tensor:
            if name not in weights:
                raise CheckpointError(f"missing tensor {name!r}")
            return weights[name].to(device=device, dtype=dtype).contiguous()

        self.tok_embeddings = take("tok_embeddings.weight")
        self.layers = []
        for i in range(config.n_layers):
            p = f"layers.{i}."
            wqkv = torch.cat([take(p + "attention.wq.weight"), take(p + "attention.wk.weight"),
                              take(p + "attention.wv.weight")])
            w13 = torch.cat([take(p + "feed_forward.w1.weight"), take(p + "feed_forward.w3.weight")])
            self.layers.append(LlamaLayer(wqkv, take(p + "attention.wo.weight"), w13,
                                          take(p + "feed_forward.w2.weight"), take(p + "attention_norm.weight"),
                                          take(p + "ffn_norm.weight")))
        self.norm = take("norm.weight")
        self.output = self.tok_embeddings if config.tie_embeddings else take("output.weight")
        patterns = [DENSE] * config.n_layers if patterns is None else patterns
        if len(patterns) != config.n_layers:
            raise ValueError(f"got {len(patterns)} attention patterns for {config.n_layers} layers")
        self.attention = [Attention(config.head_dim, p) for p in patterns]
        self.cos_sin = rope_cos_sin(config.max_context, config.head_dim, config.rope_theta, device,
                                    config.rope_scaling)
        # Applied to queries and keys in front of an FP8 cache (kv_rotation.py); the attention kernels take only
        # power-of-two head dims, which are also the sizes a Hadamard matrix comes in.
        pow2 = config.head_dim & (config.head_dim - 1) == 0
        self.key_rotation = hadamard(config.head_dim, device, dtype) if pow2 else None

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, meta: AttentionMetadata,
                kv: KVCache, logits_index: torch.Tensor | None = None) -> torch.Tensor:
        """Run T tokens through the model, writing their K/V into the cache.

        tokens [T] int64, positions [T] int32, slots [T] int64 (flat cache slot per token, -1 to skip).
        Returns float32 logits [len(logits_index), vocab] (rows picked before the final norm), or [T, vocab].
        """
        cfg = self.config
        t = tokens.shape[0]
        h = self.tok_embeddings[tokens]
        residual = None
        for i, layer in enumerate(self.layers):
            if residual is None:
                x, residual = rms_norm(h, layer.attention_norm, cfg.rms_eps), h
            else:
                x, residual = fused_add_rms_norm(h, residual, layer.attention_norm, cfg.rms_eps)
            qkv = linear(x, layer.wqkv)
            q = qkv[:, :cfg.q_size].view(t, cfg.n_heads, cfg.head_dim)
            k = qkv[:, cfg.q_size:cfg.q_size + cfg.kv_size].view(t, cfg.n_kv_heads, cfg.head_dim)
            v = qkv[:, cfg.q_size + cfg.kv_size:].view(t, cfg.n_kv_heads, cfg.head_dim)
            q, k = apply_rope(q, k, positions, self.cos_sin)
            if kv.dtype == FP8 and self.key_rotation is not None:
                q, k = torch.matmul(q, self.key_rotation), torch.matmul(k, self.key_rotation)
            write_kv(k, v, kv.k[i], kv.v[i], slots, kv.k_scale[i], kv.v_scale[i])
            attn = self.attention[i](q, kv.k[i], kv.v[i], meta, kv.k_scale[i], kv.v_scale[i])
            h = linear(attn.view(t, cfg.q_size), layer.wo)
            x, residual = fused_add_rms_norm(h, residual, layer.ffn_norm, cfg.rms_eps)
            h = linear(silu_mul(linear(x, layer.w13)), layer.w2)
        if logits_index is not None:
            h, residual = h[logits_index], residual[logits_index]
        x, _ = fused_add_rms_norm(h, residual, self.norm, cfg.rms_eps)
        return linear(x, self.output).float()


def random_weights(config: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int = 0
                   ) -> dict[str, torch.Tensor]:
    """Random weights under ringlet's tensor names (std 0.02 projections, unit norms): same shapes, same path."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * 0.02).to(dtype)

    d, f = config.dim, config.ffn_dim
    w = {"tok_embeddings.weight": rand(config.vocab_size, d),
         "norm.weight": torch.ones(d, dtype=dtype, device=device)}
    if not config.tie_embeddings:
        w["output.weight"] = rand(config.vocab_size, d)
    for i in range(config.n_layers):
        p = f"layers.{i}."
        w[p + "attention_norm.weight"] = torch.ones(d, dtype=dtype, device=device)
        w[p + "ffn_norm.weight"] = torch.ones(d, dtype=dtype, device=device)
        w[p + "attention.wq.weight"] = rand(config.q_size, d)
        w[p + "attention.wk.weight"] = rand(config.kv_size, d)
        w[p + "attention.wv.weight"] = rand(config.kv_size, d)
        w[p + "attention.wo.weight"] = rand(d, config.q_size)
        w[p + "feed_forward.w1.weight"] = rand(f, d)
        w[p + "feed_forward.w3.weight"] = rand(f, d)
        w[p + "feed_forward.w2.weight"] = rand(d, f)
    return w
