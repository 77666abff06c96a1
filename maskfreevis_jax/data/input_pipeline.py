"""tf.data input pipeline: training clips and evaluation videos in the shared Batch format.

Training (`create_train_iterator`) yields per-host numpy batches::

  frames         uint8   [B, T, H, W, 3]   RGB, zero outside the image
  image_valid    bool    [B, H, W]         True on real image pixels
  boxes          float32 [B, N, T, 4]      x1, y1, x2, y2 in pixels of the padded frame
  box_valid      bool    [B, N, T]
  labels         int32   [B, N]
  instance_valid bool    [B, N]
  track_ids      int32   [B, N]            dataset track id, -1 for padding
  masks          uint8   [B, N, T, H, W]   only when ``data.with_masks``
  video_id       int32   [B]
  frame_index    int32   [B, T]
  orig_size      int32   [B, 2]            (H, W) before resizing

B is the per-host batch (``data.batch_size // jax.process_count()``), H, W the fixed
``data.pad_size``. Every clip is a pure function of ``(seed, global clip index)``: the video
comes from a per-epoch permutation, frames/size/flip from a numpy Generator seeded with
both. So the stream is deterministic, hosts never overlap (host h takes clips
``step * B_global + h * B + [0, B)``) and the iterator state is one integer
(`TrainIterator.get_state`). tf.data runs the per-clip numpy/PIL work in parallel
(deterministic order) and prefetches.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
from typing import Any
from collections.abc import Iterator, Sequence

from absl import logging
import ml_collections
import numpy as np

from maskfreevis_jax.data import synthetic
from maskfreevis_jax.data import transforms
from maskfreevis_jax.data import ytvis_json
from maskfreevis_jax.data.transforms import FrameReadError

_MAX_CORRUPT_RETRIES = 10
_FIELDS = (
    "frames",
    "image_valid",
    "boxes",
    "box_valid",
    "labels",
    "instance_valid",
    "track_ids",
    "masks",
    "video_id",
    "frame_index",
    "orig_size",
)


def _data_cfg(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  return config.data if "data" in config else config


def _check_config(cfg: ml_collections.ConfigDict) -> None:
  ph, pw = (int(v) for v in cfg.pad_size)
  if ph % 32 or pw % 32 or ph <= 0 or pw <= 0:
    raise ValueError(f"data.pad_size must be positive multiples of 32, got {tuple(cfg.pad_size)}")
  if cfg.num_frames < 1:
    raise ValueError(f"data.num_frames must be >= 1, got {cfg.num_frames}")
  if cfg.max_instances < 1:
    raise ValueError(f"data.max_instances must be >= 1, got {cfg.max_instances}")
  if not cfg.min_size_train:
    raise ValueError("data.min_size_train must list at least one size")
  if cfg.eval_pad_size and any(int(v) % 32 for v in cfg.eval_pad_size):
    raise ValueError(f"data.eval_pad_size must be multiples of 32, got {cfg.eval_pad_size}")


# ----------------------------------------------------------------------------- sources


class JsonVideoSource:
  """Videos of a YouTube-VIS JSON file whose frames are image files."""

  def __init__(self, dataset: ytvis_json.YtvisDataset):
    self.dataset = dataset
    self.videos = dataset.videos
    self.class_names = dataset.class_names

  def __len__(self) -> int:
    return len(self.videos)

  def video(self, index: int) -> ytvis_json.Video:
    return self.videos[index]

  def read_frames(self, index: int, frame_indices: Sequence[int]) -> list[np.ndarray]:
    video = self.videos[index]
    frames = []
    for t in frame_indices:
      path = video.file_names[int(t)]
      frame = transforms.read_rgb(path)
      if frame.shape[:2] != (video.height, video.width):
        raise ValueError(
            f"frame {path} is {frame.shape[0]}x{frame.shape[1]} but video id "
            f"{video.id} declares {video.height}x{video.width}"
        )
      frames.append(frame)
    return frames


def _synthetic_dir(cfg: ml_collections.ConfigDict) -> str:
  s = cfg.synthetic
  out = s.cache_dir or synthetic.default_cache_dir()
  name = (
      f"s{s.seed}_{s.frame_size[0]}x{s.frame_size[1]}_{s.num_train_videos}_"
      f"{s.num_val_videos}_{s.frames_per_video[0]}-{s.frames_per_video[1]}_o{s.max_objects}"
  )
  return synthetic.ensure_dataset(
      os.path.join(out, name),
      seed=s.seed,
      num_train_videos=s.num_train_videos,
      num_val_videos=s.num_val_videos,
      frame_size=tuple(s.frame_size),
      frames_per_video=tuple(s.frames_per_video),
      max_objects=s.max_objects,
  )


def ensure_synthetic(config: ml_collections.ConfigDict) -> str:
  """Generates the configured synthetic dataset if absent; returns its directory."""
  return _synthetic_dir(_data_cfg(config))


def open_video_source(config: ml_collections.ConfigDict, split: str = "train"):
  """Opens the video source of ``split`` ('train' or 'valid') described by the config.

  Returns:
    A `JsonVideoSource` or `tfds_builders.TfdsVideoSource` (same interface).
  """
  cfg = _data_cfg(config)
  if split not in ("train", "valid"):
    raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
  name = cfg.name.split("+")[0]
  if cfg.source == "tfds":
    from maskfreevis_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top

    return tfds_builders.TfdsVideoSource(cfg.tfds.name, split, data_dir=cfg.tfds.data_dir or None)
  if cfg.source != "json":
    raise ValueError(f"data.source must be 'json' or 'tfds', got {cfg.source!r}")
  if name == "synthetic":
    root = _synthetic_dir(cfg)
    path = os.path.join(root, f"{split}.json")
    image_root = os.path.join(root, split, "JPEGImages")
  elif name == "ytvis":
    path = cfg.train_json if split == "train" else cfg.val_json
    image_root = (cfg.train_image_root if split == "train" else cfg.val_image_root) or None
    if not path:
      raise ValueError(f"data.{'train' if split == 'train' else 'val'}_json is not set")
  else:
    raise ValueError(
        f"data.name {cfg.name!r} has no video source; expected 'synthetic', "
        "'ytvis', 'coco_pseudo' or 'ytvis+coco_pseudo'"
    )
  dataset = _load_json_cached(path, image_root, cfg.with_masks or split != "train")
  return JsonVideoSource(dataset)


@functools.lru_cache(maxsize=8)
def _load_json_cached(path: str, image_root: str | None, keep_segmentations: bool):
  return ytvis_json.load_ytvis_json(path, image_root, keep_segmentations=keep_segmentations)


# ------------------------------------------------------------------------- clip building


@dataclasses.dataclass
class Clip:
  """One augmented clip before padding (``h, w`` the resized size)."""

  frames: np.ndarray  # uint8 [T, h, w, 3]
  boxes: np.ndarray  # float32 [N, T, 4]
  box_valid: np.ndarray  # bool [N, T]
  labels: np.ndarray  # int32 [N]
  track_ids: np.ndarray  # int32 [N]
  masks: np.ndarray | None  # uint8 [N, T, h, w]
  video_id: int
  frame_index: np.ndarray  # int32 [T]
  orig_size: tuple[int, int]


class _Stats:
  """Thread-safe counters of what the pipeline dropped or skipped."""

  def __init__(self):
    self._lock = threading.Lock()
    self.counts = {
        "boxes_dropped_after_transform": 0,
        "instances_truncated": 0,
        "corrupt_frames_skipped": 0,
    }

  def add(self, key: str, value: int = 1) -> None:
    if value:
      with self._lock:
        self.counts[key] += value


def video_training_clip(
    source,
    video_index: int,
    rng: np.random.Generator,
    cfg: ml_collections.ConfigDict,
    stats: _Stats | None = None,
) -> Clip:
  """Samples and augments one training clip of a video (one transform for all frames)."""
  video = source.video(video_index)
  frame_idx = transforms.sample_clip_frame_indices(
      rng, video.length, cfg.num_frames, cfg.frame_range, cfg.shuffle_frames
  )
  short = int(rng.choice(np.asarray(cfg.min_size_train)))
  flip = bool(cfg.random_flip) and bool(rng.uniform() < 0.5)
  out_hw = transforms.resized_shape(
      video.height, video.width, short, cfg.max_size_train, canvas=tuple(cfg.pad_size)
  )
  transform = transforms.ClipTransform((video.height, video.width), out_hw, flip)
  frames = np.stack([transform.apply_image(f) for f in source.read_frames(video_index, frame_idx)])
  tracks = [t for t in video.tracks if not t.iscrowd and t.box_valid[frame_idx].any()]
  n, num_t = len(tracks), len(frame_idx)
  boxes = np.zeros((n, num_t, 4), np.float32)
  box_valid = np.zeros((n, num_t), bool)
  for k, track in enumerate(tracks):
    boxes[k] = track.boxes[frame_idx]
    box_valid[k] = track.box_valid[frame_idx]
  boxes = transform.apply_boxes(boxes)
  kept = box_valid & transforms.nonempty_boxes(boxes)
  if stats is not None:
    stats.add("boxes_dropped_after_transform", int((box_valid & ~kept).sum()))
  boxes = np.where(kept[..., None], boxes, 0.0).astype(np.float32)
  masks = None
  if cfg.with_masks:
    masks = np.zeros((n, num_t) + out_hw, np.uint8)
    for k, track in enumerate(tracks):
      if track.segmentations is None:
        raise ValueError(
            f"data.with_masks is set but video id {video.id}, annotation id "
            f"{track.id} has no 'segmentations'"
        )
      for j, t in enumerate(frame_idx):
        m = ytvis_json.decode_segmentation(track.segmentations[t], video.height, video.width)
        masks[k, j] = transform.apply_mask(m)
    masks *= kept[..., None, None]
  return Clip(
      frames=frames,
      boxes=boxes,
      box_valid=kept,
      labels=np.array([t.label for t in tracks], np.int32),
      track_ids=np.array([t.id for t in tracks], np.int32),
      masks=masks,
      video_id=video.id,
      frame_index=frame_idx,
      orig_size=(video.height, video.width),
  )


def pad_clip(
    clip: Clip, cfg: ml_collections.ConfigDict, stats: _Stats | None = None
) -> dict[str, np.ndarray]:
  """Pads a clip to the fixed canvas and ``max_instances`` (validity masks mark padding)."""
  pad_hw = tuple(int(v) for v in cfg.pad_size)
  frames, image_valid = transforms.pad_frames(clip.frames, pad_hw)
  max_n = int(cfg.max_instances)
  keep = np.flatnonzero(clip.box_valid.any(axis=1))  # instances with a box in the clip
  if keep.size > max_n:
    if stats is not None:
      stats.add("instances_truncated", int(keep.size - max_n))
    keep = keep[:max_n]
  n, num_t = keep.size, clip.frames.shape[0]
  boxes = np.zeros((max_n, num_t, 4), np.float32)
  box_valid = np.zeros((max_n, num_t), bool)
  labels = np.zeros((max_n,), np.int32)
  track_ids = np.full((max_n,), -1, np.int32)
  instance_valid = np.zeros((max_n,), bool)
  boxes[:n] = clip.boxes[keep]
  box_valid[:n] = clip.box_valid[keep]
  labels[:n] = clip.labels[keep]
  track_ids[:n] = clip.track_ids[keep]
  instance_valid[:n] = True
  out = dict(
      frames=frames,
      image_valid=image_valid,
      boxes=boxes,
      box_valid=box_valid,
      labels=labels,
      instance_valid=instance_valid,
      track_ids=track_ids,
      video_id=np.int32(clip.video_id),
      frame_index=clip.frame_index.astype(np.int32),
      orig_size=np.array(clip.orig_size, np.int32),
  )
  if cfg.with_masks:
    masks = np.zeros((max_n, num_t) + pad_hw, np.uint8)
    if n:
      h, w = clip.frames.shape[1:3]
      masks[:n, :, :h, :w] = clip.masks[keep]
    out["masks"] = masks
  return out


# --------------------------------------------------------------------------- training


class _ClipMaker:
  """Maps a global clip index to a padded example; pure function of (seed, index).

  One source per maker: the video dataset ('synthetic' / 'ytvis') or COCO pseudo clips
  ('coco_pseudo'). A joint run (`MixedTrainIterator`) has one maker per source.
  """

  def __init__(
      self,
      cfg: ml_collections.ConfigDict,
      seed: int,
      coco_target: tuple[Sequence[str], Sequence[int] | None] | None = None,
  ):
    self.cfg = cfg
    self.seed = int(seed)
    self.stats = _Stats()
    self.source = None
    name = cfg.name
    if name in ("synthetic", "ytvis"):
      self.source = open_video_source(cfg, "train")
      if cfg.skip_empty_videos and isinstance(self.source, JsonVideoSource):
        self.source = JsonVideoSource(ytvis_json.drop_unannotated_videos(self.source.dataset))
      elif cfg.skip_empty_videos:
        self.source.drop_unannotated_videos()
      if len(self.source) == 0:
        raise ValueError("the training set has no videos")
      self.is_coco = False
    elif name == "coco_pseudo":
      from maskfreevis_jax.data import coco_pseudo  # pylint: disable=g-import-not-at-top

      target, target_ids = coco_target if coco_target is not None else (None, None)
      if target is None and cfg.coco.target_categories:
        dataset = ytvis_json.load_ytvis_json(cfg.coco.target_categories)
        target, target_ids = dataset.class_names, [c.id for c in dataset.categories]
      self.source = coco_pseudo.CocoPseudoClipSource(
          cfg.coco.json,
          cfg.coco.image_root or None,
          target_class_names=target,
          category_map=cfg.coco.get("category_map", "by_name"),
          target_category_ids=target_ids,
          skip_unmapped=bool(cfg.coco.get("skip_unmapped_categories", False)),
      )
      self.is_coco = True
    else:
      raise ValueError(
          f"unknown data.name {cfg.name!r}; expected 'synthetic', 'ytvis', "
          "'coco_pseudo', 'synthetic+coco_pseudo' or 'ytvis+coco_pseudo'"
      )
    self.class_names = self.source.class_names

  @functools.lru_cache(maxsize=4)
  def _permutation(self, epoch: int, size: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(size)

  def make(self, global_index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, 1, int(global_index)])
    source = self.source
    epoch, pos = divmod(int(global_index), len(source))
    index = int(self._permutation(epoch, len(source))[pos])
    if self.is_coco:
      clip = source.training_clip(index, rng, self.cfg, self.stats)
      return pad_clip(clip, self.cfg, self.stats)
    for attempt in range(_MAX_CORRUPT_RETRIES):
      try:
        clip = video_training_clip(source, index, rng, self.cfg, self.stats)
        return pad_clip(clip, self.cfg, self.stats)
      except FrameReadError as e:
        if not self.cfg.skip_corrupt_frames or attempt == _MAX_CORRUPT_RETRIES - 1:
          raise
        logging.warning("skipping video id %d: %s", source.video(index).id, e)
        self.stats.add("corrupt_frames_skipped")
        index = (index + 1) % len(source)
    raise AssertionError("unreachable")


def _output_spec(cfg: ml_collections.ConfigDict):
  ph, pw = (int(v) for v in cfg.pad_size)
  t, n = int(cfg.num_frames), int(cfg.max_instances)
  spec = {
      "frames": (np.uint8, (t, ph, pw, 3)),
      "image_valid": (bool, (ph, pw)),
      "boxes": (np.float32, (n, t, 4)),
      "box_valid": (bool, (n, t)),
      "labels": (np.int32, (n,)),
      "instance_valid": (bool, (n,)),
      "track_ids": (np.int32, (n,)),
      "video_id": (np.int32, ()),
      "frame_index": (np.int32, (t,)),
      "orig_size": (np.int32, (2,)),
  }
  if cfg.with_masks:
    spec["masks"] = (np.uint8, (n, t, ph, pw))
  return spec


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
      coco_target: tuple[Sequence[str], Sequence[int] | None] | None = None,
  ):
    cfg = _data_cfg(config)
    if is_joint(cfg):
      raise ValueError(
          f"data.name={cfg.name!r} has two sources: use create_train_iterator "
          "(a MixedTrainIterator)"
      )
    _check_config(cfg)
    if process_index is None or process_count is None:
      import jax  # pylint: disable=g-import-not-at-top

      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    self.global_batch_size = int(global_batch_size or cfg.batch_size)
    if self.global_batch_size % process_count:
      raise ValueError(
          f"batch size {self.global_batch_size} is not divisible by the " f"{process_count} hosts"
      )
    self.local_batch_size = self.global_batch_size // process_count
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.cfg = cfg
    self.seed = int(seed)
    self._maker = _ClipMaker(cfg, seed, coco_target)
    self.class_names = self._maker.class_names
    self._spec = _output_spec(cfg)
    self._errors: dict[int, BaseException] = {}
    self._next_batch = 0
    self._iterator = None

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

  def _make_example(self, local_element: np.ndarray):
    batch, row = divmod(int(local_element), self.local_batch_size)
    g = self.global_clip_index(batch, row)
    try:
      ex = self._maker.make(g)
    except Exception as e:  # re-raised unchanged by __next__ (tf would wrap it)
      self._errors[g] = e
      raise
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
    parallel = self.cfg.num_parallel_calls
    ds = ds.map(
        make, num_parallel_calls=tf.data.AUTOTUNE if parallel < 0 else parallel, deterministic=True
    )
    ds = ds.batch(self.local_batch_size, drop_remainder=True)
    ds = ds.prefetch(self.cfg.prefetch)
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
    self._next_batch += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    """Position (next batch number) plus what the stream depends on, JSON-able."""
    return {
        "next_batch": self._next_batch,
        "seed": self.seed,
        "global_batch_size": self.global_batch_size,
        "process_count": self.process_count,
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
    self._iterator = None


VIDEO_SOURCE, COCO_SOURCE = "video", "coco"


def is_joint(config: ml_collections.ConfigDict) -> bool:
  """Whether the data config trains on a video dataset and COCO pseudo clips together."""
  parts = _data_cfg(config).name.split("+")
  return len(parts) == 2 and parts[1] == "coco_pseudo" and parts[0] in ("synthetic", "ytvis")


def source_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  """The data config of each source of a run: {'video': ...} and/or {'coco': ...}.

  A joint config ('ytvis+coco_pseudo') splits into a video config and a COCO config whose
  ``num_frames``, ``pad_size``, ``max_instances`` and ``with_masks`` come from ``coco.*``
  (-1 / () / 'box' meaning "as the video clips"). A single-source config is returned as is.
  """
  cfg = _data_cfg(config)
  if not is_joint(cfg):
    return {COCO_SOURCE if cfg.name == "coco_pseudo" else VIDEO_SOURCE: cfg}
  if cfg.coco.supervision not in ("box", "mask"):
    raise ValueError(f"data.coco.supervision must be 'box' or 'mask', got {cfg.coco.supervision!r}")
  if not 0.0 <= float(cfg.coco.fraction) <= 1.0:
    raise ValueError(f"data.coco.fraction must lie in [0, 1], got {cfg.coco.fraction}")
  video = ml_collections.ConfigDict(cfg.to_dict())
  video.name = cfg.name.split("+")[0]
  coco = ml_collections.ConfigDict(cfg.to_dict())
  coco.name = "coco_pseudo"
  if int(cfg.coco.num_frames) > 0:
    coco.num_frames = int(cfg.coco.num_frames)
  if cfg.coco.pad_size:
    coco.pad_size = tuple(int(v) for v in cfg.coco.pad_size)
  if int(cfg.coco.max_instances) > 0:
    coco.max_instances = int(cfg.coco.max_instances)
  coco.with_masks = cfg.coco.supervision == "mask"
  return {VIDEO_SOURCE: video, COCO_SOURCE: coco}


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
    cfg = _data_cfg(config)
    configs = source_configs(cfg)
    self.seed = int(seed)
    self.coco_fraction = float(cfg.coco.fraction)
    kwargs = dict(
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    self.video = TrainIterator(configs[VIDEO_SOURCE], seed, **kwargs)
    dataset = getattr(self.video._maker.source, "dataset", None)  # pylint: disable=protected-access
    target_ids = [c.id for c in dataset.categories] if dataset is not None else None
    self.coco = TrainIterator(
        configs[COCO_SOURCE], seed, coco_target=(self.video.class_names, target_ids), **kwargs
    )
    self.class_names = self.video.class_names
    self.global_batch_size = self.video.global_batch_size
    self._step = 0

  def source_of_step(self, step: int) -> str:
    """'coco' or 'video': the source of step ``step`` (0-based), the same on every host."""
    draw = np.random.default_rng([self.seed, int(step), 0xC0C0]).uniform()
    return COCO_SOURCE if draw < self.coco_fraction else VIDEO_SOURCE

  @property
  def stats(self) -> dict[str, dict[str, int]]:
    return {VIDEO_SOURCE: self.video.stats, COCO_SOURCE: self.coco.stats}

  def batch_specs(self) -> dict[str, dict[str, Any]]:
    """Each source's host batch shapes (`TrainIterator.batch_spec`), video first."""
    return {VIDEO_SOURCE: self.video.batch_spec(), COCO_SOURCE: self.coco.batch_spec()}

  def __iter__(self) -> Iterator[dict[str, Any]]:
    return self

  def __next__(self) -> dict[str, Any]:
    source = self.source_of_step(self._step)
    batch = dict(next(self.coco if source == COCO_SOURCE else self.video))
    self._step += 1
    batch["source"] = source
    return batch

  def get_state(self) -> dict[str, Any]:
    """Steps drawn so far plus each source's `TrainIterator.get_state`, JSON-able."""
    return {
        "step": self._step,
        "seed": self.seed,
        "coco_fraction": self.coco_fraction,
        VIDEO_SOURCE: self.video.get_state(),
        COCO_SOURCE: self.coco.get_state(),
    }

  def set_state(self, state: dict[str, Any]) -> None:
    """Restores a position saved by `get_state` (same seed and source fraction)."""
    for key in ("step", VIDEO_SOURCE, COCO_SOURCE):
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
    self.video.set_state(state[VIDEO_SOURCE])
    self.coco.set_state(state[COCO_SOURCE])
    self._step = int(state["step"])


def create_train_iterator(
    config: ml_collections.ConfigDict, seed: int, global_batch_size: int | None = None, **kwargs
):
  """Training iterator; ``config`` is the full config or ``config.data``.

  Returns:
    A `MixedTrainIterator` for a joint config ('ytvis+coco_pseudo'), else a `TrainIterator`.
  """
  if is_joint(config):
    return MixedTrainIterator(config, seed, global_batch_size, **kwargs)
  return TrainIterator(config, seed, global_batch_size, **kwargs)


# -------------------------------------------------------------------------- evaluation


class EvalDataset:
  """Whole videos for evaluation (this host's share), resized to the test size.

  Iterating yields one dict per video:
    frames uint8 [L, PH, PW, 3]; image_valid bool [PH, PW]; video_id int;
    orig_size int32 [2]; resized_size int32 [2] (before padding); frame_index int32 [L];
    file_names list[str];
    with annotations: boxes float32 [N, L, 4] (resized pixels), box_valid [N, L], labels,
    track_ids, instance_valid [N]; and ``masks`` uint8 [N, L, PH, PW] when ``with_masks``.
  ``dataset`` (for JSON sources) gives the original annotations for the evaluator.
  """

  def __init__(
      self,
      config: ml_collections.ConfigDict,
      split: str = "valid",
      with_annotations: bool | None = None,
      with_masks: bool | None = None,
      process_index: int | None = None,
      process_count: int | None = None,
  ):
    cfg = _data_cfg(config)
    _check_config(cfg)
    self.cfg = cfg
    self.source = open_video_source(cfg, split)
    self.dataset = getattr(self.source, "dataset", None)
    self.class_names = self.source.class_names
    has_ann = any(v.tracks for v in (self.source.video(i) for i in range(len(self.source))))
    self.with_annotations = has_ann if with_annotations is None else with_annotations
    self.with_masks = self.with_annotations if with_masks is None else with_masks
    if process_index is None or process_count is None:
      import jax  # pylint: disable=g-import-not-at-top

      process_index, process_count = jax.process_index(), jax.process_count()
    self.indices = list(range(process_index, len(self.source), process_count))

  def __len__(self) -> int:
    return len(self.indices)

  def __iter__(self) -> Iterator[dict[str, Any]]:
    for i in self.indices:
      yield self.video_example(i)

  def video_example(self, index: int) -> dict[str, Any]:
    cfg = self.cfg
    video = self.source.video(index)
    out_hw = transforms.resized_shape(
        video.height,
        video.width,
        cfg.min_size_test,
        cfg.max_size_test,
        canvas=tuple(cfg.eval_pad_size) or None,
    )
    pad_hw = (
        tuple(int(v) for v in cfg.eval_pad_size)
        if cfg.eval_pad_size
        else (transforms.round_up(out_hw[0]), transforms.round_up(out_hw[1]))
    )
    transform = transforms.ClipTransform((video.height, video.width), out_hw, flip=False)
    frame_idx = np.arange(video.length, dtype=np.int32)
    frames = np.stack([transform.apply_image(f) for f in self.source.read_frames(index, frame_idx)])
    frames, image_valid = transforms.pad_frames(frames, pad_hw)
    out = dict(
        frames=frames,
        image_valid=image_valid,
        video_id=video.id,
        orig_size=np.array([video.height, video.width], np.int32),
        resized_size=np.array(out_hw, np.int32),
        frame_index=frame_idx,
        file_names=list(video.file_names),
    )
    if self.with_annotations:
      tracks = [t for t in video.tracks if not t.iscrowd]
      n = len(tracks)
      boxes = np.zeros((n, video.length, 4), np.float32)
      valid = np.zeros((n, video.length), bool)
      for k, t in enumerate(tracks):
        boxes[k], valid[k] = t.boxes, t.box_valid
      boxes = transform.apply_boxes(boxes)
      valid &= transforms.nonempty_boxes(boxes)
      out.update(
          boxes=np.where(valid[..., None], boxes, 0).astype(np.float32),
          box_valid=valid,
          labels=np.array([t.label for t in tracks], np.int32),
          track_ids=np.array([t.id for t in tracks], np.int32),
          instance_valid=np.ones((n,), bool),
      )
      if self.with_masks:
        masks = np.zeros((n, video.length) + pad_hw, np.uint8)
        for k, t in enumerate(tracks):
          if t.segmentations is None:
            continue
          for f in range(video.length):
            m = ytvis_json.decode_segmentation(t.segmentations[f], video.height, video.width)
            masks[k, f, : out_hw[0], : out_hw[1]] = transform.apply_mask(m)
        out["masks"] = masks
    return out


def create_eval_dataset(
    config: ml_collections.ConfigDict, split: str = "valid", **kwargs
) -> EvalDataset:
  """Evaluation videos (see `EvalDataset`); ``config`` is the full config or ``config.data``."""
  return EvalDataset(config, split, **kwargs)


def load_ytvis_json(path: str, image_root: str | None = None) -> ytvis_json.YtvisDataset:
  """Validated YouTube-VIS annotations (re-export of `ytvis_json.load_ytvis_json`)."""
  return ytvis_json.load_ytvis_json(path, image_root)
