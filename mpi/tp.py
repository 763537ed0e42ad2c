"""Tensor parallelism on a built `ringlet.model.Llama` (gpt-fast's `apply_tp`, for ringlet's fused weights).

Per decoder layer, on rank r of a group of n:
- column-parallel wqkv [q + 2 kv, dim]: rank r keeps the rows of its n_heads / n query heads and of the KV heads
  they read (n_kv_heads / n of them; when n exceeds n_kv_heads each KV head is replicated on n / n_kv_heads ranks);
- column-parallel w13 [2 ffn, dim]: rows [r f, (r + 1) f) of the gate and of the up half, f = ffn / n;
- row-parallel wo [dim, q] and w2 [dim, ffn]: the matching columns; their partial outputs are summed by one
  all-reduce each (`Llama.comm`), which is all the communication a forward needs.
Embeddings and norms stay whole on every rank. The output head is split by vocabulary rows when the vocabulary
splits evenly and the head is a dense tensor (rank r keeps rows [r V / n, (r + 1) V / n)): each rank computes its
slice of the logits and `comm.vocab_parallel_logits` gathers them, so the head's weight is read once per step
over the group instead of once per rank; otherwise every rank keeps the whole head. Only rank 0 samples.
Sizes that do not split evenly fail before anything is sharded, with a ConfigError naming the size.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from ringlet.config import ModelConfig
from ringlet.errors import ConfigError
from ringlet.kernels.patterns import BlockSparse


def check_tp(config: ModelConfig, tp: int) -> None:
    """Raise ConfigError when `config` cannot be split over `tp` ranks."""
    if tp < 1:
        raise ConfigError(f"--tp must be >= 1, got {tp}")
    if tp == 1:
        return
    if config.n_heads % tp:
        raise ConfigError(f"tensor parallel {tp}: the model's {config.n_heads} attention heads do not split evenly "
                          f"over {tp} ranks (use a --tp that divides {config.n_heads})")
    kv = config.n_kv_heads
    if (kv % tp if tp <= kv else tp % kv):
        raise ConfigError(f"tensor parallel {tp}: the model's {kv} KV heads can neither be split evenly over {tp} "
                          f"ranks nor replicated evenly ({tp} is not a multiple of {kv})")
    if config.ffn_dim % tp:
        raise ConfigError(f"tensor parallel {tp}: FFN size {config.ffn_dim} does not split evenly over {tp} ranks")


def local_config(config: ModelConfig, tp: int) -> ModelConfig:
    """The shape one rank computes: n_heads / tp query heads, its KV heads, ffn / tp (dim and head_dim whole)."""
    check_tp(config, tp)
    return replace(config, n_heads=config.n_heads // tp, n_kv_heads=max(1, config.n_kv_heads // tp),
                   ffn_dim=config.ffn_dim // tp, head_dim=config.head_dim)


def _heads(config: ModelConfig, tp: int, rank: int) -> tuple[range, range]:
    """(query heads, KV heads) of rank: consecutive query heads, and the KV heads those read (GQA groups)."""
    per = config.n_heads // tp
    q = range(rank * per, (rank + 1) * per)
    group = config.n_heads // config.n_kv_heads
    kv = range(q.start // group, (q.stop - 1) // group + 1)
    return q, kv


def shard_layer(wqkv: torch.Tensor, wo: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, config: ModelConfig,
                tp: int, rank: int) -> tuple[torch.Tensor, ...]:
    """One layer's (wqkv, wo, w13, w2) for `rank` (see the module docstring); new contiguous tensors."""
    for name, w in (("wqkv", wqkv), ("wo", wo), ("w13", w13), ("w2", w2)):
        if not isinstance(w, torch.Tensor):
            raise ConfigError(f"tensor parallel: projection {name} is a {type(w).__name__}; only dense weights are "
                              f"sharded in this build (run quantized models with --tp 1)")
    d = config.head_dim
    q_heads, kv_heads = _heads(config, tp, rank)
    q_rows = slice(q_heads.start * d, q_heads.stop * d)
    k_rows = slice(config.q_size + kv_heads.start * d, config.q_size + kv_heads.stop * d)
    v_rows = slice(config.q_size + config.kv_size + kv_heads.start * d,
                   config.q_size + config.kv_size + kv_heads.stop * d)
    f = config.ffn_dim // tp
    gate = slice(rank * f, (rank + 1) * f)
    up = slice(config.ffn_dim + rank * f, config.ffn_dim + (rank + 1) * f)
    return (torch.cat([wqkv[q_rows], wqkv[k_rows], wqkv[v_rows]]).contiguous(), wo[:, q_rows].contiguous(),
            torch.cat([w13[gate], w13[up]]).contiguous(), w2[:, gate].contiguous())


def apply_tp(model, tp: int, rank: int, comm):
    """Shard `model` (a built ringlet.model.Llama) in place for `rank` of `tp` ranks; returns it.

    `comm` is the tensor-parallel group's communicator: the model reduces through it after wo and w2, and gathers
    the logits of a split head through it.
    """
    if tp == 1:
        return model
    config = model.config
    local = local_config(config, tp)
    if any(isinstance(a.pattern, BlockSparse) for a in model.attention):
        raise ConfigError("tensor parallel: block-sparse attention lays out blocks per head, and heads move between "
                          "ranks under --tp; use dense, local or strided attention with --tp > 1")
    if local.n_kv_heads != len(_heads(config, tp, rank)[1]):
        raise ConfigError(f"tensor parallel {tp}: rank {rank}'s query heads span several KV heads")
    for layer in model.layers:
        layer.wqkv, layer.wo, layer.w13, layer.w2 = shard_layer(layer.wqkv, layer.wo, layer.w13, layer.w2, config,
                                                                tp, rank)
    if isinstance(model.output, torch.Tensor) and model.output.shape[0] % tp == 0:
        vocab = model.output.shape[0]
        rows = slice(rank * vocab // tp, (rank + 1) * vocab // tp)
        # A head tied to the embeddings stays whole there (every rank embeds any token): keep a view of its rows.
        tied = model.output is model.tok_embeddings
        model.output = model.output[rows] if tied else model.output[rows].clone()
        model.vocab_parallel = True
    model.config = local
    model.comm = comm
    return model

