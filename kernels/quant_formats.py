"""Weight-only quantized weights for `quant_linear`: int8 per channel, int4 with group scales (symmetric, asymmetric,
act-order; AutoGPTQ and AutoAWQ readers and writers) and ternary b1.58, each packed for the fused kernels.

Internal packing (one layout for all three, read by kernels/quant_gemm.py): `qweight` is int32 [N, K // VALS]
holding VALS = 32 // BITS unsigned fields per word. K is cut into layout groups of GROUP consecutive columns
(the scale group where there is one); a group is W = GROUP // VALS consecutive words, and word w of the group holds
the group's columns w, W + w, 2W + w, ... in fields 0, 1, 2, ... (field i in bits [BITS * i, BITS * (i + 1))).
So field i of a group's words covers W consecutive columns: the kernels unpack one field across a whole tile with
one shift and mask, and multiply it by a contiguous slice of x, with no reshape or interleave in registers. A field
is a code plus an offset that makes it unsigned: int8 code + 128, int4 code as given (0..15), ternary code + 1.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ._checks import check_tensor

SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CODE_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
INT4_GROUP_SIZES = (32, 64, 128)
TERNARY_GROUP_SIZES = (32, 64, 128)
# Layout groups for formats whose scales have no K groups (int8 per channel, ternary per tensor): the largest that
# divides K, so that any K that is a multiple of the smallest is allowed.
_LAYOUT_GROUPS = (128, 64, 32, 16, 8, 4)
# Bumped whenever the internal packing changes, so an old state dict is refused instead of misread.
PACKING_VERSION = 1
# AutoAWQ's GEMM layout: field i of a qweight/qzeros word holds output channel 8 * c + _AWQ_ORDER[i].
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Scale kinds, as the kernels' SCALES meta-parameter.
SCALE_TENSOR, SCALE_ROW, SCALE_GROUP = 0, 1, 2


def pack_fields(fields: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """fields [N, K] integers in [0, 2**bits) -> int32 [N, K // (32 // bits)] in the internal layout."""
    n, k = fields.shape
    vals = 32 // bits
    words = fields.to(torch.int64).reshape(n, k // group, vals, group // vals)  # [N, groups, field, word]
    shifts = (torch.arange(vals, device=fields.device) * bits).view(1, 1, vals, 1)
    packed = (words << shifts).sum(2)  # fields do not overlap, so the sum is an OR
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32).reshape(n, k // vals)


def unpack_fields(qweight: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Inverse of pack_fields: int32 [N, K // VALS] -> int64 [N, K] unsigned fields."""
    n, kw = qweight.shape
    vals = 32 // bits
    words = (qweight.to(torch.int64) & 0xFFFFFFFF).reshape(n, kw * vals // group, 1, group // vals)
    shifts = (torch.arange(vals, device=qweight.device) * bits).view(1, 1, vals, 1)
    return ((words >> shifts) & ((1 << bits) - 1)).reshape(n, kw * vals)


def _layout_group(k: int, vals: int, name: str) -> int:
    for group in _LAYOUT_GROUPS:
        if group >= vals and k % group == 0:
            return group
    raise ValueError(f"{name} must have a number of columns (in_features) that is a multiple of {max(vals, 4)}, "
                     f"got {k}")


def _check_codes(name: str, codes: torch.Tensor, low: int, high: int) -> None:
    check_tensor(name, codes, (None, None), CODE_DTYPES, layout="any")
    if codes.numel() and (codes.min().item() < low or codes.max().item() > high):
        raise ValueError(f"{name} must lie in [{low}, {high}], got values in "
                         f"[{codes.min().item()}, {codes.max().item()}]")


def _check_group_size(name: str, group_size, allowed: tuple, k: int) -> None:
    if group_size not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {group_size!r}")
    if k % group_size:
        raise ValueError(f"in_features (K={k}) must be a multiple of {name}={group_size}")


def _meta(**values: int) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([value], dtype=torch.int64) for name, value in values.items()}


def _read_meta(d: dict, cls, *names: str) -> list[int]:
    """The one-element integer entries `names` of a state dict, after checking its packing version and bits."""
    out = []
    for name in ("packing", "bits", *names):
        t = d.get(name)
        if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.dtype.is_floating_point:
            raise ValueError(f"{cls.__name__} state dict needs a one-element integer tensor {name!r}, got {t!r}")
        out.append(int(t.item()))
        if name == "packing" and out[0] != PACKING_VERSION:
            raise ValueError(f"{cls.__name__} state dict has packing version {out[0]}, this ringlet reads "
                             f"{PACKING_VERSION}")
        if name == "bits" and out[1] != cls.BITS:
            raise ValueError(f"{cls.__name__} state dict has bits={out[1]}, expected {cls.BITS}")
    return out[2:]


def _required(d: dict, name: str, cls_name: str) -> torch.Tensor:
    if name not in d:
        raise ValueError(f"{cls_name} state dict is missing {name!r} (has {sorted(d)})")
    return d[name]


class _Packed:
    """Shape of a packed weight: qweight int32 [N, K * BITS // 32]."""
    BITS: int

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * (32 // self.BITS)


class _SignedCodes(_Packed):
    """Weights whose fields are signed codes + OFFSET, with scales and no zero points (int8, ternary)."""
    OFFSET: int

    @property
    def nbytes(self) -> int:
        return _nbytes(self.qweight, self.scales)

    def codes(self) -> torch.Tensor:
        """int8 [N, K] (ternary: in {-1, 0, 1})."""
        return (unpack_fields(self.qweight, self.BITS, self.layout_group) - self.OFFSET).to(torch.int8)


@dataclass
class Int8Weight(_SignedCodes):
    """Weight-only int8 with one scale per output channel: w = codes * scales[:, None].

    qweight int32 [N, K // 4] (internal packing, fields code + 128), scales [N] float, layout_group: the
    interleave group along K (the largest of 128, 64, ..., 4 that divides K).
    """
    qweight: torch.Tensor
    scales: torch.Tensor
    layout_group: int

    BITS = 8
    OFFSET = 128  # field = code + OFFSET

    def __post_init__(self):
        check_tensor("qweight", self.qweight, (None, None), (torch.int32,), layout="contiguous")
        n = self.qweight.shape[0]
        check_tensor("scales", self.scales, (n,), SCALE_DTYPES, self.qweight.device, layout="contiguous")
        if self.layout_group not in _LAYOUT_GROUPS or self.in_features % self.layout_group:
            raise ValueError(f"layout_group must be one of {_LAYOUT_GROUPS} dividing K={self.in_features}, "
                             f"got {self.layout_group}")

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor) -> Int8Weight:
        """codes int8 [N, K] (K a multiple of 4), scales float [N]."""
        check_tensor("codes", codes, (None, None), (torch.int8,), layout="any")
        n, k = codes.shape
        check_tensor("scales", scales, (n,), SCALE_DTYPES, codes.device, layout="any")
        group = _layout_group(k, 4, "codes")
        return cls(pack_fields(codes.to(torch.int64) + cls.OFFSET, cls.BITS, group), scales.contiguous(), group)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[N, K] in `dtype`, computed in float32."""
        return (self.codes().float() * self.scales.float()[:, None]).to(dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "scales": self.scales,
                **_meta(packing=PACKING_VERSION, bits=8, layout_group=self.layout_group)}

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor]) -> Int8Weight:
        (group,) = _read_meta(d, cls, "layout_group")
        return cls(_required(d, "qweight", cls.__name__).contiguous(),
                   _required(d, "scales", cls.__name__).contiguous(), group)

    def to(self, device) -> Int8Weight:
        return replace(self, qweight=self.qweight.to(device), scales=self.scales.to(device))

    def kernel_spec(self) -> dict:
        """What kernels/quant_gemm.py launches with."""
        return {"qweight": self.qweight, "scales": self.scales, "zeros": None, "perm": None, "bits": self.BITS,
                "group": self.layout_group, "offset": self.OFFSET, "scale_kind": SCALE_ROW}


@dataclass
class Int4Weight(_Packed):
    """4-bit weight with scales per group of `group_size` consecutive columns (in storage order).

    Symmetric (zeros None): w = (codes - 8) * s; asymmetric: w = (codes - zeros) * s (zeros float, need not be
    integers). With act-order, `perm` int64 [K]: storage column j holds original column perm[j]; the kernels
    permute the activations once per call (x[:, perm]) and `dequantize` returns the original column order.

    qweight int32 [N, K // 8] (internal packing), scales [N, K // G] and zeros [N, K // G] fp16/bf16/fp32 (kept
    in the dtype they came in: fp16 halves their traffic against fp32).
    """
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int
    perm: torch.Tensor | None = None

    BITS = 4
    OFFSET = 8  # the symmetric zero point

    def __post_init__(self):
        check_tensor("qweight", self.qweight, (None, None), (torch.int32,), layout="contiguous")
        n, k = self.qweight.shape[0], self.qweight.shape[1] * 8
        _check_group_size("group_size", self.group_size, INT4_GROUP_SIZES, k)
        device = self.qweight.device
        check_tensor("scales", self.scales, (n, k // self.group_size), SCALE_DTYPES, device, layout="contiguous")
        if self.zeros is not None:
            check_tensor("zeros", self.zeros, (n, k // self.group_size), SCALE_DTYPES, device, layout="contiguous")
        if self.perm is not None:
            check_tensor("perm", self.perm, (k,), (torch.int64,), device, layout="contiguous")

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
                   perm: torch.Tensor | None = None) -> Int4Weight:
        """codes [N, K] integers in 0..15 (uint8), columns in storage order; scales (and zeros) float
        [N, K // group_size]; perm int64 [K] a permutation, or None."""
        _check_codes("codes", codes, 0, 15)
        n, k = codes.shape
        _check_group_size("group_size", group_size, INT4_GROUP_SIZES, k)
        check_tensor("scales", scales, (n, k // group_size), SCALE_DTYPES, codes.device, layout="any")
        if zeros is not None:
            check_tensor("zeros", zeros, (n, k // group_size), SCALE_DTYPES, codes.device, layout="any")
            zeros = zeros.contiguous()
        if perm is not None:
            check_tensor("perm", perm, (k,), (torch.int64, torch.int32), codes.device, layout="any")
            if not torch.equal(perm.sort().values, torch.arange(k, device=perm.device)):
                raise ValueError("perm must be a permutation of 0..K-1")
            perm = None if torch.equal(perm, torch.arange(k, device=perm.device)) else perm.to(torch.int64)
        return cls(pack_fields(codes, cls.BITS, group_size), scales.contiguous(), zeros, group_size,
                   None if perm is None else perm.contiguous())

    @classmethod
    def from_gptq(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                  g_idx: torch.Tensor | None, bits: int = 4, sym: bool | None = None) -> Int4Weight:
        """AutoGPTQ's (v1, "gptq") tensors of one linear layer.

        qweight int32 [K // 8, N]: field i (bits 4i..4i+3) of qweight[r, n] is the code of column k = 8r + i;
        qzeros int32 [K // G, N // 8]: field i of qzeros[g, c] is the zero point of channel 8c + i minus one
        (AutoGPTQ v1 stores zero - 1, so zero = stored + 1, in 1..16); scales fp16 [K // G, N];
        g_idx int32 [K]: the group of each original column (act-order when it is not k // G), or None.
        w[n, k] = (code[k, n] - zero[g_idx[k], n]) * scales[g_idx[k], n].
        sym: True needs every zero to be 8 and keeps no zeros; False keeps them; None: symmetric when all are 8.
        Group sizes that are a multiple of 128 (e.g. one group per column, G = K) are re-expressed as 128.
        """
        if bits != 4:
            raise ValueError(f"bits must be 4 (the only GPTQ width the kernels take), got {bits}")
        check_tensor("qweight", qweight, (None, None), (torch.int32,), layout="any")
        k, n = qweight.shape[0] * 8, qweight.shape[1]
        if n % 8:
            raise ValueError(f"qweight must have a multiple of 8 columns (output features), got {n}")
        check_tensor("scales", scales, (None, n), SCALE_DTYPES, qweight.device, layout="any")
        groups = scales.shape[0]
        if groups == 0 or k % groups:
            raise ValueError(f"scales must have a number of rows dividing K={k}, got {groups}")
        check_tensor("qzeros", qzeros, (groups, n // 8), (torch.int32,), qweight.device, layout="any")
        group_size = k // groups
        codes = _unpack_along(qweight, 0)  # [K, N]
        zeros = _unpack_along(qzeros, 1) + 1  # [K // G, N]
        if sym is None:
            sym = bool((zeros == 8).all())
        elif sym and not bool((zeros == 8).all()):
            raise ValueError("qzeros must all hold 8 (stored as 7) for sym=True, got "
                             f"{sorted(set(zeros.unique().tolist()))}")
        perm = None
        if g_idx is not None:
            check_tensor("g_idx", g_idx, (k,), (torch.int32, torch.int64), qweight.device, layout="any")
            if g_idx.min().item() < 0 or g_idx.max().item() >= groups:
                raise ValueError(f"g_idx must lie in [0, {groups}), got [{g_idx.min().item()}, {g_idx.max().item()}]")
            counts = torch.bincount(g_idx.long(), minlength=groups)
            if not bool((counts == group_size).all()):
                raise ValueError(f"g_idx must put exactly {group_size} columns in each group, got counts "
                                 f"{counts.unique().tolist()}")
            perm = torch.sort(g_idx.long(), stable=True).indices
            codes = codes[perm]
        codes, scales = codes.T, scales.T
        zeros = None if sym else zeros.T.to(scales.dtype)
        group_size, scales, zeros = _regroup(group_size, scales, zeros)
        return cls.from_codes(codes, scales, zeros, group_size, perm)

    @classmethod
    def from_awq(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> Int4Weight:
        """AutoAWQ's GEMM-format tensors of one linear layer.

        qweight int32 [K, N // 8]: field i of qweight[k, c] is the code of output channel 8c + [0, 2, 4, 6, 1, 3, 5,
        7][i]; qzeros int32 [K // G, N // 8], same packing, zero points stored as they are; scales fp16
        [K // G, N]. w[n, k] = (code[k, n] - zero[k // G, n]) * scales[k // G, n].
        """
        check_tensor("qweight", qweight, (None, None), (torch.int32,), layout="any")
        k, n = qweight.shape[0], qweight.shape[1] * 8
        check_tensor("scales", scales, (None, n), SCALE_DTYPES, qweight.device, layout="any")
        groups = scales.shape[0]
        if groups == 0 or k % groups:
            raise ValueError(f"scales must have a number of rows dividing K={k}, got {groups}")
        check_tensor("qzeros", qzeros, (groups, n // 8), (torch.int32,), qweight.device, layout="any")
        order = torch.tensor(_AWQ_ORDER, device=qweight.device).argsort()  # channel j of a word is field order[j]
        codes = _unpack_along(qweight, 1).view(k, n // 8, 8)[:, :, order].reshape(k, n)
        zeros = _unpack_along(qzeros, 1).view(groups, n // 8, 8)[:, :, order].reshape(groups, n)
        group_size, scales, zeros = _regroup(k // groups, scales.T, zeros.T.to(scales.dtype))
        return cls.from_codes(codes.T, scales, zeros, group_size)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.qweight, self.scales, self.zeros, self.perm)

    def codes(self) -> torch.Tensor:
        """uint8 [N, K] in storage order."""
        return unpack_fields(self.qweight, self.BITS, self.group_size).to(torch.uint8)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[N, K] in the original column order, computed in float32."""
        zeros = self.OFFSET if self.zeros is None else self.zeros.float().repeat_interleave(self.group_size, 1)
        w = (self.codes().float() - zeros) * self.scales.float().repeat_interleave(self.group_size, 1)
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm, w)
        return w.to(dtype)

    def _original_codes_groups(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes [N, K] uint8 in original column order, group of each original column int64 [K])."""
        codes = self.codes()
        groups = torch.arange(self.in_features, device=codes.device) // self.group_size
        if self.perm is not None:
            codes = torch.empty_like(codes).index_copy_(1, self.perm, codes)
            groups = torch.empty_like(groups).index_copy_(0, self.perm, groups)
        return codes, groups

    def _integer_zeros(self, low: int, high: int, fmt: str) -> torch.Tensor:
        """Zero points [N, K // G] as int64, checked to be integers in [low, high] (what `fmt` can store)."""
        if self.zeros is None:
            return torch.full(self.scales.shape, self.OFFSET, dtype=torch.int64, device=self.scales.device)
        zeros = self.zeros.float()
        if not bool((zeros == zeros.round()).all()) or zeros.min().item() < low or zeros.max().item() > high:
            raise ValueError(f"zeros must be integers in [{low}, {high}] to be written as {fmt}, got values in "
                             f"[{zeros.min().item()}, {zeros.max().item()}]")
        return zeros.long()

    def to_gptq(self) -> dict[str, torch.Tensor]:
        """AutoGPTQ v1 tensors {qweight, qzeros, scales (fp16), g_idx (int32)}: the inverse of from_gptq.
        Zero points must be integers in 1..16 (v1 stores zero - 1 in four bits); out_features a multiple of 8."""
        n = self.out_features
        if n % 8:
            raise ValueError(f"out_features must be a multiple of 8 for the GPTQ layout, got {n}")
        zeros = self._integer_zeros(1, 16, "AutoGPTQ v1 (zero - 1 in 4 bits)")
        codes, groups = self._original_codes_groups()
        return {"qweight": _pack_along(codes.T.long(), 0), "qzeros": _pack_along(zeros.T - 1, 1),
                "scales": self.scales.T.to(torch.float16).contiguous(), "g_idx": groups.to(torch.int32)}

    def to_awq(self) -> dict[str, torch.Tensor]:
        """AutoAWQ GEMM tensors {qweight, qzeros, scales (fp16)}: the inverse of from_awq. Needs no act-order,
        integer zero points in 0..15 and out_features a multiple of 8."""
        n, k = self.out_features, self.in_features
        if self.perm is not None:
            raise ValueError("perm must be None to write the AWQ layout (it has no act-order)")
        if n % 8:
            raise ValueError(f"out_features must be a multiple of 8 for the AWQ layout, got {n}")
        zeros = self._integer_zeros(0, 15, "AutoAWQ")
        order = list(_AWQ_ORDER)
        codes = self.codes().T.long().reshape(k, n // 8, 8)[:, :, order].reshape(k, n)
        zeros = zeros.T.reshape(-1, n // 8, 8)[:, :, order].reshape(-1, n)
        return {"qweight": _pack_along(codes, 1), "qzeros": _pack_along(zeros, 1),
                "scales": self.scales.T.to(torch.float16).contiguous()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        d = {"qweight": self.qweight, "scales": self.scales,
             **_meta(packing=PACKING_VERSION, bits=4, group_size=self.group_size)}
        if self.zeros is not None:
            d["zeros"] = self.zeros
        if self.perm is not None:
            d["perm"] = self.perm
        return d

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor]) -> Int4Weight:
        (group_size,) = _read_meta(d, cls, "group_size")
        zeros, perm = d.get("zeros"), d.get("perm")
        return cls(_required(d, "qweight", cls.__name__).contiguous(),
                   _required(d, "scales", cls.__name__).contiguous(),
                   None if zeros is None else zeros.contiguous(), group_size,
                   None if perm is None else perm.contiguous())

    def to(self, device) -> Int4Weight:
        return replace(self, qweight=self.qweight.to(device), scales=self.scales.to(device),
                       zeros=None if self.zeros is None else self.zeros.to(device),
                       perm=None if self.perm is None else self.perm.to(device))

    def kernel_spec(self) -> dict:
        return {"qweight": self.qweight, "scales": self.scales, "zeros": self.zeros, "perm": self.perm,
                "bits": self.BITS, "group": self.group_size, "offset": 0 if self.zeros is not None else self.OFFSET,
                "scale_kind": SCALE_GROUP}


@dataclass
class TernaryWeight(_SignedCodes):
    """BitNet b1.58 ternary weight, 2 bits per value: w = codes * s, codes in {-1, 0, 1}, s per group of
    `group_size` columns ([N, K // G]) or one per tensor ([1], group_size None).

    qweight int32 [N, K // 16] (internal packing, fields code + 1), layout_group: the scale group, or for a
    per-tensor scale the largest of 128, 64, 32, 16 that divides K.
    """
    qweight: torch.Tensor
    scales: torch.Tensor
    group_size: int | None
    layout_group: int

    BITS = 2
    OFFSET = 1

    def __post_init__(self):
        check_tensor("qweight", self.qweight, (None, None), (torch.int32,), layout="contiguous")
        n, k = self.qweight.shape[0], self.in_features
        if self.group_size is None:
            check_tensor("scales", self.scales, (1,), SCALE_DTYPES, self.qweight.device, layout="contiguous")
            if self.layout_group not in _LAYOUT_GROUPS or self.layout_group < 16 or k % self.layout_group:
                raise ValueError(f"layout_group must be one of 128, 64, 32, 16 dividing K={k}, "
                                 f"got {self.layout_group}")
        else:
            _check_group_size("group_size", self.group_size, TERNARY_GROUP_SIZES, k)
            check_tensor("scales", self.scales, (n, k // self.group_size), SCALE_DTYPES, self.qweight.device,
                         layout="contiguous")
            if self.layout_group != self.group_size:
                raise ValueError(f"layout_group must equal group_size={self.group_size}, got {self.layout_group}")

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, group_size: int | None) -> TernaryWeight:
        """codes [N, K] integers in {-1, 0, 1} (int8); scales float [N, K // group_size], or a one-element tensor
        with group_size None (per tensor; K a multiple of 16)."""
        _check_codes("codes", codes, -1, 1)
        n, k = codes.shape
        if group_size is None:
            if not isinstance(scales, torch.Tensor) or scales.numel() != 1:
                raise ValueError("scales must be a one-element tensor when group_size is None (per-tensor), got "
                                 f"shape {tuple(getattr(scales, 'shape', ()))}")
            scales = scales.reshape(1)
            check_tensor("scales", scales, (1,), SCALE_DTYPES, codes.device, layout="any")
            group = _layout_group(k, 16, "codes")
        else:
            _check_group_size("group_size", group_size, TERNARY_GROUP_SIZES, k)
            check_tensor("scales", scales, (n, k // group_size), SCALE_DTYPES, codes.device, layout="any")
            group = group_size
        return cls(pack_fields(codes.to(torch.int64) + cls.OFFSET, cls.BITS, group), scales.contiguous(), group_size,
                   group)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scales = self.scales.float()
        if self.group_size is not None:
            scales = scales.repeat_interleave(self.group_size, 1)
        return (self.codes().float() * scales).to(dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "scales": self.scales,
                **_meta(packing=PACKING_VERSION, bits=2, group_size=self.group_size or 0,
                        layout_group=self.layout_group)}

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor]) -> TernaryWeight:
        group_size, group = _read_meta(d, cls, "group_size", "layout_group")
        return cls(_required(d, "qweight", cls.__name__).contiguous(),
                   _required(d, "scales", cls.__name__).contiguous(), group_size or None, group)

    def to(self, device) -> TernaryWeight:
        return replace(self, qweight=self.qweight.to(device), scales=self.scales.to(device))

    def kernel_spec(self) -> dict:
        return {"qweight": self.qweight, "scales": self.scales, "zeros": None, "perm": None, "bits": self.BITS,
                "group": self.layout_group, "offset": self.OFFSET,
                "scale_kind": SCALE_TENSOR if self.group_size is None else SCALE_GROUP}


QUANT_WEIGHT_TYPES = (Int8Weight, Int4Weight, TernaryWeight)


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _regroup(group_size: int, scales: torch.Tensor, zeros: torch.Tensor | None):
    """Groups larger than 128 (a multiple of it, such as GPTQ's one group per column) as groups of 128 with the
    scales and zeros repeated, so the kernels keep their tile shapes; (group_size, scales, zeros)."""
    if group_size <= 128 or group_size % 128:
        return group_size, scales, zeros
    repeat = group_size // 128
    return 128, scales.repeat_interleave(repeat, 1), None if zeros is None else zeros.repeat_interleave(repeat, 1)


def _unpack_along(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words holding 8 nibbles (field i in bits 4i..4i+3) -> int64 with `dim` 8x longer, field i of word r
    at index 8r + i."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    fields = torch.stack([(words >> (4 * i)) & 0xF for i in range(8)], dim=dim + 1)
    shape = list(packed.shape)
    shape[dim] *= 8
    return fields.reshape(shape)


def _pack_along(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of _unpack_along: integers in 0..15 with `dim` a multiple of 8 -> int32 words."""
    shape = list(values.shape)
    shape[dim : dim + 1] = [shape[dim] // 8, 8]
    fields = values.to(torch.int64).reshape(shape)
    shifts = (torch.arange(8, device=values.device) * 4).view([8 if d == dim + 1 else 1 for d in range(len(shape))])
    packed = (fields << shifts).sum(dim + 1)
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)
