"""Lowering for the real chip without one: jax.export for the `tpu` platform runs the Pallas ->
Mosaic lowering. For 128-aligned shapes the exported module must be the Mosaic custom call on the
inputs as they are: no pad, copy, transpose or slice of q, k, v around it (the copy trap)."""

import re

import jax
import jax.numpy as jnp
import pytest
from jax import export

from pallas_flash import flash_attention

COPY_OPS = ("stablehlo.pad", "stablehlo.transpose", "stablehlo.copy", "stablehlo.slice", "stablehlo.concatenate",
            "stablehlo.gather", "stablehlo.dynamic_slice")


def export_tpu(fn, *shapes):
    return export.export(jax.jit(fn), platforms=["tpu"])(*shapes).mlir_module()


def ops(module_text):
    return set(re.findall(r"stablehlo\.[a-z_]+", module_text))


def mosaic_calls(module_text):
    return len(re.findall(r"custom_call @tpu_custom_call", module_text))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_forward_lowers_to_one_mosaic_call_without_copies(causal):
    q = jax.ShapeDtypeStruct((1, 8, 1024, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 2, 1024, 128), jnp.bfloat16)
    text = export_tpu(lambda q, k, v: flash_attention(q, k, v, causal=causal, interpret=False), q, kv, kv)
    assert mosaic_calls(text) == 1
    assert ops(text) == {"stablehlo.custom_call"}


def test_backward_lowers_to_mosaic_calls_without_copies():
    q = jax.ShapeDtypeStruct((1, 8, 1024, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 2, 1024, 128), jnp.bfloat16)

    def loss(q, k, v):
        return jnp.sum(flash_attention(q, k, v, causal=True, interpret=False).astype(jnp.float32))

    text = export_tpu(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv)
    assert mosaic_calls(text) == 3  # forward, dK/dV, dQ
    assert not ops(text) & set(COPY_OPS), ops(text) & set(COPY_OPS)


def test_unaligned_shapes_pad_once():
    # The check above can fail: unaligned shapes do pad (and slice the result).
    q = jax.ShapeDtypeStruct((1, 8, 1000, 96), jnp.bfloat16)
    text = export_tpu(lambda q, k, v: flash_attention(q, k, v, interpret=False), q, q, q)
    assert "stablehlo.pad" in ops(text) and mosaic_calls(text) == 1


def test_decode_lowers_without_copying_the_cache():
    from pallas_flash import flash_decode

    q = jax.ShapeDtypeStruct((2, 32, 1, 128), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((2, 8, 32768, 128), jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
    text = export_tpu(lambda q, k, v, n: flash_decode(q, k, v, n, interpret=False), q, cache, cache, lengths)
    assert mosaic_calls(text) == 1
    # Only the split merge (elementwise and reductions) and q's free reshape surround the kernel.
    assert not ops(text) & set(COPY_OPS), ops(text) & set(COPY_OPS)
