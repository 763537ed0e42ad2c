import pytest
import torch

from ringlet.kernels import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 576), (3, 100), (17, 64)]
EPS = 1e-6


def _rows(t: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    """[t, d] with a row stride of d + 7, like a slice of a wider activation."""
    return torch.randn(t, d + 7).to(dtype)[:, :d]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,d", SHAPES)
def test_rms_norm(t, d, dtype, assert_close):
    x = _rows(t, d, dtype)
    weight = torch.randn(d).to(dtype)
    out = rms_norm(x, weight, EPS)
    assert out.is_contiguous()
    assert_close(out, rms_norm_ref(x, weight, EPS))


def test_rms_norm_ref_matches_torch(assert_close):
    x, weight = torch.randn(5, 100), torch.randn(100)
    assert_close(rms_norm_ref(x, weight, EPS), torch.nn.functional.rms_norm(x, (100,), weight, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,d", SHAPES)
def test_fused_add_rms_norm(t, d, dtype, assert_close):
    x, residual = _rows(t, d, dtype), _rows(t, d, dtype)
    weight = torch.randn(d).to(dtype)
    x_before, residual_before = x.clone(), residual.clone()
    out, new_residual = fused_add_rms_norm(x, residual, weight, EPS)
    ref_out, ref_residual = fused_add_rms_norm_ref(x, residual, weight, EPS)
    if dtype == torch.bfloat16:
        # The interpreter truncates float32 -> bfloat16 where the GPU rounds to nearest even: one ulp apart.
        assert_close(new_residual, ref_residual)
    else:
        assert torch.equal(new_residual, ref_residual)  # one fp32 add, one rounding: exact
    assert_close(out, ref_out)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)
    assert torch.equal(ref_residual, x + residual)  # the same rounding as an unfused add


def test_empty_rows():
    x, weight = torch.randn(0, 64), torch.randn(64)
    assert rms_norm(x, weight, EPS).shape == (0, 64)
    out, new_residual = fused_add_rms_norm(x, x, weight, EPS)
    assert out.shape == new_residual.shape == (0, 64)


def test_bad_arguments_are_named():
    x = torch.randn(3, 64)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.randn(32), EPS)
    with pytest.raises(ValueError, match="residual"):
        fused_add_rms_norm(x, torch.randn(3, 64, dtype=torch.float16), torch.randn(64), EPS)
