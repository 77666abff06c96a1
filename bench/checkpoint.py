"""Checkpoint save and restore time with and without array checksums, at the official R50 size.

  .venv/bin/python bench/checkpoint.py [--preset r50] [--repeats 5] [--dir /tmp/ckpt_bench]

The train state is the real one of the release's R50 recipe (`Experiment.trainer`: parameters and
both Adam moments, ~132M float32 values), filled with random numbers. Each repeat saves it
asynchronously (timing what the train loop waits for), then synchronously (the blocking time plus
the whole write) and restores it into its shardings, in three formats, in rotating order:
  * checksums: the default (`Checkpointer(checksums=True)`): zarr3 chunks compressed by zstd
    (level 1), each zstd frame with its content checksum (XXH64), verified at every read;
  * zarr3: the same chunks without the checksum (the checksum's own cost);
  * zarr2: `checksums=False`, the format written before checksums (Orbax's default).
It prints the medians and the median over repeats of the paired ratios checksums / zarr3 and
checksums / zarr2, with a bootstrap 90% interval over the repeats (on a shared machine the spread
of single times is larger than the checksum itself: compare formats within a repeat), for the
wall time and for the process's CPU time (all threads) of each save and restore: the CPU time is
the work the checksum adds, and other jobs on the machine move it far less than the wall time.
`--codec_only` times TensorStore alone on the same number of values, in memory (no files, no
Orbax): zstd without a checksum, with its frame checksum, and with TensorStore's CRC32C codec
instead (the alternative considered).
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import shutil
import statistics
import time

from absl import logging
import jax
import numpy as np
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
import tensorstore as ts

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


@contextlib.contextmanager
def _without_chunk_checksums():
  """Writes the default's zarr3 chunks without their checksum (the bench's "zarr3" format)."""
  checkpointing._install_chunk_checksums()  # pylint: disable=protected-access
  wrapped = ts_utils.build_array_write_spec

  def plain(*args, **kwargs):
    spec = wrapped(*args, **kwargs)
    for codec in spec.json["metadata"]["codecs"][0]["configuration"]["codecs"]:
      if codec["name"] == "zstd":
        codec["configuration"]["checksum"] = False
    return spec

  plain.adds_chunk_checksums = True  # so Checkpointer does not wrap it again
  ts_utils.build_array_write_spec = plain
  try:
    yield
  finally:
    ts_utils.build_array_write_spec = wrapped


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


def _time_format(directory: pathlib.Path, state, target, name: str) -> tuple[float, ...]:
  if name == "zarr3":
    with _without_chunk_checksums():
      return _time_once(directory, state, target, checksums=True)
  return _time_once(directory, state, target, checksums=name == "checksums")


FORMATS = ("checksums", "zarr3", "zarr2")
# What `_time_once` returns. CPU time (all threads of the process) is the checksum's own work and
# hardly moves with other jobs on a shared machine; wall time includes waiting for the disk.
MEASURES = (
    "async save, train-loop blocking time",
    "save",
    "restore",
    "save, CPU time",
    "restore, CPU time",
)


def _paired_ratio(times: dict, index: int, base: str, draws: int = 2000) -> str:
  """The median over repeats of checksums / `base` (each repeat times both back to back, so a
  slow spell of the shared machine hits both), with a bootstrap 90% interval over repeats."""
  ratios = np.array([c[index] / b[index] for c, b in zip(times["checksums"], times[base])])
  rng = np.random.default_rng(0)
  resampled = np.median(rng.choice(ratios, (draws, len(ratios))), axis=1)
  low, high = np.percentile(resampled, [5, 95])
  return f"x{np.median(ratios):.3f} [{low:.3f}, {high:.3f}]"


CODEC_ARMS = ("zstd", "zstd + frame checksum", "zstd + CRC32C codec")


def _codec_spec(values: int, arm: str) -> dict:
  """An in-memory zarr3 array of `values` float32, chunked and compressed as Orbax's state."""
  rows = 64
  zstd = {"name": "zstd", "configuration": {"level": 1, "checksum": arm == CODEC_ARMS[1]}}
  codecs = [{"name": "bytes", "configuration": {"endian": "little"}}, zstd]
  codecs += [{"name": "crc32c"}] if arm == CODEC_ARMS[2] else []
  shape = [rows, values // rows]
  return {
      "driver": "zarr3",
      "kvstore": {"driver": "memory"},
      "create": True,
      "metadata": {
          "shape": shape,
          "data_type": "float32",
          "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": shape}},
          "codecs": [
              {
                  "name": "sharding_indexed",
                  "configuration": {"chunk_shape": [1, shape[1]], "codecs": codecs},
              }
          ],
      },
  }


def _codec_cost(values: int, repeats: int) -> None:
  """TensorStore alone, no files, no Orbax: encode + write and read + decode the state's number
  of values, per chunk checksum kind (the checksum's own cost, without the file system's noise)."""
  data = np.random.default_rng(0).standard_normal(values // 64 * 64, np.float32).reshape(64, -1)
  times = {arm: [] for arm in CODEC_ARMS}
  for repeat in range(repeats + 1):
    shift = repeat % len(CODEC_ARMS)
    for arm in CODEC_ARMS[shift:] + CODEC_ARMS[:shift]:
      array = ts.open(_codec_spec(data.size, arm)).result()
      start = time.perf_counter()
      array.write(data).result()
      written = time.perf_counter()
      array.read().result()
      if repeat:  # the first round warms up
        times[arm].append((written - start, time.perf_counter() - written))
  for i, what in enumerate(("encode + write", "read + decode")):
    medians = {arm: statistics.median(t[i] for t in times[arm]) for arm in CODEC_ARMS}
    base = medians[CODEC_ARMS[0]]
    figures = ", ".join(f"{arm} {m:.3f} s (x{m / base:.3f})" for arm, m in medians.items())
    print(f"TensorStore {what} in memory, medians of {repeats}: {figures}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="r50")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dir", default="/tmp/maskfreevis_checkpoint_bench")
  parser.add_argument(
      "--codec_only",
      action="store_true",
      help="time the chunk checksum kinds in TensorStore alone, in memory",
  )
  args = parser.parse_args()
  logging.set_verbosity(logging.ERROR)  # the unverified-restore note of each zarr2 repeat
  directory = pathlib.Path(args.dir)
  state, target = _random_state(args.preset)
  values = sum(x.size for x in jax.tree.leaves(state))
  print(f"preset {args.preset}: {values / 1e6:.1f}M values, {jax.device_count()} devices")
  if args.codec_only:
    del state, target
    _codec_cost(values, args.repeats)
    return
  _time_format(directory, state, target, "checksums")  # warm-up
  times = {name: [] for name in FORMATS}
  for repeat in range(args.repeats):
    shift = repeat % len(FORMATS)
    for name in FORMATS[shift:] + FORMATS[:shift]:
      times[name].append(_time_format(directory, state, target, name))
  for i, what in enumerate(MEASURES):
    medians = {name: statistics.median(t[i] for t in times[name]) for name in FORMATS}
    figures = ", ".join(f"{n} {medians[n]:.2f} s" for n in FORMATS)
    ratios = ", ".join(
        f"checksums/{base} {_paired_ratio(times, i, base)}" for base in ("zarr3", "zarr2")
    )
    print(f"{what}, medians of {args.repeats}: {figures}; paired ratios: {ratios}")
  shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
  main()
