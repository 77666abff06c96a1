"""Overlays of video masks (per-track colours, class names and scores) and animations.

  overlay = overlay_frames(frames, prediction.masks, prediction.labels, prediction.scores,
                           class_names, score_threshold=0.3)
  save_animation('video.gif', overlay, fps=6)   # GIF always; '.mp4' needs imageio-ffmpeg or av

Frames whose shorter side is below `min_size` (384) are upscaled by an integer factor before
drawing, so a 128x128 synthetic video becomes 384x384 with small labels; labels sit just above
their object and never overlap each other (`place_label`). Works on one frame at a time too
(T = 1), e.g. for streaming output (`Mp4Writer` writes such frames as they come).

Every picture of masks in the project is drawn here, with one palette (`track_colors`) and one
tint (`tint_masks`): `mask_overlay_image` (training's TensorBoard image of a clip's top queries)
and `save_ground_truth_and_prediction` (evaluation videos, ground truth | prediction).
"""

from __future__ import annotations

import colorsys
import contextlib
import importlib.util
import os
import pathlib
import warnings
from typing import Any
from collections.abc import Iterable, Iterator, Mapping, Sequence

import imageio.v3 as iio
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from maskfreevis_jax.evaluation import inference

# JAX's warning when subprocess forks to start ffmpeg (`quiet_subprocess`).
_FORK_WARNING = r"os\.fork\(\) was called"
# Tint strength of the training summaries (`mask_overlay_image`).
_SUMMARY_ALPHA = 0.55


def track_colors(num_tracks: int) -> np.ndarray:
  """Distinct saturated RGB colours, uint8 [num_tracks, 3] (golden-ratio hue steps)."""
  return track_colors_of(np.arange(num_tracks))


def track_colors_of(track_ids: np.ndarray) -> np.ndarray:
  """uint8 [N, 3] colours of tracks by id: colour i of `track_colors` for id i, any id (a track
  keeps its colour in every frame; a new track gets a new one)."""
  track_ids = np.asarray(track_ids, np.int64).reshape(-1)
  hues = (track_ids * 0.618033988749895 + 0.1) % 1.0
  return np.array(
      [[round(255 * c) for c in colorsys.hsv_to_rgb(h, 0.85, 1.0)] for h in hues], np.uint8
  ).reshape(len(track_ids), 3)


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
    class_names: names indexed by label (default, or a label without a name: the label number).
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
  frames, masks, labels, scores = _checked_overlay_inputs(frames, masks, labels, scores, alpha)
  colors = track_colors(masks.shape[0]) if colors is None else np.asarray(colors, np.uint8)
  frames, masks = _upscale(frames, masks, upscale_factor(*frames.shape[1:3], min_size))
  # Low scores first so that confident tracks are drawn on top.
  order = [k for k in np.argsort(scores, kind="stable") if scores[k] >= score_threshold]
  out = tint_masks(frames, masks, colors, order, alpha)
  if not draw_text or (not order and not title):
    return out
  texts = [label_text(int(label), class_names) for label in labels]
  if show_scores:
    texts = [f"{text} {score:.2f}" for text, score in zip(texts, scores)]
  font = _font(max(10, min(out.shape[1:3]) // 28))
  for t in range(out.shape[0]):
    # Confident tracks get the best spots.
    out[t] = _draw_labels(out[t], masks[:, t], order[::-1], texts, colors, font, title)
  return out


def _checked_overlay_inputs(frames, masks, labels, scores, alpha):
  """(uint8 [T, H, W, 3] frames, bool [K, T, H, W] masks, [K] labels, float64 [K] scores)."""
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
        f"{num_tracks} masks but {labels.shape[0]} labels and {scores.shape[0]} scores"
    )
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}")
  return frames, masks, labels, scores


def tint_masks(
    frames: np.ndarray,
    masks: np.ndarray,
    colors: np.ndarray,
    order: Sequence[int],
    alpha: float = 0.5,
) -> np.ndarray:
  """Blends each mask's colour into the frames and outlines the mask in that colour.

  Args:
    frames: uint8 [T, H, W, 3].
    masks: bool [K, T, H, W].
    colors: uint8 [K, 3].
    order: the tracks drawn, in drawing order (later ones on top).
    alpha: tint strength in [0, 1].

  Returns:
    uint8 [T, H, W, 3] (a new array).
  """
  out = np.asarray(frames).astype(np.float32)
  for k in order:
    color = np.asarray(colors[k]).astype(np.float32)
    for t in range(out.shape[0]):
      m = masks[k, t]
      if not m.any():
        continue
      out[t][m] = (1 - alpha) * out[t][m] + alpha * color
      out[t][_boundary(m)] = color
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def label_text(label: int, class_names: Sequence[str] | None) -> str:
  """The name of contiguous class `label`: `class_names[label]`, else 'class {label}'."""
  if class_names is not None and 0 <= label < len(class_names):
    return str(class_names[label])
  return f"class {label}"


def _draw_labels(
    frame: np.ndarray,
    masks: np.ndarray,
    order: Sequence[int],
    texts: Sequence[str],
    colors: np.ndarray,
    font,
    title: str | None,
) -> np.ndarray:
  """One frame's title and track labels (track k's label `texts[k]` on `colors[k]`).

  Args:
    frame: uint8 [H, W, 3].
    masks: bool [K, H, W] the tracks' masks on this frame (a track without pixels gets none).
    order: tracks in the order they pick their label spots.
    texts, colors: per track.
    font: a PIL font.
    title: optional caption at the bottom-left corner.

  Returns:
    uint8 [H, W, 3].
  """
  frame_h, frame_w = frame.shape[:2]
  image = Image.fromarray(frame)
  draw = ImageDraw.Draw(image)
  taken = []
  if title:
    left, top, right, bottom = draw.textbbox((0, 0), title, font=font)
    rect = (0, frame_h - (bottom - top) - 4, right - left + 4, frame_h)
    draw.rectangle(rect, fill=(0, 0, 0))
    draw.text((rect[0] + 2 - left, rect[1] + 2 - top), title, fill=(255, 255, 255), font=font)
    taken.append(rect)
  for k in order:
    ys, xs = np.nonzero(masks[k])
    if ys.size == 0:
      continue
    left, top, right, bottom = draw.textbbox((0, 0), texts[k], font=font)
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
    text_color = (0, 0, 0) if luminance > 128 else (255, 255, 255)
    draw.text((rect[0] + 2 - left, rect[1] + 2 - top), texts[k], fill=text_color, font=font)
  return np.asarray(image)


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


@contextlib.contextmanager
def quiet_subprocess() -> Iterator[None]:
  """Silences JAX's `os.fork()` RuntimeWarning while imageio-ffmpeg starts ffmpeg.

  subprocess forks and at once execs ffmpeg, which runs no JAX thread: the warning (meant for a
  fork that goes on running Python) does not apply there.
  """
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=_FORK_WARNING, category=RuntimeWarning)
    yield


class Mp4Writer:
  """Writes uint8 [H, W, 3] frames one by one into an H.264 MP4 (imageio-ffmpeg), quietly.

  ffmpeg reports errors only (`-loglevel error`: no 'not enough frames to estimate rate' line)
  and JAX's fork warning is silenced (`quiet_subprocess`).

  Example:
    writer = Mp4Writer('overlay.mp4', fps=6.0)
    for frame in frames:
      writer.write(frame)
    writer.close()
  """

  def __init__(self, path: str | os.PathLike, fps: float, quality: float = 7.0):
    if fps <= 0:
      raise ValueError(f"fps must be positive, got {fps}")
    self.path = os.fspath(path)
    self.fps, self.quality = fps, quality
    self.num_frames = 0
    self._generator = None

  def write(self, frame: np.ndarray) -> None:
    """Appends one uint8 [H, W, 3] frame (every frame of the size of the first)."""
    frame = np.ascontiguousarray(frame, np.uint8)
    if self._generator is None:
      import imageio_ffmpeg  # pylint: disable=g-import-not-at-top  (optional dependency)

      self._generator = imageio_ffmpeg.write_frames(
          self.path,
          (frame.shape[1], frame.shape[0]),
          fps=self.fps,
          macro_block_size=2,
          quality=self.quality,
          ffmpeg_log_level="error",
      )
      with quiet_subprocess():
        self._generator.send(None)  # starts ffmpeg
    self._generator.send(frame.tobytes())
    self.num_frames += 1

  def close(self) -> None:
    """Finishes the file (nothing written when no frame came)."""
    if self._generator is not None:
      self._generator.close()
      self._generator = None


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
    if importlib.util.find_spec("imageio_ffmpeg") is None:
      iio.imwrite(path, frames, plugin="pyav", codec="libx264", fps=fps)
    else:
      writer = Mp4Writer(path, fps)
      for frame in frames:
        writer.write(frame)
      writer.close()
  else:
    raise ValueError(f"unsupported animation format {extension!r} for {path}: use .gif or .mp4")
  return path


# --------------------------------------------------------------------- training summaries


def mask_overlay_image(
    frames: np.ndarray,
    pred_logits: np.ndarray,
    pred_masks: np.ndarray,
    image_valid: np.ndarray | None = None,
    top_k: int = 4,
) -> np.ndarray:
  """One clip's frames side by side with its top-k queries' masks tinted over them.

  The TensorBoard image of training: the queries with the highest non-void class probability,
  coloured `track_colors` by rank, the most confident on top.

  Args:
    frames: uint8 [T, H, W, 3].
    pred_logits: [Q, C + 1] final-layer class logits (last = no object).
    pred_masks: [Q, T, h, w] final-layer mask logits at stride H / h (repeated to the frame).
    image_valid: optional bool [H, W]; masks are cut to it.
    top_k: queries drawn.

  Returns:
    uint8 [H, T * W, 3].
  """
  frames = np.asarray(frames, np.uint8)
  height, width = frames.shape[1:3]
  logits = np.asarray(pred_logits, np.float64)
  logits = logits - logits.max(-1, keepdims=True)
  probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  ranked = np.argsort(-probabilities[:, :-1].max(-1), kind="stable")[:top_k]
  pred_masks = np.asarray(pred_masks)
  stride_h, stride_w = height // pred_masks.shape[-2], width // pred_masks.shape[-1]
  masks = pred_masks[ranked] > 0
  masks = np.repeat(np.repeat(masks, stride_h, axis=-2), stride_w, axis=-1)[..., :height, :width]
  if image_valid is not None:
    masks = masks & np.asarray(image_valid, bool)[None, None]
  order = np.arange(len(ranked))[::-1]  # rank 0 (most confident) drawn last, on top
  image = tint_masks(frames, masks, track_colors(len(ranked)), order, alpha=_SUMMARY_ALPHA)
  return np.concatenate(list(image), axis=1)


# --------------------------------------------------------- ground truth next to prediction


def _resize_nearest(masks: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """bool [..., h, w] masks resized to `size` (H, W) by nearest neighbour (pixel centres)."""
  h, w = masks.shape[-2:]
  rows = np.minimum(((np.arange(size[0]) + 0.5) * h / size[0]).astype(int), h - 1)
  cols = np.minimum(((np.arange(size[1]) + 0.5) * w / size[1]).astype(int), w - 1)
  return masks[..., rows[:, None], cols[None, :]]


def ground_truth_masks(video: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
  """An evaluation example's ground-truth masks at the original size, and their labels.

  Args:
    video: an evaluation dataset example: 'frames' [T, Hp, Wp, 3], 'resized_size' (H, W),
      'orig_size' (H0, W0) and, with annotations, 'masks' [N, T, Hp, Wp] (resized, padded),
      'labels' [N] and optionally 'instance_valid' [N].

  Returns:
    bool [N, T, H0, W0] masks and int [N] labels (N = 0 without 'masks').
  """
  num_frames = np.asarray(video["frames"]).shape[-4]
  h, w = (int(s) for s in np.asarray(video["resized_size"]).reshape(-1))
  size = tuple(int(s) for s in np.asarray(video["orig_size"]).reshape(-1))
  if "masks" not in video:
    return np.zeros((0, num_frames, *size), bool), np.zeros((0,), np.int32)
  masks = np.asarray(video["masks"])[..., :h, :w] > 0
  labels = np.asarray(video["labels"]).reshape(-1)
  keep = np.asarray(video.get("instance_valid", np.ones(len(labels), bool)), bool)
  return _resize_nearest(masks[keep], size), labels[keep]


def ground_truth_and_prediction(
    video: Mapping[str, Any],
    prediction: inference.VideoPrediction,
    class_names: Sequence[str] = (),
    *,
    score_threshold: float = 0.3,
    min_size: int = 384,
) -> np.ndarray:
  """One evaluation video: ground truth (left) next to the prediction (right).

  Args:
    video: an evaluation dataset example (see `ground_truth_masks`; 'image_valid' is not
      needed: 'resized_size' gives the image area).
    prediction: the video's `VideoPrediction` (masks [K, T, H0, W0]).
    class_names: names by contiguous class index (empty: 'class N').
    score_threshold: predictions scoring lower are not drawn.
    min_size: frames are upscaled to this short side (`overlay_frames`).

  Returns:
    uint8 [T, f * H0, 2 * f * W0, 3], f = `upscale_factor(H0, W0, min_size)`.
  """
  size = tuple(int(s) for s in np.asarray(video["orig_size"]).reshape(-1))
  frames = frames_at_original_size(video["frames"], video["resized_size"], size)
  gt_masks, gt_labels = ground_truth_masks(video)
  truth = overlay_frames(
      frames,
      gt_masks,
      gt_labels,
      np.ones(len(gt_labels)),
      class_names,
      show_scores=False,
      min_size=min_size,
      title="ground truth",
  )
  predicted = overlay_frames(
      frames,
      prediction.masks,
      prediction.labels,
      prediction.scores,
      class_names,
      score_threshold=score_threshold,
      min_size=min_size,
      title="prediction",
  )
  return np.concatenate([truth, predicted], axis=2)


def stack_videos(videos: Sequence[np.ndarray]) -> np.ndarray:
  """Videos uint8 [T_i, H_i, W_i, 3] stacked top to bottom: uint8 [max T, sum H, max W, 3].

  A shorter video holds its last frame; a narrower one is padded black on the right.
  """
  if not videos:
    raise ValueError("no videos to stack")
  length = max(v.shape[0] for v in videos)
  width = max(v.shape[2] for v in videos)
  rows = []
  for v in videos:
    v = np.concatenate([v, np.repeat(v[-1:], length - v.shape[0], axis=0)])
    rows.append(np.pad(v, ((0, 0), (0, 0), (0, width - v.shape[2]), (0, 0))))
  return np.concatenate(rows, axis=1)


def save_ground_truth_and_prediction(
    out_dir: str | os.PathLike,
    videos: Iterable[Mapping[str, Any]],
    predictor: inference.VideoPredictor,
    variables: Any,
    class_names: Sequence[str] = (),
    *,
    score_threshold: float = 0.3,
    fps: float = 4.0,
) -> dict[str, str]:
  """Predicts evaluation videos and writes ground truth | prediction, the videos stacked.

  Args:
    out_dir: where `overlay.gif`, `overlay.mp4` (with an MP4 writer) and `overlay_frame.png`
      (the middle frame) go; created if missing.
    videos: evaluation dataset examples (see `ground_truth_masks`).
    predictor: runs the model on each video.
    variables: model variables.
    class_names: names by contiguous class index (empty: 'class N').
    score_threshold: predictions scoring lower are not drawn.
    fps: frame rate of the animations.

  Returns:
    {'gif': path, 'mp4': path (when written), 'png': path}.
  """
  rows = []
  for video in videos:
    prediction = predictor(
        variables,
        video["frames"],
        image_valid=video.get("image_valid"),
        image_size=video["resized_size"],
        output_size=video["orig_size"],
    )
    rows.append(
        ground_truth_and_prediction(video, prediction, class_names, score_threshold=score_threshold)
    )
  grid = stack_videos(rows)
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = {"gif": save_animation(out_dir / "overlay.gif", grid, fps=fps)}
  if mp4_writer_available():
    paths["mp4"] = save_animation(out_dir / "overlay.mp4", grid, fps=fps)
  png = out_dir / "overlay_frame.png"
  Image.fromarray(grid[grid.shape[0] // 2]).save(png)
  paths["png"] = str(png)
  return paths
