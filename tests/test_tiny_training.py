"""The real pieces together: the tiny model, the box-supervised criterion and synthetic box-only
clips from the input pipeline; repeated steps on the same clips must bring the loss down."""

import jax
import ml_collections
import numpy as np
import optax
import pytest

from conftest import load_config
from maskfreevis_jax import train_step
from maskfreevis_jax import experiment
from maskfreevis_jax import defaults
from maskfreevis_jax import criterion
from maskfreevis_jax import models
from maskfreevis_jax.data import iterators
from maskfreevis_jax.data import synthetic


@pytest.mark.slow  # the recipe test below checks the same in the default suite
def test_tiny_box_supervised_loss_goes_down(tmp_path):
  config = ml_collections.ConfigDict()
  config.data = defaults.data_defaults()
  config.data.batch_size = 2
  config.data.synthetic.cache_dir = str(tmp_path / "synthetic")
  config.data.synthetic.num_train_videos = 4
  config.data.synthetic.num_val_videos = 1
  batch = next(iterators.create_train_iterator(config, seed=0))
  assert batch["instance_valid"].any(), "the clips must hold box-annotated instances"
  assert "masks" not in batch  # box-only supervision

  model_config = models.get_model_config("tiny", num_classes=len(synthetic.SHAPE_CLASSES))
  model = models.build_model(model_config)
  variables = model.init(jax.random.PRNGKey(0), batch["frames"])
  params = variables["params"]
  others = {k: v for k, v in variables.items() if k != "params"}
  crit = defaults.criterion_defaults()
  crit.num_classes = model_config.num_classes
  tx = optax.adamw(1e-3, weight_decay=0.05)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, i):
    def loss_fn(p):
      outputs = model.apply(
          {"params": p, **others}, batch["frames"], image_valid=batch["image_valid"]
      )
      return criterion.set_criterion(outputs, batch, i, crit)

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, terms

  losses = []
  for i in range(25):
    params, opt_state, loss, terms = step(params, opt_state, i)
    losses.append(float(loss))
  assert all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:3]), losses
  assert float(terms["loss_mask_proj"]) > 0 and float(terms["loss_bound"]) >= 0


def _synthetic_recipe(tmp_path):
  config = load_config("synthetic")
  # The regression is about a randomly initialised model (the default's stage 2 starts from the
  # committed stage-1 weights, whose mask logits are confidently large by design; see
  # tests/test_two_stage.py), so this recipe trains from scratch at the from-scratch lr.
  config.init_from = "none"
  config.train.lr = 4e-4
  config.train.batch_size = 2
  config.data.synthetic.cache_dir = str(tmp_path / "synthetic")
  config.data.synthetic.num_train_videos = 12
  config.data.synthetic.num_val_videos = 1
  return config


def box_recipe_mask_saturation(config, steps: int) -> tuple[float, list[float], list[float]]:
  """Trains `steps` steps of the config's recipe (model, criterion, optimizer, project train step)
  on fresh clips; returns the fraction of saturated (|logit| > 6) final-layer mask logits of the
  last batch, the projection losses and the total losses."""
  from maskfreevis_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top

  iterator = iterators.create_train_iterator(config, seed=0, global_batch_size=2)
  batch = dict(next(iterator))
  exp = experiment.build_experiment(config, mesh=sharding_lib.create_mesh(1, jax.devices()[:1]))
  trainer = exp.trainer(train_step.abstract_batch(batch))
  state, step_fn = exp.initial_state(trainer), trainer.train_step
  model = trainer.model
  projections, totals = [], []
  for _ in range(steps):
    state, metrics = step_fn(state, batch)
    projections.append(float(metrics["loss_mask_proj"]))
    totals.append(float(metrics["loss"]))
    batch = next(iterator)
  outputs = model.apply(
      {"params": state.params, **state.model_state},
      batch["frames"],
      image_valid=batch["image_valid"],
  )
  logits = np.asarray(outputs["pred_masks"][-1])
  return float(np.mean(np.abs(logits) > 6.0)), projections, totals


def test_synthetic_recipe_masks_do_not_saturate(tmp_path):
  """Regression: with the official pairwise weight (5) on a randomly initialised model the masks
  saturate within ~100 steps (all on with GroupNorm, all off with FrozenBN), the sigmoid gradients
  vanish and box-supervised training stalls for good (projection loss flat, AP ~0). The embedded
  recipe must keep the mask logits in the trainable range."""
  config = _synthetic_recipe(tmp_path)
  saturated, projections, totals = box_recipe_mask_saturation(config, steps=100)
  assert np.all(np.isfinite(projections)) and np.all(np.isfinite(totals))
  assert saturated < 0.5, (saturated, projections[::10])
  # ...and the recipe learns from boxes on fresh clips: the total and projection losses fall.
  assert np.mean(totals[-20:]) < 0.9 * np.mean(totals[:10]), totals[::10]
  assert np.mean(projections[-20:]) < np.mean(projections[:10]), projections[::10]
