"""Train loop tests with a small stand-in model, loss and data stream (the real ones are tested in
their own files and end to end in test_main.py).

The stand-ins (`maskfreevis_jax.testing`) follow the shared interfaces: the model maps frames
[B, T, H, W, 3] to pred_logits [L, B, Q, C + 1] and pred_masks [L, B, Q, T, H/4, W/4]; the iterator
yields batches with frames / image_valid / boxes / box_valid / labels / instance_valid and has
get_state/set_state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskfreevis_jax import train_step
from maskfreevis_jax import experiment
from maskfreevis_jax import optimizer as optimizer_lib
from maskfreevis_jax import sharding as sharding_lib
from maskfreevis_jax import train as train_lib
from maskfreevis_jax.testing import StandInIterator, StandInModel, make_config, stand_in_loss


def _setup(mesh, config, min_shard_size=2**18):
  """The real trainer (`Experiment.trainer`) around the stand-in model and loss."""
  config.sharding.min_shard_size = min_shard_size
  spec = train_step.abstract_batch(next(StandInIterator(config.train.batch_size)))
  exp = experiment.build_experiment(config, model=StandInModel(), loss_fn=stand_in_loss, mesh=mesh)
  trainer = exp.trainer(spec)
  return exp.initial_state(trainer), trainer.train_step, trainer.param_labels


def test_sharding_equivalence_one_vs_eight_devices():
  """Same steps on 1 device, 8 data-parallel devices and a 4x2 ('data', 'model') mesh."""
  assert jax.device_count() == 8, "conftest should force 8 CPU devices"
  config = make_config()
  results = {}
  for name, mesh, min_shard_size in (
      ("1 device", sharding_lib.create_mesh(1, jax.devices()[:1]), 2**18),
      ("8 devices", sharding_lib.create_mesh(1), 2**18),
      ("4x2 model-sharded", sharding_lib.create_mesh(2), 8),
  ):
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
  changed = [
      not np.array_equal(a, b)
      for a, b in zip(jax.tree.leaves(after[0]), jax.tree.leaves(jax.device_get(state.params)))
  ]
  assert any(changed)


def test_training_stops_after_consecutive_nonfinite_steps(tmp_path):
  config = make_config(steps=10, max_consecutive_nonfinite=3, checkpoint_every=100)
  stream = StandInIterator(8, poison_steps={1, 2, 3, 4, 5, 6, 7, 8, 9})
  with pytest.raises(train_lib.NonFiniteLossError, match=r"NaN/inf for 3 consecutive steps"):
    train_lib.train(
        experiment.build_experiment(
            config, model=StandInModel(), loss_fn=stand_in_loss, train_iterator=stream
        ),
        tmp_path,
    )
  # Stopped soon after the 3rd bad step (one step of look-behind), not at the end.
  assert stream.index <= 6


def test_isolated_nonfinite_steps_do_not_stop_training(tmp_path):
  config = make_config(steps=6, max_consecutive_nonfinite=2)
  stream = StandInIterator(8, poison_steps={1, 3})
  result = train_lib.train(
      experiment.build_experiment(
          config, model=StandInModel(), loss_fn=stand_in_loss, train_iterator=stream
      ),
      tmp_path,
  )
  assert result.step == 6
  assert int(result.state.nonfinite_total) == 2
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(result.state.params)))


def test_optimizer_groups_and_official_recipe():
  config = make_config(
      lr=1e-4,
      weight_decay=0.05,
      clip_grad_norm=0.01,
      lr_decay_steps=(4000,),
      warmup_steps=10,
      warmup_factor=1.0,
      backbone_lr_multiplier=0.1,
  )
  model = StandInModel()
  batch = next(StandInIterator(2))
  variables = jax.jit(lambda b: train_step.init_variables(model, b, jax.random.key(0)))(batch)
  params = variables["params"]
  types = optimizer_lib.module_types_by_path(model, {"params": jax.random.key(0)}, batch["frames"])
  labels = optimizer_lib.param_labels(params, config.train, types)
  assert labels["backbone_conv"]["kernel"] == optimizer_lib.BACKBONE
  assert labels["backbone_norm"]["scale"] == optimizer_lib.BACKBONE_NO_DECAY  # norm by type
  assert labels["LayerNorm_0"]["bias"] == optimizer_lib.NO_DECAY
  assert labels["query_feat"] == optimizer_lib.NO_DECAY  # embedding by name
  assert labels["layer_0"]["kernel"] == optimizer_lib.DEFAULT

  # One step by hand: clip by global norm 0.01, AdamW (first step: m/sqrt(v) = sign(g)), wd 0.05.
  tx = optimizer_lib.create_optimizer(config.train, labels)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 3.0), params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  lr = 1e-4
  np.testing.assert_allclose(
      updates["layer_0"]["kernel"], -lr * (1.0 + 0.05 * params["layer_0"]["kernel"]), rtol=1e-4
  )
  np.testing.assert_allclose(
      updates["backbone_conv"]["kernel"],
      -0.1 * lr * (1.0 + 0.05 * params["backbone_conv"]["kernel"]),
      rtol=1e-4,
  )
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
  cfg = make_config(
      lr=1e-4, warmup_steps=10, warmup_factor=0.001, lr_decay_steps=(40, 60), lr_decay_factor=0.1
  ).train
  schedule = optimizer_lib.learning_rate_schedule(cfg)
  for step in (0, 5, 9, 10, 39, 40, 59, 60, 100):
    alpha = step / 10
    warm = 0.001 * (1 - alpha) + alpha if step < 10 else 1.0
    expected = 1e-4 * warm * 0.1 ** sum(step >= m for m in (40, 60))
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5)


def test_progress_line():
  line = train_lib.progress_line(
      120,
      3000,
      {"loss": 3.4, "loss_ce": 0.5, "loss_mask_proj": 0.2, "grad_norm": 1.0, "learning_rate": 1e-4},
      2.5,
      3725,
  )
  assert line.startswith("step 120/3000 | loss 3.4000 | ce 0.5000 proj 0.2000")
  assert "2.50 clips/s" in line and "ETA 1:02:05" in line
