#!/usr/bin/env bash
# Makes the committed stage-1 weights of the embedded default (the synthetic "COCO"
# Mask2Former weights): mask-supervised training of the tiny model on synthetic still images
# (configs/synthetic_pretrain.py), exported to weights/synthetic_stage1.safetensors.
# Rerunning with the same config reuses the finished run in $WORKDIR.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m maskfreevis_jax.two_stage --stage1_only \
    --workdir "${WORKDIR:-workdir/stage1}" --output weights/synthetic_stage1.safetensors "$@"
