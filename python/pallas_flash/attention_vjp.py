"""The attention custom_vjp every backend shares: the forward saves (q, k, v, O, LSE), the backward is a
kernel of its own over them (FlashAttention-2: P recomputed from the LSE, never stored)."""

from __future__ import annotations

import functools

import jax


def attention_vjp(forward, backward):
    """attention(static, q, k, v) -> (O, LSE), differentiable in q, k, v, from
    forward(static, q, k, v) -> (O, LSE) and backward(static, q, k, v, o, lse, do) -> (dq, dk, dv).
    static: the hashable, non-differentiable configuration. The LSE is an output for callers, not
    differentiated through (its cotangent is dropped, as FlashAttention's is)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def attention(static, q, k, v):
        return forward(static, q, k, v)

    def attention_fwd(static, q, k, v):
        o, lse = forward(static, q, k, v)
        return (o, lse), (q, k, v, o, lse)

    def attention_bwd(static, residuals, cotangents):
        do, _ = cotangents
        return backward(static, *residuals, do)

    attention.defvjp(attention_fwd, attention_bwd)
    return attention
