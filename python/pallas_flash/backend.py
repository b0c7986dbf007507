"""Where a call runs: the one decision every public entry point makes the same way."""

from __future__ import annotations

import contextlib
import os
import warnings

import jax

from pallas_flash import cpu_kernels

CPU_KERNELS = ("cpp", "interpret")
_cpu_override: str | None = None


def cpu_kernel_choice() -> str:
    """What runs on the CPU backend when a call leaves `interpret` at None: "cpp" (the C++ kernels
    through the XLA FFI, the default) or "interpret" (the Pallas TPU kernels in interpret mode, to check
    them), from use_cpu_kernels() or else $PALLAS_FLASH_CPU_KERNELS."""
    choice = _cpu_override or os.environ.get("PALLAS_FLASH_CPU_KERNELS", "cpp")
    if choice not in CPU_KERNELS:
        raise ValueError(f"PALLAS_FLASH_CPU_KERNELS: expected one of {CPU_KERNELS}, got {choice!r}")
    return choice


@contextlib.contextmanager
def use_cpu_kernels(choice: str):
    """Within the block, calls traced with interpret=None on CPU run `choice` ("cpp" or "interpret").
    Read at trace time: a function jit-compiled before keeps what it was traced with."""
    global _cpu_override
    if choice not in CPU_KERNELS:
        raise ValueError(f"use_cpu_kernels: expected one of {CPU_KERNELS}, got {choice!r}")
    previous, _cpu_override = _cpu_override, choice
    try:
        yield
    finally:
        _cpu_override = previous


_warned_fallback = False


def kernel_mode(interpret: bool | None) -> str:
    """"pallas" (compiled by Mosaic), "interpret" (Pallas' TPU interpret mode), "cpu" (the C++ kernels
    through the XLA FFI) or "reference" (plain jax.numpy).

    None: compiled on TPU; on CPU the C++ kernels (or, with cpu_kernel_choice() "interpret", the Pallas
    kernels in interpret mode; also when the C++ module is not built, with a warning); the reference
    path elsewhere (GPU). True/False force interpret mode or compilation.
    """
    global _warned_fallback
    if interpret is not None:
        return "interpret" if interpret else "pallas"
    backend = jax.default_backend()
    if backend == "tpu":
        return "pallas"
    if backend != "cpu":
        return "reference"
    if cpu_kernel_choice() == "interpret":
        return "interpret"
    if cpu_kernels.available():
        return "cpu"
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(f"pallas_flash: {cpu_kernels.unavailable_reason()}; running the Pallas kernels in TPU "
                      "interpret mode on CPU instead (slow)", RuntimeWarning, stacklevel=3)
    return "interpret"
