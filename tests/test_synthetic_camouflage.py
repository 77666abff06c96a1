"""Format 4 of the synthetic videos: a share of objects camouflaged in their own background."""

import hashlib
import json
import os
import pathlib

import chex
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from conftest import load_script
from maskfreevis_jax import defaults
from maskfreevis_jax import losses
from maskfreevis_jax.data import sources
from maskfreevis_jax.data import synthetic
from maskfreevis_jax.data import ytvis_json


def _load_bench():
  return load_script("bench/tk_precision.py", "tk_precision")


def _generate(out_dir, camouflage, num_videos=8):
  return synthetic.generate(
      str(out_dir),
      seed=0,
      num_train_videos=num_videos,
      num_val_videos=0,
      frame_size=(64, 64),
      frames_per_video=(3, 3),
      camouflage=camouflage,
  )


def _clips(out_dir, max_instances=4):
  """Every video's 3 frames, masks and boxes, read from disk as the bench needs them."""
  data = json.load(open(os.path.join(out_dir, "train.json")))
  for video in data["videos"]:
    frames = np.stack(
        [
            np.asarray(Image.open(os.path.join(out_dir, "train", "JPEGImages", f)))
            for f in video["file_names"]
        ]
    )
    anns = [a for a in data["annotations"] if a["video_id"] == video["id"]][:max_instances]
    masks = np.zeros((max_instances, 3, 64, 64), np.uint8)
    boxes = np.zeros((max_instances, 3, 4), np.float32)
    box_valid = np.zeros((max_instances, 3), bool)
    for n, ann in enumerate(anns):
      for t in range(3):
        if ann["bboxes"][t] is not None:
          x, y, w, h = ann["bboxes"][t]
          boxes[n, t] = (x, y, x + w, y + h)
          box_valid[n, t] = True
          masks[n, t] = ytvis_json.decode_segmentation(ann["segmentations"][t], 64, 64)
    yield dict(
        frames=frames[None],
        masks=masks[None],
        boxes=boxes[None],
        box_valid=box_valid[None],
        instance_valid=(np.arange(max_instances) < len(anns))[None],
    )


@pytest.mark.parametrize("camouflage", [0.0, 0.5], ids=["format3", "format4"])
def test_generation_is_a_pure_function_of_the_arguments(tmp_path, camouflage):
  first = _generate(tmp_path / "a", camouflage, num_videos=2)
  second = _generate(tmp_path / "b", camouflage, num_videos=2)
  assert first["params"] == second["params"]
  expected_version = 4 if camouflage else synthetic.FORMAT_VERSION
  assert first["params"]["format_version"] == expected_version
  assert ("camouflage" in first["params"]) == bool(camouflage)
  for name in ("train.json", "train/JPEGImages/train_00001/00002.jpg"):
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


# sha256 of train.json of `generate(d, 0, 4, 0, frame_size=(64, 64), frames_per_video=(3, 3))`
# as written by format 3's generator before the camouflage option existed (commit fb21bd3).
FORMAT3_TRAIN_JSON_SHA256 = "843b7823251b2df2b5ddbabf82b04365cf37cd0c9becb02f2269546f73e05af2"


def test_camouflage_zero_writes_format_3_unchanged(tmp_path):
  """The default data (format 3) is what the generator wrote before format 4 existed."""
  _generate(tmp_path, 0.0, num_videos=4)
  digest = hashlib.sha256((tmp_path / "train.json").read_bytes()).hexdigest()
  assert digest == FORMAT3_TRAIN_JSON_SHA256


def test_camouflage_makes_colour_ambiguous_and_motion_not(tmp_path):
  """Measured by bench/tk_precision.py on the ground truth: camouflaged objects lower the
  spatial pairs' precision inside the boxes, and TK's pairs stay more precise there."""
  bench = _load_bench()
  config = losses.MaskFreeLossConfig(box_window_fractions=())
  zone = bench.ZONES.index("box_not_mask")
  precision = {}
  for camouflage in (0.0, 1.0):
    out_dir = tmp_path / f"c{camouflage}"
    _generate(out_dir, camouflage)
    stats = bench.pair_statistics(list(_clips(out_dir)), config)
    precision[camouflage] = {k: v.precision[zone] for k, v in stats.items()}
    chex.assert_tree_all_finite(jnp.asarray(list(precision[camouflage].values())))
  assert precision[0.0]["spatial"] > 0.9, precision
  assert precision[1.0]["spatial"] < precision[0.0]["spatial"] - 0.1, precision
  assert precision[1.0]["temporal"] > precision[1.0]["spatial"] + 0.05, precision


def test_camouflage_must_be_a_share(tmp_path):
  with pytest.raises(ValueError, match="camouflage"):
    _generate(tmp_path, 1.5)


@pytest.mark.parametrize(
    "camouflage, format_version",
    [(0.0, synthetic.FORMAT_VERSION), (0.5, synthetic.CAMOUFLAGE_FORMAT_VERSION)],
    ids=["format-3", "format-4"],
)
def test_config_camouflage_generates_its_own_format(tmp_path, camouflage, format_version):
  config = defaults.get_config("tiny", num_classes=len(synthetic.SHAPE_CLASSES))
  s = config.data.synthetic
  s.cache_dir, s.num_train_videos, s.num_val_videos = str(tmp_path), 2, 1
  s.frame_size, s.frames_per_video, s.camouflage = (32, 32), (2, 2), camouflage
  folder = sources.ensure_synthetic(config)
  params = json.loads((pathlib.Path(folder) / synthetic.MARKER_FILE).read_text())["params"]
  assert params["format_version"] == format_version, params
  assert params.get("camouflage", 0.0) == camouflage, params
  assert ("camouflage" in pathlib.Path(folder).name) == (camouflage > 0), folder
