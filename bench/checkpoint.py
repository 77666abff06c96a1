"""Checkpoint save and restore time with and without array checksums, at the official R50 size.

  .venv/bin/python bench/checkpoint.py [--preset r50] [--repeats 5] [--dir /tmp/ckpt_bench]

The train state is the real one of the release's R50 recipe (`Experiment.trainer`: parameters and
both Adam moments, ~132M float32 values), filled with random numbers. Each repeat saves it
asynchronously (timing what the train loop waits for), then synchronously (the blocking time plus
the whole write) and restores it into its shardings, in two formats, in alternating order:
  * checksums: the default (`Checkpointer(checksums=True)`): Orbax's zarr2 chunks, plus the
    XXH3-64 of every saved block (`array_digests`) in the config item, checked after the restore;
  * plain: `checksums=False`, the format written before checksums.
It prints the medians and the median over repeats of the paired ratio checksums / plain, with a
bootstrap 90% interval over the repeats (on a shared machine the spread of single times is larger
than the checksum itself: compare formats within a repeat), for the wall time and for the
process's CPU time (all threads) of each save and restore. It then times the checksum pass alone
on the same state, in memory (`array_digests.process_digests` and `verify`): the checksum's own
cost without the file system's noise.
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

from maskfreevis_jax import array_digests
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
) -> tuple[float, float, float, float, float]:
  """(train-loop blocking time of an asynchronous save, synchronous save, restore, and the CPU
  time of the process in the save and in the restore) in seconds."""
  shutil.rmtree(directory, ignore_errors=True)
  checkpointer = checkpointing.Checkpointer(directory, async_save=True, checksums=checksums)
  start = time.perf_counter()
  checkpointer.save(1, state, None, force=True)
  blocking = time.perf_counter() - start
  checkpointer.close()
  shutil.rmtree(directory, ignore_errors=True)
  checkpointer = checkpointing.Checkpointer(directory, async_save=False, checksums=checksums)
  start, cpu = time.perf_counter(), time.process_time()
  checkpointer.save(1, state, None, force=True)
  checkpointer.wait_until_finished()
  saved, saved_cpu = time.perf_counter() - start, time.process_time() - cpu
  start, cpu = time.perf_counter(), time.process_time()
  restored, _, _ = checkpointer.restore(target)
  jax.block_until_ready(restored)
  restore, restore_cpu = time.perf_counter() - start, time.process_time() - cpu
  checkpointer.close()
  return blocking, saved, restore, saved_cpu, restore_cpu


FORMATS = ("checksums", "plain")
# What `_time_once` returns. CPU time (all threads of the process) is the checksum's own work and
# hardly moves with other jobs on a shared machine; wall time includes waiting for the disk.
MEASURES = (
    "async save, train-loop blocking time",
    "save",
    "restore",
    "save, CPU time",
    "restore, CPU time",
)


def _paired_ratio(times: dict, index: int, base: str = "plain", draws: int = 2000) -> str:
  """The median over repeats of checksums / `base` (each repeat times both back to back, so a
  slow spell of the shared machine hits both), with a bootstrap 90% interval over repeats."""
  ratios = np.array([c[index] / b[index] for c, b in zip(times["checksums"], times[base])])
  rng = np.random.default_rng(0)
  resampled = np.median(rng.choice(ratios, (draws, len(ratios))), axis=1)
  low, high = np.percentile(resampled, [5, 95])
  return f"x{np.median(ratios):.3f} [{low:.3f}, {high:.3f}]"


def _digest_pass(state, repeats: int) -> None:
  """The checksum pass alone, in memory: digests at save, verification of the same arrays."""
  table = array_digests.merge([array_digests.process_digests(state)])
  times = []
  for _ in range(repeats + 1):  # the first round warms up
    start = time.perf_counter()
    array_digests.process_digests(state)
    digested = time.perf_counter()
    verdict = array_digests.verify(state, table)
    times.append((digested - start, time.perf_counter() - digested))
  assert verdict == array_digests.Verdict(None, ()), verdict
  save, restore = (statistics.median(t[i] for t in times[1:]) for i in (0, 1))
  print(
      f"checksum pass alone, medians of {repeats}: at save {save:.3f} s, at restore {restore:.3f} s"
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="r50")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dir", default="/tmp/maskfreevis_checkpoint_bench")
  args = parser.parse_args()
  logging.set_verbosity(logging.ERROR)  # the unverified-restore note of each plain repeat
  directory = pathlib.Path(args.dir)
  state, target = _random_state(args.preset)
  values = sum(x.size for x in jax.tree.leaves(state))
  print(f"preset {args.preset}: {values / 1e6:.1f}M values, {jax.device_count()} devices")
  _time_once(directory, state, target, checksums=True)  # warm-up
  times = {name: [] for name in FORMATS}
  for repeat in range(args.repeats):
    shift = repeat % len(FORMATS)
    for name in FORMATS[shift:] + FORMATS[:shift]:
      times[name].append(_time_once(directory, state, target, checksums=name == "checksums"))
  for i, what in enumerate(MEASURES):
    medians = {name: statistics.median(t[i] for t in times[name]) for name in FORMATS}
    figures = ", ".join(f"{n} {medians[n]:.2f} s" for n in FORMATS)
    ratio = _paired_ratio(times, i)
    print(f"{what}, medians of {args.repeats}: {figures}; paired ratio checksums/plain {ratio}")
  shutil.rmtree(directory, ignore_errors=True)
  _digest_pass(state, args.repeats)


if __name__ == "__main__":
  main()
