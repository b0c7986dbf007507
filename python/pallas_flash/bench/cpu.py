"""pallas_flash on this host's CPU: the C++ kernels inside JAX (XLA FFI) beside the same kernels run
by the `pflash` CLI, JAX's own CPU attention (XLA) and, for a small shape, the Pallas kernels in
interpret mode. Every figure is measured here, in one run: median of repeats after warm-up.

    python -m pallas_flash.bench.cpu                                  # B=1 H=8 N=4096 D=128 bf16, ~2 min
    python -m pallas_flash.bench.cpu --seq 2048 --dtype fp32 --pflash build/pflash --json cpu.json

Rows: fwd, ours against jax.nn.dot_product_attention (implementation="xla") and `pflash bench` (the
same kernel without JAX around it: the FFI's overhead); fwd+bwd (jax.grad under jit), ours against
jax.grad of the jax.numpy reference and of jax.nn.dot_product_attention; and fwd at the small shape,
ours against interpret mode.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

import pallas_flash as pf
from pallas_flash import cpu_kernels
from pallas_flash.bench import cases, measure

DTYPES = {"bf16": jnp.bfloat16, "fp32": jnp.float32}


def _inputs(batch, heads, seq, dim, dtype, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    return [jax.random.normal(key, (batch, heads, seq, dim), jnp.float32).astype(dtype) for key in keys]


def _loss(attention, causal):
    return lambda q, k, v, do: jnp.sum(attention(q, k, v, causal=causal).astype(jnp.float32) * do.astype(jnp.float32))


def _xla_attention(q, k, v, causal):
    """jax.nn.dot_product_attention takes [B, N, H, D]: transposed outside the timed call."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")


def _pflash_cli(path, batch, heads, seq, dim, dtype, causal, pass_, repeats):
    """The median seconds `pflash bench` reports for the same shape on the same machine, or None."""
    with tempfile.TemporaryDirectory() as work:
        out = os.path.join(work, "pflash.json")
        command = [path, "bench", "--impl", "flash", "--batch", str(batch), "--heads", str(heads), "--seq", str(seq),
                   "--dim", str(dim), "--dtype", dtype, "--causal", "on" if causal else "off", "--pass", pass_,
                   "--repeats", str(repeats), "--max-time", "30", "--json", out]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"pflash bench failed ({done.returncode}): {done.stderr.strip()[:300]}", file=sys.stderr)
            return None
        rows = json.load(open(out))["results"]
        return rows[0]["median_s"] if rows and rows[0]["status"] == "ok" else None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pallas_flash.bench.cpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--causal", choices=("on", "off"), default="off")
    parser.add_argument("--small", default="1,2,256,128", help="B,H,N,D of the interpret-mode comparison")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pflash", default=None, help="the pflash CLI (default: build/pflash, or pflash on PATH)")
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args(argv)
    for name in ("batch", "heads", "seq", "dim", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected a positive integer, got {getattr(args, name)}")
    try:
        args.small = tuple(int(x) for x in args.small.split(","))
        assert len(args.small) == 4 and min(args.small) >= 1
    except (ValueError, AssertionError):
        parser.error(f"--small: expected four positive integers B,H,N,D, got {args.small!r}")
    if args.pflash is None:
        here = os.path.join(os.path.dirname(__file__), "..", "..", "..", "build", "pflash")
        args.pflash = os.path.abspath(here) if os.path.exists(here) else shutil.which("pflash")
    return args


def main(argv=None):
    args = parse_args(argv)
    if jax.default_backend() != "cpu":
        sys.exit("pallas_flash.bench.cpu: run with JAX_PLATFORMS=cpu (this is the CPU benchmark)")
    if not cpu_kernels.available():
        sys.exit(f"pallas_flash.bench.cpu: {cpu_kernels.unavailable_reason()}")
    dtype, causal = DTYPES[args.dtype], args.causal == "on"
    shape = (args.batch, args.heads, args.seq, args.dim)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs; "
          f"C++ kernels: {cpu_kernels.library_path()}; source: measured on this host")
    print(f"shape B={args.batch} H={args.heads} N={args.seq} D={args.dim} {args.dtype} causal={args.causal}; "
          f"median of up to {args.repeats} repeats after warm-up")
    rows = []

    def row(name, pass_, seconds, row_shape=shape, note=""):
        batch, heads, seq, dim = row_shape
        flops = cases.Case("cpu", pass_, batch, heads, heads, seq, seq, dim, args.dtype, causal).flops()
        rate = flops / seconds / 1e12 if seconds and flops else None
        rows.append({"impl": name, "pass": pass_, "shape": list(row_shape), "median_s": seconds, "tflops": rate,
                     "note": note})
        rate_text = f"{rate:8.3f} TFLOP/s" if rate else ""
        print(f"  {name:<34} {pass_:<8} {seconds * 1e3:10.2f} ms {rate_text}  {note}", flush=True)

    q, k, v, do = _inputs(*shape, dtype)
    print("[1/3] forward", flush=True)
    ours = measure.time_call(lambda q, k, v: pf.flash_attention(q, k, v, causal=causal), (q, k, v),
                             repeats=args.repeats, max_time=60)[0]
    row("pallas_flash (C++ via XLA FFI)", "fwd", ours)
    cli = None
    if args.pflash:
        cli = _pflash_cli(args.pflash, *shape, args.dtype, causal, "fwd", args.repeats)
        if cli:
            row("pflash bench (same kernel, no JAX)", "fwd", cli, note=f"FFI / CLI = {ours / cli:.3f}")
    else:
        print("  (no pflash CLI found: build it, or pass --pflash)")
    qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    xla = measure.time_call(lambda q, k, v: _xla_attention(q, k, v, causal), (qt, kt, vt), repeats=args.repeats,
                            max_time=60)[0]
    row("jax.nn.dot_product_attention (xla)", "fwd", xla, note=f"ours {xla / ours:.2f}x faster")

    print("[2/3] forward + backward (jax.grad under jit)", flush=True)
    grad_of = lambda attention: jax.grad(_loss(attention, causal), argnums=(0, 1, 2))
    ours_grad = measure.time_call(grad_of(pf.flash_attention), (q, k, v, do), repeats=args.repeats, max_time=60)[0]
    row("pallas_flash (C++ via XLA FFI)", "fwd+bwd", ours_grad)
    ref_grad = measure.time_call(grad_of(pf.reference_attention), (q, k, v, do), repeats=args.repeats,
                                 max_time=60)[0]
    row("jax.grad of reference_attention", "fwd+bwd", ref_grad, note=f"ours {ref_grad / ours_grad:.2f}x faster")
    xla_loss = lambda q, k, v, do: jnp.sum(_xla_attention(q, k, v, causal).astype(jnp.float32) * do.astype(jnp.float32))
    xla_grad = measure.time_call(jax.grad(xla_loss, argnums=(0, 1, 2)), (qt, kt, vt, jnp.swapaxes(do, 1, 2)),
                                 repeats=args.repeats, max_time=60)[0]
    row("jax.grad of dot_product_attention", "fwd+bwd", xla_grad, note=f"ours {xla_grad / ours_grad:.2f}x faster")

    print(f"[3/3] forward at B,H,N,D = {args.small}", flush=True)
    small = _inputs(*args.small, dtype)[:3]
    ours_small = measure.time_call(lambda q, k, v: pf.flash_attention(q, k, v, causal=causal), small,
                                   repeats=max(args.repeats, 10))[0]
    row("pallas_flash (C++ via XLA FFI)", "fwd", ours_small, args.small)
    interp = measure.time_call(lambda q, k, v: pf.flash_attention(q, k, v, causal=causal, interpret=True), small,
                               warmup=1, repeats=2, max_time=1)[0]
    row("pallas_flash interpret=True (Pallas)", "fwd", interp, args.small, note=f"ours {interp / ours_small:.0f}x faster")

    summary = {"ffi_over_cli": ours / cli if cli else None, "speedup_vs_xla": xla / ours,
               "grad_speedup_vs_reference": ref_grad / ours_grad, "grad_speedup_vs_xla": xla_grad / ours_grad,
               "small_ms": ours_small * 1e3,
               "small_interpret_ms": interp * 1e3}
    print("summary: " + ", ".join(f"{key} {value:.3f}" if isinstance(value, float) else f"{key} n/a"
                                  for key, value in summary.items()))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"machine": {"cpus": os.cpu_count(), "processor": platform.processor()}, "rows": rows,
                       "summary": summary, "source": "measured"}, out, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
