"""Every attention pattern through prefill and decode, over float and FP8 pages: Triton against the reference, and
the reference against an independent SDPA masked by `pattern.mask` (for FP8, over the dequantized values)."""
import pytest
import torch
from ringlet.kernels import (
    DENSE,
    BlockSparse,
    Local,
    Strided,
    decode_attention,
    decode_attention_ref,
    prefill_attention,
    prefill_attention_ref,
)

# Windows below a page, larger than every sequence, strided columns a few apart, sink keys (fewer than a stride,
# and more than a page and several strides), and block-sparse stripes that differ between the four query heads
# (vert_stride 3: per-head offsets 0, 1, 2, 0).
PATTERNS = {
    "dense": DENSE,
    "local7": Local(7),
    "local-sink": Local(7, sink=3),
    "local-wide": Local(4096),
    "strided": Strided(5, 9),
    "strided-sink": Strided(5, 9, sink=21),
    "block": BlockSparse(16, local_blocks=2, vert_stride=3),
}
# Decode: lengths 1, 15, 17 around the page, a padding row, and a few pages. GQA: 4 query heads on 2 kv heads.
DECODE_LENS = [1, 15, 0, 17, 50]
# Prefill: whole prompts (1, 15, 17) and chunks whose earlier context is cached (seq_len > q_len).
PREFILL_LENS = ([1, 15, 17, 40, 50], [1, 15, 17, 23, 50])
HQ, HK = 4, 2


def _caches(kind, seq_lens, hk, dh, paged_kv, fp8_paged_kv):
    """(k_cache, v_cache, scales kwargs, block_tables, dense (k, v) per sequence, q dtype)."""
    if kind == "fp8":
        k8, v8, ks, vs, tables, dense = fp8_paged_kv(seq_lens, hk, dh)
        return k8, v8, {"k_scale": ks, "v_scale": vs}, tables, dense, torch.float16
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[kind]
    k_cache, v_cache, tables, dense = paged_kv(seq_lens, hk, dh, dtype)
    return k_cache, v_cache, {}, tables, dense, dtype


def _decode(name, kind, seq_lens, hq, hk, dh, paged_kv, fp8_paged_kv, assert_close, dense_attention):
    pattern = PATTERNS[name] if isinstance(name, str) else name
    k_cache, v_cache, scales, tables, dense, dtype = _caches(kind, seq_lens, hk, dh, paged_kv, fp8_paged_kv)
    # Small queries over FP8's large keys keep the softmax from collapsing onto one key.
    q = (torch.randn(len(seq_lens), hq, dh) * (0.02 if kind == "fp8" else 1.0)).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    out = decode_attention(q, k_cache, v_cache, tables, lens, dh ** -0.5, pattern, **scales)
    ref = decode_attention_ref(q, k_cache, v_cache, tables, lens, dh ** -0.5, pattern, **scales)
    assert out.shape == (len(seq_lens), hq, dh) and not out.isnan().any()
    assert_close(out, ref)
    for i, n in enumerate(seq_lens):
        if n == 0:
            assert torch.equal(out[i], torch.zeros_like(out[i]))
            continue
        k, v = dense[i]
        expected = dense_attention(q[i:i + 1], k, v, torch.tensor([n - 1]), dh ** -0.5, pattern)[0]
        assert_close(ref[i].float(), expected, dtype)


@pytest.mark.parametrize("kind", ["fp32", "fp16", "fp8"])
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_decode_patterns(name, kind, paged_kv, fp8_paged_kv, assert_close, dense_attention):
    _decode(name, kind, DECODE_LENS, HQ, HK, 16, paged_kv, fp8_paged_kv, assert_close, dense_attention)


@pytest.mark.parametrize("kind", ["fp16", "fp8"])
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_decode_patterns_one_head_per_kv_head(name, kind, paged_kv, fp8_paged_kv, assert_close, dense_attention):
    # Without GQA a program holds one query head: the multiply-and-sum path instead of tl.dot.
    _decode(name, kind, DECODE_LENS, 3, 3, 32, paged_kv, fp8_paged_kv, assert_close, dense_attention)


@pytest.mark.parametrize("dh", [16, 64])
@pytest.mark.parametrize("name", ["dense", "local-sink", "block"])
def test_decode_one_fp8_head_row_slots(name, dh, paged_kv, fp8_paged_kv, assert_close, dense_attention):
    # One FP8 query head per program: each row slot takes several keys of a tile (8 on the GPU and here, where
    # 16-key tiles make 2 slots), so lengths end inside a slot's rows, between slots and past whole tiles.
    _decode(name, "fp8", [1, 9, 16, 0, 23, 40], 3, 3, dh, paged_kv, fp8_paged_kv, assert_close, dense_attention)


@pytest.mark.parametrize("hq,hk", [(2, 1), (2, 2)], ids=["gqa", "mha"])
@pytest.mark.parametrize("kind", ["fp16", "fp8"])
@pytest.mark.parametrize("pattern", [DENSE, Local(100), Local(100, sink=4), Strided(64, 100),
                                     Strided(64, 100, sink=200), BlockSparse()], ids=str)
def test_decode_patterns_long(pattern, kind, hq, hk, paged_kv, fp8_paged_kv, assert_close, dense_attention):
    # 1027 keys: many splits and tiles, strided summary columns far left of the window, real vertical stripes;
    # with one query head per kv head, the pipelined row loop over many tiles per split.
    _decode(pattern, kind, [1027, 17], hq, hk, 16, paged_kv, fp8_paged_kv, assert_close, dense_attention)


def _prefill(pattern, kind, seq_lens, q_lens, paged_kv, fp8_paged_kv, assert_close, dense_attention):
    dh = 16
    k_cache, v_cache, scales, tables, dense, dtype = _caches(kind, seq_lens, HK, dh, paged_kv, fp8_paged_kv)
    tq = sum(q_lens)
    q = (torch.randn(tq, HQ, dh) * (0.02 if kind == "fp8" else 1.0)).to(dtype)
    q_start = torch.tensor([sum(q_lens[:b]) for b in range(len(q_lens))], dtype=torch.int32)
    args = (q, k_cache, v_cache, tables, q_start, torch.tensor(q_lens, dtype=torch.int32),
            torch.tensor(seq_lens, dtype=torch.int32), dh ** -0.5, max(q_lens), pattern)
    out = prefill_attention(*args, **scales)
    ref = prefill_attention_ref(*args, **scales)
    assert out.shape == (tq, HQ, dh) and not out.isnan().any()
    assert_close(out, ref)
    for b, (seq_len, n) in enumerate(zip(seq_lens, q_lens)):
        rows = slice(int(q_start[b]), int(q_start[b]) + n)
        k, v = dense[b]
        expected = dense_attention(q[rows], k, v, torch.arange(seq_len - n, seq_len), dh ** -0.5, pattern)
        assert_close(ref[rows].float(), expected, dtype)


@pytest.mark.parametrize("kind", ["fp32", "fp16", "fp8"])
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_prefill_patterns(name, kind, paged_kv, fp8_paged_kv, assert_close, dense_attention):
    _prefill(PATTERNS[name], kind, *PREFILL_LENS, paged_kv, fp8_paged_kv, assert_close, dense_attention)


@pytest.mark.parametrize("kind", ["fp16", "fp8"])
@pytest.mark.parametrize("pattern", [DENSE, Local(40), Local(47, sink=3), Strided(2, 40), Strided(8, 40, sink=21),
                                     BlockSparse(16, 2, 3)], ids=str)
def test_prefill_patterns_long(pattern, kind, paged_kv, fp8_paged_kv, assert_close, dense_attention):
    # Under the interpreter a program holds 16 queries and steps 16 keys, so tiles that every query of a program
    # sees (no mask) sit beside masked ones: windows wider than a program have a left edge seen by some queries
    # and whole tiles seen by all (with window 47 a tile ends 2 keys past the first query, which must mask it);
    # summary columns fill whole tiles and, with stride 2 and the chunk below, end one key into one; block-sparse
    # stripes lie left of every query's band. The second sequence is a chunk starting mid-page.
    _prefill(pattern, kind, [130, 112], [130, 58], paged_kv, fp8_paged_kv, assert_close, dense_attention)


def test_fp8_scales_are_applied(fp8_paged_kv):
    # The same e4m3 pages with every scale doubled: scores and values change, so the output must too.
    k8, v8, ks, vs, tables, _ = fp8_paged_kv([20], 1, 16)
    q = torch.randn(1, 1, 16, dtype=torch.float16) * 0.02
    lens = torch.tensor([20], dtype=torch.int32)
    out = decode_attention(q, k8, v8, tables, lens, 0.25, k_scale=ks, v_scale=vs)
    doubled = decode_attention(q, k8, v8, tables, lens, 0.25, k_scale=ks, v_scale=vs * 2)
    torch.testing.assert_close(doubled, out * 2, rtol=2e-3, atol=1e-3)


def test_bad_scales_are_named(paged_kv, fp8_paged_kv):
    k8, v8, ks, vs, tables, _ = fp8_paged_kv([5], 1, 16)
    q = torch.randn(1, 2, 16, dtype=torch.float16)
    lens = torch.tensor([5], dtype=torch.int32)
    with pytest.raises(ValueError, match="v_scale"):
        decode_attention(q, k8, v8, tables, lens, 0.25, k_scale=ks)
    with pytest.raises(ValueError, match="k_scale"):
        prefill_attention(torch.randn(5, 2, 16, dtype=torch.float16), k8, v8, tables, lens * 0, lens, lens, 0.25, 5,
                          v_scale=vs)
    # Decode with one query head per kv head, and prefill, read the scales as 32-bit words: a scale tensor 2 bytes
    # off alignment is refused.
    shifted = torch.empty(vs.numel() + 1, dtype=vs.dtype)[1:].view(vs.shape).copy_(vs)
    with pytest.raises(ValueError, match="v_scale"):
        decode_attention(q[:, :1], k8, v8, tables, lens, 0.25, k_scale=ks, v_scale=shifted)
    with pytest.raises(ValueError, match="v_scale"):
        prefill_attention(torch.randn(5, 2, 16, dtype=torch.float16), k8, v8, tables, lens * 0, lens, lens, 0.25, 5,
                          k_scale=ks, v_scale=shifted)
    k_cache, v_cache, tables, _ = paged_kv([5], 1, 16, torch.float16)
    with pytest.raises(ValueError, match="k_scale"):
        decode_attention(q, k_cache, v_cache, tables, lens, 0.25, k_scale=ks, v_scale=vs)
    with pytest.raises(ValueError, match="pattern"):
        decode_attention(q, k_cache, v_cache, tables, lens, 0.25, "local:4")


@pytest.mark.parametrize("name", ["dense", "strided-sink"])
def test_fp8_pages_with_bfloat16_queries(name, fp8_paged_kv, assert_close):
    # Over FP8 pages the products run in float16 whatever the query dtype, so bf16 queries work in the interpreter.
    pattern = PATTERNS[name]
    seq_lens = [17, 50]
    k8, v8, ks, vs, tables, _ = fp8_paged_kv(seq_lens, HK, 16)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    q = (torch.randn(2, HQ, 16) * 0.02).to(torch.bfloat16)
    args = (q, k8, v8, tables, lens, 0.25, pattern)
    assert_close(decode_attention(*args, k_scale=ks, v_scale=vs), decode_attention_ref(*args, k_scale=ks, v_scale=vs))
    qp = (torch.randn(sum(seq_lens), HQ, 16) * 0.02).to(torch.bfloat16)
    args = (qp, k8, v8, tables, torch.tensor([0, 17], dtype=torch.int32), lens, lens, 0.25, 50, pattern)
    assert_close(prefill_attention(*args, k_scale=ks, v_scale=vs), prefill_attention_ref(*args, k_scale=ks, v_scale=vs))
