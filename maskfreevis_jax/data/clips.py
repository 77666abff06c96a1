"""Training clips: one augmented clip of a video (`Clip`), padded to the fixed batch shapes.

A padded example (`pad_clip`) holds the `FIELDS` below; `clip_spec` gives their shapes without
reading data (B, the batch dimension, is added by the iterators)::

  frames         uint8   [T, H, W, 3]   RGB, zero outside the image
  image_valid    bool    [H, W]         True on real image pixels
  boxes          float32 [N, T, 4]      x1, y1, x2, y2 in pixels of the padded frame
  box_valid      bool    [N, T]
  labels         int32   [N]
  instance_valid bool    [N]
  track_ids      int32   [N]            dataset track id, -1 for padding
  masks          uint8   [N, T, H, W]   only when ``data.with_masks``
  video_id       int32   []
  frame_index    int32   [T]
  orig_size      int32   [2]            (H, W) before resizing

H, W are ``data.pad_size``, T ``data.num_frames`` and N ``data.max_instances``.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import ml_collections
import numpy as np

from maskfreevis_jax.data import transforms
from maskfreevis_jax.data import ytvis_json

FIELDS = (
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


def check_clip_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming the `config.data` clip setting that is out of range."""
  data = config.data
  ph, pw = (int(v) for v in data.pad_size)
  if ph % 32 or pw % 32 or ph <= 0 or pw <= 0:
    raise ValueError(f"data.pad_size must be positive multiples of 32, got {tuple(data.pad_size)}")
  if data.num_frames < 1:
    raise ValueError(f"data.num_frames must be >= 1, got {data.num_frames}")
  if data.max_instances < 1:
    raise ValueError(f"data.max_instances must be >= 1, got {data.max_instances}")
  if not data.min_size_train:
    raise ValueError("data.min_size_train must list at least one size")
  if data.eval_pad_size and any(int(v) % 32 for v in data.eval_pad_size):
    raise ValueError(f"data.eval_pad_size must be multiples of 32, got {data.eval_pad_size}")


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


class ClipStats:
  """Thread-safe counters of what clip making dropped or skipped (`counts`, name -> int)."""

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


def _track_masks(
    video: ytvis_json.Video,
    tracks: list[ytvis_json.Track],
    frame_idx: np.ndarray,
    transform: transforms.ClipTransform,
    out_hw: tuple[int, int],
) -> np.ndarray:
  """uint8 [N, T, h, w]: the tracks' masks on the clip's frames, transformed."""
  masks = np.zeros((len(tracks), len(frame_idx)) + out_hw, np.uint8)
  for k, track in enumerate(tracks):
    if track.segmentations is None:
      raise ValueError(
          f"data.with_masks is set but video id {video.id}, annotation id "
          f"{track.id} has no 'segmentations'"
      )
    for j, t in enumerate(frame_idx):
      m = ytvis_json.decode_segmentation(track.segmentations[t], video.height, video.width)
      masks[k, j] = transform.apply_mask(m)
  return masks


def video_training_clip(
    source: Any,
    video_index: int,
    rng: np.random.Generator,
    config: ml_collections.ConfigDict,
    stats: ClipStats | None = None,
) -> Clip:
  """Samples and augments one training clip of a video (one transform for all frames).

  Args:
    source: a video source (`sources.JsonVideoSource` or `tfds_builders.TfdsVideoSource`).
    video_index: the video's position in `source`.
    rng: draws the frames, the short side and the flip, in that order.
    config: the full config; `config.data` sets the clip.
    stats: counts the boxes the transform empties.

  Returns:
    The clip: frames uint8 [T, h, w, 3], boxes float32 [N, T, 4], box_valid bool [N, T], ...
    (N: the video's non-crowd tracks with a box in the clip).
  """
  data = config.data
  video = source.video(video_index)
  frame_idx = transforms.sample_clip_frame_indices(
      rng, video.length, data.num_frames, data.frame_range, data.shuffle_frames
  )
  short = int(rng.choice(np.asarray(data.min_size_train)))
  flip = bool(data.random_flip) and bool(rng.uniform() < 0.5)
  out_hw = transforms.resized_shape(
      video.height, video.width, short, data.max_size_train, canvas=tuple(data.pad_size)
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
  if data.with_masks:
    masks = _track_masks(video, tracks, frame_idx, transform, out_hw)
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
    clip: Clip, config: ml_collections.ConfigDict, stats: ClipStats | None = None
) -> dict[str, np.ndarray]:
  """Pads a clip to ``data.pad_size`` and ``data.max_instances`` (validity masks mark padding).

  Returns:
    The `FIELDS` of one example, shapes as `clip_spec` (``masks`` only with ``data.with_masks``);
    instances beyond ``max_instances`` are dropped (counted in `stats`).
  """
  data = config.data
  pad_hw = tuple(int(v) for v in data.pad_size)
  frames, image_valid = transforms.pad_frames(clip.frames, pad_hw)
  max_n = int(data.max_instances)
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
  if data.with_masks:
    masks = np.zeros((max_n, num_t) + pad_hw, np.uint8)
    if n:
      h, w = clip.frames.shape[1:3]
      masks[:n, :, :h, :w] = clip.masks[keep]
    out["masks"] = masks
  return out


def clip_spec(config: ml_collections.ConfigDict) -> dict[str, tuple[Any, tuple[int, ...]]]:
  """Field -> (numpy dtype, shape) of one padded example (`pad_clip`) under `config.data`."""
  data = config.data
  ph, pw = (int(v) for v in data.pad_size)
  t, n = int(data.num_frames), int(data.max_instances)
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
  if data.with_masks:
    spec["masks"] = (np.uint8, (n, t, ph, pw))
  return spec
