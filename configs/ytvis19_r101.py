"""MaskFreeVIS R101 on YouTube-VIS 2019 (official video_maskformer2_R101_bs16_8ep: same recipe as
R50 with a ResNet-101 backbone; published 49.1 AP from COCO-pretrained weights)."""
import ml_collections

from maskfreevis_jax import recipes


def get_config() -> ml_collections.ConfigDict:
  return recipes.official_recipe(num_classes=40, backbone="r101")
