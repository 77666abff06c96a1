"""MaskFreeVIS in JAX: train, evaluate, predict or export from one config file.

  python main.py --config configs/synthetic.py --workdir workdir/synthetic
  python main.py --config configs/maskfreevis.py:nococo_r50_maskinit --workdir DIR --mode train \
      --config.train.steps=100 --config.data.train_json=/data/ytvis19/train.json \
      --config.init_from=/weights/model_final_3c8ec9.pkl
  python main.py --mode evaluate --workdir DIR                 # the config saved with the run
  python main.py --mode predict --workdir DIR --input FOLDER_OR_VIDEO
  python main.py --mode export --workdir DIR --output model.pth

Modes: train | evaluate | predict | train_and_evaluate | export (default: config.mode).
A rerun with the same --workdir resumes from its latest checkpoint. Without --config, the
resolved config saved with the workdir's newest checkpoint is used; --config.a.b=value overrides
apply either way.
"""

import os
import sys

# tf.data here only runs numpy functions, so TensorFlow's oneDNN math is never used; turning it off
# (before TensorFlow loads) also drops the banner it prints at import.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from maskfreevis_jax import cli
from maskfreevis_jax import console
from maskfreevis_jax import defaults
from maskfreevis_jax import sharding

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file (configs/<name>.py, or configs/maskfreevis.py:<variant>); default: the config "
    "saved with --workdir's newest checkpoint. Override fields with --config.a.b=value.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, TensorBoard, outputs.")
_MODE = flags.DEFINE_enum("mode", None, defaults.MODES, "What to do (default: the config's mode).")
_INPUT = flags.DEFINE_string("input", None, "--mode predict: a folder of frames or a video file.")
_OUTPUT = flags.DEFINE_string(
    "output", None, "--mode predict/export: output directory/file (default in workdir)."
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host; also auto-detected)."
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    # Library INFO logs (Orbax in particular) drown the progress lines; -v 0 brings them back.
    logging.set_verbosity(logging.WARNING)
  console.enable_echo()
  try:
    sharding.maybe_initialize_distributed(_DISTRIBUTED.value)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  config = _CONFIG.value
  mode = _MODE.value or config.mode
  if mode not in defaults.MODES:
    raise app.UsageError(f"config.mode={mode!r} is not one of {', '.join(defaults.MODES)}")
  cli.check_mode_flags(mode, {"input": _INPUT.value, "output": _OUTPUT.value})
  sys.exit(cli.run(config, _WORKDIR.value, mode, _INPUT.value, _OUTPUT.value))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, argv=cli.with_saved_config(sys.argv))
