"""The Pallas split-KV decode kernel (TPU interpret mode) and its 2x2-mesh sharding, against the
reference over each sequence's visible cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_flash import flash_decode, reference_attention, sharded_flash_decode


def make_cache(batch, heads_q, heads_kv, tokens, dim, max_len, dtype=jnp.float32):
    seed = np.random.default_rng().integers(2**31)
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(kq, (batch, heads_q, tokens, dim)).astype(dtype)
    k = jax.random.normal(kk, (batch, heads_kv, max_len, dim)).astype(dtype)
    v = jax.random.normal(kv, (batch, heads_kv, max_len, dim)).astype(dtype)
    return q, k, v


def expected(q, k, v, lengths):
    """Per sequence: causal attention of its T new tokens over its first `length` positions."""
    outs, lses = [], []
    for b, length in enumerate(np.asarray(lengths)):
        o, lse = reference_attention(q[b : b + 1], k[b : b + 1, :, :length], v[b : b + 1, :, :length], causal=True,
                                     return_lse=True)
        outs.append(o)
        lses.append(lse)
    return jnp.concatenate(outs), jnp.concatenate(lses)


def assert_matches(o, lse, q, k, v, lengths, tol=1e-5):
    want_o, want_lse = expected(q, k, v, lengths)
    np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(want_o, np.float32), rtol=tol, atol=tol)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits", [1, 2, 3, 8])
@pytest.mark.parametrize("heads", [(2, 2), (8, 2), (8, 1)], ids=["mha", "gqa4", "mqa"])
def test_decode_matches_reference_for_any_split(heads, splits):
    q, k, v = make_cache(3, heads[0], heads[1], 1, 64, 1024)
    lengths = jnp.array([1, 129, 1024], jnp.int32)  # one token, one past a block, the full cache
    o, lse = flash_decode(q, k, v, lengths, num_splits=splits, return_lse=True)
    assert_matches(o, lse, q, k, v, lengths)


@pytest.mark.parametrize("tokens", [2, 16])
def test_multi_token_queries_are_causal_among_themselves(tokens):
    q, k, v = make_cache(2, 4, 2, tokens, 32, 256)
    lengths = jnp.array([tokens, 200], jnp.int32)
    o, lse = flash_decode(q, k, v, lengths, num_splits=2, return_lse=True)
    assert_matches(o, lse, q, k, v, lengths)


def test_bf16_cache_and_short_unaligned_cache():
    q, k, v = make_cache(2, 4, 4, 1, 96, 200, jnp.bfloat16)  # 200 rows: one block, no copy
    lengths = jnp.array([7, 200], jnp.int32)
    o = flash_decode(q, k, v, lengths)
    want, _ = expected(q, k, v, lengths)
    assert o.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("mesh_shape", [(2, 2), (1, 1), (1, 4)])
def test_sharded_decode_matches_single_device(mesh_shape):
    # Sizes kept so each device's cache shard is at most 64 KiB: larger shards hang JAX 0.10.2's TPU
    # interpret mode under shard_map on a 2-core host (not the kernel: a compiled TPU run has no such limit).
    mesh = jax.make_mesh(mesh_shape, ("x", "y"))
    q, k, v = make_cache(2, 4, 2, 1, 32, 512)  # four shards of 128 positions
    lengths = jnp.array([300, 100], jnp.int32)  # uneven: the second sequence leaves three shards empty
    o, lse = sharded_flash_decode(q, k, v, lengths, mesh, return_lse=True)
    assert_matches(o, lse, q, k, v, lengths)
    single_o, single_lse = flash_decode(q, k, v, lengths, return_lse=True)
    np.testing.assert_allclose(o, single_o, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, single_lse, rtol=1e-5, atol=1e-5)


def test_sharded_decode_multi_token_gqa_on_2x2():
    mesh = jax.make_mesh((2, 2), ("x", "y"))
    q, k, v = make_cache(1, 8, 2, 3, 32, 512)
    lengths = jnp.array([257], jnp.int32)  # the new tokens straddle the shard boundary at 256
    o, lse = sharded_flash_decode(q, k, v, lengths, mesh, num_splits=1, return_lse=True)
    assert_matches(o, lse, q, k, v, lengths)


@pytest.mark.parametrize("tokens", [1, 3])
def test_a_python_int_length_is_every_sequences_length(tokens):
    # Known at trace time (no SMEM read): the same result as the array of that length.
    q, k, v = make_cache(2, 4, 2, tokens, 32, 512)
    o, lse = flash_decode(q, k, v, 300, num_splits=2, return_lse=True)
    assert_matches(o, lse, q, k, v, jnp.array([300, 300], jnp.int32))
    mesh = jax.make_mesh((2, 2), ("x", "y"))
    q, k, v = make_cache(1, 4, 2, tokens, 32, 512)
    o, lse = sharded_flash_decode(q, k, v, 512, mesh, num_splits=1, return_lse=True)  # a full cache
    assert_matches(o, lse, q, k, v, jnp.array([512], jnp.int32))


@pytest.mark.parametrize(
    "q_shape, cache_shape, lengths, message",
    [
        ((1, 2, 17, 32), (1, 2, 256, 32), [1], "1..16 query tokens"),
        ((1, 3, 1, 32), (1, 2, 256, 32), [1], "Hkv dividing Hq"),
        ((1, 2, 1, 32), (1, 2, 256, 32), [1, 2], "lengths of shape"),
        ((1, 2, 1, 32), (1, 2, 3000, 32), [1], "multiple of 128"),
    ],
)
def test_bad_decode_inputs_raise(q_shape, cache_shape, lengths, message):
    with pytest.raises(ValueError, match=message):
        flash_decode(jnp.zeros(q_shape), jnp.zeros(cache_shape), jnp.zeros(cache_shape), jnp.array(lengths, jnp.int32))


def test_an_int_length_past_the_cache_is_rejected():
    z = jnp.zeros((1, 2, 256, 32))
    with pytest.raises(ValueError, match="int length in 0..Nmax=256"):
        flash_decode(jnp.zeros((1, 2, 1, 32)), z, z, 257)


def test_sharded_decode_needs_divisible_cache():
    mesh = jax.make_mesh((2, 2), ("x", "y"))
    z = jnp.zeros((1, 2, 130, 32))
    with pytest.raises(ValueError, match="divisible by the 4 devices"):
        sharded_flash_decode(jnp.zeros((1, 2, 1, 32)), z, z, jnp.array([5], jnp.int32), mesh)


def test_off_tpu_and_cpu_the_reference_path_runs(monkeypatch):
    # On a GPU backend the TPU kernels are not used: decode and the sharded decode take plain jax.numpy.
    mesh = jax.make_mesh((2, 2), ("x", "y"))
    q, k, v = make_cache(2, 4, 2, 2, 32, 512)
    lengths = jnp.array([300, 2], jnp.int32)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    o, lse = flash_decode(q, k, v, lengths, return_lse=True)
    assert_matches(o, lse, q, k, v, lengths)
    o, lse = sharded_flash_decode(q, k, v, lengths, mesh, return_lse=True)
    assert_matches(o, lse, q, k, v, lengths)
