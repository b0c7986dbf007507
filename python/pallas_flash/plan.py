"""Prints the planner's block sizes and VMEM use for the v5e:

    python -m pallas_flash.plan                       # B=1, H=16, D=128, N = 2048, 8192, 32768
    python -m pallas_flash.plan --seq 4096 --dim 64 --dtype float32
    python -m pallas_flash.plan --seq 32768 --causal --window 4096   # a window or chunks: longer key blocks
    python -m pallas_flash.plan --seq 32768 --causal --segments      # packed documents (segment ids)
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp

from pallas_flash.planner import describe_plan


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--window", type=int, default=None, metavar="W",
                        help="a sliding window of W positions on each side (with --causal: before each query)")
    parser.add_argument("--chunk", type=int, default=None, metavar="C", help="chunked attention, chunks of C")
    parser.add_argument("--segments", action="store_true", help="with segment ids (packed documents)")
    args = parser.parse_args(argv)
    for name in ("window", "chunk"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "window" else 1):
            parser.error(f"--{name}: expected an int >= {0 if name == 'window' else 1}, got {value}")
    for seq in args.seq:
        print(describe_plan(args.batch, args.heads, seq, args.dim, jnp.dtype(args.dtype), args.kv_heads, args.causal,
                            args.window, args.chunk, segments=args.segments))


if __name__ == "__main__":
    main()
