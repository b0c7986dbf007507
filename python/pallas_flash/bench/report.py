"""The benchmark's rows: derived figures (time, TFLOP/s, MFU, bytes/s, tokens/s per dollar), the table
printed on stdout, the JSON file and the plot."""

from __future__ import annotations

import json
import math

from pallas_flash.bench.cases import Case
from pallas_flash.hardware import Chip

TIME_RULE = ("time = max(estimated cycles / clock, HBM bytes / HBM bandwidth): the compiler's static "
             "estimate simulates the scheduled bundles of every grid step but moves HBM data at 1-2 TB/s, "
             "not 819 GB/s, so a memory-bound kernel is held to the bandwidth floor")
ESTIMATE_LIMITS = ("not modelled: collectives (the 2x2 decode's all-gather; context-parallel rows model theirs, "
                   "pallas_flash.bench.context_parallel), scalar-prefetch values "
                   "(read as 0: our decode is profiled with its length known at trace time), DMA contention "
                   "beyond the bandwidth floor. Attention cycles are profiled for one KV head's group of one "
                   "sequence and scaled by batch x KV heads; decode is profiled whole")


def make_row(case: Case, chip: Chip, *, status: str, source: str, est_cycles: float | None, time_s: float | None,
             hbm_bytes: float | None, vmem_bytes: int | None = None, spill_slots: int | None = None,
             **extra) -> dict:
    """One JSON row: the case's key, the measurement, and every figure derived from it."""
    chips = case.devices if case.pass_ == "decode" or case.context_parallel else 1
    row = dict(case.key())
    row.update(status=status, source=source, est_cycles=est_cycles, time_s=time_s, tflops=None, mfu=None,
               hbm_bytes=hbm_bytes, hbm_gbps=None, hbm_utilization=None, tokens_per_s=None,
               tokens_per_s_per_dollar=None, vmem_bytes=vmem_bytes, spill_slots=spill_slots, chips=chips)
    if time_s:
        flops = case.flops()
        row["tflops"] = flops / time_s / 1e12
        row["mfu"] = flops / time_s / (chip.peak_flops * chips)
        row["tokens_per_s"] = case.tokens() / time_s
        row["tokens_per_s_per_dollar"] = row["tokens_per_s"] / (chip.price_per_chip_hour * chips)
        if hbm_bytes:
            row["hbm_gbps"] = hbm_bytes / time_s / 1e9
            row["hbm_utilization"] = hbm_bytes / time_s / (chip.hbm_bytes_per_s * chips)
    row.update(extra)
    return row


def estimated_time(cycles: float | None, hbm_bytes: float | None, chip: Chip, chips: int = 1):
    """(time_s, bound) by the report's rule; None when the compiler gave no cycle count."""
    if cycles is None:
        return None, None
    compute = cycles / chip.clock_hz
    memory = (hbm_bytes or 0) / (chip.hbm_bytes_per_s * chips)
    return max(compute, memory), ("memory" if memory > compute else "compute")


def _fmt(value, spec, none="-"):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    return format(value, spec)


def print_table(rows: list[dict], out) -> None:
    header = (f"{'impl':<20} {'pass':<7} {'shape':<40} {'status':<6} {'Mcycles':>8} {'time ms':>9} {'TFLOP/s':>8} "
              f"{'MFU':>5} {'GB/s':>7} {'%HBM':>5} {'tok/s':>10} {'tok/s/$':>9} {'VMEM MiB':>8} {'spills':>6} "
              f"{'HBM GiB':>7}")
    print(header, file=out)
    print("-" * len(header), file=out)
    for r in rows:
        if r["pass"] == "decode":
            page = (f" page={r['page_size']}" if r.get("page_size") else "") + (
                f" {r['heads_per_row']} heads/row" if r.get("heads_per_row") else "")
            rules = (r.get("mask") or "").removeprefix("causal").strip()
            shape = (f"B={r['batch']} ctx={r['context']} T={r['seq_q']} {r['heads']}/{r['kv_heads']} {r['mesh']}{page}"
                     + (f" {rules}" if rules else ""))
        else:
            heads = f"{r['heads']}" if r["heads"] == r["kv_heads"] else f"{r['heads']}/{r['kv_heads']}"
            shape = f"N={r['seq_q']} D={r['dim']} H={heads} {r.get('mask') or ('causal' if r['causal'] else 'full')}"
            if r["seq_q"] != r["seq_k"]:
                shape = (f"Nq={r['seq_q']} Nk={r['seq_k']} D={r['dim']} H={heads} "
                         f"{r.get('mask') or ('causal' if r['causal'] else 'full')}")
            if r.get("context_parallel"):
                shape += f" {r['mesh']} {r['context_parallel']}"
        cycles = r["est_cycles"] / 1e6 if r["est_cycles"] else None
        print(f"{r['impl']:<20} {r['pass']:<7} {shape:<40} {r['status']:<6} {_fmt(cycles, '8.2f'):>8} "
              f"{_fmt(r['time_s'] and r['time_s'] * 1e3, '9.3f'):>9} {_fmt(r['tflops'], '8.1f'):>8} "
              f"{_fmt(r['mfu'] and 100 * r['mfu'], '4.0f'):>4}% {_fmt(r['hbm_gbps'], '7.0f'):>7} "
              f"{_fmt(r['hbm_utilization'] and 100 * r['hbm_utilization'], '4.0f'):>4}% "
              f"{_fmt(r['tokens_per_s'], '10.3g'):>10} {_fmt(r['tokens_per_s_per_dollar'], '9.3g'):>9} "
              f"{_fmt(r['vmem_bytes'] and r['vmem_bytes'] / 2**20, '8.1f'):>8} {_fmt(r['spill_slots'], '6d'):>6} "
              f"{_fmt(r.get('hbm_in_use') and r['hbm_in_use'] / 2**30, '7.2f'):>7}", file=out)
        if r.get("note") or r.get("message"):
            print(f"{'':<20}   {'; '.join(x for x in (r.get('message'), r.get('note')) if x)}", file=out)


def write_json(path: str, target: dict, rows: list[dict], extra: dict) -> None:
    with open(path, "w") as f:
        json.dump({"target": target, "results": rows, **extra}, f, indent=1, default=str)
        f.write("\n")


def plot(path: str, rows: list[dict], chip: Chip) -> None:
    """TFLOP/s against N per implementation and pass (colour: implementation; line: pass and mask),
    and HBM in use against N with the chip's capacity (x: out of memory)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attention = [r for r in rows if r["pass"] != "decode"]
    impls = sorted({r["impl"] for r in attention})
    colour = {impl: f"C{i}" for i, impl in enumerate(impls)}
    style = {("fwd", False): "-", ("fwd", True): "--", ("bwd", False): "-.", ("bwd", True): "-.",
             ("fwd+bwd", False): ":", ("fwd+bwd", True): (0, (3, 1, 1, 1, 1, 1))}
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(15, 6))
    for impl, pass_, causal in sorted({(r["impl"], r["pass"], r["causal"]) for r in attention}):
        points = sorted((r["seq_q"], r) for r in attention
                        if (r["impl"], r["pass"], r["causal"]) == (impl, pass_, causal))
        label = f"{impl} {pass_} {'causal' if causal else 'full'}"
        line = {"color": colour[impl], "linestyle": style[(pass_, causal)], "marker": "o", "label": label}
        ok = [(n, r["tflops"]) for n, r in points if r["tflops"]]
        if ok:
            speed.plot(*zip(*ok), **line)
        if pass_ != "fwd":
            continue
        used = [(n, r["hbm_in_use"] / 2**30) for n, r in points if r.get("hbm_in_use")]
        if used:
            memory.plot(*zip(*used), **line)
        failed = [n for n, r in points if r["status"] == "oom"]
        if failed:
            memory.scatter(failed, [chip.hbm_capacity / 2**30] * len(failed), marker="x", s=80, color=colour[impl],
                           zorder=3)
    speed.axhline(chip.peak_flops / 1e12, color="grey", linestyle="--", label=f"{chip.name} peak")
    speed.set(xscale="log", xlabel="sequence length N", ylabel="TFLOP/s", title="Attention throughput")
    memory.axhline(chip.hbm_capacity / 2**30, color="red", linestyle="--", label=f"{chip.name} HBM")
    memory.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel="HBM in use (GiB)",
               title="Memory, forward (x: out of HBM)")
    for ax in (speed, memory):
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.12), ncol=2)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
