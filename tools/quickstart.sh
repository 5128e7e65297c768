#!/usr/bin/env bash
# Installs dependencies, builds Shoal, creates the embedded tiny model (once) and runs the main
# job on it. Usage: tools/quickstart.sh [extra arguments for the main job]
set -euo pipefail
cd "$(dirname "$0")/.."
./tools/setup/install-deps.sh
build_dir=${SHOAL_BUILD_DIR:-build}
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build_dir" -j "$(nproc)" --target shoal
shoal="$build_dir/tools/shoal"
model_dir=${SHOAL_MODEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/shoal/models/tiny}
if [ ! -f "$model_dir/config.json" ] || [ ! -f "$model_dir/tokenizer.json" ]; then
  "$shoal" make-model --preset tiny --out "$model_dir"
fi
echo "model: $model_dir"
if "$shoal" generate --help 2>/dev/null | grep -q -- '--chat'; then
  exec "$shoal" generate --model "$model_dir" --chat "${1:-Hello! Who are you?}" --max-new-tokens 32
else
  exec "$shoal" generate --model "$model_dir" --tokens 0,17,5 --max-new-tokens 16 --temperature 0
fi
