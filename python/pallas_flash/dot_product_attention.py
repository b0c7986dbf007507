"""dot_product_attention: the entry point JAX users know. The signature and meaning of
jax.nn.dot_product_attention ([B, T, N, H] arrays, top-left causal alignment, sequence lengths, local
windows), plus logits_soft_cap, segment_ids and sinks, on the project's kernels.

Where it runs (backend.kernel_mode): the Pallas kernels on a TPU; on the CPU the C++ kernels (or the
Pallas kernels in interpret mode); on a GPU jax.nn.dot_product_attention(implementation="cudnn") for
the options cuDNN takes, else the jax.numpy reference. A dense `bias` or `mask` takes the reference
path everywhere: it materialises the [B, N, T, S] scores (memory and time quadratic in T x S).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_flash.backend import kernel_mode
from pallas_flash.flash_attention import check_variants, flash_attention, window_edges
from pallas_flash.mask import Mask
from pallas_flash.reference import reference_attention

# Segment ids no caller's can equal: the rows and keys past a sequence's length, below and above
# every other id, so that no block's id range (min..max, tiles.segment_block_ranges) holding past
# rows overlaps one holding only past keys: the kernels' grids end at the longest sequence's blocks.
_PAST_QUERIES = jnp.iinfo(jnp.int32).min
_PAST_KEYS = jnp.iinfo(jnp.int32).max


def _check(query, key, value, bias, mask, query_seq_lengths, key_value_seq_lengths):
    name = "dot_product_attention"
    for what, x in (("query", query), ("key", key), ("value", value)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name}: argument '{what}': expected a [B, T, N, H] array (rank 4), got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
    batch, seq_k, heads_kv, dim = key.shape
    if value.shape != key.shape:
        raise ValueError(f"{name}: argument 'value': expected the shape of key {key.shape} [B, S, K, H], "
                         f"got {value.shape}")
    if query.shape[0] != batch or query.shape[3] != dim:
        raise ValueError(f"{name}: argument 'query': expected [B={batch}, T, N, H={dim}] (key's B and H), "
                         f"got {query.shape}")
    if query.shape[2] % heads_kv:
        raise ValueError(f"{name}: argument 'query': expected N heads a multiple of key's K={heads_kv} "
                         f"(GQA/MQA), got N={query.shape[2]}")
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"{name}: expected one dtype for query, key, value, got {query.dtype}, {key.dtype}, "
                         f"{value.dtype}")
    scores_shape = (batch, query.shape[2], query.shape[1], seq_k)
    for what, x in (("bias", bias), ("mask", mask)):
        if x is None:
            continue
        shape = getattr(x, "shape", None)
        if shape is None or len(shape) != 4 or any(s not in (1, t) for s, t in zip(shape, scores_shape)):
            raise ValueError(f"{name}: argument '{what}': expected a 4-D array broadcastable to [B, N, T, S] = "
                             f"{list(scores_shape)}, got {list(shape) if shape is not None else type(x).__name__}")
    if mask is not None and mask.dtype != jnp.bool_:
        raise ValueError(f"{name}: argument 'mask': expected booleans (True: keep), got {mask.dtype}")
    for what, lengths in (("query_seq_lengths", query_seq_lengths), ("key_value_seq_lengths", key_value_seq_lengths)):
        if lengths is not None and (getattr(lengths, "shape", None) != (batch,)
                                    or not jnp.issubdtype(lengths.dtype, jnp.integer)):
            raise ValueError(f"{name}: argument '{what}': expected int32 of shape ({batch},), got "
                             f"{getattr(lengths, 'dtype', type(lengths).__name__)}"
                             f"{list(getattr(lengths, 'shape', ()))}")


def _with_lengths(segment_ids, query_seq_lengths, key_value_seq_lengths, batch, seq_q, seq_k):
    """Segment ids that also hide the rows and keys past each sequence's length: such a row gets an id
    no key has (it sees nothing: O = 0, as jax.nn zeroes it), such a key one no row has."""
    if query_seq_lengths is None and key_value_seq_lengths is None:
        return segment_ids
    q_ids, kv_ids = segment_ids if segment_ids is not None else (jnp.zeros((batch, seq_q), jnp.int32),
                                                                 jnp.zeros((batch, seq_k), jnp.int32))
    if query_seq_lengths is not None:
        rows = jnp.arange(seq_q)[None, :] < query_seq_lengths.astype(jnp.int32)[:, None]
        q_ids = jnp.where(rows, q_ids, _PAST_QUERIES)
    if key_value_seq_lengths is not None:
        keys = jnp.arange(seq_k)[None, :] < key_value_seq_lengths.astype(jnp.int32)[:, None]
        kv_ids = jnp.where(keys, kv_ids, _PAST_KEYS)
    return q_ids, kv_ids


def _cudnn_takes(dtype, logits_soft_cap, segment_ids, sinks, bias, mask, window, is_causal) -> bool:
    """Whether jax.nn.dot_product_attention(implementation="cudnn") takes these options: fp16/bf16, no
    soft cap, segments or sinks, and a window only as a causal left window."""
    if dtype not in (jnp.bfloat16, jnp.float16) or logits_soft_cap is not None or segment_ids is not None:
        return False
    if sinks is not None or bias is not None or mask is not None:
        return False
    return window == (None, None) or (is_causal and window[1] in (None, 0) and window[0] is not None)


def dot_product_attention(query, key, value, bias=None, mask=None, *, scale: float | None = None,
                          is_causal: bool = False, query_seq_lengths=None, key_value_seq_lengths=None,
                          local_window_size=None, logits_soft_cap: float | None = None, segment_ids=None,
                          sinks=None, return_residual: bool = False, interpret: bool | None = None):
    """softmax(cap(Q K^T * scale) + bias + mask) V for [B, T, N, H] arrays, as jax.nn.dot_product_attention.

    - query [B, T, N, H], key and value [B, S, K, H], K dividing N (GQA/MQA).
    - is_causal: query i sees keys j <= i, aligned top-left as in jax.nn (flash_attention's causal is
      aligned bottom-right: j <= i + S - T; the two agree when T == S).
    - query_seq_lengths, key_value_seq_lengths [B] int32: rows past a query length give 0, keys past a
      key length are hidden.
    - local_window_size: (left, right) or an int for both: query i sees keys i - left .. i + right.
    - logits_soft_cap: cap * tanh(s / cap) on the scaled scores (Gemma 2; tokamax's name).
    - segment_ids: [B, T] int32 (T == S), or a pair (q_ids [B, T], kv_ids [B, S]): a query sees keys
      of its own segment (packed documents). The ids -2^31 and 2^31 - 1 are reserved (lengths).
    - sinks: [N] float logits, one per query head, in each row's denominator (gpt-oss); differentiable.
    - bias, mask: dense additive bias and boolean mask broadcastable to [B, N, T, S]: these take the
      materialising reference path (quadratic memory), on every backend.
    - scale: default 1 / sqrt(H).
    A row that sees no key gives 0 (jax.nn's XLA path gives the mean of the values there: its masked
    scores are a large finite number, not -inf). Differentiable in query, key, value, bias and sinks.
    Returns the output [B, T, N, H], and with return_residual also the LSE [B, T, N] (float32).
    """
    name = "dot_product_attention"
    _check(query, key, value, bias, mask, query_seq_lengths, key_value_seq_lengths)
    batch, seq_q, heads_q, dim = query.shape
    seq_k = key.shape[1]
    window = window_edges(local_window_size, name, "local_window_size")
    segment_ids = check_variants(name, batch, heads_q, seq_q, seq_k, segment_ids=segment_ids,
                                 logits_soft_cap=logits_soft_cap, sinks=sinks)
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    geometry = Mask(causal=is_causal, window=window)  # top-left: both views start at position 0
    ids = _with_lengths(segment_ids, query_seq_lengths, key_value_seq_lengths, batch, seq_q, seq_k)

    mode = kernel_mode(interpret)
    if mode == "reference" and _cudnn_takes(query.dtype, logits_soft_cap, segment_ids, sinks, bias, mask, window,
                                            is_causal):
        return jax.nn.dot_product_attention(query, key, value, scale=scale, is_causal=is_causal,
                                            query_seq_lengths=query_seq_lengths,
                                            key_value_seq_lengths=key_value_seq_lengths,
                                            local_window_size=None if window == (None, None) else window,
                                            implementation="cudnn", return_residual=return_residual)

    # The kernels take [B, N, T, H]: XLA transposes the operands and the result (a copy of each in
    # HBM; README, "dot_product_attention's layout").
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (query, key, value))
    if bias is not None or mask is not None:
        o, lse = reference_attention(q, k, v, sm_scale=scale, return_lse=True, mask=geometry, segment_ids=ids,
                                     logits_soft_cap=logits_soft_cap, sinks=sinks, bias=bias, dense_mask=mask)
    else:
        o, lse = flash_attention(q, k, v, mask=geometry, segment_ids=ids, logits_soft_cap=logits_soft_cap,
                                 sinks=sinks, sm_scale=scale, return_lse=True, interpret=interpret)
    out = jnp.swapaxes(o, 1, 2)  # rows past a query length saw nothing: 0, and an LSE of -inf
    return (out, jnp.swapaxes(lse, 1, 2)) if return_residual else out
