"""Tokens per second, and per dollar, of a whole model: the Llama-style decoder of pallas_flash.models
trained (forward, backward, AdamW), prefilled and decoded with each attention implementation.

    python -m pallas_flash.bench.model --target v5e --model llama-1b --pass train,prefill,decode \\
        --attention pallas_flash,jax_flash --json model.json --plot model.png

Targets:
- v5e: the v5e-4 (2x2 mesh), a compiler estimate of the whole compiled program (no TPU is needed):
  XLA's ops by XLA:TPU's cost model held to the HBM floor, collectives by their bytes over the ICI,
  the Pallas kernels by their own static profiles (pallas_flash.bench.program says how; the rule is
  calibrated against the compiler's profile at the start of the run and written to the JSON).
  Training: data parallel over the four chips, weights and Adam state fully sharded (FSDP), one
  sequence a chip by default. Prefill: each chip its own sequences. Decode: each chip its own
  sequences when the batch divides over the chips, else the cache split along the sequence over all
  four (sharded_flash_decode).
- cpu: measured here, with the C++ kernels through the XLA FFI (pallas_flash) against
  jax.nn.dot_product_attention (jax_xla), a few layers of the model's shapes.
- gpu: measured when JAX sees a GPU (jax_cudnn, jax_xla); rows "not measured" otherwise.
attention_share: the attention's part of the step: on the v5e the ops in the model's attention
scope and the kernels; measured, 1 - (the step with attention replaced by O = Q) / (the step).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

PASSES = ("train", "prefill", "decode")
TARGETS = ("v5e", "cpu", "gpu")
# Per target: the models, attentions, lengths (decode: the context) and batches (the whole mesh's)
# a plain run reports.
DEFAULTS = {
    "v5e": {"model": "llama-1b", "attention": "pallas_flash,jax_flash",
            "seq": {"train": (2048, 8192), "prefill": (8192,), "decode": (32768,)},
            "batch": {"train": (4,), "prefill": (4,), "decode": (1, 32)}},
    # Two of llama-1b's layers and a 32000-token vocabulary (its 128256-token head alone is 0.8 TFLOP
    # of a 512-token training step): rows that finish in minutes on two cores.
    "cpu": {"model": "llama-1b:2:32000", "attention": "pallas_flash,jax_xla",
            "seq": {"train": (256,), "prefill": (1024,), "decode": (4096,)},
            "batch": {"train": (1,), "prefill": (1,), "decode": (1, 8)}},
    "gpu": {"model": "llama-1b", "attention": "jax_cudnn,jax_xla",
            "seq": {"train": (2048, 8192), "prefill": (8192,), "decode": (32768,)},
            "batch": {"train": (1,), "prefill": (1,), "decode": (1, 32)}},
}
V5E_DEVICES = 4
PAGE_SIZE = 128


@dataclasses.dataclass(frozen=True)
class ModelCase:
    model: str
    pass_: str
    attention: str
    seq: int  # training or prompt length; decode: the context each new token attends to
    batch: int  # sequences per step over the whole mesh


def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x)
    except ValueError:
        raise SystemExit(f"{name}: expected comma-separated ints, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise SystemExit(f"{name}: expected ints >= 1, got {text!r}")
    return values


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pallas_flash.bench.model", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=TARGETS, default="v5e")
    parser.add_argument("--model", help="comma-separated: llama-1b, llama-8b, tiny; NAME:LAYERS keeps a model's "
                                        "layer shapes with fewer layers (default per target)")
    parser.add_argument("--pass", dest="passes", default=",".join(PASSES), help="train,prefill,decode")
    parser.add_argument("--attention", help="comma-separated implementations (pallas_flash.models.attention; "
                                            "decode: pallas_flash or jax_xla)")
    parser.add_argument("--seq", help="lengths (decode: the context); default per target and pass")
    parser.add_argument("--batch", help="sequences per step over the whole mesh; default per target and pass")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="v5e: kernel profiles at a time")
    parser.add_argument("--price-per-chip-hour", type=float, help="override the price table (USD)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--plot", help="write a PNG of USD per million tokens against length here")
    args = parser.parse_args(argv)
    passes = tuple(p for p in args.passes.split(",") if p)
    bad = [p for p in passes if p not in PASSES]
    if bad or not passes:
        parser.error(f"--pass: expected some of {', '.join(PASSES)}, got {args.passes!r}")
    args.passes = passes
    if args.plot:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            parser.error("--plot: needs matplotlib (pip install 'pallas-flash[models]')")
    return args


def build_cases(args) -> list[ModelCase]:
    from pallas_flash.models import ATTENTION_IMPLS, llama

    defaults = DEFAULTS[args.target]
    models = [m for m in (args.model or defaults["model"]).split(",") if m]
    for m in models:
        try:
            llama.config(m)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
    attentions = [a for a in (args.attention or defaults["attention"]).split(",") if a]
    bad = [a for a in attentions if a not in ATTENTION_IMPLS]
    if bad:
        raise SystemExit(f"--attention: unknown {', '.join(bad)}; expected some of {', '.join(ATTENTION_IMPLS)}")
    out = []
    for model in models:
        for pass_ in args.passes:
            seqs = _ints(args.seq, "--seq") if args.seq else defaults["seq"][pass_]
            batches = _ints(args.batch, "--batch") if args.batch else defaults["batch"][pass_]
            for attention in attentions:
                for seq in seqs:
                    for batch in batches:
                        out.append(ModelCase(model, pass_, attention, seq, batch))
    return out


def skip_reason(case: ModelCase, target: str) -> str | None:
    """Why a case is not run on this target (None: it is)."""
    from pallas_flash.models import llama
    from pallas_flash.models.attention import TPU_ONLY

    if case.pass_ == "decode" and case.attention not in ("pallas_flash", "jax_xla"):
        return "decode runs flash_decode (pallas_flash) or XLA over gathered pages (jax_xla)"
    if target != "v5e" and case.attention in TPU_ONLY:
        return f"{case.attention} is a TPU kernel"
    if target == "v5e" and case.attention == "jax_cudnn":
        return "cuDNN is a GPU library"
    if target == "v5e" and case.attention == "jax_splash":
        return "the compiler's static profile aborts inside libtpu for splash attention (pallas_flash.bench)"
    if target == "v5e" and case.pass_ in ("train", "prefill") and case.batch % V5E_DEVICES:
        return f"data parallel over the {V5E_DEVICES} chips: expected a batch divisible by {V5E_DEVICES}"
    if target == "v5e" and case.pass_ == "decode" and case.attention == "jax_xla" and case.batch % V5E_DEVICES:
        return "jax_xla decode over a cache split along the sequence is not built"
    if case.pass_ != "decode" and case.seq < 2:
        return "a training or prompt length of at least 2"
    c = llama.config(case.model)
    if c.logits_soft_cap is not None and case.attention in ("jax_xla", "jax_cudnn", "jax_flash"):
        return f"{case.attention} takes no logit soft cap ({case.model} caps them at {c.logits_soft_cap:g})"
    if c.window is not None and case.attention == "jax_flash":
        return f"jax_flash takes no window ({case.model}'s is {c.window})"
    return None


# --------------------------------------------------------------------------------------------------
# Derived figures


def finish_row(case: ModelCase, *, target: str, chip_name: str, chips: int, price_per_chip_hour: float,
               peak_flops: float | None, seconds: float | None, attention_seconds: float | None, status: str,
               source: str, hbm_bytes: float | None = None, **extra) -> dict:
    from pallas_flash.models import llama

    c = llama.config(case.model)
    tokens = case.batch * (1 if case.pass_ == "decode" else case.seq)
    if case.pass_ == "decode":
        flops = c.flops(1, case.batch, context=case.seq)
    else:
        flops = c.flops(case.seq, case.batch, backward=case.pass_ == "train")
    row = {"model": case.model, "pass": case.pass_, "attention": case.attention, "seq": case.seq,
           "batch": case.batch, "status": status, "source": source, "target": target, "chip": chip_name,
           "chips": chips, "seconds": seconds, "tokens_per_s": None, "tokens_per_s_per_chip": None, "mfu": None,
           "attention_share": None, "hbm_bytes": hbm_bytes, "usd_per_million_tokens": None,
           "model_flops": flops, "price_per_chip_hour": price_per_chip_hour}
    if seconds:
        row["tokens_per_s"] = tokens / seconds
        row["tokens_per_s_per_chip"] = tokens / seconds / chips
        if peak_flops:
            row["mfu"] = flops / seconds / (peak_flops * chips)
        if attention_seconds is not None:
            row["attention_share"] = attention_seconds / seconds
        row["usd_per_million_tokens"] = price_per_chip_hour * chips / 3600 / row["tokens_per_s"] * 1e6
    row.update(extra)
    return row


def print_rows(rows: list[dict], out=None):
    out = out or sys.stdout
    header = (f"{'model':<14} {'pass':<8} {'attention':<13} {'seq':>6} {'B':>3} {'status':<12} {'step ms':>9} "
              f"{'tok/s':>9} {'tok/s/chip':>10} {'MFU':>5} {'attn':>5} {'HBM GiB':>7} {'$/Mtok':>8}")
    print(header, file=out)
    print("-" * len(header), file=out)
    for r in rows:
        def f(value, spec):
            return "-" if value is None else format(value, spec)
        print(f"{r['model']:<14} {r['pass']:<8} {r['attention']:<13} {r['seq']:>6} {r['batch']:>3} {r['status']:<12} "
              f"{f(r['seconds'] and r['seconds'] * 1e3, '9.2f'):>9} {f(r['tokens_per_s'], '9.4g'):>9} "
              f"{f(r['tokens_per_s_per_chip'], '10.4g'):>10} {f(r['mfu'] and 100 * r['mfu'], '4.0f'):>4}% "
              f"{f(r['attention_share'] and 100 * r['attention_share'], '4.0f'):>4}% "
              f"{f(r['hbm_bytes'] and r['hbm_bytes'] / 2**30, '7.2f'):>7} {f(r['usd_per_million_tokens'], '8.4g'):>8}",
              file=out)
        if r.get("note"):
            print(f"{'':<14}   {r['note']}", file=out)


def plot(path: str, rows: list[dict]):
    """USD per million tokens against length, a line per (target, model, pass, attention)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PASSES), figsize=(6 * len(PASSES), 5))
    for ax, pass_ in zip(axes, PASSES):
        keys = sorted({(r["target"], r["model"], r["attention"], r["batch"]) for r in rows if r["pass"] == pass_})
        for i, key in enumerate(keys):
            points = sorted((r["seq"], r["usd_per_million_tokens"]) for r in rows if r["pass"] == pass_ and
                            (r["target"], r["model"], r["attention"], r["batch"]) == key and r["usd_per_million_tokens"])
            if points:
                ax.plot(*zip(*points), marker="o", color=f"C{i}", label=f"{key[0]} {key[1]} {key[2]} B={key[3]}")
        ax.set(xscale="log", yscale="log", xlabel="context" if pass_ == "decode" else "sequence length",
               ylabel="USD per million tokens", title=pass_)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Running


def main(argv=None) -> int:
    args = parse_args(argv)
    cases = build_cases(args)
    if args.price_per_chip_hour is not None and not args.price_per_chip_hour > 0:
        raise SystemExit(f"--price-per-chip-hour: expected a positive price in USD, got {args.price_per_chip_hour}")
    start = time.perf_counter()
    if args.target == "v5e":
        from pallas_flash.bench import model_v5e

        rows, meta = model_v5e.run(cases, args)
    else:
        from pallas_flash.bench import model_measured

        rows, meta = model_measured.run(cases, args)
    print_rows(rows)
    for line in meta.get("method", []):
        print(f"# {line}")
    print(f"# {len(rows)} rows in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=1, default=str)
            f.write("\n")
    if args.plot:
        plot(args.plot, rows)
    failed = [r for r in rows if r["status"] not in ("ok", "skipped", "not measured", "oom")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
