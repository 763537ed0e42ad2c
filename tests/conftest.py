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


@pytest.fixture(scope="session")
def slurm():
    """A one-node SLURM cluster (tests/slurm_cluster.py) for the whole session, stopped at its end.

    Skips where SLURM cannot run (not installed, not root), with the reason; fails instead when
    RINGLET_REQUIRE_SLURM=1, which .ci/run sets after installing slurm-wlm and munge: there the tests must run.
    """
    from slurm_cluster import SlurmUnavailable, find_programs, slurm_cluster
    try:
        find_programs()
    except SlurmUnavailable as e:
        if os.environ.get("RINGLET_REQUIRE_SLURM") == "1":
            pytest.fail(f"{e} (RINGLET_REQUIRE_SLURM=1: the SLURM tests must run here)")
        pytest.skip(str(e))
    with slurm_cluster() as cluster:
        yield cluster
