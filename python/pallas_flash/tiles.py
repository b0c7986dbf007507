"""What the TPU training kernels share: the static problem they close over, which tiles a grid visits
(from the mask's geometry and, with segment ids, per-block segment ranges read from SMEM), the one
place scores are soft-capped and masked, and the sweeps of a tile's sub-blocks.

Visiting. A forward grid row (one query block) walks the key blocks [first, last] its rows may see:
the grid's key axis has as many steps as the widest such range (a sliding window: window / block_k
+ 2 steps, not Nk / block_k), step j visits key block first + j, and the index maps clamp to `last`
so that the steps past a row's range issue no DMA. The backward's dK/dV kernel walks query blocks per
key block the same way. The ranges come from the geometry (mask.Mask, traced from the grid indices)
intersected, with segment ids, with the range of blocks whose segment ids overlap the block's (one
int32 per block in SMEM, computed once per call: 4 KiB at 1M tokens in 1024-row blocks).

Sub-blocks. Within a visited tile the kernels sweep sub-blocks of rows, unrolled in straight-line
regions (a pl.when around a sub-block would drain the MXU pipeline): where the geometry is a band (no
chunk, or chunks aligned to the blocks) and the keys are whole blocks, one static pattern per tile
offset delta that meets an edge of the band (mask.Mask.band_patterns) and one region for the full
tiles between the edges; where blocks hold whole chunks (Mask.chunks_in_tiles: chunks of 512 in
2048-row blocks), one pattern per delta whose sub-blocks compute their own chunk's columns only;
otherwise (chunks across blocks) per sub-block at run time. A partial last
block (a length that is not a multiple of the block) is its own static case (edge_visits): its
sub-blocks past the real rows are not computed, nor its key columns past the last 128 that hold any.
The forward runs a last query block of at most 128 rows as a call of its own instead (flash_forward's
tail), whose one query block against long key blocks meets a single tile delta per key block.
Segment ids add an element mask on a tile whose blocks hold more than one segment id; a tile of one
id (documents longer than the blocks) runs the code of the mask without ids, decided per tile at run
time (each static pattern is compiled in both forms).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_flash.mask import FULL, PARTIAL, SKIP, Mask, and_masks, both, divide, either, negate
from pallas_flash.online_softmax import LANES, LOG2_E, NEG_INF, lanes, row_to_replicated
from pallas_flash.planner import vmem_budget_bytes

EDGE_ROWS = 16  # the row granule of a partial block's last sub-block: a packed bf16 (16, 128) tile


@dataclasses.dataclass(frozen=True)
class Problem:
    """Static facts every kernel closes over. Lengths are the real ones (before alignment padding)."""

    seq_q: int
    seq_k: int
    sm_scale: float
    mask: Mask
    group: int  # query heads per KV head
    interpret: bool
    soft_cap: float | None = None  # on the scaled scores, natural units
    segments: bool = False  # segment-id operands (and their block ranges in SMEM)
    sinks: bool = False  # a sink logit per query head (forward only: the backward reads the LSE)

    @property
    def soft_cap_log2(self) -> float | None:
        """The cap in the kernels' log2 units: cap(s) * log2(e) = cap2 * tanh(s * log2(e) / cap2)."""
        return None if self.soft_cap is None else self.soft_cap * LOG2_E


def compiler_params(dimension_semantics):
    # The planner sizes blocks against vmem_budget_bytes(), above Mosaic's default scoped-VMEM
    # limit (16 MiB on v5e): raise the limit to match.
    return pltpu.CompilerParams(dimension_semantics=dimension_semantics, vmem_limit_bytes=vmem_budget_bytes())


def interpret_arg(problem: Problem):
    return pltpu.InterpretParams() if problem.interpret else False


def cost(flops: int, exps: int, bytes_accessed: int):
    """What XLA's cost analysis reports for a kernel (and its scheduler plans with): the MXU work,
    exponentials and HBM traffic of every DMA the grid issues, re-reads of K/V included."""
    return pl.CostEstimate(flops=int(flops), transcendentals=int(exps), bytes_accessed=int(bytes_accessed))


def when(condition, body, *args):
    """body(*args) under pl.when(condition), or directly when the condition is a static True."""
    if condition is True:
        body(*args)
    elif condition is not False:
        pl.when(condition)(lambda: body(*args))


def when_masked(needs, body):
    """Runs body(masked): with the mask where the tile needs it, without where it does not."""
    if needs is False or needs is True:
        body(needs)
        return
    pl.when(needs)(lambda: body(True))
    pl.when(jnp.logical_not(needs))(lambda: body(False))


# --------------------------------------------------------------------------------------------------
# Which tiles a grid visits


@dataclasses.dataclass(frozen=True)
class Grid:
    """The block structure of one kernel: rows per query and key block and their counts. The last
    block of a length that is not a multiple of its block is partial: it is read in place (rows past
    the array hold whatever the DMA left: the kernels zero them, edge_rows) and written clipped."""

    block_q: int
    block_k: int
    num_q_blocks: int
    num_kv_blocks: int

    @staticmethod
    def of(block_q: int, block_k: int, seq_q: int, seq_k: int) -> Grid:
        return Grid(block_q, block_k, -(-seq_q // block_q), -(-seq_k // block_k))


def edge_rows(seq: int, block: int) -> int:
    """The real rows of a length's last block (0: the length is a multiple of the block)."""
    return seq % block


def pad_rows(x, length: int, axis: int, mode="constant"):
    """x padded with rows along axis up to length (mode as jnp.pad's), x itself when it has them."""
    if x.shape[axis] == length:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths, mode=mode)


def zero_rows_past(ref, valid: int):
    """Rows [valid, block) of a VMEM block set to 0 (a partial edge block: past the array's end its
    buffer holds stale or undefined data, NaN included, that a product with a zero probability would
    still spread). A select over the whole block keeps the stores aligned."""
    rows = lax.broadcasted_iota(jnp.int32, ref.shape, 0)
    ref[...] = jnp.where(rows < valid, ref[...], jnp.zeros((), ref.dtype))


def zero_lanes_past(ref, valid: int):
    """Lanes [valid, block) of a (heads, block) statistics block set to 0 (a partial query block)."""
    columns = lax.broadcasted_iota(jnp.int32, ref.shape, 1)
    ref[...] = jnp.where(columns < valid, ref[...], jnp.zeros((), ref.dtype))


def _clip(x, low: int, high: int):
    if isinstance(x, int):
        return min(max(x, low), high)
    return jnp.clip(x, low, high)


def geometry_kv_range(problem: Problem, grid: Grid, q_block):
    """(first, last) key blocks the rows of query block q_block may see by the geometry; first > last
    when none."""
    first_row = q_block * grid.block_q
    first, last = problem.mask.key_range(first_row, first_row + grid.block_q - 1, problem.seq_k)
    return _block_range(first, last, grid.block_k)


def geometry_q_range(problem: Problem, grid: Grid, kv_block):
    """(first, last) query blocks whose rows may see key block kv_block by the geometry."""
    first_key = kv_block * grid.block_k
    first, last = problem.mask.query_range(first_key, first_key + grid.block_k - 1, grid.num_q_blocks * grid.block_q)
    return _block_range(first, last, grid.block_q)


def _block_range(first, last, block: int):
    """The blocks holding rows first..last: (first // block, last // block), or (0, -1) when the row
    range is empty (first > last, which may fall within one block). The rows are >= 0 unless the
    range is empty; lax.div of non-negative values lowers to one Mosaic integer division."""
    if isinstance(first, int) and isinstance(last, int):
        return (0, -1) if first > last else (first // block, last // block)
    empty = first > last
    first_block = divide(jnp.maximum(first, 0), block)
    last_block = divide(jnp.maximum(last, 0), block)
    return jnp.where(empty, 0, first_block), jnp.where(empty, -1, last_block)



def _geometry_ranges(problem: Problem, grid: Grid, per_q_block: bool) -> list[tuple[int, int]]:
    """(first, last) by the geometry for every query block (per_q_block: its key blocks) or every key
    block (its query blocks)."""
    if per_q_block:
        return [geometry_kv_range(problem, grid, i) for i in range(grid.num_q_blocks)]
    return [geometry_q_range(problem, grid, j) for j in range(grid.num_kv_blocks)]


def static_steps(problem: Problem, grid: Grid, *, per_q_block: bool):
    """The grid's step count along the streamed axis: the widest range of key blocks a query block
    visits (per_q_block), or of query blocks a key block visits; and the total of visited tiles
    (for the kernels' declared cost)."""
    widths = [max(0, last - first + 1) for first, last in _geometry_ranges(problem, grid, per_q_block)]
    return max(1, max(widths)), sum(widths)


def segment_steps(problem: Problem, grid: Grid, ranges, *, per_q_block: bool, static: int):
    """The streamed axis's step count: `static` (static_steps') without segment ids (`ranges` empty);
    with them, as a traced int32 (a dynamic grid bound), the widest range of blocks any block visits
    by its geometry and by its ids (`ranges`: segment_block_ranges), at most `static`. The grid
    then ends at the widest document's blocks: a step past a block's range visits nothing and still
    costs cycles (v5e compiler estimate: ~220 a forward step, ~120 a backward one; the pipeline's
    bookkeeping and the kernel's conditions). 8 documents of 4096
    under a causal mask at N = 32768: 2 of the causal grid's 16 key steps per query block have work,
    4 of 32 query steps per key block; its idle steps were +15% on the forward, +12% on the backward."""
    if not ranges:
        return static
    geometry = _geometry_ranges(problem, grid, per_q_block)
    firsts, lasts = (ranges[0], ranges[1]) if per_q_block else (ranges[2], ranges[3])
    batch = firsts.shape[0] // len(geometry)
    geometry_first = jnp.tile(jnp.asarray([f for f, _ in geometry], jnp.int32), batch)
    geometry_last = jnp.tile(jnp.asarray([l for _, l in geometry], jnp.int32), batch)
    widths = jnp.minimum(lasts, geometry_last) - jnp.maximum(firsts, geometry_first) + 1
    return jnp.clip(jnp.max(widths), 1, static).astype(jnp.int32)


class Visits:
    """The tiles one kernel invocation visits, from the grid indices (traced) and, with segment ids,
    the per-block ranges in SMEM: refs = (kv_first, kv_last, q_first, q_last, q_lo, q_hi, k_lo, k_hi),
    each [B * blocks] int32 (see segment_block_ranges)."""

    def __init__(self, problem: Problem, grid: Grid, batch, refs=()):
        self.problem, self.grid, self.batch = problem, grid, batch
        self.refs = refs if problem.segments else ()

    def _read(self, index, block, per_q: bool):
        count = self.grid.num_q_blocks if per_q else self.grid.num_kv_blocks
        return self.refs[index][self.batch * count + _clip(block, 0, count - 1)]

    def kv_range(self, q_block):
        """(first, last) key blocks query block q_block visits; first > last when none."""
        first, last = geometry_kv_range(self.problem, self.grid, q_block)
        if self.refs:
            first = jnp.maximum(first, self._read(0, q_block, True))
            last = jnp.minimum(last, self._read(1, q_block, True))
        return first, last

    def q_range(self, kv_block):
        """(first, last) query blocks that visit key block kv_block."""
        first, last = geometry_q_range(self.problem, self.grid, kv_block)
        if self.refs:
            first = jnp.maximum(first, self._read(2, kv_block, False))
            last = jnp.minimum(last, self._read(3, kv_block, False))
        return first, last

    def segments_mixed(self, q_block, kv_block):
        """Whether the tile needs the segment-id mask: False (static) without segment ids; else
        traced, False where both blocks hold one and the same segment id."""
        if not self.refs:
            return False
        q_lo, q_hi = self._read(4, q_block, True), self._read(5, q_block, True)
        k_lo, k_hi = self._read(6, kv_block, False), self._read(7, kv_block, False)
        return jnp.logical_not((q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo))


def stepped_block(first, last, step, count: int):
    """The block a grid step visits: first + step, clamped to the range and to the array's blocks
    (steps past the range repeat its last block, so that their DMAs are skipped)."""
    block = first + step
    if not (isinstance(last, int) and isinstance(block, int)):
        block = jnp.minimum(block, last)
    elif block > last:
        block = last
    return _clip(block, 0, count - 1)


def segment_block_ranges(q_ids, kv_ids, grid: Grid):
    """The SMEM arrays of Visits from segment ids padded to whole blocks (at least; [B, >= Nq_aligned],
    [B, >= Nk_aligned] int32, padded by repeating the last id): per query block the first and last key
    block whose ids overlap its own (range of min..max), and the same per key block; the blocks' min
    and max ids. Flattened over the batch."""
    batch = q_ids.shape[0]
    q_ids = q_ids[:, :grid.num_q_blocks * grid.block_q]
    kv_ids = kv_ids[:, :grid.num_kv_blocks * grid.block_k]
    q_blocks = q_ids.reshape(batch, grid.num_q_blocks, grid.block_q)
    k_blocks = kv_ids.reshape(batch, grid.num_kv_blocks, grid.block_k)
    q_lo, q_hi = q_blocks.min(-1), q_blocks.max(-1)
    k_lo, k_hi = k_blocks.min(-1), k_blocks.max(-1)
    overlap = (q_lo[:, :, None] <= k_hi[:, None, :]) & (k_lo[:, None, :] <= q_hi[:, :, None])  # [B, nq, nk]

    def first_last(o, axis):
        n = o.shape[axis]
        index = lax.broadcasted_iota(jnp.int32, o.shape, axis)
        first = jnp.min(jnp.where(o, index, n), axis=axis)
        last = jnp.max(jnp.where(o, index, -1), axis=axis)
        return first, last

    kv_first, kv_last = first_last(overlap, 2)
    q_first, q_last = first_last(overlap, 1)
    return tuple(x.reshape(-1).astype(jnp.int32)
                 for x in (kv_first, kv_last, q_first, q_last, q_lo, q_hi, k_lo, k_hi))


# --------------------------------------------------------------------------------------------------
# Scores


def scores(problem: Problem, q, k):
    """S * scale in log2 units, S * scale * log2(e), in fp32 on the MXU: q (rows, D) x k (keys, D)^T,
    soft-capped when the problem caps."""
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    cap = problem.soft_cap_log2
    if cap is None:
        return s * (problem.sm_scale * LOG2_E)
    # One multiply an element before the tanh, not two (the compiler does not reassociate them).
    return cap * jnp.tanh(s * (problem.sm_scale * LOG2_E / cap))


def soft_cap_slope(problem: Problem, s):
    """d cap(x) / dx at capped scores s (log2 units): 1 - tanh^2; None without a cap."""
    cap = problem.soft_cap_log2
    if cap is None:
        return None
    t = s * (1.0 / cap)
    return 1.0 - t * t


def score_mask(problem: Problem, row_start, rows: int, key_start, keys: int, *, transposed=False, segments=None,
               pad_keys=False):
    """The (rows, keys) visibility of a tile, or (keys, rows) transposed (keys on sublanes), from the
    geometry, the padded keys (pad_keys: keys at or past Nk) and segment ids (segments: a callable
    giving the (shape) boolean of equal ids); None where nothing is masked."""
    shape, query_axis = ((keys, rows), 1) if transposed else ((rows, keys), 0)
    row_index = row_start + lax.broadcasted_iota(jnp.int32, shape, query_axis)
    key_index = key_start + lax.broadcasted_iota(jnp.int32, shape, 1 - query_axis)
    terms = [problem.mask.visible(row_index, key_index)]
    if pad_keys:
        terms.append(key_index < problem.seq_k)
    if segments is not None:
        terms.append(segments(shape))
    return and_masks(*terms)


def apply_mask(s, visible):
    """The one place scores meet the mask: -inf where hidden (exp2(-inf) = 0 on every path)."""
    return s if visible is None else jnp.where(visible, s, NEG_INF)


def replicate_ids(ids_row, width: int):
    """A (1, rows) int32 row of segment ids as (rows, width) columns (the transpose runs on the XLU,
    once per block: callers keep the (rows, 128) form in VMEM and widen it with `lanes`)."""
    return lanes(row_to_replicated(ids_row), width)


# --------------------------------------------------------------------------------------------------
# Sweeps over a visited tile's row sub-blocks (forward and dQ kernels)


def visit_row_sub_blocks(problem: Problem, grid: Grid, row_start, key_start, sub_rows: int, update, *,
                         sub_keys: int | None = None, keep_skipped: bool = False, segments_mixed=False,
                         rows: int | None = None, keys: int | None = None):
    """Calls update(c, masked, cols, leading, height, segments) for the sub-blocks c of `sub_rows` query rows of a
    visited (block_q, block_k) tile (module docstring), in column chunks of at most `sub_keys` keys
    (aligned to sub_keys within the tile; leading: the sub-block's first chunk in this tile). cols =
    (col_from, col_to), static: in the static patterns only the columns some row of the sub-block may
    see (rounded out to 128 lanes: a sub-block at a window's edge or the causal diagonal skips the
    products of keys it cannot see), each chunk masked only where the band's edge crosses it.
    keep_skipped: sub-blocks that see nothing are updated anyway (masked, on 128 columns): the first
    tile of a query block starts every row's state. segments_mixed: (traced) the tile needs the
    segment mask, which every chunk then applies (segments=True: the chunk's mask includes the ids);
    a tile of one segment id runs the code of a mask without ids (on the static patterns, each pattern
    in both forms, chosen per tile at run time). rows, keys: the real rows of a partial edge
    block (edge_visits), static: the sub-blocks past `rows` are not computed, nor the key columns past
    `keys` rounded up to 128 lanes, and the last sub-block computes only its real rows rounded up to
    16 (height; sub_rows elsewhere: a last block of one row costs one row's tile, not 256)."""
    bq, bk = grid.block_q, grid.block_k
    sub_keys = bk if sub_keys is None else min(sub_keys, bk)
    mask = problem.mask
    sub_blocks = bq // sub_rows if rows is None else -(-rows // sub_rows)
    heights = [sub_rows] * sub_blocks
    if rows is not None:
        heights[-1] = min(sub_rows, -(-(rows - (sub_blocks - 1) * sub_rows) // EDGE_ROWS) * EDGE_ROWS)
    pad_keys = keys is not None
    key_columns = bk if keys is None else min(bk, -(-keys // LANES) * LANES)

    def chunks(c, cols, kind_of, segment_masked):
        """update() over [cols) in chunks; kind_of(col_from, width): the chunk's static kind;
        segment_masked: every chunk applies the segment ids."""
        col_from, col_to = cols
        leading = True
        while col_from < col_to:
            width = min(col_to, (col_from // sub_keys + 1) * sub_keys) - col_from
            kind = kind_of(col_from, width)
            if kind != SKIP or (leading and keep_skipped and col_from + width >= col_to):
                masked = pad_keys or kind != FULL or segment_masked
                update(c, masked, (col_from, col_from + width), leading, heights[c], segment_masked)
                leading = False
            col_from += width

    def sweep(d, kinds, segment_masked):
        for c in range(sub_blocks):
            cols = (0, 0)
            if kinds[c] != SKIP:
                cols = (0, bk) if kinds[c] == FULL else mask.band_columns(d - c * sub_rows, sub_rows, bk)
                if chunked:  # ... within the chunk of the sub-block's rows
                    chunk_from, chunk_to = mask.chunk_columns(d, c * sub_rows, bk)
                    cols = (max(cols[0], chunk_from), min(cols[1], chunk_to))
                cols = (cols[0], min(cols[1], key_columns))  # a partial key block: its real columns
            if cols[0] < cols[1]:
                kind_of = ((lambda col, width: FULL) if kinds[c] == FULL else
                           (lambda col, width, c=c: mask.band_kind(d - c * sub_rows + col, sub_rows, width)))
                chunks(c, cols, kind_of, segment_masked)
            elif keep_skipped:
                update(c, True, (0, min(bk, LANES)), True, heights[c], segment_masked)

    chunked = mask.chunks_in_tiles(bq, bk, sub_rows)
    if mask.static_tiles(bq, bk, sub_rows):
        delta = key_start - row_start + mask.offset
        patterns, full = mask.band_patterns(bq, bk, sub_rows, grid.num_q_blocks * bq, grid.num_kv_blocks * bk,
                                            chunked=chunked)
        for d, kinds in patterns:
            when(delta == d, when_masked, segments_mixed, functools.partial(sweep, d, kinds))
        if full is not None:
            in_full = both(delta >= full[0], delta <= full[1]) if len(patterns) else True
            when(in_full, when_masked, segments_mixed, functools.partial(sweep, None, [FULL] * (bq // sub_rows)))
        return
    for c in range(sub_blocks):
        any_visible, needs_mask = mask.tile_flags(row_start + c * sub_rows, sub_rows, key_start, bk)
        if pad_keys:
            needs_mask = True
        needs_mask = either(needs_mask, segments_mixed)
        # One masked form per sub-block (its ids applied with the geometry whenever it is masked): this
        # path's conditions around each sub-block already cost more than the ids' compare.
        when(True if keep_skipped else any_visible, when_masked, needs_mask,
             lambda masked, c=c: chunks(c, (0, key_columns), lambda col, width: PARTIAL if masked else FULL,
                                        masked and problem.segments))


def edge_visits(problem: Problem, grid: Grid, q_block, kv_block, visit):
    """Calls visit(rows, keys) under the conditions that tell a partial edge block from a whole one:
    rows (keys) is the real row count of the last query (key) block where the length is not a
    multiple of the block, None otherwise. Each combination is its own straight-line region, so the
    whole blocks run exactly the code of an aligned length."""
    def cases(length: int, block: int, count: int, index):
        edge = edge_rows(length, block)
        if not edge:
            return [(None, True)]
        last = index == count - 1
        return ([] if count == 1 else [(None, negate(last))]) + [(edge, True if count == 1 else last)]

    for rows, at_rows in cases(problem.seq_q, grid.block_q, grid.num_q_blocks, q_block):
        for keys, at_keys in cases(problem.seq_k, grid.block_k, grid.num_kv_blocks, kv_block):
            when(both(at_rows, at_keys), visit, rows, keys)


def key_sub_block_patterns(problem: Problem, block_q: int, block_k: int, keys: int, seq_q: int, seq_k: int):
    """The dK/dV kernel's static patterns (keys on sublanes, queries on lanes): ([(delta, [(key_from,
    keys, col_from, col_to, masked)])], full_range) for every delta at which the band's edges cross
    a (block_q x block_k) tile: per key sub-block of `keys` rows, the query columns [col_from, col_to)
    it must compute (rounded out to the 128 lanes) and whether any score there is masked. Query
    column c sees key row r of the tile iff lo <= delta + r - c <= hi; in blocks holding whole chunks
    (Mask.chunks_in_tiles) every tile is a pattern, each key sub-block narrowed to its chunk's columns."""
    mask = problem.mask
    lo, hi = mask.band
    chunked = mask.chunks_in_tiles(block_q, block_k, keys)
    patterns, full = mask.band_patterns(block_q, block_k, block_q, seq_q, seq_k, chunked=chunked)
    result = []
    for d, _ in patterns:
        sub_blocks = []
        for key_from in range(0, block_k, keys):
            col_from = 0 if hi is None else max(0, d + key_from - hi)
            col_to = block_q if lo is None else min(block_q, d + key_from + keys - 1 - lo + 1)
            if chunked:  # the query columns of the key sub-block's chunk
                chunk_from, chunk_to = mask.chunk_columns(-d, key_from, block_q)
                col_from, col_to = max(col_from, chunk_from), min(col_to, chunk_to)
            if col_from >= col_to:
                continue  # no column sees any key of this sub-block
            col_from = col_from // LANES * LANES
            col_to = min(block_q, -(-col_to // LANES) * LANES)
            kind = mask.band_kind(d + key_from - col_from, col_to - col_from, keys)
            sub_blocks.append((key_from, keys, col_from, col_to, kind != FULL))
        result.append((d, sub_blocks))
    return result, full
