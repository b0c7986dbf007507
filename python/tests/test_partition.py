"""Sharded inputs (partition.per_shard): q, k, v split over batch or heads on the four CPU devices run
the kernels per shard, with no collective in the compiled program, and give the single-device result."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import pallas_flash as pf
from pallas_flash import cpu_kernels as native
from pallas_flash.backend import use_cpu_kernels

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def _inputs(batch, heads_q, heads_kv, seq, dim):
    keys = jax.random.split(jax.random.key(7), 3)
    return (jax.random.normal(keys[0], (batch, heads_q, seq, dim)),
            jax.random.normal(keys[1], (batch, heads_kv, seq, dim)),
            jax.random.normal(keys[2], (batch, heads_kv, seq, dim)))


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
@pytest.mark.parametrize("spec", [P("x", "y"), P(("x", "y")), P(None, ("x", "y"))])
def test_sharded_inputs_run_per_shard_on_the_cpp_kernels(axis_type, spec):
    if not native.available():
        pytest.skip(f"the C++ kernels are not built: {native.unavailable_reason()}")
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("x", "y"), axis_types=(axis_type,) * 2)
    q, k, v = _inputs(4, 8, 4, 96, 32)
    loss = lambda q, k, v: jnp.sum(pf.flash_attention(q, k, v, causal=True) * q)  # noqa: E731
    with use_cpu_kernels("cpp"):
        want_o = pf.flash_attention(q, k, v, causal=True)
        want_grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
        placed = [jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v)]
        forward = jax.jit(lambda q, k, v: pf.flash_attention(q, k, v, causal=True))
        o = forward(*placed)
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*placed)
        texts = [forward.lower(*placed).compile().as_text(),
                 jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*placed).compile().as_text()]
    assert tuple(o.sharding.spec)[:len(spec)] == tuple(spec)
    np.testing.assert_allclose(o, want_o, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, want_grads):
        assert tuple(got.sharding.spec)[:len(spec)] == tuple(spec)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    for text in texts:
        assert not [c for c in COLLECTIVES if c in text]


def test_vmap_folds_into_the_batch():
    q, k, v = _inputs(2, 4, 2, 40, 16)
    with use_cpu_kernels("cpp"):
        if not native.available():
            pytest.skip("the C++ kernels are not built")
        batched = jax.vmap(lambda q: pf.flash_attention(q, k, v, causal=True))(jnp.stack([q, 2 * q]))
        np.testing.assert_allclose(batched[1], pf.flash_attention(2 * q, k, v, causal=True), rtol=1e-5, atol=1e-5)


def test_interpret_mode_under_auto_axes_refuses_naming_why():
    # Its simulated DMAs are ordered host callbacks: on several devices they deadlocked XLA's
    # rendezvous; now the trace fails with the reason.
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("x", "y"), axis_types=(AxisType.Auto,) * 2)
    placed = [jax.device_put(x, NamedSharding(mesh, P("x"))) for x in _inputs(4, 2, 2, 16, 16)]
    with pytest.raises(ValueError, match="interpret mode cannot run in a multi-device program"):
        jax.jit(lambda q, k, v: pf.flash_attention(q, k, v, interpret=True)).lower(*placed).compile()
