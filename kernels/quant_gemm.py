"""Weight-only quantized linear layers: fused dequantize + GEMV / GEMM over int8, int4 and ternary weights.

One launcher for every batch size. M == 1: `_quant_gemv_kernel`, a persistent kernel (as many programs as fit on
the GPU at once): each program owns one range of K (the whole row up to _GEMV_COLUMNS columns, else a split of it),
covered by KCHUNKS chunks of BLOCK_KW words, converts and pre-scales that slice of x once, then streams tiles of
BLOCK_N rows through FMAs, loading the next tile's words while it computes on the current one.
M > 1: `_quant_gemm_kernel`: per step of one layout group (or of 16 words), each field of the [words, BLOCK_N] tile
is by itself a K x N right operand of one tl.dot against the matching columns of x (the activation rows are the
MMA's 16-row side), so the words go from shared memory straight into the MMA operand registers and no tile is
reshaped; group scales and zero points apply to each group's product. Decode batches (M <= 16) split K inside the
one launch (the last program of a tile sums the partials in a fixed order). The packing is described in
kernels/quant_formats.py.

Fields become floats without an int-to-float conversion (16 per SM per clock on sm_80/sm_90, too few to keep up
with HBM at 4 bits). M > 1 on a GPU: a few PTX instructions per two values (see _dequant_asm) put a field into the
mantissa of a power of two in fp16/bf16, two neighbouring words' fields per 32-bit register; in plain Triton (the
interpreter, float32 activations) OR-ing a field into the mantissa of 2**23 gives the float 2**23 + field exactly.
M == 1: a masked field is read as a float32 denormal (see _X_EXP), one AND per value and no subtraction.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_tensor
from ._dispatch import sm_count, use_triton
from .gemv import _sum_splits_kernel, _tuning_bench
from .quant_formats import QUANT_WEIGHT_TYPES, Int4Weight, Int8Weight, TernaryWeight

# M == 1: the columns one program covers. Its slice of x stays in registers, pre-scaled, for every tile it streams:
# K / (32 * num_warps) floats per thread, so longer rows are split across programs (at 8 warps, 64 floats). A split
# costs a second launch to sum the partials: Llama-7B's w2 (K = 11008) in one launch of 3 chunks against 3 splits
# (H200, 2026-11-27): int8 13.9 against 15.5 us, ternary 10.6 against 11.6, but int4 12.6 against 12.1 (asym 14.2
# against 13.1), whose chunks then fit only as 8-byte loads by 8 warps (2 programs of about 128 registers per SM;
# see _GEMV_X_FLOATS for what changed that).
_GEMV_COLUMNS = 16384
# M == 1: the most floats of x a thread keeps (more cost the occupancy that keeps loads in flight), and the most
# padding a layout may add past a program's K range (its FMAs are wasted). 96 rather than 64 lets K = 11008 take
# 16-byte loads by 4 warps (3 chunks): Llama-7B's w2 at batch 1, H200 (2026-11-28, the autotuner choosing among
# the layouts either limit allows), int4 asymmetric 14.3 -> 12.9 us, ternary 10.5 -> 10.1 us, the other shapes and
# formats within 0.3 us; 128 measured the same as 96 (quant_gemm-H200-2026-11-28-x64.json / -x96.json).
_GEMV_X_FLOATS = 96
_GEMV_MAX_PAD = 1 / 8
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


@triton.jit
def _gemv_load(ptrs, ok, in_k, EVEN_K: tl.constexpr):
    """A [K, BLOCK_N] tile of _quant_gemv_kernel, masked by `ok` per row and, unless EVEN_K, by `in_k` along K
    (reading 0 there, so padding adds nothing)."""
    if EVEN_K:
        return tl.load(ptrs, mask=ok[None, :])
    else:
        return tl.load(ptrs, mask=ok[None, :] & in_k[:, None], other=0)


@triton.jit
def _gemv_load_t(ptrs, ok, in_k, EVEN_K: tl.constexpr):
    """_gemv_load of a tile addressed as [BLOCK_N, NSLOT], transposed. Triton then gives the load a layout with
    the rows across threads, and moves each tile's slot sums there (one shared-memory transpose) to meet it, so
    the sums over K cost 5 rather than 20 shuffles per thread for 4 rows (SASS, sm_90)."""
    if EVEN_K:
        return tl.trans(tl.load(ptrs, mask=ok[:, None]))
    else:
        return tl.trans(tl.load(ptrs, mask=ok[:, None] & in_k[None, :], other=0))


@triton.jit
def _gemv_tile_loads(w_rows, w_tile, s_ptr, z_ptr, s_rows, s_tile, ok, g_start, g_end, kw, slot,
                     W: tl.constexpr, VEC: tl.constexpr, BLOCK_KW: tl.constexpr, KCHUNKS: tl.constexpr,
                     SCALES: tl.constexpr, HAS_ZEROS: tl.constexpr, EVEN_K: tl.constexpr):
    """One tile of _quant_gemv_kernel, chunk by chunk: its packed words (KCHUNKS [BLOCK_KW, BLOCK_N] tiles) and,
    for group scales (SCALES == 2), its scales and zero points (KCHUNKS [NSLOT, BLOCK_N] tiles each; empty tuples
    where there are none). w_rows + w_tile and s_rows + s_tile (into s_ptr and z_ptr) address the first chunk;
    rows where `ok` is False read nothing."""
    CHUNK_GROUPS: tl.constexpr = BLOCK_KW // W
    words = ()
    for c in tl.static_range(KCHUNKS):
        in_k = g_start + c * CHUNK_GROUPS + kw // W < g_end
        words = words + (_gemv_load(w_rows + w_tile + c * BLOCK_KW, ok, in_k, EVEN_K),)
    scales = ()
    zeros = ()
    if SCALES == 2:
        for c in tl.static_range(KCHUNKS):
            s_in_k = g_start + c * CHUNK_GROUPS + slot // (W // VEC) < g_end
            scales = scales + (_gemv_load_t(s_ptr + s_rows + s_tile + c * CHUNK_GROUPS, ok, s_in_k, EVEN_K),)
            if HAS_ZEROS:
                zeros = zeros + (_gemv_load_t(z_ptr + s_rows + s_tile + c * CHUNK_GROUPS, ok, s_in_k, EVEN_K),)
    return words, scales, zeros


def _gemv_even_k(args: dict) -> bool:
    """Every program's K range is exactly KCHUNKS * BLOCK_KW words: no bounds checks along K."""
    words = args["GROUP"] * args["BITS"] // 32
    return (args["KG"] % args["SPLIT_K"] == 0
            and args["KG"] // args["SPLIT_K"] * words == args["KCHUNKS"] * args["BLOCK_KW"])


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
    stride_wn,  # KG * W, passed apart and specialized (% 16) so row starts are known 16-byte aligned
    SPLIT_K,  # K ranges; program p sums range p % SPLIT_K (the grid is a multiple of SPLIT_K)
    BITS: tl.constexpr,  # bits per field: 8, 4 or 2
    GROUP: tl.constexpr,  # columns per layout group (the scale group when SCALES == 2)
    OFFSET: tl.constexpr,  # subtracted from every field (the symmetric zero point; 0 with HAS_ZEROS)
    SCALES: tl.constexpr,  # 0 one scale, 1 per output row, 2 per (row, group)
    HAS_ZEROS: tl.constexpr,  # per-(row, group) float zero points
    HAS_BIAS: tl.constexpr,  # add b_ptr (split 0 only)
    BLOCK_N: tl.constexpr,  # rows of W per tile
    VEC: tl.constexpr,  # packed words per load (4: 16 bytes), all in one layout group
    BLOCK_KW: tl.constexpr,  # words per chunk of a row: VEC per thread (32 * num_warps * VEC)
    KCHUNKS: tl.constexpr,  # chunks covering a program's K range (the last one masked unless EVEN_K)
    EVEN_K: tl.constexpr,  # every K range is exactly KCHUNKS * BLOCK_KW words: no bounds checks along K
):
    VALS: tl.constexpr = 32 // BITS  # fields per word
    W: tl.constexpr = GROUP // VALS  # words per group
    NSLOT: tl.constexpr = BLOCK_KW // VEC  # slots of VEC words along a chunk; slot j lies in group j // (W // VEC)
    CHUNK_GROUPS: tl.constexpr = BLOCK_KW // W
    pid = tl.program_id(0)
    pid_k = pid % SPLIT_K
    tile_step = tl.num_programs(0) // SPLIT_K
    g_share = tl.cdiv(KG, SPLIT_K)
    g_start = pid_k * g_share
    g_end = tl.minimum(g_start + g_share, KG)
    offs_n = tl.arange(0, BLOCK_N)
    kw = tl.arange(0, BLOCK_KW)
    slot = tl.arange(0, NSLOT)
    row0 = pid // SPLIT_K * BLOCK_N
    row_step = tile_step * BLOCK_N
    # Tiles are [BLOCK_KW, BLOCK_N] per chunk, K first: Triton then puts VEC words per thread (the contiguity
    # max_contiguous allows) and threads, then warps, along K, with the rows in registers, for any VEC (with K
    # second, VEC == 1 tied with the rows and Triton spread the rows across threads). A thread's columns are the
    # same for every row and tile, so its slice of x stays in registers; pointers advance by a fixed step. The
    # hints sit where the offsets are computed: put on a helper's argument, Triton dropped them (VEC was ignored).
    w_rows = w_ptr + row0.to(tl.int64) * stride_wn  # advanced by w_step per tile
    w_step = row_step.to(tl.int64) * stride_wn
    w_tile = tl.max_contiguous(tl.multiple_of(g_start * W + kw, VEC), VEC)[:, None] + (offs_n * stride_wn)[None, :]
    # Group scales and zero points (SCALES == 2) advance the same way; unused otherwise.
    s_rows = row0.to(tl.int64) * KG
    s_step = row_step.to(tl.int64) * KG
    s_tile = (offs_n * KG)[:, None] + g_start + (slot // (W // VEC))[None, :]
    # The first tile's words and scales are requested with x, not after x is converted (which waits for x's load):
    # the two waits overlap, and the words come from HBM, the longer one.
    next_words, next_scale, next_zero = _gemv_tile_loads(
        w_rows, w_tile, s_ptr, z_ptr, s_rows, s_tile, row0 + offs_n < N, g_start, g_end, kw, slot, W, VEC,
        BLOCK_KW, KCHUNKS, SCALES, HAS_ZEROS, EVEN_K)
    if SCALES == 0:
        tensor_scale = tl.load(s_ptr).to(tl.float32) * _PRODUCT_SCALE
    if HAS_BIAS:
        first_split = offs_n * 0 + pid_k == 0  # a vector: the interpreter refuses a mask made of a program id alone
    # x, converted and pre-scaled once per program: field i of word kw of chunk c multiplies column
    # (g_start + c * CHUNK_GROUPS + kw // W) * GROUP + i * W + kw % W, times 2**(X_EXP - P) (see _scaled_x).
    # Loaded as [BLOCK_KW, 1] tiles, so they take the words' layout: loaded 1-D, each field went through a
    # shared-memory layout change with two barriers, serializing the 8 to 16 loads (about 2 us per launch, H200).
    xs = ()
    x_terms = ()
    for c in tl.static_range(KCHUNKS):
        x_col = (g_start + c * CHUNK_GROUPS + kw // W) * GROUP + kw % W
        x_col = x_ptr + tl.max_contiguous(tl.multiple_of(x_col, VEC), VEC)[:, None]
        x_in_k = (g_start + c * CHUNK_GROUPS + kw // W < g_end)[:, None]
        x_sum = tl.zeros([BLOCK_KW, 1], dtype=tl.float32)
        x_chunk = ()
        for i in tl.static_range(VALS):
            if EVEN_K:
                xv = tl.load(x_col + i * W).to(tl.float32)
            else:
                xv = tl.load(x_col + i * W, mask=x_in_k, other=0.0).to(tl.float32)
            x_sum += xv
            x_chunk = x_chunk + (_scaled_x(xv, i, BITS, _X_EXP),)
        xs = xs + (x_chunk,)
        if HAS_ZEROS:
            # sum((q - z) * x) = sum(q * x) - z * sum(x): per slot, times 2**-49 like the products.
            x_terms = x_terms + (tl.sum(tl.reshape(x_sum, [NSLOT, VEC, 1]), 1) * _INV_PRODUCT_SCALE,)
        else:
            # -OFFSET * (the sum of the word's columns of x) starts each word's FMA chain: no per-tile cost.
            x_terms = x_terms + (x_sum * (-OFFSET * _INV_PRODUCT_SCALE),)

    # Persistent (the grid holds what fits on the GPU at once): tiles pid // SPLIT_K, + tile_step, ...; each
    # iteration requests the next tile's words (and scales) before its math, so every warp keeps a tile in flight
    # while it computes. Scales are converted where used, a tile after their load: int4 on the Llama-7B shapes
    # 12.5 -> 10.7 us (wqkv) (H200, 2026-11-27).
    for row_start in range(row0, N, row_step):
        words = next_words
        scale = next_scale
        zero = next_zero
        rows = row_start + offs_n
        if SCALES == 1:
            row_scale = tl.load(s_ptr + rows, mask=rows < N)
        if HAS_BIAS:
            bias = tl.load(b_ptr + rows, mask=(rows < N) & first_split, other=0.0)
        w_rows += w_step
        s_rows += s_step
        next_words, next_scale, next_zero = _gemv_tile_loads(
            w_rows, w_tile, s_ptr, z_ptr, s_rows, s_tile, rows + row_step < N, g_start, g_end, kw, slot, W,
            VEC, BLOCK_KW, KCHUNKS, SCALES, HAS_ZEROS, EVEN_K)
        # sum_i field_i * x_i per word (times 2**-49, see _X_EXP), one FMA chain per word.
        if SCALES == 2:
            # Group scales: each chunk's chains are summed per slot (VEC words of one group), less the zero
            # point's share, and scaled.
            acc = tl.zeros([NSLOT, BLOCK_N], dtype=tl.float32)
            for c in tl.static_range(KCHUNKS):
                if HAS_ZEROS:
                    part = _denormal_field(words[c], 0, BITS) * xs[c][0]
                else:
                    part = _denormal_field(words[c], 0, BITS) * xs[c][0] + x_terms[c]
                for i in tl.static_range(1, VALS):
                    part += _denormal_field(words[c], i, BITS) * xs[c][i]
                part = tl.sum(tl.reshape(part, [NSLOT, VEC, BLOCK_N]), 1)
                if HAS_ZEROS:
                    part -= zero[c].to(tl.float32) * x_terms[c]
                acc += part * scale[c].to(tl.float32)
            out = tl.sum(acc, 0) * _PRODUCT_SCALE
        else:
            # One scale for the whole row: the chains run on through every chunk.
            acc = _denormal_field(words[0], 0, BITS) * xs[0][0] + x_terms[0]
            for c in tl.static_range(KCHUNKS):
                if c > 0:
                    acc += x_terms[c]
                for i in tl.static_range(1 if c == 0 else 0, VALS):
                    acc += _denormal_field(words[c], i, BITS) * xs[c][i]
            out = tl.sum(acc, 0)
            if SCALES == 1:
                out *= row_scale.to(tl.float32) * _PRODUCT_SCALE
            else:
                out *= tensor_scale
        if HAS_BIAS:
            out += bias.to(tl.float32)
        tl.store(out_ptr + pid_k * N + rows, out.to(out_ptr.dtype.element_ty), mask=rows < N)


def _half_pair(value: float, dtype: torch.dtype) -> str:
    """Two copies of `value` (exactly representable) as one fp16x2 / bf16x2 PTX constant."""
    bits = int(torch.tensor([value], dtype=dtype).view(torch.int16).item()) & 0xFFFF
    return f"0x{bits:04X}{bits:04X}"


@functools.cache
def _dequant_asm(bits: int, dtype: torch.dtype, offset: int) -> str:
    """PTX for `_fields`: operands $VALS and $VALS + 1 are two packed words, neighbours along K in tl.dot's operand
    registers; output $i (i < VALS = 32 // bits) holds field i of both minus `offset` as two fp16 / bf16 (the low
    half from the first word): one register of the dot operand as it stands, so nothing is repacked after.

    A PRMT gathers byte b of both words into bytes 0 and 2; per field, a LOP3 keeps the field of each half and ORs
    in the exponent of a power of two whose mantissa then reads it (1024 + f in fp16; 128 + f in bf16, whose 7
    mantissa bits take fields at bits 0-5 only, so higher ones are shifted down first), and one packed FMA removes
    that power of two and the offset, scaling a field read in place back down. All of it is exact."""
    vals = 32 // bits
    first, second = f"${vals}", f"${vals + 1}"
    half = "bf16x2" if dtype == torch.bfloat16 else "f16x2"
    consts: dict[str, str] = {}  # value -> register name

    def const(value: str) -> str:
        return consts.setdefault(value, f"k{len(consts)}")

    body = []
    if bits == 8 and dtype == torch.bfloat16:
        # The code byte - 128 has 8 significant bits, bf16's precision: 128 + (byte & 127) is read in place, and
        # 256 or 128 (as the top bit is 0 or 1: one XOR of that bit into 256's pattern) subtracted.
        low, high = const("0x43004300"), const("0x43804380")
        low_mask, high_mask, minus_one = const("0x007F007F"), const("0x00800080"), const(_half_pair(-1.0, dtype))
        for i in range(4):
            body += [f"prmt.b32 t, {first}, {second}, 0x{(4 + i) << 8 | i:04X};",
                     f"lop3.b32 u, t, {low_mask}, {low}, 0xEA;",  # (t & low_mask) | low
                     f"lop3.b32 t, t, {high_mask}, {high}, 0x6A;",  # (t & high_mask) ^ high
                     f"fma.rn.{half} ${i}, t, {minus_one}, u;"]
    else:
        exponent = const("0x43004300" if dtype == torch.bfloat16 else "0x64006400")
        power = 128.0 if dtype == torch.bfloat16 else 1024.0
        per_byte = 8 // bits
        for byte in range(4):
            body.append(f"prmt.b32 t, {first}, {second}, 0x{(4 + byte) << 8 | byte:04X};")
            for j in range(per_byte):
                at = bits * j  # the field's bit within each byte
                if dtype == torch.bfloat16 and at + bits > 6:  # only a byte's top field: shift the byte down
                    body.append(f"shr.b32 t, t, {at};")
                    at = 0
                mask = const(f"0x{((1 << bits) - 1) * 0x00010001 << at:08X}")
                scale = const(_half_pair(2.0 ** -at, dtype))
                shift = const(_half_pair(-(power / 2 ** at + offset), dtype))
                body += [f"lop3.b32 u, t, {mask}, {exponent}, 0xEA;",  # (t & mask) | exponent
                         f"fma.rn.{half} ${byte * per_byte + j}, u, {scale}, {shift};"]
    decl = [f".reg .b32 t, u, {', '.join(consts.values())};"]
    decl += [f"mov.b32 {name}, {value};" for value, name in consts.items()]
    return "{\n" + "\n".join(decl + body) + "\n}"


@triton.jit
def _fields(words, DEQUANT_ASM: tl.constexpr, BITS: tl.constexpr, x_ptr):
    """Every field of int32 `words` minus the format's offset, in x's dtype (fp16/bf16): a tuple of 32 // BITS
    tensors shaped like `words`, from the PTX of _dequant_asm, two words per instance."""
    dt = x_ptr.dtype.element_ty
    if BITS == 8:
        return tl.inline_asm_elementwise(DEQUANT_ASM, "=r,=r,=r,=r,r,r", [words], (dt, dt, dt, dt), True, 2)
    elif BITS == 4:
        return tl.inline_asm_elementwise(DEQUANT_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [words],
                                         (dt, dt, dt, dt, dt, dt, dt, dt), True, 2)
    else:
        return tl.inline_asm_elementwise(DEQUANT_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,=r,r,r",
                                         [words], (dt, dt, dt, dt, dt, dt, dt, dt, dt, dt, dt, dt, dt, dt, dt, dt),
                                         True, 2)


@triton.jit
def _field(words, i: tl.constexpr, BITS: tl.constexpr, OFFSET: tl.constexpr, DT: tl.constexpr):
    """Field i of int32 `words` minus OFFSET, in DT, in plain Triton (the interpreter, float32 activations): OR-ing
    the field into the mantissa of 2**23 gives the float 2**23 + field exactly."""
    fields = (words >> (BITS * i)) & ((1 << BITS) - 1)
    return ((fields | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)).to(DT)


@triton.heuristics({"EVEN_K": lambda args: args["KG"] % args["NG"] == 0})
@triton.jit(do_not_specialize=["M", "N", "KG"])  # see _LOOP_BOUNDS (SPLIT_K is a constexpr here)
def _quant_gemm_kernel(
    x_ptr,  # [M, K] activations, last dim contiguous, in the weight's storage column order
    w_ptr,  # [N, KG * W] int32 packed weight (kernels/quant_formats.py)
    s_ptr,  # scales: [N, KG] (SCALES == 2), [N] (1) or [1] (0)
    z_ptr,  # [N, KG] zero points, read only when HAS_ZEROS
    b_ptr,  # [N] bias, read only when HAS_BIAS
    out_ptr,  # [M, N] contiguous output, x's dtype
    part_ptr,  # [SPLIT_K, M, N] float32 partial sums, used only when SPLIT_K > 1
    count_ptr,  # int32 per output tile: programs of the tile done so far; zero between launches (SPLIT_K > 1)
    M, N, KG,  # problem size; layout groups along K (K = KG * GROUP)
    stride_xm,  # row stride of x
    stride_wn,  # KG * W, passed apart and specialized (% 16) so row starts are known 16-byte aligned
    BITS: tl.constexpr,  # bits per field: 8, 4 or 2
    GROUP: tl.constexpr,  # columns per layout group (the scale group when SCALES == 2)
    OFFSET: tl.constexpr,  # subtracted from every field (the symmetric zero point; 0 with HAS_ZEROS)
    SCALES: tl.constexpr,  # 0 one scale, 1 per output row, 2 per (row, group)
    HAS_ZEROS: tl.constexpr,  # per-(row, group) float zero points
    HAS_BIAS: tl.constexpr,  # add b_ptr once
    BLOCK_M: tl.constexpr,  # activation rows per program (>= 16)
    BLOCK_N: tl.constexpr,  # rows of W per program (>= 16)
    SPLIT_K: tl.constexpr,  # programs along K (grid axis 2), each summing a contiguous range of steps
    NG: tl.constexpr,  # layout groups per step: 1, or as many as make 16 words (tl.dot's smallest K)
    EVEN_K: tl.constexpr,  # KG % NG == 0: every step is whole, no bounds checks along K
    DEQUANT_ASM: tl.constexpr,  # PTX of _fields (fp16/bf16 on a GPU), or "" for _field
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 activations, else ignored
):
    VALS: tl.constexpr = 32 // BITS
    W: tl.constexpr = GROUP // VALS
    SW: tl.constexpr = NG * W  # words of a row per step
    # Group scales multiply each group's product (exact, and 2 FMAs per output per group) when a step is one
    # group; smaller groups (16 words span several) scale every weight value instead.
    GROUP_SCALED: tl.constexpr = SCALES == 2 and NG == 1
    VALUE_SCALED: tl.constexpr = SCALES == 2 and NG > 1
    DT: tl.constexpr = x_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    split_steps = tl.cdiv(tl.cdiv(KG, NG), SPLIT_K)
    g_start = pid_k * split_steps * NG
    g_end = tl.minimum(g_start + split_steps * NG, KG)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.where(offs_n < N, offs_n, 0).to(tl.int64)
    m_valid = offs_m < M
    j = tl.arange(0, SW)
    # The weight is tl.dot's right operand, transposed to [SW, BLOCK_N] (K x N): field i of every word is then a
    # K x N operand by itself, computed elementwise, so Triton loads the words straight into the dot operand's
    # registers (neighbouring words along K in one thread, as _fields pairs them) with no layout change, and the
    # few activation rows are the MMA's M side (16 with mma.sync, against 64 with wgmma). Field i of word j of a
    # step from group g0 is column (g0 + j // W) * GROUP + i * W + j % W, so x is read per field at those columns.
    w_tile = w_ptr + rows[None, :] * stride_wn + j[:, None]
    x_tile = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + ((j // W) * GROUP + j % W)[None, :]
    # Everything read outside the pipelined loads is read early and converted only where used, so that no
    # conversion waits out a load (as in _quant_gemv_kernel, where it paid; here it measured within noise).
    if SCALES == 1:
        row_scale = tl.load(s_ptr + rows)
    if SCALES == 0:
        row_scale = tl.load(s_ptr)
    if HAS_BIAS:
        bias = tl.load(b_ptr + rows)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if GROUP_SCALED:
        # Each group's scales (and zeros) are loaded a step ahead, 2-byte reads, one per row.
        g_first = tl.minimum(g_start, KG - 1)  # an empty K range loads a scale it never uses
        scale = tl.load(s_ptr + rows * KG + g_first)
        if HAS_ZEROS:
            zero = tl.load(z_ptr + rows * KG + g_first)
    for g0 in range(g_start, g_end, NG):
        if EVEN_K:
            words = tl.load(w_tile + g0 * W)
            k_valid = m_valid[:, None]
        else:
            in_k = (g0 + j // W) < g_end
            words = tl.load(w_tile + g0 * W, mask=in_k[:, None], other=0)
            k_valid = m_valid[:, None] & in_k[None, :]
        if GROUP_SCALED:
            g_next = tl.minimum(g0 + 1, KG - 1)
            next_scale = tl.load(s_ptr + rows * KG + g_next)
            if HAS_ZEROS:
                next_zero = tl.load(z_ptr + rows * KG + g_next)
                x_group = tl.zeros([BLOCK_M, SW], dtype=tl.float32)
            part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if VALUE_SCALED:
            groups = rows[None, :] * KG + (g0 + j // W)[:, None]
            if EVEN_K:
                value_scale = tl.load(s_ptr + groups).to(tl.float32)
            else:
                value_scale = tl.load(s_ptr + groups, mask=in_k[:, None], other=0.0).to(tl.float32)
            if HAS_ZEROS:
                if EVEN_K:
                    value_zero = tl.load(z_ptr + groups).to(tl.float32)
                else:
                    value_zero = tl.load(z_ptr + groups, mask=in_k[:, None], other=0.0).to(tl.float32)
        if DEQUANT_ASM != "":
            fields = _fields(words, DEQUANT_ASM, BITS, x_ptr)
        for i in tl.static_range(VALS):
            xv = tl.load(x_tile + g0 * GROUP + i * W, mask=k_valid, other=0.0)
            if DEQUANT_ASM != "":
                wv = fields[i]
            else:
                wv = _field(words, i, BITS, OFFSET, DT)
            if VALUE_SCALED:
                if HAS_ZEROS:
                    wv = ((wv.to(tl.float32) - value_zero) * value_scale).to(DT)
                else:
                    wv = (wv.to(tl.float32) * value_scale).to(DT)
            if GROUP_SCALED:
                part = tl.dot(xv, wv, part, input_precision=DOT_PRECISION)
                if HAS_ZEROS:
                    x_group += xv.to(tl.float32)
            else:
                acc = tl.dot(xv, wv, acc, input_precision=DOT_PRECISION)
        if GROUP_SCALED:
            if HAS_ZEROS:
                # sum((q - z) * x) = sum(q * x) - z * sum(x), with x summed over the fields first (one
                # reduction across threads per group)
                part -= tl.sum(x_group, 1)[:, None] * zero.to(tl.float32)[None, :]
                zero = next_zero
            acc += part * scale.to(tl.float32)[None, :]
            scale = next_scale

    if SCALES < 2:
        acc *= row_scale.to(tl.float32)
    out_offs = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    out_mask = m_valid[:, None] & (offs_n < N)[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += bias.to(tl.float32)[None, :]
        tl.store(out_ptr + out_offs, acc.to(DT), mask=out_mask)
    else:
        # Split K in one launch: each program stores its partial sums; the last of a tile to arrive (counted
        # after a barrier, so every thread's stores are released with the count) adds the tile's partials in
        # split order, so the result does not depend on arrival order, and re-arms the count for the next launch.
        tile_offs = offs_m[:, None] * N + offs_n[None, :]  # int32: split-K runs only for M <= 16
        tl.store(part_ptr + pid_k * M * N + tile_offs, acc, mask=out_mask)
        tl.debug_barrier()
        tile = pid_m * tl.num_programs(0) + pid_n
        if tl.atomic_add(count_ptr + tile, 1, sem="acq_rel") == SPLIT_K - 1:
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            # One partial in flight at a time: all SPLIT_K at once would raise the whole kernel's register count
            # (95 to 194 per thread at 8 splits, ptxas for sm_90), which the main loop's occupancy pays for.
            for split in range(tl.num_programs(2)):  # == SPLIT_K, but a loop the compiler keeps
                total += tl.load(part_ptr + split * M * N + tile_offs, mask=out_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += bias.to(tl.float32)[None, :]
            tl.store(out_ptr + out_offs, total.to(DT), mask=out_mask)
            tl.atomic_xchg(count_ptr + tile, 0)


def _config(block_n: int, split_k: int | None, num_warps: int, num_stages: int) -> triton.Config:
    kwargs = {"BLOCK_N": block_n} if split_k is None else {"BLOCK_N": block_n, "SPLIT_K": split_k}
    return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)


# Autotuning candidates. M == 1: (BLOCK_N, VEC, num_warps); _prune keeps the layouts that suit the shape and adds
# their K chunking, and the grid holds as many programs as fit on the GPU (_gemv_resident). Chosen on the Llama-7B
# shapes (H200, 2026-11-27): int4 8 rows x 4 warps (wqkv, w13) or 2 x 4 (wo), ternary 8 x 2, int8 2 to 4 rows of
# 2 chunks x 4 warps or 1 x 8; K = 11008 in 3 chunks by 8 warps (int4 8-byte, ternary 4-byte, int8 16-byte loads).
_GEMV_CONFIGS = [triton.Config({"BLOCK_N": n, "VEC": v}, num_warps=w, num_stages=1)
                 for v in (4, 2, 1) for w in (2, 4, 8) for n in (2, 4, 8)]
# M in 2..16: BLOCK_N 128 or 64 with 4 warps, 3 or 4 stages, K in 1 to 8 splits. Tuned on the Llama-7B shapes at
# M = 16 (H200, 2026-11-27): int4 and ternary take 128 rows, int8 64, with K split 2 to 8 ways (the most where
# N = 4096); 8 warps ran 2 to 6x slower (a [16, 16] x tile then gives a thread one value, too little for an
# asynchronous copy). What bounds it (ncu, same day): issue latency, not memory. Each warp issues every 3.4 cycles
# (dependent dequantize -> MMA chains) and only 1 to 3 warps per scheduler are resident (95 to 110 registers), so
# wqkv reads 1.5 TB/s at 25% occupancy; more warps per SM or fewer instructions per value is the next step.
# Tried and dropped (H100, 2026-11-27, Llama-7B shapes at M = 16, int4 g128 sym against cuBLAS): the weights as
# wgmma's register operand (x^T from shared memory, 96 registers) 2.00x against this kernel's 2.02x, ncu showing
# the same 2.6 warps per scheduler and 6.4 cycles per issued instruction; a persistent version keeping x's slice in
# shared memory and streaming row tiles 1.48x (Triton waits on every wgmma it issues outside a loop).
_GEMM_SKINNY_CONFIGS = [_config(n, s, 4, st) for n in (128, 64) for st in (3, 4) for s in (1, 2, 4, 8)]
# M > 16 (prefill tiles, BLOCK_M 32..128): (BLOCK_N, warps, stages) that compile for sm_90 without spilling (mma.sync
# below 64 rows, wgmma with the fields staged in shared memory from 64; 128 x 128 spills 32 bytes). Not timed
# against each other: prefill is not what these kernels are measured on.
_GEMM_WIDE_CONFIGS = [_config(n, None, w, st) for n, w, st in ((64, 4, 3), (128, 8, 3), (64, 8, 3), (32, 4, 3))]
# The interpreter runs one small config per path (autotuning needs a GPU timer). The M == 1 one runs several tiles
# per program (_SMS_OFF_GPU programs per split) and chunks of 64 words (one warp of 2-word loads), so tests reach
# several chunks and a padded last one; M <= 16 splits K up to 3 ways, so tests reach the split path.
_INTERPRETER_GEMV = {"BLOCK_N": 4, "VEC": 2}
_INTERPRETER_GEMM = {"BLOCK_N": 16, "SPLIT_K": 3}


def _gemm_shared_bytes(cfg: triton.Config, kwargs: dict, x_bytes: int) -> int:
    """An upper bound on the shared memory of a _quant_gemm_kernel config: num_stages copies of each step's loads
    (the packed words, one x tile per field, per-value scales and zeros) and, for BLOCK_M >= 64 (wgmma, whose
    right operand lives in shared memory), the dequantized fields. Triton 3.6 on sm_90 asked for 25088 bytes where
    this says 36864 (int4, BLOCK_N 128, 3 stages) and 237568 for 241664 (ternary, BLOCK_M 128, BLOCK_N 64)."""
    n, words = cfg.kwargs["BLOCK_N"], kwargs["NG"] * kwargs["GROUP"] * kwargs["BITS"] // 32
    vals = 32 // kwargs["BITS"]
    per_word = 4 * (1 + (kwargs["SCALES"] == 2 and kwargs["NG"] > 1) * (1 + bool(kwargs["HAS_ZEROS"])))
    loads = n * words * per_word + vals * kwargs["BLOCK_M"] * words * x_bytes
    return cfg.num_stages * loads + (kwargs["BLOCK_M"] >= 64) * vals * n * words * x_bytes


def _max_shared_bytes(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def _gemv_layout(kg: int, split_k: int, bits: int, group: int, warps: int, vec: int) -> dict:
    """How num_warps threads loading `vec` words each cover a program's K range (ceil(KG / SPLIT_K) groups): the
    M == 1 kernel's VEC, BLOCK_KW and KCHUNKS."""
    w = group * bits // 32
    vec = min(vec, w)
    block_kw = 32 * warps * vec
    return {"VEC": vec, "BLOCK_KW": block_kw, "KCHUNKS": triton.cdiv(triton.cdiv(kg, split_k) * w, block_kw)}


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """M == 1: each config with its K layout (see _gemv_layout), keeping those whose x slice fits _GEMV_X_FLOATS
    per thread and whose padding past the K range is at most _GEMV_MAX_PAD (else the least padded). M > 1: the
    configs within the device's shared memory whose K splits each get a step (falling back to the smallest tile),
    so the autotuner never tries one that cannot launch or that leaves programs idle."""
    if "BLOCK_M" not in kwargs:
        kg, split_k, bits, group = named_args["KG"], named_args["SPLIT_K"], kwargs["BITS"], kwargs["GROUP"]
        words = triton.cdiv(kg, split_k) * group * bits // 32
        scored = []
        for c in configs:
            layout = _gemv_layout(kg, split_k, bits, group, c.num_warps, c.kwargs["VEC"])
            floats = layout["KCHUNKS"] * layout["VEC"] * 32 // bits
            pad = layout["KCHUNKS"] * layout["BLOCK_KW"] / words - 1
            fits = floats <= _GEMV_X_FLOATS and pad <= _GEMV_MAX_PAD
            scored.append((fits, layout["VEC"], -pad, -floats,
                           triton.Config({**c.kwargs, **layout}, num_warps=c.num_warps, num_stages=1)))
        # The widest loads among the layouts that fit (all of them when none does: the least padded).
        best = max(s[:4] for s in scored)
        keep = best[:2] if best[0] else best
        kept = {(tuple(sorted(s[4].kwargs.items())), s[4].num_warps): s[4] for s in scored if s[:len(keep)] == keep}
        return list(kept.values())
    steps = triton.cdiv(named_args["KG"], kwargs["NG"])
    x = named_args["x_ptr"]
    limit = _max_shared_bytes(x.device)
    kept = [c for c in configs if _gemm_shared_bytes(c, kwargs, x.element_size()) <= limit
            and (c.kwargs.get("SPLIT_K", 1) - 1) * triton.cdiv(steps, c.kwargs.get("SPLIT_K", 1)) < steps]
    if kept:
        return kept
    smallest = _config(16, 1 if "SPLIT_K" in configs[0].kwargs else None, 4, 2)
    if _gemm_shared_bytes(smallest, kwargs, x.element_size()) > limit:
        raise ValueError(f"no quant_linear tile fits {limit} bytes of shared memory for BITS={kwargs['BITS']}, "
                         f"GROUP={kwargs['GROUP']}, BLOCK_M={kwargs['BLOCK_M']}")
    return [smallest]


_FORMAT_KEY = ["N", "KG", "BITS", "GROUP", "SCALES", "HAS_ZEROS"]
_quant_gemv_tuned = triton.autotune(configs=_GEMV_CONFIGS, key=_FORMAT_KEY + ["SPLIT_K"],
                                    prune_configs_by={"early_config_prune": _prune},
                                    do_bench=_tuning_bench)(_quant_gemv_kernel)
# M in 2..16 share one tuning per shape and format (BLOCK_M == 16), SPLIT_K included; prefill chunks of any length
# share a few tunings per row bucket (BLOCK_M).
_quant_gemm_skinny = triton.autotune(configs=_GEMM_SKINNY_CONFIGS, key=_FORMAT_KEY,
                                     prune_configs_by={"early_config_prune": _prune},
                                     do_bench=_tuning_bench)(_quant_gemm_kernel)
_quant_gemm_wide = triton.autotune(configs=_GEMM_WIDE_CONFIGS, key=_FORMAT_KEY + ["BLOCK_M"],
                                   prune_configs_by={"early_config_prune": _prune},
                                   do_bench=_tuning_bench)(_quant_gemm_kernel)
_MAX_SPLIT_K = max(c.kwargs["SPLIT_K"] for c in _GEMM_SKINNY_CONFIGS)

# Per (device, stream): the int32 arrival count of each output tile of the split-K GEMM, zero between launches
# (each launch's last program of a tile re-arms it), so a launch needs no memset. Keyed by stream so that launches
# that may overlap never share counts. A CUDA graph keeps the address it was captured with, so counts are never
# freed: _MIN_TILE_COUNTS covers every N up to 1M rows, and a larger N gets a new array while the old one stays.
_MIN_TILE_COUNTS = 1 << 16
_tile_counts: dict[tuple, list[torch.Tensor]] = {}


def _arrival_counts(device: torch.device, tiles: int) -> torch.Tensor:
    key = (device, torch.cuda.current_stream(device).stream_id if device.type == "cuda" else None)
    arrays = _tile_counts.setdefault(key, [])
    if not arrays or arrays[-1].numel() < tiles:
        arrays.append(torch.zeros(max(tiles, _MIN_TILE_COUNTS), dtype=torch.int32, device=device))
    return arrays[-1]


# Per compiled M == 1 kernel (its constexprs and argument dtypes): programs of it that fit on one SM at once.
_resident_programs: dict[tuple, int] = {}


@functools.cache
def _gemv_variant_args() -> tuple[str, ...]:
    """The kernel's meta-parameters that pick its compiled variant (EVEN_K is derived from the others). Read once,
    on the GPU path: the interpreter's kernel object does not list its parameters."""
    return tuple(p.name for p in _quant_gemv_kernel.fn.params if p.is_constexpr and p.name != "EVEN_K")


def _gemv_resident(args: tuple, cfg: dict) -> int:
    """How many programs of the _quant_gemv_kernel that `cfg` (its bound arguments) selects fit on one SM at once,
    from the compiled kernel's registers and shared memory: the persistent grid's programs per SM."""
    dtypes = tuple(None if a is None else a.dtype for a in args[:6])
    names = _gemv_variant_args()
    key = (args[0].device, dtypes, tuple(cfg[name] for name in names))
    if key not in _resident_programs:
        constexprs = {name: cfg[name] for name in names}
        warps = cfg["BLOCK_KW"] // (32 * cfg["VEC"])
        kernel = _quant_gemv_kernel.warmup(*args, grid=(1,), num_warps=warps, num_stages=1, **constexprs)
        # Compiled (cached) but not launched: loading it fills in n_regs. Both are Triton internals (3.6 to 3.9);
        # without them the grid is sized by threads alone, and programs past what fits wait for a free slot.
        getattr(kernel, "_init_handles", lambda: None)()
        props = torch.cuda.get_device_properties(args[0].device)
        fits = props.max_threads_per_multi_processor // (32 * warps)
        n_regs = getattr(kernel, "n_regs", 0)
        if n_regs:
            warp_regs = triton.cdiv(n_regs * 32, 256) * 256  # registers are allocated per warp, 256 at a time
            fits = min(fits, props.regs_per_multiprocessor // warp_regs // warps)
        if kernel.metadata.shared:
            fits = min(fits, props.shared_memory_per_multiprocessor // (kernel.metadata.shared + 1024))
        _resident_programs[key] = max(1, fits)
    return _resident_programs[key]


def _gemv_split_k(n: int, k: int, row_bytes: int, device: torch.device) -> int:
    """K ranges of the M == 1 kernel: rows longer than _GEMV_COLUMNS are split (x must fit in registers), and more
    when N is too small to give every SM its rows. A split costs a second launch to sum the partials."""
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
    M == 1 streams the packed weight once through FMAs from persistent programs (K split through float32 partials
    for rows longer than 16384 columns or small N); M > 1 dequantizes fields straight into tl.dot operands, with K
    split inside the one launch for M <= 16 where that is faster. Autotuned per shape, format and row bucket on
    first use, so warm up before CUDA graph capture. Act-order int4 weights permute x's columns first (one gather
    of M x K). On CPU tensors: quant_linear_ref.
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
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    zeros = spec["zeros"]
    meta = {"BITS": bits, "GROUP": group, "OFFSET": spec["offset"], "SCALES": spec["scale_kind"],
            "HAS_ZEROS": zeros is not None, "HAS_BIAS": bias is not None}
    if m == 1:
        split_k = _gemv_split_k(n, k, k * bits // 8, x.device)
        partial = out if split_k == 1 else torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
        args = (x2, spec["qweight"], spec["scales"], zeros, bias, partial, n, kg, kg * words, split_k)
        sms = sm_count(x.device) if x.is_cuda else _SMS_OFF_GPU

        def gemv_grid(cfg: dict) -> tuple[int]:
            # Persistent: as many programs as fit on the GPU at once (never more than there are tiles), a
            # multiple of SPLIT_K.
            per_sm = _gemv_resident(args, cfg) if x.is_cuda else 1
            per_split = max(1, min(triton.cdiv(n, cfg["BLOCK_N"]), per_sm * sms // split_k))
            return (per_split * split_k,)

        if x.is_cuda:
            _quant_gemv_tuned[gemv_grid](*args, **meta)
        else:
            cfg = {**_INTERPRETER_GEMV, **_gemv_layout(kg, split_k, bits, group, 1, _INTERPRETER_GEMV["VEC"])}
            _quant_gemv_kernel[gemv_grid](*args, **meta, **cfg)
        if split_k > 1:
            _sum_splits_kernel[(triton.cdiv(m * n, 1024),)](partial, out, m * n, SPLIT_K=split_k, BLOCK=1024)
        return out.view(*lead, n)

    block_m = _block_m(m)
    skinny = block_m <= _MAX_SKINNY_M
    # PTX field conversion for fp16/bf16 on the GPU; the interpreter and float32 take plain Triton.
    asm = _dequant_asm(bits, x.dtype, spec["offset"]) if x.is_cuda and x.dtype != torch.float32 else ""
    meta.update(BLOCK_M=block_m, NG=max(1, 16 // words), DEQUANT_ASM=asm,
                DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32")
    if skinny:
        partial = torch.empty((_MAX_SPLIT_K, m, n), dtype=torch.float32, device=x.device)
        counts = _arrival_counts(x.device, triton.cdiv(n, 16))
    else:
        partial, counts = out, out  # never read with SPLIT_K == 1
    args = (x2, spec["qweight"], spec["scales"], zeros, bias, out, partial, counts, m, n, kg, x2.stride(0),
            kg * words)

    def grid(cfg: dict) -> tuple[int, int, int]:
        return triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, block_m), cfg.get("SPLIT_K", 1)

    if x.is_cuda and skinny:
        _quant_gemm_skinny[grid](*args, **meta)
    elif x.is_cuda:
        _quant_gemm_wide[grid](*args, SPLIT_K=1, **meta)
    else:
        steps = triton.cdiv(kg, meta["NG"])
        split = min(_INTERPRETER_GEMM["SPLIT_K"], steps) if skinny else 1
        split = triton.cdiv(steps, triton.cdiv(steps, split))  # no empty K ranges
        cfg = {"BLOCK_N": _INTERPRETER_GEMM["BLOCK_N"], "SPLIT_K": split}
        _quant_gemm_kernel[grid(cfg)](*args, **cfg, **meta)
    return out.view(*lead, n)


def quant_linear_ref(x: torch.Tensor, weight: Int8Weight | Int4Weight | TernaryWeight,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference for `quant_linear`: x @ weight.dequantize().T (+ bias) in float32, cast to x's dtype."""
    out = x.float() @ weight.dequantize(torch.float32).T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
