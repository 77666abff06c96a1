"""Training loop: one jitted, sharded train step; Orbax checkpoints; clu metrics and progress.

The step is `train_step(state, batch) -> (state, metrics)`: forward, criterion, gradients, global
norm, non-finite check, optimizer update. When the loss or any gradient is NaN/inf, the update is
discarded inside the jitted step (params and optimizer state keep their values via `jnp.where`),
the step is counted as bad and training stops with an explanation after
`config.train.max_consecutive_nonfinite` bad steps in a row.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any, Protocol
from collections.abc import Callable, Mapping

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from maskfreevis_jax import checkpointing
from maskfreevis_jax import optimizer as optimizer_lib
from maskfreevis_jax import sharding as sharding_lib

# loss_fn(outputs, batch, step) -> (total loss scalar, {term name: scalar}).
LossFn = Callable[
    [Mapping[str, jax.Array], Mapping[str, jax.Array], jax.Array],
    tuple[jax.Array, Mapping[str, jax.Array]],
]

# Batch keys that stay on the host ('source': which compiled step a joint run's batch takes).
_HOST_ONLY_KEYS = ("file_names", "source")
# Variable collections the model may update in train mode (trainable BatchNorm statistics).
_MUTABLE_COLLECTIONS = ("batch_stats",)


class CheckpointableIterator(Protocol):
  """What the trainer needs from a data iterator: batches and a saveable position."""

  def __next__(self) -> dict[str, np.ndarray]:
    ...

  def get_state(self) -> Any:
    ...

  def set_state(self, state: Any) -> None:
    ...


class NonFiniteLossError(RuntimeError):
  """Raised when too many consecutive steps had a NaN/inf loss or gradient."""


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes (the checkpointed pytree)."""

  step: jax.Array  # int32 [], number of steps run (good and skipped).
  params: Any
  opt_state: Any
  model_state: Any  # non-trainable collections (e.g. frozen BN 'batch_stats').
  rng: jax.Array  # uint32 [2] raw key; per-step keys are folded from `step`.
  nonfinite_consecutive: jax.Array  # int32 [], bad steps in a row ending at `step`.
  nonfinite_total: jax.Array  # int32 [], bad steps since the start.


# ---------------------------------------------------------------------------------------------
# State creation
# ---------------------------------------------------------------------------------------------


def model_inputs(batch: Mapping[str, Any]) -> tuple[Any, Any]:
  return batch["frames"], batch.get("image_valid")


def init_variables(model: nn.Module, batch: Mapping[str, Any], rng: jax.Array) -> dict:
  frames, image_valid = model_inputs(batch)
  params_rng, dropout_rng = jax.random.split(rng)
  return model.init(
      {"params": params_rng, "dropout": dropout_rng}, frames, image_valid=image_valid, train=False
  )


def create_train_state(
    model: nn.Module, tx: optax.GradientTransformation, batch: Mapping[str, Any], rng: jax.Array
) -> TrainState:
  """Initialises params (from one batch's shapes) and the optimizer (not jitted: wrap as needed)."""
  init_rng, state_rng = jax.random.split(rng)
  variables = dict(init_variables(model, batch, init_rng))
  params = variables.pop("params")
  return TrainState(
      step=jnp.zeros([], jnp.int32),
      params=params,
      opt_state=tx.init(params),
      model_state=variables,
      rng=jax.random.key_data(state_rng),
      nonfinite_consecutive=jnp.zeros([], jnp.int32),
      nonfinite_total=jnp.zeros([], jnp.int32),
  )


def state_shardings(
    abstract_state: TrainState, mesh: jax.sharding.Mesh, min_shard_size: int
) -> TrainState:
  """Params/optimizer/model state: replicated or 'model'-split; counters and rng: replicated."""
  shardings = sharding_lib.tree_shardings(abstract_state, mesh, min_shard_size)
  return shardings.replace(
      step=sharding_lib.replicated(mesh),
      rng=sharding_lib.replicated(mesh),
      nonfinite_consecutive=sharding_lib.replicated(mesh),
      nonfinite_total=sharding_lib.replicated(mesh),
  )


# ---------------------------------------------------------------------------------------------
# Train step
# ---------------------------------------------------------------------------------------------


def make_train_step(
    model: nn.Module, tx: optax.GradientTransformation, loss_fn: LossFn, schedule: optax.Schedule
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """Returns the (unjitted) train step function."""

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    frames, image_valid = model_inputs(batch)

    # Trainable BatchNorm updates its statistics in train mode; other collections are constants.
    mutable = [k for k in state.model_state if k in _MUTABLE_COLLECTIONS]

    def compute_loss(params):
      outputs, updated = model.apply(
          {"params": params, **state.model_state},
          frames,
          image_valid=image_valid,
          train=True,
          rngs={"dropout": rng},
          mutable=mutable,
      )
      total, terms = loss_fn(outputs, batch, state.step)
      return total, (terms, updated)

    (loss, (terms, updated_state)), grads = jax.value_and_grad(compute_loss, has_aux=True)(
        state.params
    )
    new_model_state = {**state.model_state, **updated_state}
    grad_norm = optax.global_norm(grads)
    is_finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # Zero bad gradients so the (discarded) update stays NaN-free and cheap to reason about.
    safe_grads = jax.tree.map(lambda g: jnp.where(is_finite, g, jnp.zeros_like(g)), grads)
    updates, new_opt_state = tx.update(safe_grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jnp.where(is_finite, new, old)
    consecutive = jnp.where(is_finite, 0, state.nonfinite_consecutive + 1)
    new_state = state.replace(
        step=state.step + 1,
        params=jax.tree.map(keep, new_params, state.params),
        opt_state=jax.tree.map(keep, new_opt_state, state.opt_state),
        model_state=jax.tree.map(keep, new_model_state, state.model_state),
        nonfinite_consecutive=consecutive.astype(jnp.int32),
        nonfinite_total=(state.nonfinite_total + (~is_finite).astype(jnp.int32)),
    )
    metrics = {
        "loss": loss,
        **terms,
        "grad_norm": grad_norm,
        "learning_rate": schedule(state.step),
        "skipped_nonfinite": (~is_finite).astype(jnp.float32),
        "nonfinite_consecutive": consecutive.astype(jnp.float32),
    }
    return new_state, metrics

  return train_step


def jit_train_step(train_step, state_sharding: TrainState, mesh: jax.sharding.Mesh):
  """jit with explicit shardings: state as given, batch split over 'data', metrics replicated."""
  return jax.jit(
      train_step,
      in_shardings=(state_sharding, sharding_lib.batch_sharding(mesh)),
      out_shardings=(state_sharding, sharding_lib.replicated(mesh)),
      donate_argnums=(0,),
  )


# ---------------------------------------------------------------------------------------------
# Real pieces (model, criterion, data) from the config
# ---------------------------------------------------------------------------------------------


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
  from maskfreevis_jax import models  # pylint: disable=g-import-not-at-top

  return models.build_model(config.model)


def build_loss_fn(config: ml_collections.ConfigDict, source: str | None = None) -> LossFn:
  """The set criterion of `maskfreevis_jax.criterion` bound to `config.criterion`.

  For the COCO clips of a joint run (`source='coco'`), `config.data.coco.supervision` is the
  criterion mode: the release supervises them with masks ('mask') and the video clips with boxes.
  """
  from maskfreevis_jax import criterion  # pylint: disable=g-import-not-at-top
  from maskfreevis_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top

  criterion_config = config.criterion
  if source == input_pipeline.COCO_SOURCE and "data" in config and input_pipeline.is_joint(config):
    criterion_config = ml_collections.ConfigDict(config.criterion.to_dict())
    criterion_config.mode = config.data.coco.supervision

  def loss_fn(outputs, batch, step):
    return criterion.set_criterion(outputs, batch, step, criterion_config)

  return loss_fn


def build_train_iterator(config: ml_collections.ConfigDict) -> CheckpointableIterator:
  from maskfreevis_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top

  return input_pipeline.create_train_iterator(
      config, seed=int(config.train.seed), global_batch_size=int(config.train.batch_size)
  )


def abstract_batch(
    host_batch: Mapping[str, Any], process_count: int | None = None
) -> dict[str, jax.ShapeDtypeStruct]:
  """Global-batch shapes of one host's batch (leading dim x hosts); host-only keys dropped."""
  process_count = jax.process_count() if process_count is None else process_count
  return {
      k: jax.ShapeDtypeStruct((v.shape[0] * process_count,) + v.shape[1:], v.dtype)
      for k, v in host_batch.items()
      if k not in _HOST_ONLY_KEYS
  }


@dataclasses.dataclass(frozen=True)
class Trainer:
  """Everything one config trains with, built once by `build_trainer`.

  Train, evaluation, tests and bench all use this, so they all run the real step.

  Attributes:
    model: the Flax module.
    tx: the optimizer (parameter groups, clipping, schedule).
    schedule: learning rate per step.
    mesh: device mesh with ('data', 'model') axes.
    param_labels: optimizer group label per parameter (same tree as params).
    abstract_state: `TrainState` of `jax.ShapeDtypeStruct`s.
    state_shardings: `TrainState` of `NamedSharding`s.
    init_state: jitted `rng -> TrainState`, fresh and sharded (`initial_train_state` adds
      `config.init_from`).
    train_step: jitted `(state, batch) -> (state, metrics)`; the state is donated. A `jax.jit`
      object, so `.lower(abstract_state, abstract_batch).compile()` gives cost/memory analyses.
    predict: jitted `(params, model_state, frames, image_valid) -> outputs` in eval mode.
    train_steps: a joint run's step per source ({'video': ..., 'coco': ...}): each compiled for
      its own batch shapes and loss, all on the same state and optimizer; `train_step` is the
      first. Empty for a single-source run.
  """

  model: nn.Module
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  mesh: jax.sharding.Mesh
  param_labels: Any
  abstract_state: TrainState
  state_shardings: TrainState
  init_state: Callable[[jax.Array], TrainState]
  train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]
  predict: Callable[..., dict]
  train_steps: Mapping[str, Callable[[TrainState, dict], tuple[TrainState, dict]]] = (
      dataclasses.field(default_factory=dict)
  )


def build_trainer(
    config: ml_collections.ConfigDict,
    batch_spec: Mapping[str, Any],
    *,
    model: nn.Module | None = None,
    loss_fn: LossFn | Mapping[str, LossFn] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> Trainer:
  """Model, optimizer, shardings, state initialiser and step functions of a config.

  Args:
    config: the full config (`model`, `criterion`, `train`, `sharding`).
    batch_spec: global batch shapes, e.g. `abstract_batch(next(iterator))`: frames
      [B, T, H, W, 3] uint8, image_valid [B, H, W], boxes [B, N, T, 4], ...; for a joint run a
      dict of them per source ({'video': ..., 'coco': ...}, as `MixedTrainIterator.batch_specs`),
      which gives one step per source in `Trainer.train_steps`. The first source's shapes
      initialise the parameters (they do not depend on the clip shape).
    model, loss_fn: override the config-built ones (tests use small stand-ins); `loss_fn` may be
      a dict per source.
    mesh: default: all devices, `config.sharding.model_axis_size` wide on 'model'.

  Returns:
    A `Trainer`. Nothing is compiled yet; `trainer.init_state(jax.random.key(seed))` makes the
    state.
  """
  tcfg = config.train
  sharding_config = config.get("sharding", {})
  mesh = mesh or sharding_lib.create_mesh(int(sharding_config.get("model_axis_size", 1)))
  joint = all(isinstance(v, Mapping) for v in batch_spec.values())
  source_specs = dict(batch_spec) if joint else {"": batch_spec}
  for spec in source_specs.values():
    sharding_lib.check_global_batch_size(int(spec["frames"].shape[0]), mesh)
  batch_spec = next(iter(source_specs.values()))
  model = model if model is not None else build_model(config)
  loss_fns = {
      source: (loss_fn.get(source) if isinstance(loss_fn, Mapping) else loss_fn)
      or build_loss_fn(config, source or None)
      for source in source_specs
  }
  schedule = optimizer_lib.learning_rate_schedule(tcfg)

  frames_spec, valid_spec = model_inputs(batch_spec)
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(0)}
  abstract_params = jax.eval_shape(
      lambda b: init_variables(model, b, jax.random.key(0))["params"], dict(batch_spec)
  )
  module_types = optimizer_lib.module_types_by_path(
      model, rngs, frames_spec, image_valid=valid_spec, train=False
  )
  labels = optimizer_lib.param_labels(abstract_params, tcfg, module_types)
  tx = optimizer_lib.create_optimizer(tcfg, labels)

  # Init needs only shapes: zeros of the batch shapes, built inside jit (nothing on host).
  def init_fn(rng):
    dummy = {k: jnp.zeros(v.shape, v.dtype) for k, v in batch_spec.items()}
    return create_train_state(model, tx, dummy, rng)

  abstract_state = jax.eval_shape(init_fn, jax.random.key(0))
  shardings = state_shardings(
      abstract_state, mesh, int(sharding_config.get("min_shard_size", 2**18))
  )
  predict = jax.jit(
      lambda params, model_state, frames, image_valid: model.apply(
          {"params": params, **model_state}, frames, image_valid=image_valid, train=False
      )
  )
  steps = {
      source: jit_train_step(make_train_step(model, tx, fn, schedule), shardings, mesh)
      for source, fn in loss_fns.items()
  }
  return Trainer(
      model=model,
      tx=tx,
      schedule=schedule,
      mesh=mesh,
      param_labels=labels,
      abstract_state=abstract_state,
      state_shardings=shardings,
      init_state=jax.jit(init_fn, out_shardings=shardings),
      train_step=next(iter(steps.values())),
      predict=predict,
      train_steps=steps if joint else {},
  )


def initial_train_state(trainer: Trainer, config: ml_collections.ConfigDict) -> TrainState:
  """A fresh state from `config.train.seed`, with `config.init_from` weights when set."""
  state = trainer.init_state(jax.random.key(int(config.train.seed)))
  init_from = init_from_path(config)
  if init_from:
    params, model_state = load_pretrained(
        init_from, state.params, state.model_state, config.get("model")
    )
    state = jax.device_put(
        state.replace(params=params, model_state=model_state, opt_state=trainer.tx.init(params)),
        trainer.state_shardings,
    )
  return state


def init_from_path(config: ml_collections.ConfigDict) -> str | None:
  """`config.init_from` as a path, or None to start from the random initialisation.

  'none' (any case) starts from scratch on purpose. Recipes that start from pretrained weights
  name the file in `config.init_from_required`; leaving `init_from` empty with them is an error.

  Raises:
    ValueError: `init_from` is empty but `init_from_required` names weights.
  """
  value = str(config.get("init_from") or "").strip()
  if value.lower() == "none":
    return None
  required = config.get("init_from_required")
  if not value and required:
    raise ValueError(
        f"config.init_from is not set, but this recipe starts from pretrained weights "
        f"({required}, config.init_from_required): pass --config.init_from=PATH to that file, "
        "or --config.init_from=none to train from scratch"
    )
  return value or None


def load_pretrained(
    init_from: str,
    params: Any,
    model_state: Any,
    model_config: ml_collections.ConfigDict | None = None,
) -> tuple[Any, Any]:
  """`config.init_from`: initialise from an official / detectron2 / exported checkpoint file.

  Uses `maskfreevis_jax.export.load_pretrained` (.pkl, .pth, .safetensors); tensors whose shapes
  differ (e.g. an 81-class COCO head into a 41-class head) keep their initial values and are
  reported in the log. Returns (params, model_state).
  """
  path = pathlib.Path(init_from)
  if not path.exists():
    raise FileNotFoundError(f"config.init_from: file {init_from} does not exist")
  from maskfreevis_jax import export  # pylint: disable=g-import-not-at-top

  variables = {"params": params, **dict(model_state)}
  loaded, report = export.load_pretrained(str(path), jax.device_get(variables), model_config)
  logging.info(
      "init_from %s: %d tensors loaded, %d skipped, %d shape-mismatched, %d missing",
      init_from,
      len(report.loaded),
      len(report.skipped),
      len(report.shape_mismatched),
      len(report.missing),
  )
  print(
      f"Initialised from {init_from}: {len(report.loaded)} tensors loaded, "
      f"{len(report.shape_mismatched)} kept at init (shape differs), {len(report.missing)} "
      "missing from the file",
      flush=True,
  )
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

  walk("model", config.get("model", {}))
  if "criterion" in config and "num_classes" in config.criterion:
    flat["criterion.num_classes"] = config.criterion.num_classes
  return flat


# ---------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------

_PALETTE = np.asarray(
    [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
    ],
    np.float32,
)


def mask_overlay_image(
    frames: np.ndarray,
    pred_logits: np.ndarray,
    pred_masks: np.ndarray,
    image_valid: np.ndarray | None = None,
    top_k: int = 4,
) -> np.ndarray:
  """One clip's frames side by side with the top-k queries' masks tinted over them.

  Args:
    frames: uint8 [T, H, W, 3].
    pred_logits: [Q, C + 1] final-layer class logits (last = no object).
    pred_masks: [Q, T, h, w] final-layer mask logits at stride H / h.
    image_valid: optional bool [H, W].
    top_k: queries drawn (highest non-void class probability).

  Returns:
    uint8 [H, T * W, 3].
  """
  t, h, w, _ = frames.shape
  logits = pred_logits - pred_logits.max(-1, keepdims=True)
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  scores = probs[:, :-1].max(-1)
  order = np.argsort(-scores)[:top_k]
  stride_h, stride_w = h // pred_masks.shape[-2], w // pred_masks.shape[-1]
  image = frames.astype(np.float32)
  for colour_index, q in enumerate(order):
    masks = np.repeat(np.repeat(pred_masks[q] > 0, stride_h, axis=-2), stride_w, axis=-1)
    masks = masks[:, :h, :w]
    if image_valid is not None:
      masks = masks & image_valid[None]
    colour = _PALETTE[colour_index % len(_PALETTE)]
    image = np.where(masks[..., None], 0.45 * image + 0.55 * colour, image)
  return np.concatenate(list(image.clip(0, 255).astype(np.uint8)), axis=1)


# ---------------------------------------------------------------------------------------------
# Loop
# ---------------------------------------------------------------------------------------------


def _host_batch(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in batch.items() if k not in _HOST_ONLY_KEYS}


def _mean_metrics(fetched: list[Mapping[str, Any]], sources: list[str | None]) -> dict[str, float]:
  """Per-key means over the steps that report the key (a joint run's sources report different
  loss terms), plus each source's share of the steps ('steps_<source>')."""
  keys = dict.fromkeys(k for m in fetched for k in m)
  out = {k: float(np.mean([m[k] for m in fetched if k in m])) for k in keys}
  for source in dict.fromkeys(s for s in sources if s is not None):
    out[f"steps_{source}"] = sources.count(source) / len(sources)
  return out


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


_MAIN_TERMS = (
    ("loss_ce", "ce"),
    ("loss_mask_proj", "proj"),
    ("loss_bound", "pair"),
    ("loss_bound_neighbor", "temporal"),
    ("loss_mask", "bce"),
    ("loss_dice", "dice"),
)


def progress_line(
    step: int,
    total_steps: int,
    metrics: Mapping[str, float],
    clips_per_sec: float,
    eta_seconds: float,
) -> str:
  """E.g. 'step 120/3000 | loss 3.412 | ce 0.512 proj 0.201 ... | lr 1.0e-04 | 2.31 clips/s | ETA 0:21:03'."""
  terms = " ".join(f"{short} {metrics[name]:.4f}" for name, short in _MAIN_TERMS if name in metrics)
  parts = [f"step {step}/{total_steps}", f"loss {metrics.get('loss', float('nan')):.4f}"]
  if terms:
    parts.append(terms)
  parts += [
      f"grad_norm {metrics.get('grad_norm', float('nan')):.3g}",
      f"lr {metrics.get('learning_rate', float('nan')):.1e}",
      f"{clips_per_sec:.2f} clips/s",
      f"ETA {_format_duration(eta_seconds)}",
  ]
  if metrics.get("skipped_nonfinite", 0) > 0:
    parts.append(f"skipped {metrics['skipped_nonfinite']:.0%} non-finite")
  return " | ".join(parts)


@dataclasses.dataclass
class TrainResult:
  state: TrainState
  step: int
  last_metrics: dict[str, float]
  preempted: bool


def train(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    model: nn.Module | None = None,
    loss_fn: LossFn | None = None,
    train_iterator: CheckpointableIterator | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> TrainResult:
  """Trains for `config.train.steps` steps, resuming from the latest checkpoint in `workdir`.

  Args:
    config: the full config (model, data, criterion, train, sharding, init_from).
    workdir: checkpoints go to `workdir/checkpoints`, TensorBoard events to `workdir`.
    model, loss_fn, train_iterator: override the config-built pieces (tests use small ones).
    mesh: override the device mesh (default: all devices, ('data', 'model') axes).

  Returns:
    TrainResult with the final state (on device), last step, last logged metrics, and whether the
    run stopped early on a preemption signal.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  tcfg = config.train
  total_steps = int(tcfg.steps)
  init_from_path(config)  # A missing required init_from fails before any data is read.

  iterator = train_iterator if train_iterator is not None else build_train_iterator(config)

  # The first batch gives the shapes for init; it is then used as the first step's batch (only
  # when not resuming: a restored iterator position replaces it). A joint iterator also gives
  # every source's shapes, one compiled step each.
  first_raw = next(iterator)
  first_batch = _host_batch(first_raw)
  local_batch = first_batch["frames"].shape[0]
  if local_batch * jax.process_count() != int(tcfg.batch_size):
    raise ValueError(
        f"the data pipeline yields {local_batch} clips per host but "
        f"config.train.batch_size={tcfg.batch_size} over {jax.process_count()} hosts"
    )
  if first_raw.get("source") is not None:
    batch_spec = {source: abstract_batch(spec) for source, spec in iterator.batch_specs().items()}
  else:
    batch_spec = abstract_batch(first_batch)

  trainer = build_trainer(config, batch_spec, model=model, loss_fn=loss_fn, mesh=mesh)
  shardings, mesh = trainer.state_shardings, trainer.mesh
  if jax.process_index() == 0:
    logging.info(
        "parameter groups (scalars): %s",
        optimizer_lib.label_counts(trainer.param_labels, trainer.abstract_state.params),
    )

  checkpointer = checkpointing.Checkpointer(
      workdir / "checkpoints",
      keep=int(tcfg.keep),
      save_every=int(tcfg.checkpoint_every),
      fingerprint=config_fingerprint(config),
      async_save=bool(tcfg.get("async_checkpoint", True)),
      max_consecutive_failed_saves=int(tcfg.get("max_consecutive_failed_saves", 3)),
  )
  try:
    restored = checkpointer.restore(
        jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            trainer.abstract_state,
            shardings,
        )
    )
  except Exception:
    checkpointer.close()
    raise
  pending_batch = None
  if restored is not None:
    state, iterator_state, start_step = restored
    if iterator_state is not None:
      iterator.set_state(iterator_state)
    else:
      logging.warning("checkpoint has no data iterator state: the data stream restarts")
    if jax.process_index() == 0:
      print(f"Resuming from step {start_step} (checkpoint in {checkpointer.directory})", flush=True)
  else:
    state = initial_train_state(trainer, config)
    start_step = 0
    pending_batch = first_raw

  predict_fn = trainer.predict

  is_chief = jax.process_index() == 0
  writer = metric_writers.create_default_writer(str(workdir), just_logging=not is_chief)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in tcfg.items() if isinstance(v, (int, float, str, bool))})
  hooks = []
  if is_chief:
    hooks.append(
        periodic_actions.ReportProgress(
            num_train_steps=total_steps, writer=writer, every_steps=int(tcfg.log_every)
        )
    )
    if int(tcfg.get("profile_steps", 0)) > 0:
      hooks.append(
          periodic_actions.Profile(
              logdir=str(workdir),
              num_profile_steps=int(tcfg.profile_steps),
              first_profile=start_step + 10,
              every_secs=None,
              every_steps=None,
          )
      )

  preemption = checkpointing.PreemptionFlag()
  max_bad = int(tcfg.max_consecutive_nonfinite)
  log_every, image_every = int(tcfg.log_every), int(tcfg.get("image_every", 0))
  pending_metrics: list[dict] = []
  pending_sources: list[str | None] = []
  last_metrics: dict[str, float] = {}
  previous_bad_counter = None
  preempted = False
  interval_start, interval_steps = time.perf_counter(), 0
  step = start_step
  try:
    while step < total_steps:
      raw_batch = pending_batch if pending_batch is not None else next(iterator)
      pending_batch = None
      source = raw_batch.get("source")
      host_batch = _host_batch(raw_batch)
      batch = sharding_lib.shard_batch(host_batch, mesh)
      step_fn = trainer.train_steps[source] if source is not None else trainer.train_step
      state, metrics = step_fn(state, batch)
      step += 1
      interval_steps += 1
      pending_metrics.append(metrics)
      pending_sources.append(source)
      for hook in hooks:
        hook(step)

      # Non-finite guard: read the previous step's counter so dispatch is not blocked (the state
      # itself is donated to the next step; the metrics are not).
      if previous_bad_counter is not None:
        bad_in_a_row = int(previous_bad_counter)
        if bad_in_a_row >= max_bad:
          _raise_nonfinite(bad_in_a_row, step - 1, workdir)
      previous_bad_counter = metrics["nonfinite_consecutive"]

      if step % log_every == 0 or step == total_steps:
        last_metrics = _mean_metrics(jax.device_get(pending_metrics), pending_sources)
        pending_metrics, pending_sources = [], []
        elapsed = time.perf_counter() - interval_start
        clips_per_sec = interval_steps * int(tcfg.batch_size) / max(elapsed, 1e-9)
        step_time = elapsed / max(interval_steps, 1)
        writer.write_scalars(
            step,
            {
                **last_metrics,
                "clips_per_sec": clips_per_sec,
                "step_time_s": step_time,
                "nonfinite_total": float(state.nonfinite_total),
            },
        )
        if is_chief:
          print(
              progress_line(
                  step, total_steps, last_metrics, clips_per_sec, (total_steps - step) * step_time
              ),
              flush=True,
          )
        interval_start, interval_steps = time.perf_counter(), 0

      if image_every and step % image_every == 0 and is_chief:
        outputs = predict_fn(
            state.params, state.model_state, batch["frames"], batch.get("image_valid")
        )
        clip0 = jax.device_get(
            {"logits": outputs["pred_logits"][-1, 0], "masks": outputs["pred_masks"][-1, 0]}
        )
        valid0 = host_batch["image_valid"][0] if "image_valid" in host_batch else None
        writer.write_images(
            step,
            {
                "predicted_masks": mask_overlay_image(
                    host_batch["frames"][0], clip0["logits"], clip0["masks"], valid0
                )[None]
            },
        )

      if step % checkpointer.save_every == 0:
        checkpointer.save(step, state, iterator.get_state())
      if preemption.is_set() or checkpointer.reached_preemption(step):
        checkpointer.save(step, state, iterator.get_state(), force=True)
        logging.warning(
            "preempted: checkpoint of step %d saved; rerun the same command to resume", step
        )
        print(
            f"Stopped by a preemption signal at step {step}; checkpoint saved to "
            f"{checkpointer.directory}. Rerun the same command to resume.",
            flush=True,
        )
        preempted = True
        break

    bad_in_a_row = int(state.nonfinite_consecutive)
    if bad_in_a_row >= max_bad:
      _raise_nonfinite(bad_in_a_row, step, workdir)
    if not preempted:
      checkpointer.save(step, state, iterator.get_state(), force=True)
  finally:
    checkpointer.close()
    writer.flush()
    preemption.restore_handlers()
  return TrainResult(state=state, step=step, last_metrics=last_metrics, preempted=preempted)


def _raise_nonfinite(bad_in_a_row: int, step: int, workdir: pathlib.Path) -> None:
  raise NonFiniteLossError(
      f"training stopped at step {step}: the loss or gradients were NaN/inf for {bad_in_a_row} "
      "consecutive steps (config.train.max_consecutive_nonfinite). Those updates were skipped, so "
      f"the last checkpoint in {workdir / 'checkpoints'} holds finite parameters. Try a lower "
      "config.train.lr, a smaller config.train.clip_grad_norm, or check the data for empty or "
      "degenerate boxes."
  )
