#!/usr/bin/env bash
# Installs dependencies, builds Shoal and runs the main job, `shoal serve`, on the embedded tiny
# model (created once). Usage: tools/quickstart.sh [extra arguments for shoal serve]
set -euo pipefail
cd "$(dirname "$0")/.."
./tools/setup/install-deps.sh
build_dir=${SHOAL_BUILD_DIR:-build}
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build_dir" -j "$(nproc)" --target shoal
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
