"""Stage 1 of the no-mask protocol: box-supervised pretraining on synthetic still images.

The synthetic counterpart of the release's `model_final_proj.pth` (the COCO Mask2Former that
`mfvis_nococo/` starts from, trained with boxes only): the stage-1 recipe of
`configs/synthetic_pretrain.py`, but the still images are written without any mask
(`synthetic_images.write_coco_instances(with_masks=False)`: no `segmentation`, no `area`) and the
criterion is the box one with the spatial terms only, box projection + colour pairwise
(`loss_bound_neighbor=0`: a still image has no motion for TK-Loss). The box criterion needs at
least two frames for its colour affinities, so each still becomes a 2-frame pseudo clip (two
crops / scales of the image, as the release's pseudo videos), 4 clips per step: the same 8
frames per step as the mask-supervised stage 1.

  python -m maskfreevis_jax.two_stage --stage1_only --protocol=boxes --workdir workdir/stage1_boxes
"""

import importlib.util
import pathlib

import ml_collections


def _load_sibling(name: str):
  """The config module `name` beside this file (configs/ is not a package)."""
  spec = importlib.util.spec_from_file_location(
      f"_maskfreevis_config_{name}", pathlib.Path(__file__).resolve().parent / f"{name}.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


synthetic_pretrain = _load_sibling("synthetic_pretrain")


def get_config() -> ml_collections.ConfigDict:
  config = synthetic_pretrain.get_config()
  config.criterion.mode = "box"
  config.data.with_masks = False
  # Spatial terms only. The pairwise weight is stage 2's (1, as BoxInst): the official 5 drives
  # randomly initialised masks to saturate (configs/synthetic.py).
  config.criterion.weights.loss_bound = 1.0
  config.criterion.weights.loss_bound_neighbor = 0.0
  config.data.num_frames = 2
  config.train.batch_size = 4  # data.batch_size follows it
  return config
