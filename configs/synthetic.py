"""Embedded default: the tiny model trained from boxes on the built-in synthetic dataset.

Trains from scratch on a 2-core CPU in about 7 minutes, then evaluates on the synthetic validation
videos and prints the YouTube-VIS mask AP table:

  python main.py --config configs/synthetic.py --workdir workdir/synthetic
"""
import ml_collections

from maskfreevis_jax import criterion
from maskfreevis_jax import models
from maskfreevis_jax import train
from maskfreevis_jax.data import input_pipeline
from maskfreevis_jax.data import synthetic

NUM_CLASSES = len(synthetic.SHAPE_CLASSES)


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.mode = "train_and_evaluate"
  config.init_from = ""  # '' or a checkpoint to initialise from (issue 6 importer).

  config.model = models.get_model_config("tiny", num_classes=NUM_CLASSES)
  # From scratch there are no pretrained statistics to freeze: FrozenBN would leave the backbone
  # unnormalised. GroupNorm (8 groups: the stem has 16 channels) trains it from scratch.
  config.model.backbone.norm = "gn"
  config.model.backbone.num_groups = 8
  config.criterion = criterion.default_criterion_config()
  config.criterion.num_classes = config.model.get_ref("num_classes")
  # Short run: the TK-loss warm-up (official 2000 layer calls = 200 of 6000 iterations for L=10)
  # is scaled to 400 layer calls = 100 iterations for the L=4 tiny model.
  config.criterion.mask_free.warmup_steps = 400
  # The official pairwise weight 5 (tuned for COCO-pretrained weights) drives randomly initialised
  # masks to saturate (all on with GroupNorm, all off without) within ~50 steps; the sigmoid
  # gradients then vanish and the projection loss never moves. Weight 1, as BoxInst's pairwise
  # term, lets the masks localise first.
  config.criterion.weights.loss_bound = 1.0

  config.train = train.default_train_config()
  config.train.steps = 1000
  config.train.batch_size = 4
  config.train.lr = 4e-4
  config.train.lr_decay_steps = (800,)
  # Nothing is pretrained: the backbone learns at the full rate (official x0.1 protects weights).
  config.train.backbone_lr_multiplier = 1.0
  config.train.clip_grad_norm = 0.1
  config.train.seed = 0
  config.train.checkpoint_every = 250
  config.train.log_every = 20
  config.train.image_every = 250

  config.data = input_pipeline.default_data_config()  # synthetic, 128x128 canvas, 3 frames
  config.data.batch_size = config.train.get_ref("batch_size")

  config.eval = train.default_eval_config()
  config.sharding = train.default_sharding_config()
  return config
