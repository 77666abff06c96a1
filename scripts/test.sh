#!/usr/bin/env bash
# Installs (once) and runs the default test suite (slow end-to-end tests excluded: add -m slow).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
export TF_CPP_MIN_LOG_LEVEL=2
# Slow end-to-end tests are excluded unless a marker expression is given (e.g. -m slow).
case " $* " in
  *" -m "*) ;;
  *) set -- -m "not slow" "$@" ;;
esac
exec .venv/bin/python -m pytest -q "$@"
