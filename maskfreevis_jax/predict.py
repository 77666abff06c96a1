"""Prediction glue for `--mode predict`: a folder of frames or a video file -> results JSON + overlay.

The frames are resized as the evaluation videos (short side `config.data.min_size_test`, long side
at most `max_size_test`), padded to a multiple of 32, run through the model of the latest
checkpoint in the workdir (whole video, or windows of `config.eval.window_size` frames), and
post-processed as the official `inference_video`. Outputs in `output_dir`:
  results.json  YouTube-VIS submission entries (video_id 0, one RLE per frame);
  overlay.gif   the frames with the predictions scoring >= `score_threshold` tinted and labelled;
  overlay.mp4   the same as a video (H.264 through imageio-ffmpeg, when installed).
Video files (.mp4, .avi, .mov, ...) are decoded with imageio's ffmpeg plugin, GIFs with Pillow.
"""
from __future__ import annotations

import json
import pathlib
from typing import Sequence

import numpy as np

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def read_frames(path: str | pathlib.Path) -> tuple[np.ndarray, list[str]]:
  """uint8 [T, H, W, 3] RGB frames of a folder of images (sorted by name) or of a video file.

  Raises:
    FileNotFoundError / ValueError naming the path when it is missing, empty or unreadable.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"--input {path} does not exist")
  if path.is_dir():
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
      raise ValueError(f"--input folder {path} has no image files ({', '.join(_IMAGE_SUFFIXES)})")
    frames = []
    for f in files:
      try:
        frames.append(np.asarray(Image.open(f).convert("RGB")))
      except Exception as e:  # pylint: disable=broad-except
        raise ValueError(f"cannot read frame {f}: {e}") from e
    shapes = {fr.shape for fr in frames}
    if len(shapes) != 1:
      raise ValueError(f"frames in {path} have different sizes: {sorted(shapes)}")
    return np.stack(frames), [f.name for f in files]
  import imageio.v3 as iio  # pylint: disable=g-import-not-at-top
  try:
    frames = np.asarray(iio.imread(path, index=None))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"cannot read video file {path}: {e}") from e
  if frames.ndim == 3:  # a single image
    frames = frames[None]
  if frames.shape[-1] == 4:
    frames = frames[..., :3]
  if frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"{path} decoded to shape {frames.shape}, expected [T, H, W, 3]")
  return frames.astype(np.uint8), [f"{path.name}#{t}" for t in range(len(frames))]


def predict(config, workdir: str | pathlib.Path, input_path: str, output_dir: str | None = None,
            *, variables=None, score_threshold: float = 0.3, class_names: Sequence[str] | None = None
            ) -> dict:
  """Predicts one video; returns {'results': path, 'overlay': path, 'num_predictions': int}."""
  from maskfreevis_jax import evaluation  # pylint: disable=g-import-not-at-top
  from maskfreevis_jax import models  # pylint: disable=g-import-not-at-top
  from maskfreevis_jax.data import transforms  # pylint: disable=g-import-not-at-top
  from maskfreevis_jax.evaluate import restore_variables  # pylint: disable=g-import-not-at-top

  frames, names = read_frames(input_path)
  if variables is None:
    variables, _ = restore_variables(workdir)
  model = models.build_model(config.model)
  height, width = frames.shape[1:3]
  out_hw = transforms.resized_shape(height, width, int(config.data.min_size_test),
                                    int(config.data.max_size_test))
  transform = transforms.ClipTransform((height, width), out_hw, flip=False)
  resized = np.stack([transform.apply_image(f) for f in frames])
  padded, image_valid = transforms.pad_frames(
      resized, (transforms.round_up(out_hw[0]), transforms.round_up(out_hw[1])))
  predictor = evaluation.VideoPredictor(model.apply, window_size=config.eval.window_size or None,
                                        top_k=int(config.eval.top_k))
  prediction = predictor(variables, padded, image_valid=image_valid, image_size=out_hw,
                         output_size=(height, width))
  out = pathlib.Path(output_dir or pathlib.Path(workdir) / "predict")
  out.mkdir(parents=True, exist_ok=True)
  results = evaluation.prediction_to_results(0, prediction)
  for r in results:
    r["file_names"] = names
  with open(out / "results.json", "w") as f:
    json.dump(results, f)
  if class_names is None:
    class_names = _class_names(config)
  overlay = evaluation.overlay_frames(frames, prediction.masks, prediction.labels,
                                      prediction.scores, class_names,
                                      score_threshold=score_threshold)
  gif = evaluation.save_animation(out / "overlay.gif", overlay)
  overlays = [gif]
  if evaluation.mp4_writer_available():  # imageio-ffmpeg is in requirements.txt
    overlays.append(evaluation.save_animation(out / "overlay.mp4", overlay))
  kept = int(np.sum(prediction.scores >= score_threshold))
  print(f"{len(frames)} frames: {kept} predictions scoring >= {score_threshold} "
        f"(top {len(results)} in {out / 'results.json'}); overlay in {', '.join(overlays)}",
        flush=True)
  return {"results": str(out / "results.json"), "overlay": str(gif), "overlays": overlays,
          "num_predictions": kept}


def _class_names(config) -> list[str] | None:
  """Category names of the configured evaluation dataset, if it can be opened."""
  try:
    from maskfreevis_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    return list(input_pipeline.open_video_source(config, "valid").class_names)
  except Exception:  # pylint: disable=broad-except
    return None
