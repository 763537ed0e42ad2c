"""Choosing between a Triton kernel and its torch reference.

Triton runs on CUDA tensors, the reference on CPU tensors. `RINGLET_KERNELS=triton` forces Triton (tests set it
with `TRITON_INTERPRET=1` so the Triton kernels run on the CPU); `RINGLET_KERNELS=torch` forces the references.
"""
import functools
import os

import torch


def use_triton(t: torch.Tensor) -> bool:
    """True when the kernel for tensor `t` should be the Triton one."""
    mode = os.environ.get("RINGLET_KERNELS", "auto")
    if mode == "triton":
        return True
    if mode == "torch":
        return False
    if mode != "auto":
        raise ValueError(f"RINGLET_KERNELS must be auto, triton or torch, got {mode!r}")
    return t.is_cuda


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device, which launchers size their grids by."""
    return torch.cuda.get_device_properties(device).multi_processor_count
