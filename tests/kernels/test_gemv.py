import pytest
import torch

from ringlet.kernels import linear, linear_ref


# bf16 with 2 <= M <= 16 takes the tl.dot path, which the interpreter computes wrongly on bf16
# (triton-lang/triton#11584): those cases are checked on the GPU by bench/kernels.py, not listed here.
CASES = [(dtype, m) for dtype in (torch.float32, torch.float16, torch.bfloat16) for m in (1, 3, 16, 17)
         if not (dtype == torch.bfloat16 and 1 < m <= 16)]


@pytest.mark.parametrize("dtype,m", CASES)
@pytest.mark.parametrize("n,k", [(33, 2100), (100, 256), (200, 300)])
def test_linear(m, n, k, dtype, assert_close):
    x = torch.randn(m, k + 3).to(dtype)[:, :k]  # a row stride wider than the row
    weight = (torch.randn(n, k) / k ** 0.5).to(dtype)
    out = linear(x, weight)
    assert out.shape == (m, n) and out.dtype == dtype and out.is_contiguous()
    assert_close(out, linear_ref(x, weight))


def test_ref_matches_float64(assert_close):
    x, weight = torch.randn(3, 300), torch.randn(50, 300)
    assert_close(linear_ref(x, weight), (x.double() @ weight.double().T).float())


def test_bad_weight_is_named():
    with pytest.raises(ValueError, match="weight"):
        linear(torch.randn(1, 64), torch.randn(8, 32))
    with pytest.raises(ValueError, match="weight"):
        linear(torch.randn(1, 64), torch.randn(64, 8).T)


@pytest.mark.parametrize("dtype,m", CASES)
@pytest.mark.parametrize("f,k", [(17, 2100), (100, 256)])
def test_linear_silu_mul(m, f, k, dtype, assert_close):
    """f = 17 takes split-K in the interpreter, where the gate runs as its own kernel; f = 100 takes the GEMV with
    the gate in its epilogue. The interpreter runs one tiling for every launch, so the bits are those of
    silu_mul after linear (on a GPU the tuner may tile the two differently)."""
    from ringlet.kernels import linear_silu_mul, linear_silu_mul_ref, silu_mul

    x = torch.randn(m, k + 3).to(dtype)[:, :k]
    weight = (torch.randn(2 * f, k) / k ** 0.5).to(dtype)
    out = linear_silu_mul(x, weight)
    assert out.shape == (m, f) and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, silu_mul(linear(x, weight)))
    assert_close(out, linear_silu_mul_ref(x, weight))


def test_linear_silu_mul_ref_is_swiglu(assert_close):
    from ringlet.kernels import linear_silu_mul_ref

    x, gate, up = torch.randn(3, 40), torch.randn(7, 40), torch.randn(7, 40)
    expected = torch.nn.functional.silu(x.double() @ gate.double().T) * (x.double() @ up.double().T)
    assert_close(linear_silu_mul_ref(x, torch.cat([gate, up])), expected.float())


def test_linear_silu_mul_needs_gate_and_up_rows():
    from ringlet.kernels import linear_silu_mul

    with pytest.raises(ValueError, match="even number of rows"):
        linear_silu_mul(torch.randn(1, 64), torch.randn(7, 64))
