#!/usr/bin/env bash
# Installs dependencies, builds everything and runs the whole test suite.
# Usage: tools/test.sh [extra ctest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
./tools/setup/install-deps.sh test
build_dir=${SHOAL_BUILD_DIR:-build}
werror=OFF
[ "${CI:-}" = "true" ] && werror=ON
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSHOAL_WERROR=$werror -DSHOAL_BUILD_TESTS=ON
cmake --build "$build_dir" -j "$(nproc)"
cd "$build_dir"
status=0
ctest --output-on-failure --timeout 900 -j "$(nproc)" "$@" || status=$?
# ctest lists the tests that could not run here (no GPU, no CAP_NET_ADMIN, no npm registry) as
# Skipped; say why each one skipped.
if [ -f Testing/Temporary/LastTest.log ]; then
  awk '/^[0-9]+\/[0-9]+ Testing: / { test = $3 }
       /^SKIPPED: / { sub(/^SKIPPED: /, ""); print "skipped " test ": " $0 }' Testing/Temporary/LastTest.log | sort -u
fi
exit $status
