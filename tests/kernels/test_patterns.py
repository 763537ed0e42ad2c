"""The pattern objects: validation, their mask definitions, keep fractions and block-sparse lookups."""
import pytest
import torch
from ringlet.kernels import DENSE, BlockSparse, Dense, Local, Strided

PATTERNS = [DENSE, Local(1), Local(7), Local(4096), Local(7, sink=3), Strided(2, 1), Strided(5, 9),
            Strided(5, 9, sink=7), Strided(4, 3, sink=30), BlockSparse(),
            BlockSparse(16, 2, 3), BlockSparse(16, 1, 1)]


@pytest.mark.parametrize("make,match", [
    (lambda: Local(0), "window"), (lambda: Local(2.5), "window"), (lambda: Local(True), "window"),
    (lambda: Strided(1, 4), "stride"), (lambda: Strided(4, 0), "window"),
    (lambda: Local(4, sink=-1), "sink"), (lambda: Strided(4, 4, sink=1.5), "sink"),
    (lambda: BlockSparse(block=32), "block size 32 not supported: kernels support 16"),
    (lambda: BlockSparse(local_blocks=0), "local_blocks"), (lambda: BlockSparse(vert_stride=0), "vert_stride"),
])
def test_bad_parameters_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_patterns_are_frozen_and_hashable():
    assert Dense() == DENSE and hash(Local(4)) == hash(Local(4))
    with pytest.raises(AttributeError):
        Local(4).window = 5


def _brute_mask(pattern, q, k, h):
    """The contract's definitions, one pair at a time."""
    if k > q:
        return False
    if isinstance(pattern, Local):
        return q - pattern.window < k or k < pattern.sink
    if isinstance(pattern, Strided):
        return q - pattern.window < k or k % pattern.stride == pattern.stride - 1 or k < pattern.sink
    if isinstance(pattern, BlockSparse):
        i, j = q // 16, k // 16
        return i - j < pattern.local_blocks or (j + h) % pattern.vert_stride == pattern.vert_stride - 1
    return True


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_mask_matches_definition(pattern):
    q_pos, k_pos = torch.arange(20, 70), torch.arange(70)
    for h in (0, 1, 2):
        mask = pattern.mask(q_pos, k_pos, h)
        want = torch.tensor([[_brute_mask(pattern, q, k, h) for k in k_pos.tolist()] for q in q_pos.tolist()])
        assert torch.equal(mask, want)


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("seq_len", [1, 17, 100])
def test_keep_fraction_counts_the_mask(pattern, seq_len):
    pos = torch.arange(seq_len)
    masks = [pattern.mask(pos, pos, h) for h in range(3)]
    causal = seq_len * (seq_len + 1) // 2
    prefill = sum(m.sum().item() for m in masks) / (3 * causal)
    decode = sum(m[-1].sum().item() for m in masks) / (3 * seq_len)
    assert pattern.keep_fraction(seq_len, 3) == pytest.approx(prefill)
    assert pattern.keep_fraction(seq_len, 3, decode=True) == pytest.approx(decode)


@pytest.mark.parametrize("span", [1, 3])
def test_block_lookup_lists_the_visible_blocks(span):
    pattern = BlockSparse(16, local_blocks=2, vert_stride=3)
    ids, counts = pattern.lookup(4, 11, "cpu", span=span)
    assert ids.dtype == counts.dtype == torch.int32 and counts.shape == (4, 11) and ids.shape[:2] == (4, 11)
    blocks = torch.arange(11)
    for h in range(4):
        seen = pattern.block_mask(blocks, blocks, h)
        for i in range(11):
            want = seen[i:i + span].any(0).nonzero().flatten().tolist()
            assert ids[h, i, :counts[h, i]].tolist() == want
    assert pattern.lookup(4, 11, "cpu", span=span)[0] is ids  # cached
