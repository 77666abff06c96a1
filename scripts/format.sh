#!/usr/bin/env bash
# Applies the project's code style (configured in pyproject.toml): ruff's type-hint rules
# (builtin generics, `X | None`, collections.abc imports), then pyink (Google's black: 2-space
# indentation, double quotes, 100 columns). tests/test_style.py checks both.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check --fix --unsafe-fixes --quiet .
.venv/bin/pyink --quiet .
