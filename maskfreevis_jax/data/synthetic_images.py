"""Synthetic still images with instance masks in COCO instances format (the stage-1 "COCO").

The embedded two-stage default pretrains with masks on still images turned into pseudo clips
(`coco_pseudo`), as the official release starts from COCO Mask2Former weights, then trains on
the synthetic *videos* from boxes. So that the validation videos stay unseen, these images use
other photographs than the video set (the grey scikit-image photos, colourised with a random
two-colour map per image), another seed stream and their own placements. The objects are the
same six shape classes as `synthetic.SHAPE_CLASSES` (same category names and ids, so the class
head carries over) and the same class hues (`synthetic.paint_object`), filled with a flat shaded
colour or a texture from another photograph than the background, occluding each other and cut by
the image border.

Layout written by `write_coco_instances`::

  out_dir/instances.json        COCO instances: images, annotations (RLE masks, boxes), categories
  out_dir/images/<id>.jpg
  out_dir/_COMPLETE.json        marker with the generation parameters, written last

  json_path = write_coco_instances("/tmp/stills", num_images=64, size=(128, 128), seed=0)

Everything is a pure function of the arguments (one numpy Generator per image).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any
from collections.abc import Sequence

from absl import logging
import numpy as np
from PIL import Image

from maskfreevis_jax import console
from maskfreevis_jax.data import synthetic
from maskfreevis_jax.data import ytvis_json

# Photographs bundled inside the scikit-image wheel that the video set never uses.
STILL_PHOTOS = ("camera", "moon", "page", "text", "clock", "coins", "cell", "microaneurysms")
MARKER_FILE = "_COMPLETE.json"
JSON_NAME = "instances.json"
FORMAT_VERSION = 2  # 2: each class has its own hue (synthetic.CLASS_HUES)
# Salt of the per-image seed stream: video seeds are [seed, split (0/1), index].
_SEED_SALT = 0x51111


def _colourise(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Maps a grey image to RGB between two random colours (uint8 [H, W, 3])."""
  low, high = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
  t = gray.astype(np.float32)[..., None] / 255.0
  return np.clip(low + t * (high - low), 0, 255).astype(np.uint8)


def _load_gray(name: str) -> np.ndarray:
  import skimage.data  # pylint: disable=g-import-not-at-top

  image = np.asarray(getattr(skimage.data, name)())
  if image.ndim == 3:
    image = image[..., :3].mean(axis=-1)
  return np.ascontiguousarray(image.astype(np.uint8))


class _StillRenderer:
  """Grey photos (loaded once) and the pixel grid of one image size."""

  def __init__(self, height: int, width: int):
    self.height, self.width = height, width
    self.photos = [_load_gray(n) for n in STILL_PHOTOS]
    self.grid_y, self.grid_x = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5

  def _crop(self, rng: np.random.Generator, index: int, height: int, width: int) -> np.ndarray:
    """A random scaled crop of photo ``index``, colourised, uint8 [height, width, 3]."""
    photo = self.photos[index]
    scale = rng.uniform(1.0, 2.0) * max(height / photo.shape[0], width / photo.shape[1])
    new_h = max(int(np.ceil(photo.shape[0] * scale)), height)
    new_w = max(int(np.ceil(photo.shape[1] * scale)), width)
    resized = np.asarray(Image.fromarray(photo).resize((new_w, new_h), Image.BILINEAR))
    y0 = int(rng.integers(new_h - height + 1))
    x0 = int(rng.integers(new_w - width + 1))
    crop = resized[y0 : y0 + height, x0 : x0 + width]
    if rng.uniform() < 0.5:
      crop = crop[:, ::-1]
    return _colourise(crop, rng)

  def _recolour_half(self, rng, pixels, background, bg_index, label, aspect, mask, u, v) -> None:
    """Paints half of the object (beyond a straight cut, as the videos' format 5) with another
    photo histogram-matched to the background crop: its structure differs, its colours do not
    (the videos' format 7)."""
    cut = synthetic._camouflage_cut(rng, label, aspect, 0.5)  # pylint: disable=protected-access
    part = synthetic.beyond_cut(mask, u, v, cut)
    other = synthetic._other_index(rng, len(self.photos), bg_index)  # pylint: disable=protected-access
    texture = self._crop(rng, other, self.height, self.width)
    pixels[part] = synthetic.histogram_matched(texture, background)[part]

  def image(
      self, rng: np.random.Generator, max_objects: int, recoloured_share: float = 0.0
  ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Renders one image; a `recoloured_share` of its objects get a half in the background's
    colours (`_recolour_half`).

    Returns:
      pixels uint8 [H, W, 3], visible masks bool [K, H, W], labels list[int] (K).
    """
    h, w = self.height, self.width
    size = min(h, w)
    bg_index = int(rng.integers(len(self.photos)))
    pixels = self._crop(rng, bg_index, h, w)
    background = pixels.copy()
    num_objects = int(rng.integers(1, max_objects + 1))
    full = np.zeros((num_objects, h, w), bool)
    labels = []
    for k in range(num_objects):
      label = int(rng.integers(len(synthetic.SHAPE_CLASSES)))
      radius = rng.uniform(0.12, 0.3) * size
      # Centres may lie slightly outside, so some objects are cut by the border.
      cy, cx = rng.uniform(-0.05, 1.05) * h, rng.uniform(-0.05, 1.05) * w
      angle = rng.uniform(0, 2 * np.pi)
      aspect = rng.uniform(0.45, 0.85)
      dy, dx = self.grid_y - cy, self.grid_x - cx
      cos, sin = np.cos(angle), np.sin(angle)
      u = (cos * dx + sin * dy) / radius
      v = (-sin * dx + cos * dy) / radius
      mask = synthetic._shape_mask(synthetic.SHAPE_CLASSES[label], u, v, aspect)  # pylint: disable=protected-access
      labels.append(label)
      full[k] = mask
      colouring = synthetic.object_colouring(rng, label)
      if rng.uniform() < 0.5:
        # Texture from another photo than the background's (never camouflaged in its own).
        other = synthetic._other_index(rng, len(self.photos), bg_index)  # pylint: disable=protected-access
        texture = self._crop(rng, other, h, w)
        pixels[mask] = synthetic.paint_object(colouring, texture=texture[mask])
      else:
        shade = 1.0 - 0.25 * np.clip(np.sqrt(u * u + v * v), 0, 1)[mask]
        pixels[mask] = synthetic.paint_object(colouring, shade=shade)
      # No draw at share 0: the default set stays byte-identical.
      if recoloured_share > 0 and rng.uniform() < recoloured_share:
        self._recolour_half(rng, pixels, background, bg_index, label, aspect, mask, u, v)
    # Later objects are drawn on top: visible mask = own mask minus everything above it.
    visible = full.copy()
    above = np.zeros((h, w), bool)
    for k in range(num_objects - 1, -1, -1):
      visible[k] &= ~above
      above |= full[k]
    return pixels, visible, labels


def _params(
    num_images: int,
    size: Sequence[int],
    seed: int,
    max_objects: int,
    min_visible_pixels: int,
    jpeg_quality: int,
    with_masks: bool = True,
    recoloured_share: float = 0.0,
) -> dict[str, Any]:
  params = dict(
      format_version=FORMAT_VERSION,
      num_images=int(num_images),
      size=[int(v) for v in size],
      seed=int(seed),
      max_objects=int(max_objects),
      min_visible_pixels=int(min_visible_pixels),
      jpeg_quality=int(jpeg_quality),
  )
  if not with_masks:  # box-only sets differ; sets with masks keep their old parameters
    params["with_masks"] = False
  if recoloured_share > 0:  # opt-in; the default set keeps its parameters
    params["recoloured_share"] = float(recoloured_share)
  return params


def is_complete(out_dir: str, **params) -> bool:
  """True when ``out_dir`` holds a finished image set made with these `_params` arguments."""
  return synthetic.marker_matches(out_dir, _params(**params))


def _generate(out_dir: str, params: dict[str, Any]) -> dict[str, Any]:
  height, width = params["size"]
  start = time.time()
  os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
  renderer = _StillRenderer(height, width)
  images, annotations = [], []
  ann_id = 1
  for i in range(params["num_images"]):
    rng = np.random.default_rng([params["seed"], _SEED_SALT, i])
    # Retry (deterministically) until at least one object shows enough pixels.
    for _ in range(20):
      pixels, visible, labels = renderer.image(
          rng, params["max_objects"], params.get("recoloured_share", 0.0)
      )
      keep = visible.sum(axis=(1, 2)) >= params["min_visible_pixels"]
      if keep.any():
        break
    image_id = i + 1
    file_name = f"images/{image_id:06d}.jpg"
    Image.fromarray(pixels).save(os.path.join(out_dir, file_name), quality=params["jpeg_quality"])
    images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
    for k in np.flatnonzero(keep):
      mask = visible[k]
      ys, xs = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
      box = [float(xs[0]), float(ys[0]), float(xs[-1] + 1 - xs[0]), float(ys[-1] + 1 - ys[0])]
      annotation = {
          "id": ann_id,
          "image_id": image_id,
          "category_id": labels[k] + 1,
          "iscrowd": 0,
          "bbox": box,
      }
      if params.get("with_masks", True):  # box-only sets carry no mask, not even its area
        annotation["area"] = int(mask.sum())
        annotation["segmentation"] = ytvis_json.encode_mask(mask)
      annotations.append(annotation)
      ann_id += 1
  data = {
      "info": {"description": f"maskfreevis_jax synthetic still images, seed {params['seed']}"},
      "licenses": [],
      "categories": [
          {"id": i + 1, "name": n, "supercategory": "shape"}
          for i, n in enumerate(synthetic.SHAPE_CLASSES)
      ],
      "images": images,
      "annotations": annotations,
  }
  with open(os.path.join(out_dir, JSON_NAME), "w") as f:
    json.dump(data, f)
  summary = dict(
      params=params,
      images=len(images),
      instances=len(annotations),
      seconds=round(time.time() - start, 2),
  )
  with open(os.path.join(out_dir, MARKER_FILE), "w") as f:
    json.dump(summary, f)
  logging.info(
      "synthetic still images written to %s in %.1fs: %d images, %d instances",
      out_dir,
      summary["seconds"],
      len(images),
      len(annotations),
  )
  return summary


def write_coco_instances(
    out_dir: str,
    num_images: int = 2000,
    size: Sequence[int] = (128, 128),
    seed: int = 0,
    *,
    max_objects: int = 4,
    min_visible_pixels: int = 16,
    jpeg_quality: int = 90,
    with_masks: bool = True,
    recoloured_share: float = 0.0,
) -> str:
  """Writes (or reuses) a COCO instances set of synthetic still images; returns the JSON path.

  A complete copy made with the same arguments is reused. Otherwise the set is generated in
  a temporary sibling directory renamed into place, so concurrent processes never read a
  half-written set.

  Args:
    out_dir: destination directory.
    num_images: number of images.
    size: ``(height, width)`` of every image, each at least 16.
    seed: generation seed (its own stream: the same seed as the video set draws other images).
    max_objects: at most this many objects per image (at least one is visible).
    min_visible_pixels: objects showing fewer pixels are not annotated.
    jpeg_quality: JPEG quality of the images.
    with_masks: False writes boxes only: no annotation has a ``segmentation`` or an ``area``
      (the box-only stage 1, the synthetic counterpart of the release's `model_final_proj.pth`).
    recoloured_share: the share of objects (opt-in, default none) whose half beyond a straight
      cut wears another photo histogram-matched to the background: the stills counterpart of
      the videos' format 7 (`synthetic.generate(camouflage_recolour=True)`).

  Returns:
    Path of ``out_dir/instances.json``; its images are relative to ``out_dir``.
  """
  if len(size) != 2 or min(int(s) for s in size) < 16:
    raise ValueError(f"size must be (height, width), each at least 16, got {tuple(size)}")
  if num_images < 1 or max_objects < 1 or min_visible_pixels < 1:
    raise ValueError(
        f"num_images, max_objects and min_visible_pixels must be >= 1, got "
        f"{num_images}, {max_objects}, {min_visible_pixels}"
    )
  if not 0.0 <= recoloured_share <= 1.0:
    raise ValueError(f"recoloured_share must be in [0, 1], got {recoloured_share}")
  params = _params(
      num_images,
      size,
      seed,
      max_objects,
      min_visible_pixels,
      jpeg_quality,
      with_masks,
      recoloured_share,
  )
  json_path = os.path.join(os.path.abspath(out_dir), JSON_NAME)
  if synthetic.marker_matches(out_dir, params):
    return json_path
  out_dir = os.path.abspath(out_dir)
  tmp_dir = f"{out_dir}.tmp-{os.getpid()}"
  shutil.rmtree(tmp_dir, ignore_errors=True)
  _generate(tmp_dir, params)
  if os.path.exists(out_dir):
    shutil.rmtree(out_dir)
  os.makedirs(os.path.dirname(out_dir) or ".", exist_ok=True)
  os.rename(tmp_dir, out_dir)
  return json_path


def main(argv: Sequence[str] | None = None) -> None:
  """Command line: ``python -m maskfreevis_jax.data.synthetic_images OUT_DIR [--num_images N]``."""
  import argparse  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("out_dir")
  parser.add_argument("--num_images", type=int, default=2000)
  parser.add_argument("--size", type=int, nargs=2, default=(128, 128), metavar=("HEIGHT", "WIDTH"))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--max_objects", type=int, default=4)
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  console.enable_echo()
  json_path = write_coco_instances(
      args.out_dir, args.num_images, args.size, args.seed, max_objects=args.max_objects
  )
  console.report(json_path)


if __name__ == "__main__":
  main()
