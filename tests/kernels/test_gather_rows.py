import pytest
import torch

from peer_staging import copy_peers, group, stage_peers
from ringlet.kernels.gather_rows import gather_rows, gather_rows_ref
from ringlet.kernels.reduce_rms_norm import MAX_ROWS, PeerBuffers, unpack_words


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("world,rank,t,n", [(2, 0, 1, 576), (3, 2, 5, 101), (2, 1, 17, 1), (2, 1, 2, 4099)])
def test_gather_rows_against_reference(world, rank, t, n, dtype):
    """Every rank's rows side by side in float32, for three calls (both parities, then the first again); n = 4099
    takes the kernel's loop over several blocks of words, with a partial last one."""
    kernel_peers = group(world, rank, 2 * world * 17 * 2050 * 8 + 24)  # 17 rows of 4099 values, spare bytes
    for count in (1, 2, 3):
        blocks = [(torch.randn(t, n) * 4).to(dtype) for _ in range(world)]
        x = torch.randn(t, n + 3).to(dtype)[:, :n]  # rows with a stride of their own
        blocks[rank] = x
        stage_peers(kernel_peers, blocks, count)
        ref_peers = copy_peers(kernel_peers)
        out = gather_rows(x, kernel_peers)
        ref = gather_rows_ref(x, ref_peers)
        assert out.dtype == torch.float32 and torch.equal(out, ref)
        assert torch.equal(out, torch.cat(blocks, dim=1).float())
        # The protocol's side effects match the reference's: counters, and the words sent to every peer.
        assert torch.equal(kernel_peers.counters, ref_peers.counters)
        assert int(kernel_peers.counters[0]) == count and int(kernel_peers.counters[t]) == 0
        assert not kernel_peers.tickets.any()
        for r in range(world):
            assert torch.equal(kernel_peers.buffers[r], ref_peers.buffers[r])
            if r != rank:
                sent = kernel_peers.staging(r, n)[count & 1, rank, :t]
                assert torch.equal(unpack_words(sent, n, dtype), x)
                assert bool(((sent >> 32) == count).all())


@pytest.mark.parametrize("m,n,k", [(1, 576, 96), (3, 101, 64), (16, 64, 200), (1, 1100, 32)])
def test_linear_staged_sends_what_gather_rows_reads(m, n, k):
    """Two ranks in one process, each with its rows of a head: gemv.linear_staged writes each rank's logits into
    the other's staging, and gather_rows with staged=True sends nothing more and returns both, for three calls.
    n = 1100 spreads each row over two programs (blocks of 512 words, the second partial): the last to finish
    advances the row's counter."""
    from ringlet.kernels.gemv import linear_ref, linear_staged

    dtype = torch.float16  # the interpreter's tl.dot multiplies bf16 bit patterns (DESIGN.md, Tests)
    buffers = [torch.zeros(2 * 2 * 16 * ((n + 1) // 2) * 8, dtype=torch.uint8) for _ in range(2)]
    ranks = [PeerBuffers(r, buffers, torch.zeros(MAX_ROWS, dtype=torch.int32)) for r in range(2)]
    for count in (1, 2, 3):
        x = torch.randn(m, k).to(dtype)
        heads = [(torch.randn(n, k) / k ** 0.5).to(dtype) for _ in range(2)]
        outs = []
        for r in range(2):
            out, staged = linear_staged(x, heads[r], ranks[r])
            assert staged
            outs.append(out)
        for r in range(2):
            before = [b.clone() for b in buffers]
            logits = gather_rows(outs[r], ranks[r], staged=True)
            assert all(torch.equal(a, b) for a, b in zip(before, buffers))
            assert torch.equal(logits, torch.cat(outs, dim=1).float())
            assert ranks[r].counters[:m].tolist() == [count] * m and int(ranks[r].counters[m]) == 0
            assert not ranks[r].tickets.any()
        torch.testing.assert_close(outs[1], linear_ref(x, heads[1]), rtol=2e-3, atol=2e-3)


def test_gather_rows_ref_names_a_peer_that_has_not_staged():
    peers = group(3, 1, 8192)
    x = torch.randn(2, 8).to(torch.bfloat16)
    stage_peers(peers, [x, x, x], 1)
    peers.staging(1, 8)[1, 2, 1, 3] = 0  # one word of rank 2's row 1 still holds no count
    with pytest.raises(RuntimeError, match="rank 2 has not staged"):
        gather_rows_ref(x, peers)


def test_gather_rows_rejects_bad_input():
    peers = group(2, 0, 2 * 2 * 3 * 32 * 8)  # three rows of 64 values per parity and rank
    x = torch.randn(4, 64).to(torch.bfloat16)
    with pytest.raises(ValueError, match="4 rows of 64"):
        gather_rows(x, peers)
    with pytest.raises(ValueError, match="x must have dtype"):
        gather_rows(x[:2].float(), peers)
    with pytest.raises(ValueError, match="x must have shape"):
        gather_rows(x[0], peers)
