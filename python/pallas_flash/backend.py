"""Where a call runs: the one decision every public entry point makes the same way."""

from __future__ import annotations

import jax


def kernel_mode(interpret: bool | None) -> str:
    """"pallas" (compiled by Mosaic), "interpret" (Pallas' TPU interpret mode) or "reference".

    None: compiled on TPU, interpreted on CPU, the reference path elsewhere (GPU), since these are
    TPU kernels; True/False force interpret mode or compilation. This is the seam where CPU and GPU
    calls can later be routed to the C++ kernels (through the XLA FFI).
    """
    if interpret is not None:
        return "interpret" if interpret else "pallas"
    return {"tpu": "pallas", "cpu": "interpret"}.get(jax.default_backend(), "reference")
