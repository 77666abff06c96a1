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
import os
import pathlib
import shutil
import sys
import time
from typing import Any
from collections.abc import Sequence

# tf.data here only runs numpy functions, so TensorFlow's oneDNN math is never used; turning it off
# (before TensorFlow loads) also drops the banner it prints at import.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from maskfreevis_jax import checkpointing
from maskfreevis_jax import console
from maskfreevis_jax import defaults
from maskfreevis_jax import evaluate
from maskfreevis_jax import experiment as experiment_lib
from maskfreevis_jax import export
from maskfreevis_jax import train
from maskfreevis_jax.data import synthetic_images
from maskfreevis_jax.evaluation import visualize

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
  keep = {k: config[k] for k in ("model", "criterion", "train", "data")}
  fingerprint = json.loads(ml_collections.ConfigDict(keep).to_json_best_effort(sort_keys=True))
  for key in _BOOKKEEPING:
    fingerprint["train"].pop(key, None)
  fingerprint["data"].pop("class_names", None)  # labels only: the weights do not depend on them
  # The generator's format too: weights trained on stills of an older format are stale.
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


def _train_stage1(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> train.TrainResult:
  """Generates the still images into `workdir/stills` and trains on them (resumable)."""
  stills = config.data.stills
  console.report(
      f"Stage 1: generating {stills.num_images} still images, then {config.train.steps} "
      f"mask-supervised steps into {workdir}"
  )
  config = defaults.config_from_dict(config.to_dict(), source="stage-1 config")  # a copy
  config.data.coco.json = synthetic_images.write_coco_instances(
      str(workdir / "stills"),
      int(stills.num_images),
      tuple(stills.size),
      int(stills.seed),
      max_objects=int(stills.max_objects),
  )
  result = train.train(experiment_lib.build_experiment(config), workdir)
  if result.preempted:
    raise RuntimeError(f"stage 1 was interrupted at step {result.step}; rerun to resume it")
  return result


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
  workdir = pathlib.Path(workdir)
  weights = workdir / STAGE1_FILE
  if stage1_is_cached(workdir, config):
    console.report(f"Stage 1: reusing {weights} (same stage-1 config)")
    return weights
  start = time.perf_counter()
  fingerprint = stage1_fingerprint(config)
  result = _train_stage1(config, workdir)
  state = jax.device_get(result.state)
  variables = {"params": state.params, **dict(state.model_state)}
  export.export_checkpoint(
      variables, config.model, weights, fmt="safetensors", iteration=result.step
  )
  seconds = round(time.perf_counter() - start, 1)
  marker = {"fingerprint": fingerprint, "step": result.step, "seconds": seconds}
  (workdir / STAGE1_MARKER).write_text(json.dumps(marker, indent=1))
  console.report(f"Stage 1: {result.step} steps in {seconds:.0f} s, weights in {weights}")
  return weights


def overlay_videos(
    experiment: experiment_lib.Experiment,
    variables: Any,
    out_dir: str | pathlib.Path,
    num_videos: int = 3,
) -> dict[str, str]:
  """Overlays of the first validation videos: ground truth (left) and prediction (right).

  Writes `out_dir/overlay.gif` and `overlay.mp4` (videos stacked top to bottom) and
  `overlay_frame.png` (its middle frame); returns their paths by kind.
  """
  dataset = experiment.eval_dataset()
  videos = (dataset.video_example(i) for i in dataset.indices[:num_videos])
  return visualize.save_ground_truth_and_prediction(
      out_dir,
      videos,
      experiment.video_predictor(),
      variables,
      experiment.config.data.class_names,
      score_threshold=float(experiment.config.predict.score_threshold),
  )


# ------------------------------------------------------------------------------ command line

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    str(REPO_ROOT / "configs" / "synthetic.py"),
    "Stage-2 config (boxes, videos).",
    lock_config=True,
)
_PRETRAIN_CONFIG = config_flags.DEFINE_config_file(
    "pretrain_config",
    str(REPO_ROOT / "configs" / "synthetic_pretrain.py"),
    "Stage-1 config (masks, still images).",
    lock_config=True,
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


def _stage1_weights(
    config: ml_collections.ConfigDict,
    pretrain_config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    stage1: str,
) -> str:
  """The stage-1 weights stage 2 starts from: the committed file, or stage 1 trained here."""
  init_from = config.init_from
  if stage1 == "train" or not init_from or not pathlib.Path(init_from).is_file():
    if init_from and stage1 == "auto":
      console.report(f"Stage 1: {init_from} not found; training stage 1 instead")
    return str(ensure_stage1(pretrain_config, workdir / "stage1"))
  console.report(
      f"Stage 1: committed weights {init_from} (made by bash scripts/make_stage1_weights.sh)"
  )
  return init_from


def run(
    config: ml_collections.ConfigDict,
    pretrain_config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    stage1: str = "auto",
    num_overlay_videos: int = 3,
) -> dict:
  """Both stages, evaluation and overlays; returns the metrics (percent) and output paths."""
  workdir = pathlib.Path(workdir)
  start = time.perf_counter()
  config.init_from = _stage1_weights(config, pretrain_config, workdir, stage1)
  console.report(f"Stage 2: box-supervised video training from {config.init_from}")
  experiment = experiment_lib.build_experiment(config)
  result = train.train(experiment, workdir)
  if result.preempted:
    return {}
  metrics = evaluate.evaluate(experiment, workdir, step=result.step)
  variables, _ = experiment.restore_variables(workdir)
  paths = overlay_videos(experiment, variables, workdir / "overlays", num_overlay_videos)
  console.report(
      f"Overlays of {num_overlay_videos} validation videos (ground truth | prediction): "
      f"{', '.join(paths.values())}"
  )
  console.report(f"Done in {time.perf_counter() - start:.0f} s")
  return {"metrics": metrics, "overlays": paths}


def _stage1_only(pretrain_config: ml_collections.ConfigDict, workdir: str, output: str | None):
  weights = ensure_stage1(pretrain_config, workdir)
  if output:
    pathlib.Path(output).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, output)
    console.report(f"Copied the stage-1 weights to {output}")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  console.enable_echo()
  try:
    if _STAGE1_ONLY.value:
      _stage1_only(_PRETRAIN_CONFIG.value, _WORKDIR.value, _OUTPUT.value)
      return
    run(_CONFIG.value, _PRETRAIN_CONFIG.value, _WORKDIR.value, _STAGE1.value, _OVERLAY_VIDEOS.value)
  except Exception as e:  # pylint: disable=broad-except
    line = console.user_error_line(e, (train.NonFiniteLossError, checkpointing.CheckpointError))
    if line is None:
      raise
    print(line, file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
