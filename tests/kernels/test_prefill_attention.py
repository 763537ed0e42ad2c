import pytest
import torch

from ringlet.kernels import prefill_attention, prefill_attention_ref

# (seq_lens, q_lens): whole prompts of awkward lengths around the 16-token page, and chunks whose earlier
# context is already cached (seq_len > q_len), mixed with a sequence that has no queries this step.
CASES = {
    "prompts": ([1, 15, 16, 17, 33, 100], [1, 15, 16, 17, 33, 100]),
    "chunks": ([17, 100, 40, 33], [1, 37, 16, 0]),
}


def _run(case, hq, hk, dh, dtype, paged_kv, assert_close, dense_attention):
    seq_lens, q_lens = CASES[case]
    k_cache, v_cache, block_tables, dense = paged_kv(seq_lens, hk, dh, dtype)
    tq = sum(q_lens)
    # q as a strided view: the query columns of a fused qkv tensor.
    q = torch.randn(tq, (hq + 2 * hk) * dh).to(dtype)[:, :hq * dh].view(tq, hq, dh)
    q_start = torch.tensor([sum(q_lens[:b]) for b in range(len(q_lens))], dtype=torch.int32)
    args = (q, k_cache, v_cache, block_tables, q_start, torch.tensor(q_lens, dtype=torch.int32),
            torch.tensor(seq_lens, dtype=torch.int32), dh ** -0.5, max(q_lens))
    out = prefill_attention(*args)
    ref = prefill_attention_ref(*args)
    assert out.shape == (tq, hq, dh) and out.is_contiguous()
    assert_close(out, ref)
    for b, (seq_len, n) in enumerate(zip(seq_lens, q_lens)):
        rows = slice(int(q_start[b]), int(q_start[b]) + n)
        k, v = dense[b]
        expected = dense_attention(q[rows], k, v, torch.arange(seq_len - n, seq_len), dh ** -0.5)
        assert_close(ref[rows].float(), expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq,hk", [(2, 2), (6, 2)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_prefill_attention(case, hq, hk, dtype, paged_kv, assert_close, dense_attention):
    _run(case, hq, hk, 16 if hq == hk else 32, dtype, paged_kv, assert_close, dense_attention)


def test_prefill_attention_head_dim_64(paged_kv, assert_close, dense_attention):
    _run("chunks", 3, 1, 64, torch.float16, paged_kv, assert_close, dense_attention)


def test_bad_arguments_are_named(paged_kv):
    k_cache, v_cache, block_tables, _ = paged_kv([5], 1, 16, torch.float16)
    q = torch.randn(5, 2, 16, dtype=torch.float16)
    lens = torch.tensor([5], dtype=torch.int32)
    with pytest.raises(ValueError, match="q_lens"):
        prefill_attention(q, k_cache, v_cache, block_tables, lens * 0, lens.long(), lens, 0.25, 5)
    k_cache, v_cache, block_tables, _ = paged_kv([5], 1, 12, torch.float16)
    with pytest.raises(ValueError, match="head_dim"):
        prefill_attention(q[..., :12], k_cache, v_cache, block_tables, lens * 0, lens, lens, 0.25, 5)
