"""Box-supervised mask losses of MaskFreeVIS: box projection, colour pairwise and TK-Loss.

Typical use (see README "Mask-free losses"):

  cfg = losses.MaskFreeLossConfig()
  affinities = losses.compute_color_affinities(frames_uint8, cfg)       # once per batch
  box_masks = losses.box_masks_at_stride(boxes, box_valid, (H, W), cfg.stride)
  terms = losses.mask_free_losses(mask_logits, box_masks, instance_valid, affinities, step, cfg)
"""

from maskfreevis_jax.losses.affinity import ColorAffinities
from maskfreevis_jax.losses.affinity import frame_pairs
from maskfreevis_jax.losses.affinity import keep_top_k
from maskfreevis_jax.losses.affinity import spatial_color_similarity
from maskfreevis_jax.losses.affinity import temporal_patch_similarity
from maskfreevis_jax.losses.color import downsample_frames
from maskfreevis_jax.losses.color import rgb_to_lab
from maskfreevis_jax.losses.mask_free import box_masks_at_stride
from maskfreevis_jax.losses.mask_free import box_projection_loss
from maskfreevis_jax.losses.mask_free import box_windows
from maskfreevis_jax.losses.mask_free import BoxWindows
from maskfreevis_jax.losses.mask_free import compute_color_affinities
from maskfreevis_jax.losses.mask_free import mask_free_losses
from maskfreevis_jax.losses.mask_free import MaskFreeLossConfig
from maskfreevis_jax.losses.mask_free import pairwise_color_loss
from maskfreevis_jax.losses.mask_free import temporal_knn_patch_loss
from maskfreevis_jax.losses.mask_free import tk_warmup_factor

__all__ = [
    "BoxWindows",
    "ColorAffinities",
    "MaskFreeLossConfig",
    "box_masks_at_stride",
    "box_projection_loss",
    "box_windows",
    "compute_color_affinities",
    "downsample_frames",
    "frame_pairs",
    "keep_top_k",
    "mask_free_losses",
    "pairwise_color_loss",
    "rgb_to_lab",
    "spatial_color_similarity",
    "temporal_knn_patch_loss",
    "temporal_patch_similarity",
    "tk_warmup_factor",
]
