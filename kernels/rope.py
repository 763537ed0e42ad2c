"""Rotary position embedding, rotate-half convention (GPT-NeoX, HF Llama), applied to q and k in one launch."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, INDEX_DTYPES, check_tensor
from ._dispatch import use_triton


@triton.jit
def _rotate_heads(
    x_ptr,  # [T, H, 2 * HALF] input, last dim contiguous
    out_ptr,  # [rows, H, 2 * HALF] contiguous output
    row,  # token index (int64)
    out_row,  # row of out_ptr it goes to (int64)
    H,  # number of heads
    live,  # heads written (H, or 0 to write nothing)
    stride_t,  # token stride of x
    stride_h,  # head stride of x
    cos,  # [1, BLOCK_HALF] float32
    sin,  # [1, BLOCK_HALF] float32
    HALF: tl.constexpr,  # head_dim // 2
    BLOCK_H: tl.constexpr,  # power of two >= H
    BLOCK_HALF: tl.constexpr,  # power of two >= HALF
):
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < live) & (cols < HALF)
    src = x_ptr + row * stride_t + heads * stride_h + cols
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = out_ptr + (out_row * H + heads) * (2 * HALF) + cols
    tl.store(dst, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cos_sin(positions_ptr, cos_sin_ptr, row, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """(cos, sin), each [1, BLOCK_HALF] float32 (0 past HALF), of token `row`'s position in the cos_sin table."""
    pos = tl.load(positions_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    table = cos_sin_ptr + pos * (2 * HALF) + cols
    return tl.load(table, mask=cols < HALF, other=0.0), tl.load(table + HALF, mask=cols < HALF, other=0.0)


@triton.jit
def _rope_kernel(
    q_ptr,  # [T, Hq, Dh] queries
    k_ptr,  # [T, Hk, Dh] keys
    positions_ptr,  # [T] position of each token
    cos_sin_ptr,  # [max_pos, Dh] float32 table from rope_cos_sin
    q_out_ptr,  # [T, Hq, Dh] contiguous
    k_out_ptr,  # [T, Hk, Dh] contiguous
    Hq,  # query heads
    Hk,  # key heads
    stride_qt, stride_qh,  # q strides (token, head)
    stride_kt, stride_kh,  # k strides (token, head)
    HALF: tl.constexpr,  # Dh // 2
    BLOCK_HQ: tl.constexpr,  # power of two >= Hq
    BLOCK_HK: tl.constexpr,  # power of two >= Hk
    BLOCK_HALF: tl.constexpr,  # power of two >= HALF
):
    row = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin(positions_ptr, cos_sin_ptr, row, HALF, BLOCK_HALF)
    _rotate_heads(q_ptr, q_out_ptr, row, row, Hq, Hq, stride_qt, stride_qh, cos, sin, HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr, k_out_ptr, row, row, Hk, Hk, stride_kt, stride_kh, cos, sin, HALF, BLOCK_HK, BLOCK_HALF)


def rope_inv_freq(head_dim: int, theta: float, scaling=None, device: torch.device | str = "cpu"
                  ) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies [head_dim // 2] float32 and the factor cos/sin are multiplied by.

    Unscaled: inv_freq[i] = theta ** (-2i / head_dim), factor 1. `scaling` is None or an object with the attributes
    of `ringlet.config.RopeScaling` (type, factor, original_max_position, beta_fast, beta_slow, attention_factor,
    low_freq_factor, high_freq_factor):
      linear: inv_freq / factor (positions interpolated by `factor`);
      ntk:    theta * factor ** (d / (d - 2)) in place of theta (static NTK-aware scaling);
      yarn:   per frequency, a ramp between interpolation (inv_freq / factor) for wavelengths longer than the
              original context / beta_slow and extrapolation (inv_freq) for those shorter than it / beta_fast;
              cos/sin multiplied by attention_factor, by default 0.1 * ln(factor) + 1 (YaRN's sqrt(1/t));
      llama3: Llama 3.1's bands: wavelengths above original / low_freq_factor divided by factor, below
              original / high_freq_factor kept, a smooth blend between.
    Float32 and in the order HF transformers computes them, so tables agree with its rope init functions.
    """
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float32) / head_dim
    kind = None if scaling is None else scaling.type
    if kind is None:
        return 1.0 / theta ** exponents, 1.0
    factor = float(scaling.factor)
    if kind == "linear":
        return 1.0 / theta ** exponents / factor, 1.0
    if kind == "ntk":
        return 1.0 / (theta * factor ** (head_dim / (head_dim - 2))) ** exponents, 1.0
    original = scaling.original_max_position
    if kind == "yarn":
        attention = scaling.attention_factor
        if attention is None:
            attention = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0

        def correction_dim(rotations: float) -> float:
            # The dimension pair index whose wavelength fits `rotations` times into the original context.
            return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
        high = min(math.ceil(correction_dim(scaling.beta_slow)), head_dim - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
        freqs = theta ** exponents
        extrapolate = 1 - ramp  # 1: keep the trained frequency; 0: interpolate by `factor`
        inv_freq = (1.0 / (factor * freqs)) * (1 - extrapolate) + (1.0 / freqs) * extrapolate
        return inv_freq, float(attention)
    if kind == "llama3":
        inv_freq = 1.0 / theta ** exponents
        low_wavelen = original / scaling.low_freq_factor
        high_wavelen = original / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, scaled), 1.0
    raise ValueError(f"rope scaling type {kind!r} is not one of linear, ntk, yarn, llama3")


def rope_cos_sin(max_pos: int, head_dim: int, theta: float, device: torch.device | str,
                 scaling=None) -> torch.Tensor:
    """The table `apply_rope` reads: [max_pos, head_dim] float32 on `device`.

    Row p holds cos(p * inv_freq) in its first half and sin(p * inv_freq) in its second, each times the scaling's
    attention factor (YaRN; 1 otherwise), with inv_freq from `rope_inv_freq(head_dim, theta, scaling)`
    (theta ** (-2i / head_dim) unscaled). Computed in float32 like HF transformers' Llama, so positions round
    the same way as in the checkpoints' reference implementation.
    """
    inv_freq, attention = rope_inv_freq(head_dim, theta, scaling, device)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32, device=device), inv_freq)
    table = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    return table * attention if attention != 1.0 else table


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
               cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by their tokens' positions: with x1, x2 the halves of a head,
    out = cat(x1 * cos - x2 * sin, x2 * cos + x1 * sin), in float32.

    q [T, Hq, Dh], k [T, Hk, Dh] of one fp16/bf16/fp32 dtype, any token/head strides with a contiguous last dim
    (e.g. column slices of a fused qkv tensor); positions [T] int32/int64, each < max_pos; cos_sin
    [max_pos, Dh] float32 from `rope_cos_sin`. Returns new contiguous (q_out [T, Hq, Dh], k_out [T, Hk, Dh]).
    """
    if not use_triton(q):
        return apply_rope_ref(q, k, positions, cos_sin)
    check_tensor("q", q, (None, None, None), FLOAT_DTYPES)
    t, hq, dh = q.shape
    check_tensor("k", k, (t, None, dh), (q.dtype,), q.device)
    check_tensor("positions", positions, (t,), INDEX_DTYPES, q.device, layout="contiguous")
    check_tensor("cos_sin", cos_sin, (None, dh), (torch.float32,), q.device, layout="contiguous")
    if dh % 2:
        raise ValueError(f"head_dim must be even, got q of shape {tuple(q.shape)}")
    hk = k.shape[1]
    q_out = torch.empty((t, hq, dh), dtype=q.dtype, device=q.device)
    k_out = torch.empty((t, hk, dh), dtype=k.dtype, device=k.device)
    if t == 0:
        return q_out, k_out
    _rope_kernel[(t,)](
        q, k, positions, cos_sin, q_out, k_out,
        hq, hk, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        HALF=dh // 2, BLOCK_HQ=triton.next_power_of_2(hq), BLOCK_HK=triton.next_power_of_2(hk),
        BLOCK_HALF=triton.next_power_of_2(dh // 2), num_warps=4,
    )
    return q_out, k_out


def apply_rope_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                   cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference for `apply_rope`."""
    half = q.shape[-1] // 2
    table = cos_sin[positions.long()].unsqueeze(1)  # [T, 1, Dh]
    cos, sin = table[..., :half], table[..., half:]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float()[..., :half], x.float()[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    return rotate(q), rotate(k)
