"""Triton heuristics and autotuners sit on launched kernels and supply values those kernels take. gemv's EVEN_K
heuristic once sat on a helper instead of its kernel, and the interpreter tests passed while the GPU launch failed
(2026-11-27): this checks where the decorators are, without running anything."""
import importlib
import inspect
import pkgutil

import pytest
from triton.runtime.autotuner import Autotuner, Heuristics

import ringlet.kernels as rk


def _decorated():
    for info in pkgutil.iter_modules(rk.__path__):
        module = importlib.import_module(f"ringlet.kernels.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, (Heuristics, Autotuner)):
                yield f"{info.name}.{name}", obj


def _python_function(obj):
    while not inspect.isfunction(obj):
        obj = obj.fn
    return obj


DECORATED = list(_decorated())


def test_every_kernel_module_was_searched():
    assert {"gemv._gemv_kernel", "quant_gemm._quant_gemm_kernel"} <= {name for name, _ in DECORATED}


@pytest.mark.parametrize("name,obj", DECORATED, ids=[name for name, _ in DECORATED])
def test_decorators_wrap_a_launched_kernel_that_takes_their_values(name, obj):
    fn = _python_function(obj)
    assert fn.__name__.endswith("_kernel"), f"{name} wraps {fn.__name__}, a helper rather than a kernel"
    params = inspect.signature(fn).parameters
    if isinstance(obj, Heuristics):
        missing = [key for key in obj.values if key not in params]
        assert not missing, f"{name}: heuristics for {missing}, which {fn.__name__} does not take"
