"""Embedded default: the tiny model trained from boxes on the built-in synthetic dataset.

Trains on a 2-core CPU in about 10 minutes, then evaluates on the synthetic validation videos and
prints the YouTube-VIS mask AP table:

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
  config.criterion = criterion.default_criterion_config()
  config.criterion.num_classes = config.model.get_ref("num_classes")
  # Short run: the TK-loss warm-up (official 2000 layer calls = 200 of 6000 iterations for L=10)
  # is scaled to 400 layer calls = 100 iterations for the L=4 tiny model.
  config.criterion.mask_free.warmup_steps = 400

  config.train = train.default_train_config()
  config.train.steps = 400
  config.train.batch_size = 4
  config.train.lr = 4e-4
  config.train.lr_decay_steps = (320,)
  config.train.clip_grad_norm = 0.1
  config.train.seed = 0
  config.train.checkpoint_every = 100
  config.train.log_every = 10
  config.train.image_every = 100

  config.data = input_pipeline.default_data_config()  # synthetic, 128x128 canvas, 3 frames
  config.data.batch_size = config.train.get_ref("batch_size")

  config.eval = train.default_eval_config()
  config.sharding = train.default_sharding_config()
  return config
