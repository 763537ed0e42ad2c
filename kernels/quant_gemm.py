"""Weight-only quantized linear layers: fused dequantize + GEMV / GEMM over int8, int4 and ternary weights.

One launcher for every batch size. M == 1: `_quant_gemv_kernel`, a persistent kernel: each program owns one range
of K (the whole row up to _GEMV_COLUMNS columns, else a split of it), converts and pre-scales that slice of x once,
then streams tiles of BLOCK_N rows through FMAs, loading the next tile's words while it computes on the current one.
M > 1: `_quant_gemm_kernel`, which expands each step's words to a [BLOCK_N, NG * GROUP] tile of integer codes in the
activation dtype and feeds one tl.dot per step (as the left operand, so the few activation rows are the MMA's narrow
side), with group scales and zero points applied to the per-group product; split-K for decode batches (M <= 16)
with small N. The packing is described in kernels/quant_formats.py.

Fields become floats without an int-to-float conversion (16 per SM per clock on sm_80/sm_90, too few to keep up
with HBM at 4 bits). M > 1: OR-ing a field into the mantissa of 2**23 gives the float 2**23 + field exactly, and
one subtraction removes 2**23 and the format's zero offset. M == 1: a masked field is read as a float32 denormal
(see _X_EXP), one AND per value and no subtraction.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_tensor
from ._dispatch import sm_count, use_triton
from .gemv import _sum_splits_kernel, _tuning_bench
from .quant_formats import QUANT_WEIGHT_TYPES, SCALE_GROUP, Int4Weight, Int8Weight, TernaryWeight

# M > 1: split K when N alone gives fewer rows of W than this per SM (a row of a quantized weight is 2 to 8x
# shorter than bf16's, so more rows are needed to keep enough bytes in flight than gemv.py's 16).
_ROWS_PER_SM = 32
# M == 1: the columns one program covers. Its slice of x stays in registers, pre-scaled, for every tile it streams
# (4 words per thread per row: 16 to 64 values of x), so longer rows are split across programs; 4096 is one
# Llama-7B row and was the fastest cut of K = 11008 on an H200 (3 splits, against 2 or 6).
_GEMV_COLUMNS = 4096
# M == 1: split K further when N gives fewer rows than this per SM (the persistent kernel fills the GPU from
# 4 rows per program, so only small N needs it).
_GEMV_ROWS_PER_SM = 16
# Never split finer than this many packed bytes per row: each split writes and re-reads an fp32 output copy.
_MIN_SPLIT_BYTES = 512
# Decode batches up to this many rows use split-K and the BLOCK_M == 16 tiles.
_MAX_SKINNY_M = 16
_SMS_OFF_GPU = 4  # a stand-in SM count for the interpreter, so small N exercises split-K


# Sizes used only as loop bounds and masks: not specialized (on == 1 or % 16), so the Llama shapes and split
# counts share compiled kernels and autotuning compiles each config once per format.
_LOOP_BOUNDS = ["N", "KG", "SPLIT_K"]


def _groups_per_step(args: dict) -> int:
    return args["BLOCK_KW"] * 32 // (args["GROUP"] * args["BITS"])


# The M == 1 kernel multiplies fields as float32 denormals: field i masked in place (bit P = BITS * i, or 16 lower
# for fields that reach the exponent bits) reads as field * 2**(P - 149) exactly, so one AND makes it a float.
# Its x is pre-scaled by 2**(_X_EXP - P) (exact), making every product field * x * 2**(_X_EXP - 149) a normal
# float32 for |x| in [2**-77, 2**28): full float32 precision at one LOP3 and one FMA per value, with no bias.
_X_EXP = tl.constexpr(100)
_PRODUCT_SCALE = tl.constexpr(2.0 ** (149 - 100))  # the output's power-of-two factor, removed at the end
_INV_PRODUCT_SCALE = tl.constexpr(2.0 ** (100 - 149))


@triton.jit
def _denormal_field(words, i: tl.constexpr, BITS: tl.constexpr):
    """Field i of each int32 word as the exact float32 field * 2**(P - 149), P = BITS * i (16 less for fields that
    reach bit 23, taken from the word shifted right by 16)."""
    HIGH: tl.constexpr = BITS * i + BITS > 23
    P: tl.constexpr = BITS * i - 16 * HIGH
    if HIGH:
        words = words >> 16
    return (words & (((1 << BITS) - 1) << P)).to(tl.float32, bitcast=True)


@triton.jit
def _scaled_x(xv, i: tl.constexpr, BITS: tl.constexpr, X_EXP: tl.constexpr):
    """xv * 2**(X_EXP - P) for field i's P (see _denormal_field): exact, a power of two."""
    HIGH: tl.constexpr = BITS * i + BITS > 23
    P: tl.constexpr = BITS * i - 16 * HIGH
    SCALE: tl.constexpr = 2.0 ** (X_EXP - P)
    return xv * SCALE


def _gemv_even_k(args: dict) -> bool:
    """Every program's K range fills its BLOCK_KW words exactly: no bounds checks along K."""
    words = args["GROUP"] * args["BITS"] // 32
    return args["KG"] % args["SPLIT_K"] == 0 and args["KG"] // args["SPLIT_K"] * words == args["BLOCK_KW"]


@triton.heuristics({"EVEN_K": _gemv_even_k})
@triton.jit(do_not_specialize=_LOOP_BOUNDS)
def _quant_gemv_kernel(
    x_ptr,  # [K] one activation row, contiguous, in the weight's storage column order
    w_ptr,  # [N, KG * W] int32 packed weight (kernels/quant_formats.py)
    s_ptr,  # scales: [N, KG] (SCALES == 2), [N] (1) or [1] (0)
    z_ptr,  # [N, KG] zero points, read only when HAS_ZEROS
    b_ptr,  # [N] bias, read only when HAS_BIAS
    out_ptr,  # [SPLIT_K, N] contiguous: the output itself (SPLIT_K == 1, x's dtype) or float32 partials
    N, KG,  # output features; layout groups along K (K = KG * GROUP)
    stride_wn,  # KG * W, passed apart and specialized (% 16) so row starts are known 16-byte aligned: 4-word loads
    SPLIT_K,  # K ranges; program p sums range p % SPLIT_K (the grid is a multiple of SPLIT_K)
    BITS: tl.constexpr,  # bits per field: 8, 4 or 2
    GROUP: tl.constexpr,  # columns per layout group (the scale group when SCALES == 2)
    OFFSET: tl.constexpr,  # subtracted from every field (the symmetric zero point; 0 with HAS_ZEROS)
    SCALES: tl.constexpr,  # 0 one scale, 1 per output row, 2 per (row, group)
    HAS_ZEROS: tl.constexpr,  # per-(row, group) float zero points
    HAS_BIAS: tl.constexpr,  # add b_ptr (split 0 only)
    BLOCK_N: tl.constexpr,  # rows of W per tile
    BLOCK_KW: tl.constexpr,  # packed words per row of a program's K range, padded to a power of two
    PROGRAMS_PER_SM: tl.constexpr,  # sizes the grid only (see quant_linear)
    EVEN_K: tl.constexpr,  # every K range is exactly BLOCK_KW words: no bounds checks along K
):
    VALS: tl.constexpr = 32 // BITS  # fields per word
    W: tl.constexpr = GROUP // VALS  # words per group
    VEC: tl.constexpr = 4 if W >= 4 else W  # words per thread per row: one 16-byte load
    NSLOT: tl.constexpr = BLOCK_KW // VEC  # threads' slots along K; slot j lies in group j // (W // VEC)
    pid = tl.program_id(0)
    pid_k = pid % SPLIT_K
    tile_step = tl.num_programs(0) // SPLIT_K
    g_share = tl.cdiv(KG, SPLIT_K)
    g_start = pid_k * g_share
    g_end = tl.minimum(g_start + g_share, KG)
    offs_n = tl.arange(0, BLOCK_N)
    kw = tl.arange(0, BLOCK_KW)
    w_valid = (g_start + kw // W) < g_end
    slot_group = g_start + tl.arange(0, NSLOT) // (W // VEC)
    s_valid = slot_group < g_end
    # The tile is loaded as [BLOCK_N, BLOCK_KW] with K contiguous, so Triton puts 4 words per thread and threads,
    # then warps, along K, with the rows in registers: a thread's columns are the same for every row and tile, and
    # its slice of x is the slice of the tile's layout (a 3-D [rows, groups, words] tile let Triton 3.6 put threads
    # along the rows, 4x the x registers).
    w_tile = w_ptr + g_start * W + kw[None, :]
    # x, converted and pre-scaled once per program: field i of word kw multiplies column
    # (g_start + kw // W) * GROUP + i * W + kw % W, times 2**(X_EXP - P) (see _scaled_x).
    x_col = x_ptr + (g_start + kw // W) * GROUP + kw % W
    xs = ()
    x_sum = tl.zeros([BLOCK_KW], dtype=tl.float32)
    for i in tl.static_range(VALS):
        if EVEN_K:
            xv = tl.load(x_col + i * W).to(tl.float32)
        else:
            xv = tl.load(x_col + i * W, mask=w_valid, other=0.0).to(tl.float32)
        x_sum += xv
        xs = xs + (_scaled_x(xv, i, BITS, _X_EXP),)
    # The OFFSET (or zero point) term needs only each slot's sum of x, times 2**-49 like the products.
    x_sum = tl.sum(tl.reshape(x_sum, [NSLOT, VEC]), 1) * _INV_PRODUCT_SCALE

    # Persistent: tiles pid // SPLIT_K, + tile_step, ...; each iteration loads the next tile's words before its
    # math, so every warp keeps a tile in flight while it computes (x is loaded once, not per tile).
    rows = pid // SPLIT_K * BLOCK_N + offs_n
    next_words = tl.load(w_tile + rows.to(tl.int64)[:, None] * stride_wn, mask=(rows < N)[:, None] & w_valid[None, :],
                         other=0)
    for row0 in range(pid // SPLIT_K * BLOCK_N, N, tile_step * BLOCK_N):
        rows = row0 + offs_n
        words = next_words
        # The next tile's rows; past N (or past the last tile) they are masked and cost no traffic.
        next_rows = rows + tile_step * BLOCK_N
        next_words = tl.load(w_tile + next_rows.to(tl.int64)[:, None] * stride_wn,
                             mask=(next_rows < N)[:, None] & w_valid[None, :], other=0)
        # part = sum_i field_i * x_i (times 2**-49, see _X_EXP), summed over each thread's VEC words (one group).
        part = tl.zeros([BLOCK_N, BLOCK_KW], dtype=tl.float32)
        for i in tl.static_range(VALS):
            part += _denormal_field(words, i, BITS) * xs[i][None, :]
        part = tl.sum(tl.reshape(part, [BLOCK_N, NSLOT, VEC]), 2)
        if OFFSET != 0:
            part -= OFFSET * x_sum[None, :]
        r = tl.where(rows < N, rows, 0).to(tl.int64)
        if SCALES == 2:
            scale = tl.load(s_ptr + r[:, None] * KG + slot_group[None, :], mask=s_valid[None, :],
                            other=0.0).to(tl.float32)
            if HAS_ZEROS:
                # sum((q - z) * x) = sum(q * x) - z * sum(x): the zero costs one FMA per slot, not per field.
                zero = tl.load(z_ptr + r[:, None] * KG + slot_group[None, :], mask=s_valid[None, :],
                               other=0.0).to(tl.float32)
                part -= zero * x_sum[None, :]
            part *= scale
        out = tl.sum(part, 1) * _PRODUCT_SCALE
        if SCALES == 1:
            out *= tl.load(s_ptr + r).to(tl.float32)
        if SCALES == 0:
            out *= tl.load(s_ptr).to(tl.float32)
        if HAS_BIAS:
            if pid_k == 0:
                out += tl.load(b_ptr + r).to(tl.float32)
        tl.store(out_ptr + pid_k * N + rows, out.to(out_ptr.dtype.element_ty), mask=rows < N)


@triton.heuristics({"EVEN_K": lambda args: args["KG"] % (_groups_per_step(args) * args["SPLIT_K"]) == 0})
@triton.jit(do_not_specialize=_LOOP_BOUNDS + ["M"])
def _quant_gemm_kernel(
    x_ptr,  # [M, K] activations, last dim contiguous, in the weight's storage column order
    w_ptr,  # [N, KG * W] int32 packed weight (kernels/quant_formats.py)
    s_ptr,  # scales: [N, KG] (SCALES == 2), [N] (1) or [1] (0)
    z_ptr,  # [N, KG] zero points, read only when HAS_ZEROS
    b_ptr,  # [N] bias, read only when HAS_BIAS
    out_ptr,  # [SPLIT_K, M, N] contiguous: the output itself (SPLIT_K == 1, x's dtype) or float32 partials
    M, N, KG,  # problem size; layout groups along K (K = KG * GROUP)
    stride_xm,  # row stride of x
    stride_wn,  # KG * W, passed apart and specialized (% 16) so row starts are known 16-byte aligned
    SPLIT_K,  # programs along K, each summing a contiguous range of groups
    BITS: tl.constexpr,  # bits per field: 8, 4 or 2
    GROUP: tl.constexpr,  # columns per layout group (the scale group when SCALES == 2)
    OFFSET: tl.constexpr,  # subtracted from every field (the symmetric zero point; 0 with HAS_ZEROS)
    SCALES: tl.constexpr,  # 0 one scale, 1 per output row, 2 per (row, group)
    HAS_ZEROS: tl.constexpr,  # per-(row, group) float zero points
    HAS_BIAS: tl.constexpr,  # add b_ptr (split 0 only)
    BLOCK_M: tl.constexpr,  # activation rows per program (>= 16)
    BLOCK_N: tl.constexpr,  # rows of W per program (>= 16)
    BLOCK_KW: tl.constexpr,  # packed words of each row per step (a multiple of W; exactly W when SCALES == 2)
    EVEN_K: tl.constexpr,  # KG % (groups per step * SPLIT_K) == 0: no bounds checks along K
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 activations, else ignored
):
    VALS: tl.constexpr = 32 // BITS
    W: tl.constexpr = GROUP // VALS
    NG: tl.constexpr = BLOCK_KW // W
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    g_len = tl.cdiv(tl.cdiv(KG, SPLIT_K), NG) * NG
    g_start = pid_k * g_len
    g_end = tl.minimum(g_start + g_len, KG)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_g = tl.arange(0, NG)
    offs_w = tl.arange(0, W)
    offs_k = tl.arange(0, NG * GROUP)  # the step's columns
    rows = tl.where(offs_n < N, offs_n, 0).to(tl.int64)
    m_valid = offs_m < M
    w_tile = w_ptr + rows[:, None, None] * stride_wn + (offs_g[:, None] * W + offs_w[None, :])[None, :, :]
    x_tile = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    # Field i of word (g, w) is column g * GROUP + i * W + w: expanding the words to [BLOCK_N, NG, VALS, W] and
    # flattening gives the step's columns in order, so each step is one tl.dot over NG * GROUP columns.
    shifts = (tl.arange(0, VALS) * BITS)[None, None, :, None]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for g0 in range(g_start, g_end, NG):
        g_valid = (g0 + offs_g) < g_end
        if EVEN_K:
            words = tl.load(w_tile + g0 * W)
            xv = tl.load(x_tile + g0 * GROUP, mask=m_valid[:, None], other=0.0)
        else:
            words = tl.load(w_tile + g0 * W, mask=g_valid[None, :, None], other=0)
            xv = tl.load(x_tile + g0 * GROUP, mask=m_valid[:, None] & (g0 * GROUP + offs_k < g_end * GROUP)[None, :],
                         other=0.0)
        fields = (words[:, :, None, :] >> shifts) & ((1 << BITS) - 1)
        # OR-ing a field into the mantissa of 2**23 gives 2**23 + field exactly (no int-to-float conversion); the
        # codes minus OFFSET are small integers, exact in any activation dtype, so scales and zero points are
        # applied to the product instead of to every value: per group (one group per step) or at the end.
        w = (fields | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)
        w = tl.reshape(w.to(x_ptr.dtype.element_ty), [BLOCK_N, NG * GROUP])
        if SCALES == 2:
            part = tl.dot(w, tl.trans(xv), input_precision=DOT_PRECISION)
            scale = tl.load(s_ptr + rows * KG + g0).to(tl.float32)  # g0 < g_end: one group per step
            if HAS_ZEROS:
                # sum((q - z) * x) = sum(q * x) - z * sum(x)
                zero = tl.load(z_ptr + rows * KG + g0).to(tl.float32)
                part -= zero[:, None] * tl.sum(xv.to(tl.float32), 1)[None, :]
            acc += scale[:, None] * part
        else:
            acc = tl.dot(w, tl.trans(xv), acc, input_precision=DOT_PRECISION)

    if SCALES == 1:
        acc *= tl.load(s_ptr + rows).to(tl.float32)[:, None]
    if SCALES == 0:
        acc *= tl.load(s_ptr).to(tl.float32)
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(b_ptr + rows).to(tl.float32)[:, None]
    out = out_ptr + (pid_k * M + offs_m[None, :]).to(tl.int64) * N + offs_n[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_valid[None, :] & (offs_n < N)[:, None])


def _config(block_n: int, block_kw: int, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config({"BLOCK_N": block_n, "BLOCK_KW": block_kw}, num_warps=num_warps, num_stages=num_stages)


# Autotuning candidates. M == 1: (BLOCK_N, PROGRAMS_PER_SM); BLOCK_KW comes from the shape and the warps from
# BLOCK_KW (see _prune). The best per format on Llama-7B shapes (H200, cold weights, in CUDA graphs): int4 2 rows x
# 6 programs or 4 x 4, int8 8 x 2 or 2 x 3, ternary 4 x 8 or 8 x 4; more rows per thread or more programs than fit
# on an SM at once (64 to 136 registers) lose.
_GEMV_CONFIGS = [triton.Config({"BLOCK_N": n, "PROGRAMS_PER_SM": p}, num_warps=4, num_stages=1)
                 for n, p in ((2, 6), (4, 4), (8, 2), (4, 8), (2, 3), (8, 4))]
# M > 1: the dequantized tile is BLOCK_N x (BLOCK_KW * 32 / BITS) values in registers, so tiles stay near 64 values
# per thread; BLOCK_N >= 64 per 4 warps lets tl.dot use wgmma on sm_90.
_GEMM_SKINNY_CONFIGS = [_config(n, kw, w, s) for n, kw, w, s in ((64, 16, 4, 3), (64, 16, 4, 4), (128, 16, 8, 3),
                                                                 (64, 32, 8, 3), (32, 16, 4, 3), (128, 16, 4, 3),
                                                                 (64, 32, 4, 3), (64, 8, 4, 3), (128, 8, 8, 3))]
_GEMM_WIDE_CONFIGS = [_config(n, kw, w, s) for n, kw, w, s in ((128, 16, 8, 3), (64, 16, 4, 3), (128, 16, 8, 2),
                                                               (64, 32, 8, 3), (128, 8, 8, 3), (64, 8, 4, 3))]
# The interpreter runs one small config per path (autotuning needs a GPU timer); BLOCK_KW grows to one group. The
# M == 1 one runs several tiles per program (_SMS_OFF_GPU programs per split).
_INTERPRETER_GEMV = {"BLOCK_N": 4, "PROGRAMS_PER_SM": 1}
_INTERPRETER_GEMM = {"BLOCK_N": 16, "BLOCK_KW": 16}


def _gemm_shared_bytes(cfg: triton.Config, kwargs: dict, x_bytes: int) -> int:
    """Shared memory a _quant_gemm_kernel config asks for: num_stages - 1 pipelined copies of each step's loads
    (packed words, per-word scales and zeros, and one x tile per field, which is what makes 2-bit tiles large)
    plus the dequantized weight operand of each field's tl.dot. Matches triton 3.6 on sm_90 exactly for the
    configs that overflowed (425984 bytes for ternary BLOCK_M 128, BLOCK_N 128, BLOCK_KW 32, 3 stages)."""
    n, kw = cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_KW"]
    vals = 32 // kwargs["BITS"]
    per_word = 4 * (1 + (kwargs["SCALES"] == 2) + bool(kwargs["HAS_ZEROS"]))  # words, scales, zeros (<= 4 B)
    loads = n * kw * per_word + vals * kwargs["BLOCK_M"] * kw * x_bytes
    return max(cfg.num_stages - 1, 1) * loads + vals * n * kw * 2


def _max_shared_bytes(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """M == 1: the configs with the warps that put 4 words per thread and every warp along BLOCK_KW. M > 1: keep
    the configs that can compile: steps of at least one group (W words), at least 16 words for tl.dot and within
    the device's shared memory, so the autotuner never tries one that cannot launch. Falls back to the smallest
    tile that fits."""
    if "BLOCK_M" not in kwargs:
        warps = min(8, max(1, kwargs["BLOCK_KW"] // 128))
        return [triton.Config(c.kwargs, num_warps=warps, num_stages=1) for c in configs]
    words = kwargs["GROUP"] * kwargs["BITS"] // 32
    configs = _GEMM_SKINNY_CONFIGS if kwargs["BLOCK_M"] <= _MAX_SKINNY_M else _GEMM_WIDE_CONFIGS
    if kwargs["SCALES"] == 2:  # one scale group per step
        unique = {}
        for c in configs:
            c = _config(c.kwargs["BLOCK_N"], words, c.num_warps, c.num_stages)
            unique.setdefault((c.kwargs["BLOCK_N"], c.num_warps, c.num_stages), c)
        configs = list(unique.values())
    x = named_args["x_ptr"]
    limit = _max_shared_bytes(x.device)
    # tl.dot needs K >= 16 columns per step: a group of at least 16 (every allowed group is).
    kept = [c for c in configs if c.kwargs["BLOCK_KW"] >= words
            and _gemm_shared_bytes(c, kwargs, x.element_size()) <= limit]
    if kept:
        return kept
    smallest = _config(16, words, 4, 2)
    if _gemm_shared_bytes(smallest, kwargs, x.element_size()) > limit:
        raise ValueError(f"no quant_linear tile fits {limit} bytes of shared memory for BITS={kwargs['BITS']}, "
                         f"GROUP={kwargs['GROUP']}, BLOCK_M={kwargs['BLOCK_M']}")
    return [smallest]


_FORMAT_KEY = ["N", "KG", "BITS", "GROUP", "SCALES", "HAS_ZEROS", "SPLIT_K"]
_quant_gemv_tuned = triton.autotune(configs=_GEMV_CONFIGS, key=_FORMAT_KEY,
                                    prune_configs_by={"early_config_prune": _prune},
                                    do_bench=_tuning_bench)(_quant_gemv_kernel)
# Tuned per row bucket (BLOCK_M), so prefill chunks of any length share a few tunings.
_quant_gemm_tuned = triton.autotune(configs=_GEMM_SKINNY_CONFIGS + _GEMM_WIDE_CONFIGS, key=_FORMAT_KEY + ["BLOCK_M"],
                                    prune_configs_by={"early_config_prune": _prune},
                                    do_bench=_tuning_bench)(_quant_gemm_kernel)


def _split_k(m: int, n: int, row_bytes: int, device: torch.device) -> int:
    """K splits of the M > 1 kernel."""
    if m > _MAX_SKINNY_M:
        return 1
    sms = sm_count(device) if device.type == "cuda" else _SMS_OFF_GPU
    if n >= _ROWS_PER_SM * sms:
        return 1
    return max(1, min(triton.cdiv(_ROWS_PER_SM * sms, n), row_bytes // _MIN_SPLIT_BYTES))


def _gemv_split_k(n: int, k: int, row_bytes: int, device: torch.device) -> int:
    """K ranges of the M == 1 kernel: rows longer than _GEMV_COLUMNS are split (x must fit in registers), and more
    when N is too small to give every SM its rows."""
    split = triton.cdiv(k, _GEMV_COLUMNS)
    sms = sm_count(device) if device.type == "cuda" else _SMS_OFF_GPU
    if n < _GEMV_ROWS_PER_SM * sms:
        split = max(split, min(triton.cdiv(_GEMV_ROWS_PER_SM * sms, n), row_bytes // _MIN_SPLIT_BYTES))
    return split


def _block_m(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128


def _check(x: torch.Tensor, weight, bias: torch.Tensor | None) -> None:
    if not isinstance(weight, QUANT_WEIGHT_TYPES):
        raise TypeError(f"weight must be an Int8Weight, Int4Weight or TernaryWeight, got {type(weight).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    k, n = weight.in_features, weight.out_features
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must have shape (..., {k}) (weight.in_features), got {tuple(x.shape)}")
    check_tensor("x", x.reshape(-1, k) if x.dim() != 2 else x, (None, k), FLOAT_DTYPES, layout="any")
    if weight.qweight.device != x.device:
        raise ValueError(f"weight must be on {x.device} (x's device), got {weight.qweight.device}")
    if bias is not None:
        check_tensor("bias", bias, (n,), (x.dtype,), x.device, layout="contiguous")


def quant_linear(x: torch.Tensor, weight: Int8Weight | Int4Weight | TernaryWeight,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.dequantize().T (+ bias), with the dequantization fused into the product.

    x [..., K] fp16/bf16 (fp32 allowed), weight an Int8Weight / Int4Weight / TernaryWeight with K = in_features,
    bias [N] x's dtype or None -> [..., N] x's dtype, accumulated in float32. On CUDA (or RINGLET_KERNELS=triton):
    M == 1 streams the packed weight once through FMAs from persistent programs, M > 1 dequantizes tiles into
    tl.dot; K is split through float32 partials for M == 1 rows longer than 4096 columns, and for M <= 16 when N
    alone cannot fill the GPU. Autotuned per shape, format and row bucket on first use, so warm up before CUDA
    graph capture. Act-order int4 weights permute x's columns first (one gather of M x K). On CPU tensors:
    quant_linear_ref.
    """
    _check(x, weight, bias)
    if not use_triton(x):
        return quant_linear_ref(x, weight, bias)
    spec = weight.kernel_spec()
    k, n = weight.in_features, weight.out_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.shape[1] > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    if spec["perm"] is not None:
        x2 = x2.index_select(1, spec["perm"])
    m = x2.shape[0]
    if m == 0 or n == 0:
        return torch.zeros((*lead, n), dtype=x.dtype, device=x.device)
    bits, group = spec["bits"], spec["group"]
    kg = k // group
    words = group * bits // 32
    if m == 1:
        split_k = _gemv_split_k(n, k, k * bits // 8, x.device)
    else:
        split_k = _split_k(m, n, k * bits // 8, x.device)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    partial = out if split_k == 1 else torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    zeros = spec["zeros"]
    meta = {"BITS": bits, "GROUP": group, "OFFSET": spec["offset"], "SCALES": spec["scale_kind"],
            "HAS_ZEROS": zeros is not None, "HAS_BIAS": bias is not None, "SPLIT_K": split_k}
    args = (spec["qweight"], spec["scales"], zeros, bias, partial)
    if m == 1:
        meta["BLOCK_KW"] = triton.next_power_of_2(triton.cdiv(kg, split_k) * words)
        sms = sm_count(x.device) if x.is_cuda else _SMS_OFF_GPU

        def grid(cfg: dict) -> tuple[int]:
            # Persistent: PROGRAMS_PER_SM per SM in all (never more than there are tiles), a multiple of SPLIT_K.
            per_split = max(1, min(triton.cdiv(n, cfg["BLOCK_N"]), cfg["PROGRAMS_PER_SM"] * sms // split_k))
            return (per_split * split_k,)

        if x.is_cuda:
            _quant_gemv_tuned[grid](x2, *args, n, kg, kg * words, **meta)
        else:
            _quant_gemv_kernel[grid](x2, *args, n, kg, kg * words, **meta, **_INTERPRETER_GEMV)
    else:
        block_m = _block_m(m)
        meta.update(BLOCK_M=block_m, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32")

        def grid(cfg: dict) -> tuple[int, int, int]:
            return triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, block_m), split_k

        if x.is_cuda:
            _quant_gemm_tuned[grid](x2, *args, m, n, kg, x2.stride(0), kg * words, **meta)
        else:
            _quant_gemm_kernel[grid](x2, *args, m, n, kg, x2.stride(0), kg * words, **meta,
                                     BLOCK_N=_INTERPRETER_GEMM["BLOCK_N"],
                                     BLOCK_KW=words if spec["scale_kind"] == SCALE_GROUP
                                     else max(_INTERPRETER_GEMM["BLOCK_KW"], words))
    if split_k > 1:
        _sum_splits_kernel[(triton.cdiv(m * n, 1024),)](partial, out, m * n, SPLIT_K=split_k, BLOCK=1024)
    return out.view(*lead, n)


def quant_linear_ref(x: torch.Tensor, weight: Int8Weight | Int4Weight | TernaryWeight,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference for `quant_linear`: x @ weight.dequantize().T (+ bias) in float32, cast to x's dtype."""
    out = x.float() @ weight.dequantize(torch.float32).T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
