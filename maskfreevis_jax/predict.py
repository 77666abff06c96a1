"""Prediction glue for `--mode predict`: a folder of frames or a video file -> results JSON + overlay.

The input is streamed: frames are read one at a time, resized as the evaluation videos (short side
`config.data.min_size_test`, long side at most `max_size_test`), padded to a multiple of 32 and run
through the model of the latest checkpoint in the workdir by `StreamingVideoPredictor`: the whole
video as one clip when `config.eval.window_size` is 0 (official) or the video is not longer,
otherwise overlapping windows of `window_size` frames whose queries are associated into tracks
(`config.eval.associate`). Host memory then holds one window of frames plus one compressed RLE per
track and frame, whatever the length. Outputs in `output_dir`:
  results.json  YouTube-VIS submission entries (video_id 0, one RLE per frame), written at the end
                (to a temporary name first, so a failed run leaves no results.json);
  overlay.mp4   the frames with each track tinted and labelled with its class probabilities so
                far, written frame by frame (H.264 through imageio-ffmpeg, when installed); a
                failed run leaves overlay.partial.mp4 and says so;
  overlay.gif   the same for the first `gif_max_frames` frames.
Video files (.mp4, .avi, .mov, ...) are decoded with imageio-ffmpeg, GIFs with Pillow.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import pathlib
import time
from collections.abc import Iterator, Sequence

import numpy as np

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Frames count as announced by a video header that may differ from the decoded ones (rounding).
_FRAME_COUNT_TOLERANCE = 2


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
      FileNotFoundError / ValueError naming the path when it is missing, empty or unreadable.
    """
    self.path = pathlib.Path(path)
    if not self.path.exists():
      raise FileNotFoundError(f"--input {self.path} does not exist")
    self._files = None
    self._meta = None
    if self.path.is_dir():
      self._files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
      if not self._files:
        raise ValueError(
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
    import imageio_ffmpeg  # pylint: disable=g-import-not-at-top

    try:
      generator = imageio_ffmpeg.read_frames(str(self.path), pix_fmt="rgb24")
      meta = next(generator)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(
          f"cannot read video file {self.path} (frame 0): " f"{str(e).splitlines()[0]}"
      ) from e
    return generator, meta

  def _raw_frames(self) -> Iterator[np.ndarray]:
    from PIL import Image, ImageSequence  # pylint: disable=g-import-not-at-top

    if self._files is not None:
      for index, f in enumerate(self._files):
        try:
          with Image.open(f) as image:
            yield np.asarray(image.convert("RGB"))
        except Exception as e:  # pylint: disable=broad-except
          raise ValueError(f"cannot read frame {index} ({f}): {e}") from e
      return
    if self.path.suffix.lower() == ".gif":
      try:
        with Image.open(self.path) as image:
          for frame in ImageSequence.Iterator(image):
            yield np.asarray(frame.convert("RGB"))
      except Exception as e:  # pylint: disable=broad-except
        raise ValueError(f"cannot read GIF {self.path}: {e}") from e
      return
    generator, meta = self._open_video()
    width, height = meta["size"]
    index = 0
    try:
      for data in generator:
        yield np.frombuffer(data, np.uint8).reshape(height, width, 3)
        index += 1
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(
          f"cannot decode frame {index} of {self.path}: " f"{str(e).splitlines()[0]}"
      ) from e
    finally:
      generator.close()
    if self.num_frames is not None and index < self.num_frames - _FRAME_COUNT_TOLERANCE:
      raise ValueError(
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
        raise ValueError(
            f"frame {index} ({self.name(index)}) of {self.path} is "
            f"{frame.shape[1]}x{frame.shape[0]}, but frame 0 ({self.name(0)}) is "
            f"{first_shape[1]}x{first_shape[0]}"
        )
      yield frame
    if first_shape is None:
      raise ValueError(f"{self.path} has no frames")


def read_frames(path: str | pathlib.Path) -> tuple[np.ndarray, list[str]]:
  """uint8 [T, H, W, 3] RGB frames of a folder of images (sorted by name) or of a video file.

  Loads the whole video; `predict` streams it instead (`FrameReader`).

  Raises:
    FileNotFoundError / ValueError naming the path (and frame) when it is missing, empty or
    unreadable.
  """
  reader = FrameReader(path)
  frames = np.stack(list(reader))
  return frames, [reader.name(t) for t in range(len(frames))]


class _OverlayWriter:
  """Writes overlay frames as they come: MP4 through imageio-ffmpeg, plus a capped GIF."""

  def __init__(self, out_dir: pathlib.Path, fps: float, gif_max_frames: int):
    self.mp4_path = out_dir / "overlay.mp4"
    self.partial_path = out_dir / "overlay.partial.mp4"
    self.gif_path = out_dir / "overlay.gif"
    self.fps, self.gif_max_frames = fps, gif_max_frames
    self.gif_frames = []
    self.num_frames = 0
    self._mp4 = None
    self._use_mp4 = importlib.util.find_spec("imageio_ffmpeg") is not None

  def write(self, frames: np.ndarray) -> None:
    """Appends uint8 [n, H, W, 3] frames."""
    for frame in frames:
      if self._use_mp4:
        if self._mp4 is None:
          import imageio_ffmpeg  # pylint: disable=g-import-not-at-top

          self._mp4 = imageio_ffmpeg.write_frames(
              str(self.partial_path),
              (frame.shape[1], frame.shape[0]),
              fps=self.fps,
              macro_block_size=2,
              quality=7,
          )
          self._mp4.send(None)
        self._mp4.send(np.ascontiguousarray(frame).tobytes())
      if len(self.gif_frames) < self.gif_max_frames:
        self.gif_frames.append(frame)
      self.num_frames += 1

  def close(self, ok: bool) -> list[str]:
    """Finishes the files; on success renames the MP4 into place. Returns the paths written."""
    from maskfreevis_jax import evaluation  # pylint: disable=g-import-not-at-top

    written = []
    if self._mp4 is not None:
      self._mp4.close()
      if ok:
        os.replace(self.partial_path, self.mp4_path)
        written.append(str(self.mp4_path))
    if ok and self.gif_frames:
      written.insert(
          0, evaluation.save_animation(self.gif_path, np.stack(self.gif_frames), fps=self.fps)
      )
    return written


def _format_seconds(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def predict(
    config,
    workdir: str | pathlib.Path,
    input_path: str,
    output_dir: str | None = None,
    *,
    variables=None,
    model=None,
    score_threshold: float = 0.3,
    class_names: Sequence[str] | None = None,
    fps: float = 6.0,
    gif_max_frames: int = 100,
    overlay_min_size: int = 384,
    overlay: bool = True,
    progress_every: float = 10.0,
) -> dict:
  """Predicts one video, streaming it; returns the output paths and counts.

  Args:
    config: full config (model, data.min_size_test / max_size_test, eval windowing).
    workdir: run directory whose latest checkpoint is used (unless `variables` is given).
    input_path: a folder of frames or a video file.
    output_dir: where outputs go (default workdir/predict).
    variables: model variables (default: restored from workdir).
    model: override the model built from config.model (anything with `.apply`).
    score_threshold: tracks whose best class probability is lower are not drawn.
    class_names: label names for the overlay (default: the configured dataset's).
    fps: frame rate of the overlays.
    gif_max_frames: the GIF overlay holds at most this many frames (the MP4 has them all).
    overlay_min_size: overlays of smaller frames are upscaled to this short side (0: never).
    overlay: write the overlays (False: results only, e.g. for benchmarks).
    progress_every: seconds between progress lines.

  Returns:
    {'results': path, 'overlay': path or None, 'overlays': [paths], 'num_predictions': int,
     'num_frames': int}.

  Raises:
    ValueError: bad input (naming the frame); nothing is left half-written without the message
      saying so.
  """
  from maskfreevis_jax import evaluation  # pylint: disable=g-import-not-at-top
  from maskfreevis_jax import models  # pylint: disable=g-import-not-at-top
  from maskfreevis_jax.data import transforms  # pylint: disable=g-import-not-at-top
  from maskfreevis_jax.evaluation import visualize  # pylint: disable=g-import-not-at-top

  reader = FrameReader(input_path)
  frames = iter(reader)
  first = next(frames)
  if variables is None:
    # Imported here: it pulls in TensorFlow (the metric writers).
    from maskfreevis_jax.evaluate import restore_variables  # pylint: disable=g-import-not-at-top

    variables, _ = restore_variables(workdir, config.eval.get("step"))
  model = model if model is not None else models.build_model(config.model)
  if class_names is None:
    class_names = _class_names(config)
  height, width = first.shape[:2]
  out_hw = transforms.resized_shape(
      height, width, int(config.data.min_size_test), int(config.data.max_size_test)
  )
  transform = transforms.ClipTransform((height, width), out_hw, flip=False)
  padded_hw = (transforms.round_up(out_hw[0]), transforms.round_up(out_hw[1]))
  _, image_valid = transforms.pad_frames(np.zeros((1, *out_hw, 1), np.uint8), padded_hw)
  predictor = evaluation.StreamingVideoPredictor.from_config(model.apply, config.eval)
  window = predictor.window_size
  total = reader.num_frames
  if window is None and total is not None and total > 300:
    print(
        f"{total} frames in one clip (config.eval.window_size=0, the official whole-video "
        "inference): memory grows with the length; set --config.eval.window_size=N to bound "
        "it",
        flush=True,
    )

  out = pathlib.Path(output_dir or pathlib.Path(workdir) / "predict")
  out.mkdir(parents=True, exist_ok=True)
  writer = _OverlayWriter(out, fps, gif_max_frames)
  pending = {}  # original frames read but not yet drawn, by index
  num_queries = None
  palette = None
  start_time = last_print = time.perf_counter()

  def model_frames():
    for index, frame in enumerate(itertools.chain([first], frames)):
      pending[index] = frame
      padded = np.zeros((*padded_hw, 3), np.uint8)
      padded[: out_hw[0], : out_hw[1]] = transform.apply_image(frame)
      yield padded

  def on_frames(first_index, masks, track_scores):
    nonlocal num_queries, palette, last_print
    if palette is None:
      num_queries = masks.shape[0]
      palette = visualize.track_colors(num_queries)
    count = masks.shape[1]
    chunk = np.stack([pending.pop(first_index + t) for t in range(count)])
    if overlay:
      best = track_scores.max(axis=1)
      drawn = np.flatnonzero(best >= score_threshold)
      drawn = drawn[np.argsort(-best[drawn], kind="stable")][: predictor.top_k]
      writer.write(
          evaluation.overlay_frames(
              chunk,
              masks[drawn],
              track_scores[drawn].argmax(axis=1),
              best[drawn],
              class_names,
              score_threshold=score_threshold,
              colors=palette[drawn],
              min_size=overlay_min_size,
          )
      )
    done = first_index + count
    now = time.perf_counter()
    if now - last_print >= progress_every or (total is not None and done >= total):
      last_print = now
      per_frame = (now - start_time) / done
      if total:
        eta = _format_seconds(per_frame * max(total - done, 0))
        print(
            f"frame {done}/{total} ({100 * done / total:.0f}%), {per_frame:.3f} s/frame, "
            f"ETA {eta}",
            flush=True,
        )
      else:
        print(f"frame {done}, {per_frame:.3f} s/frame", flush=True)

  results_path = out / "results.json"
  try:
    prediction = predictor(
        variables,
        model_frames(),
        image_valid=image_valid,
        image_size=out_hw,
        output_size=(height, width),
        on_frames=on_frames,
    )
  except (ValueError, OSError, RuntimeError) as e:
    writer.close(ok=False)
    partial = (
        f"the overlay of the first {writer.num_frames} frames is in {writer.partial_path}"
        if writer.num_frames and writer.partial_path.exists()
        else "no overlay written"
    )
    raise ValueError(f"{e}; stopped: no {results_path} written, {partial}") from e
  results = evaluation.prediction_to_results(0, prediction)
  names = [reader.name(t) for t in range(prediction.num_frames)]
  for r in results:
    r["file_names"] = names
  tmp_path = out / "results.json.partial"
  with open(tmp_path, "w") as f:
    json.dump(results, f)
  os.replace(tmp_path, results_path)
  overlays = writer.close(ok=True)
  kept = int(np.sum(prediction.scores >= score_threshold))
  seconds = time.perf_counter() - start_time
  print(
      f"{prediction.num_frames} frames in {seconds:.1f} s: {kept} predictions scoring >= "
      f"{score_threshold} (top {len(results)} in {results_path}); overlay in "
      f"{', '.join(overlays) or 'none'}",
      flush=True,
  )
  return {
      "results": str(results_path),
      "overlay": overlays[0] if overlays else None,
      "overlays": overlays,
      "num_predictions": kept,
      "num_frames": prediction.num_frames,
  }


def _class_names(config) -> list[str] | None:
  """Category names of the configured evaluation dataset, if it can be opened."""
  try:
    from maskfreevis_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top

    return list(input_pipeline.open_video_source(config, "valid").class_names)
  except Exception:  # pylint: disable=broad-except
    return None
