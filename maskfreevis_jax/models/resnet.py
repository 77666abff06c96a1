"""ResNet backbone in detectron2's layout (the backbone of the official R50 / R101 models).

Layout: a 7x7 stride-2 stem conv + 3x3 stride-2 max pool, then four stages res2..res5 of
bottleneck blocks (1x1 -> 3x3 -> 1x1, stride on the 3x3 conv when `stride_in_1x1` is False,
projection shortcut on the first block of a stage). Every conv has no bias and a norm layer.

Norm layers (`norm` argument):
  'frozen_bn': detectron2 FrozenBatchNorm2d. Running mean/var live in the 'batch_stats'
               collection and the affine scale/bias in the 'frozen_params' collection, so nothing
               of it is in 'params' and an optimizer over 'params' never touches it.
  'bn':        trainable flax BatchNorm (scale/bias in 'params', statistics in 'batch_stats';
               with train=True the caller must pass mutable=['batch_stats']).
  'gn':        GroupNorm(32) with trainable scale/bias in 'params'.
"""

import functools
from typing import Any
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from maskfreevis_jax.models.remat import remat_module

Dtype = Any

# Collections that hold non-trainable backbone state.
FROZEN_PARAMS_COLLECTION = "frozen_params"
BATCH_STATS_COLLECTION = "batch_stats"


class FrozenBatchNorm(nn.Module):
  """Batch norm with fixed statistics and fixed affine parameters (detectron2 semantics).

  Attributes:
    epsilon: added to the variance.
    dtype: output dtype.
  """

  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Normalises x [..., C] with the stored statistics."""
    channels = x.shape[-1]
    scale = self.variable(FROZEN_PARAMS_COLLECTION, "scale", jnp.ones, (channels,), jnp.float32)
    bias = self.variable(FROZEN_PARAMS_COLLECTION, "bias", jnp.zeros, (channels,), jnp.float32)
    mean = self.variable(BATCH_STATS_COLLECTION, "mean", jnp.zeros, (channels,), jnp.float32)
    var = self.variable(BATCH_STATS_COLLECTION, "var", jnp.ones, (channels,), jnp.float32)
    # Gradients never flow into frozen state even if a caller differentiates all collections.
    multiplier = jax.lax.stop_gradient(scale.value * jax.lax.rsqrt(var.value + self.epsilon))
    offset = jax.lax.stop_gradient(bias.value - mean.value * multiplier)
    return (x * multiplier.astype(self.dtype) + offset.astype(self.dtype)).astype(self.dtype)


def _conv_nhwc(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
  return jax.lax.conv_general_dilated(
      x,
      kernel,
      window_strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
  """2D convolution x [N, H, W, I] * kernel [kH, kW, I, O] with symmetric zero padding.

  Same result as lax.conv_general_dilated; only the kernel gradient differs in how it is
  computed: one [I, N*Ho*Wo] x [N*Ho*Wo, O] matmul per kernel tap instead of XLA's
  filter-backprop convolution, which is several times slower on CPU.
  """
  return _conv_nhwc(x, kernel, stride, pad)


def _conv2d_fwd(x, kernel, stride, pad):
  return _conv_nhwc(x, kernel, stride, pad), (x, kernel)


def _conv2d_bwd(stride, pad, residuals, grad_out):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda inputs: _conv_nhwc(inputs, kernel, stride, pad), x)
  (grad_x,) = input_vjp(grad_out)
  kh, kw, cin, cout = kernel.shape
  _, out_h, out_w, _ = grad_out.shape
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))) if pad else x
  grad_2d = grad_out.reshape(-1, cout)
  taps = []
  for a in range(kh):
    for b in range(kw):
      window = jax.lax.slice(
          padded,
          (0, a, b, 0),
          (padded.shape[0], a + stride * (out_h - 1) + 1, b + stride * (out_w - 1) + 1, cin),
          (1, stride, stride, 1),
      )
      taps.append(jnp.dot(window.reshape(-1, cin).T, grad_2d, preferred_element_type=jnp.float32))
  grad_kernel = jnp.stack(taps).reshape(kh, kw, cin, cout).astype(kernel.dtype)
  return grad_x, grad_kernel


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def make_norm(
    norm: str | None, train: bool, dtype: Dtype, name: str = "norm", num_groups: int = 32
) -> nn.Module | None:
  """Builds the norm layer selected by name ('frozen_bn', 'bn', 'gn', '' / None)."""
  if not norm:
    return None
  if norm == "frozen_bn":
    return FrozenBatchNorm(dtype=dtype, name=name)
  if norm == "bn":
    return nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name
    )
  if norm == "gn":
    return nn.GroupNorm(num_groups=num_groups, epsilon=1e-5, dtype=dtype, name=name)
  raise ValueError(f"unknown norm {norm!r}; expected 'frozen_bn', 'bn', 'gn' or ''")


class Conv2dNorm(nn.Module):
  """detectron2-style Conv2d: conv (HWIO 'kernel', optional 'bias') -> optional norm -> act.

  The norm is a child named 'norm', so the variable paths mirror the official
  `<conv>.weight` / `<conv>.norm.*` state_dict names.

  Attributes:
    features: output channels.
    kernel_size: square kernel size.
    stride: square stride.
    use_bias: whether the conv has a bias (detectron2: only when there is no norm).
    norm: norm name, see `make_norm`.
    activation: applied after the norm when True (ReLU).
    kernel_init: conv kernel initialiser.
    dtype: compute dtype; parameters stay float32.
  """

  features: int
  kernel_size: int = 1
  stride: int = 1
  use_bias: bool = False
  norm: str | None = None
  activation: bool = False
  kernel_init: Any = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
  num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x [N, H, W, C_in] -> [N, H', W', features]."""
    kernel = self.param(
        "kernel",
        self.kernel_init,
        (self.kernel_size, self.kernel_size, x.shape[-1], self.features),
        jnp.float32,
    )
    y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.kernel_size // 2)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    norm_layer = make_norm(self.norm, train, self.dtype, num_groups=self.num_groups)
    if norm_layer is not None:
      y = norm_layer(y)
    if self.activation:
      y = nn.relu(y)
    return y


class BasicStem(nn.Module):
  """7x7 stride-2 conv + norm + ReLU + 3x3 stride-2 max pool (overall stride 4)."""

  features: int = 64
  norm: str = "frozen_bn"
  num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x [N, H, W, 3] -> [N, H/4, W/4, features]."""
    x = Conv2dNorm(
        self.features,
        kernel_size=7,
        stride=2,
        norm=self.norm,
        activation=True,
        num_groups=self.num_groups,
        dtype=self.dtype,
        name="conv1",
    )(x, train)
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class BottleneckBlock(nn.Module):
  """Bottleneck residual block (detectron2 BottleneckBlock, groups=1, dilation=1).

  Attributes:
    features: output channels.
    bottleneck_features: channels of the 1x1 / 3x3 convs inside.
    stride: spatial stride of the block.
    stride_in_1x1: put the stride on the first 1x1 conv (MSRA) instead of the 3x3 conv.
  """

  features: int
  bottleneck_features: int
  stride: int = 1
  stride_in_1x1: bool = False
  norm: str = "frozen_bn"
  num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x [N, H, W, C_in] -> [N, H/stride, W/stride, features]."""
    conv = functools.partial(
        Conv2dNorm, norm=self.norm, num_groups=self.num_groups, dtype=self.dtype
    )
    stride_1x1, stride_3x3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
    if x.shape[-1] != self.features:
      shortcut = conv(self.features, 1, self.stride, name="shortcut")(x, train)
    else:
      shortcut = x
    y = conv(self.bottleneck_features, 1, stride_1x1, activation=True, name="conv1")(x, train)
    y = conv(self.bottleneck_features, 3, stride_3x3, activation=True, name="conv2")(y, train)
    y = conv(self.features, 1, 1, name="conv3")(y, train)
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """ResNet returning the res2..res5 feature maps (strides 4, 8, 16, 32).

  Attributes:
    block_counts: blocks per stage res2..res5, e.g. (3, 4, 6, 3) for ResNet-50.
    stem_features: stem output channels (64 for the official models).
    bottleneck_features: bottleneck channels of res2 (64 officially); doubles every stage.
    out_features_multiplier: output channels = bottleneck channels * this (4 officially).
    stride_in_1x1: see BottleneckBlock (False for the official torchvision-style weights).
    norm: 'frozen_bn' (default), 'bn' or 'gn'.
    num_groups: GroupNorm groups when norm == 'gn' (must divide every conv's channels).
    dtype: compute dtype.
    remat: rematerialisation policy of every bottleneck block ('none', 'full', 'dots'; see
      `maskfreevis_jax.models.remat`).
  """

  block_counts: Sequence[int] = (3, 4, 6, 3)
  stem_features: int = 64
  bottleneck_features: int = 64
  out_features_multiplier: int = 4
  stride_in_1x1: bool = False
  norm: str = "frozen_bn"
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  remat: str = "none"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """x [N, H, W, 3] (normalised) -> {'res2': [N, H/4, W/4, C2], ..., 'res5': [N, H/32, W/32, C5]}."""
    x = BasicStem(
        self.stem_features,
        norm=self.norm,
        num_groups=self.num_groups,
        dtype=self.dtype,
        name="stem",
    )(x, train)
    # `train` (argument 2, counting self) is static under remat.
    block_cls = remat_module(BottleneckBlock, self.remat, static_argnums=(2,))
    features = {}
    bottleneck = self.bottleneck_features
    for stage_index, num_blocks in enumerate(self.block_counts):
      stage_name = f"res{stage_index + 2}"
      for block_index in range(num_blocks):
        stride = 2 if (block_index == 0 and stage_index > 0) else 1
        x = block_cls(
            features=bottleneck * self.out_features_multiplier,
            bottleneck_features=bottleneck,
            stride=stride,
            stride_in_1x1=self.stride_in_1x1,
            norm=self.norm,
            num_groups=self.num_groups,
            dtype=self.dtype,
            name=f"{stage_name}_{block_index}",
        )(x, train)
      features[stage_name] = x
      bottleneck *= 2
    return features
