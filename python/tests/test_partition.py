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


def _cpp_mesh(axis_type):
    """The 2x2 mesh of the four CPU devices, for a test of the C++ kernels (skipped without them)."""
    if not native.available():
        pytest.skip(f"the C++ kernels are not built: {native.unavailable_reason()}")
    return Mesh(np.array(jax.devices()).reshape(2, 2), ("x", "y"), axis_types=(axis_type,) * 2)


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
@pytest.mark.parametrize("spec", [P("x", "y"), P(("x", "y")), P(None, ("x", "y"))])
def test_sharded_inputs_run_per_shard_on_the_cpp_kernels(axis_type, spec):
    mesh = _cpp_mesh(axis_type)
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


def _paged(cache, table, page_size):
    """The contiguous cache [B, G, C, D] written into a pool at the table's pages."""
    batch, heads, capacity, dim = cache.shape
    pages = cache.reshape(batch, heads, capacity // page_size, page_size, dim).transpose(0, 2, 1, 3, 4)
    pool = jnp.zeros((table.size, heads, page_size, dim), cache.dtype)
    return pool.at[table.reshape(-1)].set(pages.reshape(-1, heads, page_size, dim))


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
@pytest.mark.parametrize("spec", [P("x", "y"), P(("x", "y")), P(None, ("x", "y"))])
def test_sharded_decode_and_merge_run_per_shard_on_the_cpp_kernels(axis_type, spec):
    mesh = _cpp_mesh(axis_type)
    keys = jax.random.split(jax.random.key(3), 5)
    batch, heads_q, heads_kv, tokens, capacity, dim, page = 4, 8, 4, 2, 96, 32, 16
    q = jax.random.normal(keys[0], (batch, heads_q, tokens, dim))
    k_cache = jax.random.normal(keys[1], (batch, heads_kv, capacity, dim))
    v_cache = jax.random.normal(keys[2], (batch, heads_kv, capacity, dim))
    lengths = jnp.array([2, 50, 96, 17], jnp.int32)
    table = jnp.asarray(np.random.default_rng(3).permutation(batch * capacity // page).reshape(batch, -1), jnp.int32)
    k_pool, v_pool = _paged(k_cache, table, page), _paged(v_cache, table, page)
    o_parts = jax.random.normal(keys[3], (batch, 3, heads_q, tokens, dim))
    lse_parts = jax.random.normal(keys[4], (batch, 3, heads_q, tokens)).at[0, :, 0].set(-jnp.inf)

    def put(x, spec):
        return jax.device_put(x, NamedSharding(mesh, spec))

    by_batch, by_heads = P(spec[0]), P(None, *spec[1:])
    calls = {  # name: (function, its operands placed, the single-device operands)
        "contiguous": (lambda q, k, v, n: pf.flash_decode(q, k, v, n, return_lse=True),
                       (put(q, spec), put(k_cache, spec), put(v_cache, spec), put(lengths, by_batch)),
                       (q, k_cache, v_cache, lengths)),
        "paged": (lambda q, k, v, n, t: pf.flash_decode(q, k, v, n, page_table=t, return_lse=True),
                  (put(q, spec), put(k_pool, by_heads), put(v_pool, by_heads), put(lengths, by_batch),
                   put(table, by_batch)), (q, k_pool, v_pool, lengths, table)),
        "merge": (lambda o, lse: pf.merge_attention_states(o, lse, axis=1),
                  (put(o_parts, P(spec[0], None, *spec[1:])), put(lse_parts, P(spec[0], None, *spec[1:]))),
                  (o_parts, lse_parts)),
    }
    with use_cpu_kernels("cpp"):
        for name, (fn, placed, whole) in calls.items():
            want_o, want_lse = fn(*whole)
            compiled = jax.jit(fn).lower(*placed).compile()
            o, lse = compiled(*placed)
            assert not [c for c in COLLECTIVES if c in compiled.as_text()], name
            assert tuple(o.sharding.spec)[:len(spec)] == tuple(spec), name
            np.testing.assert_allclose(o, want_o, rtol=1e-5, atol=1e-5, err_msg=name)
            np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5, err_msg=name)
