"""The oracle against float64 numpy, so it cannot share a mistake with the kernels."""

import numpy as np
import pytest

from pallas_flash import reference_attention


def numpy_attention(q, k, v, causal, scale):
    group = q.shape[1] // k.shape[1]
    k = np.repeat(k, group, axis=1)
    v = np.repeat(v, group, axis=1)
    s = np.einsum("bhqd,bhkd->bhqk", q, k) * scale
    nq, nk = q.shape[2], k.shape[2]
    if causal:
        visible = np.arange(nk)[None, :] <= np.arange(nq)[:, None] + (nk - nq)
        s = np.where(visible, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m)
    l = p.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bhkd->bhqd", p, v) / np.where(l > 0, l, 1)
    lse = np.where(l[..., 0] > 0, m[..., 0] + np.log(np.where(l[..., 0] > 0, l[..., 0], 1)), -np.inf)
    return o, lse


@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_float64_numpy(causal):
    rng = np.random.default_rng()
    q = rng.standard_normal((2, 4, 9, 16)).astype(np.float32)
    k = rng.standard_normal((2, 2, 5, 16)).astype(np.float32)
    v = rng.standard_normal((2, 2, 5, 16)).astype(np.float32)
    o, lse = reference_attention(q, k, v, causal=causal, sm_scale=0.3, return_lse=True)
    want_o, want_lse = numpy_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), causal, 0.3)
    np.testing.assert_allclose(np.asarray(o), want_o, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), want_lse, rtol=1e-5, atol=1e-5)
    if causal:  # Nq = 9 > Nk = 5: the first four rows see no key
        assert np.all(np.asarray(o)[:, :, :4] == 0) and np.all(np.isneginf(np.asarray(lse)[:, :, :4]))


def test_reference_two_keys_by_hand():
    q = np.array([[[[1.0, 0.0]]]], np.float32)
    k = np.array([[[[1.0, 0.0], [0.0, 1.0]]]], np.float32)
    v = np.array([[[[3.0, 5.0], [-1.0, 7.0]]]], np.float32)
    o = np.asarray(reference_attention(q, k, v, sm_scale=2.0))
    w0 = np.exp(2.0) / (np.exp(2.0) + 1.0)
    np.testing.assert_allclose(o[0, 0, 0], [3 * w0 - (1 - w0), 5 * w0 + 7 * (1 - w0)], rtol=1e-6)
