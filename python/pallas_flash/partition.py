"""Sharded inputs: a kernel call that runs once per shard when its operands are split over the batch
or the heads (data and tensor parallelism), instead of being gathered onto every device.

A Pallas call (or an FFI call) is opaque to XLA's SPMD partitioner: under jax.jit with q sharded over
the batch on four chips, the compiled program would all-gather q, k and v, run the whole kernel on
every chip and return a replicated output. The kernels are independent along the batch and the
heads, so each device can run them on its own rows and heads with no collective. per_shard makes a
kernel run so, by one of two routes, chosen when the call is traced:
- Explicit mesh axes (jax.make_mesh's default; "sharding in types"): the operands' shardings are
  known at trace time, and the kernel runs inside jax.shard_map over them. Every backend.
- Auto mesh axes (shardings XLA decides while compiling): custom_partitioning, whose callback splits
  the kernel once the partitioner knows the shardings. CPU (the C++ kernels through the FFI) only:
  on the TPU, XLA:TPU does not route custom_partitioning's call to its callback (jax-ml/jax#38196,
  open: "Custom emitter for CustomSPMDPartitioning not found"), so there the kernel runs on whole
  arrays, gathered by XLA, as before; use explicit axes (or jax.shard_map) for per-chip kernels.
The sequence and the head dim stay whole on every device (sequence sharding is context parallelism,
a different algorithm).

The rule is einsum-like, one term per operand and per result, e.g. the forward's
"b h n d, b g m d, b g m e -> b h n e, b h n". Factors:
- b: the batch; h: the query heads; g: the K/V heads, sharded with h's mesh axes (a shard's query
  heads must find their group's K/V heads in the same shard: with GQA that needs Hkv divisible by
  the head shards, else the heads stay whole);
- any factor named in `shardable` (the merge's rows): sharded as the operands say;
- every other factor: whole on every device.
The first operand's sharding is the authority: results are sharded like it, other operands are
resharded to match it (a local slice where they were replicated).

custom_partitioning has no batching rule: on that route the call is wrapped in custom_vmap, which
folds a vmapped axis into the batch (one kernel call over V*B rows, as the FFI calls' broadcast_all
does), or maps sequentially where an operand without a batch dim (sinks, a page pool) is vmapped.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

BATCH, HEADS, KV_HEADS = "b", "h", "g"


class AutoAxes(enum.Enum):
    """What a kernel does under mesh axes of type Auto (shardings unknown at trace time)."""

    PARTITION = "partition"  # custom_partitioning: split once the partitioner knows the shardings
    WHOLE = "whole"  # run on whole arrays (XLA gathers them): the TPU, where custom_partitioning fails
    INTERPRET = "interpret"  # whole on one device; refuse, naming why, over several (INTERPRET_UNPARTITIONABLE)

# TPU interpret mode simulates DMAs and semaphores with ordered host callbacks: XLA pins them to one
# device of a multi-device program, which then deadlocks, and custom_partitioning drops them (its
# primitive declares no effects). Arrays whose type names a multi-device mesh are refused when traced.
INTERPRET_UNPARTITIONABLE = (
    "pallas_flash: the Pallas kernels in TPU interpret mode cannot run in a multi-device program (their "
    "simulated DMAs are ordered host callbacks); on CPU use the C++ kernels (the default: "
    "PALLAS_FLASH_CPU_KERNELS=cpp), or call inside jax.shard_map, where each device runs them whole")


def place_on_mesh(x, mesh: Mesh, spec: P):
    """Lays x out as spec on mesh inside jit: jax.reshard for explicit mesh axes, a sharding
    constraint for automatic ones."""
    if all(t == AxisType.Explicit for t in mesh.axis_types):
        return jax.reshard(x, NamedSharding(mesh, spec))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def parse_rule(rule: str) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """("b h n d, b g m d -> b h n d") -> ([("b","h","n","d"), ("b","g","m","d")], [("b","h","n","d")]);
    a scalar operand is the empty term."""
    operands, _, results = rule.partition("->")
    if not _:
        raise ValueError(f"per_shard: a rule needs '->', got {rule!r}")

    def terms(side: str) -> list[tuple[str, ...]]:
        return [tuple(term.split()) for term in side.split(",")]

    parsed = terms(operands), terms(results)
    for factors in parsed[0] + parsed[1]:
        for factor in factors:
            if not re.fullmatch(r"[a-z][a-z0-9_]*", factor):
                raise ValueError(f"per_shard: factor names are lower-case identifiers, got {factor!r} in {rule!r}")
    return parsed


def _mesh_axes(spec_entry) -> tuple[str, ...]:
    if spec_entry is None:
        return ()
    return tuple(spec_entry) if isinstance(spec_entry, (tuple, list)) else (spec_entry,)


def _dim_sizes(factors_of: Sequence[tuple[str, ...]], shapes) -> dict[str, list[int]]:
    sizes: dict[str, list[int]] = {}
    for factors, shape in zip(factors_of, shapes):
        for factor, size in zip(factors, shape.shape):
            sizes.setdefault(factor, []).append(size)
    return sizes


def choose_mesh_axes(mesh: Mesh, operand_factors, arg_shapes, shardable: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Factor -> the mesh axes it is split over: for each shardable factor, the axes of the first
    operand dim that carries it (operands whose sharding is no NamedSharding count as whole), kept
    only where every dim of that factor divides evenly; g takes h's axes."""
    sizes = _dim_sizes(operand_factors, arg_shapes)
    chosen: dict[str, tuple[str, ...]] = {}
    used: set[str] = set()
    for factor in shardable:
        if factor == KV_HEADS:
            continue
        for factors, shape in zip(operand_factors, arg_shapes):
            if factor not in factors:
                continue
            sharding = getattr(shape, "sharding", None)
            axes = ()
            if isinstance(sharding, NamedSharding):
                spec = tuple(sharding.spec) + (None,) * (len(factors) - len(sharding.spec))
                axes = _mesh_axes(spec[factors.index(factor)])
            split = math.prod(mesh.shape[a] for a in axes)
            linked = sizes.get(factor, []) + (sizes.get(KV_HEADS, []) if factor == HEADS else [])
            if axes and not used.intersection(axes) and all(size % split == 0 for size in linked):
                chosen[factor] = axes
                used.update(axes)
            break
    if HEADS in chosen and KV_HEADS in shardable:
        chosen[KV_HEADS] = chosen[HEADS]
    return chosen


def _specs(factors_of, chosen) -> tuple[P, ...]:
    return tuple(P(*(chosen.get(f) or None for f in factors)) for factors in factors_of)


def _shardings(mesh: Mesh, factors_of, chosen) -> tuple[NamedSharding, ...]:
    return tuple(NamedSharding(mesh, spec) for spec in _specs(factors_of, chosen))


def _type_mesh(x):
    """The mesh of x's type when it spans several devices outside a shard_map body, else None."""
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    if mesh is None or mesh.empty or math.prod(mesh.axis_sizes) == 1 or AxisType.Manual in tuple(mesh.axis_types):
        return None
    return mesh


def explicit_mesh(x):
    """The mesh of x's type when it has Explicit axes over several devices (its sharding is then
    known at trace time), else None."""
    mesh = _type_mesh(x)
    return mesh if mesh is not None and AxisType.Explicit in tuple(mesh.axis_types) else None


def per_shard(kernel: Callable, rule: str, *, shardable: Sequence[str] = (BATCH, HEADS, KV_HEADS),
              auto: AutoAxes = AutoAxes.PARTITION) -> Callable:
    """kernel(*operands) -> a tuple of arrays, made to run per shard where its operands are sharded
    along the rule's shardable factors (module docstring). A single device, or a shard_map body,
    runs the kernel as it is. auto: what happens under Auto mesh axes."""
    operand_factors, result_factors = parse_rule(rule)

    def call(*operands):
        mesh = explicit_mesh(operands[0])
        if mesh is not None:
            return _shard_mapped(kernel, mesh, operand_factors, result_factors, shardable, operands)
        if auto is AutoAxes.INTERPRET and _type_mesh(operands[0]) is not None:
            raise ValueError(INTERPRET_UNPARTITIONABLE)
        if auto is not AutoAxes.PARTITION:  # custom_partitioning would also drop interpret mode's effects
            return tuple(kernel(*operands))
        return _partitioned_call(kernel, operand_factors, result_factors, rule, shardable)(*operands)

    return call


def _shard_mapped(kernel, mesh, operand_factors, result_factors, shardable, operands):
    """The kernel inside jax.shard_map over the operands' explicit shardings."""
    chosen = choose_mesh_axes(mesh, operand_factors, [jax.typeof(x) for x in operands], shardable)
    in_specs, out_specs = _specs(operand_factors, chosen), _specs(result_factors, chosen)
    placed = [x if jax.typeof(x).sharding.spec == spec else jax.reshard(x, NamedSharding(mesh, spec))
              for x, spec in zip(operands, in_specs)]
    return jax.shard_map(lambda *local: tuple(kernel(*local)), mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)(*placed)


def _partitioned_call(kernel, operand_factors, result_factors, rule, shardable):
    """The kernel under custom_partitioning, made vmappable by custom_vmap."""
    in_order = list(dict.fromkeys(f for term in operand_factors + result_factors for f in term))
    replicated_factors = [f for f in in_order if f not in shardable]  # Shardy wants rule order

    def partition(mesh, arg_shapes, result_shape):
        if mesh.empty:  # shardings the partitioner could not name: run whole on every device
            devices = np.asarray(list(arg_shapes[0].sharding.device_set))
            mesh = Mesh(devices, ("devices",))
            chosen = {}
        else:
            chosen = choose_mesh_axes(mesh, operand_factors, arg_shapes, shardable)
        return (mesh, lambda *operands: tuple(kernel(*operands)), _shardings(mesh, result_factors, chosen),
                _shardings(mesh, operand_factors, chosen))

    def infer(mesh, arg_shapes, result_shape):  # GSPMD's propagation (Shardy reads the rule)
        if mesh.empty:
            return tuple(arg_shapes[0].sharding for _ in result_factors)
        return _shardings(mesh, result_factors, choose_mesh_axes(mesh, operand_factors, arg_shapes, shardable))

    partitioned = custom_partitioning(lambda *operands: tuple(kernel(*operands)))
    partitioned.def_partition(partition=partition, infer_sharding_from_operands=infer,
                              sharding_rule=rule, need_replication_factors=tuple(replicated_factors))

    @custom_vmap
    def call(*operands):
        return partitioned(*operands)

    @call.def_vmap
    def call_vmap(axis_size, in_batched, *operands):
        foldable = all(BATCH in factors or not batched for factors, batched in zip(operand_factors, in_batched))
        if not foldable:  # an operand without a batch dim is vmapped: one call per element
            batched_index = [i for i, batched in enumerate(in_batched) if batched]

            def one(elements):
                full = list(operands)
                for i, x in zip(batched_index, elements):
                    full[i] = x
                return call(*full)

            outs = jax.lax.map(one, [operands[i] for i in batched_index])
            return outs, (True,) * len(outs)
        folded = []
        for factors, batched, x in zip(operand_factors, in_batched, operands):
            if BATCH not in factors:
                folded.append(x)
                continue
            if not batched:
                x = jnp.broadcast_to(x[None], (axis_size, *x.shape))
            axis = factors.index(BATCH)
            x = jnp.moveaxis(x, 0, axis)  # [..., V, B, ...] -> [..., V * B, ...]
            folded.append(x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2:]))
        outs = call(*folded)
        unfolded = []
        for factors, y in zip(result_factors, outs):
            axis = factors.index(BATCH)
            y = y.reshape(*y.shape[:axis], axis_size, -1, *y.shape[axis + 1:])
            unfolded.append(jnp.moveaxis(y, axis, 0))
        return tuple(unfolded), (True,) * len(unfolded)

    return call
