#!/bin/sh
# Runs a test command that compares with Jinja2, or reports it skipped to ctest (exit 77,
# SKIP_RETURN_CODE) when Debian's /usr/bin/python3 has no jinja2 (package python3-jinja2).
if ! /usr/bin/python3 -c 'import jinja2' >/dev/null 2>&1; then
  echo "SKIPPED: /usr/bin/python3 with jinja2 not found (install python3-jinja2, see tools/setup/install-deps.sh)"
  exit 77
fi
exec "$@"
