"""pflash against PyTorch's CPU scaled_dot_product_attention on this machine, in one run.

    python3 bench/compare_torch.py [--pflash build/pflash] [--threads N] [--json FILE]

Needs a Python with torch (not one of the project's dependencies: `pip install torch`). For each row,
`pflash bench` (a subprocess, its own median after warm-up) and torch.nn.functional.
scaled_dot_product_attention (median of repeats after warm-up, here) run on the same shape and the
same thread count, one after the other: B=1, H=8, N=4096, D=128 forward in bf16 and fp32 and the bf16
training step (forward + backward), and decode of one token against a 32768-position cache with
Hq=32, Hkv=8 (torch: enable_gqa). Prints the ratios; ratio > 1 means pflash is faster.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F


def _median_seconds(fn, warmup=2, repeats=5, max_time=60.0):
    for _ in range(warmup):
        fn()
    samples, deadline = [], time.perf_counter() + max_time
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    return statistics.median(samples)


def _pflash(binary, threads, args):
    with tempfile.TemporaryDirectory() as work:
        out = os.path.join(work, "rows.json")
        command = [binary, "bench", "--threads", str(threads), "--json", out, *args]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"pflash bench failed: {done.stderr.strip()[:400]}")
        data = json.load(open(out))
        return data["results"][0]["median_s"], data["machine"]


def _torch_attention(dtype, pass_, causal=False):
    gen = torch.Generator().manual_seed(0)
    shape = (1, 8, 4096, 128)
    q, k, v, do = (torch.randn(shape, generator=gen).to(dtype) for _ in range(4))
    if pass_ == "fwd":
        def step():
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        q, k, v = (x.requires_grad_() for x in (q, k, v))

        def step():
            o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            o.backward(do)
            q.grad = k.grad = v.grad = None
    return step


def _torch_decode(dtype, context=32768):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn((1, 32, 1, 128), generator=gen).to(dtype)
    k, v = (torch.randn((1, 8, context, 128), generator=gen).to(dtype) for _ in range(2))

    def step():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pflash", default=os.path.join(os.path.dirname(__file__), "..", "build", "pflash"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads: expected a positive integer, got {args.threads}")
    if not os.path.exists(args.pflash):
        parser.error(f"--pflash: no such binary {args.pflash} (build it: cmake --build build --target pflash_cli)")
    torch.set_num_threads(args.threads)
    attention = ["--impl", "flash", "--heads", "8", "--seq", "4096", "--dim", "128", "--repeats", "5", "--max-time", "30"]
    rows = [
        ("bf16 forward", [*attention, "--dtype", "bf16", "--pass", "fwd"], _torch_attention(torch.bfloat16, "fwd")),
        ("bf16 fwd+bwd", [*attention, "--dtype", "bf16", "--pass", "fwd+bwd"], _torch_attention(torch.bfloat16, "fwd+bwd")),
        ("fp32 forward", [*attention, "--dtype", "fp32", "--pass", "fwd"], _torch_attention(torch.float32, "fwd")),
        ("bf16 decode 32k, Hq=32/Hkv=8", ["--mode", "decode", "--heads", "32", "--kv-heads", "8", "--dim", "128",
                                          "--seq", "32768", "--dtype", "bf16", "--repeats", "20"],
         _torch_decode(torch.bfloat16)),
    ]
    print(f"torch {torch.__version__} (CPU capability {torch.backends.cpu.get_cpu_capability()}), "
          f"{args.threads} threads; pflash: {args.pflash}; measured on this host, median after warm-up")
    results, machine = [], None
    for name, pflash_args, torch_step in rows:
        ours, machine = _pflash(args.pflash, args.threads, pflash_args)
        theirs = _median_seconds(torch_step)
        results.append({"row": name, "pflash_s": ours, "torch_s": theirs, "speedup": theirs / ours})
        print(f"  {name:<30} pflash {ours * 1e3:9.2f} ms   torch SDPA {theirs * 1e3:9.2f} ms   "
              f"pflash {theirs / ours:5.2f}x faster", flush=True)
    print(f"pflash kernels: {machine['isa']} on {machine['cpu']}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"machine": machine, "torch": torch.__version__, "rows": results}, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
