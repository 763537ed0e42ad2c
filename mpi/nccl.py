"""`nccl`: torch.distributed's NCCL backend, set up over MPI, for per-layer tensors on GPUs.

Nothing for the user to set: rank 0 of the job picks a free TCP port, broadcasts `tcp://HOST:PORT` over MPI
(msgpack), and every rank calls `init_process_group("nccl", init_method=..., rank, world_size)` with its MPI rank.
torch.distributed builds its groups collectively, so every rank creates every tensor-parallel group in the same
order and keeps its own. `all_reduce` is a plain `dist.all_reduce` on the tensor, in place: no host copies, no
synchronisation, so it can be captured in a CUDA graph (the decode graphs capture it inside the model's forward).

Small all-reduces (decode activations: batch x dim x 2 bytes, 10-160 KiB on a 13B shape) are latency-bound, and
NCCL's ring costs tens of microseconds each, 80 times a step. When every rank of the group shares one node and its
GPUs can read each other's memory (NVLink), messages up to `one_shot_bytes` instead go through torch's symmetric
memory: each rank copies its tensor into a buffer every peer has mapped, and one kernel per rank reads all peers'
buffers and sums them (`torch.ops.symm_mem.one_shot_all_reduce_out`; a single pass, no ring steps). Both steps are
plain kernels on the current stream, so they are captured in CUDA graphs too. Larger messages stay on NCCL.

The all-reduces a Llama block makes are each followed by the residual add and RMSNorm; `reduce_add_rms_norm` does
the three in one kernel on symmetric memory of its own (`ringlet.kernels.reduce_rms_norm`: push the rows to every
peer, wait for theirs, sum, add, normalize), one launch where the unfused path makes three (copy, one-shot, norm).
`row_parallel_linear` computes the partial sums that call reduces with `ringlet.kernels.gemv.linear_staged`, whose
GEMV pushes each output tile to the peers as it finishes, so the reduce kernel that follows only waits and sums.
`vocab_parallel_logits` does the same for the LM head split by vocabulary rows, with staging of its own
(`GATHER_BYTES`) and `ringlet.kernels.gather_rows`, which waits for the peers' logits and writes the whole rows.
"""
from __future__ import annotations

import socket

import torch
from ringlet.errors import ConfigError
from ringlet.kernels.gather_rows import gather_rows
from ringlet.kernels.gemv import linear_staged
from ringlet.kernels.reduce_rms_norm import DTYPES, MAX_ROWS, PeerBuffers, reduce_add_rms_norm

from . import control
from .comm import Communicator, check_tensor


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _address(world) -> str:
    """rank 0's rendezvous address: loopback when every rank shares its node, else its host name."""
    local = world.Split_type(__import__("mpi4py").MPI.COMM_TYPE_SHARED, key=world.Get_rank())
    try:
        single_node = local.Get_size() == world.Get_size()
    finally:
        local.Free()
    host = "127.0.0.1" if single_node else socket.getfqdn()
    return f"tcp://{host}:{_free_port()}" if world.Get_rank() == 0 else ""


# Largest all-reduce sent through symmetric memory by default (bytes); a rank's buffer per dtype is this size.
ONE_SHOT_BYTES = 512 << 10
_ONE_SHOT_DTYPES = (torch.bfloat16, torch.float32)  # torch's one-shot kernel is built for these two
# vocab_parallel_logits' staging (bytes): 32 rows of a 32K vocabulary split two ways, 8 of a 128K one.
GATHER_BYTES = 16 << 20


class NCCLCommunicator(Communicator):
    name = "nccl"

    def __init__(self, group, world, device: torch.device | None, one_shot_bytes: int | None = None):
        """one_shot_bytes: all-reduces up to this size go through symmetric memory (see the module docstring);
        None picks ONE_SHOT_BYTES where the group's GPUs share a node and can access each other, 0 turns it off."""
        super().__init__(group)
        import torch.distributed as dist
        if device is None or device.type != "cuda":
            raise ConfigError(f"communicator 'nccl' needs a CUDA device on every rank; rank {world.Get_rank()} "
                              f"runs on {device} (use --comm ring or mpi on CPUs)")
        if not dist.is_nccl_available():
            raise ConfigError("communicator 'nccl': this torch build has no NCCL")
        torch.cuda.set_device(device)
        self.device = device
        if not dist.is_initialized():
            address = control.bcast(world, _address(world))
            dist.init_process_group("nccl", init_method=address, rank=world.Get_rank(),
                                    world_size=world.Get_size(), device_id=device)
        # Every rank's group, as world ranks; each distinct group is created by all ranks, in sorted order.
        translated = group.Get_group().Translate_ranks(list(range(self.size)), world.Get_group())
        groups = sorted({tuple(g) for g in control.allgather(world, list(translated))})
        mine = tuple(translated)
        self.pg = None
        for ranks in groups:
            pg = dist.new_group(list(ranks), backend="nccl") if len(ranks) < world.Get_size() else dist.group.WORLD
            if ranks == mine:
                self.pg = pg
        self._dist = dist
        self.one_shot_bytes, self.one_shot_note = 0, "off"
        self._buffers: dict[torch.dtype, torch.Tensor] = {}
        self._peers: PeerBuffers | None = None  # reduce_add_rms_norm's staging, with one-shot
        self._gather_peers: PeerBuffers | None = None  # vocab_parallel_logits' staging, with one-shot
        self._symmetric: tuple[torch.Tensor, ...] = ()
        self._staged: torch.Tensor | None = None  # row_parallel_linear's output, when the GEMV sent its rows
        warm = torch.ones(1, device=device)
        self.all_reduce(warm)  # NCCL connects on first use, which must happen before any graph capture
        torch.cuda.synchronize(device)
        if int(warm.item()) != self.size:
            raise RuntimeError(f"NCCL warm-up all-reduce gave {warm.item()}, expected {self.size}")
        self._set_up_one_shot(ONE_SHOT_BYTES if one_shot_bytes is None else one_shot_bytes)

    def _set_up_one_shot(self, nbytes: int) -> None:
        """Map a symmetric buffer per dtype (one-shot all-reduce) and reduce_add_rms_norm's staging on every rank
        of the group, check both, or leave both off (all ranks agree)."""
        if nbytes <= 0 or self.size == 1:
            return
        note = _one_shot_blocker(self.group, self.device)
        if note is None:
            try:
                import torch.distributed._symmetric_memory as symm_mem
                for dtype in _ONE_SHOT_DTYPES:
                    buf = symm_mem.empty(nbytes // dtype.itemsize, dtype=dtype, device=self.device)
                    symm_mem.rendezvous(buf, group=self.pg.group_name)
                    self._buffers[dtype] = buf
                self._peers = self._map_peers(symm_mem, 4 * self.size * nbytes)
                self._gather_peers = self._map_peers(symm_mem, GATHER_BYTES)
            except Exception as e:  # an old torch, a driver without peer mappings: NCCL does it all
                note = f"symmetric memory unavailable: {type(e).__name__}: {e}"
        notes = control.allgather(self.group, note)
        if any(n is not None for n in notes):
            self._buffers.clear()
            self._peers, self._gather_peers, self._symmetric = None, None, ()
            self.one_shot_note = next(n for n in notes if n is not None)
            return
        torch.cuda.synchronize(self.device)
        self.group.Barrier()  # every rank's staging is zero before any rank writes to it
        self.one_shot_bytes, self.one_shot_note = nbytes, "symmetric memory"
        check = torch.full((8,), float(self.rank + 1), dtype=torch.bfloat16, device=self.device)
        self.all_reduce(check)
        expected = self.size * (self.size + 1) / 2
        if not bool((check == expected).all()):
            raise RuntimeError(f"one-shot all-reduce check gave {check.tolist()}, expected {expected}")
        partial = torch.full((2, 8), float(self.rank + 1), dtype=torch.bfloat16, device=self.device)
        _, summed = self.reduce_add_rms_norm(partial, torch.ones_like(partial), torch.ones(8, device=self.device),
                                             1e-6)
        if not bool((summed == expected + 1).all()):
            raise RuntimeError(f"fused all-reduce check gave {summed.tolist()}, expected {expected + 1}")
        gathered = gather_rows(partial, self._gather_peers)
        if gathered.tolist() != [[float(r + 1) for r in range(self.size) for _ in range(8)]] * 2:
            raise RuntimeError(f"staged all-gather check gave {gathered.tolist()}")

    def _map_peers(self, symm_mem, nbytes: int) -> PeerBuffers:
        """Staging (uint8 [nbytes], zeroed) in symmetric memory, every rank's as this rank maps it."""
        staging = symm_mem.empty(nbytes, dtype=torch.uint8, device=self.device)
        staging.zero_()
        handle = symm_mem.rendezvous(staging, group=self.pg.group_name)
        self._symmetric += (staging,)  # the allocation: the peers' views below do not keep it alive
        return PeerBuffers(self.rank, [handle.get_buffer(r, (nbytes,), torch.uint8) for r in range(self.size)],
                           torch.zeros(MAX_ROWS, dtype=torch.int32, device=self.device))

    def all_reduce(self, tensor):
        check_tensor(tensor, "all_reduce")
        buf = self._buffers.get(tensor.dtype)
        nbytes = tensor.numel() * tensor.element_size()
        # The kernel moves 4-16 byte vectors: sizes that are not a multiple of 4 bytes go to NCCL.
        if buf is not None and 0 < nbytes <= self.one_shot_bytes and nbytes % 4 == 0 and tensor.is_contiguous():
            n = tensor.numel()
            buf[:n].copy_(tensor.view(-1))
            torch.ops.symm_mem.one_shot_all_reduce_out(buf[:n], "sum", self.pg.group_name, out=tensor.view(-1))
            return tensor
        self._dist.all_reduce(tensor, group=self.pg)
        return tensor

    def row_parallel_linear(self, x, w):
        if self._peers is None:
            return super().row_parallel_linear(x, w)
        out, staged = linear_staged(x, w, self._peers)
        self._staged = out if staged else None
        return out

    def reduce_add_rms_norm(self, x, residual, weight, eps):
        peers = self._peers
        staged, self._staged = self._staged is x, None
        if peers is not None and x.dtype in DTYPES and x.dim() == 2 and x.shape[0] <= peers.max_rows(x.shape[1]):
            return reduce_add_rms_norm(x, residual, weight, eps, peers, staged)
        if staged:
            raise RuntimeError("internal: rows staged by row_parallel_linear reached the unfused all-reduce")
        return super().reduce_add_rms_norm(x, residual, weight, eps)

    def vocab_parallel_logits(self, x, w):
        peers = self._gather_peers
        if peers is None or x.dtype not in DTYPES or x.dim() != 2 or x.shape[0] > peers.max_rows(w.shape[0]):
            return super().vocab_parallel_logits(x, w)
        out, staged = linear_staged(x, w, peers)
        return gather_rows(out, peers, staged)

    def broadcast(self, tensor, root=0):
        check_tensor(tensor, "broadcast")
        self._dist.broadcast(tensor, src=self._dist.get_global_rank(self.pg, root), group=self.pg)
        return tensor

    def all_gather(self, tensor):
        check_tensor(tensor, "all_gather")
        out = torch.empty((self.size, *tensor.shape), dtype=tensor.dtype, device=tensor.device)
        self._dist.all_gather_into_tensor(out, tensor.contiguous(), group=self.pg)
        return out

    def barrier(self):
        self._dist.barrier(group=self.pg, device_ids=[self.device.index])

    def describe(self) -> dict:
        return {"backend": self.name, "size": self.size, "one_shot_bytes": self.one_shot_bytes,
                "one_shot": self.one_shot_note, "fused_reduce_norm": self._peers is not None,
                "staged_gather": self._gather_peers is not None}


def _one_shot_blocker(group, device: torch.device) -> str | None:
    """Why this rank cannot take part in one-shot all-reduces (None when it can): peers on other nodes, or GPUs
    that cannot map each other's memory."""
    from mpi4py import MPI
    local = group.Split_type(MPI.COMM_TYPE_SHARED, key=group.Get_rank())
    try:
        if local.Get_size() != group.Get_size():
            return "ranks on several nodes"
        peers = control.allgather(group, device.index)
    finally:
        local.Free()
    if len(set(peers)) != len(peers):
        return "ranks see their GPUs under the same index (CUDA_VISIBLE_DEVICES per rank): peer access unknown"
    blocked = [p for p in peers if p != device.index and not torch.cuda.can_device_access_peer(device.index, p)]
    if blocked:
        return f"GPU {device.index} cannot access GPU(s) {blocked}"
    return None
