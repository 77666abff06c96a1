"""MaskFreeVIS R50 on OVIS (25 classes, heavy occlusion), official recipe (see ytvis19_r50.py).

OVIS uses the YouTube-VIS JSON schema; set --config.data.train_json / train_image_root /
val_json / val_image_root to the OVIS files. OVIS videos are longer and denser than YouTube-VIS:
more instances per clip (max_instances 50) and a larger frame range.
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
  config = _official_recipe().base_config(num_classes=25)
  config.data.max_instances = 50
  config.data.frame_range = 20
  return config
