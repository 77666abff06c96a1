"""Embedded default, stage 2: the tiny model trained from boxes on the synthetic videos.

The official protocols at laptop scale: start from "COCO" weights made on synthetic still images
(stage 1; the committed files made by `bash scripts/make_stage1_weights.sh`): by default the
box-only ones (`configs/synthetic_pretrain_boxes.py`, `weights/synthetic_stage1_boxes.safetensors`:
no mask anywhere, the release's `mfvis_nococo/`), with `configs/synthetic.py:masks` the
mask-supervised ones (`configs/synthetic_pretrain.py`, `weights/synthetic_stage1.safetensors`). Then
train on videos from boxes only (projection + pairwise + TK-Loss), evaluate on the synthetic
validation videos and print the YouTube-VIS mask AP table. `bash scripts/train_default.sh`
runs both stages (`maskfreevis_jax.two_stage`) and writes overlays; this config alone is

  python main.py --config configs/synthetic.py --workdir workdir/synthetic

`--config.init_from=none` trains from scratch instead (the old default).
"""

import pathlib

import ml_collections

from maskfreevis_jax import defaults
from maskfreevis_jax.data import synthetic

NUM_CLASSES = len(synthetic.SHAPE_CLASSES)
_WEIGHTS_DIR = pathlib.Path(__file__).resolve().parent.parent / "weights"
# The committed stage-1 weights of each protocol (`bash scripts/make_stage1_weights.sh`):
#   boxes  box-only stills (configs/synthetic_pretrain_boxes.py): no mask anywhere, the synthetic
#          counterpart of the release's `model_final_proj.pth` (`mfvis_nococo/`);
#   masks  mask-supervised stills (configs/synthetic_pretrain.py), as the release's COCO weights.
STAGE1_WEIGHTS_BY_PROTOCOL = {
    "boxes": _WEIGHTS_DIR / "synthetic_stage1_boxes.safetensors",
    "masks": _WEIGHTS_DIR / "synthetic_stage1.safetensors",
}
DEFAULT_PROTOCOL = "boxes"
STAGE1_WEIGHTS = STAGE1_WEIGHTS_BY_PROTOCOL[DEFAULT_PROTOCOL]
FRAME_SIZE = 96  # frames, canvas and test size: 96x96 trains ~1.8x faster than 128x128


def get_config(protocol: str | None = None) -> ml_collections.ConfigDict:
  """`protocol` ('boxes' or 'masks'; `configs/synthetic.py:masks` on the command line) picks the
  stage-1 weights; None: DEFAULT_PROTOCOL."""
  protocol = protocol or DEFAULT_PROTOCOL
  if protocol not in STAGE1_WEIGHTS_BY_PROTOCOL:
    raise ValueError(
        f"protocol must be one of {sorted(STAGE1_WEIGHTS_BY_PROTOCOL)}, got {protocol!r}"
    )
  config = defaults.get_config("tiny", NUM_CLASSES)
  config.init_from = str(STAGE1_WEIGHTS_BY_PROTOCOL[protocol])  # 'none': from scratch

  # GroupNorm (8 groups: the stem has 16 channels), as in stage 1: there are no COCO statistics
  # to freeze, and FrozenBN would leave a from-scratch backbone unnormalised.
  config.model.backbone.norm = "gn"
  config.model.backbone.num_groups = 8
  # Short run: the TK-loss warm-up (official 2000 layer calls = 200 of 6000 iterations for L=10)
  # is scaled to 400 layer calls = 100 iterations for the L=4 tiny model.
  config.criterion.mask_free.warmup_steps = 400
  # The official pairwise weight 5 drives randomly initialised masks to saturate within ~50
  # steps (sigmoid gradients vanish, the projection loss never moves); weight 1, as BoxInst's
  # pairwise term, keeps them trainable (tests/test_tiny_training.py).
  config.criterion.weights.loss_bound = 1.0

  # 3200 steps: about 8 min at ~25 clips/s on 2 cores; the whole default from a fresh clone (data
  # generation, evaluation and overlays included) took 10.5 of its 15 minutes, AP 42.5
  # (docs/ablation.md).
  config.train.steps = 3200
  config.train.batch_size = 4
  config.train.lr = 2e-4
  config.train.lr_decay_steps = (2600,)
  # The stage-1 backbone is tiny and young: it keeps learning at the full rate.
  config.train.backbone_lr_multiplier = 1.0
  config.train.clip_grad_norm = 0.1
  config.train.seed = 0
  config.train.checkpoint_every = 200
  config.train.log_every = 50
  config.train.image_every = 0

  # Synthetic videos (the schema's default source), 3 frames per clip.
  config.data.class_names = tuple(synthetic.SHAPE_CLASSES)
  config.data.synthetic.frame_size = (FRAME_SIZE, FRAME_SIZE)
  config.data.pad_size = (FRAME_SIZE, FRAME_SIZE)
  config.data.min_size_train = (64, 80, 96)
  config.data.min_size_test = FRAME_SIZE
  return config
