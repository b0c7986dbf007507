#!/usr/bin/env bash
# The project's point in one run, each stage one line of progress:
#   1. the CPU sweep: `pflash bench` (flash against the materialising baseline and its OOM wall, % of
#      this machine's measured ceilings); extra arguments go to it;
#   2. the C++ kernels inside JAX on this CPU (python -m pallas_flash.bench.cpu: beside pflash bench,
#      jax.nn.dot_product_attention and the Pallas kernels in interpret mode);
#   3. the v5e report (python -m pallas_flash.bench --target v5e): every Pallas kernel compiled for a
#      TPU v5e by the real compiler and its static estimate, beside JAX's own kernels, with the naive
#      baseline's out-of-memory wall.
# PFLASH_SKIP_PYTHON=1 runs the first stage only (no JAX environment is set up).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
echo "== build (Release)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)" --target pflash_cli >/dev/null
echo "== 1/3 CPU sweep: pflash bench $*"
./build/pflash bench "$@"
if [[ "${PFLASH_SKIP_PYTHON:-0}" == 1 ]]; then
  echo "== stages 2 and 3 (JAX): skipped (PFLASH_SKIP_PYTHON=1)"
  exit 0
fi
echo "== 2/3 the C++ kernels inside JAX on this CPU: python -m pallas_flash.bench.cpu"
JAX_PLATFORMS=cpu .venv/bin/python -m pallas_flash.bench.cpu --pflash build/pflash
echo "== 3/3 the v5e report (compiled for a TPU v5e, v5e compiler estimate): python -m pallas_flash.bench"
# On a TPU host the report also measures; elsewhere JAX runs on the CPU (libtpu still compiles for the
# v5e, deviceless) instead of probing for a TPU and logging its warnings.
if ! compgen -G "/dev/accel*" >/dev/null && ! compgen -G "/dev/vfio/[0-9]*" >/dev/null; then
  export JAX_PLATFORMS=cpu
fi
mkdir -p build/report
.venv/bin/python -m pallas_flash.bench --target v5e --json build/report/v5e.json --plot build/report/v5e.png
echo "== the v5e report's rows: build/report/v5e.json; its plot: build/report/v5e.png"
