"""All-gather of row blocks through the peers' staging: a vocab-parallel LM head's logits under tensor parallelism.

With the output head split by vocabulary rows, rank r computes logits[:, r N:(r + 1) N] ([T, N], N = vocab /
world) and the step needs every column on the rank that samples. At decode sizes (T <= 16, N = 16000 on a 13B
shape split two ways) that gather is pure latency, so it travels as `reduce_rms_norm`'s stamped 64-bit words, in
`PeerBuffers` of its own (`gemv.linear_staged` writes them from the head's GEMV tile by tile), and this kernel
waits for every peer's words and writes whole rows in float32, rank r's block at columns [r N, (r + 1) N): one
program per block of 512 words of a row when the GEMV sent them, one per row when the kernel sends them itself.
The protocol (counts per row, two parities, no resetting) is the one in reduce_rms_norm's docstring; a call on
rows [0, T) advances their counters by one.

The buffers must not be shared with `reduce_add_rms_norm`: both index their slots by row and count, and a gather
call's rows of N words lie over other rows of a reduce call's layout, whose counts may differ.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import use_triton
from .reduce_rms_norm import PeerBuffers, check_rows, exchange_rows_ref, receive_words, send_tile

# Words one step of a program's loop moves (two 16-bit values each); with staged rows, also the words per program.
_BLOCK_WORDS = 512


@triton.jit
def _gather_rows_kernel(
    x_ptr,  # [T, N] this rank's block, 16-bit floats
    out_ptr,  # [T, WORLD * N] contiguous float32 output
    table_ptr,  # [WORLD] int64 addresses of every rank's staging: int64 [2, WORLD, rows_cap, WD]
    counters_ptr,  # [MAX_ROWS] int32 this rank's calls per row
    tickets_ptr,  # [MAX_ROWS] int32 programs done with each row in this call (zero between calls)
    N,  # columns per rank
    rows_cap,  # rows each (parity, source rank) slot holds
    stride_xt,  # row stride of x
    span,  # words of the row each program moves (the grid's second axis: ceil(ceil(N / 2) / span) programs)
    RANK: tl.constexpr,  # this rank
    WORLD: tl.constexpr,  # ranks in the group
    BLOCK_W: tl.constexpr,  # words per loop step (power of two)
    STAGED: tl.constexpr,  # x's words are already in the peers' staging (gemv.linear_staged): do not send
):
    row = tl.program_id(0)
    count = tl.load(counters_ptr + row) + 1
    parity = count & 1
    WD = (N + 1) // 2
    w_lo = tl.program_id(1) * span
    w_hi = tl.minimum(w_lo + span, WD)
    out_row = out_ptr + row.to(tl.int64) * WORLD * N
    one = tl.zeros([1], dtype=tl.int32)
    # This rank's own block: copied out, and sent first unless the GEMV sent it (then every program's words are
    # on their way before any program waits; unstaged, each row is one program, and all rows are resident).
    for w0 in range(w_lo, w_hi, BLOCK_W):
        cols = 2 * w0 + tl.arange(0, 2 * BLOCK_W)
        x = tl.load(x_ptr + row.to(tl.int64) * stride_xt + cols, mask=cols < N, other=0.0)
        if not STAGED:
            send_tile(tl.reshape(x, [1, 2 * BLOCK_W]), count + one, row + one, one == 0, 2 * w0, N, table_ptr,
                       rows_cap, RANK, WORLD, 1, 2 * BLOCK_W)
        tl.store(out_row + RANK * N + cols, x.to(tl.float32), mask=cols < N)
    dtype = x_ptr.dtype.element_ty
    mine = tl.load(table_ptr + RANK).to(tl.pointer_type(tl.int64))
    for r in tl.static_range(WORLD):
        if r != RANK:
            slot = mine + ((parity * WORLD + r) * rows_cap + row).to(tl.int64) * WD
            for w0 in range(w_lo, w_hi, BLOCK_W):
                pairs = w0 + tl.arange(0, BLOCK_W)
                vals = receive_words(slot + pairs, pairs < w_hi, count, dtype, BLOCK_W)
                cols = 2 * w0 + tl.arange(0, 2 * BLOCK_W)
                tl.store(out_row + r * N + cols, vals, mask=cols < N)
    # Every program read the count before its ticket (acq_rel), so the last may advance it for the next call.
    if tl.atomic_add(tickets_ptr + row, 1) == tl.num_programs(1) - 1:
        tl.store(counters_ptr + row, count)
        tl.store(tickets_ptr + row, 0)


def gather_rows(x: torch.Tensor, peers: PeerBuffers, staged: bool = False) -> torch.Tensor:
    """Every rank's x side by side: out[:, r N:(r + 1) N] = rank r's x, as float32.

    x [T, N] fp16/bf16 (last dim contiguous), T <= peers.max_rows(N) -> out [T, world * N] float32, contiguous.
    Every rank of the group calls it with the same T and N (it waits for them); the counters of rows [0, T)
    advance by one. staged: x came from `gemv.linear_staged` with these peers (returning True), which already
    sent its words.
    """
    if not use_triton(x):
        return gather_rows_ref(x, peers, staged)
    check_rows(x, peers)
    t, n = x.shape
    out = torch.empty((t, peers.world * n), dtype=torch.float32, device=x.device)
    if t == 0 or n == 0:
        return out
    words = (n + 1) // 2
    block_w = min(_BLOCK_WORDS, triton.next_power_of_2(words))
    span = block_w if staged else words
    _gather_rows_kernel[(t, triton.cdiv(words, span))](
        x, out, peers.table, peers.counters, peers.tickets, n, peers.max_rows(n), x.stride(0), span,
        RANK=peers.rank, WORLD=peers.world, BLOCK_W=block_w, STAGED=staged, num_warps=max(1, min(block_w // 128, 4)))
    return out


def gather_rows_ref(x: torch.Tensor, peers: PeerBuffers, staged: bool = False) -> torch.Tensor:
    """Torch reference for `gather_rows`: the same staging words and counters (see
    `reduce_rms_norm.exchange_rows_ref`)."""
    check_rows(x, peers)
    return torch.cat([rows.float() for rows in exchange_rows_ref(x, peers, staged, "gather_rows_ref")], dim=1)
