"""context_parallel_attention: one sequence's attention spread over the devices of a mesh axis.

The sequence of q, k, v [B, H, N, D] is split over P devices, n = N / P tokens each; every device
keeps its queries and computes their rows of O and the LSE, forward and backward (custom VJP):
- all_gather: every device gathers K and V (N tokens, over the interconnect) and runs the kernels on
  its queries against the keys they see; the backward gathers them again (nothing of size N is
  saved) and reduce-scatters dK and dV.
- ring: K and V travel around a ring of the devices (ppermute to the next one), P steps; each step's
  partial (O, LSE) is merged exactly by merge_attention_states. The next block arrives while the
  current step's kernels run, and the one after is sent only once they are done (_next_block): one
  block computing, one in flight, whatever P. The backward sends the float32 dK, dV accumulators
  around with K and V, and one last step brings them home.

Causal load balance. With the sequence in P contiguous blocks, device P-1's queries see every key
and device 0's one block: the slowest device does 2P - 1 of the P^2 half-blocks' work. Here each
device holds two halves of c = N / (2P) tokens, i and 2P-1-i ("zigzag"), and then every device does
the same work, 2P c^2 query-key pairs per head (a P-th of the causal N^2 / 2):
- all_gather: half i against keys 0 .. (i+1)c (bottom-right causal), half 2P-1-i against keys
  0 .. (2P-i)c: no masked tile is ever computed beyond the diagonal's.
- ring, the block of device j arriving at device i != j: if j < i, both local halves see half j
  whole and neither sees half 2P-1-j; if j > i, only the upper half 2P-1-i sees anything, and it
  sees both of j's halves whole. Either way one full (2c x c or c x 2c) call: equal work every step.
layout="contiguous" (the default) takes and returns the natural order: two ppermutes move each
device's halves to their zigzag owners and two bring the outputs back (about 2 n tokens of q, k, v
each way: a fraction 1/P of the ring's traffic). A model whose other layers do not mix positions
can keep its tokens in zigzag order throughout (zigzag_permutation) and pass layout="zigzag".

Which strategy (strategy="auto", choose_strategy; the model in strategy_costs): both move the same
bytes, K and V of the other devices' tokens to every device, and float32 dK, dV back. The ring hides
each step's transfer under that step's kernels where the compute is the longer (from about a
thousand tokens per device on a v5e with 16 heads of 128), but adds per step a float32 merge of O and
float32 accumulations of dQ, dK, dV, and P - 1 collectives' latency each way; the all-gather waits
for its gather, holds the whole sequence's K, V and float32 dK, dV (the ring two blocks), and sums the
backward's dK, dV over the whole sequence before reducing them. So the ring wins for long sequences
with several KV heads and wherever memory is tight (the model then picks it whatever the times); the
all-gather where little is moved (few KV heads, MQA) and the ring's per-step passes over the query
rows dominate, or where collectives are slow. The model is not a measurement: the compiler prices
neither collectives nor their overlap, and no TPU was reachable to time either.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_flash import hardware
from pallas_flash.backend import kernel_mode
from pallas_flash.flash_attention import _check_inputs, attention_kernels, window_edges
from pallas_flash.mask import Mask
from pallas_flash.merge import merge_attention_states

STRATEGIES = ("auto", "all_gather", "ring")
LAYOUTS = ("contiguous", "zigzag")
NAME = "context_parallel_attention"


# --------------------------------------------------------------------------------------------------
# Layout and ring order


def zigzag_permutation(seq_len: int, num_devices: int) -> np.ndarray:
    """The token order of layout="zigzag": x[:, :, zigzag_permutation(N, P)] split in P contiguous
    blocks gives device i the halves i and 2P-1-i of the natural order (halves of N / (2P) tokens).
    np.argsort of it is the inverse."""
    if seq_len % (2 * num_devices):
        raise ValueError(f"zigzag_permutation: expected seq_len divisible by 2 * num_devices = {2 * num_devices}, "
                         f"got {seq_len}")
    halves = np.arange(seq_len).reshape(2 * num_devices, -1)
    order = [h for i in range(num_devices) for h in (i, 2 * num_devices - 1 - i)]
    return halves[order].reshape(-1)


def _zigzag_owner(half: int, devices: int) -> int:
    return half if half < devices else 2 * devices - 1 - half


def _to_zigzag(x, plan: "_Plan"):
    """Local [.., n, ..] (axis 2) holding halves 2i, 2i+1 -> halves i, 2P-1-i (device i)."""
    devices = plan.devices
    first, second = jnp.split(x, 2, axis=2)
    even = _send(first, plan, [(i, _zigzag_owner(2 * i, devices)) for i in range(devices)])
    odd = _send(second, plan, [(i, _zigzag_owner(2 * i + 1, devices)) for i in range(devices)])
    # device d's own half d (its lower) came as an even half when d is even
    lower_is_even = lax.axis_index(plan.axis) % 2 == 0
    return jnp.concatenate([jnp.where(lower_is_even, even, odd), jnp.where(lower_is_even, odd, even)], axis=2)


def _from_zigzag(x, plan: "_Plan"):
    """The inverse of _to_zigzag: halves i, 2P-1-i -> halves 2i, 2i+1 (device i)."""
    devices = plan.devices
    lower, upper = jnp.split(x, 2, axis=2)
    lower_is_even = lax.axis_index(plan.axis) % 2 == 0
    even, odd = jnp.where(lower_is_even, lower, upper), jnp.where(lower_is_even, upper, lower)

    def home(d, parity):  # the device whose block holds device d's half of this parity
        half = d if (d % 2 == parity) else 2 * devices - 1 - d
        return half // 2

    first = _send(even, plan, [(d, home(d, 0)) for d in range(devices)])
    second = _send(odd, plan, [(d, home(d, 1)) for d in range(devices)])
    return jnp.concatenate([first, second], axis=2)


def _send(x, plan: "_Plan", pairs):
    """lax.ppermute of x from device a to device b for each (a, b), a and b numbered as lax.axis_index
    and the shardings number them over plan.axis (row-major in the tuple's order). ppermute numbers
    the devices of a tuple of axes in the mesh's order of those axes instead (jax 0.10: with
    axis=("y", "x") on an ("x", "y") mesh the two differ), hence the translation."""
    to_ppermute = plan.ppermute_index
    return lax.ppermute(x, plan.axis, [(to_ppermute[a], to_ppermute[b]) for a, b in pairs])


def _ppermute_index(mesh: Mesh, axes: tuple[str, ...]) -> tuple[int, ...]:
    """For each device index over `axes` in their order, its index in the mesh's order of them."""
    sizes = [mesh.shape[a] for a in axes]
    in_mesh_order = sorted(axes, key=mesh.axis_names.index)
    result = []
    for index in range(math.prod(sizes)):
        coords = dict(zip(axes, np.unravel_index(index, sizes)))
        result.append(int(np.ravel_multi_index([coords[a] for a in in_mesh_order],
                                               [mesh.shape[a] for a in in_mesh_order])))
    return tuple(result)


def ring_order(mesh: Mesh, axes: tuple[str, ...]) -> tuple[int, ...]:
    """The devices (linear indices over `axes`, as lax.axis_index numbers them) in ring order: for two
    axes a snake (boustrophedon) through the grid, so that on a 2x2 torus every step is to a
    neighbouring chip (0, 1, 3, 2), and for one axis 0 .. P-1 (the torus' wrap-around link closes it)."""
    sizes = [mesh.shape[a] for a in axes]
    if len(sizes) != 2 or sizes[0] % 2:
        return tuple(range(math.prod(sizes)))
    rows, cols = sizes
    return tuple(r * cols + (c if r % 2 == 0 else cols - 1 - c) for r in range(rows) for c in range(cols))


# --------------------------------------------------------------------------------------------------
# The cost model


@dataclasses.dataclass(frozen=True)
class StrategyCost:
    """strategy_costs' model of one training step's attention (forward + backward) on one device."""

    strategy: str
    compute_s: float  # the kernels: FLOPs / peak
    hbm_s: float  # the strategy's own passes over HBM outside the kernels (merges, accumulators, copies)
    transfer_s: float  # bytes the device receives over the interconnect / its bandwidth
    step_s: float  # the modelled time (strategy_costs says how the parts combine)
    peak_bytes: int  # what the strategy holds beyond q, k, v, O and their gradients


def strategy_costs(shape_q, shape_k, itemsize: int, causal: bool, devices: int, *,
                   chip: hardware.Chip = hardware.TPU_V5E,
                   ici_bytes_per_s: float = hardware.V5E_ICI_BYTES_PER_S,
                   ici_latency_s: float = hardware.V5E_ICI_LATENCY_S,
                   backward: bool = True) -> dict[str, StrategyCost]:
    """The model choose_strategy compares, per device, for [B, H, N, D] inputs split over P devices
    (n = N / P tokens each; XLA's cost model prices neither collectives nor overlap, so this does), of
    a training step's attention (backward=False: the forward alone):
    - compute: 4 B Hq N^2 D FLOPs forward and 10 B Hq N^2 D backward (five matmuls), half of it
      causal, split evenly (zigzag balances the causal work), at the chip's peak;
    - transfer: K, V of the other P - 1 devices reach every device twice (forward, backward) and float32
      dK, dV of as many tokens leave it (ring: travelling with K, V; all-gather: the reduce-scatter),
      at ici_bytes_per_s, plus ici_latency_s per collective;
    - hbm: the passes this module adds around the kernels, at the chip's HBM bandwidth. Ring, per
      step after the first: the float32 merge of O (read two, write one) and the float32 dQ, dK, dV
      accumulations. All-gather: the natural-order copy of the gathered K, V (causal) in both passes
      and the float32 dK, dV of the whole sequence the backward sums before reducing.
    all_gather = compute + hbm + transfer (a kernel waits for its gather). ring = per step the longer
    of (its compute + hbm) and (its transfer + latency): the next block's transfer overlaps this
    block's kernels."""
    batch, heads_q, seq, dim = shape_q
    heads_kv = shape_k[1]
    local = seq // devices
    passes = 2 if backward else 1
    flops = (14 if backward else 4) * batch * heads_q * seq * seq * dim * (0.5 if causal else 1.0)
    compute = flops / devices / chip.peak_flops
    kv_bytes = 2 * batch * heads_kv * local * dim * itemsize  # one device's K and V
    grad_bytes = 2 * batch * heads_kv * local * dim * 4 if backward else 0  # one device's float32 dK, dV
    rows_f32 = batch * heads_q * local * dim * 4  # one device's float32 O (or dQ)
    moved = (devices - 1) * (passes * kv_bytes + grad_bytes)

    gather_hbm = devices * (passes * kv_bytes * 2 * (2 if causal else 0) + grad_bytes * 3)
    gather_transfer = moved / ici_bytes_per_s + 2 * passes * ici_latency_s
    gather = StrategyCost("all_gather", compute, gather_hbm / chip.hbm_bytes_per_s, gather_transfer,
                          compute + gather_hbm / chip.hbm_bytes_per_s + gather_transfer,
                          devices * (kv_bytes + grad_bytes))

    steps = max(devices - 1, 1)
    step_compute = compute / devices
    step_hbm = (3 * rows_f32 + (3 * rows_f32 if backward else 0) + 3 * grad_bytes) / chip.hbm_bytes_per_s
    step_transfer = moved / steps / ici_bytes_per_s + passes * ici_latency_s
    ring_time = step_compute + (devices - 1) * max(step_compute + step_hbm, step_transfer)
    ring = StrategyCost("ring", compute, (devices - 1) * step_hbm, moved / ici_bytes_per_s, ring_time,
                        2 * (kv_bytes + grad_bytes))
    return {"all_gather": gather, "ring": ring}


def choose_strategy(shape_q, shape_k, itemsize: int, causal: bool, devices: int, *,
                    chip: hardware.Chip = hardware.TPU_V5E, **model) -> str:
    """strategy="auto": the ring where the all-gather's working set (K, V and float32 dK, dV of the
    whole sequence) would take more than a quarter of the chip's HBM, else the strategy of the lower
    modelled time (strategy_costs), the all-gather on a tie (one collective, fewer kernels). On the
    v5e the ring wins from a few thousand tokens per device, where its transfers hide under the
    compute; below, its per-step merges and accumulations, which grow with n while a step's compute
    grows with n^2, cost more than the all-gather's unhidden gather."""
    if devices == 1:
        return "all_gather"
    costs = strategy_costs(shape_q, shape_k, itemsize, causal, devices, chip=chip, **model)
    if costs["all_gather"].peak_bytes > chip.hbm_capacity // 4:
        return "ring"
    return "ring" if costs["ring"].step_s < costs["all_gather"].step_s * (1 - 1e-9) else "all_gather"


# --------------------------------------------------------------------------------------------------
# The per-device computation (inside shard_map: local arrays)


@dataclasses.dataclass(frozen=True)
class _Plan:
    strategy: str
    causal: bool
    scale: float
    mode: str  # backend.kernel_mode
    axis: tuple[str, ...]
    devices: int
    ring: tuple[int, ...]
    ppermute_index: tuple[int, ...]  # _send
    window: tuple[int | None, int | None] | None = None  # (left, right); None: no window (zigzag if causal)


def _kernels(plan: _Plan, q, k, mask: Mask, rows: int, keys: int):
    """The forward and backward kernels for `rows` queries of q against `keys` keys of k."""
    q_shape = q.shape[:2] + (rows, q.shape[3])
    k_shape = k.shape[:2] + (keys, k.shape[3])
    return attention_kernels(plan.mode, q_shape, k_shape, q.dtype, mask, plan.scale)


def _full(plan, q, k):
    return _kernels(plan, q, k, Mask(), q.shape[2], k.shape[2])


def _causal(plan, q, k):
    """Bottom-right causal: the last query at the last key's position."""
    return _kernels(plan, q, k, Mask.bottom_right(q.shape[2], k.shape[2], causal=True), q.shape[2], k.shape[2])


def _halves(x):
    return jnp.split(x, 2, axis=2)


def _f32(x):
    return x.astype(jnp.float32)


def _pad_keys(x, before: int, total: int):
    """x [.., m, ..] (axis 2) placed at rows before .. before+m of a float32 zero array of `total` rows."""
    widths = [(0, 0)] * x.ndim
    widths[2] = (before, total - before - x.shape[2])
    return jnp.pad(_f32(x), widths)


def _merge(plan, o, lse, o_part, lse_part):
    """Two partials merged by the project's merge (the C++ one on CPU), in float32."""
    return merge_attention_states(jnp.stack([_f32(o), _f32(o_part)]), jnp.stack([lse, lse_part]),
                                  interpret=None if plan.mode == "cpu" else True)


def _empty_rows(q, v):
    return jnp.zeros(q.shape[:3] + v.shape[3:], jnp.float32), jnp.full(q.shape[:3], -jnp.inf, jnp.float32)


# The local diagonal block of a zigzag device: half i against half i (causal), half 2P-1-i against
# both halves (bottom-right causal: the second half follows the first in position).
def _diagonal_forward(plan, q, k, v):
    (q_lo, q_hi), (k_lo, _), (v_lo, _) = _halves(q), _halves(k), _halves(v)
    o_lo, lse_lo = _causal(plan, q_lo, k_lo)[0](q_lo, k_lo, v_lo)
    o_hi, lse_hi = _causal(plan, q_hi, k)[0](q_hi, k, v)
    return jnp.concatenate([_f32(o_lo), _f32(o_hi)], axis=2), jnp.concatenate([lse_lo, lse_hi], axis=2)


def _diagonal_backward(plan, q, k, v, o, lse, do):
    (q_lo, q_hi), (k_lo, _), (v_lo, _) = _halves(q), _halves(k), _halves(v)
    (o_lo, o_hi), (do_lo, do_hi) = _halves(o), _halves(do)
    lse_lo, lse_hi = jnp.split(lse, 2, axis=2)
    dq_lo, dk_lo, dv_lo = _causal(plan, q_lo, k_lo)[1](q_lo, k_lo, v_lo, o_lo, lse_lo, do_lo)
    dq_hi, dk, dv = _causal(plan, q_hi, k)[1](q_hi, k, v, o_hi, lse_hi, do_hi)
    n = k.shape[2]
    return (jnp.concatenate([_f32(dq_lo), _f32(dq_hi)], axis=2),
            _f32(dk) + _pad_keys(dk_lo, 0, n), _f32(dv) + _pad_keys(dv_lo, 0, n))


# Another device's block j at device i (zigzag): j < i: all local rows see j's lower half;
# j > i: the upper half of the rows sees all of j's block. Both are one full call of 2 c^2.
def _off_diagonal_forward(plan, source_below, q, k, v):
    def below(q, k, v):
        k_lo, v_lo = _halves(k)[0], _halves(v)[0]
        o, lse = _full(plan, q, k_lo)[0](q, k_lo, v_lo)
        return _f32(o), lse

    def above(q, k, v):
        q_lo, q_hi = _halves(q)
        o_hi, lse_hi = _full(plan, q_hi, k)[0](q_hi, k, v)
        o_lo, lse_lo = _empty_rows(q_lo, v)
        return jnp.concatenate([o_lo, _f32(o_hi)], axis=2), jnp.concatenate([lse_lo, lse_hi], axis=2)

    return lax.cond(source_below, below, above, q, k, v)


def _off_diagonal_backward(plan, source_below, q, k, v, o, lse, do):
    n = k.shape[2]

    def below(q, k, v, o, lse, do):
        k_lo, v_lo = _halves(k)[0], _halves(v)[0]
        dq, dk_lo, dv_lo = _full(plan, q, k_lo)[1](q, k_lo, v_lo, o, lse, do)
        return _f32(dq), _pad_keys(dk_lo, 0, n), _pad_keys(dv_lo, 0, n)

    def above(q, k, v, o, lse, do):
        q_lo, q_hi = _halves(q)
        dq_hi, dk, dv = _full(plan, q_hi, k)[1](q_hi, k, v, _halves(o)[1], jnp.split(lse, 2, axis=2)[1],
                                                  _halves(do)[1])
        return jnp.concatenate([jnp.zeros(q_lo.shape, jnp.float32), _f32(dq_hi)], axis=2), _f32(dk), _f32(dv)

    return lax.cond(source_below, below, above, q, k, v, o, lse, do)


def _ring_perm(plan):
    return [(plan.ring[t], plan.ring[(t + 1) % plan.devices]) for t in range(plan.devices)]


def _ring_source(plan, step: int):
    """The device whose K, V block this device holds after `step` ring steps (a traced int32)."""
    me = lax.axis_index(plan.axis)
    position = jnp.asarray(np.argsort(plan.ring), jnp.int32)[me]
    return me, jnp.asarray(plan.ring, jnp.int32)[(position - step) % plan.devices]


def _local_forward(plan, q, k, v):
    """Step 0: the device's own block."""
    if plan.window is not None:
        n = q.shape[2]
        o, lse = _kernels(plan, q, k, _band(plan), n, n)[0](q, k, v)
        return _f32(o), lse
    if plan.causal:
        return _diagonal_forward(plan, q, k, v)
    o, lse = _full(plan, q, k)[0](q, k, v)
    return _f32(o), lse


def _local_backward(plan, q, k, v, o, lse, do):
    if plan.window is not None:
        n = q.shape[2]
        return tuple(map(_f32, _kernels(plan, q, k, _band(plan), n, n)[1](q, k, v, o, lse, do)))
    if plan.causal:
        return _diagonal_backward(plan, q, k, v, o, lse, do)
    return tuple(map(_f32, _full(plan, q, k)[1](q, k, v, o, lse, do)))


def _remote_forward(plan, offset, q, k, v):
    """A later step: the block of the device `offset` (traced) devices from this one."""
    if plan.window is not None:
        n = q.shape[2]

        def forward(mask):
            def run(q, k, v):
                o, lse = _kernels(plan, q, k, mask, n, n)[0](q, k, v)
                return _f32(o), lse
            return run

        def nothing(q, k, v):
            return _empty_rows(q, v)

        branches = [b or nothing for b in _offset_branches(plan, n, forward)]
        return lax.switch(offset + plan.devices - 1, branches, q, k, v)
    if plan.causal:
        return _off_diagonal_forward(plan, offset < 0, q, k, v)
    o, lse = _full(plan, q, k)[0](q, k, v)
    return _f32(o), lse


def _remote_backward(plan, offset, q, k, v, o, lse, do):
    if plan.window is not None:
        n = q.shape[2]

        def backward(mask):
            def run(q, k, v, o, lse, do):
                return tuple(map(_f32, _kernels(plan, q, k, mask, n, n)[1](q, k, v, o, lse, do)))
            return run

        def nothing(q, k, v, o, lse, do):
            return tuple(jnp.zeros(x.shape, jnp.float32) for x in (q, k, v))

        branches = [b or nothing for b in _offset_branches(plan, n, backward)]
        return lax.switch(offset + plan.devices - 1, branches, q, k, v, o, lse, do)
    if plan.causal:
        return _off_diagonal_backward(plan, offset < 0, q, k, v, o, lse, do)
    return tuple(map(_f32, _full(plan, q, k)[1](q, k, v, o, lse, do)))


def _ring_steps(plan, n: int) -> int:
    """The steps after the first: every block visits every device, or (windows) until none is seen."""
    return _banded_steps(plan, n) if plan.window is not None else plan.devices - 1


def _next_block(plan, k, v, after):
    """The K, V block the ring brings next, sent while this step's kernels run, and `after` (this step's
    results) passed through a barrier with it. Without the barrier, a block's send depends only on the
    previous send, so XLA would issue every step's transfer at once and hold all P - 1 blocks (v5e:4x4,
    N = 2M, 131072 tokens a chip: 30.5 GiB); with it, the next send waits for this step's kernels: one
    block computing, one arriving."""
    k, v = _send((k, v), plan, _ring_perm(plan))
    return lax.optimization_barrier(((k, v), after))


def _ring_forward(plan, q, k, v):
    steps = _ring_steps(plan, q.shape[2])
    o, lse = _local_forward(plan, q, k, v)
    for step in range(1, steps + 1):
        # The block of this step arrived during the previous step's kernels.
        (k, v), (o, lse) = _next_block(plan, k, v, (o, lse))
        me, source = _ring_source(plan, step)
        o, lse = _merge(plan, o, lse, *_remote_forward(plan, source - me, q, k, v))
    return o.astype(q.dtype), lse


def _ring_backward(plan, q, k, v, o, lse, do):
    dq, dk, dv = _local_backward(plan, q, k, v, o, lse, do)
    steps = _ring_steps(plan, q.shape[2])
    for step in range(1, steps + 1):
        # K, V as in the forward; the accumulators follow once this step's sums are done, and are
        # needed only by the next step's sums, so their transfer overlaps its kernels.
        (k, v), dq = _next_block(plan, k, v, dq)
        dk, dv = _send((dk, dv), plan, _ring_perm(plan))
        me, source = _ring_source(plan, step)
        dq_part, dk_part, dv_part = _remote_backward(plan, source - me, q, k, v, o, lse, do)
        dq, dk, dv = dq + dq_part, dk + dk_part, dv + dv_part
    if steps:  # the accumulators of the block held now go back to its owner
        dk, dv = _send((dk, dv), plan, _home_perm(plan, steps))
    return dq, dk, dv


def _gather(plan, x):
    """x of every device, in natural order (zigzag halves put back in place when causal)."""
    whole = lax.all_gather(x, plan.axis, axis=2, tiled=True)
    if not plan.causal:
        return whole
    return jnp.take(whole, _natural_index(plan, whole.shape[2]), axis=2)


def _natural_index(plan, seq: int) -> np.ndarray:
    """Indices into the device-order gathered sequence (device i: halves i, 2P-1-i) in natural order."""
    return np.argsort(zigzag_permutation(seq, plan.devices))


def _scatter(plan, x):
    """The reduce-scatter of a natural-order float32 [.., N, ..] back to each device's tokens."""
    if plan.causal:
        x = jnp.take(x, zigzag_permutation(x.shape[2], plan.devices), axis=2)
    return lax.psum_scatter(x, plan.axis, scatter_dimension=2, tiled=True)


def _gathered_branches(plan, q):
    """Per device i, the key counts its two halves see: (i+1) c and (2P-i) c (bottom-right causal)."""
    c = q.shape[2] // 2
    return [((i + 1) * c, (2 * plan.devices - i) * c) for i in range(plan.devices)]


def _all_gather_forward(plan, q, k, v):
    keys, values = _gather(plan, k), _gather(plan, v)
    if not plan.causal:
        return _full(plan, q, keys)[0](q, keys, values)

    def branch(lo_keys, hi_keys):
        def run(q, keys, values):
            q_lo, q_hi = _halves(q)
            o_lo, lse_lo = _causal(plan, q_lo, keys[:, :, :lo_keys])[0](q_lo, keys[:, :, :lo_keys],
                                                                         values[:, :, :lo_keys])
            o_hi, lse_hi = _causal(plan, q_hi, keys[:, :, :hi_keys])[0](q_hi, keys[:, :, :hi_keys],
                                                                         values[:, :, :hi_keys])
            return jnp.concatenate([o_lo, o_hi], axis=2), jnp.concatenate([lse_lo, lse_hi], axis=2)
        return run

    branches = [branch(*counts) for counts in _gathered_branches(plan, q)]
    return lax.switch(lax.axis_index(plan.axis), branches, q, keys, values)


def _all_gather_backward(plan, q, k, v, o, lse, do):
    keys, values = _gather(plan, k), _gather(plan, v)
    seq = keys.shape[2]
    if not plan.causal:
        dq, dk, dv = _full(plan, q, keys)[1](q, keys, values, o, lse, do)
        return _f32(dq), _scatter(plan, _f32(dk)), _scatter(plan, _f32(dv))

    def branch(lo_keys, hi_keys):
        def run(q, keys, values, o, lse, do):
            def half(q_h, o_h, lse_h, do_h, count):
                k_h, v_h = keys[:, :, :count], values[:, :, :count]
                return _causal(plan, q_h, k_h)[1](q_h, k_h, v_h, o_h, lse_h, do_h)

            (q_lo, q_hi), (o_lo, o_hi), (do_lo, do_hi) = _halves(q), _halves(o), _halves(do)
            lse_lo, lse_hi = jnp.split(lse, 2, axis=2)
            dq_lo, dk_lo, dv_lo = half(q_lo, o_lo, lse_lo, do_lo, lo_keys)
            dq_hi, dk_hi, dv_hi = half(q_hi, o_hi, lse_hi, do_hi, hi_keys)
            return (jnp.concatenate([_f32(dq_lo), _f32(dq_hi)], axis=2),
                    _pad_keys(dk_lo, 0, seq) + _pad_keys(dk_hi, 0, seq),
                    _pad_keys(dv_lo, 0, seq) + _pad_keys(dv_hi, 0, seq))
        return run

    branches = [branch(*counts) for counts in _gathered_branches(plan, q)]
    dq, dk, dv = lax.switch(lax.axis_index(plan.axis), branches, q, keys, values, o, lse, do)
    return dq, _scatter(plan, dk), _scatter(plan, dv)


# --------------------------------------------------------------------------------------------------
# Sliding windows (contiguous layout: a row sees at most left + 1 + right keys, so blocks in natural
# order already carry nearly equal work). A block of keys j - i blocks away from the queries' block is
# seen, whole or in part, or not at all: the band decides it statically for each of the 2P - 1
# offsets, and an offset no row sees is neither computed nor, once no device needs it, sent.


def _band(plan, q_position: int = 0, k_position: int = 0) -> Mask:
    return Mask(causal=plan.causal, window=plan.window, q_position=q_position, k_position=k_position)


def _live_offset(plan, blocks: int, n: int) -> bool:
    """Whether rows of one block see any key of the block `blocks` blocks later (earlier if < 0)."""
    return _band(plan).band_kind(blocks * n, n, n) != "skip"


def _banded_steps(plan, n: int) -> int:
    """The ring steps after which no device holds a block its rows see: the ring stops there."""
    position = {device: t for t, device in enumerate(plan.ring)}
    last = 0
    for step in range(1, plan.devices):
        for device in plan.ring:
            source = plan.ring[(position[device] - step) % plan.devices]
            if _live_offset(plan, source - device, n):
                last = step
    return last


def _home_perm(plan, steps: int):
    """Sends the accumulators of the block held after `steps` ring steps back to its owner."""
    return [(plan.ring[t], plan.ring[(t - steps) % plan.devices]) for t in range(plan.devices)]


def _offset_branches(plan, n: int, call):
    """lax.switch branches over offset + P - 1 (offset = source - me in blocks): call(mask) where the
    offset is live, None (nothing to compute) where not. In TPU interpret mode every branch runs its
    kernel (all masked where not live): the interpreter synchronises the devices at each kernel
    call, and a device that skipped one would leave the others waiting for ever."""
    every = plan.mode == "interpret"
    return [call(_band(plan, 0, offset * n)) if every or _live_offset(plan, offset, n) else None
            for offset in range(-(plan.devices - 1), plan.devices)]


def _window_keys(plan, device: int, n: int, seq: int) -> tuple[int, int]:
    """[first, last) of the keys device `device`'s rows see under the window (a static range)."""
    lo, hi = _band(plan).band  # a row at position p sees keys p + lo .. p + hi
    first = 0 if lo is None else max(0, device * n + lo)
    last = seq if hi is None else min(seq, (device + 1) * n + hi)  # the last row, (device + 1) n - 1, sees + hi
    return first, last


def _banded_all_gather_forward(plan, q, k, v):
    keys, values = (lax.all_gather(x, plan.axis, axis=2, tiled=True) for x in (k, v))
    n, seq = q.shape[2], keys.shape[2]

    def branch(device):
        first, last = _window_keys(plan, device, n, seq)

        def run(q, keys, values):  # first < last: a band always holds the diagonal's side
            k_w, v_w = keys[:, :, first:last], values[:, :, first:last]
            return _kernels(plan, q, k_w, _band(plan, device * n, first), n, last - first)[0](q, k_w, v_w)
        return run

    return lax.switch(lax.axis_index(plan.axis), [branch(d) for d in range(plan.devices)], q, keys, values)


def _banded_all_gather_backward(plan, q, k, v, o, lse, do):
    keys, values = (lax.all_gather(x, plan.axis, axis=2, tiled=True) for x in (k, v))
    n, seq = q.shape[2], keys.shape[2]

    def branch(device):
        first, last = _window_keys(plan, device, n, seq)

        def run(q, keys, values, o, lse, do):
            k_w, v_w = keys[:, :, first:last], values[:, :, first:last]
            dq, dk, dv = _kernels(plan, q, k_w, _band(plan, device * n, first), n, last - first)[1](
                q, k_w, v_w, o, lse, do)
            return _f32(dq), _pad_keys(dk, first, seq), _pad_keys(dv, first, seq)
        return run

    dq, dk, dv = lax.switch(lax.axis_index(plan.axis), [branch(d) for d in range(plan.devices)],
                            q, keys, values, o, lse, do)
    return dq, lax.psum_scatter(dk, plan.axis, scatter_dimension=2, tiled=True), \
        lax.psum_scatter(dv, plan.axis, scatter_dimension=2, tiled=True)


_FORWARD = {("all_gather", False): _all_gather_forward, ("ring", False): _ring_forward,
            ("all_gather", True): _banded_all_gather_forward, ("ring", True): _ring_forward}
_BACKWARD = {("all_gather", False): _all_gather_backward, ("ring", False): _ring_backward,
             ("all_gather", True): _banded_all_gather_backward, ("ring", True): _ring_backward}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _local_attention(plan: _Plan, q, k, v):
    return _FORWARD[plan.strategy, plan.window is not None](plan, q, k, v)


def _local_attention_fwd(plan, q, k, v):
    o, lse = _FORWARD[plan.strategy, plan.window is not None](plan, q, k, v)
    return (o, lse), (q, k, v, o, lse)


def _local_attention_bwd(plan, residuals, cotangents):
    q, k, v, o, lse = residuals
    do, _ = cotangents  # the LSE's cotangent is dropped, as flash_attention's is
    # The backward's ppermutes (or all-gathers) of K and V are the forward's, of the same arrays: left
    # alone, XLA may compute them once and keep what they received (the gathered sequence) alive from
    # the forward to the backward. Tied to dO, they are the backward's own, sent again when it runs.
    k, v, do = lax.optimization_barrier((k, v, do))
    dq, dk, dv = _BACKWARD[plan.strategy, plan.window is not None](plan, q, k, v, o, lse, do)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_local_attention.defvjp(_local_attention_fwd, _local_attention_bwd)


# --------------------------------------------------------------------------------------------------
# Public entry point


def _mesh_axes(mesh, axis) -> tuple[str, ...]:
    if not isinstance(mesh, Mesh):
        raise ValueError(f"{NAME}: argument 'mesh': expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    axes = (axis,) if isinstance(axis, str) else axis
    if not isinstance(axes, tuple) or not axes or not all(isinstance(a, str) for a in axes):
        raise ValueError(f"{NAME}: argument 'axis': expected a mesh axis name or a tuple of them, got {axis!r}")
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown or len(set(axes)) != len(axes):
        raise ValueError(f"{NAME}: argument 'axis': expected distinct axes of the mesh {mesh.axis_names}, "
                         f"got {axis!r}")
    return axes


def context_parallel_attention(q, k, v, mesh: Mesh, axis, *, strategy: str = "auto", causal: bool = False,
                               window=None, sm_scale: float | None = None, return_lse: bool = False,
                               layout: str = "contiguous", interpret: bool | None = None):
    """flash_attention(q, k, v, causal=causal) with the sequence axis of q, k, v [B, H, N, D] split
    over the devices of mesh axis `axis` (a name, or a tuple of names: their devices in row-major
    order), differentiable. Nq = Nk = N, divisible by the P devices (by 2P when causal).

    - strategy: "all_gather", "ring" or "auto" (choose_strategy; module docstring).
    - window: flash_attention's sliding window, (left, right) or an int (both); with causal the right
      edge is 0. Blocks the window leaves unseen are skipped: the ring stops once no device's rows
      see the block it would receive next, the all-gather computes only the gathered keys in reach.
      Contiguous layout only (a window already spreads the work evenly).
    - layout: "contiguous", device i holds tokens i n .. (i+1) n - 1 (n = N / P), or "zigzag": the
      tokens are in zigzag_permutation(N, P) order (q, k, v and the outputs), which saves the causal
      load balance its own exchanges.
    - GQA/MQA as flash_attention; sm_scale default 1/sqrt(D); interpret as flash_attention's.
    Returns O [B, Hq, N, Dv] sharded like its inputs (over `axis` on the sequence, other mesh axes
    replicated), or (O, LSE [B, Hq, N] float32) with return_lse.
    """
    _check_inputs(q, k, v, NAME)
    axes = _mesh_axes(mesh, axis)
    if strategy not in STRATEGIES:
        raise ValueError(f"{NAME}: argument 'strategy': expected one of {STRATEGIES}, got {strategy!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"{NAME}: argument 'layout': expected one of {LAYOUTS}, got {layout!r}")
    if not isinstance(causal, bool):
        raise ValueError(f"{NAME}: argument 'causal': expected a bool, got {causal!r}")
    left, right = window_edges(window, NAME)
    # a window that leaves the band of plain causal (or full) attention as it is changes nothing
    banded = Mask(causal=causal, window=(left, right)).band != Mask(causal=causal).band
    if banded and layout != "contiguous":
        raise ValueError(f"{NAME}: argument 'layout': expected \"contiguous\" with a window (the zigzag "
                         f"order balances causal work, which a window already spreads evenly), got {layout!r}")
    seq = q.shape[2]
    if k.shape[2] != seq:
        raise ValueError(f"{NAME}: expected q and k of one sequence length (self-attention over the split "
                         f"sequence), got Nq={seq}, Nk={k.shape[2]}")
    devices = math.prod(mesh.shape[a] for a in axes)
    zigzag = causal and not banded
    parts = 2 * devices if zigzag else devices
    if seq % parts:
        raise ValueError(f"{NAME}: expected the sequence length N={seq} divisible by "
                         f"{'2 * ' if zigzag else ''}the {devices} devices of axis {axis!r} "
                         f"({'two halves a device: the causal load balance' if zigzag else 'equal shards'}), "
                         f"got N % {parts} = {seq % parts}")
    if strategy == "auto":
        strategy = choose_strategy(q.shape, k.shape, q.dtype.itemsize, causal, devices)
    mode = kernel_mode(interpret)
    scale = 1.0 / math.sqrt(q.shape[3]) if sm_scale is None else float(sm_scale)
    plan = _Plan(strategy=strategy, causal=causal, scale=scale, mode=mode, axis=axes, devices=devices,
                 ring=ring_order(mesh, axes), ppermute_index=_ppermute_index(mesh, axes),
                 window=(left, right) if banded else None)
    if banded:  # a short window needs the positional neighbours: the linear order if it stops sooner
        linear = dataclasses.replace(plan, ring=tuple(range(devices)))
        n = seq // devices
        plan = linear if _banded_steps(linear, n) < _banded_steps(plan, n) else plan
    balance = zigzag and layout == "contiguous" and devices > 1

    def local(q, k, v):
        if balance:
            q, k, v = (_to_zigzag(x, plan) for x in (q, k, v))
        o, lse = _local_attention(plan, q, k, v)
        if balance:
            o, lse = _from_zigzag(o, plan), _from_zigzag(lse, plan)
        return o, lse

    tokens = P(None, None, axes, None)
    if AxisType.Explicit in tuple(mesh.axis_types):  # shard_map takes explicit arrays as they are placed
        q, k, v = (x if jax.typeof(x).sharding.spec == tokens else jax.reshard(x, NamedSharding(mesh, tokens))
                   for x in (q, k, v))
    o, lse = jax.shard_map(local, mesh=mesh, in_specs=(tokens, tokens, tokens),
                           out_specs=(tokens, P(None, None, axes)), check_vma=False)(q, k, v)
    return (o, lse) if return_lse else o
