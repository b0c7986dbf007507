"""The v5e estimate of a benchmark case, from the real compiler on a host without a TPU.

Per case, two compiles:
1. The full shape, in this process (no profiling): does it fit one 16 GiB chip (status "oom" when
   the compiler runs out of HBM), how much HBM it holds, the HBM traffic XLA's cost analysis counts,
   and whether anything copies or relayouts the inputs and outputs.
2. `Case.for_profile` (attention: one KV head's group of one sequence; decode: the whole shape), in
   a worker process started with libtpu's static profile and LLO dump flags: the estimated cycles
   (scaled back by batch x KV heads for attention: grid rows are independent) and each kernel's
   final bundles (spill stores, MXU-busy share). Workers run in parallel (`jobs`).

JAX's flash_attention is profiled at each candidate block size and the fastest is kept; sequences
longer than `SWEEP_MAX_SEQ` reuse the winner at that length (simulating every candidate at 32k would
take most of an hour; the winners at 4096 and 8192 were the same in every sweep run so far).
Splash attention (JAX's, and tokamax's through its own op) decides which blocks run from mask info it
reads by scalar prefetch, which the simulator reads as 0 (no block would run; with the mask info a
compile-time constant, its profile aborts inside libtpu): it is profiled with that schedule dropped,
every block of its grid run and masked, and each kernel's cycles are scaled by the share of blocks its
mask info runs (`splash_schedule`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time

import pallas_flash as pf
from pallas_flash import v5e
from pallas_flash.bench import cases
from pallas_flash.bench.worker import RESULT_PREFIX

SWEEP_MAX_SEQ = 4096
FIT_MIN_SEQ = 2048
# Implementations profiled with every block of their grid run (`Case.every_block`), their cycles then
# scaled per kernel by the share of blocks their own schedule runs.
EVERY_BLOCK_PROFILES = {impl: f"cycles: {impl} profiled running every block of its grid (the simulator reads its "
                              "mask info, scalar prefetch, as 0)" for impl in cases.EVERY_BLOCK_IMPLS}
XLA_COST_MODEL = {"xla_reference": "plain XLA: cycles from XLA:TPU's own per-fusion cost model at the full shape "
                                   "(profiling its materialised scores takes minutes and ~15 GB); where that "
                                   "model has no figure, time = the HBM floor, a lower bound"}
# Kernels whose work depends on lengths read by scalar prefetch, which the simulator reads as 0 (its
# estimate would be an empty kernel's; for some it aborts): not profiled, timed at the HBM floor.
READS_LENGTHS_FROM_SMEM = {"jax_paged_attention": "not profiled (the simulator would read its lengths, scalar "
                                                  "prefetch, as 0): time = the HBM floor, a lower bound"}


class WorkerPool:
    """Persistent compile workers (`python -m pallas_flash.bench.worker`), each with its own dump
    directory; a worker that dies (libtpu aborts on some profiles) is replaced for the next job."""

    def __init__(self, size: int, profile: bool):
        self.size, self.profile = size, profile
        self._idle: queue.Queue = queue.Queue()
        self._started = 0
        self._lock = threading.Lock()
        self._all: list = []
        self._root = tempfile.mkdtemp(prefix="pflash-bench-")

    def _start(self):
        index = len(self._all)
        directory = os.path.join(self._root, f"worker{index}")
        os.makedirs(directory)
        env = dict(os.environ)
        env.update({"ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_SKIP_MDS_QUERY": "1", "JAX_PLATFORMS": "cpu",
                    "PFLASH_BENCH_DUMP_DIR": os.path.join(directory, "llo")})
        # Only the final per-bundle slot use of each kernel: the whole LLO dump is ~100 MB per compile.
        flags = [f"--xla_jf_dump_to={directory}/llo", "--xla_jf_dump_llo_text=true",
                 "--xla_jf_dump_llo_pass_label_regex=final_hlo-static-per-bundle"]
        if self.profile:
            flags.append(f"{v5e.PROFILE_FLAG}={directory}/profile")
        env["LIBTPU_INIT_ARGS"] = " ".join([env.get("LIBTPU_INIT_ARGS", "")] + flags).strip()
        stderr = open(os.path.join(directory, "stderr.txt"), "w+")
        process = subprocess.Popen([sys.executable, "-m", "pallas_flash.bench.worker"], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
                                   cwd=os.getcwd())
        worker = (process, stderr)
        self._all.append(worker)
        return worker

    def _acquire(self):
        with self._lock:
            if self._idle.empty() and self._started < self.size:
                self._started += 1
                return self._start()
        return self._idle.get()

    def run(self, job: dict) -> dict:
        worker = self._acquire()
        process, stderr = worker
        try:
            process.stdin.write(json.dumps(job) + "\n")
            process.stdin.flush()
            for line in process.stdout:
                if line.startswith(RESULT_PREFIX):
                    self._idle.put(worker)
                    return json.loads(line[len(RESULT_PREFIX):])
        except BrokenPipeError:
            pass
        # The worker died mid-job: report its last words, start a fresh one next time.
        process.wait()
        stderr.seek(0)
        tail = [ln for ln in stderr.read().splitlines() if ln.strip() and not ln.startswith(("W0", "I0"))][-3:]
        with self._lock:
            self._started -= 1
        last_words = " | ".join(tail)[-400:]
        return {"status": "error", "message": f"compile worker died (exit {process.returncode}): {last_words}"}

    def close(self):
        for process, stderr in self._all:
            if process.poll() is None:
                process.stdin.close()
                process.wait(timeout=60)
            stderr.close()
        import shutil

        shutil.rmtree(self._root, ignore_errors=True)


@dataclasses.dataclass
class FullCompile:
    status: str  # ok, oom, error
    message: str = ""
    hbm_in_use: int | None = None  # arguments + outputs + temporaries, per device
    hbm_bytes: float | None = None  # traffic per device: max(XLA's cost analysis, inputs and outputs once)
    xla_cycles: int | None = None  # XLA's own cost model of its ops (the reference's estimate)
    vmem_bytes: int | None = None  # the largest scoped VMEM the compiler gave one of its kernels
    copies: list[str] = dataclasses.field(default_factory=list)
    needed_bytes: float | None = None  # on oom: what the compiler said it needed
    collectives: list = dataclasses.field(default_factory=list)  # v5e.Collective, per device (a mesh)

# Copies of arrays smaller than this (the decode's few-KiB partial results on their way to the merge)
# are bookkeeping, not the copy trap: a copy of an input or output of the size of the problem.
COPY_REPORT_BYTES = 1 << 20


def compile_full(case: cases.Case) -> FullCompile:
    """The full shape on one chip (or the mesh), in this process."""
    try:
        program = cases.compile_for_v5e(case)
    except v5e.CompileError as exc:
        needed = re.search(r"\(([\d.]+)G\) exceeds available HBM", str(exc))
        return FullCompile("oom" if exc.oom else "error", exc.summary,
                           needed_bytes=float(needed.group(1)) * 2**30 if needed else None)
    except Exception as exc:
        return FullCompile("error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    copies = [i for i in program.data_movement() if any(a.logical_bytes >= COPY_REPORT_BYTES for a in i.arrays)]
    floor = program.compulsory_bytes
    if case.pass_ == "decode":  # a window reads its positions of the caches, not every input byte
        floor -= 2 * (case.cache_bytes_per_device() - case.cache_bytes_read_per_device())
    traffic = max(program.cost.get("bytes accessed") or 0, floor)
    return FullCompile("ok", hbm_in_use=program.hbm_bytes_in_use, hbm_bytes=traffic,
                       xla_cycles=program.xla_cost_model_cycles(), copies=[f"{i.opcode} {i.name}" for i in copies],
                       vmem_bytes=max((k.scoped_vmem_bytes for k in program.kernels), default=None),
                       collectives=program.collectives(case.devices) if case.devices > 1 else [])


def _best(results: list[tuple[tuple, dict]]):
    ok = [(r["est_cycles"], blocks, r) for blocks, r in results if r.get("status") == "ok" and r.get("est_cycles")]
    return min(ok, key=lambda t: t[0]) if ok else None


def quadratic_fit(points: list[tuple[int, float]], x: float) -> float:
    """The parabola through three (x, y) points, at x (Lagrange form)."""
    (x1, y1), (x2, y2), (x3, y3) = points
    return (y1 * (x - x2) * (x - x3) / ((x1 - x2) * (x1 - x3)) + y2 * (x - x1) * (x - x3) / ((x2 - x1) * (x2 - x3))
            + y3 * (x - x1) * (x - x2) / ((x3 - x1) * (x3 - x2)))


def fitted_kernels(multiples, results: list[dict], x: float) -> list[dict]:
    """Each kernel's cycles fitted as the program's are (the kernels of the last point, named alike at
    every point); where the points' kernels differ, the last point's as they are."""
    kernels = [r.get("kernels") or [] for r in results]
    if any([k["name"] for k in ks] != [k["name"] for k in kernels[-1]] for ks in kernels) or any(
            k.get("cycles") is None for ks in kernels for k in ks):
        return kernels[-1]
    return [kernel | {"cycles": round(quadratic_fit([(m, ks[i]["cycles"]) for m, ks in zip(multiples, kernels)], x))}
            for i, kernel in enumerate(kernels[-1])]


def splash_schedule(case: cases.Case, profile: dict) -> dict:
    """Splash's profile run every block of its grid; its cycles as its mask info schedules them: each
    kernel's cycles times the share of blocks it runs (cases.block_shares), at the case's length."""
    if profile.get("status") != "ok" or not profile.get("kernels"):
        return profile
    shares = cases.block_shares(case)
    kernels = []
    for kernel in profile["kernels"]:
        phase = "dkv" if "_dkv" in kernel["name"] else "dq" if "_dq" in kernel["name"] else "fwd"
        share = shares.get(phase, 1.0)
        kernels.append(kernel | {"cycles": round(kernel["cycles"] * share), "block_share": share})
    rest = profile["est_cycles"] - sum(k["cycles"] for k in profile["kernels"])  # its ops beside the kernels
    return profile | {"est_cycles": rest + sum(k["cycles"] for k in kernels), "kernels": kernels,
                      "every_block_cycles": profile["est_cycles"]}


def fit_unit(case: cases.Case) -> int:
    """The step of sequence lengths at which a case's kernels keep the same block sizes and the
    same kinds of grid step: the least common multiple of its blocks."""
    sizes = [b for b in case.blocks or () if isinstance(b, int) and not isinstance(b, bool)]  # not fuse_dq
    return math.lcm(*sizes) if sizes else 128


def fit_kind(fit: list) -> str:
    return "quadratic in N" if len(fit) == 3 else "linear in N beyond the mask's span"


def backward_part(case: cases.Case) -> cases.Case:
    """The backward program of a training step, with the forward's blocks replaced by the backward's:
    at a length that is a multiple of every block the backward program is the same either way, and its
    own blocks' (smaller) step lets it be fitted through shorter, cheaper profiles."""
    blocks = case.blocks
    if case.impl == "pallas_flash" and blocks:
        b = pf.BlockSizes(*blocks)
        blocks = dataclasses.astuple(dataclasses.replace(b, block_q=b.block_q_dkv, block_k=b.block_k_dkv))
    elif case.impl == "jax_flash_attention" and blocks:
        blocks = (blocks[3],) * 4
    elif case.impl == "tokamax" and blocks:  # (forward's three, backward's three)
        blocks = blocks[3:] * 2
    return dataclasses.replace(case, pass_="bwd", blocks=blocks)


def sum_of_parts(parts: list[dict]) -> dict:
    """One profile from the profiles of programs run one after the other (the forward and the
    backward of a training step): cycles, bundles and spills add up, the MXU-busy share is per bundle."""
    failed = next((r for r in parts if r.get("status") != "ok" or r.get("est_cycles") is None), None)
    if failed:
        return failed
    total = parts[0] | {"est_cycles": sum(r["est_cycles"] for r in parts),
                        "kernels": [k for r in parts for k in r.get("kernels", [])],
                        "fit": None, "parts_fit": [r.get("fit") for r in parts]}
    if all(r.get("bundles") for r in parts):
        bundles = sum(r["bundles"] for r in parts)
        total |= {"bundles": bundles, "spill_slots": sum(r.get("spill_slots") or 0 for r in parts),
                  "mxu_busy": sum(r["bundles"] * (r.get("mxu_busy") or 0) for r in parts) / bundles}
    return total


class Estimator:
    """Runs the two compiles of every case, `jobs` profiles at a time, with a progress line on stderr.

    Attention cases longer than `max_profile_seq` are not simulated at their full length (the
    simulator's time and memory grow with the cycles it simulates: ~20 GB at N = 32768): with block
    sizes fixed, a self-attention kernel's cycles are exactly a quadratic in N over multiples of its
    blocks' least common multiple L (every kind of grid step, interior, diagonal, skipped, first and
    last, occurs a number of times quadratic in N / L), so they are fitted through profiles at
    N = mL, (m+1)L, (m+2)L, the first of them at least FIT_MIN_SEQ, and evaluated at N (Nq != Nk, as
    in context parallelism's calls: at the same ratio Nq : Nk, in the scale gcd(Nq, Nk)). A long
    training step (fwd+bwd) is the forward and the backward program (`backward_part`, at the
    backward's blocks' L) fitted apart and summed: the simulator's memory grows faster than the
    cycles of one program (12 GB for one fwd+bwd at N = 8192, 2 GB for each part). At N = 8192 the
    sum is 0.4% (full) and 4% (causal) below a one-head profile of the whole step, in which XLA keeps
    that head's Q, K, V and dO (2 MiB each) in VMEM and the simulator costs the backward's copies
    of them higher; at 16 heads they stay in HBM, as in the parts."""

    def __init__(self, jobs: int, max_profile_seq: int = 4096, log=sys.stderr):
        self.jobs = max(1, jobs)
        self.max_profile_seq = max_profile_seq
        self.log = log
        self._profile_pool = WorkerPool(self.jobs, profile=True)
        self._dump_pool = WorkerPool(1, profile=False)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=self.jobs + 1)
        self._done = 0
        self._total = 0
        self._lock = threading.Lock()
        self._sweeps: dict = {}
        self._memo: dict = {}

    def close(self):
        self._executor.shutdown()
        self._profile_pool.close()
        self._dump_pool.close()

    def _say(self, text: str):
        print(text, file=self.log, flush=True)

    def _profile(self, case: cases.Case) -> dict:
        unprofiled = case.impl in READS_LENGTHS_FROM_SMEM
        pool = self._dump_pool if unprofiled else self._profile_pool
        start = time.perf_counter()
        result = pool.run({"case": case.for_profile().as_json()})
        with self._lock:
            self._done += 1
            cycles = f" {result['est_cycles']} cycles" if result.get("est_cycles") else ""
            self._say(f"[{self._done}/{self._total}] {describe(case)}: {result.get('status')}{cycles}"
                      f" ({time.perf_counter() - start:.0f} s)")
        return result

    def _submit(self, case: cases.Case):
        """A callable that returns the profile of `case` (for one KV head's group of one sequence):
        simulated at its length, or fitted through shorter ones."""
        if case.pass_ != "decode" and case.impl not in EVERY_BLOCK_PROFILES and case.seq_q == case.seq_k:
            span = case.rules().span(case.seq_q, case.causal)
            if span and case.seq_q > self.max_profile_seq:
                return self._linear(case, span)
        long = case.pass_ != "decode" and max(case.seq_q, case.seq_k) > self.max_profile_seq
        unit = fit_unit(case) if long else 0
        # Nq : Nk = a : b, both multiples of a * unit and b * unit (self-attention: 1 : 1): at a fixed
        # ratio the same argument makes the cycles quadratic in the scale g = gcd(Nq, Nk).
        scale = math.gcd(case.seq_q, case.seq_k)
        if not long or scale % unit:
            return self._once(case).result
        if case.pass_ == "fwd+bwd":
            parts = [self._submit(dataclasses.replace(case, pass_="fwd")), self._submit(backward_part(case))]
            return lambda: sum_of_parts([part() for part in parts])
        ratio_q, ratio_k = case.seq_q // scale, case.seq_k // scale
        # The shortest point has several blocks along each axis (N >= FIT_MIN_SEQ): a grid of one
        # block per axis runs step kinds (first and last at once) the longer ones do not.
        first = max(1, -(-FIT_MIN_SEQ // (unit * min(ratio_q, ratio_k))))
        multiples = (first, first + 1, first + 2)
        if case.impl == "tokamax":  # its profile aborts inside libtpu at 3 x 2048 (6 K/V blocks a row)
            multiples = (first, 2 * first, 4 * first)
        if multiples[-1] * unit >= scale:
            return self._once(case).result
        points = [dataclasses.replace(case, seq_q=m * unit * ratio_q, seq_k=m * unit * ratio_k) for m in multiples]
        futures = [self._once(p) for p in points]

        def fitted():
            results = [f.result() for f in futures]
            failed = next((r for r in results if r.get("status") != "ok" or r.get("est_cycles") is None), None)
            if failed:
                return failed
            cycles = quadratic_fit([(m, r["est_cycles"]) for m, r in zip(multiples, results)], scale / unit)
            fit = [(p.seq_q, r["est_cycles"]) for p, r in zip(points, results)]
            return results[-1] | {"est_cycles": round(cycles), "fit": fit,
                                  "kernels": fitted_kernels(multiples, results, scale / unit)}

        return fitted

    def _linear(self, case: cases.Case, span: int):
        """A mask whose rows reach at most `span` keys (window, chunks, documents): beyond a couple of
        spans every further span of queries runs the same tiles, so the cycles are linear in N. Fitted
        through two lengths of whole spans (documents kept at their length, written as chunks), each
        pass apart; profiled at its length where that is no longer."""
        if case.pass_ == "fwd+bwd":
            parts = [self._linear(dataclasses.replace(case, pass_="fwd"), span),
                     self._linear(backward_part(case), span)]
            return lambda: sum_of_parts([part() for part in parts])
        unit = fit_unit(case)
        step = -(-span // unit) * unit if case.rules().segments is None and case.rules().chunk is None \
            else math.lcm(unit, span)
        lengths = (2 * step, 3 * step)
        if lengths[-1] >= case.seq_q or case.seq_q % unit:
            return self._once(case).result
        mask = case.rules().as_chunks(case.seq_q)
        points = [dataclasses.replace(case, seq_q=n, seq_k=n, mask=mask) for n in lengths]
        futures = [self._once(p) for p in points]

        def fitted():
            results = [f.result() for f in futures]
            failed = next((r for r in results if r.get("status") != "ok" or r.get("est_cycles") is None), None)
            if failed:
                return failed
            (n1, c1), (n2, c2) = [(p.seq_q, r["est_cycles"]) for p, r in zip(points, results)]
            cycles = c2 + (c2 - c1) * (case.seq_q - n2) / (n2 - n1)
            return results[-1] | {"est_cycles": round(cycles), "fit": [(n1, c1), (n2, c2)]}

        return fitted

    def profile(self, case: cases.Case):
        """A callable returning the profile of one chip's `case` at its implementation's blocks (for
        one KV head's group of one sequence, its cycles to be scaled by `case.profile_scale`):
        simulated, or fitted through shorter lengths as the rows are."""
        return self._submit(cases.fixed_blocks(case))

    def _once(self, case: cases.Case) -> concurrent.futures.Future:
        """The profile future of a case, shared by every case that needs the same profile (a fit
        point of several lengths, a sweep candidate that is also a row)."""
        key = case.for_profile()
        if key not in self._memo:
            with self._lock:
                self._total += 1
            self._memo[key] = self._executor.submit(self._profile, case)
        return self._memo[key]

    def _forward_sweep(self, case: cases.Case):
        """[(blocks, callable)] for JAX flash_attention's forward at each candidate block size, for
        the case's shape (its length capped at SWEEP_MAX_SEQ)."""
        proxy = dataclasses.replace(case, pass_="fwd", seq_q=min(case.seq_q, SWEEP_MAX_SEQ),
                                    seq_k=min(case.seq_k, SWEEP_MAX_SEQ), blocks=None)
        if proxy not in self._sweeps:
            candidates = [b + (1024,) for b in cases.JAX_FORWARD_BLOCKS
                          if b[0] <= max(proxy.seq_q, 512) and b[1] <= max(proxy.seq_k, 512)]
            self._sweeps[proxy] = [(b, self._submit(dataclasses.replace(proxy, blocks=b))) for b in candidates]
        return proxy, self._sweeps[proxy]

    def run(self, case_list: list[cases.Case]) -> list[dict]:
        """Per case: {"case", "full": FullCompile, "profile": worker result, "blocks", "note"}."""
        sweeps = {c: self._forward_sweep(c) for c in case_list if c.impl == "jax_flash_attention" and c.blocks is None}
        pending = {c: self._submit(cases.fixed_blocks(c)) for c in case_list
                   if c not in sweeps and c.impl not in XLA_COST_MODEL}
        fulls = {}
        for case in case_list:  # the full-shape compiles, here, while the workers profile
            start = time.perf_counter()
            fulls[case] = compile_full(case)
            self._say(f"  compiled {describe(case)}: {fulls[case].status} ({time.perf_counter() - start:.1f} s)")
        chosen = {}  # JAX flash cases: [(blocks, callable)], the fastest is kept
        for case, (proxy, candidates) in sweeps.items():
            if case.pass_ == "fwd" and proxy == dataclasses.replace(case, blocks=None):
                chosen[case] = candidates  # the sweep was this very case
                continue
            best = _best([(b, resolve()) for b, resolve in candidates])
            fwd_blocks = best[1][:3] if best else (1024, 1024, 512)
            backward = (1024,) if case.pass_ == "fwd" else cases.JAX_BACKWARD_BLOCKS
            chosen[case] = [(fwd_blocks + (b,), self._submit(dataclasses.replace(case, blocks=fwd_blocks + (b,))))
                            for b in backward]
        results = []
        for case in case_list:
            note = []
            blocks = case.blocks
            if case in chosen:
                # The fastest candidate whose full shape compiles (JAX's backward at 1024-row blocks
                # runs out of VMEM at N = 32768, at 512 it does not).
                ranked = sorted(((r["est_cycles"], b, r) for b, r in ((b, resolve()) for b, resolve in chosen[case])
                                 if r.get("status") == "ok" and r.get("est_cycles")), key=lambda t: t[0])
                best = None
                for _, candidate, result in ranked:
                    full = fulls[case] if candidate == cases.fixed_blocks(case).blocks else compile_full(
                        dataclasses.replace(case, blocks=candidate))
                    best, fulls[case] = (candidate, result), full
                    if full.status == "ok":
                        break
                profile = best[1] if best else chosen[case][0][1]()
                blocks = best[0] if best else None
                swept_at = min(case.seq_q, SWEEP_MAX_SEQ)
                backward_note = f", then {len(chosen[case])} backward sizes" if case.pass_ != "fwd" else ""
                note.append(f"blocks (q, k_major, k, bwd) = {blocks}: the fastest of {len(sweeps[case][1])} forward"
                            f" candidates at N={swept_at}{backward_note}")
            elif case.impl in XLA_COST_MODEL:
                full = fulls[case]
                profile = {"status": full.status, "est_cycles": full.xla_cycles, "scaled": True}
            else:
                profile = pending[case]()
                blocks = cases.fixed_blocks(case).blocks
            if profile.get("fit"):
                note.append(f"cycles fitted ({fit_kind(profile['fit'])}, fixed blocks) through profiles at N=" +
                            ", ".join(str(n) for n, _ in profile["fit"]))
            if any(profile.get("parts_fit") or ()):
                note.append(f"cycles: the forward and backward programs fitted apart "
                            f"({fit_kind(next(f for f in profile['parts_fit'] if f))}, fixed blocks) "
                            "through profiles at N=" + " and ".join(
                                ", ".join(str(n) for n, _ in fit or []) for fit in profile["parts_fit"]) + ", summed")
            if case.pass_ == "decode" and case.profile_scale > 1 and case.impl not in XLA_COST_MODEL:
                note.append(f"cycles: profiled for B={case.for_profile().batch} and multiplied by {case.profile_scale} "
                            "(the simulator slows a kernel's DMAs from offsets past 2 GiB into an array)")
            if case.pass_ == "decode" and case.impl not in XLA_COST_MODEL and (
                    case.for_profile().cache_bytes_per_device() > cases.SIMULATED_ARRAY_BYTES):
                note.append("a cache array past 2 GiB per chip even for one sequence: the simulator's DMAs from "
                            "beyond 2 GiB are slowed, so the time is an upper bound")
            if case.impl in EVERY_BLOCK_PROFILES:
                profile = splash_schedule(case, profile)
                shares = sorted({k["block_share"] for k in profile.get("kernels", []) if "block_share" in k})
                if any(share < 1 for share in shares):
                    note.append(f"each kernel's cycles scaled by the share of blocks its mask info runs "
                                f"({'/'.join(f'{x:.1%}' for x in shares)}): a lower bound (the steps it skips and "
                                "its per-row costs beyond that share not counted)")
            note += [EVERY_BLOCK_PROFILES.get(case.impl, ""), READS_LENGTHS_FROM_SMEM.get(case.impl, ""),
                     XLA_COST_MODEL.get(case.impl, "")]
            if case.group > 1 and case.impl in ("jax_flash_attention", "jax_splash"):
                note.append("K/V repeated to Hq heads (MHA-only kernel)")
            results.append({"case": case, "full": fulls[case], "profile": profile, "blocks": blocks,
                            "note": "; ".join(n for n in note if n)})
        return results


def describe(case: cases.Case) -> str:
    if case.pass_ == "decode":
        return (f"{case.impl} decode ctx={case.seq_k} T={case.seq_q} B={case.batch} Hq={case.heads} "
                f"Hkv={case.kv_heads} mesh={case.mesh}" + (f" page={case.page_size}" if case.page_size else "")
                + (f" {case.mask}" if case.mask else ""))
    length = f"N={case.seq_q}" if case.seq_q == case.seq_k else f"Nq={case.seq_q} Nk={case.seq_k}"
    return (f"{case.impl} {case.pass_} {length} D={case.dim} {case.dtype} "
            f"{case.mask_name}" + (f" blocks={case.blocks}" if case.blocks else ""))


def oom_wall(case: cases.Case, step: int = 512, limit: int = 262144, log=sys.stderr) -> dict:
    """The longest N (a multiple of `step`) at which `case` (its impl at seq N) still compiles for one
    chip, bisected; the compiler's HBM need just past it."""

    def fits(n):
        result = compile_full(dataclasses.replace(case, seq_q=n, seq_k=n))
        print(f"  oom wall: {case.impl} N={n}: {result.status}", file=log, flush=True)
        return result

    low, high = step, limit
    at_limit = fits(high)
    if at_limit.status == "ok":
        return {"impl": case.impl, "fits_up_to": high, "fails_at": None, "needed_bytes": None,
                "hbm_in_use": at_limit.hbm_in_use}
    first = fits(low)
    if first.status != "ok":
        return {"impl": case.impl, "fits_up_to": None, "fails_at": low, "needed_bytes": first.needed_bytes}
    failure, success = at_limit, first
    while high - low > step:
        mid = (low + high) // 2 // step * step
        result = fits(mid)
        if result.status == "ok":
            low, success = mid, result
        else:
            high, failure = mid, result
    return {"impl": case.impl, "fits_up_to": low, "fails_at": high, "needed_bytes": failure.needed_bytes,
            "hbm_in_use": success.hbm_in_use, "status_at_failure": failure.status}
