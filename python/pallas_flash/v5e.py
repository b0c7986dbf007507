"""The TPU v5e without a TPU: deviceless ahead-of-time compilation, and what the compiled program says.

libtpu (installed with `jax[tpu]`) runs Mosaic and XLA:TPU in full on a CPU host for a `v5e:2x2`
topology: VMEM and HBM overflows, layouts and copies are the real compiler's. This module compiles a
jitted function for one v5e chip (or the 2x2 mesh) and reads the result:

- `compile_for_v5e(fn, *args)`: a `CompiledProgram` (or raises `CompileError` with `oom` set when the
  compiler ran out of HBM).
- `CompiledProgram.entry`: the entry computation's instructions with their TPU layouts, so tests can
  check that nothing but parameters and the Pallas custom calls touches the inputs and outputs.
- `tiled_bytes(shape)`: an array's size in HBM under its (8, 128) tiles: an (N, 1) float32 column
  takes 128x its logical size.
- `CompiledProgram.kernels`: per Pallas kernel, the scoped VMEM the compiler gave it and, when the
  process was started with the static profile flag (`profile_env()`), its estimated cycles.

The cycle estimate needs `LIBTPU_INIT_ARGS=--xla_jf_dump_static_llo_profile_to=DIR`, which libtpu reads
once per process, before JAX starts: `pallas_flash.bench` runs profiled compiles in worker processes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re

import numpy as np

from pallas_flash.hardware import V5E_TOPOLOGY

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server to ask: this host has no TPU
# Deviceless compiles touch no TPU, so several processes (tests, the benchmark's workers) may load
# libtpu at once; without this the second one fails on libtpu's lock file.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402  (after the environment above)
from jax.experimental import topologies  # noqa: E402

PROFILE_FLAG = "--xla_jf_dump_static_llo_profile_to"
ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
            "f64": 8, "s64": 8, "u64": 8}



class CompileError(RuntimeError):
    """The v5e compiler rejected the program. `oom`: it ran out of HBM (the program does not fit one
    chip); `vmem`: a kernel's blocks or spills do not fit VMEM."""

    def __init__(self, message: str):
        super().__init__(message)
        self.oom = "Ran out of memory on HBM" in message or "exceeds available HBM" in message
        self.vmem = "memory space vmem" in message or "CompileTimeScopedVmemOom" in message

    @property
    def summary(self) -> str:
        for line in str(self).splitlines():
            if "Ran out of memory" in line or "exceeds" in line or "vmem" in line.lower():
                return line.strip()[:300]
        return str(self).strip().splitlines()[0][:300] if str(self).strip() else "compile failed"


@functools.cache
def topology(name: str = V5E_TOPOLOGY):
    """The v5e:2x2 topology: four 'TPU v5 lite' devices, no TPU attached (or another v5e slice,
    e.g. "v5e:4x4": 16 chips of 4 hosts, for multi-host compiles)."""
    return topologies.get_topology_desc(platform="tpu", topology_name=name)


def chip(index: int = 0) -> jax.sharding.Sharding:
    """One v5e chip of the topology, as a sharding for abstract arrays."""
    return jax.sharding.SingleDeviceSharding(topology().devices[index])


def mesh_2x2(axis_names=("x", "y")) -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.array(topology().devices).reshape(2, 2), axis_names)


def abstract(shape, dtype, sharding=None) -> jax.ShapeDtypeStruct:
    """An array of this shape on one v5e chip (or under `sharding`), for lowering without data."""
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding or chip())


# --------------------------------------------------------------------------------------------------
# Shapes and layouts as the compiled HLO prints them: bf16[1,16,4096,128]{3,2,1,0:T(8,128)(2,1)}

_ARRAY = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\](?:\{([^}]*)\})?")


@dataclasses.dataclass(frozen=True)
class ArrayShape:
    dtype: str
    dims: tuple[int, ...]
    minor_to_major: tuple[int, ...] | None
    tile: tuple[int, ...] | None  # the first (outer) tile, e.g. (8, 128)
    memory_space: int  # 0: HBM, 1: VMEM

    @property
    def logical_bytes(self) -> int:
        return int(np.prod(self.dims, dtype=np.int64)) * ITEMSIZE.get(self.dtype, 4)

    @property
    def tiled_bytes(self) -> int:
        """Bytes in memory: the physical dims (major to minor) with the minor ones rounded up to the tile."""
        if not self.dims:
            return ITEMSIZE.get(self.dtype, 4)
        order = self.minor_to_major if self.minor_to_major is not None else tuple(reversed(range(len(self.dims))))
        physical = [self.dims[d] for d in reversed(order)]
        if self.tile:
            for i, t in enumerate(reversed(self.tile)):
                if i < len(physical):
                    physical[-1 - i] = -(-physical[-1 - i] // t) * t
        return int(np.prod(physical, dtype=np.int64)) * ITEMSIZE.get(self.dtype, 4)

    def __str__(self):
        return f"{self.dtype}[{','.join(map(str, self.dims))}]"


def parse_arrays(text: str) -> list[ArrayShape]:
    """Every array shape in an HLO shape string (one, or a tuple's elements)."""
    arrays = []
    for dtype, dims, layout in _ARRAY.findall(text):
        if dtype not in ITEMSIZE:
            continue
        minor_to_major, tile, space = None, None, 0
        if layout:
            order, _, tiling = layout.partition(":")
            minor_to_major = tuple(int(x) for x in order.split(",") if x)
            tiles = re.findall(r"T\(([0-9,]+)\)", tiling)
            tile = tuple(int(x) for x in tiles[0].split(",")) if tiles else None
            space_match = re.search(r"S\((\d+)\)", tiling)
            space = int(space_match.group(1)) if space_match else 0
        arrays.append(ArrayShape(dtype, tuple(int(x) for x in dims.split(",") if x), minor_to_major, tile, space))
    return arrays


def tiled_bytes(shape_text: str) -> int:
    return sum(a.tiled_bytes for a in parse_arrays(shape_text))


# --------------------------------------------------------------------------------------------------
# The compiled program


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    opcode: str
    shape: str  # with layouts
    operands: tuple[str, ...]
    attributes: str  # everything after the operand list
    is_root: bool
    operand_text: str = ""  # the operand list as written (a constant's value, a parameter's index)

    @property
    def arrays(self) -> list[ArrayShape]:
        return parse_arrays(self.shape)

    @property
    def op_name(self) -> str:
        match = re.search(r'op_name="([^"]*)"', self.attributes)
        return match.group(1) if match else ""

    @property
    def custom_call_target(self) -> str | None:
        match = re.search(r'custom_call_target="([^"]+)"', self.attributes)
        return match.group(1) if match else None

    @property
    def backend_config(self) -> dict:
        match = re.search(r"backend_config=(\{.*\})\s*$", self.attributes)
        if not match:
            return {}
        try:
            return json.loads(match.group(1))
        except json.JSONDecodeError:
            return {}


_INSTRUCTION_START = re.compile(r"\s*(ROOT\s+)?%([^\s=]+)\s*=\s*")


def _split_instruction(line: str) -> Instruction | None:
    match = _INSTRUCTION_START.match(line)
    if not match:
        return None
    rest = line[match.end():]
    if rest.startswith("("):  # a tuple shape: up to its closing parenthesis
        depth = 0
        for end, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                break
        shape, rest = rest[: end + 1], rest[end + 1:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    opcode, _, rest = rest.partition("(")
    depth, end = 1, 0
    for end, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            break
    operands = tuple(re.findall(r"%([^\s,)]+)", rest[:end]))
    attributes = rest[end + 1:].lstrip(", ")
    return Instruction(match.group(2), opcode.strip(), shape, operands, attributes, bool(match.group(1)), rest[:end])


def _logical_lines(text: str) -> list[str]:
    """The module's lines with an instruction's continuation lines joined to it: an attribute may hold
    newlines (splash attention's kernel_metadata in frontend_attributes), after which the instruction
    goes on, its braces still open, on lines that may begin like a computation's end ("}}, ...")."""
    lines = []
    for line in text.splitlines():
        if lines and _INSTRUCTION_START.match(lines[-1]) and lines[-1].count("{") > lines[-1].count("}"):
            lines[-1] += " " + line.strip()
        else:
            lines.append(line)
    return lines


def computations(hlo_text: str) -> dict[str, list[Instruction]]:
    """Every computation of the compiled module by name (the entry's under "ENTRY" too), its
    instructions in order."""
    found, name, body = {}, None, []
    for line in _logical_lines(hlo_text):
        header = re.match(r"(ENTRY\s+)?%([^\s(]+)\s*\(.*\{\s*$", line)
        if header and not line.startswith(" "):
            name, body = header.group(2), []
            found[name] = body
            if header.group(1):
                found["ENTRY"] = body
            continue
        if line.startswith("}"):
            name = None
            continue
        if name is not None:
            inst = _split_instruction(line)
            if inst:
                body.append(inst)
    return found


def entry_instructions(hlo_text: str) -> list[Instruction]:
    """The instructions of the compiled module's ENTRY computation, in order."""
    start = hlo_text.index("\nENTRY ")
    body = hlo_text[hlo_text.index("{", start) + 1:]
    instructions = []
    for line in _logical_lines(body):
        if line.startswith("}"):
            break
        inst = _split_instruction(line)
        if inst:
            instructions.append(inst)
    return instructions


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One Pallas (Mosaic) custom call of a compiled program."""

    name: str
    scoped_vmem_bytes: int
    estimated_cycles: int | None  # only in a profiled process
    # Bytes of VMEM that XLA holds while the kernel runs: its operands and results placed whole in
    # VMEM (memory-space assignment does so for arrays that fit, e.g. a forward's O that the
    # backward's first fusion reads) and its prefetches into VMEM in flight across the kernel (e.g.
    # the backward's dO, copied in while the forward runs). The kernel's scoped VMEM may count them,
    # beyond its own blocks and scratch.
    vmem_operand_bytes: int = 0


@dataclasses.dataclass
class CompiledProgram:
    hlo_text: str
    memory: object  # jax's CompiledMemoryStats
    entry: list[Instruction]
    cost: dict  # XLA's cost analysis: "flops", "bytes accessed" (a Pallas kernel counts what it declares)

    @property
    def kernels(self) -> list[Kernel]:
        kernels = []
        by_name = {i.name: i for i in self.entry}
        in_flight = {}  # copy-start name -> VMEM bytes of its destination, until its copy-done
        for inst in self.entry:
            if inst.opcode == "copy-start":
                in_flight[inst.name] = sum(a.tiled_bytes for a in inst.arrays[:1] if a.memory_space == 1)
            elif inst.opcode == "copy-done":
                in_flight.pop(inst.operands[0] if inst.operands else "", None)
            if inst.custom_call_target != "tpu_custom_call":
                continue
            config = inst.backend_config
            vmem = sum(int(c.get("size", 0)) for c in config.get("used_scoped_memory_configs", []))
            cycles = config.get("bundle_analysis_data", {}).get("estimated_cycles")
            arrays = inst.arrays + [a for o in inst.operands if o in by_name for a in by_name[o].arrays]
            held = sum(a.tiled_bytes for a in arrays if a.memory_space == 1 and a.dims) + sum(in_flight.values())
            kernels.append(Kernel(inst.name, vmem, int(cycles) if cycles is not None else None, held))
        return kernels

    def xla_cost_model_cycles(self) -> int | None:
        """XLA:TPU's own per-op cost model, present on its fusions without the profile flag (memory
        time at a realistic bandwidth included); Pallas kernels have none. None if no op has one, or
        if one says it has none (the model writes INT64_MAX, e.g. for fusions over 2^31 elements)."""
        total, found = 0, False
        for inst in self.entry:
            cycles = inst.backend_config.get("window_config", {}).get("estimated_cycles")
            if cycles is not None:
                if int(cycles) >= 2**62:
                    return None
                total, found = total + int(cycles), True
        return total if found else None

    @property
    def compulsory_bytes(self) -> int:
        """Every parameter read once and every output written once: no program moves less."""
        inputs = sum(a.logical_bytes for p in self.parameters for a in p.arrays)
        return inputs + sum(a.logical_bytes for a in self.outputs)

    def estimated_cycles(self) -> int | None:
        """The compiler's static estimate for the whole program: every kernel and XLA op of the entry
        computation (None unless the process was started with the profile flag)."""
        total, found = 0, False
        for inst in self.entry:
            config = inst.backend_config
            cycles = config.get("bundle_analysis_data", {}).get("estimated_cycles")
            if cycles is not None:
                total, found = total + int(cycles), True
        return total if found else None

    @property
    def parameters(self) -> list[Instruction]:
        return [i for i in self.entry if i.opcode == "parameter"]

    @property
    def outputs(self) -> list[ArrayShape]:
        """The program's results with their HBM layouts (the right side of the entry computation layout)."""
        start = self.hlo_text.index("entry_computation_layout={") + len("entry_computation_layout={")
        depth, end = 1, start
        for end in range(start, len(self.hlo_text)):
            depth += self.hlo_text[end] == "{"
            depth -= self.hlo_text[end] == "}"
            if depth == 0:
                break
        return parse_arrays(self.hlo_text[start:end].split(")->", 1)[1])

    @property
    def hbm_bytes_in_use(self) -> int:
        m = self.memory
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)

    def data_movement(self) -> list[Instruction]:
        """Instructions that copy, pad, slice, transpose or relayout data: what a program made of
        Pallas kernels on its inputs as they are should not contain. XLA's prefetches of an array
        into VMEM (copy-start/copy-done to the same layout in memory space 1, memory-space
        assignment) are not counted: they move no data through a new layout, and XLA alone decides them."""
        moved = []
        for inst in self.entry:
            name = inst.name.split(".")[0]
            if inst.opcode in ("copy-start", "copy-done") and self._is_prefetch(inst):
                continue
            if inst.opcode in _MOVING_OPCODES or (inst.opcode == "fusion" and any(w in name for w in _MOVING_WORDS)):
                moved.append(inst)
        return moved

    def collectives(self, devices: int) -> list[Collective]:
        """Every collective of the program, in any computation (a ring's steps sit in the entry, the
        branches of a switch in their own), with the bytes one device receives by the usual ring
        algorithms over `devices` devices: a permute its operand, an all-gather (P-1)/P of its result,
        a reduce-scatter (P-1)/P of its operand, an all-reduce 2 (P-1)/P of it. An asynchronous one is
        counted once, at its -done (whose shape is the result)."""
        found = []
        by_name = {}
        for line in self.hlo_text.splitlines():
            inst = _split_instruction(line)
            if inst is None:
                continue
            by_name[inst.name] = inst
            received = received_bytes(inst, by_name, devices)
            if received is not None:
                found.append(Collective(inst.opcode.removesuffix("-done"), inst.name, received))
        return found

    @staticmethod
    def _is_prefetch(inst: Instruction) -> bool:
        arrays = [a for a in inst.arrays if a.dims]  # copy-start's tuple also holds a u32[] context
        return bool(arrays) and all(a.memory_space in (0, 1) for a in arrays) and len(
            {(a.dtype, a.dims, a.minor_to_major, a.tile) for a in arrays}) == 1


def _attribute(attributes: str, name: str) -> str:
    """The text of `name={...}` (balanced braces) in an instruction's attributes, or ""."""
    start = attributes.find(name + "={")
    if start < 0:
        return ""
    depth = 0
    for end in range(start + len(name) + 1, len(attributes)):
        depth += attributes[end] == "{"
        depth -= attributes[end] == "}"
        if depth == 0:
            return attributes[start:end + 1]
    return attributes[start:]


@dataclasses.dataclass(frozen=True)
class Collective:
    opcode: str  # without -start/-done
    name: str
    received_bytes: float  # per device (CompiledProgram.collectives)


_COLLECTIVE_SHARE = {"collective-permute": lambda p: 1.0, "all-gather": lambda p: (p - 1) / p,
                     "reduce-scatter": lambda p: (p - 1) / p, "all-reduce": lambda p: 2 * (p - 1) / p,
                     "all-to-all": lambda p: (p - 1) / p}
COLLECTIVE_OPCODES = frozenset(_COLLECTIVE_SHARE)  # each also as -start / -done


def received_bytes(inst: Instruction, by_name: dict, devices: int) -> float | None:
    """The bytes one of `devices` devices receives in the collective `inst` (CompiledProgram.collectives'
    rule; by_name: the instructions before it, to find an asynchronous one's -start). None where
    nothing is counted: not a collective, the -start of an asynchronous one (counted at its -done,
    whose shape is the result), or a permute in which every device keeps its own block."""
    kind = inst.opcode.removesuffix("-done")
    if kind not in _COLLECTIVE_SHARE:
        return None
    result = sum(a.logical_bytes for a in inst.arrays if a.dims)
    start = by_name.get(inst.operands[0]) if inst.opcode.endswith("-done") and inst.operands else None
    pairs = re.findall(r"\{(\d+),(\d+)\}", _attribute((start or inst).attributes, "source_target_pairs"))
    if kind == "collective-permute" and pairs and all(a == b for a, b in pairs):
        return None
    if kind == "reduce-scatter":  # the result is a P-th of the operand
        result *= devices
    return result * _COLLECTIVE_SHARE[kind](devices)

_MOVING_OPCODES = frozenset({"copy", "copy-start", "copy-done", "pad", "transpose", "slice", "dynamic-slice",
                             "dynamic-update-slice", "concatenate", "gather", "scatter", "reshape"})
_MOVING_WORDS = ("copy", "pad", "transpose", "slice", "concatenate", "gather", "scatter")


def row_major_formats(tree, sharding=None):
    """Row-major layouts ([B, H, N, D] with D minor) for every array of `tree`, on one v5e chip. The
    kernels take row-major arrays; XLA's default layout at a jit boundary puts N minor for a bf16
    [..., N, 64] array (lane-dense for it), so without these a program that takes such an array as a
    parameter starts with a transposing copy, for our kernels and JAX's alike. Inside a larger
    program the producer of the array chooses, as the kernel asks."""
    from jax.experimental.layout import Format, Layout

    return jax.tree.map(lambda a: Format(Layout(major_to_minor=tuple(range(len(a.shape)))), sharding or chip()), tree)


def compile_row_major(fn, *args) -> CompiledProgram:
    """compile_for_v5e with row-major layouts for the parameters and results (one chip)."""
    outputs = jax.eval_shape(fn, *args)
    return compile_for_v5e(fn, *args, in_shardings=row_major_formats(args), out_shardings=row_major_formats(outputs))


def compile_for_v5e(fn, *args, **kwargs) -> CompiledProgram:
    """jax.jit(fn) lowered for the abstract `args` (placed on v5e devices) and compiled by XLA:TPU and
    Mosaic. Raises CompileError with the compiler's reason when it fails."""
    try:
        compiled = jax.jit(fn, **kwargs).lower(*args).compile()
    except Exception as exc:  # the compiler's errors come as several exception types
        message = str(exc)
        from_compiler = "jaxlib" in type(exc).__module__ or "XlaRuntimeError" in type(exc).__name__
        if from_compiler or "RESOURCE_EXHAUSTED" in message or "Mosaic" in message or "vmem" in message.lower():
            raise CompileError(message) from exc
        raise
    text = compiled.as_text()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, (list, tuple)):  # one dict per program in some JAX versions
        cost = cost[0] if cost else {}
    return CompiledProgram(text, compiled.memory_analysis(), entry_instructions(text), dict(cost))


def profile_env(directory: str, environ=None) -> dict:
    """An environment for a child process whose compiles carry the static cycle estimate."""
    env = dict(os.environ if environ is None else environ)
    env["LIBTPU_INIT_ARGS"] = f"{env.get('LIBTPU_INIT_ARGS', '')} {PROFILE_FLAG}={directory}".strip()
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
    env["TPU_SKIP_MDS_QUERY"] = "1"
    return env


def profiling_enabled() -> bool:
    return PROFILE_FLAG in os.environ.get("LIBTPU_INIT_ARGS", "")
