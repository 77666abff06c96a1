#!/usr/bin/env bash
# Installs (once) and runs the embedded default: train + evaluate on the synthetic dataset.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python main.py --config configs/synthetic.py --workdir "${WORKDIR:-workdir/synthetic}" "$@"
