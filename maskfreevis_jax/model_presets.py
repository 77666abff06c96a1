"""Model presets (`config.model`): pure configuration, importable without JAX.

Model configurations ('r50', 'r101', 'tiny', 'tiny_fpn', 'swint', 'swinb', 'swinl',
'tiny_swin') as ml_collections.ConfigDicts.

Fields (all presets):
  name, num_classes, dtype ('float32' | 'bfloat16': compute dtype, parameters stay float32),
  pixel_mean, pixel_std, size_divisibility,
  backbone: name='resnet', block_counts, stem_features, bottleneck_features, stride_in_1x1,
            norm ('frozen_bn' | 'bn' | 'gn'), num_groups (GroupNorm groups, used by 'gn'),
            remat (per bottleneck block)
            or name='swin': embed_dim, depths, num_heads, window_size, patch_size, mlp_ratio,
            qkv_bias, drop_path_rate, patch_norm, pretrain_img_size, remat (per Swin block)
  pixel_decoder: name ('msdeformattn' | 'fpn'), conv_dim, mask_dim, num_groups,
                 num_encoder_layers, num_heads, num_points, ffn_dim, force_float32,
                 packed_gather (deformable attention gathers packed 4-corner rows),
                 remat (per deformable encoder layer; 'msdeformattn' only)
  decoder: hidden_dim, num_queries, num_heads, ffn_dim, num_layers (predictions = +1),
           enforce_input_proj, remat (per attention / FFN layer)
Every `remat` is a rematerialisation policy name: 'none', 'full' or 'dots' (see remat.py).
"""

import ml_collections

# Bottleneck blocks per ResNet stage, by depth (models/resnet.py builds them).
RESNET_BLOCK_COUNTS = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
}


def _resnet_mask2former(depth: int, num_classes: int) -> ml_collections.ConfigDict:
  """Official sizes of video_maskformer2_R{depth}_bs16_8ep (YouTube-VIS 2019: 40 classes)."""
  return ml_collections.ConfigDict(
      dict(
          name=f"r{depth}",
          num_classes=num_classes,
          dtype="float32",
          pixel_mean=(123.675, 116.28, 103.53),
          pixel_std=(58.395, 57.12, 57.375),
          size_divisibility=32,
          backbone=dict(
              name="resnet",
              block_counts=RESNET_BLOCK_COUNTS[depth],
              stem_features=64,
              bottleneck_features=64,
              stride_in_1x1=False,
              norm="frozen_bn",
              num_groups=32,
              remat="none",
          ),
          pixel_decoder=dict(
              name="msdeformattn",
              conv_dim=256,
              mask_dim=256,
              num_groups=32,
              num_encoder_layers=6,
              num_heads=8,
              num_points=4,
              ffn_dim=1024,
              force_float32=True,
              packed_gather=False,
              remat="none",
          ),
          decoder=dict(
              hidden_dim=256,
              num_queries=100,
              num_heads=8,
              ffn_dim=2048,
              num_layers=9,
              enforce_input_proj=False,
              remat="none",
          ),
      )
  )


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
  config.pixel_decoder.update(
      conv_dim=64,
      mask_dim=64,
      num_groups=8,
      num_encoder_layers=2,
      num_heads=4,
      num_points=4,
      ffn_dim=128,
  )
  config.decoder.update(hidden_dim=64, num_queries=16, num_heads=4, ffn_dim=128, num_layers=3)
  return config


def tiny_fpn(num_classes: int = 40) -> ml_collections.ConfigDict:
  """`tiny` with the plain FPN pixel decoder instead of the deformable one."""
  config = tiny(num_classes)
  config.name = "tiny_fpn"
  config.pixel_decoder.name = "fpn"
  return config


# Official Swin sizes (MODEL.SWIN.*): YouTube-VIS 2019 Swin-L of the MaskFreeVIS release
# (video_maskformer2_swin_large_IN21k_384_bs16_8ep, 200 queries); Swin-T / Swin-B as Mask2Former
# configures them (swin_tiny_patch4_window7_224 / swin_base_patch4_window12_384_22k weights).
_SWIN_SIZES = {
    "swint": dict(
        embed_dim=96,
        depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24),
        window_size=7,
        pretrain_img_size=224,
        num_queries=100,
    ),
    "swinb": dict(
        embed_dim=128,
        depths=(2, 2, 18, 2),
        num_heads=(4, 8, 16, 32),
        window_size=12,
        pretrain_img_size=384,
        num_queries=100,
    ),
    "swinl": dict(
        embed_dim=192,
        depths=(2, 2, 18, 2),
        num_heads=(6, 12, 24, 48),
        window_size=12,
        pretrain_img_size=384,
        num_queries=200,
    ),
}


def _swin_mask2former(variant: str, num_classes: int) -> ml_collections.ConfigDict:
  """The R50 model with the official D2SwinTransformer backbone of `variant` (see _SWIN_SIZES)."""
  sizes = dict(_SWIN_SIZES[variant])
  config = _resnet_mask2former(50, num_classes)
  config.name = variant
  config.decoder.num_queries = sizes.pop("num_queries")
  # pretrain_img_size only sizes the absolute position embedding, which the release turns off
  # (APE: False); it is kept to name the ImageNet weights the preset expects.
  config.backbone = ml_collections.ConfigDict(
      dict(
          name="swin",
          patch_size=4,
          mlp_ratio=4.0,
          qkv_bias=True,
          drop_path_rate=0.3,
          patch_norm=True,
          remat="none",
          **sizes,
      )
  )
  return config


def swint(num_classes: int = 40) -> ml_collections.ConfigDict:
  """Swin-T VideoMaskFormer (Mask2Former's video_maskformer2_swin_tiny sizes, 100 queries)."""
  return _swin_mask2former("swint", num_classes)


def swinb(num_classes: int = 40) -> ml_collections.ConfigDict:
  """Swin-B (IN21k, 384) VideoMaskFormer (Mask2Former's sizes, 100 queries)."""
  return _swin_mask2former("swinb", num_classes)


def swinl(num_classes: int = 40) -> ml_collections.ConfigDict:
  """Swin-L (IN21k, 384) VideoMaskFormer with 200 queries: the release's 56.0 AP model."""
  return _swin_mask2former("swinl", num_classes)


def tiny_swin(num_classes: int = 40) -> ml_collections.ConfigDict:
  """`tiny` with a small Swin backbone (embed 16, 2 blocks per stage, window 4) for CPU tests."""
  config = tiny(num_classes)
  config.name = "tiny_swin"
  config.backbone = swint(num_classes).backbone
  config.backbone.update(
      embed_dim=16,
      depths=(2, 2, 2, 2),
      num_heads=(1, 2, 2, 4),
      window_size=4,
      pretrain_img_size=224,
  )
  return config


PRESETS = {
    "r50": r50,
    "r101": r101,
    "tiny": tiny,
    "tiny_fpn": tiny_fpn,
    "swint": swint,
    "swinb": swinb,
    "swinl": swinl,
    "tiny_swin": tiny_swin,
}


def get_model_config(name: str, num_classes: int = 40) -> ml_collections.ConfigDict:
  """Returns the preset `name` ('r50', 'r101', 'tiny', 'tiny_fpn', 'swint', 'swinb', 'swinl',
  'tiny_swin')."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name](num_classes)
