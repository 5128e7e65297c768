#!/usr/bin/env bash
# Configures Shoal as a fresh Debian 12 machine does: against Debian's unmodified CMake 3.25
# FindCUDAToolkit module (tests/data/cmake-3.25.1), once with CUDA (where nvcc is installed)
# and once as on a machine without CUDA. Exits 0 when both configure, 1 with the configure
# output when one fails, 77 (skipped) where the CMake in use is not 3.25, whose module that
# copy is. Usage: tools/check-configure.sh
set -euo pipefail
source_dir=$(cd "$(dirname "$0")/.." && pwd)
pristine="$source_dir/tests/data/cmake-3.25.1/FindCUDAToolkit.cmake"

version=$(cmake --version | head -n1 | awk '{print $3}')
case "$version" in
  3.25.*) ;;
  *)
    echo "SKIPPED: cmake is $version; the unmodified module kept here is CMake 3.25's"
    exit 77
    ;;
esac

work=$(mktemp -d "${TMPDIR:-/tmp}/shoal-check-configure.XXXXXX")
trap 'rm -rf "$work"' EXIT

# A module directory that is CMake's own but for FindCUDAToolkit.cmake, which is Debian's
# unmodified copy (it includes its neighbours by path, so they must sit beside it).
echo 'message("${CMAKE_ROOT}")' >"$work/root.cmake"
cmake_root=$(cmake -P "$work/root.cmake" 2>&1)
mkdir "$work/modules"
for module in "$cmake_root"/Modules/*; do ln -s "$module" "$work/modules/"; done
rm "$work/modules/FindCUDAToolkit.cmake"
cp "$pristine" "$work/modules/FindCUDAToolkit.cmake"

configure() {
  local name=$1
  shift
  echo "check-configure: $name"
  if ! cmake -S "$source_dir" -B "$work/$name" -G Ninja -DSHOAL_BUILD_TESTS=OFF \
      -DCMAKE_MODULE_PATH="$work/modules" "$@" >"$work/$name.log" 2>&1; then
    cat "$work/$name.log"
    echo "check-configure: configuring $name against Debian's unmodified FindCUDAToolkit failed (output above)"
    exit 1
  fi
}

nvcc=""
if [ -x /usr/local/cuda/bin/nvcc ]; then nvcc=/usr/local/cuda/bin/nvcc; else nvcc=$(command -v nvcc || true); fi
if [ -n "$nvcc" ]; then
  configure with-cuda -DCMAKE_CUDA_COMPILER="$nvcc" -DSHOAL_CUDA=ON
  grep -q "Found CUDAToolkit" "$work/with-cuda.log" || {
    cat "$work/with-cuda.log"
    echo "check-configure: configured with CUDA but FindCUDAToolkit did not run"
    exit 1
  }
else
  echo "check-configure: no nvcc here; only the configuration without CUDA is checked"
fi
# An empty compiler path is what check_language(CUDA) leaves on a machine without nvcc.
configure without-cuda -DCMAKE_CUDA_COMPILER= 
grep -q "SHOAL_CUDA" "$work/without-cuda/CMakeCache.txt"
grep -q "SHOAL_CUDA:BOOL=OFF" "$work/without-cuda/CMakeCache.txt" || {
  echo "check-configure: without nvcc, SHOAL_CUDA should default to OFF"
  exit 1
}
echo "check-configure: both configurations succeed"
