"""flash_decode and sharded_flash_decode with a sliding window, chunks, the soft cap and sinks, on the
Pallas kernel (TPU interpret mode) and the C++ decode, against the float64 oracle: contiguous and
paged caches whose positions outside what a token sees hold NaN (a read of one would show), any
split count, and the 2x2 mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracle
from pallas_flash import decode, flash_decode, sharded_flash_decode
from pallas_flash.mask import Mask
from test_decode import make_cache, paged


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """128-row blocks, so that windows span several blocks and splits."""
    monkeypatch.setattr(decode, "BLOCK_ROWS", 128)


def want(q, k, v, lengths, *, window=None, chunk=None, soft_cap=None, sinks=None):
    """Per sequence: token t at position length - T + t, causal within its window and chunk."""
    outs, lses = [], []
    tokens = q.shape[2]
    for b, length in enumerate(np.asarray(lengths)):
        mask = Mask(causal=True, window=(window, None), chunk=chunk, q_position=int(length) - tokens)
        r = oracle.attention(q[b:b + 1], k[b:b + 1, :, :max(int(length), 1)], v[b:b + 1, :, :max(int(length), 1)],
                             mask if length else Mask(causal=True, q_position=-10**6),  # sees nothing
                             soft_cap=soft_cap, sinks=sinks)
        outs.append(r["o"])
        lses.append(r["lse"])
    return np.concatenate(outs), np.concatenate(lses)


def poison_outside(k, v, lengths, low):
    """NaN at every position below `low` (per sequence): positions a windowed token may not read."""
    pos = np.arange(k.shape[2])[None, None, :, None]
    keep = pos >= np.asarray(low)[:, None, None, None]
    return (jnp.where(keep, k, jnp.nan), jnp.where(keep, v, jnp.nan))


def check(o, lse, expected, tol=1e-5):
    want_o, want_lse = expected
    assert np.all(np.isfinite(np.asarray(o))), "a NaN position was read"
    assert oracle.rel_err(o, want_o) < tol
    oracle.assert_lse_close(lse, want_lse)


CASES = [  # (name, options, lengths, tokens)
    ("window", {"window": 200}, [0, 90, 1000], 1),
    ("window_of_one", {"window": 0}, [5, 700], 2),
    ("window_tokens", {"window": 100}, [3, 517], 4),
    ("chunk", {"chunk": 256}, [255, 256, 900], 3),
    ("soft_cap", {"logits_soft_cap": 2.0}, [33, 1000], 2),
    ("sinks", {"sinks": True}, [0, 400], 2),
    ("everything", {"window": 300, "logits_soft_cap": 3.0, "sinks": True}, [17, 1024], 3),
]


@pytest.mark.both_cpu_kernels
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("page_size", [0, 16], ids=["contiguous", "paged16"])
@pytest.mark.parametrize("name, options, lengths, tokens", CASES, ids=[c[0] for c in CASES])
def test_decode_variant_matches_the_oracle(name, options, lengths, tokens, page_size, splits):
    q, k, v = make_cache(len(lengths), 8, 2, tokens, 64, 1024)
    options = dict(options)
    rng = np.random.default_rng(len(name) + splits)
    sinks = jnp.asarray(rng.standard_normal(8) + 1.0, jnp.float32) if options.pop("sinks", False) else None
    lengths = jnp.asarray(lengths, jnp.int32)
    expected = want(q, k, v, lengths, window=options.get("window"), chunk=options.get("chunk"),
                    soft_cap=options.get("logits_soft_cap"), sinks=sinks)
    if options.get("window") is not None:  # what the window leaves out must not be read
        low = np.maximum(np.asarray(lengths) - tokens - options["window"], 0) // 128 * 128
        k, v = poison_outside(k, v, lengths, low)
    table = None
    if page_size:
        k, v, table = paged(k, v, lengths, page_size)
    o, lse = flash_decode(q, k, v, lengths, page_table=table, num_splits=splits, sinks=sinks, return_lse=True,
                          **options)
    check(o, lse, expected)


@pytest.mark.both_cpu_kernels
def test_sharded_decode_with_a_window_and_sinks_counts_the_sinks_once():
    # Shards of at most 64 KiB (larger ones hang JAX 0.10.2's interpret mode under shard_map: test_decode.py).
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("x", "y"))
    q, k, v = make_cache(2, 8, 2, 2, 32, 512)
    lengths = jnp.asarray([300, 500], jnp.int32)
    sinks = jnp.linspace(-1.0, 2.0, 8, dtype=jnp.float32)
    o, lse = sharded_flash_decode(q, k, v, lengths, mesh, window=200, logits_soft_cap=4.0, sinks=sinks,
                                  return_lse=True)
    check(o, lse, want(q, k, v, lengths, window=200, soft_cap=4.0, sinks=sinks))


@pytest.mark.parametrize("kwargs, message", [
    ({"window": -1}, "argument 'window': expected None or an int >= 0"),
    ({"chunk": 0}, "argument 'chunk'"),
    ({"logits_soft_cap": -1.0}, "argument 'logits_soft_cap'"),
    ({"sinks": jnp.zeros(3)}, "argument 'sinks'"),
])
def test_bad_decode_options_raise(kwargs, message):
    q, k, v = make_cache(1, 2, 2, 1, 16, 128)
    with pytest.raises(ValueError, match=message):
        flash_decode(q, k, v, 10, **kwargs)
