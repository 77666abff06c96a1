"""Joint training as the release does it: COCO pseudo clips with masks and video clips with boxes
in one run, one compiled step per source on one state, resumable in the middle.

The model is a small stand-in (the real ones are tested in their own files); the data pipeline,
criterion, trainer and checkpoints are the real ones.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clu import metric_writers

from maskfreevis_jax import criterion
from maskfreevis_jax import defaults
from maskfreevis_jax import experiment as experiment_lib
from maskfreevis_jax import sharding as sharding_lib
from maskfreevis_jax import train as train_lib
from maskfreevis_jax.data import iterators
from maskfreevis_jax.data import testing
from maskfreevis_jax.data import transforms

NUM_CLASSES, NUM_QUERIES = 3, 6


class StandInModel(nn.Module):
  """One strided convolution, learnable queries, 2 prediction layers; any clip length."""

  width: int = 8

  @nn.compact
  def __call__(self, frames, image_valid=None, train=False):
    b, t, h, w, _ = frames.shape
    x = (frames.astype(jnp.float32) - 128.0) / 64.0
    x = nn.Conv(self.width, (4, 4), strides=(4, 4), name="backbone_conv")(x.reshape(b * t, h, w, 3))
    features = nn.relu(x).reshape(b, t, h // 4, w // 4, self.width)
    queries = self.param("query_feat", nn.initializers.normal(1.0), (NUM_QUERIES, self.width))
    logits, masks = [], []
    for layer in range(2):
      queries = queries + nn.Dense(self.width, name=f"layer_{layer}")(queries)
      logits.append(
          jnp.broadcast_to(
              nn.Dense(NUM_CLASSES + 1, name=f"class_{layer}")(queries),
              (b, NUM_QUERIES, NUM_CLASSES + 1),
          )
      )
      masks.append(jnp.einsum("qc,bthwc->bqthw", queries, features))
    return {"pred_logits": jnp.stack(logits), "pred_masks": jnp.stack(masks)}


@pytest.fixture(scope="module")
def joint_config(tmp_path_factory):
  """A joint config as the release's main recipe, at toy sizes: 3-frame video clips (boxes) and
  4-frame COCO pseudo clips (masks), categories by name."""
  root = tmp_path_factory.mktemp("joint")
  videos = [
      testing.moving_rect_video(v, 100 * v, num_frames=8, height=48, width=64) for v in (1, 2, 3)
  ]
  video_json, video_root = testing.write_ytvis_folder(
      str(root / "videos"), videos, categories=("car", "frisbee", "person")
  )
  coco_json, coco_root = testing.write_coco_folder(
      str(root / "coco"),
      {3: "car", 34: "frisbee", 70: "toaster"},
      [
          [(3, (4, 6, 20, 14)), (34, (30, 20, 16, 18)), (70, (40, 2, 10, 8))],
          [(34, (8, 8, 24, 20)), (3, (36, 24, 20, 16))],
      ],
      size=(48, 64),
  )
  config = defaults.get_config()
  config.init_from = "none"
  config.model = ml_collections.ConfigDict({"name": "stand_in", "num_classes": NUM_CLASSES})
  config.criterion.num_classes = NUM_CLASSES
  config.criterion.mask_free.lab_reverse_channels = True
  config.criterion.mask_free.box_window_fractions = ()  # one branch: a faster compile
  config.data.update(
      name="ytvis+coco_pseudo",
      train_json=video_json,
      train_image_root=video_root,
      pad_size=(32, 32),
      min_size_train=(32,),
      max_instances=4,
      batch_size=2,
      num_parallel_calls=1,
      prefetch=1,
      shuffle_frames=True,
  )
  config.data.coco.update(
      json=coco_json,
      image_root=coco_root,
      num_frames=4,
      pad_size=(32, 32),
      supervision="mask",
      min_size_train=(32,),
      max_size_train=64,
      crop_prob=0.5,
      crop_pre_sizes=(48,),
      crop_size=(24, 40),
      rotation_degrees=15.0,
  )
  config.train.update(
      dict(
          steps=6,
          batch_size=2,
          lr=1e-3,
          seed=3,
          checkpoint_every=3,
          keep=3,
          log_every=6,
          image_every=0,
          max_consecutive_nonfinite=3,
          backbone_regex=r"(^|/)backbone_",
          async_checkpoint=False,
      )
  )
  return config


def test_frame_shuffle_as_the_release():
  """SAMPLING_FRAME_SHUFFLE: the release sorts the sampled frames, then shuffles them."""
  unsorted = 0
  for seed in range(300):
    plain = transforms.sample_clip_frame_indices(np.random.default_rng(seed), 30, 5, 5)
    shuffled = transforms.sample_clip_frame_indices(
        np.random.default_rng(seed), 30, 5, 5, shuffle=True
    )
    np.testing.assert_array_equal(np.sort(shuffled), plain)  # the same frames, reordered
    unsorted += bool((np.diff(shuffled) < 0).any())
  assert unsorted > 250  # a random order: sorted by chance about 1 time in 10 or less


def _one_device():
  return sharding_lib.create_mesh(1, jax.devices()[:1])


def _recording_writers(monkeypatch) -> dict[int, dict[str, float]]:
  """The scalars train() writes, by step (TensorBoard's per-step values)."""
  written = {}
  create = metric_writers.create_default_writer

  def create_recording(*args, **kwargs):
    writer = create(*args, **kwargs)
    write_scalars = writer.write_scalars

    def record(step, scalars):
      written[int(step)] = dict(scalars)
      write_scalars(step, scalars)

    writer.write_scalars = record
    return writer

  monkeypatch.setattr(metric_writers, "create_default_writer", create_recording)
  return written


def _expected_terms(names: tuple[str, ...]) -> set[str]:
  """The stand-in's 2 predictions: the final one's terms and the auxiliary one's ('_0')."""
  return {f"{name}{suffix}" for name in names for suffix in ("", "_0")}


def test_coco_steps_get_mask_losses_and_video_steps_box_losses(joint_config, tmp_path, monkeypatch):
  """train() routes each batch to its source's step: every COCO step (supervision 'mask') logs
  exactly the mask terms and every video step exactly the box terms, of both predictions."""
  config = ml_collections.ConfigDict(joint_config.to_dict())
  config.train.log_every = 1  # each logged value is one step's
  draws = iterators.create_train_iterator(
      config, seed=config.train.seed, process_index=0, process_count=1
  )
  sources = [draws.source_of_step(s) for s in range(config.train.steps)]
  assert set(sources) == {"video", "coco"}, sources  # the seed gives both within the run
  written = _recording_writers(monkeypatch)
  experiment = experiment_lib.build_experiment(config, model=StandInModel(), mesh=_one_device())
  result = train_lib.train(experiment, tmp_path)
  assert result.step == config.train.steps and sorted(written) == list(range(1, 7))
  expected = {
      "video": _expected_terms(criterion.BOX_TERMS),
      "coco": _expected_terms(criterion.MASK_TERMS),
  }
  for step, source in enumerate(sources, start=1):
    scalars = written[step]
    assert {k for k in scalars if k.startswith("steps_")} == {f"steps_{source}"}, (step, scalars)
    assert scalars[f"steps_{source}"] == 1.0
    terms = {k for k in scalars if k.startswith("loss_")}
    assert terms == expected[source], (step, source, sorted(terms))
    assert all(np.isfinite(scalars[k]) and scalars[k] >= 0 for k in terms), (step, scalars)
    # The source's own supervision is there: projection of the boxes, BCE of the masks.
    assert scalars["loss_mask_proj" if source == "video" else "loss_mask"] > 0, (step, scalars)


@pytest.mark.slow
def test_joint_run_resumed_mid_run_ends_as_the_uninterrupted_one(joint_config, tmp_path):
  """3 steps, stop, 3 more from the checkpoint == 6 steps straight: the checkpoint holds both
  sources' positions and the source-draw position."""
  config = joint_config

  def run(run_config, workdir):
    experiment = experiment_lib.build_experiment(
        run_config, model=StandInModel(), mesh=_one_device()
    )
    return train_lib.train(experiment, workdir)

  straight = run(config, tmp_path / "straight")
  first = ml_collections.ConfigDict(config.to_dict())
  first.train.steps = 3
  run(first, tmp_path / "resumed")
  resumed = run(config, tmp_path / "resumed")
  assert resumed.step == straight.step == 6
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6),
      jax.device_get(resumed.state.params),
      jax.device_get(straight.state.params),
  )
