"""Every test runs on the CPU with four simulated devices (for the 2x2 mesh), before JAX starts."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_enable_x64", False)

import pytest  # noqa: E402

from pallas_flash import cpu_kernels as _cpu_module  # noqa: E402
from pallas_flash.backend import use_cpu_kernels  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "both_cpu_kernels: run once with the Pallas kernels in TPU interpret mode "
                                       "and once with the C++ kernels through the XLA FFI")


def pytest_generate_tests(metafunc):
    if metafunc.definition.get_closest_marker("both_cpu_kernels"):
        metafunc.parametrize("cpu_kernels", ["interpret", "cpp"], indirect=True)


def pytest_collection_modifyitems(config, items):
    """PFLASH_TEST_CPU_KERNELS=cpp (scripts/test.sh's run on the oldest supported JAX): the tests
    parametrized over the CPU kernel paths run on the C++ path alone, and the Pallas backward's tests
    parametrized over where dQ is computed on the fused kernel alone (the separate dQ kernel is built
    of the same Pallas calls); the Pallas kernels' other tests in interpret mode still run. What is
    left out is the suite's slowest half and runs on the current JAX."""
    choice = os.environ.get("PFLASH_TEST_CPU_KERNELS", "both")
    if choice not in ("both", "cpp"):
        raise pytest.UsageError(f"PFLASH_TEST_CPU_KERNELS: expected 'both' or 'cpp', got {choice!r}")
    if choice == "both":
        return
    kept, interpreted = [], []
    for item in items:
        params = item.callspec.params if hasattr(item, "callspec") else {}
        left_out = params.get("cpu_kernels") == "interpret" or params.get("fuse_dq") is False
        (interpreted if left_out else kept).append(item)
    if interpreted:
        config.hook.pytest_deselected(items=interpreted)
        items[:] = kept


@pytest.fixture(autouse=True)
def cpu_kernels(request):
    """What interpret=None runs on the CPU: the Pallas kernels in interpret mode (what these tests check
    unless they say otherwise), or "cpp", the C++ kernels (skipped when their module is not built)."""
    choice = getattr(request, "param", "interpret")
    if choice == "cpp" and not _cpu_module.available():
        pytest.skip(f"the C++ CPU kernels are not built: {_cpu_module.unavailable_reason()}")
    with use_cpu_kernels(choice):
        yield choice
