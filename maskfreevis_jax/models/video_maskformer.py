"""VideoMaskFormer: ResNet backbone + pixel decoder + video masked-attention decoder."""

from typing import Any
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Collections that are not trained: frozen BN affine parameters and BN statistics.
NON_TRAINABLE_COLLECTIONS = ("frozen_params", "batch_stats")


class VideoMaskFormer(nn.Module):
  """Mask2Former for video clips (official VideoMaskFormer's network part).

  Frames of all clips go through the backbone and pixel decoder as B*T independent images;
  the transformer decoder then predicts per-clip masks over all T frames.

  Attributes:
    backbone: module mapping [N, H, W, 3] normalised images to {'res2'..'res5'} features.
    pixel_decoder: module mapping those features to (mask_features, 3 multi-scale maps).
    predictor: VideoMultiScaleMaskedTransformerDecoder.
    pixel_mean: RGB mean subtracted from [0, 255] frames.
    pixel_std: RGB std the frames are divided by.
    size_divisibility: H and W must be multiples of it.
  """

  backbone: nn.Module
  pixel_decoder: nn.Module
  predictor: nn.Module
  pixel_mean: Sequence[float] = (123.675, 116.28, 103.53)
  pixel_std: Sequence[float] = (58.395, 57.12, 57.375)
  size_divisibility: int = 32

  def __call__(
      self, frames: jax.Array, image_valid: jax.Array | None = None, train: bool = False
  ) -> dict[str, jax.Array]:
    """Runs the model on video clips.

    Args:
      frames: [B, T, H, W, 3] RGB in [0, 255], uint8 or float.
      image_valid: optional bool [B, H, W], True on real pixels. Outside it the normalised
        input is set to 0, which is what the official ImageList padding (pad after
        normalisation) feeds the network. Not used otherwise (the official model passes no
        padding mask to its attention layers either).
      train: only matters for a trainable-BN backbone (batch statistics).

    Returns:
      dict with pred_logits float32 [L, B, Q, C + 1] and pred_masks float32
      [L, B, Q, T, H/4, W/4] (index -1 is the final prediction), and pred_embeds float32
      [B, Q, D], the final query embeddings (used to associate queries across windows).
    """
    if frames.ndim != 5 or frames.shape[-1] != 3:
      raise ValueError(f"frames must be [B, T, H, W, 3], got shape {frames.shape}")
    b, t, h, w, _ = frames.shape
    if h % self.size_divisibility or w % self.size_divisibility:
      raise ValueError(
          f"frame size {h}x{w} is not a multiple of {self.size_divisibility}; "
          "pad the frames (and mark the padding in image_valid)"
      )
    mean = jnp.asarray(self.pixel_mean, jnp.float32)
    std = jnp.asarray(self.pixel_std, jnp.float32)
    x = (frames.astype(jnp.float32) - mean) / std
    if image_valid is not None:
      if image_valid.shape != (b, h, w):
        raise ValueError(f"image_valid must be [B, H, W] = {(b, h, w)}, got {image_valid.shape}")
      x = jnp.where(image_valid[:, None, :, :, None], x, 0.0)
    x = x.reshape(b * t, h, w, 3)
    features = self.backbone(x, train=train)
    mask_features, multi_scale_features = self.pixel_decoder(features, train=train)
    return self.predictor(multi_scale_features, mask_features, num_frames=t)
