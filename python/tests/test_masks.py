"""Every mask variant and score option of flash_attention against the float64 oracle: sliding windows,
chunks, segment ids, soft-cap, sinks and their combinations, forward (O, LSE) and gradients (q, k, v,
sinks), on the Pallas kernels in TPU interpret mode (and, where marked, the other CPU path), at block
sizes that make every kind of tile occur: the static band patterns, full tiles between them, the
run-time path (padded keys, chunks across blocks) and segment ranges that skip blocks."""

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracle
from pallas_flash import BlockSizes, flash_attention
from pallas_flash.mask import Mask
from pallas_flash.tiles import Grid, Problem, segment_block_ranges, segment_steps, static_steps
from shapes import Shape

SMALL = BlockSizes(128, 128, 128, 128, 128, 128, block_q_compute=128)
MIXED = BlockSizes(256, 128, 128, 256, 256, 128, block_q_compute=128)
# Key blocks longer than an update's columns: each sub-block's columns in chunks, masked where an edge crosses.
CHUNKED = BlockSizes(256, 512, 128, 256, 256, 512, block_q_compute=128, block_k_compute=128, fuse_dq=False)
# Blocks of several whole chunks (Mask.chunks_in_tiles): the static patterns per chunk (forward and dQ;
# dK/dV in the first variant below, whose 128 x 256 blocks hold whole chunks of 128).
IN_CHUNKS = BlockSizes(512, 256, 128, 256, 256, 256, block_q_compute=128, block_k_compute=128, fuse_dq=False)


def inputs(shape: Shape, seed: int, dtype=jnp.float32, q_scale=1.0):
    rng = np.random.default_rng(seed)
    q = q_scale * rng.standard_normal((shape.batch, shape.heads_q, shape.seq_q, shape.dim))
    k = rng.standard_normal((shape.batch, shape.heads_kv, shape.seq_k, shape.dim))
    v = rng.standard_normal((shape.batch, shape.heads_kv, shape.seq_k, shape.dim))
    do = rng.standard_normal((shape.batch, shape.heads_q, shape.seq_q, shape.dim))
    return [jnp.asarray(x, dtype) for x in (q, k, v, do)]


def documents(rng, batch: int, length: int, lengths=None):
    """[B, length] ids of packed documents: consecutive runs, random lengths (1 included)."""
    rows = []
    for _ in range(batch):
        sizes = list(lengths) if lengths else []
        while sum(sizes) < length:
            sizes.append(int(rng.integers(1, max(2, length // 3))))
        rows.append(np.repeat(np.arange(len(sizes)), sizes)[:length])
    return np.stack(rows).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    shape: Shape
    options: tuple  # flash_attention keyword arguments, as (key, value) pairs
    blocks: BlockSizes = SMALL
    segments: str | None = None  # "documents", "aligned" (the first of them whole blocks), "random", "disjoint"
    sinks: bool = False
    q_scale: float = 1.0

    def __str__(self):
        return self.name


VARIANTS = [
    Variant("window_causal_padded_keys", Shape(1, 2, 2, 300, 300, 64), (("causal", True), ("window", (64, 0)))),
    Variant("window_causal_patterns", Shape(1, 2, 1, 512, 512, 64), (("causal", True), ("window", (100, 0))), MIXED),
    Variant("window_two_sided", Shape(1, 2, 2, 384, 384, 32), (("window", (50, 30)),)),
    Variant("window_column_chunks", Shape(1, 2, 1, 768, 1000, 64), (("causal", True), ("window", (300, 0))), CHUNKED),
    Variant("window_of_one", Shape(1, 1, 1, 256, 256, 32), (("causal", True), ("window", (0, 0)))),
    Variant("window_past_the_sequence", Shape(1, 2, 2, 200, 256, 32), (("causal", True), ("window", 5000))),
    Variant("window_nq_lt_nk", Shape(1, 4, 2, 100, 390, 64), (("causal", True), ("window", (64, 0)))),
    Variant("window_nq_gt_nk", Shape(1, 2, 2, 384, 128, 32), (("causal", True), ("window", (30, 0)))),
    Variant("chunk_aligned", Shape(1, 2, 2, 512, 512, 32), (("causal", True), ("chunk", 256)), MIXED),
    Variant("chunk_column_chunks", Shape(1, 2, 2, 1024, 1024, 32), (("causal", True), ("chunk", 512)), CHUNKED,
            segments="documents"),
    Variant("chunk_across_blocks", Shape(1, 2, 2, 300, 300, 32), (("causal", True), ("chunk", 100))),
    # 640 rows: a partial last key block, and a last query block of 128 rows (the forward's tail call)
    Variant("chunks_in_blocks", Shape(1, 2, 2, 640, 640, 32), (("causal", True), ("chunk", 128)), IN_CHUNKS),
    Variant("chunks_in_blocks_window", Shape(1, 2, 1, 768, 768, 64), (("causal", True), ("window", (200, 0)),
            ("chunk", 256)), dataclasses.replace(IN_CHUNKS, block_k=512, block_q_compute=256), segments="documents"),
    Variant("chunks_in_blocks_full_nq_ne_nk", Shape(1, 2, 1, 256, 640, 32), (("chunk", 128),), IN_CHUNKS),
    Variant("chunk_full_nq_ne_nk", Shape(1, 2, 1, 200, 384, 32), (("chunk", 64),)),
    Variant("documents_causal", Shape(2, 2, 2, 512, 512, 64), (("causal", True),), segments="documents"),
    # A first document of two whole blocks: its tiles hold one id (the patterns without the ids), the
    # later ones several (with them), in one call.
    Variant("documents_aligned", Shape(1, 2, 1, 512, 512, 64), (("causal", True),), MIXED, segments="aligned"),
    Variant("documents_window", Shape(1, 4, 1, 384, 384, 32), (("causal", True), ("window", (40, 0))), MIXED,
            segments="documents"),
    Variant("segments_random", Shape(1, 2, 2, 256, 300, 32), (), segments="random"),
    Variant("segments_disjoint", Shape(1, 2, 2, 256, 256, 32), (("causal", True),), segments="disjoint"),
    Variant("soft_cap", Shape(1, 2, 2, 300, 300, 64), (("causal", True), ("logits_soft_cap", 4.0)), q_scale=4.0),
    Variant("soft_cap_full", Shape(1, 2, 1, 256, 256, 32), (("logits_soft_cap", 2.5),), MIXED, q_scale=4.0),
    Variant("sinks", Shape(1, 4, 2, 200, 200, 64), (("causal", True),), sinks=True),
    Variant("sinks_nq_gt_nk", Shape(1, 2, 2, 256, 100, 32), (("causal", True),), sinks=True),
    # 513 rows in 256-row blocks: the last row is the forward's tail call (a chunk across its key block)
    Variant("tail_row", Shape(1, 4, 2, 513, 600, 64),
            (("causal", True), ("window", (200, 0)), ("chunk", 300), ("logits_soft_cap", 3.0)), MIXED,
            segments="random", sinks=True, q_scale=3.0),
    Variant("everything", Shape(1, 4, 1, 384, 384, 96),
            (("causal", True), ("window", (100, 0)), ("logits_soft_cap", 3.0)), MIXED, segments="documents", sinks=True,
            q_scale=3.0),
]


def run_variant(variant: Variant, seed: int, blocks=None):
    shape = variant.shape
    q, k, v, do = inputs(shape, seed, q_scale=variant.q_scale)
    options = dict(variant.options)
    rng = np.random.default_rng(seed + 1)
    segment_ids = None
    if variant.segments in ("documents", "aligned"):
        ids = documents(rng, shape.batch, shape.seq_q, lengths=[256, 128] if variant.segments == "aligned" else None)
        segment_ids = (ids, ids)
    elif variant.segments == "random":
        segment_ids = (rng.integers(0, 3, (shape.batch, shape.seq_q)).astype(np.int32),
                       rng.integers(0, 3, (shape.batch, shape.seq_k)).astype(np.int32))
    elif variant.segments == "disjoint":  # q segment 9 has no keys; kv segment 7 no queries
        q_ids = documents(rng, shape.batch, shape.seq_q, lengths=[100, 1, 50])
        kv_ids = q_ids.copy()
        q_ids[:, 120:180] = 9
        kv_ids[:, 200:] = 7
        segment_ids = (q_ids, kv_ids)
    sinks = jnp.asarray(rng.standard_normal(shape.heads_q) + 1.0, jnp.float32) if variant.sinks else None
    if segment_ids is not None:
        options["segment_ids"] = tuple(jnp.asarray(x) for x in segment_ids)
    mask = Mask.bottom_right(shape.seq_q, shape.seq_k, causal=options.get("causal", False),
                             window=_edges(options.get("window")), chunk=options.get("chunk"))
    want = oracle.attention(q, k, v, mask, segment_ids=segment_ids, soft_cap=options.get("logits_soft_cap"),
                            sinks=sinks, do=do)

    def loss(q, k, v, sinks):
        o = flash_attention(q, k, v, sinks=sinks, block_sizes=blocks or variant.blocks, **options)
        return jnp.sum(o * do)

    o, lse = flash_attention(q, k, v, sinks=sinks, block_sizes=blocks or variant.blocks, return_lse=True, **options)
    argnums = (0, 1, 2, 3) if sinks is not None else (0, 1, 2)
    grads = jax.grad(loss, argnums)(q, k, v, sinks)
    return (o, lse, grads), want


def _edges(window):
    if window is None:
        return (None, None)
    return (window, window) if isinstance(window, int) else window


def check(result, want, fwd_tol=1e-5, grad_tol=1e-4):
    (o, lse, grads), want = result, want
    assert np.all(np.isfinite(np.asarray(o)))
    assert oracle.rel_err(o, want["o"]) < fwd_tol
    oracle.assert_lse_close(lse, want["lse"])
    for name, got in zip(("dq", "dk", "dv", "dsinks"), grads):
        assert oracle.rel_err(got, want[name]) < grad_tol, name


@pytest.mark.both_cpu_kernels
@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_variant_matches_the_float64_oracle(variant):
    check(*run_variant(variant, seed=hash(variant.name) % 2**31))


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.name in ("window_causal_patterns", "documents_window",
                                                                       "chunk_aligned", "documents_aligned")], ids=str)
def test_variant_with_dq_in_its_own_kernel(variant):
    blocks = dataclasses.replace(variant.blocks, fuse_dq=False)
    check(*run_variant(variant, seed=7, blocks=blocks))


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.name in ("window_causal_padded_keys", "documents_causal",
                                                                       "soft_cap", "sinks")], ids=str)
def test_variant_at_planned_blocks(variant):
    check(*run_variant(dataclasses.replace(variant, blocks=None), seed=11))


def test_bf16_window_and_soft_cap():
    shape = Shape(1, 2, 2, 256, 256, 64)
    q, k, v, _ = inputs(shape, 3, jnp.bfloat16, q_scale=3.0)
    o = flash_attention(q, k, v, causal=True, window=(60, 0), logits_soft_cap=5.0, block_sizes=SMALL)
    want = oracle.attention(q, k, v, Mask.bottom_right(256, 256, causal=True, window=(60, 0)), soft_cap=5.0)
    assert o.dtype == jnp.bfloat16 and oracle.rel_err(o, want["o"]) < 2e-2


@pytest.mark.parametrize("chunk, causal, window", [(128, True, (None, None)), (256, False, (None, None)),
                                                   (256, True, (100, 0))])
def test_chunk_columns_are_the_dense_masks(chunk, causal, window):
    # In blocks of whole chunks, a sub-block's visible columns by the patterns (band and chunk) hold
    # every column the dense mask lets through for its rows, and no column of another chunk.
    seq_q, seq_k, block_q, block_k, sub_rows = 1024, 1536, 512, 512, 128
    mask = Mask.bottom_right(seq_q, seq_k, causal=causal, window=window, chunk=chunk)
    assert mask.chunks_in_tiles(block_q, block_k, sub_rows)
    dense = mask.dense(seq_q, seq_k)
    patterns, full = mask.band_patterns(block_q, block_k, sub_rows, seq_q, seq_k)
    assert full is None
    by_delta = dict(patterns)
    for row_start in range(0, seq_q, block_q):
        for key_start in range(0, seq_k, block_k):
            d = key_start - row_start + mask.offset
            for c in range(block_q // sub_rows):
                rows = dense[row_start + c * sub_rows:row_start + (c + 1) * sub_rows, key_start:key_start + block_k]
                seen = np.flatnonzero(rows.any(axis=0))
                if d not in by_delta or by_delta[d][c] == "skip":
                    assert seen.size == 0, (row_start, key_start, c)
                    continue
                col_from, col_to = mask.chunk_columns(d, c * sub_rows, block_k)
                band_from, band_to = mask.band_columns(d - c * sub_rows, sub_rows, block_k)
                lo, hi = max(col_from, band_from), min(col_to, band_to)
                assert seen.size == 0 or (lo <= seen[0] and seen[-1] < hi), (row_start, key_start, c)
                chunk_of_rows = (mask.q_position + row_start + c * sub_rows) // chunk
                assert all((mask.k_position + key_start + j) // chunk == chunk_of_rows for j in range(col_from, col_to))


def test_the_reference_path_takes_every_variant(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    check(*run_variant(VARIANTS[-1], seed=5))


@pytest.mark.parametrize("kwargs, message", [
    ({"window": -1}, "argument 'window': expected edges that are ints >= 0"),
    ({"window": (1, 2, 3)}, "argument 'window': expected None, an int or a pair"),
    ({"chunk": 0}, "argument 'chunk': expected None or an int > 0"),
    ({"logits_soft_cap": 0.0}, "argument 'logits_soft_cap': expected None or a finite number > 0"),
    ({"logits_soft_cap": -3.0}, "argument 'logits_soft_cap'"),
    ({"sinks": jnp.zeros(3)}, r"argument 'sinks': expected floats of shape \(2,\)"),
    ({"segment_ids": jnp.zeros((1, 7), jnp.int32)}, r"argument 'segment_ids': expected q ids of integers, shape \(1, 8\)"),
    ({"segment_ids": jnp.zeros((1, 8), jnp.float32)}, "argument 'segment_ids': expected q ids of integers"),
    ({"segment_ids": (jnp.zeros((1, 8), jnp.int32),) * 3}, "argument 'segment_ids': expected one"),
    ({"mask": Mask(), "causal": True}, "expected either mask or causal/window/chunk"),
])
def test_bad_variant_arguments_raise_before_anything_runs(kwargs, message):
    q = jnp.zeros((1, 2, 8, 16))
    with pytest.raises(ValueError, match=message):
        flash_attention(q, q, q, **kwargs)


@pytest.mark.parametrize("packed", [False, True])
def test_segment_ids_reach_the_planner(monkeypatch, packed):
    # Packed documents plan as a bounded span (2048-row K/V blocks at long lengths): the entry point
    # tells the planner it has segment ids.
    module = sys.modules["pallas_flash.flash_attention"]
    seen = []
    plan = module.plan_block_sizes
    monkeypatch.setattr(module, "plan_block_sizes", lambda *a, **kw: seen.append(kw.get("segments")) or plan(*a, **kw))
    q, k, v, _ = inputs(Shape(1, 2, 2, 256, 256, 64), seed=0)
    ids = jnp.repeat(jnp.arange(2, dtype=jnp.int32), 128)[None] if packed else None
    jax.make_jaxpr(lambda q, k, v: flash_attention(q, k, v, causal=True, segment_ids=ids, interpret=True))(q, k, v)
    assert seen == [packed]


def _widest_range(mask: Mask, ids, grid, per_q_block: bool) -> int:
    """Brute force over the dense mask: the widest range (first to last) of blocks that hold a pair
    one block's rows see, over every block of the batch (at least 1)."""
    seq = ids.shape[1]
    visible = mask.dense(seq, seq)[None] & (ids[:, :, None] == ids[:, None, :])  # [B, N, N]
    widest = 1
    for rows in visible:
        for i in range(grid.num_q_blocks if per_q_block else grid.num_kv_blocks):
            if per_q_block:
                seen = rows[i * grid.block_q:(i + 1) * grid.block_q].any(0)
                blocks = np.nonzero(seen)[0] // grid.block_k
            else:
                seen = rows[:, i * grid.block_k:(i + 1) * grid.block_k].any(1)
                blocks = np.nonzero(seen)[0] // grid.block_q
            if blocks.size:
                widest = max(widest, int(blocks.max() - blocks.min() + 1))
    return widest


@pytest.mark.parametrize("per_q_block", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_segment_steps_end_at_the_widest_documents_blocks(seed, per_q_block):
    # With segment ids the streamed grid axis has as many steps as the widest range of blocks any
    # block visits (a dynamic grid bound), not the geometry's (a causal grid of 16 x 16 steps where
    # documents of 4096 at N = 32768 in 2048-row blocks need 2): packed documents of random lengths.
    seq, block_q, block_k = 2048, 256, 128
    rng = np.random.default_rng(seed)
    ids = documents(rng, 2, seq, lengths=[int(rng.integers(1, 700))])
    mask = Mask.bottom_right(seq, seq, causal=True)
    problem = Problem(seq, seq, 1.0, mask, 1, interpret=True, segments=True)
    grid = Grid.of(block_q, block_k, seq, seq)
    static, _ = static_steps(problem, grid, per_q_block=per_q_block)
    ranges = segment_block_ranges(jnp.asarray(ids), jnp.asarray(ids), grid)
    steps = int(segment_steps(problem, grid, ranges, per_q_block=per_q_block, static=static))
    assert steps == _widest_range(mask, ids, grid, per_q_block) < static


def test_equal_documents_take_the_grid_of_chunks():
    # The bench profiles equal packed documents as chunks of their length (the simulator reads the
    # ids' block ranges as 0): with the dynamic step count both grids have the same steps.
    seq, length = 32768, 4096
    ids = jnp.asarray(np.arange(seq)[None] // length, jnp.int32)
    segmented = Problem(seq, seq, 1.0, Mask.bottom_right(seq, seq, causal=True), 1, interpret=True, segments=True)
    chunked = Problem(seq, seq, 1.0, Mask.bottom_right(seq, seq, causal=True, chunk=length), 1, interpret=True)
    for block_q, block_k, per_q_block in ((2048, 2048, True), (1024, 1024, False)):
        grid = Grid.of(block_q, block_k, seq, seq)
        static, _ = static_steps(segmented, grid, per_q_block=per_q_block)
        steps = segment_steps(segmented, grid, segment_block_ranges(ids, ids, grid), per_q_block=per_q_block,
                              static=static)
        assert int(steps) == static_steps(chunked, grid, per_q_block=per_q_block)[0] < static


def test_segment_ids_set_every_kernels_step_count():
    # Forward, dK/dV and the separate dQ kernel: the pallas_calls take their step count from the ids.
    q, k, v, _ = inputs(Shape(1, 2, 2, 512, 512, 64), seed=0)
    ids = jnp.repeat(jnp.arange(4, dtype=jnp.int32), 128)[None]

    def loss(q, k, v, segment_ids):
        return jnp.sum(flash_attention(q, k, v, causal=True, segment_ids=segment_ids, block_sizes=CHUNKED,
                                       interpret=True))

    def dynamic_bounds(segment_ids):
        jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1, 2)))(q, k, v, segment_ids)
        calls = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == "pallas_call"]
        return sorted((e.params["name"], e.params["grid_mapping"].num_dynamic_grid_bounds) for e in calls)

    assert dynamic_bounds(ids) == [("pallas_flash_bwd_dkv", 1), ("pallas_flash_bwd_dq", 1), ("pallas_flash_fwd", 1)]
    assert [count for _, count in dynamic_bounds(None)] == [0, 0, 0]


def _equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs in its equations' parameters (custom_vjp, pjit)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for inner in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)
