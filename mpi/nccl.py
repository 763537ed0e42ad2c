"""`nccl`: torch.distributed's NCCL backend, set up over MPI, for per-layer tensors on GPUs.

Nothing for the user to set: rank 0 of the job picks a free TCP port, broadcasts `tcp://HOST:PORT` over MPI
(msgpack), and every rank calls `init_process_group("nccl", init_method=..., rank, world_size)` with its MPI rank.
torch.distributed builds its groups collectively, so every rank creates every tensor-parallel group in the same
order and keeps its own. `all_reduce` is a plain `dist.all_reduce` on the tensor, in place: no host copies, no
synchronisation, so it can be captured in a CUDA graph (the decode graphs capture it inside the model's forward).
"""
from __future__ import annotations

import socket

import torch
from ringlet.errors import ConfigError

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


class NCCLCommunicator(Communicator):
    name = "nccl"

    def __init__(self, group, world, device: torch.device | None):
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
        warm = torch.ones(1, device=device)
        self.all_reduce(warm)  # NCCL connects on first use, which must happen before any graph capture
        torch.cuda.synchronize(device)
        if int(warm.item()) != self.size:
            raise RuntimeError(f"NCCL warm-up all-reduce gave {warm.item()}, expected {self.size}")

    def all_reduce(self, tensor):
        check_tensor(tensor, "all_reduce")
        self._dist.all_reduce(tensor, group=self.pg)
        return tensor

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
