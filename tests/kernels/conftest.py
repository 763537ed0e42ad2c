"""Kernel tests: the Triton kernels run on the CPU under Triton's interpreter, against their torch references."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (see tests/conftest.py)

import pytest  # noqa: E402
import torch  # noqa: E402

from ringlet.kernels.paged_kv import quantize_fp8_pages_ref, quantize_fp8_ref  # noqa: E402

# Relative tolerance per dtype: two roundings to the dtype (the output, plus one intermediate such as attention
# probabilities cast for the P @ V product, or a rounding flip between two fp32 summation orders). float32 is
# bounded by summation order over a few thousand terms instead.
TOLERANCE = {
    torch.float32: 1e-5,
    torch.float16: 2 * torch.finfo(torch.float16).eps,
    torch.bfloat16: 2 * torch.finfo(torch.bfloat16).eps,
}


@pytest.fixture(autouse=True)
def _triton_kernels_seeded(monkeypatch):
    # Set per test, not at import: other test folders must keep the torch references on CPU tensors.
    monkeypatch.setenv("RINGLET_KERNELS", "triton")
    torch.manual_seed(0)


def _assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """out matches ref within TOLERANCE of `dtype` (default ref's), relative and against ref's largest value."""
    tol = TOLERANCE[dtype or ref.dtype]
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    ref = ref.float()
    scale = ref.abs().max().item() if ref.numel() else 0.0
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol * max(scale, 1e-6))


@pytest.fixture
def assert_close():
    return _assert_close


def _paged_kv(seq_lens: list[int], kv_heads: int, head_dim: int, dtype: torch.dtype, page_size: int = 16,
              spare_pages: int = 1):
    """Random keys and values of each sequence, scattered into NaN-filled caches through a shuffled page pool.

    Returns (k_cache, v_cache [num_pages, page_size, kv_heads, head_dim], block_tables [B, max_pages +
    spare_pages] int32, [(k, v) [seq_len, kv_heads, head_dim] per sequence]). Page 0 stays NaN and every table
    entry past a sequence's pages points at it, so a kernel reading a wrong page or row produces NaN.
    """
    pages = [-(-n // page_size) for n in seq_lens]
    num_pages = sum(pages) + 3  # the NaN page 0 and two never-used pages
    shape = (num_pages, page_size, kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    pool = (torch.randperm(num_pages - 1) + 1).tolist()
    block_tables = torch.zeros(len(seq_lens), max(pages, default=0) + spare_pages, dtype=torch.int32)
    dense = []
    for b, (n, n_pages) in enumerate(zip(seq_lens, pages)):
        ids = [pool.pop() for _ in range(n_pages)]
        block_tables[b, :n_pages] = torch.tensor(ids, dtype=torch.int32)
        k = torch.randn(n, kv_heads, head_dim).to(dtype)
        v = torch.randn(n, kv_heads, head_dim).to(dtype)
        for pos in range(n):
            k_cache[ids[pos // page_size], pos % page_size] = k[pos]
            v_cache[ids[pos // page_size], pos % page_size] = v[pos]
        dense.append((k, v))
    return k_cache, v_cache, block_tables, dense


@pytest.fixture
def paged_kv():
    return _paged_kv


def _fp8_paged_kv(seq_lens: list[int], kv_heads: int, head_dim: int, page_size: int = 16, spare_pages: int = 1):
    """`_paged_kv` with FP8 pages: keys and values of magnitude ~50 with a few 8x outlier channels (so scales are
    far from 1 and a missing multiply fails), quantized per (token, head) by the reference quantizer.

    Returns (k_cache, v_cache float8_e4m3fn, k_scale, v_scale [num_pages, kv_heads, page_size] float16,
    block_tables, [(k, v) dequantized float32 [seq_len, kv_heads, head_dim] per sequence]); unused rows are NaN.
    """
    k_cache, v_cache, block_tables, dense = _paged_kv(seq_lens, kv_heads, head_dim, torch.float32, page_size,
                                                      spare_pages)
    gain = torch.full((head_dim,), 50.0)
    gain[torch.randperm(head_dim)[:max(1, head_dim // 16)]] = 400.0
    k8, k_scale = quantize_fp8_pages_ref(k_cache * gain)
    v8, v_scale = quantize_fp8_pages_ref(v_cache * gain)
    dequant = []
    for k, v in dense:
        (kq, ks), (vq, vs) = quantize_fp8_ref(k * gain), quantize_fp8_ref(v * gain)
        dequant.append((kq.float() * ks.float()[..., None], vq.float() * vs.float()[..., None]))
    return k8, v8, k_scale, v_scale, block_tables, dequant


@pytest.fixture
def fp8_paged_kv():
    return _fp8_paged_kv


def _dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                     scale: float, pattern=None) -> torch.Tensor:
    """Independent check of the attention references: SDPA in float32 with an explicit mask, causal or built
    from `pattern.mask` per query head.

    q [n, Hq, D] at positions q_pos [n]; k, v [L, Hk, D] -> [n, Hq, D] float32.
    """
    group = q.shape[1] // k.shape[1]
    q4 = q.float().transpose(0, 1)[None]
    k4 = k.float().repeat_interleave(group, dim=1).transpose(0, 1)[None]
    v4 = v.float().repeat_interleave(group, dim=1).transpose(0, 1)[None]
    k_pos = torch.arange(k.shape[0])
    if pattern is None:
        mask = k_pos[None, :] <= q_pos[:, None]
    else:
        mask = torch.stack([pattern.mask(q_pos, k_pos, h) for h in range(q.shape[1])])[None]
    out = torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)


@pytest.fixture
def dense_attention():
    return _dense_attention
