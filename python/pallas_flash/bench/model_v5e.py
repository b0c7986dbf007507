"""The model report's v5e rows: each pass compiled for the 2x2 mesh and timed op by op
(pallas_flash.bench.program), its Pallas kernels priced by their own static profiles
(pallas_flash.bench.estimate). A v5e compiler estimate, not a measurement."""

from __future__ import annotations

import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_flash import v5e
from pallas_flash.bench import cases as attention_cases
from pallas_flash.bench import program
from pallas_flash.bench.estimate import Estimator
from pallas_flash.bench.model import PAGE_SIZE, V5E_DEVICES, ModelCase, finish_row, skip_reason
from pallas_flash.decode import packed_heads_per_row
from pallas_flash.hardware import TPU_V5E, with_price
from pallas_flash.models import attention as attention_impls
from pallas_flash.models import generate, llama, train

# How many times each layer runs the attention kernels in a pass: the training step's layers are
# rematerialised (jax.checkpoint), so its forward kernel runs twice, once more in the backward.
KERNEL_CALLS = {"train": {"fwd": 2, "bwd": 1}, "prefill": {"fwd": 1}, "decode": {"decode": 1}}
KERNEL_IMPL = {"pallas_flash": "pallas_flash", "jax_flash": "jax_flash_attention"}


def mesh() -> Mesh:
    return Mesh(np.array(v5e.topology().devices).reshape(2, 2), ("x", "y"), axis_types=(AxisType.Explicit,) * 2)


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def build(case: ModelCase, m: Mesh):
    """(fn, abstract args, jit options) of one pass on the mesh."""
    c = llama.config(case.model)
    axes = tuple(m.axis_names)
    attn = attention_impls.attention_fn(case.attention, window=c.window, logits_soft_cap=c.logits_soft_cap,
                                        interpret=False, mesh=m if case.pass_ == "train" else None
                                        ) if case.pass_ != "decode" else None  # prefill: already per device
    if case.pass_ == "train":
        params, opt_state = train.abstract_state(c)
        ps, os_ = train.state_shardings(params, m), train.state_shardings(opt_state, m)
        tokens = jax.ShapeDtypeStruct((case.batch, case.seq), jnp.int32, sharding=NamedSharding(m, P(axes, None)))
        step = train.make_train_step(c, attn, mesh=m)
        args = (_abstract(params, ps), _abstract(opt_state, os_), tokens)
        return step, args, dict(in_shardings=(ps, os_, tokens.sharding),
                                out_shardings=(ps, os_, NamedSharding(m, P())), donate_argnums=(0, 1))
    params = jax.eval_shape(lambda: llama.init_params(c, jax.random.PRNGKey(0), jnp.bfloat16))
    replicated = jax.tree.map(lambda _: NamedSharding(m, P()), params)
    split = "batch" if case.batch % V5E_DEVICES == 0 else "sequence"
    # KV heads packed per row where D < 128 (D = 64: the pools' rows would be padded to twice their bytes).
    cache = generate.abstract_cache(c, case.batch, case.seq, page_size=PAGE_SIZE, devices=V5E_DEVICES, split=split,
                                    heads_per_row=packed_heads_per_row(c.kv_heads, c.head_dim))
    cache_sh = generate.cache_shardings(cache, m)
    abstract_cache = _abstract(cache, cache_sh)
    if case.pass_ == "prefill":
        tokens = jax.ShapeDtypeStruct((case.batch, case.seq), jnp.int32, sharding=NamedSharding(m, P(axes, None)))
        fn = lambda p, t, cache: generate.prefill(c, p, t, cache, attn, mesh=m)  # noqa: E731
    else:
        tokens = jax.ShapeDtypeStruct((case.batch,), jnp.int32,
                                      sharding=NamedSharding(m, P(axes) if split == "batch" else P()))
        fn = lambda p, t, cache: generate.decode_step(c, p, t, cache, mesh=m, interpret=False,  # noqa: E731
                                                      context=case.seq, attention=case.attention)
    # The cache row-major at the program's boundary, as the kernels read it: jit's default layout for
    # a bf16 [..., 128, 64] array puts the page positions minor, and the pools would be copied into
    # the kernels' layout and back every step.
    from jax.experimental.layout import Format, Layout

    def row_major(sharding, shape):
        return Format(Layout(major_to_minor=tuple(range(len(shape)))), sharding)

    cache_formats = jax.tree.map(lambda a, sh: row_major(sh, a.shape), cache, cache_sh)
    # The weights in the layout the program asks for (Layout.AUTO): a server places them once with the
    # compiled program's input formats; a default layout would be relaid out (copied) every step.
    weight_formats = jax.tree.map(lambda sh: Format(Layout.AUTO, sh), replicated)
    in_shardings = (weight_formats, tokens.sharding, cache_formats)
    out_shardings = (NamedSharding(m, P(axes) if split == "batch" or case.pass_ == "prefill" else P()), cache_formats)
    return fn, (_abstract(params, replicated), tokens, abstract_cache), dict(
        in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=(2,))


@dataclasses.dataclass(frozen=True)
class KernelCall:
    """One kind of attention kernel call of a layer on one chip: `case` profiled, its cycles times
    `scale`, times (when `sharing` is set: a GQA group and its MHA head at a length short enough to
    profile the group) the group's cycles over `group` MHA heads' at that length."""

    case: attention_cases.Case
    scale: int
    sharing: tuple[attention_cases.Case, attention_cases.Case, int] | None = None
    layers: int = 0  # the model's layers that make this call (0: every layer)


def _mask(c: llama.LlamaConfig, window: int | None) -> str:
    """The attention benchmark's mask rules of a layer with this window and the model's soft cap."""
    rules = ([f"window:{window}"] if window is not None else []) + (
        [f"softcap:{c.logits_soft_cap:g}"] if c.logits_soft_cap is not None else [])
    return "+".join(rules)


def kernel_cases(case: ModelCase, max_group_seq: int = 4096) -> dict[str, KernelCall]:
    """The attention kernel calls of the layers of one chip, one entry per pass and layer window
    (_kernel_cases, per window, with its share of the layers); keys "fwd", "bwd", "decode", suffixed
    "@w<window>" or "@global" where the layers' windows differ."""
    c = llama.config(case.model)
    windows = c.layer_windows()
    out = {}
    for window in dict.fromkeys(windows):
        layers = c.layers * windows.count(window) // len(windows)
        suffix = "" if len(set(windows)) == 1 else ("@global" if window is None else f"@w{window}")
        for kind, call in _kernel_cases(case, _mask(c, window), max_group_seq).items():
            out[kind + suffix] = dataclasses.replace(call, layers=layers)
    return out


def _kernel_cases(case: ModelCase, mask: str, max_group_seq: int) -> dict[str, KernelCall]:
    """The attention kernel calls of one layer of one chip, as the attention benchmark's cases.
    Training and prefill: one KV head's group of one sequence, scaled by the chip's sequences x KV
    heads. Past `max_group_seq` a group is not simulated (a group of 4 heads at N = 6144 took the
    simulator past 9 GB and 27 minutes here): one MHA head is, fitted and scaled by the query heads,
    then corrected by the group's sharing of K and V measured at max_group_seq (for JAX's flash
    attention, MHA with K and V repeated, the MHA head is the kernel). Decode: profiled whole."""
    c = llama.config(case.model)
    impl = KERNEL_IMPL.get(case.attention)
    if impl is None:
        return {}
    if case.pass_ == "decode":
        # A chip decodes its own sequences whole, or (the cache split along the sequence) every
        # sequence's quarter: profiled as that one-chip decode (the 2x2 program's profile aborts
        # inside libtpu's DMA latency model at a 32768 context); the partials' all-gather and merge
        # are in the model's program.
        split_batch = case.batch % V5E_DEVICES == 0
        decode = attention_cases.Case(
            impl, "decode", case.batch // V5E_DEVICES if split_batch else case.batch, c.heads, c.kv_heads, 1,
            case.seq if split_batch else case.seq // V5E_DEVICES, c.head_dim, "bf16", True, page_size=PAGE_SIZE,
            mask=mask, heads_per_row=packed_heads_per_row(c.kv_heads, c.head_dim))
        return {"decode": KernelCall(decode, decode.profile_scale)}
    sequences = case.batch // V5E_DEVICES
    group = c.heads // c.kv_heads
    passes = ("fwd", "bwd") if case.pass_ == "train" else ("fwd",)
    out = {}
    for pass_ in passes:
        def at(n, heads, kv_heads):
            k = attention_cases.Case(impl, pass_, 1, heads, kv_heads, n, n, c.head_dim, "bf16", True, mask=mask)
            return attention_cases.fixed_blocks(k) if impl == "jax_flash_attention" else k
        if impl == "jax_flash_attention" or group == 1:
            out[pass_] = KernelCall(at(case.seq, 1, 1), sequences * c.heads)
        elif case.seq <= max_group_seq:
            out[pass_] = KernelCall(at(case.seq, group, 1), sequences * c.kv_heads)
        else:
            out[pass_] = KernelCall(at(case.seq, 1, 1), sequences * c.heads,
                                    (at(max_group_seq, group, 1), at(max_group_seq, 1, 1), group))
    return out


def _kernel_seconds(call: KernelCall, profile: dict, sharing: tuple[dict, dict] | None) -> float | None:
    results = [profile] + list(sharing or ())
    if any(r.get("status") != "ok" or r.get("est_cycles") is None for r in results):
        return None
    cycles = profile["est_cycles"] * call.scale
    if sharing:
        grouped, single = sharing
        cycles *= grouped["est_cycles"] / (call.sharing[2] * single["est_cycles"])
    compute = cycles / TPU_V5E.clock_hz
    if call.case.pass_ == "decode":  # memory bound: the cache a chip holds, read once, at 819 GB/s
        read = 2 * call.case.cache_bytes_read_per_device()
        return max(compute, read / TPU_V5E.hbm_bytes_per_s)
    return compute


def run(case_list: list[ModelCase], args) -> tuple[list[dict], dict]:
    chip = with_price(TPU_V5E, args.price_per_chip_hour)
    log = sys.stderr
    print("calibrating the op rule against the compiler's profile (two small programs)", file=log, flush=True)
    calibration = program.calibrate(chip)
    m = mesh()
    estimator = Estimator(args.jobs, log=log)
    pending = []
    rows = []
    try:
        for case in case_list:
            common = dict(target="v5e", chip_name=f"{chip.name} x{V5E_DEVICES} (2x2)", chips=V5E_DEVICES,
                          price_per_chip_hour=chip.price_per_chip_hour, peak_flops=chip.peak_flops,
                          source="v5e compiler estimate")
            reason = skip_reason(case, "v5e")
            if reason:
                rows.append(finish_row(case, seconds=None, attention_seconds=None, status="skipped", note=reason,
                                       **common))
                continue
            kernels = kernel_cases(case)
            # Profiled in the workers while this process compiles.
            profiles = {kind: (estimator.profile(call.case), call.sharing and (
                estimator.profile(call.sharing[0]), estimator.profile(call.sharing[1]))) for kind, call in kernels.items()}
            start = time.perf_counter()
            try:
                fn, abstract_args, options = build(case, m)
                prog = v5e.compile_for_v5e(fn, *abstract_args, **options)
            except v5e.CompileError as exc:
                rows.append(finish_row(case, seconds=None, attention_seconds=None,
                                       status="oom" if exc.oom else "error", note=exc.summary, **common))
                continue
            except Exception as exc:  # a model this implementation cannot build: the row says why
                message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                print(f"  {case}: {type(exc).__name__}: {message}", file=log, flush=True)
                rows.append(finish_row(case, seconds=None, attention_seconds=None, status="error",
                                       note=f"{type(exc).__name__}: {message}", **common))
                continue
            print(f"  compiled {case}: {time.perf_counter() - start:.0f} s, "
                  f"{prog.hbm_bytes_in_use / 2**30:.2f} GiB a chip", file=log, flush=True)
            pending.append((case, common, prog, kernels, profiles))
        for case, common, prog, kernels, profiles in pending:
            cost = program.program_cost(prog, chip, V5E_DEVICES)
            c = llama.config(case.model)
            kernel_time, missing = 0.0, []
            for kind, call in kernels.items():
                profile, sharing = profiles[kind]
                seconds = _kernel_seconds(call, profile(), sharing and (sharing[0](), sharing[1]()))
                if seconds is None:
                    missing.append(kind)
                    continue
                kernel_time += seconds * KERNEL_CALLS[case.pass_][call.case.pass_] * (call.layers or c.layers)
            if kernels and not cost.kernels():
                missing.append("no Pallas kernel in the compiled program")
            xla = cost.seconds()
            total = xla + kernel_time
            note = [f"XLA ops {xla * 1e3:.1f} ms (of which memory-bound {cost.seconds(bound='memory') * 1e3:.1f}, "
                    f"collectives {cost.seconds(bound='ici') * 1e3:.1f}: {cost.received_bytes() / 1e9:.2f} GB received "
                    f"in {cost.collectives()} transfers), attention kernels {kernel_time * 1e3:.1f} ms"]
            status = "ok"
            if missing:
                status, total = "error", None
                note.append("kernel profile failed: " + ", ".join(missing))
            hbm = prog.hbm_bytes_in_use
            if hbm > chip.hbm_capacity:
                status = "oom"
            rows.append(finish_row(case, seconds=total, attention_seconds=cost.seconds(attention=True) + kernel_time
                                   if total else None, status=status, hbm_bytes=hbm, note="; ".join(note),
                                   xla_ops_seconds=xla, kernel_seconds=kernel_time,
                                   ici_received_bytes=cost.received_bytes(), **common))
    finally:
        estimator.close()
    meta = {"target": "v5e", "chip": chip.as_json(), "devices": V5E_DEVICES, "calibration": calibration,
            "method": [
                "v5e compiler estimate (deviceless jax 0.10.2 / libtpu 0.0.42.1, v5e:2x2), not a measurement",
                "XLA ops: XLA:TPU's per-op cost model, held to HBM bytes / 819 GB/s; loops counted per trip",
                "collectives: bytes a chip receives / 400 GB/s ICI + 10 us each; exposed unless fused with a matmul",
                "attention kernels: their static profiles (one KV head's group of one sequence, scaled; past "
                "N = 4096 one MHA head fitted, scaled by query heads and corrected by the group's K/V sharing "
                "measured at 4096; decode whole), x layers x calls per layer (training: the forward twice, "
                "rematerialised); layers of different windows (a Gemma-style pattern) profiled apart",
                "calibration (rule / profile): " + ", ".join(
                    f"{label}: {v['rule_over_profile']:.2f}x" for label, v in calibration.items()
                    if v.get("rule_over_profile")),
                "MFU: model FLOPs (6 x matmul weights x tokens + attention, rematerialisation not counted) "
                "over 197 TFLOP/s a chip"]}
    return rows, meta
