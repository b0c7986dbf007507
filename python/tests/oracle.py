"""The tests' float64 oracle: attention with every mask and score option, materialised in NumPy, and its
analytic gradients. Independent of the package's own reference (jax.numpy, float32) and kernels: only
mask.Mask.dense, the geometry's definition, is shared."""

from __future__ import annotations

import math

import numpy as np


def _visible(mask, seq_q, seq_k, segment_ids, batch):
    visible = np.broadcast_to(mask.dense(seq_q, seq_k)[None, None], (batch, 1, seq_q, seq_k))
    if segment_ids is not None:
        q_ids, kv_ids = (np.asarray(x) for x in segment_ids)
        visible = visible & (q_ids[:, None, :, None] == kv_ids[:, None, None, :])
    return visible


def attention(q, k, v, mask, *, scale=None, segment_ids=None, soft_cap=None, sinks=None, do=None):
    """q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] (any dtype, taken as float64).
    Returns {"o", "lse"} and, with do, {"dq", "dk", "dv", "dsinks"}. Rows with no visible key: O = 0,
    LSE = -inf (or the sink)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, heads_q, seq_q, dim = q.shape
    heads_kv, seq_k = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    kr, vr = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = np.einsum("bhqd,bhkd->bhqk", q, kr) * scale
    c = s if soft_cap is None else soft_cap * np.tanh(s / soft_cap)
    visible = _visible(mask, seq_q, seq_k, segment_ids, batch)
    logits = np.where(visible, c, -np.inf)
    row_max = logits.max(axis=-1)
    sink = None if sinks is None else np.asarray(sinks, np.float64)[None, :, None]
    if sink is not None:
        row_max = np.maximum(row_max, sink)
    shift = np.where(np.isfinite(row_max), row_max, 0.0)
    e = np.exp(logits - shift[..., None])
    total = e.sum(axis=-1) + (0.0 if sink is None else np.exp(sink - shift))
    seen = total > 0
    safe = np.where(seen, total, 1.0)
    p = e / safe[..., None]
    o = np.einsum("bhqk,bhkd->bhqd", p, vr)
    lse = np.where(seen, shift + np.log(safe), -np.inf)
    out = {"o": o, "lse": lse}
    if do is None:
        return out
    do = np.asarray(do, np.float64)
    dv = np.einsum("bhqk,bhqd->bhkd", p, do)
    dp = np.einsum("bhqd,bhkd->bhqk", do, vr)
    delta = (do * o).sum(axis=-1)
    dc = p * (dp - delta[..., None])
    ds = dc if soft_cap is None else dc * (1.0 - np.tanh(s / soft_cap) ** 2)
    dq = np.einsum("bhqk,bhkd->bhqd", ds, kr) * scale
    dk = np.einsum("bhqk,bhqd->bhkd", ds, q) * scale
    fold = lambda x: x.reshape(batch, heads_kv, group, *x.shape[2:]).sum(axis=2)  # noqa: E731
    out.update(dq=dq, dk=fold(dk), dv=fold(dv))
    if sink is not None:
        p_sink = np.where(seen, np.exp(sink - np.where(seen, lse, 0.0)), 0.0)
        out["dsinks"] = -(p_sink * delta).sum(axis=(0, 2))
    return out


def rel_err(x, ref, floor=1e-2):
    """||x - ref|| / ||ref|| in float64, the norm floored at an RMS of `floor` per element: a gradient
    that is 0 in exact arithmetic (a row that sees only itself: dQ = 0) comes out as rounding noise."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    norm = max(np.linalg.norm(ref), floor * np.sqrt(ref.size))
    return np.linalg.norm(x - ref) / norm


def assert_lse_close(lse, ref_lse, tol=1e-5):
    lse, ref_lse = np.asarray(lse, np.float64), np.asarray(ref_lse)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=tol, atol=tol)
