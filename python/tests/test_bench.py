"""The v5e benchmark report: its arithmetic, its command line, its extrapolation (checked against a
direct profile), and one end-to-end run compiling for the v5e with the static profile."""

import dataclasses
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from pallas_flash import hardware, v5e
from pallas_flash.bench import __main__ as cli
from pallas_flash.bench import cases, estimate, measure, report, tokamax_adapter
from tpu_compiler import requires_libtpu

PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_v5e_clock_is_the_mxu_rate():
    assert hardware.TPU_V5E.clock_hz == pytest.approx(1.503e9, rel=1e-3)
    assert hardware.TPU_V5E.peak_flops == pytest.approx(4 * 128 * 128 * 2 * hardware.TPU_V5E.clock_hz)


def test_tiled_bytes_of_an_lse_column():
    [column] = v5e.parse_arrays("f32[1,16,4096,1]{3,2,1,0:T(8,128)}")
    assert column.logical_bytes == 16 * 4096 * 4
    assert column.tiled_bytes == 128 * column.logical_bytes  # one lane of each 128
    [row] = v5e.parse_arrays("f32[1,16,4096]{2,1,0:T(8,128)}")
    assert row.tiled_bytes == row.logical_bytes
    [transposed] = v5e.parse_arrays("bf16[1,4,4096,64]{2,3,1,0:T(8,128)(2,1)S(1)}")
    assert transposed.tiled_bytes == transposed.logical_bytes and transposed.memory_space == 1


def test_quadratic_fit_is_exact_on_a_parabola():
    def parabola(x):
        return 3 * x * x - 5 * x + 7

    points = [(x, parabola(x)) for x in (1, 2, 3)]
    assert estimate.quadratic_fit(points, 16) == pytest.approx(parabola(16))


def test_time_rule_takes_the_slower_of_compute_and_memory():
    chip = hardware.TPU_V5E
    compute_bound = report.estimated_time(1.503e9, 1e6, chip)
    assert compute_bound == (pytest.approx(1.0, rel=1e-3), "compute")
    memory_bound = report.estimated_time(1.0, 819e9, chip)
    assert memory_bound == (pytest.approx(1.0), "memory")
    # Four chips read four times the bytes in the same time.
    assert report.estimated_time(1.0, 4 * 819e9, chip, chips=4) == (pytest.approx(1.0), "memory")
    assert report.estimated_time(None, 1e9, chip) == (None, None)


def test_row_figures_are_consistent():
    case = cases.Case("pallas_flash", "fwd", 1, 16, 16, 4096, 4096, 128, "bf16", causal=True)
    chip = hardware.TPU_V5E
    row = report.make_row(case, chip, status="ok", source="estimate", est_cycles=3.0e6, time_s=2e-3, hbm_bytes=1e8)
    assert row["tflops"] == pytest.approx(case.flops() / 2e-3 / 1e12)
    # 4 B H D per visible (query, key) pair: N (N + 1) / 2 of them for causal self-attention
    assert case.flops() == 4 * 16 * 128 * (4096 * 4097 // 2)
    assert row["mfu"] == pytest.approx(row["tflops"] * 1e12 / 197e12)
    assert row["tokens_per_s"] == pytest.approx(4096 / 2e-3)
    assert row["tokens_per_s_per_dollar"] == pytest.approx(row["tokens_per_s"] / chip.price_per_chip_hour)
    assert row["hbm_utilization"] == pytest.approx(1e8 / 2e-3 / 819e9)
    decode = cases.Case("pallas_flash", "decode", 1, 32, 8, 1, 32768, 128, "bf16", True, mesh="2x2")
    row = report.make_row(decode, chip, status="ok", source="estimate", est_cycles=1e5, time_s=1e-4, hbm_bytes=1e8)
    assert row["chips"] == 4 and row["tokens_per_s_per_dollar"] == pytest.approx(1e4 / (4 * chip.price_per_chip_hour))


def test_price_override_is_validated():
    assert hardware.with_price(hardware.TPU_V5E, 2.5).price_per_chip_hour == 2.5
    with pytest.raises(ValueError, match="price_per_chip_hour"):
        hardware.with_price(hardware.TPU_V5E, -1)


@pytest.mark.parametrize("argv, message", [
    (["--impl", "pallas_flash,cudnn_v9"], "--impl"),
    (["--seq", "0"], "--seq"),
    (["--pass", "forward"], "--pass"),
    (["--kv-heads", "5"], "--kv-heads"),
    (["--query-tokens", "17"], "--query-tokens"),
    (["--page-size", "0,100"], "--page-size"),
    (["--heads-per-row", "0"], "--heads-per-row"),
])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(argv)
    assert message in capsys.readouterr().err


def test_unsupported_pairs_are_skipped_not_run():
    args = cli.parse_args(["--impl", "jax_flash_attention,jax_paged_attention", "--pass", "fwd,decode",
                           "--seq", "1024", "--causal", "on", "--mesh", "1x1", "--page-size", "128"])
    run, skipped = cli.build_cases(args)
    assert {(c.impl, c.pass_) for c in run} == {("jax_flash_attention", "fwd"), ("jax_paged_attention", "decode")}
    assert {(c.impl, c.pass_) for c in skipped} == {("jax_flash_attention", "decode"), ("jax_paged_attention", "fwd")}


def test_heads_packed_per_row_are_decode_rows_of_pallas_flash():
    args = cli.parse_args(["--impl", "pallas_flash,jax_paged_attention", "--pass", "fwd,decode", "--seq", "1024",
                           "--causal", "on", "--mesh", "1x1", "--page-size", "128", "--dim", "64",
                           "--heads-per-row", "1,2,3"])
    run, skipped = cli.build_cases(args)
    assert sorted((c.impl, c.pass_, c.heads_per_row) for c in run) == [
        ("jax_paged_attention", "decode", 1), ("pallas_flash", "decode", 1), ("pallas_flash", "decode", 2),
        ("pallas_flash", "fwd", 1)]
    assert {cases.supported(c) for c in skipped if c.heads_per_row == 3} == {
        "KV heads packed per row: pallas_flash, a number dividing the KV heads"}
    packed = next(c for c in run if c.heads_per_row == 2)
    assert packed.key()["heads_per_row"] == 2
    assert all(c.key()["heads_per_row"] is None for c in run if c.heads_per_row == 1)  # rows as before


def test_decode_rows_take_a_window_and_a_soft_cap_and_count_the_windows_bytes():
    args = cli.parse_args(["--impl", "pallas_flash,jax_paged_attention", "--pass", "decode", "--context", "131072",
                           "--mesh", "1x1", "--page-size", "128", "--mask", "causal,window:4096,softcap:30,chunk:512,full"])
    run, skipped = cli.build_cases(args)
    assert sorted((c.impl, c.mask) for c in run) == [
        ("jax_paged_attention", ""), ("pallas_flash", ""), ("pallas_flash", "softcap:30"),
        ("pallas_flash", "window:4096")]
    assert {cases.supported(c) for c in skipped} == {"decode masks: pallas_flash, window and softcap",
                                                      "decode: new tokens see the cache before them (causal)"}
    window = next(c for c in run if c.mask == "window:4096")
    plain = next(c for c in run if c.impl == "pallas_flash" and not c.mask)
    assert window.cache_bytes_read_per_device() * 131072 == plain.cache_bytes_read_per_device() * 4097
    assert window.flops() * 131072 == plain.flops() * 4097


def test_profiling_scales_by_batch_and_kv_heads():
    case = cases.Case("pallas_flash", "fwd", 2, 32, 8, 4096, 4096, 128, "bf16", True)
    small = case.for_profile()
    assert (small.batch, small.heads, small.kv_heads) == (1, 4, 1) and case.profile_scale == 16


def test_decode_is_profiled_whole_unless_its_caches_pass_2_gib():
    """The simulator slows DMAs from offsets past 2 GiB into an array: such a batch is profiled in
    equal parts, each within it on a chip (a 1 GiB cache whole; 4 GiB in two; 2x2 mesh: per chip)."""
    def decode(batch, context, mesh="1x1"):
        return cases.Case("pallas_flash", "decode", batch, 32, 8, 1, context, 128, "bf16", False, mesh, 128)
    for case, batch, scale in ((decode(16, 32768), 16, 1), (decode(16, 131072), 8, 2), (decode(9, 131072), 3, 3),
                               (decode(16, 131072, "2x2"), 16, 1), (decode(1, 2**21), 1, 1)):
        assert (case.for_profile().batch, case.profile_scale) == (batch, scale), case
        assert case.for_profile().trace_time_lengths


def test_measure_times_a_call():
    median, samples = measure.time_call(lambda x: x * 2, (jnp.ones(1024),), warmup=1, repeats=5)
    assert 0 < median < 1 and 1 <= len(samples) <= 5


@requires_libtpu
def test_extrapolation_matches_a_direct_profile():
    """The fit through N = L, 2L, 3L predicts the simulated cycles at 4L (here L = 512: blocks fixed,
    several key blocks per query block even at N = L, as with the planner's 2048 x 512 at L = 2048)."""
    blocks = (512, 128, 128, 128, 128, 128, 256)
    pool = estimate.WorkerPool(1, profile=True)
    try:
        def cycles(n, causal):
            case = cases.Case("pallas_flash", "fwd", 1, 1, 1, n, n, 128, "bf16", causal, blocks=blocks)
            result = pool.run({"case": case.as_json()})
            assert result["status"] == "ok", result
            return result["est_cycles"]

        for causal in (False, True):
            points = [(m, cycles(512 * m, causal)) for m in (1, 2, 3)]
            assert estimate.quadratic_fit(points, 4) == pytest.approx(cycles(2048, causal), rel=0.01)
    finally:
        pool.close()


@requires_libtpu
def test_report_end_to_end(tmp_path):
    out = tmp_path / "report.json"
    plot = tmp_path / "report.png"
    command = [sys.executable, "-m", "pallas_flash.bench", "--seq", "1024", "--pass", "fwd,decode", "--causal", "on",
               "--impl", "pallas_flash,xla_reference", "--context", "4096", "--mesh", "1x1,2x2", "--page-size", "0,128",
               "--oom-wall", "off",
               "--jobs", "2", "--json", str(out), "--plot", str(plot)]
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=PYTHON_DIR)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "v5e compiler estimate" in result.stdout and "[1/" in result.stderr  # the header, a progress line
    assert "INVALID_ARGUMENT" not in result.stderr and "TPU_WORKER_HOSTNAMES" not in result.stderr  # libtpu quiet
    data = json.loads(out.read_text())
    target = data["target"]
    for key in ("chip", "clock_hz", "peak_flops", "hbm_bytes_per_s", "hbm_capacity", "price_per_chip_hour",
                "price_source"):
        assert key in target, key
    rows = data["results"]
    assert {(r["impl"], r["pass"], r["mesh"], r["page_size"]) for r in rows} == {
        ("pallas_flash", "fwd", None, None), ("xla_reference", "fwd", None, None),
        ("pallas_flash", "decode", "1x1", 0), ("pallas_flash", "decode", "2x2", 0),
        ("pallas_flash", "decode", "1x1", 128), ("pallas_flash", "decode", "2x2", 128),
        ("xla_reference", "decode", "1x1", 0)}
    chip = hardware.TPU_V5E
    for row in rows:
        assert row["status"] == "ok" and row["source"] == "estimate", row
        assert 0 < row["mfu"] < 1 and 0 < row["hbm_utilization"] <= 1.0 + 1e-9, row
        # The rule: no faster than the estimate, no faster than the bandwidth floor.
        assert row["time_s"] >= row["est_cycles"] / chip.clock_hz * (1 - 1e-9)
        assert row["time_s"] >= row["hbm_bytes"] / (chip.hbm_bytes_per_s * row["chips"]) * (1 - 1e-9)
    ours = next(r for r in rows if r["impl"] == "pallas_flash" and r["pass"] == "fwd")
    assert ours["vmem_bytes"] > 0 and ours["spill_slots"] is not None and ours["copies"] == 0
    assert plot.stat().st_size > 10_000


def test_a_long_training_step_is_fitted_as_its_forward_plus_its_backward():
    # The backward part takes the backward's blocks for the forward's too: its step is 1024, not 4096.
    blocks = (4096, 512, 1024, 1024, 1024, 1024, 256, True)
    case = cases.Case("pallas_flash", "fwd+bwd", 1, 16, 16, 32768, 32768, 128, "bf16", False, blocks=blocks)
    assert estimate.fit_unit(case) == 4096
    backward = estimate.backward_part(case)
    assert backward.pass_ == "bwd" and backward.blocks[:2] == (1024, 1024) and estimate.fit_unit(backward) == 1024
    tokamax = dataclasses.replace(case, impl="tokamax", blocks=(2048, 1024, 512, 1024, 512, 512))
    assert estimate.fit_unit(tokamax) == 2048
    assert estimate.backward_part(tokamax).blocks[:3] == (1024, 512, 512)
    assert estimate.fit_unit(estimate.backward_part(tokamax)) == 1024
    forward = {"status": "ok", "est_cycles": 100, "bundles": 10, "spill_slots": 1, "mxu_busy": 0.5, "fit": [(1, 2)]}
    backward = {"status": "ok", "est_cycles": 300, "bundles": 30, "spill_slots": 2, "mxu_busy": 0.9, "fit": [(3, 4)]}
    total = estimate.sum_of_parts([forward, backward])
    assert (total["est_cycles"], total["bundles"], total["spill_slots"]) == (400, 40, 3)
    assert total["mxu_busy"] == pytest.approx(0.8) and total["parts_fit"] == [[(1, 2)], [(3, 4)]]
    assert estimate.sum_of_parts([forward, {"status": "error", "message": "x"}])["status"] == "error"


def test_page_tables_name_each_page_once_within_each_devices_part():
    table = cases.page_order(batch=3, pages_per_seq=8, devices=4)
    assert sorted(table.reshape(-1)) == list(range(24))
    for i in range(4):  # columns [2i, 2i+2) name pages [6i, 6i+6): device i's part of the pool
        assert set(table[:, 2 * i:2 * i + 2].reshape(-1)) == set(range(6 * i, 6 * i + 6))


@pytest.mark.parametrize("rules, causal", [("", True), ("", False), ("window:100", True), ("window:100", False),
                                           ("chunk:96", True), ("segments:5", True), ("softcap:30", True),
                                           ("window:1+softcap:2", True)])
def test_mask_flops_count_the_visible_pairs(rules, causal):
    # --mask rules: the pairs they let through, counted per row, equal the dense mask's count.
    seq = 480
    parsed = cases.MaskRules.parse(rules)
    dense = parsed.geometry(seq, seq, causal).dense(seq, seq)
    assert parsed.visible_pairs(seq, seq, causal) == int(dense.sum())
    case = cases.Case("pallas_flash", "fwd", 2, 4, 4, seq, seq, 64, "bf16", causal, mask=rules)
    assert case.flops() == 4 * 2 * 4 * 64 * int(dense.sum())


def test_mask_spans_and_bad_rules():
    assert cases.MaskRules.parse("window:4096").span(32768, True) == 4097
    assert cases.MaskRules.parse("window:4096").span(32768, False) is None  # unbounded on the right
    assert cases.MaskRules.parse("segments:8+softcap:50").span(32768, True) == 4096
    assert cases.MaskRules.parse("segments:8+softcap:50").as_chunks(32768) == "chunk:4096+softcap:50"
    assert cases.MaskRules.parse("softcap:50").span(32768, True) is None
    for bad in ("window:-1", "chunk:0", "segments:x", "tile:3"):
        with pytest.raises(ValueError, match="--mask: expected"):
            cases.MaskRules.parse(bad)


def profiles_of(cycles):
    """An Estimator whose profiles are `cycles(case)`, without workers; and the (pass, N, mask) of each
    profile it is asked for."""
    est = estimate.Estimator.__new__(estimate.Estimator)
    est.max_profile_seq, seen = 4096, []

    class Done:
        def __init__(self, value):
            self.value = value

        def result(self):
            return self.value

    def once(case):
        seen.append((case.pass_, case.seq_q, case.mask))
        return Done({"status": "ok", "est_cycles": cycles(case)})

    est._once = once
    return est, seen


def test_a_bounded_mask_is_fitted_linearly_through_whole_spans():
    # A causal window of 4096 at N = 32768 (blocks 2048 x 512): profiles at 2 and 3 spans of 6144,
    # extrapolated on the line through them; each pass of a training step apart.
    est, seen = profiles_of(lambda case: 1000 + 10 * case.seq_q)
    blocks = (2048, 512, 1024, 1024, 1024, 1024, 256, True)
    case = cases.Case("pallas_flash", "fwd", 1, 1, 1, 32768, 32768, 128, "bf16", True, blocks=blocks,
                      mask="window:4096")
    result = est._submit(case)()
    assert seen == [("fwd", 12288, "window:4096"), ("fwd", 18432, "window:4096")]
    assert result["est_cycles"] == 1000 + 10 * 32768 and result["fit"] == [(12288, 123880), (18432, 185320)]
    seen.clear()
    documents = cases.Case("pallas_flash", "fwd+bwd", 1, 1, 1, 32768, 32768, 128, "bf16", True, blocks=blocks,
                           mask="segments:8")
    assert est._submit(documents)()["est_cycles"] == 2 * (1000 + 10 * 32768)
    assert ("fwd", 8192, "chunk:4096") in seen and ("bwd", 8192, "chunk:4096") in seen


def test_tokamax_is_fitted_through_doubling_lengths_of_two_kv_heads():
    # Its profile aborts inside libtpu at N = 6144: its points double (exact on a parabola); its forward
    # profiled with two KV heads (its MHA kernels, not the MQA ones it runs for one).
    est, seen = profiles_of(lambda case: 7 + 3 * case.seq_q + case.seq_q**2 // 64)
    case = cases.fixed_blocks(cases.Case("tokamax", "fwd", 2, 16, 8, 32768, 32768, 128, "bf16", True))
    assert est._submit(case)()["est_cycles"] == 7 + 3 * 32768 + 32768**2 // 64
    unit = estimate.fit_unit(case)
    assert seen == [("fwd", unit, ""), ("fwd", 2 * unit, ""), ("fwd", 4 * unit, "")]
    profiled = case.for_profile()
    assert (profiled.batch, profiled.kv_heads, profiled.heads, case.profile_scale) == (1, 2, 4, 8)
    backward = estimate.backward_part(dataclasses.replace(case, pass_="fwd+bwd"))
    assert (backward.for_profile().kv_heads, backward.profile_scale) == (1, 16)  # its MQA backward kernel
    assert cases.Case("tokamax", "fwd", 1, 3, 3, 4096, 4096, 128, "bf16", True).for_profile().kv_heads == 3
    assert cases.fixed_blocks(dataclasses.replace(case, blocks=None, pass_="fwd+bwd")).blocks == \
        tokamax_adapter.TRAINING_BLOCKS


def test_no_tpu_compiler_fails_loudly(monkeypatch, capsys):
    # Without libtpu, one line says what to install, and the exit status is not 0.
    def no_tpu():
        raise RuntimeError("JAX TPU support not installed; cannot generate TPU topology")

    monkeypatch.setattr(v5e, "topology", no_tpu)
    monkeypatch.setattr(cli.jax, "default_backend", lambda: "cpu")
    assert cli.main(["--seq", "1024", "--pass", "fwd", "--impl", "pallas_flash", "--oom-wall", "off"]) == 2
    err = capsys.readouterr().err
    assert 'pip install "./python[v5e]"' in err and "JAX TPU support not installed" in err


@requires_libtpu
def test_errored_rows_make_the_exit_status_non_zero(monkeypatch, capsys):
    def rows(case_list, chip, estimator):
        return [report.make_row(case, chip, status="error", source="estimate", est_cycles=None, time_s=None,
                                hbm_bytes=None, message="compile worker died") for case in case_list]

    monkeypatch.setattr(cli, "estimate_rows", rows)
    argv = ["--seq", "1024", "--pass", "fwd", "--impl", "pallas_flash", "--causal", "on", "--oom-wall", "off"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "1 errored" in err and "compile worker died" in err and "--allow-errors" in err
    assert cli.main(argv + ["--allow-errors"]) == 0


def test_document_rows_take_the_plan_flash_attention_makes_for_segment_ids():
    # A documents row is profiled as chunks of its documents' length, at the blocks flash_attention
    # plans for segment ids (2048-row K/V blocks, 256 keys an update), not a plain causal mask's.
    plain = cases.fixed_blocks(cases.Case("pallas_flash", "fwd", 1, 16, 16, 32768, 32768, 128, "bf16", True))
    packed = cases.fixed_blocks(cases.Case("pallas_flash", "fwd", 1, 16, 16, 32768, 32768, 128, "bf16", True,
                                           mask="segments:8"))
    assert (plain.blocks[1], plain.blocks[-1]) == (1024, 512)
    assert (packed.blocks[1], packed.blocks[-1]) == (2048, 256)


@pytest.mark.parametrize("rules, causal", [("", False), ("", True), ("window:300", True), ("segments:4", True),
                                           ("chunk:256+softcap:20", True)])
def test_splash_block_shares_count_the_blocks_its_mask_lets_through(rules, causal):
    # Splash's own mask info (which blocks its grid runs) against a count from the dense mask: a
    # block runs where any (query, key) pair of it is visible.
    seq, block = 1024, 128
    case = cases.Case("jax_splash", "fwd", 1, 2, 2, seq, seq, 128, "bf16", causal, mask=rules,
                      blocks=(block, block, block))
    dense = cases.MaskRules.parse(rules).geometry(seq, seq, causal).dense(seq, seq)
    tiles = dense.reshape(seq // block, block, seq // block, block).any(axis=(1, 3))
    shares = cases.block_shares(case)
    assert set(shares) == {"fwd", "dq", "dkv"}
    for phase, share in shares.items():
        assert share == pytest.approx(tiles.mean()), phase
    if rules or causal:
        assert tiles.mean() < 1


@pytest.mark.parametrize("rules, causal", [("window:200+softcap:20", True), ("segments:3", True), ("", False)])
def test_splash_run_on_every_block_is_the_same_attention(rules, causal):
    # What the bench profiles for splash (its mask info dropped: every block of its grid runs, masked
    # by its mask function and segment ids) computes what splash computes, and the float64 oracle.
    import jax
    import numpy as np
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    from oracle import attention, rel_err

    seq, dim = 384, 128
    case = cases.Case("jax_splash", "fwd", 1, 2, 2, seq, seq, dim, "fp32", causal, mask=rules, blocks=(128, 128, 128))
    parsed = cases.MaskRules.parse(rules)
    q, k, v = (np.asarray(x, np.float32) for x in jax.random.normal(jax.random.PRNGKey(7), (3, 2, seq, dim)))
    ids = (np.arange(seq) * parsed.segments // seq).astype(np.int32) if parsed.segments else None
    geometry = parsed.geometry(seq, seq, causal) if ids is None else \
        dataclasses.replace(parsed, segments=None).geometry(seq, seq, causal)
    want = attention(q[None], k[None], v[None], geometry, scale=1.0, soft_cap=parsed.soft_cap,
                     segment_ids=None if ids is None else (ids[None], ids[None]))["o"][0]
    for every_block in (False, True):
        kernel = cases.splash_kernel(dataclasses.replace(case, every_block=every_block), interpret=True)
        assert (kernel.fwd_mask_info.block_mask is None) == every_block
        extra = {} if ids is None else {"segment_ids": splash.SegmentIds(q=jnp.asarray(ids), kv=jnp.asarray(ids))}
        got = np.asarray(kernel(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), **extra))
        assert rel_err(got, want) < 1e-4, every_block


requires_tokamax = pytest.mark.skipif(tokamax_adapter.available() is not None,
                                      reason=f"tokamax: {tokamax_adapter.available()}")


@requires_tokamax
@pytest.mark.parametrize("causal, soft_cap, kv_heads", [(False, None, 4), (True, None, 2), (True, 5.0, 1)])
def test_tokamax_run_on_every_block_is_the_same_attention(causal, soft_cap, kv_heads):
    # What the bench profiles for tokamax (every block of its grid run, each masked) computes what its
    # own schedule computes, forward and gradients, and the float64 oracle (MHA, GQA, MQA).
    import jax
    import numpy as np

    from oracle import attention, rel_err

    seq, dim, heads = 512, 128, 4
    blocks = (256, 256, 128, 256, 128, 128)
    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    q, do = (np.asarray(jax.random.normal(key, (1, heads, seq, dim)), np.float32) for key in keys[:2])
    k, v = (np.asarray(jax.random.normal(key, (1, kv_heads, seq, dim)), np.float32) for key in keys[2:])
    geometry = cases.MaskRules().geometry(seq, seq, causal)
    want = attention(q, k, v, geometry, scale=1 / np.sqrt(dim), soft_cap=soft_cap, do=do)
    for every_block in (False, True):
        fn = tokamax_adapter.attention(causal, soft_cap, blocks, every_block=every_block, interpret=True)
        o, vjp = jax.vjp(fn, *(jnp.asarray(x) for x in (q, k, v)))
        assert rel_err(np.asarray(o), want["o"]) < 1e-4, every_block
        for name, grad in zip(("dq", "dk", "dv"), vjp(jnp.asarray(do))):
            assert rel_err(np.asarray(grad), want[name]) < 1e-4, (every_block, name)


@requires_tokamax
@pytest.mark.parametrize("seq, causal", [(4096, True), (3072, True), (4096, False)])
def test_tokamax_block_shares_count_the_blocks_its_mask_lets_through(seq, causal):
    blocks = (1024, 512, 512, 512, 1024, 512)
    shares = tokamax_adapter.block_shares(seq, seq, causal, blocks)
    if not causal:
        assert shares == {}  # no mask info: its grid is every block
        return
    dense = cases.MaskRules().geometry(seq, seq, causal).dense(seq, seq)
    for phase, (rows, cols) in (("fwd", blocks[:2]), ("dkv", blocks[3:5])):
        tiles = dense.reshape(seq // rows, rows, seq // cols, cols).any(axis=(1, 3))
        assert shares[phase] == pytest.approx(tiles.mean()) and tiles.mean() < 1, phase


def test_tokamax_rows_say_which_masks_it_cannot_run(monkeypatch):
    window = cases.Case("tokamax", "fwd", 1, 2, 2, 4096, 4096, 128, "bf16", True, mask="window:512")
    assert "tokamax" in cases.supported(window) and "window" in cases.supported(window)
    assert "segments" in cases.supported(dataclasses.replace(window, mask="segments:4"))
    capped = dataclasses.replace(window, mask="softcap:30")
    assert cases.supported(capped) == tokamax_adapter.available()
    assert cases.fixed_blocks(capped).blocks == tokamax_adapter.BLOCKS
    assert capped.for_profile().every_block
    # A training step's full-shape compile takes the training configuration too (the inference one runs
    # out of VMEM there).
    built = []
    monkeypatch.setattr(tokamax_adapter, "attention", lambda causal, cap, config, every_block: built.append(config))
    cases._attention_fn(dataclasses.replace(capped, pass_="fwd+bwd"))
    cases._attention_fn(capped)
    cases._attention_fn(dataclasses.replace(capped, pass_="fwd+bwd", mask=""))
    assert built == [tokamax_adapter.TRAINING_BLOCKS_SOFT_CAP, tokamax_adapter.BLOCKS, tokamax_adapter.TRAINING_BLOCKS]


def test_splash_cycles_follow_the_blocks_each_kernel_runs(monkeypatch):
    monkeypatch.setattr(cases, "block_shares", lambda case: {"fwd": 0.5, "dq": 0.25, "dkv": 0.75})
    profile = {"status": "ok", "est_cycles": 1100, "kernels": [
        {"name": "splash_mha_fwd_residuals.1", "cycles": 400}, {"name": "splash_mha_dq_no_residuals.2", "cycles": 400},
        {"name": "splash_mha_dkv_no_residuals.3", "cycles": 200}]}
    case = cases.Case("jax_splash", "fwd+bwd", 1, 1, 1, 4096, 4096, 128, "bf16", True)
    scheduled = estimate.splash_schedule(case, profile)
    # 100 cycles of other ops (the scaling of q) kept as they are.
    assert [k["cycles"] for k in scheduled["kernels"]] == [200, 100, 150]
    assert scheduled["est_cycles"] == 100 + 450 and scheduled["every_block_cycles"] == 1100
    assert estimate.splash_schedule(case, {"status": "error"}) == {"status": "error"}


def test_kernels_are_fitted_as_the_program_is():
    def point(m):
        return {"kernels": [{"name": "a", "cycles": 3 * m * m + 1}, {"name": "b", "cycles": 5 * m + 2}]}

    fitted = estimate.fitted_kernels((2, 3, 4), [point(m) for m in (2, 3, 4)], 8)
    assert [k["cycles"] for k in fitted] == [3 * 64 + 1, 42]
    mixed = [point(2), point(3), {"kernels": [{"name": "c", "cycles": 9}]}]
    assert estimate.fitted_kernels((2, 3, 4), mixed, 8) == [{"name": "c", "cycles": 9}]


def test_an_instruction_written_over_several_lines_is_read_whole():
    # Splash's kernel metadata puts newlines inside an attribute, and the instruction goes on after a
    # line that begins with "}" like a computation's end: its backend config (the kernel's cycles) and
    # the instructions after it are still read.
    text = "\n".join([
        "HloModule m",
        "",
        "ENTRY %main (p: bf16[8,128]) -> bf16[8,128] {",
        "  %p = bf16[8,128]{1,0} parameter(0)",
        '  %k.1 = bf16[8,128]{1,0} custom-call(%p), custom_call_target="tpu_custom_call", '
        'frontend_attributes={kernel_metadata={',
        '"xprof_metadata":"{\\"block_q\\": 1024}"',
        '}}, metadata={op_name="splash"}, backend_config={"bundle_analysis_data":{"estimated_cycles":"90743"}}',
        "  ROOT %c = bf16[8,128]{1,0} copy(%k.1)",
        "}",
    ])
    entry = v5e.entry_instructions(text)
    assert [i.name for i in entry] == ["p", "k.1", "c"]
    program = v5e.CompiledProgram(text, None, entry, {})
    assert [(k.name, k.estimated_cycles) for k in program.kernels] == [("k.1", 90743)]
    assert [i.name for i in v5e.computations(text)["ENTRY"]] == ["p", "k.1", "c"]
