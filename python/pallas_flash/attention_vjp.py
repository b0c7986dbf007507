"""The attention custom_vjp every backend shares: the forward saves (q, k, v, O, LSE), the backward is a
kernel of its own over them (FlashAttention-2: P recomputed from the LSE, never stored)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def sink_gradient(sinks, o, lse, do):
    """d loss / d sinks [Hq] from O, LSE [B, Hq, Nq] (the LSE with the sinks in it) and dO: a sink's
    share of row i's denominator is exp(sink - LSE_i), and d O_i / d sink = -exp(sink - LSE_i) O_i, so
    d sink = -sum_i exp(sink - LSE_i) * rowsum(dO_i * O_i) over the batch and the head's rows."""
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
    share = jnp.exp(sinks.astype(jnp.float32)[None, :, None] - lse)
    return -jnp.sum(share * delta, axis=(0, 2)).astype(sinks.dtype)


def attention_vjp(forward, backward):
    """attention(static, q, k, v, sinks, segment_ids) -> (O, LSE), differentiable in q, k, v and sinks,
    from forward(static, q, k, v, sinks, segment_ids) -> (O, LSE) and
    backward(static, q, k, v, segment_ids, o, lse, do) -> (dq, dk, dv). static: the hashable,
    non-differentiable configuration; sinks ([Hq] logits, or None) and segment_ids (a pair of int32
    arrays, or None) are operands. The LSE is an output for callers, not differentiated through (its
    cotangent is dropped, as FlashAttention's is). The sinks' gradient needs nothing of the backward
    kernels: it is sink_gradient of the saved O and LSE."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def attention(static, q, k, v, sinks, segment_ids):
        return forward(static, q, k, v, sinks, segment_ids)

    def attention_fwd(static, q, k, v, sinks, segment_ids):
        o, lse = forward(static, q, k, v, sinks, segment_ids)
        return (o, lse), (q, k, v, sinks, segment_ids, o, lse)

    def attention_bwd(static, residuals, cotangents):
        q, k, v, sinks, segment_ids, o, lse = residuals
        do, _ = cotangents
        dq, dk, dv = backward(static, q, k, v, segment_ids, o, lse, do)
        dsinks = None if sinks is None else sink_gradient(sinks, o, lse, do)
        return dq, dk, dv, dsinks, None

    attention.defvjp(attention_fwd, attention_bwd)
    return attention
