"""Overlays of predicted video masks (per-track colours, class names and scores) and animations.

  overlay = overlay_frames(frames, prediction.masks, prediction.labels, prediction.scores,
                           class_names, score_threshold=0.3)
  save_animation('video.gif', overlay, fps=6)   # GIF always; '.mp4' needs imageio-ffmpeg or av

Frames whose shorter side is below `min_size` (384) are upscaled by an integer factor before
drawing, so a 128x128 synthetic video becomes 384x384 with small labels; labels sit just above
their object and never overlap each other (`place_label`). Works on one frame at a time too
(T = 1), e.g. for streaming output.
"""

from __future__ import annotations

import colorsys
import importlib.util
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def track_colors(num_tracks: int) -> np.ndarray:
  """Distinct saturated RGB colours, uint8 [num_tracks, 3] (golden-ratio hue steps)."""
  hues = (np.arange(num_tracks) * 0.618033988749895 + 0.1) % 1.0
  return np.array(
      [[round(255 * c) for c in colorsys.hsv_to_rgb(h, 0.85, 1.0)] for h in hues], np.uint8
  ).reshape(num_tracks, 3)


def _boundary(mask: np.ndarray) -> np.ndarray:
  """Pixels of a bool [H, W] mask with a 4-neighbour outside it."""
  padded = np.pad(mask, 1, constant_values=False)
  interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
  return mask & ~interior


def upscale_factor(height: int, width: int, min_size: int) -> int:
  """Integer factor that brings the shorter side of a frame to at least `min_size` (>= 1)."""
  shorter = min(int(height), int(width))
  if min_size <= 0 or shorter >= min_size:
    return 1
  return -(-int(min_size) // shorter)


def _upscale(frames: np.ndarray, masks: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
  """Frames bilinearly and masks by pixel repetition, both `factor` times larger."""
  if factor == 1:
    return frames, masks
  height, width = frames.shape[1] * factor, frames.shape[2] * factor
  frames = np.stack(
      [np.asarray(Image.fromarray(f).resize((width, height), Image.BILINEAR)) for f in frames]
  )
  masks = np.repeat(np.repeat(masks, factor, axis=-2), factor, axis=-1)
  return frames, masks


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow without FreeType: the fixed bitmap font
    return ImageFont.load_default()


def _intersects(a: Sequence[int], b: Sequence[int]) -> bool:
  return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_label(
    anchor_box: Sequence[int],
    size: Sequence[int],
    frame_size: Sequence[int],
    taken: Sequence[Sequence[int]],
) -> tuple[int, int, int, int] | None:
  """Where to put a label of `size` (w, h) for an object with box `anchor_box` (x0, y0, x1, y1).

  Tries just above the object, inside its top edge, just below it, then slides down the
  frame; the first spot inside the frame that overlaps no `taken` rectangle wins.

  Returns:
    The label rectangle (x0, y0, x1, y1), or None when no free spot exists.
  """
  frame_h, frame_w = (int(v) for v in frame_size)
  w, h = (int(v) for v in size)
  if w > frame_w or h > frame_h:
    return None
  x = min(max(int(anchor_box[0]), 0), frame_w - w)
  preferred = [(x, int(anchor_box[1]) - h), (x, int(anchor_box[1])), (x, int(anchor_box[3]))]
  scan = [
      (xx, yy)
      for yy in range(0, frame_h - h + 1, max(h // 2, 1))
      for xx in range(0, frame_w - w + 1, max(w // 2, 1))
  ]
  for xx, yy in preferred + scan:
    rect = (xx, yy, xx + w, yy + h)
    if 0 <= yy <= frame_h - h and not any(_intersects(rect, t) for t in taken):
      return rect
  return None


def overlay_frames(
    frames: np.ndarray,
    masks: np.ndarray,
    labels: Sequence[int],
    scores: Sequence[float],
    class_names: Sequence[str] | None = None,
    *,
    alpha: float = 0.5,
    score_threshold: float = 0.0,
    colors: np.ndarray | None = None,
    draw_text: bool = True,
    min_size: int = 384,
    show_scores: bool = True,
    title: str | None = None,
) -> np.ndarray:
  """Tints each track on the frames, outlines it and writes its class name (and score).

  Small frames are first upscaled by an integer factor so that the shorter side is at least
  `min_size` (masks by pixel repetition, so their shape is exact); labels are small, sit just
  above their object where there is room, and never overlap each other or the title (a label
  with no free spot is left out of that frame).

  Args:
    frames: uint8 [T, H, W, 3] RGB frames.
    masks: bool [K, T, H, W] track masks (same H, W as the frames).
    labels: [K] contiguous class indices.
    scores: [K] confidences.
    class_names: names indexed by label (default: the label number).
    alpha: tint strength in [0, 1].
    score_threshold: tracks scoring below it are not drawn.
    colors: optional uint8 [K, 3] colours (default `track_colors(K)`).
    draw_text: write the labels (and title).
    min_size: upscale frames whose shorter side is below this (0: never).
    show_scores: append the score to the class name.
    title: optional caption at the frame's bottom-left corner.

  Returns:
    uint8 [T, f * H, f * W, 3] annotated frames, f = `upscale_factor(H, W, min_size)` (the
    input is not modified).
  """
  frames = np.asarray(frames)
  masks = np.asarray(masks, bool)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
  if masks.ndim != 4 or masks.shape[1:] != frames.shape[:3]:
    raise ValueError(
        f'masks must be [K, T, H, W] = [K, {", ".join(map(str, frames.shape[:3]))}],'
        f" got {masks.shape}"
    )
  num_tracks = masks.shape[0]
  labels, scores = np.asarray(labels).reshape(-1), np.asarray(scores, np.float64).reshape(-1)
  if labels.shape[0] != num_tracks or scores.shape[0] != num_tracks:
    raise ValueError(
        f"{num_tracks} masks but {labels.shape[0]} labels and {scores.shape[0]} " "scores"
    )
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}")
  colors = track_colors(num_tracks) if colors is None else np.asarray(colors, np.uint8)
  frames, masks = _upscale(frames, masks, upscale_factor(*frames.shape[1:3], min_size))
  out = frames.astype(np.float32)
  # Low scores first so that confident tracks are drawn on top.
  order = [k for k in np.argsort(scores, kind="stable") if scores[k] >= score_threshold]
  for k in order:
    color = colors[k].astype(np.float32)
    for t in range(frames.shape[0]):
      m = masks[k, t]
      if not m.any():
        continue
      out[t][m] = (1 - alpha) * out[t][m] + alpha * color
      out[t][_boundary(m)] = color
  out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
  if not draw_text or (not order and not title):
    return out
  frame_h, frame_w = out.shape[1:3]
  font = _font(max(10, min(frame_h, frame_w) // 28))
  for t in range(frames.shape[0]):
    image = Image.fromarray(out[t])
    draw = ImageDraw.Draw(image)
    taken = []
    if title:
      left, top, right, bottom = draw.textbbox((0, 0), title, font=font)
      rect = (0, frame_h - (bottom - top) - 4, right - left + 4, frame_h)
      draw.rectangle(rect, fill=(0, 0, 0))
      draw.text((rect[0] + 2 - left, rect[1] + 2 - top), title, fill=(255, 255, 255), font=font)
      taken.append(rect)
    # Confident tracks get the best spots.
    for k in order[::-1]:
      ys, xs = np.nonzero(masks[k, t])
      if ys.size == 0:
        continue
      label = int(labels[k])
      name = (
          class_names[label]
          if class_names is not None and 0 <= label < len(class_names)
          else (str(label))
      )
      text = f"{name} {scores[k]:.2f}" if show_scores else name
      left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
      rect = place_label(
          (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1),
          (right - left + 4, bottom - top + 4),
          (frame_h, frame_w),
          taken,
      )
      if rect is None:
        continue
      taken.append(rect)
      color = tuple(int(c) for c in colors[k])
      draw.rectangle(rect, fill=color)
      luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
      draw.text(
          (rect[0] + 2 - left, rect[1] + 2 - top),
          text,
          fill=(0, 0, 0) if luminance > 128 else (255, 255, 255),
          font=font,
      )
    out[t] = np.asarray(image)
  return out


def frames_at_original_size(
    frames: np.ndarray, image_size: Sequence[int], output_size: Sequence[int]
) -> np.ndarray:
  """Crops padded model-input frames to the image and resizes them to the original video size.

  Args:
    frames: uint8 [T, Hp, Wp, 3].
    image_size: (H, W) valid image area (top-left).
    output_size: (H0, W0).

  Returns:
    uint8 [T, H0, W0, 3], matching the masks of `VideoPrediction`.
  """
  h, w = (int(s) for s in image_size)
  out_h, out_w = (int(s) for s in output_size)
  return np.stack(
      [
          np.asarray(
              Image.fromarray(np.ascontiguousarray(f[:h, :w])).resize(
                  (out_w, out_h), Image.BILINEAR
              )
          )
          for f in np.asarray(frames)
      ]
  )


def mp4_writer_available() -> bool:
  """Whether imageio can write MP4 here (needs the imageio-ffmpeg or av package)."""
  return any(importlib.util.find_spec(m) is not None for m in ("imageio_ffmpeg", "av"))


def save_animation(path: str | os.PathLike, frames: np.ndarray, fps: float = 6.0) -> str:
  """Writes frames as an animated GIF ('.gif') or an MP4 video ('.mp4').

  Args:
    path: output file; its extension picks the format.
    frames: uint8 [T, H, W, 3].
    fps: frames per second.

  Returns:
    The path written.

  Raises:
    ValueError: unsupported extension or bad frames.
    RuntimeError: '.mp4' requested but no MP4 writer is installed.
  """
  import imageio.v3 as iio  # pylint: disable=g-import-not-at-top

  path = os.fspath(path)
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
  if fps <= 0:
    raise ValueError(f"fps must be positive, got {fps}")
  extension = os.path.splitext(path)[1].lower()
  if extension == ".gif":
    # Pillow's GIF writer: duration per frame in ms, loop forever.
    iio.imwrite(path, frames, extension=".gif", duration=1000.0 / fps, loop=0)
  elif extension == ".mp4":
    if not mp4_writer_available():
      raise RuntimeError(
          f"cannot write {path}: MP4 needs the imageio-ffmpeg or av package; "
          "install one or write a .gif"
      )
    if importlib.util.find_spec("av") is not None:
      iio.imwrite(path, frames, plugin="pyav", codec="libx264", fps=fps)
    else:
      iio.imwrite(path, frames, extension=".mp4", fps=fps)
  else:
    raise ValueError(f"unsupported animation format {extension!r} for {path}: use .gif or .mp4")
  return path
