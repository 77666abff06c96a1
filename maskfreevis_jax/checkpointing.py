"""Orbax checkpoints of the train state plus the input pipeline position, and preemption handling.

Layout: `<workdir>/checkpoints/<step>/{state, data_iterator, config}`.
  * state: the TrainState pytree (saved sharded, restored straight into the target shardings);
  * data_iterator: every host's iterator state (JSON), so a resumed run reads the same stream;
  * config: the resolved experiment config (`defaults.load_config` reads it back: evaluate,
    predict and export need only `--workdir`) and the model fingerprint that explains a
    mismatching checkpoint clearly. Checkpoints of earlier versions hold the fingerprint alone.
Saves are asynchronous and atomic (Orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it
when complete), so a process killed mid-save leaves the previous checkpoints intact; the partial
directory is removed by the next run.

Faults (see the README's "Reliability" section):
  * A checkpoint counts as readable only when it is restored completely (its Orbax commit record
    `_CHECKPOINT_METADATA`, every item and every array). Resuming takes the newest readable one;
    newer damaged ones are renamed `<step>.corrupt` (never deleted) and named in the log. When no
    checkpoint can be read nothing is renamed and the run stops (`NoReadableCheckpointError`).
  * A save that fails (full disk, unwritable directory) is logged and training goes on; after
    `max_consecutive_failed_saves` failures in a row it stops (`CheckpointSaveError`). Old
    checkpoints are pruned (keep-last-N) only after a newer one has committed.
  * Every array is saved with a checksum per saved block (`array_digests`: XXH3-64 of each
    shard's bytes, in the config item), checked after it is read: a changed byte is damage like an
    unreadable array.
  * A save that fails leaves no write pending behind it (`_run_then_cancel_leftovers`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging as std_logging
import os
import pathlib
import re
import shutil
import signal
import sys
import threading
import time
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint._src import asyncio_utils

from maskfreevis_jax import array_digests
from maskfreevis_jax import process_agreement
from maskfreevis_jax import sharding as sharding_lib

_STATE = "state"
_ITERATOR = "data_iterator"
_CONFIG = "config"
_ITEMS = (_STATE, _ITERATOR, _CONFIG)
# Orbax (0.12) writes this file into a step directory before renaming it into place (the commit):
# a step directory without it was not written by a completed save.
_COMMIT_RECORD = "_CHECKPOINT_METADATA"
# Name marker of Orbax's temporary (uncommitted) step directories: `<step>.orbax-checkpoint-tmp-*`.
_TMP_MARKER = ".orbax-checkpoint-tmp"
QUARANTINE_SUFFIX = ".corrupt"
# The config item says whether its step's arrays carry checksums, and holds them.
_CHECKSUMS_KEY = "array_checksums"
_PER_BLOCK = "xxh3_64_per_block"  # `array_digests`: the table is under _DIGESTS_KEY
_DIGESTS_KEY = "array_digests"


class CheckpointMismatchError(ValueError):
  """The checkpoint in the workdir does not fit the model/optimizer of the current config."""


class CheckpointError(RuntimeError):
  """A checkpoint problem that needs the user (main.py prints it as one line)."""


class DamagedCheckpointError(CheckpointError):
  """The checkpoint asked for by step cannot be read completely."""


class NoReadableCheckpointError(CheckpointError):
  """The checkpoint directory has checkpoints but none of them can be read."""


class CheckpointSaveError(CheckpointError):
  """Too many checkpoint saves in a row failed (full disk, unwritable directory)."""


class _Damage(Exception):
  """Internal: why one step cannot be read; `item` names the first unreadable part."""

  def __init__(self, item: str, detail: str):
    super().__init__(f"{item}: {detail}")
    self.item, self.detail = item, detail


def _agreed_damage(damage: _Damage | None) -> _Damage | None:
  """The damage every process reports (that of the lowest-numbered process that found any, its
  number named on several processes); None when every process read its part. A collective."""
  failure = process_agreement.first_failure(
      None if damage is None else f"{damage.item}\n{damage.detail}"
  )
  if failure is None:
    return None
  process, text = failure
  item, detail = text.split("\n", 1)
  if jax.process_count() > 1:
    detail = f"{detail} (read by process {process} of {jax.process_count()})"
  return _Damage(item, detail)


def _describe_error(error: BaseException, root: pathlib.Path | None = None) -> str:
  """One short line from an Orbax/TensorStore/OS error (no spec dumps, paths under `root` short)."""
  text = str(error).strip() or type(error).__name__
  text = re.split(r" \[(?:tensorstore_spec|source locations)=", text)[0].splitlines()[0]
  if " See full TensorStore details" in text:  # Orbax's wrapper: the detail is in its cause.
    text = text.split(" See full TensorStore details")[0]
    if error.__cause__ is not None:
      text = f"{text} {_describe_error(error.__cause__, root)}"
  files = re.findall(r'local file "([^"]+)"', text)
  reason = text.rsplit(": ", 1)[-1] if files else text
  if files:
    file = files[-1]
    if root is not None and file.startswith(str(root) + "/"):
      file = file[len(str(root)) + 1 :]
    reason = f"file {file}: {reason}"
  return reason if len(reason) <= 300 else reason[:297] + "..."


def _unreadable_array(error: BaseException | None) -> str | None:
  """The array a TensorStore read error (or its cause, under Orbax's wrapper) names
  (`params.x.kernel`), or None."""
  while error is not None:
    found = re.search(r'Error reading "([^"]+?)/(?:\.zarray|[^"/]*)" in OCDBT', str(error))
    found = found or re.search(r'Error reading shard entry [^"]* in "([^"]+?)/c[/"]', str(error))
    if found:
      return found.group(1)
    error = error.__cause__
  return None


class _OrbaxOSErrorTracebacks(std_logging.Filter):
  """Keeps the message but drops the traceback of Orbax log records about a failed write.

  A save that fails on a full disk or an unwritable directory (here, or on another process: the
  abort that releases this one) makes Orbax log the same error with a full traceback from three
  background threads (~150 lines); `Checkpointer` reports it in one line, and the messages stay.
  """

  def filter(self, record: std_logging.LogRecord) -> bool:
    if (
        record.exc_info
        and isinstance(record.exc_info[1], (OSError, process_agreement.SaveAbortedError))
        and f"{os.sep}orbax{os.sep}" in record.pathname
    ):
      record.exc_info, record.exc_text = None, None
    return True


class _OrbaxReadOnlyNotices(std_logging.Filter):
  """Drops Orbax's warnings that a read-only manager is read-only (evaluate, predict, export)."""

  _NOTICES = ("Given directory is read only", "CheckpointManagerOptions.read_only=True")

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self._NOTICES)


def _ignore_late_read_callbacks(unraisable) -> None:
  """`sys.unraisablehook` that drops the errors of abandoned checkpoint reads.

  When one array of a checkpoint cannot be read, Orbax closes its event loop while TensorStore
  still completes the other reads of that restore: each completion then fails to call back into
  the closed loop ("Event loop is closed"), and each abandoned Orbax read coroutine raises its own
  read error when it is closed. Python would print a traceback for every one (hundreds for a
  model); `Checkpointer` reports the damage in one line.
  """
  error, obj = unraisable.exc_value, unraisable.object
  if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
    return
  code = getattr(obj, "cr_code", None)
  if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
    logging.debug("abandoned checkpoint read %s: %s", code.co_name, error)
    return
  _previous_unraisablehook(unraisable)


_previous_unraisablehook = sys.unraisablehook


def _quiet_orbax_failures() -> None:
  """Installs the filters above once per process."""
  if sys.unraisablehook is not _ignore_late_read_callbacks:
    global _previous_unraisablehook
    _previous_unraisablehook = sys.unraisablehook
    sys.unraisablehook = _ignore_late_read_callbacks
  absl_logger = logging.get_absl_logger()
  for quiet in (_OrbaxOSErrorTracebacks, _OrbaxReadOnlyNotices):
    if not any(isinstance(f, quiet) for f in absl_logger.filters):
      absl_logger.addFilter(quiet())


# How long closing one of Orbax's event loops waits for its cancelled leftover tasks.
_LEFTOVER_TASKS_TIMEOUT_S = 60.0


def _run_then_cancel_leftovers(coro):
  """Orbax's `asyncio_utils._run_sync_via_new_loop`, cancelling what the coroutine left running.

  Orbax runs each save, commit and restore in a fresh event loop that it closes as soon as the
  coroutine returns or raises. When one array write of a save fails (a full disk), the writes
  it had started for the other arrays are still pending: closed with the loop, each was
  destroyed unfinished ("Task was destroyed but it is pending!"), and one created but not yet
  started warned `coroutine ... was never awaited` when garbage collected, later, in whatever
  code ran then. Here they are cancelled and awaited before the loop closes.
  """
  loop = asyncio.new_event_loop()
  try:
    asyncio.set_event_loop(loop)
    return loop.run_until_complete(coro)
  finally:
    try:
      leftovers = asyncio.all_tasks(loop)
      for task in leftovers:
        task.cancel()
      if leftovers:
        loop.run_until_complete(asyncio.wait(leftovers, timeout=_LEFTOVER_TASKS_TIMEOUT_S))
        for task in leftovers:  # their errors belong to the failure already being raised
          if task.done() and not task.cancelled():
            task.exception()
    finally:
      asyncio.set_event_loop(None)
      loop.close()


_run_then_cancel_leftovers.cancels_leftovers = True


def _install_leftover_cancelling() -> None:
  """Makes Orbax's event loops cancel their leftover tasks (`_run_then_cancel_leftovers`)."""
  # pylint: disable=protected-access
  if not getattr(asyncio_utils._run_sync_via_new_loop, "cancels_leftovers", False):
    asyncio_utils._run_sync_via_new_loop = _run_then_cancel_leftovers


def _encode_iterator_state(state: Any) -> dict:
  """JSON-safe wrapper (bytes are base64 encoded)."""
  if state is None:
    return {"kind": "none"}
  if isinstance(state, (bytes, bytearray)):
    return {"kind": "bytes", "value": base64.b64encode(bytes(state)).decode("ascii")}
  return {"kind": "json", "value": state}


def _decode_iterator_state(encoded: dict) -> Any:
  kind = encoded.get("kind")
  if kind == "none":
    return None
  if kind == "bytes":
    return base64.b64decode(encoded["value"])
  if kind == "json":
    return encoded["value"]
  raise ValueError(f"unknown data iterator state kind {kind!r} in checkpoint")


def _fingerprint_of(saved: Any) -> dict:
  """The fingerprint of a saved config item (earlier versions saved the fingerprint alone)."""
  if isinstance(saved, dict) and {"fingerprint", "config"} <= set(saved):
    return saved["fingerprint"] or {}
  return saved or {}


def _config_of(saved: Any) -> dict | None:
  """The resolved config of a saved config item; None for earlier versions' checkpoints."""
  if isinstance(saved, dict) and {"fingerprint", "config"} <= set(saved):
    return saved["config"]
  return None


def _saved_digests(saved: Any) -> dict | None:
  """The digest table of a saved config item; None for checkpoints written without one."""
  if isinstance(saved, dict) and saved.get(_CHECKSUMS_KEY) == _PER_BLOCK:
    return saved.get(_DIGESTS_KEY) or {}
  return None


def _verify(step_dir: pathlib.Path, restored: Any, saved: Any) -> None:
  """Checks restored arrays against the checksums saved with them, on this process alone.

  Logs one line for a checkpoint without checksums (an older format) and one for arrays no saved
  block covers (restored split finer than saved).

  Raises:
    _Damage: naming the first array whose bytes differ from those saved.
  """
  table = _saved_digests(saved)
  if table is None:
    logging.warning(
        "checkpoint %s carries no checksums (written before they were saved): restored unverified",
        step_dir,
    )
    return
  try:
    verdict = array_digests.verify(restored, table)
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # a table edited or mangled
    raise _Damage(_CONFIG, f"its checksum table cannot be read ({type(e).__name__}: {e})") from e
  if verdict.mismatch is not None:
    name, why = verdict.mismatch
    raise _Damage(f"{_STATE}/{name}", why)
  if verdict.unverified:
    logging.warning(
        "checkpoint %s: %d array(s) restored partly unverified (split finer than saved; the "
        "checksums are of the saved blocks), first %s",
        step_dir,
        len(verdict.unverified),
        verdict.unverified[0],
    )


def restore_variables(directory: str | pathlib.Path, step: int | None = None) -> tuple[dict, int]:
  """Model variables of the checkpoint `step` (None, 0 or -1: newest readable) in `directory`.

  Params and model state only, on this host's first device; nothing in the directory changes.

  Raises:
    FileNotFoundError: naming the directory when it has no checkpoint, or the step when there is
      no checkpoint of that step.
    DamagedCheckpointError: the checkpoint of `step` cannot be read.
    NoReadableCheckpointError: no checkpoint in the directory can be read.
  """
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(
        f"no checkpoints in {directory}: train first (--mode train) or pass --workdir of a "
        "trained run"
    )
  checkpointer = Checkpointer(directory, read_only=True)
  try:
    found = checkpointer.restore_variables(None if step is None or int(step) <= 0 else int(step))
  finally:
    checkpointer.close()
  if found is None:
    raise FileNotFoundError(f"no finished checkpoint in {directory}")
  variables, found_step, _ = found
  return variables, int(found_step)


def saved_config(directory: str | pathlib.Path, step: int | None = None) -> dict | None:
  """The resolved config saved with checkpoint `step` (default newest) in `directory`, or None.

  None: there is no checkpoint, or it was written before configs were saved with checkpoints.
  """
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    return None
  checkpointer = Checkpointer(directory, read_only=True)
  try:
    return checkpointer.saved_config(step)
  finally:
    checkpointer.close()


class PreemptionFlag:
  """Set by SIGTERM (and SIGINT if asked); the train loop checks it once per step.

  On multi-host runs Orbax's `reached_preemption` (jax's preemption sync point) is consulted as
  well so that every host stops at the same step.
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self._event = threading.Event()
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning("received signal %d: will save a checkpoint and stop after this step", signum)
    self._event.set()

  def is_set(self) -> bool:
    return self._event.is_set()

  def restore_handlers(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}


def _remove_tree(path: pathlib.Path, attempts: int = 5) -> None:
  """`shutil.rmtree` that tolerates files vanishing or appearing underneath it.

  After a failed asynchronous save, Orbax's background threads may still be deleting their lock
  files (a plain rmtree then fails with FileNotFoundError) or finishing a write (the directory is
  not empty yet when rmtree removes it).
  """

  def ignore_vanished(function, name, exc_info):
    del function, name
    if not isinstance(exc_info[1], FileNotFoundError):
      raise exc_info[1]

  for attempt in range(attempts):
    try:
      shutil.rmtree(path, onerror=ignore_vanished)
    except OSError:
      if attempt == attempts - 1:
        raise
    if not path.exists():
      return
    time.sleep(0.05 * (attempt + 1))
  raise OSError(f"{path} is still there after {attempts} attempts to remove it")


class Checkpointer:
  """Periodic, keep-last-N checkpoints of (train state, data iterator state, config fingerprint).

  Restores take the newest checkpoint that can be read completely; saves that fail are counted
  and training goes on until `max_consecutive_failed_saves` fail in a row (module docstring).
  """

  def __init__(
      self,
      directory: str | pathlib.Path,
      *,
      keep: int = 3,
      save_every: int = 1,
      fingerprint: dict | None = None,
      config: dict | None = None,
      checksums: bool = True,
      async_save: bool = True,
      max_consecutive_failed_saves: int = 3,
      read_only: bool = False,
  ):
    """Opens (and, unless read-only, creates) the checkpoint directory.

    Args:
      directory: the checkpoint directory (`<workdir>/checkpoints`).
      keep: committed checkpoints kept (older ones are deleted after a newer one commits);
        <= 0 keeps all.
      save_every: `save` writes at multiples of this step.
      fingerprint: flat config values saved with each checkpoint (for clear mismatch errors).
      config: the resolved config (`ConfigDict.to_dict()`), saved with each checkpoint.
      checksums: save a checksum of every block of every array (`array_digests`), verified
        after each restore; False writes checkpoints without (as before checksums existed).
      async_save: write in a background thread (the train loop goes on meanwhile).
      max_consecutive_failed_saves: stop (`CheckpointSaveError`) after this many failed saves
        in a row; earlier failures are logged and training goes on.
      read_only: evaluation/export: nothing is created, cleaned, renamed or deleted.
    """
    self.directory = pathlib.Path(directory).absolute()
    self.keep = int(keep)
    self.save_every = max(int(save_every), 1)
    self.fingerprint = fingerprint or {}
    self.config = config
    self.checksums = bool(checksums)
    self.async_save = bool(async_save)
    self.max_consecutive_failed_saves = max(int(max_consecutive_failed_saves), 1)
    self.read_only = bool(read_only)
    self.failed_saves_in_a_row = 0
    self._readers: dict[str, ocp.CheckpointManager] = {}
    self._pending_step: int | None = None
    # On several processes a failed background write releases the others (process_agreement).
    self._barrier = process_agreement.AbortableBarrier()
    _quiet_orbax_failures()
    _install_leftover_cancelling()
    if not read_only and jax.process_index() == 0:
      self._remove_uncommitted()
    # Retention is ours (max_to_keep=None): Orbax would prune when a save is launched, before we
    # know that the new checkpoint commits. The step directory is created in `save` itself: created
    # in the background, a failure leaves Orbax's writer threads waiting for it (20 minutes).
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None,
        create=not read_only,
        read_only=read_only,
        save_interval_steps=0 if read_only else 1,
        enable_async_checkpointing=self.async_save,
        cleanup_tmp_directories=False,
        async_options=ocp.AsyncOptions(
            create_directories_asynchronously=False,
            barrier_sync_fn=self._barrier if jax.process_count() > 1 else None,
        ),
    )
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=options,
        item_handlers={
            _STATE: ocp.PyTreeCheckpointHandler(),
            _ITERATOR: ocp.JsonCheckpointHandler(),
            _CONFIG: ocp.JsonCheckpointHandler(),
        },
    )

  # -------------------------------------------------------------------------------------------
  # Directory housekeeping
  # -------------------------------------------------------------------------------------------

  def _remove_uncommitted(self, step: int | None = None) -> None:
    """Deletes Orbax temporary directories (of `step`, or all): saves that never committed."""
    prefix = "" if step is None else f"{step}{_TMP_MARKER}"
    try:
      partial = sorted(
          p for p in self.directory.iterdir() if _TMP_MARKER in p.name and p.name.startswith(prefix)
      )
    except OSError:
      return  # No directory yet, or unreadable: the manager reports the latter.
    for path in partial:
      logging.warning("removing %s: a checkpoint save that never completed", path)
      try:
        if path.is_dir():
          _remove_tree(path)
        else:
          path.unlink()
      except OSError as e:
        logging.warning("could not remove %s (%s); it is ignored", path, e)

  def quarantined(self) -> list[pathlib.Path]:
    """Checkpoints moved aside as damaged (`<step>.corrupt*`)."""
    if not self.directory.is_dir():
      return []
    return sorted(p for p in self.directory.iterdir() if QUARANTINE_SUFFIX in p.name)

  def _quarantine(self, step: int) -> str:
    """Renames a damaged step directory to `<step>.corrupt` (or `.corrupt.N`); never deletes.

    Returns:
      What happened, for the log line.
    """
    source = self.directory / str(step)
    target = self.directory / f"{step}{QUARANTINE_SUFFIX}"
    n = 1
    while target.exists():
      target = self.directory / f"{step}{QUARANTINE_SUFFIX}.{n}"
      n += 1
    # Every process names the same target: none looks again after process 0 has renamed.
    process_agreement.sync_processes(f"checkpoint_quarantine_name_{step}")
    outcome = f"moved aside to {target}"
    if jax.process_index() == 0:
      try:
        source.rename(target)
      except OSError as e:
        outcome = f"could not be moved aside ({e}), left in place"
    process_agreement.sync_processes(f"checkpoint_quarantine_{step}")
    return outcome

  def _prune(self) -> None:
    """Deletes the oldest committed checkpoints beyond `keep` (renamed first: atomic)."""
    steps = sorted(self.manager.all_steps())
    if self.keep <= 0 or len(steps) <= self.keep:
      return
    for step in steps[: -self.keep]:
      if jax.process_index() == 0:
        doomed = self.directory / f"{step}{_TMP_MARKER}-deleting"
        try:
          (self.directory / str(step)).rename(doomed)
          _remove_tree(doomed)
        except OSError as e:  # Kept, or removed by the next run; training goes on either way.
          logging.warning(
              "could not delete the old checkpoint of step %d in %s: %s", step, self.directory, e
          )
      process_agreement.sync_processes(f"checkpoint_prune_{step}")
    self.manager.reload()

  # -------------------------------------------------------------------------------------------
  # Saving
  # -------------------------------------------------------------------------------------------

  def latest_step(self) -> int | None:
    """The newest committed step (not checked for readability; `restore` does that)."""
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    """Committed steps, oldest first."""
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, iterator_state: Any, *, force: bool = False) -> bool:
    """Saves at multiples of `save_every` (or always with force). Returns whether it started.

    A save that fails (now, or in the background: noticed at the next save or `close`) is logged,
    its partial directory removed, and training goes on.

    Raises:
      CheckpointSaveError: after `max_consecutive_failed_saves` failed saves in a row.
    """
    if not force and step % self.save_every:
      return False
    self._settle()
    if step in self.manager.all_steps():
      return False
    error = self._launch(step, state, iterator_state)
    failure = self._agreed_failure(error)
    if failure is not None:
      if error is None:  # Ours started but another process's did not: ours is released, dropped.
        self._wait_quietly()
      self._save_failed(step, failure)
      return False
    logging.info("checkpoint for step %d being written to %s", step, self.directory)
    self._pending_step = step
    if not self.async_save:
      self._settle()
    return True

  def _launch(self, step: int, state: Any, iterator_state: Any) -> Exception | None:
    """Starts writing `step` (in the background when async); returns the error if it failed."""
    own = {"iterator": _encode_iterator_state(iterator_state)}
    if self.checksums:
      own["digests"] = array_digests.process_digests(state)
    per_process = [json.loads(s) for s in sharding_lib.gather_host_strings(json.dumps(own))]
    config_item = {"fingerprint": self.fingerprint, "config": self.config}
    if self.checksums:
      config_item[_CHECKSUMS_KEY] = _PER_BLOCK
      config_item[_DIGESTS_KEY] = array_digests.merge([p["digests"] for p in per_process])
    self._barrier.begin_save()
    try:
      self.manager.save(
          step,
          args=ocp.args.Composite(
              **{
                  _STATE: ocp.args.PyTreeSave(state),
                  _ITERATOR: ocp.args.JsonSave(
                      {"per_process": [p["iterator"] for p in per_process]}
                  ),
                  _CONFIG: ocp.args.JsonSave(config_item),
              }
          ),
          force=True,
      )
    except Exception as error:  # pylint: disable=broad-except
      self._barrier.abort(_describe_error(error, self.directory))
      return error
    return None

  def _settle(self) -> None:
    """Waits for the save in flight; counts it as committed (then prunes) or failed.

    On several processes the verdict is collective: a save counts as committed only when every
    process wrote its part, and a failure is reported with the first failing process's reason on
    all of them (each process calls this at the same point: `save`, `restore`, `close`).
    """
    step, self._pending_step = self._pending_step, None
    error = None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      error = e
      if not isinstance(e, process_agreement.SaveAbortedError):
        self._barrier.abort(_describe_error(e, self.directory))
    if step is None:
      if error is not None:
        logging.error(
            "checkpoint save in %s failed: %s",
            self.directory,
            _describe_error(error, self.directory),
        )
      return
    if error is None and not (self.directory / str(step) / _COMMIT_RECORD).is_file():
      error = FileNotFoundError(f"{self.directory / str(step)} was not committed")
    failure = self._agreed_failure(error)
    if failure is None:
      self.failed_saves_in_a_row = 0
      self._prune()
      return
    self._save_failed(step, failure)

  def _agreed_failure(self, error: BaseException | None) -> tuple[int, str] | None:
    """(process, reason) of the failed save, the same on every process; None if all wrote."""
    if error is None:
      return process_agreement.first_failure(None)
    return process_agreement.first_failure(
        _describe_error(error, self.directory),
        derived=isinstance(error, process_agreement.SaveAbortedError),
    )

  def _wait_quietly(self) -> None:
    """Waits for the save in flight, whose failure is already counted."""
    try:
      self.manager.wait_until_finished()
    except Exception:  # pylint: disable=broad-except
      pass

  def _save_failed(self, step: int, failure: tuple[int, str]) -> None:
    """Counts a failed save (`failure`: the failing process and its reason), logs it or raises."""
    process, reason = failure
    if jax.process_count() > 1:
      reason = f"process {process} of {jax.process_count()}: {reason}"
    self.failed_saves_in_a_row += 1
    if jax.process_index() == 0:
      self._remove_uncommitted(step)
    try:
      self.manager.reload()
    except Exception:  # pylint: disable=broad-except
      pass  # The directory itself may be unreadable; the next save reports that.
    message = (
        f"the checkpoint of step {step} could not be written to {self.directory} " f"({reason})"
    )
    committed = self.all_steps()
    kept = f"newest kept checkpoint: step {committed[-1]}" if committed else "no checkpoint kept"
    if self.failed_saves_in_a_row >= self.max_consecutive_failed_saves:
      raise CheckpointSaveError(
          f"{message}: {self.failed_saves_in_a_row} failed checkpoint saves in a row "
          f"(config.train.max_consecutive_failed_saves={self.max_consecutive_failed_saves}), "
          f"stopping; earlier checkpoints are untouched ({kept}). Free disk space or make the "
          "directory writable, then rerun the same command to resume."
      )
    logging.error(
        "%s; training goes on (%d failed in a row, stops at %d; %s)",
        message,
        self.failed_saves_in_a_row,
        self.max_consecutive_failed_saves,
        kept,
    )

  def reached_preemption(self, step: int) -> bool:
    return jax.process_count() > 1 and self.manager.reached_preemption(step)

  # -------------------------------------------------------------------------------------------
  # Restoring
  # -------------------------------------------------------------------------------------------

  def _check_compatible(
      self, step: int, metadata: Any, saved_fingerprint: dict, abstract_state: Any
  ) -> None:
    """Raises CheckpointMismatchError naming the first parameter whose shape differs."""
    step_dir = self.directory / str(step)
    saved = {
        array_digests.path_name(p): tuple(getattr(m, "shape", ()) or ())
        for p, m in jax.tree_util.tree_flatten_with_path(metadata)[0]
    }
    wanted = {
        array_digests.path_name(p): tuple(getattr(x, "shape", ()) or ())
        for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]
    }
    hint = ""
    differing = {
        k: (saved_fingerprint.get(k), v)
        for k, v in self.fingerprint.items()
        if k in saved_fingerprint and saved_fingerprint[k] != v
    }
    if differing:
      hint = "; the checkpoint was written with a different config: " + ", ".join(
          f"{k}={a!r} (now {b!r})" for k, (a, b) in sorted(differing.items())
      )
    # Parameters first: they are what a user recognises (optimizer slots mirror them).
    for name in sorted(wanted, key=lambda n: (not n.startswith("params/"), n)):
      if name not in saved:
        raise CheckpointMismatchError(
            f"checkpoint {step_dir} does not fit the current config: parameter '{name}' "
            f"(shape {wanted[name]}) is missing from the checkpoint{hint}. Use a fresh --workdir."
        )
      if saved[name] != wanted[name]:
        raise CheckpointMismatchError(
            f"checkpoint {step_dir} does not fit the current config: parameter '{name}' has shape "
            f"{saved[name]} in the checkpoint but {wanted[name]} in the model{hint}. "
            "Use a fresh --workdir."
        )
    extra = sorted(set(saved) - set(wanted))
    if extra:
      raise CheckpointMismatchError(
          f"checkpoint {step_dir} does not fit the current config: it has parameter '{extra[0]}' "
          f"(shape {saved[extra[0]]}) that the model lacks{hint}. Use a fresh --workdir."
      )

  def _read(self, step: int, abstract_state: Any) -> tuple[Any, Any, Any]:
    """(state, this host's iterator state, saved config item) of `step`, read completely by this
    process (its bytes checked against the saved checksums), or raises _Damage.

    Raises:
      _Damage: naming the first unreadable item (commit record, item, array).
      CheckpointMismatchError: the checkpoint is readable but of another model.
    """
    step_dir = self.directory / str(step)
    try:
      json.loads((step_dir / _COMMIT_RECORD).read_text())
    except FileNotFoundError as e:
      raise _Damage(_COMMIT_RECORD, "missing (the save did not complete)") from e
    except (OSError, ValueError) as e:
      raise _Damage(_COMMIT_RECORD, _describe_error(e, step_dir)) from e
    for item in _ITEMS:
      if not (step_dir / item).is_dir():
        raise _Damage(item, "not a directory" if (step_dir / item).exists() else "missing")

    def damage(item, error):
      array = _unreadable_array(error) if item == _STATE else None
      return _Damage(f"{item}/{array}" if array else item, _describe_error(error, step_dir))

    def restore_item(item, args):
      try:
        return self._reader().restore(step, args=ocp.args.Composite(**{item: args}))[item]
      except Exception as e:  # pylint: disable=broad-except
        raise damage(item, e) from e

    iterator_states = (restore_item(_ITERATOR, ocp.args.JsonRestore()) or {}).get("per_process", [])
    saved_item = restore_item(_CONFIG, ocp.args.JsonRestore())
    saved_fingerprint = _fingerprint_of(saved_item)
    try:
      metadata = self._reader().item_metadata(step)[_STATE]
    except Exception as e:  # pylint: disable=broad-except
      raise damage(_STATE, e) from e
    if metadata is None:
      raise _Damage(_STATE, "its tree metadata cannot be read")
    if abstract_state is None:  # Evaluation: every array as saved, replicated on this host.
      replicated = sharding_lib.replicated(sharding_lib.create_mesh(1))
      abstract_state = jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated), dict(metadata)
      )
    else:
      self._check_compatible(step, metadata, saved_fingerprint, abstract_state)
    state = restore_item(_STATE, ocp.args.StandardRestore(abstract_state))
    _verify(step_dir, state, saved_item)
    if iterator_states and len(iterator_states) != jax.process_count():
      raise CheckpointMismatchError(
          f"checkpoint {step_dir} holds data iterator states of {len(iterator_states)} "
          f"processes but this run has {jax.process_count()}"
      )
    iterator_state = (
        _decode_iterator_state(iterator_states[jax.process_index()]) if iterator_states else None
    )
    return state, iterator_state, saved_item

  def _try_read(self, step: int, abstract_state: Any) -> tuple[Any, _Damage | None]:
    """((state, iterator state), None), or (None, damage) when any process cannot read it.

    Each process reads and checks its own part, then they agree on the verdict, so every process
    takes the same one.
    """
    result, damage = None, None
    try:
      result = self._read(step, abstract_state)
    except _Damage as e:
      damage = e
    damage = _agreed_damage(damage)
    if damage is not None:
      return None, damage
    state, iterator_state, _ = result
    return (state, iterator_state), None

  def restore(
      self, abstract_state: Any = None, step: int | None = None
  ) -> tuple[Any, Any, int] | None:
    """Restores (state, this host's iterator state, step); None if there is no checkpoint.

    Without `step` the newest checkpoint that reads completely is used. Newer damaged ones are
    logged (one line each: step, directory, first unreadable item) and, unless read-only, renamed
    to `<step>.corrupt` once an older one has been read.

    Args:
      abstract_state: pytree of jax.ShapeDtypeStruct with `.sharding` (restore target layout);
        None: the saved tree and dtypes, replicated (evaluation).
      step: a specific step (its damage is an error), default the newest readable.

    Raises:
      DamagedCheckpointError: `step` was given and cannot be read.
      FileNotFoundError: `step` was given and there is no such checkpoint.
      NoReadableCheckpointError: there are checkpoints (or quarantined ones) but none reads.
      CheckpointMismatchError: the newest readable checkpoint belongs to another model.
    """
    found = self._restore_with(lambda s: self._try_read(s, abstract_state), step)
    return None if found is None else (*found[0], found[1])

  def restore_variables(self, step: int | None = None) -> tuple[dict, int, dict | None] | None:
    """Model variables only (params and model state), on this host's first device.

    For the modes that only infer: the optimizer state is not read. Damaged checkpoints are
    passed over as in `restore` (a damaged optimizer slot is not noticed here).

    Returns:
      ({'params': ..., other collections}, step, the saved resolved config or None for
      checkpoints written before configs were saved); None if there is no checkpoint.
    """
    found = self._restore_with(self._try_read_variables, step)
    if found is None:
      return None
    (variables, config), found_step = found
    return variables, found_step, config

  def saved_config(self, step: int | None = None) -> dict | None:
    """The resolved config saved with checkpoint `step` (default: the newest committed one)."""
    steps = self.all_steps()
    step = steps[-1] if step is None and steps else step
    return None if step is None else _config_of(self._saved_item(step))

  def _saved_item(self, step: int) -> Any:
    """The raw config item of `step`: fingerprint, config and the checksums (or, earlier, the
    fingerprint alone)."""
    try:
      return self._reader().restore(
          step, args=ocp.args.Composite(**{_CONFIG: ocp.args.JsonRestore()})
      )[_CONFIG]
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpointError(
          f"the config saved with checkpoint {self.directory / str(step)} cannot be read: "
          f"{_describe_error(e, self.directory / str(step))}"
      ) from e

  def _restore_with(self, try_read, step: int | None) -> tuple[Any, int] | None:
    """(result, step) of `try_read` on `step`, or on the newest readable checkpoint."""
    self._settle()
    steps = self.all_steps()
    if step is not None:
      if step not in steps:
        raise FileNotFoundError(
            f"no checkpoint of step {step} in {self.directory} (committed steps: "
            f"{', '.join(map(str, steps)) or 'none'})"
        )
      result, damage = try_read(step)
      if damage is not None:
        raise DamagedCheckpointError(
            f"checkpoint {self.directory / str(step)} cannot be read: first unreadable item "
            f"{damage}. Choose another step (committed: {', '.join(map(str, steps))})."
        )
      logging.info("restored checkpoint of step %d from %s", step, self.directory)
      return result, step
    damaged: list[tuple[int, _Damage]] = []
    for candidate in reversed(steps):
      result, damage = try_read(candidate)
      if damage is not None:
        damaged.append((candidate, damage))
        continue
      self._set_aside(damaged, candidate)
      logging.info("restored checkpoint of step %d from %s", candidate, self.directory)
      return result, candidate
    self._raise_none_readable(damaged)
    return None

  def _set_aside(self, damaged: list[tuple[int, _Damage]], used_step: int) -> None:
    """Logs each damaged newer checkpoint in one line; quarantines it unless read-only."""
    for bad_step, bad in damaged:
      where = "left in place" if self.read_only else self._quarantine(bad_step)
      logging.warning(
          "checkpoint of step %d in %s cannot be read (first unreadable item %s); %s, using step %d",
          bad_step,
          self.directory,
          bad,
          where,
          used_step,
      )
    if damaged and not self.read_only:
      self.manager.reload()

  def _raise_none_readable(self, damaged: list[tuple[int, _Damage]]) -> None:
    if damaged:
      newest_step, newest_damage = damaged[0]
      raise NoReadableCheckpointError(
          f"none of the {len(damaged)} checkpoints in {self.directory} can be read (newest, step "
          f"{newest_step}: first unreadable item {newest_damage}); nothing was moved or deleted. "
          "Repair or remove them, or use a fresh --workdir to start from scratch."
      )
    quarantined = self.quarantined()
    if quarantined:
      raise NoReadableCheckpointError(
          f"{self.directory} holds only damaged checkpoints moved aside earlier "
          f"({', '.join(p.name for p in quarantined)}); remove them, or use a fresh --workdir, "
          "to start from scratch."
      )

  def _try_read_variables(self, step: int) -> tuple[Any, _Damage | None]:
    """(({'params', collections}, saved config), None), or (None, damage) when any process
    cannot read it."""
    result, damage = None, None
    try:
      result = self._read_variables(step)
    except _Damage as e:
      damage = e
    damage = _agreed_damage(damage)
    return (None, damage) if damage is not None else (result, None)

  def _read_variables(self, step: int) -> tuple[dict, dict | None]:
    """Reads only `params` and `model_state` of `step` through a partial PyTree restore."""
    step_dir = self.directory / str(step)
    if not (step_dir / _COMMIT_RECORD).is_file():
      raise _Damage(_COMMIT_RECORD, "missing (the save did not complete)")
    try:
      saved_item = self._saved_item(step)
    except DamagedCheckpointError as e:
      raise _Damage(_CONFIG, str(e)) from e
    device = jax.local_devices()[0]
    try:
      metadata = dict(self._reader(partial=True).item_metadata(step)[_STATE])
      wanted = {k: metadata[k] for k in ("params", "model_state") if k in metadata}
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), wanted)
      restore_args = jax.tree.map(
          lambda _: ocp.ArrayRestoreArgs(sharding=jax.sharding.SingleDeviceSharding(device)), target
      )
      state = self._reader(partial=True).restore(
          step,
          args=ocp.args.Composite(
              **{
                  _STATE: ocp.args.PyTreeRestore(
                      item=target, restore_args=restore_args, partial_restore=True
                  )
              }
          ),
      )[_STATE]
    except Exception as e:  # pylint: disable=broad-except
      array = _unreadable_array(e)
      raise _Damage(f"{_STATE}/{array}" if array else _STATE, _describe_error(e, step_dir)) from e
    if "params" not in state:
      raise _Damage(_STATE, "it holds no 'params'")
    _verify(step_dir, state, saved_item)
    return {"params": state["params"], **dict(state.get("model_state") or {})}, _config_of(
        saved_item
    )

  def _reader(self, *, partial: bool = False) -> ocp.CheckpointManager:
    """A read-only manager of this process alone, whose state handler restores the whole tree or
    (`partial`) a part of it.

    Orbax's own restore ends at a barrier of all processes; a process that cannot read its part
    raises before it and would leave the others waiting there. This one has no barrier: the
    processes agree on the verdict themselves (`_try_read`).
    """
    name = "partial" if partial else "whole"
    if name not in self._readers:
      process = jax.process_index()
      self._readers[name] = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(
              read_only=True,
              create=False,
              save_interval_steps=0,
              multiprocessing_options=ocp.options.MultiprocessingOptions(
                  primary_host=process, active_processes={process}
              ),
          ),
          item_handlers={
              _STATE: ocp.PyTreeCheckpointHandler() if partial else ocp.StandardCheckpointHandler(),
              _ITERATOR: ocp.JsonCheckpointHandler(),
              _CONFIG: ocp.JsonCheckpointHandler(),
          },
      )
    self._readers[name].reload()
    return self._readers[name]

  def wait_until_finished(self) -> None:
    """Blocks until the save in flight is written (failures are counted as in `save`)."""
    self._settle()

  def close(self) -> None:
    """Waits for the last save; a failure of it is logged (the run is ending anyway)."""
    try:
      self._settle()
    except CheckpointSaveError as e:
      logging.error("%s", e)
    finally:
      self.manager.close()
      for reader in self._readers.values():
        reader.close()
