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


FP8 = torch.float8_e4m3fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,hk,dh", [(1, 2, 32), (17, 3, 16)])
def test_write_kv_fp8(t, hk, dh, dtype):
    num_pages = 4
    qkv = torch.randn(t, 3 * hk * dh) * 50
    qkv[:, ::7] *= 20  # outlier channels
    qkv[0, hk * dh:2 * hk * dh] = 0  # an all-zero key row: scale 0, no NaN
    qkv = qkv.to(dtype)
    k = qkv[:, hk * dh:2 * hk * dh].view(t, hk, dh)
    v = qkv[:, 2 * hk * dh:].view(t, hk, dh)
    slots = torch.randperm(num_pages * PAGE_SIZE)[:t]
    slots[1::3] = -1
    shape = (num_pages, PAGE_SIZE, hk, dh)
    k_cache, v_cache = torch.full(shape, float("nan")).to(FP8), torch.full(shape, float("nan")).to(FP8)
    scale_shape = (num_pages, hk, PAGE_SIZE)
    k_scale = torch.full(scale_shape, float("nan"), dtype=torch.float16)
    v_scale = torch.full(scale_shape, float("nan"), dtype=torch.float16)
    refs = [x.clone() for x in (k_cache, v_cache, k_scale, v_scale)]

    assert write_kv(k, v, k_cache, v_cache, slots, k_scale, v_scale) is None
    write_kv_ref(k, v, *refs[:2], slots, *refs[2:])
    # The kernel and the reference agree bit for bit (and skipped slots keep their NaN bytes and scales).
    for got, want in zip((k_cache, v_cache), refs[:2]):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    for got, want in zip((k_scale, v_scale), refs[2:]):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert k_scale.isnan().sum() == (num_pages * PAGE_SIZE - (slots >= 0).sum()) * hk
    # Quantization error: e4m3 keeps 3 mantissa bits, so rounding moves a normal value by at most 2^-4 of itself;
    # values below e4m3's smallest normal (2^-6 of the scale unit) by at most half its subnormal step, 2^-10.
    for x, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        for row, slot in enumerate(slots.tolist()):
            if slot < 0:
                continue
            s = scale[slot // PAGE_SIZE, :, slot % PAGE_SIZE].float()  # [num_pages, Hk, page_size] layout
            assert torch.equal(s, (x[row].float().abs().amax(-1) / 448).half().float())
            deq = cache.view(-1, hk, dh)[slot].float() * s[:, None]
            # The row is divided by the float16-rounded scale, so its amax may land just past 448 and clamp:
            # 2^-10 of the value more.
            bound = torch.maximum(x[row].float().abs() * (2 ** -4 + 2 ** -10), s[:, None] * 2 ** -10) * (1 + 1e-6)
            assert ((x[row].float() - deq).abs() <= bound).all()
    assert torch.equal(k_scale[slots[0] // PAGE_SIZE, :, slots[0] % PAGE_SIZE], torch.zeros(hk, dtype=torch.float16))


def test_fp8_cache_needs_scales():
    k = torch.randn(2, 2, 16)
    cache = torch.zeros(3, 16, 2, 16, dtype=FP8)
    scale = torch.zeros(3, 2, 16, dtype=torch.float16)
    slots = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="k_scale"):
        write_kv(k, k, cache, cache.clone(), slots)
    with pytest.raises(ValueError, match="v_scale"):
        write_kv(k, k, cache, cache.clone(), slots, k_scale=scale)
    with pytest.raises(ValueError, match="k_scale"):
        write_kv(k, k, torch.zeros(3, 16, 2, 16), torch.zeros(3, 16, 2, 16), slots, scale, scale)
    with pytest.raises(ValueError, match="v_scale"):
        write_kv(k, k, cache, cache.clone(), slots, scale, torch.zeros(3, 16, 2, dtype=torch.float16))
    with pytest.raises(ValueError, match="k_scale"):
        write_kv(k, k, cache, cache.clone(), slots, scale.float(), scale)
