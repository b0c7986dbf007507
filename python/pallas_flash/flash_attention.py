"""FlashAttention-2 training kernels for the TPU (Pallas/Mosaic): forward and backward.

Forward, grid (B, Nq/block_q, Hq, Nk/block_k), the last axis sequential: a query block stays
resident in VMEM while K/V blocks stream past it (Pallas double-buffers their DMAs); the running
max, running sum and fp32 accumulator live in VMEM scratch; O is written once at the last key block,
the LSE row of every head into one lane-dense [Hq, block_q] block that goes to HBM once per query
block. Backward recomputes P = exp(S * scale - LSE) from the saved LSE in one kernel (grid over key
blocks, queries of every head in the GQA group streamed past) that accumulates dK/dV per key block
and dQ per query block in VMEM; where dQ's accumulators do not fit, dQ has a kernel of its own.
Causal: key blocks entirely above the diagonal are skipped with pl.when, and their index maps are
clamped to the last needed block so that no DMA is issued for them either.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_flash import cpu_kernels
from pallas_flash.attention_vjp import attention_vjp
from pallas_flash.backend import kernel_mode
from pallas_flash.online_softmax import (LANES, LOG2_E, NEG_INF, finish_state, init_state, lanes, replicated_to_row,
                                         row_to_replicated, stat_shape, update_state)
from pallas_flash.planner import BlockSizes, fuses_dq, plan_block_sizes, round_up, vmem_budget_bytes
from pallas_flash.reference import reference_attention


@dataclasses.dataclass(frozen=True)
class _Problem:
    """Static facts every kernel closes over. Lengths are the real ones (before alignment padding)."""

    seq_q: int
    seq_k: int
    sm_scale: float
    causal: bool
    group: int  # query heads per KV head
    interpret: bool

    @property
    def causal_offset(self) -> int:  # query i sees keys j <= i + causal_offset
        return self.seq_k - self.seq_q


# --------------------------------------------------------------------------------------------------
# Shared tile math


def _visible(problem: _Problem, q_start, k_start, block_q: int, block_k: int, transposed: bool = False):
    """(block_q, block_k) mask, or (block_k, block_q) transposed: real key, and (causal) key on or
    below the diagonal. Padded query rows are not masked: their results are sliced away, and in the
    backward their dO (hence dS) is 0."""
    shape, query_axis = ((block_k, block_q), 1) if transposed else ((block_q, block_k), 0)
    rows = q_start + lax.broadcasted_iota(jnp.int32, shape, query_axis)
    cols = k_start + lax.broadcasted_iota(jnp.int32, shape, 1 - query_axis)
    mask = cols < problem.seq_k
    if problem.causal:
        mask &= cols <= rows + problem.causal_offset
    return mask


def _tile_visibility(problem: _Problem, row_start, rows: int, key_start, keys: int):
    """(any_visible, needs_mask) for the tile of queries [row_start, +rows) and keys [key_start, +keys):
    whether any of its scores is visible, and whether any is masked (padded keys of an unaligned Nk,
    or the causal diagonal crossing it). Traced booleans, or Python ones where the answer is static.
    Tiles that need no mask skip its iota, compares and select (~5 VPU operations per score)."""
    any_visible, needs_mask = True, False
    if problem.seq_k % keys:
        needs_mask = key_start + keys > problem.seq_k
    if problem.causal:
        any_visible = key_start <= row_start + rows - 1 + problem.causal_offset
        crosses = key_start + keys - 1 > row_start + problem.causal_offset
        needs_mask = crosses if needs_mask is False else needs_mask | crosses
    return any_visible, needs_mask


def _when(condition, body, *args):
    """body(*args) under pl.when(condition), or directly when the condition is a static True."""
    if condition is True:
        body(*args)
    elif condition is not False:
        pl.when(condition)(lambda: body(*args))


def _when_masked(needs, body):
    """Runs body(masked): with the mask where the tile needs it, without where it does not."""
    if needs is False:
        body(False)
        return
    pl.when(needs)(lambda: body(True))
    pl.when(jnp.logical_not(needs))(lambda: body(False))


def _div(x, divisor: int):
    """max(x, 0) // divisor for grid indices. lax.div on non-negative values lowers to one Mosaic
    integer division (jnp's floor division also needs the sign, which Mosaic only lowers with a TPU
    attached)."""
    return lax.div(jnp.maximum(x, 0), jnp.int32(divisor))


def _last_kv_block(problem: _Problem, q_block, block_q: int, block_k: int, num_kv_blocks: int):
    """Index of the last key block a query block sees (0 if it sees none)."""
    if not problem.causal:
        return num_kv_blocks - 1
    last_key = (q_block + 1) * block_q - 1 + problem.causal_offset
    return jnp.minimum(_div(last_key, block_k), num_kv_blocks - 1)


def _first_q_block(problem: _Problem, kv_block, block_q: int, block_k: int, num_q_blocks: int):
    """Index of the first query block that sees a key block."""
    if not problem.causal:
        return 0
    first_query = kv_block * block_k - problem.causal_offset
    return jnp.minimum(_div(first_query, block_q), num_q_blocks - 1)


def _visited_kv_blocks(problem: _Problem, num_q_blocks: int, block_q: int, block_k: int, num_kv_blocks: int):
    """Per query block, how many key blocks its grid row computes (and fetches): all of them, or
    (causal) up to the diagonal. Python ints, for the kernels' declared cost."""
    if not problem.causal:
        return [num_kv_blocks] * num_q_blocks
    last = [((i + 1) * block_q - 1 + problem.causal_offset) // block_k for i in range(num_q_blocks)]
    return [max(0, min(n, num_kv_blocks - 1)) + 1 for n in last]


def _cost(flops: int, exps: int, bytes_accessed: int):
    """What XLA's cost analysis reports for a kernel (and its scheduler plans with): the MXU work,
    exponentials and HBM traffic of every DMA the grid issues, re-reads of K/V included."""
    return pl.CostEstimate(flops=int(flops), transcendentals=int(exps), bytes_accessed=int(bytes_accessed))


def _scores(problem: _Problem, q, k):
    """S * scale in log2 units, S * scale * log2(e), in fp32 on the MXU: q (block_q, D) x k (block_k, D)^T."""
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return s * (problem.sm_scale * LOG2_E)


def _compiler_params(dimension_semantics):
    # The planner sizes blocks against vmem_budget_bytes(), above Mosaic's default scoped-VMEM
    # limit (16 MiB on v5e): raise the limit to match.
    return pltpu.CompilerParams(dimension_semantics=dimension_semantics, vmem_limit_bytes=vmem_budget_bytes())


def _interpret_arg(problem: _Problem):
    return pltpu.InterpretParams() if problem.interpret else False


# --------------------------------------------------------------------------------------------------
# Forward


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, row_max_ref, row_sum_ref, acc_ref, *, problem, block_q,
                block_k, block_q_compute, num_kv_blocks):
    """One (query block, head, key block) step. The query block is swept in sub-blocks of
    block_q_compute rows, unrolled in one straight-line region: a sub-block's scores (256 x 512 fp32:
    half the vector registers) are reduced and exponentiated while the MXU computes the next
    sub-block's, where one (block_q, block_k) tile would be materialised in VMEM (twice the stores)
    and every pl.when around a sub-block would drain the MXU pipeline."""
    q_block, head, kv_block = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    row_start, key_start = q_block * block_q, kv_block * block_k

    def update(c, masked, first):
        rows = pl.ds(c * block_q_compute, block_q_compute)
        s = _scores(problem, q_ref[rows, :], k_ref[...])
        if masked:
            visible = _visible(problem, row_start + c * block_q_compute, key_start, block_q_compute, block_k)
            s = jnp.where(visible, s, NEG_INF)
        update_state(s, v_ref[...], row_max_ref.at[rows], row_sum_ref.at[rows], acc_ref.at[rows], first=first)

    def step(first: bool):
        # The first key block starts every row's state, even rows that see none of it (-inf, 0).
        _visit_sub_blocks(problem, row_start, key_start, block_q, block_k, block_q_compute,
                          functools.partial(update, first=first), keep_skipped=first)
        if first and problem.causal and problem.seq_k % block_k == 0:
            # A query block that sees no key at all (Nq > Nk): an empty state.
            delta = key_start - row_start - problem.causal_offset
            pl.when(delta > block_q - 1)(lambda: init_state(row_max_ref, row_sum_ref, acc_ref))

    # Key block 0 is every query block's first: it starts the state (no initialising pass over VMEM).
    pl.when(kv_block == 0)(lambda: step(first=True))
    last = _last_kv_block(problem, q_block, block_q, block_k, num_kv_blocks)
    pl.when((kv_block > 0) & (kv_block <= last))(lambda: step(first=False))

    @pl.when(kv_block == num_kv_blocks - 1)
    def _finish():
        o, lse = finish_state(row_max_ref, row_sum_ref, acc_ref)
        o_ref[...] = o.astype(o_ref.dtype)
        lse_ref[pl.ds(head, 1), :] = replicated_to_row(lse)


def _visit_sub_blocks(problem: _Problem, row_start, key_start, block_q: int, block_k: int, rows: int, update, *,
                      keep_skipped: bool = False):
    """Calls update(c, masked) for the sub-blocks c of `rows` query rows of a visited (block_q, block_k)
    tile, unrolled in straight-line regions (a pl.when around a sub-block would drain the MXU
    pipeline): all full without a causal mask or padded keys; else, causal and aligned, one region
    per kind of tile the diagonal crosses (delta = key_start - row_start - offset takes one of
    (block_q + block_k) / gcd values, each a static pattern of skipped, masked and full sub-blocks)
    and one for the full tiles below it; with padded keys (unaligned Nk only), per sub-block at run
    time. keep_skipped: sub-blocks that see nothing are updated anyway (masked)."""
    sub_blocks = block_q // rows

    def sweep(kind):
        for c in range(sub_blocks):
            if kind(c) != "skip" or keep_skipped:
                update(c, kind(c) != "full")

    if not problem.causal and problem.seq_k % block_k == 0:
        sweep(lambda c: "full")
    elif problem.seq_k % block_k:
        for c in range(sub_blocks):
            any_visible, needs_mask = _tile_visibility(problem, row_start + c * rows, rows, key_start, block_k)
            _when(True if keep_skipped else any_visible, _when_masked, needs_mask, functools.partial(update, c))
    else:
        delta = key_start - row_start - problem.causal_offset
        diagonal = _diagonal_tiles(problem, block_q, block_k, rows)
        for d, kind in diagonal:
            pl.when(delta == d)(functools.partial(sweep, kind))
        pl.when(delta < diagonal[0][0])(functools.partial(sweep, lambda c: "full"))


def _diagonal_tiles(problem: _Problem, block_q: int, block_k: int, rows: int):
    """[(delta, sub_block_kind)] for every tile the causal diagonal crosses, in increasing delta =
    key_start - row_start - causal_offset: delta is a multiple of gcd(block_q, block_k) shifted by
    the (static) offset, from -(block_k - 1) (the last tile with a masked score) to block_q - 1 (the
    last with a visible one). sub_block_kind(c) classifies sub-block c (rows c*rows .. +rows)."""
    unit = math.gcd(block_q, block_k)
    first = -(block_k - 1) + (block_k - 1 - problem.causal_offset) % unit

    def kind_of(d):
        def sub_block_kind(c):
            sub = d - c * rows  # the sub-block's own delta
            if sub > rows - 1:
                return "skip"
            return "full" if sub <= -(block_k - 1) else "masked"
        return sub_block_kind

    return [(d, kind_of(d)) for d in range(first, block_q, unit)]


def _forward(problem: _Problem, blocks: BlockSizes, q, k, v):
    """q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D], all aligned. Returns O and LSE [B, Hq, Nq].

    Grid (B, Nq/block_q, Hq, Nk/block_k): the heads run inside a query block so that one LSE block,
    [Hq, block_q] lane-dense, stays in VMEM while every head writes its row and goes to HBM once
    (an [N, 1] column would take 128x its size there, in (8, 128) tiles)."""
    batch, heads_q, seq_q, dim = q.shape
    seq_k = k.shape[2]
    block_q, block_k = blocks.block_q, blocks.block_k
    num_q_blocks, num_kv_blocks = seq_q // block_q, seq_k // block_k
    group = problem.group

    def q_map(b, i, h, j):
        return b, h, i, 0

    def kv_map(b, i, h, j):
        return b, lax.div(h, jnp.int32(group)), jnp.minimum(j, _last_kv_block(problem, i, block_q, block_k, num_kv_blocks)), 0

    def lse_map(b, i, h, j):
        return b, 0, i

    kernel = functools.partial(_fwd_kernel, problem=problem, block_q=block_q, block_k=block_k,
                               block_q_compute=min(blocks.block_q_compute, block_q), num_kv_blocks=num_kv_blocks)
    visited = sum(_visited_kv_blocks(problem, num_q_blocks, block_q, block_k, num_kv_blocks))
    pairs = batch * heads_q * visited * block_q * block_k  # (query, key) score entries computed
    kv_rows = batch * heads_q * visited * block_k  # K and V rows fetched, per query block and head
    itemsize = q.dtype.itemsize
    return pl.pallas_call(
        kernel,
        grid=(batch, num_q_blocks, heads_q, num_kv_blocks),
        in_specs=[
            pl.BlockSpec((None, None, block_q, dim), q_map),
            pl.BlockSpec((None, None, block_k, dim), kv_map),
            pl.BlockSpec((None, None, block_k, dim), kv_map),
        ],
        out_specs=[
            pl.BlockSpec((None, None, block_q, dim), q_map),
            pl.BlockSpec((None, heads_q, block_q), lse_map),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, heads_q, seq_q), jnp.float32),
        ],
        scratch_shapes=[
            pltpu.VMEM(stat_shape(block_q), jnp.float32),  # row_max
            pltpu.VMEM(stat_shape(block_q), jnp.float32),  # row_sum
            pltpu.VMEM((block_q, dim), jnp.float32),  # acc
        ],
        # The LSE block is revisited by every head of a query block: the head axis is sequential.
        compiler_params=_compiler_params(("parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=_interpret_arg(problem),
        cost_estimate=_cost(4 * pairs * dim, pairs,
                            itemsize * (2 * q.size + 2 * kv_rows * dim) + 4 * batch * heads_q * seq_q),
        name="pallas_flash_fwd",
    )(q, k, v)


# --------------------------------------------------------------------------------------------------
# Backward


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *rest, problem, block_q, block_k,
                block_k_compute, num_q_blocks, num_kv_blocks, fused_dq):
    """dK, dV for one key block, the query blocks of its GQA group streamed past, and with fused_dq
    dQ as well. Computed transposed, keys on sublanes and queries on lanes: S^T = K Q^T, so
    dV += P^T dO and dK += dS^T Q are plain products (no transposed tile), the LSE and D_i rows of the
    [heads, block_q] statistics blocks meet the tile by a broadcast over sublanes, and
    dQ^T += K^T dS^T is plain too, with K^T transposed once per key block.

    fused_dq: dQ^T of every query block of the group accumulates in VMEM across the key blocks
    (grid order: key blocks outside, query blocks inside), so S and dP are computed once for all
    three gradients (5 products per tile where a separate dQ kernel recomputes 2 of them: 7); each
    query block's dQ goes to HBM once, after its last key block."""
    if fused_dq:
        dq_hbm_ref, dk_acc_ref, dv_acc_ref, k_t_ref, dq_t_acc_ref, dq_out_ref = rest
    else:
        dk_acc_ref, dv_acc_ref = rest
    batch, head_kv, kv_block, g, q_block = (pl.program_id(i) for i in range(5))
    head_q = head_kv * problem.group + g
    row_start, key_start = q_block * block_q, kv_block * block_k

    @pl.when((g == 0) & (q_block == 0))
    def _init():
        dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
        dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)
        if fused_dq:
            k_t_ref[...] = k_ref[...].astype(jnp.float32).T.astype(k_t_ref.dtype)

    if fused_dq:
        @pl.when(kv_block == 0)
        def _init_dq():
            dq_t_acc_ref[g, q_block] = jnp.zeros(dq_t_acc_ref.shape[2:], jnp.float32)

    def update(key_from: int, keys: int, col_from: int, masked: bool):
        """Key rows [key_from, +keys) of the block against query columns [col_from, block_q), static."""
        rows = slice(None) if keys == block_k else pl.ds(key_from, keys)
        cols = slice(None) if col_from == 0 else pl.ds(col_from, block_q - col_from)
        q, do, k, v = q_ref[cols, :], do_ref[cols, :], k_ref[rows, :], v_ref[rows, :]
        lse = lse_ref[pl.ds(head_q, 1), cols]  # (1, columns)
        s_t = _scores(problem, k, q)  # (keys, columns), log2 units
        if masked:  # on the scores: exp2(-inf) = 0 (a select on P would become a masked matmul)
            visible = _visible(problem, row_start + col_from, key_start + key_from, block_q - col_from, keys,
                               transposed=True)
            s_t = jnp.where(visible, s_t, NEG_INF)
        p_t = jnp.exp2(s_t - jnp.where(lse == NEG_INF, 0.0, lse * LOG2_E))
        dv_acc_ref[rows, :] += jnp.dot(p_t.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp_t = lax.dot_general(v, do, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        ds_t = (p_t * (dp_t - delta_ref[pl.ds(head_q, 1), cols])).astype(q.dtype)
        dk_acc_ref[rows, :] += jnp.dot(ds_t, q, preferred_element_type=jnp.float32)
        if fused_dq:
            dq_t = jnp.dot(k_t_ref[:, rows], ds_t, preferred_element_type=jnp.float32)  # (D, columns)
            dq_t_acc_ref[g, q_block, :, cols] += dq_t

    if problem.causal and problem.seq_k % block_k == 0:
        # On the tiles the diagonal crosses (one static pattern per delta = key_start - row_start -
        # offset), key sub-blocks of block_k_compute rows each compute only the query columns from
        # their first visible one (a 1024 x 1024 diagonal tile: 62% of its products); full tiles whole.
        delta = key_start - row_start - problem.causal_offset
        diagonal = _diagonal_key_sub_blocks(problem, block_q, block_k, block_k_compute)
        for d, sub_blocks in diagonal:
            def sweep(sub_blocks=sub_blocks):
                for sub in sub_blocks:
                    update(*sub)
            pl.when(delta == d)(sweep)
        pl.when(delta < diagonal[0][0])(lambda: update(0, block_k, 0, False))
    else:
        any_visible, needs_mask = _tile_visibility(problem, row_start, block_q, key_start, block_k)
        _when(any_visible, _when_masked, needs_mask, lambda masked: update(0, block_k, 0, masked))

    if fused_dq:
        @pl.when(kv_block == num_kv_blocks - 1)
        def _write_dq():
            # A synchronous copy: 256 KiB at most per query block, ~2% of the kernel on the v5e
            # estimate (the compiler's static profile cannot follow a DMA awaited in a later step).
            dq_out_ref[...] = (dq_t_acc_ref[g, q_block].T * problem.sm_scale).astype(dq_out_ref.dtype)
            pltpu.sync_copy(dq_out_ref, dq_hbm_ref.at[batch, head_q, pl.ds(row_start, block_q)])

    @pl.when((g == problem.group - 1) & (q_block == num_q_blocks - 1))
    def _finish():
        dk_ref[...] = (dk_acc_ref[...] * problem.sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def _diagonal_key_sub_blocks(problem: _Problem, block_q: int, block_k: int, keys: int):
    """[(delta, [(key_from, keys, col_from, masked)])] for every (block_q, block_k) tile the causal
    diagonal crosses, in increasing delta = key_start - row_start - offset (as _diagonal_tiles): per
    key sub-block of `keys` rows, the query columns it must compute, from the first one its first key
    is visible to (rounded down to the 128 lanes), and whether any score there is masked. Query
    column c sees key row r of the tile iff c >= r + delta."""
    unit = math.gcd(block_q, block_k)
    first = -(block_k - 1) + (block_k - 1 - problem.causal_offset) % unit
    patterns = []
    for d in range(first, block_q, unit):
        sub_blocks = []
        for key_from in range(0, block_k, keys):
            if key_from + d > block_q - 1:
                continue  # no column sees any key of this sub-block
            col_from = max(0, key_from + d) // LANES * LANES
            sub_blocks.append((key_from, keys, col_from, col_from < key_from + keys - 1 + d))
        patterns.append((d, sub_blocks))
    return patterns


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_acc_ref, lse_rep_ref, delta_rep_ref, *,
               problem, block_q, block_k, block_q_compute, num_kv_blocks):
    """dQ for one query block, key blocks streamed past. Its LSE (in log2 units) and D_i rows are
    turned into the replicated column form once, at the first key block."""
    head, q_block, kv_block = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    row_start, key_start = q_block * block_q, kv_block * block_k

    @pl.when(kv_block == 0)
    def _init():
        dq_acc_ref[...] = jnp.zeros(dq_acc_ref.shape, jnp.float32)
        lse = lse_ref[pl.ds(head, 1), :]
        lse_rep_ref[...] = row_to_replicated(jnp.where(lse == NEG_INF, 0.0, lse * LOG2_E))
        delta_rep_ref[...] = row_to_replicated(delta_ref[pl.ds(head, 1), :])

    def update(c, masked):  # sub-blocks as in the forward
        k, v = k_ref[...], v_ref[...]
        rows = pl.ds(c * block_q_compute, block_q_compute)
        s = _scores(problem, q_ref[rows, :], k)
        if masked:
            visible = _visible(problem, row_start + c * block_q_compute, key_start, block_q_compute, block_k)
            s = jnp.where(visible, s, NEG_INF)
        p = jnp.exp2(s - lanes(lse_rep_ref[rows, :], block_k))
        dp = lax.dot_general(do_ref[rows, :], v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        ds = p * (dp - lanes(delta_rep_ref[rows, :], block_k))
        dq_acc_ref[rows, :] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(kv_block <= _last_kv_block(problem, q_block, block_q, block_k, num_kv_blocks))
    def _visible_block():
        _visit_sub_blocks(problem, row_start, key_start, block_q, block_k, block_q_compute, update)

    @pl.when(kv_block == num_kv_blocks - 1)
    def _finish():
        dq_ref[...] = (dq_acc_ref[...] * problem.sm_scale).astype(dq_ref.dtype)


def _backward(problem: _Problem, blocks: BlockSizes, q, k, v, o, lse, do):
    # D_i = rowsum(dO_i * O_i), once per row (a cheap elementwise pass XLA fuses), [B, Hq, Nq] like the LSE.
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
    if fuses_dq(blocks, q.shape[2], problem.group, q.shape[3], q.dtype.itemsize):
        return _dkv(problem, blocks, q, k, v, do, lse, delta, fuse_dq=True)
    dk, dv = _dkv(problem, blocks, q, k, v, do, lse, delta, fuse_dq=False)
    return _dq(problem, blocks, q, k, v, do, lse, delta), dk, dv


def _dkv(problem: _Problem, blocks: BlockSizes, q, k, v, do, lse, delta, *, fuse_dq: bool):
    """(dK, dV), or with fuse_dq (dQ, dK, dV): one key block resident, the query blocks of every head
    of its group streamed past."""
    batch, heads_q, seq_q, dim = q.shape
    heads_kv, seq_k = k.shape[1], k.shape[2]
    group, itemsize = problem.group, q.dtype.itemsize
    bq, bk = blocks.block_q_dkv, blocks.block_k_dkv
    nq, nk = seq_q // bq, seq_k // bk
    visited = sum(_visited_kv_blocks(problem, nq, bq, bk, nk))  # (query block, key block) pairs per head
    pairs = batch * heads_q * visited * bq * bk
    q_side = batch * heads_q * visited * (2 * bq * dim * itemsize + 2 * heads_q * bq * 4)  # Q, dO, LSE, delta
    kv_side = 4 * k.size * itemsize  # K, V in, dK, dV out
    if fuse_dq:
        cost = _cost(10 * pairs * dim, pairs, q_side + kv_side + q.size * itemsize)  # + dQ out, once
    else:
        cost = _cost(8 * pairs * dim, pairs, q_side + kv_side)

    # Grid (B, Hkv, key blocks, heads of the group, query blocks): a head and a query block are grid
    # indices, not a quotient and remainder of one (v5e's static profile simulates scalar division
    # as 0, and Mosaic's integer division costs scalar cycles each step).
    def q_side_map(b, h_kv, j, g, i):
        return b, h_kv * group + g, jnp.maximum(i, _first_q_block(problem, j, bq, bk, nq)), 0

    def kv_side_map(b, h_kv, j, g, i):
        return b, h_kv, j, 0

    def stats_side_map(b, h_kv, j, g, i):  # every head's row: the kernel picks its own
        return b, 0, jnp.maximum(i, _first_q_block(problem, j, bq, bk, nq))

    out_specs = [pl.BlockSpec((None, None, bk, dim), kv_side_map), pl.BlockSpec((None, None, bk, dim), kv_side_map)]
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    scratch = [pltpu.VMEM((bk, dim), jnp.float32), pltpu.VMEM((bk, dim), jnp.float32)]  # dK, dV accumulators
    # The key-block axis is parallel unless dQ accumulates across it.
    semantics = ("parallel", "parallel", "arbitrary" if fuse_dq else "parallel", "arbitrary", "arbitrary")
    if fuse_dq:
        out_specs.append(pl.BlockSpec(memory_space=pltpu.MemorySpace.HBM))  # written by the kernel's own DMA
        out_shape.append(jax.ShapeDtypeStruct(q.shape, q.dtype))
        scratch += [pltpu.VMEM((dim, bk), k.dtype),  # K^T
                    pltpu.VMEM((group, nq, dim, bq), jnp.float32),  # dQ^T of the group's query blocks
                    pltpu.VMEM((bq, dim), q.dtype)]  # one query block's dQ on its way out
    grads = pl.pallas_call(
        functools.partial(_dkv_kernel, problem=problem, block_q=bq, block_k=bk,
                          block_k_compute=min(blocks.block_q_compute, bk), num_q_blocks=nq, num_kv_blocks=nk,
                          fused_dq=fuse_dq),
        grid=(batch, heads_kv, nk, group, nq),
        in_specs=[
            pl.BlockSpec((None, None, bq, dim), q_side_map),
            pl.BlockSpec((None, None, bk, dim), kv_side_map),
            pl.BlockSpec((None, None, bk, dim), kv_side_map),
            pl.BlockSpec((None, None, bq, dim), q_side_map),
            pl.BlockSpec((None, heads_q, bq), stats_side_map),
            pl.BlockSpec((None, heads_q, bq), stats_side_map),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=scratch,
        compiler_params=_compiler_params(semantics),
        interpret=_interpret_arg(problem),
        cost_estimate=cost,
        name="pallas_flash_bwd" if fuse_dq else "pallas_flash_bwd_dkv",
    )(q, k, v, do, lse, delta)
    if fuse_dq:
        dk, dv, dq = grads
        return dq, dk, dv
    return tuple(grads)


def _dq(problem: _Problem, blocks: BlockSizes, q, k, v, do, lse, delta):
    """dQ alone (when the fused kernel's dQ accumulators do not fit VMEM): one query block resident,
    key blocks streamed past."""
    batch, heads_q, seq_q, dim = q.shape
    seq_k = k.shape[2]
    group, itemsize = problem.group, q.dtype.itemsize
    bq, bk = blocks.block_q_dq, blocks.block_k_dq
    nq, nk = seq_q // bq, seq_k // bk
    visited = sum(_visited_kv_blocks(problem, nq, bq, bk, nk))
    pairs = batch * heads_q * visited * bq * bk
    q_side = batch * heads_q * nq * (3 * bq * dim * itemsize + 2 * heads_q * bq * 4)  # Q, dO in, dQ out, LSE, delta
    dq_cost = _cost(6 * pairs * dim, pairs, q_side + batch * heads_q * visited * 2 * bk * dim * itemsize)

    def q_map(b, h, i, j):
        return b, h, i, 0

    def kv_map(b, h, i, j):
        return b, lax.div(h, jnp.int32(group)), jnp.minimum(j, _last_kv_block(problem, i, bq, bk, nk)), 0

    def stats_map(b, h, i, j):
        return b, 0, i

    return pl.pallas_call(
        functools.partial(_dq_kernel, problem=problem, block_q=bq, block_k=bk,
                          block_q_compute=min(blocks.block_q_compute, bq), num_kv_blocks=nk),
        grid=(batch, heads_q, nq, nk),
        in_specs=[
            pl.BlockSpec((None, None, bq, dim), q_map),
            pl.BlockSpec((None, None, bk, dim), kv_map),
            pl.BlockSpec((None, None, bk, dim), kv_map),
            pl.BlockSpec((None, None, bq, dim), q_map),
            pl.BlockSpec((None, heads_q, bq), stats_map),
            pl.BlockSpec((None, heads_q, bq), stats_map),
        ],
        out_specs=pl.BlockSpec((None, None, bq, dim), q_map),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, dim), jnp.float32), pltpu.VMEM(stat_shape(bq), jnp.float32),
                        pltpu.VMEM(stat_shape(bq), jnp.float32)],
        compiler_params=_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_interpret_arg(problem),
        cost_estimate=dq_cost,
        name="pallas_flash_bwd_dq",
    )(q, k, v, do, lse, delta)


# --------------------------------------------------------------------------------------------------
# custom_vjp over the aligned arrays


# static: (problem, blocks)
_flash_aligned = attention_vjp(lambda static, q, k, v: _forward(*static, q, k, v),
                               lambda static, q, k, v, o, lse, do: _backward(*static, q, k, v, o, lse, do))


# --------------------------------------------------------------------------------------------------
# Public entry point


def _check_inputs(q, k, v):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"flash_attention: expected q, k, v of rank 4 [B, H, N, D], got ranks {q.ndim}, {k.ndim}, {v.ndim}")
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: expected k and v of one shape, got {k.shape} and {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"flash_attention: expected k [B, Hkv, Nk, D] with q's B and D, got q {q.shape}, k {k.shape}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"flash_attention: expected Hkv dividing Hq (GQA/MQA), got Hq={q.shape[1]}, Hkv={k.shape[1]}")
    if not 1 <= q.shape[3] <= 256:
        raise ValueError(f"flash_attention: expected head_dim D in 1..256, got {q.shape[3]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"flash_attention: expected one dtype for q, k, v, got {q.dtype}, {k.dtype}, {v.dtype}")


def alignment_padding(q_shape, k_shape, blocks: BlockSizes) -> tuple[tuple[int, int], tuple[int, int]]:
    """((Nq, Nq_aligned), (Nk, Nk_aligned)): the sequence lengths the kernels see, rounded up to their
    blocks. head_dim is never padded: a block's last dimension may equal the array's, and VMEM pads it
    to the 128 lanes by itself."""
    seq_q, seq_k = q_shape[2], k_shape[2]
    nq = round_up(seq_q, math.lcm(blocks.block_q, blocks.block_q_dkv, blocks.block_q_dq))
    nk = round_up(seq_k, math.lcm(blocks.block_k, blocks.block_k_dkv, blocks.block_k_dq))
    return (seq_q, nq), (seq_k, nk)


def padding_bytes(q_shape, k_shape, dtype, blocks: BlockSizes | None = None) -> int:
    """Bytes the wrapper's one-time alignment copy of q, k, v writes (0 for aligned lengths)."""
    blocks = blocks or plan_block_sizes(q_shape[2], k_shape[2], q_shape[3], dtype)
    (seq_q, nq), (seq_k, nk) = alignment_padding(q_shape, k_shape, blocks)
    if (seq_q, seq_k) == (nq, nk):
        return 0
    itemsize = jnp.dtype(dtype).itemsize
    return (q_shape[0] * q_shape[1] * nq + 2 * k_shape[0] * k_shape[1] * nk) * q_shape[3] * itemsize


def flash_attention(q, k, v, *, causal: bool = False, sm_scale: float | None = None,
                    block_sizes: BlockSizes | None = None, return_lse: bool = False, interpret: bool | None = None):
    """Exact attention softmax(Q K^T * scale + mask) V for [B, H, N, D] arrays, differentiable.

    - causal: bottom-right aligned mask (query i sees keys j <= i + Nk - Nq); rows that see no key
      give 0 and LSE = -inf.
    - sm_scale: default 1/sqrt(D). GQA/MQA: k, v may have Hkv heads, Hkv dividing Hq.
    - block_sizes: default plan_block_sizes(Nq, Nk, D, dtype, causal) for the v5e.
    - Alignment: any head_dim is read in place. When N is a multiple of the blocks the kernels read
      the inputs as they are; otherwise q, k, v are padded along N once with zeros (padding_bytes()
      says how many bytes that writes) and the result sliced. Padded keys and queries are masked
      inside the kernels.
    - interpret: None runs the compiled kernel on TPU, the C++ CPU kernels on CPU (through the XLA
      FFI; block_sizes, a TPU tiling, does not apply there; backend.use_cpu_kernels("interpret") or
      PALLAS_FLASH_CPU_KERNELS=interpret picks the TPU interpret mode instead), and the reference path
      elsewhere; True/False force interpret mode or compilation.
    Returns O (q's dtype), or (O, LSE [B, Hq, Nq] float32) with return_lse.
    """
    _check_inputs(q, k, v)
    batch, heads_q, seq_q, dim = q.shape
    heads_kv, seq_k = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(dim) if sm_scale is None else float(sm_scale)
    mode = kernel_mode(interpret)
    if mode == "reference":
        return reference_attention(q, k, v, causal=causal, sm_scale=scale, return_lse=return_lse)
    if mode == "cpu":  # the C++ kernels read q, k, v in place at any length: no alignment padding
        if q.dtype not in (jnp.float32, jnp.bfloat16):
            raise ValueError(f"flash_attention: expected float32 or bfloat16 inputs on CPU, got {q.dtype}")
        o, lse = cpu_kernels.attention(q, k, v, causal, scale)
        return (o, lse) if return_lse else o

    blocks = block_sizes or plan_block_sizes(seq_q, seq_k, dim, q.dtype, causal)
    (_, nq), (_, nk) = alignment_padding(q.shape, k.shape, blocks)
    problem = _Problem(seq_q=seq_q, seq_k=seq_k, sm_scale=scale, causal=causal, group=heads_q // heads_kv,
                       interpret=mode == "interpret")
    if nq != seq_q:
        q = jnp.pad(q, ((0, 0), (0, 0), (0, nq - seq_q), (0, 0)))
    if nk != seq_k:
        k = jnp.pad(k, ((0, 0), (0, 0), (0, nk - seq_k), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, 0), (0, nk - seq_k), (0, 0)))
    o, lse = _flash_aligned((problem, blocks), q, k, v)
    if nq != seq_q:
        o, lse = o[:, :, :seq_q], lse[:, :, :seq_q]
    return (o, lse) if return_lse else o
