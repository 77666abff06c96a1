"""Set criterion of MaskFreeVIS: Hungarian matching plus box-supervised (or mask-supervised) losses.

For each of the L stacked predictions of the model (deep supervision: the learnable-query
prediction, then one per decoder layer; index -1 is the final one), queries are matched to the
ground-truth instances of each clip separately, then:

* ``loss_ce``: cross-entropy over all queries, unmatched queries labelled "no object", with the
  no-object class weighted by ``eos_coef`` (weighted mean, as torch ``F.cross_entropy(weight=)``).
* ``mode='box'`` (MaskFreeVIS): ``loss_mask_proj``, ``loss_bound`` and ``loss_bound_neighbor``
  from `maskfreevis_jax.losses.mask_free_losses` on the matched queries' mask logits.
* ``mode='mask'`` (fully supervised upper bound): ``loss_mask`` (sigmoid BCE) and ``loss_dice`` on
  the instance masks pooled to stride 4, each summed over instance-frames and divided by the number
  of instances, as the official Mask2Former-VIS criterion.

Term names follow the official release: the final prediction's terms are plain ('loss_ce', ...),
the auxiliary ones get '_0' .. '_{L-2}' suffixes. Weights are the official ones
(``weight_dict`` in ``VideoMaskFormer.from_config``: class 2, every mask term 5).
"""

import dataclasses
import functools
from typing import Any
from collections.abc import Mapping

import jax
from jax import ad_checkpoint
import jax.numpy as jnp
import ml_collections

from maskfreevis_jax import losses as mask_free
from maskfreevis_jax import matcher as matcher_lib

Array = jax.Array

BOX_TERMS = ("loss_ce", "loss_mask_proj", "loss_bound", "loss_bound_neighbor")
MASK_TERMS = ("loss_ce", "loss_mask", "loss_dice")


def mask_free_config(config: ml_collections.ConfigDict) -> Any:
  """Builds the `MaskFreeLossConfig` from the criterion config's `mask_free` sub-dict."""
  known = {f.name for f in dataclasses.fields(mask_free.MaskFreeLossConfig)}
  given = dict(config.mask_free)
  unknown = sorted(set(given) - known)
  if unknown:
    raise ValueError(
        f"criterion config mask_free has unknown fields {unknown}; "
        f"MaskFreeLossConfig accepts {sorted(known)}"
    )
  return mask_free.MaskFreeLossConfig(**given)


def class_loss(
    logits: Array,
    query_index: Array,
    matched: Array,
    labels: Array,
    eos_coef: float,
) -> Array:
  """Weighted cross-entropy of every query's class logits.

  Args:
    logits: float [B, Q, C + 1] class logits, last class = no object.
    query_index: int [B, N] query matched to each target slot.
    matched: bool [B, N] target slot is real and matched.
    labels: int [B, N] class of each target slot.
    eos_coef: weight of the no-object class.

  Returns:
    float32 scalar: sum_i w[y_i] * nll_i / sum_i w[y_i] over all B * Q queries.
  """
  batch, num_queries, num_classes_plus_one = logits.shape
  no_object = num_classes_plus_one - 1
  # Unmatched slots scatter out of bounds and are dropped.
  scatter_index = jnp.where(matched, query_index, num_queries)
  batch_index = jnp.broadcast_to(jnp.arange(batch)[:, None], scatter_index.shape)
  target_classes = jnp.full((batch, num_queries), no_object, jnp.int32)
  target_classes = target_classes.at[batch_index, scatter_index].set(
      labels.astype(jnp.int32), mode="drop"
  )
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, target_classes[..., None], axis=-1)[..., 0]
  class_weights = jnp.ones((num_classes_plus_one,), jnp.float32).at[no_object].set(eos_coef)
  weights = class_weights[target_classes]
  return jnp.sum(weights * nll) / jnp.sum(weights)


def mask_supervised_losses(
    mask_logits: Array,
    target_masks: Array,
    matched: Array,
    num_masks: Array,
) -> dict[str, Array]:
  """Dense sigmoid BCE and dice of matched masks (fully supervised mode).

  Args:
    mask_logits: float [B, N, T, h, w] logits of the query matched to each target slot.
    target_masks: float [B, N, T, h, w] targets in [0, 1].
    matched: bool [B, N] slots that count.
    num_masks: float scalar normaliser (number of real targets, >= 1).

  Returns:
    {'loss_mask', 'loss_dice'}: per instance-frame values summed over the matched instances and
    their T frames, divided by `num_masks` (official normalisation).
  """
  logits = mask_logits.astype(jnp.float32)
  targets = target_masks.astype(jnp.float32)
  bce = (jax.nn.softplus(logits) - logits * targets).mean(axis=(-2, -1))  # [B, N, T]
  probs = jax.nn.sigmoid(logits)
  numerator = 2.0 * jnp.sum(probs * targets, axis=(-2, -1))
  denominator = jnp.sum(probs, axis=(-2, -1)) + jnp.sum(targets, axis=(-2, -1))
  dice = 1.0 - (numerator + 1.0) / (denominator + 1.0)  # [B, N, T]
  keep = matched[:, :, None]
  return {
      "loss_mask": jnp.sum(jnp.where(keep, bce, 0.0)) / num_masks,
      "loss_dice": jnp.sum(jnp.where(keep, dice, 0.0)) / num_masks,
  }


def point_sample(values: Array, coords: Array) -> Array:
  """Bilinear reads of maps at points, as detectron2's `point_sample` (`grid_sample`).

  Args:
    values: float [..., H, W] maps.
    coords: float [..., P, 2] points (x, y) in [0, 1] x [0, 1] of the whole map (pixel centres at
      (i + 0.5) / size, `align_corners=False`); neighbours outside the map read 0.

  Returns:
    float32 [..., P].
  """
  height, width = values.shape[-2:]
  flat = values.astype(jnp.float32).reshape(*values.shape[:-2], height * width)
  x = coords[..., 0] * width - 0.5
  y = coords[..., 1] * height - 0.5
  x0, y0 = jnp.floor(x), jnp.floor(y)
  fx, fy = x - x0, y - y0
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)

  def read(xi, yi):
    inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
    index = jnp.clip(yi, 0, height - 1) * width + jnp.clip(xi, 0, width - 1)
    return jnp.where(inside, jnp.take_along_axis(flat, index, axis=-1), 0.0)

  return (1 - fy) * ((1 - fx) * read(x0, y0) + fx * read(x0 + 1, y0)) + fy * (
      (1 - fx) * read(x0, y0 + 1) + fx * read(x0 + 1, y0 + 1)
  )


def uncertain_point_coords(
    logits: Array, candidates: Array, random_points: Array, num_uncertain: int
) -> Array:
  """The release's importance sampling given its uniform draws (`get_uncertain_point_coords_with_randomness`).

  Args:
    logits: float [..., h, w] mask logits.
    candidates: float [..., P * oversample_ratio, 2] uniform points (x, y) in [0, 1].
    random_points: float [..., P - num_uncertain, 2] uniform points appended as they are.
    num_uncertain: how many of the candidates to keep: those whose logit is nearest 0.

  Returns:
    float32 [..., P, 2] points, no gradient.
  """
  uncertainty = -jnp.abs(point_sample(jax.lax.stop_gradient(logits), candidates))
  _, index = jax.lax.top_k(uncertainty, num_uncertain)
  chosen = jnp.take_along_axis(candidates, index[..., None], axis=-2)
  return jax.lax.stop_gradient(jnp.concatenate([chosen, random_points], axis=-2))


def importance_point_coords(
    key: Array,
    logits: Array,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
) -> Array:
  """Random points of the release's mask loss: [..., h, w] logits -> [..., num_points, 2]."""
  num_candidates = int(num_points * oversample_ratio)
  num_uncertain = int(importance_sample_ratio * num_points)
  lead = logits.shape[:-2]
  candidate_key, random_key = jax.random.split(key)
  candidates = jax.random.uniform(candidate_key, (*lead, num_candidates, 2))
  random_points = jax.random.uniform(random_key, (*lead, num_points - num_uncertain, 2))
  return uncertain_point_coords(logits, candidates, random_points, num_uncertain)


def point_sampled_mask_losses(
    mask_logits: Array,
    target_masks: Array,
    coords: Array,
    matched: Array,
    num_masks: Array,
) -> dict[str, Array]:
  """Sigmoid BCE and dice of matched masks at given points (the release's mask-mode loss).

  Args:
    mask_logits: float [B, N, T, h, w] logits of the query matched to each target slot.
    target_masks: [B, N, T, H, W] full-resolution targets in [0, 1] (any numeric dtype).
    coords: float [B, N, T, P, 2] points (x, y) in [0, 1] (e.g. `importance_point_coords`).
    matched: bool [B, N] slots that count.
    num_masks: float scalar normaliser (number of real targets, >= 1).

  Returns:
    {'loss_mask', 'loss_dice'}: per instance-frame means over the P points (BCE) and dice with +1
    smoothing over them, summed over the matched instances and frames, divided by `num_masks`.
  """
  logits = point_sample(mask_logits, coords)
  targets = point_sample(target_masks, coords)
  bce = (jax.nn.softplus(logits) - logits * targets).mean(axis=-1)  # [B, N, T]
  probs = jax.nn.sigmoid(logits)
  dice = 1.0 - (2.0 * jnp.sum(probs * targets, -1) + 1.0) / (
      jnp.sum(probs, -1) + jnp.sum(targets, -1) + 1.0
  )
  keep = matched[:, :, None]
  return {
      "loss_mask": jnp.sum(jnp.where(keep, bce, 0.0)) / num_masks,
      "loss_dice": jnp.sum(jnp.where(keep, dice, 0.0)) / num_masks,
  }


def downsample_instance_masks(masks: Array, stride: int) -> Array:
  """Average-pools full-resolution instance masks by `stride` (fraction of covered pixels).

  The official criterion reads full-resolution masks at random points; the per-cell coverage is
  that sampling's expectation.

  Args:
    masks: [B, N, T, H, W] binary masks (any numeric/bool dtype), H and W divisible by `stride`.
    stride: pooling factor.

  Returns:
    float32 [B, N, T, H / stride, W / stride] in [0, 1].
  """
  *lead, height, width = masks.shape
  pooled = masks.astype(jnp.float32).reshape(
      *lead, height // stride, stride, width // stride, stride
  )
  return pooled.mean(axis=(-3, -1))


def layer_warmup_steps(step: Array, num_layers: int, counts_layer_calls: bool) -> Array:
  """The warm-up counter each supervised layer sees, int32 [num_layers] (stacking order).

  The official counter is incremented before each use, the final layer first, then the
  auxiliary layers in order. `step` is the number of optimizer updates already done.
  """
  step = jnp.asarray(step, jnp.int32)
  if not counts_layer_calls:
    return jnp.full((num_layers,), step + 1, jnp.int32)
  layer = jnp.arange(num_layers, dtype=jnp.int32)
  call_order = jnp.where(layer == num_layers - 1, 0, layer + 1)
  return step * num_layers + call_order + 1


@dataclasses.dataclass(frozen=True)
class _Targets:
  """A batch's targets as every supervised layer's losses read them.

  Attributes:
    labels: int32 [B, N], 0 in dropped slots.
    valid: bool [B, N], real instances with a box in at least one frame.
    num_masks: float32 scalar, number of valid instances (>= 1).
    masks: float32 [B, N, T, h, w] targets at the predicted mask size, no gradient.
    affinities: (box mode) the colour affinities of the frames, else None.
    full_masks: (mask mode, importance sampling) float32 [B, N, T, H, W] full-resolution
      targets, else None.
    points_key: (mask mode, importance sampling) the step's PRNG key of the points, else None.
  """

  labels: Array
  valid: Array
  num_masks: Array
  masks: Array
  affinities: Any = None
  full_masks: Array | None = None
  points_key: Array | None = None


def _check_config(config: ml_collections.ConfigDict) -> None:
  if config.mode not in ("box", "mask"):
    raise ValueError(f"criterion config mode must be 'box' or 'mask', got {config.mode!r}")
  if config.layer_loop not in ("vmap", "map"):
    raise ValueError(
        f"criterion config layer_loop must be 'vmap' or 'map', got {config.layer_loop!r}"
    )
  if config.mask_points.sampling not in ("dense", "importance"):
    raise ValueError(
        "criterion config mask_points.sampling must be 'dense' or 'importance', "
        f"got {config.mask_points.sampling!r}"
    )


def _mask_mode_targets(
    targets: Mapping[str, Array],
    target_valid: Array,
    step: Array,
    mask_size: tuple[int, int],
    point_config: ml_collections.ConfigDict,
) -> dict[str, Any]:
  """Mask mode: the instance masks pooled to the predicted size, plus, with importance
  sampling, the full-resolution masks and the step's points key."""
  height, width = mask_size
  full_height = targets["masks"].shape[-2]
  if full_height % height or targets["masks"].shape[-1] != width * (full_height // height):
    raise ValueError(
        f"batch['masks'] spatial size {targets['masks'].shape[-2:]} is not an integer multiple "
        f"of the predicted mask size {(height, width)}"
    )
  masks = downsample_instance_masks(targets["masks"], full_height // height)
  fields = {"masks": jnp.where(target_valid[:, :, None, None, None], masks, 0.0)}
  if point_config.sampling == "importance":
    fields["full_masks"] = jax.lax.stop_gradient(
        jnp.where(target_valid[:, :, None, None, None], targets["masks"].astype(jnp.float32), 0.0)
    )
    fields["points_key"] = jax.random.fold_in(
        jax.random.PRNGKey(point_config.seed), jnp.asarray(step, jnp.int32)
    )
  return fields


def _prepare_targets(
    targets: Mapping[str, Array],
    step: Array,
    mask_size: tuple[int, int],
    config: ml_collections.ConfigDict,
    mf_config: Any,
) -> _Targets:
  """Valid instances, labels and mask targets of the batch (`_check_batch` fields)."""
  # Instances without a box in any frame of the clip are dropped, as the official
  # prepare_targets does; padded slots are zeroed so garbage in them cannot leak into any value.
  target_valid = targets["instance_valid"] & jnp.any(targets["box_valid"], axis=-1)
  labels = jnp.where(target_valid, targets["labels"], 0).astype(jnp.int32)
  num_masks = jnp.maximum(jnp.sum(target_valid).astype(jnp.float32), 1.0)
  if config.mode == "box":
    box_valid = targets["box_valid"] & target_valid[:, :, None]
    boxes = jnp.where(box_valid[..., None], targets["boxes"].astype(jnp.float32), 0.0)
    frame_size = tuple(targets["frames"].shape[2:4])
    fields = {
        "masks": mask_free.box_masks_at_stride(boxes, box_valid, frame_size, mf_config.stride),
        "affinities": mask_free.compute_color_affinities(targets["frames"], mf_config),
    }
  else:
    fields = _mask_mode_targets(targets, target_valid, step, mask_size, config.mask_points)
  if tuple(fields["masks"].shape[-2:]) != tuple(mask_size):
    raise ValueError(
        f"target masks at stride {mf_config.stride} have size {tuple(fields['masks'].shape[-2:])} "
        f"but pred_masks are {tuple(mask_size)}; check mask_free.stride and the frame size"
    )
  fields["masks"] = jax.lax.stop_gradient(fields["masks"])
  return _Targets(labels=labels, valid=target_valid, num_masks=num_masks, **fields)


def _one_layer_losses(
    layer_logits: Array,
    layer_masks: Array,
    layer_step: Array,
    layer_index: Array,
    *,
    targets: _Targets,
    config: ml_collections.ConfigDict,
    mf_config: Any,
) -> tuple[dict[str, Array], matcher_lib.Matching]:
  """Matching and unweighted loss terms of one supervised layer ([B, Q, ...] predictions)."""
  matching = matcher_lib.hungarian_match(
      layer_logits,
      layer_masks,
      targets.labels,
      targets.masks,
      targets.valid,
      mode=config.mode,
      class_weight=config.matcher.class_weight,
      mask_weight=config.matcher.mask_weight,
      dice_weight=config.matcher.dice_weight,
  )
  matching = matcher_lib.Matching(
      query_index=ad_checkpoint.checkpoint_name(matching.query_index, "matching"),
      valid=matching.valid,
  )
  terms = {
      "loss_ce": class_loss(
          layer_logits, matching.query_index, matching.valid, targets.labels, config.eos_coef
      )
  }
  gather_index = matching.query_index[:, :, None, None, None]
  matched_masks = jnp.take_along_axis(
      layer_masks.astype(jnp.float32), gather_index, axis=1
  )  # [B, N, T, h, w]
  if config.mode == "box":
    terms.update(
        mask_free.mask_free_losses(
            matched_masks, targets.masks, matching.valid, targets.affinities, layer_step, mf_config
        )
    )
  elif config.mask_points.sampling == "importance":
    points = config.mask_points
    coords = importance_point_coords(
        jax.random.fold_in(targets.points_key, layer_index),
        matched_masks,
        points.num_points,
        points.oversample_ratio,
        points.importance_sample_ratio,
    )
    terms.update(
        point_sampled_mask_losses(
            matched_masks, targets.full_masks, coords, matching.valid, targets.num_masks
        )
    )
  else:
    terms.update(
        mask_supervised_losses(matched_masks, targets.masks, matching.valid, targets.num_masks)
    )
  return terms, matching


def criterion_layer_losses(
    outputs: Mapping[str, Array],
    batch: Mapping[str, Array],
    step: Array,
    config: ml_collections.ConfigDict,
) -> tuple[dict[str, Array], matcher_lib.Matching]:
  """Unweighted loss terms of every supervised layer and their matchings.

  Args:
    outputs: model outputs, 'pred_logits' [L, B, Q, C + 1] and 'pred_masks' [L, B, Q, T, h, w].
    batch: input batch (common brief): 'labels', 'instance_valid', 'box_valid' and, in 'box' mode,
      'frames' and 'boxes', in 'mask' mode 'masks'.
    step: int scalar, optimizer updates done so far (drives the TK-Loss warm-up).
    config: `config.criterion` (`defaults.criterion_defaults` lists its fields).

  Returns:
    (terms, matching): terms maps each loss name to float32 [L'] (L' = L with deep supervision,
    else 1, last entry = final prediction); matching has [L', B, N] fields.
  """
  pred_logits, pred_masks = _check_outputs(outputs, config)
  _check_config(config)
  if not config.deep_supervision:
    pred_logits, pred_masks = pred_logits[-1:], pred_masks[-1:]
  num_layers = pred_logits.shape[0]
  _, batch_size, _, num_frames, height, width = pred_masks.shape
  mf_config = mask_free_config(config)
  targets = _prepare_targets(
      _check_batch(batch, config.mode, batch_size, num_frames),
      step,
      (height, width),
      config,
      mf_config,
  )
  one_layer = functools.partial(
      _one_layer_losses, targets=targets, config=config, mf_config=mf_config
  )
  warmup_steps = layer_warmup_steps(step, num_layers, config.warmup_counts_layer_calls)
  layer_indices = jnp.arange(num_layers, dtype=jnp.int32)
  if config.layer_loop == "vmap":
    return jax.vmap(one_layer)(pred_logits, pred_masks, warmup_steps, layer_indices)
  remat_layer = jax.checkpoint(
      one_layer, policy=jax.checkpoint_policies.save_only_these_names("matching")
  )
  return jax.lax.map(
      lambda args: remat_layer(*args), (pred_logits, pred_masks, warmup_steps, layer_indices)
  )


def set_criterion(
    outputs: Mapping[str, Array],
    batch: Mapping[str, Array],
    step: Array,
    config: ml_collections.ConfigDict,
) -> tuple[Array, dict[str, Array]]:
  """Total weighted loss and its named terms; usable directly inside a jitted `loss_fn`.

  Args:
    outputs: model outputs, 'pred_logits' [L, B, Q, C + 1] and 'pred_masks' [L, B, Q, T, h, w].
    batch: input batch as in `criterion_layer_losses`.
    step: int scalar, optimizer updates done so far.
    config: `config.criterion` (`defaults.criterion_defaults` lists its fields).

  Returns:
    (total, terms): terms are WEIGHTED scalars (as the official model returns them), named
    'loss_ce', 'loss_mask_proj', ... for the final prediction and with '_{i}' suffixes for the
    auxiliary predictions i = 0 .. L-2; total is their sum.
  """
  layer_terms, _ = criterion_layer_losses(outputs, batch, step, config)
  names = BOX_TERMS if config.mode == "box" else MASK_TERMS
  num_layers = layer_terms["loss_ce"].shape[0]
  terms = {}
  for name in names:
    weight = config.weights[name]
    values = layer_terms[name] * weight
    terms[name] = values[-1]
    for i in range(num_layers - 1):
      terms[f"{name}_{i}"] = values[i]
  total = sum(jnp.sum(layer_terms[name]) * config.weights[name] for name in names)
  return total, terms


def _check_outputs(outputs: Mapping[str, Array], config) -> tuple[Array, Array]:
  for key in ("pred_logits", "pred_masks"):
    if key not in outputs:
      raise ValueError(f"model outputs lack '{key}' (have {sorted(outputs)})")
  pred_logits, pred_masks = outputs["pred_logits"], outputs["pred_masks"]
  if pred_logits.ndim != 4:
    raise ValueError(f"outputs['pred_logits'] must be [L, B, Q, C + 1], got {pred_logits.shape}")
  if pred_masks.ndim != 6 or pred_masks.shape[:3] != pred_logits.shape[:3]:
    raise ValueError(
        f"outputs['pred_masks'] must be [L, B, Q, T, h, w] matching pred_logits "
        f"{pred_logits.shape[:3]}, got {pred_masks.shape}"
    )
  if pred_logits.shape[-1] != config.num_classes + 1:
    raise ValueError(
        f"outputs['pred_logits'] has {pred_logits.shape[-1]} classes but the criterion "
        f"config expects num_classes + 1 = {config.num_classes + 1}"
    )
  return pred_logits, pred_masks


def _check_batch(
    batch: Mapping[str, Array], mode: str, batch_size: int, num_frames: int
) -> dict[str, Array]:
  """Returns the batch fields the criterion needs, after checking keys and shapes."""
  needed = ["labels", "instance_valid", "box_valid"]
  needed += ["frames", "boxes"] if mode == "box" else ["masks"]
  missing = [k for k in needed if k not in batch]
  if missing:
    raise ValueError(
        f"batch lacks {missing} needed by the criterion in mode '{mode}' " f"(have {sorted(batch)})"
    )
  fields = {k: jnp.asarray(batch[k]) for k in needed}
  labels = fields["labels"]
  if labels.ndim != 2 or labels.shape[0] != batch_size:
    raise ValueError(f"batch['labels'] must be [B={batch_size}, N], got {labels.shape}")
  num_instances = labels.shape[1]
  expected = {
      "instance_valid": (batch_size, num_instances),
      "box_valid": (batch_size, num_instances, num_frames),
      "boxes": (batch_size, num_instances, num_frames, 4),
  }
  for key, shape in expected.items():
    if key in fields and tuple(fields[key].shape) != shape:
      raise ValueError(f"batch['{key}'] must have shape {shape}, got {fields[key].shape}")
  if "frames" in fields:
    frames = fields["frames"]
    if frames.ndim != 5 or frames.shape[:2] != (batch_size, num_frames) or frames.shape[-1] != 3:
      raise ValueError(
          f"batch['frames'] must be [B={batch_size}, T={num_frames}, H, W, 3], "
          f"got {frames.shape}"
      )
  if "masks" in fields:
    masks = fields["masks"]
    if masks.ndim != 5 or masks.shape[:3] != (batch_size, num_instances, num_frames):
      raise ValueError(
          f"batch['masks'] must be [B={batch_size}, N={num_instances}, "
          f"T={num_frames}, H, W], got {masks.shape}"
      )
  fields["instance_valid"] = fields["instance_valid"].astype(bool)
  fields["box_valid"] = fields["box_valid"].astype(bool)
  return fields
