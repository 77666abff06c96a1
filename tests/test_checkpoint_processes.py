"""Checkpoint decisions across processes: two local processes (jax.distributed, 2 CPU devices each)
must take the same decision when only one of them cannot write or read its part, without hanging.

Each case runs tests/checkpoint_process.py as processes 0 and 1; a hang fails the test through
`run_local_processes`' timeout (Orbax's own barrier would wait 20 minutes).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys

import pytest

from maskfreevis_jax import testing

REPO = pathlib.Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "checkpoint_process.py"
TIMEOUT_SECONDS = 180


def _run(*args: str) -> list[dict]:
  """Runs the driver on two processes; returns their summaries (after checking both finished)."""
  results = testing.run_local_processes(
      [sys.executable, str(DRIVER), *map(str, args)], timeout=TIMEOUT_SECONDS
  )
  summaries = []
  for index, (returncode, stdout, stderr) in enumerate(results):
    assert returncode == 0, f"process {index}:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, f"process {index}:\n{stderr[-3000:]}"
    summary = json.loads(stdout.strip().splitlines()[-1])
    summary["log"] = [line for line in stderr.splitlines() if "checkpoint of step" in line]
    summaries.append(summary)
  return summaries


def _same_on_both(summaries: list[dict], key: str):
  assert summaries[0][key] == summaries[1][key], (key, summaries)
  return summaries[0][key]


@pytest.mark.parametrize("failing", [0, 1], ids=["enospc_on_process_0", "enospc_on_process_1"])
def test_one_sided_enospc_is_a_failed_save_on_both(tmp_path, failing):
  summaries = _run(
      "save", tmp_path, "--steps", "2,4,6", "--enospc_process", failing, "--enospc_step", 4
  )
  assert _same_on_both(summaries, "committed") == [2, 6]
  assert _same_on_both(summaries, "failed_in_a_row") == 0
  log = _same_on_both(summaries, "log")
  assert len(log) == 1, log
  for part in (
      "the checkpoint of step 4 could not be written",
      f"process {failing} of 2",
      "No space left on device",
      "training goes on",
  ):
    assert part in log[0], log[0]
  assert not [p for p in tmp_path.iterdir() if ".orbax-checkpoint-tmp" in p.name]


def test_one_sided_enospc_stops_both_with_the_same_message(tmp_path):
  summaries = _run(
      "save", tmp_path, "--steps", "2,4,6", "--enospc_process", 1, "--enospc_step", 4,
      "--max_failures", 1,
  )  # fmt: skip
  message = _same_on_both(summaries, "stopped")
  assert message.startswith(f"the checkpoint of step 4 could not be written to {tmp_path}"), message
  assert "process 1 of 2" in message and "1 failed checkpoint saves in a row" in message, message
  assert _same_on_both(summaries, "committed") == [2]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> pathlib.Path:
  """Steps 2 and 4 written by two processes (each its own part of the sharded array)."""
  directory = tmp_path_factory.mktemp("two_process") / "checkpoints"
  summaries = _run("save", directory, "--steps", "2,4")
  assert _same_on_both(summaries, "committed") == [2, 4]
  return directory


def _data_files(step_dir: pathlib.Path, process: int) -> list[pathlib.Path]:
  files = sorted((step_dir / "state" / f"ocdbt.process_{process}" / "d").iterdir())
  assert files, step_dir
  return files


def _truncate(step_dir: pathlib.Path, process: int) -> None:
  for path in _data_files(step_dir, process):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(step_dir: pathlib.Path, process: int) -> None:
  """One byte flipped in each of the process's data files (a file may be a b-tree node that the
  merge copied to `state/d/` and that is never read again: a flip there is no damage)."""
  for path in _data_files(step_dir, process):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated_part_of_process_1": (_truncate, 1),
    "flipped_byte_in_part_of_process_1": (_flip_a_byte, 1),
    "truncated_part_of_process_0": (_truncate, 0),
}


@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_one_sided_damage_resumes_both_from_the_same_step(saved, tmp_path, damage):
  directory = tmp_path / "checkpoints"
  shutil.copytree(saved, directory)
  damage_fn, process = DAMAGE[damage]
  damage_fn(directory / "4", process)
  summaries = _run("restore", directory)
  assert _same_on_both(summaries, "step") == 2
  assert _same_on_both(summaries, "iterator_state") == {"index": 2}
  assert _same_on_both(summaries, "quarantined") == ["4.corrupt"]
  assert _same_on_both(summaries, "restored_equal")
  log = _same_on_both(summaries, "log")
  assert len(log) == 1 and "moved aside" in log[0] and "using step 2" in log[0], log


def test_undamaged_two_process_checkpoint_resumes_from_the_newest(saved, tmp_path):
  directory = tmp_path / "checkpoints"
  shutil.copytree(saved, directory)
  summaries = _run("restore", directory)
  assert _same_on_both(summaries, "step") == 4
  assert _same_on_both(summaries, "quarantined") == []
  assert _same_on_both(summaries, "restored_equal")
