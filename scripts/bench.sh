#!/usr/bin/env bash
# Builds pflash (Release) and runs its default benchmark sweep; extra arguments go to `pflash bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)" --target pflash_cli
./build/pflash bench "$@"
