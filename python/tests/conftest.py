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


@pytest.fixture(autouse=True)
def cpu_kernels(request):
    """What interpret=None runs on the CPU: the Pallas kernels in interpret mode (what these tests check
    unless they say otherwise), or "cpp", the C++ kernels (skipped when their module is not built)."""
    choice = getattr(request, "param", "interpret")
    if choice == "cpp" and not _cpu_module.available():
        pytest.skip(f"the C++ CPU kernels are not built: {_cpu_module.unavailable_reason()}")
    with use_cpu_kernels(choice):
        yield choice
