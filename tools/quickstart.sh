#!/usr/bin/env bash
# Installs what building and running needs, builds Shoal and runs the main job, `shoal serve`,
# on the embedded tiny model (created once). Usage: tools/quickstart.sh [extra arguments for
# shoal serve]. The test suite's extra packages come with tools/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
./tools/setup/install-deps.sh run
build_dir=${SHOAL_BUILD_DIR:-build}
mkdir -p "$build_dir"
echo "quickstart: configuring in $build_dir (log: $build_dir/configure.log)"
if ! cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSHOAL_BUILD_TESTS=OFF \
    >"$build_dir/configure.log" 2>&1; then
  cat "$build_dir/configure.log" >&2
  echo "quickstart: configuring failed; the whole output is above and in $build_dir/configure.log" >&2
  exit 1
fi
echo "quickstart: building shoal with $(nproc) jobs"
if ! cmake --build "$build_dir" -j "$(nproc)" --target shoal; then
  echo "quickstart: the build failed; the compiler's output is above" >&2
  exit 1
fi
shoal="$build_dir/tools/shoal"
# The main job: the OpenAI-compatible server, in one process on the CPU. Without
# SHOAL_MODEL_DIR, shoal serve creates the tiny model itself (once) in the cache.
if [ -n "${SHOAL_MODEL_DIR:-}" ]; then
  if [ ! -f "$SHOAL_MODEL_DIR/config.json" ] || [ ! -f "$SHOAL_MODEL_DIR/tokenizer.json" ]; then
    "$shoal" make-model --preset tiny --out "$SHOAL_MODEL_DIR"
  fi
  exec "$shoal" serve --model "$SHOAL_MODEL_DIR" "$@"
fi
exec "$shoal" serve "$@"
