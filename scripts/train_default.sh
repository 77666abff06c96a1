#!/usr/bin/env bash
# Installs (once) and runs the embedded two-stage default on synthetic data, the release's no-mask
# protocol (mfvis_nococo):
#   stage 1: the committed box-only weights weights/synthetic_stage1_boxes.safetensors (box
#            projection + pairwise on still images written without masks; made by
#            scripts/make_stage1_weights.sh; trained into $WORKDIR/stage1 and reused if absent),
#   stage 2: box-supervised video training from them (projection + pairwise + TK-Loss),
#   then the YouTube-VIS AP table and overlays of validation videos in $WORKDIR/overlays/.
# --protocol=masks starts stage 2 from the mask-supervised stage 1 (weights/synthetic_stage1.safetensors).
# Extra arguments go to python -m maskfreevis_jax.two_stage (e.g. --config.train.steps=200).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m maskfreevis_jax.two_stage --workdir "${WORKDIR:-workdir/synthetic}" "$@"
