"""The Pallas split-KV decode kernel (TPU interpret mode) over contiguous and paged caches, the append
that feeds it, and its 2x2-mesh sharding, against the reference over each sequence's visible cache.
Tests marked both_cpu_kernels run again on the C++ decode (the CPU path through the XLA FFI)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_flash import append_kv, decode, flash_decode, reference_attention, sharded_flash_decode


def make_cache(batch, heads_q, heads_kv, tokens, dim, max_len, dtype=jnp.float32):
    seed = np.random.default_rng().integers(2**31)
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(kq, (batch, heads_q, tokens, dim)).astype(dtype)
    k = jax.random.normal(kk, (batch, heads_kv, max_len, dim)).astype(dtype)
    v = jax.random.normal(kv, (batch, heads_kv, max_len, dim)).astype(dtype)
    return q, k, v


def expected(q, k, v, lengths):
    """Per sequence: causal attention of its T new tokens over its first `length` positions (none:
    O = 0, LSE = -inf)."""
    outs, lses = [], []
    for b, length in enumerate(np.asarray(lengths)):
        if length == 0:
            outs.append(jnp.zeros_like(q[b : b + 1]))
            lses.append(jnp.full(q.shape[1:3], -jnp.inf)[None])
            continue
        o, lse = reference_attention(q[b : b + 1], k[b : b + 1, :, :length], v[b : b + 1, :, :length], causal=True,
                                     return_lse=True)
        outs.append(o)
        lses.append(lse)
    return jnp.concatenate(outs), jnp.concatenate(lses)


def paged(k, v, lengths, page_size, spare_pages=3, rng=None):
    """The contiguous caches [B, Hkv, C, D] as page pools [num_pages, Hkv, page_size, D] in a shuffled
    order with a page table [B, C / page_size]: entries past each length are -1, and every position
    the kernel must not read (past a length, in spare pages) is NaN."""
    rng = rng or np.random.default_rng()
    batch, heads, capacity, dim = k.shape
    per_seq = capacity // page_size
    num_pages = batch * per_seq + spare_pages
    order = rng.permutation(num_pages)[: batch * per_seq].reshape(batch, per_seq)
    pools = []
    for cache in (k, v):
        visible = np.arange(capacity)[None, None, :, None] < np.asarray(lengths)[:, None, None, None]
        poisoned = np.where(visible, np.asarray(cache, np.float32), np.nan)
        pool = np.full((num_pages, heads, page_size, dim), np.nan, np.float32)
        pages = poisoned.reshape(batch, heads, per_seq, page_size, dim).transpose(0, 2, 1, 3, 4)
        pool[order.reshape(-1)] = pages.reshape(batch * per_seq, heads, page_size, dim)
        pools.append(jnp.asarray(pool, k.dtype))
    used = np.arange(per_seq)[None, :] < -(-np.asarray(lengths)[:, None] // page_size)
    return pools[0], pools[1], jnp.asarray(np.where(used, order, -1), jnp.int32)


def assert_matches(o, lse, q, k, v, lengths, tol=1e-5):
    want_o, want_lse = expected(q, k, v, lengths)
    np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(want_o, np.float32), rtol=tol, atol=tol)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)


@pytest.fixture
def small_blocks(monkeypatch):
    """128-row blocks (8 pages of 16), so that a 1024-position cache is 8 blocks to split: with the
    kernel's 4096-row blocks it would be one, and every split count the same."""
    monkeypatch.setattr(decode, "BLOCK_ROWS", 128)


@pytest.mark.both_cpu_kernels
@pytest.mark.parametrize("splits", [1, 2, 3, 8])
@pytest.mark.parametrize("heads", [(2, 2), (8, 2), (8, 1)], ids=["mha", "gqa4", "mqa"])
def test_decode_matches_reference_for_any_split(heads, splits, small_blocks):
    assert decode.cache_layout((3, heads[1], 1024, 64)).num_blocks == 8
    q, k, v = make_cache(3, heads[0], heads[1], 1, 64, 1024)
    lengths = jnp.array([1, 129, 1024], jnp.int32)  # one token, one past a block, the full cache
    o, lse = flash_decode(q, k, v, lengths, num_splits=splits, return_lse=True)
    assert_matches(o, lse, q, k, v, lengths)


@pytest.mark.both_cpu_kernels
@pytest.mark.parametrize("tokens", [2, 16])
def test_multi_token_queries_are_causal_among_themselves(tokens):
    q, k, v = make_cache(2, 4, 2, tokens, 32, 256)
    lengths = jnp.array([tokens, 200], jnp.int32)
    o, lse = flash_decode(q, k, v, lengths, num_splits=2, return_lse=True)
    assert_matches(o, lse, q, k, v, lengths)


@pytest.mark.both_cpu_kernels
def test_bf16_cache_and_short_unaligned_cache():
    q, k, v = make_cache(2, 4, 4, 1, 96, 200, jnp.bfloat16)  # 200 rows: one block, no copy
    lengths = jnp.array([7, 200], jnp.int32)
    o = flash_decode(q, k, v, lengths)
    want, _ = expected(q, k, v, lengths)
    assert o.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)


@pytest.mark.both_cpu_kernels
@pytest.mark.parametrize("mesh_shape", [(2, 2), (1, 1), (1, 4)])
def test_sharded_decode_matches_single_device(mesh_shape):
    # Sizes kept so each device's cache shard is at most 64 KiB: larger shards hang JAX 0.10.2's TPU
    # interpret mode under shard_map on a 2-core host (not the kernel: a compiled TPU run has no such limit).
    mesh = jax.make_mesh(mesh_shape, ("x", "y"))
    q, k, v = make_cache(2, 4, 2, 1, 32, 512)  # four shards of 128 positions
    lengths = jnp.array([300, 100], jnp.int32)  # uneven: the second sequence leaves three shards empty
    o, lse = sharded_flash_decode(q, k, v, lengths, mesh, return_lse=True)
    assert_matches(o, lse, q, k, v, lengths)
    single_o, single_lse = flash_decode(q, k, v, lengths, return_lse=True)
    np.testing.assert_allclose(o, single_o, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, single_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.both_cpu_kernels
def test_sharded_decode_multi_token_gqa_on_2x2():
    mesh = jax.make_mesh((2, 2), ("x", "y"))
    q, k, v = make_cache(1, 8, 2, 3, 32, 512)
    lengths = jnp.array([257], jnp.int32)  # the new tokens straddle the shard boundary at 256
    o, lse = sharded_flash_decode(q, k, v, lengths, mesh, num_splits=1, return_lse=True)
    assert_matches(o, lse, q, k, v, lengths)


@pytest.mark.both_cpu_kernels
@pytest.mark.parametrize("tokens", [1, 3])
def test_a_python_int_length_is_every_sequences_length(tokens):
    # Known at trace time (no SMEM read): the same result as the array of that length.
    q, k, v = make_cache(2, 4, 2, tokens, 32, 512)
    o, lse = flash_decode(q, k, v, 300, num_splits=2, return_lse=True)
    assert_matches(o, lse, q, k, v, jnp.array([300, 300], jnp.int32))
    mesh = jax.make_mesh((2, 2), ("x", "y"))
    q, k, v = make_cache(1, 4, 2, tokens, 32, 512)
    o, lse = sharded_flash_decode(q, k, v, 512, mesh, num_splits=1, return_lse=True)  # a full cache
    assert_matches(o, lse, q, k, v, jnp.array([512], jnp.int32))


@pytest.mark.parametrize(
    "q_shape, cache_shape, lengths, message",
    [
        ((1, 2, 17, 32), (1, 2, 256, 32), [1], "1..16 query tokens"),
        ((1, 3, 1, 32), (1, 2, 256, 32), [1], "Hkv dividing q's heads"),
        ((1, 2, 1, 32), (1, 2, 256, 32), [1, 2], "lengths of shape"),
        ((1, 2, 1, 32), (1, 2, 3000, 32), [1], "multiple of 128"),
    ],
)
def test_bad_decode_inputs_raise(q_shape, cache_shape, lengths, message):
    with pytest.raises(ValueError, match=message):
        flash_decode(jnp.zeros(q_shape), jnp.zeros(cache_shape), jnp.zeros(cache_shape), jnp.array(lengths, jnp.int32))


def test_an_int_length_past_the_cache_is_rejected():
    z = jnp.zeros((1, 2, 256, 32))
    with pytest.raises(ValueError, match=r"int length in 0..256 \(the cache.s capacity 256\), got 257"):
        flash_decode(jnp.zeros((1, 2, 1, 32)), z, z, 257)


def test_sharded_decode_needs_divisible_cache():
    mesh = jax.make_mesh((2, 2), ("x", "y"))
    z = jnp.zeros((1, 2, 130, 32))
    with pytest.raises(ValueError, match="divisible by the 4 devices"):
        sharded_flash_decode(jnp.zeros((1, 2, 1, 32)), z, z, jnp.array([5], jnp.int32), mesh)


def test_off_tpu_and_cpu_the_reference_path_runs(monkeypatch):
    # On a GPU backend the TPU kernels are not used: decode and the sharded decode take plain jax.numpy.
    mesh = jax.make_mesh((2, 2), ("x", "y"))
    q, k, v = make_cache(2, 4, 2, 2, 32, 512)
    lengths = jnp.array([300, 2], jnp.int32)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    o, lse = flash_decode(q, k, v, lengths, return_lse=True)
    assert_matches(o, lse, q, k, v, lengths)
    o, lse = sharded_flash_decode(q, k, v, lengths, mesh, return_lse=True)
    assert_matches(o, lse, q, k, v, lengths)


# --------------------------------------------------------------------------------------------------
# Paged caches, ragged lengths, append


def edge_lengths(page_size, capacity):
    """0, 1, page-1, page, page+1 and long (the full capacity)."""
    return [0, 1, page_size - 1, page_size, page_size + 1, capacity]


@pytest.mark.both_cpu_kernels
@pytest.mark.parametrize("page_size, tokens, heads", [(16, 1, (8, 8)), (16, 16, (8, 2)), (128, 3, (8, 2)),
                                                      (128, 1, (8, 1)), (512, 3, (4, 4)), (512, 16, (8, 1))],
                         ids=lambda x: str(x))
def test_paged_decode_matches_reference(page_size, tokens, heads):
    capacity = 4 * page_size if page_size < 512 else 1024
    lengths = np.array(edge_lengths(page_size, capacity), np.int32)
    q, k, v = make_cache(len(lengths), heads[0], heads[1], tokens, 32, capacity)
    k_pool, v_pool, table = paged(k, v, lengths, page_size)
    o, lse = flash_decode(q, k_pool, v_pool, jnp.asarray(lengths), page_table=table, num_splits=2, return_lse=True)
    assert np.all(np.isfinite(np.asarray(o)))  # no NaN past a length or in a spare page reaches O
    assert_matches(o, lse, q, k, v, lengths)


@pytest.mark.both_cpu_kernels
@pytest.mark.parametrize("splits", [1, 2, 3, 5, 8])
def test_paged_decode_any_split(splits, small_blocks):
    lengths = np.array([1000, 1024, 33], np.int32)
    q, k, v = make_cache(3, 8, 2, 2, 32, 1024)
    k_pool, v_pool, table = paged(k, v, lengths, 16)  # 64 pages per sequence: 8 blocks of 8 pages
    assert decode.cache_layout(k_pool.shape, table.shape).num_blocks == 8
    o, lse = flash_decode(q, k_pool, v_pool, jnp.asarray(lengths), page_table=table, num_splits=splits,
                          return_lse=True)
    assert_matches(o, lse, q, k, v, lengths)


def test_paged_decode_splits_across_blocks():
    # 16-row pages, 64 per block: 128 pages per sequence are 2 blocks, split and double-buffered.
    lengths = np.array([2048, 1040, 17], np.int32)
    q, k, v = make_cache(3, 4, 2, 1, 16, 2048)
    k_pool, v_pool, table = paged(k, v, lengths, 16)
    for splits in (1, 2):
        o, lse = flash_decode(q, k_pool, v_pool, jnp.asarray(lengths), page_table=table, num_splits=splits,
                              return_lse=True)
        assert_matches(o, lse, q, k, v, lengths)


@pytest.mark.both_cpu_kernels
def test_contiguous_decode_ignores_nan_past_the_lengths():
    lengths = np.array([129, 0, 1024], np.int32)
    q, k, v = make_cache(3, 4, 2, 3, 32, 1024)
    poison = np.arange(1024)[None, None, :, None] >= lengths[:, None, None, None]
    k_bad, v_bad = (jnp.where(poison, jnp.nan, c) for c in (k, v))
    o, lse = flash_decode(q, k_bad, v_bad, jnp.asarray(lengths), num_splits=2, return_lse=True)
    assert np.all(np.isfinite(np.asarray(o)))
    assert_matches(o, lse, q, k, v, lengths)


@pytest.mark.both_cpu_kernels
@pytest.mark.parametrize("page_size", [None, 16])
def test_a_generation_loop_with_appends_equals_full_attention_each_step(page_size):
    # 32 steps of one new token for 2 sequences starting at different lengths: append, then decode;
    # each step equals causal attention over everything written so far.
    rng = np.random.default_rng()
    batch, heads_q, heads_kv, dim, capacity, steps = 2, 4, 2, 32, 256, 32
    start = np.array([0, 37], np.int32)
    keys = rng.standard_normal((batch, heads_kv, capacity, dim)).astype(np.float32)
    values = rng.standard_normal((batch, heads_kv, capacity, dim)).astype(np.float32)
    queries = rng.standard_normal((steps, batch, heads_q, 1, dim)).astype(np.float32)
    k_cache, v_cache = (jnp.where(np.arange(capacity)[None, None, :, None] < start[:, None, None, None], c, 0.0)
                        for c in (jnp.asarray(keys), jnp.asarray(values)))
    table = None
    if page_size:
        k_cache, v_cache, table = paged(k_cache, v_cache, np.full(batch, capacity), page_size)
    append = jax.jit(append_kv, donate_argnums=(0, 1))
    decode_step = jax.jit(lambda q, k, v, n, table: flash_decode(q, k, v, n, page_table=table, return_lse=True))
    lengths = jnp.asarray(start)
    for step in range(steps):
        positions = np.asarray(lengths)
        new_k = jnp.asarray(keys[np.arange(batch), :, positions][:, :, None])
        new_v = jnp.asarray(values[np.arange(batch), :, positions][:, :, None])
        k_cache, v_cache = append(k_cache, v_cache, lengths, table, new_k, new_v)
        lengths = lengths + 1
        o, lse = decode_step(jnp.asarray(queries[step]), k_cache, v_cache, lengths, table)
        assert_matches(o, lse, jnp.asarray(queries[step]), jnp.asarray(keys), jnp.asarray(values), np.asarray(lengths))


def test_append_writes_only_the_new_rows():
    q, k, v = make_cache(2, 2, 2, 1, 16, 256)
    k_pool, v_pool, table = paged(k, v, np.array([256, 256]), 32)
    before = np.asarray(k_pool)
    new = jnp.ones((2, 2, 3, 16))
    k_after, _ = append_kv(k_pool, v_pool, jnp.array([5, 30], jnp.int32), table, new, new)
    changed = np.argwhere(np.any(np.asarray(k_after) != before, axis=-1) & ~np.isnan(before).all(-1))
    written = {(int(table[b, p // 32]), h, p % 32) for b, length in enumerate((5, 30)) for h in range(2)
               for p in range(length, length + 3)}
    assert {tuple(map(int, c)) for c in changed} == written  # rows 30..32 of sequence 1 cross a page


@pytest.mark.both_cpu_kernels
@pytest.mark.parametrize("mesh_shape", [(2, 2), (1, 4)])
def test_sharded_paged_decode_matches_single_device(mesh_shape):
    # Device i holds positions [i * 128, (i+1) * 128): pages 8i..8i+7 of each sequence's 32 (16-row
    # pages) live in its part of the pool. Shards stay under 64 KiB (see the contiguous test).
    mesh = jax.make_mesh(mesh_shape, ("x", "y"))
    batch, page_size, devices = 2, 16, 4
    lengths = np.array([300, 100], np.int32)
    q, k, v = make_cache(batch, 4, 2, 3, 16, 512)
    per_device = 512 // page_size // devices  # pages of one sequence on one device
    table = np.zeros((batch, 512 // page_size), np.int32)
    for i in range(devices):
        local = np.random.default_rng().permutation(batch * per_device) + i * batch * per_device
        table[:, i * per_device:(i + 1) * per_device] = local.reshape(batch, per_device)
    pools = []
    for cache in (k, v):
        pool = np.zeros((batch * 512 // page_size, 2, page_size, 16), np.float32)
        pages = np.asarray(cache).reshape(batch, 2, 512 // page_size, page_size, 16).transpose(0, 2, 1, 3, 4)
        pool[table.reshape(-1)] = pages.reshape(-1, 2, page_size, 16)
        pools.append(jnp.asarray(pool))
    o, lse = sharded_flash_decode(q, *pools, jnp.asarray(lengths), mesh, page_table=jnp.asarray(table), return_lse=True)
    assert_matches(o, lse, q, k, v, lengths)
    single_o, single_lse = flash_decode(q, *pools, jnp.asarray(lengths), page_table=jnp.asarray(table), return_lse=True)
    np.testing.assert_allclose(o, single_o, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"sharded_flash_decode \(device 0\): expected page_table entries in 0..15"):
        bad = table.copy()
        bad[0, 0] = 20  # a page of device 1's part, for positions device 0 holds
        sharded_flash_decode(q, *pools, jnp.asarray(lengths), mesh, page_table=jnp.asarray(bad))


def test_paged_reference_path_off_tpu(monkeypatch):
    lengths = np.array([70, 0], np.int32)
    q, k, v = make_cache(2, 4, 2, 2, 32, 256)
    k_pool, v_pool, table = paged(k, v, lengths, 64)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    o, lse = flash_decode(q, k_pool, v_pool, jnp.asarray(lengths), page_table=table, return_lse=True)
    assert_matches(o, lse, q, k, v, lengths)


def bad_paged_call(pool_shape=(8, 2, 16, 32), table=((0, 1), (2, 3)), lengths=(20, 3), q_heads=4):
    q = jnp.zeros((2, q_heads, 1, 32))
    pool = jnp.zeros(pool_shape)
    return lambda: flash_decode(q, pool, pool, jnp.asarray(lengths, jnp.int32), page_table=jnp.asarray(table, jnp.int32))


@pytest.mark.parametrize("call, message", [
    (bad_paged_call(table=((0, 9), (2, 3))), r"entries in 0..7 for the pages sequence 0 uses \(length 20\), got page id 9"),
    (bad_paged_call(table=((0, -1), (2, 3))), "got page id -1"),
    (bad_paged_call(lengths=(33, 3)), "a length past the table's capacity of 32 positions"),
    (bad_paged_call(pool_shape=(8, 2, 24, 32)), "power of two in 16..512, got 24"),
    (bad_paged_call(pool_shape=(8, 2, 1024, 32)), "power of two in 16..512, got 1024"),
    (bad_paged_call(q_heads=3), "mismatched heads"),
    (bad_paged_call(table=((0, 1, 2),)), r"page_table \[B=2, pages_per_seq\]"),
], ids=["page-past-pool", "negative-page", "past-capacity", "page-24", "page-1024", "heads", "table-shape"])
def test_bad_paged_inputs_raise_before_launch(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.both_cpu_kernels
def test_entries_past_a_length_are_never_checked_or_read():
    # Sequence 1 uses one page: its second entry may be anything.
    q, k, v = make_cache(2, 4, 2, 1, 32, 32)
    k_pool, v_pool, table = paged(k, v, np.array([32, 5]), 16)
    table = table.at[1, 1].set(12345)
    o = flash_decode(q, k_pool, v_pool, jnp.array([32, 5], jnp.int32), page_table=table)
    assert_matches(o, expected(q, k, v, [32, 5])[1], q, k, v, [32, 5])


def test_bad_appends_raise_before_writing():
    pool = jnp.zeros((4, 2, 16, 8))
    table = jnp.array([[0, 1], [2, 3]], jnp.int32)
    new = jnp.ones((2, 2, 3, 8))
    with pytest.raises(ValueError, match="append_kv: expected lengths in 0..29"):
        append_kv(pool, pool, jnp.array([30, 0], jnp.int32), table, new, new)
    with pytest.raises(ValueError, match="got page id 7"):
        append_kv(pool, pool, jnp.array([14, 0], jnp.int32), table.at[0, 1].set(7), new, new)
    with pytest.raises(ValueError, match="k_new and v_new of one shape"):
        append_kv(pool, pool, jnp.array([0, 0], jnp.int32), table, new, new[:, :, :2])
    with pytest.raises(ValueError, match=r"k_new \[B, Hkv=2, T, D\]"):
        append_kv(pool, pool, jnp.array([0, 0], jnp.int32), table, jnp.ones((2, 4, 1, 8)), jnp.ones((2, 4, 1, 8)))


# --------------------------------------------------------------------------------------------------
# KV heads packed per row (a last axis of k * D): caches of D < 128 without lane padding


def packed_heads(cache, per_row):
    """[..., Hkv, N, D] -> [..., Hkv / k, N, k * D], KV head h in cache head h // k at lanes (h % k) * D,
    written head by head (the layout's definition, not the library's reshape)."""
    cache = np.asarray(cache, np.float32)
    lead, heads, positions, dim = cache.shape
    out = np.full((lead, heads // per_row, positions, per_row * dim), np.nan, np.float32)
    for h in range(heads):
        out[:, h // per_row, :, (h % per_row) * dim:(h % per_row + 1) * dim] = cache[:, h]
    assert not np.isnan(out).any() or np.isnan(cache).any()
    return out


@pytest.mark.both_cpu_kernels
@pytest.mark.parametrize("per_row, heads, dim, tokens", [(2, (8, 2), 64, 1), (2, (4, 4), 32, 3), (4, (8, 4), 16, 2)],
                         ids=lambda x: str(x))
@pytest.mark.parametrize("page_size", [None, 16])
def test_a_cache_with_heads_packed_per_row_decodes_as_unpacked(per_row, heads, dim, tokens, page_size):
    lengths = np.array([300, 0, 1, 129], np.int32)
    q, k, v = make_cache(4, heads[0], heads[1], tokens, dim, 512)
    table = None
    if page_size:
        k_cache, v_cache, table = paged(k, v, lengths, page_size)  # NaN wherever nothing may be read
    else:
        k_cache, v_cache = k, v
    k_packed, v_packed = (jnp.asarray(packed_heads(c, per_row)) for c in (k_cache, v_cache))
    assert decode.heads_per_row(q, k_packed) == per_row
    o, lse = flash_decode(q, k_packed, v_packed, jnp.asarray(lengths), page_table=table, num_splits=2,
                          return_lse=True)
    assert o.shape == q.shape and np.all(np.isfinite(np.asarray(o)))
    assert_matches(o, lse, q, k, v, lengths)


@pytest.mark.both_cpu_kernels
def test_packed_heads_take_windows_soft_caps_and_sinks_as_unpacked():
    lengths = np.array([300, 77], np.int32)
    q, k, v = make_cache(2, 8, 4, 2, 32, 512)
    sinks = jnp.linspace(-1.0, 2.0, 8)
    options = dict(window=40, logits_soft_cap=3.0, sinks=sinks, return_lse=True)
    want_o, want_lse = flash_decode(q, k, v, jnp.asarray(lengths), **options)
    k_packed, v_packed = (jnp.asarray(packed_heads(c, 4)) for c in (k, v))
    o, lse = flash_decode(q, k_packed, v_packed, jnp.asarray(lengths), **options)
    np.testing.assert_allclose(o, want_o, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("page_size", [None, 16])
def test_append_into_packed_heads_writes_each_heads_lanes(page_size):
    batch, heads_kv, dim, capacity = 2, 4, 16, 64
    q, k, v = make_cache(batch, 8, heads_kv, 1, dim, capacity)
    new_k, new_v = (jnp.asarray(np.random.default_rng().standard_normal((batch, heads_kv, 3, dim)), jnp.float32)
                    for _ in range(2))
    lengths = jnp.array([5, 30], jnp.int32)
    table = None
    k_cache, v_cache = k, v
    if page_size:
        k_cache, v_cache, table = paged(k, v, np.full(batch, capacity), page_size)
    want = append_kv(k_cache, v_cache, lengths, table, new_k, new_v)
    got = append_kv(jnp.asarray(packed_heads(k_cache, 2)), jnp.asarray(packed_heads(v_cache, 2)), lengths, table,
                    new_k, new_v)
    for w, g in zip(want, got):
        np.testing.assert_array_equal(np.asarray(g), packed_heads(w, 2))


@pytest.mark.both_cpu_kernels
def test_sharded_decode_and_append_take_packed_heads():
    from pallas_flash import sharded_append_kv
    mesh = jax.make_mesh((2, 2), ("x", "y"))
    lengths = jnp.array([300, 100], jnp.int32)
    q, k, v = make_cache(2, 8, 2, 1, 32, 512)  # 64 KiB a shard (see test_sharded_decode_matches_single_device)
    new = jnp.ones((2, 2, 1, 32))
    k_packed, v_packed = (jnp.asarray(packed_heads(c, 2)) for c in (k, v))
    k_packed, v_packed = sharded_append_kv(k_packed, v_packed, lengths, mesh, None, new, new)
    k, v = (c.at[np.arange(2), :, np.asarray(lengths)].set(1.0) for c in (k, v))
    np.testing.assert_array_equal(np.asarray(k_packed), packed_heads(k, 2))
    o, lse = sharded_flash_decode(q, k_packed, v_packed, lengths + 1, mesh, return_lse=True)
    assert_matches(o, lse, q, k, v, np.asarray(lengths) + 1)


@pytest.mark.parametrize("q_shape, cache_shape, message", [
    ((1, 4, 1, 48), (1, 2, 256, 128), r"q's D = 48 \(or a multiple of it"),
    ((1, 6, 1, 64), (1, 2, 256, 128), r"got 6 and Hkv=4 \(2 x 2 packed per row\)"),
])
def test_bad_packed_caches_raise(q_shape, cache_shape, message):
    with pytest.raises(ValueError, match=message):
        flash_decode(jnp.zeros(q_shape), jnp.zeros(cache_shape), jnp.zeros(cache_shape), 1)


def test_packed_heads_per_row_fills_128_lanes():
    assert [decode.packed_heads_per_row(8, d) for d in (64, 32, 128, 256, 96)] == [2, 4, 1, 1, 1]
    assert decode.packed_heads_per_row(1, 64) == 1 and decode.packed_heads_per_row(2, 32) == 1


@pytest.mark.parametrize("page_size, window, pages_per_block, blocks", [
    (128, 4096, 33, 1),  # 4097 positions from a page-aligned start: one block (4096 rows left one page over)
    (128, 8192, 33, 2),
    (16, 4096, 56, 5),  # blocks of whole 128-row tiles
    (512, 4096, 9, 1),
    (128, 10**6, 32, 32),  # a window past the cache: the cache's own blocks
])
def test_a_windowed_paged_cache_is_read_in_blocks_that_fit_the_window(page_size, window, pages_per_block, blocks):
    layout = decode.cache_layout((131072 // page_size, 8, page_size, 128), (1, 131072 // page_size))
    rules = decode.DecodeRules(window=window)
    windowed = decode.windowed_layout(layout, rules.span(1))
    assert windowed.pages_per_block == pages_per_block and windowed.block_k % 128 == 0
    assert decode.read_blocks(layout, rules, 1) == blocks
