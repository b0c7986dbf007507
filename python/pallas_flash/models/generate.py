"""Generation with a paged KV cache: prefill a prompt with causal attention, writing every layer's K
and V into the cache's pages, then a decode loop of append_kv + flash_decode, one token a step.

The cache is one pair of page pools for all layers, [pages, Hkv, page_size, D]: layer l of a
sequence reads the page table's pages plus l x `layer_stride`, so a layer's pages are named by
offsetting one table, and the kernels read the pools in place (no per-layer slice is ever copied).
On a mesh of S devices the pools are split along pages in S equal parts, one a device, in one of
two ways (`PagedCache.split`):
- "batch" (data parallel): device i holds sequences [i * B/S, (i + 1) * B/S) whole, and runs the
  one-device program on them (shard_map): what a batch of several sequences per chip wants.
- "sequence": device i holds positions [i * C/S, (i + 1) * C/S) of every sequence in every layer,
  the layout sharded_flash_decode and sharded_append_kv take: each chip reads a quarter of a long
  context, so one sequence's decode gets four chips' bandwidth (the weights' products run on
  every chip).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import pallas_flash as pf
from pallas_flash.partition import place_on_mesh
from pallas_flash.models import llama


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedCache:
    k: jax.Array  # [pages, Hkv / k, page_size, k * D], every layer's pages (k KV heads a row, often 1)
    v: jax.Array
    page_table: jax.Array  # [B, pages_per_seq] int32: layer 0's pages
    lengths: jax.Array  # [B] int32: positions filled
    layer_stride: int = dataclasses.field(metadata=dict(static=True))  # layer l reads page_table + l * stride
    split: str = dataclasses.field(default="batch", metadata=dict(static=True))  # over a mesh: "batch" or "sequence"

    @property
    def capacity(self) -> int:
        return self.page_table.shape[1] * self.k.shape[2]

    def layer_table(self, layer):
        return self.page_table + layer * self.layer_stride


def cache_page_table(batch: int, pages_per_seq: int, layers: int, devices: int = 1,
                     split: str = "batch") -> tuple[np.ndarray, int]:
    """(layer 0's page table [B, pages_per_seq], layer stride) for `devices` equal parts of the pools.
    "sequence": pools ordered [device, layer, sequence, page], page j of a sequence on device
    j // (pages_per_seq / devices), ids global. "batch": each device's part ordered [sequence, layer,
    page] for its B / devices sequences, ids local to the part (each device runs alone on its part)."""
    if split == "sequence":
        if pages_per_seq % devices:
            raise ValueError(f"init_cache: expected pages per sequence divisible by the {devices} devices, "
                             f"got {pages_per_seq}")
        local = pages_per_seq // devices  # a sequence's pages on one device, one layer
        stride = batch * local
        j = np.arange(pages_per_seq)
        device, within = j // local, j % local
        table = device[None, :] * layers * stride + np.arange(batch)[:, None] * local + within[None, :]
        return table.astype(np.int32), stride
    if split != "batch":
        raise ValueError(f"init_cache: expected split 'batch' or 'sequence', got {split!r}")
    if batch % devices:
        raise ValueError(f"init_cache: expected a batch divisible by the {devices} devices, got {batch}")
    local_seq = np.arange(batch) % (batch // devices)
    table = local_seq[:, None] * layers * pages_per_seq + np.arange(pages_per_seq)[None, :]
    return table.astype(np.int32), pages_per_seq


def init_cache(c: llama.LlamaConfig, batch: int, capacity: int, *, page_size: int = 128, dtype=jnp.bfloat16,
               devices: int = 1, split: str = "batch", heads_per_row: int = 1) -> PagedCache:
    """An empty cache for `batch` sequences of up to `capacity` positions (a multiple of page_size, and
    of page_size x devices for split "sequence"), in `devices` parts split by `split`. heads_per_row:
    KV heads packed side by side in a row (flash_decode's packed layout; decode.packed_heads_per_row
    gives what fills a TPU's 128 lanes: 2 for D = 64, whose rows would otherwise be padded to twice
    their size in HBM)."""
    if heads_per_row < 1 or c.kv_heads % heads_per_row:
        raise ValueError(f"init_cache: expected heads_per_row dividing the {c.kv_heads} KV heads, got {heads_per_row}")
    unit = page_size * (devices if split == "sequence" else 1)
    if capacity % unit:
        raise ValueError(f"init_cache: expected a capacity that is a multiple of {unit}, got {capacity}")
    pages_per_seq = capacity // page_size
    table, stride = cache_page_table(batch, pages_per_seq, c.layers, devices, split)
    shape = (batch * pages_per_seq * c.layers, c.kv_heads // heads_per_row, page_size, c.head_dim * heads_per_row)
    return PagedCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.asarray(table),
                      jnp.zeros((batch,), jnp.int32), stride, split)


def abstract_cache(c: llama.LlamaConfig, batch: int, capacity: int, **options) -> PagedCache:
    """init_cache's result as ShapeDtypeStructs (nothing allocated)."""
    return jax.eval_shape(lambda: init_cache(c, batch, capacity, **options))


def cache_shardings(cache: PagedCache, mesh) -> PagedCache:
    """The cache's shardings on `mesh` by its split, as a PagedCache of NamedShardings."""
    axes = tuple(mesh.axis_names)
    pool = NamedSharding(mesh, P(axes, None, None, None))
    if cache.split == "sequence":
        return PagedCache(pool, pool, NamedSharding(mesh, P(None, axes)), NamedSharding(mesh, P()), cache.layer_stride,
                          "sequence")
    return PagedCache(pool, pool, NamedSharding(mesh, P(axes, None)), NamedSharding(mesh, P(axes)), cache.layer_stride,
                      "batch")


def _per_device(fn, mesh, cache: PagedCache):
    """fn(params, tokens, cache) run per device on its part of a "batch"-split cache and its
    sequences (the tokens split along their batch axis, the weights replicated)."""
    axes = tuple(mesh.axis_names)
    part = P(axes)
    cache_spec = PagedCache(part, part, part, part, cache.layer_stride, "batch")
    in_specs = (P(), part, cache_spec)
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=(part, cache_spec), check_vma=False)

    def run(*args):
        placed = jax.tree.map(lambda spec, x: jax.tree.map(lambda a: place_on_mesh(a, mesh, spec), x), in_specs,
                              args, is_leaf=lambda x: isinstance(x, P))
        return mapped(*placed)

    return run


def prefill(c: llama.LlamaConfig, params: dict, tokens, cache: PagedCache, attention, *, dtype=jnp.bfloat16,
            mesh=None):
    """Runs the prompts tokens [B, N] (every sequence N tokens, into an empty cache) through the model,
    writing each layer's K and V into the cache. Returns (logits of the last position [B, vocab]
    float32, the cache with lengths N). mesh: with a cache split by "batch" (init_cache(devices=...)),
    data parallel, each device its own sequences; by "sequence", the prompt runs on every device and
    each keeps its positions' K and V (sharded_append_kv)."""
    if mesh is not None and cache.split == "batch":
        local = lambda p, t, cache: prefill(c, p, t, cache, attention, dtype=dtype)  # noqa: E731
        return _per_device(local, mesh, cache)(params, tokens, cache)
    append = _append(mesh)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)

    def layer(carry, xs, window):
        x, k_pool, v_pool = carry
        p, index = xs
        q, k, v = llama.project_qkv(c, p, x, positions)
        with jax.named_scope("attention"):
            o = attention(q, k, v, window=window)
        with jax.named_scope("kv_cache"):
            k_pool, v_pool = append(k_pool, v_pool, cache.lengths, cache.layer_table(index), k, v)
        return llama.finish_layer(c, p, x, o), k_pool, v_pool

    x = llama.embed(params, tokens, dtype)
    x, k_pool, v_pool = llama.scan_layers(c, layer, (x, cache.k, cache.v), (params["layers"], jnp.arange(c.layers)))
    logits = llama.head(c, params, x[:, -1])
    return logits, dataclasses.replace(cache, k=k_pool, v=v_pool, lengths=cache.lengths + tokens.shape[1])


DECODE_ATTENTION = ("pallas_flash", "jax_xla", "none")


def _gathered_attention(c: llama.LlamaConfig, q, k_pool, v_pool, lengths, table, window):
    """Decode attention without a paged kernel: the sequence's pages gathered into a contiguous
    [B, Hkv, C, D] copy, then jax.nn.dot_product_attention (XLA) with the positions past each
    length masked: what a model without a paged-attention kernel does."""
    def gather(pool):
        pages = pool[table]  # [B, pages, Hkv / k, page_size, k * D]
        batch, per_seq, rows, page_size, wide = pages.shape
        per_row = wide // c.head_dim  # KV heads packed per row, unpacked by the copy
        pages = pages.reshape(batch, per_seq, rows, page_size, per_row, c.head_dim)
        return pages.transpose(0, 2, 4, 1, 3, 5).reshape(batch, c.kv_heads, per_seq * page_size, c.head_dim)

    if window is not None or c.logits_soft_cap is not None:
        raise ValueError("decode_step: attention 'jax_xla' takes neither a window nor a soft cap")
    k, v = gather(k_pool), gather(v_pool)
    lengths = jnp.broadcast_to(jnp.asarray(lengths, jnp.int32), (q.shape[0],))
    o = jax.nn.dot_product_attention(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2),
                                     key_value_seq_lengths=lengths, implementation="xla")
    return o.swapaxes(1, 2)


def decode_step(c: llama.LlamaConfig, params: dict, token, cache: PagedCache, *, dtype=jnp.bfloat16, mesh=None,
                interpret: bool | None = None, context: int | None = None, attention: str = "pallas_flash"):
    """One generated token per sequence: token [B] int32 at position cache.lengths. Each layer appends
    its K and V (append_kv, or sharded_append_kv on a mesh) and attends over the cache (flash_decode,
    or sharded_flash_decode: each chip its part of the context, merged by log-sum-exp). Returns
    (logits [B, vocab] float32, the cache one position longer). context: the attended length as a
    Python int when every sequence has it (known at trace time: how the v5e compiler's static
    profile must see a decode; None reads cache.lengths). mesh: with a cache split by "batch", each
    device decodes its own sequences; by "sequence", every device its part of each context.
    attention: "pallas_flash" (flash_decode), "jax_xla" (the pages gathered, then XLA attention; not
    with a "sequence" split) or "none" (no attention at all: O = q, to time the rest of the step)."""
    if attention not in DECODE_ATTENTION:
        raise ValueError(f"decode_step: argument 'attention': expected one of {DECODE_ATTENTION}, got {attention!r}")
    if mesh is not None and cache.split == "batch":
        local = lambda p, t, cache: decode_step(c, p, t, cache, dtype=dtype, interpret=interpret,  # noqa: E731
                                                context=context, attention=attention)
        return _per_device(local, mesh, cache)(params, token, cache)
    positions = cache.lengths[:, None]
    new_lengths = cache.lengths + 1
    append = _append(mesh)

    def layer(carry, xs, window):
        x, k_pool, v_pool = carry
        p, index = xs
        q, k, v = llama.project_qkv(c, p, x, positions)
        table = cache.layer_table(index)
        with jax.named_scope("kv_cache"):
            k_pool, v_pool = append(k_pool, v_pool, cache.lengths, table, k, v)
        lengths = new_lengths if context is None else context
        with jax.named_scope("attention"):
            if attention == "none":
                o = q
            elif attention == "jax_xla":
                if mesh is not None:
                    raise ValueError("decode_step: attention 'jax_xla' takes no cache split by 'sequence'")
                o = _gathered_attention(c, q, k_pool, v_pool, lengths, table, window)
            elif mesh is None:
                o = pf.flash_decode(q, k_pool, v_pool, lengths, page_table=table, window=window,
                                    logits_soft_cap=c.logits_soft_cap, interpret=interpret)
            else:
                o = pf.sharded_flash_decode(q, k_pool, v_pool, lengths, mesh, page_table=table, window=window,
                                            logits_soft_cap=c.logits_soft_cap, interpret=interpret)
        return llama.finish_layer(c, p, x, o.astype(x.dtype)), k_pool, v_pool

    x = llama.embed(params, token[:, None], dtype)
    x, k_pool, v_pool = llama.scan_layers(c, layer, (x, cache.k, cache.v), (params["layers"], jnp.arange(c.layers)))
    logits = llama.head(c, params, x[:, 0])
    return logits, dataclasses.replace(cache, k=k_pool, v=v_pool, lengths=new_lengths)


def _append(mesh):
    if mesh is None:
        return pf.append_kv
    return lambda k_pool, v_pool, lengths, table, k, v: pf.sharded_append_kv(k_pool, v_pool, lengths, mesh, table, k, v)


def generate(c: llama.LlamaConfig, params: dict, prompt, steps: int, attention, *, capacity: int | None = None,
             page_size: int = 16, dtype=jnp.bfloat16, mesh=None, split: str = "batch", heads_per_row: int = 1):
    """Greedy generation: prefill `prompt` [B, N], then `steps` decode steps. Returns (tokens [B, steps],
    logits [B, steps, vocab]: the logits each generated token was chosen from). mesh, split: the
    cache's parts (see the module docstring); "sequence" prefills the prompt on one device's
    program on every device and decodes with the sharded kernels. heads_per_row: as in init_cache."""
    devices = 1 if mesh is None else mesh.devices.size
    unit = page_size * (devices if split == "sequence" else 1)
    capacity = capacity or -(-(prompt.shape[1] + steps) // unit) * unit
    cache = init_cache(c, prompt.shape[0], capacity, page_size=page_size, dtype=dtype, devices=devices, split=split,
                       heads_per_row=heads_per_row)
    logits, cache = jax.jit(lambda p, t, cache: prefill(c, p, t, cache, attention, dtype=dtype, mesh=mesh))(
        params, prompt, cache)
    step = jax.jit(lambda p, t, cache: decode_step(c, p, t, cache, dtype=dtype, mesh=mesh), donate_argnums=(2,))
    tokens, all_logits = [], []
    for _ in range(steps):
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        tokens.append(token)
        all_logits.append(logits)
        logits, cache = step(params, token, cache)
    return jnp.stack(tokens, axis=1), jnp.stack(all_logits, axis=1)
