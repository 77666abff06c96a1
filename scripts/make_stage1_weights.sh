#!/usr/bin/env bash
# Makes the committed stage-1 weights of the embedded default (the synthetic "COCO"
# Mask2Former weights), one file per protocol:
#   PROTOCOL=boxes: box-only stills (no mask written or read), box projection + colour pairwise
#                   (configs/synthetic_pretrain_boxes.py) -> weights/synthetic_stage1_boxes.safetensors,
#                   the synthetic counterpart of the release's model_final_proj.pth (mfvis_nococo);
#   PROTOCOL=masks: mask-supervised stills (configs/synthetic_pretrain.py)
#                   -> weights/synthetic_stage1.safetensors.
#   PROTOCOL=both (default): masks, then boxes.
# Rerunning with the same config reuses the finished run in $WORKDIR/<protocol>.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
protocols="${PROTOCOL:-both}"
[[ "$protocols" == both ]] && protocols="masks boxes"
for protocol in $protocols; do
  .venv/bin/python -m maskfreevis_jax.two_stage --stage1_only --protocol="$protocol" \
      --workdir "${WORKDIR:-workdir/stage1}/$protocol" --output protocol "$@"
done
