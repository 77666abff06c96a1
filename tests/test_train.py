"""Train loop tests with a small stand-in model, loss and data stream (the real ones are tested in
their own files and end to end in test_main.py).

The stand-ins follow the shared interfaces: the model maps frames [B, T, H, W, 3] to
pred_logits [L, B, Q, C + 1] and pred_masks [L, B, Q, T, H/4, W/4]; the iterator yields batches with
frames / image_valid / boxes / box_valid / labels / instance_valid and has get_state/set_state.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from maskfreevis_jax import optimizer as optimizer_lib
from maskfreevis_jax import sharding as sharding_lib
from maskfreevis_jax import train as train_lib

NUM_CLASSES, NUM_QUERIES, NUM_INSTANCES = 3, 4, 2
T, H, W = 2, 32, 32


class StandInModel(nn.Module):
  """A few convolutions and learnable queries; 2 prediction layers."""
  width: int = 8

  @nn.compact
  def __call__(self, frames, image_valid=None, train=False):
    b, t, h, w, _ = frames.shape
    x = (frames.astype(jnp.float32) - 128.0) / 64.0
    x = x.reshape(b * t, h, w, 3)
    x = nn.Conv(self.width, (3, 3), strides=(4, 4), name="backbone_conv")(x)
    x = nn.GroupNorm(num_groups=2, name="backbone_norm")(x)
    features = nn.relu(x).reshape(b, t, h // 4, w // 4, self.width)
    features = nn.Dense(self.width, name="mask_features")(features)
    queries = self.param("query_feat", nn.initializers.normal(1.0), (NUM_QUERIES, self.width))
    logits, masks = [], []
    for layer in range(2):
      queries = queries + nn.Dense(self.width, name=f"layer_{layer}")(nn.LayerNorm()(queries))
      logits.append(jnp.broadcast_to(nn.Dense(NUM_CLASSES + 1, name=f"class_{layer}")(queries),
                                     (b, NUM_QUERIES, NUM_CLASSES + 1)))
      masks.append(jnp.einsum("qc,bthwc->bqthw", queries, features))
    return {"pred_logits": jnp.stack(logits), "pred_masks": jnp.stack(masks)}


def _box_masks(boxes, h, w, stride=4):
  ys = (jnp.arange(h) + 0.5) * stride
  xs = (jnp.arange(w) + 0.5) * stride
  inside_y = (ys >= boxes[..., 1:2]) & (ys < boxes[..., 3:4])
  inside_x = (xs >= boxes[..., 0:1]) & (xs < boxes[..., 2:3])
  return (inside_y[..., :, None] & inside_x[..., None, :]).astype(jnp.float32)


def stand_in_loss(outputs, batch, step):
  """Query n <-> instance n; class CE + box-mask BCE on every layer. NaN where batch['poison']."""
  del step
  logits = outputs["pred_logits"][:, :, :NUM_INSTANCES]          # [L, B, N, C+1]
  masks = outputs["pred_masks"][:, :, :NUM_INSTANCES]            # [L, B, N, T, h, w]
  valid = batch["instance_valid"].astype(jnp.float32)            # [B, N]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"][None])
  loss_ce = jnp.sum(ce * valid) / jnp.maximum(valid.sum(), 1.0) / logits.shape[0]
  targets = _box_masks(batch["boxes"], masks.shape[-2], masks.shape[-1])  # [B, N, T, h, w]
  targets = targets * batch["box_valid"][..., None, None]
  bce = optax.sigmoid_binary_cross_entropy(masks, targets[None]).mean(axis=(-1, -2, -3))
  loss_mask = jnp.sum(bce * valid) / jnp.maximum(valid.sum(), 1.0) / logits.shape[0]
  total = 2.0 * loss_ce + 5.0 * loss_mask
  if "poison" in batch:
    total = jnp.where(jnp.any(batch["poison"]), jnp.nan, total)
  return total, {"loss_ce": loss_ce, "loss_mask": loss_mask}


class StandInIterator:
  """Deterministic random boxes-on-frames stream; the state is the number of batches produced."""

  def __init__(self, batch_size: int, seed: int = 0, poison_steps=(), delay_s: float = 0.0):
    self.batch_size, self.seed, self.index = batch_size, seed, 0
    self.poison_steps, self.delay_s = set(poison_steps), delay_s

  def __iter__(self):
    return self

  def __next__(self):
    if self.delay_s:
      import time  # pylint: disable=g-import-not-at-top
      time.sleep(self.delay_s)
    rng = np.random.default_rng([self.seed, self.index])
    b = self.batch_size
    frames = rng.integers(0, 60, size=(b, T, H, W, 3), dtype=np.uint8)
    xy = rng.uniform(0, H / 2, size=(b, NUM_INSTANCES, 1, 2))
    wh = rng.uniform(6, H / 2, size=(b, NUM_INSTANCES, 1, 2))
    boxes = np.concatenate([xy, xy + wh], -1).repeat(T, axis=2).astype(np.float32)
    for i in range(b):
      for n in range(NUM_INSTANCES):
        x1, y1, x2, y2 = boxes[i, n, 0].astype(int)
        frames[i, :, y1:y2, x1:x2] = 200 if n == 0 else 120
    batch = {
        "frames": frames,
        "image_valid": np.ones((b, H, W), bool),
        "boxes": boxes,
        "box_valid": np.ones((b, NUM_INSTANCES, T), bool),
        "labels": rng.integers(0, NUM_CLASSES, size=(b, NUM_INSTANCES)).astype(np.int32),
        "instance_valid": np.ones((b, NUM_INSTANCES), bool),
        "poison": np.full((b,), self.index in self.poison_steps),
    }
    self.index += 1
    return batch

  def get_state(self):
    return {"index": self.index}

  def set_state(self, state):
    self.index = int(state["index"])


def make_config(**train_overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict({"name": "stand_in", "width": 8})
  config.train = ml_collections.ConfigDict()
  optimizer_lib.default_optimizer_fields(config.train)
  config.train.update(dict(
      steps=6, batch_size=8, lr=1e-2, seed=0, checkpoint_every=2, keep=3, log_every=2,
      image_every=0, max_consecutive_nonfinite=3, warmup_steps=2, lr_decay_steps=(4,),
      backbone_regex=r"(^|/)backbone_", clip_grad_norm=1.0))
  config.train.update(train_overrides)
  config.sharding = ml_collections.ConfigDict({"model_axis_size": 1, "min_shard_size": 2**18})
  config.init_from = ""
  return config


def _setup(mesh, config, min_shard_size=2**18):
  """The real trainer (`train.build_trainer`) around the stand-in model and loss."""
  config.sharding.min_shard_size = min_shard_size
  spec = train_lib.abstract_batch(next(StandInIterator(config.train.batch_size)))
  trainer = train_lib.build_trainer(config, spec, model=StandInModel(), loss_fn=stand_in_loss,
                                    mesh=mesh)
  return train_lib.initial_train_state(trainer, config), trainer.train_step, trainer.param_labels


def test_sharding_equivalence_one_vs_eight_devices():
  """Same steps on 1 device, 8 data-parallel devices and a 4x2 ('data', 'model') mesh."""
  assert jax.device_count() == 8, "conftest should force 8 CPU devices"
  config = make_config()
  results = {}
  for name, mesh, min_shard_size in (
      ("1 device", sharding_lib.create_mesh(1, jax.devices()[:1]), 2**18),
      ("8 devices", sharding_lib.create_mesh(1), 2**18),
      ("4x2 model-sharded", sharding_lib.create_mesh(2), 8)):
    state, step_fn, _ = _setup(mesh, config, min_shard_size)
    stream = StandInIterator(config.train.batch_size, seed=3)
    losses = []
    for _ in range(3):
      state, metrics = step_fn(state, sharding_lib.shard_batch(next(stream), mesh))
      losses.append(float(metrics["loss"]))
    assert len(state.params["query_feat"].sharding.device_set) == mesh.size
    if min_shard_size == 8:
      specs = [tuple(x.sharding.spec) for x in jax.tree.leaves(state.params)]
      assert any(sharding_lib.MODEL_AXIS in s for s in specs), specs
    results[name] = (np.asarray(losses), jax.device_get(state.params))
  reference_losses, reference_params = results["1 device"]
  assert reference_losses[-1] < reference_losses[0], "the loss should go down on this easy task"
  for name, (losses, params) in results.items():
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5, err_msg=name)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference_params)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name)


def test_nonfinite_step_is_skipped_and_counted():
  config = make_config()
  mesh = sharding_lib.create_mesh(1)
  state, step_fn, _ = _setup(mesh, config)
  stream = StandInIterator(8, poison_steps={2})
  state, _ = step_fn(state, sharding_lib.shard_batch(next(stream), mesh))
  state, _ = step_fn(state, sharding_lib.shard_batch(next(stream), mesh))
  before = jax.device_get((state.params, state.opt_state))
  state, metrics = step_fn(state, sharding_lib.shard_batch(next(stream), mesh))  # poisoned
  after = jax.device_get((state.params, state.opt_state))
  assert float(metrics["skipped_nonfinite"]) == 1.0
  assert not np.isfinite(float(metrics["loss"]))
  assert int(state.nonfinite_consecutive) == 1 and int(state.nonfinite_total) == 1
  assert int(state.step) == 3
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)
  state, metrics = step_fn(state, sharding_lib.shard_batch(next(stream), mesh))  # good again
  assert float(metrics["skipped_nonfinite"]) == 0.0
  assert int(state.nonfinite_consecutive) == 0 and int(state.nonfinite_total) == 1
  changed = [not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(after[0]), jax.tree.leaves(jax.device_get(state.params)))]
  assert any(changed)


def test_training_stops_after_consecutive_nonfinite_steps(tmp_path):
  config = make_config(steps=10, max_consecutive_nonfinite=3, checkpoint_every=100)
  stream = StandInIterator(8, poison_steps={1, 2, 3, 4, 5, 6, 7, 8, 9})
  with pytest.raises(train_lib.NonFiniteLossError, match=r"NaN/inf for 3 consecutive steps"):
    train_lib.train(config, tmp_path, model=StandInModel(), loss_fn=stand_in_loss,
                    train_iterator=stream)
  # Stopped soon after the 3rd bad step (one step of look-behind), not at the end.
  assert stream.index <= 6


def test_isolated_nonfinite_steps_do_not_stop_training(tmp_path):
  config = make_config(steps=6, max_consecutive_nonfinite=2)
  stream = StandInIterator(8, poison_steps={1, 3})
  result = train_lib.train(config, tmp_path, model=StandInModel(), loss_fn=stand_in_loss,
                           train_iterator=stream)
  assert result.step == 6
  assert int(result.state.nonfinite_total) == 2
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(result.state.params)))


def test_optimizer_groups_and_official_recipe():
  config = make_config(lr=1e-4, weight_decay=0.05, clip_grad_norm=0.01, lr_decay_steps=(4000,),
                       warmup_steps=10, warmup_factor=1.0, backbone_lr_multiplier=0.1)
  model = StandInModel()
  batch = next(StandInIterator(2))
  variables = jax.jit(lambda b: train_lib.init_variables(model, b, jax.random.key(0)))(batch)
  params = variables["params"]
  types = optimizer_lib.module_types_by_path(model, {"params": jax.random.key(0)}, batch["frames"])
  labels = optimizer_lib.param_labels(params, config.train, types)
  assert labels["backbone_conv"]["kernel"] == optimizer_lib.BACKBONE
  assert labels["backbone_norm"]["scale"] == optimizer_lib.BACKBONE_NO_DECAY  # norm by type
  assert labels["LayerNorm_0"]["bias"] == optimizer_lib.NO_DECAY
  assert labels["query_feat"] == optimizer_lib.NO_DECAY                        # embedding by name
  assert labels["layer_0"]["kernel"] == optimizer_lib.DEFAULT

  # One step by hand: clip by global norm 0.01, AdamW (first step: m/sqrt(v) = sign(g)), wd 0.05.
  tx = optimizer_lib.create_optimizer(config.train, labels)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 3.0), params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  lr = 1e-4
  np.testing.assert_allclose(updates["layer_0"]["kernel"],
                             -lr * (1.0 + 0.05 * params["layer_0"]["kernel"]), rtol=1e-4)
  np.testing.assert_allclose(updates["backbone_conv"]["kernel"],
                             -0.1 * lr * (1.0 + 0.05 * params["backbone_conv"]["kernel"]), rtol=1e-4)
  np.testing.assert_allclose(updates["backbone_norm"]["scale"], -0.1 * lr, rtol=1e-4)
  np.testing.assert_allclose(updates["query_feat"], -lr, rtol=1e-4)

  # Frozen params: no update, and their gradients do not count in the clipping norm.
  config.train.frozen_regex = r"^backbone_"
  labels = optimizer_lib.param_labels(params, config.train, types)
  tx = optimizer_lib.create_optimizer(config.train, labels)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert not np.any(np.asarray(updates["backbone_conv"]["kernel"]))
  assert not np.any(np.asarray(updates["backbone_norm"]["scale"]))


def test_learning_rate_schedule_matches_warmup_multistep():
  cfg = make_config(lr=1e-4, warmup_steps=10, warmup_factor=0.001, lr_decay_steps=(40, 60),
                    lr_decay_factor=0.1).train
  schedule = optimizer_lib.learning_rate_schedule(cfg)
  for step in (0, 5, 9, 10, 39, 40, 59, 60, 100):
    alpha = step / 10
    warm = 0.001 * (1 - alpha) + alpha if step < 10 else 1.0
    expected = 1e-4 * warm * 0.1 ** sum(step >= m for m in (40, 60))
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5)


def test_progress_line_and_overlay():
  line = train_lib.progress_line(120, 3000, {"loss": 3.4, "loss_ce": 0.5, "loss_mask_proj": 0.2,
                                             "grad_norm": 1.0, "learning_rate": 1e-4}, 2.5, 3725)
  assert line.startswith("step 120/3000 | loss 3.4000 | ce 0.5000 proj 0.2000")
  assert "2.50 clips/s" in line and "ETA 1:02:05" in line
  frames = np.zeros((2, 8, 8, 3), np.uint8)
  masks = np.full((3, 2, 2, 2), -1.0, np.float32)
  masks[1, :, 0, 0] = 5.0
  logits = np.zeros((3, 4), np.float32)
  logits[1, 0] = 9.0
  image = train_lib.mask_overlay_image(frames, logits, masks, top_k=1)
  assert image.shape == (8, 16, 3)
  assert image[:4, :4].any() and not image[4:, 4:8].any()
