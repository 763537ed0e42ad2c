import importlib

import pytest
import torch

from ringlet.kernels import decode_attention, decode_attention_ref

decode_module = importlib.import_module("ringlet.kernels.decode_attention")  # the package exports the function

# Awkward lengths around the 16-token page, and a padding row (length 0) as CUDA-graph batches have.
SEQ_LENS = [17, 1, 0, 15, 16, 33, 100]


def _run(seq_lens, hq, hk, dh, dtype, paged_kv, assert_close, dense_attention, spare_pages=1):
    k_cache, v_cache, block_tables, dense = paged_kv(seq_lens, hk, dh, dtype, spare_pages=spare_pages)
    b = len(seq_lens)
    q = torch.randn(b, hq + 5, dh).to(dtype)[:, 5:]  # a strided view
    args = (q, k_cache, v_cache, block_tables, torch.tensor(seq_lens, dtype=torch.int32), dh ** -0.5)
    out = decode_attention(*args)
    ref = decode_attention_ref(*args)
    assert out.shape == (b, hq, dh) and out.is_contiguous()
    assert not out.isnan().any()
    assert_close(out, ref)
    for i, seq_len in enumerate(seq_lens):
        k, v = dense[i]
        if seq_len == 0:
            assert torch.equal(out[i], torch.zeros_like(out[i]))
            continue
        expected = dense_attention(q[i:i + 1], k, v, torch.tensor([seq_len - 1]), dh ** -0.5)[0]
        assert_close(ref[i].float(), expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq,hk", [(2, 2), (6, 2)])
def test_decode_attention(hq, hk, dtype, paged_kv, assert_close, dense_attention):
    _run(SEQ_LENS, hq, hk, 32, dtype, paged_kv, assert_close, dense_attention)


def test_decode_attention_head_dim_64_wide_table(paged_kv, assert_close, dense_attention):
    # A block table much wider than the sequences need: most splits are empty and must not disturb the merge.
    _run([3, 0, 20], 4, 4, 64, torch.float16, paged_kv, assert_close, dense_attention, spare_pages=9)


def test_all_padding_rows_give_zeros(paged_kv):
    k_cache, v_cache, block_tables, _ = paged_kv([0, 0], 2, 16, torch.float16)
    q = torch.randn(2, 2, 16, dtype=torch.float16)
    out = decode_attention(q, k_cache, v_cache, block_tables, torch.zeros(2, dtype=torch.int32), 0.25)
    assert torch.equal(out, torch.zeros_like(out))


def test_bad_arguments_are_named(paged_kv):
    k_cache, v_cache, block_tables, _ = paged_kv([5], 2, 16, torch.float16)
    q = torch.randn(1, 3, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match="heads"):
        decode_attention(q, k_cache, v_cache, block_tables, torch.tensor([5], dtype=torch.int32), 0.25)
    with pytest.raises(ValueError, match="seq_lens"):
        decode_attention(q[:, :2], k_cache, v_cache, block_tables, torch.tensor([5]), 0.25)


@pytest.mark.parametrize("programs", [1, 7, 32, 160, 264, 265, 320, 480, 528])
def test_splits_fill_one_wave_at_least_half(programs):
    splits = decode_module._fill_waves(programs, 528)
    assert 264 <= programs * splits <= 528 or (splits == 1 and programs <= 528)


def test_splits_past_one_wave_fill_the_last_one():
    assert decode_module._fill_waves(640, 528) == 4  # 4.85 waves, not 1.2 (H200: 88.5 against 101 us)
    assert decode_module._fill_waves(1056, 528) == 1  # two whole waves already
