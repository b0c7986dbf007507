#!/usr/bin/env bash
# Builds pflash (Release) and runs its default benchmark sweep; extra arguments go to `pflash bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
PFLASH_SKIP_PYTHON=1 bash scripts/install-deps.sh  # the CPU sweep needs no JAX
echo "== build (Release)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)" --target pflash_cli >/dev/null
./build/pflash bench "$@"
