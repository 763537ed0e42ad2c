"""Dense linear layers at decode batch sizes: a weight-streaming GEMV / skinny GEMM for M <= 16, plain
(`linear`), sending its output tiles to tensor-parallel peers (`linear_staged`), or with SwiGLU's gate applied in
its epilogue (`linear_silu_mul`)."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_tensor
from ._dispatch import sm_count, use_triton
from .reduce_rms_norm import DTYPES as STAGED_DTYPES
from .reduce_rms_norm import PeerBuffers, stage_rows_ref, stage_tile
from .silu_mul import silu_mul, silu_mul_ref

# Rows of x the Triton kernel takes; past this the product is compute-bound enough for cuBLAS.
MAX_TRITON_M = 16
# Split K when N alone gives fewer rows of W than this per SM: too few programs to keep the loads in flight
# (H100, bf16: N=256, K=16384 runs 2x faster split 8 ways; N >= 2048 gains little or loses up to 10%).
_ROWS_PER_SM = 16
# Never split K finer than this: each split writes and re-reads an fp32 copy of the output.
_MIN_SPLIT_K = 1024
# Off the GPU (the interpreter in tests): a stand-in SM count, so small N exercises split-K.
_SMS_OFF_GPU = 4


@triton.jit
def _load_rows(rows, cols, k_end, EVEN_K: tl.constexpr):
    """A [BLOCK_N, BLOCK_K] tile of weight rows (row pointers [BLOCK_N, 1]) at columns cols [BLOCK_K], zero past
    k_end unless EVEN_K."""
    if EVEN_K:
        return tl.load(rows + cols[None, :])
    return tl.load(rows + cols[None, :], mask=(cols < k_end)[None, :], other=0.0)


@triton.heuristics({"EVEN_K": lambda args: args["K"] % (args["BLOCK_K"] * args["SPLIT_K"]) == 0})
@triton.jit
def _gemv_kernel(
    x_ptr,  # [M, K] activations, last dim contiguous
    w_ptr,  # [N, K] weight, contiguous ([2N, K] with GLU: gate rows, then up rows)
    out_ptr,  # [SPLIT_K, M, N] contiguous: the output itself (SPLIT_K == 1, x's dtype) or float32 partials
    M, N, K,  # problem size
    stride_xm,  # row stride of x
    table_ptr, counters_ptr, rows_cap,  # STAGE: the peers' staging (reduce_rms_norm.PeerBuffers); else unused
    SPLIT_K: tl.constexpr,  # programs along K, each summing one contiguous range of it
    BLOCK_M: tl.constexpr,  # 1 (vector FMA path) or 16 (tl.dot path, rows >= M masked)
    BLOCK_N: tl.constexpr,  # rows of W per program
    BLOCK_K: tl.constexpr,  # columns of W per step
    EVEN_K: tl.constexpr,  # K % (BLOCK_K * SPLIT_K) == 0: no bounds checks along K
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs, else ignored
    STAGE: tl.constexpr,  # also write the output tile into every peer's staging (linear_staged; SPLIT_K == 1)
    RANK: tl.constexpr, WORLD: tl.constexpr,  # STAGE: this rank, ranks in the group
    GLU: tl.constexpr,  # out = silu(x @ gate.T) * (x @ up.T), gate and up each rounded first (SPLIT_K == 1)
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    k_len = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_len
    k_end = tl.minimum(k_start + k_len, K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    m_valid = offs_m < M
    # Rows past N re-read row 0 rather than being masked, so weight loads carry no mask along N; they are
    # dropped at the store.
    w_rows = w_ptr + tl.where(offs_n < N, offs_n, 0).to(tl.int64)[:, None] * K
    up_rows = w_ptr + (tl.where(offs_n < N, offs_n, 0) + N).to(tl.int64)[:, None] * K  # GLU: up's rows

    # Without GLU the up accumulators are never updated, and the compiler drops them.
    if BLOCK_M == 1:
        # One activation row: FMAs into a [BLOCK_N, BLOCK_K] accumulator, reduced across K once at the end.
        acc2d = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        up2d = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k in range(k_start, k_end, BLOCK_K):
            cols = k + offs_k
            w = _load_rows(w_rows, cols, k_end, EVEN_K)
            if EVEN_K:
                xv = tl.load(x_ptr + cols)
            else:
                xv = tl.load(x_ptr + cols, mask=cols < k_end, other=0.0)
            acc2d += w.to(tl.float32) * xv.to(tl.float32)[None, :]
            if GLU:
                up2d += _load_rows(up_rows, cols, k_end, EVEN_K).to(tl.float32) * xv.to(tl.float32)[None, :]
        acc = tl.sum(acc2d, 1)[None, :]
        up = tl.sum(up2d, 1)[None, :]
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        x_rows = x_ptr + offs_m[:, None] * stride_xm
        for k in range(k_start, k_end, BLOCK_K):
            cols = k + offs_k
            w = _load_rows(w_rows, cols, k_end, EVEN_K)
            if EVEN_K:
                xv = tl.load(x_rows + cols[None, :], mask=m_valid[:, None], other=0.0)
            else:
                xv = tl.load(x_rows + cols[None, :], mask=m_valid[:, None] & (cols < k_end)[None, :], other=0.0)
            acc += tl.dot(xv, tl.trans(w), input_precision=DOT_PRECISION)
            if GLU:
                up += tl.dot(xv, tl.trans(_load_rows(up_rows, cols, k_end, EVEN_K)), input_precision=DOT_PRECISION)

    out = out_ptr + (pid_k * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
    vals = acc.to(out_ptr.dtype.element_ty)
    if GLU:  # silu_mul's arithmetic, on the gate and up rounded as the unfused path stores them
        gate = vals.to(tl.float32)
        vals = (gate * tl.sigmoid(gate) * up.to(out_ptr.dtype.element_ty).to(tl.float32)).to(vals.dtype)
    tl.store(out, vals, mask=m_valid[:, None] & (offs_n < N)[None, :])
    if STAGE:
        stage_tile(vals, offs_m, m_valid, pid_n * BLOCK_N, N, table_ptr, counters_ptr, rows_cap, RANK, WORLD,
                   BLOCK_M, BLOCK_N)


@triton.jit
def _sum_splits_kernel(
    partial_ptr,  # [SPLIT_K, size] float32 partial outputs
    out_ptr,  # [size] contiguous output, x's dtype
    size,  # M * N
    SPLIT_K: tl.constexpr,  # partials per output element
    BLOCK: tl.constexpr,  # outputs per program
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < size
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):
        acc += tl.load(partial_ptr + split * size + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _config(block_n: int, block_k: int, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=num_warps, num_stages=num_stages)


# Autotuning candidates: the best few per path on Llama-7B shapes (H200 sweep, cold weights, in CUDA graphs).
# M == 1 (plain FMAs: the loads are not software-pipelined, so num_stages is moot) wants short, wide tiles;
# M <= 16 (tl.dot) wants deeper pipelining.
_FMA_CONFIGS = [_config(n, k, w, 1) for n, k, w in ((4, 512, 4), (8, 512, 4), (16, 256, 4), (16, 512, 4),
                                                   (8, 1024, 4), (4, 512, 8), (8, 512, 8), (16, 512, 8))]
_DOT_CONFIGS = [_config(n, k, w, s) for n, k, w, s in ((32, 128, 4, 4), (32, 256, 4, 4), (32, 256, 4, 5),
                                                      (64, 128, 4, 3), (64, 128, 4, 4), (64, 256, 4, 5),
                                                      (128, 128, 8, 3))]
# The interpreter runs one small config (autotuning needs a GPU timer).
_INTERPRETER_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 64}
_TUNING_REPS = 20


def _configs_for_path(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    return _FMA_CONFIGS if kwargs["BLOCK_M"] == 1 else _DOT_CONFIGS


@functools.cache
def _l2_sweep_buffer(device: torch.device) -> torch.Tensor:
    return torch.zeros(2 * torch.cuda.get_device_properties(device).L2_cache_size // 4, device=device)


def _tuning_bench(fn, quantiles=None):
    """Autotuner timing of one launch as decode runs it: replayed from a CUDA graph, so host launch overhead does
    not mask the kernel, after reading a buffer twice the L2 size, so the weight comes from HBM and L2 holds no
    dirty lines to write back (triton's do_bench zero-fills its flush buffer, which charges small kernels for
    that write-back). Returns the median ms, or the requested quantiles."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    sweep = _l2_sweep_buffer(torch.device("cuda", torch.cuda.current_device()))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(_TUNING_REPS)]
    for start, end in events:
        sweep.sum()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    if quantiles is None:
        return times[len(times) // 2]
    return [times[round(q * (len(times) - 1))] for q in quantiles]


# Tuned per (row bucket, N, K, split): decode batches of 2..16 rows share the BLOCK_M == 16 kernel and its tuning.
_gemv_kernel_tuned = triton.autotune(configs=_FMA_CONFIGS + _DOT_CONFIGS,
                                     key=["BLOCK_M", "N", "K", "SPLIT_K", "GLU"],
                                     prune_configs_by={"early_config_prune": _configs_for_path},
                                     do_bench=_tuning_bench)(_gemv_kernel)
# Staging launches (linear_staged) run the config the tuner picked for the same launch without staging, keyed
# (BLOCK_M, N, K): tuning them would send every trial run's words to the peers, and a config of its own would round
# the partial sums differently from the plain path.
_staged_configs: dict[tuple[int, int, int], triton.Config] = {}


def _split_k(n: int, k: int, device: torch.device) -> int:
    sms = sm_count(device) if device.type == "cuda" else _SMS_OFF_GPU
    if n >= _ROWS_PER_SM * sms:
        return 1
    return max(1, min(triton.cdiv(_ROWS_PER_SM * sms, n), k // _MIN_SPLIT_K))


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T.

    x [M, K] fp16/bf16/fp32 (last dim contiguous), weight [N, K] contiguous, x's dtype -> out [M, N] contiguous,
    x's dtype. M <= 16: a Triton kernel that streams the weight once with fp32 accumulation (autotuned per row
    bucket and shape on first use, so warm up before CUDA graph capture); split-K, through fp32 partials summed
    afterwards, when N alone cannot fill the GPU. M > 16: torch.nn.functional.linear (cuBLAS on CUDA).
    """
    if not use_triton(x):
        return linear_ref(x, weight)
    return _linear(x, weight, None)[0]


def linear_staged(x: torch.Tensor, weight: torch.Tensor, peers: PeerBuffers) -> tuple[torch.Tensor, bool]:
    """`linear`, for a row-parallel projection whose output rows are one rank's partial sums: where its kernel
    writes them in one pass (M <= 16, no split-K, fp16/bf16, M <= peers.max_rows(N)), each output tile is also
    written into every peer's staging as `reduce_add_rms_norm`'s words for its next call on these rows, which must
    then be made with staged=True. Returns (out, staged): staged False means nothing was sent."""
    if not use_triton(x):
        return linear_staged_ref(x, weight, peers)
    return _linear(x, weight, peers)


def linear_silu_mul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu_mul(linear(x, weight)): SwiGLU's fused gate/up projection and its gate, in one kernel where the GEMV
    writes its output in one pass (M <= 16, no split-K). The arithmetic is the two calls' (gate and up rounded to
    x's dtype, then the gate in float32), but the GEMV's tiling is tuned for this launch on its own, so a sum may
    round differently in the last bit.

    x [M, K] fp16/bf16/fp32 (last dim contiguous), weight [2F, K] contiguous, x's dtype (gate rows [0, F), up rows
    [F, 2F)) -> out [M, F] contiguous, x's dtype.
    """
    if not use_triton(x):
        return linear_silu_mul_ref(x, weight)
    if weight.dim() == 2 and weight.shape[0] % 2:
        raise ValueError(f"weight must have an even number of rows (gate, then up), got shape {tuple(weight.shape)}")
    out, fused = _linear(x, weight, None, glu=True)
    return out if fused else silu_mul(out)


def _linear(x: torch.Tensor, weight: torch.Tensor, peers: PeerBuffers | None, glu: bool = False
            ) -> tuple[torch.Tensor, bool]:
    """The launcher behind the public functions: (out, True) when the kernel did what peers (staging) or glu ask,
    else (x @ weight.T, False)."""
    check_tensor("x", x, (None, None), FLOAT_DTYPES)
    m, k = x.shape
    check_tensor("weight", weight, (None, k), (x.dtype,), x.device, layout="contiguous")
    if m > MAX_TRITON_M:
        return torch.nn.functional.linear(x, weight), False
    rows = weight.shape[0]
    if m == 0 or rows == 0 or k == 0:
        return torch.zeros((m, rows), dtype=x.dtype, device=x.device), False
    split_k = _split_k(rows, k, x.device)
    glu = glu and split_k == 1
    n = rows // 2 if glu else rows  # output columns
    stage = peers is not None and split_k == 1 and x.dtype in STAGED_DTYPES and m <= peers.max_rows(n)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    partial = out if split_k == 1 else torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    meta = {"SPLIT_K": split_k, "BLOCK_M": 1 if m == 1 else 16,
            "DOT_PRECISION": "ieee" if x.dtype == torch.float32 else "tf32", "STAGE": stage,
            "RANK": peers.rank if stage else 0, "WORLD": peers.world if stage else 1, "GLU": glu}
    staging = (peers.table, peers.counters, peers.max_rows(n)) if stage else (out, out, 0)

    def grid(cfg: dict) -> tuple[int, int]:
        return triton.cdiv(n, cfg["BLOCK_N"]), split_k

    if x.is_cuda and stage:
        key = (meta["BLOCK_M"], n, k)
        if key not in _staged_configs:  # tune (or look up) the plain launch; its output is overwritten below
            _gemv_kernel_tuned[grid](x, weight, out, m, n, k, x.stride(0), out, out, 0, **{**meta, "STAGE": False})
            _staged_configs[key] = _gemv_kernel_tuned.best_config
        cfg = _staged_configs[key]
        _gemv_kernel[grid(cfg.kwargs)](x, weight, out, m, n, k, x.stride(0), *staging, **meta, **cfg.kwargs,
                                       num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    elif x.is_cuda:
        _gemv_kernel_tuned[grid](x, weight, partial, m, n, k, x.stride(0), *staging, **meta)
    else:
        _gemv_kernel[grid](x, weight, partial, m, n, k, x.stride(0), *staging, **meta, **_INTERPRETER_CONFIG)
    if split_k > 1:
        _sum_splits_kernel[(triton.cdiv(m * n, 1024),)](partial, out, m * n, SPLIT_K=split_k, BLOCK=1024)
    return out, stage or glu


def linear_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Torch reference for `linear`, in float32."""
    return (x.float() @ weight.float().T).to(x.dtype)


def linear_silu_mul_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Torch reference for `linear_silu_mul`."""
    return silu_mul_ref(linear_ref(x, weight))


def linear_staged_ref(x: torch.Tensor, weight: torch.Tensor, peers: PeerBuffers) -> tuple[torch.Tensor, bool]:
    """Torch reference for `linear_staged`: `linear_ref`, its rows staged for every peer (always)."""
    out = linear_ref(x, weight)
    if x.dtype not in STAGED_DTYPES:
        return out, False
    stage_rows_ref(out, peers)
    return out, True
