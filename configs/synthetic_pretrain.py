"""Stage 1 of the embedded default: mask-supervised pretraining on synthetic still images.

The synthetic counterpart of the COCO Mask2Former weights the official release starts from:
the tiny model learns masks with mask supervision on still images
(`maskfreevis_jax.data.synthetic_images`, other photographs than the videos) turned into
pseudo clips (`coco_pseudo`). `maskfreevis_jax.two_stage` fills `data.coco.json` with the
generated set, trains, and exports the weights that stage 2 (`configs/synthetic.py`) loads
through `init_from`:

  python -m maskfreevis_jax.two_stage --stage1_only --workdir workdir/stage1
"""

import ml_collections

from maskfreevis_jax import defaults
from maskfreevis_jax.data import synthetic

NUM_CLASSES = len(synthetic.SHAPE_CLASSES)


def get_config() -> ml_collections.ConfigDict:
  config = defaults.get_config("tiny", NUM_CLASSES)
  config.mode = "train"

  # Same model as stage 2 (configs/synthetic.py), so every tensor carries over.
  config.model.backbone.norm = "gn"
  config.model.backbone.num_groups = 8
  config.criterion.mode = "mask"
  # Class weight 5 (official 2) in the loss and in the matching cost. With 2, the class
  # probabilities of the tiny model stay near uniform, so the matching is decided by the masks
  # alone; near-duplicate queries then take the object's label or "no object" at random from step
  # to step and the class head learns nothing (the matched queries' argmax class is right for 8%
  # of the objects after 500 steps, chance is 17%). With 5: 87% after 800 steps
  # (docs/ablation.md, "Why the classes were not learned").
  config.criterion.weights.loss_ce = 5.0
  config.criterion.matcher.class_weight = 5.0

  config.train.steps = 3000
  config.train.batch_size = 8
  config.train.lr = 6e-4
  config.train.lr_decay_steps = (2500,)
  # From scratch: the backbone learns at the full rate.
  config.train.backbone_lr_multiplier = 1.0
  config.train.clip_grad_norm = 0.1
  config.train.seed = 0
  config.train.checkpoint_every = 500
  config.train.keep = 1
  config.train.log_every = 50
  config.train.image_every = 0

  config.data.name = "coco_pseudo"
  config.data.class_names = tuple(synthetic.SHAPE_CLASSES)
  config.data.with_masks = True
  # Still images: one frame per clip, as the official COCO image pretraining.
  config.data.num_frames = 1
  config.data.min_size_train = (64, 80, 96)
  config.data.pad_size = (96, 96)
  # Generated still-image set (maskfreevis_jax.data.synthetic_images); `coco.json` is set by
  # maskfreevis_jax.two_stage to the generated instances.json.
  config.data.stills.num_images = 4000
  config.data.stills.size = (96, 96)
  config.data.coco.json = ""
  config.data.coco.min_size_train = (64, 80, 96)
  config.data.coco.max_size_train = 96
  config.data.coco.crop_prob = 0.5
  config.data.coco.crop_pre_sizes = (96, 120, 144)
  config.data.coco.crop_size = (72, 96)
  config.data.coco.pseudo_length = (6, 10)
  config.data.coco.frame_range = 5
  return config
