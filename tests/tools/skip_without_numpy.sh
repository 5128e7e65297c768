#!/bin/sh
# Runs a test command that compares with DeepSeek's EPLB (a NumPy port), or reports it skipped
# to ctest (exit 77, SKIP_RETURN_CODE) when Debian's /usr/bin/python3 has no numpy (package
# python3-numpy).
if ! /usr/bin/python3 -c 'import numpy' >/dev/null 2>&1; then
  echo "SKIPPED: /usr/bin/python3 with numpy not found (install python3-numpy, see tools/setup/install-deps.sh)"
  exit 77
fi
exec "$@"
