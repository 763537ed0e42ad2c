"""Attention over the paged KV cache, one object per layer.

This is the seam where attention patterns plug in: `DenseAttention` sees every earlier token; sparse patterns
(local, strided, block-sparse) and FP8 pages are later subclasses with the same two calls.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ringlet.kernels import decode_attention, prefill_attention


@dataclass
class AttentionMetadata:
    """Where each sequence's queries and keys are, for one forward pass. All tensors int32 on the model's device.

    block_tables [B, max_pages]: page ids of each sequence. seq_lens [B]: tokens in the cache for each sequence,
    this step's included. For prefill also q_start [B], q_lens [B] (rows of each sequence in the packed batch)
    and max_q_len (host int). For decode every sequence has exactly one query row.
    """

    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    is_decode: bool
    q_start: torch.Tensor | None = None
    q_lens: torch.Tensor | None = None
    max_q_len: int = 1


class DenseAttention:
    """Causal attention over all earlier tokens."""

    name = "dense"

    def __init__(self, head_dim: int):
        self.scale = head_dim ** -0.5

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        """q [T, Hq, Dh] -> out [T, Hq, Dh]; this step's keys and values are already in the cache."""
        if meta.is_decode:
            return decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, self.scale)
        return prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.q_start, meta.q_lens,
                                 meta.seq_lens, self.scale, meta.max_q_len)
