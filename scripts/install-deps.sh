#!/usr/bin/env bash
# Installs the Debian packages the C++ build needs; skips apt-get when they are all present.
#   g++ (C++20, OpenMP) and CMake; GoogleTest; CLI11 (pflash's flags); nlohmann-json (bench JSON);
#   fmt (tables); OpenBLAS (the naive baseline's matrix products); OpenMPI (the distributed layer,
#   pflash decode and its tests under mpirun); Clang and its OpenMP (the libFuzzer target of
#   scripts/fuzz.sh); Python 3 with venv for the
#   Python package's virtual environment (pinned JAX from PyPI, python/requirements.txt), into which
#   the package is installed editable (building the C++ kernels' XLA FFI module).
set -euo pipefail
packages=(
  build-essential cmake pkg-config
  libgtest-dev
  libcli11-dev
  nlohmann-json3-dev
  libfmt-dev
  libopenblas-openmp-dev
  libopenmpi-dev openmpi-bin
  clang libomp-dev
  python3 python3-venv python3-pip
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# apt's and pip's output goes to a log, shown only when they fail.
root="$(cd "$(dirname "$0")/.." && pwd)"
log="$root/.deps.log"
quietly() {
  if ! "$@" >>"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "install-deps: '$*' failed; the whole output is in $log" >&2
    exit 1
  fi
}
: >"$log"
if ((${#missing[@]})); then
  echo "== installing Debian packages: ${missing[*]} (log: $log)"
  sudo_cmd=()
  [[ $(id -u) -ne 0 ]] && sudo_cmd=(sudo)
  quietly "${sudo_cmd[@]}" apt-get update -qq
  quietly "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The TPU backend (python/): a virtual environment with the pinned JAX, at .venv in the repository.
if [[ "${PFLASH_SKIP_PYTHON:-0}" != 1 ]]; then
  echo "== Python environment .venv (python/requirements.txt; log: $log)"
  if [[ ! -x "$root/.venv/bin/python" ]]; then
    quietly python3 -m venv "$root/.venv"
  fi
  quietly "$root/.venv/bin/python" -m pip install -q --disable-pip-version-check -r "$root/python/requirements.txt"
  # The package itself, editable (its Python files are the repository's), with the C++ kernels' XLA FFI
  # module built by scikit-build-core from this CMake project (build-python/, incremental): so that
  # `.venv/bin/python -m pallas_flash.plan` works from any directory and JAX on CPU runs the C++ kernels.
  echo "== pallas_flash package: pip install -e python (builds the XLA FFI module; log: $log)"
  rm -f "$("$root/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/pallas_flash_source.pth"
  quietly "$root/.venv/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps \
    -e "$root/python"
fi
