#!/bin/sh
# Installs the build tree BUILD into a temporary prefix and builds and runs examples/consumer against
# it with find_package(pflash CONFIG REQUIRED), then compiles the same program through pkg-config.
#   package_consumer.sh SOURCE_DIR BUILD_DIR
set -eu
source_dir=$1
build_dir=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cmake --install "$build_dir" --prefix "$work/prefix" >/dev/null
cmake -S "$source_dir/examples/consumer" -B "$work/consumer" -DCMAKE_PREFIX_PATH="$work/prefix" >/dev/null
cmake --build "$work/consumer" >/dev/null
"$work/consumer/pflash_consumer"
PKG_CONFIG_PATH="$work/prefix/lib/pkgconfig" c++ -std=c++20 "$source_dir/examples/consumer/main.cpp" \
  $(PKG_CONFIG_PATH="$work/prefix/lib/pkgconfig" pkg-config --cflags --libs pflash) -o "$work/pkgconfig_consumer"
"$work/pkgconfig_consumer"
# Components: pflash::pflash alone needs OpenMP alone (no BLAS lookup, no pflash::naive); COMPONENTS naive
# loads pflash::naive with BLAS; a component this installation lacks fails find_package.
check() {
  mkdir -p "$work/components/$1"
  printf '%s\n' "cmake_minimum_required(VERSION 3.25)" "project(components LANGUAGES CXX)" "$2" \
    >"$work/components/$1/CMakeLists.txt"
  cmake -S "$work/components/$1" -B "$work/components/$1/build" -DCMAKE_PREFIX_PATH="$work/prefix" >"$work/components/$1/log" 2>&1
}
check core 'find_package(pflash CONFIG REQUIRED)
if(TARGET pflash::naive OR DEFINED BLAS_FOUND)
  message(FATAL_ERROR "pflash::pflash alone loaded pflash::naive or looked for BLAS")
endif()' || { cat "$work/components/core/log"; exit 1; }
if [ -n "$(find "$work/prefix" -name pflash_naiveTargets.cmake)" ]; then
  check naive 'find_package(pflash CONFIG REQUIRED COMPONENTS naive)
if(NOT TARGET pflash::naive)
  message(FATAL_ERROR "COMPONENTS naive did not load pflash::naive")
endif()' || { cat "$work/components/naive/log"; exit 1; }
fi
if check bogus 'find_package(pflash CONFIG REQUIRED COMPONENTS bogus)'; then
  echo "find_package(pflash COMPONENTS bogus) succeeded"; exit 1
fi
grep -q "component 'bogus' was not built" "$work/components/bogus/log" || { cat "$work/components/bogus/log"; exit 1; }
echo "components: ok"
