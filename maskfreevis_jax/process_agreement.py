"""Decisions every process takes together: verdicts gathered from all, and a barrier for Orbax's
background saves that a process whose own write failed can release.

On one process both are no-ops. On several, Orbax's background save waits at a barrier for every
process's write; a process whose write failed never arrives there, so the others would wait
`AsyncOptions.timeout_secs` (20 minutes) and a main thread already in the next collective could
hang. `AbortableBarrier` replaces Orbax's barrier with one kept in the coordination service's
key-value store: a process that knows its part of save number g failed posts `abort(g)`, and every
process waiting in that save's barriers stops at once with the failing process's reason.
"""

from __future__ import annotations

import itertools
import threading
import time

import jax
from jax._src import distributed
from jax.experimental import multihost_utils
import numpy as np

from maskfreevis_jax import sharding

# Key-value namespaces must differ between checkpointers of one run (each process creates them in
# the same order, so the counter agrees across processes).
_INSTANCES = itertools.count()
_POLL_SECONDS = 0.02


def all_processes_agree(ok: bool) -> bool:
  """True only when `ok` holds on every process (identity on a single process).

  A collective: every process must call it at the same point.
  """
  if jax.process_count() == 1:
    return ok
  return bool(np.min(multihost_utils.process_allgather(np.asarray([int(ok)], np.int32))))


def first_failure(reason: str | None, *, derived: bool = False) -> tuple[int, str] | None:
  """The failure every process reports: (process, reason), the same on every process.

  A collective (identity on one process). Each process passes its reason (None: it did its part).
  A derived reason (it failed only because another process did) is reported only when no process
  gave a reason of its own; otherwise the lowest-numbered process with its own reason wins.
  Returns None when every process passed None.
  """
  marker = "?" if derived else "!"
  if jax.process_count() == 1:
    return None if reason is None else (0, reason)
  verdicts = sharding.gather_host_strings("+" if reason is None else f"{marker}{reason}")
  for wanted in ("!", "?"):
    for process, verdict in enumerate(verdicts):
      if verdict.startswith(wanted):
        return process, verdict[1:]
  return None


def sync_processes(name: str) -> None:
  """Waits until every process has reached the same named point (no-op on one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class SaveAbortedError(RuntimeError):
  """Another process's part of the save could not be written."""


class AbortableBarrier:
  """An Orbax `barrier_sync_fn` (`AsyncOptions.barrier_sync_fn`) that a failed save can release.

  Usage, on every process in the same order:
    barrier = AbortableBarrier()
    barrier.begin_save()            # before each CheckpointManager.save
    ... a process whose write failed: barrier.abort('No space left on device')
  A barrier of the save in flight then raises SaveAbortedError on every process still waiting.
  """

  def __init__(self):
    self._namespace = f"maskfreevis/checkpoint_barrier/{next(_INSTANCES)}"
    self._save = 0
    self._lock = threading.Lock()

  @property
  def save_number(self) -> int:
    """Saves begun so far (the same on every process)."""
    return self._save

  def begin_save(self) -> None:
    with self._lock:
      self._save += 1

  def abort(self, reason: str) -> None:
    """Releases every process waiting in a barrier of the save in flight (idempotent)."""
    client = _client()
    if client is None:
      return
    key = f"{self._namespace}/abort/{self._save}/{jax.process_index()}"
    client.key_value_set(key, reason[:2000], allow_overwrite=True)

  def _aborted(self, client, save: int) -> str | None:
    entries = client.key_value_dir_get(f"{self._namespace}/abort/{save}/")
    if not entries:
      return None
    key, reason = sorted(entries)[0]
    return f"process {key.rsplit('/', 1)[-1]}: {reason}"

  def __call__(self, *, key: str, timeout_ms: int) -> None:
    """Waits until every process has reached `key`, the save is aborted, or the timeout."""
    client = _client()
    if client is None:
      return
    save = self._save
    prefix = f"{self._namespace}/arrived/{key}/"
    client.key_value_set(f"{prefix}{jax.process_index()}", "1", allow_overwrite=True)
    deadline = time.monotonic() + timeout_ms / 1000
    while True:
      if len(client.key_value_dir_get(prefix)) >= jax.process_count():
        return
      reason = self._aborted(client, save)
      if reason is not None:
        raise SaveAbortedError(f"another process could not write its part ({reason})")
      if time.monotonic() > deadline:
        raise TimeoutError(f"timed out after {timeout_ms / 1000:.0f} s at checkpoint barrier {key}")
      time.sleep(_POLL_SECONDS)


def _client():
  """The coordination service client, or None on a single process."""
  if jax.process_count() == 1:
    return None
  return distributed.global_state.client
