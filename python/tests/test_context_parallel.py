"""context_parallel_attention on the four CPU devices (and eight, in a child process): the forward, the
LSE and every gradient against the float64 oracle and the single-device flash_attention, for both
strategies, causal and full, GQA, each mesh axis and both together, both layouts, both CPU kernel
paths; the cost model's choices; the errors."""

import os
import subprocess
import sys
import textwrap
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import oracle
import pallas_flash as pf
from pallas_flash import context_parallel as cp
from pallas_flash import hardware
from pallas_flash.backend import kernel_mode, use_cpu_kernels
from pallas_flash.mask import Mask


def _mesh(axis_type=AxisType.Explicit):
    return Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("x", "y"), axis_types=(axis_type,) * 2)


def _inputs(batch, heads_q, heads_kv, seq, dim, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(keys[0], (batch, heads_q, seq, dim), dtype),
            jax.random.normal(keys[1], (batch, heads_kv, seq, dim), dtype),
            jax.random.normal(keys[2], (batch, heads_kv, seq, dim), dtype),
            jax.random.normal(keys[3], (batch, heads_q, seq, dim), dtype))


def _run(fn, q, k, v, do):
    """(O, LSE, dQ, dK, dV) of fn(q, k, v) -> (O, LSE), jitted, the gradients for the cotangent do."""
    (o, lse), vjp = jax.vjp(jax.jit(fn), q, k, v)
    return (o, lse, *vjp((do, jnp.zeros_like(lse))))


def _check_against_oracle(got, q, k, v, do, causal, tol):
    seq = q.shape[2]
    want = oracle.attention(q, k, v, Mask.bottom_right(seq, seq, causal=causal), do=do)
    oracle.assert_lse_close(got[1], want["lse"], tol=tol)
    for name, value in zip(("o", "lse", "dq", "dk", "dv"), got):
        if name != "lse":
            assert oracle.rel_err(value, want[name]) < tol, (name, oracle.rel_err(value, want[name]))


def _kernel_paths(every: list, interpreted: list) -> list:
    """(cpu_kernels, *case) parameters: every case on the C++ kernels, the `interpreted` few also on the
    Pallas kernels in TPU interpret mode (each a minute or two on two cores). What varies between the
    cases (mesh axes, GQA, windows) is the context-parallel schedule around the kernels, the same on
    both paths; interpret mode checks that the Pallas kernels take a shard's offsets."""
    return [("cpp", *case) for case in every] + [("interpret", *case) for case in interpreted]


def _id(value):
    """Test ids: a tuple (axes, heads, a window) as a:b; anything else pytest's own."""
    return ":".join("none" if v is None else str(v) for v in value) if isinstance(value, tuple) else None


_AXES = [("x", (4, 2)), ("y", (2, 1)), (("x", "y"), (4, 4)), (("y", "x"), (6, 2))]
_AXIS_CASES = [(strategy, causal, axis, heads) for strategy in ("all_gather", "ring") for causal in (False, True)
               for axis, heads in _AXES]


@pytest.mark.parametrize("cpu_kernels, strategy, causal, axis, heads", _kernel_paths(
    _AXIS_CASES, [case for case in _AXIS_CASES if case[2] in ("y", ("x", "y"))]), indirect=["cpu_kernels"], ids=_id)
def test_forward_and_gradients_equal_one_device(cpu_kernels, strategy, causal, axis, heads):
    # The interpreter runs each device's kernels inside shard_map: small shards keep it quick, and one
    # sequence (jax 0.10.2's TPU interpreter deadlocks in its buffer allocation callbacks with four
    # devices' grids of two sequences on a 2-core host).
    interpret = cpu_kernels == "interpret"
    seq = 64 if interpret else 200 if not causal else 208
    mesh = _mesh()
    q, k, v, do = _inputs(1 if interpret else 2, *heads, seq, 32, seed=zlib.crc32(repr((strategy, causal, axis)).encode()))
    got = _run(lambda q, k, v: pf.context_parallel_attention(q, k, v, mesh, axis, strategy=strategy, causal=causal,
                                                             return_lse=True), q, k, v, do)
    _check_against_oracle(got, q, k, v, do, causal, tol=2e-5)
    single = _run(lambda q, k, v: pf.flash_attention(q, k, v, causal=causal, return_lse=True), q, k, v, do)
    for a, b in zip(got, single):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    for x in got[:1] + got[2:]:  # sharded over `axis` on the sequence (trailing Nones may be dropped)
        assert tuple(x.sharding.spec)[:3] == (None, None, axis)


_WINDOW_CASES = [(strategy, causal, window) for strategy in ("all_gather", "ring")
                 for causal, window in [(True, (5, 0)), (True, (40, 0)), (False, (20, 20)), (False, (0, 50)),
                                        (False, (None, 3)), (True, (None, 0))]]


@pytest.mark.parametrize("cpu_kernels, strategy, causal, window", _kernel_paths(
    _WINDOW_CASES, [case for case in _WINDOW_CASES if case[2] in ((5, 0), (None, 3))]), indirect=["cpu_kernels"], ids=_id)
def test_sliding_windows_equal_one_device(cpu_kernels, strategy, causal, window):
    mesh = _mesh()
    q, k, v, do = _inputs(1, 4, 2, 128, 16, seed=zlib.crc32(repr((strategy, causal, window)).encode()))
    got = _run(lambda q, k, v: pf.context_parallel_attention(q, k, v, mesh, ("y", "x"), strategy=strategy,
                                                             causal=causal, window=window, return_lse=True),
               q, k, v, do)
    want = oracle.attention(q, k, v, Mask.bottom_right(128, 128, causal=causal, window=window), do=do)
    oracle.assert_lse_close(got[1], want["lse"], tol=2e-5)
    for name, value in zip(("o", "lse", "dq", "dk", "dv"), got):
        if name != "lse":
            assert oracle.rel_err(value, want[name]) < 2e-5, name


def test_a_window_stops_the_ring_where_no_row_sees_the_next_block():
    # 32 tokens a device, causal: a window of 5 reaches one block back (one ring step, on the linear
    # ring order), 40 two, an unbounded one (plain causal, zigzag) all three steps and the layout's
    # exchanges; the backward adds the accumulators' way home.
    mesh = _mesh()
    q = jnp.ones((1, 4, 128, 16))

    def permutes(window):
        attend = jax.jit(lambda q: pf.context_parallel_attention(q, q, q, mesh, ("x", "y"), strategy="ring",
                                                                 causal=True, window=window))
        text = attend.lower(q).compile().as_text()
        return text.count(" collective-permute(") + text.count(" collective-permute-start(")

    assert permutes((5, 0)) == 1 and permutes((40, 0)) == 2
    assert permutes(None) > 3


@pytest.mark.parametrize("strategy", ["all_gather", "ring"])
def test_auto_axes_and_bfloat16(strategy):
    # A mesh of Auto axes (jax.sharding.Mesh's default), bf16 inputs: the result of the float64 oracle
    # at bf16's precision; the partial outputs are merged in float32, so the ring loses nothing to
    # rounding between steps beyond each kernel's own bf16 output.
    mesh = _mesh(AxisType.Auto)
    q, k, v, do = _inputs(1, 4, 2, 512, 64, jnp.bfloat16, seed=3)
    with use_cpu_kernels("cpp"):
        if kernel_mode(None) != "cpu":
            pytest.skip("the C++ kernels are not built")
        got = _run(lambda q, k, v: pf.context_parallel_attention(q, k, v, mesh, ("x", "y"), strategy=strategy,
                                                                 causal=True, return_lse=True), q, k, v, do)
    _check_against_oracle(got, q, k, v, do, True, tol=2e-2)
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32


@pytest.mark.parametrize("strategy", ["all_gather", "ring"])
def test_long_sequence(strategy):
    # N = 16384 over four devices (4096 each), causal, GQA: the C++ kernels against one device's.
    with use_cpu_kernels("cpp"):
        if kernel_mode(None) != "cpu":
            pytest.skip("the C++ kernels are not built")
        q, k, v, do = _inputs(1, 2, 1, 16384, 64, seed=5)
        got = _run(lambda q, k, v: pf.context_parallel_attention(q, k, v, _mesh(), ("x", "y"), strategy=strategy,
                                                                 causal=True, return_lse=True), q, k, v, do)
        want = _run(lambda q, k, v: pf.flash_attention(q, k, v, causal=True, return_lse=True), q, k, v, do)
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), got, want):
        assert oracle.rel_err(a, b) < 1e-5, name


@pytest.mark.parametrize("causal", [False, True])
def test_zigzag_layout_takes_and_returns_the_permuted_order(causal):
    with use_cpu_kernels("cpp"):
        if kernel_mode(None) != "cpu":
            pytest.skip("the C++ kernels are not built")
        mesh = _mesh()
        q, k, v, do = _inputs(1, 2, 2, 128, 32, seed=9)
        order = cp.zigzag_permutation(128, 4)
        assert sorted(order) == list(range(128)) and list(order[:16]) == list(range(16))
        assert list(order[16:32]) == list(range(112, 128))  # device 0: halves 0 and 7
        natural = _run(lambda q, k, v: pf.context_parallel_attention(q, k, v, mesh, ("x", "y"), causal=causal,
                                                                     return_lse=True), q, k, v, do)
        permuted = _run(lambda q, k, v: pf.context_parallel_attention(q, k, v, mesh, ("x", "y"), causal=causal,
                                                                      return_lse=True, layout="zigzag"),
                        *(x[:, :, order] for x in (q, k, v, do)))
    for a, b in zip(natural, permuted):
        np.testing.assert_allclose(np.asarray(a)[:, :, order], b, rtol=1e-5, atol=1e-5)


def test_ring_order_is_a_cycle_of_neighbours_on_the_2x2():
    mesh = _mesh()
    assert cp.ring_order(mesh, ("x", "y")) == (0, 1, 3, 2)
    assert cp.ring_order(mesh, ("x",)) == (0, 1)
    ring = cp.ring_order(mesh, ("x", "y"))
    for a, b in zip(ring, ring[1:] + ring[:1]):  # (row, col) of consecutive devices differ in one coordinate
        assert sum(x != y for x, y in zip(divmod(a, 2), divmod(b, 2))) == 1


def test_cost_model_choices():
    shape = (1, 16, 524288, 128)
    costs = cp.strategy_costs(shape, shape, 2, True, 4)
    # the all-gather's working set at N = 524288 (K, V and f32 dK, dV of the whole sequence) is 12 GiB
    assert costs["all_gather"].peak_bytes == 4 * (2 * 16 * 131072 * 128 * 2 + 2 * 16 * 131072 * 128 * 4)
    assert cp.choose_strategy(shape, shape, 2, True, 4) == "ring"
    # long shards: the ring's transfers hide, its time is the compute and its per-step passes
    ring = costs["ring"]
    assert ring.step_s == pytest.approx(ring.compute_s + ring.hbm_s, rel=1e-9)
    # one KV head (MQA), short shards: little to move, and the ring's per-step float32 merges of the
    # 16 query heads' O cost more than the all-gather's unhidden gather
    short_q, short_k = (1, 16, 4096, 128), (1, 1, 4096, 128)
    assert cp.choose_strategy(short_q, short_k, 2, True, 4) == "all_gather"
    # a slow collective (1 ms each) favours the one gather over 2 (P - 1) ring steps
    mha = (1, 16, 4096, 128)
    assert cp.choose_strategy(mha, mha, 2, True, 4) == "ring"
    assert cp.choose_strategy(mha, mha, 2, True, 4, ici_latency_s=1e-3) == "all_gather"
    for n in (4096, 65536, 524288):  # no strategy is modelled faster than its own compute
        s = (1, 16, n, 128)
        for cost in cp.strategy_costs(s, s, 2, True, 4).values():
            assert cost.step_s >= cost.compute_s
    # a chip with a tiny HBM forces the ring whatever the times; one device has nothing to split
    tiny = hardware.Chip("tiny", 197e12, 819e9, 1 << 20, None, 1.0, "test")
    assert cp.choose_strategy(short_q, short_k, 2, True, 4, chip=tiny) == "ring"
    assert cp.choose_strategy(mha, mha, 2, True, 1) == "all_gather"


def test_bad_arguments_raise_naming_them():
    mesh = _mesh()
    q, k, v, _ = _inputs(1, 2, 2, 64, 16)
    call = pf.context_parallel_attention
    with pytest.raises(ValueError, match="'axis'.*'z'"):
        call(q, k, v, mesh, "z")
    with pytest.raises(ValueError, match="'axis'"):
        call(q, k, v, mesh, ("x", "x"))
    with pytest.raises(ValueError, match="'mesh'"):
        call(q, k, v, None, "x")
    with pytest.raises(ValueError, match="'strategy'.*'ulysses'"):
        call(q, k, v, mesh, "x", strategy="ulysses")
    with pytest.raises(ValueError, match="'layout'"):
        call(q, k, v, mesh, "x", layout="striped")
    with pytest.raises(ValueError, match="'layout'.*with a window"):
        call(q, k, v, mesh, "x", causal=True, window=(8, 0), layout="zigzag")
    with pytest.raises(ValueError, match="'window'"):
        call(q, k, v, mesh, "x", window=-1)
    with pytest.raises(ValueError, match="divisible by 2 \\* the 4 devices"):
        call(q[:, :, :36], k[:, :, :36], v[:, :, :36], mesh, ("x", "y"), causal=True)
    with pytest.raises(ValueError, match="Nq=32, Nk=64"):
        call(q[:, :, :32], k, v, mesh, "x")
    with pytest.raises(ValueError, match="rank 4"):
        call(q[0], k, v, mesh, "x")
    with pytest.raises(ValueError, match="zigzag_permutation"):
        cp.zigzag_permutation(100, 4)


def test_eight_devices_in_a_child_process():
    # A 2x4 mesh of eight host devices (the device count is fixed when JAX starts: a child process).
    script = textwrap.dedent("""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh
        import pallas_flash as pf
        mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("x", "y"))
        keys = jax.random.split(jax.random.key(1), 4)
        q = jax.random.normal(keys[0], (1, 4, 256, 32)); k = jax.random.normal(keys[1], (1, 2, 256, 32))
        v = jax.random.normal(keys[2], (1, 2, 256, 32)); do = jax.random.normal(keys[3], (1, 4, 256, 32))
        def run(f):
            o, vjp = jax.vjp(jax.jit(f), q, k, v)
            return (o, *vjp(do))
        want = run(lambda q, k, v: pf.flash_attention(q, k, v, causal=True))
        worst = 0.0
        for strategy in ("all_gather", "ring"):
            for axis in ("y", ("x", "y")):
                got = run(lambda q, k, v: pf.context_parallel_attention(q, k, v, mesh, axis, strategy=strategy,
                                                                        causal=True))
                worst = max([worst] + [float(jnp.max(jnp.abs(a - b))) for a, b in zip(got, want)])
        print("devices", len(jax.devices()), "worst", worst)
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    devices, worst = result.stdout.split()[1], float(result.stdout.split()[3])
    assert devices == "8" and worst < 1e-4, result.stdout


def test_two_processes_on_localhost():
    # jax.distributed with a local coordinator: two processes of two CPU devices form one 2x2 mesh
    # (multiprocess_worker.py); context parallelism and the sharded decode on arrays that span both.
    import socket

    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = str(probe.getsockname()[1])
    worker = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    processes = [subprocess.Popen([sys.executable, worker, str(rank), port], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env) for rank in (0, 1)]
    try:
        outputs = [p.communicate(timeout=600) for p in processes]
    finally:
        for p in processes:
            p.kill()
    for p, (_, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-3000:]
    line = next(x for x in outputs[0][0].splitlines() if x.startswith("RESULT"))
    _, _, worst_attention, _, worst_decode = line.split()
    assert float(worst_attention) < 1e-4 and float(worst_decode) < 1e-5, line
