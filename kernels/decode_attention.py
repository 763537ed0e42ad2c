"""Paged flash-decoding under an attention pattern: one query token per sequence, the keys it sees split across
programs, partials merged by log-sum-exp. Caches are bf16/fp16/fp32, or FP8 e4m3 with per-(token, head) scales."""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_kv_caches, check_scale_words, check_tensor
from ._dispatch import sm_count, use_triton
from ._paged import attend_tile, cache_rows, gather_kv
from .patterns import (
    BLOCK_SPARSE_ID,
    DENSE,
    SPARSE_BLOCK,
    BlockSparse,
    Pattern,
    head_masks,
    kernel_params,
    lookup_blocks,
    keys_before,
    summary_bound,
    virtual_keys,
    window_start,
)

# The tl.dot kernel's programs that run on one SM at once: the split count is chosen by how the programs fill
# waves of these slots (_fill_waves).
_PROGRAMS_PER_SM = 4
# _fill_waves: splits tried when the batch alone takes more than one wave.
_MAX_WAVE_SPLITS = 8
# Never split finer than this many keys: each split's partial costs a write and a read in the merge.
_MIN_SPLIT_KEYS = 128
# Up to this many visited keys (a local window, a short prompt), when the batch alone nearly fills the GPU, one
# program per head takes them all: splitting would save less than the merge kernel costs (H200, local:256 at
# B=16: 20 us against 24 us split in two). At batch 1 splitting still pays (9 us against 7 us).
_ONE_SPLIT_KEYS = 512
# The merge is a kernel of its own. Merging in the split kernel instead (the last split program of each head group,
# counted by an atomic after a barrier, reads the partials back from L2) measured slower in CUDA graphs on an H200
# (2026-11-27): 0.3-1 us a call at batch 1 (dense bf16 at 4K 23.2 against 21.5 us), and TP-2 13B decode 1.650x /
# 1.680x one GPU against 1.661x / 1.725x; the tail's barrier, atomic and dependent loads cost more than a launch.
# Off the GPU (the interpreter in tests) use a fixed split count, so the merge of several partials is exercised.
_SPLITS_OFF_GPU = 4
# The row kernel's (one query head per program, _attend_rows) program slots per SM, as _PROGRAMS_PER_SM: 4 of 4
# warps fit (128 registers a thread). H200, FP8 at 32K, B=1:
# 16 splits (512 programs) 71.5 us; 3 per SM with 3 stages (smem-bound) 73.1 us, and at B=16 its 512 programs
# take 1.3 waves: 1198 us against 1069 us.
_ROW_PROGRAMS_PER_SM = 4
# Keys of a tile that pass through each row slot of _attend_rows (held by the same threads): one rescale of the
# slot's output per tile serves them all. H200, FP8 at 32K, B=1 / B=16, keys through _dot16: 2 per slot
# (64-key tiles, 8 warps) 77.6 / 1141 us, 4 (64 keys, 4 warps) 74.2 / 1067 us, 8 (128 keys, 4 warps) 71.5 / 1069.
_ROWS_PER_SLOT = 8


@triton.jit
def _tile_keys(
    v,  # virtual indices of the tile's keys (any shape)
    end,  # the split's end: indices >= end are not read
    seq_len, lo, n_sink, n_summary, P1, ids_row,  # the query's key list (see _decode_split_kernel)
    PATTERN: tl.constexpr,
):
    """Key positions of virtual indices v (v's shape), and which of them exist."""
    valid = v < end
    keys = virtual_keys(v, valid, lo, n_sink, n_summary, P1, ids_row, PATTERN)
    if PATTERN == BLOCK_SPARSE_ID:
        valid = valid & (keys < seq_len)  # the diagonal block runs past the query
    return keys, valid


@triton.jit
def _row_offsets(
    keys, valid,  # [SLOTS, ROWS] from _tile_keys
    table_ptr,  # this sequence's row of the block table
    kv_head, num_kv_heads,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
):
    """int64 [SLOTS, ROWS] element offsets of each key's row of kv_head in the caches, and int32 ones of its
    scale. Keys split into page and slot as unsigned numbers (a shift and a mask; invalid keys are never read),
    and row numbers stay 32-bit (the launcher checks the cache has fewer than 2^31 rows): 10% fewer instructions
    per tile than int64 pages and signed division (sm_90 SASS, 2026-11-27)."""
    k = keys.to(tl.uint32)
    page = tl.load(table_ptr + k // PAGE_SIZE, mask=valid, other=0)
    slot = (k % PAGE_SIZE).to(tl.int32)
    row = (page * PAGE_SIZE + slot) * num_kv_heads + kv_head
    return row.to(tl.uint32).to(tl.int64) * HEAD_DIM, (page * num_kv_heads + kv_head) * PAGE_SIZE + slot


@triton.jit
def _load_rows(
    kv_offs, scale_offs, valid,  # [SLOTS, ROWS] from _row_offsets and _tile_keys
    k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, dims,
    HAS_SCALE: tl.constexpr, ASM: tl.constexpr,
):
    """A tile's keys and values [SLOTS, ROWS, Dh] as stored (missing rows 0; with ASM the keys as int32 words of
    4 e4m3 values, [SLOTS, ROWS, Dh // 4]), and their float32 scales [SLOTS, ROWS] (1 for float caches)."""
    ptrs = kv_offs[:, :, None] + dims[None, None, :]
    if ASM:
        words = (kv_offs >> 2)[:, :, None] + tl.arange(0, dims.shape[0] // 4)[None, None, :]
        k = tl.load(k_cache_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + words, mask=valid[:, :, None], other=0)
    else:
        k = tl.load(k_cache_ptr + ptrs, mask=valid[:, :, None], other=0.0)
    v = tl.load(v_cache_ptr + ptrs, mask=valid[:, :, None], other=0.0)
    if HAS_SCALE:
        # Each scale is read as the aligned 32-bit word holding it: the software pipeliner turns loads of 4 bytes
        # and more into asynchronous copies, but a 2-byte load would stall every step on its latency.
        words = scale_offs >> 1
        shift = (scale_offs & 1).to(tl.int32) * 16
        k_word = tl.load(k_scale_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + words, mask=valid, other=0)
        v_word = tl.load(v_scale_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + words, mask=valid, other=0)
        k_scale = (k_word >> shift).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        v_scale = (v_word >> shift).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        k_scale = tl.full(valid.shape, 1.0, tl.float32)
        v_scale = k_scale
    return k, v, k_scale, v_scale


@triton.jit
def _query_pairs(q):
    """(lo, hi, scale): q [Dh] float32 times `scale` in float16, as int32 [Dh // 4] words of pairs (dims 4j and
    4j + 1 in lo, 4j + 2 and 4j + 3 in hi), for _dot16. The scale keeps every float16 partial sum of _dot16
    (8 products of at most 448 * |q_i| * scale) below 448 * 128 = 57344."""
    scale = 128.0 / tl.maximum(tl.sum(tl.abs(q), 0), 1e-30)
    bits = (q * scale).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    even, odd = tl.split(tl.reshape(bits, [q.shape[0] // 4, 2, 2]))
    d0, d2 = tl.split(even)
    d1, d3 = tl.split(odd)
    return d0 | (d1 << 16), d2 | (d3 << 16), scale


@triton.jit
def _dot16(
    k,  # [SLOTS, ROWS, Dh // 4] int32 words of 4 e4m3 keys
    q_lo, q_hi,  # [Dh // 4] int32 float16 pairs from _query_pairs
):
    """float32 [SLOTS, ROWS]: each row's dot product with q. Each group of 4 words (a thread's 16-byte load) is
    converted 2 values per cvt and multiplied-and-added 2 per fma.f16x2 (each half summing 8 products in
    float16), then summed in float32: 19 instructions per 16 values where float32 arithmetic takes 40. H200, 32K
    dense: output error 4.5e-5 (B=1) and 8.5e-5 (B=16) relative to the float32 reference, against 1e-8 for float32
    products and bfloat16's rounding of 3.9e-3."""
    part = tl.inline_asm_elementwise(
        """{
        .reg .b16 h<8>;
        .reg .b32 a<8>, t;
        .reg .f32 lo, hi;
        mov.b32 {h0, h1}, $4;
        mov.b32 {h2, h3}, $5;
        mov.b32 {h4, h5}, $6;
        mov.b32 {h6, h7}, $7;
        cvt.rn.f16x2.e4m3x2 a0, h0;
        cvt.rn.f16x2.e4m3x2 a1, h1;
        cvt.rn.f16x2.e4m3x2 a2, h2;
        cvt.rn.f16x2.e4m3x2 a3, h3;
        cvt.rn.f16x2.e4m3x2 a4, h4;
        cvt.rn.f16x2.e4m3x2 a5, h5;
        cvt.rn.f16x2.e4m3x2 a6, h6;
        cvt.rn.f16x2.e4m3x2 a7, h7;
        mul.rn.f16x2 t, a0, $8;
        fma.rn.f16x2 t, a1, $12, t;
        fma.rn.f16x2 t, a2, $9, t;
        fma.rn.f16x2 t, a3, $13, t;
        fma.rn.f16x2 t, a4, $10, t;
        fma.rn.f16x2 t, a5, $14, t;
        fma.rn.f16x2 t, a6, $11, t;
        fma.rn.f16x2 t, a7, $15, t;
        mov.b32 {h0, h1}, t;
        cvt.f32.f16 lo, h0;
        cvt.f32.f16 hi, h1;
        add.f32 $0, lo, hi;
        mov.b32 $1, 0x80000000;
        mov.b32 $2, 0x80000000;
        mov.b32 $3, 0x80000000;
        }""",
        "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r,r", [k, q_lo[None, None, :], q_hi[None, None, :]],
        dtype=tl.float32, is_pure=True, pack=4)
    # Keep the first of each 4 (the group's sum; the others are -0).
    first, _ = tl.split(tl.reshape(part, [k.shape[0], k.shape[1], k.shape[2] // 4, 2, 2]))
    first, _ = tl.split(first)
    return tl.sum(first, 2)


@triton.jit
def _attend_rows(
    acc, l_r, m_r,  # per-slot running output [SLOTS, Dh], softmax denominators and maxima [SLOTS] (log2)
    q,  # the program's one query: [Dh] float32, or with ASM its (lo, hi) pairs from _query_pairs
    k, v,  # [SLOTS, ROWS, Dh] tile from _load_rows (with ASM, k as int32 words)
    k_scale, v_scale, valid,  # [SLOTS, ROWS] scales from _load_rows, and which keys exist
    qk_scale,  # softmax scale * log2(e) (with ASM, divided by _query_pairs' scale)
    ASM: tl.constexpr,
):
    """One step of one query head over a tile of keys, without cross-thread reductions but each score's dot
    product along Dh: slot s keeps its own running max, denominator and output over the keys that pass through
    it (ROWS of each tile, held by the same threads, so that one rescale serves them all), merged once at the
    end (after the loop)."""
    if ASM:
        qk = _dot16(k, q[0], q[1])
    else:
        qk = tl.sum(k.to(tl.float32) * q[None, None, :], 2)
    qk = tl.where(valid, qk * (k_scale * qk_scale), float("-inf"))
    m_new = tl.maximum(m_r, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_r - m_safe)
    p = tl.exp2(qk - m_safe[:, None])
    l_r = l_r * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.sum((p * v_scale)[:, :, None] * v.to(tl.float32), 1)
    return acc, l_r, m_new


@triton.jit
def _decode_split_kernel(
    q_ptr,  # [B, Hq, Dh] queries, last dim contiguous
    k_cache_ptr,  # [num_pages, PAGE_SIZE, Hk, Dh] contiguous
    v_cache_ptr,  # [num_pages, PAGE_SIZE, Hk, Dh] contiguous
    k_scale_ptr,  # [num_pages, Hk, PAGE_SIZE] float16 (FP8 caches; else unused)
    v_scale_ptr,  # [num_pages, Hk, PAGE_SIZE] float16 (FP8 caches; else unused)
    block_tables_ptr,  # [B, max_pages] int32 page ids
    seq_lens_ptr,  # [B] keys of each sequence
    ids_ptr,  # [Hq, lookup_rows, lookup_width] block-sparse lookup (else unused)
    counts_ptr,  # [Hq, lookup_rows] listed blocks per (head, query block)
    o_part_ptr,  # [B, Hq, S, Dh] float32 partial outputs, normalized per split (S == 1: the output, q's dtype)
    lse_part_ptr,  # [B, Hq, S] float32 partial log2-sum-exp2, -inf for an empty split
    qk_scale,  # softmax scale * log2(e)
    split_len,  # visited keys per split, a multiple of BLOCK_N
    P0, P1, P2,  # pattern parameters (patterns.kernel_params)
    num_kv_heads,  # Hk
    lookup_rows, lookup_width,  # lookup shape
    stride_qb, stride_qh,  # q strides (sequence, head)
    stride_bt,  # block table row stride
    PATTERN: tl.constexpr,  # pattern id (patterns.DENSE_ID, ...)
    GROUP: tl.constexpr,  # query heads per kv head
    HEADS: tl.constexpr,  # query heads per program: GROUP (they share the keys), or 1 (block-sparse: per-head keys)
    BLOCK_G: tl.constexpr,  # power of two >= max(HEADS, 16) (tl.dot needs 16 rows); 1 without tl.dot
    HEAD_DIM: tl.constexpr,  # Dh, a power of two
    PAGE_SIZE: tl.constexpr,  # tokens per page
    BLOCK_N: tl.constexpr,  # keys per inner step
    HAS_SCALE: tl.constexpr,  # FP8 cache with scales
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs, else ignored
    USE_DOT: tl.constexpr,  # attend_tile's tensor-core products, else _attend_rows (HEADS == BLOCK_G == 1 only)
    DIRECT: tl.constexpr,  # one split: write the normalized output straight to o_part_ptr, no merge
    NUM_STAGES: tl.constexpr,  # software-pipeline depth of the row loop (its loads are cp.async copies)
    SLOTS: tl.constexpr,  # row slots of _attend_rows: BLOCK_N // _ROWS_PER_SLOT (1 with tl.dot)
    ASM: tl.constexpr,  # FP8 keys' dot products through _dot16's inline assembly (the GPU; not the interpreter)
):
    seq = tl.program_id(0)
    first_head = tl.program_id(1) * HEADS
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    kv_head = first_head // GROUP
    group = tl.arange(0, BLOCK_G)
    group_valid = group < HEADS
    heads = first_head + group
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=group_valid[:, None], other=0.0)
    if HAS_SCALE and USE_DOT:
        q = q.to(tl.float16)  # products over FP8 pages run in float16 (_paged.py)

    # The keys the query at seq_len - 1 sees, as a list of `visited` virtual indices (patterns.virtual_keys):
    # dense [0, seq_len); local the sink keys, then the window [lo, seq_len); strided the sink keys, the summary
    # columns left of the window, then the window; block-sparse the listed blocks of the query's block.
    seq_len = tl.load(seq_lens_ptr + seq)
    lo = window_start(seq_len - 1, P0, PATTERN)
    n_sink, n_summary = keys_before(lo, P1, P2, PATTERN)
    ids_row = ids_ptr
    if PATTERN == BLOCK_SPARSE_ID:
        lookup_row = first_head * lookup_rows + tl.maximum(seq_len - 1, 0) // SPARSE_BLOCK
        visited = tl.load(counts_ptr + lookup_row, mask=seq_len > 0, other=0) * SPARSE_BLOCK
        ids_row = ids_ptr + lookup_row.to(tl.int64) * lookup_width
    else:
        visited = n_sink + n_summary + seq_len - lo
    start = split * split_len
    end = tl.minimum(start + split_len, visited)

    table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    if not USE_DOT:
        acc_r = tl.zeros([SLOTS, HEAD_DIM], dtype=tl.float32)
        l_r = tl.zeros([SLOTS], dtype=tl.float32)
        m_r = tl.full([SLOTS], float("-inf"), dtype=tl.float32)
        # Key j of a tile goes to slot j % SLOTS: the threads that load a row of the first SLOTS keys load the
        # rows of the same slots after them.
        tile = tl.arange(0, SLOTS)[:, None] + tl.arange(0, BLOCK_N // SLOTS)[None, :] * SLOTS
        q_row = tl.sum(q.to(tl.float32), 0)  # the one query head (BLOCK_G == 1)
        row_scale = qk_scale
        if ASM:
            q_lo, q_hi, q_scale = _query_pairs(q_row)
            q_row = (q_lo, q_hi)
            row_scale = qk_scale / q_scale
        # tl.range with num_stages pipelines the loads as asynchronous copies (a plain range does not without
        # tl.dot): the next tiles stream in while this one is reduced.
        for v0 in tl.range(start, end, BLOCK_N, num_stages=NUM_STAGES):
            keys, valid = _tile_keys(v0 + tile, end, seq_len, lo, n_sink, n_summary, P1, ids_row, PATTERN)
            kv_offs, scale_offs = _row_offsets(keys, valid, table_ptr, kv_head, num_kv_heads, HEAD_DIM, PAGE_SIZE)
            k, v, k_scale, v_scale = _load_rows(kv_offs, scale_offs, valid, k_cache_ptr, v_cache_ptr, k_scale_ptr,
                                                v_scale_ptr, dims, HAS_SCALE, ASM)
            acc_r, l_r, m_r = _attend_rows(acc_r, l_r, m_r, q_row, k, v, k_scale, v_scale, valid, row_scale, ASM)
    else:
        acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        for v0 in range(start, end, BLOCK_N):
            keys, valid = _tile_keys(v0 + tl.arange(0, BLOCK_N), end, seq_len, lo, n_sink, n_summary, P1, ids_row,
                                     PATTERN)
            rows = cache_rows(table_ptr, keys, valid, PAGE_SIZE, True)
            acc, l_i, m_i = attend_tile(acc, l_i, m_i, q, rows, valid, valid[None, :], k_cache_ptr, v_cache_ptr,
                                        k_scale_ptr, v_scale_ptr, kv_head, num_kv_heads, qk_scale, dims,
                                        HEAD_DIM, PAGE_SIZE, True, False, HAS_SCALE, DOT_PRECISION)
    if not USE_DOT:
        # Merge the row slots: rescale each to the overall max (slots that saw no key have m = -inf, weight 0).
        m_all = tl.max(m_r, 0)
        weights = tl.exp2(m_r - tl.where(m_all == float("-inf"), 0.0, m_all))
        l_i = tl.sum(l_r * weights, 0)[None]
        m_i = m_all[None]
        acc = tl.sum(acc_r * weights[:, None], 0)[None, :]

    nonempty = l_i > 0
    lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    part = (seq * (num_kv_heads * GROUP) + heads) * num_splits + split
    if not DIRECT:
        tl.store(lse_part_ptr + part, lse, mask=group_valid)
    tl.store(o_part_ptr + part[:, None].to(tl.int64) * HEAD_DIM + dims[None, :],
             out.to(o_part_ptr.dtype.element_ty), mask=group_valid[:, None])


@triton.jit
def _decode_merge_kernel(
    o_part_ptr,  # [B * Hq, S, Dh] float32 partial outputs
    lse_part_ptr,  # [B * Hq, S] float32 partial log2-sum-exp2
    out_ptr,  # [B * Hq, Dh] contiguous, q's dtype
    num_splits,  # S
    HEAD_DIM: tl.constexpr,  # Dh
    BLOCK_S: tl.constexpr,  # power of two >= S
):
    row = tl.program_id(0).to(tl.int64)
    splits = tl.arange(0, BLOCK_S)
    split_valid = splits < num_splits
    dims = tl.arange(0, HEAD_DIM)
    lse = tl.load(lse_part_ptr + row * num_splits + splits, mask=split_valid, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    # A sequence of length 0 (a padding row) has only empty splits: every weight is 0 and the output is 0.
    weights = tl.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max))
    total = tl.sum(weights, 0)
    parts = tl.load(o_part_ptr + (row * num_splits + splits)[:, None] * HEAD_DIM + dims[None, :],
                    mask=split_valid[:, None], other=0.0)
    out = tl.sum(parts * weights[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty))


def _num_splits(batch: int, programs_per_seq: int, max_visited: int, block_n: int, use_dot: bool,
                device: torch.device) -> int:
    """Splits of each query's visited keys, from shapes alone (reading seq_lens would sync the host and break CUDA
    graph capture): as many programs as fill the GPU's program slots best (_fill_waves), each split at least
    _MIN_SPLIT_KEYS keys."""
    if device.type != "cuda":
        return max(1, min(_SPLITS_OFF_GPU, triton.cdiv(max_visited, block_n)))
    most = max(1, triton.cdiv(max_visited, _MIN_SPLIT_KEYS))
    per_sm = _PROGRAMS_PER_SM if use_dot else _ROW_PROGRAMS_PER_SM
    wanted = _fill_waves(batch * programs_per_seq, per_sm * sm_count(device))
    if max_visited <= _ONE_SPLIT_KEYS and wanted <= 2:
        return 1
    return min(wanted, most)


@functools.lru_cache(maxsize=1024)
def _fill_waves(programs: int, slots: int) -> int:
    """Splits of `programs` (head groups x batch) over `slots` program slots: while they fit one wave, the most
    splits that keep them within it (half full at least: at least one split does); past one wave, the fewest splits
    (up to _MAX_WAVE_SPLITS) whose last wave is the fullest. H200, 2026-11-27, bf16 pages at B = 8 and 16, 20 to 40
    heads, 1K and 2K keys, 528 slots: a last wave barely begun costs nearly a whole one (40 heads at B = 16: 640
    programs, 1.2 waves, 101 us; split 4 ways, 4.85 waves, 88.5 us), and one wave from half full up runs at full
    bandwidth (20 heads at B = 16: 320 programs 45 us, against 52 us split in two; at B = 8, 480 programs 26 us,
    against 35 us unsplit and 29 us split 4 ways)."""
    if programs <= slots:
        return max(1, slots // programs)
    return min(range(1, _MAX_WAVE_SPLITS + 1), key=lambda s: math.ceil(programs * s / slots) / (programs * s / slots))


def _config(head_dim: int, dtype: torch.dtype, device: torch.device, fp8: bool,
            heads: int) -> tuple[int, int, int, bool]:
    """(BLOCK_N, num_warps, num_stages, USE_DOT) for this head size, query dtype, cache kind and query heads per
    program. One FP8 head per program is a GEMV: _attend_rows multiplies and sums without tl.dot (numbers
    below)."""
    if device.type != "cuda":
        return 16, 4, 1, heads > 1
    if dtype == torch.float32 or head_dim > 128:
        return 32, 4, 2, True
    if fp8 and heads == 1:
        # A pass of 4 warps loads 4 x 32 threads x 16 bytes: 2048 / head_dim rows, one per slot. H200, 32K
        # context, 32 heads x 128, dense, against SDPA on bf16 (122 us at B=1, 1843 us at B=16): 8 rows per slot,
        # 2 stages: 70-71.5 us and 1026-1069 us. 3 stages: 73.1 / 1198 us (3 programs per SM by shared memory);
        # 256-key tiles of 8 warps 73.2 / 1081 us; loads prefetched into registers instead of pipelined 92.7 /
        # 1812 us. Before: 64-key tiles of 8 warps, one key per slot, float32 dot products: 77.3 / 1130-1223 us.
        # tl.dot over the head padded to 16 columns (keys as M, wgmma; values converted to float16 before their
        # transposed operand): 101 / 1406 us at best. Values weighted in float16 pairs (fma.f16x2 over a slot's 8
        # rows): no faster (70.0 / 1025 us) and 30x the error (1.3e-3).
        return _ROWS_PER_SLOT * 2048 // head_dim, 4, 2, False
    return 64, 4, 3, True  # bf16 at 32K, B=1: 129 us (4.2 TB/s); multiply-and-sum: 176-367 us


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, pattern: Pattern = DENSE,
                     k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query per sequence over its paged keys and values under `pattern` (flash-decoding).

    q [B, Hq, Dh] fp16/bf16/fp32 (last dim contiguous; Dh a power of two in 16..256); k_cache, v_cache
    [num_pages, page_size, Hk, Dh] contiguous, q's dtype or float8_e4m3fn; for FP8 caches k_scale, v_scale
    [num_pages, Hk, page_size] float16 contiguous (row = e4m3 * scale; 4-byte aligned, an even number of them),
    else None; Hq a multiple of Hk (query head h reads kv head h // (Hq // Hk) and is head h of a block-sparse
    pattern); block_tables [B, max_pages] int32 (entries past a sequence's pages are never read); seq_lens [B]
    int32: sequence b's query sits at position seq_lens[b] - 1 and sees the keys its pattern keeps (patterns.py);
    0 marks a padding row, whose output is zeros. Returns out [B, Hq, Dh] contiguous, q's dtype.

    Only the keys the pattern keeps are split across programs (local: the sink keys and the window; strided:
    those plus the summary columns). The split count comes from block_tables.shape[1], the pattern and the SM
    count, never from seq_lens, so the launch is CUDA-graph capturable (a block-sparse lookup is built on the
    first call for a table width: make that call before capturing); pass a table no wider than the longest
    sequence needs, or splits past the real lengths idle.
    """
    if not use_triton(q):
        return decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale, pattern, k_scale, v_scale)
    check_tensor("q", q, (None, None, None), FLOAT_DTYPES)
    b, hq, dh = q.shape
    has_scale = check_kv_caches(k_cache, v_cache, k_scale, v_scale, dh, q.dtype, q.device)
    check_tensor("block_tables", block_tables, (b, None), (torch.int32,), q.device)
    check_tensor("seq_lens", seq_lens, (b,), (torch.int32,), q.device, layout="contiguous")
    page_size, hk = k_cache.shape[1], k_cache.shape[2]
    if dh not in (16, 32, 64, 128, 256):
        raise ValueError(f"head_dim must be a power of two in 16..256, got q of shape {tuple(q.shape)}")
    if hq % hk:
        raise ValueError(f"q heads ({hq}) must be a multiple of cache kv heads ({hk})")
    pattern_id, p0, p1, p2 = kernel_params(pattern)
    out = torch.empty((b, hq, dh), dtype=q.dtype, device=q.device)
    max_keys = block_tables.shape[1] * page_size
    if b == 0 or max_keys == 0:
        return out.zero_()
    group = hq // hk
    if isinstance(pattern, BlockSparse):
        if page_size != SPARSE_BLOCK.value:
            raise ValueError(f"block-sparse attention needs pages of {SPARSE_BLOCK.value} tokens, got {page_size}")
        ids, counts = pattern.lookup(hq, lookup_blocks(block_tables.shape[1]), q.device)
        max_visited, heads = ids.shape[-1] * SPARSE_BLOCK.value, 1  # each query head has its own blocks
    else:
        ids = counts = block_tables  # unused
        max_visited, heads = summary_bound(pattern, max_keys), group
    block_n, num_warps, num_stages, use_dot = _config(dh, q.dtype, q.device, has_scale, heads)
    if not use_dot and k_cache.numel() // dh >= 2**31:
        raise ValueError(f"k_cache has {k_cache.numel() // dh} rows of {dh} values: the one-head kernel numbers rows "
                         f"in 32 bits, so at most 2^31 - 1")
    if has_scale and not use_dot:
        check_scale_words(k_scale, v_scale)
    splits = _num_splits(b, hq // heads, max_visited, block_n, use_dot, q.device)
    split_len = triton.cdiv(triton.cdiv(max_visited, splits), block_n) * block_n
    splits = triton.cdiv(max_visited, split_len)
    if splits == 1:  # the split kernel writes the output itself
        o_part, lse_part = out, out
    else:
        o_part = torch.empty((b, hq, splits, dh), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((b, hq, splits), dtype=torch.float32, device=q.device)
    _decode_split_kernel[(b, hq // heads, splits)](
        q, k_cache, v_cache, k_scale if has_scale else k_cache, v_scale if has_scale else v_cache,
        block_tables, seq_lens, ids, counts, o_part, lse_part,
        scale * math.log2(math.e), split_len, p0, p1, p2, hk,
        *((counts.shape[-1], ids.shape[-1]) if isinstance(pattern, BlockSparse) else (0, 0)),
        q.stride(0), q.stride(1), block_tables.stride(0),
        PATTERN=pattern_id, GROUP=group, HEADS=heads,
        BLOCK_G=max(16, triton.next_power_of_2(heads)) if use_dot else 1, HEAD_DIM=dh,
        PAGE_SIZE=page_size, BLOCK_N=block_n, HAS_SCALE=has_scale,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", USE_DOT=use_dot, DIRECT=splits == 1,
        NUM_STAGES=num_stages, SLOTS=1 if use_dot else block_n // _ROWS_PER_SLOT, ASM=q.is_cuda and has_scale,
        num_warps=num_warps, num_stages=num_stages,
    )
    if splits == 1:
        return out
    _decode_merge_kernel[(b * hq,)](o_part, lse_part, out, splits, HEAD_DIM=dh,
                                    BLOCK_S=triton.next_power_of_2(splits), num_warps=4)
    return out


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                         seq_lens: torch.Tensor, scale: float, pattern: Pattern = DENSE,
                         k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference for `decode_attention` (one sequence at a time, float32, FP8 pages dequantized, the
    pattern applied as an explicit mask)."""
    hq = q.shape[1]
    hk = k_cache.shape[2]
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    for b, seq_len in enumerate(seq_lens.tolist()):
        if seq_len == 0:
            continue
        k = gather_kv(k_cache, k_scale, block_tables[b], seq_len).repeat_interleave(hq // hk, dim=1)
        v = gather_kv(v_cache, v_scale, block_tables[b], seq_len).repeat_interleave(hq // hk, dim=1)
        q_pos = torch.tensor([seq_len - 1], device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        visible = head_masks(pattern, q_pos, k_pos, hq)[:, 0]  # [Hq or 1, L]
        scores = (torch.einsum("hd,khd->hk", q[b].float(), k) * scale).masked_fill(~visible, float("-inf"))
        out[b] = torch.einsum("hk,khd->hd", scores.softmax(-1), v).to(q.dtype)
    return out
