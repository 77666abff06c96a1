"""The R50 model forward and one training step against the official release.

`parity_model_forward.npz` and `parity_train_step.npz` were written by
`tools/official_parity/model_forward.py` and `train_step.py`: the official R50 YouTube-VIS 2019
model ran on weights exported from `random_variables(r50, seed)` and on a batch of 2 clips x 3
frames of 64x96 (the second clip 50x70, padded). These tests regenerate the same variables from the
seed (checked against the exported state_dict's sha256) and need no official code.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from maskfreevis_jax import defaults
from maskfreevis_jax import experiment as experiment_lib
from maskfreevis_jax import export
from maskfreevis_jax import optimizer as optimizer_lib
from maskfreevis_jax import sharding as sharding_lib
from maskfreevis_jax import train_step as train_step_lib
from maskfreevis_jax.export import testing as export_testing
from maskfreevis_jax.models import build_model
from maskfreevis_jax.models import get_model_config
from maskfreevis_jax.models import official_names
from tools.official_parity import train_step as parity_train_step

REGENERATE = "bash tools/official_parity/make_fixtures.sh model_forward train_step"
CLIPS = ["unpadded", "padded"]
# XLA's backend optimisations (LLVM) cost more compile time than this small step saves; values
# match the official ones to the same precision without them.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def _load(fixtures_dir, name):
  with np.load(fixtures_dir / name) as data:
    arrays = {k: data[k] for k in data.files}
  return arrays, json.loads(str(arrays.pop("meta")))


@pytest.fixture(scope="module")
def forward_fixture(fixtures_dir):
  return _load(fixtures_dir, "parity_model_forward.npz")


@pytest.fixture(scope="module")
def train_fixture(fixtures_dir):
  return _load(fixtures_dir, "parity_train_step.npz")


@pytest.fixture(scope="module")
def r50(forward_fixture, train_fixture):
  """(model config, variables) the fixtures were made from, regenerated from their seed."""
  (_, forward_meta), (_, train_meta) = forward_fixture, train_fixture
  config = get_model_config("r50")
  variables = export_testing.random_variables(config, seed=forward_meta["variables_seed"])
  state_dict, _ = export.export_state_dict(variables, config)
  digest = export_testing.state_dict_sha256(state_dict)
  for name, meta in [
      ("parity_model_forward.npz", forward_meta),
      ("parity_train_step.npz", train_meta),
  ]:
    if meta["state_dict_sha256"] != digest:
      pytest.fail(
          f"tests/fixtures/{name} was made from other weights than "
          f"random_variables(r50, seed={meta['variables_seed']}) gives now "
          f"(the generator or the model's variables changed); regenerate: {REGENERATE}"
      )
  return config, variables


# --- Full model forward ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def forward_outputs(r50, forward_fixture):
  config, variables = r50
  data, _ = forward_fixture
  model = build_model(config)
  apply = jax.jit(functools.partial(model.apply, train=False))
  outputs = apply.lower(variables, data["frames"], data["image_valid"]).compile(COMPILER_OPTIONS)(
      variables, data["frames"], data["image_valid"]
  )
  return {k: np.asarray(outputs[k]) for k in ("pred_logits", "pred_masks")}


@pytest.mark.parametrize("clip", range(len(CLIPS)), ids=CLIPS)
@pytest.mark.parametrize("name", ["pred_logits", "pred_masks"])
def test_forward_matches_official_every_layer(forward_outputs, forward_fixture, name, clip):
  """Every one of the 10 predictions, relative to the output's scale: 1e-4 (measured ~3e-6)."""
  data, _ = forward_fixture
  ours = forward_outputs[name][:, clip]
  if name == "pred_masks":
    ours = ours[:, data["mask_queries"]]  # the fixture keeps a subset of the queries' masks
  official = data[name][:, clip]
  assert ours.shape == official.shape and official.shape[0] == 10
  for layer in range(official.shape[0]):
    scale = np.abs(official[layer]).max()
    np.testing.assert_allclose(
        ours[layer],
        official[layer],
        rtol=1e-4,
        atol=1e-4 * scale,
        err_msg=f"{name} of layer {layer}",
    )


def test_padded_clip_is_padded(forward_fixture):
  """The padded case pads: garbage beyond the 50x70 frames that the official model never saw."""
  data, _ = forward_fixture
  valid = data["image_valid"][1]
  assert valid.sum() == 50 * 70 and valid[:50, :70].all()
  assert data["image_valid"][0].all()


# --- One training step ----------------------------------------------------------------------


def parity_loss(outputs, batch, step, coefficients):
  """`tools/official_parity/train_step.parity_loss_torch`: a smooth function of every output.

  sum over layers of mean(W_cls * log_softmax(pred_logits)) + mean(W_mask * sigmoid(pred_masks)),
  W_mask[q, t, y, x] = query_weights[q] * frame_weights[t] * row_weights[y] * col_weights[x].
  """
  del batch, step
  c = coefficients
  mask_weights = jnp.einsum(
      "q,t,y,x->qtyx", c["query_weights"], c["frame_weights"], c["row_weights"], c["col_weights"]
  )
  class_term = (jax.nn.log_softmax(outputs["pred_logits"], -1) * c["class_weights"]).mean((1, 2, 3))
  mask_term = (jax.nn.sigmoid(outputs["pred_masks"]) * mask_weights).mean((1, 2, 3, 4, 5))
  return jnp.sum(class_term + mask_term), {}


@pytest.fixture(scope="module")
def trainer(train_fixture):
  """The project's real trainer (`Experiment.trainer`, the official optimizer recipe) for R50."""
  data, _ = train_fixture
  coefficients = {
      k: data[k]
      for k in ("class_weights", "query_weights", "frame_weights", "row_weights", "col_weights")
  }
  batch = {"frames": data["frames"], "image_valid": data["image_valid"]}
  experiment = experiment_lib.build_experiment(
      defaults.get_config("r50"),
      loss_fn=functools.partial(parity_loss, coefficients=coefficients),
      mesh=sharding_lib.create_mesh(1, jax.devices()[:1]),
  )
  return experiment.trainer(train_step_lib.abstract_batch(batch))


@pytest.fixture(scope="module")
def train_step_result(r50, trainer, train_fixture):
  """One step of the real train step from the fixture's weights: (params, opt_state, metrics)."""
  _, variables = r50
  data, _ = train_fixture
  batch = {"frames": data["frames"], "image_valid": data["image_valid"]}
  params = variables["params"]
  state = train_step_lib.TrainState(
      step=jnp.zeros([], jnp.int32),
      params=params,
      opt_state=trainer.tx.init(params),
      model_state={k: v for k, v in variables.items() if k != "params"},
      rng=jax.random.key_data(jax.random.key(0)),
      nonfinite_consecutive=jnp.zeros([], jnp.int32),
      nonfinite_total=jnp.zeros([], jnp.int32),
  )
  state = jax.device_put(state, trainer.state_shardings)
  step = trainer.train_step.lower(state, batch).compile(COMPILER_OPTIONS)
  new_state, metrics = step(state, batch)
  return jax.tree.map(np.asarray, (new_state.params, new_state.opt_state, metrics))


@functools.cache
def _official_entries():
  return {e.official_key: e for e in official_names.official_name_map(get_model_config("r50"))}


def _ours_in_torch_layout(tree, official_key):
  entry = _official_entries()[official_key]
  flat = traverse_util.flatten_dict(tree)
  return official_names.to_torch_array(flat[entry.flax_path], entry.transform)


def test_train_step_loss_and_gradient_norm(train_step_result, train_fixture):
  _, _, metrics = train_step_result
  data, meta = train_fixture
  np.testing.assert_allclose(metrics["loss"], data["loss"], rtol=1e-5)
  # Before clipping: the norm that the official full-model clipping compares with its max norm.
  np.testing.assert_allclose(metrics["grad_norm"], data["grad_norm"], rtol=1e-4)
  assert data["grad_norm"] > meta["clip_gradients"]["value"]  # the clipping is active


def test_train_fixture_optimizer_is_the_official_recipes(train_fixture, official_r50_reference):
  """The step's optimizer settings, which the tests below read, are the recipe's (the two
  fixtures come from separate official runs)."""
  _, meta = train_fixture
  assert meta["clip_gradients"] == official_r50_reference["optimizer"]["clip_gradients"]
  assert meta["clip_gradients"]["type"] == "full_model"


# The parameters whose gradient and update the fixture stores, as the generator lists them.
TRACKED = list(parity_train_step.TRACKED_PARAMETERS)
TRACKED_IDS = [k.replace("sem_seg_head.", "") for k in TRACKED]


def test_tracked_parameters_are_the_fixtures(train_fixture):
  data, meta = train_fixture
  assert sorted(meta["groups"]) == sorted(TRACKED)
  assert sorted(k[len("update/") :] for k in data if k.startswith("update/")) == sorted(TRACKED)


@pytest.mark.parametrize("key", TRACKED, ids=TRACKED_IDS)
def test_train_step_clipped_gradient_matches_official(
    trainer, train_step_result, train_fixture, key
):
  """Adam's first moment after one step is (1 - b1) x the clipped gradient."""
  _, opt_state, _ = train_step_result
  data, meta = train_fixture
  label = traverse_util.flatten_dict(trainer.param_labels)[_official_entries()[key].flax_path]
  moments = [
      mu
      for path, mu in optax.tree_utils.tree_get_all_with_path(opt_state, "mu")
      if any(getattr(p, "key", None) == label for p in path)
  ]
  assert len(moments) == 1, (key, label)
  b1, _ = meta["adam_betas"]  # the official optimizer's
  ours = _ours_in_torch_layout(moments[0], key) / (1.0 - b1)
  # torch.nn.utils.clip_grad_norm_ scales every gradient by max_norm / total norm.
  official = data[f"grad/{key}"] * meta["clip_gradients"]["value"] / float(data["grad_norm"])
  np.testing.assert_allclose(ours, official, rtol=1e-3, atol=1e-3 * np.abs(official).max())


@pytest.mark.parametrize("key", TRACKED, ids=TRACKED_IDS)
def test_train_step_update_matches_official(r50, train_step_result, train_fixture, key):
  """new - old parameter, to 1% of the group's lr where the gradient is well above Adam's eps.

  An update is about lr x g / (|g| + eps) (+ lr x wd x p), g the clipped gradient: a lost
  backbone multiplier (x10) or weight-decay exemption (+ 0.05 lr |p|) shows. Where |g| is near
  eps the update is proportional to g, so the gradient's tolerance (1e-3 of the tensor's largest
  gradient, as in the gradient test) widens the bound there.
  """
  _, variables = r50
  new_params, _, _ = train_step_result
  data, meta = train_fixture
  lr, _ = meta["groups"][key]
  eps = meta["adam_eps"]
  ours = _ours_in_torch_layout(new_params, key) - _ours_in_torch_layout(variables["params"], key)
  official = data[f"update/{key}"]
  clip_norm = meta["clip_gradients"]["value"]
  clipped_grad = np.abs(data[f"grad/{key}"]) * clip_norm / float(data["grad_norm"])
  grad_tolerance = 1e-3 * clipped_grad.max()
  bound = lr * (1e-2 + eps * grad_tolerance / (clipped_grad + eps) ** 2)
  error = np.abs(ours - official)
  assert np.all(error <= bound), (
      f"{key}: {np.sum(error > bound)} of {error.size} elements off, worst "
      f"{(error / lr).max():.3g} x lr"
  )
  tight = bound <= 2e-2 * lr
  assert tight.mean() > 0.25, tight.mean()  # the check is not vacuous
  assert np.abs(official[tight]).max() > 0.5 * lr


def test_optimizer_groups_match_official(trainer, official_r50_reference):
  """All 345 trainable parameters: our group's (lr multiplier, weight decay) is the official one."""
  reference = official_r50_reference["optimizer"]
  base_lr, train_config = reference["base_lr"], defaults.train_defaults()
  group_settings = {
      optimizer_lib.DEFAULT: (1.0, train_config.weight_decay),
      optimizer_lib.NO_DECAY: (1.0, train_config.weight_decay_norm),
      optimizer_lib.BACKBONE: (train_config.backbone_lr_multiplier, train_config.weight_decay),
      optimizer_lib.BACKBONE_NO_DECAY: (
          train_config.backbone_lr_multiplier,
          train_config.weight_decay_norm,
      ),
  }
  labels = traverse_util.flatten_dict(trainer.param_labels)
  ours = {}
  for entry in _official_entries().values():
    if entry.collection == "params":
      multiplier, weight_decay = group_settings[labels[entry.flax_path]]
      ours[entry.official_key] = [base_lr * multiplier, weight_decay]
  assert len(ours) == len(reference["groups"]) == 345
  for key, (lr, weight_decay) in reference["groups"].items():
    assert ours[key] == pytest.approx([lr, weight_decay], rel=1e-9), key
  assert reference["clip_gradients"] == {"type": "full_model", "value": train_config.clip_grad_norm}
