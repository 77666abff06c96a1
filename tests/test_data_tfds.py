"""TFDS builder: build from a local folder, read back with random access, same clips as JSON."""

import numpy as np
import pytest

from maskfreevis_jax import defaults
from maskfreevis_jax.data import clips
from maskfreevis_jax.data import eval_dataset
from maskfreevis_jax.data import iterators
from maskfreevis_jax.data import sources
from maskfreevis_jax.data import synthetic
from maskfreevis_jax.data import tfds_builders
from maskfreevis_jax.data import ytvis_json


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  src = str(tmp_path_factory.mktemp("syn"))
  out = str(tmp_path_factory.mktemp("tfds"))
  synthetic.generate(
      src,
      seed=2,
      num_train_videos=5,
      num_val_videos=2,
      frame_size=(48, 64),
      frames_per_video=(3, 5),
  )
  builder = tfds_builders.build_dataset(src, out, "synthetic")
  return src, out, builder


def test_tfds_build_matches_json(built):
  src, out, builder = built
  assert builder.info.splits["train"].num_examples == 5
  assert builder.info.splits["valid"].num_examples == 2
  assert builder.info.metadata["class_names"] == list(synthetic.SHAPE_CLASSES)
  for split in ("train", "valid"):
    js = sources.JsonVideoSource(ytvis_json.load_ytvis_json(f"{src}/{split}.json"))
    by_id = {v.id: i for i, v in enumerate(js.videos)}
    tf_src = tfds_builders.TfdsVideoSource("maskfreevis_vis/synthetic", split, data_dir=out)
    assert len(tf_src) == len(js)
    for i in range(len(tf_src)):
      v = tf_src.video(i)
      j = by_id[v.id]
      ref = js.video(j)
      assert (v.height, v.width, v.length) == (ref.height, ref.width, ref.length)
      assert [t.id for t in v.tracks] == [t.id for t in ref.tracks]
      assert [t.label for t in v.tracks] == [t.label for t in ref.tracks]
      for a, b in zip(v.tracks, ref.tracks):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.box_valid, b.box_valid)
        for t in range(v.length):
          np.testing.assert_array_equal(
              ytvis_json.decode_segmentation(a.segmentations[t], v.height, v.width),
              ytvis_json.decode_segmentation(b.segmentations[t], v.height, v.width),
          )
      frames = tf_src.read_frames(i, range(v.length))
      for a, b in zip(frames, js.read_frames(j, range(v.length))):
        np.testing.assert_array_equal(a, b)  # JPEG bytes are stored unchanged


def test_pipeline_reads_tfds_build(built):
  src, out, _ = built
  config = defaults.get_config()
  cfg = config.data
  cfg.source = "tfds"
  cfg.tfds.name = "maskfreevis_vis/synthetic"
  cfg.tfds.data_dir = out
  cfg.batch_size = 2
  cfg.with_masks = True
  cfg.pad_size = (64, 64)
  cfg.min_size_train = (48,)
  cfg.num_parallel_calls = 1
  batch = next(iterators.create_train_iterator(config, seed=0, process_index=0, process_count=1))
  assert batch["frames"].shape == (2, 3, 64, 64, 3)
  assert batch["masks"].shape == (2, 10, 3, 64, 64)
  assert batch["instance_valid"].any(axis=1).all()
  # The same clip drawn from the JSON folder is identical.
  js = sources.JsonVideoSource(ytvis_json.load_ytvis_json(f"{src}/train.json"))
  tf_src = tfds_builders.TfdsVideoSource("maskfreevis_vis/synthetic", "train", data_dir=out)
  vid = tf_src.video(0).id
  j = [v.id for v in js.videos].index(vid)
  a = clips.video_training_clip(tf_src, 0, np.random.default_rng(4), config)
  b = clips.video_training_clip(js, j, np.random.default_rng(4), config)
  for field in ("frames", "boxes", "box_valid", "labels", "track_ids", "masks", "frame_index"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
  ev = eval_dataset.create_eval_dataset(config, process_index=0, process_count=1)
  ex = next(iter(ev))
  assert ex["frames"].shape[0] == len(ex["file_names"]) and "masks" in ex


def test_missing_tfds_dataset_is_named(tmp_path):
  with pytest.raises(ValueError, match="maskfreevis_vis/synthetic"):
    tfds_builders.TfdsVideoSource("maskfreevis_vis/synthetic", "train", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="none of the annotation files"):
    tfds_builders.build_dataset(str(tmp_path), str(tmp_path / "out"), "ytvis_2019")
