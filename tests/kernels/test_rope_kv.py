import pytest
import torch

from ringlet.kernels import rope_cos_sin, rope_write_kv, rope_write_kv_ref

PAGE_SIZE = 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t,hq,hk,dh", [(1, 4, 2, 32), (5, 9, 3, 16), (17, 6, 6, 64)])
def test_rope_write_kv_against_reference(t, hq, hk, dh, dtype, assert_close):
    num_pages = 5
    cos_sin = rope_cos_sin(64, dh, 10000.0, "cpu")
    qkv = torch.randn(t, (hq + 2 * hk) * dh).to(dtype)  # q, k and v as column slices of the fused projection
    q = qkv[:, :hq * dh].view(t, hq, dh)
    k = qkv[:, hq * dh:(hq + hk) * dh].view(t, hk, dh)
    v = qkv[:, (hq + hk) * dh:].view(t, hk, dh)
    positions = torch.randint(0, 64, (t,), dtype=torch.int32)
    slots = torch.randperm(num_pages * PAGE_SIZE)[:t]
    slots[1::3] = -1  # padding rows: nothing written
    shape = (num_pages, PAGE_SIZE, hk, dh)
    k_cache, v_cache = torch.full(shape, float("nan"), dtype=dtype), torch.full(shape, float("nan"), dtype=dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()

    q_out = rope_write_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slots)
    q_ref = rope_write_kv_ref(q, k, v, positions, cos_sin, k_ref, v_ref, slots)
    assert_close(q_out, q_ref)
    written = slots[slots >= 0]
    for cache, ref in ((k_cache, k_ref), (v_cache, v_ref)):
        flat, flat_ref = cache.view(-1, hk, dh), ref.view(-1, hk, dh)
        assert_close(flat[written], flat_ref[written])
        assert flat.isnan().sum() == (num_pages * PAGE_SIZE - len(written)) * hk * dh  # nothing else touched
    assert torch.equal(v_cache.view(-1, hk, dh)[written], v[slots >= 0])


def test_rope_write_kv_refuses_an_fp8_cache():
    q = torch.randn(2, 2, 16)
    cache = torch.zeros(3, PAGE_SIZE, 2, 16).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="k_cache"):
        rope_write_kv(q, q, q, torch.zeros(2, dtype=torch.int32), rope_cos_sin(8, 16, 10000.0, "cpu"), cache, cache,
                      torch.zeros(2, dtype=torch.int32))
