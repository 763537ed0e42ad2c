"""The Llama forward pass over ringlet.kernels, reading and writing the paged KV cache.

A projection weight is one of (`Linear`): a dense tensor [N, K]; a quantized weight of `kernels.quant_gemm`
(Int8Weight, Int4Weight, TernaryWeight), run through `quant_linear`; or a tuple of those whose outputs are
concatenated (AutoGPTQ/AutoAWQ checkpoints keep q/k/v and gate/up apart, each with its own act-order, so they
stay separate parts of the fused projection). ringlet's own quantizers quantize the fused wqkv and w13 matrices.
The token embedding (and the output head, tied to it or not) is a dense tensor or a per-row Int8Weight (`embed`).
"""
from __future__ import annotations

from typing import Callable, Union

import torch

from ringlet.kernels import (
    apply_rope,
    fused_add_rms_norm,
    linear,
    linear_silu_mul,
    rms_norm,
    rope_cos_sin,
    rope_write_kv,
    silu_mul,
    write_kv,
)
from ringlet.kernels.patterns import DENSE
from ringlet.kernels.quant_formats import Int8Weight, unpack_fields
from ringlet.kernels.quant_gemm import quant_linear

from .attention import Attention, AttentionMetadata, Pattern
from .config import ModelConfig
from .errors import CheckpointError
from .kv_cache import FP8, KVCache
from .kv_rotation import hadamard


Linear = Union[torch.Tensor, object, tuple]

# The four projections of a decoder block, by the names `Llama.observer` and quantized weight dicts use
# (after "layers.{i}."): fused QKV [q+2kv, dim], O [dim, q], fused gate/up [2*ffn, dim], down [dim, ffn].
LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")


def project(x: torch.Tensor, w: Linear) -> torch.Tensor:
    """x [T, K] -> x @ W^T [T, N] in x.dtype, for any `Linear`."""
    if isinstance(w, torch.Tensor):
        return linear(x, w)
    if isinstance(w, tuple):
        return torch.cat([project(x, part) for part in w], dim=-1)
    return quant_linear(x, w)


def embed(w: torch.Tensor | Int8Weight, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows `tokens` [T] int64 of the embedding w [vocab, dim] (dense, or per-row Int8Weight) -> [T, dim] dtype.
    An Int8Weight's rows are independent, so the lookup gathers packed rows and unpacks only those."""
    if isinstance(w, torch.Tensor):
        return w[tokens]
    codes = unpack_fields(w.qweight[tokens], w.BITS, w.layout_group) - w.OFFSET
    return (codes.float() * w.scales[tokens].float()[:, None]).to(dtype)


def fuse_dense(weights: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Layer i's four projections (LINEARS names, full "layers.{i}." prefix) fused from the per-projection
    checkpoint tensors."""
    p = f"layers.{i}."
    cat = [[p + "attention.wq.weight", p + "attention.wk.weight", p + "attention.wv.weight"],
           [p + "attention.wo.weight"], [p + "feed_forward.w1.weight", p + "feed_forward.w3.weight"],
           [p + "feed_forward.w2.weight"]]
    out = {}
    for kind, names in zip(LINEARS, cat):
        missing = [n for n in names if n not in weights]
        if missing:
            raise CheckpointError(f"missing tensor {missing[0]!r}")
        out[p + kind] = torch.cat([weights[n] for n in names]) if len(names) > 1 else weights[names[0]]
    return out


class LlamaLayer:
    """One decoder block's weights: fused QKV [q+2kv, dim], O, fused gate/up [2*ffn, dim], down [dim, ffn]."""

    def __init__(self, wqkv, wo, w13, w2, attention_norm, ffn_norm):
        self.wqkv, self.wo, self.w13, self.w2 = wqkv, wo, w13, w2
        self.attention_norm, self.ffn_norm = attention_norm, ffn_norm


class Llama:
    """A Llama-family decoder on one device. Weights are held in `dtype`; logits come back in float32.

    `patterns` gives each layer its attention pattern (default: dense everywhere); the RoPE table covers
    `config.max_context` positions under `config.rope_scaling`.

    `weights` holds either the per-projection checkpoint tensors (attention.wq.weight, ...) or, per layer, the
    four fused `LINEARS` entries ("layers.{i}.attention.wqkv", ...) as any `Linear` (a quantized checkpoint).
    `observer`, when set, is called as observer(name, x) with the input x [T, K] of every projection (calibration).
    `comm`, when set (tensor parallel: `ringlet.mpi.tp.apply_tp` shards the model and sets it), is any object with
    `all_reduce(tensor) -> tensor` that sums over the ranks in place, `row_parallel_linear(x, w)`, which computes
    the partial outputs of the row-parallel wo and w2, `reduce_add_rms_norm`, which sums them and applies the
    residual add and RMSNorm that follow them, and `vocab_parallel_logits(x, w)`, which gathers every rank's
    logits when `vocab_parallel` (apply_tp split the output head by vocabulary rows); see
    `ringlet.mpi.comm.Communicator`.
    """

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], device: torch.device,
                 dtype: torch.dtype, patterns: list[Pattern] | None = None):
        self.config, self.device, self.dtype = config, device, dtype
        self.observer: Callable[[str, torch.Tensor], None] | None = None
        self.comm = None
        self.vocab_parallel = False  # self.output holds this rank's rows of the head (set by apply_tp)

        def place(w: Linear) -> Linear:
            if isinstance(w, torch.Tensor):
                return w.to(device=device, dtype=dtype).contiguous()
            if isinstance(w, tuple):
                return tuple(place(part) for part in w)
            return w.to(device)

        def take(name: str) -> Linear:
            if name not in weights:
                raise CheckpointError(f"missing tensor {name!r}")
            return place(weights[name])

        self.tok_embeddings = take("tok_embeddings.weight")  # dense or Int8Weight (see `embed`)
        self.layers = []
        for i in range(config.n_layers):
            p = f"layers.{i}."
            fused = {k: weights[p + k] for k in LINEARS if p + k in weights}
            if len(fused) != len(LINEARS):
                fused = {k.removeprefix(p): w for k, w in fuse_dense(weights, i).items()}
            self.layers.append(LlamaLayer(*(place(fused[k]) for k in LINEARS), take(p + "attention_norm.weight"),
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
        h = embed(self.tok_embeddings, tokens, self.dtype)
        residual = None
        for i, layer in enumerate(self.layers):
            if residual is None:
                x, residual = rms_norm(h, layer.attention_norm, cfg.rms_eps), h
            else:
                x, residual = self._add_norm(h, residual, layer.attention_norm)
            qkv = self._project(i, 0, x, layer.wqkv)
            q = qkv[:, :cfg.q_size].view(t, cfg.n_heads, cfg.head_dim)
            k = qkv[:, cfg.q_size:cfg.q_size + cfg.kv_size].view(t, cfg.n_kv_heads, cfg.head_dim)
            v = qkv[:, cfg.q_size + cfg.kv_size:].view(t, cfg.n_kv_heads, cfg.head_dim)
            if kv.dtype == FP8:  # keys rotated (kv_rotation.py) and quantized on their way into the cache
                q, k = apply_rope(q, k, positions, self.cos_sin)
                if self.key_rotation is not None:
                    q, k = torch.matmul(q, self.key_rotation), torch.matmul(k, self.key_rotation)
                write_kv(k, v, kv.k[i], kv.v[i], slots, kv.k_scale[i], kv.v_scale[i])
            else:
                q = rope_write_kv(q, k, v, positions, self.cos_sin, kv.k[i], kv.v[i], slots)
            attn = self.attention[i](q, kv.k[i], kv.v[i], meta, kv.k_scale[i], kv.v_scale[i])
            h = self._project(i, 1, attn.view(t, cfg.q_size), layer.wo, partial=True)
            x, residual = self._add_norm(h, residual, layer.ffn_norm)
            act = self._project(i, 2, x, layer.w13, glu=True)
            # On one rank, the final norm only needs the rows logits_index picks: see below.
            pick_first = i == len(self.layers) - 1 and logits_index is not None and self.comm is None
            h = self._project(i, 3, act, layer.w2, partial=not pick_first)
        if pick_first:
            h, residual = h[logits_index], residual[logits_index]
            x, _ = fused_add_rms_norm(h, residual, self.norm, cfg.rms_eps)
        else:  # every row; under tensor parallelism reduced and normalized in one step, as after every layer
            x, _ = self._add_norm(h, residual, self.norm)
            if logits_index is not None:
                x = x[logits_index]
        if self.vocab_parallel:
            return self.comm.vocab_parallel_logits(x, self.output)
        return project(x, self.output).float()

    def _add_norm(self, h: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(h + residual) * weight, h + residual) for the output h of a row-parallel projection: under
        tensor parallelism h is this rank's partial sum, summed over the ranks first (by the communicator, which
        may fuse the three steps)."""
        if self.comm is not None:
            return self.comm.reduce_add_rms_norm(h, residual, weight, self.config.rms_eps)
        return fused_add_rms_norm(h, residual, weight, self.config.rms_eps)

    def _project(self, layer: int, which: int, x: torch.Tensor, w: Linear, partial: bool = False,
                 glu: bool = False) -> torch.Tensor:
        """x @ w^T. partial: a row-parallel projection (wo, w2) whose output goes straight to `_add_norm`; under
        tensor parallelism the communicator computes it, and may send the partial sums on as they are made.
        glu: w is the fused gate/up projection w13, and the result is silu_mul(x @ w^T) (one kernel for dense w)."""
        if self.observer is not None:
            self.observer(f"layers.{layer}.{LINEARS[which]}", x)
        if glu:
            return linear_silu_mul(x, w) if isinstance(w, torch.Tensor) else silu_mul(project(x, w))
        if partial and self.comm is not None and isinstance(w, torch.Tensor):
            return self.comm.row_parallel_linear(x, w)
        return project(x, w)


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
