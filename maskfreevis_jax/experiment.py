"""One experiment, built once from its config: model, data, losses, optimizer, mesh, checkpoints.

Every mode (train, evaluate, predict, export, the two-stage default), every bench and the tests
get their pieces from `build_experiment(config)`, so they all run the same model, the same losses
and the same step:

  from maskfreevis_jax import defaults, experiment, train

  config = defaults.get_config("tiny", num_classes=6)
  exp = experiment.build_experiment(config)
  result = train.train(exp, workdir)                       # restore-or-init, steps, actions
  variables, step = exp.restore_variables(workdir)         # params only, for inference

Tests and benches pass small stand-ins (`model=`, `loss_fn=`, `train_iterator=`, `mesh=`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import ml_collections

from maskfreevis_jax import checkpointing
from maskfreevis_jax import console
from maskfreevis_jax import criterion
from maskfreevis_jax import evaluation
from maskfreevis_jax import export
from maskfreevis_jax import models
from maskfreevis_jax import sharding as sharding_lib
from maskfreevis_jax import train_step as train_step_lib
from maskfreevis_jax.data import eval_dataset as eval_dataset_lib
from maskfreevis_jax.data import iterators
from maskfreevis_jax.data import sources

LossFn = train_step_lib.LossFn
CHECKPOINT_DIR = "checkpoints"


def build_loss_fn(config: ml_collections.ConfigDict, source: str | None = None) -> LossFn:
  """The set criterion of `maskfreevis_jax.criterion` bound to `config.criterion`.

  For the COCO clips of a joint run (`source='coco'`), `config.data.coco.supervision` is the
  criterion mode: the release supervises them with masks ('mask') and the video clips with boxes.
  """
  criterion_config = config.criterion
  if source == sources.COCO_SOURCE and sources.is_joint(config):
    criterion_config = ml_collections.ConfigDict(config.criterion.to_dict())
    criterion_config.mode = config.data.coco.supervision

  def loss_fn(outputs, batch, step):
    return criterion.set_criterion(outputs, batch, step, criterion_config)

  return loss_fn


def init_from_path(config: ml_collections.ConfigDict) -> str | None:
  """`config.init_from` as a path, or None to start from the random initialisation.

  'none' (any case) starts from scratch on purpose. Recipes that start from pretrained weights
  name the file in `config.init_from_required`; leaving `init_from` empty with them is an error.

  Raises:
    ValueError: `init_from` is empty but `init_from_required` names weights.
  """
  value = str(config.init_from or "").strip()
  if value.lower() == "none":
    return None
  required = config.init_from_required
  if not value and required:
    raise ValueError(
        f"config.init_from is not set, but this recipe starts from pretrained weights "
        f"({required}, config.init_from_required): pass --config.init_from=PATH to that file, "
        "or --config.init_from=none to train from scratch"
    )
  return value or None


def load_pretrained(
    init_from: str, params: Any, model_state: Any, model_config: ml_collections.ConfigDict
) -> tuple[Any, Any]:
  """`config.init_from`: initialise from an official / detectron2 / exported checkpoint file.

  Uses `maskfreevis_jax.export.load_pretrained` (.pkl, .pth, .safetensors); tensors whose shapes
  differ (e.g. an 81-class COCO head into a 41-class head) keep their initial values and are
  reported. Returns (params, model_state) on the host.
  """
  path = pathlib.Path(init_from)
  if not path.exists():
    raise FileNotFoundError(f"config.init_from: file {init_from} does not exist")
  variables = {"params": params, **dict(model_state)}
  loaded, report = export.load_pretrained(str(path), jax.device_get(variables), model_config)
  console.report(
      f"Initialised from {init_from}: {len(report.loaded)} tensors loaded, "
      f"{len(report.shape_mismatched)} kept at init (shape differs), {len(report.missing)} "
      f"missing from the file"
  )
  logging.info("init_from %s: %d tensors skipped", init_from, len(report.skipped))
  loaded = dict(loaded)
  return loaded.pop("params"), loaded


def config_fingerprint(config: ml_collections.ConfigDict) -> dict:
  """Flat {'model.x': value} of the settings that decide parameter shapes (for clear errors)."""
  flat = {}

  def walk(prefix, node):
    if isinstance(node, (ml_collections.ConfigDict, dict)):
      for k in node.keys():
        walk(f"{prefix}.{k}" if prefix else k, node[k])
    else:
      try:
        json.dumps(node)
        flat[prefix] = node
      except TypeError:
        flat[prefix] = repr(node)

  walk("model", config.model)
  flat["criterion.num_classes"] = config.criterion.num_classes
  return flat


@dataclasses.dataclass
class Experiment:
  """The pieces of one config; build with `build_experiment`.

  Attributes:
    config: the full, resolved config (saved with every checkpoint).
    model: the Flax module of `config.model`.
    mesh: the ('data', 'model') device mesh.
    loss_fns: the training loss of each data source ({'video': ..., 'coco': ...} for a joint
      run; one entry otherwise).
    train_iterator_override: a data stream to train on instead of `config.data` (tests).
  """

  config: ml_collections.ConfigDict
  model: nn.Module
  mesh: jax.sharding.Mesh
  loss_fns: Mapping[str, LossFn]
  train_iterator_override: train_step_lib.CheckpointableIterator | None = None

  def train_iterator(self) -> train_step_lib.CheckpointableIterator:
    """The training stream of `config.data` (host-local share of the global batch)."""
    if self.train_iterator_override is not None:
      return self.train_iterator_override
    return iterators.create_train_iterator(
        self.config,
        seed=int(self.config.train.seed),
        global_batch_size=int(self.config.train.batch_size),
    )

  def trainer(self, batch_spec: Mapping[str, Any]) -> train_step_lib.Trainer:
    """Optimizer, shardings and jitted steps for global batches shaped like `batch_spec`."""
    return train_step_lib.build_trainer(
        self.config, batch_spec, model=self.model, loss_fns=self.loss_fns, mesh=self.mesh
    )

  def initial_state(self, trainer: train_step_lib.Trainer) -> train_step_lib.TrainState:
    """A fresh state from `config.train.seed`, with `config.init_from` weights when set."""
    state = trainer.init_state(jax.random.key(int(self.config.train.seed)))
    init_from = init_from_path(self.config)
    if init_from:
      params, model_state = load_pretrained(
          init_from, state.params, state.model_state, self.config.model
      )
      state = jax.device_put(
          state.replace(params=params, model_state=model_state, opt_state=trainer.tx.init(params)),
          trainer.state_shardings,
      )
    return state

  def checkpointer(self, workdir: str | pathlib.Path) -> checkpointing.Checkpointer:
    """The training run's checkpointer in `workdir/checkpoints` (saves the resolved config)."""
    tcfg = self.config.train
    return checkpointing.Checkpointer(
        pathlib.Path(workdir) / CHECKPOINT_DIR,
        keep=int(tcfg.keep),
        save_every=int(tcfg.checkpoint_every),
        fingerprint=config_fingerprint(self.config),
        config=self.config.to_dict(),
        async_save=bool(tcfg.async_checkpoint),
        max_consecutive_failed_saves=int(tcfg.max_consecutive_failed_saves),
    )

  def restore_variables(
      self, workdir: str | pathlib.Path, step: int | None = None
  ) -> tuple[dict, int]:
    """Model variables of a training checkpoint, params and model state only, on the host.

    Args:
      workdir: the run directory (checkpoints in `workdir/checkpoints`).
      step: the step (default `config.eval.step`); -1, 0 or None take the newest readable one.

    Returns:
      ({'params': ..., other collections}, step).
    """
    step = int(self.config.eval.step) if step is None else int(step)
    return checkpointing.restore_variables(
        pathlib.Path(workdir) / CHECKPOINT_DIR, None if step <= 0 else step
    )

  def eval_dataset(self) -> eval_dataset_lib.EvalDataset:
    """The evaluation videos of `config.data` (split `config.eval.split`)."""
    return eval_dataset_lib.create_eval_dataset(self.config, split=self.config.eval.split)

  def video_predictor(self) -> evaluation.VideoPredictor:
    """Whole-video or windowed inference as `config.eval` sets it."""
    return evaluation.VideoPredictor.from_config(self.model.apply, self.config.eval)


def build_experiment(
    config: ml_collections.ConfigDict,
    *,
    model: nn.Module | None = None,
    loss_fn: LossFn | Mapping[str, LossFn] | None = None,
    train_iterator: train_step_lib.CheckpointableIterator | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> Experiment:
  """Builds the experiment of `config` (see the module docstring).

  Args:
    config: a full config (`defaults.get_config` and the `configs/` files).
    model, loss_fn, train_iterator, mesh: stand-ins for the config-built pieces; `loss_fn` may
      be one function for every source or a dict per source.
  """
  if model is None:
    model = models.build_model(config.model)
  if mesh is None:
    mesh = sharding_lib.create_mesh(int(config.sharding.model_axis_size))
  names = tuple(sources.source_configs(config)) if train_iterator is None else ("",)
  if isinstance(loss_fn, Mapping):
    loss_fns = dict(loss_fn)
  else:
    loss_fns = {name: loss_fn or build_loss_fn(config, name or None) for name in names}
  return Experiment(config, model, mesh, loss_fns, train_iterator)
