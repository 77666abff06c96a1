"""Numerics of the accelerator options: rematerialisation policies and bfloat16 compute."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from maskfreevis_jax import train_step
from maskfreevis_jax import experiment
from maskfreevis_jax import models
from maskfreevis_jax import sharding as sharding_lib
from maskfreevis_jax.data import iterators

_REMAT_PARTS = ("backbone", "pixel_decoder", "decoder")


def _tiny_model(policies: dict[str, str]):
  config = models.get_model_config("tiny", num_classes=3)
  config.pixel_decoder.num_encoder_layers = 1
  config.decoder.num_layers = 1
  for part, policy in policies.items():
    config[part].remat = policy
  return models.build_model(config)


def _frames():
  return jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 1, 32, 32, 3), np.uint8))


def _remat_problem(policies: dict[str, str]):
  """(loss_fn, params): a fixed random projection of the tiny model's outputs."""
  model = _tiny_model(policies)
  frames = _frames()
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), frames)
  shapes = jax.eval_shape(model.apply, variables, frames)
  rng = np.random.default_rng(1)
  weights = {
      k: jnp.asarray(rng.normal(size=shapes[k].shape), jnp.float32)
      for k in ("pred_logits", "pred_masks")
  }

  def loss_fn(params):
    outputs = model.apply({**variables, "params": params}, frames)
    return sum(jnp.sum(outputs[k] * weights[k]) for k in weights)

  return loss_fn, variables["params"]


def _num_checkpoints(policies: dict[str, str]) -> int:
  """Checkpointed sub-computations in the traced forward pass (no compile, no init run)."""
  model = _tiny_model(policies)
  frames = _frames()
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), frames)
  return str(jax.make_jaxpr(lambda v: model.apply(v, frames))(variables)).count("remat2[")


@pytest.mark.parametrize("part", _REMAT_PARTS, ids=_REMAT_PARTS)
def test_remat_policy_is_applied_to_each_part(part):
  # Tracing only: the part's layers become checkpointed sub-computations (the deformable
  # attention's own query chunks are checkpointed in every configuration).
  assert _num_checkpoints({part: "full"}) > _num_checkpoints({})


def test_remat_policies_change_no_loss_or_gradient():
  loss_fn, params = _remat_problem({})
  remat_loss_fn, _ = _remat_problem(dict.fromkeys(_REMAT_PARTS, "full"))
  # One compile for both, so the check stays cheap.
  loss, grads, remat_loss, remat_grads = jax.jit(
      lambda p: jax.value_and_grad(loss_fn)(p) + jax.value_and_grad(remat_loss_fn)(p)
  )(params)
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-5)
  chex.assert_trees_all_close(remat_grads, grads, rtol=1e-5, atol=1e-5)


def test_unknown_remat_policy_is_a_clear_error():
  config = models.get_model_config("tiny")
  config.decoder.remat = "everything"
  with pytest.raises(ValueError, match="decoder.remat"):
    models.build_model(config)


# bfloat16 vs float32 training, relative difference of the total loss allowed per step: tight
# over the first steps (measured: < 0.1%), looser over all 20, where the two runs' parameters
# have drifted apart (measured: 4.3% at most).
BF16_EARLY_STEPS = 5
BF16_EARLY_RTOL = 0.01
BF16_LOSS_RTOL = 0.1


def _synthetic_run(tmp_path, dtype: str, steps: int, num_batches: int):
  """Losses and terms of `steps` real train steps (build_trainer) on cycled synthetic batches."""
  config = load_config("synthetic")
  config.train.batch_size = 2
  config.data.synthetic.cache_dir = str(tmp_path / "synthetic")
  config.data.synthetic.num_train_videos = 4
  config.data.synthetic.num_val_videos = 1
  config.data.pad_size = (64, 64)
  config.data.min_size_train = (64,)
  config.data.num_frames = 2
  config.model.pixel_decoder.num_encoder_layers = 1
  config.model.decoder.num_layers = 2
  config.model.dtype = dtype
  # The whole network in the compute dtype (the default keeps the pixel decoder float32).
  config.model.pixel_decoder.force_float32 = False
  iterator = iterators.create_train_iterator(config, seed=0, global_batch_size=2)
  batches = [dict(next(iterator)) for _ in range(num_batches)]
  trainer = experiment.build_experiment(
      config, mesh=sharding_lib.create_mesh(1, jax.devices()[:1])
  ).trainer(train_step.abstract_batch(batches[0]))
  state = trainer.init_state(jax.random.key(0))
  history = []
  for step in range(steps):
    state, metrics = trainer.train_step(state, batches[step % num_batches])
    history.append({k: float(v) for k, v in metrics.items()})
  return state, history


@pytest.mark.slow  # two train-step compiles (see docs/model.md for its time)
def test_bfloat16_training_follows_float32(tmp_path):
  state32, history32 = _synthetic_run(tmp_path / "f32", "float32", steps=20, num_batches=4)
  state16, history16 = _synthetic_run(tmp_path / "bf16", "bfloat16", steps=20, num_batches=4)
  # Parameters and optimizer state stay float32 under bfloat16 compute.
  for leaf in jax.tree.leaves((state16.params, state16.opt_state)):
    assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
  for metrics in history16:
    bad = [k for k, v in metrics.items() if not np.isfinite(v)]
    assert not bad, f"non-finite bfloat16 terms {bad}"
    assert metrics["skipped_nonfinite"] == 0
  losses32 = np.asarray([m["loss"] for m in history32])
  losses16 = np.asarray([m["loss"] for m in history16])
  early = slice(0, BF16_EARLY_STEPS)
  np.testing.assert_allclose(losses16[early], losses32[early], rtol=BF16_EARLY_RTOL)
  np.testing.assert_allclose(losses16, losses32, rtol=BF16_LOSS_RTOL)
