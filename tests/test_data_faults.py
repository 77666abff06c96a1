"""Data faults during training: frames that go bad after the run started.

Each test builds a tiny YouTube-VIS folder (24 videos of 2 frames; a clip of 2 frames reads both),
draws the first batch, then damages the videos that later clips read (clip 16 onwards: the
iterator makes at most ~10 clips ahead with ``num_parallel_calls=1, prefetch=1``).
"""

import json
import logging
import os
import re
import shutil

import numpy as np
import pytest

from maskfreevis_jax import defaults
from maskfreevis_jax.data import iterators
from maskfreevis_jax.data import sources
from maskfreevis_jax.data import testing
from maskfreevis_jax.data.transforms import FrameReadError

NUM_VIDEOS = 24  # one epoch = 12 batches of 2 clips
DAMAGES = ("truncated_jpeg", "deleted_frame", "folder_replaced_by_file")


@pytest.fixture(name="folder")
def _folder(tmp_path):
  videos = [
      testing.moving_rect_video(v, 10 * v, num_frames=2, height=32, width=48, num_tracks=1)
      for v in range(1, NUM_VIDEOS + 1)
  ]
  sources.clear_json_cache()
  yield testing.write_ytvis_folder(str(tmp_path), videos, with_masks=False)
  sources.clear_json_cache()


def _config(folder, **overrides):
  config = defaults.get_config()
  c = config.data
  c.name = "ytvis"
  c.train_json, c.train_image_root = folder
  c.min_size_train = (32,)
  c.pad_size = (32, 64)
  c.num_frames = 2
  c.batch_size = 2
  c.num_parallel_calls = 1
  c.prefetch = 1
  for k, v in overrides.items():
    setattr(c, k, v)
  return config


def _iterator(config):
  return iterators.create_train_iterator(config, seed=0, process_index=0, process_count=1)


def _damage(it, image_root, clip, how):
  """Damages the video clip ``clip`` reads; returns (video id, the file a read error names)."""
  video = it.source.video(it.video_index(clip))
  folder = os.path.join(image_root, f"v{video.id:04d}")
  if how == "truncated_jpeg":
    path = os.path.join(folder, "00000.jpg")
    with open(path, "rb") as f:
      data = f.read()
    with open(path, "wb") as f:
      f.write(data[: len(data) // 2])
  elif how == "deleted_frame":
    path = os.path.join(folder, "00001.jpg")
    os.remove(path)
  else:  # reading fails as root too (a chmod 000 folder would not stop root)
    shutil.rmtree(folder)
    with open(folder, "w") as f:
      f.write("not a folder")
    path = os.path.join(folder, "00000.jpg")
  return video.id, path


def _assert_same_batches(expected, got):
  assert len(expected) == len(got)
  for step, (x, y) in enumerate(zip(expected, got)):
    assert sorted(x) == sorted(y), step
    for key in x:
      assert x[key].dtype == y[key].dtype and x[key].shape == y[key].shape, (step, key)
      assert x[key].tobytes() == y[key].tobytes(), (step, key)


@pytest.mark.parametrize("how", DAMAGES, ids=DAMAGES)
def test_fault_mid_run_is_skipped_logged_and_counted(folder, how, caplog):
  it = _iterator(_config(folder, skip_corrupt_frames=True))
  next(it)
  video_id, path = _damage(it, folder[1], 16, how)
  with caplog.at_level(logging.WARNING):
    batches = [next(it) for _ in range(11)]  # the rest of the epoch: batches 1..11
  ids = np.concatenate([b["video_id"] for b in batches])
  assert video_id not in ids and len(ids) == 22
  lines = [r.getMessage() for r in caplog.records if "skipping video id" in r.getMessage()]
  # One line per skip (clips made ahead, in the next epoch, may read the video again).
  head = f"skipping video id {video_id} (training clip 16): cannot read frame {path}: "
  assert sum(line.startswith(head) for line in lines) == 1
  assert all(f"video id {video_id} " in line and "\n" not in line for line in lines)
  assert it.stats["corrupt_frames_skipped"] == len(lines) >= 1


@pytest.mark.parametrize("how", DAMAGES, ids=DAMAGES)
def test_fault_mid_run_without_skipping_is_a_one_line_error(folder, how):
  it = _iterator(_config(folder, skip_corrupt_frames=False))
  next(it)
  _, path = _damage(it, folder[1], 16, how)
  for _ in range(7):  # batches 1..7 hold clips 2..15
    next(it)
  with pytest.raises(FrameReadError, match=rf"^cannot read frame {re.escape(path)}: ") as err:
    next(it)
  assert "\n" not in str(err.value)


@pytest.mark.parametrize("resume_at", [3, 9], ids=["before-the-skips", "between-the-skips"])
def test_resume_across_skips_gives_the_uninterrupted_batches(folder, resume_at):
  config = _config(folder, skip_corrupt_frames=True)
  uninterrupted = _iterator(config)
  expected = [next(uninterrupted)]
  for clip in (16, 20):  # batches 8 and 10
    _damage(uninterrupted, folder[1], clip, "deleted_frame")
  expected += [next(uninterrupted) for _ in range(11)]
  first = _iterator(config)
  got = [next(first) for _ in range(resume_at)]
  state = json.loads(json.dumps(first.get_state()))  # as the checkpoint stores it
  resumed = _iterator(config)
  resumed.set_state(state)
  got += [next(resumed) for _ in range(12 - resume_at)]
  _assert_same_batches(expected, got)
  assert uninterrupted.stats["corrupt_frames_skipped"] >= 2


STOP_CASES = {  # id: (damaged clips, resume at batch, num_parallel_calls, batch that stops)
    "uninterrupted": ((16, 21), None, 1, 10),
    "parallel": ((16, 21), None, 4, 10),
    "resumed-after-a-skip": ((16, 21), 9, 1, 10),
    "skips-further-apart-than-the-window": ((16, 22), None, 1, None),
}


@pytest.mark.parametrize(
    "clips, resume_at, parallel, stop_batch", STOP_CASES.values(), ids=STOP_CASES.keys()
)
def test_too_many_replaced_clips_stop_the_run(folder, clips, resume_at, parallel, stop_batch):
  # Window of 6 clips, limit 0.2 * 6: two replaced clips among 6 consecutive ones stop the run.
  config = _config(
      folder,
      skip_corrupt_frames=True,
      skip_corrupt_window=6,
      skip_corrupt_max_fraction=0.2,
      num_parallel_calls=parallel,
  )
  it = _iterator(config)
  next(it)
  paths = [_damage(it, folder[1], clip, "deleted_frame")[1] for clip in clips]
  if resume_at is not None:
    for _ in range(1, resume_at):
      next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert [e for e, _ in state["skipped_clips"]] == [16]
    it = _iterator(config)
    it.set_state(state)
  for _ in range(resume_at or 1, stop_batch or 12):
    next(it)
  if stop_batch is None:
    assert it.stats["corrupt_frames_skipped"] >= 2
    return
  with pytest.raises(iterators.CorruptDataError) as err:
    next(it)
  message = str(err.value)
  assert "\n" not in message
  assert message == (
      "training data: 2 of the last 6 clips (data.skip_corrupt_window) had to be replaced, "
      "more than data.skip_corrupt_max_fraction=0.2; the last failure: cannot read frame "
      f"{paths[1]}: file not found"
  )
