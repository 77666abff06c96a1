"""Training loop: restore-or-init, the step loop and its periodic actions.

`train(experiment, workdir)` runs `config.train.steps` steps of the experiment's jitted, sharded
step (`train_step.py`), resuming from the newest readable checkpoint in `workdir/checkpoints`.
Periodic actions, each a named method of `_Loop`: progress (TensorBoard scalars through
`clu.metric_writers` and a console line), predicted-mask images, checkpoints (with the resolved
config), the non-finite guard and the preemption check.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Mapping
from typing import Any

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import jax
import numpy as np

from maskfreevis_jax import checkpointing
from maskfreevis_jax import console
from maskfreevis_jax import experiment as experiment_lib
from maskfreevis_jax import optimizer as optimizer_lib
from maskfreevis_jax import sharding as sharding_lib
from maskfreevis_jax import train_step as train_step_lib
from maskfreevis_jax.evaluation import visualize

TrainState = train_step_lib.TrainState


class NonFiniteLossError(RuntimeError):
  """Raised when too many consecutive steps had a NaN/inf loss or gradient."""


def _host_batch(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in batch.items() if k not in train_step_lib.HOST_ONLY_KEYS}


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


def _first_batch(iterator, global_batch_size: int) -> tuple[Mapping[str, Any], Any]:
  """(first raw batch, global batch spec) — per source for a joint iterator."""
  first_raw = next(iterator)
  local_batch = np.asarray(first_raw["frames"]).shape[0]
  if local_batch * jax.process_count() != global_batch_size:
    raise ValueError(
        f"the data pipeline yields {local_batch} clips per host but "
        f"config.train.batch_size={global_batch_size} over {jax.process_count()} hosts"
    )
  if first_raw.get("source") is not None:
    specs = iterator.batch_specs()
    return first_raw, {s: train_step_lib.abstract_batch(spec) for s, spec in specs.items()}
  return first_raw, train_step_lib.abstract_batch(_host_batch(first_raw))


def _record_class_names(config, iterator) -> None:
  """Fills an empty `config.data.class_names` from the training data's categories, so the config
  saved with the checkpoints labels predictions (`--mode predict` reads no dataset)."""
  names = tuple(getattr(iterator, "class_names", None) or ())
  if names and not config.data.class_names:
    config.data.class_names = names
    logging.info("config.data.class_names from the training data: %s", names)


def _restore_or_init(
    experiment: experiment_lib.Experiment,
    trainer: train_step_lib.Trainer,
    checkpointer: checkpointing.Checkpointer,
    iterator,
) -> tuple[TrainState, int] | None:
  """(state, step) of the newest readable checkpoint (the iterator repositioned), or None."""
  target = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      trainer.abstract_state,
      trainer.state_shardings,
  )
  restored = checkpointer.restore(target)
  if restored is None:
    return None
  state, iterator_state, start_step = restored
  if iterator_state is not None:
    iterator.set_state(iterator_state)
  else:
    logging.warning("checkpoint has no data iterator state: the data stream restarts")
  if jax.process_index() == 0:
    console.report(f"Resuming from step {start_step} (checkpoint in {checkpointer.directory})")
  return state, start_step


def _progress_hooks(config, workdir: pathlib.Path, writer, start_step: int) -> list:
  """clu's progress report and, with `train.profile_steps`, a profiler trace (chief only)."""
  if jax.process_index() != 0:
    return []
  tcfg = config.train
  hooks = [
      periodic_actions.ReportProgress(
          num_train_steps=int(tcfg.steps), writer=writer, every_steps=int(tcfg.log_every)
      )
  ]
  if int(tcfg.profile_steps) > 0:
    hooks.append(
        periodic_actions.Profile(
            logdir=str(workdir),
            num_profile_steps=int(tcfg.profile_steps),
            first_profile=start_step + 10,
            every_secs=None,
            every_steps=None,
        )
    )
  return hooks


class _Loop:
  """The step loop's state and its periodic actions."""

  def __init__(self, experiment, trainer, checkpointer, iterator, writer, workdir, start_step):
    self.config, self.tcfg = experiment.config, experiment.config.train
    self.trainer, self.checkpointer, self.iterator = trainer, checkpointer, iterator
    self.writer, self.workdir = writer, workdir
    self.is_chief = jax.process_index() == 0
    self.step, self.total_steps = start_step, int(self.tcfg.steps)
    self.pending_metrics: list[dict] = []
    self.pending_sources: list[str | None] = []
    self.last_metrics: dict[str, float] = {}
    self.previous_bad_counter = None
    self.interval_start, self.interval_steps = time.perf_counter(), 0
    self.hooks = _progress_hooks(self.config, workdir, writer, start_step)
    self.preemption = checkpointing.PreemptionFlag()
    self.host_batch: dict[str, np.ndarray] = {}

  def run_step(self, state: TrainState, raw_batch: Mapping[str, Any]) -> tuple[TrainState, Any]:
    """One step of the batch's source; returns (state, the sharded batch)."""
    source = raw_batch.get("source")
    self.host_batch = _host_batch(raw_batch)
    batch = sharding_lib.shard_batch(self.host_batch, self.trainer.mesh)
    step_fn = self.trainer.train_steps[source] if source is not None else self.trainer.train_step
    state, metrics = step_fn(state, batch)
    self.step += 1
    self.interval_steps += 1
    self.pending_metrics.append(metrics)
    self.pending_sources.append(source)
    for hook in self.hooks:
      hook(self.step)
    self.check_nonfinite(metrics)
    return state, batch

  def check_nonfinite(self, metrics: Mapping[str, Any]) -> None:
    """Stops after too many bad steps in a row; reads the previous step's counter (no stall)."""
    if self.previous_bad_counter is not None:
      bad_in_a_row = int(self.previous_bad_counter)
      if bad_in_a_row >= int(self.tcfg.max_consecutive_nonfinite):
        _raise_nonfinite(bad_in_a_row, self.step - 1, self.workdir)
    self.previous_bad_counter = metrics["nonfinite_consecutive"]

  def log_progress(self, state: TrainState) -> None:
    """Every `log_every` steps and at the end: mean metrics to TensorBoard and the console."""
    if self.step % int(self.tcfg.log_every) and self.step != self.total_steps:
      return
    self.last_metrics = _mean_metrics(jax.device_get(self.pending_metrics), self.pending_sources)
    self.pending_metrics, self.pending_sources = [], []
    elapsed = time.perf_counter() - self.interval_start
    clips_per_sec = self.interval_steps * int(self.tcfg.batch_size) / max(elapsed, 1e-9)
    step_time = elapsed / max(self.interval_steps, 1)
    scalars = {
        **self.last_metrics,
        "clips_per_sec": clips_per_sec,
        "step_time_s": step_time,
        "nonfinite_total": float(state.nonfinite_total),
    }
    self.writer.write_scalars(self.step, scalars)
    if self.is_chief:
      eta = (self.total_steps - self.step) * step_time
      console.report(
          progress_line(self.step, self.total_steps, self.last_metrics, clips_per_sec, eta)
      )
    self.interval_start, self.interval_steps = time.perf_counter(), 0

  def write_images(self, state: TrainState, batch: Mapping[str, Any]) -> None:
    """Every `image_every` steps: the first clip's predicted masks as a TensorBoard image."""
    image_every = int(self.tcfg.image_every)
    if not image_every or self.step % image_every or not self.is_chief:
      return
    outputs = self.trainer.predict(
        state.params, state.model_state, batch["frames"], batch.get("image_valid")
    )
    clip = jax.device_get(
        {"logits": outputs["pred_logits"][-1, 0], "masks": outputs["pred_masks"][-1, 0]}
    )
    host = self.host_batch
    valid = host["image_valid"][0] if "image_valid" in host else None
    image = visualize.mask_overlay_image(host["frames"][0], clip["logits"], clip["masks"], valid)
    self.writer.write_images(self.step, {"predicted_masks": image[None]})

  def save_checkpoint(self, state: TrainState) -> bool:
    """Periodic checkpoint; on a preemption signal a forced one. Returns whether to stop."""
    if self.step % self.checkpointer.save_every == 0:
      self.checkpointer.save(self.step, state, self.iterator.get_state())
    if not (self.preemption.is_set() or self.checkpointer.reached_preemption(self.step)):
      return False
    self.checkpointer.save(self.step, state, self.iterator.get_state(), force=True)
    logging.warning("preempted: checkpoint of step %d saved; rerun to resume", self.step)
    console.report(
        f"Stopped by a preemption signal at step {self.step}; checkpoint saved to "
        f"{self.checkpointer.directory}. Rerun the same command to resume."
    )
    return True

  def finish(self, state: TrainState, preempted: bool) -> None:
    bad_in_a_row = int(state.nonfinite_consecutive)
    if bad_in_a_row >= int(self.tcfg.max_consecutive_nonfinite):
      _raise_nonfinite(bad_in_a_row, self.step, self.workdir)
    if not preempted:
      self.checkpointer.save(self.step, state, self.iterator.get_state(), force=True)

  def close(self) -> None:
    self.checkpointer.close()
    self.writer.flush()
    self.preemption.restore_handlers()


def _run_loop(loop: _Loop, state: TrainState, pending_batch) -> tuple[TrainState, bool]:
  """Steps until `config.train.steps` or a preemption; returns (state, preempted)."""
  while loop.step < loop.total_steps:
    raw_batch = pending_batch if pending_batch is not None else next(loop.iterator)
    pending_batch = None
    state, batch = loop.run_step(state, raw_batch)
    loop.log_progress(state)
    loop.write_images(state, batch)
    if loop.save_checkpoint(state):
      return state, True
  loop.finish(state, preempted=False)
  return state, False


def train(experiment: experiment_lib.Experiment, workdir: str | pathlib.Path) -> TrainResult:
  """Trains for `config.train.steps` steps, resuming from the latest checkpoint in `workdir`.

  Args:
    experiment: `experiment.build_experiment(config)` (model, data, losses, mesh).
    workdir: checkpoints go to `workdir/checkpoints`, TensorBoard events to `workdir`.

  Returns:
    TrainResult with the final state (on device), last step, last logged metrics, and whether the
    run stopped early on a preemption signal.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  config = experiment.config
  experiment_lib.init_from_path(config)  # A missing required init_from fails before any data.
  iterator = experiment.train_iterator()
  # The first batch gives the shapes; it is the first step's batch unless a checkpoint's
  # iterator position replaces it.
  first_raw, batch_spec = _first_batch(iterator, int(config.train.batch_size))
  _record_class_names(config, iterator)
  trainer = experiment.trainer(batch_spec)
  if jax.process_index() == 0:
    counts = optimizer_lib.label_counts(trainer.param_labels, trainer.abstract_state.params)
    logging.info("parameter groups (scalars): %s", counts)
  checkpointer = experiment.checkpointer(workdir)
  try:
    restored = _restore_or_init(experiment, trainer, checkpointer, iterator)
  except Exception:
    checkpointer.close()
    raise
  if restored is None:
    state, start_step, pending_batch = experiment.initial_state(trainer), 0, first_raw
  else:
    (state, start_step), pending_batch = restored, None
  writer = metric_writers.create_default_writer(str(workdir), just_logging=jax.process_index() != 0)
  if start_step == 0:
    writer.write_hparams(
        {k: v for k, v in config.train.items() if isinstance(v, (int, float, str, bool))}
    )
  loop = _Loop(experiment, trainer, checkpointer, iterator, writer, workdir, start_step)
  try:
    state, preempted = _run_loop(loop, state, pending_batch)
  finally:
    loop.close()
  return TrainResult(state, loop.step, loop.last_metrics, preempted)


def _raise_nonfinite(bad_in_a_row: int, step: int, workdir: pathlib.Path) -> None:
  raise NonFiniteLossError(
      f"training stopped at step {step}: the loss or gradients were NaN/inf for {bad_in_a_row} "
      "consecutive steps (config.train.max_consecutive_nonfinite). Those updates were skipped, so "
      f"the last checkpoint in {workdir / 'checkpoints'} holds finite parameters. Try a lower "
      "config.train.lr, a smaller config.train.clip_grad_norm, or check the data for empty or "
      "degenerate boxes."
  )
