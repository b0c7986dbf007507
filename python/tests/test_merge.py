import jax.numpy as jnp
import numpy as np
import pytest

from pallas_flash import merge_attention_states, reference_attention


@pytest.mark.both_cpu_kernels
def test_merge_of_key_partitions_equals_attention_over_all_keys():
    rng = np.random.default_rng()
    q = rng.standard_normal((1, 2, 3, 16)).astype(np.float32)
    k = rng.standard_normal((1, 2, 50, 16)).astype(np.float32)
    v = rng.standard_normal((1, 2, 50, 16)).astype(np.float32)
    cuts = sorted(rng.choice(np.arange(1, 50), size=3, replace=False))
    bounds = [0, *cuts, 50]
    parts = [reference_attention(q, k[:, :, a:b], v[:, :, a:b], return_lse=True) for a, b in zip(bounds, bounds[1:])]
    o, lse = merge_attention_states(jnp.stack([p[0] for p in parts]), jnp.stack([p[1] for p in parts]))
    want_o, want_lse = reference_attention(q, k, v, return_lse=True)
    np.testing.assert_allclose(o, want_o, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)
    # commutative: any order of the partials gives the same result
    order = rng.permutation(len(parts))
    o2, _ = merge_attention_states(jnp.stack([parts[i][0] for i in order]), jnp.stack([parts[i][1] for i in order]))
    np.testing.assert_allclose(o2, o, rtol=1e-6, atol=1e-6)


@pytest.mark.both_cpu_kernels
def test_empty_partials_contribute_nothing_and_all_empty_gives_zero():
    o_parts = jnp.array([[[1.0, 2.0]], [[100.0, 100.0]]])  # [P=2, rows=1, D=2]
    lse_parts = jnp.array([[0.5], [-jnp.inf]])
    o, lse = merge_attention_states(o_parts, lse_parts)
    np.testing.assert_allclose(o, [[1.0, 2.0]])
    np.testing.assert_allclose(lse, [0.5])
    o, lse = merge_attention_states(o_parts, jnp.full((2, 1), -jnp.inf))
    assert np.all(np.asarray(o) == 0) and np.all(np.isneginf(np.asarray(lse)))


@pytest.mark.both_cpu_kernels
def test_merge_is_stable_for_large_lse():
    o, lse = merge_attention_states(jnp.ones((2, 1, 4)), jnp.array([[1e4], [1e4]]))
    np.testing.assert_allclose(o, np.ones((1, 4)))
    np.testing.assert_allclose(lse, [1e4 + np.log(2.0)])


@pytest.mark.both_cpu_kernels
def test_a_nan_partial_makes_its_row_nan_not_empty():
    # Row 0: one NaN partial (a split that saw a NaN) among finite ones; row 1: finite and empty parts.
    o_parts = jnp.ones((3, 2, 1, 4))
    lse_parts = jnp.array([[[0.5], [1.0]], [[jnp.nan], [-jnp.inf]], [[2.0], [-jnp.inf]]])
    o, lse = merge_attention_states(o_parts, lse_parts)
    o, lse = np.asarray(o), np.asarray(lse)
    assert np.isnan(lse[0, 0]) and np.all(np.isnan(o[0, 0]))
    np.testing.assert_allclose(lse[1, 0], 1.0, rtol=1e-6)
    np.testing.assert_allclose(o[1, 0], 1.0, rtol=1e-6)
