"""Hungarian matching between predicted queries and ground-truth instances of a clip.

Two cost variants, following the official MaskFreeVIS `VideoHungarianMatcher`:

* ``'box'`` (box-supervised, used for YouTube-VIS training in MaskFreeVIS):
  ``cost = class_weight * (-p(target class)) + dice_weight * dice(box(P), B)`` where
  ``box(P)`` fills, per frame, the tight box around the thresholded predicted mask
  (``sigmoid(logit) > 0.5``) and ``B`` is the target box mask. The dice has no sigmoid
  (both inputs are already in [0, 1]) and uses +1 smoothing on numerator and
  denominator; it runs over all frames of the clip jointly. No mask BCE term: the
  official matcher drops it in the box-supervised branch.
* ``'mask'`` (fully mask-supervised upper bound, the Mask2Former matcher):
  ``cost = mask_weight * BCE(logits, M) + class_weight * (-p) + dice_weight * dice(sigmoid(logits), M)``.

The official code compares masks at ~12k-20k random points; here the costs are dense at
the prediction resolution (stride 4), which is the expectation of uniform point sampling
and needs no random key. Matching is solved with `optax.assignment.hungarian_algorithm`
inside jit, vmapped over the clips of a batch.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

# Largest magnitude a cost entry may take; NaN/inf (e.g. from a diverged model) are mapped
# into this range so that the assignment loop always terminates.
_MAX_ABS_COST = 1e6


class Matching(NamedTuple):
  """Result of matching, one entry per target slot.

  Attributes:
    query_index: int32 [B, N] index of the query matched to target n (meaningless where
      `valid` is False).
    valid: bool [B, N] True where target n is a real instance and got a query.
  """

  query_index: jax.Array
  valid: jax.Array


def filled_box_masks(mask_logits: jax.Array) -> jax.Array:
  """Fills the tight box around each thresholded mask.

  Per leading index and frame, pixels with `sigmoid(logit) > 0.5` (i.e. logit > 0) are
  found and the axis-aligned box spanning them (inclusive) is set to 1. An empty mask
  gives an empty box. Same result as the official `masks_to_boxes_new`.

  Args:
    mask_logits: float [..., h, w] mask logits.

  Returns:
    float32 [..., h, w] box masks in {0, 1}.
  """
  foreground = mask_logits > 0
  rows_any = jnp.any(foreground, axis=-1)  # [..., h]
  cols_any = jnp.any(foreground, axis=-2)  # [..., w]

  def _span(occupied):
    # A row lies inside the box iff some occupied row is at or before it and some is at
    # or after it.
    seen_before = jnp.cumsum(occupied, axis=-1) > 0
    seen_after = jnp.flip(jnp.cumsum(jnp.flip(occupied, -1), axis=-1), -1) > 0
    return seen_before & seen_after

  rows_in = _span(rows_any.astype(jnp.int32))
  cols_in = _span(cols_any.astype(jnp.int32))
  return (rows_in[..., :, None] & cols_in[..., None, :]).astype(jnp.float32)


def pairwise_dice_cost(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Dice cost between every prediction and every target, with +1 smoothing.

  Args:
    pred: float [Q, P] per-point foreground probabilities in [0, 1].
    target: float [N, P] per-point target values in [0, 1].

  Returns:
    float32 [Q, N] cost `1 - (2 <p, t> + 1) / (sum p + sum t + 1)`.
  """
  numerator = 2.0 * jnp.einsum("qp,np->qn", pred, target)
  denominator = pred.sum(-1)[:, None] + target.sum(-1)[None, :]
  return 1.0 - (numerator + 1.0) / (denominator + 1.0)


def pairwise_sigmoid_bce_cost(logits: jax.Array, target: jax.Array) -> jax.Array:
  """Mean sigmoid binary cross-entropy between every prediction and every target.

  Args:
    logits: float [Q, P] per-point mask logits.
    target: float [N, P] per-point target values in [0, 1].

  Returns:
    float32 [Q, N] BCE averaged over the P points.
  """
  # BCE(x, t) = t * softplus(-x) + (1 - t) * softplus(x), so it is bilinear in (terms, t).
  loss_if_fg = jax.nn.softplus(-logits)
  loss_if_bg = jax.nn.softplus(logits)
  cost = jnp.einsum("qp,np->qn", loss_if_fg, target) + jnp.einsum(
      "qp,np->qn", loss_if_bg, 1.0 - target
  )
  return cost / logits.shape[-1]


def clip_cost_matrix(
    pred_logits: jax.Array,
    pred_masks: jax.Array,
    target_labels: jax.Array,
    target_masks: jax.Array,
    target_valid: jax.Array,
    *,
    mode: str = "box",
    class_weight: float = 2.0,
    mask_weight: float = 5.0,
    dice_weight: float = 5.0,
) -> jax.Array:
  """Matching cost of one clip, targets as rows.

  Padded targets get a constant row (zero): a row that costs the same for every query
  cannot change which queries the real targets receive, because there are at least as
  many queries as target slots.

  Args:
    pred_logits: float [Q, C + 1] class logits (last = no object).
    pred_masks: float [Q, T, h, w] mask logits.
    target_labels: int [N] class indices in [0, C).
    target_masks: float [N, T, h, w] target masks in [0, 1] at the prediction resolution
      (box masks in 'box' mode, downsampled instance masks in 'mask' mode).
    target_valid: bool [N] real (non-padding) targets.
    mode: 'box' or 'mask' (see module docstring).
    class_weight: weight of the class term.
    mask_weight: weight of the BCE term ('mask' mode only).
    dice_weight: weight of the dice term.

  Returns:
    float32 [N, Q] cost matrix.
  """
  num_classes = pred_logits.shape[-1] - 1
  probs = jax.nn.softmax(pred_logits.astype(jnp.float32), axis=-1)
  labels = jnp.clip(target_labels, 0, num_classes - 1)
  cost_class = -jnp.take(probs, labels, axis=-1)  # [Q, N]

  num_queries = pred_masks.shape[0]
  num_targets = target_masks.shape[0]
  pred_masks = pred_masks.astype(jnp.float32)
  target_points = target_masks.astype(jnp.float32).reshape(num_targets, -1)
  if mode == "box":
    pred_boxes = filled_box_masks(pred_masks).reshape(num_queries, -1)
    cost = class_weight * cost_class + dice_weight * pairwise_dice_cost(pred_boxes, target_points)
  elif mode == "mask":
    pred_points = pred_masks.reshape(num_queries, -1)
    cost = (
        mask_weight * pairwise_sigmoid_bce_cost(pred_points, target_points)
        + class_weight * cost_class
        + dice_weight * pairwise_dice_cost(jax.nn.sigmoid(pred_points), target_points)
    )
  else:
    raise ValueError(f"matcher mode must be 'box' or 'mask', got {mode!r}")

  cost = jnp.nan_to_num(cost.T, nan=_MAX_ABS_COST, posinf=_MAX_ABS_COST, neginf=-_MAX_ABS_COST)
  cost = jnp.clip(cost, -_MAX_ABS_COST, _MAX_ABS_COST)
  return jnp.where(target_valid[:, None], cost, 0.0)


def assign(cost: jax.Array, target_valid: jax.Array) -> Matching:
  """Solves one clip's assignment with the Hungarian algorithm.

  Args:
    cost: float [N, Q] cost matrix, N <= Q, padded rows constant.
    target_valid: bool [N] real targets.

  Returns:
    `Matching` with query_index int32 [N] and valid bool [N].
  """
  num_targets, num_queries = cost.shape
  if num_targets > num_queries:
    raise ValueError(
        f"cannot match {num_targets} target slots to {num_queries} queries; the maximum "
        "number of instances N must not exceed the number of queries Q"
    )
  rows, cols = optax.assignment.hungarian_algorithm(cost)
  query_index = jnp.zeros((num_targets,), jnp.int32).at[rows].set(cols.astype(jnp.int32))
  return Matching(query_index=query_index, valid=target_valid)


def match_clip(
    pred_logits: jax.Array,
    pred_masks: jax.Array,
    target_labels: jax.Array,
    target_masks: jax.Array,
    target_valid: jax.Array,
    **cost_kwargs,
) -> Matching:
  """Matches the queries of one clip to its targets (shapes as `clip_cost_matrix`)."""
  cost = clip_cost_matrix(
      jax.lax.stop_gradient(pred_logits),
      jax.lax.stop_gradient(pred_masks),
      target_labels,
      jax.lax.stop_gradient(target_masks),
      target_valid,
      **cost_kwargs,
  )
  return assign(cost, target_valid)


def hungarian_match(
    pred_logits: jax.Array,
    pred_masks: jax.Array,
    target_labels: jax.Array,
    target_masks: jax.Array,
    target_valid: jax.Array,
    *,
    mode: str = "box",
    class_weight: float = 2.0,
    mask_weight: float = 5.0,
    dice_weight: float = 5.0,
) -> Matching:
  """Matches the queries of every clip of a batch to its targets (no gradient).

  Args:
    pred_logits: float [B, Q, C + 1] class logits of one prediction layer.
    pred_masks: float [B, Q, T, h, w] mask logits of the same layer.
    target_labels: int [B, N] class indices.
    target_masks: float [B, N, T, h, w] target (box or instance) masks at (h, w).
    target_valid: bool [B, N] real targets; others are never reported as matched.
    mode: 'box' or 'mask'.
    class_weight: weight of the class cost.
    mask_weight: weight of the BCE cost ('mask' mode only).
    dice_weight: weight of the dice cost.

  Returns:
    `Matching` with query_index int32 [B, N] and valid bool [B, N].
  """
  _check_shapes(pred_logits, pred_masks, target_labels, target_masks, target_valid)
  if mode not in ("box", "mask"):
    raise ValueError(f"matcher mode must be 'box' or 'mask', got {mode!r}")
  match_fn = lambda *args: match_clip(
      *args, mode=mode, class_weight=class_weight, mask_weight=mask_weight, dice_weight=dice_weight
  )
  return jax.vmap(match_fn)(
      pred_logits, pred_masks, target_labels, target_masks, target_valid.astype(bool)
  )


def _check_shapes(pred_logits, pred_masks, target_labels, target_masks, target_valid):
  """Raises a ValueError naming the argument whose shape does not fit."""
  if pred_logits.ndim != 3:
    raise ValueError(f"pred_logits must be [B, Q, C + 1], got shape {pred_logits.shape}")
  batch, num_queries, _ = pred_logits.shape
  if pred_masks.ndim != 5 or pred_masks.shape[:2] != (batch, num_queries):
    raise ValueError(
        f"pred_masks must be [B={batch}, Q={num_queries}, T, h, w], got shape {pred_masks.shape}"
    )
  if target_labels.ndim != 2 or target_labels.shape[0] != batch:
    raise ValueError(f"target_labels must be [B={batch}, N], got shape {target_labels.shape}")
  num_targets = target_labels.shape[1]
  expected_masks = (batch, num_targets) + tuple(pred_masks.shape[2:])
  if tuple(target_masks.shape) != expected_masks:
    raise ValueError(
        f"target_masks must be [B, N, T, h, w] = {expected_masks}, got shape {target_masks.shape}"
    )
  if tuple(target_valid.shape) != (batch, num_targets):
    raise ValueError(
        f"target_valid must be [B, N] = {(batch, num_targets)}, got shape {target_valid.shape}"
    )
  if num_targets > num_queries:
    raise ValueError(
        f"cannot match N={num_targets} target slots to Q={num_queries} queries; the maximum "
        "number of instances must not exceed the number of queries"
    )
