"""A compile worker for the benchmark: one JSON job per line on stdin, one JSON result per line on
stdout. It is started by `pallas_flash.bench.estimate` with libtpu's flags already in its environment
(libtpu reads them once, when JAX starts): the static profile (estimated cycles per kernel) and the
LLO text dump (the final bundles of each kernel: bundle count, spill stores, MXU-busy bundles).

    {"case": {...}}  ->  PFLASH_RESULT {"status": "ok", "est_cycles": ..., "kernels": [...], "bundles": ..., ...}
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import sys
import time

RESULT_PREFIX = "PFLASH_RESULT "  # libraries may print to stdout too: results are the lines marked so


def bundle_statistics(dump_dir: str, kernel_names) -> dict:
    """From the final per-bundle slot utilisation of each kernel: static bundle count, vector spill
    stores (VSTORE:SPILL) and fills (VLOAD:FILL), and the share of bundles that issue to the MXU."""
    bundles = spills = fills = mxu = 0
    found = False
    for name in kernel_names:
        pattern = f"*-{glob.escape(name)}-*final_hlo-static-per-bundle-utilization.txt"
        paths = glob.glob(os.path.join(glob.escape(dump_dir), pattern))
        for path in paths[:1]:
            with open(path) as f:
                text = f.read()
            header = re.search(r"== CAPAC\w*:\s*\n(.*)\n", text)
            rows = text.split("== UTILIZATION:", 1)[1].split("\n") if "== UTILIZATION:" in text else []
            if not header:
                continue
            columns = [c.strip() for c in header.group(1).split(",")]
            found = True
            for row in rows:
                values = row.split()
                if len(values) != len(columns):
                    continue
                slot = dict(zip(columns, (int(v) for v in values)))
                bundles += 1
                spills += slot.get("VSTORE:SPILL", 0)
                fills += slot.get("VLOAD:FILL", 0)
                mxu += slot.get("MXU", 0) > 0
    if not found:
        return {}
    return {"bundles": bundles, "spill_slots": spills, "fill_slots": fills,
            "mxu_busy": mxu / bundles if bundles else None}


def run_job(job: dict, dump_dir: str | None) -> dict:
    from pallas_flash import v5e
    from pallas_flash.bench import cases

    case = cases.Case.from_json(job["case"])
    start = time.perf_counter()
    try:
        program = cases.compile_for_v5e(case)
    except v5e.CompileError as exc:
        return {"status": "oom" if exc.oom else "error", "message": exc.summary,
                "compile_s": time.perf_counter() - start}
    except Exception as exc:  # a case the implementation rejects, reported in its row
        return {"status": "error", "message": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                "compile_s": time.perf_counter() - start}
    kernels = program.kernels
    result = {
        "status": "ok",
        "est_cycles": program.estimated_cycles(),
        "kernels": [{"name": k.name, "vmem_bytes": k.scoped_vmem_bytes, "cycles": k.estimated_cycles} for k in kernels],
        "compile_s": time.perf_counter() - start,
    }
    if dump_dir:
        result.update(bundle_statistics(dump_dir, [k.name for k in kernels]))
    return result


def main() -> None:
    dump_dir = os.environ.get("PFLASH_BENCH_DUMP_DIR")
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        if dump_dir:
            shutil.rmtree(dump_dir, ignore_errors=True)
            os.makedirs(dump_dir, exist_ok=True)
        result = run_job(job, dump_dir)
        sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
