"""The context-parallel rows of pallas-flash-bench (`--context-parallel all_gather,ring --mesh 2x2`).

A row is one sequence's attention, forward or training step, split over every chip of the mesh by
`pf.context_parallel_attention`. The compiler's static profile can neither price collectives nor reach
the kernels a strategy runs inside the branches of a `lax.switch` (which block each chip holds is only
known at run time), so a row is put together from three things the compiler does say:

- Per-chip kernel cycles: every kernel call one chip makes, step by step, as context_parallel lays
  them out (`kernel_steps`), profiled on one chip with the same shapes and blocks (fitted through
  shorter lengths as the single-chip rows are). A step lasts as long as its slowest chip's calls. The
  all-gather's bottom-right causal calls of c queries against k c keys are taken as linear in k,
  cycles(k) = cycles(1) + (k - 1) (cycles(2) - cycles(1)): at fixed blocks a longer key range adds
  only interior tiles, the same number per query block (so 2 profiles stand for 2P).
- The whole step compiled for the mesh: whether it fits (status "oom" otherwise), each chip's HBM in
  use, and the bytes each chip receives by its collectives (`CompiledProgram.collectives`). Not its
  HBM traffic: XLA's cost analysis sums every branch of a switch, of which a chip runs one.
- The modelled time (`modelled_time`): kernels at their estimated cycles, the strategy's own HBM
  passes around them (context_parallel.strategy_costs), and transfers over ICI at
  hardware.V5E_ICI_BYTES_PER_S plus V5E_ICI_LATENCY_S per collective. All-gather: kernels + passes +
  transfers (a kernel waits for its gather). Ring: per step after the first the longer of (the step's
  kernels + passes) and (the block it receives), the rest of its transfers (the layout's exchanges,
  the accumulators' way home) and every collective's latency added unhidden. "hidden" in a row: every
  ring step's overlapped transfer is shorter than its compute. Overlapped are the transfers the
  compiled schedule runs across a step's kernels: the forward's K, V block and the backward's dK, dV
  accumulators (XLA:TPU runs the backward's K, V transfers with no kernel between their start and
  end); the rest of the compiled program's bytes counts as unhidden.

`scaling` compares the faster strategy's modelled time with a quarter (a P-th) of one chip's kernel
time for the whole sequence (profiled, or fitted, even where the single-chip step does not fit).
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp

from pallas_flash import context_parallel, hardware
from pallas_flash.bench import cases, estimate, report


def _call(case: cases.Case, rows: int, keys: int, causal: bool) -> cases.Case:
    """One chip's kernel call of `case`: `rows` queries against `keys` keys (bottom-right causal), as a
    forward case; _Cycles profiles its forward or its backward program."""
    return dataclasses.replace(case, pass_="fwd", seq_q=rows, seq_k=keys, causal=causal, mesh="1x1",
                               context_parallel="", blocks=None)


def kernel_steps(case: cases.Case) -> list[list[list[cases.Case]]]:
    """The kernel calls on every chip (the backward's mirror the forward's): a list of steps, each a
    list of the alternatives different chips run in it, each the calls one chip makes.
    Causal (zigzag, c = N / 2P): the ring's first step is the chip's own halves (c x c and c x 2c,
    causal), every later one a full 2c x c (a lower source block) or c x 2c (a higher one); the
    all-gather's chip i runs its halves against (i + 1) c and (2P - i) c keys. Full: n = N / P per
    chip, the ring P calls of n x n, the all-gather one of n x N."""
    devices, seq = case.devices, case.seq_q
    call = functools.partial(_call, case)
    if not case.causal:
        n = seq // devices
        if case.context_parallel == "ring":
            return [[[call(n, n, False)]] for _ in range(devices)]
        return [[[call(n, seq, False)]]]
    c = seq // (2 * devices)
    if case.context_parallel == "ring":
        return [[[call(c, c, True), call(c, 2 * c, True)]]] + [
            [[call(2 * c, c, False)], [call(c, 2 * c, False)]] for _ in range(devices - 1)]
    return [[[call(c, (i + 1) * c, True), call(c, (2 * devices - i) * c, True)] for i in range(devices)]]


class _Cycles:
    """Per-chip cycles of single-chip calls through the Estimator (shared profiles, fitted lengths)."""

    def __init__(self, estimator: estimate.Estimator):
        self.estimator = estimator
        self._pending: dict = {}

    def submit(self, call: cases.Case, part: str):
        """part: "fwd" (the forward program) or "bwd" (the backward program of a training step)."""
        key = (call, part)
        if key in self._pending:
            return
        if call.causal and call.seq_k > 2 * call.seq_q and call.seq_k % call.seq_q == 0:
            for multiple in (1, 2):  # linear in the key range: module docstring
                self.submit(dataclasses.replace(call, seq_k=multiple * call.seq_q), part)
            self._pending[key] = None
            return
        fixed = cases.fixed_blocks(dataclasses.replace(call, pass_="fwd+bwd" if part == "bwd" else "fwd"))
        profiled = estimate.backward_part(fixed) if part == "bwd" else fixed
        self._pending[key] = self.estimator.profile(profiled)

    def cycles(self, call: cases.Case, part: str) -> float | None:
        resolve = self._pending[(call, part)]
        if resolve is None:
            one, two = (self.cycles(dataclasses.replace(call, seq_k=m * call.seq_q), part) for m in (1, 2))
            if one is None or two is None:
                return None
            return one + (call.seq_k // call.seq_q - 1) * (two - one)
        profile = resolve()
        if profile.get("status") != "ok" or profile.get("est_cycles") is None:
            return None
        return profile["est_cycles"] * call.profile_scale


def _parts(case: cases.Case) -> tuple[str, ...]:
    return ("fwd", "bwd") if case.pass_ == "fwd+bwd" else ("fwd",)


def modelled_time(case: cases.Case, step_cycles: dict[str, list[float]], received_bytes: float,
                  collectives: int, chip: hardware.Chip = hardware.TPU_V5E,
                  ici_bytes_per_s: float = hardware.V5E_ICI_BYTES_PER_S,
                  ici_latency_s: float = hardware.V5E_ICI_LATENCY_S) -> dict:
    """The modelled time of a context-parallel row (module docstring) from each program part's step
    cycles ({"fwd": [...], "bwd": [...]}), the bytes a chip receives and its collectives' count."""
    shape = (case.batch, case.heads, case.seq_q, case.dim)
    kv_shape = (case.batch, case.kv_heads, case.seq_k, case.dim)
    itemsize = jnp.dtype(cases.DTYPES[case.dtype]).itemsize
    costs = context_parallel.strategy_costs(shape, kv_shape, itemsize, case.causal, case.devices, chip=chip,
                                            backward=case.pass_ == "fwd+bwd")[case.context_parallel]
    kernel_s = sum(sum(steps) for steps in step_cycles.values()) / chip.clock_hz
    latency_s = collectives * ici_latency_s
    if case.context_parallel == "all_gather":
        transfer_s = received_bytes / ici_bytes_per_s
        return {"time_s": kernel_s + costs.hbm_s + transfer_s + latency_s, "kernel_s": kernel_s,
                "hbm_s": costs.hbm_s, "transfer_s": transfer_s + latency_s, "hidden": False}
    # Ring: what the compiled schedule overlaps with a step's kernels (forward: the next K, V block;
    # backward: the float32 dK, dV accumulators; XLA:TPU starts and ends the backward's K, V transfer
    # with no kernel between, test_v5e_compile checks both) is hidden; the rest of the bytes is not.
    local = case.seq_q // case.devices
    kv = 2 * case.batch * case.kv_heads * local * case.dim * itemsize
    per_step = {"fwd": kv, "bwd": 2 * case.batch * case.kv_heads * local * case.dim * 4}
    steps = sum(len(s) - 1 for s in step_cycles.values())
    hbm_step = costs.hbm_s / max(steps, 1)
    time_s, hidden, ring_bytes = 0.0, True, 0.0
    for part, cycles in step_cycles.items():
        time_s += cycles[0] / chip.clock_hz
        for step in cycles[1:]:
            compute, transfer = step / chip.clock_hz + hbm_step, per_step[part] / ici_bytes_per_s
            time_s += max(compute, transfer)
            hidden = hidden and transfer <= compute
            ring_bytes += per_step[part]
    rest_s = max(received_bytes - ring_bytes, 0.0) / ici_bytes_per_s
    return {"time_s": time_s + rest_s + latency_s, "kernel_s": kernel_s, "hbm_s": costs.hbm_s,
            "transfer_s": received_bytes / ici_bytes_per_s + latency_s, "hidden": hidden}


def single_chip(case: cases.Case) -> cases.Case:
    """The same attention on one chip (the whole sequence)."""
    return dataclasses.replace(case, mesh="1x1", context_parallel="", blocks=None)


def estimate_rows(case_list: list[cases.Case], chip: hardware.Chip, estimator: estimate.Estimator,
                  log=None) -> tuple[list[dict], list[dict]]:
    """(rows, scaling): a row per context-parallel case, and per shape the faster strategy against a
    P-th of the single-chip kernels' time."""
    profiles = _Cycles(estimator)
    steps = {case: kernel_steps(case) for case in case_list}
    for case in case_list:
        whole = _call(case, case.seq_q, case.seq_k, case.causal)  # the single chip's, for _scaling
        for part in _parts(case):
            for call in [whole] + [call for step in steps[case] for calls in step for call in calls]:
                profiles.submit(call, part)
    rows = []
    for case in case_list:
        full = estimate.compile_full(case)
        if log:
            print(f"  compiled {estimate.describe(case)} context_parallel={case.context_parallel} "
                  f"mesh={case.mesh}: {full.status}", file=log, flush=True)
        step_cycles, note = {}, []
        for part in _parts(case):
            per_step = []
            for step in steps[case]:
                alternatives = [[profiles.cycles(call, part) for call in calls] for calls in step]
                per_step.append(None if any(None in a for a in alternatives) else max(sum(a) for a in alternatives))
            step_cycles[part] = per_step
        profiled = all(None not in s for s in step_cycles.values())
        collectives = full.collectives or []
        received = sum(c.received_bytes for c in collectives)
        # Not modelled where the step does not compile (out of HBM): its collectives are unknown.
        model = modelled_time(case, step_cycles, received, len(collectives), chip) \
            if profiled and full.status == "ok" else {}
        status = full.status if full.status != "ok" else ("ok" if profiled else "error")
        cycles = sum(sum(s) for s in step_cycles.values()) if profiled else None
        note.append(f"{case.context_parallel} over {case.devices} chips, per chip: "
                    + ", ".join(f"{part} {len(s)} step{'s' * (len(s) > 1)}" for part, s in step_cycles.items())
                    + (f"; kernels {model['kernel_s'] * 1e3:.3g} ms, HBM passes {model['hbm_s'] * 1e3:.3g} ms, "
                       f"ICI {received / 2**20:.1f} MiB received in {len(collectives)} collectives "
                       f"({model['transfer_s'] * 1e3:.3g} ms), "
                       + ("the overlapped transfers hidden under the ring's steps" if model["hidden"] else
                          "transfers not hidden" if case.context_parallel == "ring" else
                          "kernels wait for the gather") if model else ""))
        # No HBM traffic: XLA's cost analysis of a program sums every branch of a switch (a 4-way switch
        # of elementwise ops on a 64 MiB array counted 403 MB, one of them 134 MB), and each chip runs one.
        rows.append(report.make_row(
            case, chip, status=status, source="estimate", est_cycles=cycles,
            time_s=model.get("time_s") if status == "ok" else None, hbm_bytes=None,
            vmem_bytes=full.vmem_bytes, hbm_in_use=full.hbm_in_use, needed_bytes=full.needed_bytes,
            bound="model", ici_bytes=received, collectives=len(collectives), transfers_hidden=model.get("hidden"),
            step_cycles=step_cycles, note="; ".join(note), message=full.message))
    return rows, _scaling(case_list, rows, profiles, chip)


def _scaling(case_list, rows, profiles: _Cycles, chip) -> list[dict]:
    result = []
    by_shape: dict = {}
    for case, row in zip(case_list, rows):
        by_shape.setdefault(single_chip(case), []).append(row)
    for one, shape_rows in by_shape.items():
        parts = [profiles.cycles(_call(one, one.seq_q, one.seq_k, one.causal), part) for part in _parts(one)]
        timed = [r for r in shape_rows if r.get("time_s")]
        if None in parts or not timed:
            continue
        single_s = sum(parts) / chip.clock_hz
        best = min(timed, key=lambda r: r["time_s"])
        devices = best["chips"]
        result.append({"shape": one.key(), "single_chip_kernel_s": single_s, "devices": devices,
                       "best": best["context_parallel"], "best_time_s": best["time_s"],
                       "ratio_to_even_split": best["time_s"] / (single_s / devices)})
    return result


def describe_scaling(entry: dict) -> str:
    shape = entry["shape"]
    return (f"context parallel, {shape['pass']} N={shape['seq_q']} H={shape['heads']} D={shape['dim']} "
            f"{shape['mask']}: {entry['best']} {entry['best_time_s'] * 1e3:.4g} ms on {entry['devices']} chips = "
            f"{entry['ratio_to_even_split']:.3f} x a {entry['devices']}-th of one chip's kernels "
            f"({entry['single_chip_kernel_s'] * 1e3:.4g} ms)")
