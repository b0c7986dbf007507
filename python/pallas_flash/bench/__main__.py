"""pallas-flash-bench: the TPU side of the benchmark suite.

    python -m pallas_flash.bench --target v5e                       # the default sweep, a few minutes
    python -m pallas_flash.bench --seq 32768 --pass fwd --causal on --impl pallas_flash,jax_flash_attention
    python -m pallas_flash.bench --seq 32768 --pass fwd,fwd+bwd --mask causal,window:4096,segments:8,causal+softcap:50
    python -m pallas_flash.bench --seq 32768 --pass fwd,fwd+bwd --mask full,causal+softcap:50 \
        --impl pallas_flash,jax_splash,tokamax --oom-wall off     # against splash and tokamax (pinned)
    python -m pallas_flash.bench --pass decode --context 32768,131072 --mesh 1x1,2x2 --json decode.json
    python -m pallas_flash.bench --impl pallas_flash --pass fwd,fwd+bwd --seq 524288 --causal on \
        --context-parallel all_gather,ring --mesh 2x2                 # one sequence over the 4 chips

--target v5e on a host without a TPU compiles every case for a TPU v5e with the real compiler
(libtpu, deviceless) and reports its static estimate; on a TPU host it also measures wall time (rows say
"source": "measured" and keep the estimate). --target gpu measures jax.nn.dot_product_attention
(cuDNN and XLA) on this host's GPU, priced from the same hardware table, for tokens per dollar.

Columns: Mcycles, the compiler's static estimate (v5e clock 1.503 GHz); time ms = max(cycles / clock,
HBM bytes / 819 GB/s); TFLOP/s and MFU on the FLOPs the mask lets through (4 B H D per visible query-key
pair, x2.5 for a backward) against 197 TFLOP/s; GB/s and %HBM, the program's HBM bytes over that time;
tok/s and tok/s/$ (per dollar-per-hour of the chips used); VMEM MiB, the scoped VMEM the compiler gave
the kernels; spills, the vector spill stores in the kernels' final bundles (register pressure: their
cost is already inside the cycle estimate, so compare times, not spill counts, across kernels);
HBM GiB, the program's HBM in use. --context-parallel adds rows for context_parallel_attention over each
--mesh of several chips (pallas_flash.bench.context_parallel says how they are estimated: per-chip kernel
cycles from single-chip profiles of each step's calls, the bytes each chip receives from the compiled
program, a stated model of the overlap) and, per shape, the faster strategy against a P-th of one chip's
kernel time. Exit status: 0, or 1 when a row errored (--allow-errors: 0),
2 when nothing can run (no TPU compiler for --target v5e, no GPU for --target gpu).
"""

from __future__ import annotations

import os

import glob

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # this process and its compile workers
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
NO_TPU_HERE = not glob.glob("/dev/accel*") and not glob.glob("/dev/vfio/[0-9]*")  # a TPU VM's chips
if NO_TPU_HERE:
    # Without a TPU, libtpu's start-up asks for the host's accelerator type and worker hostnames and
    # prints three warnings and an "INVALID_ARGUMENT ... unexpected worker hostname" line that look
    # like failures; these values (of a v5e-4 host) quiet it and change nothing in the deviceless
    # compile for v5e:2x2 (the same estimates, checked).
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

from pallas_flash import decode as pf_decode  # noqa: E402
from pallas_flash import hardware  # noqa: E402
from pallas_flash.bench import cases, estimate, measure, report  # noqa: E402
from pallas_flash.bench import context_parallel as cp_rows  # noqa: E402

DEFAULT_IMPLS = "pallas_flash,jax_flash_attention,jax_splash,jax_paged_attention,xla_reference"


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _sizes(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        values = []
    if not values or any(v != 0 and v not in pf_decode.PAGE_SIZES for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated 0 or powers of two in 16..512, got {text!r}")
    return values


def _choices(allowed):
    def parse(text: str) -> list[str]:
        values = [x for x in text.split(",") if x]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(allowed)}, got {text!r}")
        return values

    return parse


def _masks(text: str):
    """--mask items as (causal, rules): 'causal' and 'full' set causality; every other rule is causal
    unless 'full' is among its '+' parts."""
    result = []
    for item in filter(None, text.split(",")):
        parts = item.split("+")
        causal = "full" not in parts
        rules = "+".join(p for p in parts if p not in ("causal", "full"))
        try:
            cases.MaskRules.parse(rules)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        result.append((causal, rules))
    return result


def default_jobs() -> int:
    """A profile of a long kernel takes up to ~10 GiB (the simulator's memory grows with the cycles)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        memory = 16 << 30
    return max(1, min(os.cpu_count() or 1, memory // (10 << 30)))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="pallas-flash-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=["v5e", "gpu"], default="v5e")
    parser.add_argument("--impl", type=_choices(cases.ATTENTION_IMPLS + ("jax_paged_attention",) + cases.GPU_IMPLS),
                        default=None, help=f"default {DEFAULT_IMPLS} (v5e; also tokamax), jax_cudnn,jax_xla (gpu)")
    parser.add_argument("--pass", dest="passes", type=_choices(cases.PASSES), default=["fwd", "fwd+bwd", "decode"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads (decode: 8)")
    parser.add_argument("--seq", type=_ints, default=[2048, 4096], help="attention: N (self-attention)")
    parser.add_argument("--dim", type=_ints, default=[128])
    parser.add_argument("--dtype", type=_choices(tuple(cases.DTYPES)), default=["bf16"])
    parser.add_argument("--causal", type=_choices(("on", "off")), default=["on", "off"])
    parser.add_argument("--allow-errors", action="store_true",
                        help="exit 0 even when rows errored (by default an errored row makes the exit status 1)")
    parser.add_argument("--mask", type=_masks, default=None,
                        help="attention masks, one row each (instead of --causal): causal, full, window:W (a causal "
                             "window of W positions), chunk:C (causal chunks), segments:S (S causal packed "
                             "documents), softcap:X; joined by '+' (full+softcap:50: a full mask with the cap); decode: "
                             "window and softcap"),
    parser.add_argument("--context", type=_ints, default=[32768], help="decode: cache positions per sequence")
    parser.add_argument("--query-tokens", type=int, default=1, help="decode: new tokens per sequence (1..16)")
    parser.add_argument("--decode-heads", type=int, default=32, help="decode: query heads (default 32)")
    parser.add_argument("--mesh", type=_choices(("1x1", "2x2")), default=["1x1", "2x2"],
                        help="decode; and the meshes of --context-parallel rows")
    parser.add_argument("--context-parallel", type=_choices(("all_gather", "ring")), default=[],
                        help="also rows of context_parallel_attention by these strategies (pallas_flash, fwd and "
                             "fwd+bwd, causal or full), the sequence split over each --mesh of several chips")
    parser.add_argument("--page-size", type=_sizes, default=[0, 128],
                        help="decode: 0 (a contiguous cache) or a page size, power of two 16..512 (default 0,128)")
    parser.add_argument("--heads-per-row", type=_ints, default=[1],
                        help="decode (pallas_flash): KV heads packed per cache row, e.g. 1,2 (2 at D = 64: a "
                             "[..., 64] cache's rows are padded to 128 lanes in a TPU's HBM; default 1)")
    parser.add_argument("--price-per-chip-hour", type=float, default=None, help="USD; default: the hardware table")
    parser.add_argument("--json", default=None, metavar="FILE")
    parser.add_argument("--plot", default=None, metavar="FILE.png")
    parser.add_argument("--oom-wall", choices=["on", "off"], default="on",
                        help="bisect the longest N at which xla_reference compiles for one chip")
    parser.add_argument("--jobs", type=int, default=default_jobs(),
                        help="parallel profiling workers (default: one per core and per 10 GiB of memory)")
    parser.add_argument("--max-profile-seq", type=int, default=4096,
                        help="longer attention cases are fitted through profiles at 3 shorter lengths")
    parser.add_argument("--repeats", type=int, default=10, help="measured: timed calls per row")
    parser.add_argument("--warmup", type=int, default=2, help="measured: untimed calls first")
    parser.add_argument("--trace", default=None, metavar="DIR", help="measured: a jax.profiler trace per row")
    args = parser.parse_args(argv)
    if not 1 <= args.query_tokens <= 16:
        parser.error(f"--query-tokens: expected 1..16, got {args.query_tokens}")
    if args.kv_heads is not None and (args.kv_heads < 1 or args.heads % args.kv_heads):
        parser.error(f"--kv-heads: expected a divisor of --heads {args.heads}, got {args.kv_heads}")
    if args.decode_heads < 1 or (args.kv_heads and args.decode_heads % args.kv_heads):
        parser.error(f"--decode-heads: expected a multiple of --kv-heads, got {args.decode_heads}")
    if args.impl is None:
        args.impl = DEFAULT_IMPLS.split(",") if args.target == "v5e" else list(cases.GPU_IMPLS)
    return args


def build_cases(args):
    result, skipped = [], []
    for impl in args.impl:
        for pass_ in args.passes:
            if pass_ == "decode":
                kv_heads = args.kv_heads or 8
                grid = [(ctx, mesh, dtype, dim, page, per_row, mask) for ctx in args.context for mesh in args.mesh
                        for dtype in args.dtype for dim in args.dim for page in args.page_size
                        for per_row in args.heads_per_row for mask in (args.mask or [(True, "")])]
                for ctx, mesh, dtype, dim, page, per_row, (causal, mask) in grid:
                    case = cases.Case(impl, pass_, args.batch, args.decode_heads, kv_heads, args.query_tokens, ctx, dim,
                                      dtype, causal, mesh, page, heads_per_row=per_row, mask=mask)
                    (skipped if cases.supported(case) else result).append(case)
                continue
            for case in _attention_grid(args, impl, pass_):
                (skipped if cases.supported(case) else result).append(case)
    return result, skipped


def _attention_grid(args, impl, pass_, **fields):
    """The attention cases of one implementation and pass: dtypes x head dims x masks x lengths."""
    masks = args.mask or [(causal == "on", "") for causal in args.causal]
    for dtype in args.dtype:
        for dim in args.dim:
            for causal, mask in masks:
                for seq in args.seq:
                    yield cases.Case(impl, pass_, args.batch, args.heads, args.kv_heads or args.heads, seq, seq, dim,
                                     dtype, causal, mask=mask, **fields)


def build_context_parallel_cases(args):
    """The attention grid of pallas_flash once per strategy and mesh of several chips (a mask with rules
    beyond causality is skipped, as cases.supported says)."""
    result, skipped = [], []
    for strategy in args.context_parallel:
        for mesh in [m for m in args.mesh if m != "1x1"]:
            for pass_ in [p for p in args.passes if p in ("fwd", "fwd+bwd")]:
                for case in _attention_grid(args, "pallas_flash", pass_, mesh=mesh, context_parallel=strategy):
                    (skipped if cases.supported(case) else result).append(case)
    return result, skipped


def estimate_rows(case_list, chip, estimator):
    results = estimator.run(case_list)
    rows = []
    for result in results:
        case, full, profile = result["case"], result["full"], result["profile"]
        chips = case.devices if case.pass_ == "decode" else 1
        status = full.status if full.status != "ok" else ("ok" if profile.get("status") == "ok" else "error")
        cycles = profile.get("est_cycles")
        if cycles is not None and not profile.get("scaled"):
            cycles *= case.profile_scale  # profiled for part of the batch and KV heads (Case.for_profile)
        cycles = cycles if status == "ok" else None
        # Compiled per device: on a mesh, the traffic of all chips is the per-device figure times chips.
        hbm_bytes = full.hbm_bytes * chips if full.hbm_bytes is not None else None
        time_s, bound = report.estimated_time(cycles, hbm_bytes, chip, chips)
        unestimated = case.impl in estimate.READS_LENGTHS_FROM_SMEM or (
            case.impl in estimate.XLA_COST_MODEL and cycles is None)
        if unestimated and status == "ok" and hbm_bytes:
            time_s, bound = hbm_bytes / (chip.hbm_bytes_per_s * chips), "memory (lower bound)"
        message = full.message or (profile.get("message") if profile.get("status") != "ok" else "")
        if full.copies:
            moved = f"data movement around the kernels: {', '.join(full.copies[:4])}"
            message = f"{message}; {moved}" if message else moved
        rows.append(report.make_row(
            case, chip, status=status, source="estimate", est_cycles=cycles, time_s=time_s, hbm_bytes=hbm_bytes,
            vmem_bytes=full.vmem_bytes, spill_slots=profile.get("spill_slots"),
            bound=bound, hbm_in_use=full.hbm_in_use, needed_bytes=full.needed_bytes, bundles=profile.get("bundles"),
            mxu_busy=profile.get("mxu_busy"), copies=len(full.copies), blocks=result["blocks"], note=result["note"],
            message=message))
    return rows


def measure_rows(case_list, chip, args, estimates):
    """On an attached accelerator: wall time of every case, with the estimate (if any) kept beside it."""
    rows = []
    for i, case in enumerate(case_list):
        print(f"[{i + 1}/{len(case_list)}] measuring {case.impl} {case.pass_} ...", file=sys.stderr, flush=True)
        estimate_row = estimates.get(case)
        try:
            fn, call_args = cases.build(case, cases.Placement(abstract=False, seed=i))
            trace = os.path.join(args.trace, f"row{i}") if args.trace else None
            median, samples = measure.time_call(fn, call_args, warmup=args.warmup, repeats=args.repeats,
                                                trace_dir=trace)
            status, message = "ok", ""
        except Exception as exc:  # an out-of-memory or a rejected shape is a row, not a crash
            median, samples = None, []
            status = "oom" if "RESOURCE_EXHAUSTED" in str(exc) or "out of memory" in str(exc).lower() else "error"
            message = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        rows.append(report.make_row(
            case, chip, status=status, source="measured", est_cycles=estimate_row and estimate_row["est_cycles"],
            time_s=median, hbm_bytes=estimate_row and estimate_row["hbm_bytes"],
            vmem_bytes=estimate_row and estimate_row["vmem_bytes"],
            spill_slots=estimate_row and estimate_row["spill_slots"],
            est_time_s=estimate_row and estimate_row["time_s"], repeats=len(samples), message=message))
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    backend = jax.default_backend()
    if args.target == "gpu":
        if backend != "gpu":
            print(f"pallas-flash-bench: --target gpu needs a GPU; JAX's backend here is {backend!r}", file=sys.stderr)
            return 2
        kind = jax.devices()[0].device_kind
        chip = hardware.gpu_chip(kind)
        if chip is None:
            print(f"pallas-flash-bench: no price or ceiling for {kind!r} in pallas_flash.hardware.GPUS",
                  file=sys.stderr)
            return 2
    else:
        chip = hardware.TPU_V5E
        if backend != "tpu":
            try:
                from pallas_flash import v5e

                v5e.topology()
            except Exception as error:  # noqa: BLE001 - any failure here means no usable TPU compiler
                print("pallas-flash-bench: --target v5e needs the TPU compiler (libtpu) to compile deviceless: "
                      "pip install \"./python[v5e]\" (jax[tpu]==0.10.2, libtpu==0.0.42.1), or run "
                      f"bash scripts/bench.sh; here: {str(error).splitlines()[0] if str(error) else type(error).__name__}",
                      file=sys.stderr)
                return 2
    chip = hardware.with_price(chip, args.price_per_chip_hour)
    case_list, skipped = build_cases(args)
    cp_cases, cp_skipped = build_context_parallel_cases(args)
    skipped += cp_skipped
    measured = args.target == "gpu" or backend == "tpu"
    if args.context_parallel and (args.target != "v5e" or measured or not cp_cases):
        why = "no case it supports" if not cp_cases else "estimated for --target v5e without a TPU only"
        print(f"pallas-flash-bench: --context-parallel: {why}", file=sys.stderr)
        return 2

    print(f"# pallas-flash-bench --target {args.target}: {chip.name}, {chip.peak_flops / 1e12:.0f} TFLOP/s, "
          f"{chip.hbm_bytes_per_s / 1e9:.0f} GB/s, {chip.hbm_capacity / 2**30:.2f} GiB usable, "
          f"${chip.price_per_chip_hour:.2f}/chip-hour ({chip.price_source})")
    if args.target == "v5e":
        source = "measured on this TPU host, estimate kept beside it" if measured else "v5e compiler estimate"
        print(f"# source: {source}"
              f" (libtpu, deviceless compile for {hardware.V5E_TOPOLOGY}; clock {chip.clock_hz / 1e9:.3f} GHz)")
        print(f"# {report.TIME_RULE}.")
        print(f"# {report.ESTIMATE_LIMITS}.")
        print("# hbm_bytes: XLA's cost analysis of the compiled program (a Pallas kernel counts what it declares: "
              "ours every DMA its grid issues, JAX's kernels their operands once), never less than every input and "
              "output once; tok/s/$ = tokens/s per dollar-per-hour")
    if skipped:
        print(f"# skipped (unsupported): {len(skipped)} cases, e.g. {skipped[0].impl} {skipped[0].pass_}")
    sys.stdout.flush()

    rows, estimates, extra = [], {}, {}
    if args.target == "v5e":
        estimator = estimate.Estimator(args.jobs, args.max_profile_seq)
        try:
            rows = estimate_rows(case_list, chip, estimator)
            estimates = dict(zip(case_list, rows))
            if cp_cases:
                cp, scaling = cp_rows.estimate_rows(cp_cases, chip, estimator, log=sys.stderr)
                rows += cp
                extra["context_parallel_scaling"] = scaling
        finally:
            estimator.close()
    if measured:
        rows = measure_rows([c for c in case_list if args.target == "gpu" or estimates[c]["status"] == "ok"],
                            chip, args, estimates)
    report.print_table(rows, sys.stdout)
    for entry in extra.get("context_parallel_scaling", []):
        print(f"\n{cp_rows.describe_scaling(entry)}")

    if args.target == "v5e" and args.oom_wall == "on":
        dtype = args.dtype[0]
        base = cases.Case("xla_reference", "fwd", args.batch, args.heads, args.kv_heads or args.heads, 0, 0,
                          args.dim[0], dtype, True)
        wall = estimate.oom_wall(base)
        ours = []
        for n in ([wall["fails_at"]] if wall["fails_at"] else []) + [262144]:
            full = estimate.compile_full(dataclasses.replace(base, impl="pallas_flash", seq_q=n, seq_k=n))
            ours.append({"seq": n, "status": full.status, "hbm_in_use": full.hbm_in_use})
        extra["oom_wall"] = {"shape": base.key(), "xla_reference": wall, "pallas_flash": ours}
        needed = f" (the compiler: needs {wall['needed_bytes'] / 2**30:.2f} GiB)" if wall.get("needed_bytes") else ""
        print(f"\nOOM wall, one {chip.name} ({chip.hbm_capacity / 2**30:.2f} GiB), B={args.batch} H={args.heads} "
              f"D={args.dim[0]} {dtype} causal forward: xla_reference compiles up to N={wall['fits_up_to']}, "
              f"fails at N={wall['fails_at']}{needed}; pallas_flash: "
              + ", ".join(f"N={o['seq']} {o['status']}"
                          + (f" using {o['hbm_in_use'] / 2**30:.2f} GiB" if o['hbm_in_use'] else "") for o in ours))

    target = chip.as_json() | {"target": args.target, "backend": backend,
                               "source": "measured" if measured else "estimate"}
    if args.json:
        report.write_json(args.json, target, rows, extra | {"time_rule": report.TIME_RULE,
                                                            "limits": report.ESTIMATE_LIMITS})
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        report.plot(args.plot, rows, chip)
        print(f"wrote {args.plot}", file=sys.stderr)
    errored = [r for r in rows if r.get("status") == "error"]
    print(f"# {len(rows)} rows in {time.perf_counter() - start:.0f} s"
          + (f", {len(errored)} errored" if errored else ""), file=sys.stderr)
    if errored:
        for row in errored[:5]:
            print(f"#   error: {row.get('impl')} {row.get('pass')} N={row.get('seq_q')} {row.get('mask', '')}: "
                  f"{str(row.get('message') or row.get('note') or '')[:200]}", file=sys.stderr)
        if not args.allow_errors:
            print("pallas-flash-bench: rows errored (exit status 1; --allow-errors to accept them)", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
