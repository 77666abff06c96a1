"""Block checksums of sharded arrays (`array_digests`): saved per shard, checked after a restore in
the same, a coarser or a finer sharding; a changed byte is named with its array and block."""

from __future__ import annotations

import jax
import ml_dtypes
import numpy as np
import pytest
import xxhash

from maskfreevis_jax import array_digests

P = jax.sharding.PartitionSpec


def _mesh(shape: tuple[int, ...]) -> jax.sharding.Mesh:
  devices = np.asarray(jax.devices()[: int(np.prod(shape))]).reshape(shape)
  return jax.sharding.Mesh(devices, ("a", "b")[: len(shape)])


def _put(values: dict[str, np.ndarray], mesh, specs: dict[str, P]) -> dict[str, jax.Array]:
  return {
      k: jax.device_put(v, jax.sharding.NamedSharding(mesh, specs.get(k, P())))
      for k, v in values.items()
  }


def _values() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {
      "kernel": rng.standard_normal((16, 12)).astype(np.float32),
      "half": rng.standard_normal((8, 4)).astype(ml_dtypes.bfloat16),
      "mask": rng.random((8, 3)) > 0.5,
      "count": np.asarray(7, np.int32),
      "empty": np.zeros((0, 4), np.float32),
  }


SAVED_SPECS = {"kernel": P("a", "b"), "half": P("a"), "mask": P("a")}


def _saved_table() -> dict:
  """The merged table of the values as saved over a 4x2 mesh (several blocks per array)."""
  return array_digests.merge(
      [array_digests.process_digests(_put(_values(), _mesh((4, 2)), SAVED_SPECS))]
  )


def test_digest_is_xxh3_64_of_the_c_order_bytes():
  block = np.asfortranarray(np.arange(24, dtype=np.float32).reshape(4, 6))
  assert array_digests.digest(block) == xxhash.xxh3_64_hexdigest(block.tobytes(order="C"))
  assert array_digests.digest(block[:, 1:3]) == xxhash.xxh3_64_hexdigest(block[:, 1:3].tobytes())


def test_saved_blocks_cover_every_array_once():
  table = _saved_table()
  assert set(table) == set(_values())
  # kernel: 4x2 blocks of 4x6; the split arrays: 4 blocks; the replicated ones: one.
  assert sorted(table["kernel"]["blocks"])[:2] == ["0:4,0:6", "0:4,6:12"]
  counts = {name: len(entry["blocks"]) for name, entry in table.items()}
  assert counts == {"kernel": 8, "half": 4, "mask": 4, "count": 1, "empty": 1}
  assert table["half"]["dtype"] == "bfloat16" and table["count"]["blocks"] == {
      "": xxhash.xxh3_64_hexdigest(np.asarray(7, np.int32).tobytes())
  }


RESTORE_LAYOUTS = {
    "same-sharding": ((4, 2), SAVED_SPECS),
    "one-device": ((1,), {}),
    "replicated-on-8": ((4, 2), {}),
    "coarser": ((2, 4), {"kernel": P("a"), "half": P("a"), "mask": P("a")}),
}


@pytest.mark.parametrize("mesh_shape, specs", RESTORE_LAYOUTS.values(), ids=RESTORE_LAYOUTS)
def test_restored_arrays_check_out_in_the_same_or_a_coarser_sharding(mesh_shape, specs):
  verdict = array_digests.verify(_put(_values(), _mesh(mesh_shape), specs), _saved_table())
  assert verdict == array_digests.Verdict(None, ())


def test_finer_shards_than_saved_are_reported_unverified():
  # Saved whole (one device); restored split in 8: no saved block lies inside a restored one.
  table = array_digests.process_digests(_put(_values(), _mesh((1,)), {}))
  verdict = array_digests.verify(_put(_values(), _mesh((8,)), {"mask": P("a")}), table)
  assert verdict == array_digests.Verdict(None, ("mask",))


CHANGES = {
    "one-float-bit": ("kernel", (13, 7), lambda v: np.float32(np.nextafter(v, np.inf))),
    "bfloat16": ("half", (0, 0), lambda v: -v),
    "bool": ("mask", (7, 2), lambda v: not v),
    "scalar": ("count", (), lambda v: v + 1),
}
BLOCK_OF_CHANGE = {
    "one-float-bit": "12:16,6:12",
    "bfloat16": "0:2,0:4",
    "bool": "6:8,0:3",
    "scalar": "",
}


@pytest.mark.parametrize("case", list(CHANGES), ids=list(CHANGES))
@pytest.mark.parametrize(
    "mesh_shape, specs",
    [RESTORE_LAYOUTS["same-sharding"], RESTORE_LAYOUTS["one-device"]],
    ids=["same-sharding", "one-device"],
)
def test_a_changed_value_is_named_with_its_array_and_block(case, mesh_shape, specs):
  name, where, change = CHANGES[case]
  values = _values()
  values[name] = values[name].copy()
  values[name][where] = change(values[name][where])
  verdict = array_digests.verify(_put(values, _mesh(mesh_shape), specs), _saved_table())
  assert verdict.mismatch is not None and verdict.mismatch[0] == name, verdict
  assert f"block [{BLOCK_OF_CHANGE[case]}]" in verdict.mismatch[1], verdict


@pytest.mark.parametrize("change", ["dtype", "missing"], ids=["other-dtype", "not-in-table"])
def test_arrays_the_table_does_not_describe_are_unverified(change):
  table = _saved_table()
  values = _values()
  if change == "dtype":
    values["kernel"] = values["kernel"].astype(np.float16)
  else:
    del table["kernel"]
  verdict = array_digests.verify(_put(values, _mesh((1,)), {}), table)
  assert verdict == array_digests.Verdict(None, ("kernel",))


def test_numpy_leaves_are_one_block_checked_after_a_restore_as_jax_arrays():
  # A tree saved with numpy leaves restores as jax arrays: the same bytes, checked.
  table = array_digests.process_digests(_values())
  assert {name: len(entry["blocks"]) for name, entry in table.items()} == dict.fromkeys(table, 1)
  restored = _put(_values(), _mesh((4, 2)), SAVED_SPECS)
  assert array_digests.verify(restored, table) == array_digests.Verdict(
      None, ("half", "kernel", "mask")
  )
  assert array_digests.verify(_put(_values(), _mesh((1,)), {}), table) == array_digests.Verdict(
      None, ()
  )
