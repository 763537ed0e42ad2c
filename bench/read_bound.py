"""The least time any single kernel launch needs to read a given number of bytes from HBM: a bound for the
weight-streaming kernels (bench/quant_gemm.py) and the sparse decode attention (bench/attention.py).

A kernel whose only work is to read `nbytes` of one contiguous int32 buffer and keep a word per program, timed as
bench/kernels.py times every row (one CUDA graph replaying it over buffers that overflow L2 three times, median
replay / launches): the best of a few tilings, persistent and not. Anything that must read those bytes, in
several tensors and with work to do on them, cannot be faster, so a target this kernel misses is out of reach.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# (BLOCK words per program step, num_warps, programs per SM or 0 for one program per BLOCK)
_TILINGS = [(2048, 4, 0), (4096, 8, 0), (2048, 4, 4), (4096, 8, 2), (4096, 8, 4), (8192, 8, 2), (8192, 16, 1)]


@triton.jit
def _read_kernel(
    src_ptr,  # [n] int32, read once
    out_ptr,  # [programs] int32: each program's sum of its words (keeps the loads alive)
    n,  # words
    per_program,  # words per program, a multiple of BLOCK
    BLOCK: tl.constexpr,  # words per step
):
    start = tl.program_id(0).to(tl.int64) * per_program
    end = tl.minimum(start + per_program, n)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        acc += tl.load(src_ptr + idx, mask=idx < end, other=0)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def _split(n: int, block: int, per_sm: int, sms: int) -> tuple[int, int]:
    """(programs, words per program) of a tiling over n words on sms SMs."""
    programs = per_sm * sms if per_sm else triton.cdiv(n, block)
    per_program = triton.cdiv(triton.cdiv(n, programs), block) * block
    return triton.cdiv(n, per_program), per_program


def read_bound_us(bench, nbytes: int) -> float:
    """Microseconds of the fastest tiling reading nbytes (rounded up to whole words) on bench's GPU, timed by
    bench.time_us over rotating buffers."""
    n = max(1, triton.cdiv(nbytes, 4))
    sms = torch.cuda.get_device_properties(bench.device).multi_processor_count
    splits = {(block, warps, per_sm): _split(n, block, per_sm, sms) for block, warps, per_sm in _TILINGS}
    out = torch.empty(max(programs for programs, _ in splits.values()), dtype=torch.int32, device=bench.device)

    def read(src: torch.Tensor, tiling: tuple[int, int, int]) -> None:
        programs, per_program = splits[tiling]
        _read_kernel[(programs,)](src, out, n, per_program, BLOCK=tiling[0], num_warps=tiling[1])

    sets = bench.input_sets(lambda: (torch.randint(-2 ** 31, 2 ** 31 - 1, (n,), dtype=torch.int32,
                                                   device=bench.device),), 4 * n)
    src = sets[0][0]
    for t in _TILINGS:  # every tiling reads every word (int32 sums wrap alike)
        out.zero_()
        read(src, t)
        if int(out.sum(dtype=torch.int64) - src.sum(dtype=torch.int64)) % 2 ** 32:
            raise RuntimeError(f"read kernel with tiling {t} missed words of a {n}-word buffer")
    best = min(bench.time_us(lambda src, t=t: read(src, t), sets) for t in _TILINGS)
    del sets
    bench.free()
    return best
