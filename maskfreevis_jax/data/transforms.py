"""Clip-level geometric transforms (numpy / PIL) shared by every data source.

One `ClipTransform` is drawn per clip and applied to every frame, box and mask of it, so all
frames of a clip share the same resize and flip (the official ``choice_by_clip`` and
``flip_by_clip`` behaviour).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from maskfreevis_jax.data.ytvis_json import MIN_BOX_SIDE


class FrameReadError(ValueError):
  """A frame file is missing or cannot be decoded; the message names the file."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"cannot read frame {path}: {reason}")
    self.path = path


def read_rgb(path: str) -> np.ndarray:
  """Reads an image file as uint8 RGB ``[H, W, 3]`` (grayscale/RGBA/palette converted).

  Raises:
    FrameReadError: the file is missing, truncated or not an image.
  """
  try:
    with Image.open(path) as image:
      image.load()
      if image.mode != "RGB":
        image = image.convert("RGB")  # grayscale, RGBA (alpha dropped), palette, CMYK
      return np.asarray(image)
  except FileNotFoundError:
    raise FrameReadError(path, "file not found") from None
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


def sample_clip_frame_indices(rng: np.random.Generator, length: int, num_frames: int,
                              frame_range: int, shuffle: bool = False) -> np.ndarray:
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


def resized_shape(height: int, width: int, short_side: int, max_size: int,
                  canvas: Optional[Sequence[int]] = None) -> tuple[int, int]:
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


@dataclasses.dataclass(frozen=True)
class ClipTransform:
  """Resize from ``in_hw`` to ``out_hw`` then optionally flip horizontally.

  An optional crop (``crop_yx``, ``crop_hw``, in input pixels) is applied before the resize;
  per-frame crops (COCO pseudo clips) use one ClipTransform per frame.
  """
  in_hw: tuple[int, int]
  out_hw: tuple[int, int]
  flip: bool = False
  crop_yx: tuple[int, int] = (0, 0)
  crop_hw: Optional[tuple[int, int]] = None

  @property
  def _src_hw(self) -> tuple[int, int]:
    return self.crop_hw if self.crop_hw is not None else self.in_hw

  @property
  def scale_yx(self) -> tuple[float, float]:
    src_h, src_w = self._src_hw
    return self.out_hw[0] / src_h, self.out_hw[1] / src_w

  def apply_image(self, image: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> uint8 ``[out_h, out_w, 3]`` (bilinear)."""
    if tuple(image.shape[:2]) != tuple(self.in_hw):
      raise ValueError(f"frame of size {image.shape[:2]} given to a transform for {self.in_hw}")
    if self.crop_hw is not None:
      y0, x0 = self.crop_yx
      image = image[y0:y0 + self.crop_hw[0], x0:x0 + self.crop_hw[1]]
    if tuple(image.shape[:2]) != tuple(self.out_hw):
      image = np.asarray(Image.fromarray(image).resize(self.out_hw[::-1], Image.BILINEAR))
    if self.flip:
      image = image[:, ::-1]
    return np.ascontiguousarray(image)

  def apply_mask(self, mask: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W]`` -> uint8 ``[out_h, out_w]`` (nearest)."""
    if self.crop_hw is not None:
      y0, x0 = self.crop_yx
      mask = mask[y0:y0 + self.crop_hw[0], x0:x0 + self.crop_hw[1]]
    if tuple(mask.shape) != tuple(self.out_hw):
      mask = np.asarray(Image.fromarray(mask).resize(self.out_hw[::-1], Image.NEAREST))
    if self.flip:
      mask = mask[:, ::-1]
    return np.ascontiguousarray(mask)

  def apply_boxes(self, boxes: np.ndarray) -> np.ndarray:
    """Float ``[..., 4]`` x1, y1, x2, y2 input pixels -> output pixels, clipped to the image."""
    boxes = np.asarray(boxes, np.float32).copy()
    boxes[..., 0::2] -= self.crop_yx[1]
    boxes[..., 1::2] -= self.crop_yx[0]
    sy, sx = self.scale_yx
    boxes[..., 0::2] *= sx
    boxes[..., 1::2] *= sy
    out_h, out_w = self.out_hw
    boxes[..., 0::2] = np.clip(boxes[..., 0::2], 0, out_w)
    boxes[..., 1::2] = np.clip(boxes[..., 1::2], 0, out_h)
    if self.flip:
      x1 = out_w - boxes[..., 2]
      x2 = out_w - boxes[..., 0]
      boxes[..., 0], boxes[..., 2] = x1, x2
    return boxes


def nonempty_boxes(boxes: np.ndarray) -> np.ndarray:
  """bool ``[...]``: width and height above the empty-box threshold."""
  return ((boxes[..., 2] - boxes[..., 0]) > MIN_BOX_SIDE) & (
      (boxes[..., 3] - boxes[..., 1]) > MIN_BOX_SIDE)


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
