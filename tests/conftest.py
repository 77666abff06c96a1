"""Test set-up: several forced CPU devices (to exercise sharding) and paths to shared material."""
import os
import pathlib

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DIR = pathlib.Path(os.environ.get("MASKFREEVIS_SHARED", REPO_ROOT.parent / "shared"))


def load_config(name: str):
  """`configs/<name>.py`'s `get_config()`, loaded as main.py's --config flag loads it."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", REPO_ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
  if not SHARED_DIR.is_dir():
    raise FileNotFoundError(
        f"shared material not found at {SHARED_DIR}; set MASKFREEVIS_SHARED to its path")
  return SHARED_DIR


@pytest.fixture(scope="session")
def golden_dir(shared_dir) -> pathlib.Path:
  return shared_dir / "golden"


@pytest.fixture(scope="session")
def reference_state_dict(shared_dir) -> dict:
  """Official R50 state_dict names -> shapes (PyTorch layouts)."""
  import json
  with open(shared_dir / "reference" / "official_r50_ytvis19_state_dict.json") as f:
    return json.load(f)["state_dict"]
