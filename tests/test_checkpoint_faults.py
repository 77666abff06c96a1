"""Checkpoint fault injection: damaged checkpoints, kills and signals during a save, failed saves.

Every fault must end with the run going on from the right checkpoint with that checkpoint's data
position, or stopping with a clear message. The stand-ins of `maskfreevis_jax.testing` train on one
CPU device; a module fixture trains once (checkpoints 2, 4 and 6) and each test damages a copy.
Each `train()` call compiles the step again, so most faults are checked on `Checkpointer.restore`
(what `train()` resumes from) and one of each kind runs the train loop end to end.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import hashlib
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
from orbax.checkpoint._src.path import async_path
from orbax.checkpoint._src.path import atomicity
from orbax.checkpoint._src import asyncio_utils
import pytest
import tensorstore as ts
import xxhash

from maskfreevis_jax import train_step
from maskfreevis_jax import experiment
from maskfreevis_jax import checkpointing
from maskfreevis_jax import sharding as sharding_lib
from maskfreevis_jax import testing
from maskfreevis_jax import train as train_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
BATCH, WIDTH = 2, 4
TMP_MARKER = checkpointing._TMP_MARKER  # pylint: disable=protected-access
HOLDING = "holding the commit of"
# The subprocess of the SIGKILL test: writes checkpoint `step` (checkpoint 6's state, the data
# position of `step`) asynchronously, as training does, with its commit held back.
_SAVE_AND_HOLD = f"""
import sys
from orbax.checkpoint._src.path import atomicity
from maskfreevis_jax import checkpointing, testing
directory, step = sys.argv[1], int(sys.argv[2])
atomicity.AtomicRenameTemporaryPath.finalize = testing.delayed_finalize(step, 600.0, "{HOLDING}")
checkpointer = checkpointing.Checkpointer(directory, keep=3, save_every=2)
state, _, _ = checkpointer.restore()
checkpointer.save(step, state, {{"index": step}})
checkpointer.wait_until_finished()
"""


def _config(steps: int, **train_overrides):
  config = testing.make_config(
      steps=steps, batch_size=BATCH, checkpoint_every=2, keep=3, log_every=100, **train_overrides
  )
  config.model.width = WIDTH
  return config


def _mesh():
  return sharding_lib.create_mesh(1, jax.devices()[:1])


def _train(workdir, steps: int, iterator=None, **train_overrides):
  """Trains (or resumes) the stand-in to `steps`; returns (TrainResult, the iterator)."""
  iterator = iterator if iterator is not None else testing.StandInIterator(BATCH, seed=1)
  result = train_lib.train(
      testing.stand_in_experiment(_config(steps, **train_overrides), iterator, mesh=_mesh()),
      workdir,
  )
  return result, iterator


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A run of 6 steps: checkpoints 2, 4, 6; returns (workdir, final params)."""
  workdir = tmp_path_factory.mktemp("trained")
  result, _ = _train(workdir, steps=6)
  assert _committed(workdir / "checkpoints") == [2, 4, 6]
  return workdir, jax.device_get(result.state.params)


@pytest.fixture(scope="module")
def restore_target():
  """The sharded TrainState shapes `train()` restores into."""
  spec = train_step.abstract_batch(next(testing.StandInIterator(BATCH)))
  trainer = experiment.build_experiment(
      _config(6),
      model=testing.StandInModel(width=WIDTH),
      loss_fn=testing.stand_in_loss,
      mesh=_mesh(),
  ).trainer(spec)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      trainer.abstract_state,
      trainer.state_shardings,
  )


def _copy(trained, tmp_path) -> pathlib.Path:
  workdir = tmp_path / "run"
  shutil.copytree(trained[0], workdir)
  return workdir


def _committed(directory) -> list[int]:
  return sorted(int(p.name) for p in pathlib.Path(directory).iterdir() if p.name.isdigit())


def _digest(directory) -> dict[str, str]:
  """Relative path -> sha1 of every file ('' for directories)."""
  root = pathlib.Path(directory)
  return {
      str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else ""
      for p in sorted(root.rglob("*"))
  }


def _messages(caplog, text: str) -> list[str]:
  return [r.getMessage() for r in caplog.records if text in r.getMessage()]


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


def _array_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  """The state's data files that a restore reads, largest first.

  OCDBT's merge copies a process's b-tree node file into `state/d/`; the copy under
  `ocdbt.process_0/d/` is then never read, so damage to it is no damage (the files tie on size,
  and an arbitrary pick made the cases below flaky).
  """
  files = [p for p in step_dir.glob("state/**/d/*") if p.is_file()]
  assert files, f"no array data files under {step_dir}"
  merged = {p.read_bytes() for p in step_dir.glob("state/d/*")}
  read = [p for p in files if p.parent.parent.name == "state" or p.read_bytes() not in merged]
  return sorted(read, key=lambda p: (-p.stat().st_size, str(p)))


def _ocdbt_store(state_dir: pathlib.Path) -> ts.KvStore:
  """The key-value store of a state item (keys such as `params.x/.zarray`, `params.x/0.0`)."""
  return ts.KvStore.open({"driver": "ocdbt", "base": f"file://{state_dir}/"}).result()


def _files_holding(state_dir: pathlib.Path, stored: bytes) -> list[tuple[pathlib.Path, int]]:
  """(data file, offset) of every copy of a value's stored bytes under the state item."""
  found = []
  for f in sorted(p for p in state_dir.glob("**/d/*") if p.is_file()):
    at = f.read_bytes().find(stored)
    if at >= 0:
      found.append((f, at))
  return found


def _truncate_the_larger_half(step_dir: pathlib.Path) -> None:
  """As after a crash mid-write: some arrays readable, some not."""
  files = _array_files(step_dir)
  for f in files[: max(1, len(files) // 2)]:
    os.truncate(f, f.stat().st_size // 2)


def _truncate_one_file(step_dir: pathlib.Path) -> None:
  f = _array_files(step_dir)[0]
  os.truncate(f, f.stat().st_size // 2)


def _truncate_the_file_of_the_largest_parameter(step_dir: pathlib.Path) -> None:
  """One data file cut in the middle of the largest parameter's chunk: damage that evaluation,
  which reads the parameters alone, meets too (the largest file may hold optimizer slots only)."""
  state = step_dir / "state"
  store = _ocdbt_store(state)
  chunks = [
      k for k in store.list().result() if k.startswith(b"params.") and not k.endswith(b"/.zarray")
  ]
  stored = max((store.read(k).result().value for k in chunks), key=len)
  read = set(_array_files(step_dir))  # not OCDBT's pre-merge copies, which are never read
  found = [(f, at) for f, at in _files_holding(state, stored) if f in read]
  assert found, f"no data file under {state} holds the largest parameter's chunk"
  f, at = found[0]
  os.truncate(f, at + len(stored) // 2)


def _flip_a_byte(step_dir: pathlib.Path) -> None:
  """Silent corruption: one byte changed inside an array file of the right size."""
  f = _array_files(step_dir)[0]
  data = bytearray(f.read_bytes())
  data[len(data) // 2] ^= 0x10
  f.write_bytes(bytes(data))


DAMAGES = [
    (_truncate_array_files, "first unreadable item state/"),
    (_truncate_the_larger_half, "first unreadable item state/"),
    (_truncate_one_file, "first unreadable item state/"),
    (_flip_a_byte, "first unreadable item state/"),
    (_remove_commit_record, "first unreadable item _CHECKPOINT_METADATA: missing"),
    (_state_item_is_a_file, "first unreadable item state: not a directory"),
]
DAMAGE_IDS = [
    "truncated-array-files",
    "larger-half-truncated",
    "one-file-truncated",
    "byte-flipped",
    "missing-checkpoint-metadata",
    "item-is-a-file",
]


@pytest.mark.parametrize("damage, unreadable", DAMAGES, ids=DAMAGE_IDS)
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(
    trained, restore_target, tmp_path, caplog, capfd, damage, unreadable
):
  checkpoints = _copy(trained, tmp_path) / "checkpoints"
  damage(checkpoints / "6")
  damaged_files = _digest(checkpoints / "6")
  checkpointer = checkpointing.Checkpointer(checkpoints, keep=3, save_every=2)
  with caplog.at_level(logging.WARNING):
    state, iterator_state, step = checkpointer.restore(restore_target)
  # Checkpoint 4: its train state (own step counter) and its data position.
  assert (step, int(state.step), iterator_state) == (4, 4, {"index": 4})
  lines = _messages(caplog, "cannot be read")
  assert len(lines) == 1, lines
  assert lines[0].startswith(f"checkpoint of step 6 in {checkpoints} cannot be read"), lines[0]
  assert unreadable in lines[0] and "moved aside" in lines[0] and "using step 4" in lines[0]
  # Moved aside unchanged, and never again taken for a checkpoint.
  assert _digest(checkpoints / "6.corrupt") == damaged_files
  assert _committed(checkpoints) == [2, 4] and checkpointer.latest_step() == 4
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    _, _, again = checkpointer.restore(restore_target)
  checkpointer.close()
  assert again == 4 and not _messages(caplog, "cannot be read")
  # Quietly: the abandoned reads of the damaged checkpoint leave no traceback behind.
  err = capfd.readouterr().err
  assert "Traceback" not in err and "Exception ignored" not in err, err[-2000:]
  assert not _messages(caplog, "never retrieved")


def _saved_config_item(step_dir: pathlib.Path) -> dict:
  return json.loads((step_dir / "config" / "metadata").read_text())


def test_every_saved_array_carries_checksums_of_its_bytes(trained, restore_target):
  """The checksums saved with a checkpoint are XXH3-64 of each array's bytes (each array is one
  block here: one device)."""
  item = _saved_config_item(trained[0] / "checkpoints" / "6")
  assert item["array_checksums"] == "xxh3_64_per_block", item.keys()
  table = item["array_digests"]
  reader = checkpointing.Checkpointer(trained[0] / "checkpoints", read_only=True)
  state, _, _ = reader.restore(restore_target, step=6)
  reader.close()
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
  assert sorted(table) == sorted(
      jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in leaves
  )
  for path, value in leaves:
    entry = table[jax.tree_util.keystr(path, simple=True, separator="/")]
    value = np.asarray(value)
    assert entry["dtype"] == str(value.dtype)
    block = ",".join(f"0:{n}" for n in value.shape)
    assert entry["blocks"] == {block: xxhash.xxh3_64_hexdigest(value.tobytes())}, path


def _flip_a_byte_in_the_chunk_of(state_dir: pathlib.Path, key: str) -> None:
  """Flips a byte inside one chunk's stored (compressed) bytes, wherever a data file holds them.

  Only values over 1 KiB live in data files (smaller ones sit in OCDBT's b-tree nodes, which
  carry their own checksum); the stored bytes of a random chunk are zstd's raw blocks, so the flip
  decodes to another value without any error: only a checksum of the array's bytes catches it.
  """
  stored = _ocdbt_store(state_dir).read(key).result().value
  assert len(stored) > 1024, f"{key} is stored inline ({len(stored)} bytes)"
  found = _files_holding(state_dir, stored)
  assert found, f"the stored bytes of {key} are in no data file under {state_dir}"
  for f, at in found:
    data = bytearray(f.read_bytes())
    data[at + len(stored) // 3] ^= 0x10
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("checksums", [True, False], ids=["checksummed", "zarr2-unchecked"])
def test_a_byte_flipped_inside_a_chunk_is_caught_by_the_checksum(tmp_path, caplog, checksums):
  weights = {"w": jax.numpy.asarray(np.random.default_rng(0).standard_normal((64, 64)), "float32")}
  checkpointer = checkpointing.Checkpointer(tmp_path, checksums=checksums, async_save=False)
  for step in (1, 2):
    checkpointer.save(step, weights, None, force=True)
  checkpointer.close()
  _flip_a_byte_in_the_chunk_of(tmp_path / "2" / "state", "w/0.0")
  reader = checkpointing.Checkpointer(tmp_path, read_only=True)
  with caplog.at_level(logging.WARNING):
    restored, _, step = reader.restore()
  reader.close()
  if checksums:  # Caught: the previous checkpoint, intact.
    (line,) = _messages(caplog, "cannot be read")
    assert step == 1 and "first unreadable item state/w:" in line and "checksum" in line, line
    chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(weights))
  else:  # The control: without checksums the flipped value restores without a word.
    assert step == 2 and not _messages(caplog, "cannot be read"), caplog.text
    assert int(np.sum(np.asarray(restored["w"]) != np.asarray(weights["w"]))) == 1


def _weights_on(devices: int, split: bool) -> dict[str, jax.Array]:
  """A 64x64 array on `devices` CPU devices, split by rows or replicated."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:devices]), ("data",))
  spec = jax.sharding.PartitionSpec("data" if split else None)
  values = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
  return {"w": jax.device_put(values, jax.sharding.NamedSharding(mesh, spec))}


RESHARDINGS = {  # (saved on, split; restored on, split; arrays left unchecked)
    "saved-split-restored-on-one-device": (8, True, 1, False, 0),
    "saved-split-restored-replicated": (8, True, 8, False, 0),
    "saved-whole-restored-split": (1, False, 8, True, 1),
}


@pytest.mark.parametrize("case", list(RESHARDINGS), ids=list(RESHARDINGS))
def test_checksums_check_restores_in_another_sharding(tmp_path, caplog, case):
  saved_on, saved_split, restored_on, restored_split, unchecked = RESHARDINGS[case]
  weights = _weights_on(saved_on, saved_split)
  writer = checkpointing.Checkpointer(tmp_path, async_save=False)
  writer.save(1, weights, None, force=True)
  writer.close()
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      _weights_on(restored_on, restored_split),
  )
  reader = checkpointing.Checkpointer(tmp_path, read_only=True)
  with caplog.at_level(logging.WARNING):
    restored, _, step = reader.restore(target)
  reader.close()
  assert step == 1
  chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(weights))
  notes = _messages(caplog, "unverified")
  assert len(notes) == unchecked, notes
  assert all("1 array(s) restored partly unverified" in n and "first w" in n for n in notes), notes


MANGLED_TABLES = {
    "entry-without-dtype": {"w": {"blocks": {"0:64,0:64": "0"}}},
    "bounds-not-numbers": {"w": {"dtype": "float32", "blocks": {"a:b,0:64": "0"}}},
    "table-a-list": ["w"],
}


@pytest.mark.parametrize("table", MANGLED_TABLES.values(), ids=MANGLED_TABLES)
def test_a_mangled_checksum_table_is_damage_named_in_one_line(tmp_path, caplog, table):
  weights = _weights_on(1, False)
  writer = checkpointing.Checkpointer(tmp_path, async_save=False)
  for step in (1, 2):
    writer.save(step, weights, None, force=True)
  writer.close()
  item_file = tmp_path / "2" / "config" / "metadata"
  item = json.loads(item_file.read_text())
  item["array_digests"] = table
  item_file.write_text(json.dumps(item))
  reader = checkpointing.Checkpointer(tmp_path, read_only=True)
  with caplog.at_level(logging.WARNING):
    _, _, step = reader.restore()
  reader.close()
  (line,) = _messages(caplog, "cannot be read")
  assert step == 1 and "first unreadable item config: its checksum table cannot be read" in line


def test_checkpoints_without_checksums_restore_with_a_note(
    trained, restore_target, tmp_path, caplog
):
  """A checkpoint in the earlier format (no checksums) restores, noted once."""
  older = checkpointing.Checkpointer(trained[0] / "checkpoints", read_only=True)
  state, _, _ = older.restore(step=6)
  older.close()
  checkpoints = tmp_path / "checkpoints"
  writer = checkpointing.Checkpointer(checkpoints, checksums=False, async_save=False)
  writer.save(8, state, {"index": 8}, force=True)
  writer.close()
  assert "array_checksums" not in _saved_config_item(checkpoints / "8")
  checkpointer = checkpointing.Checkpointer(checkpoints)
  with caplog.at_level(logging.WARNING):
    restored, iterator_state, step = checkpointer.restore(restore_target)
  checkpointer.close()
  assert (step, iterator_state) == (8, {"index": 8})
  chex.assert_trees_all_equal(jax.device_get(restored.params), trained[1])
  notes = _messages(caplog, "carries no checksums")
  assert len(notes) == 1 and str(checkpoints / "8") in notes[0], notes


def test_truncated_checkpoint_run_resumes_from_the_previous_one(trained, tmp_path, caplog, capfd):
  workdir = _copy(trained, tmp_path)
  checkpoints = workdir / "checkpoints"
  _truncate_array_files(checkpoints / "6")
  with caplog.at_level(logging.WARNING):
    result, iterator = _train(workdir, steps=6)
  # Batch 0 only gave the shapes; then checkpoint 4's data position: batches 4 and 5.
  assert iterator.served == [0, 4, 5] and result.step == 6
  lines = _messages(caplog, "cannot be read")
  assert len(lines) == 1 and "checkpoint of step 6" in lines[0] and "using step 4" in lines[0]
  assert (checkpoints / "6.corrupt").is_dir() and _committed(checkpoints) == [2, 4, 6]
  reader = checkpointing.Checkpointer(checkpoints, read_only=True)
  _, iterator_state, step = reader.restore()
  reader.close()
  assert (step, iterator_state) == (6, {"index": 6})  # the rerun's own, readable step 6
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
  with pytest.raises(
      checkpointing.NoReadableCheckpointError,
      match=r"holds only damaged checkpoints moved aside earlier \(6\.corrupt\)",
  ):
    _train(workdir, steps=8)
  assert sorted(p.name for p in checkpoints.iterdir()) == ["6.corrupt"]


def test_sigkill_during_an_async_save_resumes_from_the_last_committed(trained, tmp_path, caplog):
  workdir = _copy(trained, tmp_path)
  checkpoints = workdir / "checkpoints"
  env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.Popen(
      [sys.executable, "-c", _SAVE_AND_HOLD, str(checkpoints), "8"],
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      env=env,
      cwd=REPO,
  )
  output, deadline = [], time.time() + 240
  try:
    for line in proc.stdout:
      output.append(line)
      if HOLDING in line or time.time() > deadline:
        break
  finally:
    proc.kill()
    proc.wait(timeout=60)
    proc.stdout.close()
  assert any(HOLDING in line for line in output), "".join(output[-30:])
  assert proc.returncode == -signal.SIGKILL
  partial = checkpoints / f"8{TMP_MARKER}"
  assert (partial / "state").is_dir() and _committed(checkpoints) == [2, 4, 6]

  with caplog.at_level(logging.WARNING):
    result, iterator = _train(workdir, steps=8)
  assert iterator.served == [0, 6, 7] and result.step == 8  # checkpoint 6, its data position
  assert _messages(caplog, f"removing {partial}: a checkpoint save that never completed")
  assert not partial.exists() and _committed(checkpoints) == [4, 6, 8]


class _SigtermAt(testing.StandInIterator):
  """Sends this process SIGTERM when it hands out batch `at_index` (a preemption notice).

  `seen` lists the checkpoint directory at that moment.
  """

  def __init__(self, batch_size: int, *, at_index: int, directory: pathlib.Path):
    super().__init__(batch_size, seed=1)
    self.at_index, self.directory, self.seen = at_index, directory, None

  def __next__(self):
    if self.index == self.at_index:
      self.seen = sorted(p.name for p in self.directory.iterdir())
      os.kill(os.getpid(), signal.SIGTERM)
    return super().__next__()


def test_sigterm_during_an_async_save_still_saves(trained, tmp_path, monkeypatch):
  workdir = _copy(trained, tmp_path)
  checkpoints = workdir / "checkpoints"
  monkeypatch.setattr(
      atomicity.AtomicRenameTemporaryPath, "finalize", testing.delayed_finalize(8, seconds=1.0)
  )
  iterator = _SigtermAt(BATCH, at_index=8, directory=checkpoints)
  result, _ = _train(workdir, steps=12, iterator=iterator)
  # The signal came while step 8 was being written (batch 8 is step 9's).
  assert f"8{TMP_MARKER}" in iterator.seen and "8" not in iterator.seen
  assert result.preempted and result.step == 9
  assert _committed(checkpoints) == [6, 8, 9]
  reader = checkpointing.Checkpointer(checkpoints, read_only=True)
  _, iterator_state, step = reader.restore()
  reader.close()
  assert (step, iterator_state) == (9, {"index": 9})


def _failing_in(directory: pathlib.Path, error_number: int, real):
  """`real` (an Orbax async_path function), raising OSError(error_number) inside `directory`."""

  async def failing(path, *args, **kwargs):
    if str(path).startswith(f"{directory}/"):
      raise OSError(error_number, os.strerror(error_number), str(path))
    return await real(path, *args, **kwargs)

  return failing


# As root a read-only chmod does not stop writes, so the errors are raised inside Orbax's own file
# operations: a read-only mount fails the first one (creating the step directory, in `save`); a full
# disk lets the arrays be written and fails a later metadata write in the background commit,
# leaving a partial directory.


def test_read_only_workdir_keeps_training_then_stops(trained, tmp_path, monkeypatch, caplog):
  workdir = _copy(trained, tmp_path)
  checkpoints = workdir / "checkpoints"
  before = _digest(checkpoints)
  monkeypatch.setattr(async_path, "mkdir", _failing_in(checkpoints, errno.EROFS, async_path.mkdir))
  iterator = testing.StandInIterator(BATCH, seed=1)
  with caplog.at_level(logging.WARNING):
    with pytest.raises(checkpointing.CheckpointSaveError) as info:
      _train(workdir, steps=14, iterator=iterator, max_consecutive_failed_saves=2)
  # Resumed from 6; the save of step 8 failed, training went on and stopped at the second failure.
  assert iterator.served == [0, 6, 7, 8, 9]
  logged = _messages(caplog, "the checkpoint of step 8 could not be written")
  assert len(logged) == 1 and "training goes on" in logged[0], logged
  assert "Read-only file system" in logged[0]
  message = str(info.value)
  assert message.startswith(f"the checkpoint of step 10 could not be written to {checkpoints}")
  for part in (
      "Read-only file system",
      "2 failed checkpoint saves in a row",
      "config.train.max_consecutive_failed_saves=2",
      "newest kept checkpoint: step 6",
  ):
    assert part in message, message
  assert _digest(checkpoints) == before  # earlier checkpoints untouched


def test_disk_full_during_background_saves_then_space_again(trained, tmp_path, monkeypatch, caplog):
  checkpoints = _copy(trained, tmp_path) / "checkpoints"
  before = _digest(checkpoints)
  checkpointer = checkpointing.Checkpointer(
      checkpoints, keep=3, save_every=2, max_consecutive_failed_saves=3
  )
  state, _, _ = checkpointer.restore()
  monkeypatch.setattr(
      async_path, "write_text", _failing_in(checkpoints, errno.ENOSPC, async_path.write_text)
  )
  with caplog.at_level(logging.WARNING):
    assert checkpointer.save(8, state, {"index": 8})  # fails in the background ...
    assert checkpointer.save(10, state, {"index": 10})  # ... noticed here: logged, no raise
    assert checkpointer.failed_saves_in_a_row == 1
    checkpointer.wait_until_finished()
  for step in (8, 10):
    logged = _messages(caplog, f"the checkpoint of step {step} could not be written")
    assert len(logged) == 1 and "No space left on device" in logged[0], logged
  assert checkpointer.failed_saves_in_a_row == 2
  monkeypatch.undo()  # space again: the next save commits and resets the count
  assert checkpointer.save(12, state, {"index": 12})
  checkpointer.wait_until_finished()
  assert checkpointer.failed_saves_in_a_row == 0
  after = _digest(checkpoints)
  assert {k: v for k, v in after.items() if not k.startswith("12")} == {
      k: v for k, v in before.items() if not k.startswith("2")
  }  # 2 pruned only after 12 committed
  assert not [p for p in checkpoints.iterdir() if TMP_MARKER in p.name]
  _, iterator_state, step = checkpointer.restore()
  checkpointer.close()
  assert (step, iterator_state) == (12, {"index": 12})


async def _write_failing_beside(write_events: list[str], left: str):
  """A save whose write fails while another write it started is `left` (started, or not yet)."""
  loop = asyncio.get_running_loop()

  async def other_write():
    write_events.append("started")
    try:
      await asyncio.sleep(60)
    finally:
      write_events.append("ended")

  tasks = [loop.create_task(other_write())]
  if left == "not-started":  # created after the failure is reported: the loop stops first
    loop.call_soon(lambda: tasks.append(loop.create_task(other_write())))
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("left", ["started", "not-started"])
def test_a_failed_save_leaves_no_pending_write_behind(tmp_path, caplog, recwarn, left):
  checkpointing.Checkpointer(tmp_path / "checkpoints").close()  # installs the cancelling
  write_events = []
  with caplog.at_level(logging.ERROR, logger="asyncio"):
    with pytest.raises(OSError, match="No space left"):
      # How Orbax runs each save in its background thread.
      asyncio_utils.run_sync(_write_failing_beside(write_events, left))
    gc.collect()
  assert not [str(w.message) for w in recwarn if "never awaited" in str(w.message)]
  assert not [r.getMessage() for r in caplog.records if "destroyed" in r.getMessage()]
  assert write_events == ["started", "ended"]  # cancelled; the one not started never runs


def test_evaluate_takes_the_newest_readable_checkpoint_and_warns(trained, tmp_path, caplog):
  workdir = _copy(trained, tmp_path)
  checkpoints = workdir / "checkpoints"
  _remove_commit_record(checkpoints / "6")
  with caplog.at_level(logging.WARNING):
    variables, step = checkpointing.restore_variables(workdir / "checkpoints")
  assert step == 4
  lines = _messages(caplog, "cannot be read")
  assert len(lines) == 1 and "checkpoint of step 6" in lines[0], lines
  assert "left in place, using step 4" in lines[0]
  assert _committed(checkpoints) == [2, 4, 6]  # evaluation changes nothing
  assert set(variables) == {"params"}


def test_evaluate_step_selects_the_checkpoint(trained):
  workdir, final_params = trained
  newest, newest_step = checkpointing.restore_variables(workdir / "checkpoints", step=-1)
  assert newest_step == 6
  chex.assert_trees_all_close(jax.device_get(newest["params"]), final_params)
  older, older_step = checkpointing.restore_variables(workdir / "checkpoints", step=2)
  assert older_step == 2
  assert not np.array_equal(older["params"]["query_feat"], final_params["query_feat"])


def test_evaluate_damaged_step_is_a_one_line_error(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  _truncate_array_files(workdir / "checkpoints" / "6")
  with pytest.raises(checkpointing.DamagedCheckpointError) as info:
    checkpointing.restore_variables(workdir / "checkpoints", step=6)
  message = str(info.value)
  assert message.startswith(
      f"checkpoint {workdir / 'checkpoints' / '6'} cannot be read: first " "unreadable item state/"
  ), message
  assert "committed: 2, 4, 6" in message and "\n" not in message and len(message) < 600


def test_evaluate_missing_step_names_the_committed_ones(trained):
  with pytest.raises(
      FileNotFoundError,
      match=r"no checkpoint of step 5 in .*checkpoints " r"\(committed steps: 2, 4, 6\)",
  ):
    checkpointing.restore_variables(trained[0] / "checkpoints", step=5)


def _run_main(*args, devices: int | None = 1) -> subprocess.CompletedProcess:
  """main.py in a subprocess; devices=None: a plain run (no XLA_FLAGS)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if devices is not None:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return subprocess.run(
      [sys.executable, str(REPO / "main.py"), *args],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=900,
  )


def _halve_files_over_1kib(step_dir: pathlib.Path) -> None:
  """The issue's reproduction: half of each array file over 1 KiB (some arrays stay readable)."""
  for f in _array_files(step_dir):
    if f.stat().st_size > 1024:
      os.truncate(f, f.stat().st_size // 2)


MAIN_DAMAGES = {
    "every-file": _truncate_array_files,
    "files-over-1kib": _halve_files_over_1kib,
    "one-file": _truncate_the_file_of_the_largest_parameter,
}


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
  """A 4-step run of the tiny synthetic config through main.py: checkpoints 2 and 4."""
  root = tmp_path_factory.mktemp("main_run")
  common = [
      f"--config.data.synthetic.cache_dir={root / 'cache'}",
      "--config.data.synthetic.num_train_videos=4",
      "--config.data.synthetic.num_val_videos=2",
      "--config.train.batch_size=2",
      "--config.train.checkpoint_every=2",
      "--config.train.image_every=0",
  ]
  workdir = root / "run"
  result = _run_main(
      "--config",
      "configs/synthetic.py",
      "--workdir",
      str(workdir),
      "--mode",
      "train",
      "--config.train.steps=4",
      *common,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert _committed(workdir / "checkpoints") == [2, 4]
  return workdir


def _assert_quiet(stderr: str) -> None:
  """No traceback, no abandoned-read report, and the damage said in at most a few lines."""
  for noise in ("Traceback", "never retrieved", "Exception ignored"):
    assert noise not in stderr, stderr[-3000:]
  assert len(stderr.splitlines()) <= 3, stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("devices", [None, 8], ids=["plain", "8-devices"])
@pytest.mark.parametrize("damage", MAIN_DAMAGES.values(), ids=MAIN_DAMAGES.keys())
def test_main_evaluates_a_damaged_run_quietly(main_run, tmp_path, damage, devices):
  """The issue's steps: the newest checkpoint damaged, evaluate falls back to step 2 in one line."""
  workdir = tmp_path / "run"
  shutil.copytree(main_run, workdir)
  checkpoints = workdir / "checkpoints"
  damage(checkpoints / "4")
  result = _run_main("--workdir", str(workdir), "--mode", "evaluate", devices=devices)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "left in place, using step 2" in result.stderr, result.stderr[-3000:]
  _assert_quiet(result.stderr)
  assert (workdir / "eval" / "metrics_2.json").is_file()

  result = _run_main("--workdir", str(workdir), "--mode", "evaluate", "--config.eval.step=4")
  assert result.returncode == 1
  errors = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and errors[0].startswith(
      f"error: checkpoint {checkpoints / '4'} cannot be read: first unreadable item "
  ), errors
  _assert_quiet(result.stderr)


@pytest.mark.slow
@pytest.mark.parametrize("damage", MAIN_DAMAGES.values(), ids=MAIN_DAMAGES.keys())
def test_main_resumes_a_damaged_run_quietly(main_run, tmp_path, damage):
  workdir = tmp_path / "run"
  shutil.copytree(main_run, workdir)
  checkpoints = workdir / "checkpoints"
  damage(checkpoints / "4")
  result = _run_main("--workdir", str(workdir), "--mode", "train", "--config.train.steps=5")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Resuming from step 2 (checkpoint in {checkpoints})" in result.stdout
  assert "moved aside" in result.stderr
  _assert_quiet(result.stderr)
  assert (checkpoints / "4.corrupt").is_dir() and _committed(checkpoints) == [2, 4, 5]
