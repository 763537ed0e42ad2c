import pytest
import torch

from ringlet.kernels.reduce_rms_norm import (
    MAX_ROWS,
    PeerBuffers,
    reduce_add_rms_norm,
    reduce_add_rms_norm_ref,
)
from ringlet.kernels.rms_norm import fused_add_rms_norm_ref

EPS = 1e-6


def _group(world: int, rank: int, nbytes: int) -> PeerBuffers:
    """`rank`'s view of a group whose memory is plain CPU tensors (one process plays every rank's memory)."""
    return PeerBuffers(rank, [torch.zeros(nbytes, dtype=torch.uint8) for _ in range(world)],
                       [torch.zeros(world * MAX_ROWS, dtype=torch.int32) for _ in range(world)],
                       torch.zeros(MAX_ROWS, dtype=torch.int32))


def _stage_peers(peers: PeerBuffers, partials: list[torch.Tensor], count: int) -> None:
    """What every other rank does first in its call number `count`: write its partial rows into this rank's
    staging (half count % 2, its own slot) and raise its flag for them on this rank."""
    t, d = partials[0].shape
    world, cap = peers.world, peers.max_rows(d, partials[0].dtype)
    mine = peers.buffers[peers.rank][:2 * world * cap * d * partials[0].dtype.itemsize]
    for r, part in enumerate(partials):
        if r == peers.rank:
            continue
        mine.view(part.dtype).view(2, world, cap, d)[count % 2, r, :t] = part
        peers.flags[peers.rank].view(world, MAX_ROWS)[r, :t] = count


def _copy(peers: PeerBuffers) -> PeerBuffers:
    return PeerBuffers(peers.rank, [b.clone() for b in peers.buffers], [f.clone() for f in peers.flags],
                       peers.counters.clone())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("world,rank,t,d", [(2, 0, 1, 576), (3, 1, 5, 100), (2, 1, 17, 64)])
def test_reduce_add_rms_norm_against_reference(world, rank, t, d, dtype, assert_close):
    kernel_peers = _group(world, rank, 2 * world * 17 * 576 * 4 + 12)  # room for 17 rows and a few spare bytes
    weight = torch.randn(d).to(dtype)
    for count in (1, 2, 3):  # both staging halves, and the first again
        partials = [torch.randn(t, d).to(dtype) for _ in range(world)]
        residual = torch.randn(t, d + 3).to(dtype)[:, :d]
        _stage_peers(kernel_peers, partials, count)
        ref_peers = _copy(kernel_peers)
        out, new_residual = reduce_add_rms_norm(partials[rank], residual, weight, EPS, kernel_peers)
        ref_out, ref_residual = reduce_add_rms_norm_ref(partials[rank], residual, weight, EPS, ref_peers)
        assert_close(new_residual, ref_residual)
        assert_close(out, ref_out)
        # The protocol's side effects match the reference's: counters, this rank's staged rows, its flags on peers.
        assert torch.equal(kernel_peers.counters, ref_peers.counters)
        assert int(kernel_peers.counters[0]) == count and int(kernel_peers.counters[t]) == 0
        for r in range(world):
            assert torch.equal(kernel_peers.buffers[r], ref_peers.buffers[r])
            assert torch.equal(kernel_peers.flags[r], ref_peers.flags[r])
            if r != rank:
                assert kernel_peers.flags[r].view(world, MAX_ROWS)[rank, :t].eq(count).all()


def test_reduce_add_rms_norm_ref_is_the_sum_of_partials(assert_close):
    world, t, d = 3, 4, 48
    peers = _group(world, 2, 2 * world * t * d * 4)
    partials = [torch.randn(t, d) for _ in range(world)]
    residual, weight = torch.randn(t, d), torch.randn(d)
    _stage_peers(peers, partials, 1)
    out, new_residual = reduce_add_rms_norm_ref(partials[2], residual, weight, EPS, peers)
    ref_out, ref_residual = fused_add_rms_norm_ref(partials[0] + partials[1] + partials[2], residual, weight, EPS)
    assert_close(new_residual, ref_residual)
    assert_close(out, ref_out)


def test_reduce_add_rms_norm_ref_names_a_peer_that_has_not_staged():
    peers = _group(3, 0, 4096)
    x = torch.randn(2, 8)
    _stage_peers(peers, [x, x, x], 1)
    peers.flags[0].view(3, MAX_ROWS)[2, 1] = 0  # rank 2 has not reached row 1 of this call
    with pytest.raises(RuntimeError, match="rank 2 has not staged"):
        reduce_add_rms_norm_ref(x, x, torch.ones(8), EPS, peers)


def test_reduce_add_rms_norm_rejects_rows_past_the_staging_buffers():
    peers = _group(2, 0, 2 * 2 * 3 * 64 * 2)  # three rows of 64 bf16 per half and rank
    assert peers.max_rows(64, torch.bfloat16) == 3
    x = torch.randn(4, 64).to(torch.bfloat16)
    with pytest.raises(ValueError, match="4 rows of 64"):
        reduce_add_rms_norm(x, x, torch.ones(64), EPS, peers)


def test_peer_buffers_check_their_shapes():
    with pytest.raises(ValueError, match=r"flags\[1\] must have shape"):
        PeerBuffers(0, [torch.zeros(64, dtype=torch.uint8)] * 2,
                    [torch.zeros(2 * MAX_ROWS, dtype=torch.int32), torch.zeros(5, dtype=torch.int32)],
                    torch.zeros(MAX_ROWS, dtype=torch.int32))
    with pytest.raises(ValueError, match="rank 2 of 2"):
        PeerBuffers(2, [torch.zeros(64, dtype=torch.uint8)] * 2, [torch.zeros(2 * MAX_ROWS, dtype=torch.int32)] * 2,
                    torch.zeros(MAX_ROWS, dtype=torch.int32))
