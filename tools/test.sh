#!/usr/bin/env bash
# Installs dependencies, builds everything and runs the whole test suite.
# Usage: tools/test.sh [extra ctest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
./tools/setup/install-deps.sh
build_dir=${SHOAL_BUILD_DIR:-build}
werror=OFF
[ "${CI:-}" = "true" ] && werror=ON
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSHOAL_WERROR=$werror
cmake --build "$build_dir" -j "$(nproc)"
cd "$build_dir"
ctest --output-on-failure --timeout 900 -j "$(nproc)" "$@"
