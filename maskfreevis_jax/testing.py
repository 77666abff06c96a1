"""Small stand-ins for training tests: a model, a loss and a checkpointable data stream.

They follow the shared interfaces of the real pieces, but compile and run in a second on a CPU:
the model maps frames [B, T, H, W, 3] to pred_logits [L, B, Q, C + 1] and pred_masks
[L, B, Q, T, H/4, W/4]; the iterator yields batches with frames / image_valid / boxes / box_valid /
labels / instance_valid and has get_state/set_state (its state is the number of batches drawn).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterable

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from maskfreevis_jax import defaults
from maskfreevis_jax import experiment as experiment_lib

NUM_CLASSES, NUM_QUERIES, NUM_INSTANCES = 3, 4, 2
T, H, W = 2, 32, 32


class StandInModel(nn.Module):
  """A few convolutions and learnable queries; 2 prediction layers."""

  width: int = 8

  @nn.compact
  def __call__(self, frames, image_valid=None, train=False):
    b, t, h, w, _ = frames.shape
    x = (frames.astype(jnp.float32) - 128.0) / 64.0
    x = x.reshape(b * t, h, w, 3)
    x = nn.Conv(self.width, (3, 3), strides=(4, 4), name="backbone_conv")(x)
    x = nn.GroupNorm(num_groups=2, name="backbone_norm")(x)
    features = nn.relu(x).reshape(b, t, h // 4, w // 4, self.width)
    features = nn.Dense(self.width, name="mask_features")(features)
    queries = self.param("query_feat", nn.initializers.normal(1.0), (NUM_QUERIES, self.width))
    logits, masks = [], []
    for layer in range(2):
      queries = queries + nn.Dense(self.width, name=f"layer_{layer}")(nn.LayerNorm()(queries))
      logits.append(
          jnp.broadcast_to(
              nn.Dense(NUM_CLASSES + 1, name=f"class_{layer}")(queries),
              (b, NUM_QUERIES, NUM_CLASSES + 1),
          )
      )
      masks.append(jnp.einsum("qc,bthwc->bqthw", queries, features))
    return {"pred_logits": jnp.stack(logits), "pred_masks": jnp.stack(masks)}


def _box_masks(boxes, h, w, stride=4):
  ys = (jnp.arange(h) + 0.5) * stride
  xs = (jnp.arange(w) + 0.5) * stride
  inside_y = (ys >= boxes[..., 1:2]) & (ys < boxes[..., 3:4])
  inside_x = (xs >= boxes[..., 0:1]) & (xs < boxes[..., 2:3])
  return (inside_y[..., :, None] & inside_x[..., None, :]).astype(jnp.float32)


def stand_in_loss(outputs, batch, step):
  """Query n <-> instance n; class CE + box-mask BCE on every layer. NaN where batch['poison']."""
  del step
  logits = outputs["pred_logits"][:, :, :NUM_INSTANCES]  # [L, B, N, C+1]
  masks = outputs["pred_masks"][:, :, :NUM_INSTANCES]  # [L, B, N, T, h, w]
  valid = batch["instance_valid"].astype(jnp.float32)  # [B, N]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"][None])
  loss_ce = jnp.sum(ce * valid) / jnp.maximum(valid.sum(), 1.0) / logits.shape[0]
  targets = _box_masks(batch["boxes"], masks.shape[-2], masks.shape[-1])  # [B, N, T, h, w]
  targets = targets * batch["box_valid"][..., None, None]
  bce = optax.sigmoid_binary_cross_entropy(masks, targets[None]).mean(axis=(-1, -2, -3))
  loss_mask = jnp.sum(bce * valid) / jnp.maximum(valid.sum(), 1.0) / logits.shape[0]
  total = 2.0 * loss_ce + 5.0 * loss_mask
  if "poison" in batch:
    total = jnp.where(jnp.any(batch["poison"]), jnp.nan, total)
  return total, {"loss_ce": loss_ce, "loss_mask": loss_mask}


class StandInIterator:
  """Deterministic random boxes-on-frames stream; the state is the number of batches produced.

  `served` lists the position of every batch handed out, so a test can see where a resumed run
  read its data from.
  """

  def __init__(
      self, batch_size: int, seed: int = 0, poison_steps: Iterable[int] = (), delay_s: float = 0.0
  ):
    self.batch_size, self.seed, self.index = batch_size, seed, 0
    self.poison_steps, self.delay_s = set(poison_steps), delay_s
    self.served: list[int] = []

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.delay_s:
      time.sleep(self.delay_s)
    rng = np.random.default_rng([self.seed, self.index])
    b = self.batch_size
    frames = rng.integers(0, 60, size=(b, T, H, W, 3), dtype=np.uint8)
    xy = rng.uniform(0, H / 2, size=(b, NUM_INSTANCES, 1, 2))
    wh = rng.uniform(6, H / 2, size=(b, NUM_INSTANCES, 1, 2))
    boxes = np.concatenate([xy, xy + wh], -1).repeat(T, axis=2).astype(np.float32)
    for i in range(b):
      for n in range(NUM_INSTANCES):
        x1, y1, x2, y2 = boxes[i, n, 0].astype(int)
        frames[i, :, y1:y2, x1:x2] = 200 if n == 0 else 120
    batch = {
        "frames": frames,
        "image_valid": np.ones((b, H, W), bool),
        "boxes": boxes,
        "box_valid": np.ones((b, NUM_INSTANCES, T), bool),
        "labels": rng.integers(0, NUM_CLASSES, size=(b, NUM_INSTANCES)).astype(np.int32),
        "instance_valid": np.ones((b, NUM_INSTANCES), bool),
        "poison": np.full((b,), self.index in self.poison_steps),
    }
    self.served.append(self.index)
    self.index += 1
    return batch

  def get_state(self) -> dict:
    return {"index": self.index}

  def set_state(self, state: dict) -> None:
    self.index = int(state["index"])


def make_config(**train_overrides) -> ml_collections.ConfigDict:
  """A full config (the schema's) with `model` describing the stand-in model."""
  config = defaults.get_config()
  config.model = ml_collections.ConfigDict({"name": "stand_in", "width": 8})
  config.train.update(
      dict(
          steps=6,
          batch_size=8,
          lr=1e-2,
          seed=0,
          checkpoint_every=2,
          keep=3,
          log_every=2,
          image_every=0,
          max_consecutive_nonfinite=3,
          warmup_steps=2,
          lr_decay_steps=(4,),
          backbone_regex=r"(^|/)backbone_",
          clip_grad_norm=1.0,
      )
  )
  config.train.update(train_overrides)
  return config


def delayed_finalize(step: int, seconds: float, announce: str = "") -> Callable[..., object]:
  """A replacement for Orbax's `AtomicRenameTemporaryPath.finalize` that commits `step` late.

  The commit (renaming `<step>.orbax-checkpoint-tmp` into place) of step `step` waits `seconds`
  (first printing `announce` and the directory, when given); by then every file of the save is
  written, so a kill in that window leaves a complete but uncommitted directory. Install it with
  `monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", ...)`.
  """
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top

  real_finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self):
    if self.get_final().name == str(step):
      if announce:
        print(f"{announce} {self.get()}", flush=True)
      await asyncio.sleep(seconds)
    return await real_finalize(self)

  return finalize


def stand_in_experiment(
    config: ml_collections.ConfigDict, train_iterator=None, mesh=None
) -> experiment_lib.Experiment:
  """The experiment of `make_config` around the stand-ins: `StandInModel(config.model.width)`,
  `stand_in_loss` and `train_iterator` (default: `StandInIterator(config.train.batch_size)`)."""
  return experiment_lib.build_experiment(
      config,
      model=StandInModel(width=int(config.model.width)),
      loss_fn=stand_in_loss,
      train_iterator=train_iterator or StandInIterator(int(config.train.batch_size)),
      mesh=mesh,
  )


def run_local_processes(
    command: list[str],
    *,
    num_processes: int = 2,
    devices_per_process: int = 2,
    timeout: float = 300,
    cwd: str | os.PathLike | None = None,
) -> list[tuple[int, str, str]]:
  """Runs `command` as processes 0..num_processes-1 of one jax.distributed job on this machine.

  Each process gets `devices_per_process` CPU devices and the JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES and JAX_PROCESS_ID variables (`sharding.maybe_initialize_distributed`), and
  runs in `cwd` (default: this one).

  Returns:
    (return code, stdout, stderr) per process, in process order.

  Raises:
    subprocess.TimeoutExpired: a process ran past `timeout` seconds (all are killed): a hang.
  """
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    address = f"localhost:{probe.getsockname()[1]}"
  processes = [
      subprocess.Popen(
          command,
          cwd=cwd,
          text=True,
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          env=dict(
              os.environ,
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
              TF_CPP_MIN_LOG_LEVEL="2",
              JAX_COORDINATOR_ADDRESS=address,
              JAX_NUM_PROCESSES=str(num_processes),
              JAX_PROCESS_ID=str(index),
          ),
      )
      for index in range(num_processes)
  ]
  deadline = time.monotonic() + timeout
  results = []
  try:
    for process in processes:
      stdout, stderr = process.communicate(timeout=max(deadline - time.monotonic(), 1))
      results.append((process.returncode, stdout, stderr))
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()  # SIGKILL: jax.distributed handles SIGTERM as a preemption notice
        process.communicate()
  return results
