"""Tests of the Hungarian matcher (maskfreevis_jax/matcher.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from maskfreevis_jax import matcher


def _reference_filled_boxes(logits: np.ndarray) -> np.ndarray:
  """Loop reference: per [h, w] map, box around pixels with logit > 0 (inclusive), else empty."""
  flat = logits.reshape(-1, *logits.shape[-2:])
  out = np.zeros(flat.shape, np.float32)
  for i, m in enumerate(flat):
    ys, xs = np.nonzero(m > 0)
    if ys.size:
      out[i, ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = 1.0
  return out.reshape(logits.shape)


def _reference_cost(pred_logits, pred_masks, labels, target_masks, mode, wc, wm, wd):
  """Straightforward numpy cost [Q, N] written from the official formulas."""
  probs = np.exp(pred_logits - pred_logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  q, n = pred_logits.shape[0], labels.shape[0]
  cost = np.zeros((q, n), np.float64)
  for i in range(q):
    for j in range(n):
      t = target_masks[j].reshape(-1).astype(np.float64)
      if mode == "box":
        p = _reference_filled_boxes(pred_masks[i]).reshape(-1).astype(np.float64)
      else:
        x = pred_masks[i].reshape(-1).astype(np.float64)
        p = 1.0 / (1.0 + np.exp(-x))
        bce = -(t * np.log(p) + (1 - t) * np.log(1 - p)).mean()
        cost[i, j] += wm * bce
      dice = 1.0 - (2.0 * (p * t).sum() + 1.0) / (p.sum() + t.sum() + 1.0)
      cost[i, j] += wd * dice - wc * probs[i, labels[j]]
  return cost


def _random_rectangle(rng, h, w):
  y1, x1 = rng.integers(0, h // 2), rng.integers(0, w // 2)
  y2, x2 = rng.integers(y1 + 1, h + 1), rng.integers(x1 + 1, w + 1)
  return slice(y1, y2), slice(x1, x2)


def _random_clip(rng, q=12, n=4, t=3, h=8, w=10, num_classes=8):
  """One clip with blob-like predicted masks and box targets of distinct classes (no cost ties)."""
  pred_logits = rng.normal(size=(q, num_classes + 1)).astype(np.float32)
  pred_masks = rng.normal(size=(q, t, h, w)).astype(np.float32) - 2.0
  for i in range(q):
    for f in range(t):
      pred_masks[i, f][_random_rectangle(rng, h, w)] += 4.0
  labels = rng.choice(num_classes, size=(n,), replace=False).astype(np.int32)
  target_masks = np.zeros((n, t, h, w), np.float32)
  for j in range(n):
    for f in range(t):
      target_masks[j, f][_random_rectangle(rng, h, w)] = 1.0
  return pred_logits, pred_masks, labels, target_masks


def test_filled_box_masks_match_loop_reference():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 3, 9, 11)).astype(np.float32) - 2.0
  logits[0, 1] = -1.0  # an empty mask gives an empty box
  logits[1, 0] = -1.0
  logits[1, 0, 4, 7] = 2.0  # a single pixel gives a 1x1 box
  got = np.asarray(matcher.filled_box_masks(jnp.asarray(logits)))
  want = _reference_filled_boxes(logits)
  np.testing.assert_array_equal(got, want)
  assert got[0, 1].sum() == 0
  assert got[1, 0].sum() == 1


@pytest.mark.parametrize("mode", ["box", "mask"])
def test_cost_matrix_matches_reference(mode):
  rng = np.random.default_rng(1)
  pred_logits, pred_masks, labels, target_masks = _random_clip(rng)
  valid = np.ones((labels.shape[0],), bool)
  got = matcher.clip_cost_matrix(
      pred_logits,
      pred_masks,
      labels,
      target_masks,
      valid,
      mode=mode,
      class_weight=2.0,
      mask_weight=5.0,
      dice_weight=5.0,
  )
  want = _reference_cost(pred_logits, pred_masks, labels, target_masks, mode, 2.0, 5.0, 5.0)
  np.testing.assert_allclose(np.asarray(got), want.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 7), (6, 6), (1, 10), (20, 50)])
def test_assign_random_costs_matches_scipy(shape):
  rng = np.random.default_rng(shape[0] * 100 + shape[1])
  assign = jax.jit(matcher.assign)
  for _ in range(5):
    cost = rng.normal(size=shape).astype(np.float32)
    result = assign(jnp.asarray(cost), jnp.ones((shape[0],), bool))
    rows, cols = scipy.optimize.linear_sum_assignment(cost)
    want = np.zeros((shape[0],), np.int64)
    want[rows] = cols
    np.testing.assert_array_equal(np.asarray(result.query_index), want)
    assert len(set(np.asarray(result.query_index).tolist())) == shape[0]


@pytest.mark.parametrize("mode", ["box", "mask"])
def test_match_through_cost_code_matches_scipy(mode):
  rng = np.random.default_rng(2)
  clips = [_random_clip(rng, q=16, n=5) for _ in range(3)]
  stacked = [np.stack(parts) for parts in zip(*clips)]
  valid = np.ones(stacked[2].shape, bool)
  result = jax.jit(lambda *a: matcher.hungarian_match(*a, mode=mode))(*stacked, valid)
  for b, (pl, pm, lab, tm) in enumerate(clips):
    cost = _reference_cost(pl, pm, lab, tm, mode, 2.0, 5.0, 5.0)  # [Q, N]
    q_idx, t_idx = scipy.optimize.linear_sum_assignment(cost)
    want = np.zeros((lab.shape[0],), np.int64)
    want[t_idx] = q_idx
    np.testing.assert_array_equal(np.asarray(result.query_index[b]), want)
    assert np.asarray(result.valid[b]).all()


def test_padded_targets_never_matched_and_do_not_change_real_matches():
  rng = np.random.default_rng(3)
  pl, pm, lab, tm = _random_clip(rng, q=10, n=4)
  base = matcher.hungarian_match(pl[None], pm[None], lab[None], tm[None], np.ones((1, 4), bool))
  # Add 3 padded slots full of garbage: a "perfect" target for the best query, huge labels.
  garbage_masks = np.concatenate([tm, 1e3 * np.ones((3,) + tm.shape[1:], np.float32)])
  garbage_labels = np.concatenate([lab, np.array([10**6, -5, 3], np.int32)])
  valid = np.array([[True] * 4 + [False] * 3])
  order = np.array([0, 4, 1, 5, 2, 6, 3])  # interleave padding between real slots
  res = matcher.hungarian_match(
      pl[None], pm[None], garbage_labels[order][None], garbage_masks[order][None], valid[:, order]
  )
  np.testing.assert_array_equal(np.asarray(res.valid[0]), valid[0, order])
  real = np.asarray(res.query_index[0])[valid[0, order]]
  np.testing.assert_array_equal(real, np.asarray(base.query_index[0]))


def test_all_padded_clip_and_batch_vmap():
  rng = np.random.default_rng(4)
  clips = [_random_clip(rng, q=8, n=3) for _ in range(4)]
  stacked = [np.stack(parts) for parts in zip(*clips)]
  valid = np.array([[1, 1, 1], [1, 0, 1], [0, 0, 0], [1, 0, 0]], bool)
  res = jax.jit(matcher.hungarian_match)(*stacked, valid)
  assert res.query_index.shape == (4, 3) and res.query_index.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(res.valid), valid)
  for b in range(4):
    # each clip solved on its own equals the batched result on the real slots
    single = matcher.hungarian_match(*[s[b : b + 1] for s in stacked], valid[b : b + 1])
    np.testing.assert_array_equal(
        np.asarray(single.query_index)[0][valid[b]], np.asarray(res.query_index[b])[valid[b]]
    )
    real = np.asarray(res.query_index[b])[valid[b]]
    assert len(set(real.tolist())) == real.size


def test_non_finite_predictions_still_give_a_matching():
  rng = np.random.default_rng(5)
  pl, pm, lab, tm = _random_clip(rng, q=6, n=3)
  pl[0] = np.nan
  pm[1] = np.inf
  res = jax.jit(lambda *a: matcher.hungarian_match(*a, mode="mask"))(
      pl[None], pm[None], lab[None], tm[None], np.ones((1, 3), bool)
  )
  idx = np.asarray(res.query_index[0])
  assert len(set(idx.tolist())) == 3 and idx.min() >= 0 and idx.max() < 6


def test_bad_shapes_raise_clear_errors():
  rng = np.random.default_rng(6)
  pl, pm, lab, tm = [x[None] for x in _random_clip(rng, q=4, n=3)]
  valid = np.ones((1, 3), bool)
  with pytest.raises(ValueError, match="pred_masks"):
    matcher.hungarian_match(pl, pm[:, :3], lab, tm, valid)
  with pytest.raises(ValueError, match="target_masks"):
    matcher.hungarian_match(pl, pm, lab, tm[..., :-1], valid)
  with pytest.raises(ValueError, match="target_valid"):
    matcher.hungarian_match(pl, pm, lab, tm, valid[:, :2])
  with pytest.raises(ValueError, match="'box' or 'mask'"):
    matcher.hungarian_match(pl, pm, lab, tm, valid, mode="points")
  big = [np.concatenate([x] * 2, axis=1) for x in (lab, tm, valid)]
  with pytest.raises(ValueError, match="queries"):
    matcher.hungarian_match(pl, pm, *big[:2], big[2])
