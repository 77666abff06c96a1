"""MaskFreeVIS R50 on OVIS (25 classes, heavy occlusion), official recipe (see ytvis19_r50.py).

OVIS uses the YouTube-VIS JSON schema; set --config.data.train_json / train_image_root /
val_json / val_image_root to the OVIS files. OVIS videos are longer and denser than YouTube-VIS:
more instances per clip (max_instances 50) and a larger frame range.
"""
import ml_collections

from maskfreevis_jax import recipes


def get_config() -> ml_collections.ConfigDict:
  config = recipes.official_recipe(num_classes=25)
  config.data.max_instances = 50
  config.data.frame_range = 20
  return config
