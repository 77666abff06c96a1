"""Tests of the embedded two-stage default: still images, stage-1 cache, init of stage 2."""

import hashlib
import json
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safetensors import numpy as safetensors_numpy

from conftest import load_config
from maskfreevis_jax import criterion
from maskfreevis_jax import experiment as experiment_lib
from maskfreevis_jax import export
from maskfreevis_jax import sharding
from maskfreevis_jax import train
from maskfreevis_jax import train_step
from maskfreevis_jax import two_stage
from maskfreevis_jax.data import coco_pseudo
from maskfreevis_jax.data import synthetic
from maskfreevis_jax.data import synthetic_images
from maskfreevis_jax.data import ytvis_json


def _one_device_mesh():
  return sharding.create_mesh(1, jax.devices()[:1])


def _small_stage2_config(tmp_path):
  config = load_config("synthetic")
  config.init_from = ""
  config.train.batch_size = 2
  config.data.synthetic.cache_dir = str(tmp_path / "videos")
  config.data.synthetic.num_train_videos = 2
  config.data.synthetic.num_val_videos = 1
  config.data.synthetic.frame_size = (32, 32)
  config.data.pad_size = (32, 32)
  config.data.min_size_train = (32,)
  return config


def _small_stage1_config(name="synthetic_pretrain"):
  config = load_config(name)
  config.train.steps = 3
  config.train.batch_size = 2
  config.data.stills.num_images = 4
  config.data.stills.size = (32, 32)
  config.data.pad_size = (32, 32)
  config.data.min_size_train = (32,)
  config.data.coco.min_size_train = (32,)
  config.data.coco.max_size_train = 32
  return config


def test_still_images_are_coco_instances_with_masks(tmp_path):
  path = synthetic_images.write_coco_instances(
      str(tmp_path / "a"), num_images=6, size=(48, 64), seed=3
  )
  images, class_names = coco_pseudo.load_coco_instances(
      path, target_class_names=synthetic.SHAPE_CLASSES
  )
  assert class_names == list(synthetic.SHAPE_CLASSES) and len(images) == 6
  data = json.loads(open(path).read())
  assert {c["name"] for c in data["categories"]} == set(synthetic.SHAPE_CLASSES)
  for ann in data["annotations"]:
    mask = ytvis_json.decode_segmentation(ann["segmentation"], 48, 64).astype(bool)
    ys, xs = np.nonzero(mask)
    x, y, w, h = ann["bbox"]
    assert (xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()) == (x, y, w, h)
    assert ann["area"] == mask.sum() >= 16
  # Deterministic, and another seed draws other images.
  again = synthetic_images.write_coco_instances(
      str(tmp_path / "b"), num_images=6, size=(48, 64), seed=3
  )
  other = synthetic_images.write_coco_instances(
      str(tmp_path / "c"), num_images=6, size=(48, 64), seed=4
  )
  assert json.loads(open(again).read())["annotations"] == data["annotations"]
  assert json.loads(open(other).read())["annotations"] != data["annotations"]


# sha256 of the pixels, visible masks and labels of `_StillRenderer(48, 64).image` for rngs
# [3, 0..4], 4 objects at most: the default stills as the generator made them before the
# recoloured option (session 10); the committed stage-1 weights were trained on such stills.
DEFAULT_STILLS_RENDER_SHA256 = "b684e03d8aa49912bafea763fa061ad0321bdfc8599be1a588ac82164892b5a1"


def test_default_stills_render_unchanged():
  renderer = synthetic_images._StillRenderer(48, 64)  # pylint: disable=protected-access
  digest = hashlib.sha256()
  for i in range(5):
    pixels, visible, labels = renderer.image(np.random.default_rng([3, i]), 4)
    digest.update(pixels.tobytes())
    digest.update(visible.tobytes())
    digest.update(bytes(labels))
  assert digest.hexdigest() == DEFAULT_STILLS_RENDER_SHA256


@pytest.mark.parametrize("seed", [0, 1, 2, 3], ids=lambda s: f"rng{s}")
def test_recoloured_stills_repaint_half_an_object_in_background_colours(seed):
  renderer = synthetic_images._StillRenderer(96, 96)  # pylint: disable=protected-access
  # One object; the draws before the recolouring are the plain image's, so only it differs.
  plain, plain_visible, labels = renderer.image(np.random.default_rng([seed, 7]), 1)
  pixels, visible, again = renderer.image(np.random.default_rng([seed, 7]), 1, 1.0)
  np.testing.assert_array_equal(visible, plain_visible)
  assert again == labels
  changed = (pixels != plain).any(axis=-1)
  mask = visible[0]
  assert not (changed & ~mask).any()  # the background and other pixels untouched
  # Half of the whole shape; the image border may cut either side.
  assert 0.15 <= changed.sum() / mask.sum() <= 0.85, (changed.sum(), mask.sum())
  # Histogram-matched to the background crop: each channel within the background's values.
  background = plain[~mask]
  repainted = pixels[changed]
  assert (repainted >= background.min(axis=0)).all() and (repainted <= background.max(axis=0)).all()


@pytest.mark.parametrize("share", [0.0, 0.5], ids=["default", "recoloured"])
def test_stage1_fingerprint_names_recoloured_stills_only_when_used(share):
  config = _small_stage1_config()
  config.data.stills.recoloured_share = share
  stills = two_stage.stage1_fingerprint(config)["data"]["stills"]
  # The default's fingerprint stays what it was before the option (cached runs stay valid).
  assert stills.get("recoloured_share") == (share or None)


def _forbid_masks(monkeypatch):
  """Any mask encoded, decoded or supervised from here on raises."""

  def forbidden(*args, **kwargs):
    del args, kwargs
    raise AssertionError("a mask was encoded, decoded or used")

  monkeypatch.setattr(ytvis_json, "encode_mask", forbidden)
  monkeypatch.setattr(ytvis_json, "decode_segmentation", forbidden)
  monkeypatch.setattr(criterion, "mask_supervised_losses", forbidden)


def _fake_stage1_train(calls):
  """A stand-in for train.train: reads two real batches of the stage-1 stream, trains nothing."""

  def fake_train(experiment, workdir):
    del workdir
    iterator = experiment.train_iterator()
    calls.append([next(iterator) for _ in range(2)])
    state = train_step.TrainState(
        step=0,
        params={"w": np.zeros(2)},
        opt_state=None,
        model_state={},
        rng=None,
        nonfinite_consecutive=0,
        nonfinite_total=0,
    )
    return train.TrainResult(state=state, step=0, last_metrics={}, preempted=False)

  return fake_train


@pytest.mark.parametrize(
    "name,reads_masks",
    [("synthetic_pretrain_boxes", False), ("synthetic_pretrain", True)],
    ids=["boxes", "masks-control"],
)
def test_box_only_stage1_writes_and_reads_no_mask(tmp_path, monkeypatch, name, reads_masks):
  """The box-only stage 1 writes its stills without masks and its stream decodes none; the
  mask-supervised stage 1 (the control) does both, so the trap below does spring."""
  config = _small_stage1_config(name)
  calls = []
  monkeypatch.setattr(train, "train", _fake_stage1_train(calls))
  monkeypatch.setattr(
      export, "export_checkpoint", lambda v, m, out, **k: pathlib.Path(out).write_bytes(b"")
  )
  _forbid_masks(monkeypatch)
  if reads_masks:
    with pytest.raises(AssertionError, match="mask was encoded"):
      two_stage.ensure_stage1(config, tmp_path / "stage1")
    return
  two_stage.ensure_stage1(config, tmp_path / "stage1")
  assert config.criterion.mode == "box" and not config.data.with_masks
  data = json.loads((tmp_path / "stage1" / "stills" / "instances.json").read_text())
  assert data["annotations"] and all(
      set(a) == {"id", "image_id", "category_id", "iscrowd", "bbox"} for a in data["annotations"]
  )
  (batches,) = calls
  for batch in batches:
    assert "masks" not in batch and batch["instance_valid"].any()
    chex.assert_shape(batch["frames"], (2, 2, 32, 32, 3))  # 2-frame pseudo clips


def test_box_only_stills_cannot_train_with_masks(tmp_path):
  path = synthetic_images.write_coco_instances(
      str(tmp_path / "boxes"), num_images=2, size=(32, 32), with_masks=False
  )
  source = coco_pseudo.CocoPseudoClipSource(path, target_class_names=synthetic.SHAPE_CLASSES)
  config = _small_stage1_config()  # with_masks=True
  with pytest.raises(ValueError, match="has no segmentation"):
    source.training_clip(0, np.random.default_rng(0), config)


@pytest.mark.parametrize(
    "name,with_masks",
    [("synthetic_pretrain_boxes", True), ("synthetic_pretrain", False)],
    ids=["box-criterion-with-masks", "mask-criterion-without-masks"],
)
def test_stage1_supervision_and_stills_must_agree(tmp_path, name, with_masks):
  config = _small_stage1_config(name)
  config.data.with_masks = with_masks
  with pytest.raises(ValueError, match="does not fit"):
    two_stage.ensure_stage1(config, tmp_path / "stage1")


@pytest.mark.parametrize("protocol", ["boxes", "masks"], ids=["boxes", "masks"])
def test_protocol_picks_the_stage1_config_and_weights(protocol):
  stage2, stage1 = two_stage.protocol_configs(
      protocol, load_config("synthetic"), None, {"train.steps": 7}
  )
  assert stage2.init_from == str(two_stage.PROTOCOLS[protocol]["weights"])
  assert stage1.data.with_masks == (protocol == "masks")
  assert stage1.criterion.mode == ("mask" if protocol == "masks" else "box")
  assert stage1.train.steps == 7
  kept, _ = two_stage.protocol_configs(
      protocol, load_config("synthetic"), stage1, keep_init_from=True
  )
  assert kept.init_from == str(load_config("synthetic").init_from)


def test_still_images_use_other_photographs_than_the_videos():
  assert not set(synthetic_images.STILL_PHOTOS) & set(synthetic.BACKGROUND_PHOTOS)


def test_stage2_starts_from_the_stage1_weights(tmp_path):
  """Stage 2's train() starts from every tensor of the stage-1 file (random values here, so a
  tensor left at its own initialisation shows)."""
  config = _small_stage2_config(tmp_path)
  experiment = experiment_lib.build_experiment(config, mesh=_one_device_mesh())
  trainer = experiment.trainer(train_step.abstract_batch(next(experiment.train_iterator())))
  rng = np.random.default_rng(0)
  stage1 = jax.tree.map(
      lambda x: rng.normal(size=x.shape).astype(x.dtype),
      {"params": trainer.abstract_state.params, **dict(trainer.abstract_state.model_state)},
  )
  weights = tmp_path / "stage1.safetensors"
  export.export_checkpoint(stage1, config.model, weights, fmt="safetensors")

  config.init_from = str(weights)
  config.train.steps = 0  # train() initialises, saves step 0 and returns: no step compiled.
  result = train.train(
      experiment_lib.build_experiment(config, mesh=_one_device_mesh()), tmp_path / "stage2"
  )
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(result.state.params), stage1["params"])


def test_stage1_cache_is_reused(tmp_path, monkeypatch):
  """ensure_stage1 trains and exports once; a rerun with the same config reuses the file, a
  changed config trains again."""
  config = _small_stage1_config()
  calls = []

  def fake_train(experiment, workdir):
    del workdir
    cfg = experiment.config
    calls.append(cfg.data.coco.json)
    state = train_step.TrainState(
        step=0,
        params={"w": np.full(2, len(calls))},
        opt_state=None,
        model_state={},
        rng=None,
        nonfinite_consecutive=0,
        nonfinite_total=0,
    )
    return train.TrainResult(
        state=state, step=int(cfg.train.steps), last_metrics={}, preempted=False
    )

  def fake_export(variables, model_config, out_path, **kwargs):
    del model_config, kwargs
    pathlib.Path(out_path).write_bytes(np.asarray(variables["params"]["w"]).tobytes())

  monkeypatch.setattr(train, "train", fake_train)
  monkeypatch.setattr(export, "export_checkpoint", fake_export)
  first = two_stage.ensure_stage1(config, tmp_path / "stage1")
  first_bytes = first.read_bytes()
  assert len(calls) == 1 and calls[0].endswith("instances.json")
  assert two_stage.stage1_is_cached(tmp_path / "stage1", config)

  config.train.log_every = 1  # bookkeeping only: still the same weights
  again = two_stage.ensure_stage1(config, tmp_path / "stage1")
  assert len(calls) == 1 and again == first and again.read_bytes() == first_bytes

  config.train.steps = 4
  assert not two_stage.stage1_is_cached(tmp_path / "stage1", config)
  two_stage.ensure_stage1(config, tmp_path / "stage1")
  assert len(calls) == 2 and first.read_bytes() != first_bytes

  # Stills of a new generator format make the cached weights stale too.
  assert two_stage.stage1_is_cached(tmp_path / "stage1", config)
  monkeypatch.setattr(synthetic_images, "FORMAT_VERSION", synthetic_images.FORMAT_VERSION + 1)
  assert not two_stage.stage1_is_cached(tmp_path / "stage1", config)


@pytest.mark.slow
def test_stage1_trains_and_exports(tmp_path):
  """The real stage 1 (3 steps, mask-supervised on 8 stills) exports weights, and stage 2's
  init_from loads every one of them, exactly: each tensor of the file, by its official name,
  equals the stage-2 state's variable it names."""
  config = _small_stage1_config()
  # train() shards the batch over every device (8 forced CPU devices in the suite).
  config.train.batch_size = jax.device_count()
  config.data.stills.num_images = 8
  weights = two_stage.ensure_stage1(config, tmp_path / "stage1")
  stage2 = _small_stage2_config(tmp_path)
  stage2.init_from = str(weights)
  experiment = experiment_lib.build_experiment(stage2, mesh=_one_device_mesh())
  trainer = experiment.trainer(train_step.abstract_batch(next(experiment.train_iterator())))
  state = jax.device_get(experiment.initial_state(trainer))
  loaded, _ = export.export_state_dict({"params": state.params, **state.model_state}, stage2.model)
  stored = safetensors_numpy.load_file(str(weights))
  # The criterion's buffers are written from constants and are not model variables.
  buffers = {"criterion.empty_weight", "criterion._iter"}
  assert set(stored) - buffers == set(loaded) - buffers
  for name in sorted(set(stored) - buffers):
    assert stored[name].dtype == loaded[name].dtype, name
    np.testing.assert_array_equal(loaded[name], stored[name], err_msg=name)


@pytest.mark.slow
def test_box_only_stage1_trains_without_any_mask(tmp_path, monkeypatch):
  """The real box-only stage 1 (3 steps on 8 box-only stills) trains and exports with every mask
  encoder, decoder and mask-supervised loss replaced by one that raises."""
  config = _small_stage1_config("synthetic_pretrain_boxes")
  config.train.batch_size = jax.device_count()
  config.data.stills.num_images = 8
  _forbid_masks(monkeypatch)
  weights = two_stage.ensure_stage1(config, tmp_path / "stage1")
  stored = safetensors_numpy.load_file(str(weights))
  assert stored and all(np.isfinite(v).all() for v in stored.values())
  marker = json.loads((tmp_path / "stage1" / two_stage.STAGE1_MARKER).read_text())
  assert marker["step"] == 3 and marker["fingerprint"]["criterion"]["mode"] == "box"


def _matched_class_accuracy(config, model, variables, batches) -> float:
  """Fraction of ground-truth objects whose query, matched as the criterion of `config` matches
  (Hungarian on class and mask costs), predicts their class."""

  @jax.jit
  def matched_logits(batch):
    outputs = model.apply(variables, batch["frames"], image_valid=batch["image_valid"])
    _, matching = criterion.criterion_layer_losses(outputs, batch, 0, config.criterion)
    logits = jnp.take_along_axis(
        outputs["pred_logits"][-1], matching.query_index[-1][..., None], axis=1
    )
    return logits, matching.valid[-1]

  correct = total = 0
  for batch in batches:
    logits, matched = matched_logits(dict(batch))
    matched = np.asarray(matched)
    correct += int(np.sum((np.argmax(np.asarray(logits), -1) == batch["labels"]) & matched))
    total += int(np.sum(matched))
  return correct / max(total, 1)


@pytest.mark.slow
def test_stage1_recipe_learns_the_classes(tmp_path):
  """Regression: with the official class weight 2 (loss and matching cost) the tiny model's
  class probabilities stay near uniform, the matching follows the masks alone, near-duplicate
  queries swap the object's label and "no object" from step to step, and the queries matched to
  objects end up at chance (1/6) or below while the masks improve.
  The stage-1 recipe (class weight 5 in both) must classify most objects of unseen stills."""
  config = load_config("synthetic_pretrain")
  config.data.coco.json = synthetic_images.write_coco_instances(
      str(tmp_path / "train"), num_images=600, size=(96, 96), seed=0
  )
  config.train.lr_decay_steps = ()
  experiment = experiment_lib.build_experiment(config, mesh=_one_device_mesh())
  iterator = experiment.train_iterator()
  batch = next(iterator)
  trainer = experiment.trainer(train_step.abstract_batch(batch))
  state = experiment.initial_state(trainer)
  for _ in range(400):
    state, _ = trainer.train_step(state, batch)
    batch = next(iterator)

  held_out = load_config("synthetic_pretrain")
  held_out.data.coco.json = synthetic_images.write_coco_instances(
      str(tmp_path / "held_out"), num_images=64, size=(96, 96), seed=1
  )
  held_out.data.coco.crop_prob = 0.0
  held_out_iterator = experiment_lib.build_experiment(held_out).train_iterator()
  batches = [next(held_out_iterator) for _ in range(6)]
  accuracy = _matched_class_accuracy(
      config, trainer.model, {"params": state.params, **state.model_state}, batches
  )
  assert accuracy > 0.5, accuracy  # chance: 1/6


def test_the_command_line_defines_its_flags():
  """`python -m maskfreevis_jax.two_stage` (the README's main command) parses its flags."""
  names = ("config", "pretrain_config", "protocol", "workdir", "stage1", "stage1_only", "output")
  code = (
      "from absl import flags\n"
      "from maskfreevis_jax import two_stage\n"
      f"flags.FLAGS(['two_stage', '--workdir=/tmp/w', '--stage1=train', '--overlay_videos=2'])\n"
      f"print(sorted(n for n in {names!r} + ('overlay_videos',) if n in flags.FLAGS))"
  )
  proc = subprocess.run(
      [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split("\n")[-2] == str(sorted(names + ("overlay_videos",))), proc.stdout
