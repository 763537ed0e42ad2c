"""Paged KV cache: one pool of fixed-size pages per layer and an allocator shared by all layers.

A sequence owns a list of page ids (its block table); page p of every layer's pool holds the same tokens.
Token t of a sequence lives in page `pages[t // page_size]` at row `t % page_size`; its flat slot is
`page * page_size + row`, which is what the cache-write kernel takes.
"""
from __future__ import annotations

import torch

from ringlet.kernels.paged_kv import FP8_SCALE_DTYPE

from .config import ModelConfig
from .errors import ConfigError

PAGE_SIZE = 16


class PageAllocator:
    """Hands out page ids from a free list. Freeing every page a sequence got returns the count to full."""

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ConfigError(f"KV cache needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        # Pop from the end: low page ids go first, which keeps early tests easy to read.
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """Take n pages, or None (taking nothing) when fewer than n are free."""
        if n > len(self._free):
            return None
        taken = self._free[len(self._free) - n:]
        del self._free[len(self._free) - n:]
        return taken[::-1]

    def free(self, pages: list[int]) -> None:
        """Return pages to the pool (in reverse, so a freed sequence's pages are reused first)."""
        self._free.extend(reversed(pages))
        if len(self._free) > self.num_pages:
            raise RuntimeError("page allocator: more pages freed than allocated (double free)")


FP8 = torch.float8_e4m3fn


class KVCache:
    """Per-layer key and value pools, each [num_pages, page_size, n_kv_heads, head_dim] in `dtype`.

    An FP8 (`torch.float8_e4m3fn`) cache also holds per-layer `k_scale`/`v_scale` [num_pages, n_kv_heads,
    page_size] float16 (a token's head dequantizes as e4m3 value x scale); for other dtypes those lists hold None.
    """

    def __init__(self, config: ModelConfig, num_pages: int, dtype: torch.dtype, device: torch.device,
                 page_size: int = PAGE_SIZE):
        self.page_size = page_size
        self.num_pages = num_pages
        self.dtype = dtype
        shape = (num_pages, page_size, config.n_kv_heads, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        if dtype == FP8:
            scale_shape = (num_pages, config.n_kv_heads, page_size)
            self.k_scale = [torch.ones(scale_shape, dtype=FP8_SCALE_DTYPE, device=device)
                            for _ in range(config.n_layers)]
            self.v_scale = [torch.ones(scale_shape, dtype=FP8_SCALE_DTYPE, device=device)
                            for _ in range(config.n_layers)]
        else:
            self.k_scale = self.v_scale = [None] * config.n_layers
        self.allocator = PageAllocator(num_pages)

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
        """Bytes of K and V over all layers for one token, an FP8 cache's scales included."""
        values = 2 * config.n_layers * config.kv_size * dtype.itemsize
        if dtype != FP8:
            return values
        return values + 2 * config.n_layers * config.n_kv_heads * FP8_SCALE_DTYPE.itemsize

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    def pages_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)
