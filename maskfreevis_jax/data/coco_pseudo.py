"""COCO instance images as box-only pseudo clips (the official joint-training source).

Each COCO image becomes a clip of T frames: with probability ``crop_prob`` a crop window of
one size drifts from one random position to another across the (sorted) frames, which
imitates camera motion; otherwise every frame shows the whole image. Then the clip gets one
shortest-edge resize (``coco.min_size_train`` / ``coco.max_size_train``) and one horizontal
flip decision. Boxes are carried through the crop and resize, clipped, and dropped per frame
when empty. (The official mapper also rotates frames by up to 15 degrees; not done here.)

COCO categories are mapped to the target video dataset by name (e.g. 'car' -> 'sedan' for
YouTube-VIS 2019, 'frisbee' -> 'flying_disc' for 2021); annotations of unmapped categories
are dropped, and images left without annotations are skipped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Optional, Sequence

import ml_collections
import numpy as np

from maskfreevis_jax.data import transforms
from maskfreevis_jax.data import ytvis_json

# COCO name -> candidate names in the target dataset (first one present wins).
COCO_TO_VIDEO_NAMES = {
    "person": ("person",), "bicycle": ("motorbike",), "car": ("car", "sedan"),
    "motorcycle": ("motorbike",), "airplane": ("airplane",), "train": ("train",),
    "truck": ("truck",), "boat": ("boat",), "bird": ("bird",), "cat": ("cat",),
    "dog": ("dog",), "horse": ("horse",), "cow": ("cow",), "elephant": ("elephant",),
    "bear": ("bear",), "zebra": ("zebra",), "giraffe": ("giraffe",),
    "frisbee": ("flying_disc",), "skis": ("snowboard",), "snowboard": ("snowboard",),
    "skateboard": ("skateboard",), "surfboard": ("surfboard",),
    "tennis racket": ("tennis_racket",),
}


def _norm(name: str) -> str:
  return name.lower().replace(" ", "_")


def category_mapping(coco_names: dict[int, str],
                     target_class_names: Optional[Sequence[str]]) -> dict[int, int]:
  """COCO category id -> target label (by name); identity-by-order without a target."""
  if target_class_names is None:
    return {cid: i for i, cid in enumerate(sorted(coco_names))}
  target = {_norm(n): i for i, n in enumerate(target_class_names)}
  mapping = {}
  for cid, name in coco_names.items():
    candidates = COCO_TO_VIDEO_NAMES.get(name, ()) + (name,)
    for cand in candidates:
      if _norm(cand) in target:
        mapping[cid] = target[_norm(cand)]
        break
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


def load_coco_instances(path: str, image_root: Optional[str] = None,
                        target_class_names: Optional[Sequence[str]] = None
                        ) -> tuple[list[CocoImage], list[str]]:
  """Reads a COCO instances JSON (validated; errors name the file and image/annotation id).

  Returns:
    Images with at least one usable box, and the class names labels refer to.
  """
  data = ytvis_json.read_json(path)
  if not isinstance(data, dict):
    raise ValueError(f"{path}: top level: expected a JSON object")
  req = ytvis_json._require  # pylint: disable=protected-access
  if image_root is None:
    image_root = os.path.dirname(path)
  cats = {}
  for i, cat in enumerate(req(data, "categories", list, path, "top level")):
    cats[req(cat, "id", int, path, f"categories[{i}]")] = req(cat, "name", str, path,
                                                               f"categories[{i}]")
  mapping = category_mapping(cats, target_class_names)
  class_names = (list(target_class_names) if target_class_names is not None
                 else [cats[c] for c in sorted(cats)])
  images = {}
  for i, img in enumerate(req(data, "images", list, path, "top level")):
    image_id = req(img, "id", int, path, f"images[{i}]")
    where = f"image id {image_id}"
    images[image_id] = dict(
        path=os.path.join(image_root, req(img, "file_name", str, path, where)),
        height=req(img, "height", int, path, where), width=req(img, "width", int, path, where),
        boxes=[], labels=[], ids=[], segms=[])
  dropped = 0
  for i, ann in enumerate(req(data, "annotations", list, path, "top level")):
    ann_id = req(ann, "id", int, path, f"annotations[{i}]")
    where = f"annotation id {ann_id}"
    image_id = req(ann, "image_id", int, path, where)
    if image_id not in images:
      raise ValueError(f"{path}: {where}: image_id {image_id} is not in 'images'")
    cat_id = req(ann, "category_id", int, path, where)
    if cat_id not in cats:
      raise ValueError(f"{path}: {where}: category_id {cat_id} is not in 'categories'")
    if ann.get("iscrowd", 0) or cat_id not in mapping:
      continue
    bbox = ytvis_json._parse_box(req(ann, "bbox", list, path, where), path, where)  # pylint: disable=protected-access
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
  out = [CocoImage(id=k, path=v["path"], height=v["height"], width=v["width"],
                   boxes=np.array(v["boxes"], np.float32).reshape(-1, 4),
                   labels=np.array(v["labels"], np.int32), ann_ids=np.array(v["ids"], np.int32),
                   segmentations=v["segms"])
         for k, v in sorted(images.items()) if v["boxes"]]
  logging.info("%s: %d of %d images have usable boxes (%d categories mapped, %d empty boxes "
               "dropped)", path, len(out), len(images), len(mapping), dropped)
  if not out:
    raise ValueError(f"{path}: no image has a usable (mapped, non-crowd, non-empty) box")
  return out, class_names


class CocoPseudoClipSource:
  """Random access to COCO images turned into pseudo clips."""

  def __init__(self, json_path: str, image_root: Optional[str] = None,
               target_class_names: Optional[Sequence[str]] = None):
    if not json_path:
      raise ValueError("data.coco.json is not set")
    self.images, self.class_names = load_coco_instances(json_path, image_root,
                                                        target_class_names)

  def __len__(self) -> int:
    return len(self.images)

  def training_clip(self, index: int, rng: np.random.Generator,
                    cfg: ml_collections.ConfigDict, stats=None):
    """One augmented pseudo clip (`input_pipeline.Clip`) of image ``index``."""
    from maskfreevis_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    coco = cfg.coco
    image = self.images[index]
    num_t = int(cfg.num_frames)
    # Frame indices of a pretend video, as the official pseudo-video sampler reports them.
    length = int(rng.integers(coco.pseudo_length[0], coco.pseudo_length[1] + 1))
    frame_idx = transforms.sample_clip_frame_indices(rng, length, num_t, coco.frame_range)
    h, w = image.height, image.width
    crop_windows = None
    if rng.uniform() < coco.crop_prob:
      pre_short = int(rng.choice(np.asarray(coco.crop_pre_sizes)))
      ph, pw = transforms.resized_shape(h, w, pre_short, 1333)
      pre = ph / h
      lo, hi = int(coco.crop_size[0]), int(coco.crop_size[1])
      ch = int(rng.integers(min(ph, lo), min(ph, hi) + 1))
      cw = int(rng.integers(min(pw, lo), min(pw, hi) + 1))
      y0, x0 = int(rng.integers(ph - ch + 1)), int(rng.integers(pw - cw + 1))
      y1, x1 = int(rng.integers(y0, ph - ch + 1)), int(rng.integers(x0, pw - cw + 1))
      frac = np.sort(rng.uniform(size=num_t))
      if rng.uniform() < 0.5:
        frac = frac[::-1]
      ys = np.rint(y0 * frac + y1 * (1 - frac)) / pre
      xs = np.rint(x0 * frac + x1 * (1 - frac)) / pre
      crop_hw = (max(1, min(h, int(round(ch / pre)))), max(1, min(w, int(round(cw / pre)))))
      crop_windows = [(int(min(max(y, 0), h - crop_hw[0])), int(min(max(x, 0), w - crop_hw[1])))
                      for y, x in zip(ys, xs)]
      src_hw = crop_hw
    else:
      src_hw = (h, w)
    short = int(rng.choice(np.asarray(coco.min_size_train)))
    flip = bool(cfg.random_flip) and bool(rng.uniform() < 0.5)
    out_hw = transforms.resized_shape(src_hw[0], src_hw[1], short, coco.max_size_train,
                                      canvas=tuple(cfg.pad_size))
    frame_transforms = [
        transforms.ClipTransform((h, w), out_hw, flip, crop_yx=crop_windows[t], crop_hw=src_hw)
        if crop_windows else transforms.ClipTransform((h, w), out_hw, flip)
        for t in range(num_t)]
    pixels = transforms.read_rgb(image.path)
    if pixels.shape[:2] != (h, w):
      raise ValueError(f"image {image.path} is {pixels.shape[0]}x{pixels.shape[1]} but the "
                       f"annotation file declares {h}x{w}")
    frames = np.stack([tr.apply_image(pixels) for tr in frame_transforms])
    n = len(image.labels)
    boxes = np.stack([tr.apply_boxes(image.boxes) for tr in frame_transforms], axis=1)
    valid = transforms.nonempty_boxes(boxes)
    if stats is not None:
      stats.add("boxes_dropped_after_transform", int((~valid).sum()))
    boxes = np.where(valid[..., None], boxes, 0).astype(np.float32).reshape(n, num_t, 4)
    masks = None
    if cfg.with_masks:
      masks = np.zeros((n, num_t) + out_hw, np.uint8)
      for k, segm in enumerate(image.segmentations):
        full = ytvis_json.decode_segmentation(segm, h, w)
        for t, tr in enumerate(frame_transforms):
          masks[k, t] = tr.apply_mask(full) * valid[k, t]
    return input_pipeline.Clip(
        frames=frames, boxes=boxes, box_valid=valid, labels=image.labels.copy(),
        track_ids=image.ann_ids.copy(), masks=masks, video_id=image.id,
        frame_index=frame_idx, orig_size=(h, w))
