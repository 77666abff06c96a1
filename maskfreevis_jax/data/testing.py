"""Helpers that write small hand-made YouTube-VIS folders (for tests and examples)."""

from __future__ import annotations

import json
import os
from typing import Any
from collections.abc import Sequence

import numpy as np
from PIL import Image

from maskfreevis_jax.data import ytvis_json

BACKGROUND = 30
CATEGORY_COLORS = ((230, 40, 40), (40, 230, 40), (40, 40, 230))


def rect_frames(
    height: int,
    width: int,
    num_frames: int,
    rects: Sequence[Sequence[Sequence[int] | None]],
    colors: Sequence[Sequence[int]] | None = None,
) -> np.ndarray:
  """Frames with solid rectangles: ``rects[k][t] = (x, y, w, h)`` or None.

  Returns:
    uint8 ``[num_frames, height, width, 3]``.
  """
  frames = np.full((num_frames, height, width, 3), BACKGROUND, np.uint8)
  for k, track in enumerate(rects):
    color = (colors or CATEGORY_COLORS)[k % len(colors or CATEGORY_COLORS)]
    for t, box in enumerate(track):
      if box is not None:
        x, y, w, h = (int(v) for v in box)
        frames[t, max(y, 0) : y + h, max(x, 0) : x + w] = color
  return frames


def write_ytvis_folder(
    root: str,
    videos: Sequence[dict[str, Any]],
    categories: Sequence[str] = ("red", "green", "blue"),
    json_name: str = "train.json",
    image_format: str = "jpg",
    with_masks: bool = True,
) -> tuple[str, str]:
  """Writes a YouTube-VIS style folder.

  Args:
    root: output directory.
    videos: dicts with ``id``, ``frames`` (uint8 [L, H, W, 3] or [L, H, W]) and ``tracks``:
      list of ``{'id', 'category_id', 'bboxes': [xywh or None] * L}``; optional ``masks``
      per track (bool [L, H, W]) else rectangles are used as masks.
    categories: category names (ids 1..).
    json_name: annotation file name.
    image_format: 'jpg' or 'png' (PNG keeps exact pixel values, e.g. RGBA).
    with_masks: write ``segmentations`` (RLE).

  Returns:
    ``(json_path, image_root)``.
  """
  image_root = os.path.join(root, os.path.splitext(json_name)[0], "JPEGImages")
  out_videos, annotations = [], []
  for video in videos:
    frames = np.asarray(video["frames"])
    length, height, width = frames.shape[:3]
    name = f"v{video['id']:04d}"
    os.makedirs(os.path.join(image_root, name), exist_ok=True)
    file_names = []
    for t in range(length):
      rel = f"{name}/{t:05d}.{image_format}"
      Image.fromarray(frames[t]).save(os.path.join(image_root, rel), quality=95)
      file_names.append(rel)
    out_videos.append(
        {
            "id": video["id"],
            "height": height,
            "width": width,
            "length": length,
            "file_names": file_names,
        }
    )
    for track in video["tracks"]:
      ann = {
          "id": track["id"],
          "video_id": video["id"],
          "category_id": track["category_id"],
          "iscrowd": 0,
          "bboxes": track["bboxes"],
      }
      if with_masks:
        segms = []
        for t, box in enumerate(track["bboxes"]):
          if box is None:
            segms.append(None)
            continue
          mask = np.zeros((height, width), np.uint8)
          x, y, w, h = (int(round(v)) for v in box)
          mask[max(y, 0) : max(y + h, 0), max(x, 0) : max(x + w, 0)] = 1
          segms.append(ytvis_json.encode_mask(mask) if mask.any() else None)
        ann["segmentations"] = segms
      annotations.append(ann)
  data = {
      "videos": out_videos,
      "annotations": annotations,
      "categories": [{"id": i + 1, "name": n} for i, n in enumerate(categories)],
  }
  json_path = os.path.join(root, json_name)
  with open(json_path, "w") as f:
    json.dump(data, f)
  return json_path, image_root


def moving_rect_video(
    video_id: int,
    first_track_id: int,
    num_frames: int = 6,
    height: int = 64,
    width: int = 96,
    num_tracks: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
  """A video with ``num_tracks`` moving solid rectangles (category k+1 for track k)."""
  rng = np.random.default_rng([video_id, seed])
  rects = []
  for _ in range(num_tracks):
    w, h = int(rng.integers(8, width // 3)), int(rng.integers(8, height // 3))
    x0, y0 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
    dx, dy = int(rng.integers(-2, 3)), int(rng.integers(-2, 3))
    track = []
    for t in range(num_frames):
      x = int(np.clip(x0 + dx * t, 0, width - w))
      y = int(np.clip(y0 + dy * t, 0, height - h))
      track.append([x, y, w, h])
    rects.append(track)
  frames = rect_frames(height, width, num_frames, rects)
  tracks = [
      {
          "id": first_track_id + k,
          "category_id": k % 3 + 1,
          "bboxes": [[float(v) for v in b] for b in rects[k]],
      }
      for k in range(num_tracks)
  ]
  return {"id": video_id, "frames": frames, "tracks": tracks}


def write_coco_folder(
    root: str,
    categories: dict[int, str],
    images: Sequence[Sequence[tuple[int, Sequence[float]]]],
    size: tuple[int, int] = (96, 128),
) -> tuple[str, str]:
  """Writes a small COCO instances folder: solid rectangles with polygon masks.

  Args:
    root: output directory.
    categories: COCO category id -> name.
    images: per image, its objects as ``(category_id, [x, y, w, h])``; object k is drawn in
      colour k (`rect_frames`) and its mask is the rectangle.
    size: (H, W) of every image.

  Returns:
    ``(json_path, image_root)``.
  """
  os.makedirs(root, exist_ok=True)
  height, width = size
  out_images, annotations = [], []
  for i, objects in enumerate(images, start=1):
    frame = rect_frames(height, width, 1, [[list(box)] for _, box in objects])[0]
    file_name = f"{i:06d}.png"
    Image.fromarray(frame).save(os.path.join(root, file_name))
    out_images.append({"id": i, "file_name": file_name, "height": height, "width": width})
    for k, (category_id, (x, y, w, h)) in enumerate(objects):
      annotations.append(
          {
              "id": 100 * i + k,
              "image_id": i,
              "category_id": int(category_id),
              "iscrowd": 0,
              "bbox": [float(x), float(y), float(w), float(h)],
              "area": float(w * h),
              "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
          }
      )
  data = {
      "images": out_images,
      "annotations": annotations,
      "categories": [{"id": int(k), "name": v} for k, v in sorted(categories.items())],
  }
  json_path = os.path.join(root, "instances.json")
  with open(json_path, "w") as f:
    json.dump(data, f)
  return json_path, root
