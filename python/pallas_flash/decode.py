"""FlashDecoding for the TPU: a few new query tokens against a long KV cache, split over the cache
length (split-KV) and merged exactly by LSE; and the same sharded over a 2x2 mesh of devices.

Kernel grid (B, Hkv, splits, blocks_per_split), the last axis sequential. All query heads of a GQA
group and all new tokens form one (group * T, D) query tile, so each KV head is read once for its
whole group. Per-sequence lengths arrive by scalar prefetch (SMEM): key blocks past a sequence's
length are skipped with pl.when, and their index maps are clamped so no DMA is issued for them.
Each split writes a partial (O, LSE); merge_attention_states combines them.
"""

from __future__ import annotations

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

from pallas_flash.backend import kernel_mode
from pallas_flash.merge import merge_attention_states
from pallas_flash.online_softmax import LOG2_E, NEG_INF, finish_state, init_state, stat_shape, update_state
from pallas_flash.planner import vmem_budget_bytes
from pallas_flash.reference import masked_attention

MAX_QUERY_TOKENS = 16


def decode_block_k(max_len: int) -> int:
    """Key rows per block: the largest of 4096..128 dividing the cache length (no copy of the cache);
    a cache shorter than that is one block. Decode is a stream of K/V through VMEM with almost no
    arithmetic; each grid step costs ~1,500 cycles of fixed work besides its DMA (v5e compiler
    estimate), so blocks of 4096 rows (2 MiB of K and V per step at D = 128) reach the HBM floor
    where 1024 rows stayed at 62% of it."""
    for block in (4096, 2048, 1024, 512, 256, 128):
        if max_len % block == 0:
            return block
    if max_len <= 2048:
        return max_len
    raise ValueError(f"flash_decode: expected a cache length that is a multiple of 128 (or at most 2048), got {max_len}")


def default_num_splits(num_blocks: int) -> int:
    """At least 8 key blocks per split and at most 8 splits: enough partials to spread one sequence
    over a megacore's cores without making the merge a visible cost."""
    return max(1, min(8, num_blocks // 8))


def _decode_kernel(end_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, row_max_ref, row_sum_ref, acc_ref, *, scale,
                   query_tokens, block_k, blocks_per_split, max_len, static_end):
    b, split, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    block = split * blocks_per_split + j
    # The position after the last query token, in this cache's coordinates.
    end = end_ref[b] if static_end is None else static_end
    rows = q_ref.shape[0]

    @pl.when(j == 0)
    def _init():
        init_state(row_max_ref, row_sum_ref, acc_ref)

    @pl.when(block * block_k < jnp.minimum(end, max_len))
    def _step():
        s = lax.dot_general(q_ref[...], k_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        s = s * (scale * LOG2_E)  # log2 units: the online softmax works in exp2
        # Row r is query token t = r % T at position end - T + t: it sees keys up to that position.
        token = lax.rem(lax.broadcasted_iota(jnp.int32, (rows, block_k), 0), jnp.int32(query_tokens))
        col = block * block_k + lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
        s = jnp.where(col <= end - query_tokens + token, s, NEG_INF)
        update_state(s, v_ref[...], row_max_ref, row_sum_ref, acc_ref)

    @pl.when(j == blocks_per_split - 1)
    def _finish():
        o, lse = finish_state(row_max_ref, row_sum_ref, acc_ref)
        o_ref[...], lse_ref[...] = o, lse[:, :1]


def _decode_partials(q, k_cache, v_cache, end, *, scale, num_splits, interpret):
    """Partials over splits: O [B, Hkv, splits, group*T, D] f32 and LSE [B, Hkv, splits, group*T, 1].
    end: per sequence, the position after its last query token in this cache's coordinates: an
    int32 [B] array read by scalar prefetch, or a Python int for every sequence, known at trace time."""
    static_end = int(end) if isinstance(end, (int, np.integer)) else None
    if static_end is not None:
        end = jnp.full((q.shape[0],), static_end, jnp.int32)
    batch, heads_q, query_tokens, dim = q.shape
    heads_kv, max_len = k_cache.shape[1], k_cache.shape[2]
    group = heads_q // heads_kv
    rows = group * query_tokens
    q_rows = q.reshape(batch, heads_kv, rows, dim)  # heads of a group are adjacent: a free reshape
    block_k = decode_block_k(max_len)
    num_blocks = max_len // block_k
    splits = min(num_splits, num_blocks)
    blocks_per_split = -(-num_blocks // splits)

    def q_map(b, h, s, j, end_ref):
        return b, h, 0, 0

    def kv_map(b, h, s, j, end_ref):
        end_b = end_ref[b] if static_end is None else static_end
        last = lax.div(jnp.maximum(jnp.minimum(end_b, max_len) - 1, 0), jnp.int32(block_k))
        return b, h, jnp.minimum(s * blocks_per_split + j, last), 0

    def out_map(b, h, s, j, end_ref):
        return b, h, s, 0, 0

    kernel = functools.partial(_decode_kernel, scale=scale, query_tokens=query_tokens, block_k=block_k,
                               blocks_per_split=blocks_per_split, max_len=max_len, static_end=static_end)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(batch, heads_kv, splits, blocks_per_split),
            in_specs=[
                pl.BlockSpec((None, None, rows, dim), q_map),
                pl.BlockSpec((None, None, block_k, dim), kv_map),
                pl.BlockSpec((None, None, block_k, dim), kv_map),
            ],
            out_specs=[
                pl.BlockSpec((None, None, None, rows, dim), out_map),
                pl.BlockSpec((None, None, None, rows, 1), out_map),
            ],
            scratch_shapes=[
                pltpu.VMEM(stat_shape(rows), jnp.float32),  # row_max
                pltpu.VMEM(stat_shape(rows), jnp.float32),  # row_sum
                pltpu.VMEM((rows, dim), jnp.float32),  # acc
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((batch, heads_kv, splits, rows, dim), jnp.float32),
            jax.ShapeDtypeStruct((batch, heads_kv, splits, rows, 1), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
                                             vmem_limit_bytes=vmem_budget_bytes()),
        interpret=pltpu.InterpretParams() if interpret else False,
        # At most every cache row once (fewer when sequences are shorter than the cache).
        cost_estimate=pl.CostEstimate(flops=4 * batch * heads_kv * rows * max_len * dim,
                                      transcendentals=batch * heads_kv * rows * max_len,
                                      bytes_accessed=2 * k_cache.size * k_cache.dtype.itemsize + 2 * q.size * 4),
        name="pallas_flash_decode",
    )(end.astype(jnp.int32), q_rows, k_cache, v_cache)


def _reference_partial(q, k_cache, v_cache, end, *, scale):
    """The same contract as the kernel after its split merge, in plain jax.numpy (the path off
    TPU and CPU): O [B, Hkv, group*T, D] f32 and LSE [B, Hkv, group*T]."""
    batch, heads_q, query_tokens, dim = q.shape
    heads_kv, max_len = k_cache.shape[1], k_cache.shape[2]
    rows = heads_q // heads_kv * query_tokens
    q_rows = q.reshape(batch, heads_kv, rows, dim).astype(jnp.float32)
    s = jnp.einsum("bhrd,bhkd->bhrk", q_rows, k_cache.astype(jnp.float32), precision="highest") * scale
    token = jnp.arange(rows)[:, None] % query_tokens
    col = jnp.arange(max_len)[None, :]
    end = jnp.broadcast_to(jnp.asarray(end, jnp.int32), (batch,))
    visible = col[None, None] <= (end[:, None, None, None] - query_tokens + token[None, None])
    return masked_attention(jnp.where(visible, s, -jnp.inf), v_cache)


def _decode(q, k_cache, v_cache, end, *, scale, num_splits, mode):
    """Attention of q over one cache (or shard), splits merged: O [B, Hkv, rows, D] f32, LSE [B, Hkv, rows]."""
    if mode == "reference":
        return _reference_partial(q, k_cache, v_cache, end, scale=scale)
    o_parts, lse_parts = _decode_partials(q, k_cache, v_cache, end, scale=scale, num_splits=num_splits,
                                          interpret=mode == "interpret")
    if o_parts.shape[2] == 1:  # one split: its partial is the result (no merge pass over it)
        return o_parts[:, :, 0], lse_parts[:, :, 0, :, 0]
    return merge_attention_states(o_parts, lse_parts[..., 0], axis=2)


def _check(q, k_cache, v_cache, lengths):
    if q.ndim != 4 or k_cache.ndim != 4:
        raise ValueError(f"flash_decode: expected q [B, Hq, T, D] and caches [B, Hkv, Nmax, D], got ranks {q.ndim}, {k_cache.ndim}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"flash_decode: expected k_cache and v_cache of one shape, got {k_cache.shape} and {v_cache.shape}")
    if not 1 <= q.shape[2] <= MAX_QUERY_TOKENS:
        raise ValueError(f"flash_decode: expected 1..{MAX_QUERY_TOKENS} query tokens, got T = {q.shape[2]}")
    if q.shape[0] != k_cache.shape[0] or q.shape[3] != k_cache.shape[3]:
        raise ValueError(f"flash_decode: expected caches with q's B and D, got q {q.shape}, cache {k_cache.shape}")
    if q.shape[1] % k_cache.shape[1]:
        raise ValueError(f"flash_decode: expected Hkv dividing Hq, got Hq={q.shape[1]}, Hkv={k_cache.shape[1]}")
    if isinstance(lengths, (int, np.integer)):
        if not 0 <= lengths <= k_cache.shape[2]:
            raise ValueError(f"flash_decode: expected an int length in 0..Nmax={k_cache.shape[2]}, got {lengths}")
    elif lengths.shape != (q.shape[0],):
        raise ValueError(f"flash_decode: expected lengths of shape ({q.shape[0]},), got {lengths.shape}")


def _finish(o, lse, q, return_lse):
    batch, heads_q, query_tokens, dim = q.shape
    o = o.reshape(batch, heads_q, query_tokens, dim).astype(q.dtype)
    lse = lse.reshape(batch, heads_q, query_tokens)
    return (o, lse) if return_lse else o


def flash_decode(q, k_cache, v_cache, lengths, *, sm_scale: float | None = None, num_splits: int | None = None,
                 return_lse: bool = False, interpret: bool | None = None):
    """Decode attention: q [B, Hq, T, D] (T new tokens, 1..16) against k_cache, v_cache [B, Hkv, Nmax, D].

    lengths [B] int32: valid cache positions per sequence, the new tokens' K/V included; new token t
    sits at position lengths - T + t and sees keys j <= that position. A Python int is one length for
    every sequence, known at trace time: the kernel reads no length from SMEM (the v5e compiler's
    static profile reads scalar-prefetch values as 0, so it is how decode is profiled). The cache is split into
    num_splits ranges (default: default_num_splits) decoded independently and merged exactly.
    Lengths are not checked against Nmax on the device: positions past Nmax do not exist and are
    never read. Returns O [B, Hq, T, D], or (O, LSE [B, Hq, T]) with return_lse.
    """
    _check(q, k_cache, v_cache, lengths)
    scale = 1.0 / math.sqrt(q.shape[3]) if sm_scale is None else float(sm_scale)
    num_blocks = k_cache.shape[2] // decode_block_k(k_cache.shape[2])
    splits = default_num_splits(num_blocks) if num_splits is None else int(num_splits)
    if splits < 1:
        raise ValueError(f"flash_decode: expected num_splits >= 1, got {num_splits}")
    o, lse = _decode(q, k_cache, v_cache, lengths, scale=scale, num_splits=splits, mode=kernel_mode(interpret))
    return _finish(o, lse, q, return_lse)


def _place(x, mesh, spec):
    """Lays x out as spec on mesh inside jit: jax.reshard for explicit mesh axes, a sharding
    constraint for automatic ones."""
    if all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        return jax.reshard(x, NamedSharding(mesh, spec))
    return lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def sharded_flash_decode(q, k_cache, v_cache, lengths, mesh, *, sm_scale: float | None = None,
                         num_splits: int | None = None, return_lse: bool = False, interpret: bool | None = None):
    """flash_decode with the cache sharded along the sequence over every device of `mesh` (a 2x2 mesh
    for a v5e-4; any shape works). Rule: with S devices in row-major mesh order, device i holds cache
    positions [i * Nmax/S, (i+1) * Nmax/S) of every sequence (Nmax divisible by S). Each device decodes
    only its shard, producing a partial (O, LSE); the partials are all-gathered over the mesh and merged
    exactly. q and lengths are replicated; the result is replicated on every device."""
    _check(q, k_cache, v_cache, lengths)
    axes = tuple(mesh.axis_names)
    devices = mesh.devices.size
    if k_cache.shape[2] % devices:
        raise ValueError(f"sharded_flash_decode: expected Nmax divisible by the {devices} devices, got {k_cache.shape[2]}")
    shard_len = k_cache.shape[2] // devices
    scale = 1.0 / math.sqrt(q.shape[3]) if sm_scale is None else float(sm_scale)
    num_blocks = shard_len // decode_block_k(shard_len)
    splits = default_num_splits(num_blocks) if num_splits is None else int(num_splits)
    mode = kernel_mode(interpret)
    cache_spec = P(None, None, axes, None)

    # A full cache and one new token: every shard sees all of its positions, the same trace-time
    # length on every device. Any other int length becomes an array (each shard's end differs).
    full_shards = isinstance(lengths, (int, np.integer)) and lengths == k_cache.shape[2] and q.shape[2] == 1
    if isinstance(lengths, (int, np.integer)) and not full_shards:
        lengths = jnp.full((q.shape[0],), lengths, jnp.int32)

    def local(q, k_shard, v_shard, lengths):
        shard = lax.axis_index(axes)
        end = shard_len if full_shards else lengths - shard * shard_len  # the queries' end in this shard
        o, lse = _decode(q, k_shard, v_shard, end, scale=scale, num_splits=splits, mode=mode)
        o_all = lax.all_gather(o, axes)  # [devices, B, Hkv, rows, D]: a few KiB per device
        lse_all = lax.all_gather(lse, axes)
        return merge_attention_states(o_all, lse_all, axis=0)

    # Under jit, a cache already laid out as cache_spec is used in place; any other layout is
    # resharded (moved) once on the way in.
    @jax.jit
    def sharded(q, k_cache, v_cache, lengths):
        k_cache, v_cache = (_place(c, mesh, cache_spec) for c in (k_cache, v_cache))
        q, lengths = (_place(x, mesh, P()) for x in (q, lengths))
        return jax.shard_map(local, mesh=mesh, in_specs=(P(), cache_spec, cache_spec, P()), out_specs=(P(), P()),
                             check_vma=False)(q, k_cache, v_cache, lengths)

    if full_shards:
        lengths = jnp.zeros((q.shape[0],), jnp.int32)  # unread: every shard's end is known
    o, lse = sharded(q, k_cache, v_cache, lengths)
    return _finish(o, lse, q, return_lse)
