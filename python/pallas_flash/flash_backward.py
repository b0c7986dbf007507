"""The FlashAttention-2 backward kernels for the TPU (Pallas/Mosaic).

P = exp(S * scale - LSE) is recomputed from the saved LSE (which holds the sinks: the backward needs
nothing else of them). One kernel, grid over key blocks with the query blocks of every head in the
GQA group that see them streamed past, accumulates dK/dV per key block and dQ per query block in
VMEM; where dQ's accumulators do not fit, dQ has a kernel of its own (grid over query blocks, like
the forward). With a soft cap, dS is multiplied by the cap's slope 1 - tanh^2 at each score.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_flash.mask import FULL, both, divide, either
from pallas_flash.online_softmax import LANES, LOG2_E, NEG_INF, lanes, row_to_replicated, stat_shape
from pallas_flash.planner import BlockSizes, fuses_dq, round_up
from pallas_flash.tiles import (Grid, Problem, Visits, apply_mask, compiler_params, cost, edge_rows, edge_visits,
                                interpret_arg, key_sub_block_patterns, replicate_ids, score_mask, scores,
                                segment_block_ranges, segment_steps, soft_cap_slope, static_steps, stepped_block,
                                visit_row_sub_blocks, when, when_masked, zero_lanes_past, zero_rows_past)

NUM_SEGMENT_REFS = 8


def _split_refs(problem: Problem, refs):
    return (refs[:NUM_SEGMENT_REFS], refs[NUM_SEGMENT_REFS:]) if problem.segments else ((), refs)


def zero_partial_blocks(problem: Problem, grid: Grid, q_block, kv_block, *, q_refs, stats_refs, kv_refs, active):
    """Zeroes what a partial edge block holds past the arrays' ends before a visit uses it: Q and dO
    rows, the LSE and D_i lanes (then P = exp2(S - 0) meets dO = 0 and dP = 0: no contribution), K and V
    rows (whose scores the key mask hides: P = 0, but 0 x NaN is NaN). Every visit of an edge block
    zeroes again (a visit that skipped its DMA finds it already zero)."""
    query_edge, key_edge = edge_rows(problem.seq_q, grid.block_q), edge_rows(problem.seq_k, grid.block_k)

    def zero_queries():
        for ref in q_refs:
            zero_rows_past(ref, query_edge)
        for ref in stats_refs:
            zero_lanes_past(ref, query_edge)

    def zero_keys():
        for ref in kv_refs:
            zero_rows_past(ref, key_edge)

    if query_edge:
        when(both(active, q_block == grid.num_q_blocks - 1), zero_queries)
    if key_edge:
        when(both(active, kv_block == grid.num_kv_blocks - 1), zero_keys)


def _dkv_kernel(*refs, problem: Problem, grid: Grid, key_sub_rows: int, fused_dq: bool):
    """dK, dV for one key block, the query blocks of its GQA group that see it streamed past, and with
    fused_dq dQ as well. Computed transposed, keys on sublanes and queries on lanes: S^T = K Q^T, so
    dV += P^T dO and dK += dS^T Q are plain products (no transposed tile), the LSE and D_i rows of the
    [heads, block_q] statistics blocks meet the tile by a broadcast over sublanes, and
    dQ^T += K^T dS^T is plain too, with K^T transposed once per key block.

    fused_dq: dQ^T of every query block of the group accumulates in VMEM across the key blocks
    (grid order: key blocks outside, query blocks inside), so S and dP are computed once for all
    three gradients (5 products per tile where a separate dQ kernel recomputes 2 of them: 7); the
    accumulators start at zero at the first key block, and every query block's dQ goes to HBM after
    the last (a query block no key block visits gets 0: its rows see nothing)."""
    segment_refs, refs = _split_refs(problem, refs)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs = refs
    if problem.segments:
        q_ids_ref, kv_ids_ref, *refs = refs
    dk_ref, dv_ref, *refs = refs
    if fused_dq:
        dq_hbm_ref, *refs = refs
    dk_acc_ref, dv_acc_ref, *refs = refs
    if fused_dq:
        k_t_ref, dq_t_acc_ref, dq_out_ref, *refs = refs
        dq_edge_ref = refs.pop(0) if edge_rows(problem.seq_q, grid.block_q) else None
    kv_ids_rep_ref = refs[0] if problem.segments else None

    batch, head_kv, kv_block, g, step = (pl.program_id(i) for i in range(5))
    block_q, block_k = grid.block_q, grid.block_k
    head_q = head_kv * problem.group + g
    visits = Visits(problem, grid, batch, segment_refs)
    first, last = visits.q_range(kv_block)
    q_block = first + step
    row_start, key_start = q_block * block_q, kv_block * block_k
    segments_mixed = visits.segments_mixed(q_block, kv_block)

    zero_partial_blocks(problem, grid, q_block, kv_block, q_refs=(q_ref, do_ref), stats_refs=(lse_ref, delta_ref),
                        kv_refs=(k_ref, v_ref), active=q_block <= last)

    @pl.when((g == 0) & (step == 0))
    def _init():
        dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
        dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)
        if fused_dq:
            k_t_ref[...] = k_ref[...].astype(jnp.float32).T.astype(k_t_ref.dtype)
        if problem.segments:
            kv_ids_rep_ref[...] = replicate_ids(kv_ids_ref[...], LANES)

    if fused_dq:
        @pl.when((kv_block == 0) & (step == 0))
        def _init_dq():
            dq_t_acc_ref[g] = jnp.zeros(dq_t_acc_ref.shape[1:], jnp.float32)

    def update(key_from: int, keys: int, col_from: int, col_to: int, masked: bool, segments: bool):
        """Key rows [key_from, +keys) of the block against query columns [col_from, col_to), static;
        masked: by the geometry or the key edge, and by the segment ids where `segments`."""
        rows = slice(None) if keys == block_k else pl.ds(key_from, keys)
        cols = slice(None) if (col_from, col_to) == (0, block_q) else pl.ds(col_from, col_to - col_from)
        q, do, k, v = q_ref[cols, :], do_ref[cols, :], k_ref[rows, :], v_ref[rows, :]
        # The head's LSE and D_i rows loaded whole, then sliced (Mosaic has no load at a dynamic row and
        # a lane window that ends before the block's).
        lse = lse_ref[pl.ds(head_q, 1), :][:, col_from:col_to]  # (1, columns)
        delta = delta_ref[pl.ds(head_q, 1), :][:, col_from:col_to]
        s_t = scores(problem, k, q)  # (keys, columns), log2 units, capped
        slope = soft_cap_slope(problem, s_t)
        if masked:  # on the scores: exp2(-inf) = 0 (a select on P would become a masked matmul)
            same_segment = None
            if segments:
                same_segment = lambda shape: lanes(kv_ids_rep_ref[rows, :], shape[1]) == q_ids_ref[:, cols]  # noqa: E731
            visible = score_mask(problem, row_start + col_from, col_to - col_from, key_start + key_from, keys,
                                 transposed=True, segments=same_segment, pad_keys=problem.seq_k % block_k != 0)
            s_t = apply_mask(s_t, visible)
        p_t = jnp.exp2(s_t - jnp.where(lse == NEG_INF, 0.0, lse * LOG2_E))
        dv_acc_ref[rows, :] += jnp.dot(p_t.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp_t = lax.dot_general(v, do, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        ds_t = p_t * (dp_t - delta)
        if slope is not None:
            ds_t = ds_t * slope
        ds_t = ds_t.astype(q.dtype)
        dk_acc_ref[rows, :] += jnp.dot(ds_t, q, preferred_element_type=jnp.float32)
        if fused_dq:
            dq_t = jnp.dot(k_t_ref[:, rows], ds_t, preferred_element_type=jnp.float32)  # (D, columns)
            dq_t_acc_ref[g, q_block, :, cols] += dq_t

    mask = problem.mask

    def visit(rows: int | None, keys: int | None):
        """rows, keys: the real query rows and key rows of partial edge blocks (edge_visits), whose
        products stop at the last 128 lanes / 128 key rows that hold any."""
        if mask.static_tiles(block_q, block_k, key_sub_rows):
            # On the tiles an edge of the band crosses (one static pattern per delta), key sub-blocks
            # of key_sub_rows rows each compute only the query columns they may see (a 1024 x 1024
            # causal diagonal tile: 62% of its products); full tiles whole.
            delta = key_start - row_start + mask.offset
            patterns, full = key_sub_block_patterns(problem, block_q, block_k, key_sub_rows,
                                                    grid.num_q_blocks * block_q, grid.num_kv_blocks * block_k)
            columns = block_q if rows is None else min(block_q, round_up(rows, LANES))
            real_keys = block_k if keys is None else keys
            # A tile of one segment id runs the pattern without the ids (each pattern in both forms).
            for d, sub_blocks in patterns:
                def sweep(segments, sub_blocks=sub_blocks):
                    for key_from, key_rows, col_from, col_to, masked in sub_blocks:
                        if col_from < columns and key_from < real_keys:
                            update(key_from, key_rows, col_from, min(col_to, columns),
                                   masked or key_from + key_rows > real_keys or segments, segments)
                when(delta == d, when_masked, segments_mixed, sweep)
            if full is not None:
                in_full = both(delta >= full[0], delta <= full[1]) if patterns else True
                key_rows = block_k if keys is None else min(block_k, round_up(keys, LANES))
                when(in_full, when_masked, segments_mixed,
                     lambda segments: update(0, key_rows, 0, columns, segments or keys is not None, segments))
            return
        columns = block_q if rows is None else min(block_q, round_up(rows, LANES))
        key_rows = block_k if keys is None else min(block_k, round_up(keys, LANES))
        any_visible, needs_mask = mask.tile_flags(row_start, block_q, key_start, block_k)
        needs_mask = either(needs_mask, keys is not None)  # the key edge: keys past Nk hidden
        needs_mask = either(needs_mask, segments_mixed)
        when(any_visible, when_masked, needs_mask, lambda m: update(0, key_rows, 0, columns, m, m and problem.segments))

    when(q_block <= last, edge_visits, problem, grid, q_block, kv_block, visit)

    if fused_dq:
        @pl.when((kv_block == grid.num_kv_blocks - 1) & (step == pl.num_programs(4) - 1))
        def _write_dq():
            # Synchronous copies, one query block at a time (the compiler's static profile cannot
            # follow a DMA awaited in a later step).
            def write(i, out_ref):
                dq = (dq_t_acc_ref[g, i].T * problem.sm_scale).astype(out_ref.dtype)
                out_ref[...] = dq if out_ref.shape[0] == block_q else dq[:out_ref.shape[0]]
                rows = pl.ds(i * block_q, out_ref.shape[0])
                pltpu.sync_copy(out_ref, dq_hbm_ref.at[batch, head_q, rows])

            whole = grid.num_q_blocks - (1 if dq_edge_ref is not None else 0)
            lax.fori_loop(0, whole, lambda i, carry: write(i, dq_out_ref) or carry, 0)
            if dq_edge_ref is not None:  # the partial last block: its real rows, from a buffer of that size
                write(whole, dq_edge_ref)

    @pl.when((g == problem.group - 1) & (step == pl.num_programs(4) - 1))
    def _finish():
        dk_ref[...] = (dk_acc_ref[...] * problem.sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def _dq_kernel(*refs, problem: Problem, grid: Grid, block_q_compute: int, block_k_compute: int):
    """dQ for one query block, the key blocks it sees streamed past. Its LSE (in log2 units) and D_i
    rows are turned into the replicated column form once, at the first step."""
    segment_refs, refs = _split_refs(problem, refs)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs = refs
    if problem.segments:
        q_ids_ref, kv_ids_ref, *refs = refs
    dq_ref, dq_acc_ref, lse_rep_ref, delta_rep_ref, *refs = refs
    q_ids_rep_ref = refs[0] if problem.segments else None

    batch, head, q_block, step = (pl.program_id(i) for i in range(4))
    block_q, block_k = grid.block_q, grid.block_k
    visits = Visits(problem, grid, batch, segment_refs)
    first, last = visits.kv_range(q_block)
    kv_block = first + step
    row_start, key_start = q_block * block_q, kv_block * block_k
    zero_partial_blocks(problem, grid, q_block, kv_block, q_refs=(q_ref, do_ref), stats_refs=(lse_ref, delta_ref),
                        kv_refs=(k_ref, v_ref), active=kv_block <= last)

    @pl.when(step == 0)
    def _init():
        dq_acc_ref[...] = jnp.zeros(dq_acc_ref.shape, jnp.float32)
        lse = lse_ref[pl.ds(head, 1), :]
        lse_rep_ref[...] = row_to_replicated(jnp.where(lse == NEG_INF, 0.0, lse * LOG2_E))
        delta_rep_ref[...] = row_to_replicated(delta_ref[pl.ds(head, 1), :])
        if problem.segments:
            q_ids_rep_ref[...] = replicate_ids(q_ids_ref[...], LANES)

    def update(c, masked, cols, leading, height, segments):  # sub-blocks and their key columns as in the forward
        col_from, width = cols[0], cols[1] - cols[0]
        keys = slice(None) if width == block_k else pl.ds(col_from, width)
        k, v = k_ref[keys, :], v_ref[keys, :]
        rows = pl.ds(c * block_q_compute, height)
        s = scores(problem, q_ref[rows, :], k)
        slope = soft_cap_slope(problem, s)
        if masked:
            same_segment = None
            if segments:
                same_segment = lambda shape: lanes(q_ids_rep_ref[rows, :], width) == kv_ids_ref[:, keys]  # noqa: E731
            s = apply_mask(s, score_mask(problem, row_start + c * block_q_compute, height,
                                         key_start + col_from, width, segments=same_segment,
                                         pad_keys=problem.seq_k % block_k != 0))
        p = jnp.exp2(s - lanes(lse_rep_ref[rows, :], width))
        dp = lax.dot_general(do_ref[rows, :], v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        ds = p * (dp - lanes(delta_rep_ref[rows, :], width))
        if slope is not None:
            ds = ds * slope
        dq_acc_ref[rows, :] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    when(kv_block <= last, edge_visits, problem, grid, q_block, kv_block, lambda rows, keys: visit_row_sub_blocks(
        problem, grid, row_start, key_start, block_q_compute, update, sub_keys=block_k_compute,
        segments_mixed=visits.segments_mixed(q_block, kv_block), rows=rows, keys=keys))

    @pl.when(step == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_acc_ref[...] * problem.sm_scale).astype(dq_ref.dtype)


def backward(problem: Problem, blocks: BlockSizes, q, k, v, o, lse, do, segment_ids=None):
    """(dQ, dK, dV) of the aligned arrays. D_i = rowsum(dO_i * O_i), once per row (a cheap
    elementwise pass XLA fuses), [B, Hq, Nq] like the LSE."""
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
    if fuses_dq(blocks, q.shape[2], problem.group, q.shape[3], q.dtype.itemsize):
        return _dkv(problem, blocks, q, k, v, do, lse, delta, segment_ids, fuse_dq=True)
    dk, dv = _dkv(problem, blocks, q, k, v, do, lse, delta, segment_ids, fuse_dq=False)
    return _dq(problem, blocks, q, k, v, do, lse, delta, segment_ids), dk, dv


def _segment_operands(problem: Problem, grid: Grid, segment_ids, q_block_of, kv_block_of):
    """(prefetch, in_specs, operands) for the segment ids of a kernel whose grid reaches the query
    and key block through q_block_of(*grid_indices, refs) and kv_block_of(...)."""
    if not problem.segments:
        return (), [], []
    q_ids, kv_ids = segment_ids
    prefetch = segment_block_ranges(q_ids, kv_ids, grid)
    specs = [pl.BlockSpec((None, 1, grid.block_q), lambda *idx: (idx[0], 0, q_block_of(*idx))),
             pl.BlockSpec((None, 1, grid.block_k), lambda *idx: (idx[0], 0, kv_block_of(*idx)))]
    return prefetch, specs, [q_ids[:, None, :], kv_ids[:, None, :]]


def _dkv(problem: Problem, blocks: BlockSizes, q, k, v, do, lse, delta, segment_ids, *, fuse_dq: bool):
    """(dK, dV), or with fuse_dq (dQ, dK, dV): one key block resident, the query blocks of every head
    of its group that see it streamed past."""
    batch, heads_q, seq_q, dim = q.shape
    heads_kv, seq_k = k.shape[1], k.shape[2]
    group, itemsize = problem.group, q.dtype.itemsize
    bq, bk = blocks.block_q_dkv, blocks.block_k_dkv
    grid = Grid.of(bq, bk, seq_q, seq_k)
    num_steps, visited = static_steps(problem, grid, per_q_block=False)  # query blocks per key block
    pairs = batch * heads_q * visited * bq * bk
    q_side = batch * heads_q * visited * (2 * bq * dim * itemsize + 2 * heads_q * bq * 4)  # Q, dO, LSE, delta
    kv_side = 4 * k.size * itemsize  # K, V in, dK, dV out
    exps = pairs * (2 if problem.soft_cap is not None else 1)
    if fuse_dq:
        kernel_cost = cost(10 * pairs * dim, exps, q_side + kv_side + q.size * itemsize)  # + dQ out, once
    else:
        kernel_cost = cost(8 * pairs * dim, exps, q_side + kv_side)

    # Grid (B, Hkv, key blocks, heads of the group, query steps): a head and a query block are grid
    # indices, not a quotient and remainder of one (v5e's static profile simulates scalar division
    # as 0, and Mosaic's integer division costs scalar cycles each step).
    def q_block_of(b, h_kv, j, g, s, *refs):
        first, last = Visits(problem, grid, b, refs[:NUM_SEGMENT_REFS]).q_range(j)
        return stepped_block(first, last, s, grid.num_q_blocks)

    def q_side_map(b, h_kv, j, g, s, *refs):
        return b, h_kv * group + g, q_block_of(b, h_kv, j, g, s, *refs), 0

    def kv_side_map(b, h_kv, j, g, s, *refs):
        return b, h_kv, j, 0

    def stats_side_map(b, h_kv, j, g, s, *refs):  # every head's row: the kernel picks its own
        return b, 0, q_block_of(b, h_kv, j, g, s, *refs)

    prefetch, segment_specs, segment_operands = _segment_operands(
        problem, grid, segment_ids, q_block_of, lambda b, h_kv, j, g, s, *refs: j)
    grid_steps = segment_steps(problem, grid, prefetch, per_q_block=False, static=num_steps)
    out_specs = [pl.BlockSpec((None, None, bk, dim), kv_side_map), pl.BlockSpec((None, None, bk, dim), kv_side_map)]
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    scratch = [pltpu.VMEM((bk, dim), jnp.float32), pltpu.VMEM((bk, dim), jnp.float32)]  # dK, dV accumulators
    # The key-block axis is parallel unless dQ accumulates across it.
    semantics = ("parallel", "parallel", "arbitrary" if fuse_dq else "parallel", "arbitrary", "arbitrary")
    if fuse_dq:
        out_specs.append(pl.BlockSpec(memory_space=pltpu.MemorySpace.HBM))  # written by the kernel's own DMA
        out_shape.append(jax.ShapeDtypeStruct(q.shape, q.dtype))
        scratch += [pltpu.VMEM((dim, bk), k.dtype),  # K^T
                    pltpu.VMEM((group, grid.num_q_blocks, dim, bq), jnp.float32),  # dQ^T of the group's query blocks
                    pltpu.VMEM((bq, dim), q.dtype)]  # one query block's dQ on its way out
        if edge_rows(seq_q, bq):  # a partial last query block's (a DMA from a slice must be tile-aligned)
            scratch.append(pltpu.VMEM((edge_rows(seq_q, bq), dim), q.dtype))
    if problem.segments:
        scratch.append(pltpu.VMEM(stat_shape(bk), jnp.int32))  # the key block's ids as columns
    grads = pl.pallas_call(
        functools.partial(_dkv_kernel, problem=problem, grid=grid, key_sub_rows=min(blocks.block_q_compute, bk),
                          fused_dq=fuse_dq),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(batch, heads_kv, grid.num_kv_blocks, group, grid_steps),
            in_specs=[
                pl.BlockSpec((None, None, bq, dim), q_side_map),
                pl.BlockSpec((None, None, bk, dim), kv_side_map),
                pl.BlockSpec((None, None, bk, dim), kv_side_map),
                pl.BlockSpec((None, None, bq, dim), q_side_map),
                pl.BlockSpec((None, heads_q, bq), stats_side_map),
                pl.BlockSpec((None, heads_q, bq), stats_side_map),
            ] + segment_specs,
            out_specs=out_specs,
            scratch_shapes=scratch,
        ),
        out_shape=out_shape,
        compiler_params=compiler_params(semantics),
        interpret=interpret_arg(problem),
        cost_estimate=kernel_cost,
        name="pallas_flash_bwd" if fuse_dq else "pallas_flash_bwd_dkv",
    )(*prefetch, q, k, v, do, lse, delta, *segment_operands)
    if fuse_dq:
        dk, dv, dq = grads
        return dq, dk, dv
    return tuple(grads)


def _dq(problem: Problem, blocks: BlockSizes, q, k, v, do, lse, delta, segment_ids):
    """dQ alone (when the fused kernel's dQ accumulators do not fit VMEM): one query block resident,
    the key blocks it sees streamed past."""
    batch, heads_q, seq_q, dim = q.shape
    seq_k = k.shape[2]
    group, itemsize = problem.group, q.dtype.itemsize
    bq, bk = blocks.block_q_dq, blocks.block_k_dq
    grid = Grid.of(bq, bk, seq_q, seq_k)
    num_steps, visited = static_steps(problem, grid, per_q_block=True)
    pairs = batch * heads_q * visited * bq * bk
    q_side = batch * heads_q * grid.num_q_blocks * (3 * bq * dim * itemsize + 2 * heads_q * bq * 4)
    exps = pairs * (2 if problem.soft_cap is not None else 1)
    dq_cost = cost(6 * pairs * dim, exps, q_side + batch * heads_q * visited * 2 * bk * dim * itemsize)

    def kv_block_of(b, h, i, j, *refs):
        first, last = Visits(problem, grid, b, refs[:NUM_SEGMENT_REFS]).kv_range(i)
        return stepped_block(first, last, j, grid.num_kv_blocks)

    def q_map(b, h, i, j, *refs):
        return b, h, i, 0

    def kv_map(b, h, i, j, *refs):
        return b, divide(h, group), kv_block_of(b, h, i, j, *refs), 0

    def stats_map(b, h, i, j, *refs):
        return b, 0, i

    prefetch, segment_specs, segment_operands = _segment_operands(
        problem, grid, segment_ids, lambda b, h, i, j, *refs: i, kv_block_of)
    grid_steps = segment_steps(problem, grid, prefetch, per_q_block=True, static=num_steps)
    scratch = [pltpu.VMEM((bq, dim), jnp.float32), pltpu.VMEM(stat_shape(bq), jnp.float32),
               pltpu.VMEM(stat_shape(bq), jnp.float32)]
    if problem.segments:
        scratch.append(pltpu.VMEM(stat_shape(bq), jnp.int32))
    return pl.pallas_call(
        functools.partial(_dq_kernel, problem=problem, grid=grid, block_q_compute=min(blocks.block_q_compute, bq),
                          block_k_compute=blocks.block_k_compute),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(batch, heads_q, grid.num_q_blocks, grid_steps),
            in_specs=[
                pl.BlockSpec((None, None, bq, dim), q_map),
                pl.BlockSpec((None, None, bk, dim), kv_map),
                pl.BlockSpec((None, None, bk, dim), kv_map),
                pl.BlockSpec((None, None, bq, dim), q_map),
                pl.BlockSpec((None, heads_q, bq), stats_map),
                pl.BlockSpec((None, heads_q, bq), stats_map),
            ] + segment_specs,
            out_specs=pl.BlockSpec((None, None, bq, dim), q_map),
            scratch_shapes=scratch,
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret_arg(problem),
        cost_estimate=dq_cost,
        name="pallas_flash_bwd_dq",
    )(*prefetch, q, k, v, do, lse, delta, *segment_operands)
