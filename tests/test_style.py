"""The code style of pyproject.toml holds for every Python file (`bash scripts/format.sh`)."""

import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent


@pytest.mark.parametrize(
    "command",
    [["pyink", "--check", "--quiet", "."], ["ruff", "check", "--quiet", "."]],
    ids=["pyink-format", "ruff-type-hints"],
)
def test_code_follows_the_style(command):
  proc = subprocess.run(
      [str(BIN / command[0]), *command[1:]], cwd=REPO, capture_output=True, text=True, check=False
  )
  assert proc.returncode == 0, (
      f"{' '.join(command)} found files off the project style; run `bash scripts/format.sh`:\n"
      f"{proc.stdout}{proc.stderr}"
  )
