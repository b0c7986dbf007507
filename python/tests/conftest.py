"""Every test runs on the CPU with four simulated devices (for the 2x2 mesh), before JAX starts."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_enable_x64", False)
