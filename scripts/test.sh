#!/usr/bin/env bash
# Installs (once) and runs the default test suite (slow end-to-end tests excluded: add -m slow).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
export TF_CPP_MIN_LOG_LEVEL=2
# The whole suite runs in PYTEST_WORKERS processes (default 2, one per core: most test time is
# single-threaded XLA compilation), a test file per worker. A run given arguments (a file, -k ...)
# stays in one process unless PYTEST_WORKERS is set.
workers=${PYTEST_WORKERS:-}
if [ $# -eq 0 ]; then workers=${workers:-2}; fi
# Slow end-to-end tests are excluded unless a marker expression is given (e.g. -m slow).
case " $* " in
  *" -m "*) ;;
  *) set -- -m "not slow" "$@" ;;
esac
if [ -n "$workers" ] && [ "$workers" != "0" ] && [ "$workers" != "1" ]; then
  set -- -n "$workers" --dist loadfile "$@"
fi
exec .venv/bin/python -m pytest -q "$@"
