"""Checkpoint fault injection: damaged checkpoints, kills and signals during a save, failed saves.

Every fault must end with the run going on from the right checkpoint with that checkpoint's data
position, or stopping with a clear message. The stand-ins of `maskfreevis_jax.testing` train on one
CPU device; a module fixture trains once (checkpoints 2, 4 and 6) and each test damages a copy.

Run as a script (`python test_checkpoint_faults.py WORKDIR STEPS HELD_STEP`), this file trains the
stand-in with the commit of HELD_STEP's checkpoint held back (the subprocess of the SIGKILL test).
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

if __name__ == "__main__":  # Subprocess mode: one CPU device, set before jax is imported.
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import chex  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from orbax.checkpoint._src.path import async_path  # noqa: E402
from orbax.checkpoint._src.path import atomicity  # noqa: E402
import pytest  # noqa: E402

from maskfreevis_jax import checkpointing  # noqa: E402
from maskfreevis_jax import evaluate  # noqa: E402
from maskfreevis_jax import sharding as sharding_lib  # noqa: E402
from maskfreevis_jax import testing  # noqa: E402
from maskfreevis_jax import train as train_lib  # noqa: E402

BATCH, WIDTH = 2, 4
HOLDING_MARKER = "holding the commit of"


def _train(workdir, steps: int, iterator=None, **train_overrides):
  """Trains (or resumes) the stand-in to `steps`; returns (TrainResult, the iterator)."""
  config = testing.make_config(steps=steps, batch_size=BATCH, checkpoint_every=2, keep=3,
                               log_every=100, **train_overrides)
  config.model.width = WIDTH
  iterator = iterator if iterator is not None else testing.StandInIterator(BATCH, seed=1)
  result = train_lib.train(config, workdir, model=testing.StandInModel(width=WIDTH),
                           loss_fn=testing.stand_in_loss, train_iterator=iterator,
                           mesh=sharding_lib.create_mesh(1, jax.devices()[:1]))
  return result, iterator


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A run of 6 steps: checkpoints 2, 4, 6; returns (workdir, final params)."""
  workdir = tmp_path_factory.mktemp("trained")
  result, _ = _train(workdir, steps=6)
  assert _committed(workdir / "checkpoints") == [2, 4, 6]
  return workdir, jax.device_get(result.state.params)


def _copy(trained, tmp_path) -> pathlib.Path:
  workdir = tmp_path / "run"
  shutil.copytree(trained[0], workdir)
  return workdir


def _committed(directory) -> list[int]:
  return sorted(int(p.name) for p in pathlib.Path(directory).iterdir() if p.name.isdigit())


def _digest(directory) -> dict[str, str]:
  """Relative path -> sha1 of every file (directory entries included as names)."""
  root = pathlib.Path(directory)
  return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else ""
          for p in sorted(root.rglob("*"))}


def _truncate_array_files(step_dir: pathlib.Path) -> None:
  files = [p for p in step_dir.glob("state/**/d/*") if p.is_file()]
  assert files, f"no array data files under {step_dir}"
  for f in files:
    os.truncate(f, f.stat().st_size // 2)


def _remove_commit_record(step_dir: pathlib.Path) -> None:
  (step_dir / "_CHECKPOINT_METADATA").unlink()


def _state_item_is_a_file(step_dir: pathlib.Path) -> None:
  shutil.rmtree(step_dir / "state")
  (step_dir / "state").write_text("not a checkpoint item")


DAMAGES = [(_truncate_array_files, "first unreadable item state/"),
           (_remove_commit_record, "first unreadable item _CHECKPOINT_METADATA: missing"),
           (_state_item_is_a_file, "first unreadable item state: not a directory")]
DAMAGE_IDS = ["truncated-array-files", "missing-checkpoint-metadata", "item-is-a-file"]


def _messages(caplog, text: str) -> list[str]:
  return [r.getMessage() for r in caplog.records if text in r.getMessage()]


@pytest.mark.parametrize("damage, unreadable", DAMAGES, ids=DAMAGE_IDS)
def test_damaged_newest_checkpoint_resumes_from_the_previous_one(trained, tmp_path, caplog, capfd,
                                                                  damage, unreadable):
  workdir = _copy(trained, tmp_path)
  checkpoints = workdir / "checkpoints"
  damage(checkpoints / "6")
  damaged_files = _digest(checkpoints / "6")
  with caplog.at_level(logging.WARNING):
    result, iterator = _train(workdir, steps=6)
  # Batch 0 only gave the shapes; then checkpoint 4's data position: batches 4 and 5.
  assert iterator.served == [0, 4, 5]
  assert result.step == 6
  lines = _messages(caplog, "cannot be read")
  assert len(lines) == 1, lines
  assert lines[0].startswith(f"checkpoint of step 6 in {checkpoints} cannot be read"), lines[0]
  assert unreadable in lines[0] and "moved aside" in lines[0] and "using step 4" in lines[0]
  assert "\n" not in lines[0]
  # Kept aside unchanged, never again taken for a checkpoint; the rerun wrote a new step 6.
  assert _digest(checkpoints / "6.corrupt") == damaged_files
  assert _committed(checkpoints) == [2, 4, 6]
  reader = checkpointing.Checkpointer(checkpoints, read_only=True)
  _, iterator_state, step = reader.restore()
  reader.close()
  assert (step, iterator_state) == (6, {"index": 6})
  assert "Traceback" not in capfd.readouterr().err


def test_no_readable_checkpoint_stops_and_moves_nothing(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  checkpoints = workdir / "checkpoints"
  for step in (2, 4, 6):
    _remove_commit_record(checkpoints / str(step))
  before = _digest(checkpoints)
  with pytest.raises(checkpointing.NoReadableCheckpointError) as info:
    _train(workdir, steps=8)
  message = str(info.value)
  assert f"none of the 3 checkpoints in {checkpoints} can be read" in message, message
  assert "step 6: first unreadable item _CHECKPOINT_METADATA" in message, message
  assert "\n" not in message
  assert _digest(checkpoints) == before


def test_only_quarantined_checkpoints_do_not_start_from_scratch(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  checkpoints = workdir / "checkpoints"
  for step in (2, 4):
    shutil.rmtree(checkpoints / str(step))
  (checkpoints / "6").rename(checkpoints / "6.corrupt")
  with pytest.raises(checkpointing.NoReadableCheckpointError, match=r"only damaged checkpoints.*"
                     r"6\.corrupt"):
    _train(workdir, steps=8)
  assert not (workdir / "checkpoints" / "2").exists()


def _hold_commit(monkeypatch, step: int, seconds: float, announce: bool = False) -> None:
  """Delays the rename that commits `step`'s checkpoint (its files are all written by then)."""
  real_finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self):
    if self.get_final().name == str(step):
      if announce:
        print(f"{HOLDING_MARKER} {self.get()}", flush=True)
      time.sleep(seconds)
    return await real_finalize(self)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)


def test_sigkill_during_an_async_save_resumes_from_the_last_committed(trained, tmp_path, caplog):
  workdir = _copy(trained, tmp_path)
  checkpoints = workdir / "checkpoints"
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  proc = subprocess.Popen([sys.executable, __file__, str(workdir), "10", "8"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          cwd=str(pathlib.Path(__file__).resolve().parents[1]))
  output, deadline = [], time.time() + 240
  try:
    for line in proc.stdout:
      output.append(line)
      if HOLDING_MARKER in line or time.time() > deadline:
        break
  finally:
    proc.kill()
    proc.wait(timeout=60)
  assert any(HOLDING_MARKER in line for line in output), "".join(output[-30:])
  assert proc.returncode == -signal.SIGKILL
  partial = checkpoints / f"8{checkpointing._TMP_MARKER}"  # pylint: disable=protected-access
  assert partial.is_dir() and _committed(checkpoints) == [2, 4, 6]

  with caplog.at_level(logging.WARNING):
    result, iterator = _train(workdir, steps=8)
  assert iterator.served == [0, 6, 7]  # checkpoint 6 and its data position
  assert result.step == 8
  assert _messages(caplog, f"removing {partial}: a checkpoint save that never completed")
  assert not partial.exists() and _committed(checkpoints) == [4, 6, 8]


class _SigtermAt(testing.StandInIterator):
  """Sends this process SIGTERM when it hands out batch `at_index` (a preemption notice).

  `save_in_flight` lists the checkpoint directory at that moment.
  """

  def __init__(self, batch_size: int, *, at_index: int, directory: pathlib.Path):
    super().__init__(batch_size, seed=1)
    self.at_index, self.directory, self.save_in_flight = at_index, directory, None

  def __next__(self):
    if self.index == self.at_index:
      self.save_in_flight = sorted(p.name for p in self.directory.iterdir())
      os.kill(os.getpid(), signal.SIGTERM)
    return super().__next__()


def test_sigterm_during_an_async_save_still_saves(trained, tmp_path, monkeypatch):
  workdir = _copy(trained, tmp_path)
  checkpoints = workdir / "checkpoints"
  _hold_commit(monkeypatch, step=8, seconds=1.0)
  iterator = _SigtermAt(BATCH, at_index=8, directory=checkpoints)
  result, _ = _train(workdir, steps=12, iterator=iterator)
  # The signal came while step 8 was being written (batch 8 is step 9's).
  assert f"8{checkpointing._TMP_MARKER}" in iterator.save_in_flight  # pylint: disable=protected-access
  assert result.preempted and result.step == 9
  assert _committed(checkpoints) == [6, 8, 9]
  reader = checkpointing.Checkpointer(checkpoints, read_only=True)
  _, iterator_state, step = reader.restore()
  reader.close()
  assert (step, iterator_state) == (9, {"index": 9})


def _fail_in(directory: pathlib.Path, error_number: int):
  """An async_path function replacement that raises OSError(error_number) inside `directory`."""

  def wrap(real):
    async def failing(path, *args, **kwargs):
      if str(path).startswith(f"{directory}/"):
        raise OSError(error_number, os.strerror(error_number), str(path))
      return await real(path, *args, **kwargs)
    return failing

  return wrap


# As root, a read-only chmod does not stop writes, so the filesystem errors are raised inside
# Orbax's own file operations: a read-only mount fails the first one (creating the step's
# directory, in `save`); a full disk lets the arrays be written and fails a later metadata write
# (in the background commit), leaving a partial directory behind.
UNWRITABLE = [("mkdir", errno.EROFS, 10, "Read-only file system"),
              ("write_text", errno.ENOSPC, 12, "No space left on device")]


@pytest.mark.parametrize("operation, error_number, stop_step, reason", UNWRITABLE,
                         ids=["read-only-workdir", "disk-full-in-background"])
def test_failed_saves_keep_training_then_stop(trained, tmp_path, monkeypatch, caplog, operation,
                                              error_number, stop_step, reason):
  workdir = _copy(trained, tmp_path)
  checkpoints = workdir / "checkpoints"
  before = _digest(checkpoints)
  monkeypatch.setattr(async_path, operation,
                      _fail_in(checkpoints, error_number)(getattr(async_path, operation)))
  iterator = testing.StandInIterator(BATCH, seed=1)
  with caplog.at_level(logging.WARNING):
    with pytest.raises(checkpointing.CheckpointSaveError) as info:
      _train(workdir, steps=14, iterator=iterator, max_consecutive_failed_saves=2)
  # Resumed from 6; the save of step 8 failed and training went on until the second failure.
  assert iterator.served == [0, *range(6, stop_step)]
  logged = _messages(caplog, "the checkpoint of step 8 could not be written")
  assert len(logged) == 1 and "training goes on" in logged[0] and reason in logged[0], logged
  message = str(info.value)
  assert message.startswith(f"the checkpoint of step 10 could not be written to {checkpoints}")
  for part in (reason, "2 failed checkpoint saves in a row",
               "config.train.max_consecutive_failed_saves=2", "newest kept checkpoint: step 6"):
    assert part in message, message
  assert _digest(checkpoints) == before  # Earlier checkpoints untouched, no partial directory.


def test_evaluate_takes_the_newest_readable_checkpoint_and_warns(trained, tmp_path, caplog):
  workdir = _copy(trained, tmp_path)
  checkpoints = workdir / "checkpoints"
  _remove_commit_record(checkpoints / "6")
  with caplog.at_level(logging.WARNING):
    variables, step = evaluate.restore_variables(workdir)
  assert step == 4
  lines = _messages(caplog, "cannot be read")
  assert len(lines) == 1 and "checkpoint of step 6" in lines[0], lines
  assert "left in place, using step 4" in lines[0]
  assert _committed(checkpoints) == [2, 4, 6]  # evaluation changes nothing
  assert set(variables) == {"params"}


def test_evaluate_step_selects_the_checkpoint(trained, tmp_path):
  workdir, final_params = trained
  newest, newest_step = evaluate.restore_variables(workdir, step=-1)
  assert newest_step == 6
  chex.assert_trees_all_close(jax.device_get(newest["params"]), final_params)
  older, older_step = evaluate.restore_variables(workdir, step=2)
  assert older_step == 2
  assert not np.array_equal(older["params"]["query_feat"], final_params["query_feat"])


def test_evaluate_damaged_step_is_a_one_line_error(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  _truncate_array_files(workdir / "checkpoints" / "6")
  with pytest.raises(checkpointing.DamagedCheckpointError) as info:
    evaluate.restore_variables(workdir, step=6)
  message = str(info.value)
  assert message.startswith(f"checkpoint {workdir / 'checkpoints' / '6'} cannot be read: first "
                            "unreadable item state/"), message
  assert "committed: 2, 4, 6" in message and "\n" not in message and len(message) < 600


def test_evaluate_missing_step_names_the_committed_ones(trained):
  with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 5 in .*checkpoints "
                     r"\(committed steps: 2, 4, 6\)"):
    evaluate.restore_variables(trained[0], step=5)


if __name__ == "__main__":
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  class _MonkeyPatch:
    """Just what `_hold_commit` uses of pytest's monkeypatch."""

    @staticmethod
    def setattr(target, name, value):
      setattr(target, name, value)

  absl_logging.set_verbosity(absl_logging.WARNING)
  _hold_commit(_MonkeyPatch(), step=int(sys.argv[3]), seconds=600.0, announce=True)
  _train(pathlib.Path(sys.argv[1]), steps=int(sys.argv[2]))
