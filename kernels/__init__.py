"""ringlet's Triton kernels, each beside a torch reference of the same signature (`name_ref`).

Launchers run Triton on CUDA tensors and the reference on CPU tensors; `RINGLET_KERNELS=triton` forces Triton
(with `TRITON_INTERPRET=1`, on the CPU), `RINGLET_KERNELS=torch` the references.
"""
from ._dispatch import use_triton
from .decode_attention import decode_attention, decode_attention_ref
from .gemv import linear, linear_ref, linear_silu_mul, linear_silu_mul_ref
from .paged_kv import write_kv, write_kv_ref
from .patterns import DENSE, BlockSparse, Dense, Local, Pattern, Strided
from .prefill_attention import prefill_attention, prefill_attention_ref
from .rms_norm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref
from .rope import apply_rope, apply_rope_ref, rope_cos_sin
from .rope_kv import rope_write_kv, rope_write_kv_ref
from .silu_mul import silu_mul, silu_mul_ref
from .quant_formats import Int4Weight, Int8Weight, TernaryWeight
from .quant_gemm import quant_linear, quant_linear_ref

__all__ = [
    "DENSE",
    "BlockSparse",
    "Dense",
    "Local",
    "Pattern",
    "Strided",
    "apply_rope",
    "apply_rope_ref",
    "decode_attention",
    "decode_attention_ref",
    "fused_add_rms_norm",
    "fused_add_rms_norm_ref",
    "linear",
    "linear_ref",
    "linear_silu_mul",
    "linear_silu_mul_ref",
    "prefill_attention",
    "prefill_attention_ref",
    "rms_norm",
    "rms_norm_ref",
    "rope_cos_sin",
    "rope_write_kv",
    "rope_write_kv_ref",
    "silu_mul",
    "silu_mul_ref",
    "use_triton",
    "write_kv",
    "write_kv_ref",
    "Int4Weight",
    "Int8Weight",
    "TernaryWeight",
    "quant_linear",
    "quant_linear_ref",
]
