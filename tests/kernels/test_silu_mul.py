import pytest
import torch

from ringlet.kernels import silu_mul, silu_mul_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 3, 17])
@pytest.mark.parametrize("f", [1, 100, 2500])
def test_silu_mul(t, f, dtype, assert_close):
    gate_up = torch.randn(t, 2 * f + 5).to(dtype)[:, :2 * f]  # a row stride wider than the row
    out = silu_mul(gate_up)
    assert out.shape == (t, f) and out.is_contiguous()
    assert_close(out, silu_mul_ref(gate_up))


def test_ref_matches_torch(assert_close):
    gate, up = torch.randn(4, 64), torch.randn(4, 64)
    assert_close(silu_mul_ref(torch.cat([gate, up], -1)), gate * torch.sigmoid(gate) * up)


def test_odd_width_is_rejected():
    with pytest.raises(ValueError, match="gate_up"):
        silu_mul(torch.randn(2, 7))
