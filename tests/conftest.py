"""Settings the whole test suite needs before anything imports triton, and the shared model fixtures."""
import os

# Triton decides when a kernel is defined whether it runs compiled or interpreted, so this must precede the
# first import of ringlet.kernels in any test module. CPU tests only ever run Triton through the interpreter
# (and only where a test forces it with RINGLET_KERNELS=triton, as the kernel tests do).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def llm():
    """The bundled SmolLM2-135M-Instruct on the CPU, float32, shared by the tests that only read it."""
    from ringlet import LLM
    return LLM("default", device="cpu")


@pytest.fixture(scope="session")
def checkpoint():
    from ringlet.checkpoint import load_checkpoint
    return load_checkpoint("default")


@pytest.fixture(scope="session")
def lee_path():
    """gensim's shipped Lee background corpus (found without importing gensim, which is slow to import)."""
    import importlib.util
    spec = importlib.util.find_spec("gensim")
    if spec is None:
        pytest.fail("gensim is a test dependency: pip install -e '.[test]'")
    return os.path.join(spec.submodule_search_locations[0], "test", "test_data", "lee_background.cor")
