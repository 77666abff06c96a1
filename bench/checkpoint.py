"""Checkpoint save and restore time with and without array checksums, at the official R50 size.

  .venv/bin/python bench/checkpoint.py [--preset r50] [--repeats 5] [--dir /tmp/ckpt_bench]

The train state is the real one of the release's R50 recipe (`Experiment.trainer`: parameters and
both Adam moments, ~132M float32 values), filled with random numbers. Each repeat saves it
asynchronously (timing what the train loop waits for: the checksum reduction is only dispatched
there), then synchronously (the blocking time plus the whole write) and restores it into its
shardings, once with checksums (`tree_checksums` at save, verified at restore) and once without,
in alternating order; it prints the medians and the ratio.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import statistics
import time

from absl import logging
import jax
import numpy as np

from maskfreevis_jax import checkpointing
from maskfreevis_jax import defaults
from maskfreevis_jax import experiment
from maskfreevis_jax import train_step


def _random_state(preset: str):
  """(state, restore target) of the preset's train state, random values, sharded as training."""
  config = defaults.get_config(preset)
  batch = {
      "frames": np.zeros((jax.device_count(), 3, 64, 64, 3), np.uint8),
      "image_valid": np.ones((jax.device_count(), 64, 64), bool),
  }
  trainer = experiment.build_experiment(config).trainer(train_step.abstract_batch(batch))
  rng = np.random.default_rng(0)
  state = jax.tree.map(
      lambda x, s: jax.device_put(rng.standard_normal(x.shape).astype(x.dtype), s),
      trainer.abstract_state,
      trainer.state_shardings,
  )
  target = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      trainer.abstract_state,
      trainer.state_shardings,
  )
  return state, target


def _time_once(
    directory: pathlib.Path, state, target, checksums: bool
) -> tuple[float, float, float]:
  """(train-loop blocking time of an asynchronous save, synchronous save, restore) in seconds."""
  shutil.rmtree(directory, ignore_errors=True)
  checkpointer = checkpointing.Checkpointer(directory, async_save=True, checksums=checksums)
  start = time.perf_counter()
  checkpointer.save(1, state, None, force=True)
  blocking = time.perf_counter() - start
  checkpointer.close()
  shutil.rmtree(directory, ignore_errors=True)
  checkpointer = checkpointing.Checkpointer(directory, async_save=False, checksums=checksums)
  start = time.perf_counter()
  checkpointer.save(1, state, None, force=True)
  checkpointer.wait_until_finished()
  saved = time.perf_counter() - start
  start = time.perf_counter()
  restored, _, _ = checkpointer.restore(target)
  jax.block_until_ready(restored)
  restore = time.perf_counter() - start
  checkpointer.close()
  return blocking, saved, restore


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="r50")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dir", default="/tmp/maskfreevis_checkpoint_bench")
  args = parser.parse_args()
  logging.set_verbosity(logging.ERROR)  # the unverified-restore note of each plain repeat
  state, target = _random_state(args.preset)
  values = sum(x.size for x in jax.tree.leaves(state))
  print(f"preset {args.preset}: {values / 1e6:.1f}M values, {jax.device_count()} devices")
  _time_once(pathlib.Path(args.dir), state, target, True)  # compile the checksums once
  times = {True: [], False: []}
  for repeat in range(args.repeats):
    for checksums in (True, False) if repeat % 2 == 0 else (False, True):
      times[checksums].append(_time_once(pathlib.Path(args.dir), state, target, checksums))
  for i, what in enumerate(("async save, train-loop blocking time", "save", "restore")):
    with_ = statistics.median(t[i] for t in times[True])
    without = statistics.median(t[i] for t in times[False])
    spread = max(t[i] for t in times[False]) - min(t[i] for t in times[False])
    print(
        f"{what}: {with_:.2f} s with checksums, {without:.2f} s without "
        f"(spread {spread:.2f} s over {args.repeats}): x{with_ / without:.3f}"
    )
  start = time.perf_counter()
  checkpointing.tree_checksums(state)
  print(f"tree_checksums alone: {time.perf_counter() - start:.3f} s")
  shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
  main()
