"""The exact merge of partial attention results: the one primitive split-KV decode and the
multi-device decode both go through.

For partials (O_i, LSE_i) over disjoint key sets:  LSE = log(sum_i exp(LSE_i)),
O = sum_i exp(LSE_i - LSE) O_i. Max-shifted, so it cannot overflow; a partial with LSE = -inf (it saw
no key) contributes nothing; a row where every partial is -inf gives O = 0, LSE = -inf.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_flash import cpu_kernels
from pallas_flash.backend import kernel_mode
from pallas_flash.partition import per_shard


def merge_attention_states(o_parts, lse_parts, axis: int = 0, *, interpret: bool | None = None):
    """o_parts [..., P, ..., D] and lse_parts [..., P, ...] with the partials along `axis` (of the LSE;
    the same axis of O). Returns (O in float32, LSE). On CPU (interpret None) the C++ merge runs through
    the XLA FFI, elsewhere (and with interpret=True) this jax.numpy form. Differentiable either way
    (ring attention trains through it): the C++ merge's gradient is that of the jax.numpy form."""
    if kernel_mode(interpret) == "cpu":
        if lse_parts.shape != o_parts.shape[:-1]:
            raise ValueError(f"merge_attention_states: expected lse_parts of shape o_parts.shape[:-1] = "
                             f"{o_parts.shape[:-1]}, got {lse_parts.shape}")
        return _merge_cpu(o_parts, lse_parts, axis % max(lse_parts.ndim, 1))
    return _merge_jnp(o_parts, lse_parts, axis)


def _merge_per_shard(o_parts, lse_parts, axis: int):
    """The C++ merge (an FFI call, opaque to XLA's partitioner) run per shard of the rows: every axis
    but the partials' and D may be sharded (partition.per_shard), the partials stay whole. Inside
    _merge_cpu's custom_vjp: custom_partitioning (per_shard under Auto axes) has no derivative."""
    rows = [f"r{i}" for i in range(lse_parts.ndim)]
    lse_term = ["p" if i == axis else row for i, row in enumerate(rows)]
    kept = [row for i, row in enumerate(rows) if i != axis]
    rule = f"{' '.join(lse_term)} d, {' '.join(lse_term)} -> {' '.join(kept)} d, {' '.join(kept)}"
    if lse_parts.ndim == 1:  # the partials alone: nothing to shard
        return cpu_kernels.merge(o_parts, lse_parts, axis)
    return per_shard(lambda o, lse: cpu_kernels.merge(o, lse, axis), rule, shardable=kept)(o_parts, lse_parts)


def _merge_jnp(o_parts, lse_parts, axis: int):
    lse_parts = lse_parts.astype(jnp.float32)
    row_max = jnp.max(lse_parts, axis=axis, keepdims=True)
    shift = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(lse_parts - shift)  # exp(-inf) = 0 for empty partials
    total = jnp.sum(weights, axis=axis, keepdims=True)
    seen = total != 0  # a NaN partial makes the row NaN (O and LSE), not empty
    safe_total = jnp.where(seen, total, 1.0)
    o = jnp.sum(o_parts.astype(jnp.float32) * (weights / safe_total)[..., None], axis=axis)
    lse = jnp.where(seen, shift + jnp.log(safe_total), -jnp.inf)
    return o, jnp.squeeze(lse, axis=axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _merge_cpu(o_parts, lse_parts, axis):
    return _merge_per_shard(o_parts, lse_parts, axis)


def _merge_cpu_fwd(o_parts, lse_parts, axis):
    return _merge_per_shard(o_parts, lse_parts, axis), (o_parts, lse_parts)


def _merge_cpu_bwd(axis, residuals, cotangents):
    # The merge is a few KiB per row set: recomputing it in jax.numpy for its VJP costs nothing.
    _, vjp = jax.vjp(lambda o, lse: _merge_jnp(o, lse, axis), *residuals)
    return vjp(cotangents)


_merge_cpu.defvjp(_merge_cpu_fwd, _merge_cpu_bwd)
