"""One process of a multi-process checkpoint test (tests/test_checkpoint_processes.py runs several).

  python tests/checkpoint_process.py save DIR [--steps 2,4,6] [--enospc_process P --enospc_step S]
      [--max_failures N]
  python tests/checkpoint_process.py restore DIR

Each process holds a state whose large array is sharded over every device of every process (so
each process writes and reads its own part) and a small replicated one. `save` writes the steps
with `Checkpointer` as training does; with --enospc_process, that process's writes of step S fail
with ENOSPC (in Orbax's background commit, as on a full local disk). `restore` resumes from the
newest readable checkpoint. The last stdout line is a JSON summary of what this process saw.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from maskfreevis_jax import sharding  # pylint: disable=g-import-not-at-top

sharding.maybe_initialize_distributed()

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
from orbax.checkpoint._src.path import async_path  # pylint: disable=g-import-not-at-top

from maskfreevis_jax import checkpointing  # pylint: disable=g-import-not-at-top

ROWS = 256


def _state() -> dict:
  mesh = sharding.create_mesh(1)
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  big = np.arange(ROWS * 256, dtype=np.float32).reshape(ROWS, 256)
  return {
      "params": {
          "kernel": jax.make_array_from_callback(big.shape, split, lambda index: big[index]),
          "bias": jax.make_array_from_callback((4,), replicated, lambda index: np.ones(4)[index]),
      }
  }


def _fail_writes_of(step: int) -> None:
  """This process's Orbax metadata writes into step `step`'s directory raise ENOSPC."""
  real = async_path.write_text

  async def failing(path, *args, **kwargs):
    if f"{os.sep}{step}.orbax-checkpoint-tmp" in str(path):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return await real(path, *args, **kwargs)

  async_path.write_text = failing


def _save(args, summary: dict) -> None:
  if args.enospc_process == jax.process_index():
    _fail_writes_of(args.enospc_step)
  checkpointer = checkpointing.Checkpointer(
      args.directory, keep=5, max_consecutive_failed_saves=args.max_failures
  )
  state = _state()
  try:
    for step in map(int, args.steps.split(",")):
      checkpointer.save(step, state, {"index": step})
    checkpointer.wait_until_finished()
  except checkpointing.CheckpointSaveError as e:
    summary["stopped"] = str(e)
  finally:
    checkpointer.close()
  summary["committed"] = checkpointer.all_steps()
  summary["failed_in_a_row"] = checkpointer.failed_saves_in_a_row


def _restore(args, summary: dict) -> None:
  state = _state()
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
  )
  checkpointer = checkpointing.Checkpointer(args.directory)
  try:
    restored, iterator_state, step = checkpointer.restore(target)
  finally:
    checkpointer.close()
  same = jax.tree.map(
      lambda a, b: all(
          np.array_equal(x.data, y.data) for x, y in zip(a.addressable_shards, b.addressable_shards)
      ),
      restored,
      state,
  )
  summary.update(
      step=step,
      iterator_state=iterator_state,
      restored_equal=all(jax.tree.leaves(same)),
      committed=checkpointer.all_steps(),
      quarantined=[p.name for p in checkpointer.quarantined()],
  )


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("mode", choices=("save", "restore"))
  parser.add_argument("directory")
  parser.add_argument("--steps", default="2,4,6")
  parser.add_argument("--enospc_process", type=int, default=-1)
  parser.add_argument("--enospc_step", type=int, default=-1)
  parser.add_argument("--max_failures", type=int, default=3)
  args = parser.parse_args()
  summary = {"process": jax.process_index()}
  (_save if args.mode == "save" else _restore)(args, summary)
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  main()
