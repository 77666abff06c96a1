"""The official MaskFreeVIS training recipe as a config, shared by the dataset configs.

Official (video_maskformer2_R50_bs16_8ep / mfvis_nococo Base config): AdamW lr 1e-4, weight decay
0.05 (0 on norms and embeddings), backbone lr x0.1, full-model gradient clipping at L2 norm 0.01,
step decay x0.1 at 4000, 6000 iterations, batch 16 clips of 3 frames, short side 360/480.
"""
import ml_collections

from maskfreevis_jax import criterion
from maskfreevis_jax import models
from maskfreevis_jax import train
from maskfreevis_jax.data import input_pipeline


def official_recipe(num_classes: int, backbone: str = "r50") -> ml_collections.ConfigDict:
  """Official recipe for the YouTube-VIS 2019/2021 and OVIS configs (`configs/*_r50.py`)."""
  config = ml_collections.ConfigDict()
  config.mode = "train_and_evaluate"
  config.init_from = ""  # e.g. COCO-pretrained Mask2Former weights.

  config.model = models.get_model_config(backbone, num_classes=num_classes)
  config.criterion = criterion.default_criterion_config()
  config.criterion.num_classes = config.model.get_ref("num_classes")

  config.train = train.default_train_config()  # steps 6000, decay at 4000, batch 16, ...
  config.train.profile_steps = 5

  config.data = input_pipeline.official_ytvis_data_config("", "", "", "")
  config.data.batch_size = config.train.get_ref("batch_size")
  config.data.num_frames = 3

  config.eval = train.default_eval_config()
  config.sharding = train.default_sharding_config()
  return config
