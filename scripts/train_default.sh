#!/usr/bin/env bash
# Installs (once) and runs the embedded two-stage default on synthetic data:
#   stage 1: the committed mask-supervised weights weights/synthetic_stage1.safetensors (made by
#            scripts/make_stage1_weights.sh; trained into $WORKDIR/stage1 and reused if absent),
#   stage 2: box-supervised video training from them (projection + pairwise + TK-Loss),
#   then the YouTube-VIS AP table and overlays of validation videos in $WORKDIR/overlays/.
# Extra arguments go to python -m maskfreevis_jax.two_stage (e.g. --config.train.steps=200).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m maskfreevis_jax.two_stage --workdir "${WORKDIR:-workdir/synthetic}" "$@"
