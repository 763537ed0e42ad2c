import pytest
import torch

from ringlet.kernels import apply_rope, apply_rope_ref, rope_cos_sin

MAX_POS = 200


def _fused_qkv_views(t: int, hq: int, hk: int, dh: int, dtype: torch.dtype):
    """q [t, hq, dh] and k [t, hk, dh] as column slices of one fused qkv tensor, as the model produces them."""
    qkv = torch.randn(t, (hq + 2 * hk) * dh).to(dtype)
    return qkv[:, :hq * dh].view(t, hq, dh), qkv[:, hq * dh:(hq + hk) * dh].view(t, hk, dh)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 3, 17])
@pytest.mark.parametrize("hq,hk,dh", [(4, 2, 32), (3, 1, 16), (6, 2, 64), (5, 5, 24)])
def test_apply_rope(t, hq, hk, dh, dtype, assert_close):
    q, k = _fused_qkv_views(t, hq, hk, dh, dtype)
    positions = torch.randint(0, MAX_POS, (t,), dtype=torch.int32 if t % 2 else torch.int64)
    cos_sin = rope_cos_sin(MAX_POS, dh, 10000.0, "cpu")
    q_out, k_out = apply_rope(q, k, positions, cos_sin)
    q_ref, k_ref = apply_rope_ref(q, k, positions, cos_sin)
    assert q_out.is_contiguous() and k_out.is_contiguous()
    assert_close(q_out, q_ref)
    assert_close(k_out, k_ref)


def test_ref_matches_hf_rotate_half(assert_close):
    """The reference against HF Llama's formulation: x * cos + rotate_half(x) * sin with duplicated halves."""
    t, h, dh = 9, 3, 32
    x = torch.randn(t, h, dh)
    positions = torch.randint(0, MAX_POS, (t,))
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, dh, 2).double() / dh)
    angles = positions.double()[:, None] * inv_freq[None, :]
    cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None, :]
    sin = torch.cat([angles.sin(), angles.sin()], -1)[:, None, :]
    rotate_half = torch.cat([-x[..., dh // 2:], x[..., :dh // 2]], -1)
    expected = (x.double() * cos + rotate_half.double() * sin).float()
    out, _ = apply_rope_ref(x, x, positions, rope_cos_sin(MAX_POS, dh, 500000.0, "cpu"))
    assert_close(out, expected)


def test_bad_arguments_are_named():
    q, k = torch.randn(3, 4, 32), torch.randn(3, 2, 32)
    cos_sin = rope_cos_sin(16, 32, 10000.0, "cpu")
    with pytest.raises(ValueError, match="positions"):
        apply_rope(q, k, torch.zeros(3), cos_sin)
    with pytest.raises(ValueError, match="cos_sin"):
        apply_rope(q, k, torch.zeros(3, dtype=torch.int32), cos_sin[:, :16])
