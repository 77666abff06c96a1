"""Checksums of a pytree of arrays, block by block: what a checkpoint stores beside its arrays.

A block is one shard of an array as it was saved, named by its bounds (`"0:64,0:128"`; `""` for a
scalar). Its digest is XXH3-64 of the block's bytes in C order (~25 GB/s on one CPU core, so a
pass over the R50 train state costs ~20 ms; bench/checkpoint.py). Each process digests the blocks
it holds as primary replica (`process_digests`); the checkpoint stores the processes' union
(`merge`). At restore each process digests again every saved block that lies inside a block it
holds (`verify`): restored into the saved shardings, or into coarser ones (one device, replicated),
every byte is checked, without any collective (a process that cannot read its part must not leave
the others waiting). Blocks split finer than they were saved are reported unverified.

Digest table, JSON-ready: {array path: {"dtype": "float32", "blocks": {bounds: hex digest}}}.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
import xxhash

Bounds = tuple[tuple[int, int], ...]


def path_name(path) -> str:
  """'params/x/kernel' for a pytree key path (the checkpoint's array names)."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> Bounds:
  """((start, stop) per dimension) of a shard index (slices with None for whole dimensions)."""
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _bounds_key(bounds: Bounds) -> str:
  return ",".join(f"{a}:{b}" for a, b in bounds)


def _parse_bounds(key: str) -> Bounds:
  return tuple(tuple(int(v) for v in part.split(":")) for part in key.split(",")) if key else ()


def digest(block: np.ndarray) -> str:
  """XXH3-64 (hex) of an array's bytes in C order; any dtype, any shape (0-d and empty too)."""
  data = np.ascontiguousarray(block).reshape(-1).view(np.uint8)
  return xxhash.xxh3_64_hexdigest(data)


def _arrays(tree: Any) -> list[tuple[str, jax.Array | np.ndarray]]:
  """(path, array) of the tree's jax and numpy arrays with plain dtypes (PRNG keys have no bytes)."""
  return [
      (path_name(path), leaf)
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
      if isinstance(leaf, (jax.Array, np.ndarray, np.generic))
      and not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
  ]


def _whole_here(array: jax.Array | np.ndarray) -> bool:
  """Whether this process holds the whole array in every copy (numpy, one device, replicated)."""
  return not isinstance(array, jax.Array) or (
      array.is_fully_addressable and array.is_fully_replicated
  )


def process_digests(tree: Any) -> dict[str, dict]:
  """The digest table of the blocks this process holds as primary replica (replica 0).

  Args:
    tree: a pytree of jax arrays, sharded over any mesh, and numpy arrays (one block each; other
      leaves are left out).

  Returns:
    {path: {"dtype": str, "blocks": {bounds: hex}}}; an array none of whose primary shards is on
    this process has no blocks here.
  """
  table = {}
  for name, array in _arrays(tree):
    table[name] = {"dtype": str(array.dtype), "blocks": dict(_primary_blocks(array))}
  return table


def _primary_blocks(array: jax.Array):
  """(bounds key, digest) of the array's blocks held here as primary replica."""
  if _whole_here(array):
    # One block, the whole array (the common data-parallel case): no per-shard bookkeeping, which
    # costs more than hashing for the many small arrays of a model.
    yield _bounds_key(tuple((0, n) for n in array.shape)), digest(np.asarray(array))
    return
  for shard in array.addressable_shards:
    if shard.replica_id == 0:
      yield _bounds_key(_bounds(shard.index, array.shape)), digest(np.asarray(shard.data))


def merge(tables: list[dict[str, dict]]) -> dict[str, dict]:
  """The union of the processes' digest tables (their blocks are disjoint)."""
  merged: dict[str, dict] = {}
  for table in tables:
    for name, entry in table.items():
      into = merged.setdefault(name, {"dtype": entry["dtype"], "blocks": {}})
      into["blocks"].update(entry["blocks"])
  return merged


@dataclasses.dataclass(frozen=True)
class Verdict:
  """What `verify` found: the first block whose bytes differ, and arrays it could not check."""

  mismatch: tuple[str, str] | None  # (array path, why), or None
  unverified: tuple[str, ...]  # arrays with bytes that no saved block covers


def _inside(inner: Bounds, outer: Bounds) -> bool:
  return all(o0 <= i0 and i1 <= o1 for (i0, i1), (o0, o1) in zip(inner, outer))


def _size(bounds: Bounds) -> int:
  return math.prod(b - a for a, b in bounds)


def _held_blocks(array: jax.Array):
  """(bounds, host copy getter) of each distinct block of the array held by this process."""
  if _whole_here(array):
    yield tuple((0, n) for n in array.shape), lambda: np.asarray(array)
    return
  held = {_bounds(s.index, array.shape): s for s in array.addressable_shards}
  for bounds, shard in held.items():
    yield bounds, lambda shard=shard: np.asarray(shard.data)


def _check_shard(host_of, held: Bounds, saved: dict[Bounds, str]) -> tuple[str | None, int]:
  """(bounds of the first saved block inside `held` that differs, or None; elements checked).

  `host_of()` gives the block's bytes on the host (a device-to-host copy off CPU): called only
  when some saved block lies inside it.
  """
  checked, host = 0, None
  for bounds, expected in saved.items():
    if not _inside(bounds, held):
      continue
    host = host_of() if host is None else host
    local = tuple(slice(a - h0, b - h0) for (a, b), (h0, _) in zip(bounds, held))
    if digest(host[local]) != expected:
      return _bounds_key(bounds), checked
    checked += _size(bounds)
  return None, checked


def verify(tree: Any, table: dict[str, dict]) -> Verdict:
  """Checks the arrays of a restored tree against a saved digest table, on this process alone.

  Args:
    tree: the restored pytree of jax arrays (in any sharding).
    table: the digest table saved with it (`merge` of `process_digests` at save time).

  Returns:
    The first array whose bytes differ from those saved (with the block's bounds), and the arrays
    this process holds bytes of that no saved block covers (not in the table, another dtype, or
    split finer than saved).
  """
  unverified = []
  for name, array in _arrays(tree):
    entry = table.get(name)
    if entry is None or entry["dtype"] != str(array.dtype):
      unverified.append(name)
      continue
    saved = {_parse_bounds(k): v for k, v in entry["blocks"].items()}
    for held, host_of in _held_blocks(array):
      bad, checked = _check_shard(host_of, held, saved)
      if bad is not None:
        why = f"checksum mismatch: block [{bad}] reads back other bytes than were saved"
        return Verdict((name, why), tuple(unverified))
      if checked < _size(held):
        unverified.append(name)
        break
  return Verdict(None, tuple(unverified))
