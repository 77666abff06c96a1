#!/usr/bin/env bash
# Installs (once) and runs the default test suite (slow end-to-end tests excluded: add -m slow).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
export TF_CPP_MIN_LOG_LEVEL=2
if [ "$#" -eq 0 ]; then set -- -m "not slow"; fi
exec .venv/bin/python -m pytest -q "$@"
