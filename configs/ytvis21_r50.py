"""MaskFreeVIS R50 on YouTube-VIS 2021 (40 classes), official recipe (see ytvis19_r50.py).

Set --config.data.train_json / train_image_root / val_json / val_image_root to the 2021 folders.
The official 2021 schedule is the same 6000 iterations with decay at 4000 (adjust
--config.train.steps / --config.train.lr_decay_steps for longer runs).
"""
import importlib.util
import pathlib

import ml_collections


def _official_recipe():
  """configs/ytvis19_r50.py, loaded by path (config files are not a package)."""
  path = pathlib.Path(__file__).with_name("ytvis19_r50.py")
  spec = importlib.util.spec_from_file_location("maskfreevis_configs_ytvis19_r50", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config() -> ml_collections.ConfigDict:
  return _official_recipe().base_config(num_classes=40)
