"""COCO instance images as box-only pseudo clips (the official joint-training source).

Each COCO image becomes a clip of T frames: with probability ``crop_prob`` the image is resized
to a short side from ``crop_pre_sizes`` and a crop window of one size drifts from one random
position to another across the (sorted) frames, which imitates camera motion; otherwise every
frame shows the whole image. Then the clip gets one
shortest-edge resize (``coco.min_size_train`` / ``coco.max_size_train``) and one horizontal
flip decision. Boxes are carried through the crop and resize, clipped, and dropped per frame
when empty. With ``coco.rotation_degrees`` > 0 (the release: 15) every frame is then rotated
by its own angle, as the release's ``RandomRotationClip`` (boxes become the boxes around the
rotated boxes).

COCO categories reach the video dataset's labels through ``data.coco.category_map``:

* ``'ytvis_2019'`` / ``'ytvis_2021'``: the release's fixed tables (``COCO_TO_YTVIS_2019`` and
  ``COCO_TO_YTVIS_2021`` of ``mask2former_video/data_video/datasets/ytvis.py``), keyed by COCO
  category id. Only the listed categories map (COCO "mouse", the computer mouse, does not become
  the animal); an annotation of any other category is an error naming the file, unless
  ``data.coco.skip_unmapped_categories`` drops it (the release trains on a COCO file already
  filtered to the table, ``coco2ytvis2019_train.json``). The release has no COCO table for OVIS
  (its mapper names ``COCO_TO_OVIS`` but never defines it).
* ``'by_name'``: equal names (case and spaces ignored), for COCO-format files made for a video
  dataset with the same class names (the synthetic still images); annotations of other
  categories are dropped. Without a target dataset the file's own categories are the classes.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any
from collections.abc import Sequence

from absl import logging
import ml_collections
import numpy as np

from maskfreevis_jax.data import clips
from maskfreevis_jax.data import transforms
from maskfreevis_jax.data import ytvis_json

# The release's tables: COCO category id -> (COCO name, target category id, target name). The
# names are not used for matching, only to check that both files use the ids the table assumes.
COCO_TO_YTVIS_2019 = {
    1: ("person", 1, "person"),
    2: ("bicycle", 21, "motorbike"),
    3: ("car", 6, "sedan"),
    4: ("motorcycle", 21, "motorbike"),
    5: ("airplane", 28, "airplane"),
    7: ("train", 17, "train"),
    8: ("truck", 29, "truck"),
    9: ("boat", 34, "boat"),
    17: ("cat", 14, "cat"),
    18: ("dog", 8, "dog"),
    19: ("horse", 18, "horse"),
    21: ("cow", 15, "cow"),
    22: ("elephant", 32, "elephant"),
    23: ("bear", 20, "bear"),
    24: ("zebra", 30, "zebra"),
    25: ("giraffe", 22, "giraffe"),
    35: ("skis", 33, "snowboard"),
    36: ("snowboard", 33, "snowboard"),
    41: ("skateboard", 5, "skateboard"),
    42: ("surfboard", 27, "surfboard"),
    43: ("tennis racket", 40, "tennis_racket"),
}
COCO_TO_YTVIS_2021 = {
    1: ("person", 26, "person"),
    2: ("bicycle", 23, "motorbike"),
    3: ("car", 5, "car"),
    4: ("motorcycle", 23, "motorbike"),
    5: ("airplane", 1, "airplane"),
    7: ("train", 36, "train"),
    8: ("truck", 37, "truck"),
    9: ("boat", 4, "boat"),
    16: ("bird", 3, "bird"),
    17: ("cat", 6, "cat"),
    18: ("dog", 9, "dog"),
    19: ("horse", 19, "horse"),
    21: ("cow", 7, "cow"),
    22: ("elephant", 12, "elephant"),
    23: ("bear", 2, "bear"),
    24: ("zebra", 40, "zebra"),
    25: ("giraffe", 18, "giraffe"),
    34: ("frisbee", 14, "flying_disc"),
    35: ("skis", 31, "snowboard"),
    36: ("snowboard", 31, "snowboard"),
    41: ("skateboard", 29, "skateboard"),
    42: ("surfboard", 33, "surfboard"),
    43: ("tennis racket", 34, "tennis_racket"),
}
CATEGORY_TABLES = {"ytvis_2019": COCO_TO_YTVIS_2019, "ytvis_2021": COCO_TO_YTVIS_2021}
CATEGORY_MAPS = ("by_name",) + tuple(CATEGORY_TABLES)


def _norm(name: str) -> str:
  return name.lower().replace(" ", "_")


def category_mapping(
    coco_names: dict[int, str],
    target_class_names: Sequence[str] | None,
    category_map: str = "by_name",
    target_category_ids: Sequence[int] | None = None,
    path: str = "data.coco.json",
) -> dict[int, int]:
  """COCO category id -> target label.

  Args:
    coco_names: the COCO file's categories, id -> name.
    target_class_names: the video dataset's class names in label order (None: no target, the
      COCO file's categories sorted by id are the classes; only with 'by_name').
    category_map: 'by_name', 'ytvis_2019' or 'ytvis_2021' (see the module docstring).
    target_category_ids: the video dataset's category id of each label (default: 1, 2, ...,
      the YouTube-VIS numbering).
    path: the COCO file, for error messages.

  Returns:
    The COCO ids that map, with their labels.

  Raises:
    ValueError: unknown `category_map`; a table used without a target dataset, or with a COCO
      file or video dataset whose category ids are not the ones the table assumes.
  """
  if category_map not in CATEGORY_MAPS:
    raise ValueError(
        f"data.coco.category_map must be one of {CATEGORY_MAPS}, got " f"{category_map!r}"
    )
  if category_map == "by_name":
    if target_class_names is None:
      return {cid: i for i, cid in enumerate(sorted(coco_names))}
    target = {_norm(n): i for i, n in enumerate(target_class_names)}
    return {cid: target[_norm(name)] for cid, name in coco_names.items() if _norm(name) in target}
  if target_class_names is None:
    raise ValueError(
        f"data.coco.category_map={category_map!r} needs the video dataset's "
        "categories: train jointly with a video dataset or set "
        "data.coco.target_categories to its JSON"
    )
  table = CATEGORY_TABLES[category_map]
  ids = (
      list(target_category_ids)
      if target_category_ids is not None
      else list(range(1, len(target_class_names) + 1))
  )
  label_of_id = {int(cid): i for i, cid in enumerate(ids)}
  mapping = {}
  for coco_id, (coco_name, target_id, target_name) in table.items():
    label = label_of_id.get(target_id)
    if label is None or _norm(target_class_names[label]) != _norm(target_name):
      found = "absent" if label is None else repr(target_class_names[label])
      raise ValueError(
          f"data.coco.category_map={category_map!r} maps COCO {coco_name!r} to category id "
          f"{target_id} {target_name!r}, but the video dataset's category {target_id} is "
          f"{found}: pick the table of the video dataset"
      )
    if coco_id not in coco_names:
      continue
    if _norm(coco_names[coco_id]) != _norm(coco_name):
      raise ValueError(
          f"{path}: categories: id {coco_id} is {coco_names[coco_id]!r} but COCO id {coco_id} is "
          f"{coco_name!r} in the {category_map!r} table: the file does not use COCO category ids "
          "(data.coco.category_map='by_name' matches by name)"
      )
    mapping[coco_id] = label
  return mapping


@dataclasses.dataclass
class CocoImage:
  id: int
  path: str
  height: int
  width: int
  boxes: np.ndarray  # float32 [N, 4] x1, y1, x2, y2 (clipped, non-empty)
  labels: np.ndarray  # int32 [N]
  ann_ids: np.ndarray  # int32 [N]
  segmentations: list[Any]


def _coco_categories(data: dict[str, Any], path: str) -> dict[int, str]:
  """The file's categories, id -> name."""
  cats = {}
  for i, cat in enumerate(ytvis_json.require_field(data, "categories", list, path, "top level")):
    cats[ytvis_json.require_field(cat, "id", int, path, f"categories[{i}]")] = (
        ytvis_json.require_field(cat, "name", str, path, f"categories[{i}]")
    )
  return cats


def _coco_images(data: dict[str, Any], path: str, image_root: str) -> dict[int, dict[str, Any]]:
  """Image id -> its path, size and (empty) lists of kept boxes, labels, ids, segmentations."""
  images = {}
  for i, img in enumerate(ytvis_json.require_field(data, "images", list, path, "top level")):
    image_id = ytvis_json.require_field(img, "id", int, path, f"images[{i}]")
    where = f"image id {image_id}"
    images[image_id] = dict(
        path=os.path.join(image_root, ytvis_json.require_field(img, "file_name", str, path, where)),
        height=ytvis_json.require_field(img, "height", int, path, where),
        width=ytvis_json.require_field(img, "width", int, path, where),
        boxes=[],
        labels=[],
        ids=[],
        segms=[],
    )
  return images


def _add_annotations(
    data: dict[str, Any],
    path: str,
    images: dict[int, dict[str, Any]],
    cats: dict[int, str],
    mapping: dict[int, int],
    category_map: str,
    skip_unmapped: bool,
) -> int:
  """Appends each usable annotation to its image in `images`; returns the empty boxes dropped."""
  dropped = 0
  for i, ann in enumerate(ytvis_json.require_field(data, "annotations", list, path, "top level")):
    ann_id = ytvis_json.require_field(ann, "id", int, path, f"annotations[{i}]")
    where = f"annotation id {ann_id}"
    image_id = ytvis_json.require_field(ann, "image_id", int, path, where)
    if image_id not in images:
      raise ValueError(f"{path}: {where}: image_id {image_id} is not in 'images'")
    cat_id = ytvis_json.require_field(ann, "category_id", int, path, where)
    if cat_id not in cats:
      raise ValueError(f"{path}: {where}: category_id {cat_id} is not in 'categories'")
    if ann.get("iscrowd", 0):
      continue
    if cat_id not in mapping:
      if category_map in CATEGORY_TABLES and not skip_unmapped:
        raise ValueError(
            f"{path}: {where}: category_id {cat_id} ({cats[cat_id]!r}) is not in the release's "
            f"{category_map!r} table (data.coco.category_map); use a file filtered to the table "
            "or set data.coco.skip_unmapped_categories=True"
        )
      continue
    bbox = ytvis_json.parse_box(
        ytvis_json.require_field(ann, "bbox", list, path, where), path, where
    )
    im = images[image_id]
    x, y, w, h = bbox
    x1, y1 = min(max(x, 0.0), im["width"]), min(max(y, 0.0), im["height"])
    x2, y2 = min(max(x + w, 0.0), im["width"]), min(max(y + h, 0.0), im["height"])
    if x2 - x1 <= ytvis_json.MIN_BOX_SIDE or y2 - y1 <= ytvis_json.MIN_BOX_SIDE:
      dropped += 1
      continue
    im["boxes"].append((x1, y1, x2, y2))
    im["labels"].append(mapping[cat_id])
    im["ids"].append(ann_id)
    im["segms"].append(ann.get("segmentation"))
  return dropped


def load_coco_instances(
    path: str,
    image_root: str | None = None,
    target_class_names: Sequence[str] | None = None,
    category_map: str = "by_name",
    target_category_ids: Sequence[int] | None = None,
    skip_unmapped: bool = False,
) -> tuple[list[CocoImage], list[str]]:
  """Reads a COCO instances JSON (validated; errors name the file and image/annotation id).

  Args:
    path: the COCO instances JSON.
    image_root: folder of the images (default: the JSON's folder).
    target_class_names, category_map, target_category_ids: see `category_mapping`.
    skip_unmapped: with a table, drop annotations of categories outside it instead of failing.

  Returns:
    Images with at least one usable box (boxes float32 [N, 4] x1, y1, x2, y2), and the class
    names labels refer to.
  """
  data = ytvis_json.read_json(path)
  if not isinstance(data, dict):
    raise ValueError(f"{path}: top level: expected a JSON object")
  if image_root is None:
    image_root = os.path.dirname(path)
  cats = _coco_categories(data, path)
  mapping = category_mapping(cats, target_class_names, category_map, target_category_ids, path)
  class_names = (
      list(target_class_names)
      if target_class_names is not None
      else [cats[c] for c in sorted(cats)]
  )
  images = _coco_images(data, path, image_root)
  dropped = _add_annotations(data, path, images, cats, mapping, category_map, skip_unmapped)
  out = [
      CocoImage(
          id=k,
          path=v["path"],
          height=v["height"],
          width=v["width"],
          boxes=np.array(v["boxes"], np.float32).reshape(-1, 4),
          labels=np.array(v["labels"], np.int32),
          ann_ids=np.array(v["ids"], np.int32),
          segmentations=v["segms"],
      )
      for k, v in sorted(images.items())
      if v["boxes"]
  ]
  logging.info(
      "%s: %d of %d images have usable boxes (%d categories mapped, %d empty boxes dropped)",
      path,
      len(out),
      len(images),
      len(mapping),
      dropped,
  )
  if not out:
    raise ValueError(f"{path}: no image has a usable (mapped, non-crowd, non-empty) box")
  return out, class_names


class CocoPseudoClipSource:
  """Random access to COCO images turned into pseudo clips."""

  def __init__(
      self,
      json_path: str,
      image_root: str | None = None,
      target_class_names: Sequence[str] | None = None,
      category_map: str = "by_name",
      target_category_ids: Sequence[int] | None = None,
      skip_unmapped: bool = False,
  ):
    if not json_path:
      raise ValueError("data.coco.json is not set")
    self.images, self.class_names = load_coco_instances(
        json_path, image_root, target_class_names, category_map, target_category_ids, skip_unmapped
    )

  def __len__(self) -> int:
    return len(self.images)

  def training_clip(
      self,
      index: int,
      rng: np.random.Generator,
      config: ml_collections.ConfigDict,
      stats: clips.ClipStats | None = None,
  ) -> clips.Clip:
    """One augmented pseudo clip of image ``index``.

    Args:
      index: the image's position.
      rng: draws the pretend frame indices, the crop, the size, the flip and the rotation.
      config: the full config; `config.data` (its ``num_frames``, ``pad_size``,
        ``random_flip``, ``with_masks`` and ``coco.*``) sets the clip.
      stats: counts the boxes the transforms empty.

    Returns:
      The clip: frames uint8 [T, h, w, 3], boxes float32 [N, T, 4], box_valid bool [N, T],
      masks uint8 [N, T, h, w] with ``data.with_masks`` (N: the image's usable boxes).
    """
    data, coco = config.data, config.data.coco
    image = self.images[index]
    num_t = int(data.num_frames)
    # Frame indices of a pretend video, as the official pseudo-video sampler reports them.
    length = int(rng.integers(coco.pseudo_length[0], coco.pseudo_length[1] + 1))
    frame_idx = transforms.sample_clip_frame_indices(rng, length, num_t, coco.frame_range)
    frame_transforms = _frame_transforms(rng, data, (image.height, image.width), num_t)
    pixels = transforms.read_rgb(image.path)
    if pixels.shape[:2] != (image.height, image.width):
      raise ValueError(
          f"image {image.path} is {pixels.shape[0]}x{pixels.shape[1]} but the "
          f"annotation file declares {image.height}x{image.width}"
      )
    frames = np.stack([tr.apply_image(pixels) for tr in frame_transforms])
    n = len(image.labels)
    boxes = np.stack([tr.apply_boxes(image.boxes) for tr in frame_transforms], axis=1)
    valid = transforms.nonempty_boxes(boxes)
    if stats is not None:
      stats.add("boxes_dropped_after_transform", int((~valid).sum()))
    boxes = np.where(valid[..., None], boxes, 0).astype(np.float32).reshape(n, num_t, 4)
    masks = None
    if data.with_masks:
      masks = np.zeros((n, num_t) + frames.shape[1:3], np.uint8)
      for k, segm in enumerate(image.segmentations):
        if segm is None:
          raise ValueError(
              f"image {image.path}: annotation id {image.ann_ids[k]} has no segmentation, but "
              "data.with_masks=True (a box-only set trains with data.with_masks=False)"
          )
        full = ytvis_json.decode_segmentation(segm, image.height, image.width)
        for t, tr in enumerate(frame_transforms):
          masks[k, t] = tr.apply_mask(full) * valid[k, t]
    return clips.Clip(
        frames=frames,
        boxes=boxes,
        box_valid=valid,
        labels=image.labels.copy(),
        track_ids=image.ann_ids.copy(),
        masks=masks,
        video_id=image.id,
        frame_index=frame_idx,
        orig_size=(image.height, image.width),
    )


def _crop_windows(
    rng: np.random.Generator, coco: ml_collections.ConfigDict, hw: tuple[int, int], num_t: int
) -> tuple[list[tuple[int, int]], tuple[int, int], tuple[int, int]]:
  """A crop window drifting across the frames (the release's pseudo-video crop).

  Returns:
    The (y, x) corner of each frame's window in pixels of the pre-resized image, that image's
    (H, W) and the window's (h, w).
  """
  h, w = hw
  pre_short = int(rng.choice(np.asarray(coco.crop_pre_sizes)))
  ph, pw = transforms.resized_shape(h, w, pre_short, 1333)
  lo, hi = int(coco.crop_size[0]), int(coco.crop_size[1])
  ch = int(rng.integers(min(ph, lo), min(ph, hi) + 1))
  cw = int(rng.integers(min(pw, lo), min(pw, hi) + 1))
  y0, x0 = int(rng.integers(ph - ch + 1)), int(rng.integers(pw - cw + 1))
  y1, x1 = int(rng.integers(y0, ph - ch + 1)), int(rng.integers(x0, pw - cw + 1))
  frac = np.sort(rng.uniform(size=num_t))
  if rng.uniform() < 0.5:
    frac = frac[::-1]
  # Windows in pixels of the pre-resized image, as the release crops it (then resizes).
  ys = np.rint(y0 * frac + y1 * (1 - frac)).astype(int)
  xs = np.rint(x0 * frac + x1 * (1 - frac)).astype(int)
  return [(int(y), int(x)) for y, x in zip(ys, xs)], (ph, pw), (ch, cw)


def _frame_transforms(
    rng: np.random.Generator, data: ml_collections.ConfigDict, hw: tuple[int, int], num_t: int
) -> list[transforms.ClipTransform]:
  """Each frame's transform of a pseudo clip of an (H, W) = `hw` image.

  Draws, in order: the crop (with probability ``coco.crop_prob``), the short side, the flip and
  the rotation (``coco.rotation_degrees`` > 0).
  """
  coco = data.coco
  crop_windows, pre_hw, src_hw = None, None, hw
  if rng.uniform() < coco.crop_prob:
    crop_windows, pre_hw, src_hw = _crop_windows(rng, coco, hw, num_t)
  short = int(rng.choice(np.asarray(coco.min_size_train)))
  flip = bool(data.random_flip) and bool(rng.uniform() < 0.5)
  out_hw = transforms.resized_shape(
      src_hw[0], src_hw[1], short, coco.max_size_train, canvas=tuple(data.pad_size)
  )
  # The release's RandomRotationClip: sorted angles in [-deg, deg] (reversed half the time),
  # one per frame, about a centre drawn per clip within 40-60% of the frame.
  angles, center_xy = np.zeros(num_t), None
  rotation_degrees = float(coco.rotation_degrees)
  if rotation_degrees > 0:
    angles = np.sort(rng.uniform(-rotation_degrees, rotation_degrees, size=num_t))
    if rng.uniform() < 0.5:
      angles = angles[::-1]
    center_xy = (out_hw[1] * rng.uniform(0.4, 0.6), out_hw[0] * rng.uniform(0.4, 0.6))
  return [
      transforms.ClipTransform(
          hw,
          out_hw,
          flip,
          crop_yx=crop_windows[t] if crop_windows else (0, 0),
          crop_hw=src_hw if crop_windows else None,
          angle=float(angles[t]),
          center_xy=center_xy,
          pre_hw=pre_hw,
      )
      for t in range(num_t)
  ]
