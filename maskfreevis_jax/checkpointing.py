"""Orbax checkpoints of the train state plus the input pipeline position, and preemption handling.

Layout: `<workdir>/checkpoints/<step>/{state, data_iterator, config}`.
  * state: the TrainState pytree (saved sharded, restored straight into the target shardings);
  * data_iterator: every host's iterator state (JSON), so a resumed run reads the same stream;
  * config: the model/param fingerprint used to explain a mismatching checkpoint clearly.
Saves are asynchronous and atomic (Orbax writes to a temporary directory and renames it), so a
process killed mid-save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import base64
import json
import pathlib
import signal
import threading
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

_STATE = "state"
_ITERATOR = "data_iterator"
_CONFIG = "config"


class CheckpointMismatchError(ValueError):
  """The checkpoint in the workdir does not fit the model/optimizer of the current config."""


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


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


def _gather_host_strings(text: str) -> list[str]:
  """All hosts' strings, in process order (identity on a single host)."""
  if jax.process_count() == 1:
    return [text]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
  lengths = multihost_utils.process_allgather(np.asarray([data.size], np.int64))
  padded = np.zeros([int(np.max(lengths))], np.uint8)
  padded[:data.size] = data
  everything = multihost_utils.process_allgather(padded)
  return [bytes(row[:int(n)]).decode("utf-8")
          for row, n in zip(np.asarray(everything), np.asarray(lengths).reshape(-1))]


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


class Checkpointer:
  """Periodic, keep-last-N checkpoints of (train state, data iterator state, config fingerprint)."""

  def __init__(self, directory: str | pathlib.Path, *, keep: int, save_every: int,
               fingerprint: dict | None = None, async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    self.save_every = max(int(save_every), 1)
    self.fingerprint = fingerprint or {}
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={_STATE: ocp.StandardCheckpointHandler(),
                       _ITERATOR: ocp.JsonCheckpointHandler(),
                       _CONFIG: ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, iterator_state: Any, *, force: bool = False) -> bool:
    """Saves at multiples of `save_every` (or always with force). Returns whether it saved."""
    if not force and step % self.save_every:
      return False
    if step in self.manager.all_steps():
      return False
    host_states = _gather_host_strings(json.dumps(_encode_iterator_state(iterator_state)))
    saved = self.manager.save(
        step,
        args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(state),
            _ITERATOR: ocp.args.JsonSave({"per_process": [json.loads(s) for s in host_states]}),
            _CONFIG: ocp.args.JsonSave(self.fingerprint),
        }),
        force=True)
    if saved:
      logging.info("checkpoint for step %d being written to %s", step, self.directory)
    return saved

  def reached_preemption(self, step: int) -> bool:
    return jax.process_count() > 1 and self.manager.reached_preemption(step)

  def _check_compatible(self, step: int, abstract_state: Any) -> None:
    """Raises CheckpointMismatchError naming the first parameter whose shape differs."""
    step_dir = self.directory / str(step)
    saved_fingerprint = {}
    try:
      saved_fingerprint = self.manager.restore(
          step, args=ocp.args.Composite(**{_CONFIG: ocp.args.JsonRestore()}))[_CONFIG] or {}
    except Exception:  # pylint: disable=broad-except
      logging.warning("checkpoint %s has no readable config fingerprint", step_dir)
    metadata = self.manager.item_metadata(step)[_STATE]
    if metadata is None:
      raise CheckpointMismatchError(f"checkpoint {step_dir} has no train state")
    saved = {_path_str(p): tuple(getattr(m, "shape", ()) or ())
             for p, m in jax.tree_util.tree_flatten_with_path(metadata)[0]}
    wanted = {_path_str(p): tuple(getattr(x, "shape", ()) or ())
              for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    hint = ""
    differing = {k: (saved_fingerprint.get(k), v) for k, v in self.fingerprint.items()
                 if k in saved_fingerprint and saved_fingerprint[k] != v}
    if differing:
      hint = "; the checkpoint was written with a different config: " + ", ".join(
          f"{k}={a!r} (now {b!r})" for k, (a, b) in sorted(differing.items()))
    # Parameters first: they are what a user recognises (optimizer slots mirror them).
    for name in sorted(wanted, key=lambda n: (not n.startswith("params/"), n)):
      if name not in saved:
        raise CheckpointMismatchError(
            f"checkpoint {step_dir} does not fit the current config: parameter '{name}' "
            f"(shape {wanted[name]}) is missing from the checkpoint{hint}. Use a fresh --workdir.")
      if saved[name] != wanted[name]:
        raise CheckpointMismatchError(
            f"checkpoint {step_dir} does not fit the current config: parameter '{name}' has shape "
            f"{saved[name]} in the checkpoint but {wanted[name]} in the model{hint}. "
            "Use a fresh --workdir.")
    extra = sorted(set(saved) - set(wanted))
    if extra:
      raise CheckpointMismatchError(
          f"checkpoint {step_dir} does not fit the current config: it has parameter '{extra[0]}' "
          f"(shape {saved[extra[0]]}) that the model lacks{hint}. Use a fresh --workdir.")

  def restore(self, abstract_state: Any, step: int | None = None
              ) -> tuple[Any, Any, int] | None:
    """Restores (state, this host's iterator state, step) from `step` or the latest; None if none.

    Args:
      abstract_state: pytree of jax.ShapeDtypeStruct with `.sharding` (restore target layout).
      step: a specific step, default the latest.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    self._check_compatible(step, abstract_state)
    restored = self.manager.restore(step, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardRestore(abstract_state),
        _ITERATOR: ocp.args.JsonRestore(),
    }))
    per_process = (restored[_ITERATOR] or {}).get("per_process", [])
    if per_process and len(per_process) != jax.process_count():
      raise CheckpointMismatchError(
          f"checkpoint {self.directory / str(step)} holds data iterator states of "
          f"{len(per_process)} processes but this run has {jax.process_count()}")
    iterator_state = (_decode_iterator_state(per_process[jax.process_index()])
                      if per_process else None)
    logging.info("restored checkpoint of step %d from %s", step, self.directory)
    return restored[_STATE], iterator_state, step

  def wait_until_finished(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
