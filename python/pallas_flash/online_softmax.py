"""The online-softmax steps shared by the forward and decode kernels, over VMEM refs.

State per query row: row_max (running max of the scaled scores), row_sum (running sum of
exp(score - row_max)) and acc (running sum of exp(score - row_max) * v), all fp32.

Scores arrive in log2 units, S * scale * log2(e): the EUP computes exp2, so exp(x) would cost one
more multiply per score on the VPU (x * log2(e)); folding log2(e) into the scale saves it. The LSE
leaves in natural log, as everywhere else.

row_max and row_sum are kept lane-dense: (rows, 128) with the row's value in every lane. A (rows, 1)
column costs a cross-lane broadcast each time it meets a (rows, block_k) tile and a masked
single-lane store each time it is written; replicated, it meets a tile by tiling (`jnp.tile`), which
copies whole vregs.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

NEG_INF = float("-inf")
LANES = 128
LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)


def stat_shape(rows: int) -> tuple[int, int]:
    """The VMEM scratch shape of one row statistic."""
    return rows, LANES


def lanes(stat, width: int):
    """A (rows, 128) replicated statistic as (rows, width), to meet a tile of that width."""
    if width == LANES:
        return stat
    if width % LANES == 0:
        return jnp.tile(stat, (1, width // LANES))
    if width < LANES:
        return stat[:, :width]
    return jnp.broadcast_to(stat[:, :1], (stat.shape[0], width))


def init_state(row_max_ref, row_sum_ref, acc_ref):
    row_max_ref[...] = jnp.full(row_max_ref.shape, NEG_INF, jnp.float32)
    row_sum_ref[...] = jnp.zeros(row_sum_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)


def update_state(s, v, row_max_ref, row_sum_ref, acc_ref, *, first: bool = False):
    """Folds one block of masked scores s in log2 units (rows, block_k; -inf where masked) and its
    values v (block_k, D) into the state: rescale by 2^(old max - new max), add the new block.
    first: the state is empty and is written, not read (no init pass over VMEM, no rescale)."""
    block_k, dim = s.shape[1], v.shape[1]
    row_max_block = jnp.max(s, axis=1, keepdims=True)
    if first:
        row_max_next = jnp.broadcast_to(row_max_block, row_max_ref.shape)
    else:
        row_max_prev = row_max_ref[...]
        row_max_next = jnp.maximum(row_max_prev, row_max_block)
    shift = jnp.where(row_max_next == NEG_INF, 0.0, row_max_next)  # a row with nothing visible yet
    p = jnp.exp2(s - lanes(shift, block_k))
    row_sum_block = jnp.sum(p, axis=1, keepdims=True)
    pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    row_max_ref[...] = row_max_next
    if first:
        row_sum_ref[...] = jnp.broadcast_to(row_sum_block, row_sum_ref.shape)
        acc_ref[...] = pv
    else:
        alpha = jnp.exp2(row_max_prev - shift)
        row_sum_ref[...] = alpha * row_sum_ref[...] + row_sum_block
        acc_ref[...] = lanes(alpha, dim) * acc_ref[...] + pv


def finish_state(row_max_ref, row_sum_ref, acc_ref, sink=None):
    """(O, LSE) in fp32, the LSE in natural log and replicated over 128 lanes. Rows that saw no key:
    O = 0, LSE = -inf (not 0/0); a row that saw a NaN: O = LSE = NaN (a NaN sum is not "nothing seen",
    so that a merge of partials cannot drop it). sink: a logit in log2 units (a scalar) that joins
    every row's denominator and nothing else, as a partial state O = 0, LSE = sink (a row that saw no
    key then gets O = 0 and LSE = the sink's)."""
    row_max, row_sum, acc = row_max_ref[...], row_sum_ref[...], acc_ref[...]
    if sink is not None:
        sink_max = jnp.maximum(row_max, sink)
        shift = jnp.where(sink_max == NEG_INF, 0.0, sink_max)  # a -inf sink on a row that saw nothing
        alpha = jnp.exp2(row_max - shift)  # row_max = -inf gives 0; NaN stays NaN
        row_sum = alpha * row_sum + jnp.exp2(sink - shift)
        acc = acc * lanes(alpha, acc.shape[1])
        row_max = shift
    seen = row_sum != 0.0
    safe_sum = jnp.where(seen, row_sum, 1.0)
    o = acc * lanes(1.0 / safe_sum, acc.shape[1])
    return o, jnp.where(seen, (row_max + jnp.log2(safe_sum)) * LN_2, NEG_INF)


# Row statistics live in HBM lane-dense, one row of N values per head ([B, H, N]): an (N, 1) column
# would be stored in (8, 128) tiles at 128x its size. These two move a statistic between the
# kernels' replicated form (rows, 128) and that row form (1, rows), through one (rows, 128) x
# (128, rows) transpose on the XLU.


def replicated_to_row(stat):
    return stat.T[0:1, :]


def row_to_replicated(row):
    rows = row.shape[1]
    return jnp.broadcast_to(row, (LANES, rows)).T
