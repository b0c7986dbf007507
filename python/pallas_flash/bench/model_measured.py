"""The model report's measured rows, on the device JAX runs on here (a CPU: the C++ kernels through
the XLA FFI; a GPU: cuDNN and XLA). One device, no mesh. Each step is timed as the median of
repeats after warm-up (bench.measure.time_call), and again with attention replaced by O = Q, in the
same run: the difference is attention's share."""

from __future__ import annotations

import dataclasses
import os
import platform
import sys

import jax
import jax.numpy as jnp

from pallas_flash.bench.measure import time_call
from pallas_flash.bench.model import PAGE_SIZE, ModelCase, finish_row, skip_reason
from pallas_flash.hardware import cpu_chip, gpu_chip, with_price
from pallas_flash.models import attention as attention_impls
from pallas_flash.models import generate, llama, train


def _no_attention(q, k, v, window=None):
    return q


def step_fn(case: ModelCase, attention_name: str | None, cpu_fallback: bool, dtype):
    """(fn, args) of one pass on one device with real (random) weights, products in `dtype`;
    attention_name None: the step without attention (O = Q)."""
    c = llama.config(case.model)
    key = jax.random.PRNGKey(0)
    if case.pass_ != "decode":
        attn = _no_attention if attention_name is None else attention_impls.attention_fn(
            attention_name, window=c.window, logits_soft_cap=c.logits_soft_cap, cpu_fallback=cpu_fallback)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (case.batch, case.seq), 0, c.vocab, jnp.int32)
    if case.pass_ == "train":
        params = llama.init_params(c, key)
        opt_state = train.optimizer().init(params)
        return train.make_train_step(c, attn, dtype=dtype), (params, opt_state, tokens)
    params = llama.init_params(c, key, dtype)
    cache = generate.init_cache(c, case.batch, -(-case.seq // PAGE_SIZE) * PAGE_SIZE, page_size=PAGE_SIZE, dtype=dtype)
    if case.pass_ == "prefill":
        return (lambda p, t, cache: generate.prefill(c, p, t, cache, attn, dtype=dtype)), (params, tokens, cache)
    # Decode: the new token at the last position of a full context (the cache's contents do not
    # change the time).
    cache = dataclasses.replace(cache, lengths=jnp.full((case.batch,), case.seq - 1, jnp.int32))
    decode_attention = "none" if attention_name is None else case.attention
    return (lambda p, t, cache: generate.decode_step(c, p, t, cache, dtype=dtype, attention=decode_attention)), (
        params, tokens[:, 0], cache)


def run(case_list: list[ModelCase], args) -> tuple[list[dict], dict]:
    backend = jax.default_backend()
    device = jax.devices()[0]
    on_gpu = backend == "gpu"
    if args.target == "gpu" and not on_gpu:
        chip = None
    elif on_gpu:
        chip = gpu_chip(device.device_kind)
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        chip = cpu_chip(cores)
    if chip is not None:
        chip = with_price(chip, args.price_per_chip_hour)
    # A CPU multiplies in float32: XLA's CPU bfloat16 products are far slower than its float32 ones.
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    rows = []
    for case in case_list:
        common = dict(target=args.target, chip_name=chip.name if chip else "GPU", chips=1,
                      price_per_chip_hour=chip.price_per_chip_hour if chip else None,
                      peak_flops=chip.peak_flops if chip else None, source=f"measured on {device.device_kind}")
        reason = skip_reason(case, args.target)
        if chip is None:
            rows.append(finish_row(case, seconds=None, attention_seconds=None, status="not measured",
                                   note="no GPU here (jax.default_backend() is " + backend + ")",
                                   **{**common, "source": "not measured"}))
            continue
        if reason:
            rows.append(finish_row(case, seconds=None, attention_seconds=None, status="skipped", note=reason, **common))
            continue
        print(f"  measuring {case} on {device.device_kind}", file=sys.stderr, flush=True)
        fn, step_args = step_fn(case, case.attention, not on_gpu, dtype)
        seconds, _ = time_call(fn, step_args, warmup=1, repeats=3, max_time=60.0)
        fn, step_args = step_fn(case, None, not on_gpu, dtype)
        rest, _ = time_call(fn, step_args, warmup=1, repeats=3, max_time=60.0)
        rows.append(finish_row(case, seconds=seconds, attention_seconds=max(0.0, seconds - rest), status="ok",
                               note=f"without attention {rest * 1e3:.1f} ms", **common))
    meta = {"target": args.target, "backend": backend, "device": device.device_kind, "machine": platform.processor()
            or platform.machine(), "chip": chip.as_json() if chip else None,
            "method": [f"measured on {device.device_kind}: median of up to 3 runs after one warm-up, one device, "
                       f"products in {jnp.dtype(dtype).name}",
                       "attention share: 1 - (the step with O = Q in place of attention) / (the step), same run",
                       "MFU: model FLOPs over the chip's peak (none for a CPU: no ceiling in the price table)"]}
    return rows, meta
