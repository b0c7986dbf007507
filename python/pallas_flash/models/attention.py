"""The attention a model layer calls, by name: causal self-attention on q [B, H, N, D] and k, v
[B, Hkv, N, D] (GQA), with the model's window and soft cap, returning O [B, H, N, D].

- pallas_flash: this package's flash_attention (Pallas on a TPU, the C++ kernels on a CPU).
- reference: pallas_flash.reference_attention (float32, the scores materialised): the oracle.
- jax_xla, jax_cudnn: jax.nn.dot_product_attention with implementation "xla" / "cudnn" (on its
  [B, N, H, D] layout: a transpose on each side). jax_cudnn needs an NVIDIA GPU; `cpu_fallback`
  swaps it for jax_xla so the GPU path is exercised on a CPU.
- jax_flash: JAX's Pallas TPU flash attention (jax.experimental.pallas.ops.tpu.flash_attention;
  MHA only: K and V are repeated for GQA), TPU only.
- jax_splash: JAX's splash attention (CausalMask or LocalMask), TPU only.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import pallas_flash as pf

ATTENTION_IMPLS = ("pallas_flash", "reference", "jax_xla", "jax_cudnn", "jax_flash", "jax_splash")
TPU_ONLY = ("jax_flash", "jax_splash")


def attention_fn(name: str, *, window: int | None = None, logits_soft_cap: float | None = None,
                 cpu_fallback: bool = False, interpret: bool | None = None, mesh=None):
    """f(q, k, v, window=window) -> O, causal, for the implementation `name` (ATTENTION_IMPLS). window:
    keys at most `window` positions before the query (None: every earlier key); a model whose layers
    differ passes each layer's. interpret: as flash_attention's (False: compiled by Mosaic, what a
    deviceless v5e compile needs). mesh: q, k, v arrive split over all its devices along the batch;
    JAX's TPU kernels (which Mosaic cannot partition) then run per device under shard_map (ours
    partition themselves). An implementation that cannot take the options raises here (for `window`)
    or at the call (for a layer's own)."""

    @functools.cache
    def for_window(w):
        fn = _attention_fn(name, window=w, logits_soft_cap=logits_soft_cap, cpu_fallback=cpu_fallback,
                           interpret=interpret)
        if mesh is None or name not in TPU_ONLY:
            return fn
        batch = P(tuple(mesh.axis_names))
        return jax.shard_map(fn, mesh=mesh, in_specs=(batch, batch, batch), out_specs=batch, check_vma=False)

    for_window(window)

    def attend(q, k, v, window=window):
        return for_window(window)(q, k, v)

    return attend


def _attention_fn(name, *, window, logits_soft_cap, cpu_fallback, interpret):
    if name not in ATTENTION_IMPLS:
        raise ValueError(f"--attention: unknown implementation {name!r}; expected one of {', '.join(ATTENTION_IMPLS)}")
    if name == "jax_cudnn" and cpu_fallback:
        name = "jax_xla"
    if name == "pallas_flash":
        return lambda q, k, v: pf.flash_attention(q, k, v, causal=True, window=None if window is None else (window, 0),
                                                  logits_soft_cap=logits_soft_cap, interpret=interpret)
    if name == "reference":
        mask = pf.Mask(causal=True, window=(window, 0)) if window is not None else None
        return lambda q, k, v: pf.reference_attention(q, k, v, causal=True, mask=mask, logits_soft_cap=logits_soft_cap)
    if name in ("jax_xla", "jax_cudnn"):
        if logits_soft_cap is not None:
            raise ValueError(f"--attention {name}: jax.nn.dot_product_attention takes no logit soft cap")
        local = None if window is None else (window, 0)

        def sdpa(q, k, v):  # [B, H, N, D] -> jax.nn's [B, N, H, D] and back
            o = jax.nn.dot_product_attention(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), is_causal=True,
                                             local_window_size=local, implementation=name.removeprefix("jax_"))
            return o.swapaxes(1, 2)

        return sdpa
    if name == "jax_flash":
        if window is not None or logits_soft_cap is not None:
            raise ValueError("--attention jax_flash: JAX's TPU flash attention takes neither a window nor a soft cap")
        return _jax_flash
    return _splash(window, logits_soft_cap)


def _jax_flash(q, k, v):
    from jax.experimental.pallas.ops.tpu import flash_attention as jfa

    group = q.shape[1] // k.shape[1]
    k, v = (jnp.repeat(x, group, axis=1) for x in (k, v)) if group > 1 else (k, v)
    n = q.shape[2]
    block = min(1024, n)  # the v5e's best of its sweep at N >= 2048 (pallas_flash.bench's jax_flash rows)
    blocks = jfa.BlockSizes(block_q=block, block_k_major=block, block_k=min(512, n), block_b=1,
                            block_q_major_dkv=block, block_k_major_dkv=block, block_k_dkv=block, block_q_dkv=block,
                            block_k_major_dq=block, block_k_dq=block, block_q_dq=block)
    return jfa.flash_attention(q, k, v, causal=True, sm_scale=1.0 / math.sqrt(q.shape[3]), block_sizes=blocks)


def _splash(window, logits_soft_cap):
    def splash_attention(q, k, v):
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

        n = q.shape[2]
        shape = (n, n)
        head_mask = masks.CausalMask(shape) if window is None else masks.LocalMask(shape, window_size=(window, 0),
                                                                                   offset=0)
        bq = min(1024, n)
        blocks = splash.BlockSizes(block_q=bq, block_kv=bq, block_kv_compute=min(512, bq), block_q_dkv=bq,
                                   block_kv_dkv=bq, block_kv_dkv_compute=min(512, bq), block_q_dq=bq, block_kv_dq=bq)
        mha = splash.make_splash_mha(masks.MultiHeadMask([head_mask] * q.shape[1]), block_sizes=blocks, head_shards=1,
                                     q_seq_shards=1, attn_logits_soft_cap=logits_soft_cap)
        group = q.shape[1] // k.shape[1]
        k, v = (jnp.repeat(x, group, axis=1) for x in (k, v)) if group > 1 else (k, v)
        return jax.vmap(mha)(q * jnp.asarray(1.0 / math.sqrt(q.shape[3]), q.dtype), k, v)

    return splash_attention
