"""Tests of the set criterion (maskfreevis_jax/criterion.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskfreevis_jax import defaults
from maskfreevis_jax import criterion
from maskfreevis_jax import losses
from maskfreevis_jax import matcher

NUM_CLASSES = 5
L, B, Q, T, H, W = 3, 2, 8, 3, 64, 96
h, w = H // 4, W // 4


def _config(mode="box", **overrides):
  config = defaults.criterion_defaults()
  config.num_classes = NUM_CLASSES
  config.mode = mode
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


def _clip_batch(seed=0, num_slots=3, real=((0, 1, 2), (0,))):
  """Smooth frames with coloured moving rectangles, their boxes and masks."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:H, 0:W]
  background = np.stack([xx * 2, yy * 3, 255 - xx * 2], -1).clip(0, 255)
  frames = np.zeros((B, T, H, W, 3), np.uint8)
  boxes = np.zeros((B, num_slots, T, 4), np.float32)
  box_valid = np.zeros((B, num_slots, T), bool)
  masks = np.zeros((B, num_slots, T, H, W), np.uint8)
  labels = np.zeros((B, num_slots), np.int32)
  instance_valid = np.zeros((B, num_slots), bool)
  for b in range(B):
    for t in range(T):
      frames[b, t] = background
    for n in real[b]:
      instance_valid[b, n] = True
      labels[b, n] = rng.integers(0, NUM_CLASSES)
      colour = rng.integers(0, 256, 3)
      x1, y1 = rng.integers(0, W // 2), rng.integers(0, H // 2)
      bw, bh = rng.integers(12, W // 2), rng.integers(10, H // 2)
      for t in range(T):
        if n == 1 and t == 2:
          continue  # an instance absent from one frame
        dx = 2 * t
        box = np.array([x1 + dx, y1, min(x1 + dx + bw, W), y1 + bh], np.float32)
        boxes[b, n, t] = box
        box_valid[b, n, t] = True
        # Elliptic object inside its box.
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        inside = (((xx - cx) / (bw / 2)) ** 2 + ((yy - cy) / (bh / 2)) ** 2) <= 1.0
        masks[b, n, t] = inside
        frames[b, t][inside] = colour
  return dict(
      frames=frames,
      boxes=boxes,
      box_valid=box_valid,
      masks=masks,
      labels=labels,
      instance_valid=instance_valid,
      track_ids=np.where(instance_valid, 1, -1),
  )


@functools.lru_cache(maxsize=None)
def _evaluator(mode="box", deep_supervision=True, layer_loop="vmap"):
  """One jitted function per setting (compiles are the slow part of these tests on CPU)."""
  config = _config(mode, deep_supervision=deep_supervision, layer_loop=layer_loop)

  def evaluate(outputs, batch, step):
    total_fn = lambda o: criterion.set_criterion(o, batch, step, config)
    (total, terms), grads = jax.value_and_grad(total_fn, has_aux=True)(outputs)
    layer_terms, matching = criterion.criterion_layer_losses(outputs, batch, step, config)
    return total, terms, grads, layer_terms, matching

  return jax.jit(evaluate)


def _random_outputs(seed=1, num_layers=L):
  rng = np.random.default_rng(seed)
  return {
      "pred_logits": jnp.asarray(rng.normal(size=(num_layers, B, Q, NUM_CLASSES + 1)), jnp.float32),
      "pred_masks": jnp.asarray(rng.normal(size=(num_layers, B, Q, T, h, w)) * 2, jnp.float32),
  }


def _torch_class_loss(logits, target_classes, eos_coef):
  weight = torch.ones(logits.shape[-1])
  weight[-1] = eos_coef
  return F.cross_entropy(
      torch.tensor(np.asarray(logits)).transpose(1, 2),
      torch.tensor(np.asarray(target_classes)).long(),
      weight,
  ).item()


def test_class_loss_matches_torch_cross_entropy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 7, NUM_CLASSES + 1)).astype(np.float32) * 3
  query_index = np.array([[4, 0, 6], [1, 2, 3], [5, 0, 0]], np.int32)
  matched = np.array([[1, 1, 0], [1, 1, 1], [1, 0, 0]], bool)
  labels = np.array([[2, 4, 9999], [0, 0, 1], [3, -7, 8]], np.int32)
  got = criterion.class_loss(logits, query_index, matched, labels, 0.1)
  target = np.full((3, 7), NUM_CLASSES)
  for b in range(3):
    for n in range(3):
      if matched[b, n]:
        target[b, query_index[b, n]] = labels[b, n]
  np.testing.assert_allclose(float(got), _torch_class_loss(logits, target, 0.1), rtol=1e-5)


def test_box_mode_terms_names_weights_gradients_and_class_loss_vs_torch():
  config = _config()
  batch = _clip_batch()
  outputs = _random_outputs()
  total, terms, grads, layer_terms, matching = _evaluator("box")(outputs, batch, 3)
  expected_names = {
      f"{name}{suffix}" for name in criterion.BOX_TERMS for suffix in ("", "_0", "_1")
  }
  assert set(terms) == expected_names
  np.testing.assert_allclose(float(total), sum(float(v) for v in terms.values()), rtol=1e-5)
  for value in terms.values():
    assert np.isfinite(float(value))
  for key, grad in grads.items():
    assert np.all(np.isfinite(np.asarray(grad))), key
    assert np.abs(np.asarray(grad)).max() > 0, key
  assert matching.query_index.shape == (L, B, 3)
  np.testing.assert_array_equal(
      np.asarray(matching.valid), np.broadcast_to(batch["instance_valid"], (L, B, 3))
  )
  for name in criterion.BOX_TERMS:
    np.testing.assert_allclose(
        float(terms[name]), float(layer_terms[name][-1]) * config.weights[name], rtol=1e-6
    )
    np.testing.assert_allclose(
        float(terms[name + "_0"]), float(layer_terms[name][0]) * config.weights[name], rtol=1e-6
    )
  assert config.weights["loss_ce"] == 2.0 and config.weights["loss_bound_neighbor"] == 5.0
  for name in ("loss_mask_proj", "loss_bound", "loss_bound_neighbor"):
    assert float(layer_terms[name][-1]) > 0, name
  # Class loss of every layer against torch, with that layer's own matching.
  for layer in range(L):
    target = np.full((B, Q), NUM_CLASSES)
    for b in range(B):
      for n in range(3):
        if batch["instance_valid"][b, n]:
          target[b, int(matching.query_index[layer, b, n])] = batch["labels"][b, n]
    want = _torch_class_loss(outputs["pred_logits"][layer], target, 0.1)
    np.testing.assert_allclose(float(layer_terms["loss_ce"][layer]), want, rtol=1e-5)


def test_each_layer_is_matched_separately_and_mask_free_terms_use_the_matched_queries():
  config = _config()
  batch = _clip_batch(seed=3)
  outputs = _random_outputs(seed=4)
  *_, layer_terms, matching = _evaluator("box")(outputs, batch, 10_000)
  mf_config = criterion.mask_free_config(config)

  @jax.jit
  def reference(outputs):
    box_masks = losses.box_masks_at_stride(
        jnp.asarray(batch["boxes"]), jnp.asarray(batch["box_valid"]), (H, W), 4
    )
    affinities = losses.compute_color_affinities(jnp.asarray(batch["frames"]), mf_config)

    def per_layer(logits, masks):
      own = matcher.hungarian_match(
          logits, masks, batch["labels"], box_masks, batch["instance_valid"]
      )
      gathered = jax.vmap(lambda m, i: m[i])(masks, own.query_index)  # [B, N, T, h, w]
      return own, losses.mask_free_losses(
          gathered, box_masks, batch["instance_valid"], affinities, 10_000, mf_config
      )

    return jax.vmap(per_layer)(outputs["pred_logits"], outputs["pred_masks"])

  own, want = reference(outputs)
  real = np.broadcast_to(batch["instance_valid"], (L, B, 3))
  np.testing.assert_array_equal(
      np.asarray(own.query_index)[real], np.asarray(matching.query_index)[real]
  )
  # Layers really are matched on their own: the random layers disagree somewhere.
  assert len({tuple(np.asarray(matching.query_index[l])[real[l]]) for l in range(L)}) > 1
  for name, value in want.items():
    np.testing.assert_allclose(np.asarray(layer_terms[name]), np.asarray(value), rtol=1e-5)


def test_perfect_predictions_are_matched_to_their_instances():
  batch = _clip_batch(seed=5)
  box_masks = np.asarray(
      losses.box_masks_at_stride(
          jnp.asarray(batch["boxes"]), jnp.asarray(batch["box_valid"]), (H, W), 4
      )
  )
  logits = np.full((L, B, Q, NUM_CLASSES + 1), -5.0, np.float32)
  logits[..., NUM_CLASSES] = 5.0
  masks = np.full((L, B, Q, T, h, w), -8.0, np.float32)
  owner = {}
  for b in range(B):
    for n in np.nonzero(batch["instance_valid"][b])[0]:
      query = Q - 1 - 2 * n  # put each instance on a distinct, non-trivial query
      owner[(b, n)] = query
      logits[:, b, query, batch["labels"][b, n]] = 8.0
      logits[:, b, query, NUM_CLASSES] = -5.0
      masks[:, b, query] = np.where(box_masks[b, n] > 0.5, 8.0, -8.0)
  outputs = {"pred_logits": jnp.asarray(logits), "pred_masks": jnp.asarray(masks)}
  *_, layer_terms, matching = _evaluator("box")(outputs, batch, 0)
  for (b, n), query in owner.items():
    assert (np.asarray(matching.query_index[:, b, n]) == query).all()
  assert float(layer_terms["loss_ce"][-1]) < 0.01
  # Instance 1 of clip 0 has no box in its last frame: that frame's projection dice is 1 for
  # each axis (empty vs empty, as the release), so the mean over the 4 instances x 3 frames is
  # 2 / 12; every other frame is near perfect.
  assert 2 / 12 <= float(layer_terms["loss_mask_proj"][-1]) < 2 / 12 + 0.02


@pytest.mark.parametrize("mode", ["box", "mask"])
def test_padded_instances_are_inert(mode):
  batch = _clip_batch(seed=6)
  outputs = _random_outputs(seed=7)
  # Two extra padded slots full of garbage, interleaved with the real ones.
  rng = np.random.default_rng(8)
  order = [0, 3, 1, 2, 4]
  padded = {}
  for key, value in batch.items():
    if key == "frames":
      padded[key] = value
      continue
    extra = np.zeros(value.shape[:1] + (2,) + value.shape[2:], value.dtype)
    if key == "boxes":
      extra = rng.normal(size=extra.shape).astype(np.float32) * 1e4
    elif key == "box_valid":
      extra[:] = True
    elif key == "masks":
      extra[:] = 1
    elif key == "labels":
      extra[:] = 12345
    padded[key] = np.concatenate([value, extra], axis=1)[:, order]

  total_a, terms_a, grads_a, _, _ = _evaluator(mode)(outputs, batch, 2500)
  total_b, terms_b, grads_b, _, _ = _evaluator(mode)(outputs, padded, 2500)
  np.testing.assert_allclose(float(total_b), float(total_a), rtol=1e-6)
  for name in terms_a:
    np.testing.assert_allclose(float(terms_b[name]), float(terms_a[name]), rtol=1e-5, atol=1e-7)
  for key in grads_a:
    assert np.all(np.isfinite(np.asarray(grads_a[key])))
    assert np.abs(np.asarray(grads_a[key])).max() > 0
    np.testing.assert_allclose(
        np.asarray(grads_b[key]), np.asarray(grads_a[key]), rtol=1e-4, atol=1e-8
    )


def test_mask_mode_matches_numpy_reference():
  batch = _clip_batch(seed=9)
  outputs = _random_outputs(seed=10)
  total, terms, grads, layer_terms, matching = _evaluator("mask")(outputs, batch, 0)
  assert set(terms) == {f"{n}{s}" for n in criterion.MASK_TERMS for s in ("", "_0", "_1")}
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads.values())
  pooled = batch["masks"].reshape(B, 3, T, h, 4, w, 4).astype(np.float64).mean(axis=(4, 6))
  num_masks = batch["instance_valid"].sum()
  for layer in range(L):
    bce_sum = dice_sum = 0.0
    for b in range(B):
      for n in np.nonzero(batch["instance_valid"][b])[0]:
        query = int(matching.query_index[layer, b, n])
        for t in range(T):
          x = np.asarray(outputs["pred_masks"][layer, b, query, t], np.float64).ravel()
          y = pooled[b, n, t].ravel()
          p = 1 / (1 + np.exp(-x))
          bce_sum += -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()
          dice_sum += 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
    np.testing.assert_allclose(
        float(layer_terms["loss_mask"][layer]), bce_sum / num_masks, rtol=1e-5
    )
    np.testing.assert_allclose(
        float(layer_terms["loss_dice"][layer]), dice_sum / num_masks, rtol=1e-5
    )
  np.testing.assert_allclose(
      float(terms["loss_mask"]), 5.0 * float(layer_terms["loss_mask"][-1]), rtol=1e-6
  )
  np.testing.assert_allclose(
      float(terms["loss_dice_1"]), 5.0 * float(layer_terms["loss_dice"][1]), rtol=1e-6
  )


def test_warmup_counter_mirrors_official_per_layer_calls():
  np.testing.assert_array_equal(
      np.asarray(criterion.layer_warmup_steps(0, 10, True)), [2, 3, 4, 5, 6, 7, 8, 9, 10, 1]
  )
  np.testing.assert_array_equal(np.asarray(criterion.layer_warmup_steps(7, 3, True)), [23, 24, 22])
  np.testing.assert_array_equal(np.asarray(criterion.layer_warmup_steps(7, 3, False)), [8, 8, 8])
  # Identical layers: the TK-Loss differs only by each layer's warm-up factor.
  batch = _clip_batch(seed=11)
  one = _random_outputs(seed=12, num_layers=1)
  outputs = {k: jnp.concatenate([v] * L) for k, v in one.items()}
  *_, early, _ = _evaluator("box")(outputs, batch, 0)
  tk = np.asarray(early["loss_bound_neighbor"])
  assert tk[-1] > 0
  np.testing.assert_allclose(tk / tk[-1], [2.0, 3.0, 1.0], rtol=1e-5)
  *_, late, _ = _evaluator("box")(outputs, batch, 10**6)
  np.testing.assert_allclose(np.asarray(late["loss_bound_neighbor"]), tk[-1] * 2000, rtol=1e-4)


def test_clips_without_instances():
  batch = _clip_batch(seed=13, real=((), ()))
  total, terms, grads, layer_terms, _ = _evaluator("box")(_random_outputs(seed=14), batch, 0)
  assert np.isfinite(float(total))
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads.values())
  # With no instance every query is "no object" and the mask terms vanish.
  for name in ("loss_mask_proj", "loss_bound", "loss_bound_neighbor"):
    assert float(terms[name]) == 0.0 and float(terms[name + "_0"]) == 0.0
  assert float(terms["loss_ce"]) > 0


def test_deep_supervision_off_supervises_only_the_final_prediction():
  batch = _clip_batch(seed=15)
  outputs = _random_outputs(seed=16)
  total, terms, grads, layer_terms, _ = _evaluator("mask", deep_supervision=False)(
      outputs, batch, 0
  )
  assert set(terms) == set(criterion.MASK_TERMS)
  assert layer_terms["loss_ce"].shape == (1,)
  assert np.abs(np.asarray(grads["pred_masks"][:-1])).max() == 0
  assert np.abs(np.asarray(grads["pred_masks"][-1])).max() > 0
  _, full_terms, *_ = _evaluator("mask")(outputs, batch, 0)
  for name in criterion.MASK_TERMS:
    np.testing.assert_allclose(float(terms[name]), float(full_terms[name]), rtol=1e-6)


def test_rematerialised_layer_map_equals_vmap():
  batch = _clip_batch(seed=17)
  outputs = _random_outputs(seed=18)
  want = _evaluator("mask")(outputs, batch, 0)
  got = _evaluator("mask", layer_loop="map")(outputs, batch, 0)
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-6)
  for key in want[2]:
    np.testing.assert_allclose(
        np.asarray(got[2][key]), np.asarray(want[2][key]), rtol=1e-5, atol=1e-9
    )
  np.testing.assert_array_equal(np.asarray(got[4].query_index), np.asarray(want[4].query_index))


def test_bad_inputs_raise_clear_errors():
  config = _config()
  batch = _clip_batch()
  outputs = _random_outputs(num_layers=1)
  with pytest.raises(ValueError, match="frames"):
    criterion.set_criterion(outputs, {k: v for k, v in batch.items() if k != "frames"}, 0, config)
  with pytest.raises(ValueError, match="'masks'"):
    criterion.set_criterion(
        outputs, {k: v for k, v in batch.items() if k != "masks"}, 0, _config("mask")
    )
  with pytest.raises(ValueError, match="boxes"):
    criterion.set_criterion(outputs, dict(batch, boxes=batch["boxes"][..., :3]), 0, config)
  with pytest.raises(ValueError, match="num_classes"):
    criterion.set_criterion(outputs, batch, 0, _config(num_classes=7))
  with pytest.raises(ValueError, match="pred_masks"):
    criterion.set_criterion({"pred_logits": outputs["pred_logits"]}, batch, 0, config)
  with pytest.raises(ValueError, match="'box' or 'mask'"):
    criterion.set_criterion(outputs, batch, 0, _config("points"))
  with pytest.raises(ValueError, match="layer_loop"):
    criterion.set_criterion(outputs, batch, 0, _config(layer_loop="scan"))
  bad_mf = _config()
  bad_mf.mask_free.unknown_knob = 1
  with pytest.raises(ValueError, match="unknown_knob"):
    criterion.set_criterion(outputs, batch, 0, bad_mf)
