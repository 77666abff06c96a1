"""The embedded two-stage default: stage 1 on synthetic stills, then boxes on synthetic videos.

The official release never trains from scratch: it starts from COCO Mask2Former weights and
then trains on videos from boxes only. Its headline "without any masks" row (`mfvis_nococo/`)
starts from a COCO Mask2Former trained with boxes only (`model_final_proj.pth`). The embedded
default follows the same protocols on data the project makes itself (`--protocol`):

  stage 1  pretraining on synthetic still images as pseudo clips
           (`maskfreevis_jax.data.synthetic_images`, other photographs than the videos), exported
           as a small .safetensors file:
             boxes  box projection + colour pairwise, stills written without any mask
                    (`configs/synthetic_pretrain_boxes.py`,
                    `weights/synthetic_stage1_boxes.safetensors`);
             masks  mask-supervised (`configs/synthetic_pretrain.py`,
                    `weights/synthetic_stage1.safetensors`).
           The committed files were made by `bash scripts/make_stage1_weights.sh`; without them
           (or with `--stage1=train`) stage 1 runs into `WORKDIR/stage1`, and a rerun reuses it.
  stage 2  box-supervised video training (projection + pairwise + TK-Loss,
           `configs/synthetic.py`) initialised through `config.init_from`, exactly as real users
           load COCO weights; then the YouTube-VIS AP table and overlay animations of a few
           validation videos (`WORKDIR/overlays/`).

  python -m maskfreevis_jax.two_stage --workdir workdir/synthetic [--protocol=boxes|masks]
  python -m maskfreevis_jax.two_stage --stage1_only --protocol=boxes --workdir workdir/stage1 \
      --output protocol
"""

from __future__ import annotations

import importlib.util
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

# The two stage-1 protocols: their stage-1 config and committed weights.
#   boxes  no mask anywhere (the release's `mfvis_nococo/` from `model_final_proj.pth`): still
#          images written without masks, box projection + colour pairwise;
#   masks  mask-supervised stills (the release's main recipe from COCO Mask2Former weights).
PROTOCOLS = {
    "boxes": dict(
        pretrain_config=REPO_ROOT / "configs" / "synthetic_pretrain_boxes.py",
        weights=REPO_ROOT / "weights" / "synthetic_stage1_boxes.safetensors",
    ),
    "masks": dict(
        pretrain_config=REPO_ROOT / "configs" / "synthetic_pretrain.py",
        weights=REPO_ROOT / "weights" / "synthetic_stage1.safetensors",
    ),
}
DEFAULT_PROTOCOL = "boxes"


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
  if not fingerprint["data"]["stills"].get("recoloured_share"):  # as before the option existed
    fingerprint["data"]["stills"].pop("recoloured_share", None)
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
  with_masks = bool(config.data.with_masks)
  console.report(
      f"Stage 1: generating {stills.num_images} still images, then {config.train.steps} "
      f"{'mask' if with_masks else 'box'}-supervised steps into {workdir}"
  )
  if with_masks != (config.criterion.mode == "mask"):
    raise ValueError(
        f"stage 1: data.with_masks={with_masks} does not fit criterion.mode="
        f"{config.criterion.mode!r} (mask-supervised stills need both, box-only stills neither)"
    )
  config = defaults.config_from_dict(config.to_dict(), source="stage-1 config")  # a copy
  config.data.coco.json = synthetic_images.write_coco_instances(
      str(workdir / "stills"),
      int(stills.num_images),
      tuple(stills.size),
      int(stills.seed),
      max_objects=int(stills.max_objects),
      with_masks=with_masks,  # box-only stills are written without any mask
      recoloured_share=float(stills.recoloured_share),
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
    str(PROTOCOLS[DEFAULT_PROTOCOL]["pretrain_config"]),
    "Stage-1 config (still images); default: the --protocol's. Overrides "
    "(--pretrain_config.train.steps=...) apply to the protocol's config.",
    lock_config=True,
)
_PROTOCOL = flags.DEFINE_enum(
    "protocol",
    DEFAULT_PROTOCOL,
    tuple(PROTOCOLS),
    "Stage-1 protocol. boxes: no mask anywhere (stage 1 from box-only stills, the release's "
    "mfvis_nococo); masks: stage 1 mask-supervised (the release's COCO Mask2Former start). It "
    "picks the stage-1 config (unless --pretrain_config is given) and the committed weights "
    "(unless --config.init_from is given).",
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
_OUTPUT = flags.DEFINE_string(
    "output", None, "--stage1_only: also copy the weights here ('protocol': the protocol's file)."
)
_OVERLAY_VIDEOS = flags.DEFINE_integer("overlay_videos", 3, "Validation videos in the overlay.")


def load_config_file(path: str | pathlib.Path, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file, locked as `config_flags` locks it."""
  spec = importlib.util.spec_from_file_location(f"_config_{pathlib.Path(path).stem}", str(path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config() if arg is None else module.get_config(arg)
  config.lock()
  return config


def protocol_configs(
    protocol: str,
    config: ml_collections.ConfigDict,
    pretrain_config: ml_collections.ConfigDict | None,
    pretrain_overrides: dict[str, Any] | None = None,
    keep_init_from: bool = False,
) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
  """The stage-2 and stage-1 configs of `protocol` ('boxes' or 'masks').

  Args:
    protocol: a key of PROTOCOLS.
    config: the stage-2 config; its `init_from` becomes the protocol's committed weights unless
      `keep_init_from`.
    pretrain_config: an explicit stage-1 config, or None for the protocol's
      (`PROTOCOLS[protocol]['pretrain_config']`, with `pretrain_overrides` applied).
    pretrain_overrides: flat `{'a.b': value}` overrides of the protocol's stage-1 config.
    keep_init_from: keep `config.init_from` (given on the command line).
  """
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {protocol!r}")
  if not keep_init_from:
    config.init_from = str(PROTOCOLS[protocol]["weights"])
  if pretrain_config is None:
    pretrain_config = load_config_file(PROTOCOLS[protocol]["pretrain_config"])
    for key, value in (pretrain_overrides or {}).items():
      *parents, leaf = key.split(".")
      node = pretrain_config
      for name in parents:
        node = node[name]
      node[leaf] = value
  return config, pretrain_config


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


def _flag_configs() -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
  """The stage-2 and stage-1 configs the command line asks for (`--protocol` and overrides)."""
  pretrain_flag = flags.FLAGS["pretrain_config"]
  explicit_pretrain = pretrain_flag.present
  keep_init_from = "init_from" in config_flags.get_override_values(flags.FLAGS["config"])
  return protocol_configs(
      _PROTOCOL.value,
      _CONFIG.value,
      _PRETRAIN_CONFIG.value if explicit_pretrain else None,
      config_flags.get_override_values(pretrain_flag),
      keep_init_from=keep_init_from,
  )


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  console.enable_echo()
  try:
    config, pretrain_config = _flag_configs()
    console.report(
        f"Protocol: {_PROTOCOL.value} (stage 1 {'without' if not pretrain_config.data.with_masks else 'with'} masks)"
    )
    if _STAGE1_ONLY.value:
      output = _OUTPUT.value
      if output == "protocol":
        output = str(PROTOCOLS[_PROTOCOL.value]["weights"])
      _stage1_only(pretrain_config, _WORKDIR.value, output)
      return
    run(config, pretrain_config, _WORKDIR.value, _STAGE1.value, _OVERLAY_VIDEOS.value)
  except Exception as e:  # pylint: disable=broad-except
    line = console.user_error_line(e, (train.NonFiniteLossError, checkpointing.CheckpointError))
    if line is None:
      raise
    print(line, file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
