"""The FlashAttention-2 forward kernel for the TPU (Pallas/Mosaic).

Grid (B, Nq/block_q, Hq, key steps), the last axis sequential: a query block stays resident in VMEM
while the key blocks it sees stream past (Pallas double-buffers their DMAs; tiles.py says which); the
running max, running sum and fp32 accumulator live in VMEM scratch; O is written once at the last
step, the LSE row of every head into one lane-dense [Hq, block_q] block that goes to HBM once per
query block. Sinks join each row's denominator at the end, as a partial state (O = 0, LSE = sink).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_flash.mask import both, divide, negate
from pallas_flash.online_softmax import (LANES, LOG2_E, finish_state, init_state, lanes, replicated_to_row,
                                         stat_shape, update_state)
from pallas_flash.planner import BlockSizes, forward_vmem_bytes, round_up, vmem_budget_bytes
from pallas_flash.tiles import (Grid, Problem, Visits, apply_mask, compiler_params, cost, edge_rows, edge_visits,
                                interpret_arg, pad_rows, replicate_ids, score_mask, scores, segment_block_ranges,
                                segment_steps, static_steps, stepped_block, visit_row_sub_blocks, when, zero_rows_past)

NUM_SEGMENT_REFS = 8


def _fwd_kernel(*refs, problem: Problem, grid: Grid, block_q_compute: int, block_k_compute: int, max_steps: int,
                aliased: bool):
    """One (query block, head, key step) step. The query block is swept in sub-blocks of
    block_q_compute rows, unrolled in one straight-line region: a sub-block's scores (256 x 512 fp32:
    half the vector registers) are reduced and exponentiated while the MXU computes the next
    sub-block's, where one (block_q, block_k) tile would be materialised in VMEM (twice the stores).
    max_steps: the grid's key steps by the geometry; segment ids may set fewer (segment_steps)."""
    segment_refs, refs = (refs[:NUM_SEGMENT_REFS], refs[NUM_SEGMENT_REFS:]) if problem.segments else ((), refs)
    q_ref, k_ref, v_ref, *refs = refs
    if problem.segments:
        q_ids_ref, kv_ids_ref, *refs = refs
    if problem.sinks:
        sinks_ref, *refs = refs
    if aliased:  # the blocks of O and LSE this view overwrites (outputs aliased to them)
        refs = refs[2:]
    o_ref, lse_ref, row_max_ref, row_sum_ref, acc_ref, *refs = refs
    q_ids_rep_ref = refs[0] if problem.segments else None

    batch, q_block, head, step = (pl.program_id(i) for i in range(4))
    block_q, block_k = grid.block_q, grid.block_k
    visits = Visits(problem, grid, batch, segment_refs)
    first, last = visits.kv_range(q_block)
    kv_block = first + step
    row_start, key_start = q_block * block_q, kv_block * block_k
    segments_mixed = visits.segments_mixed(q_block, kv_block)

    if problem.segments:
        @pl.when(step == 0)
        def _ids():  # the query block's ids as columns, once per head
            q_ids_rep_ref[...] = replicate_ids(q_ids_ref[...], LANES)

    def update(c, masked, cols, leading, height, segments, first_tile):
        rows = pl.ds(c * block_q_compute, height)
        col_from, width = cols[0], cols[1] - cols[0]
        keys = slice(None) if width == block_k else pl.ds(col_from, width)
        s = scores(problem, q_ref[rows, :], k_ref[keys, :])
        if masked:
            same_segment = None
            if segments:
                same_segment = lambda shape: lanes(q_ids_rep_ref[rows, :], width) == kv_ids_ref[:, keys]  # noqa: E731
            visible = score_mask(problem, row_start + c * block_q_compute, height, key_start + col_from, width,
                                 segments=same_segment, pad_keys=problem.seq_k % block_k != 0)
            s = apply_mask(s, visible)
        update_state(s, v_ref[keys, :], row_max_ref.at[rows], row_sum_ref.at[rows], acc_ref.at[rows],
                     first=first_tile and leading)

    def visit(first_tile: bool):
        # The first visited tile starts every row's state, even rows that see none of it (-inf, 0).
        edge_visits(problem, grid, q_block, kv_block, lambda rows, keys: visit_row_sub_blocks(
            problem, grid, row_start, key_start, block_q_compute, functools.partial(update, first_tile=first_tile),
            sub_keys=block_k_compute, keep_skipped=first_tile, segments_mixed=segments_mixed, rows=rows, keys=keys))

    key_edge = edge_rows(problem.seq_k, block_k)
    if key_edge:  # V's rows past Nk: a masked key's zero probability times stale data must stay 0
        when(both(kv_block == grid.num_kv_blocks - 1, kv_block <= last), zero_rows_past, v_ref, key_edge)

    empty = first > last  # a query block that sees no key at all: an empty state
    when(both(step == 0, empty), init_state, row_max_ref, row_sum_ref, acc_ref)
    when(both(step == 0, negate(empty)), visit, True)
    if max_steps > 1:
        when(both(step > 0, kv_block <= last), visit, False)

    @pl.when(step == pl.num_programs(3) - 1)
    def _finish():
        sink = sinks_ref[head] * LOG2_E if problem.sinks else None
        o, lse = finish_state(row_max_ref, row_sum_ref, acc_ref, sink=sink)
        o_ref[...] = o.astype(o_ref.dtype)
        lse_ref[pl.ds(head, 1), :] = replicated_to_row(lse)


def forward(problem: Problem, blocks: BlockSizes, q, k, v, segment_ids=None, sinks=None):
    """q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D] at any lengths (partial last blocks read in place);
    segment_ids: (q_ids, kv_ids) int32 padded to whole blocks; sinks [Hq] f32. Returns O and LSE
    [B, Hq, Nq].

    A length that leaves a last query block of at most TAIL_ROWS rows (N = 4097 in 2048-row blocks:
    one) runs those rows as a call of their own against long key blocks (tail_blocks), writing into
    the same O and LSE: as a block of the main grid they would stream every key block they see, a
    grid step each (~900 cycles before any work), to compute one row."""
    if not has_tail(problem.seq_q, blocks):
        return _forward_call(problem, blocks, q, k, v, segment_ids, sinks)
    tail = edge_rows(problem.seq_q, blocks.block_q)
    body = problem.seq_q - tail
    o, lse = _forward_call(dataclasses.replace(problem, seq_q=body), blocks, q, k, v, segment_ids, sinks)
    tail_problem = dataclasses.replace(problem, seq_q=tail, mask=problem.mask.shifted(rows=body))
    tail_sizes = tail_blocks(problem.seq_k, blocks, q.shape[3], q.dtype.itemsize)
    if segment_ids is not None:
        q_ids, kv_ids = segment_ids
        keys = Grid.of(TAIL_ROWS, tail_sizes.block_k, tail, problem.seq_k).num_kv_blocks * tail_sizes.block_k
        kv_ids = pad_rows(kv_ids, max(keys, kv_ids.shape[1]), 1, "edge")  # whole tail key blocks, as the caller pads
        segment_ids = (q_ids[:, body:body + TAIL_ROWS], kv_ids)
    return _forward_call(tail_problem, tail_sizes, q, k, v, segment_ids, sinks, first_row=body, out=(o, lse))


TAIL_ROWS = 128  # a last query block of at most this many rows runs as its own call (forward)
TAIL_KEYS = 8192  # the most keys a step of that call reads: K and V blocks of 2 MiB each at D = 128 in bf16


def has_tail(seq_q: int, blocks: BlockSizes) -> bool:
    """Whether the forward runs the last query rows as a tail call (a last block of 1..TAIL_ROWS rows)."""
    return blocks.block_q > TAIL_ROWS and 0 < edge_rows(seq_q, blocks.block_q) <= TAIL_ROWS


def tail_blocks(seq_k: int, blocks: BlockSizes, head_dim: int, itemsize: int) -> BlockSizes:
    """The tail call's blocks: one query block of TAIL_ROWS, and key blocks as long as fit the VMEM
    budget up to TAIL_KEYS, of equal length (multiples of 128) so that no last block of a few keys
    costs a step of its own (4097 keys: one block of 4224)."""
    keys = round_up(seq_k, LANES)
    steps = -(-keys // TAIL_KEYS)
    while True:
        block_k = round_up(-(-keys // steps), LANES)
        if block_k == LANES or forward_vmem_bytes(TAIL_ROWS, block_k, head_dim, itemsize, TAIL_ROWS,
                                                  block_k_compute=blocks.block_k_compute) <= vmem_budget_bytes():
            break
        steps *= 2
    return dataclasses.replace(blocks, block_q=TAIL_ROWS, block_k=block_k, block_q_compute=TAIL_ROWS)


def _forward_call(problem: Problem, blocks: BlockSizes, q, k, v, segment_ids, sinks, *, first_row: int = 0,
                  out=None):
    """One pallas_call over the view of problem.seq_q query rows from first_row (a multiple of
    block_q); out: (O, LSE) the call writes into (aliased, the rows outside the view kept).

    Grid (B, Nq/block_q, Hq, key steps): the heads run inside a query block so that one LSE block,
    [Hq, block_q] lane-dense, stays in VMEM while every head writes its row and goes to HBM once
    (an [N, 1] column would take 128x its size there, in (8, 128) tiles)."""
    batch, heads_q, _, dim = q.shape
    seq_q, seq_k = problem.seq_q, k.shape[2]
    block_q, block_k = blocks.block_q, blocks.block_k
    block_offset = first_row // block_q
    out_rows = q.shape[2]
    grid = Grid.of(block_q, block_k, seq_q, seq_k)
    num_steps, visited = static_steps(problem, grid, per_q_block=True)
    group = problem.group

    def kv_block_of(b, i, j, refs):
        first, last = Visits(problem, grid, b, refs).kv_range(i)
        return stepped_block(first, last, j, grid.num_kv_blocks)

    def q_map(b, i, h, j, *refs):
        return b, h, i + block_offset, 0

    def kv_map(b, i, h, j, *refs):
        return b, divide(h, group), kv_block_of(b, i, j, refs), 0

    def lse_map(b, i, h, j, *refs):
        return b, 0, i + block_offset

    in_specs = [
        pl.BlockSpec((None, None, block_q, dim), q_map),
        pl.BlockSpec((None, None, block_k, dim), kv_map),
        pl.BlockSpec((None, None, block_k, dim), kv_map),
    ]
    operands = [q, k, v]
    prefetch = ()
    scratch = [
        pltpu.VMEM(stat_shape(block_q), jnp.float32),  # row_max
        pltpu.VMEM(stat_shape(block_q), jnp.float32),  # row_sum
        pltpu.VMEM((block_q, dim), jnp.float32),  # acc
    ]
    if problem.segments:
        q_ids, kv_ids = segment_ids
        prefetch = segment_block_ranges(q_ids, kv_ids, grid)
        in_specs += [pl.BlockSpec((None, 1, block_q), lambda b, i, h, j, *refs: (b, 0, i)),
                     pl.BlockSpec((None, 1, block_k), lambda b, i, h, j, *refs: (b, 0, kv_block_of(b, i, j, refs)))]
        operands += [q_ids[:, None, :], kv_ids[:, None, :]]
        scratch.append(pltpu.VMEM(stat_shape(block_q), jnp.int32))  # the query block's ids as columns
    grid_steps = segment_steps(problem, grid, prefetch, per_q_block=True, static=num_steps)  # set by the ids
    if problem.sinks:
        in_specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
        operands.append(sinks.astype(jnp.float32))
    aliases = {}
    if out is not None:
        aliases = {len(prefetch) + len(operands): 0, len(prefetch) + len(operands) + 1: 1}
        in_specs += [pl.BlockSpec(memory_space=pl.ANY)] * 2
        if problem.interpret:
            # The interpret mode writes an output block into its aliased input's buffer unclipped: a
            # partial last block needs the rows up to a whole block there (compiled: no padding).
            out_rows = round_up(out_rows, block_q)
            out = [pad_rows(x, out_rows, 2) for x in out]
        operands += list(out)

    kernel = functools.partial(_fwd_kernel, problem=problem, grid=grid,
                               block_q_compute=min(blocks.block_q_compute, block_q),
                               block_k_compute=blocks.block_k_compute, max_steps=num_steps, aliased=out is not None)
    pairs = batch * heads_q * visited * block_q * block_k  # (query, key) score entries computed
    kv_rows = batch * heads_q * visited * block_k  # K and V rows fetched, per query block and head
    itemsize = q.dtype.itemsize
    exps = pairs * (2 if problem.soft_cap is not None else 1)
    rows = batch * heads_q * seq_q
    o, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(batch, grid.num_q_blocks, heads_q, grid_steps),
            in_specs=in_specs,
            out_specs=[
                pl.BlockSpec((None, None, block_q, dim), q_map),
                pl.BlockSpec((None, heads_q, block_q), lse_map),
            ],
            scratch_shapes=scratch,
        ),
        out_shape=[
            jax.ShapeDtypeStruct((batch, heads_q, out_rows, dim), q.dtype),
            jax.ShapeDtypeStruct((batch, heads_q, out_rows), jnp.float32),
        ],
        # The LSE block is revisited by every head of a query block: the head axis is sequential.
        compiler_params=compiler_params(("parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=interpret_arg(problem),
        input_output_aliases=aliases,
        cost_estimate=cost(4 * pairs * dim, exps, itemsize * (2 * rows * dim + 2 * kv_rows * dim) + 4 * rows),
        name="pallas_flash_fwd" if out is None else "pallas_flash_fwd_tail",
    )(*prefetch, *operands)
    if out_rows != q.shape[2]:
        o, lse = o[:, :, :q.shape[2]], lse[:, :, :q.shape[2]]
    return o, lse

