"""The embedded two-stage default: masks on synthetic stills, then boxes on synthetic videos.

The official release never trains from scratch: it starts from COCO Mask2Former weights and
then trains on videos from boxes only. The embedded default follows the same protocol on data
the project makes itself:

  stage 1  mask-supervised pretraining on synthetic still images as pseudo clips
           (`configs/synthetic_pretrain.py`, `maskfreevis_jax.data.synthetic_images`), exported
           as a small .safetensors file. The committed `weights/synthetic_stage1.safetensors`
           was made by `bash scripts/make_stage1_weights.sh`; without it (or with
           `--stage1=train`) stage 1 runs into `WORKDIR/stage1`, and a rerun reuses it.
  stage 2  box-supervised video training (projection + pairwise + TK-Loss,
           `configs/synthetic.py`) initialised through `config.init_from`, exactly as real users
           load COCO weights; then the YouTube-VIS AP table and overlay animations of a few
           validation videos (`WORKDIR/overlays/`).

  python -m maskfreevis_jax.two_stage --workdir workdir/synthetic
  python -m maskfreevis_jax.two_stage --stage1_only --workdir workdir/stage1 \
      --output weights/synthetic_stage1.safetensors
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys
import time
from typing import Any
from collections.abc import Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags
import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
STAGE1_FILE = "stage1.safetensors"
STAGE1_MARKER = "stage1.json"


# config.train fields that do not change the trained weights.
_BOOKKEEPING = (
    "checkpoint_every",
    "keep",
    "async_checkpoint",
    "log_every",
    "image_every",
    "profile_steps",
)


def stage1_fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What stage-1 weights depend on: the model, criterion, optimizer, data, image set and the
  still-image generator's format version."""
  keep = {k: config[k] for k in ("model", "criterion", "train", "data") if k in config}
  fingerprint = json.loads(ml_collections.ConfigDict(keep).to_json_best_effort(sort_keys=True))
  for key in _BOOKKEEPING:
    fingerprint.get("train", {}).pop(key, None)
  # The generator's format too: weights trained on stills of an older format are stale.
  from maskfreevis_jax.data import synthetic_images  # pylint: disable=g-import-not-at-top

  fingerprint["stills_format_version"] = synthetic_images.FORMAT_VERSION
  return fingerprint


def stage1_is_cached(workdir: str | pathlib.Path, config: ml_collections.ConfigDict) -> bool:
  """True when `workdir` holds stage-1 weights made with this exact stage-1 config."""
  workdir = pathlib.Path(workdir)
  marker = workdir / STAGE1_MARKER
  if not (workdir / STAGE1_FILE).is_file() or not marker.is_file():
    return False
  try:
    stored = json.loads(marker.read_text())["fingerprint"]
  except (ValueError, KeyError, OSError):
    return False
  return stored == stage1_fingerprint(config)


def ensure_stage1(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> pathlib.Path:
  """Runs stage 1 into `workdir` unless a matching run is cached there; returns its weights.

  Generates the still images (`config.data.stills`) into `workdir/stills`, trains
  mask-supervised (resuming an interrupted run), exports `workdir/stage1.safetensors` in the
  official key layout and writes the marker `workdir/stage1.json` last.

  Args:
    config: the stage-1 config (`configs/synthetic_pretrain.py`).
    workdir: stage-1 run directory.

  Returns:
    Path of the exported weights.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from maskfreevis_jax import export  # pylint: disable=g-import-not-at-top
  from maskfreevis_jax import train  # pylint: disable=g-import-not-at-top
  from maskfreevis_jax.data import synthetic_images  # pylint: disable=g-import-not-at-top

  workdir = pathlib.Path(workdir)
  weights = workdir / STAGE1_FILE
  if stage1_is_cached(workdir, config):
    print(f"Stage 1: reusing {weights} (same stage-1 config)", flush=True)
    return weights
  start = time.perf_counter()
  fingerprint = stage1_fingerprint(config)
  stills = config.data.stills
  print(
      f"Stage 1: generating {stills.num_images} still images, then {config.train.steps} "
      f"mask-supervised steps into {workdir}",
      flush=True,
  )
  config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy
  config.data.coco.json = synthetic_images.write_coco_instances(
      str(workdir / "stills"),
      int(stills.num_images),
      tuple(stills.size),
      int(stills.seed),
      max_objects=int(stills.max_objects),
  )
  result = train.train(config, workdir)
  if result.preempted:
    raise RuntimeError(f"stage 1 was interrupted at step {result.step}; rerun to resume it")
  state = jax.device_get(result.state)
  variables = {"params": state.params, **dict(state.model_state)}
  export.export_checkpoint(
      variables, config.model, weights, fmt="safetensors", iteration=result.step
  )
  marker = {
      "fingerprint": fingerprint,
      "step": result.step,
      "seconds": round(time.perf_counter() - start, 1),
  }
  (workdir / STAGE1_MARKER).write_text(json.dumps(marker, indent=1))
  print(
      f"Stage 1: {result.step} steps in {marker['seconds']:.0f} s, weights in {weights}", flush=True
  )
  return weights


def overlay_videos(
    config: ml_collections.ConfigDict,
    variables: Any,
    out_dir: str | pathlib.Path,
    num_videos: int = 3,
    score_threshold: float = 0.3,
) -> dict[str, str]:
  """Overlays of the first validation videos: ground truth (left) and prediction (right).

  Writes `out_dir/overlay.gif` and `overlay.mp4` (videos stacked top to bottom) and
  `overlay_frame.png` (its middle frame).

  Returns:
    {'gif': ..., 'mp4': ... (when an MP4 writer is installed), 'png': ...} paths.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from maskfreevis_jax import evaluation  # pylint: disable=g-import-not-at-top
  from maskfreevis_jax import models  # pylint: disable=g-import-not-at-top
  from maskfreevis_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from maskfreevis_jax.data import ytvis_json  # pylint: disable=g-import-not-at-top
  from maskfreevis_jax.evaluation import visualize  # pylint: disable=g-import-not-at-top

  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  dataset = input_pipeline.create_eval_dataset(config, split=config.eval.get("split", "valid"))
  model = models.build_model(config.model)
  predictor = evaluation.VideoPredictor.from_config(model.apply, config.eval)
  class_names = list(dataset.class_names)
  rows = []
  for i in range(min(num_videos, len(dataset))):
    video = dataset.video_example(dataset.indices[i])
    prediction = predictor(
        variables,
        video["frames"],
        image_valid=video["image_valid"],
        image_size=video["resized_size"],
        output_size=video["orig_size"],
    )
    frames = np.asarray(dataset.source.read_frames(dataset.indices[i], video["frame_index"]))
    source_video = dataset.source.video(dataset.indices[i])
    gt_masks, gt_labels = [], []
    for track in source_video.tracks:
      if track.segmentations is None:
        continue
      gt_masks.append(
          np.stack(
              [
                  ytvis_json.decode_segmentation(s, *frames.shape[1:3]) > 0
                  for s in track.segmentations
              ]
          )
      )
      gt_labels.append(track.label)
    gt_masks = np.stack(gt_masks) if gt_masks else np.zeros((0,) + frames.shape[:3], bool)
    truth = visualize.overlay_frames(
        frames,
        gt_masks,
        gt_labels,
        np.ones(len(gt_labels)),
        class_names,
        show_scores=False,
        title="ground truth",
    )
    predicted = visualize.overlay_frames(
        frames,
        prediction.masks,
        prediction.labels,
        prediction.scores,
        class_names,
        score_threshold=score_threshold,
        title="prediction",
    )
    rows.append(np.concatenate([truth, predicted], axis=2))
  length = max(r.shape[0] for r in rows)
  # Shorter videos hold their last frame.
  rows = [np.concatenate([r, np.repeat(r[-1:], length - r.shape[0], axis=0)]) for r in rows]
  width = max(r.shape[2] for r in rows)
  rows = [np.pad(r, ((0, 0), (0, 0), (0, width - r.shape[2]), (0, 0))) for r in rows]
  grid = np.concatenate(rows, axis=1)
  paths = {"gif": visualize.save_animation(out_dir / "overlay.gif", grid, fps=4)}
  if visualize.mp4_writer_available():
    paths["mp4"] = visualize.save_animation(out_dir / "overlay.mp4", grid, fps=4)
  png = out_dir / "overlay_frame.png"
  Image.fromarray(grid[length // 2]).save(png)
  paths["png"] = str(png)
  return paths


# ------------------------------------------------------------------------------ command line

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    str(REPO_ROOT / "configs" / "synthetic.py"),
    "Stage-2 config (boxes, videos).",
    lock_config=False,
)
_PRETRAIN_CONFIG = config_flags.DEFINE_config_file(
    "pretrain_config",
    str(REPO_ROOT / "configs" / "synthetic_pretrain.py"),
    "Stage-1 config (masks, still images).",
    lock_config=False,
)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/synthetic", "Run directory.")
_STAGE1 = flags.DEFINE_enum(
    "stage1",
    "auto",
    ("auto", "train"),
    "auto: the stage-2 config's init_from file when it exists (the committed weights), else "
    "train stage 1 into WORKDIR/stage1; train: always use (and cache) WORKDIR/stage1.",
)
_STAGE1_ONLY = flags.DEFINE_bool(
    "stage1_only", False, "Only run stage 1 into --workdir and export its weights."
)
_OUTPUT = flags.DEFINE_string("output", None, "--stage1_only: also copy the weights here.")
_OVERLAY_VIDEOS = flags.DEFINE_integer("overlay_videos", 3, "Validation videos in the overlay.")


def run(
    config: ml_collections.ConfigDict,
    pretrain_config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    stage1: str = "auto",
    num_overlay_videos: int = 3,
) -> dict:
  """Both stages, evaluation and overlays; returns the metrics (percent) and output paths."""
  from maskfreevis_jax import evaluate  # pylint: disable=g-import-not-at-top
  from maskfreevis_jax import train  # pylint: disable=g-import-not-at-top

  workdir = pathlib.Path(workdir)
  start = time.perf_counter()
  init_from = config.get("init_from", "")
  if stage1 == "train" or not init_from or not pathlib.Path(init_from).is_file():
    if init_from and stage1 == "auto":
      print(f"Stage 1: {init_from} not found; training stage 1 instead", flush=True)
    config.init_from = str(ensure_stage1(pretrain_config, workdir / "stage1"))
  else:
    print(
        f"Stage 1: committed weights {init_from} (made by bash scripts/make_stage1_weights.sh)",
        flush=True,
    )
  print(f"Stage 2: box-supervised video training from {config.init_from}", flush=True)
  result = train.train(config, workdir)
  if result.preempted:
    return {}
  metrics = evaluate.evaluate(config, workdir, step=result.step)
  variables, _ = evaluate.restore_variables(workdir)
  paths = overlay_videos(config, variables, workdir / "overlays", num_videos=num_overlay_videos)
  print(
      f"Overlays of {num_overlay_videos} validation videos (ground truth | prediction): "
      f"{', '.join(paths.values())}",
      flush=True,
  )
  print(f"Done in {time.perf_counter() - start:.0f} s", flush=True)
  return {"metrics": metrics, "overlays": paths}


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from maskfreevis_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from maskfreevis_jax import train  # pylint: disable=g-import-not-at-top

  try:
    if _STAGE1_ONLY.value:
      weights = ensure_stage1(_PRETRAIN_CONFIG.value, _WORKDIR.value)
      if _OUTPUT.value:
        pathlib.Path(_OUTPUT.value).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(weights, _OUTPUT.value)
        print(f"Copied the stage-1 weights to {_OUTPUT.value}", flush=True)
      return
    run(_CONFIG.value, _PRETRAIN_CONFIG.value, _WORKDIR.value, _STAGE1.value, _OVERLAY_VIDEOS.value)
  except (
      train.NonFiniteLossError,
      checkpointing.CheckpointMismatchError,
      FileNotFoundError,
      ValueError,
      RuntimeError,
  ) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
