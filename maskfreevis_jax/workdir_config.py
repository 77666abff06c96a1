"""A config file for `--config`: the resolved config a run saved with its checkpoints.

  python main.py --mode evaluate --workdir DIR          # main.py passes this file itself
  python main.py --config maskfreevis_jax/workdir_config.py:DIR --workdir DIR --mode predict ...

`get_config(workdir)` reads the config saved with the newest checkpoint of `workdir` over the
schema (`defaults.load_config` semantics), so command-line overrides (`--config.eval.step=200`)
apply to it as to any config file.
"""

from __future__ import annotations

import pathlib

import ml_collections

from maskfreevis_jax import checkpointing
from maskfreevis_jax import defaults

CHECKPOINT_DIR = "checkpoints"


def get_config(workdir: str | None = None) -> ml_collections.ConfigDict:
  """The resolved config saved with the newest checkpoint in `workdir/checkpoints`.

  Raises:
    ValueError: no workdir given, no checkpoint there, or its checkpoints carry no saved config
      (written by an earlier version: pass `--config` explicitly).
  """
  if not workdir:
    raise ValueError("workdir_config.py needs the run directory: --config=workdir_config.py:DIR")
  directory = pathlib.Path(workdir) / CHECKPOINT_DIR
  saved = checkpointing.saved_config(directory)
  if saved is None:
    raise ValueError(
        f"--config is not given and {directory} holds no checkpoint with a saved config (runs "
        "of earlier versions saved none): pass --config=<the config file the run used>"
    )
  return defaults.config_from_dict(saved, source=f"config saved in {directory}")
