#!/usr/bin/env bash
# Installs dependencies, builds everything and runs the whole test suite; then builds the
# decoders of untrusted bytes with AddressSanitizer and UndefinedBehaviorSanitizer and runs
# their tests and fuzzers there.
# Usage: tools/test.sh [extra ctest arguments for the main build]
# Environment: SHOAL_BUILD_DIR (default build), SHOAL_SANITIZE_BUILD_DIR (default build-asan),
# SHOAL_SKIP_SANITIZE=1 skips the sanitizer stage (not under CI=true).
set -euo pipefail
cd "$(dirname "$0")/.."
./tools/setup/install-deps.sh test
build_dir=${SHOAL_BUILD_DIR:-build}
werror=OFF
[ "${CI:-}" = "true" ] && werror=ON

# ctest lists the tests that could not run here (no GPU, no CAP_NET_ADMIN, no npm registry,
# no libFuzzer) as Skipped; say why each one skipped.
report_skips() {
  if [ -f "$1/Testing/Temporary/LastTest.log" ]; then
    awk '/^[0-9]+\/[0-9]+ Testing: / { test = $3 }
         /^SKIPPED: / { sub(/^SKIPPED: /, ""); print "skipped " test ": " $0 }' "$1/Testing/Temporary/LastTest.log" | sort -u
  fi
}

# Each failed assertion of the failed tests, with its expansion and messages, again at the
# very end: a failing test's own output can be thousands of node log lines long.
report_failures() {
  if [ -f "$1/Testing/Temporary/LastTest.log" ]; then
    awk '/^[0-9]+\/[0-9]+ Testing: / { test = $3 }
         after_rule && !/^-+$/ && !/:[0-9]+$/ { test_case = $0 }
         { after_rule = length($0) >= 70 && /^-+$/ }
         /: FAILED:$/ { left = 24; print "--- " test ", test case \"" test_case "\":" }
         left > 0 { if ($0 ~ /^(-----|=====)/) left = 0; else { print; left-- } }' \
      "$1/Testing/Temporary/LastTest.log" | head -n 400
  fi
}

# A compiler that runs out of disk or memory can fail without a word of its own (ninja then
# shows only the command): say what the machine had, before and after a failed build.
resources() {
  echo "test.sh: $1: disk free where the build lives: $(df -Ph . | awk 'NR == 2 { print $4 " of " $2 }');" \
       "memory available: $(awk '/^MemAvailable:/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
}
build() {
  cmake --build "$@" || { status=$?; resources "the build failed (exit $status)"; exit $status; }
}
resources "before the build"
if [ "$(df -Pk . | awk 'NR == 2 { print $4 }')" -lt $((8 * 1024 * 1024)) ]; then
  echo "test.sh: warning: less than 8 GiB free; the two builds with the tests' model copies take about 4 GiB, and ccache keeps up to 5 GiB"
fi

cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSHOAL_WERROR=$werror -DSHOAL_BUILD_TESTS=ON
build "$build_dir" -j "$(nproc)"
status=0
(cd "$build_dir" && ctest --output-on-failure --timeout 900 -j "$(nproc)" "$@") || status=$?
report_skips "$build_dir"
main_status=$status

if [ "${SHOAL_SKIP_SANITIZE:-}" = "1" ] && [ "${CI:-}" != "true" ]; then
  echo "test.sh: SHOAL_SKIP_SANITIZE=1: the sanitizer and fuzzing stage did not run"
  [ "$status" -eq 0 ] || report_failures "$build_dir"
  exit $status
fi

# The tests of everything that parses or moves untrusted bytes (safetensors and its index,
# config.json, cluster YAML, Cap'n Proto envelopes, HTTP requests and JSON bodies, chat
# messages, the tokenizer, Authorization headers and tokens) and the in-process cluster, under
# ASan + UBSan; then each libFuzzer target for SHOAL_FUZZ_SECONDS from its committed corpus.
# clang builds it when installed (libFuzzer needs it); otherwise the fuzz_* tests report Skipped
# and the rest still runs.
san_dir=${SHOAL_SANITIZE_BUILD_DIR:-build-asan}
san_tests=(config_model_config_test runtime_safetensors_test runtime_tokenizer_test runtime_text_test
           actors_cluster_config_test transport_codec_test gateway_api_test gateway_server_test
           actors_cluster_test)
# Every fuzz target of tests/fuzz/CMakeLists.txt, so that a new one cannot be left out here.
mapfile -t fuzz_names < <(sed -n 's/^shoal_add_fuzz_target(\([a-z_0-9]*\) .*/\1/p' tests/fuzz/CMakeLists.txt)
compilers=()
if command -v clang++ >/dev/null 2>&1; then
  compilers=(-DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++)
fi
# -O1 with line tables only: the sanitizers' reports keep file and line, and this second build
# of the heavy templates (CAF, Beast, nlohmann) costs much less than -O2 with full debug info.
cmake -S . -B "$san_dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSHOAL_CUDA=OFF \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1" -DCMAKE_C_FLAGS_RELWITHDEBINFO="-O1 -g1" \
  -DSHOAL_SANITIZE=ON -DSHOAL_FUZZ=ON -DSHOAL_BUILD_TESTS=ON "${compilers[@]}"
targets=("${san_tests[@]}")
for name in "${fuzz_names[@]}"; do
  targets+=("fuzz_replay_$name")
  grep -q "^build fuzz_$name:" "$san_dir/build.ninja" 2>/dev/null && targets+=("fuzz_$name")
done
build "$san_dir" -j "$(nproc)" --target "${targets[@]}"
pattern="^($(IFS='|'; echo "${san_tests[*]}")|fuzz_.*)\$"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:strict_string_checks=1:detect_stack_use_after_return=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}
san_status=0
(cd "$san_dir" && ctest --output-on-failure --timeout 900 -j "$(nproc)" -R "$pattern") || san_status=$?
report_skips "$san_dir"
[ "$main_status" -eq 0 ] || report_failures "$build_dir"
[ "$san_status" -eq 0 ] || report_failures "$san_dir"
[ "$san_status" -eq 0 ] || status=$san_status
exit $status
