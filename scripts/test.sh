#!/usr/bin/env bash
# Builds and runs every test: the C++ suite in Release, then again under AddressSanitizer and
# UndefinedBehaviorSanitizer, then the fuzzer over the argument checks (scripts/fuzz.sh), then the
# Python suite (both CPU paths and the v5e compiles), and the Python suite again on the oldest supported
# JAX, its tests of both CPU paths on the C++ one (PFLASH_SKIP_OLDEST_JAX=1 skips that). PFLASH_QUICK=1 (local use; CI runs everything)
# skips the sanitizer build and the fuzzer; PFLASH_SKIP_PYTHON=1 skips the Python environment and its
# tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
jobs=$(nproc)

echo "== C++ tests (Release)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$jobs"
ctest --test-dir build -j"$jobs" --output-on-failure

if [[ "${PFLASH_QUICK:-0}" == 1 ]]; then
  echo "== quick mode (PFLASH_QUICK=1): no sanitizer build, no fuzzing"
else
  echo "== C++ tests (AddressSanitizer + UndefinedBehaviorSanitizer)"
  # -O1 -g1 (line tables: file and line in every report): the instrumented kernels compile 2.9x faster
  # than at RelWithDebInfo's -O2 -g (33 s -> 12 s for the AVX512-BF16 backward), which was most of
  # this build's 8.5 minutes on two cores.
  cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1 -DNDEBUG" \
    -DPFLASH_SANITIZE=address,undefined -DPFLASH_WITH_NCCL=OFF >/dev/null
  cmake --build build-asan -j"$jobs"
  ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
    ctest --test-dir build-asan -j"$jobs" --output-on-failure

  echo "== Fuzzing the argument checks (libFuzzer + ASan/UBSan, ${PFLASH_FUZZ_SECONDS:-120} s; PFLASH_FUZZ_SECONDS=0 skips)"
  bash scripts/fuzz.sh
fi

if [[ "${PFLASH_SKIP_PYTHON:-0}" == 1 ]]; then
  echo "== Python: skipped (PFLASH_SKIP_PYTHON=1)"
  exit 0
fi
echo "== Python: pallas_flash (Pallas kernels in TPU interpret mode on CPU, 2x2 mesh, and compiled for a v5e by libtpu; the C++ kernels through the XLA FFI)"
cd python
# One pytest worker per core (pytest-xdist): interpret mode and the compiles are mostly one thread each,
# so on CI's two cores this halves the suite's time; the slowest tests are listed at the end.
pytest_args=(-q -rs -n "$jobs" --durations=15)
JAX_PLATFORMS=cpu ../.venv/bin/python -m pytest "${pytest_args[@]}"

# The same suite on the oldest JAX the package supports (python/requirements-oldest.txt): the CPU paths
# and interpret mode; the v5e compiles skip (no libtpu there). PFLASH_SKIP_OLDEST_JAX=1 skips it.
if [[ "${PFLASH_SKIP_OLDEST_JAX:-0}" == 1 ]]; then
  echo "== Python on the oldest supported JAX: skipped (PFLASH_SKIP_OLDEST_JAX=1)"
  exit 0
fi
oldest=../.venv-jax-oldest
echo "== Python on the oldest supported JAX ($(sed -n 's/^jax==//p' requirements-oldest.txt); $oldest, log: ../.deps.log)"
{
  [[ -x "$oldest/bin/python" ]] || python3 -m venv "$oldest"
  "$oldest/bin/python" -m pip install -q --disable-pip-version-check -r requirements-oldest.txt
  # Its own build directory: the FFI module compiled against this jaxlib's headers.
  "$oldest/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps \
    -C build-dir=../build-python-oldest/{wheel_tag} -e .
} >>../.deps.log 2>&1 || { tail -n 30 ../.deps.log; exit 1; }
# There, the tests parametrized over both CPU kernel paths take the C++ one (the FFI module built
# against that jaxlib) and the backward's over where dQ is computed the fused kernel (conftest); the
# Pallas kernels' other interpret-mode tests run as they are.
PFLASH_TEST_CPU_KERNELS=cpp JAX_PLATFORMS=cpu "$oldest/bin/python" -m pytest "${pytest_args[@]}"
