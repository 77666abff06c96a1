"""Test set-up: several forced CPU devices (to exercise sharding) and the fixture folder."""

import os
import pathlib

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# Fixtures the official code produced (tools/official_parity; tests/fixtures/README.md).
FIXTURES_DIR = REPO_ROOT / "tests" / "fixtures"


def load_script(relative_path: str, module_name: str = ""):
  """The module of a repository file that is not a package module (a bench script, a config),
  executed fresh: `load_script('bench/tk_precision.py')`."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  path = REPO_ROOT / relative_path
  spec = importlib.util.spec_from_file_location(module_name or f"script_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(name: str):
  """`configs/<name>.py`'s `get_config()` ('<file>:<variant>' passes the variant), loaded as
  main.py's --config flag loads it."""
  file_name, _, arg = name.partition(":")
  module = load_script(f"configs/{file_name}.py", f"cfg_{file_name}")
  return module.get_config(arg) if arg else module.get_config()


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  return FIXTURES_DIR


@pytest.fixture(scope="session")
def official_r50_reference() -> dict:
  """The official R50 model's state_dict shapes, parameter count and optimizer groups."""
  import json  # pylint: disable=g-import-not-at-top

  with open(FIXTURES_DIR / "official_r50_ytvis19_state_dict.json") as f:
    return json.load(f)


@pytest.fixture(scope="session")
def reference_state_dict(official_r50_reference) -> dict:
  """Official R50 state_dict names -> shapes (PyTorch layouts)."""
  return official_r50_reference["state_dict"]
