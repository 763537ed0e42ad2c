"""Communicators: one small interface, several backends (ring, mpi, nccl, auto), picked by name.

    comm = make_communicator("ring", group)      # group: an mpi4py communicator (a tensor-parallel group)
    h = comm.all_reduce(h)                       # sums over the group, in place, returns the same tensor
    h = comm.row_parallel_linear(x, w)          # a row-parallel projection: this rank's partial sums
    x, residual = comm.reduce_add_rms_norm(h, residual, weight, eps)   # the sum, plus the residual, normalized
    logits = comm.vocab_parallel_logits(x, w)   # a vocab-parallel head: every rank's logits, side by side

`all_reduce` works IN PLACE: the tensor passed in holds the sum afterwards and is also returned, so a model can
write `h = comm.all_reduce(h)` and a CUDA graph replays it on its static buffer. The runtime core only ever calls
`all_reduce`, `row_parallel_linear`, `reduce_add_rms_norm` and `vocab_parallel_logits` (see
`ringlet.model.Llama.comm`); it never imports this package.

Host backends (ring, mpi) stage every tensor through a float32 numpy buffer on the CPU: 16-bit inputs are summed
in float32 and rounded once at the end, and every rank ends with the same bits. On GPUs these costs are what
DESIGN.md's MPI section measures: per-layer GPU tensors belong on NCCL, MPI carries control data and CPU ranks.
"""
from __future__ import annotations

import numpy as np
import torch
from ringlet.errors import ConfigError
from ringlet.kernels import fused_add_rms_norm, linear

BACKENDS = ("ring", "mpi", "nccl", "auto")

# Dtypes the collectives take; everything is summed in float32 (float64 stays float64).
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class Communicator:
    """The interface every backend implements, over the ranks of one MPI communicator (`group`)."""

    name = "base"

    def __init__(self, group):
        self.group = group
        self.rank = group.Get_rank()
        self.size = group.Get_size()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` (any shape; float32, float16 or bfloat16) over the group in place; returns it."""
        raise NotImplementedError

    def row_parallel_linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [T, K] @ w [N, K].T: this rank's partial sums of a row-parallel projection, which the caller passes
        to `reduce_add_rms_norm` next (and to nothing else first). Backends may start sending them while they
        are computed (nccl on one node)."""
        return linear(x, w)

    def reduce_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """`fused_add_rms_norm(all_reduce(x), residual, weight, eps)`: x [T, D] is this rank's partial sum (it may be
        overwritten), residual [T, D] the replicated residual stream -> (normalized [T, D], new residual [T, D]).
        What a Llama block does after each row-parallel projection; backends may fuse it (nccl on one node)."""
        return fused_add_rms_norm(self.all_reduce(x), residual, weight, eps)

    def vocab_parallel_logits(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [T, K] @ w [N, K].T on every rank, gathered: float32 [T, size * N] whose columns [r N, (r + 1) N) are
        rank r's product. What a Llama head split by vocabulary rows computes; backends may send each rank's
        logits as its GEMV writes them (nccl on one node)."""
        gathered = self.all_gather(linear(x, w))
        return gathered.permute(1, 0, 2).reshape(x.shape[0], -1).float()

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        """Overwrite `tensor` on every rank with root's copy (in place); returns it."""
        raise NotImplementedError

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """A new tensor [size, *tensor.shape]: row r is rank r's `tensor` (same shape and dtype on every rank)."""
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"backend": self.name, "size": self.size}


def check_tensor(tensor: torch.Tensor, what: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _FLOATS:
        raise TypeError(f"{what}: dtype {tensor.dtype} is not one of float32, float16, bfloat16, float64")


def to_host(tensor: torch.Tensor) -> np.ndarray:
    """A contiguous 1-D float32 (float64 stays) numpy array with tensor's values. For a contiguous float32 CPU
    tensor this is a view of the tensor itself (so an in-place reduction on it is already the result)."""
    wide = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    if tensor.device.type == "cuda":
        torch.cuda.current_stream(tensor.device).synchronize()  # MPI must not read before the GPU has written
    flat = tensor.detach().reshape(-1).to(device="cpu", dtype=wide)
    return flat.contiguous().numpy()


def from_host(tensor: torch.Tensor, host: np.ndarray) -> torch.Tensor:
    """Write host's values back into tensor (rounding to its dtype once); returns tensor."""
    src = torch.from_numpy(host)
    if tensor.device.type == "cpu" and tensor.is_contiguous() and src.data_ptr() == tensor.data_ptr():
        return tensor  # the staging buffer was the tensor itself
    tensor.copy_(src.view(tensor.shape))
    return tensor


class HostCommunicator(Communicator):
    """Collectives through MPI uppercase calls on host buffers; backends supply `reduce_host`, the in-place sum of
    a 1-D float32/float64 array over the ranks."""

    def all_reduce(self, tensor):
        check_tensor(tensor, "all_reduce")
        if self.size == 1 or tensor.numel() == 0:
            return tensor
        buf = to_host(tensor)
        self.reduce_host(buf)
        return from_host(tensor, buf)

    def reduce_host(self, buf: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def broadcast(self, tensor, root=0):
        check_tensor(tensor, "broadcast")
        host = to_host(tensor) if self.rank == root else np.empty(tensor.numel(), np.float64
                                                                  if tensor.dtype == torch.float64 else np.float32)
        self.group.Bcast(host, root=root)
        return from_host(tensor, host)

    def all_gather(self, tensor):
        check_tensor(tensor, "all_gather")
        host = to_host(tensor)
        out = np.empty((self.size, host.size), host.dtype)
        self.group.Allgather(host, out)
        return torch.from_numpy(out).to(device=tensor.device, dtype=tensor.dtype).view(self.size, *tensor.shape)

    def barrier(self):
        self.group.Barrier()


def make_communicator(name: str, group, world=None, device: torch.device | None = None, **options) -> Communicator:
    """The communicator `name` (ring, mpi, nccl or auto) over the mpi4py communicator `group`.

    `world` (default: group) is the communicator every rank of the job is in; nccl and auto need it because
    torch.distributed is set up once for the whole job. `device` is this rank's torch device. `options` go to the
    backend (ring: chunk_elems; nccl: one_shot_bytes; auto: thresholds).
    """
    if name == "ring":
        from .ring import RingCommunicator
        return RingCommunicator(group, **options)
    if name == "mpi":
        from .native import MPICommunicator
        return MPICommunicator(group)
    if name == "nccl":
        from .nccl import NCCLCommunicator
        return NCCLCommunicator(group, world if world is not None else group, device, **options)
    if name == "auto":
        from .auto import AutoCommunicator
        return AutoCommunicator(group, world if world is not None else group, device, **options)
    raise ConfigError(f"communicator {name!r} is not one of {', '.join(BACKENDS)}")
