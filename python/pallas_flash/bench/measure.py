"""Wall-clock timing on a real accelerator (a TPU or GPU attached to this host)."""

from __future__ import annotations

import statistics
import time

import jax


def time_call(fn, args, *, warmup: int = 2, repeats: int = 10, max_time: float = 10.0, trace_dir: str | None = None):
    """Median seconds of `repeats` calls of jax.jit(fn) after `warmup` untimed ones (fewer when they
    would pass `max_time`), each to `block_until_ready`. With trace_dir, one more call is traced with
    jax.profiler. Returns (median_s, samples)."""
    jitted = jax.jit(fn)
    for _ in range(max(1, warmup)):
        jax.block_until_ready(jitted(*args))
    samples = []
    deadline = time.perf_counter() + max_time
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        jax.block_until_ready(jitted(*args))
        samples.append(time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    if trace_dir:
        with jax.profiler.trace(trace_dir):
            jax.block_until_ready(jitted(*args))
    return statistics.median(samples), samples
