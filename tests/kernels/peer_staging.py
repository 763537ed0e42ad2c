"""Helpers for the tests of the staging protocol (reduce_rms_norm, gather_rows): one process plays every rank."""
import torch

from ringlet.kernels.reduce_rms_norm import MAX_ROWS, PeerBuffers, pack_words


def group(world: int, rank: int, nbytes: int) -> PeerBuffers:
    """`rank`'s view of a group whose memory is plain CPU tensors of nbytes each."""
    return PeerBuffers(rank, [torch.zeros(nbytes, dtype=torch.uint8) for _ in range(world)],
                       torch.zeros(MAX_ROWS, dtype=torch.int32))


def stage_peers(peers: PeerBuffers, every: list[torch.Tensor], count: int) -> None:
    """What every other rank r sends in its call number `count`: its rows every[r], stamped with the count, into
    this rank's staging (parity count & 1, r's slot)."""
    t, d = every[0].shape
    mine = peers.staging(peers.rank, d)
    for r, rows in enumerate(every):
        if r != peers.rank:
            mine[count & 1, r, :t] = pack_words(rows, torch.full((t,), count, dtype=torch.int32))


def copy_peers(peers: PeerBuffers) -> PeerBuffers:
    """A copy of peers' memory and counters (to run a reference on the same state)."""
    return PeerBuffers(peers.rank, [b.clone() for b in peers.buffers], peers.counters.clone())
