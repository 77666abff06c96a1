"""MaskFreeVIS in JAX: train, evaluate, predict or export from one config file.

  python main.py --config configs/synthetic.py --workdir workdir/synthetic
  python main.py --config configs/maskfreevis.py:nococo_r50_maskinit --workdir DIR --mode train \
      --config.train.steps=100 --config.data.train_json=/data/ytvis19/train.json \
      --config.init_from=/weights/model_final_3c8ec9.pkl
  python main.py --config configs/synthetic.py --workdir DIR --mode predict --input FOLDER_OR_VIDEO

Modes: train | evaluate | predict | train_and_evaluate | export (default: config.mode).
A rerun with the same --workdir resumes from its latest checkpoint.
"""

import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

MODES = ("train", "evaluate", "predict", "train_and_evaluate", "export")

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file (configs/<name>.py, or configs/maskfreevis.py:<variant>); "
    "override fields with --config.a.b=value.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, TensorBoard, outputs.")
_MODE = flags.DEFINE_enum("mode", None, MODES, "What to do (default: the config's `mode`).")
_INPUT = flags.DEFINE_string("input", None, "--mode predict: a folder of frames or a video file.")
_OUTPUT = flags.DEFINE_string(
    "output", None, "--mode predict/export: output directory/file (default in workdir)."
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host; also auto-detected)."
)


def run(config, workdir: str, mode: str, input_path=None, output=None) -> int:
  """Runs one mode; returns the process exit status."""
  from maskfreevis_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from maskfreevis_jax import train  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  workdir_path = pathlib.Path(workdir)
  workdir_path.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (workdir_path / "config.json").write_text(config.to_json_best_effort(indent=1))
  logging.info(
      "mode %s, workdir %s, %d devices on %d hosts",
      mode,
      workdir,
      jax.device_count(),
      jax.process_count(),
  )
  try:
    if mode in ("train", "train_and_evaluate"):
      result = train.train(config, workdir)
      if result.preempted:
        return 0
      if mode == "train_and_evaluate":
        from maskfreevis_jax import evaluate  # pylint: disable=g-import-not-at-top
        # Outputs are named by the checkpoint evaluated: the newest readable one, which is this
        # run's last step unless its final save failed.
        evaluate.evaluate(config, workdir)
    elif mode == "evaluate":
      from maskfreevis_jax import evaluate  # pylint: disable=g-import-not-at-top

      evaluate.evaluate(config, workdir)
    elif mode == "predict":
      if not input_path:
        raise ValueError("--mode predict needs --input (a folder of frames or a video file)")
      from maskfreevis_jax import evaluate  # pylint: disable=g-import-not-at-top
      from maskfreevis_jax import predict  # pylint: disable=g-import-not-at-top

      variables, _ = evaluate.restore_variables(workdir, config.eval.get("step"))
      predict.predict(config, workdir, input_path, output, variables=variables)
    elif mode == "export":
      from maskfreevis_jax import evaluate  # pylint: disable=g-import-not-at-top
      from maskfreevis_jax import export  # pylint: disable=g-import-not-at-top

      variables, step = evaluate.restore_variables(workdir, config.eval.get("step"))
      out_path = pathlib.Path(output or workdir_path / "export" / f"model_{step:07d}.pth")
      out_path.parent.mkdir(parents=True, exist_ok=True)
      fmt = "safetensors" if out_path.suffix == ".safetensors" else "pth"
      summary = export.export_checkpoint(
          jax.device_get(variables), config.model, out_path, fmt=fmt, iteration=step
      )
      print(
          f"Exported step {step} to {summary.path} ({fmt}, official PyTorch key layout)", flush=True
      )
  except (
      train.NonFiniteLossError,
      checkpointing.CheckpointMismatchError,
      checkpointing.CheckpointError,
      FileNotFoundError,
      ValueError,
      NotImplementedError,
  ) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    logging.error("%s: %s", type(e).__name__, e)
    return 1
  return 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    # Library INFO logs (Orbax in particular) drown the progress lines; -v 0 brings them back.
    logging.set_verbosity(logging.WARNING)
  from maskfreevis_jax import sharding  # pylint: disable=g-import-not-at-top

  try:
    sharding.maybe_initialize_distributed(_DISTRIBUTED.value)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  config = _CONFIG.value
  mode = _MODE.value or config.get("mode", "train_and_evaluate")
  if mode not in MODES:
    raise app.UsageError(f"config.mode={mode!r} is not one of {', '.join(MODES)}")
  sys.exit(run(config, _WORKDIR.value, mode, _INPUT.value, _OUTPUT.value))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
