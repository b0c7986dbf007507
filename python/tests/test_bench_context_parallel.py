"""The context-parallel rows of the v5e benchmark: the calls each chip makes (balanced, as
context_parallel lays them out), the linear rule for long causal key ranges and the rectangular fit
(each checked against a direct profile), the modelled time, the collectives read from a compiled
program, and one end-to-end run."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from pallas_flash import hardware
from pallas_flash.bench import cases, estimate
from pallas_flash.bench import context_parallel as cp
from tpu_compiler import requires_libtpu

PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _case(strategy, causal, seq=16384, pass_="fwd", heads=16, kv_heads=16):
    return cases.Case("pallas_flash", pass_, 1, heads, kv_heads, seq, seq, 128, "bf16", causal, mesh="2x2",
                      context_parallel=strategy)


@pytest.mark.parametrize("strategy", ["all_gather", "ring"])
@pytest.mark.parametrize("causal", [True, False])
def test_every_chip_does_a_quarter_of_the_visible_pairs(strategy, causal):
    # The calls of the slowest chip in each step, summed, see exactly a P-th of the sequence's
    # (query, key) pairs: zigzag balances causal work to the pair, for both strategies.
    case = _case(strategy, causal)
    total = cases.MaskRules().visible_pairs(case.seq_q, case.seq_k, causal)
    per_chip = 0
    for step in cp.kernel_steps(case):
        work = [sum(cases.MaskRules().visible_pairs(c.seq_q, c.seq_k, c.causal) for c in calls) for calls in step]
        assert len(set(work)) == 1, work  # every alternative of a step is the same work
        per_chip += work[0]
        assert all(c.mesh == "1x1" and not c.context_parallel for calls in step for c in calls)
    assert per_chip * case.devices == total
    assert len(cp.kernel_steps(case)) == (case.devices if strategy == "ring" else 1)


def test_unsupported_context_parallel_cases_say_why():
    assert cases.supported(_case("ring", True)) is None
    assert "divisible by 8" in cases.supported(_case("ring", True, seq=16388))
    assert "fwd or fwd+bwd" in cases.supported(dataclasses.replace(_case("ring", True), mask="window:64"))
    assert "several chips" in cases.supported(dataclasses.replace(_case("ring", True), mesh="1x1"))
    assert _case("ring", True).key()["context_parallel"] == "ring" and _case("ring", True).key()["mesh"] == "2x2"


class _FakeEstimator:
    """Profiles whose cycles are a known function of the call (linear in the key range)."""

    def __init__(self):
        self.asked = []

    def profile(self, case):
        self.asked.append(case)
        cycles = 1000 + 7 * case.seq_q * case.seq_k // 4096 + (500 if case.causal else 0)
        return lambda: {"status": "ok", "est_cycles": cycles}


def test_long_causal_key_ranges_are_taken_from_two_profiles():
    fake = _FakeEstimator()
    cycles = cp._Cycles(fake)
    call = cp._call(_case("all_gather", True), 2048, 5 * 2048, True)
    cycles.submit(call, "fwd")
    assert sorted(c.seq_k for c in fake.asked) == [2048, 4096]  # k = 1 and 2 only
    one = fake.profile(dataclasses.replace(call, seq_k=2048))()["est_cycles"]
    two = fake.profile(dataclasses.replace(call, seq_k=4096))()["est_cycles"]
    assert cycles.cycles(call, "fwd") == (one + 4 * (two - one)) * call.profile_scale


def test_modelled_time_overlaps_the_ring_and_not_the_gather():
    chip = hardware.TPU_V5E
    ring, gather = _case("ring", True), _case("all_gather", True)
    steps = {"fwd": [3e6, 3e6, 3e6, 3e6]}
    fast = cp.modelled_time(ring, steps, received_bytes=0, collectives=0, chip=chip)
    assert fast["hidden"] and fast["time_s"] == pytest.approx(12e6 / chip.clock_hz + fast["hbm_s"])
    # K, V of one chip over an ICI a million times slower: the transfers show.
    slow = cp.modelled_time(ring, steps, received_bytes=0, collectives=0, chip=chip, ici_bytes_per_s=400e3)
    assert not slow["hidden"] and slow["time_s"] > 100 * fast["time_s"]
    together = cp.modelled_time(gather, {"fwd": [12e6]}, received_bytes=400e6, collectives=3, chip=chip)
    assert together["time_s"] == pytest.approx(12e6 / chip.clock_hz + together["hbm_s"] + 1e-3 + 3e-5)
    assert not together["hidden"]


@requires_libtpu
def test_rectangular_fit_and_the_linear_rule_match_direct_profiles():
    """At fixed blocks (here 512 x 128: L = 512): the quadratic through Nq : Nk = 1 : 2 at scales L, 2L,
    3L predicts 4L, and c x 3c causal is c x c plus twice (c x 2c - c x c)."""
    blocks = (512, 128, 128, 128, 128, 128, 256)
    pool = estimate.WorkerPool(1, profile=True)
    try:
        def cycles(rows, keys, causal):
            case = cases.Case("pallas_flash", "fwd", 1, 1, 1, rows, keys, 128, "bf16", causal, blocks=blocks)
            result = pool.run({"case": case.as_json()})
            assert result["status"] == "ok", result
            return result["est_cycles"]

        points = [(m, cycles(512 * m, 1024 * m, False)) for m in (1, 2, 3)]
        assert estimate.quadratic_fit(points, 4) == pytest.approx(cycles(2048, 4096, False), rel=0.01)
        one, two = cycles(1024, 1024, True), cycles(1024, 2048, True)
        assert one + 2 * (two - one) == pytest.approx(cycles(1024, 3072, True), rel=0.01)
    finally:
        pool.close()


@requires_libtpu
def test_context_parallel_rows_end_to_end(tmp_path):
    out = tmp_path / "cp.json"
    command = [sys.executable, "-m", "pallas_flash.bench", "--seq", "4096", "--pass", "fwd", "--causal", "on",
               "--impl", "pallas_flash", "--context-parallel", "ring", "--mesh", "2x2", "--oom-wall", "off",
               "--jobs", "2", "--json", str(out)]
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, cwd=PYTHON_DIR)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    [single] = [r for r in data["results"] if not r["context_parallel"]]
    [ring] = [r for r in data["results"] if r["context_parallel"] == "ring"]
    chip = hardware.TPU_V5E
    assert ring["status"] == "ok" and ring["chips"] == 4 and ring["mesh"] == "2x2" and ring["source"] == "estimate"
    # Each chip receives the other three chips' K and V at least (bf16, 16 heads of 128, 1024 tokens each).
    assert ring["ici_bytes"] >= 3 * 2 * 16 * 1024 * 128 * 2 and ring["collectives"] >= 3
    assert ring["time_s"] >= ring["est_cycles"] / chip.clock_hz and 0 < ring["mfu"] < 1
    assert ring["hbm_in_use"] < single["hbm_in_use"] and len(ring["step_cycles"]["fwd"]) == 4
    [scaling] = data["context_parallel_scaling"]
    assert scaling["best"] == "ring" and scaling["ratio_to_even_split"] == pytest.approx(
        ring["time_s"] / (single["est_cycles"] / chip.clock_hz / 4))
    assert "x a 4-th of one chip's kernels" in result.stdout


def test_collectives_count_what_each_device_receives():
    from pallas_flash import v5e

    text = """HloModule m

%branch (p: bf16[4,256]) -> bf16[16,256] {
  %p = bf16[4,256]{1,0} parameter(0)
  %ag-start = (bf16[4,256]{1,0}, bf16[16,256]{1,0}) all-gather-start(bf16[4,256]{1,0} %p), dimensions={0}
  ROOT %ag-done = bf16[16,256]{1,0} all-gather-done((bf16[4,256]{1,0}, bf16[16,256]{1,0}) %ag-start)
}

ENTRY %main (a: f32[1024], b: f32[1024]) -> f32[1024] {
  %a = f32[1024]{0} parameter(0)
  %b = f32[1024]{0} parameter(1)
  %cp-start = (f32[1024]{0}, f32[1024]{0}, u32[], u32[]) collective-permute-start(f32[1024]{0} %a), source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  %cp-done = f32[1024]{0} collective-permute-done((f32[1024]{0}, f32[1024]{0}, u32[], u32[]) %cp-start)
  %self = f32[1024]{0} collective-permute(f32[1024]{0} %b), source_target_pairs={{0,0},{1,1},{2,2},{3,3}}
  %ar = f32[1024]{0} all-reduce(f32[1024]{0} %cp-done), to_apply=%add
  ROOT %rs = f32[256]{0} reduce-scatter(f32[1024]{0} %ar), dimensions={0}, to_apply=%add
}
"""
    program = v5e.CompiledProgram(text, None, v5e.entry_instructions(text), {})
    received = {c.opcode: c.received_bytes for c in program.collectives(4)}
    assert received == {"all-gather": 16 * 256 * 2 * 3 / 4, "collective-permute": 4096,  # not the one to itself
                        "all-reduce": 4096 * 2 * 3 / 4, "reduce-scatter": 4096 * 3 / 4}


def test_context_parallel_cases_follow_the_attention_grid():
    from pallas_flash.bench import __main__ as cli

    args = cli.parse_args(["--seq", "16384", "--pass", "fwd,fwd+bwd,decode", "--mask", "causal,full,window:64",
                           "--context-parallel", "ring,all_gather", "--mesh", "1x1,2x2"])
    built, skipped = cli.build_context_parallel_cases(args)
    # 2 strategies x the 2x2 x 2 attention passes x 3 masks: the window's rows skipped (no rules yet)
    assert {(c.context_parallel, c.pass_, c.causal, c.mesh) for c in built} == {
        (s, p, causal, "2x2") for s in ("ring", "all_gather") for p in ("fwd", "fwd+bwd") for causal in (True, False)}
    assert len(built) == 8 and len(skipped) == 4 and all(c.mask == "window:64" for c in skipped)


@requires_libtpu
def test_context_parallel_without_a_case_it_supports_says_so(capsys):
    from pallas_flash.bench import __main__ as cli

    assert cli.main(["--seq", "4096", "--pass", "fwd", "--impl", "pallas_flash", "--context-parallel", "ring",
                     "--mesh", "1x1", "--oom-wall", "off"]) == 2
    assert "--context-parallel: no case it supports" in capsys.readouterr().err
