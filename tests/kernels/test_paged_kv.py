import pytest
import torch

from ringlet.kernels import write_kv, write_kv_ref

PAGE_SIZE = 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 3, 17])
@pytest.mark.parametrize("hk,dh", [(2, 32), (3, 16)])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_write_kv(t, hk, dh, dtype, slot_dtype):
    num_pages = 5
    # k and v as column slices of a fused qkv tensor; k a rope-like contiguous tensor would be the easy case.
    qkv = torch.randn(t, 3 * hk * dh).to(dtype)
    k = qkv[:, hk * dh:2 * hk * dh].view(t, hk, dh)
    v = qkv[:, 2 * hk * dh:].view(t, hk, dh)
    slots = torch.randperm(num_pages * PAGE_SIZE)[:t]
    slots[1::3] = -1  # padding rows: nothing written
    slot_mapping = slots.to(slot_dtype)
    shape = (num_pages, PAGE_SIZE, hk, dh)
    k_cache, v_cache = torch.full(shape, float("nan"), dtype=dtype), torch.full(shape, float("nan"), dtype=dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()

    assert write_kv(k, v, k_cache, v_cache, slot_mapping) is None
    write_kv_ref(k, v, k_ref, v_ref, slot_mapping)
    torch.testing.assert_close(k_cache, k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_ref, rtol=0, atol=0, equal_nan=True)
    for row, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(k_cache[slot // PAGE_SIZE, slot % PAGE_SIZE], k[row])
    assert k_cache.isnan().sum() == (num_pages * PAGE_SIZE - (slots >= 0).sum()) * hk * dh


def test_bad_cache_is_named():
    k = torch.randn(2, 2, 16)
    with pytest.raises(ValueError, match="v_cache"):
        write_kv(k, k, torch.zeros(3, 16, 2, 16), torch.zeros(3, 16, 2, 8), torch.zeros(2, dtype=torch.int32))
