#!/usr/bin/env bash
# Fuzzes the argument checks of every entry point (tests/fuzz/validation_fuzzer.cpp) with libFuzzer,
# AddressSanitizer and UndefinedBehaviorSanitizer, from the corpus in tests/fuzz/corpus, for
# PFLASH_FUZZ_SECONDS seconds (default 120; 0 skips). New inputs go to a temporary directory, so the
# repository's corpus is only read; a finding is written to build-fuzz/ and fails the script.
#   bash scripts/fuzz.sh            # after scripts/install-deps.sh (clang, libomp-dev)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${PFLASH_FUZZ_SECONDS:-120}
if [[ "$seconds" == 0 ]]; then
  echo "fuzzing skipped (PFLASH_FUZZ_SECONDS=0)"
  exit 0
fi
CXX=clang++ cmake -S . -B build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPFLASH_BUILD_FUZZERS=ON \
  -DPFLASH_SANITIZE=address,undefined -DPFLASH_BUILD_TESTS=OFF -DPFLASH_BUILD_TOOLS=OFF \
  -DPFLASH_WITH_MPI=OFF -DPFLASH_WITH_NCCL=OFF >/dev/null
cmake --build build-fuzz -j"$(nproc)" --target pflash_validation_fuzzer
new_inputs=$(mktemp -d)
log=build-fuzz/fuzz.log
trap 'rm -rf "$new_inputs"' EXIT
echo "fuzzing for ${seconds} s from $(ls tests/fuzz/corpus | wc -l) corpus inputs (log: $log)"
# -timeout: one call running 30 s is a finding too (a hang).
set +e
./build-fuzz/pflash_validation_fuzzer -max_total_time="$seconds" -timeout=30 -rss_limit_mb=4096 \
  -print_final_stats=1 -artifact_prefix=build-fuzz/ "$new_inputs" tests/fuzz/corpus >"$log" 2>&1
status=$?
set -e
if [[ "$status" != 0 ]]; then
  tail -60 "$log"
  echo "fuzzer: a finding (exit status $status); the input is in build-fuzz/ (crash-*, timeout-*, oom-*)"
else
  grep -E "^(#[0-9]+[[:space:]]+INITED|Done [0-9]+ runs|stat::(number_of_executed_units|average_exec_per_sec|new_units_added))" "$log"
fi
exit "$status"
