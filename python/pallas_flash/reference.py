"""Plain jax.numpy attention: the tests' oracle (reference_attention, float32 at highest precision) and
the materialising baseline the benchmark runs (naive_attention, as a user would write it)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def causal_mask(seq_q: int, seq_k: int) -> jax.Array:
    """Bottom-right aligned (FlashAttention >= 2.1): query i sees keys j <= i + seq_k - seq_q."""
    rows = jnp.arange(seq_q)[:, None]
    cols = jnp.arange(seq_k)[None, :]
    return cols <= rows + (seq_k - seq_q)


def masked_attention(scores, v):
    """softmax(scores) v over the last axis of scaled scores [..., rows, keys] (-inf where masked) and
    v [..., keys, D], in float32. Rows with no visible key give O = 0 and LSE = -inf, not NaN.
    Returns (O, LSE)."""
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    shift = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    probs = jnp.exp(scores - shift)
    row_sum = jnp.sum(probs, axis=-1)
    seen = row_sum != 0  # NaN (a NaN seen) is not "nothing seen": O and LSE stay NaN
    safe_sum = jnp.where(seen, row_sum, 1.0)
    out = jnp.einsum("...qk,...kd->...qd", probs, v.astype(jnp.float32), precision="highest") / safe_sum[..., None]
    return out, jnp.where(seen, shift[..., 0] + jnp.log(safe_sum), -jnp.inf)


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "return_lse"))
def reference_attention(q, k, v, *, causal: bool = False, sm_scale: float | None = None, return_lse: bool = False):
    """softmax(Q K^T * scale + M) V for [B, H, N, D] arrays, in float32, materialising the scores.

    GQA/MQA: k and v may have fewer heads than q (a divisor of it). Rows with no visible key give 0
    (and LSE -inf), not NaN. Returns O in q's dtype, and (O, LSE) with return_lse.
    """
    batch, heads_q, seq_q, head_dim = q.shape
    heads_kv, seq_k = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    group = heads_q // heads_kv
    k = jnp.repeat(k, group, axis=1).astype(jnp.float32)
    v = jnp.repeat(v, group, axis=1)
    scores = jnp.einsum("bhqd,bhkd->bhqk", q.astype(jnp.float32), k, precision="highest") * scale
    if causal:
        scores = jnp.where(causal_mask(seq_q, seq_k), scores, -jnp.inf)
    out, lse = masked_attention(scores, v)
    out = out.astype(q.dtype)
    return (out, lse) if return_lse else out


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale"))
def naive_attention(q, k, v, *, causal: bool = False, sm_scale: float | None = None):
    """The baseline FlashAttention is measured against: the scores [B, Hq, Nq, Nk] materialised in
    float32 (MXU products in the inputs' dtype, fp32 accumulation), softmax, then P in the inputs'
    dtype times V. Its memory grows with Nq * Nk: on one 16 GiB v5e it stops compiling long before
    the flash kernels do. GQA by repeating K and V. Rows with no visible key give NaN (as plain
    softmax does)."""
    heads_q, heads_kv, head_dim = q.shape[1], k.shape[1], q.shape[3]
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    k = jnp.repeat(k, heads_q // heads_kv, axis=1)
    v = jnp.repeat(v, heads_q // heads_kv, axis=1)
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if causal:
        scores = jnp.where(causal_mask(q.shape[2], k.shape[2]), scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(q.dtype)
