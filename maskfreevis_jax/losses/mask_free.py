"""The three box-supervised mask losses of MaskFreeVIS.

* box projection loss (BoxInst): dice between the max-projections of mask and box along x and y;
* spatial pairwise loss (BoxInst): neighbouring pixels of similar colour should agree;
* Temporal KNN-patch loss (TK-Loss): a pixel and its K best-matching patches in another frame of
  the clip should agree.

Inputs are the mask logits of matched instances, `[B, N, T, h, w]` at mask stride, with instances
padded to a static N and an `instance_valid [B, N]` mask; padded instances never change a value.
"""

import dataclasses
import functools
import math

import flax.struct
import jax
import jax.numpy as jnp

from maskfreevis_jax.losses import affinity as affinity_lib
from maskfreevis_jax.losses import color

_DICE_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class MaskFreeLossConfig:
  """Hyper-parameters of the mask-free losses; defaults are the official release's.

  Attributes:
    stride: mask stride relative to the input frames (masks are `[H / stride, W / stride]`).
    pairwise_size: spatial neighbourhood window (odd); `size**2 - 1` neighbours.
    pairwise_dilation: spatial neighbourhood dilation.
    pairwise_color_threshold: a neighbour counts when its colour similarity reaches this.
    patch_size: TK-Loss patch side (N in the paper).
    temporal_search_size: TK-Loss candidate window side (odd); `size**2` candidates.
    temporal_dilation: TK-Loss candidate window dilation (search radius R = size // 2 * dilation).
    temporal_topk: TK-Loss keeps the K best candidates per pixel.
    temporal_threshold: a kept candidate counts when its patch similarity reaches this (D).
    temporal_weight: factor on the summed TK-Loss of all frame pairs.
    warmup_steps: TK-Loss ramps linearly from 0 to full weight over this many steps (0: none).
    frame_pairing: 'all_pairs' (the release) or 'cyclic' (the paper: t -> t+1, last -> first).
    lab_reverse_channels: reverse the channel order before the Lab conversion. The release
      reads RGB frames (`INPUT.FORMAT RGB`) but indexes them `[2, 1, 0]` before `rgb2lab`, so its
      affinities are those of the BGR image; True reproduces that (the published recipes), False
      (default) converts the RGB frames as given.
    box_window_fractions: the pairwise and TK costs are zero outside each instance's boxes (plus
      the neighbourhood radius), so when every instance of the batch fits a window of this
      fraction of the mask's height and width, they are computed on such per-instance windows
      only. One compiled branch per fraction plus the whole frame; the smallest that fits runs.
      Values are unchanged (up to float summation order); `()` always uses the whole frame.
  """

  stride: int = 4
  pairwise_size: int = 3
  pairwise_dilation: int = 2
  pairwise_color_threshold: float = 0.3
  patch_size: int = 3
  temporal_search_size: int = 3
  temporal_dilation: int = 3
  temporal_topk: int = 5
  temporal_threshold: float = 0.05
  temporal_weight: float = 0.1
  warmup_steps: int = 2000
  frame_pairing: str = "all_pairs"
  lab_reverse_channels: bool = False
  box_window_fractions: tuple[float, ...] = (0.5,)

  def __post_init__(self):
    for name in (
        "stride",
        "pairwise_size",
        "patch_size",
        "temporal_search_size",
        "pairwise_dilation",
        "temporal_dilation",
        "temporal_topk",
    ):
      if getattr(self, name) < 1:
        raise ValueError(f"MaskFreeLossConfig.{name} must be >= 1, got {getattr(self, name)}")
    for name in ("pairwise_size", "patch_size", "temporal_search_size"):
      if getattr(self, name) % 2 == 0:
        raise ValueError(f"MaskFreeLossConfig.{name} must be odd, got {getattr(self, name)}")
    if self.frame_pairing not in ("all_pairs", "cyclic"):
      raise ValueError(
          "MaskFreeLossConfig.frame_pairing must be 'all_pairs' or 'cyclic', "
          f"got {self.frame_pairing!r}"
      )
    if self.warmup_steps < 0:
      raise ValueError(f"MaskFreeLossConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
    fractions = tuple(float(f) for f in self.box_window_fractions)
    if any(not 0.0 < f < 1.0 for f in fractions):
      raise ValueError(
          "MaskFreeLossConfig.box_window_fractions must lie in (0, 1), "
          f"got {self.box_window_fractions}"
      )
    object.__setattr__(self, "box_window_fractions", tuple(sorted(set(fractions))))


def _check_rank(name: str, x, rank: int, layout: str):
  if not hasattr(x, "shape") or x.ndim != rank:
    got = getattr(x, "shape", type(x).__name__)
    raise ValueError(f"{name} must be {layout} (rank {rank}), got shape {got}")


def compute_color_affinities(
    frames: jnp.ndarray, config: MaskFreeLossConfig = MaskFreeLossConfig()
) -> affinity_lib.ColorAffinities:
  """Lab colour affinities of a batch of clips, computed once and shared by all instances/layers.

  Frames are pooled to mask stride (truncated to whole numbers), converted to CIE-Lab (after a
  channel reversal when `config.lab_reverse_channels`, the release's quirk), then the
  spatial neighbour similarities and the top-k temporal patch similarities of every frame pair are
  computed and thresholded. No gradient flows through the result.

  Args:
    frames: `[B, T, H, W, 3]` RGB clips, uint8 (or a real dtype in [0, 255]); T >= 2.
    config: loss hyper-parameters.

  Returns:
    `ColorAffinities` with `[B, T, Ks, h, w]` spatial and `[B, P, Kt, h, w]` temporal maps,
    h = H // stride, w = W // stride.
  """
  _check_rank("frames", frames, 5, "[B, T, H, W, 3]")
  if frames.shape[-1] != 3:
    raise ValueError(f"frames must be RGB [B, T, H, W, 3], got shape {frames.shape}")
  if not (jnp.issubdtype(frames.dtype, jnp.integer) or jnp.issubdtype(frames.dtype, jnp.floating)):
    raise ValueError(f"frames must be uint8 or float RGB in [0, 255], got dtype {frames.dtype}")
  if frames.shape[2] < config.stride or frames.shape[3] < config.stride:
    raise ValueError(
        f"frames of {frames.shape[2]}x{frames.shape[3]} are smaller than the mask "
        f"stride {config.stride}"
    )
  pairs = affinity_lib.frame_pairs(frames.shape[1], config.frame_pairing)
  frames = jax.lax.stop_gradient(frames)
  if config.lab_reverse_channels:
    frames = frames[..., ::-1]  # The release's `ds_image[[2, 1, 0]]` before `rgb2lab`.
  lab = color.rgb_to_lab(color.downsample_frames(frames, config.stride))  # [B, T, h, w, 3]
  spatial = affinity_lib.spatial_color_similarity(
      lab, config.pairwise_size, config.pairwise_dilation
  )
  a_idx = jnp.asarray([a for a, _ in pairs])
  b_idx = jnp.asarray([b for _, b in pairs])
  temporal = affinity_lib.temporal_patch_similarity(
      lab[:, a_idx],
      lab[:, b_idx],
      config.patch_size,
      config.temporal_search_size,
      config.temporal_dilation,
  )  # [B, P, Kt, h, w]
  temporal = affinity_lib.keep_top_k(temporal, config.temporal_topk, axis=-3)
  return affinity_lib.ColorAffinities(
      spatial_similarity=spatial,
      temporal_similarity=temporal,
      spatial_affinity=(spatial >= config.pairwise_color_threshold).astype(jnp.float32),
      temporal_affinity=(temporal >= config.temporal_threshold).astype(jnp.float32),
      pairs=pairs,
  )


def _box_profile(lo: jnp.ndarray, hi: jnp.ndarray, full: int, stride: int) -> jnp.ndarray:
  """1-D box indicator at full resolution, bilinearly resized by 1/stride (align_corners=False).

  A full-resolution pixel i is inside when its centre i + 0.5 lies in [lo, hi). The resize samples
  source coordinate (j + 0.5) * stride - 0.5 for output j, as `F.interpolate(mode='bilinear')`.

  Args:
    lo, hi: `[...]` box extent in pixels.
    full: full-resolution length.
    stride: downsampling factor.

  Returns:
    `[..., full // stride]` float32.
  """
  out = full // stride
  src = jnp.maximum((jnp.arange(out, dtype=jnp.float32) + 0.5) * (full / out) - 0.5, 0.0)
  i0 = jnp.floor(src)
  frac = src - i0
  i1 = jnp.minimum(i0 + 1, full - 1)

  def inside(i):
    centre = i + 0.5
    return ((centre >= lo[..., None]) & (centre < hi[..., None])).astype(jnp.float32)

  return (1.0 - frac) * inside(i0) + frac * inside(i1)


def box_masks_at_stride(
    boxes: jnp.ndarray, box_valid: jnp.ndarray, image_size: tuple[int, int], stride: int = 4
) -> jnp.ndarray:
  """Box masks at mask stride, equal to rasterising at full size then a bilinear resize.

  Computed separably (rows x columns), never at full resolution. Border values are fractional,
  as in the official release.

  Args:
    boxes: `[..., 4]` boxes (x1, y1, x2, y2) in pixels of the `image_size` frame.
    box_valid: `[...]` bool; False gives an all-zero mask (no box in that frame).
    image_size: (H, W) of the frames the boxes live in.
    stride: mask stride.

  Returns:
    `[..., H // stride, W // stride]` float32.
  """
  if boxes.shape[-1:] != (4,):
    raise ValueError(f"boxes must be [..., 4] (x1, y1, x2, y2), got shape {boxes.shape}")
  if box_valid.shape != boxes.shape[:-1]:
    raise ValueError(
        f"box_valid must have shape {boxes.shape[:-1]} (boxes without the last axis), "
        f"got {box_valid.shape}"
    )
  height, width = image_size
  if height < stride or width < stride:
    raise ValueError(f"image_size {image_size} is smaller than the stride {stride}")
  boxes = boxes.astype(jnp.float32)
  rows = _box_profile(boxes[..., 1], boxes[..., 3], height, stride)
  cols = _box_profile(boxes[..., 0], boxes[..., 2], width, stride)
  masks = rows[..., :, None] * cols[..., None, :]
  return jnp.where(box_valid[..., None, None], masks, 0.0)


def _dice_loss(x: jnp.ndarray, target: jnp.ndarray) -> jnp.ndarray:
  """`1 - 2 sum(x t) / (sum(x^2) + sum(t^2) + eps)` over the last axis."""
  inter = jnp.sum(x * target, axis=-1)
  union = jnp.sum(x * x, axis=-1) + jnp.sum(target * target, axis=-1) + _DICE_EPS
  return 1.0 - 2.0 * inter / union


def box_projection_loss(
    mask_logits: jnp.ndarray, box_masks: jnp.ndarray, instance_valid: jnp.ndarray
) -> jnp.ndarray:
  """Dice of the max-projections along y and x, summed, mean over valid instance-frames.

  Args:
    mask_logits: `[B, N, T, h, w]`.
    box_masks: `[B, N, T, h, w]` from `box_masks_at_stride`.
    instance_valid: `[B, N]` bool.

  Returns:
    Scalar float32 (0 when there is no valid instance).
  """
  # sigmoid is monotonic, so the projection of the probabilities is the sigmoid of the
  # projection of the logits: the sigmoid runs on [h + w] values instead of [h * w].
  per_frame = _dice_loss(
      jax.nn.sigmoid(mask_logits.max(axis=-2)), box_masks.max(axis=-2)
  ) + _dice_loss(jax.nn.sigmoid(mask_logits.max(axis=-1)), box_masks.max(axis=-1))
  weight = jnp.broadcast_to(instance_valid[..., None], per_frame.shape).astype(jnp.float32)
  return jnp.sum(per_frame * weight) / jnp.maximum(jnp.sum(weight), 1.0)


# Logits are clipped here so that the agreement probability stays a normal float32 (> 1e-26).
_LOGIT_LIMIT = 60.0


def _fg_bg_probs(logits: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """sigmoid(x) and sigmoid(-x), each computed directly (1 - p would lose precision near 1)."""
  logits = jnp.clip(logits, -_LOGIT_LIMIT, _LOGIT_LIMIT)
  return jax.nn.sigmoid(logits), jax.nn.sigmoid(-logits)


# A block of frame pairs: (frames supplying p, frames supplying p + d_k, rows of the affinity).
PairBlock = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def _select(x: jnp.ndarray, frames: tuple[int, ...], axis: int = 2) -> jnp.ndarray:
  """x's frames `frames` along `axis` through static slices (the whole array when in order)."""
  if frames == tuple(range(x.shape[axis])):
    return x
  return jnp.concatenate([jax.lax.slice_in_dim(x, t, t + 1, axis=axis) for t in frames], axis=axis)


def _pair_weight(affinity, pixel_weight, k, offset, symmetric):
  """Weight of pixel p and offset k: affinity_k(p) * (pw(p) [+ pw(p + d_k) when symmetric])."""
  weight = pixel_weight
  if symmetric:
    inside = affinity_lib.inside_frame(pixel_weight.shape[-2:], [offset])[0]
    weight = (weight + affinity_lib.shift_spatial(pixel_weight, offset)) * inside
  return affinity[:, None, :, k] * weight


def _pair_weights(affinity, pixel_weight, offsets, symmetric):
  """All offsets' weights, materialised once: they do not depend on the predictions, so under a
  vmap over deep-supervision layers they are computed once instead of inside every layer's loop."""
  return jax.lax.optimization_barrier(
      [
          _pair_weight(affinity, pixel_weight, k, offset, symmetric)
          for k, offset in enumerate(offsets)
      ]
  )


def _agreement(fg_center, bg_center, fg_neighbour, bg_neighbour, offset):
  """P(p) P(p + d) + (1 - P(p)) (1 - P(p + d)); outside the frame the neighbour reads (1, 1)."""
  return fg_center * affinity_lib.shift_spatial(
      fg_neighbour, offset, fill=1.0
  ) + bg_center * affinity_lib.shift_spatial(bg_neighbour, offset, fill=1.0)


def _block_inputs(fg, bg, affinity, pixel_weight, block):
  centers, neighbours, rows = block
  weight = pixel_weight if pixel_weight.shape[2] == 1 else _select(pixel_weight, rows)
  return (
      _select(fg, centers),
      _select(bg, centers),
      _select(fg, neighbours),
      _select(bg, neighbours),
      _select(affinity, rows, axis=1),
      weight,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _weighted_disagreement(
    logits: jnp.ndarray,
    affinity: jnp.ndarray,
    pixel_weight: jnp.ndarray,
    blocks: tuple[PairBlock, ...],
    offsets: tuple[tuple[int, int], ...],
    symmetric: bool,
) -> jnp.ndarray:
  """Per block of frame pairs (a, b): sum of disagreement(b at p, a at p + d_k) * weight_k(p).

  The disagreement is `-log(P(p) P(q) + (1 - P(p)) (1 - P(q)))`, P = sigmoid of the logits: one
  logarithm per pixel pair on per-pixel probabilities, equal to the release's log-space form. A
  neighbour outside the frame reads probabilities (1, 1), as the release's zero-padded
  log-probabilities do, so its cost and gradient are exactly 0. weight_k(p) = affinity_k(p) *
  pixel_weight(p), plus pixel_weight(p + d_k) when `symmetric` (each unordered pair once).

  Pairs come in blocks whose frames are static slices of one probability array (the spatial loss
  is one block of every frame with itself; TK-Loss one block per frame pair). Each offset's term
  is one fused elementwise pass; the weights, which do not depend on the predictions, are built
  once; the hand-written backward pass reuses the forward's probabilities and accumulates the
  gradients of both frames in fused elementwise passes. The weights receive no gradient.

  Args:
    logits: `[B, N, T, h, w]` mask logits.
    affinity: `[B, J, K, h, w]` per-clip weights of the J pairs and K offsets.
    pixel_weight: `[B, N, J, h, w]` or `[B, N, 1, h, w]` per-instance pixel weights.
    blocks: (center frames, neighbour frames, affinity rows) per block, covering the J pairs.
    offsets: the K offsets d_k (static).
    symmetric: add the weight of the mirrored pixel pair (static).

  Returns:
    `[len(blocks)]` sums, one per block.
  """
  return _weighted_disagreement_value(
      *_fg_bg_probs(logits), affinity, pixel_weight, blocks, offsets, symmetric
  )


def _weighted_disagreement_value(fg, bg, affinity, pixel_weight, blocks, offsets, symmetric):
  totals = []
  for block in blocks:
    fg_c, bg_c, fg_n, bg_n, aff, weight = _block_inputs(fg, bg, affinity, pixel_weight, block)
    weights = _pair_weights(aff, weight, offsets, symmetric)
    per_pixel = sum(
        -jnp.log(_agreement(fg_c, bg_c, fg_n, bg_n, offset)) * w
        for offset, w in zip(offsets, weights)
    )
    totals.append(jnp.sum(per_pixel))
  return jnp.stack(totals)


def _weighted_disagreement_fwd(logits, affinity, pixel_weight, blocks, offsets, symmetric):
  fg, bg = _fg_bg_probs(logits)  # kept for the backward pass rather than recomputed
  value = _weighted_disagreement_value(fg, bg, affinity, pixel_weight, blocks, offsets, symmetric)
  return value, (logits, fg, bg, affinity, pixel_weight)


def _weighted_disagreement_bwd(blocks, offsets, symmetric, residuals, cotangent):
  logits, fg, bg, affinity, pixel_weight = residuals
  num_frames = logits.shape[2]
  per_frame = [0.0] * num_frames  # gradient contributions to single frames
  whole = 0.0  # contributions to all frames at once

  def add(grad, frames):
    nonlocal whole
    if frames == tuple(range(num_frames)):
      whole = whole + grad
    else:
      for i, t in enumerate(frames):
        per_frame[t] = per_frame[t] + grad[:, :, i]

  for block_index, block in enumerate(blocks):
    fg_c, bg_c, fg_n, bg_n, aff, weight = _block_inputs(fg, bg, affinity, pixel_weight, block)
    g = cotangent[block_index]
    # d(-log A)/dA * weight per offset; both gradients read it (the neighbour's shifted back).
    weights = _pair_weights(aff, weight, offsets, symmetric)
    scales = [
        -g * w / _agreement(fg_c, bg_c, fg_n, bg_n, offset) for offset, w in zip(offsets, weights)
    ]
    diff_c, diff_n = fg_c - bg_c, fg_n - bg_n  # dA/dP(p) = P(q) - (1 - P(q))
    grad_c, grad_n = 0.0, 0.0
    for offset, scale in zip(offsets, scales):
      back = (-offset[0], -offset[1])
      grad_c = grad_c + scale * affinity_lib.shift_spatial(diff_n, offset)
      grad_n = grad_n + (
          affinity_lib.shift_spatial(scale, back) * affinity_lib.shift_spatial(diff_c, back)
      )
    add(grad_c, block[0])
    add(grad_n, block[1])
  frame_shape = logits.shape[:2] + logits.shape[3:]
  grad = whole + jnp.stack([jnp.broadcast_to(g, frame_shape) for g in per_frame], axis=2)
  # d sigmoid(x)/dx = sigmoid(x) sigmoid(-x); zero where the logits were clipped.
  grad = jnp.where(jnp.abs(logits) <= _LOGIT_LIMIT, grad * fg * bg, 0.0).astype(logits.dtype)
  return grad, jnp.zeros_like(affinity), jnp.zeros_like(pixel_weight)


_weighted_disagreement.defvjp(_weighted_disagreement_fwd, _weighted_disagreement_bwd)


@flax.struct.dataclass
class BoxWindows:
  """Per-instance windows of the mask grid that hold every non-zero pairwise and TK weight.

  Attributes:
    size_index: int32 scalar: the window size `sizes[size_index]` all instances fit, or
      `len(sizes)` for the whole frame.
    start_y, start_x: `[B, N]` int32 top-left corners (for a window of any of the sizes, clamped
      so that it lies inside the frame).
    sizes: static (height, width) window sizes, smallest first, each smaller than the frame.
  """

  size_index: jnp.ndarray
  start_y: jnp.ndarray
  start_x: jnp.ndarray
  sizes: tuple[tuple[int, int], ...] = flax.struct.field(pytree_node=False)


def _loss_margin(config: MaskFreeLossConfig) -> int:
  """Largest pixel distance between the two pixels of a pairwise or TK pair."""
  return max(
      config.pairwise_dilation * (config.pairwise_size // 2),
      config.temporal_dilation * (config.temporal_search_size // 2),
  )


def _support_span(support: jnp.ndarray, margin: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """First index and length of the True run of `support [..., n]` grown by `margin`, clipped."""
  n = support.shape[-1]
  first = jnp.argmax(support, axis=-1)
  last = n - 1 - jnp.argmax(support[..., ::-1], axis=-1)
  lo = jnp.maximum(first - margin, 0)
  hi = jnp.minimum(last + margin + 1, n)
  present = jnp.any(support, axis=-1)
  return jnp.where(present, lo, 0), jnp.where(present, hi - lo, 0)


def box_windows(
    box_masks: jnp.ndarray, config: MaskFreeLossConfig = MaskFreeLossConfig()
) -> BoxWindows:
  """Chooses the windows the pairwise and TK costs are computed on (see `box_window_fractions`).

  A pair's weight is zero unless one of its pixels lies where the box masks are non-zero, and the
  pixels of a pair are at most `margin` apart; so each instance's window covers its boxes (the
  union over the clip) grown by that margin. All instances share one static size, the smallest of
  `config.box_window_fractions` that every instance fits.

  Args:
    box_masks: `[B, N, T, h, w]` box masks at mask stride (any non-zero value counts, padding
      included, so the choice never depends on which instances are valid).
    config: loss hyper-parameters.

  Returns:
    `BoxWindows`.
  """
  _check_rank("box_masks", box_masks, 5, "[B, N, T, h, w]")
  h, w = box_masks.shape[-2:]
  sizes = []
  for fraction in config.box_window_fractions:
    size = (min(h, math.ceil(fraction * h)), min(w, math.ceil(fraction * w)))
    if size != (h, w) and size not in sizes:
      sizes.append(size)
  box_masks = jax.lax.stop_gradient(box_masks)
  support = jnp.any(box_masks != 0, axis=2)  # [B, N, h, w]
  margin = _loss_margin(config)
  start_y, span_y = _support_span(jnp.any(support, axis=-1), margin)
  start_x, span_x = _support_span(jnp.any(support, axis=-2), margin)
  need_y, need_x = jnp.max(span_y), jnp.max(span_x)
  fits = [(need_y <= sh) & (need_x <= sw) for sh, sw in sizes] + [jnp.asarray(True)]
  return BoxWindows(
      size_index=jnp.argmax(jnp.stack(fits)).astype(jnp.int32),
      start_y=start_y.astype(jnp.int32),
      start_x=start_x.astype(jnp.int32),
      sizes=tuple(sizes),
  )


def _crop(
    x: jnp.ndarray,
    start_y: jnp.ndarray,
    start_x: jnp.ndarray,
    size: tuple[int, int],
    per_instance: bool,
) -> jnp.ndarray:
  """Each instance's window: x `[B, N, ..., h, w]` (or `[B, ...]` shared by the N instances of a
  clip when not `per_instance`) -> `[B, N, ..., *size]`; starts `[B, N]`, clamped into the frame."""
  h, w = x.shape[-2:]
  start_y = jnp.minimum(start_y, h - size[0])
  start_x = jnp.minimum(start_x, w - size[1])

  def one(x, sy, sx):
    return jax.lax.dynamic_slice(x, (0,) * (x.ndim - 2) + (sy, sx), x.shape[:-2] + size)

  over_instances = jax.vmap(one, in_axes=(0 if per_instance else None, 0, 0))
  return jax.vmap(over_instances)(x, start_y, start_x)


def _windowed_disagreement(
    logits, affinity, pixel_weight, blocks, offsets, symmetric, windows: BoxWindows
):
  """`_weighted_disagreement` on the instances' windows when they fit, else on whole frames.

  Inside a window the sums are the same: every non-zero weight has both pixels in the window; a
  neighbour outside the window is either outside the frame as well (window edge on the frame edge,
  the same (1, 1) read) or paired with a zero weight. Instances become the batch axis there.
  """

  def whole_frame(logits, affinity, pixel_weight, start_y, start_x):
    del start_y, start_x
    return _weighted_disagreement(logits, affinity, pixel_weight, blocks, offsets, symmetric)

  def in_windows(size, logits, affinity, pixel_weight, start_y, start_x):
    crop = functools.partial(_crop, start_y=start_y, start_x=start_x, size=size)
    logits = crop(logits, per_instance=True)  # [B, N, T, *size]
    affinity = crop(affinity, per_instance=False)  # [B, N, J, K, *size]
    pixel_weight = crop(pixel_weight, per_instance=True)  # [B, N, J or 1, *size]
    flat = lambda x: x.reshape((-1,) + x.shape[2:])
    return _weighted_disagreement(
        flat(logits)[:, None],
        flat(affinity),
        flat(pixel_weight)[:, None],
        blocks,
        offsets,
        symmetric,
    )

  if not windows.sizes:
    return whole_frame(logits, affinity, pixel_weight, None, None)
  branches = [functools.partial(in_windows, size) for size in windows.sizes] + [whole_frame]
  return jax.lax.switch(
      windows.size_index, branches, logits, affinity, pixel_weight, windows.start_y, windows.start_x
  )


def pairwise_color_loss(
    mask_logits: jnp.ndarray,
    box_masks: jnp.ndarray,
    instance_valid: jnp.ndarray,
    affinities: affinity_lib.ColorAffinities,
    config: MaskFreeLossConfig = MaskFreeLossConfig(),
    windows: BoxWindows | None = None,
) -> jnp.ndarray:
  """Spatial colour-affinity loss (BoxInst pairwise term), one ratio over the whole batch.

  Weight of pixel p and neighbour q: [similarity(p, q) >= threshold] * box_mask(p).
  Loss = sum(cost * weight) / max(sum(weight), 1).

  Args:
    mask_logits: `[B, N, T, h, w]`.
    box_masks: `[B, N, T, h, w]`.
    instance_valid: `[B, N]` bool.
    affinities: from `compute_color_affinities` on the same clips.
    config: loss hyper-parameters.
    windows: `box_windows(box_masks, config)`, computed here when None.

  Returns:
    Scalar float32.
  """
  offsets = affinity_lib.window_offsets(
      config.pairwise_size, config.pairwise_dilation, include_center=False
  )
  weight = box_masks * instance_valid[:, :, None, None, None]  # [B, N, T, h, w]
  similar = affinities.spatial_affinity  # [B, T, K, h, w]
  # The cost and the similarity are symmetric in (p, p + d), so the pair seen from p with offset d
  # and from p + d with offset -d is costed once, weighted by box_mask(p) + box_mask(p + d). The
  # first half of the row-major window holds one offset of each opposite pair.
  half = len(offsets) // 2
  every_frame = tuple(range(mask_logits.shape[2]))
  if windows is None:
    windows = box_windows(box_masks, config)
  numerator = jnp.sum(
      _windowed_disagreement(
          mask_logits,
          similar,
          weight,
          ((every_frame, every_frame, every_frame),),
          offsets[:half],
          True,
          windows,
      )
  )
  denominator = jnp.sum(jnp.sum(similar, axis=2)[:, None] * weight)
  return numerator / jnp.maximum(denominator, 1.0)


def temporal_knn_patch_loss(
    mask_logits: jnp.ndarray,
    box_masks: jnp.ndarray,
    instance_valid: jnp.ndarray,
    affinities: affinity_lib.ColorAffinities,
    config: MaskFreeLossConfig = MaskFreeLossConfig(),
    windows: BoxWindows | None = None,
) -> jnp.ndarray:
  """Temporal KNN-patch loss (TK-Loss), before its weight and warm-up.

  For each frame pair (a, b) and pixel p of frame b: the cost of disagreement between the mask at
  p in frame b and at each kept candidate p + d in frame a, weighted by
  [kept patch similarity >= threshold] * U(p), U being the union of the instance's box masks over
  the clip. Each pair gives sum(cost * weight) / max(sum(weight), 1); pairs are summed.

  Args:
    mask_logits: `[B, N, T, h, w]`.
    box_masks: `[B, N, T, h, w]`.
    instance_valid: `[B, N]` bool.
    affinities: from `compute_color_affinities` on the same clips (defines the frame pairs).
    config: loss hyper-parameters.
    windows: `box_windows(box_masks, config)`, computed here when None.

  Returns:
    Scalar float32, the sum over frame pairs.
  """
  offsets = affinity_lib.window_offsets(
      config.temporal_search_size, config.temporal_dilation, include_center=True
  )
  union = (jnp.sum(box_masks, axis=2) >= 1.0).astype(jnp.float32)
  union = union * instance_valid[:, :, None, None]  # [B, N, h, w]
  similar = affinities.temporal_affinity  # [B, P, K, h, w]
  blocks = tuple(((b,), (a,), (j,)) for j, (a, b) in enumerate(affinities.pairs))
  if windows is None:
    windows = box_windows(box_masks, config)
  numerator = _windowed_disagreement(
      mask_logits, similar, union[:, :, None], blocks, offsets, False, windows
  )  # [P]
  denominator = jnp.sum(jnp.sum(similar, axis=2)[:, None] * union[:, :, None], axis=(0, 1, 3, 4))
  return jnp.sum(numerator / jnp.maximum(denominator, 1.0))


def tk_warmup_factor(step, warmup_steps: int) -> jnp.ndarray:
  """`min(step / warmup_steps, 1)`; 1 when warmup_steps is 0."""
  if warmup_steps == 0:
    return jnp.float32(1.0)
  return jnp.minimum(jnp.asarray(step, jnp.float32) / warmup_steps, 1.0)


def mask_free_losses(
    mask_logits: jnp.ndarray,
    box_masks: jnp.ndarray,
    instance_valid: jnp.ndarray,
    affinities: affinity_lib.ColorAffinities,
    step: int | jnp.ndarray,
    config: MaskFreeLossConfig = MaskFreeLossConfig(),
) -> dict[str, jnp.ndarray]:
  """All three MaskFreeVIS losses for the matched instances of a batch of clips.

  Example:
    cfg = MaskFreeLossConfig()
    affinities = compute_color_affinities(frames, cfg)           # once per batch
    box_masks = box_masks_at_stride(boxes, box_valid, (H, W), cfg.stride)
    losses = mask_free_losses(logits, box_masks, valid, affinities, step, cfg)

  Args:
    mask_logits: `[B, N, T, h, w]` mask logits of the (matched) instances, padded to N.
    box_masks: `[B, N, T, h, w]` box masks at mask stride (`box_masks_at_stride`).
    instance_valid: `[B, N]` bool, False for padding (which never changes any value).
    affinities: `compute_color_affinities(frames, config)` for the same B clips.
    step: training step (for the TK-Loss warm-up); an int or a traced scalar.
    config: loss hyper-parameters.

  Returns:
    {'loss_mask_proj', 'loss_bound', 'loss_bound_neighbor'}: float32 scalars, the last with the
    TK weight and warm-up applied (names as the official release).
  """
  _check_rank("mask_logits", mask_logits, 5, "[B, N, T, h, w]")
  if box_masks.shape != mask_logits.shape:
    raise ValueError(
        f"box_masks must have the shape of mask_logits {mask_logits.shape}, "
        f"got {box_masks.shape}"
    )
  batch, num_inst, num_frames, h, w = mask_logits.shape
  if instance_valid.shape != (batch, num_inst):
    raise ValueError(
        f"instance_valid must be [B, N] = {(batch, num_inst)}, " f"got {instance_valid.shape}"
    )
  if num_frames < 2:
    raise ValueError(f"mask_logits must have T >= 2 frames for TK-Loss, got T={num_frames}")
  expected = (batch, num_frames, affinities.spatial_affinity.shape[2], h, w)
  if affinities.spatial_affinity.shape != expected:
    raise ValueError(
        f"affinities were computed for [B, T, K, h, w] = "
        f"{affinities.spatial_affinity.shape}, but mask_logits imply {expected}"
    )
  if max(max(p) for p in affinities.pairs) >= num_frames:
    raise ValueError(f"affinities pair frames {affinities.pairs} beyond T={num_frames}")
  # From the masks as given, so that under a vmap over layers (whose matchings differ) the
  # window choice stays one value and a single branch runs.
  windows = box_windows(box_masks, config)
  valid = instance_valid.astype(bool)
  # Padding may hold anything (even inf); zeroing it keeps values and gradients finite.
  mask_logits = jnp.where(valid[:, :, None, None, None], mask_logits.astype(jnp.float32), 0.0)
  box_masks = jnp.where(valid[:, :, None, None, None], box_masks.astype(jnp.float32), 0.0)
  tk = temporal_knn_patch_loss(mask_logits, box_masks, valid, affinities, config, windows)
  return {
      "loss_mask_proj": box_projection_loss(mask_logits, box_masks, valid),
      "loss_bound": pairwise_color_loss(mask_logits, box_masks, valid, affinities, config, windows),
      "loss_bound_neighbor": tk
      * config.temporal_weight
      * tk_warmup_factor(step, config.warmup_steps),
  }
