"""Plain jax.numpy attention: the tests' oracle and the path off TPU and CPU (reference_attention, float32
at highest precision, every mask the kernels take) and the materialising baseline the benchmark runs
(naive_attention, as a user would write it)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_flash.mask import Mask, soft_cap


def causal_mask(seq_q: int, seq_k: int) -> jax.Array:
    """Bottom-right aligned (FlashAttention >= 2.1): query i sees keys j <= i + seq_k - seq_q."""
    return jnp.asarray(Mask.bottom_right(seq_q, seq_k, causal=True).dense(seq_q, seq_k))


def masked_attention(scores, v, sinks=None):
    """softmax(scores) v over the last axis of scaled scores [..., rows, keys] (-inf where masked) and
    v [..., keys, D], in float32. sinks: a logit per row (broadcastable to scores.shape[:-1]) added to
    the softmax's denominator only (attention sinks). Rows with no visible key give O = 0 and LSE =
    -inf (the sink's logit with sinks), not NaN. Returns (O, LSE)."""
    row_max = jnp.max(scores, axis=-1)
    if sinks is not None:
        sinks = jnp.broadcast_to(jnp.asarray(sinks, jnp.float32), row_max.shape)
        row_max = jnp.maximum(row_max, sinks)
    shift = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    probs = jnp.exp(scores - shift[..., None])
    row_sum = jnp.sum(probs, axis=-1)
    if sinks is not None:
        row_sum = row_sum + jnp.exp(sinks - shift)
    seen = row_sum != 0  # NaN (a NaN seen) is not "nothing seen": O and LSE stay NaN
    safe_sum = jnp.where(seen, row_sum, 1.0)
    out = jnp.einsum("...qk,...kd->...qd", probs, v.astype(jnp.float32), precision="highest") / safe_sum[..., None]
    return out, jnp.where(seen, shift + jnp.log(safe_sum), -jnp.inf)


def visibility(mask: Mask, seq_q: int, seq_k: int, segment_ids=None):
    """[B or 1, 1, Nq, Nk] bool: the geometry's dense mask and, with segment_ids = (q_ids [B, Nq],
    kv_ids [B, Nk]), equal segments."""
    visible = jnp.asarray(mask.dense(seq_q, seq_k))[None, None]
    if segment_ids is not None:
        q_ids, kv_ids = segment_ids
        visible = visible & (q_ids[:, None, :, None] == kv_ids[:, None, None, :])
    return visible


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "return_lse", "mask", "logits_soft_cap"))
def reference_attention(q, k, v, *, causal: bool = False, sm_scale: float | None = None, return_lse: bool = False,
                        mask: Mask | None = None, segment_ids=None, logits_soft_cap: float | None = None, sinks=None,
                        bias=None, dense_mask=None):
    """softmax(cap(Q K^T * scale + bias) + M) V for [B, H, N, D] arrays, in float32, materialising the scores.

    mask: the geometry (mask.Mask); default: bottom-right causal or full, from `causal`.
    segment_ids: (q_ids [B, Nq], kv_ids [B, Nk]) int32, a query seeing keys of its own segment.
    logits_soft_cap: cap * tanh(s / cap) on the scaled (and biased) scores. sinks: [Hq] logits added
    to each row's denominator. bias: additive, broadcastable to [B, Hq, Nq, Nk]; dense_mask: bool,
    broadcastable to it, True where a score is kept.
    GQA/MQA: k and v may have fewer heads than q (a divisor of it). Rows with no visible key give 0
    (and LSE -inf, or the sink's logit), not NaN. The value head dim may differ from the key's.
    Returns O in q's dtype, and (O, LSE) with return_lse.
    """
    batch, heads_q, seq_q, head_dim = q.shape
    heads_kv, seq_k = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    mask = Mask.bottom_right(seq_q, seq_k, causal=causal) if mask is None else mask
    group = heads_q // heads_kv
    k = jnp.repeat(k, group, axis=1).astype(jnp.float32)
    v = jnp.repeat(v, group, axis=1)
    scores = jnp.einsum("bhqd,bhkd->bhqk", q.astype(jnp.float32), k, precision="highest") * scale
    if bias is not None:
        scores = scores + jnp.asarray(bias, jnp.float32)
    scores = soft_cap(scores, logits_soft_cap)
    visible = visibility(mask, seq_q, seq_k, segment_ids)
    if dense_mask is not None:
        visible = visible & dense_mask
    scores = jnp.where(visible, scores, -jnp.inf)
    sink_rows = None if sinks is None else jnp.asarray(sinks, jnp.float32)[None, :, None]
    out, lse = masked_attention(scores, v, sink_rows)
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
