"""maskfreevis_jax.models: the Flax VideoMaskFormer (Mask2Former for video) and its presets."""

from typing import Any

import jax.numpy as jnp
import ml_collections

from maskfreevis_jax.models.pixel_decoder import FPNPixelDecoder, MSDeformAttnPixelDecoder
from maskfreevis_jax.model_presets import (
    PRESETS,
    get_model_config,
    r50,
    r101,
    swinb,
    swinl,
    swint,
    tiny,
    tiny_fpn,
    tiny_swin,
)
from maskfreevis_jax.models.remat import REMAT_POLICIES, check_policy
from maskfreevis_jax.models.resnet import ResNet
from maskfreevis_jax.models.swin import SwinTransformer
from maskfreevis_jax.models.video_decoder import VideoMultiScaleMaskedTransformerDecoder
from maskfreevis_jax.models.video_maskformer import NON_TRAINABLE_COLLECTIONS, VideoMaskFormer

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _field(config: Any, path: str):
  node = config
  for part in path.split("."):
    if part not in node:
      raise ValueError(f"model config lacks field {path!r}")
    node = node[part]
  return node


def _remat_policy(part_config: Any, part: str) -> str:
  if "remat_encoder_layers" in part_config:
    raise ValueError(
        f"model config {part}.remat_encoder_layers was replaced by {part}.remat "
        f"(one of {sorted(REMAT_POLICIES)})"
    )
  policy = part_config.remat
  check_policy(policy, f"model config {part}.remat")
  return policy


def _build_backbone(bb: Any, dtype: Any) -> ResNet | SwinTransformer:
  """The backbone of `model_config.backbone` ('resnet' or 'swin')."""
  if bb.name == "resnet":
    return ResNet(
        block_counts=tuple(bb.block_counts),
        stem_features=bb.stem_features,
        bottleneck_features=bb.bottleneck_features,
        stride_in_1x1=bb.stride_in_1x1,
        norm=bb.norm,
        num_groups=bb.num_groups,
        dtype=dtype,
        remat=_remat_policy(bb, "backbone"),
    )
  if bb.name == "swin":
    return SwinTransformer(
        embed_dim=bb.embed_dim,
        depths=tuple(bb.depths),
        num_heads=tuple(bb.num_heads),
        window_size=bb.window_size,
        patch_size=bb.patch_size,
        mlp_ratio=bb.mlp_ratio,
        qkv_bias=bb.qkv_bias,
        drop_path_rate=bb.drop_path_rate,
        patch_norm=bb.patch_norm,
        dtype=dtype,
        remat=_remat_policy(bb, "backbone"),
    )
  raise ValueError(f"model config backbone.name {bb.name!r} not in 'resnet', 'swin'")


def _build_pixel_decoder(pd: Any, dtype: Any) -> MSDeformAttnPixelDecoder | FPNPixelDecoder:
  """The pixel decoder of `model_config.pixel_decoder` ('msdeformattn' or 'fpn')."""
  if pd.name == "msdeformattn":
    return MSDeformAttnPixelDecoder(
        conv_dim=pd.conv_dim,
        mask_dim=pd.mask_dim,
        num_groups=pd.num_groups,
        num_encoder_layers=pd.num_encoder_layers,
        num_heads=pd.num_heads,
        num_points=pd.num_points,
        ffn_dim=pd.ffn_dim,
        dtype=dtype,
        force_float32=pd.force_float32,
        packed_gather=pd.packed_gather,
        remat=_remat_policy(pd, "pixel_decoder"),
    )
  if pd.name == "fpn":
    return FPNPixelDecoder(
        conv_dim=pd.conv_dim, mask_dim=pd.mask_dim, num_groups=pd.num_groups, dtype=dtype
    )
  raise ValueError(f"model config pixel_decoder.name {pd.name!r} not in 'msdeformattn', 'fpn'")


def build_model(model_config: ml_collections.ConfigDict) -> VideoMaskFormer:
  """Builds the VideoMaskFormer described by a preset-shaped config (`model_presets`)."""
  dtype_name = _field(model_config, "dtype")
  if dtype_name not in _DTYPES:
    raise ValueError(f"model config dtype {dtype_name!r} not in {sorted(_DTYPES)}")
  dtype = _DTYPES[dtype_name]
  pd = _field(model_config, "pixel_decoder")
  dec = _field(model_config, "decoder")
  predictor = VideoMultiScaleMaskedTransformerDecoder(
      num_classes=_field(model_config, "num_classes"),
      hidden_dim=dec.hidden_dim,
      num_queries=dec.num_queries,
      num_heads=dec.num_heads,
      ffn_dim=dec.ffn_dim,
      num_layers=dec.num_layers,
      mask_dim=pd.mask_dim,
      enforce_input_proj=dec.enforce_input_proj,
      dtype=dtype,
      remat=_remat_policy(dec, "decoder"),
  )
  return VideoMaskFormer(
      backbone=_build_backbone(_field(model_config, "backbone"), dtype),
      pixel_decoder=_build_pixel_decoder(pd, dtype),
      predictor=predictor,
      pixel_mean=tuple(model_config.pixel_mean),
      pixel_std=tuple(model_config.pixel_std),
      size_divisibility=model_config.size_divisibility,
  )


__all__ = [
    "build_model",
    "get_model_config",
    "PRESETS",
    "REMAT_POLICIES",
    "r50",
    "r101",
    "tiny",
    "tiny_fpn",
    "swint",
    "swinb",
    "swinl",
    "tiny_swin",
    "SwinTransformer",
    "VideoMaskFormer",
    "NON_TRAINABLE_COLLECTIONS",
]
