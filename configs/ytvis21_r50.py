"""MaskFreeVIS R50 on YouTube-VIS 2021 (40 classes), official recipe (see ytvis19_r50.py).

Set --config.data.train_json / train_image_root / val_json / val_image_root to the 2021 folders.
The official 2021 schedule is the same 6000 iterations with decay at 4000 (adjust
--config.train.steps / --config.train.lr_decay_steps for longer runs).
"""
import ml_collections

from maskfreevis_jax import recipes


def get_config() -> ml_collections.ConfigDict:
  return recipes.official_recipe(num_classes=40)
