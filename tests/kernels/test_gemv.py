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
