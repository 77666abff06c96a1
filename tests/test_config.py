"""The config schema (`maskfreevis_jax.defaults`): its fields match the code they configure, a
mistyped key is an error wherever it is set, saved configs read back exactly, and the config files
load without the training stack."""

import dataclasses
import json
import os
import subprocess
import sys

from absl import flags
import ml_collections
from ml_collections import config_flags
import pytest

from conftest import REPO_ROOT, load_config, load_script
from maskfreevis_jax import defaults
from maskfreevis_jax import losses


def _config_module(file_name: str):
  return load_script(f"configs/{file_name}.py", f"cfg_{file_name}_module")


# Every config a user can name with --config: each file, and each variant of configs/maskfreevis.py.
CONFIG_NAMES = [
    "synthetic",
    "synthetic:masks",
    "synthetic_pretrain",
    "synthetic_pretrain_boxes",
] + [f"maskfreevis:{variant}" for variant in _config_module("maskfreevis").VARIANTS]
# Modules a config file must not pull in: loading a config is a fraction of a second.
HEAVY_MODULES = ("jax", "optax", "orbax", "clu", "tensorflow")
MASK_FREE_FIELDS = [f.name for f in dataclasses.fields(losses.MaskFreeLossConfig)]


def test_mask_free_defaults_have_the_loss_configs_fields():
  assert sorted(defaults.mask_free_defaults()) == sorted(MASK_FREE_FIELDS)


@pytest.mark.parametrize("field", MASK_FREE_FIELDS, ids=MASK_FREE_FIELDS)
def test_mask_free_default_equals_the_loss_configs(field):
  ours = defaults.mask_free_defaults().to_dict()[field]
  expected = dataclasses.asdict(losses.MaskFreeLossConfig())[field]
  assert ours == expected and type(ours) is type(expected), (ours, expected)


def test_get_config_rejects_a_mistyped_key():
  config = defaults.get_config()
  config.train.steps = 5  # a known field can be changed
  with pytest.raises(AttributeError, match="stpes"):
    config.train.stpes = 5
  with pytest.raises(AttributeError, match="tarin"):
    config.tarin = ml_collections.ConfigDict()


@pytest.mark.parametrize("name", CONFIG_NAMES, ids=CONFIG_NAMES)
def test_config_file_rejects_a_mistyped_key(name):
  config = load_config(name)
  with pytest.raises(AttributeError, match="stpes"):
    config.train.stpes = 5


def _parse_config_flags(name: str, *overrides: str) -> ml_collections.ConfigDict:
  """`--config=configs/<file>.py[:variant] <overrides>` parsed as main.py's flag parses it."""
  file_name, _, variant = name.partition(":")
  path = str(REPO_ROOT / "configs" / f"{file_name}.py") + (f":{variant}" if variant else "")
  argv = ["prog", f"--config={path}", *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


@pytest.mark.parametrize("name", CONFIG_NAMES, ids=CONFIG_NAMES)
def test_command_line_override_of_a_mistyped_key_is_an_error(name):
  assert _parse_config_flags(name, "--config.train.steps=5").train.steps == 5
  with pytest.raises(AttributeError, match="stpes"):
    _parse_config_flags(name, "--config.train.stpes=5")


def _assert_same_values(ours, expected, path=""):
  """Equal, and of the same type (a tuple read back as a list would be a different field)."""
  if isinstance(expected, dict):
    assert sorted(ours) == sorted(expected), path
    for key in expected:
      _assert_same_values(ours[key], expected[key], f"{path}.{key}")
  else:
    assert ours == expected and type(ours) is type(expected), (path, ours, expected)


@pytest.mark.parametrize("name", CONFIG_NAMES, ids=CONFIG_NAMES)
def test_config_from_dict_round_trips(name):
  values = load_config(name).to_dict()
  _assert_same_values(defaults.config_from_dict(values).to_dict(), values)


@pytest.mark.parametrize("name", CONFIG_NAMES, ids=CONFIG_NAMES)
def test_saved_json_config_reads_back_with_its_tuples(name):
  config = load_config(name)
  saved = json.loads(defaults.to_json(config))  # as written beside checkpoints: lists
  _assert_same_values(defaults.config_from_dict(saved).to_dict(), config.to_dict())


@pytest.mark.parametrize("name", CONFIG_NAMES, ids=CONFIG_NAMES)
def test_config_from_dict_names_an_unknown_saved_key(name):
  values = load_config(name).to_dict()
  values["train"]["stpes"] = 5
  with pytest.raises(ValueError, match=r"train\.stpes"):
    defaults.config_from_dict(values, source="saved.json")


_IMPORT_CHECK = """
import importlib.util, sys
path, _, variant = sys.argv[1].partition(":")
spec = importlib.util.spec_from_file_location("config_under_test", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.get_config(variant) if variant else module.get_config()
print(sorted(m for m in {modules!r} if m in sys.modules))
"""


@pytest.mark.parametrize("name", CONFIG_NAMES, ids=CONFIG_NAMES)
def test_config_file_imports_no_training_stack(name, tmp_path):
  file_name, _, variant = name.partition(":")
  path = str(REPO_ROOT / "configs" / f"{file_name}.py") + (f":{variant}" if variant else "")
  # A fresh interpreter that finds the packages where this one does.
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
  result = subprocess.run(
      [sys.executable, "-c", _IMPORT_CHECK.format(modules=HEAVY_MODULES), path],
      capture_output=True,
      text=True,
      cwd=tmp_path,
      env=env,
      check=True,
  )
  assert result.stdout.strip() == "[]", (result.stdout, result.stderr[-2000:])
