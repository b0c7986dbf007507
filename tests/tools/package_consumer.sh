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
