"""Colour space work for the mask-free losses: pooling frames to mask stride and RGB -> CIE-Lab."""

import jax.numpy as jnp

# sRGB (D65) -> XYZ, and the D65 / 2-degree reference white, as scikit-image uses them.
_XYZ_FROM_RGB = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_D65_WHITE = (0.95047, 1.0, 1.08883)


def downsample_frames(frames: jnp.ndarray, stride: int) -> jnp.ndarray:
  """Average-pools frames by `stride` and truncates to integers, as the official release does.

  The release pools float frames with `avg_pool2d` and casts to uint8 (truncation, not rounding);
  for integer input the mean is computed exactly here (integer sum, floor division).

  Args:
    frames: `[..., H, W, C]` uint8 (or any real dtype holding values in [0, 255]).
    stride: pooling window and stride; trailing rows/columns that do not fill a window are dropped.

  Returns:
    `[..., H // stride, W // stride, C]` float32 holding whole numbers in [0, 255].
  """
  *lead, height, width, channels = frames.shape
  h, w = height // stride, width // stride
  x = frames[..., : h * stride, : w * stride, :]
  x = x.reshape(*lead, h, stride, w, stride, channels)
  if jnp.issubdtype(frames.dtype, jnp.integer):
    total = x.astype(jnp.int32).sum(axis=(-4, -2))
    return (total // (stride * stride)).astype(jnp.float32)
  return jnp.floor(x.astype(jnp.float32).mean(axis=(-4, -2)))


def rgb_to_lab(rgb: jnp.ndarray) -> jnp.ndarray:
  """Converts RGB in [0, 255] to CIE-Lab (D65, 2-degree observer), as `skimage.color.rgb2lab`.

  Args:
    rgb: `[..., 3]` RGB values in [0, 255] (any real dtype).

  Returns:
    `[..., 3]` float32 (L in [0, 100], a and b roughly in [-128, 127]).
  """
  c = rgb.astype(jnp.float32) / 255.0
  linear = jnp.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
  xyz = linear @ jnp.asarray(_XYZ_FROM_RGB, jnp.float32).T
  t = xyz / jnp.asarray(_D65_WHITE, jnp.float32)
  f = jnp.where(t > 0.008856, jnp.cbrt(t), 7.787 * t + 16.0 / 116.0)
  fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
  return jnp.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=-1)
