"""Flax variables -> official MaskFreeVIS (detectron2) PyTorch state_dict.

The names and layouts come from `maskfreevis_jax.models.official_names`; this module only
applies that map to real arrays, checks that the result is complete, and writes it as a
detectron2-style `.pth` ({"model": state_dict}) or as `.safetensors`.

  state_dict, summary = export_state_dict(variables, model_config)
  summary = export_checkpoint(variables, model_config, "model_final.pth")
"""

import dataclasses
import math
import os
import pathlib
from typing import Any
from collections.abc import Mapping, Sequence

import ml_collections
import numpy as np

from maskfreevis_jax.models import official_names

FORMATS = ("pth", "safetensors")


class ExportError(ValueError):
  """The variables do not map one-to-one onto the official state_dict."""


@dataclasses.dataclass(frozen=True)
class ExportSummary:
  """What an export wrote.

  Attributes:
    num_keys: state_dict entries (official keys, criterion buffers included).
    num_parameters: trainable parameters ('params' collection), the figure the official
      code reports (43,959,977 for r50 on YouTube-VIS 2019).
    num_elements: elements of all tensors (frozen BN state and buffers included).
    dtypes: {dtype name: number of tensors}.
    keys: the state_dict keys in write order.
    path: the file written, or None for an in-memory export.
    fmt: 'pth', 'safetensors' or None.
  """

  num_keys: int
  num_parameters: int
  num_elements: int
  dtypes: Mapping[str, int]
  keys: Sequence[str]
  path: str | None = None
  fmt: str | None = None

  def __str__(self) -> str:
    where = f" to {self.path} ({self.fmt})" if self.path else ""
    dtypes = ", ".join(f"{n} x {d}" for d, n in sorted(self.dtypes.items()))
    return (
        f"exported {self.num_keys} tensors{where}: {self.num_parameters:,} trainable "
        f"parameters, {self.num_elements:,} elements in all; dtypes: {dtypes}"
    )


def _is_abstract(value: Any) -> bool:
  return not hasattr(value, "__array__") and hasattr(value, "shape") and hasattr(value, "dtype")


def _flax_name(entry: official_names.NameMapEntry) -> str:
  if entry.collection is None:
    return "constant"
  return "/".join((entry.collection,) + tuple(entry.flax_path))


def _check_against_expected(
    entries: Sequence[official_names.NameMapEntry], expected: Mapping[str, Sequence[int]], what: str
) -> None:
  """Raises ExportError listing official keys without a source and unexported variables."""
  produced = {e.official_key: e for e in entries}
  no_source = [k for k in expected if k not in produced]
  unexported = [
      f"{_flax_name(e)} -> {e.official_key!r}"
      for e in entries
      if e.collection is not None and e.official_key not in expected
  ]
  wrong_shape = [
      f"{k}: expected {tuple(expected[k])}, variables give {produced[k].official_shape}"
      f" (from {_flax_name(produced[k])})"
      for k in expected
      if k in produced and tuple(produced[k].official_shape) != tuple(expected[k])
  ]
  problems = []
  if no_source:
    problems.append(
        f"{len(no_source)} official keys have no source variable: "
        + ", ".join(no_source[:20])
        + (" ..." if len(no_source) > 20 else "")
    )
  if unexported:
    problems.append(
        f"{len(unexported)} Flax variables have no official key (left unexported): "
        + ", ".join(unexported[:20])
        + (" ..." if len(unexported) > 20 else "")
    )
  if wrong_shape:
    problems.append(
        f"{len(wrong_shape)} shapes differ: "
        + "; ".join(wrong_shape[:20])
        + (" ..." if len(wrong_shape) > 20 else "")
    )
  if problems:
    raise ExportError(f"variables do not match {what}:\n  " + "\n  ".join(problems))


def _get(variables: Mapping[str, Any], collection: str, path: Sequence[str]) -> Any:
  node = variables[collection]
  for part in path:
    node = node[part]
  return node


def _state_dict(
    variables: Mapping[str, Any],
    entries: Sequence[official_names.NameMapEntry],
    num_classes: int,
    eos_coef: float,
    iteration: int,
) -> dict[str, np.ndarray]:
  """{official key: contiguous numpy array} of every entry, constants included."""
  state_dict: dict[str, np.ndarray] = {}
  for entry in entries:
    if entry.collection is None:
      state_dict[entry.official_key] = official_names.constant_value(
          entry.official_key,
          num_classes,
          eos_coef=eos_coef,
          iteration=iteration,
          shape=entry.official_shape,
      )
      continue
    value = _get(variables, entry.collection, entry.flax_path)
    if _is_abstract(value):
      raise ExportError(
          f"variable {_flax_name(entry)} is abstract ({value}); export needs "
          "concrete arrays, not jax.eval_shape output"
      )
    array = official_names.to_torch_array(np.asarray(value), entry.transform)
    state_dict[entry.official_key] = np.ascontiguousarray(array)
  return state_dict


def export_state_dict(
    variables: Mapping[str, Any],
    model_config: ml_collections.ConfigDict | None = None,
    *,
    eos_coef: float = 0.1,
    iteration: int = 0,
    expected_shapes: Mapping[str, Sequence[int]] | None = None,
) -> tuple[dict[str, np.ndarray], ExportSummary]:
  """Converts Flax variables to the official state_dict (numpy arrays, PyTorch layouts).

  Args:
    variables: {'params': ..., 'frozen_params': ..., 'batch_stats': ...} with concrete arrays.
    model_config: preset-shaped model config the variables belong to. When given, the
      result must have exactly the key set and shapes that config's official model has.
    eos_coef: no-object weight written as the last entry of `criterion.empty_weight`.
    iteration: value of the `criterion._iter` buffer.
    expected_shapes: optional {official key: shape} the result must match exactly (e.g. the
      reference listing of the official checkpoint); checked in addition to `model_config`.

  Returns:
    (state_dict {official key: contiguous numpy array}, ExportSummary).

  Raises:
    ExportError (a ValueError) naming every official key without a source variable, every
      variable without an official key and every shape that differs; also for abstract
      (ShapeDtypeStruct) leaves.
  """
  if not isinstance(variables, Mapping) or "params" not in variables:
    found = (
        f"keys {sorted(variables)}" if isinstance(variables, Mapping) else type(variables).__name__
    )
    raise ExportError(f"variables must be a mapping with a 'params' collection, got {found}")
  entries = official_names.official_name_map(variables)
  if model_config is not None:
    _check_against_expected(
        entries,
        official_names.official_shapes(model_config),
        f"the official keys of model config {model_config.name!r}",
    )
  if expected_shapes is not None:
    _check_against_expected(entries, expected_shapes, "the expected state_dict listing")
  num_classes = next(
      e.official_shape[0] - 1
      for e in entries
      if e.official_key == "sem_seg_head.predictor.class_embed.bias"
  )

  state_dict = _state_dict(variables, entries, num_classes, eos_coef, iteration)
  dtypes: dict[str, int] = {}
  for array in state_dict.values():
    dtypes[str(array.dtype)] = dtypes.get(str(array.dtype), 0) + 1
  summary = ExportSummary(
      num_keys=len(state_dict),
      num_parameters=official_names.num_official_parameters(entries),
      num_elements=sum(math.prod(a.shape) for a in state_dict.values()),
      dtypes=dtypes,
      keys=tuple(state_dict),
  )
  return state_dict, summary


def to_torch_tensors(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """numpy state_dict -> {key: torch.Tensor} (bfloat16 arrays keep their bits)."""
  import torch  # pylint: disable=g-import-not-at-top

  tensors = {}
  for key, array in state_dict.items():
    array = np.ascontiguousarray(array)
    if array.dtype.name == "bfloat16":
      tensors[key] = torch.from_numpy(array.view(np.uint16).copy()).view(torch.bfloat16)
    else:
      tensors[key] = torch.from_numpy(array.copy())
  return tensors


def save_state_dict(
    state_dict: Mapping[str, np.ndarray], out_path: str | os.PathLike, fmt: str = "pth"
) -> str:
  """Writes a state_dict as detectron2 `.pth` ({"model": state_dict}) or `.safetensors`."""
  if fmt not in FORMATS:
    raise ValueError(f"export format fmt={fmt!r} not in {FORMATS}")
  path = pathlib.Path(out_path)
  if path.is_dir():
    raise ValueError(f"export out_path {path} is a directory; give a file name")
  path.parent.mkdir(parents=True, exist_ok=True)
  tensors = to_torch_tensors(state_dict)
  # Write next to the target and rename, so an interrupted export never leaves a truncated file.
  tmp_path = path.with_name(path.name + ".tmp")
  if fmt == "pth":
    import torch  # pylint: disable=g-import-not-at-top

    torch.save({"model": tensors}, tmp_path)
  else:
    from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top

    save_file(tensors, str(tmp_path), metadata={"format": "pt"})
  os.replace(tmp_path, path)
  return str(path)


def export_checkpoint(
    variables: Mapping[str, Any],
    model_config: ml_collections.ConfigDict,
    out_path: str | os.PathLike,
    *,
    fmt: str = "pth",
    eos_coef: float = 0.1,
    iteration: int = 0,
) -> ExportSummary:
  """Exports Flax variables as an official MaskFreeVIS checkpoint that PyTorch loads strictly.

  Args:
    variables: model variables (all collections) with concrete arrays.
    model_config: the preset-shaped model config (`config.model`) of the variables.
    out_path: file to write.
    fmt: 'pth' (torch.save of {"model": state_dict}, detectron2's layout) or 'safetensors'
      (flat state_dict).
    eos_coef: no-object class weight for `criterion.empty_weight`.
    iteration: `criterion._iter` value (the training step).

  Returns:
    ExportSummary (keys, parameter count, dtypes, path).

  Raises:
    ExportError / ValueError: the variables do not match the config's official key set, or a
      bad format / path.
  """
  if fmt not in FORMATS:
    raise ValueError(f"export format fmt={fmt!r} not in {FORMATS}")
  state_dict, summary = export_state_dict(
      variables, model_config, eos_coef=eos_coef, iteration=iteration
  )
  path = save_state_dict(state_dict, out_path, fmt)
  return dataclasses.replace(summary, path=path, fmt=fmt)
