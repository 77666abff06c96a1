"""Built-in synthetic video instance segmentation dataset (YouTube-VIS format on disk).

Every video pans slowly over a real photograph that ships with scikit-image and shows a few
moving objects of shape classes that boxes fit badly (ellipse, ring with a hole, star,
L-shape, thin bar, crescent); one category per shape, each with its own hue (`CLASS_HUES`), as
real categories have typical colours. Objects are filled with a flat shaded colour or a texture
cut from another photograph than the background (never camouflaged in their own background),
tinted to their class's hue (`paint_object`), move, scale and rotate, occlude each other and
enter/leave the frame.

Ground truth is the *visible* mask after occlusion; boxes are derived from it; an object not
visible in a frame has ``null`` box/segmentation there. Both ``train.json`` and
``valid.json`` carry RLE masks (training ignores them unless a mask-supervised config asks).

Layout written by `generate`::

  out_dir/train.json   out_dir/train/JPEGImages/<video>/<frame>.jpg
  out_dir/valid.json   out_dir/valid/JPEGImages/<video>/<frame>.jpg
  out_dir/_COMPLETE.json   (marker with the generation parameters, written last)

Everything is a pure function of the seed (one numpy Generator per video).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any
from collections.abc import Iterator, Sequence

from absl import logging
import numpy as np
from PIL import Image

from maskfreevis_jax import console
from maskfreevis_jax.data import ytvis_json

SHAPE_CLASSES = ("ellipse", "ring", "star", "l_shape", "thin_bar", "crescent")
# Photographs bundled inside the scikit-image wheel (no download needed).
BACKGROUND_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "colorwheel",
    "brick",
    "grass",
    "gravel",
)
MARKER_FILE = "_COMPLETE.json"
# 2: object textures never come from the background photo; 3: each class has its own hue.
FORMAT_VERSION = 3
# 4: format 3 plus a share of camouflaged objects (`generate(camouflage=...)`, docs/data.md).
CAMOUFLAGE_FORMAT_VERSION = 4
# A camouflaged object moves at least this share of the frame's side per frame (relative to the
# frame; the background pans at most 0.015), so its motion tells it from the background.
CAMOUFLAGE_MIN_SPEED = 0.04
# 5: format 4 with camouflage_cover < 1: only that share of a camouflaged object's area (beyond a
# straight cut across it) wears the background photo; the rest keeps its class colouring, so the
# object stays visible in one frame while the camouflaged part's outline is told by motion alone.
PARTIAL_CAMOUFLAGE_FORMAT_VERSION = 5
# 6: format 3 plus a share of objects with a look-alike band: a stripe of the object's own material
# (its texture photo in its colouring) in the background, across its path. Where the object
# overlaps the stripe its outline is invisible in that frame; as it moves across, the ambiguous
# part changes from frame to frame, while the object's own appearance stays the same.
LOOKALIKE_FORMAT_VERSION = 6
# 7: format 5 whose camouflaged part wears another photo recoloured to the background photo's
# colour distribution (histogram matching) instead of the background photo: single pixels' colours
# are the background's (the colour pairwise term is fooled), the texture's structure is not (a CNN
# can see the part in one frame, and TK's 3x3 patches tell it apart).
RECOLOURED_CAMOUFLAGE_FORMAT_VERSION = 7
# Each class has a characteristic hue, a sixth of the colour wheel apart, as real categories have
# typical colours; each object varies it slightly and picks its saturation and brightness freely.
# The class is then visible in the pixels inside the mask, which is what the decoder's masked
# attention pools for the class head. With the outline alone (format 2, random colours) the
# tiny model's best-covering query had the right class for 30% of the objects (docs/ablation.md).
CLASS_HUES = tuple(k / len(SHAPE_CLASSES) for k in range(len(SHAPE_CLASSES)))
HUE_JITTER = 0.04


def _load_photo(name: str) -> np.ndarray:
  import skimage.data  # pylint: disable=g-import-not-at-top

  image = np.asarray(getattr(skimage.data, name)())
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def _resize_to_cover(image: np.ndarray, height: int, width: int, margin: float) -> np.ndarray:
  """Resizes so the image covers ``(1 + margin) * (height, width)``, keeping its aspect."""
  scale = (1.0 + margin) * max(height / image.shape[0], width / image.shape[1])
  new_h = max(int(np.ceil(image.shape[0] * scale)), height + 1)
  new_w = max(int(np.ceil(image.shape[1] * scale)), width + 1)
  return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, aspect: float) -> np.ndarray:
  """Rasterises one shape in its own normalised frame (unit radius, centred at 0)."""
  r = np.sqrt(u * u + v * v)
  if shape == "ellipse":
    return (u * u + (v / aspect) ** 2) <= 1.0
  if shape == "ring":
    # Ring with a large hole: its box mostly covers background.
    rr = np.sqrt(u * u + (v / max(aspect, 0.7)) ** 2)
    return (rr <= 1.0) & (rr >= 0.6)
  if shape == "star":
    angle = np.arctan2(v, u)
    radius = 0.38 + 0.62 * np.abs(np.cos(2.5 * angle)) ** 3
    return r <= radius
  if shape == "l_shape":
    vertical = (u >= -1.0) & (u <= -0.45) & (np.abs(v) <= 1.0)
    horizontal = (np.abs(u) <= 1.0) & (v >= 0.45) & (v <= 1.0)
    return vertical | horizontal
  if shape == "thin_bar":
    return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.12)
  if shape == "crescent":
    return (r <= 1.0) & (((u - 0.5) ** 2 + v * v) > 0.75**2)
  raise ValueError(f"unknown shape class {shape!r}")


def object_colouring(rng: np.random.Generator, label: int) -> dict[str, float]:
  """One object's colouring: a hue near its class's, a free saturation and brightness."""
  hue = (CLASS_HUES[label] + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 1.0
  return dict(
      hue=float(hue), saturation=float(rng.uniform(0.5, 0.95)), value=float(rng.uniform(0.45, 1.0))
  )


def paint_object(
    colouring: dict[str, float],
    *,
    shade: np.ndarray | None = None,
    texture: np.ndarray | None = None,
) -> np.ndarray:
  """RGB of an object's N pixels in its colouring (`object_colouring`).

  Args:
    colouring: hue, saturation and value in [0, 1].
    shade: float [N], a flat fill: the colouring's value times `shade`.
    texture: uint8 [N, 3] texture pixels instead: their brightness (keeping the photo's detail)
      in the colouring's hue and saturation.

  Returns:
    uint8 [N, 3].
  """
  if (shade is None) == (texture is None):
    raise ValueError("paint_object needs exactly one of shade (flat fill) and texture")
  from skimage import color  # pylint: disable=g-import-not-at-top

  if texture is None:
    value = colouring["value"] * np.asarray(shade, np.float32)
  else:
    value = 0.15 + 0.85 * texture.astype(np.float32).mean(axis=-1) / 255.0
  hsv = np.stack(
      [np.full_like(value, colouring["hue"]), np.full_like(value, colouring["saturation"]), value],
      axis=-1,
  )
  return np.clip(np.rint(color.hsv2rgb(hsv[None])[0] * 255.0), 0, 255).astype(np.uint8)


def _other_index(rng: np.random.Generator, size: int, excluded: int) -> int:
  """A uniform index in [0, size) other than `excluded`."""
  index = int(rng.integers(size - 1))
  return index + (index >= excluded)


def _camouflage_cut(
    rng: np.random.Generator, label: int, aspect: float, cover: float
) -> tuple[float, float]:
  """(direction, threshold) of a straight cut in the object's own frame: the pixels with
  u cos(direction) + v sin(direction) < threshold are `cover` of the shape's area."""
  direction = float(rng.uniform(0, 2 * np.pi))
  grid = np.linspace(-1.0, 1.0, 129)
  v, u = np.meshgrid(grid, grid, indexing="ij")
  inside = _shape_mask(SHAPE_CLASSES[label], u, v, aspect)
  along = (u * np.cos(direction) + v * np.sin(direction))[inside]
  return direction, float(np.quantile(along, cover))


def beyond_cut(mask: np.ndarray, u: np.ndarray, v: np.ndarray, cut: tuple[float, float]):
  """The pixels of `mask` on the `cover` side of a `_camouflage_cut` (bool, the shape of mask),
  with `u`, `v` the pixels' coordinates in the object's own frame."""
  direction, threshold = cut
  return mask & (u * np.cos(direction) + v * np.sin(direction) < threshold)


def histogram_matched(source: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """`source` (uint8 [H, W, 3]) with the colour distribution of `reference` (per-channel
  histogram matching): another structure in the reference's colours, uint8."""
  from skimage import exposure  # pylint: disable=g-import-not-at-top

  matched = exposure.match_histograms(source, reference, channel_axis=-1)
  return np.clip(np.rint(matched), 0, 255).astype(np.uint8)


class _Renderer:
  """Holds the backgrounds/textures for one frame size (loaded once per generation)."""

  def __init__(self, height: int, width: int):
    self.height, self.width = height, width
    photos = [_load_photo(n) for n in BACKGROUND_PHOTOS]
    self.backgrounds = [_resize_to_cover(p, height, width, margin=0.35) for p in photos]
    tex_size = max(64, min(height, width))
    self.textures = [_resize_to_cover(p, tex_size, tex_size, margin=0.0) for p in photos]
    self.grid_y, self.grid_x = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    self._recoloured_cache = {}

  def draw_object(
      self,
      frame: np.ndarray,
      label: int,
      appearance: dict[str, Any],
      cy: float,
      cx: float,
      angle: float,
      radius: float,
  ) -> np.ndarray:
    """Draws one object into `frame` (uint8 [H, W, 3], in place); returns its bool [H, W] mask.

    `appearance` holds the object's aspect, colouring, texture index (-1: flat fill) and
    texture offset; a camouflaged object also `camouflage` (format 4: `texture` is the background
    photo), or `cut` and `camouflage_texture` (format 5) and `recolour_source` (format 7).
    """
    dy, dx = self.grid_y - cy, self.grid_x - cx
    cos, sin = np.cos(angle), np.sin(angle)
    u = (cos * dx + sin * dy) / radius
    v = (-sin * dx + cos * dy) / radius
    mask = _shape_mask(SHAPE_CLASSES[label], u, v, appearance["aspect"])
    if not mask.any():
      return mask
    if appearance.get("camouflage", False) and "cut" not in appearance:
      # Cut from the video's own background photo, untinted: in one frame its colours are the
      # background's; only its motion relative to the background sets it apart.
      frame[mask] = self._texture(appearance["texture"], appearance, u, v, radius, mask)
      return mask
    if appearance["texture"] >= 0:
      texture = self._texture(appearance["texture"], appearance, u, v, radius, mask)
      frame[mask] = paint_object(appearance["colouring"], texture=texture)
    else:
      shade = 1.0 - 0.25 * np.clip(np.sqrt(u * u + v * v), 0, 1)[mask]
      frame[mask] = paint_object(appearance["colouring"], shade=shade)
    if "cut" in appearance:  # format 5: the part beyond the cut wears the background photo
      part = beyond_cut(mask, u, v, appearance["cut"])
      camouflage = appearance["camouflage_texture"]
      if "recolour_source" in appearance:  # format 7: another photo in the background's colours
        camouflage = self._recoloured(appearance["recolour_source"], camouflage)
      frame[part] = self._texture(camouflage, appearance, u, v, radius, part)
    return mask

  def _recoloured(self, source: int, reference: int) -> np.ndarray:
    """Texture `source` with the colour distribution of texture `reference` (per-channel
    histogram matching), cached: another structure in the background photo's colours."""
    key = (source, reference)
    if key not in self._recoloured_cache:
      self._recoloured_cache[key] = histogram_matched(
          self.textures[source], self.textures[reference]
      )
    return self._recoloured_cache[key]

  def _lookalike_band(self, rng, obj, bg_index, start, pan, length) -> dict[str, Any]:
    """Makes `obj` (one `video` object) textured and moving, and returns its look-alike stripe:
    centred on its position at the middle frame, in background coordinates (it pans with the
    background), across its motion relative to the background, as wide as its radius."""
    if obj["texture"] < 0:  # a flat fill matches every patch of a flat stripe: TK cannot tell
      obj["texture"] = _other_index(rng, len(self.textures), bg_index)
    # The crop moves by `pan` per frame, so the background's content moves by -pan in the frame.
    relative, heading = self._at_least_min_speed(rng, np.array([obj["vy"], obj["vx"]]) + pan)
    obj.update(vy=relative[0] - pan[0], vx=relative[1] - pan[1])
    middle = (length - 1) / 2
    centre = start + pan * middle + [obj["cy"] + obj["vy"] * middle, obj["cx"] + obj["vx"] * middle]
    return dict(
        centre=centre,
        normal=np.array([np.sin(heading), np.cos(heading)]),
        width=obj["radius"],
        tex_offset=rng.integers(0, 10_000, size=2),
    )

  def _draw_band(self, frame: np.ndarray, obj: dict[str, Any], oy: int, ox: int) -> None:
    """Paints `obj`'s look-alike stripe into `frame` (the background crop at offset oy, ox)."""
    band = obj["band"]
    by, bx = self.grid_y + oy, self.grid_x + ox  # background coordinates of the frame's pixels
    (cy, cx), (ny, nx) = band["centre"], band["normal"]
    where = np.abs((by - cy) * ny + (bx - cx) * nx) <= band["width"] / 2
    tex = self.textures[obj["texture"]]
    ty = (by.astype(int) + band["tex_offset"][0]) % tex.shape[0]
    tx = (bx.astype(int) + band["tex_offset"][1]) % tex.shape[1]
    frame[where] = paint_object(obj["colouring"], texture=tex[ty[where], tx[where]])

  def _texture(self, texture, appearance, u, v, radius, where) -> np.ndarray:
    """The pixels at `where` (bool [H, W]) of `texture` (an index into `textures`, or a uint8
    [S, S, 3] image), fixed to the object's frame."""
    tex = self.textures[texture] if isinstance(texture, (int, np.integer)) else texture
    ty = (np.rint(v * radius).astype(int) + appearance["tex_offset"][0]) % tex.shape[0]
    tx = (np.rint(u * radius).astype(int) + appearance["tex_offset"][1]) % tex.shape[1]
    return tex[ty[where], tx[where]]

  def _random_object(self, rng: np.random.Generator, length: int, bg_index: int) -> dict[str, Any]:
    """One object's shape, motion and appearance (format 3), for a video of `length` frames."""
    h, w = self.height, self.width
    size = min(h, w)
    radius = rng.uniform(0.12, 0.3) * size
    enters = rng.uniform() < 0.25
    if enters:  # start outside a random border, move inwards
      side = rng.integers(4)
      cy = [-(radius * 0.8), h + radius * 0.8, rng.uniform(0, h), rng.uniform(0, h)][side]
      cx = [rng.uniform(0, w), rng.uniform(0, w), -(radius * 0.8), w + radius * 0.8][side]
      vy = (h / 2 - cy) / max(length, 1) * rng.uniform(0.6, 1.4)
      vx = (w / 2 - cx) / max(length, 1) * rng.uniform(0.6, 1.4)
    else:
      cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
      speed = rng.uniform(0.0, 0.08) * size
      heading = rng.uniform(0, 2 * np.pi)
      vy, vx = speed * np.sin(heading), speed * np.cos(heading)
    fill_texture = rng.uniform() < 0.5
    label = int(rng.integers(len(SHAPE_CLASSES)))
    return dict(
        label=label,
        cy=cy,
        cx=cx,
        vy=vy,
        vx=vx,
        radius=radius,
        growth=rng.uniform(-0.04, 0.04),
        angle=rng.uniform(0, 2 * np.pi),
        spin=rng.uniform(-0.15, 0.15),
        aspect=rng.uniform(0.45, 0.85),
        colouring=object_colouring(rng, label),
        # A photo other than the background's: an object cut from the background photo
        # itself would be camouflaged (invisible but for the pan), not a fair instance.
        texture=_other_index(rng, len(self.textures), bg_index) if fill_texture else -1,
        tex_offset=rng.integers(0, 10_000, size=2),
    )

  def _at_least_min_speed(
      self, rng: np.random.Generator, velocity: np.ndarray
  ) -> tuple[np.ndarray, float]:
    """(velocity [vy, vx], its heading), sped up along its heading to CAMOUFLAGE_MIN_SPEED of the
    frame's side per frame if slower (a random heading only if it was 0)."""
    speed = float(np.hypot(*velocity))
    heading = float(np.arctan2(*velocity)) if speed > 0 else rng.uniform(0, 2 * np.pi)
    floor = CAMOUFLAGE_MIN_SPEED * min(self.height, self.width)
    if speed < floor:
      velocity = floor * np.array([np.sin(heading), np.cos(heading)])
    return velocity, heading

  def _camouflage(
      self, rng: np.random.Generator, obj: dict, bg_index: int, cover: float, recolour: bool
  ) -> None:
    """Camouflages `obj` in its background photo (format 4), on a `cover` share of its area
    (< 1: format 5), that share recoloured from another photo if `recolour` (format 7)."""
    if cover >= 1.0:
      obj.update(camouflage=True, texture=bg_index)
    else:
      obj.update(camouflage=True, camouflage_texture=bg_index)
    # Motion is all that sets it apart: at least CAMOUFLAGE_MIN_SPEED of the frame per step.
    (vy, vx), _ = self._at_least_min_speed(rng, np.array([obj["vy"], obj["vx"]]))
    obj.update(vy=vy, vx=vx)
    if cover < 1.0:
      obj["cut"] = _camouflage_cut(rng, obj["label"], obj["aspect"], cover)
    if recolour:
      obj["recolour_source"] = _other_index(rng, len(self.textures), bg_index)

  def video(
      self,
      rng: np.random.Generator,
      length: int,
      max_objects: int,
      camouflage: float = 0.0,
      camouflage_cover: float = 1.0,
      lookalike: float = 0.0,
      camouflage_recolour: bool = False,
  ):
    """Renders one video; a `camouflage` share of its objects wears its background photo
    (on `camouflage_cover` of their area: 1 the whole object, format 4; less, format 5), and a
    `lookalike` share has a stripe of its own material across its path (format 6). With
    `camouflage_recolour` (format 7, needs `camouflage_cover` < 1) the camouflaged part wears
    another photo recoloured to the background photo's colours, not the background photo.

    Returns:
      frames uint8 [L, H, W, 3], visible masks bool [K, L, H, W], labels list[int] (K).
    """
    h, w = self.height, self.width
    size = min(h, w)
    bg_index = int(rng.integers(len(self.backgrounds)))
    bg = self.backgrounds[bg_index]
    spare_y, spare_x = bg.shape[0] - h, bg.shape[1] - w
    start = np.array([rng.uniform(0, spare_y), rng.uniform(0, spare_x)])
    # Slow pan: at most ~1.5% of the frame per step.
    pan = rng.uniform(-0.015, 0.015, size=2) * size
    num_objects = int(rng.integers(1, max_objects + 1))
    objects = []
    for _ in range(num_objects):
      obj = self._random_object(rng, length, bg_index)
      # Drawn only when asked, so camouflage=0 keeps format 3's random stream (byte-identical).
      if camouflage > 0 and rng.uniform() < camouflage:
        self._camouflage(rng, obj, bg_index, camouflage_cover, camouflage_recolour)
      if lookalike > 0 and rng.uniform() < lookalike:
        obj["band"] = self._lookalike_band(rng, obj, bg_index, start, pan, length)
      objects.append(obj)
    # Random depth order: later objects occlude earlier ones.
    frames = np.empty((length, h, w, 3), np.uint8)
    full = np.zeros((num_objects, length, h, w), bool)
    for t in range(length):
      oy, ox = np.clip(np.rint(start + pan * t), 0, [spare_y, spare_x]).astype(int)
      frame = bg[oy : oy + h, ox : ox + w].copy()
      for obj in objects:
        if "band" in obj:
          self._draw_band(frame, obj, oy, ox)
      for k, obj in enumerate(objects):
        radius = obj["radius"] * (1.0 + obj["growth"] * t)
        cy, cx = obj["cy"] + obj["vy"] * t, obj["cx"] + obj["vx"] * t
        angle = obj["angle"] + obj["spin"] * t
        full[k, t] = self.draw_object(frame, obj["label"], obj, cy, cx, angle, radius)
      frames[t] = frame
    # Visible mask = own mask minus everything drawn above it.
    visible = full.copy()
    above = np.zeros((length, h, w), bool)
    for k in range(num_objects - 1, -1, -1):
      visible[k] &= ~above
      above |= full[k]
    return frames, visible, [o["label"] for o in objects]


def _box_from_mask(mask: np.ndarray) -> list[float]:
  ys = np.flatnonzero(mask.any(axis=1))
  xs = np.flatnonzero(mask.any(axis=0))
  return [float(xs[0]), float(ys[0]), float(xs[-1] + 1 - xs[0]), float(ys[-1] + 1 - ys[0])]


def _video_annotations(
    visible: np.ndarray, labels: list[int], video_id: int, first_id: int, height: int, width: int
) -> list[dict[str, Any]]:
  """YouTube-VIS annotations of a video's visible masks (bool [K, L, H, W]), ids from
  `first_id`; an object never visible is no instance."""
  annotations = []
  length = visible.shape[1]
  for k, label in enumerate(labels):
    if not visible[k].any():
      continue  # never visible: not an annotated instance
    bboxes, segms, areas = [], [], []
    for t in range(length):
      if visible[k, t].any():
        bboxes.append(_box_from_mask(visible[k, t]))
        segms.append(ytvis_json.encode_mask(visible[k, t]))
        areas.append(int(visible[k, t].sum()))
      else:
        bboxes.append(None)
        segms.append(None)
        areas.append(None)
    annotations.append(
        {
            "id": first_id + len(annotations),
            "video_id": video_id,
            "category_id": label + 1,
            "iscrowd": 0,
            "bboxes": bboxes,
            "segmentations": segms,
            "areas": areas,
            "height": height,
            "width": width,
        }
    )
  return annotations


def _dataset_json(description: str, videos: list[Any], annotations: list[Any]) -> dict[str, Any]:
  """A YouTube-VIS JSON object of the shape classes."""
  return {
      "info": {"description": description},
      "licenses": [],
      "categories": [
          {"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SHAPE_CLASSES)
      ],
      "videos": videos,
      "annotations": annotations,
  }


def _write_split(
    out_dir: str,
    split: str,
    num_videos: int,
    seed: int,
    renderer: _Renderer,
    frames_range: tuple[int, int],
    max_objects: int,
    jpeg_quality: int,
    min_visible_pixels: int,
    **variants: Any,
) -> dict[str, Any]:
  """Writes one split; `variants` are `_Renderer.video`'s format options (camouflage, ...)."""
  split_index = {"train": 0, "valid": 1}[split]
  videos, annotations = [], []
  for i in range(num_videos):
    rng = np.random.default_rng([seed, split_index, i])
    length = int(rng.integers(frames_range[0], frames_range[1] + 1))
    # Retry (deterministically) until at least one object is visible somewhere.
    for _ in range(20):
      frames, visible, labels = renderer.video(rng, length, max_objects, **variants)
      visible &= visible.sum(axis=(2, 3), keepdims=True) >= min_visible_pixels
      if visible.any():
        break
    name = f"{split}_{i:05d}"
    video_dir = os.path.join(out_dir, split, "JPEGImages", name)
    os.makedirs(video_dir, exist_ok=True)
    file_names = []
    for t in range(length):
      rel = f"{name}/{t:05d}.jpg"
      Image.fromarray(frames[t]).save(os.path.join(video_dir, f"{t:05d}.jpg"), quality=jpeg_quality)
      file_names.append(rel)
    video_id = i + 1
    videos.append(
        {
            "id": video_id,
            "width": renderer.width,
            "height": renderer.height,
            "length": length,
            "file_names": file_names,
        }
    )
    annotations += _video_annotations(
        visible, labels, video_id, len(annotations) + 1, renderer.height, renderer.width
    )
  description = f"maskfreevis_jax synthetic VIS ({split}), seed {seed}"
  with open(os.path.join(out_dir, f"{split}.json"), "w") as f:
    json.dump(_dataset_json(description, videos, annotations), f)
  return {"videos": len(videos), "instances": len(annotations)}


def generate(
    out_dir: str,
    seed: int = 0,
    num_train_videos: int = 300,
    num_val_videos: int = 30,
    *,
    frame_size: Sequence[int] = (128, 128),
    frames_per_video: Sequence[int] = (6, 10),
    max_objects: int = 4,
    jpeg_quality: int = 90,
    min_visible_pixels: int = 4,
    camouflage: float = 0.0,
    camouflage_cover: float = 1.0,
    lookalike: float = 0.0,
    camouflage_recolour: bool = False,
) -> dict[str, Any]:
  """Writes the synthetic dataset (YouTube-VIS JSON + JPEG frames) into ``out_dir``.

  Args:
    out_dir: destination directory (created; existing files are overwritten).
    seed: generation seed; the output is a pure function of all arguments.
    num_train_videos: videos in ``train.json``.
    num_val_videos: videos in ``valid.json``.
    frame_size: ``(height, width)`` of every frame.
    frames_per_video: inclusive ``(min, max)`` number of frames per video.
    max_objects: at most this many objects per video (at least one is visible).
    jpeg_quality: JPEG quality of the frames.
    min_visible_pixels: a frame where an object shows fewer pixels counts as not visible.
    camouflage, camouflage_cover, lookalike, camouflage_recolour: the opt-in formats 4-7 for the
      loss ablation (docs/data.md; `_Renderer.video`); their defaults write format 3 unchanged.

  Returns:
    The parameters and per-split counts (also written to the marker file).
  """
  variants = dict(
      camouflage=camouflage,
      camouflage_cover=camouflage_cover,
      lookalike=lookalike,
      camouflage_recolour=camouflage_recolour,
  )
  height, width, lo, hi = _checked_sizes(
      frame_size, frames_per_video, num_train_videos, num_val_videos, max_objects, **variants
  )
  params = _params(
      seed,
      num_train_videos,
      num_val_videos,
      (height, width),
      (lo, hi),
      max_objects,
      jpeg_quality,
      min_visible_pixels,
      **variants,
  )
  start = time.time()
  os.makedirs(out_dir, exist_ok=True)
  marker = os.path.join(out_dir, MARKER_FILE)
  if os.path.exists(marker):
    os.remove(marker)
  renderer = _Renderer(height, width)
  counts = {}
  for split, n in (("train", num_train_videos), ("valid", num_val_videos)):
    counts[split] = _write_split(
        out_dir,
        split,
        n,
        seed,
        renderer,
        (lo, hi),
        max_objects,
        jpeg_quality,
        min_visible_pixels,
        **variants,
    )
  summary = dict(params=params, counts=counts, seconds=round(time.time() - start, 2))
  with open(marker, "w") as f:
    json.dump(summary, f)
  logging.info("synthetic dataset written to %s in %.1fs: %s", out_dir, summary["seconds"], counts)
  return summary


def _checked_sizes(
    frame_size,
    frames_per_video,
    num_train_videos,
    num_val_videos,
    max_objects,
    *,
    camouflage,
    camouflage_cover,
    lookalike,
    camouflage_recolour,
) -> tuple[int, int, int, int]:
  """(height, width, min frames, max frames) of `generate`'s arguments, checked; raises
  ValueError naming the first bad argument."""
  height, width = int(frame_size[0]), int(frame_size[1])
  if height < 16 or width < 16:
    raise ValueError(f"frame_size must be at least 16x16, got {frame_size}")
  lo, hi = int(frames_per_video[0]), int(frames_per_video[1])
  if not 1 <= lo <= hi:
    raise ValueError(
        f"frames_per_video must be (min, max) with 1 <= min <= max, got {frames_per_video}"
    )
  if num_train_videos < 0 or num_val_videos < 0 or max_objects < 1:
    raise ValueError("video counts must be >= 0 and max_objects >= 1")
  if not 0.0 <= camouflage <= 1.0:
    raise ValueError(f"camouflage must be a share in [0, 1], got {camouflage}")
  if not 0.0 < camouflage_cover <= 1.0:
    raise ValueError(f"camouflage_cover must be a share in (0, 1], got {camouflage_cover}")
  if not 0.0 <= lookalike <= 1.0:
    raise ValueError(f"lookalike must be a share in [0, 1], got {lookalike}")
  if camouflage_recolour and not (camouflage > 0 and camouflage_cover < 1):
    raise ValueError("camouflage_recolour needs camouflage > 0 and camouflage_cover < 1")
  return height, width, lo, hi


def _params(
    seed=0,
    num_train_videos=300,
    num_val_videos=30,
    frame_size=(128, 128),
    frames_per_video=(6, 10),
    max_objects=4,
    jpeg_quality=90,
    min_visible_pixels=4,
    camouflage=0.0,
    camouflage_cover=1.0,
    lookalike=0.0,
    camouflage_recolour=False,
) -> dict[str, Any]:
  params = dict(
      format_version=FORMAT_VERSION,
      seed=int(seed),
      num_train_videos=int(num_train_videos),
      num_val_videos=int(num_val_videos),
      frame_size=[int(v) for v in frame_size],
      frames_per_video=[int(v) for v in frames_per_video],
      max_objects=int(max_objects),
      jpeg_quality=int(jpeg_quality),
      min_visible_pixels=int(min_visible_pixels),
  )
  if camouflage > 0:  # format 4: format 3 plus camouflaged objects; 0 keeps format 3's marker
    params.update(format_version=CAMOUFLAGE_FORMAT_VERSION, camouflage=float(camouflage))
    if camouflage_cover < 1.0:  # format 5: partly camouflaged objects
      params.update(
          format_version=PARTIAL_CAMOUFLAGE_FORMAT_VERSION, camouflage_cover=float(camouflage_cover)
      )
  if lookalike > 0:  # format 6: look-alike stripes (0 keeps the other formats' markers)
    params.update(format_version=LOOKALIKE_FORMAT_VERSION, lookalike=float(lookalike))
  if camouflage_recolour:  # format 7: the camouflaged part recoloured from another photo
    params.update(format_version=RECOLOURED_CAMOUFLAGE_FORMAT_VERSION, camouflage_recolour=True)
  return params


def marker_matches(out_dir: str, expected: dict) -> bool:
  """True when ``out_dir``'s completion marker records exactly the ``expected`` parameters."""
  marker = os.path.join(out_dir, MARKER_FILE)
  if not os.path.isfile(marker):
    return False
  try:
    with open(marker) as f:
      stored = json.load(f)["params"]
  except (ValueError, KeyError, OSError):
    return False
  return stored == expected


def is_complete(out_dir: str, **params) -> bool:
  """True when ``out_dir`` holds a finished dataset generated with these parameters."""
  return marker_matches(out_dir, _params(**params))


def ensure_dataset(
    out_dir: str,
    seed: int = 0,
    num_train_videos: int = 300,
    num_val_videos: int = 30,
    *,
    frame_size: Sequence[int] = (128, 128),
    frames_per_video: Sequence[int] = (6, 10),
    max_objects: int = 4,
    jpeg_quality: int = 90,
    min_visible_pixels: int = 4,
    camouflage: float = 0.0,
    camouflage_cover: float = 1.0,
    lookalike: float = 0.0,
    camouflage_recolour: bool = False,
) -> str:
  """Generates the dataset into ``out_dir`` unless a complete copy is already there.

  A copy without the marker (e.g. an interrupted run) or with other parameters is
  regenerated. Generation happens in a temporary sibling directory that is renamed into
  place, so concurrent processes never read a half-written dataset.

  Returns:
    ``out_dir``.
  """
  params = dict(
      seed=seed,
      num_train_videos=num_train_videos,
      num_val_videos=num_val_videos,
      frame_size=tuple(frame_size),
      frames_per_video=tuple(frames_per_video),
      max_objects=max_objects,
      jpeg_quality=jpeg_quality,
      min_visible_pixels=min_visible_pixels,
      camouflage=camouflage,
      camouflage_cover=camouflage_cover,
      lookalike=lookalike,
      camouflage_recolour=camouflage_recolour,
  )
  if is_complete(out_dir, **params):
    return out_dir
  out_dir = os.path.abspath(out_dir)
  tmp_dir = f"{out_dir}.tmp-{os.getpid()}"
  shutil.rmtree(tmp_dir, ignore_errors=True)
  logging.info("generating the synthetic dataset into %s", out_dir)
  generate(tmp_dir, **params)
  if is_complete(out_dir, **params):  # another process finished first
    shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir
  if os.path.exists(out_dir):
    shutil.rmtree(out_dir)
  os.makedirs(os.path.dirname(out_dir) or ".", exist_ok=True)
  try:
    os.rename(tmp_dir, out_dir)
  except OSError:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    if not is_complete(out_dir, **params):
      raise
  return out_dir


@dataclasses.dataclass(frozen=True)
class LongVideoObject:
  """One ground-truth instance of a long synthetic video (a visit or a resident)."""

  label: int
  start: int  # first frame the instance may be visible (inclusive)
  end: int  # last frame + 1
  params: dict


class LongVideo:
  """A long synthetic video rendered frame by frame (bounded memory at any length).

  Two "resident" objects stay for the whole video on Lissajous paths around the centre, so they
  cross and occlude each other again and again; "visitors" enter through a border, cross the
  frame through its central region (occluding or occluded by the residents: random depth) and
  leave through another border, one every ~`visit_every` frames. The ground truth is the visible
  mask after occlusion; every instance is one track.

  Example:
    video = synthetic.LongVideo(1000, seed=0)
    for t, (frame, visible) in enumerate(video.frames()):  # [H, W, 3], bool [K, H, W]
      ...
  """

  def __init__(
      self,
      length: int,
      *,
      seed: int = 0,
      frame_size: Sequence[int] = (128, 128),
      num_residents: int = 2,
      visit_every: int = 40,
      visit_frames: Sequence[int] = (40, 120),
      renderer: _Renderer | None = None,
  ):
    """Draws the scenario.

    Args:
      length: number of frames (>= 1; hundreds to thousands are fine).
      seed: the video is a pure function of all arguments.
      frame_size: (height, width).
      num_residents: objects present in every frame.
      visit_every: mean gap in frames between two visitors entering.
      visit_frames: inclusive (min, max) frames a visitor takes to cross the frame.
      renderer: reuse the photographs of another video of this size.
    """
    if length < 1:
      raise ValueError(f"length must be >= 1, got {length}")
    if visit_every < 1 or not 1 <= visit_frames[0] <= visit_frames[1]:
      raise ValueError(
          f"visit_every must be >= 1 and visit_frames (min, max) with 1 <= min <= "
          f"max, got {visit_every} and {visit_frames}"
      )
    height, width = int(frame_size[0]), int(frame_size[1])
    self.length, self.height, self.width = int(length), height, width
    self.renderer = renderer or _Renderer(height, width)
    if (self.renderer.height, self.renderer.width) != (height, width):
      raise ValueError(
          f"renderer is for {self.renderer.height}x{self.renderer.width} frames, "
          f"not {height}x{width}"
      )
    rng = np.random.default_rng([seed, 2])
    self.background = int(rng.integers(len(self.renderer.backgrounds)))
    bg = self.renderer.backgrounds[self.background]
    self.spare = np.array([bg.shape[0] - height, bg.shape[1] - width], np.float64)
    self.pan_phase = rng.uniform(0, 2 * np.pi, size=2)
    self.pan_period = rng.uniform(200, 400, size=2)
    self.objects = self._residents(rng, num_residents) + self._visitors(
        rng, visit_every, visit_frames
    )
    # Random depth order (later = on top), residents included.
    self.depth = rng.permutation(len(self.objects))

  def _residents(self, rng: np.random.Generator, num_residents: int) -> list[LongVideoObject]:
    """Objects present in every frame, on Lissajous paths around the centre."""
    height, width = self.height, self.width
    objects = []
    for _ in range(num_residents):
      label = int(rng.integers(len(SHAPE_CLASSES)))
      objects.append(
          LongVideoObject(
              label=label,
              start=0,
              end=self.length,
              params=self._appearance(rng, min(height, width), label)
              | dict(
                  kind="resident",
                  amplitude=rng.uniform(0.2, 0.32, size=2) * (height, width),
                  period=rng.uniform(60, 140, size=2),
                  phase=rng.uniform(0, 2 * np.pi, size=2),
              ),
          )
      )
    return objects

  def _visitors(
      self, rng: np.random.Generator, visit_every: int, visit_frames: Sequence[int]
  ) -> list[LongVideoObject]:
    """Objects crossing the frame from one border to the opposite one, one every ~visit_every
    frames."""
    height, width = self.height, self.width
    size = min(height, width)
    objects = []
    t = int(rng.integers(0, visit_every))
    while t < self.length:
      duration = int(rng.integers(visit_frames[0], visit_frames[1] + 1))
      side = int(rng.integers(4))
      radius = rng.uniform(0.12, 0.22) * size
      outside = 1.3 * radius
      # Enter on `side`, leave on the opposite one, passing the central region.
      a, b = rng.uniform(0.2, 0.8, size=2)
      points = [
          (-outside, a * width),
          (height + outside, b * width),
          (a * height, -outside),
          (b * height, width + outside),
      ]
      enter, leave = points[side], points[side ^ 1]
      label = int(rng.integers(len(SHAPE_CLASSES)))
      objects.append(
          LongVideoObject(
              label=label,
              start=t,
              end=min(t + duration, self.length),
              params=self._appearance(rng, size, label, radius)
              | dict(
                  kind="visitor", enter=np.array(enter), leave=np.array(leave), duration=duration
              ),
          )
      )
      t += int(rng.integers(visit_every // 2, 3 * visit_every // 2 + 1))
    return objects

  def _appearance(self, rng, size, label, radius=None) -> dict:
    fill_texture = rng.uniform() < 0.5
    return dict(
        radius=radius if radius is not None else rng.uniform(0.14, 0.24) * size,
        angle=rng.uniform(0, 2 * np.pi),
        spin=rng.uniform(-0.05, 0.05),
        aspect=rng.uniform(0.45, 0.85),
        colouring=object_colouring(rng, label),
        texture=(
            _other_index(rng, len(self.renderer.textures), self.background) if fill_texture else -1
        ),
        tex_offset=rng.integers(0, 10_000, size=2),
    )

  @property
  def labels(self) -> list[int]:
    """Contiguous class index of every instance."""
    return [o.label for o in self.objects]

  def _centre(self, obj: LongVideoObject, t: int) -> np.ndarray:
    p = obj.params
    if p["kind"] == "resident":
      centre = np.array([self.height / 2, self.width / 2])
      return centre + p["amplitude"] * np.sin(2 * np.pi * t / p["period"] + p["phase"])
    fraction = (t - obj.start) / max(p["duration"] - 1, 1)
    return p["enter"] + (p["leave"] - p["enter"]) * fraction

  def frames(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (frame uint8 [H, W, 3], visible bool [K, H, W]) for t = 0 .. length - 1."""
    renderer = self.renderer
    bg = renderer.backgrounds[self.background]
    for t in range(self.length):
      offset = np.rint(
          self.spare * (0.5 + 0.5 * np.sin(2 * np.pi * t / self.pan_period + self.pan_phase))
      ).astype(int)
      frame = bg[offset[0] : offset[0] + self.height, offset[1] : offset[1] + self.width].copy()
      visible = np.zeros((len(self.objects), self.height, self.width), bool)
      for k in self.depth:  # back to front: each drawn object hides what is below
        obj = self.objects[k]
        if not obj.start <= t < obj.end:
          continue
        p = obj.params
        cy, cx = self._centre(obj, t)
        angle = p["angle"] + p["spin"] * t
        mask = renderer.draw_object(frame, obj.label, p, cy, cx, angle, p["radius"])
        if not mask.any():
          continue
        visible[:, mask] = False
        visible[k] = mask
      yield frame, visible


def write_long_video(
    out_dir: str,
    length: int,
    *,
    seed: int = 0,
    frame_size: Sequence[int] = (128, 128),
    jpeg_quality: int = 90,
    min_visible_pixels: int = 4,
    **kwargs,
) -> dict[str, Any]:
  """Writes one `LongVideo` as a YouTube-VIS dataset, frame by frame (bounded memory).

  Layout: ``out_dir/valid.json`` (one video, id 1, with RLE ground truth) and
  ``out_dir/valid/JPEGImages/long_<length>/<frame>.jpg``.

  Args:
    out_dir: destination (created).
    length: frames.
    seed: scenario seed.
    frame_size: (height, width).
    jpeg_quality: JPEG quality.
    min_visible_pixels: a frame where an instance shows fewer pixels counts as absent.
    **kwargs: more `LongVideo` arguments.

  Returns:
    {'json': path, 'frames_dir': path, 'instances': int}.
  """
  video = LongVideo(length, seed=seed, frame_size=frame_size, **kwargs)
  name = f"long_{length:05d}"
  frames_dir = os.path.join(out_dir, "valid", "JPEGImages", name)
  os.makedirs(frames_dir, exist_ok=True)
  tracks = _write_long_frames(video, frames_dir, jpeg_quality, min_visible_pixels)
  annotations = []
  for k, label in enumerate(video.labels):
    if all(s is None for s in tracks["segmentations"][k]):
      continue
    annotations.append(
        {
            "id": len(annotations) + 1,
            "video_id": 1,
            "category_id": label + 1,
            "iscrowd": 0,
            "segmentations": tracks["segmentations"][k],
            "bboxes": tracks["bboxes"][k],
            "areas": tracks["areas"][k],
            "height": video.height,
            "width": video.width,
        }
    )
  file_names = [f"{name}/{t:05d}.jpg" for t in range(length)]
  description = f"maskfreevis_jax long synthetic video, {length} frames, seed {seed}"
  videos = [
      {
          "id": 1,
          "width": video.width,
          "height": video.height,
          "length": length,
          "file_names": file_names,
      }
  ]
  json_path = os.path.join(out_dir, "valid.json")
  with open(json_path, "w") as f:
    json.dump(_dataset_json(description, videos, annotations), f)
  return {"json": json_path, "frames_dir": frames_dir, "instances": len(annotations)}


def _write_long_frames(
    video: LongVideo, frames_dir: str, jpeg_quality: int, min_visible_pixels: int
) -> dict[str, list[list[Any]]]:
  """Writes the frames of `video`; returns each instance's per-frame 'segmentations' (RLE),
  'bboxes' and 'areas' (None where it shows fewer than `min_visible_pixels`)."""
  tracks = {key: [[] for _ in video.objects] for key in ("segmentations", "bboxes", "areas")}
  for t, (frame, visible) in enumerate(video.frames()):
    Image.fromarray(frame).save(os.path.join(frames_dir, f"{t:05d}.jpg"), quality=jpeg_quality)
    for k, mask in enumerate(visible):
      present = mask.sum() >= min_visible_pixels
      tracks["segmentations"][k].append(ytvis_json.encode_mask(mask) if present else None)
      tracks["bboxes"][k].append(_box_from_mask(mask) if present else None)
      tracks["areas"][k].append(int(mask.sum()) if present else None)
  return tracks


def default_cache_dir() -> str:
  """Where the synthetic data goes by default ($MASKFREEVIS_DATA_DIR or ~/.cache)."""
  root = os.environ.get(
      "MASKFREEVIS_DATA_DIR", os.path.join(os.path.expanduser("~"), ".cache", "maskfreevis_jax")
  )
  return os.path.join(root, "synthetic")


def main(argv: Sequence[str] | None = None) -> None:
  """Command line: ``python -m maskfreevis_jax.data.synthetic OUT_DIR [--seed ...]``."""
  import argparse  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("out_dir")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num_train_videos", type=int, default=300)
  parser.add_argument("--num_val_videos", type=int, default=30)
  parser.add_argument(
      "--frame_size", type=int, nargs=2, default=(128, 128), metavar=("HEIGHT", "WIDTH")
  )
  parser.add_argument(
      "--frames_per_video", type=int, nargs=2, default=(6, 10), metavar=("MIN", "MAX")
  )
  parser.add_argument("--max_objects", type=int, default=4)
  parser.add_argument("--camouflage", type=float, default=0.0, help="format 4: camouflaged share")
  parser.add_argument(
      "--camouflage_cover", type=float, default=1.0, help="format 5: camouflaged share of its area"
  )
  parser.add_argument("--lookalike", type=float, default=0.0, help="format 6: look-alike share")
  parser.add_argument(
      "--camouflage_recolour", action="store_true", help="format 7: recoloured camouflage"
  )
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  console.enable_echo()
  summary = generate(
      args.out_dir,
      args.seed,
      args.num_train_videos,
      args.num_val_videos,
      frame_size=args.frame_size,
      frames_per_video=args.frames_per_video,
      max_objects=args.max_objects,
      camouflage=args.camouflage,
      camouflage_cover=args.camouflage_cover,
      lookalike=args.lookalike,
      camouflage_recolour=args.camouflage_recolour,
  )
  console.report(json.dumps(summary))


if __name__ == "__main__":
  main()
