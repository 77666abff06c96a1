"""Upper bound: the same R50 model and recipe trained WITH video masks (Mask2Former-VIS losses).

Criterion mode 'mask' (sigmoid BCE + dice on the stride-4 masks, weights 5/5, matcher with mask
costs); the pipeline decodes the ground-truth masks. Compare its AP with ytvis19_r50.py.
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
  config = _official_recipe().base_config(num_classes=40)
  config.criterion.mode = "mask"
  config.data.with_masks = True
  return config
