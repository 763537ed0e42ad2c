"""Quantization: methods by name (`get_method`, `parse_method`), applying them to a model, calibration, and the
quantized checkpoint format.

    from ringlet.quant import get_method, quantize_model, save_quantized
    qm = quantize_model(load_checkpoint("default"), get_method("gptq", group_size=128))
    save_quantized(qm, checkpoint, "out-dir")          # LLM("out-dir") loads it with no calibration

Methods (each module registers its config): rtn-int8, rtn-int4 (rtn.py), gptq (gptq.py), awq (awq.py),
bitnet (bitnet.py), mixed (mixed.py), auto (auto.py).
"""
from . import auto, awq, bitnet, gptq, mixed, rtn  # noqa: F401  (registration)
from .registry import METHODS, QuantConfig, get_method, parse_method

__all__ = ["METHODS", "QuantConfig", "get_method", "parse_method", "quantize_model", "save_quantized",
           "quantize_at_load"]


def __getattr__(name):
    if name == "quantize_model":
        from .pipeline import quantize_model
        return quantize_model
    if name == "save_quantized":
        from .checkpoint import save_quantized
        return save_quantized
    if name == "quantize_at_load":
        from .apply import quantize_at_load
        return quantize_at_load
    raise AttributeError(name)
