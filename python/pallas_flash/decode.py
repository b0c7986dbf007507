"""FlashDecoding for the TPU: a few new query tokens against a long KV cache, contiguous or paged,
split over the cache length (split-KV) and merged exactly by LSE; the same sharded over a 2x2 mesh;
and the append that writes new tokens' K/V into the cache.

Kernel grid (B, splits): one grid step decodes one split of one sequence, every KV head of it. All
query heads of a GQA group and all new tokens form one (group * T, D) query tile, so each KV head is
read once for its whole group. K and V stay in HBM and are fetched by the kernel's own DMAs, block by
block into two VMEM slots: block t + 1 (the next block of this head, or the first of the next head)
is in flight while block t is computed. A block of a paged cache is several pages, one DMA each,
read in place through the page table (scalar prefetch, SMEM); blocks past a sequence's length are
neither fetched nor computed. Each split writes a partial (O, LSE); merge_attention_states combines
them.

The double buffering stays within a grid step: the compiler's static profile cannot follow a DMA
that is awaited in a later grid step, and a grid step holds a whole split of a sequence, so the one
block that is not prefetched is the first of each step.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_flash import cpu_kernels
from pallas_flash.backend import kernel_mode
from pallas_flash.flash_attention import check_variants
from pallas_flash.mask import Mask, divide, soft_cap
from pallas_flash.merge import merge_attention_states
from pallas_flash.online_softmax import LANES, LOG2_E, NEG_INF, finish_state, init_state, stat_shape, update_state
from pallas_flash.partition import AutoAxes, per_shard, place_on_mesh
from pallas_flash.planner import round_up, vmem_budget_bytes
from pallas_flash.reference import masked_attention

MAX_QUERY_TOKENS = 16
PAGE_SIZES = (16, 32, 64, 128, 256, 512)
# Rows per block: a decode step is a stream of K/V with ~1,500 cycles of fixed work per block
# (v5e compiler estimate), so 4096-row blocks (2 MiB of K and V at D = 128) reach the HBM floor
# where 1024 rows stayed at 62% of it.
BLOCK_ROWS = 4096
# At most this many pages (DMAs of K, and of V) per block: each DMA costs ~15 scalar cycles to issue
# and await, so 16-row pages are bound by the DMA issue, not by HBM, whatever the block.
MAX_PAGES_PER_BLOCK = 64


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """How a cache is read: contiguous [B, Hkv, Nmax, D] (page_size = block_k, one DMA per block) or
    page pools [num_pages, Hkv, page_size, D] with a page table [B, pages_per_seq]."""

    paged: bool
    heads_kv: int
    page_size: int
    pages_per_seq: int  # contiguous: blocks per sequence
    pages_per_block: int
    rows: int | None = None  # contiguous with blocks that do not divide it: the cache's length

    @property
    def capacity(self) -> int:  # positions per sequence
        return self.rows if self.rows is not None else self.pages_per_seq * self.page_size

    @property
    def block_k(self) -> int:
        return self.pages_per_block * self.page_size

    @property
    def num_blocks(self) -> int:
        return -(-self.pages_per_seq // self.pages_per_block)


def decode_block_k(max_len: int) -> int:
    """Key rows per block of a contiguous cache: the largest of 4096..128 dividing the cache length
    (a DMA reads whole blocks); a cache shorter than that is one block."""
    for block in (BLOCK_ROWS, 2048, 1024, 512, 256, 128):
        if max_len % block == 0:
            return block
    if max_len <= 2048:
        return max_len
    raise ValueError(f"flash_decode: expected a cache length that is a multiple of 128 (or at most 2048), got {max_len}")


def cache_layout(cache_shape, table_shape=None) -> CacheLayout:
    """The layout of a cache of this shape: contiguous, or paged with a page table of table_shape."""
    if table_shape is None:
        block = decode_block_k(cache_shape[2])
        return CacheLayout(False, cache_shape[1], block, cache_shape[2] // block, 1)
    page_size, pages_per_seq = cache_shape[2], table_shape[1]
    per_block = min(pages_per_seq, max(1, BLOCK_ROWS // page_size), MAX_PAGES_PER_BLOCK)
    return CacheLayout(True, cache_shape[1], page_size, pages_per_seq, per_block)


def _layout(k_cache, page_table) -> CacheLayout:
    return cache_layout(k_cache.shape, None if page_table is None else page_table.shape)


def windowed_layout(layout: CacheLayout, span: int) -> CacheLayout:
    """A contiguous cache read through a window of `span` positions: blocks that split the span (plus
    the 127 rows of aligning its start down to 128) evenly, in multiples of 128 rows, so that the
    rows fetched exceed the window's by less than 128 per block (4096-row blocks would fetch up to
    twice a 4096-position window). A paged cache: the pages of the span (from a page-aligned start)
    in blocks of equal page counts, whole 128-row tiles (its 4096-row blocks left a window
    of 4097 positions a second block of one page, a block step per head for 128 rows)."""
    align = layout.page_size if layout.paged else LANES
    if span + align - 1 >= layout.capacity:
        return layout
    if layout.paged:
        granule = max(1, LANES // layout.page_size)
        pages = -(-(span + layout.page_size - 1) // layout.page_size)
        # Up to 1.25 x BLOCK_ROWS rows a block: a 4096-position window and the page its start is
        # aligned down by (Mistral's, Gemma 2's) are one block, where two blocks of 2176 rows cost a
        # block's fixed work more per head (v5e compiler estimate, 131072 context, 128-row pages: 82%
        # of the HBM floor against 89% at B = 1, 91% against 99% at B = 8).
        max_rows = BLOCK_ROWS + BLOCK_ROWS // 4
        count = max(-(-pages // MAX_PAGES_PER_BLOCK), -(-pages * layout.page_size // max_rows))
        per_block = round_up(-(-pages // count), granule)  # whole 128-row tiles (pages < 128 rows)
        return dataclasses.replace(layout, pages_per_block=per_block)
    count = -(-(span + LANES - 1) // BLOCK_ROWS)
    block = -(-(span + LANES - 1) // count // LANES) * LANES
    return CacheLayout(False, layout.heads_kv, block, -(-layout.capacity // block), 1, rows=layout.capacity)


def read_blocks(layout: CacheLayout, rules: "DecodeRules", query_tokens: int) -> int:
    """The most blocks a sequence's tokens read: every block, or a window's or chunk's worth."""
    span = rules.span(query_tokens)
    if span is None:
        return layout.num_blocks
    layout = windowed_layout(layout, span)
    align = layout.page_size if layout.paged else LANES
    return min(layout.num_blocks, -(-(span + align - 1) // layout.block_k))


def default_num_splits(num_blocks: int) -> int:
    """At least 8 key blocks per split and at most 8 splits: enough partials to spread one sequence
    over a megacore's cores without making the merge a visible cost."""
    return max(1, min(8, num_blocks // 8))


@dataclasses.dataclass(frozen=True)
class DecodeRules:
    """What a decode's tokens see beyond causality, and how their scores are shaped: a left window
    (positions before a token's own), a chunk, the soft cap (natural units)."""

    window: int | None = None
    chunk: int | None = None
    soft_cap: float | None = None

    @property
    def mask(self) -> Mask:
        """The geometry over positions (a token's and a cache row's alike)."""
        return Mask(causal=True, window=(self.window, None), chunk=self.chunk)

    def span(self, query_tokens: int) -> int | None:
        """The most positions a sequence's tokens see together (None: unbounded)."""
        spans = [n + query_tokens for n in (self.window, self.chunk) if n is not None]
        return min(spans) if spans else None


def _decode_kernel(*refs, layout: CacheLayout, scale: float, query_tokens: int, blocks_per_split: int,
                   static_end: int | None, page_offset: bool, rules: DecodeRules):
    if static_end is None:
        ends_ref, *refs = refs
    if page_offset:  # a device's first page in a sharded pool: its table holds global page ids
        offset_ref, *refs = refs
    table_ref, q_ref, k_hbm, v_hbm, o_ref, lse_ref, k_buf, v_buf, sems, row_max_ref, row_sum_ref, acc_ref = refs
    b, split = pl.program_id(0), pl.program_id(1)
    # The position after the last query token, in this cache's coordinates (past its end on the
    # shards before a sequence's last one, below 0 on those after).
    end = ends_ref[b] if static_end is None else static_end
    visible = jnp.clip(end, 0, layout.capacity)  # positions the queries may see
    block_k, rows = layout.block_k, q_ref.shape[1]
    windowed = rules.span(query_tokens) is not None
    # Block j holds positions [base + j * block_k, +block_k): base is 0, or with a window or chunk the
    # first position any token sees, aligned down to a page (paged) or 128 rows (contiguous), so that
    # only the window's pages (rows) are fetched.
    base = 0
    if windowed:
        low_position, _ = rules.mask.key_range(end - query_tokens, end - 1, layout.capacity)
        align = layout.page_size if layout.paged else min(LANES, block_k)
        base = divide(jnp.maximum(low_position, 0), align) * align
    num_blocks = divide(jnp.maximum(visible - base, 0) + (block_k - 1), block_k)
    first = split * blocks_per_split
    count = jnp.clip(num_blocks - first, 0, blocks_per_split)  # this step's blocks, per head

    def origin(block):
        """(fetched_from, first_position) of a block: a contiguous block that would run past the
        cache is fetched from capacity - block_k, its rows below first_position already counted."""
        start = base + block * block_k
        if windowed and not layout.paged:
            return jnp.minimum(start, layout.capacity - block_k), start
        return start, start

    def copies(h, block, slot):
        """[(needed, DMA)] of block `block` of head h into `slot`: one per cache block, or one per page
        (pages past the sequence's length are not fetched: their table entries need not be pages)."""
        pairs = ((k_hbm, k_buf), (v_hbm, v_buf))
        if not layout.paged:
            fetched_from, _ = origin(block)
            return [(True, pltpu.make_async_copy(src.at[b, h, pl.ds(fetched_from, block_k)], dst.at[slot],
                                                 sems.at[kind, slot])) for kind, (src, dst) in enumerate(pairs)]
        result = []
        base_page = 0 if not windowed else divide(base, layout.page_size)
        for p in range(layout.pages_per_block):
            index = base_page + block * layout.pages_per_block + p
            page = table_ref[b, jnp.minimum(index, layout.pages_per_seq - 1)]
            if page_offset:
                page = page - offset_ref[0]
            rows_in_block = pl.ds(p * layout.page_size, layout.page_size)
            for kind, (src, dst) in enumerate(pairs):
                copy = pltpu.make_async_copy(src.at[page, h], dst.at[slot, rows_in_block], sems.at[kind, slot])
                result.append((index * layout.page_size < visible, copy))
        return result

    def each_copy(h, block, slot, action):
        """copy.start() or copy.wait() on every DMA of a block; the per-page check only on the
        sequence's last block (the others are whole)."""
        def run(checked):
            for needed, copy in copies(h, block, slot):
                if checked and needed is not True:
                    pl.when(needed)(getattr(copy, action))
                else:
                    getattr(copy, action)()
        if not layout.paged:
            run(False)
            return
        last = block == num_blocks - 1
        pl.when(last)(lambda: run(True))
        pl.when(jnp.logical_not(last))(lambda: run(False))

    pl.when(count > 0)(lambda: each_copy(0, first, 0, "start"))

    def head(h, carry):
        init_state(row_max_ref, row_sum_ref, acc_ref)

        def block_step(j, carry):
            step = h * count + j
            slot = lax.rem(step, 2)
            next_h = jnp.where(j + 1 < count, h, h + 1)
            next_j = jnp.where(j + 1 < count, j + 1, 0)
            pl.when(next_h < layout.heads_kv)(lambda: each_copy(next_h, first + next_j, 1 - slot, "start"))
            block = first + j
            each_copy(h, block, slot, "wait")
            s = lax.dot_general(q_ref[h], k_buf[slot], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            s = s * (scale * LOG2_E)  # log2 units: the online softmax works in exp2
            if rules.soft_cap is not None:
                cap = rules.soft_cap * LOG2_E
                s = cap * jnp.tanh(s * (1.0 / cap))
            # Row r is query token t = r % T at position end - T + t: it sees keys up to that position
            # (and within its window and chunk).
            fetched_from, first_position = origin(block)
            token = lax.rem(lax.broadcasted_iota(jnp.int32, (rows, block_k), 0), jnp.int32(query_tokens))
            col = fetched_from + lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
            position = end - query_tokens + token
            seen = col <= jnp.minimum(position, visible - 1)
            if windowed:
                seen &= rules.mask.visible(position, col) & (col >= first_position)
            s = jnp.where(seen, s, NEG_INF)
            # Rows past the length hold whatever the slot held (a page not fetched, a stale block):
            # a select, so that no NaN there reaches the accumulator through 0 * NaN.
            key = fetched_from + lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)
            v = jnp.where(key < visible, v_buf[slot], jnp.zeros((), v_buf.dtype))
            update_state(s, v, row_max_ref, row_sum_ref, acc_ref)
            return carry

        lax.fori_loop(0, count, block_step, 0)
        o, lse = finish_state(row_max_ref, row_sum_ref, acc_ref)
        o_ref[h] = o
        lse_ref[h] = lse[:, :1]
        return carry

    lax.fori_loop(0, layout.heads_kv, head, 0)


def _decode_partials(q, k_cache, v_cache, end, page_table, *, scale, num_splits, interpret, page_offset=None,
                     rules: DecodeRules = DecodeRules()):
    """Partials over splits: O [B, splits, Hkv, group*T, D] f32 and LSE [B, splits, Hkv, group*T, 1].
    end: per sequence, the position after its last query token in this cache's coordinates: an
    int32 [B] array read by scalar prefetch, or a Python int for every sequence, known at trace time.
    page_offset: a traced scalar subtracted from every page id (a device's part of a sharded pool),
    passed to the kernel rather than applied to the table: the table must reach SMEM as the caller's
    array (an XLA op's output may sit in VMEM, which the compiler's static profile cannot follow)."""
    static_end = int(end) if isinstance(end, (int, np.integer)) else None
    batch, heads_q, query_tokens, dim = q.shape
    span = rules.span(query_tokens)
    layout = _layout(k_cache, page_table)
    if span is not None:
        layout = windowed_layout(layout, span)
    group = heads_q // layout.heads_kv
    rows = group * query_tokens
    q_rows = q.reshape(batch, layout.heads_kv, rows, dim)  # heads of a group are adjacent: a free reshape
    blocks = read_blocks(layout, rules, query_tokens)
    splits = min(num_splits, blocks)
    blocks_per_split = -(-blocks // splits)
    # The page table, 2-D in SMEM (a flattened copy would be an XLA op the static profile cannot
    # follow into SMEM); a contiguous cache has none.
    table = jnp.zeros((1, 1), jnp.int32) if page_table is None else page_table.astype(jnp.int32)
    scalars = (() if static_end is not None else (jnp.asarray(end, jnp.int32),)) + (
        () if page_offset is None else (jnp.reshape(page_offset, (1,)).astype(jnp.int32),)) + (table,)

    def q_map(b, s, *_):
        return b, 0, 0, 0

    def out_map(b, s, *_):
        return b, s, 0, 0, 0

    kernel = functools.partial(_decode_kernel, layout=layout, scale=scale, query_tokens=query_tokens,
                               blocks_per_split=blocks_per_split, static_end=static_end,
                               page_offset=page_offset is not None, rules=rules)
    positions = batch * blocks * layout.block_k  # at most every row it may see once (fewer for shorter sequences)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(scalars),
            grid=(batch, splits),
            in_specs=[
                pl.BlockSpec((None, layout.heads_kv, rows, dim), q_map),
                pl.BlockSpec(memory_space=pl.ANY),  # K and V stay in HBM: the kernel's DMAs read them
                pl.BlockSpec(memory_space=pl.ANY),
            ],
            out_specs=[
                pl.BlockSpec((None, None, layout.heads_kv, rows, dim), out_map),
                pl.BlockSpec((None, None, layout.heads_kv, rows, 1), out_map),
            ],
            scratch_shapes=[
                pltpu.VMEM((2, layout.block_k, dim), k_cache.dtype),  # two slots of K and of V
                pltpu.VMEM((2, layout.block_k, dim), v_cache.dtype),
                pltpu.SemaphoreType.DMA((2, 2)),  # (K or V, slot)
                pltpu.VMEM(stat_shape(rows), jnp.float32),  # row_max
                pltpu.VMEM(stat_shape(rows), jnp.float32),  # row_sum
                pltpu.VMEM((rows, dim), jnp.float32),  # acc
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((batch, splits, layout.heads_kv, rows, dim), jnp.float32),
            jax.ShapeDtypeStruct((batch, splits, layout.heads_kv, rows, 1), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"),
                                             vmem_limit_bytes=vmem_budget_bytes()),
        interpret=pltpu.InterpretParams() if interpret else False,
        cost_estimate=pl.CostEstimate(flops=4 * layout.heads_kv * rows * positions * dim,
                                      transcendentals=layout.heads_kv * rows * positions * (
                                          2 if rules.soft_cap is not None else 1),
                                      bytes_accessed=2 * layout.heads_kv * positions * dim * k_cache.dtype.itemsize
                                      + 2 * q.size * 4),
        name="pallas_flash_decode",
    )(*scalars, q_rows, k_cache, v_cache)


def _contiguous_view(cache, page_table):
    """[B, Hkv, capacity, D]: the cache itself, or (paged, reference path only) its pages gathered
    in table order (entries past a length may be anything: they are clamped, and masked later)."""
    if page_table is None:
        return cache
    pages = cache[jnp.clip(page_table, 0, cache.shape[0] - 1)]  # [B, pages_per_seq, Hkv, page, D]
    batch, per_seq, heads, page, dim = pages.shape
    return pages.transpose(0, 2, 1, 3, 4).reshape(batch, heads, per_seq * page, dim)


def _reference_partial(q, k_cache, v_cache, end, page_table, *, scale, rules: DecodeRules = DecodeRules()):
    """The same contract as the kernel after its split merge, in plain jax.numpy (the path off
    TPU and CPU): O [B, Hkv, group*T, D] f32 and LSE [B, Hkv, group*T]."""
    k_cache, v_cache = _contiguous_view(k_cache, page_table), _contiguous_view(v_cache, page_table)
    batch, heads_q, query_tokens, dim = q.shape
    heads_kv, max_len = k_cache.shape[1], k_cache.shape[2]
    rows = heads_q // heads_kv * query_tokens
    q_rows = q.reshape(batch, heads_kv, rows, dim).astype(jnp.float32)
    s = jnp.einsum("bhrd,bhkd->bhrk", q_rows, k_cache.astype(jnp.float32), precision="highest") * scale
    s = soft_cap(s, rules.soft_cap)
    token = jnp.arange(rows)[:, None] % query_tokens
    col = jnp.arange(max_len)[None, :]
    end = jnp.broadcast_to(jnp.asarray(end, jnp.int32), (batch,))
    position = end[:, None, None, None] - query_tokens + token[None, None]
    visible = col[None, None] <= position
    if rules.span(query_tokens) is not None:
        visible &= rules.mask.visible(position, col[None, None])
    v_cache = jnp.where((col[0] < jnp.clip(end, 0, max_len)[:, None])[:, None, :, None], v_cache, 0)
    return masked_attention(jnp.where(visible, s, -jnp.inf), v_cache)


def _decode(q, k_cache, v_cache, end, page_table, *, scale, num_splits, mode, page_offset=None, capacity=None,
            rules: DecodeRules = DecodeRules()):
    """Attention of q over one cache (or shard), splits merged: O [B, Hkv, rows, D] f32, LSE [B, Hkv, rows].
    A shard of `capacity` positions (the sharded decode) may see an `end` past it, or below 0. Sinks
    are not applied here (once per call: _with_sinks)."""
    if mode == "cpu":
        local_table = page_table if page_offset is None else page_table - page_offset
        seq_lens, after = end, 0
        if capacity is not None:  # the positions past the shard are held by the next shards
            seq_lens, after = jnp.clip(end, 0, capacity), jnp.maximum(jnp.asarray(end) - capacity, 0)
        o, lse = cpu_kernels.decode(q, k_cache, v_cache, seq_lens, after, local_table, scale=scale,
                                    num_splits=num_splits or 0, window=rules.window, chunk=rules.chunk,
                                    soft_cap=rules.soft_cap)
        batch, heads_q, query_tokens, dim = q.shape
        heads_kv = k_cache.shape[1]
        rows = heads_q // heads_kv * query_tokens
        return o.reshape(batch, heads_kv, rows, dim), lse.reshape(batch, heads_kv, rows)
    if mode == "reference":
        local_table = page_table if page_offset is None else page_table - page_offset
        return _reference_partial(q, k_cache, v_cache, end, local_table, scale=scale, rules=rules)
    o_parts, lse_parts = _decode_partials(q, k_cache, v_cache, end, page_table, scale=scale, num_splits=num_splits,
                                          interpret=mode == "interpret", page_offset=page_offset, rules=rules)
    if o_parts.shape[1] == 1:  # one split: its partial is the result (no merge pass over it)
        return o_parts[:, 0], lse_parts[:, 0, :, :, 0]
    return merge_attention_states(o_parts, lse_parts[..., 0], axis=1, interpret=mode == "interpret")


# --------------------------------------------------------------------------------------------------
# Validation: shapes always; lengths and page ids wherever their values are known (not under jit)


def _concrete(x):
    """x as a NumPy array if its values are known here: None under a trace, and for an array that
    lies partly on other processes' devices (jax.distributed: reading it back would fail), whose
    values are then checked no more than a traced one's."""
    if x is None or isinstance(x, jax.core.Tracer):
        return None
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return None
    return np.asarray(x)


def _check_cache(name: str, what: str, tokens, k_cache, v_cache, page_table):
    """tokens: the [B, H, T, D] array the call brings (q, or the new K/V), named `what`. The cache's
    rows are D wide, or a multiple k of D: k KV heads packed per row (heads_per_row)."""
    if tokens.ndim != 4 or k_cache.ndim != 4:
        layout = "page pools [num_pages, Hkv, page_size, D]" if page_table is not None else "caches [B, Hkv, Nmax, D]"
        raise ValueError(f"{name}: expected {what} [B, H, T, D] and {layout}, got ranks {tokens.ndim}, {k_cache.ndim}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{name}: expected k_cache and v_cache of one shape, got {k_cache.shape} and {v_cache.shape}")
    if k_cache.shape[3] % tokens.shape[3]:
        raise ValueError(f"{name}: expected caches with {what}'s D = {tokens.shape[3]} (or a multiple of it: KV heads "
                         f"packed per row), got {k_cache.shape}")
    per_row = heads_per_row(tokens, k_cache)
    kv_heads = k_cache.shape[1] * per_row
    if tokens.shape[1] % kv_heads:
        packed = f" ({k_cache.shape[1]} x {per_row} packed per row)" if per_row > 1 else ""
        raise ValueError(f"{name}: expected the cache's Hkv dividing {what}'s heads (mismatched heads), got "
                         f"{tokens.shape[1]} and Hkv={kv_heads}{packed}")
    if page_table is None:
        if tokens.shape[0] != k_cache.shape[0]:
            raise ValueError(f"{name}: expected a cache with {what}'s B = {tokens.shape[0]}, got {k_cache.shape}")
        return
    if page_table.ndim != 2 or page_table.shape[0] != tokens.shape[0] or not jnp.issubdtype(page_table.dtype,
                                                                                           jnp.integer):
        raise ValueError(f"{name}: expected page_table [B={tokens.shape[0]}, pages_per_seq] of integers, got "
                         f"{page_table.dtype}{list(page_table.shape)}")
    if k_cache.shape[2] not in PAGE_SIZES:
        raise ValueError(f"{name}: expected a page size (k_cache.shape[2]) that is a power of two in "
                         f"{PAGE_SIZES[0]}..{PAGE_SIZES[-1]}, got {k_cache.shape[2]}")


def _check_lengths(name: str, lengths, batch: int, capacity: int, *, new_tokens: int = 0):
    """lengths: a Python int or [B] integers, each + new_tokens within 0..capacity where known."""
    if isinstance(lengths, (int, np.integer)):
        if not 0 <= lengths <= capacity - new_tokens:
            raise ValueError(f"{name}: expected an int length in 0..{capacity - new_tokens} (the cache's capacity "
                             f"{capacity}{f' less {new_tokens} new tokens' if new_tokens else ''}), got {lengths}")
        return
    if lengths.shape != (batch,):
        raise ValueError(f"{name}: expected lengths of shape ({batch},), got {lengths.shape}")
    values = _concrete(lengths)
    if values is not None and values.size and (values.min() < 0 or values.max() + new_tokens > capacity):
        bad = int(np.argmax((values < 0) | (values + new_tokens > capacity)))
        raise ValueError(f"{name}: expected lengths in 0..{capacity - new_tokens} (a length past the table's capacity "
                         f"of {capacity} positions{f' with {new_tokens} new tokens' if new_tokens else ''}), got "
                         f"{int(values[bad])} for sequence {bad}")


def _check_pages(name: str, page_table, lengths, page_size: int, pool_pages: range):
    """Every page a sequence uses (positions below its length) is a page of the pool (or of this
    device's part of it), where the table and lengths are known."""
    table, values = _concrete(page_table), _concrete(lengths)
    if table is None or values is None:
        return
    values = np.broadcast_to(values, (table.shape[0],))
    for b, length in enumerate(values):
        used = table[b, : -(-int(length) // page_size)]
        bad = used[(used < pool_pages.start) | (used >= pool_pages.stop)]
        if bad.size:
            raise ValueError(f"{name}: expected page_table entries in {pool_pages.start}..{pool_pages.stop - 1} for "
                             f"the pages sequence {b} uses (length {int(length)}), got page id {int(bad[0])}")


# --------------------------------------------------------------------------------------------------
# KV heads packed per row: caches of D < 128 without lane padding


def heads_per_row(tokens, k_cache) -> int:
    """KV heads per cache row: 1, or k for a cache whose rows hold k heads side by side, [..., Hkv / k,
    positions, k * D] (KV head h in cache head h // k, lanes (h % k) * D onward).

    Why: a TPU array's last axis is laid out in 128 lanes, so a [..., 64] cache takes twice its size in
    HBM (a decode at batch 32 and a 32k context of a model with D = 64 then no longer fits a chip), and
    its reads carry the padding. The kernels take a packed cache unchanged, as k * D-wide heads: a query
    of head h is spread to k * D lanes, zero outside h's, so its scores are h's keys' alone (the zeros
    meet the other heads' lanes), and its output is h's lanes of the wide result. The products do k
    times the MXU work of D lanes, which costs nothing in a decode bound by HBM."""
    return k_cache.shape[3] // tokens.shape[3]


def packed_heads_per_row(kv_heads: int, head_dim: int) -> int:
    """The heads per row that fill 128 lanes: 128 / D where D divides 128 and that divides Hkv, else 1."""
    if head_dim >= LANES or LANES % head_dim or kv_heads % (LANES // head_dim):
        return 1
    return LANES // head_dim


def pack_rows(new, per_row: int):
    """New K or V rows [B, Hkv, T, D] in the layout of a cache with per_row heads a row: [B, Hkv / k, T, k * D]."""
    if per_row == 1:
        return new
    batch, heads, tokens, dim = new.shape
    grouped = new.reshape(batch, heads // per_row, per_row, tokens, dim).transpose(0, 1, 3, 2, 4)
    return grouped.reshape(batch, heads // per_row, tokens, per_row * dim)


def _head_slots(q, k_cache):
    """[Hq, k] booleans: the lane slot of each query head's KV head in a row of k_cache."""
    per_row = heads_per_row(q, k_cache)
    group = q.shape[1] // (k_cache.shape[1] * per_row)
    slot = (jnp.arange(q.shape[1]) // group) % per_row
    return slot[:, None] == jnp.arange(per_row)[None, :]


def _spread_queries(q, k_cache):
    """q [B, Hq, T, D] as [B, Hq, T, k * D] queries of k_cache's packed rows: each in its KV head's lanes."""
    if heads_per_row(q, k_cache) == 1:
        return q
    own = _head_slots(q, k_cache)[None, :, None, :, None]
    spread = jnp.where(own, q[:, :, :, None, :], jnp.zeros((), q.dtype))
    return spread.reshape(*q.shape[:3], k_cache.shape[3])


def _own_lanes(o, q, k_cache):
    """A decode's output over k_cache's packed rows, [B, Hq, T, k * D] in any grouping of its leading
    axes, as [B, Hq, T, D]: each query head's own lanes."""
    per_row = heads_per_row(q, k_cache)
    if per_row == 1:
        return o
    own = _head_slots(q, k_cache)[None, :, None, :, None]
    return jnp.where(own, o.reshape(*q.shape[:3], per_row, q.shape[3]), 0).sum(axis=3)


# --------------------------------------------------------------------------------------------------
# Public entry points


def _finish(o, lse, q, return_lse, sinks=None):
    """O [B, Hq, T, D] in q's dtype (and the LSE) from the merged partials, with the sinks joined: a
    sink is a partial (O = 0, LSE = sink) merged once, after every split and shard."""
    batch, heads_q, query_tokens, dim = q.shape
    o = o.reshape(batch, heads_q, query_tokens, dim)
    lse = lse.reshape(batch, heads_q, query_tokens)
    if sinks is not None:
        sink = jnp.asarray(sinks, jnp.float32)[None, :, None]
        merged = jnp.logaddexp(lse, sink)
        o = o * jnp.where(lse == NEG_INF, 0.0, jnp.exp(lse - merged))[..., None]
        lse = merged
    o = o.astype(q.dtype)
    return (o, lse) if return_lse else o


def _decode_rules(name: str, q, window, chunk, logits_soft_cap, sinks) -> DecodeRules:
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 0):
        raise ValueError(f"{name}: argument 'window': expected None or an int >= 0 (the positions before a token "
                         f"it sees), got {window!r}")
    check_variants(name, q.shape[0], q.shape[1], q.shape[2], q.shape[2], chunk=chunk, logits_soft_cap=logits_soft_cap,
                   sinks=sinks)
    return DecodeRules(window=window, chunk=chunk, soft_cap=None if logits_soft_cap is None else float(logits_soft_cap))


def _check_query(name: str, q):
    if q.ndim == 4 and not 1 <= q.shape[2] <= MAX_QUERY_TOKENS:
        raise ValueError(f"{name}: expected 1..{MAX_QUERY_TOKENS} query tokens, got T = {q.shape[2]}")


def flash_decode(q, k_cache, v_cache, lengths, *, page_table=None, sm_scale: float | None = None,
                 window: int | None = None, chunk: int | None = None, logits_soft_cap: float | None = None,
                 sinks=None, num_splits: int | None = None, return_lse: bool = False, interpret: bool | None = None):
    """Decode attention: q [B, Hq, T, D] (T new tokens, 1..16) against a KV cache.

    - Contiguous (page_table None): k_cache, v_cache [B, Hkv, Nmax, D].
    - Paged: k_cache, v_cache are page pools [num_pages, Hkv, page_size, D] (page size a power of two,
      16 to 512) and page_table [B, pages_per_seq] int32 names the page holding positions
      [i * page_size, (i + 1) * page_size) of sequence b. Entries past a sequence's length are never
      read (they may be -1). Pages are read in place by the kernel's DMAs, never gathered.
    - Either may pack k KV heads per row: a last axis of k * D, [..., Hkv / k, positions, k * D]
      (heads_per_row; KV head h in cache head h // k, lanes (h % k) * D onward). For D = 64 on a TPU
      this halves the cache's HBM (a last axis of 64 is padded to 128 lanes); append_kv writes it from
      [B, Hkv, T, D] rows, packed_heads_per_row gives the k that fills 128 lanes.
    lengths [B] int32: valid cache positions per sequence, the new tokens' K/V included (0 allowed:
    that sequence's output is 0 and its LSE -inf); new token t sits at position lengths - T + t and
    sees keys j <= that position (a sequence with fewer new tokens than T left-pads its queries and
    ignores those rows). A Python int is one length for every sequence, known at trace time: the
    kernel reads no length from SMEM (the v5e compiler's static profile reads scalar-prefetch values
    as 0, so it is how decode is profiled). The cache is split into num_splits ranges (default:
    default_num_splits; on CPU, the C++ decode's own choice from the threads and lengths) decoded
    independently and merged exactly.
    Bad shapes, page sizes and heads raise ValueError; lengths past the capacity and page ids outside
    the pool too, wherever their values are known (not under jit; on CPU the C++ decode checks them at
    run time under jit too, raising JaxRuntimeError).
    - window: token t sees only the `window` positions before its own (and its own); the cache is read
      only there (pages too). chunk: only the positions of its own chunk. logits_soft_cap, sinks [Hq]:
      as in flash_attention (a sink joins once, after the splits' merge).
    Returns O [B, Hq, T, D], or (O, LSE [B, Hq, T]) with return_lse.
    """
    name = "flash_decode"
    _check_cache(name, "q", q, k_cache, v_cache, page_table)
    _check_query(name, q)
    rules = _decode_rules(name, q, window, chunk, logits_soft_cap, sinks)
    layout = _layout(k_cache, page_table)
    _check_lengths(name, lengths, q.shape[0], layout.capacity)
    if page_table is not None:
        _check_pages(name, page_table, lengths, layout.page_size, range(k_cache.shape[0]))
    scale = 1.0 / math.sqrt(q.shape[3]) if sm_scale is None else float(sm_scale)
    splits = default_num_splits(read_blocks(layout, rules, q.shape[2])) if num_splits is None else int(num_splits)
    if splits < 1:
        raise ValueError(f"{name}: expected num_splits >= 1, got {num_splits}")
    mode = kernel_mode(interpret)
    if mode == "cpu":
        splits = num_splits  # None: the C++ decode's own choice (threads and lengths)
    o, lse = _per_shard_decode(_spread_queries(q, k_cache), k_cache, v_cache, lengths, page_table,
                               scale=scale, num_splits=splits, mode=mode, rules=rules)
    return _finish(_own_lanes(o, q, k_cache), lse, q, return_lse, sinks)


_AUTO_AXES = {"cpu": AutoAxes.PARTITION, "interpret": AutoAxes.INTERPRET}


def _per_shard_decode(q, k_cache, v_cache, lengths, page_table, **options):
    """_decode run per shard where q and the cache are split over the batch or the heads
    (partition.per_shard): a contiguous cache's batch and heads, a page pool's heads (its pages
    stay whole on every device: a sequence's pages may lie anywhere in it). A Python int length
    stays static."""
    static_length = isinstance(lengths, (int, np.integer))
    paged = page_table is not None
    cache_term = "p g s d" if paged else "b g c d"
    rule = (f"b h t d, {cache_term}, {cache_term}" + ("" if static_length else ", b") + (", b x" if paged else "")
            + " -> b h t d, b h t")
    operands = [q, k_cache, v_cache] + ([] if static_length else [lengths]) + ([page_table] if paged else [])

    def kernel(q, k_cache, v_cache, *rest):
        end = lengths if static_length else rest[0]
        o, lse = _decode(q, k_cache, v_cache, end, rest[-1] if paged else None, **options)
        return o.reshape(q.shape[:3] + o.shape[-1:]), lse.reshape(q.shape[:3])  # a group's heads are adjacent

    auto = _AUTO_AXES.get(options["mode"], AutoAxes.WHOLE)
    return per_shard(kernel, rule, auto=auto)(*operands)


def _check_new_rows(name: str, k_new, v_new, k_cache, v_cache, page_table):
    """append_kv's and sharded_append_kv's checks of the new rows against the cache."""
    if k_new.shape != v_new.shape:
        raise ValueError(f"{name}: expected k_new and v_new of one shape, got {k_new.shape} and {v_new.shape}")
    _check_cache(name, "k_new", k_new, k_cache, v_cache, page_table)
    kv_heads = k_cache.shape[1] * heads_per_row(k_new, k_cache)
    if k_new.shape[1] != kv_heads:
        raise ValueError(f"{name}: expected k_new [B, Hkv={kv_heads}, T, D], got {k_new.shape}")


def _check_sequence_split(name: str, k_cache, page_table, layout: CacheLayout, devices: int):
    """A cache split along the sequence over `devices`: a contiguous cache's Nmax, or a paged one's
    pages per sequence and pool, divide evenly."""
    if page_table is None:
        if k_cache.shape[2] % devices:
            raise ValueError(f"{name}: expected Nmax divisible by the {devices} devices, got {k_cache.shape[2]}")
    elif layout.pages_per_seq % devices or k_cache.shape[0] % devices:
        raise ValueError(f"{name}: expected pages_per_seq and num_pages divisible by the {devices} devices, got "
                         f"page_table {list(page_table.shape)} and {k_cache.shape[0]} pages")


def _length_array(lengths, batch: int):
    """One Python int length for every sequence, as a [B] int32 array; an array as it is."""
    return jnp.full((batch,), lengths, jnp.int32) if isinstance(lengths, (int, np.integer)) else lengths


def append_kv(k_cache, v_cache, lengths, page_table, k_new, v_new):
    """Writes the new tokens' keys and values k_new, v_new [B, Hkv, T, D] at positions
    lengths .. lengths + T - 1 of each sequence (lengths [B]: the positions already in the cache) and
    returns the updated (k_cache, v_cache); page_table as in flash_decode (None: contiguous caches),
    and as there a cache may pack k KV heads per row (a last axis of k * D: each head's row goes to its
    lanes).

    Functional: only the B x Hkv x T new rows are written (each an in-place update, or one scatter
    past ROW_LOOP_MAX rows), so under
    jax.jit(..., donate_argnums=(0, 1)) the caches are updated in place, not copied. A decode loop:

        k_cache, v_cache = append_kv(k_cache, v_cache, lengths, page_table, k_new, v_new)
        lengths = lengths + T
        o = flash_decode(q, k_cache, v_cache, lengths, page_table=page_table)
    """
    name = "append_kv"
    _check_new_rows(name, k_new, v_new, k_cache, v_cache, page_table)
    per_row = heads_per_row(k_new, k_cache)
    k_new, v_new = pack_rows(k_new, per_row), pack_rows(v_new, per_row)
    batch, heads, tokens, _ = k_new.shape
    capacity = _layout(k_cache, page_table).capacity if page_table is not None else k_cache.shape[2]
    lengths = _length_array(lengths, batch)
    _check_lengths(name, lengths, batch, capacity, new_tokens=tokens)
    positions = lengths.astype(jnp.int32)[:, None] + jnp.arange(tokens, dtype=jnp.int32)[None, :]  # [B, T]
    head_index = jnp.arange(heads)[None, :, None]
    if page_table is None:
        index = (jnp.arange(batch)[:, None, None], head_index, positions[:, None, :])
    else:
        page_size = k_cache.shape[2]
        known = _concrete(lengths)
        _check_pages(name, page_table, None if known is None else known + tokens, page_size, range(k_cache.shape[0]))
        pages = jnp.take_along_axis(page_table.astype(jnp.int32), positions // page_size, axis=1)
        index = (pages[:, None, :], head_index, (positions % page_size)[:, None, :])
    return _write_rows(k_cache, k_new, index), _write_rows(v_cache, v_new, index)


# Up to this many new rows (batch x tokens) are written one at a time, each an in-place
# dynamic_update_slice (unrolled: a loop would carry the cache); more by one scatter. On the v5e a
# scatter into a bf16 [..., 128, 64] pool makes XLA lay the pool out as the scatter likes (page
# positions minor) and copy it to the kernels' row-major layout and back around every write: in a
# model's decode step, the whole pool twice a layer. A dynamic_update_slice takes the pool as it is.
# A prefill's thousands of rows stay one scatter.
ROW_LOOP_MAX = 64


def _write_rows(cache, new, index):
    """cache[index] = new: index (first [B, 1, T], heads [1, H, 1], second [B, 1, T]) names the row of
    new [B, H, T, D]'s (b, t) as cache[first, :, second, :]; an index past the end of its axis drops
    the row."""
    batch, heads, tokens, dim = new.shape
    new = new.astype(cache.dtype)
    if batch * tokens > ROW_LOOP_MAX:
        return cache.at[index].set(new, unique_indices=True, mode="drop")
    first = jnp.broadcast_to(index[0], (batch, 1, tokens))[:, 0]
    second = jnp.broadcast_to(index[2], (batch, 1, tokens))[:, 0]
    for b in range(batch):
        for t in range(tokens):
            inside = (first[b, t] < cache.shape[0]) & (second[b, t] < cache.shape[2])
            at = (jnp.minimum(first[b, t], cache.shape[0] - 1), 0, jnp.minimum(second[b, t], cache.shape[2] - 1), 0)
            kept = lax.dynamic_slice(cache, at, (1, heads, 1, dim))
            cache = lax.dynamic_update_slice(cache, jnp.where(inside, new[b:b + 1, :, t:t + 1, :], kept), at)
    return cache


def sharded_append_kv(k_cache, v_cache, lengths, mesh, page_table, k_new, v_new):
    """append_kv for a cache laid out as sharded_flash_decode reads it (device i of the mesh, in
    row-major order, holds positions [i * C/S, (i + 1) * C/S) of every sequence: a contiguous cache
    split along Nmax, or page pools split along num_pages with the page table split along
    pages_per_seq, each device's part of the table naming pages of its own part of the pools).

    Each device writes only the new rows that fall in its positions, into its own shard: nothing
    moves between devices, where a plain append_kv on sharded pools would leave the partitioner to
    gather them. lengths [B] int32 (the positions already in the cache), k_new, v_new [B, Hkv, T, D]
    replicated. Returns the updated (k_cache, v_cache), sharded as given; functional, as append_kv
    (under jax.jit(..., donate_argnums=...) of the caller the shards are updated in place)."""
    name = "sharded_append_kv"
    _check_new_rows(name, k_new, v_new, k_cache, v_cache, page_table)
    axes = tuple(mesh.axis_names)
    devices = mesh.devices.size
    layout = _layout(k_cache, page_table)
    _check_sequence_split(name, k_cache, page_table, layout, devices)
    per_row = heads_per_row(k_new, k_cache)
    k_new, v_new = pack_rows(k_new, per_row), pack_rows(v_new, per_row)
    batch, heads, tokens, _ = k_new.shape
    lengths = _length_array(lengths, batch)
    _check_lengths(name, lengths, batch, layout.capacity, new_tokens=tokens)
    shard_len = layout.capacity // devices
    cache_spec = P(axes, None, None, None) if page_table is not None else P(None, None, axes, None)
    table = page_table if page_table is not None else jnp.zeros((batch, devices), jnp.int32)

    def local(k_shard, v_shard, lengths, table_shard, k_new, v_new):
        shard = lax.axis_index(axes)
        positions = lengths.astype(jnp.int32)[:, None] - shard * shard_len + jnp.arange(tokens, dtype=jnp.int32)
        owned = (positions >= 0) & (positions < shard_len)  # [B, T]: rows this device holds
        local_positions = jnp.clip(positions, 0, shard_len - 1)
        head_index = jnp.arange(heads)[None, :, None]
        if page_table is None:
            rows = jnp.where(owned, local_positions, shard_len)  # past the end: dropped
            index = (jnp.arange(batch)[:, None, None], head_index, rows[:, None, :])
        else:
            page_size = k_shard.shape[2]
            pages = jnp.take_along_axis(table_shard.astype(jnp.int32), local_positions // page_size, axis=1)
            pages = jnp.where(owned, pages - shard * k_shard.shape[0], k_shard.shape[0])
            index = (pages[:, None, :], head_index, (local_positions % page_size)[:, None, :])
        return _write_rows(k_shard, k_new, index), _write_rows(v_shard, v_new, index)

    @jax.jit
    def sharded(k_cache, v_cache, lengths, table, k_new, v_new):
        k_cache, v_cache = (place_on_mesh(c, mesh, cache_spec) for c in (k_cache, v_cache))
        lengths, k_new, v_new = (place_on_mesh(x, mesh, P()) for x in (lengths, k_new, v_new))
        table = place_on_mesh(table, mesh, P(None, axes))
        return jax.shard_map(local, mesh=mesh, in_specs=(cache_spec, cache_spec, P(), P(None, axes), P(), P()),
                             out_specs=(cache_spec, cache_spec), check_vma=False)(k_cache, v_cache, lengths, table,
                                                                                  k_new, v_new)

    return sharded(k_cache, v_cache, lengths, table, k_new, v_new)


def sharded_flash_decode(q, k_cache, v_cache, lengths, mesh, *, page_table=None, sm_scale: float | None = None,
                         window: int | None = None, logits_soft_cap: float | None = None, sinks=None,
                         num_splits: int | None = None, return_lse: bool = False, interpret: bool | None = None):
    """flash_decode with the cache sharded along the sequence over every device of `mesh` (a 2x2 mesh
    for a v5e-4; any shape works). Rule: with S devices in row-major mesh order, device i holds cache
    positions [i * C/S, (i+1) * C/S) of every sequence, C the capacity (divisible by S):
    - contiguous: the [B, Hkv, Nmax, D] caches sharded along Nmax;
    - paged: the page pools sharded along num_pages (divisible by S) and the page table along
      pages_per_seq, and device i's part of the table names pages of device i's part of the pools
      (global page ids: the pages of positions [i * C/S, (i+1) * C/S) live on device i).
    Each device decodes only its shard, producing a partial (O, LSE); the partials are all-gathered
    over the mesh and merged exactly. q and lengths are replicated; the result is replicated on every
    device. window, logits_soft_cap, sinks: as in flash_decode (each device reads only its part of a
    window; the sinks join after the merge, once)."""
    name = "sharded_flash_decode"
    _check_cache(name, "q", q, k_cache, v_cache, page_table)
    _check_query(name, q)
    rules = _decode_rules(name, q, window, None, logits_soft_cap, sinks)
    axes = tuple(mesh.axis_names)
    devices = mesh.devices.size
    layout = _layout(k_cache, page_table)
    _check_sequence_split(name, k_cache, page_table, layout, devices)
    _check_lengths(name, lengths, q.shape[0], layout.capacity)
    shard_len = layout.capacity // devices
    pool_part = k_cache.shape[0] // devices  # paged: each device's pages
    if page_table is not None:
        table_part = layout.pages_per_seq // devices
        table, values = _concrete(page_table), _concrete(lengths)
        if table is not None and values is not None:
            values = np.broadcast_to(values, (q.shape[0],))
            for i in range(devices):  # device i: positions [i * shard_len, ...), its own pages
                local = np.clip(values - i * shard_len, 0, shard_len)
                _check_pages(f"{name} (device {i})", table[:, i * table_part:(i + 1) * table_part], local,
                             layout.page_size, range(i * pool_part, (i + 1) * pool_part))
    scale = 1.0 / math.sqrt(q.shape[3]) if sm_scale is None else float(sm_scale)
    if page_table is None:
        local_layout = cache_layout((q.shape[0], layout.heads_kv, shard_len, q.shape[3]))
    else:
        local_layout = cache_layout(k_cache.shape, (q.shape[0], layout.pages_per_seq // devices))
    splits = default_num_splits(read_blocks(local_layout, rules, q.shape[2])) if num_splits is None else int(num_splits)
    mode = kernel_mode(interpret)
    if mode == "cpu":
        splits = num_splits  # None: the C++ decode's own choice
    cache_spec = P(axes, None, None, None) if page_table is not None else P(None, None, axes, None)
    table_spec = P(None, axes)

    # A full cache and one new token: every shard sees all of its positions, the same trace-time
    # length on every device. Any other int length becomes an array (each shard's end differs).
    full_shards = isinstance(lengths, (int, np.integer)) and lengths == layout.capacity and q.shape[2] == 1
    if isinstance(lengths, (int, np.integer)) and not full_shards:
        lengths = jnp.full((q.shape[0],), lengths, jnp.int32)
    if full_shards:
        lengths = jnp.zeros((q.shape[0],), jnp.int32)  # unread: every shard's end is known
    table = page_table if page_table is not None else jnp.zeros((q.shape[0], devices), jnp.int32)

    def local(q, k_shard, v_shard, lengths, table_shard):
        shard = lax.axis_index(axes)
        end = shard_len if full_shards else lengths - shard * shard_len  # the queries' end in this shard
        local_table, offset = (None, None) if page_table is None else (table_shard, shard * pool_part)
        o, lse = _decode(q, k_shard, v_shard, end, local_table, scale=scale, num_splits=splits, mode=mode,
                         page_offset=offset, capacity=shard_len, rules=rules)
        o_all = lax.all_gather(o, axes)  # [devices, B, Hkv, rows, D]: a few KiB per device
        lse_all = lax.all_gather(lse, axes)
        return merge_attention_states(o_all, lse_all, axis=0, interpret=None if mode == "cpu" else mode == "interpret")

    # Under jit, a cache already laid out as cache_spec is used in place; any other layout is
    # resharded (moved) once on the way in.
    @jax.jit
    def sharded(q, k_cache, v_cache, lengths, table):
        k_cache, v_cache = (place_on_mesh(c, mesh, cache_spec) for c in (k_cache, v_cache))
        q, lengths = (place_on_mesh(x, mesh, P()) for x in (q, lengths))
        table = place_on_mesh(table, mesh, table_spec)
        return jax.shard_map(local, mesh=mesh, in_specs=(P(), cache_spec, cache_spec, P(), table_spec),
                             out_specs=(P(), P()), check_vma=False)(q, k_cache, v_cache, lengths, table)

    o, lse = sharded(_spread_queries(q, k_cache), k_cache, v_cache, lengths, table)
    return _finish(_own_lanes(o, q, k_cache), lse, q, return_lse, sinks)
