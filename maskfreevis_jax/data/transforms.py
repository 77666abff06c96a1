"""Clip-level geometric transforms (numpy / PIL) shared by every data source.

One `ClipTransform` is drawn per clip and applied to every frame, box and mask of it, so all
frames of a clip share the same resize and flip (the official ``choice_by_clip`` and
``flip_by_clip`` behaviour).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from maskfreevis_jax.data.ytvis_json import MIN_BOX_SIDE


class FrameReadError(ValueError):
  """A frame file is missing or cannot be decoded; the one-line message names the file."""

  def __init__(self, path: str, reason: str):
    reason = " ".join(str(reason).split())  # one line, whatever the decoder said
    super().__init__(f"cannot read frame {path}: {reason}")
    self.path = path
    self.reason = reason


def read_rgb(path: str) -> np.ndarray:
  """Reads an image file as uint8 RGB ``[H, W, 3]`` (grayscale/RGBA/palette converted).

  Raises:
    FrameReadError: the file is missing, cannot be opened (e.g. its video folder was replaced
      by a file), is truncated or is not an image.
  """
  try:
    with Image.open(path) as image:
      image.load()
      if image.mode != "RGB":
        image = image.convert("RGB")  # grayscale, RGBA (alpha dropped), palette, CMYK
      return np.asarray(image)
  except FileNotFoundError:
    raise FrameReadError(path, "file not found") from None
  except (NotADirectoryError, IsADirectoryError, PermissionError) as e:
    raise FrameReadError(path, f"cannot open the file ({e.strerror})") from None
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise FrameReadError(path, f"corrupt or unsupported image ({e})") from None


def decode_rgb(data: bytes, name: str) -> np.ndarray:
  """Decodes encoded image bytes (e.g. from TFDS) to uint8 RGB; errors name ``name``."""
  import io  # pylint: disable=g-import-not-at-top

  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      if image.mode != "RGB":
        image = image.convert("RGB")
      return np.asarray(image)
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise FrameReadError(name, f"corrupt or unsupported image ({e})") from None


def sample_clip_frame_indices(
    rng: np.random.Generator, length: int, num_frames: int, frame_range: int, shuffle: bool = False
) -> np.ndarray:
  """Samples the frames of a training clip like the official video dataset mapper.

  A reference frame is drawn uniformly; the other ``num_frames - 1`` frames are drawn (with
  replacement) from the frames at most ``frame_range`` away from it, excluding it, and the
  result is sorted (then shuffled when ``shuffle``). A one-frame video repeats its frame.

  Returns:
    int32 ``[num_frames]`` frame indices into the video.
  """
  if length < 1:
    raise ValueError(f"video length must be >= 1, got {length}")
  ref = int(rng.integers(length))
  lo, hi = max(0, ref - frame_range), min(length, ref + frame_range + 1)
  candidates = np.array([i for i in range(lo, hi) if i != ref], np.int64)
  if candidates.size:
    others = rng.choice(candidates, size=num_frames - 1, replace=True)
  else:
    others = np.full((num_frames - 1,), ref, np.int64)
  indices = np.sort(np.concatenate([others, [ref]]))
  if shuffle:
    indices = rng.permutation(indices)
  return indices.astype(np.int32)


def resized_shape(
    height: int, width: int, short_side: int, max_size: int, canvas: Sequence[int] | None = None
) -> tuple[int, int]:
  """Output size of the shortest-edge resize (detectron2 rule), optionally fit to a canvas.

  The short side becomes ``short_side`` unless the long side would exceed ``max_size``;
  with ``canvas=(H, W)`` the result is further scaled down to fit inside it (so a fixed
  padded shape holds every clip, whatever its orientation).
  """
  scale = short_side / min(height, width)
  new_h, new_w = height * scale, width * scale
  if max(new_h, new_w) > max_size:
    shrink = max_size / max(new_h, new_w)
    new_h, new_w = new_h * shrink, new_w * shrink
  if canvas is not None:
    shrink = min(1.0, canvas[0] / new_h, canvas[1] / new_w)
    new_h, new_w = new_h * shrink, new_w * shrink
  out_h, out_w = int(new_h + 0.5), int(new_w + 0.5)
  if canvas is not None:
    out_h, out_w = min(out_h, int(canvas[0])), min(out_w, int(canvas[1]))
  return max(out_h, 1), max(out_w, 1)


def rotation_matrix(angle: float, center_xy: Sequence[float]) -> np.ndarray:
  """float64 [2, 3] affine map of a counter-clockwise rotation by ``angle`` degrees about
  ``center_xy`` (x, y), as ``cv2.getRotationMatrix2D`` (which takes the centre in float32)."""
  cx, cy = (float(np.float32(v)) for v in center_xy)
  cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
  return np.array(
      [[cos, sin, (1 - cos) * cx - sin * cy], [-sin, cos, sin * cx + (1 - cos) * cy]], np.float64
  )


def rotate_image(
    image: np.ndarray, angle: float, center_xy: Sequence[float], nearest: bool = False
) -> np.ndarray:
  """Rotates ``[H, W, ...]`` uint8 by ``angle`` degrees (counter-clockwise) about ``center_xy``.

  The output keeps the input size; pixels from outside the image are 0. This is detectron2's
  ``RotationTransform(expand=False)``: ``cv2.warpAffine`` (bilinear, or nearest for masks) with
  the centre shifted by half a pixel, here in numpy (agrees with OpenCV to one grey level).
  """
  height, width = image.shape[:2]
  forward = np.vstack(
      [rotation_matrix(angle, (center_xy[0] - 0.5, center_xy[1] - 0.5)), [0.0, 0.0, 1.0]]
  )
  inverse = np.linalg.inv(forward)[:2]
  y, x = np.mgrid[0:height, 0:width].astype(np.float64)
  src_x = inverse[0, 0] * x + inverse[0, 1] * y + inverse[0, 2]
  src_y = inverse[1, 0] * x + inverse[1, 1] * y + inverse[1, 2]
  pixels = image.reshape(height, width, -1)

  def gather(xi, yi):
    inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
    values = pixels[np.clip(yi, 0, height - 1), np.clip(xi, 0, width - 1)]
    return np.where(inside[..., None], values, 0)

  if nearest:
    out = gather(np.rint(src_x).astype(np.int64), np.rint(src_y).astype(np.int64))
  else:
    x0, y0 = np.floor(src_x), np.floor(src_y)
    fx, fy = (src_x - x0)[..., None], (src_y - y0)[..., None]
    x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
    out = (1 - fy) * ((1 - fx) * gather(x0, y0) + fx * gather(x0 + 1, y0)) + fy * (
        (1 - fx) * gather(x0, y0 + 1) + fx * gather(x0 + 1, y0 + 1)
    )
    out = np.clip(np.rint(out), 0, 255)
  return out.astype(image.dtype).reshape(image.shape)


@dataclasses.dataclass(frozen=True)
class ClipTransform:
  """Resize from ``in_hw`` to ``out_hw``, optionally flip horizontally, then rotate.

  An optional crop (``crop_yx``, ``crop_hw``, in input pixels, or in pixels of the input first
  resized to ``pre_hw`` when given, as the release's pseudo-clip crop) is applied before the
  resize; per-frame crops (COCO pseudo clips) use one ClipTransform per frame. ``angle`` (degrees,
  counter-clockwise) rotates the resized frame about ``center_xy`` (output pixels; default the
  frame centre) keeping its size, as the release's ``RandomRotationClip`` for COCO pseudo clips.
  """

  in_hw: tuple[int, int]
  out_hw: tuple[int, int]
  flip: bool = False
  crop_yx: tuple[int, int] = (0, 0)
  crop_hw: tuple[int, int] | None = None
  angle: float = 0.0
  center_xy: tuple[float, float] | None = None
  pre_hw: tuple[int, int] | None = None

  @property
  def _center_xy(self) -> tuple[float, float]:
    if self.center_xy is not None:
      return self.center_xy
    return self.out_hw[1] / 2, self.out_hw[0] / 2

  @property
  def _src_hw(self) -> tuple[int, int]:
    if self.crop_hw is not None:
      return self.crop_hw
    return self.pre_hw if self.pre_hw is not None else self.in_hw

  def _pre_resize(self, image: np.ndarray, resample) -> np.ndarray:
    if self.pre_hw is None or tuple(self.pre_hw) == tuple(image.shape[:2]):
      return image
    return np.asarray(Image.fromarray(image).resize(tuple(self.pre_hw)[::-1], resample))

  @property
  def scale_yx(self) -> tuple[float, float]:
    src_h, src_w = self._src_hw
    return self.out_hw[0] / src_h, self.out_hw[1] / src_w

  def apply_image(self, image: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> uint8 ``[out_h, out_w, 3]`` (bilinear)."""
    if tuple(image.shape[:2]) != tuple(self.in_hw):
      raise ValueError(f"frame of size {image.shape[:2]} given to a transform for {self.in_hw}")
    image = self._pre_resize(image, Image.BILINEAR)
    if self.crop_hw is not None:
      y0, x0 = self.crop_yx
      image = image[y0 : y0 + self.crop_hw[0], x0 : x0 + self.crop_hw[1]]
    if tuple(image.shape[:2]) != tuple(self.out_hw):
      image = np.asarray(Image.fromarray(image).resize(self.out_hw[::-1], Image.BILINEAR))
    if self.flip:
      image = image[:, ::-1]
    if self.angle % 360:
      image = rotate_image(image, self.angle, self._center_xy)
    return np.ascontiguousarray(image)

  def apply_mask(self, mask: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W]`` -> uint8 ``[out_h, out_w]`` (nearest)."""
    mask = self._pre_resize(mask, Image.NEAREST)
    if self.crop_hw is not None:
      y0, x0 = self.crop_yx
      mask = mask[y0 : y0 + self.crop_hw[0], x0 : x0 + self.crop_hw[1]]
    if tuple(mask.shape) != tuple(self.out_hw):
      mask = np.asarray(Image.fromarray(mask).resize(self.out_hw[::-1], Image.NEAREST))
    if self.flip:
      mask = mask[:, ::-1]
    if self.angle % 360:
      mask = rotate_image(mask, self.angle, self._center_xy, nearest=True)
    return np.ascontiguousarray(mask)

  def apply_boxes(self, boxes: np.ndarray) -> np.ndarray:
    """Float ``[..., 4]`` x1, y1, x2, y2 input pixels -> output pixels, clipped to the image.

    A rotated box becomes the box around its rotated corners; clipping comes last, as
    detectron2's ``transform_instance_annotations`` does.
    """
    boxes = np.asarray(boxes, np.float32).copy()
    if self.pre_hw is not None:
      boxes[..., 0::2] *= self.pre_hw[1] / self.in_hw[1]
      boxes[..., 1::2] *= self.pre_hw[0] / self.in_hw[0]
    boxes[..., 0::2] -= self.crop_yx[1]
    boxes[..., 1::2] -= self.crop_yx[0]
    sy, sx = self.scale_yx
    boxes[..., 0::2] *= sx
    boxes[..., 1::2] *= sy
    out_h, out_w = self.out_hw
    if self.flip:
      x1 = out_w - boxes[..., 2]
      x2 = out_w - boxes[..., 0]
      boxes[..., 0], boxes[..., 2] = x1, x2
    if self.angle % 360:
      corners = boxes[..., [[0, 1], [2, 1], [0, 3], [2, 3]]].astype(np.float64)  # [..., 4, 2]
      matrix = rotation_matrix(self.angle, self._center_xy)
      turned = corners @ matrix[:, :2].T + matrix[:, 2]
      boxes = np.concatenate([turned.min(-2), turned.max(-2)], -1).astype(np.float32)
    boxes[..., 0::2] = np.clip(boxes[..., 0::2], 0, out_w)
    boxes[..., 1::2] = np.clip(boxes[..., 1::2], 0, out_h)
    return boxes


def nonempty_boxes(boxes: np.ndarray) -> np.ndarray:
  """bool ``[...]``: width and height above the empty-box threshold."""
  return ((boxes[..., 2] - boxes[..., 0]) > MIN_BOX_SIDE) & (
      (boxes[..., 3] - boxes[..., 1]) > MIN_BOX_SIDE
  )


def round_up(value: int, multiple: int = 32) -> int:
  return int(math.ceil(value / multiple) * multiple)


def pad_frames(frames: np.ndarray, pad_hw: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """Zero-pads frames ``[T, h, w, C]`` at the bottom/right to ``[T, PH, PW, C]``.

  Returns:
    The padded frames and ``image_valid`` bool ``[PH, PW]`` (True on real pixels).
  """
  t, h, w = frames.shape[:3]
  ph, pw = int(pad_hw[0]), int(pad_hw[1])
  if h > ph or w > pw:
    raise ValueError(f"frames of size {h}x{w} do not fit the padded size {ph}x{pw}")
  out = np.zeros((t, ph, pw) + frames.shape[3:], frames.dtype)
  out[:, :h, :w] = frames
  valid = np.zeros((ph, pw), bool)
  valid[:h, :w] = True
  return out, valid
