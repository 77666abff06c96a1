"""The data package: each module imports alone without TensorFlow; the source registry
(`data.sources`). The import rules of the whole package: tests/test_architecture.py."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest

from maskfreevis_jax import defaults
from maskfreevis_jax.data import clips
from maskfreevis_jax.data import iterators
from maskfreevis_jax.data import sources

DATA_DIR = pathlib.Path(sources.__file__).resolve().parent
DATA_MODULES = sorted(p.stem for p in DATA_DIR.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("module", DATA_MODULES, ids=DATA_MODULES)
def test_each_data_module_imports_alone_without_tensorflow(module):
  """A fresh interpreter imports the module first (a cycle would fail on its own), and no
  module of the package pulls TensorFlow in at import (configs import `data.synthetic`)."""
  code = f"import sys, maskfreevis_jax.data.{module}; print('tensorflow' in sys.modules)"
  proc = subprocess.run(
      [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
  )
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == "False", f"importing data.{module} imports tensorflow"


def _config(name: str):
  config = defaults.get_config()
  config.data.name = name
  return config


@pytest.mark.parametrize(
    "name, names",
    [
        ("synthetic", ("synthetic",)),
        ("ytvis", ("ytvis",)),
        ("coco_pseudo", ("coco_pseudo",)),
        ("ytvis+coco_pseudo", ("ytvis", "coco_pseudo")),
        ("synthetic+coco_pseudo", ("synthetic", "coco_pseudo")),
    ],
    ids=["synthetic", "ytvis", "coco_pseudo", "ytvis_joint", "synthetic_joint"],
)
def test_registered_source_names(name, names):
  config = _config(name)
  assert sources.source_names(config) == names
  assert sources.is_joint(config) == (len(names) == 2)
  kinds = {sources.REGISTRY[n].kind for n in names}
  assert set(sources.source_configs(config)) == kinds


@pytest.mark.parametrize(
    "name",
    ["kinetics", "coco_pseudo+ytvis", "ytvis+synthetic", "ytvis+coco_pseudo+coco_pseudo", ""],
    ids=["unknown", "coco_first", "two_videos", "three_sources", "empty"],
)
def test_unregistered_source_name_is_a_clear_error(name):
  config = _config(name)
  for call in (sources.source_names, sources.is_joint, sources.open_video_source):
    with pytest.raises(ValueError, match=r"config\.data\.name=") as e:
      call(config)
    assert repr(name) in str(e.value)
    assert all(registered in str(e.value) for registered in sources.REGISTRY)
  with pytest.raises(ValueError, match=r"config\.data\.name="):
    iterators.create_train_iterator(config, seed=0, process_index=0, process_count=1)


def test_coco_only_config_has_no_video_source():
  with pytest.raises(ValueError, match=r"'coco_pseudo' has no video source; .*'ytvis'"):
    sources.open_video_source(_config("coco_pseudo"))


def test_joint_source_configs_take_the_coco_clip_settings():
  config = _config("ytvis+coco_pseudo")
  config.data.coco.update(num_frames=5, pad_size=(96, 64), max_instances=7, supervision="mask")
  split = sources.source_configs(config)
  video, coco = split[sources.VIDEO_SOURCE].data, split[sources.COCO_SOURCE].data
  assert (video.name, coco.name) == ("ytvis", "coco_pseudo")
  assert (video.num_frames, video.pad_size, video.max_instances, video.with_masks) == (
      config.data.num_frames,
      config.data.pad_size,
      config.data.max_instances,
      False,
  )
  assert (coco.num_frames, coco.pad_size, coco.max_instances, coco.with_masks) == (
      5,
      (96, 64),
      7,
      True,
  )
  assert config.data.name == "ytvis+coco_pseudo" and config.data.num_frames != 5  # unchanged


@pytest.mark.parametrize("with_masks", [False, True], ids=["boxes", "masks"])
def test_clip_spec_lists_the_fields(with_masks):
  config = defaults.get_config()
  config.data.with_masks = with_masks
  spec = clips.clip_spec(config)
  assert set(spec) == set(clips.FIELDS) - ({"masks"} if not with_masks else set())
  t, n = config.data.num_frames, config.data.max_instances
  assert spec["boxes"] == (np.float32, (n, t, 4))
