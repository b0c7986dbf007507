"""The online-softmax steps shared by the forward and decode kernels, over VMEM refs.

State per query row: row_max (running max of the scaled scores), row_sum (running sum of
exp(score - row_max)) and acc (running sum of exp(score - row_max) * v), all fp32.
"""

from __future__ import annotations

import jax.numpy as jnp

NEG_INF = float("-inf")


def init_state(row_max_ref, row_sum_ref, acc_ref):
    row_max_ref[...] = jnp.full(row_max_ref.shape, NEG_INF, jnp.float32)
    row_sum_ref[...] = jnp.zeros(row_sum_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)


def update_state(s, v, row_max_ref, row_sum_ref, acc_ref):
    """Folds one block of masked, scaled scores s (rows, block_k; -inf where masked) and its values
    v (block_k, D) into the state: rescale by exp(old max - new max), add the new block."""
    row_max_prev = row_max_ref[...]
    row_max_next = jnp.maximum(row_max_prev, jnp.max(s, axis=1, keepdims=True))
    shift = jnp.where(row_max_next == NEG_INF, 0.0, row_max_next)  # a row with nothing visible yet
    p = jnp.exp(s - shift)
    alpha = jnp.exp(row_max_prev - shift)
    row_sum_ref[...] = alpha * row_sum_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    row_max_ref[...] = row_max_next
    acc_ref[...] = alpha * acc_ref[...] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)


def finish_state(row_max_ref, row_sum_ref, acc_ref):
    """(O, LSE) in fp32. Rows that saw no key: O = 0, LSE = -inf (not 0/0)."""
    row_sum = row_sum_ref[...]
    seen = row_sum > 0.0
    safe_sum = jnp.where(seen, row_sum, 1.0)
    return acc_ref[...] / safe_sum, jnp.where(seen, row_max_ref[...] + jnp.log(safe_sum), NEG_INF)


# Row statistics live in HBM lane-dense, one row of N values per head ([B, H, N]): an (N, 1) column
# would be stored in (8, 128) tiles at 128x its size. These two move a statistic between the kernels'
# column form (rows, 1) and that row form (1, rows), through one (rows, 128) x (128, rows) transpose
# on the XLU.
LANES = 128


def column_to_row(column):
    rows = column.shape[0]
    return jnp.broadcast_to(column, (rows, LANES)).T[0:1, :]


def row_to_column(row):
    rows = row.shape[1]
    return jnp.broadcast_to(row, (LANES, rows)).T[:, 0:1]
