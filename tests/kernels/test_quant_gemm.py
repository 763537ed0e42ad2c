import struct

import pytest
import torch

from ringlet.kernels import quant_gemm
from ringlet.kernels.quant_formats import Int4Weight, Int8Weight, TernaryWeight
from ringlet.kernels.quant_gemm import _dequant_asm, _gemv_split_k, _tile_counts, quant_linear, quant_linear_ref

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _scales(*shape, dtype=torch.float32):
    """Scales far from 1 and different everywhere, so a forgotten or misindexed multiply fails."""
    return (torch.rand(*shape) * 0.05 + 0.01).to(dtype)


def _expected(codes: torch.Tensor, scales: torch.Tensor, zeros, group, perm=None, offset=0) -> torch.Tensor:
    """Dequantized weight [N, K] in float64, straight from the codes the weight was built from."""
    s = scales.double()
    z = offset if zeros is None else zeros.double()
    if group is not None:
        s = s.repeat_interleave(group, 1)
        if zeros is not None:
            z = z.repeat_interleave(group, 1)
    w = (codes.double() - z) * s
    if perm is not None:
        w_orig = torch.empty_like(w)
        w_orig[:, perm] = w
        w = w_orig
    return w


def _make(fmt: str, n: int, k: int):
    """(weight, expected dequantized float64 [N, K]) for a format name."""
    if fmt == "int8":
        codes = torch.randint(-128, 128, (n, k), dtype=torch.int8)
        scales = _scales(n)
        return Int8Weight.from_codes(codes, scales), _expected(codes, scales[:, None], None, None)
    if fmt.startswith("int4"):
        _, kind, g = fmt.split("-")[:3]
        group = int(g[1:])
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
        scales = _scales(n, k // group, dtype=torch.float16 if group == 128 else torch.float32)
        zeros = None if kind == "sym" else torch.rand(n, k // group) * 15  # non-integer zero points
        perm = torch.randperm(k) if fmt.endswith("act") else None
        weight = Int4Weight.from_codes(codes, scales, zeros, group, perm)
        return weight, _expected(codes, scales, zeros, group, perm, offset=8)
    codes = torch.randint(-1, 2, (n, k), dtype=torch.int8)
    if fmt == "ternary-tensor":
        scales = torch.tensor([0.037])
        return TernaryWeight.from_codes(codes, scales, None), _expected(codes, scales[:, None], None, None)
    group = int(fmt.split("-g")[1])
    scales = _scales(n, k // group)
    return TernaryWeight.from_codes(codes, scales, group), _expected(codes, scales, None, group)


# (format, N, K): K not a multiple of 128 where the group allows it.
FORMATS = [("int8", 72, 320), ("int4-sym-g32", 72, 320), ("int4-sym-g64", 72, 320), ("int4-sym-g128", 72, 384),
           ("int4-asym-g32", 72, 320), ("int4-asym-g64", 72, 320), ("int4-asym-g128", 40, 384),
           ("int4-asym-g64-act", 72, 320), ("int4-sym-g128-act", 24, 384), ("ternary-tensor", 72, 320),
           ("ternary-g32", 72, 320), ("ternary-g128", 40, 384)]
# bf16 with M > 1 takes the tl.dot path, which the interpreter computes wrongly on bf16
# (triton-lang/triton#11584): those cases are checked on the GPU by bench/quant_gemm.py, not listed here. M = 2..16
# share the decode tiles (16 rows, K split 3 ways under the interpreter), 17 takes the prefill tiles.
CASES = ([(torch.float16, m) for m in (1, 2, 3, 5, 16, 17)] + [(torch.float32, m) for m in (1, 3, 17)]
         + [(torch.bfloat16, 1)])


@pytest.mark.parametrize("fmt,n,k", FORMATS)
def test_dequantize_matches_codes(fmt, n, k):
    weight, expected = _make(fmt, n, k)
    assert (weight.out_features, weight.in_features) == (n, k)
    torch.testing.assert_close(weight.dequantize().double(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype,m", CASES)
@pytest.mark.parametrize("fmt,n,k", FORMATS)
def test_quant_linear(fmt, n, k, m, dtype, assert_close):
    weight, _ = _make(fmt, n, k)
    x = torch.randn(m, k + 5).to(dtype)[:, :k]  # a row stride wider than the row
    out = quant_linear(x, weight)
    assert out.shape == (m, n) and out.dtype == dtype and out.is_contiguous()
    assert_close(out, quant_linear_ref(x, weight))


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("fmt,n,k", [("int4-asym-g128", 40, 2048), ("int4-sym-g32", 24, 2080), ("int8", 33, 1088),
                                     ("ternary-tensor", 40, 4096)])
def test_split_k_and_bias(fmt, n, k, m, assert_close):
    # M == 1: N far below the rows-per-SM threshold splits K through partials and a second kernel. M == 5: K split
    # 3 ways in the launch (unevenly here; int4-sym-g32 also ends in a partial step of 16 words); the last program
    # of each tile adds the partials and the bias once, and re-arms the tile's count for the next launch.
    weight, _ = _make(fmt, n, k)
    if m == 1:
        assert _gemv_split_k(n, k, k * weight.BITS // 8, torch.device("cpu")) > 1
    x = torch.randn(m, 1, k).half()  # leading dims are flattened: M = m
    bias = torch.randn(n).half()
    for _ in range(2):  # the second launch finds the counts the first one left
        out = quant_linear(x, weight, bias)
        assert out.shape == (m, 1, n) and out.dtype == torch.float16
        assert_close(out, quant_linear_ref(x, weight, bias))
    if m > 1:
        counts = _tile_counts[(torch.device("cpu"), None)][-1]
        assert counts.numel() >= -(-n // 16) and not counts.any()


def test_gemv_long_rows(monkeypatch, assert_close):
    # M == 1 covers a program's K range in chunks, each with its own slice of x in registers (under the interpreter
    # 64 words, so here 17 chunks, the last one padded); rows past _GEMV_COLUMNS are split across programs instead
    # (lowered here to 2048: 3 uneven ranges of 22, 22 and 21 groups of 64).
    n, k = 96, 4160
    weight, _ = _make("int8", n, k)
    x = torch.randn(1, k).half()
    assert _gemv_split_k(n, k, k, torch.device("cpu")) == 1
    assert_close(quant_linear(x, weight), quant_linear_ref(x, weight))
    monkeypatch.setattr(quant_gemm, "_GEMV_COLUMNS", 2048)
    assert _gemv_split_k(n, k, k, torch.device("cpu")) == 3
    assert_close(quant_linear(x, weight), quant_linear_ref(x, weight))


@pytest.mark.parametrize("bits,group,k", [(4, 128, 4096), (4, 128, 11008), (2, 128, 4096), (2, 128, 11008),
                                          (8, 128, 4096), (8, 128, 11008), (2, 32, 320), (8, 64, 4160)])
def test_gemv_layouts(bits, group, k):
    # The M == 1 configs the autotuner may try: each covers the K range with its chunks, keeps at most
    # _GEMV_X_FLOATS of x per thread with at most _GEMV_MAX_PAD of padding where any layout can, and loads
    # 16 bytes per thread where that fits (the Llama-7B rows with 4096 columns).
    configs = quant_gemm._prune(quant_gemm._GEMV_CONFIGS, {"KG": k // group, "SPLIT_K": 1}, BITS=bits, GROUP=group)
    words = k * bits // 32
    assert configs
    for c in configs:
        span = c.kwargs["KCHUNKS"] * c.kwargs["BLOCK_KW"]
        assert c.kwargs["BLOCK_KW"] == 32 * c.num_warps * c.kwargs["VEC"] and words <= span
        assert span - c.kwargs["BLOCK_KW"] < words  # no chunk lies wholly past the range
        if k in (4096, 11008):
            assert c.kwargs["KCHUNKS"] * c.kwargs["VEC"] * 32 // bits <= quant_gemm._GEMV_X_FLOATS
            assert span <= words * (1 + quant_gemm._GEMV_MAX_PAD)
        if k == 4096:
            assert c.kwargs["VEC"] == 4


def test_ref_matches_float64(assert_close):
    weight, expected = _make("int4-asym-g64-act", 40, 256)
    x, bias = torch.randn(3, 256), torch.randn(40)
    assert_close(quant_linear_ref(x, weight, bias), (x.double() @ expected.T + bias.double()).float())


def test_cpu_dispatch_is_the_reference(monkeypatch):
    monkeypatch.setenv("RINGLET_KERNELS", "auto")
    weight, _ = _make("int4-sym-g32", 16, 64)
    x = torch.randn(2, 64)
    assert torch.equal(quant_linear(x, weight), quant_linear_ref(x, weight))


def _wrap_int32(v: torch.Tensor) -> torch.Tensor:
    return torch.where(v >= 2 ** 31, v - 2 ** 32, v).to(torch.int32)


@pytest.mark.parametrize("group,act_order", [(32, True), (32, False), (256, False)])
def test_from_gptq_hand_built(group, act_order):
    # AutoGPTQ v1 tensors packed here field by field: qweight [K // 8, N] along K, qzeros [K // G, N // 8] along
    # N holding zero - 1, fp16 scales [K // G, N], g_idx [K] (shuffled groups for act-order).
    k, n = 256, 16
    codes = torch.randint(0, 16, (k, n))
    zeros = torch.randint(1, 17, (k // group, n))  # 16 is stored as 15
    scales = _scales(k // group, n, dtype=torch.float16)
    order = torch.randperm(k) if act_order else torch.arange(k)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // group).int()
    qweight = torch.zeros(k // 8, n, dtype=torch.int64)
    for row in range(k):
        qweight[row // 8] |= codes[row] << (4 * (row % 8))
    qzeros = torch.zeros(k // group, n // 8, dtype=torch.int64)
    for col in range(n):
        qzeros[:, col // 8] |= (zeros[:, col] - 1) << (4 * (col % 8))
    weight = Int4Weight.from_gptq(_wrap_int32(qweight), _wrap_int32(qzeros), scales, g_idx)
    expected = ((codes - zeros[g_idx.long()]) * scales[g_idx.long()].double()).T
    torch.testing.assert_close(weight.dequantize().double(), expected, rtol=1e-6, atol=1e-7)
    assert (weight.perm is not None) == act_order and weight.zeros is not None
    assert weight.group_size == min(group, 128)


def test_from_gptq_symmetric():
    k, n = 128, 8
    codes = torch.randint(0, 16, (k, n))
    qweight = torch.zeros(k // 8, n, dtype=torch.int64)
    for row in range(k):
        qweight[row // 8] |= codes[row] << (4 * (row % 8))
    qzeros = torch.full((k // 32, 1), 0x77777777, dtype=torch.int32)  # zero 8, stored as 7
    scales = _scales(k // 32, n, dtype=torch.float16)
    weight = Int4Weight.from_gptq(_wrap_int32(qweight), qzeros, scales, None)
    assert weight.zeros is None and weight.perm is None
    expected = ((codes - 8) * scales.repeat_interleave(32, 0).double()).T
    torch.testing.assert_close(weight.dequantize().double(), expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="qzeros"):
        Int4Weight.from_gptq(_wrap_int32(qweight), qzeros + 1, scales, None, sym=True)


def test_from_awq_hand_built():
    # AutoAWQ's GEMM packing, as its pack loop writes it: field i of word c holds channel 8c + order[i].
    k, n, group = 128, 16, 64
    codes = torch.randint(0, 16, (k, n))
    zeros = torch.randint(0, 16, (k // group, n))
    scales = _scales(k // group, n, dtype=torch.float16)
    qweight = torch.zeros(k, n // 8, dtype=torch.int64)
    qzeros = torch.zeros(k // group, n // 8, dtype=torch.int64)
    for col in range(n // 8):
        for i in range(8):
            qweight[:, col] |= codes[:, col * 8 + AWQ_ORDER[i]] << (i * 4)
            qzeros[:, col] |= zeros[:, col * 8 + AWQ_ORDER[i]] << (i * 4)
    weight = Int4Weight.from_awq(_wrap_int32(qweight), _wrap_int32(qzeros), scales)
    expected = ((codes - zeros.repeat_interleave(group, 0)) * scales.repeat_interleave(group, 0).double()).T
    torch.testing.assert_close(weight.dequantize().double(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("sym,act_order", [(True, False), (False, False), (False, True), (True, True)])
def test_gptq_round_trip(sym, act_order):
    n, k, group = 24, 256, 64
    zeros = None if sym else torch.randint(1, 17, (n, k // group)).half()
    perm = torch.randperm(k) if act_order else None
    weight = Int4Weight.from_codes(torch.randint(0, 16, (n, k), dtype=torch.uint8),
                                   _scales(n, k // group, dtype=torch.float16), zeros, group, perm)
    d = weight.to_gptq()
    assert d["qweight"].shape == (k // 8, n) and d["qzeros"].shape == (k // group, n // 8)
    assert d["scales"].dtype == torch.float16 and d["g_idx"].dtype == torch.int32
    back = Int4Weight.from_gptq(d["qweight"], d["qzeros"], d["scales"], d["g_idx"])
    assert torch.equal(back.dequantize(), weight.dequantize())
    assert (back.zeros is None) == sym


def test_awq_round_trip():
    n, k, group = 24, 256, 128
    weight = Int4Weight.from_codes(torch.randint(0, 16, (n, k), dtype=torch.uint8),
                                   _scales(n, k // group, dtype=torch.float16),
                                   torch.randint(0, 16, (n, k // group)).half(), group)
    d = weight.to_awq()
    assert d["qweight"].shape == (k, n // 8) and d["qzeros"].shape == (k // group, n // 8)
    back = Int4Weight.from_awq(d["qweight"], d["qzeros"], d["scales"])
    assert torch.equal(back.dequantize(), weight.dequantize())


@pytest.mark.parametrize("fmt,n,k", FORMATS)
def test_state_dict_round_trip(fmt, n, k):
    from safetensors.torch import load, save
    weight, _ = _make(fmt, n, k)
    d = weight.state_dict()
    assert all(isinstance(t, torch.Tensor) for t in d.values())
    back = type(weight).from_state_dict(load(save({name: t.contiguous() for name, t in d.items()})))
    assert torch.equal(back.dequantize(), weight.dequantize())
    assert back.nbytes == weight.nbytes


def test_state_dict_of_another_format_is_refused():
    weight, _ = _make("int4-sym-g32", 8, 64)
    with pytest.raises(ValueError, match="bits"):
        Int8Weight.from_state_dict(weight.state_dict())
    with pytest.raises(ValueError, match="packing"):
        Int4Weight.from_state_dict({**weight.state_dict(), "packing": torch.tensor([99])})


def test_nbytes_counts_packed_weight_and_scales():
    n, k = 64, 512
    weight = Int4Weight.from_codes(torch.zeros(n, k, dtype=torch.uint8), _scales(n, k // 128, dtype=torch.float16),
                                   None, 128)
    assert weight.nbytes == n * k // 2 + n * (k // 128) * 2
    ternary = TernaryWeight.from_codes(torch.zeros(n, k, dtype=torch.int8), torch.ones(1), None)
    assert ternary.nbytes == n * k // 4 + 4


def test_bad_inputs_are_named():
    weight, _ = _make("int4-sym-g32", 16, 64)
    with pytest.raises(ValueError, match="x"):
        quant_linear(torch.randn(2, 65), weight)
    with pytest.raises(ValueError, match="x"):
        quant_linear(torch.randint(0, 3, (2, 64)), weight)
    with pytest.raises(ValueError, match="bias"):
        quant_linear(torch.randn(2, 64), weight, torch.randn(15))
    with pytest.raises(TypeError, match="weight"):
        quant_linear(torch.randn(2, 64), torch.randn(16, 64))
    codes = torch.randint(0, 16, (16, 64), dtype=torch.uint8)
    with pytest.raises(ValueError, match="codes"):
        Int4Weight.from_codes(codes + 16, _scales(16, 2), None, 32)
    with pytest.raises(ValueError, match="codes"):
        Int4Weight.from_codes(codes.float(), _scales(16, 2), None, 32)
    with pytest.raises(ValueError, match="group_size"):
        Int4Weight.from_codes(codes, _scales(16, 4), None, 16)
    with pytest.raises(ValueError, match="group_size"):
        Int4Weight.from_codes(torch.randint(0, 16, (16, 96), dtype=torch.uint8), _scales(16, 1), None, 64)
    with pytest.raises(ValueError, match="scales"):
        Int4Weight.from_codes(codes, _scales(16, 3), None, 32)
    with pytest.raises(ValueError, match="zeros"):
        Int4Weight.from_codes(codes, _scales(16, 2), torch.zeros(16, 1), 32)
    with pytest.raises(ValueError, match="perm"):
        Int4Weight.from_codes(codes, _scales(16, 2), None, 32, torch.zeros(64, dtype=torch.int64))
    with pytest.raises(ValueError, match="codes"):
        Int8Weight.from_codes(codes, _scales(16))
    with pytest.raises(ValueError, match="codes"):
        Int8Weight.from_codes(torch.zeros(16, 66, dtype=torch.int8), _scales(16))
    with pytest.raises(ValueError, match="scales"):
        Int8Weight.from_codes(torch.zeros(16, 64, dtype=torch.int8), _scales(17))
    with pytest.raises(ValueError, match="codes"):
        TernaryWeight.from_codes(torch.full((16, 64), 2, dtype=torch.int8), torch.ones(1), None)
    with pytest.raises(ValueError, match="scales"):
        TernaryWeight.from_codes(torch.zeros(16, 64, dtype=torch.int8), torch.ones(2), None)
    with pytest.raises(ValueError, match="bits"):
        Int4Weight.from_gptq(torch.zeros(8, 8, dtype=torch.int32), torch.zeros(2, 1, dtype=torch.int32),
                             torch.ones(2, 8).half(), None, bits=3)
    with pytest.raises(ValueError, match="g_idx"):
        Int4Weight.from_gptq(torch.zeros(8, 8, dtype=torch.int32), torch.zeros(2, 1, dtype=torch.int32),
                             torch.ones(2, 8).half(), torch.zeros(64, dtype=torch.int32))
    with pytest.raises(ValueError, match="perm"):
        Int4Weight.from_codes(codes, _scales(16, 2), None, 32, torch.randperm(64)).to_awq()
    with pytest.raises(ValueError, match="zeros"):
        Int4Weight.from_codes(codes, _scales(16, 2), torch.full((16, 2), 0.5), 32).to_gptq()


def _half_value(bits: int, dtype: torch.dtype) -> float:
    return torch.tensor([bits], dtype=torch.int32).to(torch.int16).view(dtype).item()


def _half_bits(value: float, dtype: torch.dtype) -> int:
    return int(torch.tensor([value], dtype=torch.float64).to(dtype).view(torch.int16).item()) & 0xFFFF


def _run_ptx(asm: str, inputs: list[int], outputs: int, dtype: torch.dtype) -> list[int]:
    """Execute the straight-line PTX _dequant_asm emits (mov, prmt, lop3, shr, packed fma) on 32-bit integers."""
    regs = {f"${outputs + i}": v for i, v in enumerate(inputs)}
    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        dest, *args = (r.strip() for r in rest.split(","))
        a = [regs[r] if r in regs else int(r, 0) for r in args]
        if op == "mov.b32":
            value = a[0]
        elif op == "prmt.b32":  # byte i of the result is byte a[2] >> 4i & 7 of the pair (a[0], a[1])
            pool = struct.pack("<II", a[0], a[1])
            value = int.from_bytes(bytes(pool[a[2] >> 4 * i & 7] for i in range(4)), "little")
        elif op == "lop3.b32":  # bit b is lut[(a0_b << 2) | (a1_b << 1) | a2_b]
            value = sum((a[3] >> ((a[0] >> b & 1) << 2 | (a[1] >> b & 1) << 1 | (a[2] >> b & 1)) & 1) << b
                        for b in range(32))
        elif op == "shr.b32":
            value = a[0] >> a[1]
        elif op in ("fma.rn.f16x2", "fma.rn.bf16x2"):  # one rounding of the exact a * b + c per half
            value = 0
            for h in (0, 16):
                p, q, r = (_half_value(v >> h & 0xFFFF, dtype) for v in a)
                value |= _half_bits(p * q + r, dtype) << h
        else:
            raise ValueError(f"unexpected PTX {line!r}")
        regs[dest] = value
    return [regs[f"${i}"] for i in range(outputs)]


@pytest.mark.parametrize("bits,offset", [(4, 8), (4, 0), (8, 128), (2, 1)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequant_asm_fields(bits, offset, dtype):
    # The GPU's M > 1 path converts fields with this PTX (never run by the interpreter): every field of both
    # words, minus the offset, must come out exactly, the first word's in the low half.
    vals = 32 // bits
    asm = _dequant_asm(bits, dtype, offset)
    gen = torch.Generator().manual_seed(0)
    words = [[sum(v << bits * i for i in range(vals))] * 2 for v in range(1 << bits)]  # every value in every field
    words += torch.randint(0, 2 ** 32, (64, 2), generator=gen, dtype=torch.int64).tolist()
    for pair in words:
        out = _run_ptx(asm, pair, vals, dtype)
        for i in range(vals):
            for half, word in enumerate(pair):
                expected = (word >> bits * i & (1 << bits) - 1) - offset
                assert _half_value(out[i] >> 16 * half & 0xFFFF, dtype) == expected, (i, half, hex(word))
