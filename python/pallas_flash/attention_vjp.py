"""The attention custom_vjp every backend shares: the forward saves (q, k, v, O, LSE), the backward is a
kernel of its own over them (FlashAttention-2: P recomputed from the LSE, never stored)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_flash.partition import AutoAxes, per_shard


def sink_gradient(sinks, o, lse, do):
    """d loss / d sinks [Hq] from O, LSE [B, Hq, Nq] (the LSE with the sinks in it) and dO: a sink's
    share of row i's denominator is exp(sink - LSE_i), and d O_i / d sink = -exp(sink - LSE_i) O_i, so
    d sink = -sum_i exp(sink - LSE_i) * rowsum(dO_i * O_i) over the batch and the head's rows."""
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
    share = jnp.exp(sinks.astype(jnp.float32)[None, :, None] - lse)
    return -jnp.sum(share * delta, axis=(0, 2)).astype(sinks.dtype)


def _optional(sinks, segment_ids) -> tuple[str, list]:
    """The rule terms and operands of the optional inputs: sinks [Hq], segment ids (q_ids [B, Nq'],
    kv_ids [B, Nk'], their own lengths: a kernel may take them padded to whole blocks)."""
    terms, operands = "", []
    if sinks is not None:
        terms, operands = terms + ", h", operands + [sinks]
    if segment_ids is not None:
        terms, operands = terms + ", b s, b t", operands + list(segment_ids)
    return terms, operands


def _unpack_optional(rest, has_sinks: bool, has_segments: bool):
    sinks = rest[0] if has_sinks else None
    segment_ids = tuple(rest[int(has_sinks):]) if has_segments else None
    return sinks, segment_ids


def sharded_forward(forward, static, q, k, v, sinks, segment_ids, *, auto: AutoAxes = AutoAxes.PARTITION):
    """forward(static, ...) run per shard of q, k, v split over batch or heads (partition.per_shard)."""
    terms, optional = _optional(sinks, segment_ids)
    flags = sinks is not None, segment_ids is not None

    def kernel(q, k, v, *rest):
        return forward(static, q, k, v, *_unpack_optional(rest, *flags))

    rule = f"b h n d, b g m d, b g m e{terms} -> b h n e, b h n"
    return per_shard(kernel, rule, auto=auto)(q, k, v, *optional)


def sharded_backward(backward, static, q, k, v, segment_ids, o, lse, do, *, auto: AutoAxes = AutoAxes.PARTITION):
    """backward(static, ...) per shard, as sharded_forward."""
    terms, optional = _optional(None, segment_ids)

    def kernel(q, k, v, o, lse, do, *rest):
        return backward(static, q, k, v, _unpack_optional(rest, False, segment_ids is not None)[1], o, lse, do)

    rule = f"b h n d, b g m d, b g m e, b h n e, b h n, b h n e{terms} -> b h n d, b g m d, b g m e"
    return per_shard(kernel, rule, auto=auto)(q, k, v, o, lse, do, *optional)


def attention_vjp(forward, backward, auto_axes=lambda static: AutoAxes.PARTITION):
    """attention(static, q, k, v, sinks, segment_ids) -> (O, LSE), differentiable in q, k, v and sinks,
    from forward(static, q, k, v, sinks, segment_ids) -> (O, LSE) and
    backward(static, q, k, v, segment_ids, o, lse, do) -> (dq, dk, dv). static: the hashable,
    non-differentiable configuration; sinks ([Hq] logits, or None) and segment_ids (a pair of int32
    arrays, or None) are operands. The LSE is an output for callers, not differentiated through (its
    cotangent is dropped, as FlashAttention's is). The sinks' gradient needs nothing of the backward
    kernels: it is sink_gradient of the saved O and LSE. Both kernels run per shard where q, k, v
    are split over batch or heads (partition.per_shard); auto_axes(static) says what they do under
    Auto mesh axes."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def attention(static, q, k, v, sinks, segment_ids):
        return sharded_forward(forward, static, q, k, v, sinks, segment_ids, auto=auto_axes(static))

    def attention_fwd(static, q, k, v, sinks, segment_ids):
        o, lse = sharded_forward(forward, static, q, k, v, sinks, segment_ids, auto=auto_axes(static))
        return (o, lse), (q, k, v, sinks, segment_ids, o, lse)

    def attention_bwd(static, residuals, cotangents):
        q, k, v, sinks, segment_ids, o, lse = residuals
        do, _ = cotangents
        dq, dk, dv = sharded_backward(backward, static, q, k, v, segment_ids, o, lse, do,
                                      auto=auto_axes(static))
        dsinks = None if sinks is None else sink_gradient(sinks, o, lse, do)
        return dq, dk, dv, dsinks, None

    attention.defvjp(attention_fwd, attention_bwd)
    return attention
