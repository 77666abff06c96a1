"""Pixel decoders: the MSDeformAttn pixel decoder of Mask2Former and a plain FPN alternative.

Both take the backbone features {'res2': [N, H/4, W/4, C2], ..., 'res5': [N, H/32, W/32, C5]}
(N = B * T frames, processed as independent images) and return
  mask_features        [N, H/4, W/4, mask_dim]
  multi_scale_features [3 x [N, h_l, w_l, conv_dim]] at strides 32, 16, 8 (official order).

Padding: like the official model, no padding mask is given to the encoder or the position
encodings (every position counts as valid); padded pixels are simply zeros after normalisation.
"""

from typing import Any
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maskfreevis_jax.models.deformable_attention import MSDeformAttn
from maskfreevis_jax.models.position_encoding import sine_position_encoding_2d
from maskfreevis_jax.models.remat import remat_module
from maskfreevis_jax.models.resnet import Conv2dNorm

Dtype = Any

# detectron2's c2_xavier_fill: kaiming_uniform with a=1.
C2_XAVIER_FILL = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
  """Resizes [..., H, W, C] like F.interpolate(mode='bilinear', align_corners=False).

  Half-pixel centres, edge clamping and no anti-aliasing (also when downsampling), which is
  what PyTorch does.
  """
  shape = x.shape[:-3] + (height, width, x.shape[-1])
  return jax.image.resize(x, shape, method="bilinear", antialias=False)


def resize_nearest(x: jax.Array, height: int, width: int) -> jax.Array:
  """Resizes [..., H, W, C] like F.interpolate(mode='nearest') for integer upscales."""
  shape = x.shape[:-3] + (height, width, x.shape[-1])
  return jax.image.resize(x, shape, method="nearest")


class InputProjection(nn.Module):
  """1x1 conv with bias followed by GroupNorm (official `input_proj.<i>` = Sequential(conv, GN))."""

  features: int
  num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [N, H, W, C_in] -> [N, H, W, features]."""
    x = Conv2dNorm(
        self.features,
        1,
        use_bias=True,
        kernel_init=nn.initializers.xavier_uniform(),
        dtype=self.dtype,
        name="conv",
    )(x)
    return nn.GroupNorm(num_groups=self.num_groups, epsilon=1e-5, dtype=self.dtype, name="norm")(x)


class DeformableEncoderLayer(nn.Module):
  """Post-norm encoder layer: deformable self-attention + FFN (ReLU), dropout-free."""

  d_model: int = 256
  ffn_dim: int = 1024
  num_levels: int = 3
  num_heads: int = 8
  num_points: int = 4
  dtype: Dtype = jnp.float32
  packed_gather: bool = False

  @nn.compact
  def __call__(
      self,
      src: jax.Array,
      pos: jax.Array,
      reference_points: jax.Array,
      spatial_shapes: Sequence[tuple[int, int]],
  ) -> jax.Array:
    """src, pos [N, S, C]; reference_points [N or 1, S, L, 2] -> [N, S, C]."""
    xavier = nn.initializers.xavier_uniform()
    reference_points = jnp.broadcast_to(
        reference_points, (src.shape[0],) + reference_points.shape[1:]
    )
    attended = MSDeformAttn(
        self.d_model,
        self.num_levels,
        self.num_heads,
        self.num_points,
        dtype=self.dtype,
        packed_gather=self.packed_gather,
        name="self_attn",
    )(src + pos, reference_points, src, spatial_shapes)
    src = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm1")(src + attended)
    hidden = nn.relu(
        nn.Dense(self.ffn_dim, kernel_init=xavier, dtype=self.dtype, name="linear1")(src)
    )
    out = nn.Dense(self.d_model, kernel_init=xavier, dtype=self.dtype, name="linear2")(hidden)
    return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm2")(src + out)


class DeformableEncoder(nn.Module):
  """Stack of DeformableEncoderLayer named layers_<i>.

  `remat` is the rematerialisation policy of every layer ('none', 'full', 'dots'; see
  `maskfreevis_jax.models.remat`); parameters and results do not depend on it.
  """

  num_layers: int = 6
  d_model: int = 256
  ffn_dim: int = 1024
  num_levels: int = 3
  num_heads: int = 8
  num_points: int = 4
  remat: str = "none"
  dtype: Dtype = jnp.float32
  packed_gather: bool = False

  @nn.compact
  def __call__(self, src, pos, reference_points, spatial_shapes):
    # static_argnums counts `self` as 0: spatial_shapes is argument 4.
    layer_cls = remat_module(DeformableEncoderLayer, self.remat, static_argnums=(4,))
    for i in range(self.num_layers):
      layer = layer_cls(
          self.d_model,
          self.ffn_dim,
          self.num_levels,
          self.num_heads,
          self.num_points,
          dtype=self.dtype,
          packed_gather=self.packed_gather,
          name=f"layers_{i}",
      )
      src = layer(src, pos, reference_points, spatial_shapes)
    return src


def encoder_reference_points(spatial_shapes: Sequence[tuple[int, int]]) -> np.ndarray:
  """Pixel centres of every level, normalised, shared by all levels: [1, S, L, 2] (x, y)."""
  points = []
  for height, width in spatial_shapes:
    ys, xs = np.meshgrid(
        (np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width, indexing="ij"
    )
    points.append(np.stack([xs.reshape(-1), ys.reshape(-1)], -1))
  points = np.concatenate(points, 0).astype(np.float32)
  return np.broadcast_to(
      points[None, :, None, :], (1, points.shape[0], len(spatial_shapes), 2)
  ).copy()


class DeformableTransformerEncoderOnly(nn.Module):
  """Level embeddings + deformable encoder over flattened multi-scale maps."""

  num_layers: int = 6
  d_model: int = 256
  ffn_dim: int = 1024
  num_levels: int = 3
  num_heads: int = 8
  num_points: int = 4
  remat: str = "none"
  dtype: Dtype = jnp.float32
  packed_gather: bool = False

  @nn.compact
  def __call__(self, sources: Sequence[jax.Array]) -> list[jax.Array]:
    """sources: L maps [N, h_l, w_l, C] -> the L encoded maps, same shapes."""
    level_embed = self.param(
        "level_embed", nn.initializers.normal(1.0), (self.num_levels, self.d_model), jnp.float32
    )
    spatial_shapes = tuple((x.shape[1], x.shape[2]) for x in sources)
    n = sources[0].shape[0]
    flat_src = jnp.concatenate([x.reshape(n, -1, self.d_model) for x in sources], axis=1)
    pos = np.concatenate(
        [
            sine_position_encoding_2d(h, w, self.d_model // 2).reshape(h * w, -1)
            for h, w in spatial_shapes
        ],
        0,
    )
    level_ids = np.concatenate([np.full(h * w, lvl) for lvl, (h, w) in enumerate(spatial_shapes)])
    pos = (jnp.asarray(pos) + level_embed[level_ids])[None].astype(self.dtype)
    reference_points = jnp.asarray(encoder_reference_points(spatial_shapes))
    memory = DeformableEncoder(
        self.num_layers,
        self.d_model,
        self.ffn_dim,
        self.num_levels,
        self.num_heads,
        self.num_points,
        remat=self.remat,
        dtype=self.dtype,
        packed_gather=self.packed_gather,
        name="encoder",
    )(flat_src.astype(self.dtype), pos, reference_points, spatial_shapes)
    outputs, start = [], 0
    for h, w in spatial_shapes:
      outputs.append(memory[:, start : start + h * w].reshape(n, h, w, self.d_model))
      start += h * w
    return outputs


class MSDeformAttnPixelDecoder(nn.Module):
  """Mask2Former's MSDeformAttn pixel decoder.

  The deformable encoder runs over the `transformer_in_features` (res3..res5); the remaining,
  finer features (res2) are merged top-down FPN style (adapter_<i> 1x1 conv + GN, bilinear
  upsampling, layer_<i> 3x3 conv + GN + ReLU); `mask_features` is a 1x1 conv on the finest map.

  Attributes:
    conv_dim: channels of the multi-scale maps.
    mask_dim: channels of the mask features.
    num_groups: GroupNorm groups.
    num_encoder_layers, num_heads, num_points, ffn_dim: encoder sizes.
    transformer_in_features: features the encoder sees, fine to coarse.
    in_features: all pixel decoder input features, fine to coarse.
    common_stride: stride of the mask features.
    dtype: compute dtype. The official model runs this module in float32 under AMP; we do the
      same unless `force_float32` is False.
    remat: rematerialisation policy of the encoder layers ('none', 'full', 'dots'; see
      `maskfreevis_jax.models.remat`; same results).
    packed_gather: deformable attention gathers packed 4-corner rows (see
      `ms_deform_attn_core`); same results, off by default (slower on CPU, see docs/model.md).
  """

  conv_dim: int = 256
  mask_dim: int = 256
  num_groups: int = 32
  num_encoder_layers: int = 6
  num_heads: int = 8
  num_points: int = 4
  ffn_dim: int = 1024
  transformer_in_features: Sequence[str] = ("res3", "res4", "res5")
  in_features: Sequence[str] = ("res2", "res3", "res4", "res5")
  feature_strides: Sequence[int] = (4, 8, 16, 32)
  common_stride: int = 4
  dtype: Dtype = jnp.float32
  force_float32: bool = True
  remat: str = "none"
  packed_gather: bool = False

  @nn.compact
  def __call__(
      self, features: dict[str, jax.Array], train: bool = False
  ) -> tuple[jax.Array, list[jax.Array]]:
    """Returns (mask_features [N, H/4, W/4, mask_dim], 3 maps at strides 32, 16, 8)."""
    del train
    dtype = jnp.float32 if self.force_float32 else self.dtype
    missing = [f for f in self.in_features if f not in features]
    if missing:
      raise ValueError(f"pixel decoder input lacks features {missing}; got {sorted(features)}")
    sources = []
    for idx, name in enumerate(reversed(tuple(self.transformer_in_features))):
      sources.append(
          InputProjection(self.conv_dim, self.num_groups, dtype=dtype, name=f"input_proj_{idx}")(
              features[name].astype(dtype)
          )
      )
    outputs = DeformableTransformerEncoderOnly(
        self.num_encoder_layers,
        self.conv_dim,
        self.ffn_dim,
        len(sources),
        self.num_heads,
        self.num_points,
        remat=self.remat,
        dtype=dtype,
        packed_gather=self.packed_gather,
        name="transformer",
    )(sources)

    stride_of = dict(zip(self.in_features, self.feature_strides))
    coarsest_fine = min(stride_of[f] for f in self.transformer_in_features)
    num_fpn_levels = int(round(np.log2(coarsest_fine) - np.log2(self.common_stride)))
    for idx in reversed(range(num_fpn_levels)):
      x = features[self.in_features[idx]].astype(dtype)
      lateral = Conv2dNorm(
          self.conv_dim,
          1,
          norm="gn",
          num_groups=self.num_groups,
          kernel_init=C2_XAVIER_FILL,
          dtype=dtype,
          name=f"adapter_{idx + 1}",
      )(x)
      y = lateral + resize_bilinear(outputs[-1], lateral.shape[1], lateral.shape[2])
      y = Conv2dNorm(
          self.conv_dim,
          3,
          norm="gn",
          num_groups=self.num_groups,
          activation=True,
          kernel_init=C2_XAVIER_FILL,
          dtype=dtype,
          name=f"layer_{idx + 1}",
      )(y)
      outputs.append(y)
    mask_features = Conv2dNorm(
        self.mask_dim,
        1,
        use_bias=True,
        kernel_init=C2_XAVIER_FILL,
        dtype=dtype,
        name="mask_features",
    )(outputs[-1])
    return mask_features, outputs[:3]


class FPNPixelDecoder(nn.Module):
  """Plain FPN pixel decoder (Mask2Former's BasePixelDecoder), cheaper than the deformable one.

  Coarsest feature: layer_<K> 3x3 conv + GN + ReLU. Other levels: adapter_<i> 1x1 conv + GN,
  nearest 2x upsampling of the coarser output, sum, layer_<i> 3x3 conv + GN + ReLU.
  `mask_features` is a 3x3 conv with bias on the finest output.
  """

  conv_dim: int = 256
  mask_dim: int = 256
  num_groups: int = 32
  in_features: Sequence[str] = ("res2", "res3", "res4", "res5")
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self, features: dict[str, jax.Array], train: bool = False
  ) -> tuple[jax.Array, list[jax.Array]]:
    """Returns (mask_features [N, H/4, W/4, mask_dim], 3 maps at strides 32, 16, 8)."""
    del train
    missing = [f for f in self.in_features if f not in features]
    if missing:
      raise ValueError(f"pixel decoder input lacks features {missing}; got {sorted(features)}")
    num_levels = len(self.in_features)
    outputs = []
    y = None
    for idx in reversed(range(num_levels)):
      x = features[self.in_features[idx]]
      if y is None:
        y = x
      else:
        lateral = Conv2dNorm(
            self.conv_dim,
            1,
            norm="gn",
            num_groups=self.num_groups,
            kernel_init=C2_XAVIER_FILL,
            dtype=self.dtype,
            name=f"adapter_{idx + 1}",
        )(x)
        y = lateral + resize_nearest(y, lateral.shape[1], lateral.shape[2])
      y = Conv2dNorm(
          self.conv_dim,
          3,
          norm="gn",
          num_groups=self.num_groups,
          activation=True,
          kernel_init=C2_XAVIER_FILL,
          dtype=self.dtype,
          name=f"layer_{idx + 1}",
      )(y)
      outputs.append(y)
    mask_features = Conv2dNorm(
        self.mask_dim,
        3,
        use_bias=True,
        kernel_init=C2_XAVIER_FILL,
        dtype=self.dtype,
        name="mask_features",
    )(y)
    return mask_features, outputs[:3]
