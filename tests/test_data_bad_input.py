"""Bad input: each case gives a clear error naming the file/field, or is handled and logged."""

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from maskfreevis_jax import defaults
from maskfreevis_jax.data import eval_dataset
from maskfreevis_jax.data import iterators
from maskfreevis_jax.data import sources
from maskfreevis_jax.data import testing
from maskfreevis_jax.data import ytvis_json


def _config(json_path, image_root, **overrides):
  config = defaults.get_config()
  c = config.data
  c.name = "ytvis"
  c.train_json, c.train_image_root = json_path, image_root
  c.val_json, c.val_image_root = json_path, image_root
  c.min_size_train = (32,)
  c.pad_size = (64, 96)
  c.batch_size = 2
  c.num_parallel_calls = 1
  for k, v in overrides.items():
    setattr(c, k, v)
  return config


def _folder(tmp_path, num_videos=2, **kwargs):
  videos = [testing.moving_rect_video(v, 10 * v, num_frames=4) for v in range(1, num_videos + 1)]
  return testing.write_ytvis_folder(str(tmp_path), videos, **kwargs)


def _edit_json(path, fn):
  with open(path) as f:
    data = json.load(f)
  fn(data)
  with open(path, "w") as f:
    json.dump(data, f)


def test_malformed_json_names_file_and_position(tmp_path):
  path = tmp_path / "train.json"
  path.write_text('{"videos": [\n  {"id": 1,, "file_names": []}\n]}')
  with pytest.raises(ValueError, match=r"train\.json: malformed JSON at line 2 column 12"):
    ytvis_json.load_ytvis_json(str(path))
  with pytest.raises(FileNotFoundError, match="nothere.json"):
    ytvis_json.load_ytvis_json(str(tmp_path / "nothere.json"))


def test_missing_field_names_field_and_video(tmp_path):
  json_path, _ = _folder(tmp_path)
  _edit_json(json_path, lambda d: d["videos"][1].pop("height"))
  with pytest.raises(ValueError, match=r"train\.json: video id 2: missing field 'height'"):
    ytvis_json.load_ytvis_json(json_path)
  _edit_json(json_path, lambda d: d.pop("videos"))
  with pytest.raises(ValueError, match=r"top level: missing field 'videos'"):
    ytvis_json.load_ytvis_json(json_path)


def test_unknown_category_and_bad_bbox(tmp_path):
  json_path, _ = _folder(tmp_path)
  _edit_json(json_path, lambda d: d["annotations"][0].update(category_id=99))
  with pytest.raises(ValueError, match=r"annotation id 10: category_id 99"):
    ytvis_json.load_ytvis_json(json_path)
  _edit_json(
      json_path,
      lambda d: (
          d["annotations"][0].update(category_id=1),
          d["annotations"][0]["bboxes"].__setitem__(2, [1, 2, 3]),
      ),
  )
  with pytest.raises(ValueError, match=r"annotation id 10, frame 2: bbox must be"):
    ytvis_json.load_ytvis_json(json_path)


def test_length_disagreement_names_video(tmp_path):
  json_path, _ = _folder(tmp_path)
  _edit_json(json_path, lambda d: d["annotations"][2]["bboxes"].pop())
  with pytest.raises(
      ValueError,
      match=r"video id 2, annotation id 20: 'bboxes' has 3 entries " r"but the video has 4 frames",
  ):
    ytvis_json.load_ytvis_json(json_path)
  json_path, _ = _folder(tmp_path / "b")
  _edit_json(json_path, lambda d: d["videos"][0]["file_names"].pop())
  with pytest.raises(ValueError, match=r"video id 1: 'length' is 4 but 'file_names' has 3"):
    ytvis_json.load_ytvis_json(json_path)
  json_path, _ = _folder(tmp_path / "c")
  _edit_json(json_path, lambda d: d["annotations"][0]["segmentations"].append(None))
  with pytest.raises(ValueError, match=r"video id 1, annotation id 10: 'segmentations' has 5"):
    ytvis_json.load_ytvis_json(json_path)


def test_boxes_outside_or_empty_are_clipped_or_dropped_and_logged(tmp_path, caplog):
  json_path, image_root = _folder(tmp_path)

  def edit(d):
    boxes = d["annotations"][0]["bboxes"]
    boxes[0] = [-5.0, -3.0, 20.0, 10.0]  # partly outside: clipped
    boxes[1] = [10.0, 10.0, 0.0, 5.0]  # zero width: dropped
    boxes[2] = [500.0, 10.0, 20.0, 5.0]  # fully outside: dropped

  _edit_json(json_path, edit)
  with caplog.at_level(logging.WARNING):
    ds = ytvis_json.load_ytvis_json(json_path, image_root)
  assert "clipped 1 boxes" in caplog.text and "dropped 2 empty" in caplog.text
  assert ds.num_clipped_boxes == 1 and ds.num_dropped_boxes == 2
  track = ds.videos[0].tracks[0]
  np.testing.assert_array_equal(track.boxes[0], [0, 0, 15, 7])
  assert track.box_valid.tolist() == [True, False, False, True]
  # The pipeline only ever emits the surviving boxes.
  sources.clear_json_cache()
  batch = next(
      iterators.create_train_iterator(
          _config(json_path, image_root), seed=0, process_index=0, process_count=1
      )
  )
  bx = batch["boxes"][batch["box_valid"]]
  assert (bx[:, 2] > bx[:, 0]).all() and (bx[:, 0] >= 0).all()


def test_video_with_only_empty_annotations_is_skipped(tmp_path, caplog):
  json_path, image_root = _folder(tmp_path, num_videos=3)

  def edit(d):
    for ann in d["annotations"]:
      if ann["video_id"] == 2:
        ann["bboxes"] = [None] * 4
        ann["segmentations"] = [None] * 4

  _edit_json(json_path, edit)
  sources.clear_json_cache()
  with caplog.at_level(logging.WARNING):
    it = iterators.create_train_iterator(
        _config(json_path, image_root, batch_size=4), seed=0, process_index=0, process_count=1
    )
  assert "skipped 1 videos whose every annotation is empty (video ids [2])" in caplog.text
  ids = {int(v) for _ in range(2) for v in next(it)["video_id"]}
  assert ids == {1, 3}
  # Nothing usable at all: a clear error.
  _edit_json(json_path, lambda d: [a.update(bboxes=[None] * 4) for a in d["annotations"]])
  sources.clear_json_cache()
  with pytest.raises(ValueError, match="no video has a non-empty box"):
    iterators.create_train_iterator(
        _config(json_path, image_root), seed=0, process_index=0, process_count=1
    )


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_missing_or_corrupt_jpeg(tmp_path, damage, caplog):
  json_path, image_root = _folder(tmp_path, num_videos=1)
  bad = os.path.join(image_root, "v0001", "00002.jpg")
  if damage == "missing":
    os.remove(bad)
  else:
    with open(bad, "r+b") as f:  # keep the header, destroy the rest
      f.seek(200)
      f.write(b"\x00" * 64)
      f.truncate(300)
  sources.clear_json_cache()
  cfg = _config(json_path, image_root, frame_range=10, num_frames=4, batch_size=1)
  it = iterators.create_train_iterator(cfg, seed=0, process_index=0, process_count=1)
  with pytest.raises(ValueError, match=r"cannot read frame .*v0001/00002\.jpg"):
    next(it)
  # Eval reads every frame: same clear error.
  with pytest.raises(ValueError, match=r"v0001/00002\.jpg"):
    next(iter(eval_dataset.create_eval_dataset(cfg, process_index=0, process_count=1)))


def test_corrupt_frames_can_be_skipped_with_a_warning(tmp_path, caplog):
  json_path, image_root = _folder(tmp_path, num_videos=2)
  for t in (1, 2, 3):  # any clip of video 1 holds one of these (the others differ from ref)
    os.remove(os.path.join(image_root, "v0001", f"0000{t}.jpg"))
  sources.clear_json_cache()
  cfg = _config(
      json_path, image_root, frame_range=10, num_frames=2, batch_size=2, skip_corrupt_frames=True
  )
  it = iterators.create_train_iterator(cfg, seed=0, process_index=0, process_count=1)
  with caplog.at_level(logging.WARNING):
    batch = next(it)
  assert (batch["video_id"] == 2).all()  # video 1 replaced by the next video
  assert "skipping video id 1" in caplog.text and "v0001/0000" in caplog.text
  assert it.stats["corrupt_frames_skipped"] >= 1


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_grayscale_and_rgba_frames_are_converted(tmp_path, mode):
  h, w, length = 32, 48, 3
  rects = [[[8, 4, 16, 12]] * length]
  rgb = testing.rect_frames(h, w, length, rects, colors=[(200, 200, 200)])
  frames = (
      rgb[..., 0]
      if mode == "L"
      else np.concatenate([rgb, np.full((length, h, w, 1), 128, np.uint8)], axis=-1)
  )
  video = {
      "id": 1,
      "frames": frames,
      "tracks": [{"id": 1, "category_id": 1, "bboxes": [[8.0, 4.0, 16.0, 12.0]] * length}],
  }
  json_path, image_root = testing.write_ytvis_folder(str(tmp_path), [video], image_format="png")
  assert Image.open(os.path.join(image_root, "v0001", "00000.png")).mode == mode
  sources.clear_json_cache()
  cfg = _config(json_path, image_root, batch_size=1, min_size_train=(32,), random_flip=False)
  batch = next(iterators.create_train_iterator(cfg, seed=0, process_index=0, process_count=1))
  frame = batch["frames"][0, 0]
  assert frame.shape == (64, 96, 3)
  np.testing.assert_array_equal(frame[:h, :w], rgb[0])


def test_frame_size_disagreeing_with_json_names_file(tmp_path):
  json_path, image_root = _folder(tmp_path, num_videos=1)
  _edit_json(json_path, lambda d: d["videos"][0].update(height=70))
  sources.clear_json_cache()
  cfg = _config(json_path, image_root, batch_size=1)
  with pytest.raises(ValueError, match=r"v0001/0000\d\.jpg is 64x96 but video id 1 declares 70x96"):
    next(iterators.create_train_iterator(cfg, seed=0, process_index=0, process_count=1))


def test_bad_config_values_are_named():
  cfg = defaults.get_config()
  cfg.data.pad_size = (100, 128)
  with pytest.raises(ValueError, match="data.pad_size"):
    iterators.create_train_iterator(cfg, seed=0, process_index=0, process_count=1)
  cfg = defaults.get_config()
  cfg.data.name = "kinetics"
  with pytest.raises(ValueError, match="kinetics"):
    iterators.create_train_iterator(cfg, seed=0, process_index=0, process_count=1)
