"""The train step, its state and shardings: one jitted, sharded `(state, batch) -> (state, metrics)`.

The step runs forward, criterion, gradients, global norm, non-finite check and the optimizer
update. When the loss or any gradient is NaN/inf the update is discarded inside the jitted step
(params and optimizer state keep their values via `jnp.where`) and the step is counted as bad;
`train.py` stops after `config.train.max_consecutive_nonfinite` bad steps in a row.
`build_trainer` puts a model, its losses and a mesh together (`experiment.Experiment.trainer`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol
from collections.abc import Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from maskfreevis_jax import optimizer as optimizer_lib
from maskfreevis_jax import sharding as sharding_lib

# loss_fn(outputs, batch, step) -> (total loss scalar, {term name: scalar}).
LossFn = Callable[
    [Mapping[str, jax.Array], Mapping[str, jax.Array], jax.Array],
    tuple[jax.Array, Mapping[str, jax.Array]],
]

# Batch keys that stay on the host ('source': which compiled step a joint run's batch takes).
HOST_ONLY_KEYS = ("file_names", "source")
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


def abstract_batch(
    host_batch: Mapping[str, Any], process_count: int | None = None
) -> dict[str, jax.ShapeDtypeStruct]:
  """Global-batch shapes of one host's batch (leading dim x hosts); host-only keys dropped."""
  process_count = jax.process_count() if process_count is None else process_count
  return {
      k: jax.ShapeDtypeStruct((v.shape[0] * process_count,) + v.shape[1:], v.dtype)
      for k, v in host_batch.items()
      if k not in HOST_ONLY_KEYS
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
    init_state: jitted `rng -> TrainState`, fresh and sharded (`Experiment.initial_state` adds
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


def _optimizer(
    model: nn.Module, train_config: ml_collections.ConfigDict, batch_spec: Mapping[str, Any]
) -> tuple[optax.GradientTransformation, Any]:
  """(optimizer, parameter group labels): groups found from the abstract params and modules."""
  frames_spec, valid_spec = model_inputs(batch_spec)
  abstract_params = jax.eval_shape(
      lambda b: init_variables(model, b, jax.random.key(0))["params"], dict(batch_spec)
  )
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(0)}
  module_types = optimizer_lib.module_types_by_path(
      model, rngs, frames_spec, image_valid=valid_spec, train=False
  )
  labels = optimizer_lib.param_labels(abstract_params, train_config, module_types)
  return optimizer_lib.create_optimizer(train_config, labels), labels


def build_trainer(
    config: ml_collections.ConfigDict,
    batch_spec: Mapping[str, Any],
    *,
    model: nn.Module,
    loss_fns: Mapping[str, LossFn],
    mesh: jax.sharding.Mesh,
) -> Trainer:
  """Optimizer, shardings, state initialiser and step functions of a model and its losses.

  Args:
    config: the full config (`train`, `sharding`).
    batch_spec: global batch shapes, e.g. `abstract_batch(next(iterator))`: frames
      [B, T, H, W, 3] uint8, image_valid [B, H, W], boxes [B, N, T, 4], ...; for a joint run a
      dict of them per source ({'video': ..., 'coco': ...}, as `MixedTrainIterator.batch_specs`),
      which gives one step per source in `Trainer.train_steps`. The first source's shapes
      initialise the parameters (they do not depend on the clip shape).
    model: the Flax module.
    loss_fns: the loss of each source (a single-source run: one entry, any key).
    mesh: the ('data', 'model') device mesh.

  Returns:
    A `Trainer`. Nothing is compiled yet; `trainer.init_state(jax.random.key(seed))` makes the
    state.
  """
  joint = all(isinstance(v, Mapping) for v in batch_spec.values())
  source_specs = dict(batch_spec) if joint else {"": batch_spec}
  for spec in source_specs.values():
    sharding_lib.check_global_batch_size(int(spec["frames"].shape[0]), mesh)
  first_spec = next(iter(source_specs.values()))
  schedule = optimizer_lib.learning_rate_schedule(config.train)
  tx, labels = _optimizer(model, config.train, first_spec)

  # Init needs only shapes: zeros of the batch shapes, built inside jit (nothing on host).
  def init_fn(rng):
    dummy = {k: jnp.zeros(v.shape, v.dtype) for k, v in first_spec.items()}
    return create_train_state(model, tx, dummy, rng)

  abstract_state = jax.eval_shape(init_fn, jax.random.key(0))
  shardings = state_shardings(abstract_state, mesh, int(config.sharding.min_shard_size))
  predict = jax.jit(
      lambda params, model_state, frames, image_valid: model.apply(
          {"params": params, **model_state}, frames, image_valid=image_valid, train=False
      )
  )
  loss_of = lambda source: loss_fns[source] if source in loss_fns else next(iter(loss_fns.values()))
  steps = {
      source: jit_train_step(make_train_step(model, tx, loss_of(source), schedule), shardings, mesh)
      for source in source_specs
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
