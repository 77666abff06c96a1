"""Upper bound: the same R50 model and recipe trained WITH video masks (Mask2Former-VIS losses).

Criterion mode 'mask' (sigmoid BCE + dice on the stride-4 masks, weights 5/5, matcher with mask
costs); the pipeline decodes the ground-truth masks. Compare its AP with ytvis19_r50.py.
"""
import ml_collections

from maskfreevis_jax import recipes


def get_config() -> ml_collections.ConfigDict:
  config = recipes.official_recipe(num_classes=40)
  config.criterion.mode = "mask"
  config.data.with_masks = True
  return config
