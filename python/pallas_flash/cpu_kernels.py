"""The C++ CPU kernels inside JAX: XLA FFI calls into the library's forward, backward, decode and
merge (python/native/xla_ffi.cpp, built into the package by `pip install ./python`).

Each call reads JAX's buffers in place and writes its outputs in place (no copies); it runs on the
library's own OpenMP threads (OMP_NUM_THREADS, or every core), started from the XLA thread that runs
the call, not on XLA's intra-op pool. Argument errors the C++ checks find at run time (a page id
outside the pool under jit, say) raise with the library's message.

vmap: the contiguous calls batch the extra leading dimensions into one kernel call; a paged decode
runs once per mapped element.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_flash.attention_vjp import attention_vjp

LIBRARY_NAME = "libpallas_flash_xla.so"
# The module's handler symbols, registered under the same names as FFI targets.
_TARGETS = ("pallas_flash_attention_forward", "pallas_flash_attention_backward", "pallas_flash_decode",
            "pallas_flash_merge")


def library_path() -> Path | None:
    """The FFI module: $PALLAS_FLASH_XLA_LIBRARY, else the one installed in the package (a wheel's,
    or an editable install's in site-packages), else None."""
    override = os.environ.get("PALLAS_FLASH_XLA_LIBRARY")
    if override:
        return Path(override)
    import pallas_flash

    for directory in pallas_flash.__path__:
        candidate = Path(directory) / LIBRARY_NAME
        if candidate.exists():
            return candidate
    return None


@functools.cache
def _registered() -> str | None:
    """Loads the module and registers its handlers for the CPU platform once; returns why not, or None."""
    path = library_path()
    if path is None:
        return f"{LIBRARY_NAME} is not built (pip install ./python builds it)"
    try:
        library = ctypes.cdll.LoadLibrary(str(path))
    except OSError as error:
        return f"{path} does not load: {error}"
    for target in _TARGETS:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, target)), platform="cpu")
    return None


def available() -> bool:
    return _registered() is None


def unavailable_reason() -> str | None:
    return _registered()


def _require():
    reason = _registered()
    if reason is not None:
        raise RuntimeError(f"pallas_flash: the C++ CPU kernels are unavailable: {reason}")


def _shape(x, dtype=None):
    return jax.ShapeDtypeStruct(x.shape, x.dtype if dtype is None else dtype)


# --------------------------------------------------------------------------------------------------
# Attention: the custom_vjp of attention_vjp, with the C++ forward (saving O and the LSE) and backward.


def _mask_attrs(static):
    """The FFI attributes of an attention call's mask and score options (MaskAttrs in xla_ffi.cpp)."""
    mask, scale, soft_cap, segments, sinks = static
    left, right = mask.window
    return dict(softmax_scale=np.float32(scale), causal=bool(mask.causal),
                window_left=np.int64(-1 if left is None else left), window_right=np.int64(-1 if right is None else right),
                chunk_size=np.int64(mask.chunk or 0), query_offset=np.int64(mask.q_position - mask.k_position),
                logits_soft_cap=np.float32(soft_cap or 0.0), segments=bool(segments), sinks=bool(sinks))


def _mask_operands(q, segment_ids, sinks):
    """Segment ids and sinks as operands (one-element placeholders when absent: the FFI reads them only
    when its attributes say they are there)."""
    if segment_ids is None:
        segment_ids = (jnp.zeros((1,), jnp.int32),) * 2
    sinks = jnp.zeros((1,), jnp.float32) if sinks is None else sinks.astype(jnp.float32)
    return segment_ids[0], segment_ids[1], sinks


def _forward(static, q, k, v, sinks, segment_ids):
    _require()
    lse_shape = jax.ShapeDtypeStruct(q.shape[:-1], jnp.float32)
    # Sinks are one logit per head for the whole call: a vmapped call with sinks maps sequentially.
    call = jax.ffi.ffi_call("pallas_flash_attention_forward", (_shape(q), lse_shape),
                            vmap_method="sequential" if sinks is not None else "broadcast_all")
    return call(q, k, v, *_mask_operands(q, segment_ids, sinks), **_mask_attrs(static))


def _backward(static, q, k, v, segment_ids, o, lse, do):
    _require()
    q_ids, kv_ids, _ = _mask_operands(q, segment_ids, None)
    call = jax.ffi.ffi_call("pallas_flash_attention_backward", (_shape(q), _shape(k), _shape(v)),
                            vmap_method="broadcast_all")
    attrs = _mask_attrs(static) | {"sinks": False}  # the LSE holds them: the backward needs no sinks
    return call(q, k, v, q_ids, kv_ids, o, lse, do.astype(q.dtype), **attrs)


_attention = attention_vjp(_forward, _backward)


def attention(q, k, v, mask, scale: float, *, segment_ids=None, soft_cap=None, sinks=None):
    """(O in q's dtype, LSE [B, Hq, Nq] f32) for [B, H, N, D] q, k, v of one dtype (fp32 or bf16), with
    the mask (mask.Mask: the C++ kernels take its geometry as pflash::AttentionMask), segment ids
    (q_ids [B, Nq], kv_ids [B, Nk] int32), a soft cap and sinks [Hq]."""
    static = (mask, scale, soft_cap, segment_ids is not None, sinks is not None)
    return _attention(static, q, k, v, sinks, segment_ids)


def attention_forward(q, k, v, mask, scale: float):
    """(O, LSE) of the C++ forward alone: no custom_vjp around it (attention_backward is its backward)."""
    return _forward((mask, scale, None, False, False), q, k, v, None, None)


def attention_backward(q, k, v, o, lse, do, mask, scale: float):
    """(dQ, dK, dV) of the C++ backward from the rows' final O and LSE."""
    return _backward((mask, scale, None, False, False), q, k, v, None, o, lse, do)


# --------------------------------------------------------------------------------------------------
# Decode and merge


def decode(q, k_cache, v_cache, seq_lens, positions_after, page_table, *, scale: float, num_splits: int,
           window: int | None = None, chunk: int | None = None, soft_cap: float | None = None, sinks=None):
    """O [B, Hq, T, D] f32 and LSE [B, Hq, T] of q's last T positions over a cache holding seq_lens[b]
    positions of sequence b, with positions_after[b] more held elsewhere (pflash::DecodeParams).
    page_table None: contiguous [B, Hkv, C, D]; else pools [num_pages, Hkv, page_size, D] and page_table
    [B, pages_per_seq]. num_splits 0: the library's choice. window: the positions before each token it
    sees (None: all); chunk, soft_cap, sinks as in pflash::DecodeParams."""
    _require()
    batch = q.shape[0]
    seq_lens = jnp.broadcast_to(jnp.asarray(seq_lens, jnp.int32), (batch,))
    positions_after = jnp.broadcast_to(jnp.asarray(positions_after, jnp.int32), (batch,))
    paged = page_table is not None
    table = page_table.astype(jnp.int32) if paged else jnp.zeros((1,), jnp.int32)
    out = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(q.shape[:-1], jnp.float32))
    # A page id names a page of one pool: a vmapped paged decode cannot fold into one call.
    vmap = "sequential" if paged or sinks is not None else "broadcast_all"
    call = jax.ffi.ffi_call("pallas_flash_decode", out, vmap_method=vmap)
    sink_operand = jnp.zeros((1,), jnp.float32) if sinks is None else sinks.astype(jnp.float32)
    return call(q, k_cache, v_cache, seq_lens, positions_after, table, sink_operand, softmax_scale=np.float32(scale),
                num_splits=np.int32(num_splits), paged=paged, window_left=np.int64(-1 if window is None else window),
                chunk_size=np.int64(chunk or 0), logits_soft_cap=np.float32(soft_cap or 0.0),
                has_sinks=sinks is not None)


def merge(o_parts, lse_parts, axis: int):
    """merge_attention_states' contract (O f32, LSE) with the partials along `axis` of the LSE."""
    _require()
    axis = axis % lse_parts.ndim
    if lse_parts.shape != o_parts.shape[:-1]:
        raise ValueError(f"merge_attention_states: expected lse_parts of shape o_parts.shape[:-1] = "
                         f"{o_parts.shape[:-1]}, got {lse_parts.shape}")
    o_parts = jnp.moveaxis(o_parts, axis, 0)  # free when the partials lead already
    lse_parts = jnp.moveaxis(lse_parts.astype(jnp.float32), axis, 0)
    rows_shape, dim, parts = o_parts.shape[1:-1], o_parts.shape[-1], o_parts.shape[0]
    rows = int(np.prod(rows_shape, dtype=np.int64))
    if o_parts.dtype not in (jnp.float32, jnp.bfloat16):
        o_parts = o_parts.astype(jnp.float32)
    o_flat = o_parts.reshape(1, parts, rows, dim)
    lse_flat = lse_parts.reshape(1, parts, rows)
    out = (jax.ShapeDtypeStruct((1, rows, dim), jnp.float32), jax.ShapeDtypeStruct((1, rows), jnp.float32))
    o, lse = jax.ffi.ffi_call("pallas_flash_merge", out, vmap_method="broadcast_all")(o_flat, lse_flat)
    return o.reshape(*rows_shape, dim), lse.reshape(rows_shape)
