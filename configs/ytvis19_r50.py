"""MaskFreeVIS R50 on YouTube-VIS 2019, the official 8-epoch recipe (box supervision only).

Official (video_maskformer2_R50_bs16_8ep / mfvis_nococo Base config): AdamW lr 1e-4, weight decay
0.05 (0 on norms and embeddings), backbone lr x0.1, full-model gradient clipping at L2 norm 0.01,
step decay x0.1 at 4000, 6000 iterations, batch 16 clips of 3 frames, short side 360/480.

  python main.py --config configs/ytvis19_r50.py --workdir DIR \
      --config.data.train_json=/data/ytvis19/train.json \
      --config.data.train_image_root=/data/ytvis19/train/JPEGImages \
      --config.data.val_json=/data/ytvis19/valid.json \
      --config.data.val_image_root=/data/ytvis19/valid/JPEGImages
The official 46.6 AP starts from COCO mask-pretrained Mask2Former weights: set --config.init_from.
"""
import ml_collections

from maskfreevis_jax import criterion
from maskfreevis_jax import models
from maskfreevis_jax import train
from maskfreevis_jax.data import input_pipeline


def base_config(num_classes: int, backbone: str = "r50") -> ml_collections.ConfigDict:
  """Official recipe shared by the YouTube-VIS 2019/2021 and OVIS configs."""
  config = ml_collections.ConfigDict()
  config.mode = "train_and_evaluate"
  config.init_from = ""  # e.g. COCO-pretrained Mask2Former weights (issue 6 importer).

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


def get_config() -> ml_collections.ConfigDict:
  return base_config(num_classes=40)
