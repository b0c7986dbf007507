"""flash_attention: FlashAttention-2 forward and backward for [B, H, N, D] arrays, with every mask of
pallas_flash.mask (causal, sliding window, chunked, packed segments), logit soft-capping and sinks.

On a TPU the Pallas kernels run (flash_forward.py, flash_backward.py; tiles.py says which tiles they
visit); on the CPU the C++ kernels through the XLA FFI, or the Pallas kernels in TPU interpret mode;
elsewhere the jax.numpy reference. backend.kernel_mode makes that choice, once per call.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from pallas_flash import cpu_kernels
from pallas_flash.attention_vjp import attention_vjp
from pallas_flash.backend import kernel_mode
from pallas_flash.flash_backward import backward
from pallas_flash.flash_forward import forward
from pallas_flash.mask import Mask
from pallas_flash.partition import AutoAxes
from pallas_flash.planner import BlockSizes, plan_block_sizes, round_up
from pallas_flash.reference import reference_attention
from pallas_flash.tiles import Problem, pad_rows

# static: (problem, blocks)
_flash_attention = attention_vjp(
    lambda static, q, k, v, sinks, segment_ids: forward(*static, q, k, v, segment_ids, sinks),
    lambda static, q, k, v, segment_ids, o, lse, do: backward(*static, q, k, v, o, lse, do, segment_ids),
    auto_axes=lambda static: AutoAxes.INTERPRET if static[0].interpret else AutoAxes.WHOLE)


# --------------------------------------------------------------------------------------------------
# Arguments


def _check_inputs(q, k, v, name="flash_attention"):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"{name}: expected q, k, v of rank 4 [B, H, N, D], got ranks {q.ndim}, {k.ndim}, {v.ndim}")
    if k.shape != v.shape:
        raise ValueError(f"{name}: expected k and v of one shape, got {k.shape} and {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{name}: expected k [B, Hkv, Nk, D] with q's B and D, got q {q.shape}, k {k.shape}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{name}: expected Hkv dividing Hq (GQA/MQA), got Hq={q.shape[1]}, Hkv={k.shape[1]}")
    if not 1 <= q.shape[3] <= 256:
        raise ValueError(f"{name}: expected head_dim D in 1..256, got {q.shape[3]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{name}: expected one dtype for q, k, v, got {q.dtype}, {k.dtype}, {v.dtype}")


def window_edges(window, name="flash_attention", argument="window") -> tuple[int | None, int | None]:
    """(left, right) from None, an int (both sides) or a pair; None or a negative edge is unbounded
    only as None: a negative number is an error."""
    if window is None:
        return None, None
    pair = (window, window) if isinstance(window, (int,)) and not isinstance(window, bool) else window
    try:
        left, right = pair
    except (TypeError, ValueError):
        raise ValueError(f"{name}: argument '{argument}': expected None, an int or a pair (left, right), "
                         f"got {window!r}") from None
    for edge in (left, right):
        if edge is not None and (isinstance(edge, bool) or not isinstance(edge, int) or edge < 0):
            raise ValueError(f"{name}: argument '{argument}': expected edges that are ints >= 0 (or None: "
                             f"unbounded), got {window!r}")
    return left, right


def check_variants(name: str, batch: int, heads_q: int, seq_q: int, seq_k: int, *, chunk=None, segment_ids=None,
                   logits_soft_cap=None, sinks=None):
    """The checks every entry point runs on the mask operands and score options; returns the segment
    ids as a pair (q_ids [B, Nq], kv_ids [B, Nk]) of int32, or None."""
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0):
        raise ValueError(f"{name}: argument 'chunk': expected None or an int > 0, got {chunk!r}")
    if logits_soft_cap is not None and not (isinstance(logits_soft_cap, (int, float)) and logits_soft_cap > 0
                                            and math.isfinite(logits_soft_cap)):
        raise ValueError(f"{name}: argument 'logits_soft_cap': expected None or a finite number > 0, "
                         f"got {logits_soft_cap!r}")
    if sinks is not None:
        if getattr(sinks, "shape", None) != (heads_q,) or not jnp.issubdtype(sinks.dtype, jnp.floating):
            raise ValueError(f"{name}: argument 'sinks': expected floats of shape ({heads_q},) (one logit per "
                             f"query head), got {getattr(sinks, 'dtype', type(sinks).__name__)}"
                             f"{list(getattr(sinks, 'shape', ()))}")
    if segment_ids is None:
        return None
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise ValueError(f"{name}: argument 'segment_ids': expected one [B, T] array or a pair (q_ids, kv_ids), "
                             f"got a sequence of {len(segment_ids)}")
        q_ids, kv_ids = segment_ids
    else:
        q_ids = kv_ids = segment_ids
    for what, ids, length in (("q", q_ids, seq_q), ("kv", kv_ids, seq_k)):
        shape = getattr(ids, "shape", None)
        dtype = getattr(ids, "dtype", None)
        if shape != (batch, length) or dtype is None or not jnp.issubdtype(dtype, jnp.integer):
            expected = f"({batch}, {length})"
            raise ValueError(f"{name}: argument 'segment_ids': expected {what} ids of integers, shape {expected}, got "
                             f"{dtype}{list(shape) if shape is not None else type(ids).__name__}")
    return q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32)


# --------------------------------------------------------------------------------------------------
# Alignment


def alignment_padding(q_shape, k_shape, blocks: BlockSizes) -> tuple[tuple[int, int], tuple[int, int]]:
    """((Nq, Nq_aligned), (Nk, Nk_aligned)): the sequence lengths rounded up to whole blocks of every
    kernel (what segment ids are padded to; q, k, v are read in place)."""
    seq_q, seq_k = q_shape[2], k_shape[2]
    nq = round_up(seq_q, math.lcm(blocks.block_q, blocks.block_q_dkv, blocks.block_q_dq))
    nk = round_up(seq_k, math.lcm(blocks.block_k, blocks.block_k_dkv, blocks.block_k_dq))
    return (seq_q, nq), (seq_k, nk)


# --------------------------------------------------------------------------------------------------
# The kernels without the custom_vjp, for callers that compose them (context parallelism)


def attention_kernels(mode: str, q_shape, k_shape, dtype, mask: Mask, scale: float):
    """(forward(q, k, v) -> (O, LSE), backward(q, k, v, o, lse, do) -> (dQ, dK, dV)): the kernels
    flash_attention runs in `mode` (backend.kernel_mode) for arrays of these shapes and this mask, with
    no custom_vjp and no partitioning around them: a caller that composes several calls (and
    collectives between them) inside jax.shard_map runs each shard's kernels itself. The backward
    takes the final O and LSE of the rows (the LSE of every key the rows see, not only this call's)."""
    if mode == "cpu":
        return (lambda q, k, v: cpu_kernels.attention_forward(q, k, v, mask, scale),
                lambda q, k, v, o, lse, do: cpu_kernels.attention_backward(q, k, v, o, lse, do, mask, scale))
    if mode == "reference":
        def reference_forward(q, k, v):
            return reference_attention(q, k, v, sm_scale=scale, return_lse=True, mask=mask)

        def reference_backward(q, k, v, o, lse, do):
            # FlashAttention-2's backward in jax.numpy, from the rows' final O and LSE (a vjp of this
            # call's own output would be the gradient of a softmax over this call's keys alone)
            group = q.shape[1] // k.shape[1]
            f32 = jnp.float32
            keys, values = (jnp.repeat(x.astype(f32), group, axis=1) for x in (k, v))
            visible = jnp.asarray(mask.dense(q.shape[2], k.shape[2]))
            scores = jnp.einsum("bhqd,bhkd->bhqk", q.astype(f32), keys) * scale
            probs = jnp.where(visible, jnp.exp(scores - lse[..., None]), 0.0)
            do = do.astype(f32)
            dv = jnp.einsum("bhqk,bhqd->bhkd", probs, do)
            delta = jnp.sum(do * o.astype(f32), axis=-1, keepdims=True)
            ds = probs * (jnp.einsum("bhqd,bhkd->bhqk", do, values) - delta) * scale
            dq = jnp.einsum("bhqk,bhkd->bhqd", ds, keys)
            dk = jnp.einsum("bhqk,bhqd->bhkd", ds, q.astype(f32))

            def heads_kv(x):  # a group's query heads share one key head: their gradients add
                return x.reshape(x.shape[0], k.shape[1], group, *x.shape[2:]).sum(axis=2)

            return dq.astype(q.dtype), heads_kv(dk).astype(k.dtype), heads_kv(dv).astype(v.dtype)

        return reference_forward, reference_backward
    blocks = plan_block_sizes(q_shape[2], k_shape[2], q_shape[3], dtype, mask=mask)
    problem = Problem(seq_q=q_shape[2], seq_k=k_shape[2], sm_scale=scale, mask=mask, group=q_shape[1] // k_shape[1],
                      interpret=mode == "interpret")
    return (lambda q, k, v: forward(problem, blocks, q, k, v, None, None),
            lambda q, k, v, o, lse, do: backward(problem, blocks, q, k, v, o, lse, do, None))


# --------------------------------------------------------------------------------------------------
# Public entry point


def flash_attention(q, k, v, *, causal: bool = False, window=None, chunk: int | None = None, segment_ids=None,
                    logits_soft_cap: float | None = None, sinks=None, sm_scale: float | None = None,
                    block_sizes: BlockSizes | None = None, return_lse: bool = False, interpret: bool | None = None,
                    mask: Mask | None = None):
    """Exact attention softmax(cap(Q K^T * scale) + mask) V for [B, H, N, D] arrays, differentiable.

    Which keys query i sees (pallas_flash.mask): positions are aligned bottom-right, the last query at
    the last key's position (query i at i + Nk - Nq, key j at j; FlashAttention >= 2.1). Then
    - causal: keys at or before the query's position;
    - window: (left, right) (an int: both): keys within left positions before and right after
      (FlashAttention's window_size; causal caps right at 0; None: unbounded);
    - chunk: keys in the query's own chunk of that many positions (Llama 4);
    - segment_ids: [B, N] int32 (Nq == Nk) or a pair (q_ids [B, Nq], kv_ids [B, Nk]): keys of the
      query's own segment (packed documents);
    - mask: a mask.Mask instead of causal/window/chunk, with its own positions (a view of a longer
      sequence).
    Rows that see no key give 0 and LSE = -inf.
    - logits_soft_cap: cap * tanh(s / cap) on the scaled scores (Gemma 2); sinks: [Hq] logits added
      to each row's softmax denominator (gpt-oss), differentiable; the LSE includes them.
    - sm_scale: default 1/sqrt(D). GQA/MQA: k, v may have Hkv heads, Hkv dividing Hq.
    - block_sizes: default plan_block_sizes(Nq, Nk, D, dtype, mask=..., segments=...) for the v5e
      (longer key blocks where the mask or segment ids bound each row's keys).
    - Alignment: any head_dim and any length are read in place: a length that is not a multiple of
      the blocks ends in a partial block, masked in the kernels (no pad or slice copies).
    - interpret: None runs the compiled kernel on TPU, the C++ CPU kernels on CPU (through the XLA
      FFI; block_sizes, a TPU tiling, does not apply there; backend.use_cpu_kernels("interpret") or
      PALLAS_FLASH_CPU_KERNELS=interpret picks the TPU interpret mode instead), and the reference path
      elsewhere; True/False force interpret mode or compilation.
    Returns O (q's dtype), or (O, LSE [B, Hq, Nq] float32) with return_lse.
    """
    name = "flash_attention"
    _check_inputs(q, k, v, name)
    batch, heads_q, seq_q, dim = q.shape
    heads_kv, seq_k = k.shape[1], k.shape[2]
    left, right = window_edges(window, name)
    segment_ids = check_variants(name, batch, heads_q, seq_q, seq_k, chunk=chunk, segment_ids=segment_ids,
                                 logits_soft_cap=logits_soft_cap, sinks=sinks)
    if mask is None:
        mask = Mask.bottom_right(seq_q, seq_k, causal=causal, window=(left, right), chunk=chunk)
    elif causal or window is not None or chunk is not None:
        raise ValueError(f"{name}: expected either mask or causal/window/chunk, got both")
    scale = 1.0 / math.sqrt(dim) if sm_scale is None else float(sm_scale)
    cap = None if logits_soft_cap is None else float(logits_soft_cap)
    mode = kernel_mode(interpret)
    if mode == "reference":
        return reference_attention(q, k, v, sm_scale=scale, return_lse=return_lse, mask=mask, segment_ids=segment_ids,
                                   logits_soft_cap=cap, sinks=sinks)
    if mode == "cpu":  # the C++ kernels read q, k, v in place at any length: no alignment padding
        if q.dtype not in (jnp.float32, jnp.bfloat16):
            raise ValueError(f"{name}: expected float32 or bfloat16 inputs on CPU, got {q.dtype}")
        o, lse = cpu_kernels.attention(q, k, v, mask, scale, segment_ids=segment_ids, soft_cap=cap, sinks=sinks)
        return (o, lse) if return_lse else o

    blocks = block_sizes or plan_block_sizes(seq_q, seq_k, dim, q.dtype, mask=mask, segments=segment_ids is not None)
    (_, nq), (_, nk) = alignment_padding(q.shape, k.shape, blocks)
    problem = Problem(seq_q=seq_q, seq_k=seq_k, sm_scale=scale, mask=mask, group=heads_q // heads_kv,
                      interpret=mode == "interpret", soft_cap=cap, segments=segment_ids is not None,
                      sinks=sinks is not None)
    # q, k, v are read in place at any length (the kernels' partial last blocks). Segment ids (4 bytes
    # a token) are padded to whole blocks by repeating the last id: their per-block ranges and the
    # id blocks stay those of the real rows.
    if segment_ids is not None:
        segment_ids = (pad_rows(segment_ids[0], nq, 1, "edge"), pad_rows(segment_ids[1], nk, 1, "edge"))
    o, lse = _flash_attention((problem, blocks), q, k, v, sinks, segment_ids)
    return (o, lse) if return_lse else o
