"""The command line's mode dispatch (main.py defines the flags and calls `run`).

`run(config, workdir, mode, ...)` builds the experiment of `config` once and runs one mode;
expected user errors (a bad flag or field, a missing or malformed file) become one line on
stderr and exit status 1, anything else keeps its traceback.
"""

from __future__ import annotations

import pathlib
import sys

from absl import app
from absl import logging
import jax

from maskfreevis_jax import checkpointing
from maskfreevis_jax import console
from maskfreevis_jax import evaluate
from maskfreevis_jax import experiment as experiment_lib
from maskfreevis_jax import export
from maskfreevis_jax import predict
from maskfreevis_jax import train
from maskfreevis_jax import workdir_config

# The flags each mode reads beyond --config/--workdir/--mode/--distributed.
MODE_FLAGS = {
    "train": (),
    "train_and_evaluate": (),
    "evaluate": (),
    "predict": ("input", "output"),
    "export": ("output",),
}
_EXPECTED_ERRORS = (
    train.NonFiniteLossError,
    checkpointing.CheckpointError,
    checkpointing.CheckpointMismatchError,
)


def check_mode_flags(mode: str, given: dict[str, object]) -> None:
  """Raises app.UsageError for a flag the mode does not read (e.g. --input with train)."""
  for name, value in given.items():
    if value is not None and name not in MODE_FLAGS[mode]:
      raise app.UsageError(f"--{name} is not used by --mode {mode}")
  if mode == "predict" and not given.get("input"):
    raise app.UsageError("--mode predict needs --input (a folder of frames or a video file)")


def _export(experiment, workdir: pathlib.Path, output: str | None) -> None:
  variables, step = experiment.restore_variables(workdir)
  out_path = pathlib.Path(output or workdir / "export" / f"model_{step:07d}.pth")
  out_path.parent.mkdir(parents=True, exist_ok=True)
  fmt = "safetensors" if out_path.suffix == ".safetensors" else "pth"
  summary = export.export_checkpoint(
      jax.device_get(variables), experiment.config.model, out_path, fmt=fmt, iteration=step
  )
  console.report(f"Exported step {step} to {summary.path} ({fmt}, official PyTorch key layout)")


def run_mode(config, workdir: str, mode: str, input_path=None, output=None) -> None:
  """Runs one mode of the experiment of `config` in `workdir`."""
  workdir_path = pathlib.Path(workdir)
  workdir_path.mkdir(parents=True, exist_ok=True)
  logging.info(
      "mode %s, workdir %s, %d devices on %d hosts",
      mode,
      workdir,
      jax.device_count(),
      jax.process_count(),
  )
  experiment = experiment_lib.build_experiment(config)
  if mode in ("train", "train_and_evaluate"):
    result = train.train(experiment, workdir_path)
    if mode == "train_and_evaluate" and not result.preempted:
      # The newest readable checkpoint: this run's last step unless its final save failed.
      evaluate.evaluate(experiment, workdir_path)
  elif mode == "evaluate":
    evaluate.evaluate(experiment, workdir_path)
  elif mode == "predict":
    variables, _ = experiment.restore_variables(workdir_path)
    out_dir = output or str(workdir_path / "predict")
    predict.predict(config, input_path, out_dir, variables=variables, model=experiment.model)
  elif mode == "export":
    _export(experiment, workdir_path, output)


def run(config, workdir: str, mode: str, input_path=None, output=None) -> int:
  """Runs one mode; returns the exit status. Expected user errors are one line on stderr."""
  try:
    run_mode(config, workdir, mode, input_path, output)
  except Exception as e:  # pylint: disable=broad-except
    line = console.user_error_line(e, _EXPECTED_ERRORS)
    if line is None:
      raise
    print(line, file=sys.stderr, flush=True)
    logging.info("%s: %s", type(e).__name__, e)  # the line above already said it on stderr
    return 1
  return 0


def with_saved_config(argv: list[str]) -> list[str]:
  """argv with `--config=<workdir_config.py>:<workdir>` added when --config is not given."""
  if any(a == "--config" or a.startswith("--config=") for a in argv[1:]):
    return argv
  workdir = None
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith("--workdir="):
      workdir = arg.split("=", 1)[1]
    elif arg == "--workdir" and i + 1 < len(argv):
      workdir = argv[i + 1]
  if not workdir:
    return argv
  return [argv[0], f"--config={workdir_config.__file__}:{workdir}", *argv[1:]]
