import pytest
import torch
from peer_staging import copy_peers, group, stage_peers

from ringlet.kernels.reduce_rms_norm import (
    MAX_ROWS,
    PeerBuffers,
    pack_words,
    reduce_add_rms_norm,
    reduce_add_rms_norm_ref,
    unpack_words,
)
from ringlet.kernels.rms_norm import fused_add_rms_norm_ref

EPS = 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("world,rank,t,d", [(2, 0, 1, 576), (3, 1, 5, 101), (2, 1, 17, 64), (2, 0, 2, 1)])
def test_reduce_add_rms_norm_against_reference(world, rank, t, d, dtype, assert_close):
    kernel_peers = group(world, rank, 2 * world * 17 * 288 * 8 + 24)  # room for 17 rows of 576 and spare bytes
    weight = torch.randn(d).to(dtype)
    for count in (1, 2, 3):  # both parities, and the first again
        partials = [(torch.randn(t, d) * 4).to(dtype) for _ in range(world)]
        residual = torch.randn(t, d + 3).to(dtype)[:, :d]
        stage_peers(kernel_peers, partials, count)
        ref_peers = copy_peers(kernel_peers)
        out, new_residual = reduce_add_rms_norm(partials[rank], residual, weight, EPS, kernel_peers)
        ref_out, ref_residual = reduce_add_rms_norm_ref(partials[rank], residual, weight, EPS, ref_peers)
        assert_close(new_residual, ref_residual)
        assert_close(out, ref_out)
        # The protocol's side effects match the reference's: counters, and the words sent to every peer.
        assert torch.equal(kernel_peers.counters, ref_peers.counters)
        assert int(kernel_peers.counters[0]) == count and int(kernel_peers.counters[t]) == 0
        for r in range(world):
            assert torch.equal(kernel_peers.buffers[r], ref_peers.buffers[r])
            if r != rank:
                sent = kernel_peers.staging(r, d)[count & 1, rank, :t]
                assert torch.equal(unpack_words(sent, d, dtype), partials[rank])
                assert bool(((sent >> 32) == count).all())


def test_words_round_trip_every_bit_pattern():
    values = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).view(256, 256)
    counts = torch.tensor([-5, 7] * 128, dtype=torch.int32)  # a count that wrapped past 2**31 is negative
    words = pack_words(values, counts)
    assert words.shape == (256, 128)
    assert torch.equal((words >> 32).to(torch.int32), counts[:, None].expand(256, 128))
    assert torch.equal(unpack_words(words, 256, torch.bfloat16).view(torch.int16), values.view(torch.int16))


def test_reduce_add_rms_norm_ref_is_the_sum_of_partials(assert_close):
    world, t, d = 3, 4, 48
    peers = group(world, 2, 2 * world * t * (d // 2) * 8)
    partials = [torch.randn(t, d).to(torch.float16) for _ in range(world)]
    residual, weight = torch.randn(t, d).to(torch.float16), torch.randn(d)
    stage_peers(peers, partials, 1)
    out, new_residual = reduce_add_rms_norm_ref(partials[2], residual, weight, EPS, peers)
    exact = (partials[0].float() + partials[1].float() + partials[2].float()).to(torch.float16)
    ref_out, ref_residual = fused_add_rms_norm_ref(exact, residual, weight, EPS)
    assert_close(new_residual, ref_residual)
    assert_close(out, ref_out)


def test_reduce_add_rms_norm_ref_names_a_peer_that_has_not_staged():
    peers = group(3, 0, 8192)
    x = torch.randn(2, 8).to(torch.bfloat16)
    stage_peers(peers, [x, x, x], 1)
    peers.staging(0, 8)[1, 2, 1, 3] = 0  # one word of rank 2's row 1 still holds no count
    with pytest.raises(RuntimeError, match="rank 2 has not staged"):
        reduce_add_rms_norm_ref(x, x, torch.ones(8), EPS, peers)


def test_reduce_add_rms_norm_rejects_bad_input():
    peers = group(2, 0, 2 * 2 * 3 * 32 * 8)  # three rows of 64 values per parity and rank
    assert peers.max_rows(64) == 3
    x = torch.randn(4, 64).to(torch.bfloat16)
    with pytest.raises(ValueError, match="4 rows of 64"):
        reduce_add_rms_norm(x, x, torch.ones(64), EPS, peers)
    with pytest.raises(ValueError, match="x must have dtype"):
        reduce_add_rms_norm(x[:2].float(), x[:2].float(), torch.ones(64), EPS, peers)
    with pytest.raises(ValueError, match="rank 2 of a group of 2"):
        PeerBuffers(2, [torch.zeros(64, dtype=torch.uint8)] * 2, torch.zeros(MAX_ROWS, dtype=torch.int32))


@pytest.mark.parametrize("m,n,k", [(1, 576, 96), (3, 101, 64), (16, 64, 200)])
def test_linear_staged_sends_what_reduce_add_rms_norm_reads(m, n, k, assert_close):
    """Two ranks in one process: each computes its partial rows with gemv.linear_staged, whose kernel writes them
    into the other's staging, then reduces with staged=True, which sends nothing more. Each gets the sum of both
    partials, the same bits as the unstaged call on a copy of its memory, for three calls (both parities)."""
    from ringlet.kernels.gemv import linear_ref, linear_staged

    dtype = torch.float16  # the interpreter's tl.dot multiplies bf16 bit patterns (DESIGN.md, Tests)
    buffers = [torch.zeros(2 * 2 * 16 * ((n + 1) // 2) * 8, dtype=torch.uint8) for _ in range(2)]
    ranks = [PeerBuffers(r, buffers, torch.zeros(MAX_ROWS, dtype=torch.int32)) for r in range(2)]
    weight = torch.randn(n).to(dtype)
    for count in (1, 2, 3):
        xs = [torch.randn(m, k).to(dtype) for _ in range(2)]
        ws = [(torch.randn(n, k) / k ** 0.5).to(dtype) for _ in range(2)]
        residual = torch.randn(m, n).to(dtype)
        parts = []
        for r in range(2):
            out, staged = linear_staged(xs[r], ws[r], ranks[r])
            assert staged
            assert_close(out, linear_ref(xs[r], ws[r]))
            sent = ranks[r].staging(1 - r, n)[count & 1, r, :m]
            assert bool(((sent >> 32) == count).all())
            assert torch.equal(unpack_words(sent, n, dtype), out)
            parts.append(out)
        summed = (parts[0].float() + parts[1].float()).to(dtype)
        for r in range(2):
            before = [b.clone() for b in buffers]
            unstaged = reduce_add_rms_norm(parts[r], residual, weight, EPS, copy_peers(ranks[r]))
            out, new_residual = reduce_add_rms_norm(parts[r], residual, weight, EPS, ranks[r], staged=True)
            assert all(torch.equal(a, b) for a, b in zip(before, buffers))
            assert torch.equal(new_residual, (summed.float() + residual.float()).to(dtype))
            assert torch.equal(out, unstaged[0]) and torch.equal(new_residual, unstaged[1])
            # one fp32 pass for the norm, as the unstaged kernel: a few float16 ulps from the torch reference
            assert_close(out, fused_add_rms_norm_ref(summed, residual, weight, EPS)[0], dtype=torch.bfloat16)
            assert int(ranks[r].counters[0]) == count
