"""MaskFreeVIS R101 on YouTube-VIS 2019 (official video_maskformer2_R101_bs16_8ep: same recipe as
R50 with a ResNet-101 backbone; published 49.1 AP from COCO-pretrained weights)."""
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
  return _official_recipe().base_config(num_classes=40, backbone="r101")
