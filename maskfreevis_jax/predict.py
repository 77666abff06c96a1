"""Prediction glue for `--mode predict`: a folder of frames or a video file -> results JSON + overlay.

The input is streamed: frames are read one at a time, resized as the evaluation videos (short side
`config.data.min_size_test`, long side at most `max_size_test`), padded to a multiple of 32 and run
through the model (the caller restores its variables) by `StreamingVideoPredictor`: the whole
video as one clip when `config.eval.window_size` is 0 (official) or the video is not longer,
otherwise overlapping windows of `window_size` frames whose queries are associated into tracks
(`config.eval.associate`). Host memory then holds one window of frames plus one compressed RLE per
track and frame, whatever the length. Outputs in `output_dir`:
  results.json  YouTube-VIS submission entries (video_id 0, one RLE per frame), written at the end
                (to a temporary name first, so a failed run leaves no results.json);
  overlay.mp4   the frames with each track tinted and labelled with its class (names from
                `config.data.class_names`, else 'class N') and probability so far, written frame by
                frame (H.264 through imageio-ffmpeg, when installed); a failed run leaves
                overlay.partial.mp4 and says so;
  overlay.gif   the same for the first `config.predict.gif_max_frames` frames.
`config.predict` holds the other knobs (score_threshold, fps, overlay_min_size). Video files
(.mp4, .avi, .mov, ...) are decoded with imageio-ffmpeg, GIFs with Pillow.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import os
import pathlib
import time
from typing import Any
from collections.abc import Iterable, Iterator

from absl import logging
import ml_collections
import numpy as np
from PIL import Image, ImageSequence

from maskfreevis_jax import console
from maskfreevis_jax import evaluation
from maskfreevis_jax import models
from maskfreevis_jax.data import transforms
from maskfreevis_jax.evaluation import visualize

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Frames count as announced by a video header that may differ from the decoded ones (rounding).
_FRAME_COUNT_TOLERANCE = 2


class BadInputError(ValueError):
  """The input cannot be read: a missing, empty, unreadable or truncated file, named."""


class FrameReader:
  """Frames of a folder of images (sorted by name) or of a video file, read one at a time.

  Every frame is checked: unreadable, truncated or of another size than the first, it raises a
  ValueError naming the frame (index and file).

  Attributes:
    path: the input.
    num_frames: the frame count (for a video, as its header announces; None when unknown).
  """

  def __init__(self, path: str | pathlib.Path):
    """Opens the input.

    Raises:
      FileNotFoundError / BadInputError naming the path when it is missing, empty or unreadable.
    """
    self.path = pathlib.Path(path)
    if not self.path.exists():
      raise FileNotFoundError(f"--input {self.path} does not exist")
    self._files = None
    self._meta = None
    if self.path.is_dir():
      self._files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
      if not self._files:
        raise BadInputError(
            f"--input folder {self.path} has no image files " f"({', '.join(_IMAGE_SUFFIXES)})"
        )
      self.num_frames = len(self._files)
    elif self.path.suffix.lower() == ".gif":
      self.num_frames = None
    else:
      generator, self._meta = self._open_video()
      generator.close()
      duration, fps = self._meta.get("duration"), self._meta.get("fps")
      self.num_frames = (
          int(round(duration * fps)) if duration and fps and np.isfinite(duration * fps) else None
      )

  def name(self, index: int) -> str:
    """How frame `index` is named in results and errors."""
    if self._files is not None:
      return self._files[index].name
    return f"{self.path.name}#{index}"

  def _open_video(self):
    import imageio_ffmpeg  # pylint: disable=g-import-not-at-top  (optional dependency)

    try:
      generator = imageio_ffmpeg.read_frames(str(self.path), pix_fmt="rgb24")
      with visualize.quiet_subprocess():
        meta = next(generator)  # starts ffmpeg
    except Exception as e:  # pylint: disable=broad-except
      raise BadInputError(
          f"cannot read video file {self.path} (frame 0): " f"{str(e).splitlines()[0]}"
      ) from e
    return generator, meta

  def _raw_frames(self) -> Iterator[np.ndarray]:
    if self._files is not None:
      for index, f in enumerate(self._files):
        try:
          with Image.open(f) as image:
            yield np.asarray(image.convert("RGB"))
        except Exception as e:  # pylint: disable=broad-except
          raise BadInputError(f"cannot read frame {index} ({f}): {e}") from e
      return
    if self.path.suffix.lower() == ".gif":
      try:
        with Image.open(self.path) as image:
          for frame in ImageSequence.Iterator(image):
            yield np.asarray(frame.convert("RGB"))
      except Exception as e:  # pylint: disable=broad-except
        raise BadInputError(f"cannot read GIF {self.path}: {e}") from e
      return
    generator, meta = self._open_video()
    width, height = meta["size"]
    index = 0
    try:
      for data in generator:
        yield np.frombuffer(data, np.uint8).reshape(height, width, 3)
        index += 1
    except Exception as e:  # pylint: disable=broad-except
      raise BadInputError(
          f"cannot decode frame {index} of {self.path}: " f"{str(e).splitlines()[0]}"
      ) from e
    finally:
      generator.close()
    if self.num_frames is not None and index < self.num_frames - _FRAME_COUNT_TOLERANCE:
      raise BadInputError(
          f"video {self.path} is truncated: frame {index} cannot be decoded (its "
          f"header announces {self.num_frames} frames)"
      )

  def __iter__(self) -> Iterator[np.ndarray]:
    """uint8 [H, W, 3] RGB frames, all of the first frame's size."""
    first_shape = None
    for index, frame in enumerate(self._raw_frames()):
      if frame.ndim == 2:
        frame = np.repeat(frame[..., None], 3, axis=-1)
      frame = frame[..., :3].astype(np.uint8, copy=False)
      if first_shape is None:
        first_shape = frame.shape
      elif frame.shape != first_shape:
        raise BadInputError(
            f"frame {index} ({self.name(index)}) of {self.path} is "
            f"{frame.shape[1]}x{frame.shape[0]}, but frame 0 ({self.name(0)}) is "
            f"{first_shape[1]}x{first_shape[0]}"
        )
      yield frame
    if first_shape is None:
      raise BadInputError(f"{self.path} has no frames")


def read_frames(path: str | pathlib.Path) -> tuple[np.ndarray, list[str]]:
  """uint8 [T, H, W, 3] RGB frames of a folder of images (sorted by name) or of a video file.

  Loads the whole video; `predict` streams it instead (`FrameReader`).

  Raises:
    FileNotFoundError / ValueError naming the path (and frame) when it is missing, empty or
    unreadable (BadInputError is a ValueError).
  """
  reader = FrameReader(path)
  frames = np.stack(list(reader))
  return frames, [reader.name(t) for t in range(len(frames))]


class _OverlayWriter:
  """Writes overlay frames as they come: MP4 (imageio-ffmpeg, when installed), plus a capped GIF."""

  def __init__(self, out_dir: pathlib.Path, fps: float, gif_max_frames: int):
    self.mp4_path = out_dir / "overlay.mp4"
    self.partial_path = out_dir / "overlay.partial.mp4"
    self.gif_path = out_dir / "overlay.gif"
    self.fps, self.gif_max_frames = fps, gif_max_frames
    self.gif_frames = []
    self.num_frames = 0
    self._mp4 = None
    if importlib.util.find_spec("imageio_ffmpeg") is not None:
      self._mp4 = visualize.Mp4Writer(self.partial_path, fps)

  def write(self, frames: np.ndarray) -> None:
    """Appends uint8 [n, H, W, 3] frames."""
    for frame in frames:
      if self._mp4 is not None:
        self._mp4.write(frame)
      if len(self.gif_frames) < self.gif_max_frames:
        self.gif_frames.append(frame)
      self.num_frames += 1

  def close(self, ok: bool) -> list[str]:
    """Finishes the files; on success renames the MP4 into place. Returns the paths written."""
    written = []
    if self._mp4 is not None and self._mp4.num_frames:
      self._mp4.close()
      if ok:
        os.replace(self.partial_path, self.mp4_path)
        written.append(str(self.mp4_path))
    if ok and self.gif_frames:
      gif = visualize.save_animation(self.gif_path, np.stack(self.gif_frames), fps=self.fps)
      written.insert(0, gif)
    return written

  def partial_note(self) -> str:
    """Where the overlay of a stopped run is."""
    if self.num_frames and self.partial_path.exists():
      return f"the overlay of the first {self.num_frames} frames is in {self.partial_path}"
    return "no overlay written"


@dataclasses.dataclass(frozen=True)
class _Geometry:
  """How input frames become model frames, as the evaluation videos.

  Attributes:
    original: (H0, W0) input frame size.
    resized: (H, W) after the shortest-edge resize (`data.min_size_test`, `max_size_test`).
    padded: (Hp, Wp) the model input, `resized` rounded up to multiples of 32.
    image_valid: bool [Hp, Wp], True on the resized image.
    transform: the resize.
  """

  original: tuple[int, int]
  resized: tuple[int, int]
  padded: tuple[int, int]
  image_valid: np.ndarray
  transform: transforms.ClipTransform

  @classmethod
  def of(cls, height: int, width: int, data_config: ml_collections.ConfigDict) -> _Geometry:
    resized = transforms.resized_shape(
        height, width, int(data_config.min_size_test), int(data_config.max_size_test)
    )
    padded = (transforms.round_up(resized[0]), transforms.round_up(resized[1]))
    _, image_valid = transforms.pad_frames(np.zeros((1, *resized, 1), np.uint8), padded)
    transform = transforms.ClipTransform((height, width), resized, flip=False)
    return cls((height, width), resized, padded, image_valid, transform)

  def model_frame(self, frame: np.ndarray) -> np.ndarray:
    """uint8 [H0, W0, 3] -> uint8 [Hp, Wp, 3]: resized, zero-padded at the bottom and right."""
    padded = np.zeros((*self.padded, 3), np.uint8)
    padded[: self.resized[0], : self.resized[1]] = self.transform.apply_image(frame)
    return padded


def _format_seconds(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Progress:
  """Reports 'frame i/T (p%), s/frame, ETA' at most every `every` seconds, and at the end."""

  def __init__(self, total: int | None, every: float):
    self.total, self.every = total, every
    self.start = self.last = time.perf_counter()

  def update(self, done: int) -> None:
    now = time.perf_counter()
    if now - self.last < self.every and (self.total is None or done < self.total):
      return
    self.last = now
    per_frame = (now - self.start) / done
    if self.total:
      eta = _format_seconds(per_frame * max(self.total - done, 0))
      console.report(
          f"frame {done}/{self.total} ({100 * done / self.total:.0f}%), {per_frame:.3f} s/frame, "
          f"ETA {eta}"
      )
    else:
      console.report(f"frame {done}, {per_frame:.3f} s/frame")


class _FrameSink:
  """The streaming predictor's `on_frames`: draws the overlay of finished frames, reports progress.

  Holds the input frames read but not drawn yet (`pending`, filled by `model_frames`), at most one
  window of them.
  """

  def __init__(
      self,
      geometry: _Geometry,
      writer: _OverlayWriter | None,
      config: ml_collections.ConfigDict,
      top_k: int,
      progress: _Progress,
  ):
    self.geometry, self.writer, self.progress = geometry, writer, progress
    self.top_k = top_k
    self.predict_config = config.predict
    self.class_names = tuple(config.data.class_names)
    self.pending = {}  # input frames by index

  def model_frames(self, frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """uint8 [Hp, Wp, 3] model frames of the input frames, which wait in `pending` to be drawn."""
    for index, frame in enumerate(frames):
      self.pending[index] = frame
      yield self.geometry.model_frame(frame)

  def __call__(
      self, first: int, masks: np.ndarray, track_ids: np.ndarray, track_scores: np.ndarray
  ) -> None:
    """Frames [first, first + n): bool masks [N, n, H0, W0] of the N tracks present there, int
    track_ids [N], float32 track_scores [N, C]."""
    count = masks.shape[1]
    chunk = np.stack([self.pending.pop(first + t) for t in range(count)])
    if self.writer is not None:
      self.writer.write(self._overlay(chunk, masks, track_ids, track_scores))
    self.progress.update(first + count)

  def _overlay(
      self,
      frames: np.ndarray,
      masks: np.ndarray,
      track_ids: np.ndarray,
      track_scores: np.ndarray,
  ) -> np.ndarray:
    """The top-k tracks scoring >= the threshold on uint8 [n, H0, W0, 3] frames, each in its
    track's colour (a new track, a new colour)."""
    threshold = float(self.predict_config.score_threshold)
    best = track_scores.max(axis=1)
    drawn = np.flatnonzero(best >= threshold)
    drawn = drawn[np.argsort(-best[drawn], kind="stable")][: self.top_k]
    return visualize.overlay_frames(
        frames,
        masks[drawn],
        track_scores[drawn].argmax(axis=1),
        best[drawn],
        self.class_names,
        score_threshold=threshold,
        colors=visualize.track_colors_of(track_ids[drawn]),
        min_size=int(self.predict_config.overlay_min_size),
    )


def predict(
    config: ml_collections.ConfigDict,
    input_path: str | pathlib.Path,
    output_dir: str | pathlib.Path,
    *,
    variables: Any,
    model: Any = None,
    overlay: bool = True,
    progress_every: float = 10.0,
) -> dict[str, Any]:
  """Predicts one video, streaming it; returns the output paths and counts.

  Args:
    config: full config: model, data (min_size_test / max_size_test, class_names), eval
      (windowing, association, top_k) and predict (score_threshold, fps, gif_max_frames,
      overlay_min_size).
    input_path: a folder of frames or a video file.
    output_dir: where outputs go (created if missing).
    variables: model variables.
    model: override the model built from config.model (anything with `.apply`).
    overlay: write the overlays (False: results only, e.g. for benchmarks).
    progress_every: seconds between progress lines (`console.report`).

  Returns:
    {'results': path, 'overlay': path or None, 'overlays': [paths], 'num_predictions': int
     (scoring >= score_threshold), 'num_frames': int}.

  Raises:
    FileNotFoundError: `input_path` does not exist.
    BadInputError (a ValueError): the input cannot be read, naming the frame; the message says
      that no results were written and where a partial overlay is. Other errors (of the model,
      out of memory) propagate unchanged; no results.json is written then either.
  """
  reader = FrameReader(input_path)
  frames = iter(reader)
  first = next(frames)
  geometry = _Geometry.of(*first.shape[:2], config.data)
  model = model if model is not None else models.build_model(config.model)
  predictor = evaluation.StreamingVideoPredictor.from_config(model.apply, config.eval)
  if predictor.window_size is None and reader.num_frames is not None and reader.num_frames > 300:
    console.report(
        f"{reader.num_frames} frames in one clip (config.eval.window_size=0, the official "
        "whole-video inference): memory grows with the length; set "
        "--config.eval.window_size=N to bound it"
    )
  out = pathlib.Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  writer = None
  if overlay:
    writer = _OverlayWriter(out, float(config.predict.fps), int(config.predict.gif_max_frames))
  progress = _Progress(reader.num_frames, progress_every)
  sink = _FrameSink(geometry, writer, config, predictor.top_k, progress)
  results_path = out / "results.json"
  try:
    prediction = predictor(
        variables,
        sink.model_frames(itertools.chain([first], frames)),
        image_valid=geometry.image_valid,
        image_size=geometry.resized,
        output_size=geometry.original,
        on_frames=sink,
    )
  except BaseException as e:
    note = "no overlay written"
    if writer is not None:
      writer.close(ok=False)
      note = writer.partial_note()
    if isinstance(e, BadInputError):
      raise BadInputError(f"{e}; stopped: no {results_path} written, {note}") from e
    logging.error("prediction stopped: no %s written, %s", results_path, note)
    raise
  results = _write_results(results_path, prediction, reader)
  overlays = [] if writer is None else writer.close(ok=True)
  return _summary(config, prediction, results, results_path, overlays, progress.start)


def _write_results(
    path: pathlib.Path, prediction: evaluation.StreamedPrediction, reader: FrameReader
) -> list[dict]:
  """Writes the YouTube-VIS entries (video_id 0, with the frames' 'file_names' and the entry's
  'track_id': entries of one track share it) atomically."""
  results = evaluation.prediction_to_results(0, prediction)
  names = [reader.name(t) for t in range(prediction.num_frames)]
  for r, track_id in zip(results, prediction.track_indices):
    r["file_names"] = names
    r["track_id"] = int(track_id)
  tmp_path = path.with_name(path.name + ".partial")
  with open(tmp_path, "w") as f:
    json.dump(results, f)
  os.replace(tmp_path, path)
  return results


def _summary(
    config: ml_collections.ConfigDict,
    prediction: evaluation.StreamedPrediction,
    results: list[dict],
    results_path: pathlib.Path,
    overlays: list[str],
    start_time: float,
) -> dict[str, Any]:
  """Reports the run's outcome in one line and returns `predict`'s dict."""
  threshold = float(config.predict.score_threshold)
  kept = int(np.sum(prediction.scores >= threshold))
  seconds = time.perf_counter() - start_time
  console.report(
      f"{prediction.num_frames} frames in {seconds:.1f} s: {kept} predictions scoring >= "
      f"{threshold} (top {len(results)} in {results_path}); overlay in "
      f"{', '.join(overlays) or 'none'}"
  )
  return {
      "results": str(results_path),
      "overlay": overlays[0] if overlays else None,
      "overlays": overlays,
      "num_predictions": kept,
      "num_frames": prediction.num_frames,
  }
