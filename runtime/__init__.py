"""ringlet: LLM inference on Triton kernels, scaled out with MPI.

    from ringlet import LLM, SamplingParams
    llm = LLM("default")
    print(llm.generate(["Once upon a time"], SamplingParams(max_tokens=32))[0].text)
"""
from .config import ModelConfig
from .errors import CheckpointError, ConfigError, RequestError, RingletError
from .sampling_params import SamplingParams

__all__ = ["LLM", "Engine", "SamplingParams", "ModelConfig",
           "RingletError", "CheckpointError", "ConfigError", "RequestError"]


def __getattr__(name):
    # LLM and Engine pull in torch-heavy modules; import them on first use so `import ringlet` stays cheap.
    if name == "LLM":
        from .api import LLM
        return LLM
    if name == "Engine":
        from .engine import Engine
        return Engine
    raise AttributeError(f"module 'ringlet' has no attribute {name!r}")
