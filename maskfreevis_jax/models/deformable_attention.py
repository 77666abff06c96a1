"""Multi-scale deformable attention (Deformable DETR), in pure jax.numpy.

`ms_deform_attn_core` reproduces the PyTorch fallback of the official op (bilinear sampling
via `F.grid_sample(mode='bilinear', padding_mode='zeros', align_corners=False)`, then a
weighted sum over levels and points) with index gathers: no custom kernels, static shapes,
jit/vmap/grad friendly. Only the loop over the (static, few) feature levels is in Python.
"""

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _bilinear_corners(locations: jax.Array, height: int, width: int) -> tuple[jax.Array, jax.Array]:
  """Flat indices and weights of the 4 bilinear corners (grid_sample, align_corners=False).

  Args:
    locations: [..., 2] normalised (x, y); 0 and 1 are the outer borders of the map.
    height: map height H.
    width: map width W.

  Returns:
    int32 indices [..., 4] into the row-major H*W map (clipped to stay in range) and float
    weights [..., 4]; corners outside the map get weight 0 (zero padding).
  """
  # Pixel centres sit at (i + 0.5) / size in normalised coordinates.
  x = locations[..., 0] * width - 0.5
  y = locations[..., 1] * height - 0.5
  x0 = jnp.floor(x)
  y0 = jnp.floor(y)
  fx = x - x0
  fy = y - y0
  x0 = x0.astype(jnp.int32)
  y0 = y0.astype(jnp.int32)
  xs = jnp.stack([x0, x0 + 1, x0, x0 + 1], -1)
  ys = jnp.stack([y0, y0, y0 + 1, y0 + 1], -1)
  weights = jnp.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], -1)
  inside = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
  indices = jnp.clip(ys, 0, height - 1) * width + jnp.clip(xs, 0, width - 1)
  return indices, jnp.where(inside, weights, 0.0)


def _attend_level(
    value: jax.Array, height: int, width: int, locations: jax.Array, weights: jax.Array
) -> jax.Array:
  """Weighted sum of bilinear samples of one level.

  Args:
    value: [N, M, H*W, D] per-head values of this level.
    height: H.
    width: W.
    locations: [N, M, Lq, P, 2] normalised sampling points.
    weights: [N, M, Lq, P] attention weights.

  Returns:
    [N, M, Lq, D].
  """
  n, m, hw, d = value.shape
  lq, p = locations.shape[2:4]
  indices, corner_weights = _bilinear_corners(locations, height, width)  # [N, M, Lq, P, 4]
  # One row gather (all corners and points) from a flat [N*M*H*W, D] table; its transpose
  # in the backward pass is a single row scatter-add.
  offsets = (jnp.arange(n * m, dtype=jnp.int32) * hw).reshape(n, m, 1, 1, 1)
  rows = jnp.take(
      value.reshape(n * m * hw, d),
      (indices + offsets).reshape(-1),
      axis=0,
      mode="clip",
      unique_indices=False,
      indices_are_sorted=False,
  )
  rows = rows.reshape(n, m, lq, p * 4, d)
  total_weights = (corner_weights * weights[..., None]).reshape(n, m, lq, p * 4)
  # Multiply + reduce over the 4P samples (a dot with such a tiny contraction is slower),
  # accumulated in float32 also for bfloat16 values.
  out = jnp.sum(rows.astype(jnp.float32) * total_weights[..., None], axis=3)
  return out.astype(value.dtype)


def pack_corners(value: jax.Array, height: int, width: int) -> jax.Array:
  """Table whose row (y, x) holds the 4 bilinear corners of cell (y - 1, x - 1), zero padded.

  Args:
    value: [N, M, H*W, D] per-head values of one level.
    height: H.
    width: W.

  Returns:
    [N, M, (H+1)*(W+1), 4*D]: the corners (y0, x0), (y0, x0+1), (y0+1, x0), (y0+1, x0+1) of
    top-left corner (y0, x0) = (y - 1, x - 1), zeros where a corner is outside the map.
  """
  n, m, _, d = value.shape
  padded = jnp.pad(value.reshape(n, m, height, width, d), ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
  corners = [
      padded[:, :, dy : dy + height + 1, dx : dx + width + 1] for dy in (0, 1) for dx in (0, 1)
  ]
  return jnp.concatenate(corners, -1).reshape(n, m, (height + 1) * (width + 1), 4 * d)


def _attend_level_packed(
    table: jax.Array, height: int, width: int, locations: jax.Array, weights: jax.Array
) -> jax.Array:
  """`_attend_level` reading `pack_corners` rows: one gathered index per sample, not four.

  Args:
    table: [N, M, (H+1)*(W+1), 4*D] from `pack_corners`.
    height: H.
    width: W.
    locations: [N, M, Lq, P, 2] normalised sampling points.
    weights: [N, M, Lq, P] attention weights.

  Returns:
    [N, M, Lq, D].
  """
  n, m, rows_per_map, d4 = table.shape
  lq, p = locations.shape[2:4]
  x = locations[..., 0] * width - 0.5
  y = locations[..., 1] * height - 0.5
  x0 = jnp.floor(x)
  y0 = jnp.floor(y)
  fx = x - x0
  fy = y - y0
  x0 = x0.astype(jnp.int32)
  y0 = y0.astype(jnp.int32)
  corner_weights = jnp.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], -1)
  # A top-left corner in [-1, H-1] x [-1, W-1] has at least one corner on the map; the padding
  # zeros the others. Beyond that every corner is outside: weight 0.
  inside = (x0 >= -1) & (x0 < width) & (y0 >= -1) & (y0 < height)
  index = jnp.clip(y0 + 1, 0, height) * (width + 1) + jnp.clip(x0 + 1, 0, width)
  offsets = (jnp.arange(n * m, dtype=jnp.int32) * rows_per_map).reshape(n, m, 1, 1)
  rows = jnp.take(
      table.reshape(n * m * rows_per_map, d4),
      (index + offsets).reshape(-1),
      axis=0,
      mode="clip",
      unique_indices=False,
      indices_are_sorted=False,
  )
  rows = rows.reshape(n, m, lq, p * 4, d4 // 4)
  total_weights = jnp.where(inside[..., None], corner_weights * weights[..., None], 0.0)
  total_weights = total_weights.reshape(n, m, lq, p * 4)
  out = jnp.sum(rows.astype(jnp.float32) * total_weights[..., None], axis=3)
  return out.astype(table.dtype)


# Gathered corner rows are the big intermediate ([N, M, Lq, 4P, D] floats per level and
# layer, 236 MB for a 3 x 384x640 clip); XLA keeps them alive for the backward pass. We
# therefore process the queries in chunks of about this many gathered floats, each chunk
# rematerialised in the backward pass, so only one chunk of rows is alive at a time.
_GATHERED_FLOATS_PER_CHUNK = 1 << 23


def _attend_level_chunked(
    value: jax.Array,
    height: int,
    width: int,
    locations: jax.Array,
    weights: jax.Array,
    packed: bool = False,
) -> jax.Array:
  """`_attend_level` (or, if `packed`, `_attend_level_packed`) over query chunks with per-chunk
  rematerialisation (same result)."""
  n, m, _, d = value.shape
  lq, p = locations.shape[2:4]
  chunk = max(1, _GATHERED_FLOATS_PER_CHUNK // (n * m * p * 4 * d))
  if packed:
    # Built once per level (outside the chunks), so the backward pass does not rebuild it.
    value = pack_corners(value, height, width)
  attend = jax.checkpoint(_attend_level_packed if packed else _attend_level, static_argnums=(1, 2))
  if chunk >= lq:
    return attend(value, height, width, locations, weights)
  num_chunks = -(-lq // chunk)
  pad = num_chunks * chunk - lq
  # Padded queries sample with zero weight; their outputs are dropped.
  locations = jnp.pad(locations, ((0, 0), (0, 0), (0, pad), (0, 0), (0, 0)))
  weights = jnp.pad(weights, ((0, 0), (0, 0), (0, pad), (0, 0)))
  locations = jnp.moveaxis(locations.reshape(n, m, num_chunks, chunk, p, 2), 2, 0)
  weights = jnp.moveaxis(weights.reshape(n, m, num_chunks, chunk, p), 2, 0)
  out = jax.lax.map(lambda args: attend(value, height, width, *args), (locations, weights))
  out = jnp.moveaxis(out, 0, 2).reshape(n, m, num_chunks * chunk, d)
  return out[:, :, :lq]


def ms_deform_attn_core(
    value: jax.Array,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: jax.Array,
    attention_weights: jax.Array,
    packed: bool = False,
) -> jax.Array:
  """Multi-scale deformable attention core.

  Args:
    value: [N, S, M, D] values of all levels concatenated (S = sum of H_l * W_l), M heads.
    spatial_shapes: static ((H_0, W_0), ..., (H_{L-1}, W_{L-1})) in the order of `value`.
    sampling_locations: [N, Lq, M, L, P, 2] normalised (x, y) sampling points.
    attention_weights: [N, Lq, M, L, P] weights (softmax-normalised over L * P by the caller).
    packed: gather from a table holding the 4 bilinear corners of a cell in one row
      (`pack_corners`): one index per sample instead of four, 4x wider rows. Same result.

  Returns:
    [N, Lq, M * D] attended values.
  """
  n, s, m, d = value.shape
  _, lq, _, num_levels, num_points, _ = sampling_locations.shape
  if len(spatial_shapes) != num_levels:
    raise ValueError(
        f"spatial_shapes has {len(spatial_shapes)} levels, sampling_locations " f"has {num_levels}"
    )
  if sum(h * w for h, w in spatial_shapes) != s:
    raise ValueError(f"spatial_shapes {tuple(spatial_shapes)} do not add up to the {s} values")
  value = jnp.transpose(value, (0, 2, 1, 3))  # [N, M, S, D]
  locations = jnp.transpose(sampling_locations, (0, 2, 1, 3, 4, 5))  # [N, M, Lq, L, P, 2]
  weights = jnp.transpose(attention_weights, (0, 2, 1, 3, 4))  # [N, M, Lq, L, P]
  output = None
  start = 0
  for level, (height, width) in enumerate(spatial_shapes):
    level_value = value[:, :, start : start + height * width]
    start += height * width
    attended = _attend_level_chunked(
        level_value, height, width, locations[:, :, :, level], weights[:, :, :, level], packed
    )
    output = attended if output is None else output + attended
  return jnp.transpose(output, (0, 2, 1, 3)).reshape(n, lq, m * d)


def _sampling_offsets_bias_init(num_heads: int, num_levels: int, num_points: int):
  """Initial offsets: head h points along angle 2*pi*h/M, point p at distance p + 1."""

  def init(key, shape, dtype=jnp.float32):
    del key
    angles = np.arange(num_heads, dtype=np.float64) * (2.0 * math.pi / num_heads)
    directions = np.stack([np.cos(angles), np.sin(angles)], -1)
    directions = directions / np.abs(directions).max(-1, keepdims=True)
    grid = np.tile(directions[:, None, None, :], (1, num_levels, num_points, 1))
    grid = grid * np.arange(1, num_points + 1, dtype=np.float64)[None, None, :, None]
    grid = grid.reshape(-1)
    if grid.shape != tuple(shape):
      raise ValueError(f"sampling offset bias shape {shape} != {grid.shape}")
    return jnp.asarray(grid, dtype)

  return init


class MSDeformAttn(nn.Module):
  """Multi-scale deformable attention module (parameter layout of the official MSDeformAttn).

  Attributes:
    d_model: channels C.
    num_levels: feature levels L.
    num_heads: heads M (C must be divisible by M).
    num_points: sampling points P per head and level.
    dtype: compute dtype (the sampling locations and bilinear weights stay float32).
    packed_gather: gather packed 4-corner rows (`ms_deform_attn_core(packed=True)`).
  """

  d_model: int = 256
  num_levels: int = 4
  num_heads: int = 8
  num_points: int = 4
  dtype: jnp.dtype = jnp.float32
  packed_gather: bool = False

  @nn.compact
  def __call__(
      self,
      query: jax.Array,
      reference_points: jax.Array,
      input_flatten: jax.Array,
      spatial_shapes: Sequence[tuple[int, int]],
      input_padding_mask: jax.Array | None = None,
  ) -> jax.Array:
    """Attends from queries to sampled points of the multi-scale input.

    Args:
      query: [N, Lq, C] queries (with position embedding added).
      reference_points: [N, Lq, L, 2] normalised (x, y) reference points per level.
      input_flatten: [N, S, C] flattened multi-scale input.
      spatial_shapes: static ((H_l, W_l), ...) of the L levels in input order.
      input_padding_mask: optional [N, S] bool, True on padding positions (values zeroed).

    Returns:
      [N, Lq, C].
    """
    if self.d_model % self.num_heads:
      raise ValueError(f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}")
    n, lq, _ = query.shape
    s = input_flatten.shape[1]
    m, num_levels, p = self.num_heads, self.num_levels, self.num_points
    xavier = nn.initializers.xavier_uniform()
    dense = lambda features, name, kernel_init, bias_init=nn.initializers.zeros: nn.Dense(
        features, kernel_init=kernel_init, bias_init=bias_init, dtype=self.dtype, name=name
    )

    value = dense(self.d_model, "value_proj", xavier)(input_flatten)
    if input_padding_mask is not None:
      value = jnp.where(input_padding_mask[..., None], 0, value)
    value = value.reshape(n, s, m, self.d_model // m)
    offsets = dense(
        m * num_levels * p * 2,
        "sampling_offsets",
        nn.initializers.zeros,
        _sampling_offsets_bias_init(m, num_levels, p),
    )(query)
    offsets = offsets.reshape(n, lq, m, num_levels, p, 2).astype(jnp.float32)
    logits = dense(m * num_levels * p, "attention_weights", nn.initializers.zeros)(query)
    weights = jax.nn.softmax(logits.reshape(n, lq, m, num_levels * p).astype(jnp.float32), -1)
    weights = weights.reshape(n, lq, m, num_levels, p)
    # Offsets are in pixels of each level; normalise by (W_l, H_l).
    normalizer = jnp.asarray([[w, h] for h, w in spatial_shapes], jnp.float32)
    locations = (
        reference_points[:, :, None, :, None, :].astype(jnp.float32)
        + offsets / normalizer[None, None, None, :, None, :]
    )
    output = ms_deform_attn_core(
        value, spatial_shapes, locations, weights, packed=self.packed_gather
    )
    return dense(self.d_model, "output_proj", xavier)(output)
