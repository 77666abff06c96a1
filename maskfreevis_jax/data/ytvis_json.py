"""Parsing and validation of YouTube-VIS style annotation files.

YouTube-VIS 2019, YouTube-VIS 2021 and OVIS share one JSON schema:

* ``videos``: ``{id, width, height, length, file_names}`` (``file_names`` relative to an
  image root, one per frame).
* ``annotations`` (absent in the official test/valid files): one entry per object track with
  ``{id, video_id, category_id, iscrowd, bboxes, segmentations, areas}``; ``bboxes[t]`` is
  ``[x, y, w, h]`` or ``null`` and ``segmentations[t]`` is an RLE dict, a polygon list or
  ``null`` for frame ``t``.
* ``categories``: ``{id, name}``; ids need not be contiguous, they are mapped to labels in
  ``[0, num_classes)`` in increasing id order.

`load_ytvis_json` reads such a file, checks every field it relies on and raises a
`ValueError` naming the file and the offending video/annotation/field otherwise. Boxes are
converted to ``x1, y1, x2, y2`` pixels, clipped to the image and dropped when empty; both
counts are logged. Masks are never decoded here; `decode_segmentation` does it on demand.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from absl import logging
import numpy as np
from pycocotools import mask as mask_util

# Width or height (pixels) under which a box counts as empty (as detectron2's nonempty()).
MIN_BOX_SIDE = 1e-5


@dataclasses.dataclass(frozen=True)
class Category:
  """One object category: dataset id, name and contiguous label."""

  id: int
  name: str
  label: int


@dataclasses.dataclass
class Track:
  """One annotated object through a video.

  Attributes:
    id: annotation id (the track id).
    category_id: dataset category id.
    label: contiguous class index in ``[0, num_classes)``.
    iscrowd: crowd flag (crowd tracks are not used for training).
    boxes: float32 ``[L, 4]`` x1, y1, x2, y2 in original pixels (zeros where invalid).
    box_valid: bool ``[L]``, the frame has a non-empty box.
    segmentations: raw per-frame segmentations (RLE dict, polygon list or None), or None
      when the file has none.
  """

  id: int
  category_id: int
  label: int
  iscrowd: bool
  boxes: np.ndarray
  box_valid: np.ndarray
  segmentations: list[Any] | None


@dataclasses.dataclass
class Video:
  """One video and its tracks.

  Attributes:
    id: dataset video id.
    height: frame height in pixels.
    width: frame width in pixels.
    file_names: frame paths, absolute when an image root was given.
    tracks: annotated tracks (empty for unannotated splits).
  """

  id: int
  height: int
  width: int
  file_names: list[str]
  tracks: list[Track]

  @property
  def length(self) -> int:
    return len(self.file_names)

  def has_annotations(self) -> bool:
    """True when at least one non-crowd track has a non-empty box in some frame."""
    return any(bool(t.box_valid.any()) for t in self.tracks if not t.iscrowd)


@dataclasses.dataclass
class YtvisDataset:
  """A validated YouTube-VIS style dataset.

  Attributes:
    path: the annotation file.
    image_root: directory the frame file names are relative to.
    categories: categories sorted by id (their ``label`` is the position).
    videos: videos sorted by id.
    has_annotations: the file has an ``annotations`` list.
    num_clipped_boxes: boxes that extended outside the image and were clipped.
    num_dropped_boxes: boxes that were empty (zero area / outside) and were dropped.
  """

  path: str
  image_root: str
  categories: list[Category]
  videos: list[Video]
  has_annotations: bool
  num_clipped_boxes: int = 0
  num_dropped_boxes: int = 0

  @property
  def num_classes(self) -> int:
    return len(self.categories)

  @property
  def class_names(self) -> list[str]:
    return [c.name for c in self.categories]


def _fail(path: str, where: str, message: str) -> ValueError:
  return ValueError(f"{path}: {where}: {message}")


def require_field(obj: Any, key: str, types: type | tuple[type, ...], path: str, where: str) -> Any:
  """``obj[key]`` checked to be of `types`; else a ValueError naming `path`, `where` and `key`."""
  if not isinstance(obj, dict):
    raise _fail(path, where, f"expected a JSON object, got {type(obj).__name__}")
  if key not in obj:
    raise _fail(path, where, f"missing field '{key}'")
  value = obj[key]
  # bool is an int subclass; never accept it for numeric fields.
  if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
    raise _fail(path, where, f"field '{key}' must be {types}, got bool")
  if not isinstance(value, types):
    raise _fail(
        path,
        where,
        f"field '{key}' must be {getattr(types, '__name__', types)}, "
        f"got {type(value).__name__}",
    )
  return value


def read_json(path: str) -> Any:
  """Reads a JSON file; a syntax error becomes a ValueError with file, line and column."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"annotation file not found: {path}")
  with open(path, "rb") as f:
    raw = f.read()
  try:
    return json.loads(raw)
  except json.JSONDecodeError as e:
    raise ValueError(
        f"{path}: malformed JSON at line {e.lineno} column {e.colno} " f"(char {e.pos}): {e.msg}"
    ) from None
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 text at byte {e.start}: {e.reason}") from None


def parse_box(box: Any, path: str, where: str) -> list[float] | None:
  """A JSON ``[x, y, w, h]`` box as floats (None for null); else a ValueError naming `where`."""
  if box is None:
    return None
  if (
      not isinstance(box, (list, tuple))
      or len(box) != 4
      or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
  ):
    raise _fail(path, where, f"bbox must be null or [x, y, w, h] numbers, got {box!r}")
  return [float(v) for v in box]


def _check_segmentation(segm: Any, path: str, where: str) -> None:
  if segm is None:
    return
  if isinstance(segm, dict):
    if "counts" not in segm or "size" not in segm:
      raise _fail(path, where, "RLE segmentation needs 'counts' and 'size'")
    return
  if isinstance(segm, list):
    return
  raise _fail(
      path,
      where,
      f"segmentation must be null, an RLE dict or polygons, got " f"{type(segm).__name__}",
  )


def _categories(data: dict[str, Any], path: str) -> list[Category]:
  """The file's categories sorted by id, labelled 0, 1, ... in that order."""
  seen_cat_ids = set()
  cat_entries = []
  for i, cat in enumerate(require_field(data, "categories", list, path, "top level")):
    where = f"categories[{i}]"
    cid = require_field(cat, "id", int, path, where)
    name = require_field(cat, "name", str, path, where)
    if cid in seen_cat_ids:
      raise _fail(path, where, f"duplicate category id {cid}")
    seen_cat_ids.add(cid)
    cat_entries.append((cid, name))
  cat_entries.sort()
  return [Category(id=cid, name=name, label=i) for i, (cid, name) in enumerate(cat_entries)]


def _videos(data: dict[str, Any], path: str, image_root: str) -> dict[int, Video]:
  """Video id -> the video (without tracks), file names joined to `image_root`."""
  videos: dict[int, Video] = {}
  for i, vid in enumerate(require_field(data, "videos", list, path, "top level")):
    where = f"videos[{i}]"
    vid_id = require_field(vid, "id", int, path, where)
    where = f"video id {vid_id}"
    if vid_id in videos:
      raise _fail(path, where, "duplicate video id")
    file_names = require_field(vid, "file_names", list, path, where)
    if not file_names or not all(isinstance(f, str) for f in file_names):
      raise _fail(path, where, "'file_names' must be a non-empty list of strings")
    height = require_field(vid, "height", int, path, where)
    width = require_field(vid, "width", int, path, where)
    if height <= 0 or width <= 0:
      raise _fail(path, where, f"non-positive frame size {height}x{width}")
    length = vid.get("length", len(file_names))
    if length != len(file_names):
      raise _fail(
          path, where, f"'length' is {length} but 'file_names' has " f"{len(file_names)} entries"
      )
    videos[vid_id] = Video(
        id=vid_id,
        height=height,
        width=width,
        file_names=[os.path.join(image_root, f) for f in file_names],
        tracks=[],
    )
  return videos


def _check_segmentations(segms: Any, video: Video, path: str, where: str) -> None:
  if segms is None:
    return
  if not isinstance(segms, list) or len(segms) != video.length:
    got = len(segms) if isinstance(segms, list) else type(segms).__name__
    raise _fail(
        path,
        where,
        f"'segmentations' has {got} entries but the video has "
        f"{video.length} frames (file_names)",
    )
  for t, s in enumerate(segms):
    _check_segmentation(s, path, f"{where}, frame {t}")


def _track_boxes(
    bboxes: list[Any], video: Video, path: str, where: str
) -> tuple[np.ndarray, np.ndarray, int, int]:
  """Per-frame JSON boxes -> (boxes float32 [L, 4] x1, y1, x2, y2 clipped to the frame,
  valid bool [L], boxes clipped, empty boxes dropped)."""
  boxes = np.zeros((video.length, 4), np.float32)
  valid = np.zeros((video.length,), bool)
  num_clipped = num_dropped = 0
  for t, b in enumerate(bboxes):
    box = parse_box(b, path, f"{where}, frame {t}")
    if box is None:
      continue
    x, y, w, h = box
    x1, y1, x2, y2 = x, y, x + w, y + h
    cx1, cy1 = min(max(x1, 0.0), video.width), min(max(y1, 0.0), video.height)
    cx2, cy2 = min(max(x2, 0.0), video.width), min(max(y2, 0.0), video.height)
    if cx2 - cx1 <= MIN_BOX_SIDE or cy2 - cy1 <= MIN_BOX_SIDE:
      num_dropped += 1
      continue
    if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
      num_clipped += 1
    boxes[t] = (cx1, cy1, cx2, cy2)
    valid[t] = True
  return boxes, valid, num_clipped, num_dropped


def _add_tracks(
    data: dict[str, Any],
    path: str,
    videos: dict[int, Video],
    label_of: dict[int, int],
    keep_segmentations: bool,
) -> tuple[int, int]:
  """Appends each annotation to its video's tracks; returns (boxes clipped, boxes dropped)."""
  num_clipped = num_dropped = 0
  raw_annotations = data.get("annotations") or []
  if not isinstance(raw_annotations, list):
    raise _fail(path, "top level", "field 'annotations' must be a list")
  seen_track_ids = set()
  for i, ann in enumerate(raw_annotations):
    ann_id = require_field(ann, "id", int, path, f"annotations[{i}]")
    vid_id = require_field(ann, "video_id", int, path, f"annotation id {ann_id}")
    where = f"video id {vid_id}, annotation id {ann_id}"
    if ann_id in seen_track_ids:
      raise _fail(path, where, "duplicate annotation id")
    seen_track_ids.add(ann_id)
    if vid_id not in videos:
      raise _fail(path, where, "refers to a video id that is not in 'videos'")
    video = videos[vid_id]
    cat_id = require_field(ann, "category_id", int, path, where)
    if cat_id not in label_of:
      raise _fail(path, where, f"category_id {cat_id} is not in 'categories'")
    bboxes = require_field(ann, "bboxes", list, path, where)
    if len(bboxes) != video.length:
      raise _fail(
          path,
          where,
          f"'bboxes' has {len(bboxes)} entries but the video has "
          f"{video.length} frames (file_names)",
      )
    segms = ann.get("segmentations")
    _check_segmentations(segms, video, path, where)
    boxes, valid, clipped, dropped = _track_boxes(bboxes, video, path, where)
    num_clipped, num_dropped = num_clipped + clipped, num_dropped + dropped
    video.tracks.append(
        Track(
            id=ann_id,
            category_id=cat_id,
            label=label_of[cat_id],
            iscrowd=bool(ann.get("iscrowd", 0)),
            boxes=boxes,
            box_valid=valid,
            segmentations=segms if (keep_segmentations and segms is not None) else None,
        )
    )
  return num_clipped, num_dropped


def load_ytvis_json(
    path: str, image_root: str | None = None, *, keep_segmentations: bool = True
) -> YtvisDataset:
  """Reads and validates a YouTube-VIS / OVIS annotation file.

  Args:
    path: the JSON file.
    image_root: directory holding the frames (``file_names`` are relative to it). Defaults to
      ``<dir of json>/<json stem>/JPEGImages`` when that exists, else the JSON's directory.
    keep_segmentations: keep the raw per-frame segmentations (RLE/polygons) for later
      decoding; training on boxes only can pass False to save memory.

  Returns:
    The validated dataset, videos and categories sorted by id; each track's boxes float32
    [L, 4] (x1, y1, x2, y2 pixels) and box_valid bool [L].

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: malformed JSON or a missing/ill-typed field; the message names the file and
      the video/annotation id and field.
  """
  path = os.fspath(path)
  data = read_json(path)
  if not isinstance(data, dict):
    raise _fail(path, "top level", f"expected a JSON object, got {type(data).__name__}")
  if image_root is None:
    stem = os.path.splitext(os.path.basename(path))[0]
    guess = os.path.join(os.path.dirname(path), stem, "JPEGImages")
    image_root = guess if os.path.isdir(guess) else os.path.dirname(path)
  categories = _categories(data, path)
  videos = _videos(data, path, image_root)
  label_of = {c.id: c.label for c in categories}
  num_clipped, num_dropped = _add_tracks(data, path, videos, label_of, keep_segmentations)
  for video in videos.values():
    video.tracks.sort(key=lambda t: t.id)
  if num_clipped or num_dropped:
    logging.warning(
        "%s: clipped %d boxes extending outside the image and dropped %d empty "
        "(zero-area or outside) boxes",
        path,
        num_clipped,
        num_dropped,
    )
  return YtvisDataset(
      path=path,
      image_root=image_root,
      categories=categories,
      videos=[videos[k] for k in sorted(videos)],
      has_annotations="annotations" in data,
      num_clipped_boxes=num_clipped,
      num_dropped_boxes=num_dropped,
  )


def drop_unannotated_videos(dataset: YtvisDataset) -> YtvisDataset:
  """Removes videos without any usable box (logged), as training cannot use them."""
  kept = [v for v in dataset.videos if v.has_annotations()]
  skipped = [v.id for v in dataset.videos if not v.has_annotations()]
  if skipped:
    logging.warning(
        "%s: skipped %d videos whose every annotation is empty (video ids %s%s)",
        dataset.path,
        len(skipped),
        skipped[:10],
        " ..." if len(skipped) > 10 else "",
    )
  if not kept:
    raise ValueError(f"{dataset.path}: no video has a non-empty box annotation")
  return dataclasses.replace(dataset, videos=kept)


def decode_segmentation(segm: Any, height: int, width: int) -> np.ndarray:
  """Decodes one frame's segmentation to a uint8 ``[height, width]`` mask.

  Args:
    segm: ``None`` (empty), an RLE dict (compressed string or uncompressed list counts)
      or a list of polygons ``[[x0, y0, x1, y1, ...], ...]``.
    height: frame height.
    width: frame width.
  """
  if segm is None or (isinstance(segm, list) and not segm):
    return np.zeros((height, width), np.uint8)
  if isinstance(segm, dict):
    counts = segm["counts"]
    if isinstance(counts, list):
      rle = mask_util.frPyObjects(segm, *segm["size"])
    else:
      rle = {
          "size": list(segm["size"]),
          "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
      }
    mask = mask_util.decode(rle)
  else:
    polygons = [p for p in segm if len(p) >= 6 and len(p) % 2 == 0]
    if not polygons:
      return np.zeros((height, width), np.uint8)
    rle = mask_util.merge(mask_util.frPyObjects(polygons, height, width))
    mask = mask_util.decode(rle)
  if mask.shape != (height, width):
    raise ValueError(
        f"segmentation of size {mask.shape} does not match the frame size " f"{(height, width)}"
    )
  return mask.astype(np.uint8)


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
  """Encodes a binary ``[H, W]`` mask as a JSON-ready compressed RLE dict."""
  rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
  return {
      "size": [int(rle["size"][0]), int(rle["size"][1])],
      "counts": rle["counts"].decode("ascii"),
  }
