"""The time of a whole compiled v5e program (a model's training step, prefill or decode step), op by op.

The compiler's static profile simulates every bundle: 190 s for one bf16 8192^3 matmul on this
project's 2-core box, so a model's program cannot be profiled whole. Instead, per op of the compiled
program (a while loop's body counted its trip count times):
- XLA ops (fusions, matmuls, copies): XLA:TPU's own per-op cost model (`window_config`'s estimated
  cycles, present without the profile flag), held to the HBM floor: max(cycles / clock, HBM bytes
  of its operands and results / 819 GB/s). An op without a cost model moves its bytes at 819 GB/s.
  `calibrate()` compares this rule with the profile on one matmul and one memory-bound op: the cost
  model prices HBM at about 660 GB/s where the profile streams at 1-2 TB/s, and a large matmul
  at 88% of peak where the profile says 96% (bf16 8192^3: 9.56M against 8.72M cycles).
- Pallas kernels: not costed here (the cost model has none); each is listed with how many times it
  runs and whether it runs in a forward or a backward, for the caller to price from the kernels'
  own static profiles (pallas_flash.bench.estimate).
- Collectives: the bytes one chip receives (CompiledProgram.collectives' rule) over the ICI
  bandwidth, plus a fixed latency each. One on its own is counted as exposed (an upper bound: XLA
  overlaps some asynchronous ones); one fused into a matmul (XLA:TPU's collective matmuls: FSDP's
  weight gathers) makes that fusion last max(its own time, the transfer's).
An op belongs to attention when its op_name carries the model's "attention" scope.
"""

from __future__ import annotations

import dataclasses
import json
import re

from pallas_flash import v5e
from pallas_flash.hardware import Chip, V5E_ICI_BYTES_PER_S, V5E_ICI_LATENCY_S

_FREE = frozenset({"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "partition-id", "replica-id",
                   "after-all", "opt-barrier", "copy-done", "slice-done", "while", "conditional", "call"})


@dataclasses.dataclass(frozen=True)
class OpCost:
    name: str
    opcode: str
    runs: int  # how many times the op runs in one call of the program
    seconds: float  # one run; 0 for a kernel (priced by the caller)
    bound: str  # "compute", "memory", "ici" or "kernel"
    attention: bool
    backward: bool  # under a transpose (the backward pass), outside a rematerialised forward
    received_bytes: float = 0.0  # collectives, one run


@dataclasses.dataclass
class ProgramCost:
    ops: list[OpCost]

    def seconds(self, *, attention: bool | None = None, bound: str | None = None) -> float:
        return sum(o.runs * o.seconds for o in self.ops if (attention is None or o.attention == attention)
                   and (bound is None or o.bound == bound))

    def kernels(self) -> list[OpCost]:
        return [o for o in self.ops if o.bound == "kernel"]

    def received_bytes(self) -> float:
        return sum(o.runs * o.received_bytes for o in self.ops)

    def collectives(self) -> int:
        return sum(o.runs for o in self.ops if o.received_bytes)


def program_cost(prog: v5e.CompiledProgram, chip: Chip, devices: int) -> ProgramCost:
    comps = v5e.computations(prog.hlo_text)
    ops: list[OpCost] = []
    _walk(comps, "ENTRY", 1, chip, devices, ops)
    return ProgramCost(ops)


def _trip_count(comps, condition: str) -> int:
    """A scan's loop runs while its counter (from 0) is below a constant of its condition."""
    constants = [int(inst.operand_text) for inst in comps.get(condition, [])
                 if inst.opcode == "constant" and re.fullmatch(r"-?\d+", inst.operand_text.strip())]
    if len(constants) != 1:
        raise ValueError(f"program_cost: cannot read the trip count of the loop whose condition is {condition}")
    return constants[0]


def _walk(comps, name: str, runs: int, chip: Chip, devices: int, ops: list[OpCost]):
    by_name = {i.name: i for i in comps[name]}
    for inst in comps[name]:
        if inst.opcode == "while":
            body = re.search(r"body=%([^\s,]+)", inst.attributes).group(1)
            condition = re.search(r"condition=%([^\s,]+)", inst.attributes).group(1)
            _walk(comps, body, runs * _trip_count(comps, condition), chip, devices, ops)
            continue
        op_name = inst.op_name
        attention = "/attention/" in op_name
        backward = "transpose(" in op_name and "rematted_computation" not in op_name
        kind = inst.opcode.removesuffix("-start").removesuffix("-done")
        if kind in v5e.COLLECTIVE_OPCODES:
            received = v5e.received_bytes(inst, by_name, devices)  # None at a -start: counted at its -done
            if received:
                ops.append(OpCost(inst.name, kind, runs, received / V5E_ICI_BYTES_PER_S + V5E_ICI_LATENCY_S, "ici",
                                  attention, backward, received))
            continue
        if inst.custom_call_target == "tpu_custom_call":
            ops.append(OpCost(inst.name, "kernel", runs, 0.0, "kernel", attention, backward))
            continue
        if inst.opcode in _FREE:
            continue
        moved = _hbm_bytes(inst, by_name, comps)
        memory = moved / chip.hbm_bytes_per_s
        cycles = inst.backend_config.get("window_config", {}).get("estimated_cycles")
        compute = int(cycles) / chip.clock_hz if cycles is not None and int(cycles) < 2**62 else 0.0
        # A fusion holding a collective (XLA:TPU fuses a weight's all-gather with the matmul that
        # consumes it, to overlap them) lasts as long as the longer of the two.
        received = _fused_received_bytes(comps, inst, devices)
        ici = received / V5E_ICI_BYTES_PER_S + V5E_ICI_LATENCY_S if received else 0.0
        if compute == 0.0 and memory == 0.0 and ici == 0.0:
            continue
        bound = max((compute, "compute"), (memory, "memory"), (ici, "ici"))[1]
        ops.append(OpCost(inst.name, inst.opcode, runs, max(compute, memory, ici), bound, attention, backward,
                          received))


_PARTIAL_READS = frozenset({"gather", "dynamic-slice", "slice"})


def _hbm_bytes(inst: v5e.Instruction, by_name, comps) -> int:
    """The bytes an op reads and writes in HBM (arrays placed in VMEM left out). A slice or gather
    reads only its result's worth of its operand, inside a fusion too (a scan's fusion that takes
    one layer of the stacked weights, an embedding lookup); an update in place (a scan writing one
    layer's slice of a stacked array) writes only its update."""
    def hbm(arrays):
        return sum(a.tiled_bytes for a in arrays if a.memory_space == 0 and a.dims)

    results = inst.arrays
    operands = [by_name[o].arrays if o in by_name else [] for o in inst.operands]
    if inst.opcode == "copy-start":  # (destination, source, context): the source read, the destination written
        return hbm(results[:2])
    if "dynamic-update-slice" in inst.name or inst.opcode in ("dynamic-update-slice", "scatter"):
        sizes = sorted((hbm(a) for a in operands), reverse=True)
        return 2 * sum(sizes[1:])
    if inst.opcode in ("slice-start", "slice", "dynamic-slice", "gather"):
        return 2 * hbm(results) + sum(sorted((hbm(a) for a in operands), reverse=True)[1:])
    read = [hbm(a) for a in operands]
    called = re.findall(r"calls=%([^\s,]+)", inst.attributes)
    if inst.opcode == "fusion" and called and called[0] in comps:
        for index, partial in _partially_read_parameters(comps[called[0]], comps).items():
            if index < len(read):
                read[index] = min(read[index], partial)
    return hbm(results) + sum(read)


def _partially_read_parameters(body: list[v5e.Instruction], comps) -> dict[int, int]:
    """A fused computation's parameters whose every use slices or gathers them (directly, or in a
    nested fusion that does): parameter index -> the bytes those uses read."""
    params = {i.name: int(i.operand_text) for i in body if i.opcode == "parameter" and i.operand_text.isdigit()}
    users: dict[str, list[tuple[v5e.Instruction, int]]] = {name: [] for name in params}
    for inst in body:
        for position, operand in enumerate(inst.operands):
            if operand in users:
                users[operand].append((inst, position))
    out = {}
    for name, uses in users.items():
        read = 0
        for use, position in uses:
            if use.opcode in _PARTIAL_READS and position == 0:
                read += sum(a.tiled_bytes for a in use.arrays if a.dims)
                continue
            nested = re.findall(r"calls=%([^\s,]+)", use.attributes)
            partial = _partially_read_parameters(comps[nested[0]], comps).get(position) if (
                use.opcode == "fusion" and nested and nested[0] in comps) else None
            if partial is None:
                break
            read += partial
        else:
            if uses:
                out[params[name]] = read
    return out


def _fused_received_bytes(comps, inst: v5e.Instruction, devices: int) -> float:
    called = re.findall(r"calls=%([^\s,]+)", inst.attributes)
    total = 0.0
    for name in called:
        body = comps.get(name, [])
        by_name = {i.name: i for i in body}
        for child in body:
            received = v5e.received_bytes(child, by_name, devices)
            if received is not None:
                total += received
            elif "calls=%" in child.attributes:
                total += _fused_received_bytes(comps, child, devices)
    return total


CALIBRATION = (("matmul bf16 2048^3", "matmul", 2 * 2048**3, 0),
               ("elementwise f32 4096^2 (128 MiB in, 128 MiB out)", "elementwise", 0, 2 * 4096**2 * 4))


def _calibration_program(kind: str) -> v5e.CompiledProgram:
    import jax.numpy as jnp

    if kind == "matmul":
        return v5e.compile_for_v5e(lambda x, y: x @ y, *(v5e.abstract((2048, 2048), jnp.bfloat16),) * 2)
    return v5e.compile_for_v5e(lambda x: jnp.exp(x) * 2 + 1, v5e.abstract((4096, 4096), jnp.float32))


def calibrate(chip: Chip) -> dict:
    """The op rule against the compiler's static profile on one bf16 matmul and one memory-bound
    op (the profile in a child process: libtpu reads its flag once per process)."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        child = subprocess.run([sys.executable, "-m", "pallas_flash.bench.program"], env=v5e.profile_env(directory),
                               capture_output=True, text=True, timeout=600)
    profiled = json.loads(child.stdout.strip().splitlines()[-1]) if child.returncode == 0 else {}
    out = {}
    for label, kind, flops, moved in CALIBRATION:
        seconds = program_cost(_calibration_program(kind), chip, 1).seconds()
        cycles = profiled.get(kind)
        out[label] = {"rule_seconds": seconds, "rule_cycles": round(seconds * chip.clock_hz),
                      "profiled_cycles": cycles, "rule_over_profile": seconds * chip.clock_hz / cycles if cycles else None,
                      "rule_fraction_of_peak_flops": flops / seconds / chip.peak_flops if flops else None,
                      "rule_hbm_gbps": moved / seconds / 1e9 if moved else None,
                      "profile_hbm_gbps": moved / (cycles / chip.clock_hz) / 1e9 if moved and cycles else None}
    return out


if __name__ == "__main__":  # calibrate's child: the profiled cycles of the two programs, as JSON
    print(json.dumps({kind: _calibration_program(kind).estimated_cycles() for _, kind, _, _ in CALIBRATION}))
