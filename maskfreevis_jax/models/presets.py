"""Model configurations ('r50', 'r101', 'tiny', 'tiny_fpn') as ml_collections.ConfigDicts.

Fields (all presets):
  name, num_classes, dtype ('float32' | 'bfloat16': compute dtype, parameters stay float32),
  pixel_mean, pixel_std, size_divisibility,
  backbone: name='resnet', block_counts, stem_features, bottleneck_features, stride_in_1x1,
            norm ('frozen_bn' | 'bn' | 'gn'), num_groups (GroupNorm groups, used by 'gn'),
            remat (per bottleneck block)
  pixel_decoder: name ('msdeformattn' | 'fpn'), conv_dim, mask_dim, num_groups,
                 num_encoder_layers, num_heads, num_points, ffn_dim, force_float32,
                 remat (per deformable encoder layer; 'msdeformattn' only)
  decoder: hidden_dim, num_queries, num_heads, ffn_dim, num_layers (predictions = +1),
           enforce_input_proj, remat (per attention / FFN layer)
Every `remat` is a rematerialisation policy name: 'none', 'full' or 'dots' (see remat.py).
"""
import ml_collections

from maskfreevis_jax.models.resnet import RESNET_BLOCK_COUNTS


def _resnet_mask2former(depth: int, num_classes: int) -> ml_collections.ConfigDict:
  """Official sizes of video_maskformer2_R{depth}_bs16_8ep (YouTube-VIS 2019: 40 classes)."""
  return ml_collections.ConfigDict(dict(
      name=f"r{depth}",
      num_classes=num_classes,
      dtype="float32",
      pixel_mean=(123.675, 116.28, 103.53),
      pixel_std=(58.395, 57.12, 57.375),
      size_divisibility=32,
      backbone=dict(name="resnet", block_counts=RESNET_BLOCK_COUNTS[depth], stem_features=64,
                    bottleneck_features=64, stride_in_1x1=False, norm="frozen_bn",
                    num_groups=32, remat="none"),
      pixel_decoder=dict(name="msdeformattn", conv_dim=256, mask_dim=256, num_groups=32,
                         num_encoder_layers=6, num_heads=8, num_points=4, ffn_dim=1024,
                         force_float32=True, remat="none"),
      decoder=dict(hidden_dim=256, num_queries=100, num_heads=8, ffn_dim=2048, num_layers=9,
                   enforce_input_proj=False, remat="none"),
  ))


def r50(num_classes: int = 40) -> ml_collections.ConfigDict:
  """ResNet-50 VideoMaskFormer, the official MaskFreeVIS R50 model."""
  return _resnet_mask2former(50, num_classes)


def r101(num_classes: int = 40) -> ml_collections.ConfigDict:
  """ResNet-101 VideoMaskFormer."""
  return _resnet_mask2former(101, num_classes)


def tiny(num_classes: int = 40) -> ml_collections.ConfigDict:
  """Small model for CPU tests: 1 block per stage of width 16, hidden 64, 2 encoder and
  3 decoder layers, 16 queries (L = 4 predictions)."""
  config = _resnet_mask2former(50, num_classes)
  config.name = "tiny"
  config.backbone.block_counts = (1, 1, 1, 1)
  config.backbone.stem_features = 16
  config.backbone.bottleneck_features = 16
  config.pixel_decoder.update(conv_dim=64, mask_dim=64, num_groups=8, num_encoder_layers=2,
                              num_heads=4, num_points=4, ffn_dim=128)
  config.decoder.update(hidden_dim=64, num_queries=16, num_heads=4, ffn_dim=128, num_layers=3)
  return config


def tiny_fpn(num_classes: int = 40) -> ml_collections.ConfigDict:
  """`tiny` with the plain FPN pixel decoder instead of the deformable one."""
  config = tiny(num_classes)
  config.name = "tiny_fpn"
  config.pixel_decoder.name = "fpn"
  return config


PRESETS = {"r50": r50, "r101": r101, "tiny": tiny, "tiny_fpn": tiny_fpn}


def get_model_config(name: str, num_classes: int = 40) -> ml_collections.ConfigDict:
  """Returns the preset `name` ('r50', 'r101', 'tiny', 'tiny_fpn')."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name](num_classes)
