"""Colour affinities of a clip: the image-only half of the mask-free losses.

Everything here depends on the frames alone, so it is computed once per clip and shared by every
instance and every deep-supervision layer. Spatial maps are `[..., K, h, w]` with the K offsets of
a window in row-major order; positions outside the frame read as zeros (SAME zero padding).
"""

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp

Offset = tuple[int, int]


def window_offsets(size: int, dilation: int, include_center: bool) -> tuple[Offset, ...]:
  """Row-major (dy, dx) offsets of a `size` x `size` window with the given dilation."""
  if size < 1 or size % 2 == 0:
    raise ValueError(f"window size must be a positive odd number, got {size}")
  radius = size // 2
  return tuple(
      (dy * dilation, dx * dilation)
      for dy in range(-radius, radius + 1)
      for dx in range(-radius, radius + 1)
      if include_center or (dy, dx) != (0, 0)
  )


def shift_spatial(
    x: jnp.ndarray, offset: Offset, axes: tuple[int, int] = (-2, -1), fill: float = 0.0
) -> jnp.ndarray:
  """Returns y with y[..., i, j] = x[..., i + dy, j + dx], `fill` where that falls outside x."""
  dy, dx = offset
  ay, ax = (a % x.ndim for a in axes)
  pad = [(0, 0)] * x.ndim
  pad[ay] = (max(-dy, 0), max(dy, 0))
  pad[ax] = (max(-dx, 0), max(dx, 0))
  padded = jnp.pad(x, pad, constant_values=fill)
  start = [0] * x.ndim
  start[ay], start[ax] = max(dy, 0), max(dx, 0)
  return jax.lax.slice(padded, start, [s + n for s, n in zip(start, x.shape)])


def inside_frame(shape: tuple[int, int], offsets: Sequence[Offset]) -> jnp.ndarray:
  """`[K, h, w]` float32: 1 where pixel p + offset_k lies inside an `h` x `w` frame (static)."""
  h, w = shape
  ys = jnp.arange(h)[:, None]
  xs = jnp.arange(w)[None, :]
  return jnp.stack(
      [((ys + dy >= 0) & (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w)) for dy, dx in offsets]
  ).astype(jnp.float32)


def spatial_color_similarity(lab: jnp.ndarray, size: int = 3, dilation: int = 2) -> jnp.ndarray:
  """Colour similarity of each pixel to its neighbours in the same frame.

  `exp(-0.5 * ||lab(p) - lab(p + d)||)` for the `size**2 - 1` offsets d of a dilated window
  without its centre (zero padding outside the frame).

  Args:
    lab: `[..., h, w, 3]` CIE-Lab frames.
    size: window size (odd).
    dilation: window dilation.

  Returns:
    `[..., size**2 - 1, h, w]` float32 similarities in (0, 1].
  """
  offsets = window_offsets(size, dilation, include_center=False)
  sims = []
  for offset in offsets:
    neighbour = shift_spatial(lab, offset, axes=(-3, -2))
    sims.append(jnp.exp(-0.5 * jnp.linalg.norm(lab - neighbour, axis=-1)))
  return jnp.stack(sims, axis=-3)


def temporal_patch_similarity(
    lab_a: jnp.ndarray,
    lab_b: jnp.ndarray,
    patch_size: int = 3,
    search_size: int = 3,
    dilation: int = 3,
) -> jnp.ndarray:
  """Patch similarity between frame b and the candidate positions in frame a (TK-Loss).

  For pixel p of frame b and each of the `search_size**2` candidates q = p + d of a dilated window
  (centre included) in frame a: `exp(-0.5 * ||patch_b(p) - patch_a(q)||)`, where a patch is the
  `patch_size` x `patch_size` x 3 block of Lab values around a pixel (zero padded), and a candidate q
  outside the frame is an all-zero patch.

  The squared patch distance is a box sum of per-pixel squared colour differences, so the cost is
  `[K, h, w]` per frame pair: no `[patch_size**2 * 3 * K, h, w]` unfold is ever built.

  Args:
    lab_a: `[..., h, w, 3]` CIE-Lab of the frame that supplies the candidates.
    lab_b: `[..., h, w, 3]` CIE-Lab of the frame that supplies the centre patches.
    patch_size: patch side (odd).
    search_size: candidate window side (odd).
    dilation: candidate window dilation.

  Returns:
    `[..., search_size**2, h, w]` float32 similarities.
  """
  if lab_a.shape != lab_b.shape:
    raise ValueError(
        f"lab_a and lab_b must have the same shape, got {lab_a.shape} and {lab_b.shape}"
    )
  offsets = window_offsets(search_size, dilation, include_center=True)
  h, w = lab_b.shape[-3:-1]
  r = patch_size // 2
  lead_pad = [(0, 0)] * (lab_b.ndim - 3)

  def box_sum(per_pixel):  # [..., h + 2r, w + 2r] -> [..., h, w]
    return sum(
        per_pixel[..., oy : oy + h, ox : ox + w]
        for oy in range(patch_size)
        for ox in range(patch_size)
    )

  # Frame b on the grid [-r, h + r) x [-r, w + r), zero outside the frame.
  padded_b = jnp.pad(lab_b, lead_pad + [(r, r), (r, r), (0, 0)])
  # Squared norm of the centre patch: the distance to an all-zero (out-of-frame) candidate.
  patch_b_sq = box_sum(jnp.sum(padded_b * padded_b, axis=-1))
  inside = inside_frame((h, w), offsets)
  sims = []
  for k, offset in enumerate(offsets):
    shifted_a = shift_spatial(
        jnp.pad(lab_a, lead_pad + [(r, r), (r, r), (0, 0)]), offset, axes=(-3, -2)
    )
    dist_sq = box_sum(jnp.sum(jnp.square(padded_b - shifted_a), axis=-1))
    dist_sq = jnp.where(inside[k] > 0, dist_sq, patch_b_sq)
    sims.append(jnp.exp(-0.5 * jnp.sqrt(dist_sq)))
  return jnp.stack(sims, axis=-3)


def keep_top_k(similarity: jnp.ndarray, k: int, axis: int = -3) -> jnp.ndarray:
  """Keeps the k largest values along `axis` (others set to 0), with `lax.top_k`."""
  moved = jnp.moveaxis(similarity, axis, -1)
  if k >= moved.shape[-1]:
    return similarity
  _, idx = jax.lax.top_k(moved, k)
  keep = jax.nn.one_hot(idx, moved.shape[-1], dtype=jnp.bool_).any(axis=-2)
  return jnp.moveaxis(jnp.where(keep, moved, 0.0), -1, axis)


def frame_pairs(num_frames: int, pairing: str) -> tuple[tuple[int, int], ...]:
  """Frame pairs (a, b) linked by TK-Loss; b supplies the centre pixel, a the candidates.

  'all_pairs': every a < b, as the official release ((0,1), (0,2), (1,2) for 3 frames).
  'cyclic': t -> t + 1 and the last frame back to the first, as the paper describes it.
  """
  if num_frames < 2:
    raise ValueError(f"TK-Loss needs clips of at least 2 frames, got T={num_frames}")
  if pairing == "all_pairs":
    return tuple((a, b) for a in range(num_frames) for b in range(a + 1, num_frames))
  if pairing == "cyclic":
    return tuple((t, (t + 1) % num_frames) for t in range(num_frames))
  raise ValueError(f"frame_pairing must be 'all_pairs' or 'cyclic', got {pairing!r}")


@flax.struct.dataclass
class ColorAffinities:
  """Image-only inputs of the mask-free losses for a batch of clips.

  Attributes:
    spatial_similarity: `[B, T, Ks, h, w]` colour similarity to the Ks spatial neighbours.
    temporal_similarity: `[B, P, Kt, h, w]` patch similarity per frame pair, top-k kept (others 0).
    spatial_affinity: `[B, T, Ks, h, w]` float32, 1 where the spatial similarity reaches its threshold.
    temporal_affinity: `[B, P, Kt, h, w]` float32, 1 where a kept temporal similarity reaches its
      threshold.
    pairs: the P frame pairs (a, b), static.
  """

  spatial_similarity: jnp.ndarray
  temporal_similarity: jnp.ndarray
  spatial_affinity: jnp.ndarray
  temporal_affinity: jnp.ndarray
  pairs: tuple[tuple[int, int], ...] = flax.struct.field(pytree_node=False)
