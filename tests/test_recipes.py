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

from maskfreevis_jax import defaults
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
  config = ml_collections.ConfigDict()
  config.init_from = ""
  config.model = ml_collections.ConfigDict({"name": "stand_in"})
  config.criterion = defaults.criterion_defaults()
  config.criterion.num_classes = NUM_CLASSES
  config.criterion.mask_free.lab_reverse_channels = True
  config.criterion.mask_free.box_window_fractions = ()  # one branch: a faster compile
  config.data = defaults.data_defaults()
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
  config.train = defaults.train_defaults()
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
  config.sharding = ml_collections.ConfigDict({"model_axis_size": 1, "min_shard_size": 2**18})
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


def test_coco_steps_get_mask_losses_and_video_steps_box_losses(joint_config, tmp_path):
  """train() routes each batch to its source's step: the mask terms can only come from COCO
  steps (video batches hold no masks) and the box terms only from video steps."""
  config = joint_config
  draws = iterators.create_train_iterator(
      config, seed=config.train.seed, process_index=0, process_count=1
  )
  sources = [draws.source_of_step(s) for s in range(config.train.steps)]
  assert set(sources) == {"video", "coco"}, sources  # the seed gives both within the run
  result = train_lib.train(config, tmp_path, model=StandInModel(), mesh=_one_device())
  metrics = result.last_metrics  # means over the 6 steps of the one logging interval
  assert metrics["steps_coco"] == pytest.approx(sources.count("coco") / len(sources))
  assert metrics["steps_video"] == pytest.approx(sources.count("video") / len(sources))
  for term in (
      "loss_mask",
      "loss_dice",
      "loss_mask_proj",
      "loss_bound",
      "loss_bound_neighbor",
      "loss_ce",
  ):
    assert term in metrics and np.isfinite(metrics[term]), (term, metrics)
  assert metrics["loss_mask"] > 0 and metrics["loss_mask_proj"] > 0
  trainer = train_lib.build_trainer(
      config,
      {s: train_lib.abstract_batch(b) for s, b in draws.batch_specs().items()},
      model=StandInModel(),
      mesh=_one_device(),
  )
  assert set(trainer.train_steps) == {"video", "coco"}


@pytest.mark.slow
def test_joint_run_resumed_mid_run_ends_as_the_uninterrupted_one(joint_config, tmp_path):
  """3 steps, stop, 3 more from the checkpoint == 6 steps straight: the checkpoint holds both
  sources' positions and the source-draw position."""
  config = joint_config
  straight = train_lib.train(
      config, tmp_path / "straight", model=StandInModel(), mesh=_one_device()
  )
  first = ml_collections.ConfigDict(config.to_dict())
  first.train.steps = 3
  train_lib.train(first, tmp_path / "resumed", model=StandInModel(), mesh=_one_device())
  resumed = train_lib.train(config, tmp_path / "resumed", model=StandInModel(), mesh=_one_device())
  assert resumed.step == straight.step == 6
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6),
      jax.device_get(resumed.state.params),
      jax.device_get(straight.state.params),
  )
