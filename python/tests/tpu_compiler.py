"""Whether the TPU compiler (libtpu, the `[v5e]` extra) is installed: the tests that compile for a v5e
skip without it, with a message (the oldest-JAX run of scripts/test.sh has no libtpu)."""

import importlib.util

import pytest

HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None

requires_libtpu = pytest.mark.skipif(
    not HAVE_LIBTPU, reason="needs the TPU compiler, libtpu: pip install \"./python[v5e]\" (jax[tpu]==0.10.2)")
