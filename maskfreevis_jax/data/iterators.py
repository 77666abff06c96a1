"""Training iterators: per-host batches of padded clips, deterministic and restartable.

`create_train_iterator` yields per-host numpy batches of the `clips.clip_spec` fields with a
leading batch dimension B, the per-host batch (``data.batch_size // jax.process_count()``)::

  frames uint8 [B, T, H, W, 3], image_valid bool [B, H, W], boxes float32 [B, N, T, 4], ...

Every clip is a pure function of ``(seed, global clip index)``: the video comes from a per-epoch
permutation, frames/size/flip from a numpy Generator seeded with both. So the stream is
deterministic, hosts never overlap (host h takes clips ``step * B_global + h * B + [0, B)``) and
the iterator state is one integer (`TrainIterator.get_state`). With ``data.skip_corrupt_frames``
a video whose frames cannot be read is replaced by one drawn from ``(seed, clip index, try)``
(logged, counted in ``stats``); past ``data.skip_corrupt_max_fraction`` of the last
``data.skip_corrupt_window`` clips replaced, the run stops (`CorruptDataError`). tf.data runs
the per-clip numpy/PIL work in parallel (deterministic order) and prefetches. A joint run
('ytvis+coco_pseudo') gets a `MixedTrainIterator`: each step's batch comes from one source.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterator
from typing import Any

from absl import logging
import ml_collections
import numpy as np

from maskfreevis_jax.data import clips
from maskfreevis_jax.data import sources
from maskfreevis_jax.data import ytvis_json
from maskfreevis_jax.data.transforms import FrameReadError

_MAX_CORRUPT_RETRIES = 10


def _training_video_source(config: ml_collections.ConfigDict) -> Any:
  """The training videos, those without a usable box dropped with ``data.skip_empty_videos``."""
  source = sources.open_video_source(config, "train")
  if config.data.skip_empty_videos and isinstance(source, sources.JsonVideoSource):
    source = sources.JsonVideoSource(ytvis_json.drop_unannotated_videos(source.dataset))
  elif config.data.skip_empty_videos:
    source.drop_unannotated_videos()
  if len(source) == 0:
    raise ValueError("the training set has no videos")
  return source


class _ClipMaker:
  """Maps a global clip index to a padded example; pure function of (seed, index).

  One source per maker: the video dataset ('synthetic' / 'ytvis') or COCO pseudo clips
  ('coco_pseudo'). A joint run (`MixedTrainIterator`) has one maker per source.
  """

  def __init__(
      self,
      config: ml_collections.ConfigDict,
      seed: int,
      coco_target: sources.ClassTarget | None = None,
  ):
    self.config = config
    self.seed = int(seed)
    self.stats = clips.ClipStats()
    self.is_coco = sources.source_kind(config) == sources.COCO_SOURCE
    if self.is_coco:
      self.source = sources.open_coco_source(config, coco_target)
    else:
      self.source = _training_video_source(config)
    self.class_names = self.source.class_names

  @functools.lru_cache(maxsize=4)
  def _permutation(self, epoch: int, size: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(size)

  def video_index(self, global_index: int) -> int:
    """The video (position in `source`) clip ``global_index`` reads unless it is replaced."""
    epoch, pos = divmod(int(global_index), len(self.source))
    return int(self._permutation(epoch, len(self.source))[pos])

  def _replacement(
      self, global_index: int, attempt: int, original: int
  ) -> tuple[int, np.random.Generator]:
    """Try ``attempt`` (>= 1) of clip ``global_index``: another video than ``original`` and the
    generator of its clip, a pure function of (seed, global index, attempt)."""
    rng = np.random.default_rng([self.seed, 2, int(global_index), int(attempt)])
    return (original + 1 + int(rng.integers(len(self.source) - 1))) % len(self.source), rng

  def make(self, global_index: int) -> tuple[dict[str, np.ndarray], list[FrameReadError]]:
    """The padded example (`clips.pad_clip`) of clip number ``global_index``.

    With ``data.skip_corrupt_frames``, a video whose frames cannot be read is replaced: try
    ``a >= 1`` reads `_replacement` ``(global_index, a)``, which depends on nothing that happened
    earlier in the process, so a resumed run makes the clips of an uninterrupted one.

    Returns:
      The example and the errors of the videos that were replaced (empty when none was).

    Raises:
      FrameReadError: a frame cannot be read and skipping is off, or no try succeeded.
    """
    rng = np.random.default_rng([self.seed, 1, int(global_index)])
    index = self.video_index(global_index)
    if self.is_coco:
      clip = self.source.training_clip(index, rng, self.config, self.stats)
      return clips.pad_clip(clip, self.config, self.stats), []
    failures, original = [], index
    for attempt in range(_MAX_CORRUPT_RETRIES):
      if attempt:
        index, rng = self._replacement(global_index, attempt, original)
      try:
        clip = clips.video_training_clip(self.source, index, rng, self.config, self.stats)
        return clips.pad_clip(clip, self.config, self.stats), failures
      except FrameReadError as e:
        if not self.config.data.skip_corrupt_frames or len(self.source) < 2:
          raise
        failures.append(e)
        if attempt == _MAX_CORRUPT_RETRIES - 1:
          raise FrameReadError(
              e.path,
              f"{e.reason}; training clip {global_index}: its video and the "
              f"{attempt} tried in its place all failed (data.skip_corrupt_frames)",
          ) from None
        logging.warning(
            "skipping video id %d (training clip %d): %s",
            self.source.video(index).id,
            global_index,
            e,
        )
        self.stats.add("corrupt_frames_skipped")
    raise AssertionError("unreachable")


class CorruptDataError(ValueError):
  """Too many recent training clips had to be replaced (``data.skip_corrupt_*``)."""


class _SkipWindow:
  """Which of this host's last ``data.skip_corrupt_window`` clips had to be replaced.

  Clips are made in parallel threads, possibly out of order, and ahead of use: the threads
  `record` the clips they replaced, and `consume` counts a clip (by its local element number,
  this host's clip count) only when its batch is returned, in clip order. So the decision to
  stop depends on the clip indices alone, never on thread timing, and `state` (the replaced
  clips of the window) carries it across a resume.
  """

  def __init__(self, config: ml_collections.ConfigDict):
    data = config.data
    self.size = int(data.skip_corrupt_window)
    self.max_fraction = float(data.skip_corrupt_max_fraction)
    if self.size < 1:
      raise ValueError(f"data.skip_corrupt_window must be >= 1, got {data.skip_corrupt_window}")
    if not 0.0 <= self.max_fraction <= 1.0:
      raise ValueError(
          f"data.skip_corrupt_max_fraction must lie in [0, 1], got {self.max_fraction}"
      )
    self._lock = threading.Lock()
    self._made: dict[int, str] = {}  # element -> last read error, made but not yet returned
    self.replaced: dict[int, str] = {}  # element -> last read error, in the window

  def record(self, element: int, failures: list[FrameReadError]) -> None:
    if failures:
      with self._lock:
        self._made[int(element)] = str(failures[-1])

  def consume(self, element: int) -> None:
    """Counts clip ``element`` (its batch is returned); raises past the limit.

    Raises:
      CorruptDataError: more than ``max_fraction`` of the window's clips were replaced; names
        the count, both settings and the last read error (its file).
    """
    with self._lock:
      error = self._made.pop(int(element), None)
    if error is not None:
      self.replaced[int(element)] = error
    for old in [e for e in self.replaced if e <= element - self.size]:
      del self.replaced[old]
    if len(self.replaced) > self.max_fraction * self.size:
      last = self.replaced[max(self.replaced)]
      raise CorruptDataError(
          f"training data: {len(self.replaced)} of the last {self.size} clips "
          "(data.skip_corrupt_window) had to be replaced, more than "
          f"data.skip_corrupt_max_fraction={self.max_fraction}; the last failure: {last}"
      )

  def state(self) -> list[list[Any]]:
    return [[e, self.replaced[e]] for e in sorted(self.replaced)]

  def restore(self, state: list[list[Any]]) -> None:
    with self._lock:
      self._made.clear()
    self.replaced = {int(e): str(error) for e, error in state}


def _host_split(
    config: ml_collections.ConfigDict,
    global_batch_size: int | None,
    process_index: int | None,
    process_count: int | None,
) -> tuple[int, int, int, int]:
  """(global batch, local batch, process index, process count), defaults from jax."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  global_batch = int(global_batch_size or config.data.batch_size)
  if global_batch % process_count:
    raise ValueError(f"batch size {global_batch} is not divisible by the {process_count} hosts")
  return global_batch, global_batch // process_count, int(process_index), int(process_count)


class TrainIterator:
  """Infinite, deterministic, restartable iterator over per-host training batches.

  ``get_state()`` returns a small JSON-able dict (store it next to the model checkpoint,
  e.g. with orbax ``JsonSave``); ``set_state(state)`` continues exactly after the last
  batch returned before ``get_state``.
  """

  def __init__(
      self,
      config: ml_collections.ConfigDict,
      seed: int,
      global_batch_size: int | None = None,
      process_index: int | None = None,
      process_count: int | None = None,
      coco_target: sources.ClassTarget | None = None,
  ):
    """Opens the source of a single-source ``config`` (the full config).

    Args:
      config: the full config; ``config.data`` names one source.
      seed: the stream is a pure function of the seed and the clip index.
      global_batch_size: clips per step over all hosts (default ``data.batch_size``).
      process_index, process_count: this host and the host count (default: jax's).
      coco_target: COCO pseudo clips are labelled as these classes (a joint run's videos).
    """
    if sources.is_joint(config):
      raise ValueError(
          f"data.name={config.data.name!r} has two sources: use create_train_iterator "
          "(a MixedTrainIterator)"
      )
    clips.check_clip_config(config)
    self.global_batch_size, self.local_batch_size, self.process_index, self.process_count = (
        _host_split(config, global_batch_size, process_index, process_count)
    )
    self.config = config
    self.seed = int(seed)
    self._maker = _ClipMaker(config, seed, coco_target)
    self.class_names = self._maker.class_names
    self._spec = clips.clip_spec(config)
    self._errors: dict[int, BaseException] = {}
    self._skips = _SkipWindow(config)
    self._next_batch = 0
    self._iterator = None

  @property
  def source(self) -> Any:
    """The training source: a video source or a `coco_pseudo.CocoPseudoClipSource`."""
    return self._maker.source

  @property
  def stats(self) -> dict[str, int]:
    """Counts of dropped boxes, truncated instances and skipped corrupt videos so far."""
    return dict(self._maker.stats.counts)

  def batch_spec(self) -> dict[str, Any]:
    """This host's batch shapes and dtypes (`jax.ShapeDtypeStruct` per key), without reading."""
    import jax  # pylint: disable=g-import-not-at-top

    return {
        k: jax.ShapeDtypeStruct((self.local_batch_size,) + shape, np.dtype(dtype))
        for k, (dtype, shape) in self._spec.items()
    }

  def global_clip_index(self, batch: int, row: int) -> int:
    """Global clip index of row ``row`` of this host's batch number ``batch``."""
    return batch * self.global_batch_size + self.process_index * self.local_batch_size + row

  def video_index(self, global_index: int) -> int:
    """The video (position in `source`) clip ``global_index`` reads unless it is replaced."""
    return self._maker.video_index(global_index)

  def _make_example(self, local_element: np.ndarray):
    batch, row = divmod(int(local_element), self.local_batch_size)
    g = self.global_clip_index(batch, row)
    try:
      ex, failures = self._maker.make(g)
    except Exception as e:  # re-raised unchanged by __next__ (tf would wrap it)
      self._errors[g] = e
      raise
    self._skips.record(int(local_element), failures)
    return tuple(np.asarray(ex[k], self._spec[k][0]) for k in self._spec)

  def _build(self, start_batch: int):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    keys = list(self._spec)
    tout = [tf.as_dtype(self._spec[k][0]) for k in keys]

    def make(element):
      values = tf.numpy_function(self._make_example, [element], tout, stateful=False)
      return {k: tf.ensure_shape(v, self._spec[k][1]) for k, v in zip(keys, values)}

    start = start_batch * self.local_batch_size
    ds = tf.data.Dataset.range(start, np.iinfo(np.int64).max)
    parallel = self.config.data.num_parallel_calls
    ds = ds.map(
        make, num_parallel_calls=tf.data.AUTOTUNE if parallel < 0 else parallel, deterministic=True
    )
    ds = ds.batch(self.local_batch_size, drop_remainder=True)
    ds = ds.prefetch(self.config.data.prefetch)
    options = tf.data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = max(2, os.cpu_count() or 2)
    ds = ds.with_options(options)
    return ds.as_numpy_iterator()

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    if self._iterator is None:
      self._iterator = self._build(self._next_batch)
    try:
      batch = next(self._iterator)
    except tf.errors.OpError as e:
      self._iterator = None
      if self._errors:
        raise self._errors[min(self._errors)] from None
      raise RuntimeError(f"input pipeline failed: {e.message}") from None
    first = self._next_batch * self.local_batch_size
    try:
      for element in range(first, first + self.local_batch_size):
        self._skips.consume(element)
    except CorruptDataError:
      self._iterator = None  # a retry remakes this batch (consume is idempotent)
      raise
    self._next_batch += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    """Position (next batch number) plus what the stream depends on, JSON-able.

    ``skipped_clips`` lists the clips of the ``data.skip_corrupt_window`` that were replaced
    (``[local element, read error]``), so a resumed run stops where the uninterrupted one would.
    """
    return {
        "next_batch": self._next_batch,
        "seed": self.seed,
        "global_batch_size": self.global_batch_size,
        "process_count": self.process_count,
        "skipped_clips": self._skips.state(),
    }

  def set_state(self, state: dict[str, Any]) -> None:
    """Restores a position saved by `get_state` (same seed / batch size / host count)."""
    for key in ("seed", "global_batch_size", "process_count"):
      if key in state and int(state[key]) != getattr(self, key):
        raise ValueError(
            f"iterator state has {key}={state[key]} but this iterator was built "
            f"with {key}={getattr(self, key)}"
        )
    if "next_batch" not in state:
      raise ValueError(f"iterator state lacks 'next_batch': {state}")
    self._next_batch = int(state["next_batch"])
    self._skips.restore(state.get("skipped_clips", []))  # absent in older checkpoints
    self._iterator = None


class MixedTrainIterator:
  """Joint training: each step's batch comes whole from one source, drawn per step.

  Step ``s`` takes COCO with probability ``coco.fraction``: the draw is
  ``np.random.default_rng([seed, s, 0xC0C0]).uniform()``, a pure function of the seed and the
  step, so every host draws the same source. Each source is a `TrainIterator` of its own
  (own clip length and shapes), advanced only on its steps. ``next()`` returns the batch with a
  host-only ``'source'`` entry ('video' or 'coco') that picks the compiled step.

  ``get_state()`` holds the step count (the position of the source draws) and both sources'
  positions, so a resumed run continues with exactly the batches of an uninterrupted one.
  """

  def __init__(
      self,
      config: ml_collections.ConfigDict,
      seed: int,
      global_batch_size: int | None = None,
      process_index: int | None = None,
      process_count: int | None = None,
  ):
    configs = sources.source_configs(config)
    self.seed = int(seed)
    self.coco_fraction = float(config.data.coco.fraction)
    kwargs = dict(
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    self.video = TrainIterator(configs[sources.VIDEO_SOURCE], seed, **kwargs)
    dataset = getattr(self.video.source, "dataset", None)
    target_ids = [c.id for c in dataset.categories] if dataset is not None else None
    self.coco = TrainIterator(
        configs[sources.COCO_SOURCE],
        seed,
        coco_target=(self.video.class_names, target_ids),
        **kwargs,
    )
    self.class_names = self.video.class_names
    self.global_batch_size = self.video.global_batch_size
    self._step = 0

  def source_of_step(self, step: int) -> str:
    """'coco' or 'video': the source of step ``step`` (0-based), the same on every host."""
    draw = np.random.default_rng([self.seed, int(step), 0xC0C0]).uniform()
    return sources.COCO_SOURCE if draw < self.coco_fraction else sources.VIDEO_SOURCE

  @property
  def stats(self) -> dict[str, dict[str, int]]:
    return {sources.VIDEO_SOURCE: self.video.stats, sources.COCO_SOURCE: self.coco.stats}

  def batch_specs(self) -> dict[str, dict[str, Any]]:
    """Each source's host batch shapes (`TrainIterator.batch_spec`), video first."""
    return {
        sources.VIDEO_SOURCE: self.video.batch_spec(),
        sources.COCO_SOURCE: self.coco.batch_spec(),
    }

  def __iter__(self) -> Iterator[dict[str, Any]]:
    return self

  def __next__(self) -> dict[str, Any]:
    source = self.source_of_step(self._step)
    batch = dict(next(self.coco if source == sources.COCO_SOURCE else self.video))
    self._step += 1
    batch["source"] = source
    return batch

  def get_state(self) -> dict[str, Any]:
    """Steps drawn so far plus each source's `TrainIterator.get_state`, JSON-able."""
    return {
        "step": self._step,
        "seed": self.seed,
        "coco_fraction": self.coco_fraction,
        sources.VIDEO_SOURCE: self.video.get_state(),
        sources.COCO_SOURCE: self.coco.get_state(),
    }

  def set_state(self, state: dict[str, Any]) -> None:
    """Restores a position saved by `get_state` (same seed and source fraction)."""
    for key in ("step", sources.VIDEO_SOURCE, sources.COCO_SOURCE):
      if key not in state:
        raise ValueError(
            f"joint iterator state lacks {key!r} (a checkpoint of a single-source "
            f"run cannot resume a joint one): {state}"
        )
    if "seed" in state and int(state["seed"]) != self.seed:
      raise ValueError(
          f"iterator state has seed={state['seed']} but this iterator was built "
          f"with seed={self.seed}"
      )
    if "coco_fraction" in state and float(state["coco_fraction"]) != self.coco_fraction:
      raise ValueError(
          f"iterator state has coco_fraction={state['coco_fraction']} but "
          f"data.coco.fraction={self.coco_fraction}"
      )
    self.video.set_state(state[sources.VIDEO_SOURCE])
    self.coco.set_state(state[sources.COCO_SOURCE])
    self._step = int(state["step"])


def create_train_iterator(
    config: ml_collections.ConfigDict,
    seed: int,
    global_batch_size: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> TrainIterator | MixedTrainIterator:
  """The training iterator of ``config`` (the full config).

  Args:
    config: the full config; ``config.data`` names the source(s).
    seed: the stream is a pure function of the seed (and the step).
    global_batch_size: clips per step over all hosts (default ``data.batch_size``).
    process_index, process_count: this host and the host count (default: jax's).

  Returns:
    A `MixedTrainIterator` for a joint config ('ytvis+coco_pseudo'), else a `TrainIterator`;
    each ``next()`` is this host's batch, e.g. frames uint8 [B, T, H, W, 3].
  """
  cls = MixedTrainIterator if sources.is_joint(config) else TrainIterator
  return cls(config, seed, global_batch_size, process_index, process_count)
