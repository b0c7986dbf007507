"""dot_product_attention against jax.nn.dot_product_attention (the XLA implementation) where the options
coincide, forward and gradients, on both CPU paths; the additions (soft cap, segment ids, sinks) against
the float64 oracle; the dense bias and mask path; the GPU dispatch to cuDNN; bad arguments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracle
from pallas_flash import dot_product_attention
from pallas_flash.mask import Mask


def inputs(b, t, s, n, k, h, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, t, n, h)), dtype)
    kk = jnp.asarray(rng.standard_normal((b, s, k, h)), dtype)
    v = jnp.asarray(rng.standard_normal((b, s, k, h)), dtype)
    do = jnp.asarray(rng.standard_normal((b, t, n, h)), dtype)
    return q, kk, v, do


CASES = [  # (name, (B, T, S, N, K, H), kwargs): every row sees at least one key (jax.nn differs where none)
    ("full", (2, 100, 130, 4, 2, 64), {}),
    ("causal_square", (1, 150, 150, 4, 4, 32), {"is_causal": True}),
    ("causal_t_gt_s_top_left", (1, 200, 90, 4, 1, 32), {"is_causal": True}),
    ("causal_t_lt_s_top_left", (1, 70, 200, 2, 2, 96), {"is_causal": True}),
    ("window_two_sided", (1, 160, 160, 4, 2, 32), {"local_window_size": (20, 7)}),
    ("window_int", (1, 128, 128, 2, 2, 32), {"local_window_size": 9}),
    ("causal_window", (2, 180, 180, 8, 2, 64), {"is_causal": True, "local_window_size": (50, 0)}),
    ("lengths", (3, 90, 120, 4, 2, 32), {"is_causal": True, "query_seq_lengths": [0, 90, 41],
                                          "key_value_seq_lengths": [5, 120, 77]}),
]


def run_both(kwargs, q, k, v, do, ours_only=()):
    kwargs = {key: (jnp.asarray(val, jnp.int32) if "lengths" in key else val) for key, val in kwargs.items()}

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * do)

    ours = lambda q, k, v: dot_product_attention(q, k, v, **kwargs)  # noqa: E731
    theirs = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla", **kwargs)  # noqa: E731
    return ((ours(q, k, v), jax.grad(loss(ours), (0, 1, 2))(q, k, v)),
            (theirs(q, k, v), jax.grad(loss(theirs), (0, 1, 2))(q, k, v)))


@pytest.mark.both_cpu_kernels
@pytest.mark.parametrize("name, dims, kwargs", CASES, ids=[c[0] for c in CASES])
def test_matches_jax_nn(name, dims, kwargs):
    q, k, v, do = inputs(*dims)
    (o, grads), (want_o, want_grads) = run_both(kwargs, q, k, v, do)
    assert o.shape == q.shape and o.dtype == q.dtype
    assert oracle.rel_err(o, want_o) < 2e-5
    for name_, got, want in zip("qkv", grads, want_grads):
        assert oracle.rel_err(got, want) < 2e-4, f"d{name_}"


@pytest.mark.both_cpu_kernels
def test_residual_is_the_lse_in_btn():
    q, k, v, _ = inputs(1, 64, 80, 4, 2, 32)
    o, lse = dot_product_attention(q, k, v, is_causal=True, return_residual=True)
    _, want = jax.nn.dot_product_attention(q, k, v, is_causal=True, return_residual=True, implementation="xla")
    assert lse.shape == (1, 64, 4) and lse.dtype == jnp.float32
    np.testing.assert_allclose(lse, want, rtol=1e-5, atol=1e-5)


@pytest.mark.both_cpu_kernels
@pytest.mark.parametrize("segments", ["single", "pair"])
def test_soft_cap_segments_and_sinks_against_the_oracle(segments):
    b, t, n, kh, h = 2, 120, 4, 2, 32
    q, k, v, do = inputs(b, t, t, n, kh, h, seed=3)
    q = q * 3.0
    rng = np.random.default_rng(4)
    ids = np.sort(rng.integers(0, 4, (b, t)), axis=1).astype(np.int32)
    seg = jnp.asarray(ids) if segments == "single" else (jnp.asarray(ids), jnp.asarray(ids))
    sinks = jnp.asarray(rng.standard_normal(n), jnp.float32)
    lengths = jnp.asarray([t, 77], jnp.int32)

    def f(q, k, v, sinks):
        return dot_product_attention(q, k, v, is_causal=True, logits_soft_cap=4.0, segment_ids=seg, sinks=sinks,
                                     query_seq_lengths=lengths, local_window_size=(30, 0))

    o = f(q, k, v, sinks)
    grads = jax.grad(lambda *a: jnp.sum(f(*a) * do), (0, 1, 2, 3))(q, k, v, sinks)
    ids_q = np.where(np.arange(t)[None] < np.asarray(lengths)[:, None], ids, -(2**31))
    tr = lambda x: np.swapaxes(np.asarray(x), 1, 2)  # noqa: E731
    want = oracle.attention(tr(q), tr(k), tr(v), Mask(causal=True, window=(30, 0)), segment_ids=(ids_q, ids),
                            soft_cap=4.0, sinks=sinks, do=tr(do))
    assert oracle.rel_err(tr(o), want["o"]) < 1e-5
    for name, got in zip(("dq", "dk", "dv"), grads[:3]):
        assert oracle.rel_err(tr(got), want[name]) < 1e-4, name
    assert oracle.rel_err(grads[3], want["dsinks"]) < 1e-4


def test_dense_bias_and_mask_take_the_reference_path():
    q, k, v, do = inputs(1, 64, 96, 4, 2, 32, seed=5)
    rng = np.random.default_rng(6)
    bias = jnp.asarray(rng.standard_normal((1, 4, 64, 96)), jnp.float32)
    mask = jnp.asarray(rng.random((1, 1, 64, 96)) < 0.8)
    o = dot_product_attention(q, k, v, bias, mask)
    want = jax.nn.dot_product_attention(q, k, v, bias, mask, implementation="xla")
    assert oracle.rel_err(o, want) < 2e-5
    g = jax.grad(lambda b: jnp.sum(dot_product_attention(q, k, v, b, mask) * do))(bias)
    g_want = jax.grad(lambda b: jnp.sum(jax.nn.dot_product_attention(q, k, v, b, mask, implementation="xla") * do))(bias)
    assert oracle.rel_err(g, g_want) < 2e-4


def test_on_a_gpu_the_options_cudnn_takes_go_to_cudnn(monkeypatch):
    calls = []

    def fake(q, k, v, **kwargs):
        calls.append(kwargs)
        return jnp.zeros_like(q)

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    q, k, v, _ = inputs(1, 16, 16, 2, 2, 32, dtype=jnp.bfloat16)
    dot_product_attention(q, k, v, is_causal=True, local_window_size=(8, 0))
    assert calls and calls[-1]["implementation"] == "cudnn" and calls[-1]["local_window_size"] == (8, 0)
    calls.clear()
    o = dot_product_attention(q, k, v, logits_soft_cap=5.0)  # cuDNN has no soft cap: the reference path
    assert not calls and o.shape == q.shape


@pytest.mark.parametrize("kwargs, message", [
    ({"local_window_size": -3}, "argument 'local_window_size': expected edges that are ints >= 0"),
    ({"logits_soft_cap": 0.0}, "argument 'logits_soft_cap'"),
    ({"sinks": jnp.zeros(5)}, r"argument 'sinks': expected floats of shape \(4,\)"),
    ({"segment_ids": jnp.zeros((2, 8), jnp.float32)}, "argument 'segment_ids'"),
    ({"query_seq_lengths": jnp.zeros((3,), jnp.int32)}, r"argument 'query_seq_lengths': expected int32 of shape \(2,\)"),
    ({"bias": jnp.zeros((2, 4, 8, 9))}, r"argument 'bias': expected a 4-D array broadcastable to \[B, N, T, S\]"),
    ({"mask": jnp.zeros((1, 1, 8, 8), jnp.float32)}, "argument 'mask': expected booleans"),
])
def test_bad_arguments_name_the_argument(kwargs, message):
    q = jnp.zeros((2, 8, 4, 16))
    with pytest.raises(ValueError, match=message):
        dot_product_attention(q, q[:, :, :2], q[:, :, :2], **kwargs)


@pytest.mark.parametrize("causal", [False, True])
def test_sequence_lengths_end_the_grid_at_the_longest_sequence(causal):
    # The rows and keys past the lengths get ids below and above every other, so that a query block
    # holding the last real rows never spans a key block of padding alone: the grid's key steps
    # (tiles.segment_steps) end at the longest sequence's last key block.
    from pallas_flash.dot_product_attention import _with_lengths
    from pallas_flash.tiles import Grid, Problem, segment_block_ranges, segment_steps, static_steps

    t = 1024
    lengths = jnp.asarray([300, 500], jnp.int32)
    q_ids, kv_ids = _with_lengths(None, lengths, lengths, 2, t, t)
    problem = Problem(t, t, 1.0, Mask.bottom_right(t, t, causal=causal), 1, interpret=True, segments=True)
    grid = Grid.of(256, 128, t, t)
    static, _ = static_steps(problem, grid, per_q_block=True)
    steps = segment_steps(problem, grid, segment_block_ranges(q_ids, kv_ids, grid), per_q_block=True, static=static)
    assert int(steps) == 4 and static == 8  # 500 keys: 4 blocks of 128
