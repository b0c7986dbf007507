"""flash_attention's Pallas TPU kernels, run in TPU interpret mode on the CPU, against the
reference in float32: forward (O and LSE) and gradients. Tests marked both_cpu_kernels run again on
the C++ kernels (the CPU path through the XLA FFI)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_flash import BlockSizes, flash_attention, reference_attention
from pallas_flash.mask import Mask
from pallas_flash.tiles import Problem, key_sub_block_patterns
from pallas_flash.planner import fuses_dq
from shapes import FORWARD_SHAPES, GRAD_SHAPES, Shape


def random_inputs(shape, dtype=jnp.float32, scale=1.0):
    seed = np.random.default_rng().integers(2**31)
    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = (scale * jax.random.normal(kq, (shape.batch, shape.heads_q, shape.seq_q, shape.dim))).astype(dtype)
    k = (scale * jax.random.normal(kk, (shape.batch, shape.heads_kv, shape.seq_k, shape.dim))).astype(dtype)
    v = jax.random.normal(kv, (shape.batch, shape.heads_kv, shape.seq_k, shape.dim)).astype(dtype)
    do = jax.random.normal(kd, (shape.batch, shape.heads_q, shape.seq_q, shape.dim)).astype(dtype)
    return q, k, v, do


def rel_l2(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    norm = np.linalg.norm(ref)
    return np.linalg.norm(x - ref) / norm if norm > 0 else np.linalg.norm(x)


def assert_lse_close(lse, ref_lse):
    lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.both_cpu_kernels
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", FORWARD_SHAPES, ids=str)
def test_forward_matches_reference(shape, causal):
    q, k, v, _ = random_inputs(shape)
    o, lse = flash_attention(q, k, v, causal=causal, return_lse=True)
    ref_o, ref_lse = reference_attention(q, k, v, causal=causal, return_lse=True)
    assert o.shape == q.shape and o.dtype == q.dtype and lse.shape == q.shape[:3]
    assert np.all(np.isfinite(np.asarray(o)))
    assert rel_l2(o, ref_o) < 1e-5
    assert_lse_close(lse, ref_lse)


@pytest.mark.both_cpu_kernels
def test_forward_bf16_and_custom_scale():
    shape = FORWARD_SHAPES[2]
    q, k, v, _ = random_inputs(shape, jnp.bfloat16)
    o = flash_attention(q, k, v, causal=True, sm_scale=0.2)
    ref = reference_attention(q, k, v, causal=True, sm_scale=0.2)
    assert o.dtype == jnp.bfloat16
    assert rel_l2(o, ref) < 2e-2


@pytest.mark.both_cpu_kernels
def test_large_logits_stay_finite():
    # Logits of magnitude ~1e4: fp32 carries about |logit| * 2^-23 absolute error into the weights.
    shape = FORWARD_SHAPES[2]
    q, k, v, _ = random_inputs(shape, scale=35.0)
    o, lse = flash_attention(q, k, v, return_lse=True)
    ref_o, ref_lse = reference_attention(q, k, v, return_lse=True)
    max_logit = float(np.max(np.abs(np.asarray(ref_lse))))
    assert max_logit > 3e3
    assert np.all(np.isfinite(np.asarray(o)))
    assert rel_l2(o, ref_o) < 8 * max_logit * 2.0**-23


def test_explicit_block_sizes_cover_multiple_blocks():
    shape = FORWARD_SHAPES[3]
    q, k, v, _ = random_inputs(shape)
    blocks = BlockSizes(128, 128, 128, 128, 128, 128)  # 3 x 2 query/key blocks: the online softmax and the skip
    o = flash_attention(q, k, v, causal=True, block_sizes=blocks)
    assert rel_l2(o, reference_attention(q, k, v, causal=True)) < 1e-5


# Sub-blocks of the query block (and of a key block longer than block_k_compute: column chunks, masked
# only where the diagonal crosses them), and the three ways a tile is masked: the static diagonal
# patterns (causal, aligned; Nq = Nk and an offset that is not a multiple of the blocks), and padded keys.
SUB_BLOCK_CASES = [
    (Shape(1, 2, 1, 1024, 1024, 64), True, BlockSizes(512, 256, 128, 128, 128, 128, block_q_compute=128)),
    (Shape(1, 2, 1, 1024, 1024, 64), True, BlockSizes(512, 512, 128, 128, 128, 128, block_q_compute=128,
                                                      block_k_compute=128)),
    (Shape(1, 2, 2, 640, 1024, 32), True, BlockSizes(128, 256, 128, 128, 128, 128, block_q_compute=128)),
    (Shape(1, 2, 2, 384, 896, 32), True, BlockSizes(384, 128, 128, 128, 128, 128, block_q_compute=128)),
    (Shape(1, 2, 2, 1024, 640, 32), True, BlockSizes(256, 128, 128, 128, 128, 128, block_q_compute=128)),
    (Shape(1, 2, 2, 700, 1000, 32), True, BlockSizes(256, 256, 128, 128, 128, 128, block_q_compute=128)),
    (Shape(1, 2, 2, 700, 1000, 32), False, BlockSizes(256, 256, 128, 128, 128, 128, block_q_compute=128)),
    (Shape(1, 2, 2, 700, 1000, 32), True, BlockSizes(256, 384, 128, 128, 128, 128, block_q_compute=128,
                                                     block_k_compute=256)),
]


@pytest.mark.parametrize("shape, causal, blocks", SUB_BLOCK_CASES, ids=lambda x: str(x)[:40])
def test_sub_blocks_and_masked_tiles(shape, causal, blocks):
    q, k, v, _ = random_inputs(shape)
    o, lse = flash_attention(q, k, v, causal=causal, block_sizes=blocks, return_lse=True)
    ref_o, ref_lse = reference_attention(q, k, v, causal=causal, return_lse=True)
    assert rel_l2(o, ref_o) < 1e-5
    assert_lse_close(lse, ref_lse)


def loss(fn, do):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * do)


def assert_gradients_match(shape, causal, blocks):
    q, k, v, do = random_inputs(shape)
    grads = jax.grad(loss(lambda q, k, v: flash_attention(q, k, v, causal=causal, block_sizes=blocks), do),
                     (0, 1, 2))(q, k, v)
    want = jax.grad(loss(lambda q, k, v: reference_attention(q, k, v, causal=causal), do), (0, 1, 2))(q, k, v)
    for name, got, ref in zip("qkv", grads, want):
        assert got.shape == ref.shape
        assert rel_l2(got, ref) < 1e-4, f"d{name}"


# The backward's diagonal tiles in key sub-blocks of 128 rows (static patterns per tile offset, square
# and not, Nq = Nk and an offset that is not a multiple of the blocks), dQ fused or in its own kernel
# (there swept in 128-row query sub-blocks with the forward's patterns).
BACKWARD_DIAGONAL_CASES = [
    (Shape(1, 2, 1, 1024, 1024, 64), BlockSizes(256, 128, 256, 512, 512, 256, block_q_compute=128)),
    (Shape(1, 2, 2, 640, 1024, 32), BlockSizes(128, 256, 128, 512, 128, 256, block_q_compute=128)),
    (Shape(1, 2, 2, 768, 512, 32), BlockSizes(256, 128, 384, 256, 256, 128, block_q_compute=128)),
    (Shape(1, 2, 2, 640, 1024, 32), BlockSizes(128, 256, 128, 512, 128, 512, block_q_compute=128,
                                               block_k_compute=128)),
]


@pytest.mark.parametrize("fuse_dq", [True, False], ids=["fused_dq", "dq_kernel"])
@pytest.mark.parametrize("shape, blocks", BACKWARD_DIAGONAL_CASES, ids=lambda x: str(x)[:40])
def test_backward_sub_blocks_and_diagonal_patterns(shape, blocks, fuse_dq):
    assert_gradients_match(shape, True, dataclasses.replace(blocks, fuse_dq=fuse_dq))


@pytest.mark.parametrize("window", [(None, 0), (300, 0), (200, 100), (0, 0), (None, None), (1000, None)],
                         ids=lambda w: f"window{w}")
@pytest.mark.parametrize("block_q, block_k, keys, offset",
                         [(1024, 1024, 256, 0), (256, 512, 128, 0), (384, 256, 128, 384), (512, 256, 128, -256),
                          (128, 256, 128, 77)])
def test_key_sub_block_patterns_cover_exactly_the_visible_scores(block_q, block_k, keys, offset, window):
    # Every visible (key, query) pair of every tile an edge of the band crosses is computed once; a
    # sub-block is marked masked iff it computes a pair that is not visible; the deltas between the
    # patterns' are exactly the tiles that are all visible (the full range).
    mask = Mask(window=window, q_position=offset)
    problem = Problem(seq_q=4096, seq_k=4096 + offset, sm_scale=1.0, mask=mask, group=1, interpret=True)
    patterns, full = key_sub_block_patterns(problem, block_q, block_k, keys, 4096, 4096 + offset)
    rows, cols = np.arange(block_k)[:, None], np.arange(block_q)[None, :]
    lo, hi = mask.band
    deltas = [d for d, _ in patterns]
    assert deltas == sorted(deltas)
    for d, sub_blocks in patterns:
        rel = d + rows - cols  # key position - query position
        visible = np.ones_like(rel, bool)
        if lo is not None:
            visible &= rel >= lo
        if hi is not None:
            visible &= rel <= hi
        assert visible.any() and not visible.all()
        computed = np.zeros_like(visible, dtype=int)
        for key_from, n, col_from, col_to, masked in sub_blocks:
            assert col_from % 128 == 0 and (col_to % 128 == 0 or col_to == block_q)
            computed[key_from:key_from + n, col_from:col_to] += 1
            assert masked == (not visible[key_from:key_from + n, col_from:col_to].all())
        assert computed.max() == 1 and np.all(computed[visible] == 1)
        assert full is None or not full[0] <= d <= full[1]
    if full is not None:
        for d in (full[0], full[1]):
            assert mask.band_kind(d, block_q, block_k) == "full"


def test_block_q_compute_must_divide_block_q():
    with pytest.raises(ValueError, match="block_q_compute: expected a divisor of block_q=384"):
        BlockSizes(384, 128, 128, 128, 128, 128, block_q_compute=256)


# Lengths that are not multiples of the blocks: the partial last blocks are read in place (in
# interpret mode the rows past an array's end hold NaN, a poison the kernels must never let through)
# and their sub-blocks and columns past the real rows skipped: several blocks per axis, edges of a
# few rows and of more than a sub-block, Nq != Nk both ways, GQA.
RAGGED_CASES = [
    (Shape(1, 2, 1, 1000, 1000, 64), BlockSizes(512, 256, 256, 256, 256, 256, block_q_compute=128)),
    (Shape(1, 4, 2, 300, 470, 96), BlockSizes(256, 128, 256, 128, 128, 256, block_q_compute=128)),
    (Shape(2, 2, 2, 517, 259, 32), BlockSizes(256, 256, 128, 256, 256, 128, block_q_compute=128)),
    (Shape(1, 2, 2, 700, 900, 64), BlockSizes(256, 512, 256, 256, 128, 512, block_q_compute=128,
                                              block_k_compute=128)),
]


@pytest.mark.parametrize("fuse_dq", [True, False], ids=["fused_dq", "dq_kernel"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape, blocks", RAGGED_CASES, ids=lambda x: str(x)[:40])
def test_partial_edge_blocks(shape, blocks, causal, fuse_dq):
    blocks = dataclasses.replace(blocks, fuse_dq=fuse_dq)
    q, k, v, _ = random_inputs(shape)
    o, lse = flash_attention(q, k, v, causal=causal, block_sizes=blocks, return_lse=True, interpret=True)
    ref_o, ref_lse = reference_attention(q, k, v, causal=causal, return_lse=True)
    assert o.shape == ref_o.shape and rel_l2(o, ref_o) < 1e-5
    assert_lse_close(lse, ref_lse)
    q, k, v, do = random_inputs(shape)
    grads = jax.grad(loss(lambda q, k, v: flash_attention(q, k, v, causal=causal, block_sizes=blocks,
                                                          interpret=True), do), (0, 1, 2))(q, k, v)
    want = jax.grad(loss(lambda q, k, v: reference_attention(q, k, v, causal=causal), do), (0, 1, 2))(q, k, v)
    for name, got, ref in zip("qkv", grads, want):
        assert got.shape == ref.shape and np.all(np.isfinite(got)), f"d{name}"
        assert rel_l2(got, ref) < 1e-4, f"d{name}"


@pytest.mark.parametrize("seq_q, tail", [(513, True), (640, True), (512, False), (641, False), (200, False)])
def test_a_last_query_block_of_at_most_128_rows_is_the_forwards_tail_call(seq_q, tail):
    # 256-row query blocks: a last block of 1 or 128 rows runs as its own call (writing into the main
    # call's O and LSE); of 129 rows, or a single partial block, in the main grid. Either way exact.
    shape = Shape(1, 2, 1, seq_q, 300, 64)
    blocks = BlockSizes(256, 128, 128, 128, 128, 128, block_q_compute=128)
    q, k, v, _ = random_inputs(shape)
    attention = lambda q, k, v: flash_attention(q, k, v, causal=True, block_sizes=blocks, return_lse=True,  # noqa: E731
                                                interpret=True)
    assert ("pallas_flash_fwd_tail" in str(jax.make_jaxpr(attention)(q, k, v))) == tail
    o, lse = attention(q, k, v)
    ref_o, ref_lse = reference_attention(q, k, v, causal=True, return_lse=True)
    assert rel_l2(o, ref_o) < 1e-5
    assert_lse_close(lse, ref_lse)


@pytest.mark.both_cpu_kernels
@pytest.mark.parametrize("fuse_dq", [None, False], ids=["planned", "dq_kernel"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=str)
def test_gradients_match_reference(shape, causal, fuse_dq):
    assert_gradients_match(shape, causal, BlockSizes(128, 128, 128, 128, 128, 128, fuse_dq=fuse_dq))


def test_the_planner_fuses_dq_while_its_accumulators_fit():
    blocks = BlockSizes(128, 128, 128, 128, 128, 128)
    assert fuses_dq(blocks, 32768, 1, 128, 2)  # 16 MiB of dQ^T for one head
    assert not fuses_dq(blocks, 32768, 8, 128, 2)  # 128 MiB for a GQA group of 8
    assert not fuses_dq(dataclasses.replace(blocks, fuse_dq=False), 1024, 1, 128, 2)
    with pytest.raises(ValueError, match="BlockSizes.fuse_dq: expected True, False or None, got 1"):
        BlockSizes(128, 128, 128, 128, 128, 128, fuse_dq=1)


@pytest.mark.parametrize(
    "q_shape, k_shape, message",
    [
        ((1, 2, 8, 16), (1, 2, 8), "rank 4"),
        ((1, 3, 8, 16), (1, 2, 8, 16), "Hkv dividing Hq"),
        ((1, 2, 8, 16), (1, 2, 8, 32), "q's B and D"),
        ((1, 2, 8, 300), (1, 2, 8, 300), "head_dim D in 1..256"),
    ],
)
def test_bad_inputs_raise(q_shape, k_shape, message):
    with pytest.raises(ValueError, match=message):
        flash_attention(jnp.zeros(q_shape), jnp.zeros(k_shape), jnp.zeros(k_shape))


def test_mixed_dtypes_raise():
    q = jnp.zeros((1, 2, 8, 16), jnp.float32)
    with pytest.raises(ValueError, match="one dtype"):
        flash_attention(q, q.astype(jnp.bfloat16), q)


def test_block_sizes_must_be_multiples_of_128():
    with pytest.raises(ValueError, match="BlockSizes.block_k: expected a positive multiple of 128, got 100"):
        BlockSizes(128, 100, 128, 128, 128, 128)


@pytest.mark.both_cpu_kernels
def test_default_scale_is_inverse_sqrt_dim():
    q, k, v, _ = random_inputs(FORWARD_SHAPES[4])
    o = flash_attention(q, k, v)
    assert rel_l2(o, reference_attention(q, k, v, sm_scale=1 / math.sqrt(40))) < 1e-5


def test_off_tpu_and_cpu_the_reference_path_runs(monkeypatch):
    q, k, v, _ = random_inputs(FORWARD_SHAPES[2])
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    o, lse = flash_attention(q, k, v, causal=True, return_lse=True)
    ref_o, ref_lse = reference_attention(q, k, v, causal=True, return_lse=True)
    assert rel_l2(o, ref_o) < 1e-6
    assert_lse_close(lse, ref_lse)


@pytest.mark.both_cpu_kernels
def test_a_nan_reaches_exactly_the_rows_that_see_it():
    # A NaN in query row 3 makes row 3 NaN and no other; a NaN in key 210 makes the causal rows that see
    # it (210 onwards) NaN and no other. (A NaN or inf in V at a key a row does not see still reaches
    # that row in the Pallas kernels when the key shares its key block: 0 x NaN in the MXU product, as in
    # FlashAttention's GPU kernels and PyTorch's; the C++ kernels keep it out, test_cpu_kernels.py.)
    q, k, v, _ = random_inputs(Shape(1, 1, 1, 256, 256, 64))
    for name, (a, b), nan_rows in [("q row 3", (q.at[0, 0, 3].set(jnp.nan), k), [3]),
                                   ("k key 210", (q, k.at[0, 0, 210].set(jnp.nan)), list(range(210, 256)))]:
        o, lse = flash_attention(a, b, v, causal=True, return_lse=True)
        o, lse = np.asarray(o)[0, 0], np.asarray(lse)[0, 0]
        assert np.flatnonzero(np.isnan(o).any(axis=-1)).tolist() == nan_rows, name
        assert np.flatnonzero(np.isnan(lse)).tolist() == nan_rows, name
        assert np.all(np.isfinite(np.delete(o, nan_rows, axis=0))), name
