"""Official / detectron2 checkpoints -> Flax variables.

Reads detectron2 `.pkl` files ({'model': {name: numpy array}, '__author__', ...}; ImageNet
backbones converted from torchvision use names without the 'backbone.' prefix), PyTorch
`.pth` / `.pt` files ({'model': state_dict} or a bare state_dict) and `.safetensors`, and
loads every tensor whose official name and shape match the model. Nothing executes code
from the file: `.pth` goes through `torch.load(weights_only=True)` and `.pkl` through an
unpickler that only rebuilds numpy arrays and plain containers.

  variables, report = load_pretrained("model_final_3c8ec9.pkl", variables, model_config)
  print(report.summary())
"""
import collections
import dataclasses
import math
import os
import pathlib
import pickle
import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from maskfreevis_jax.models import official_names

# Top-level names of a detectron2 backbone-only checkpoint (no 'backbone.' prefix).
_BARE_BACKBONE_KEY = re.compile(r"^(stem|res\d)\.")
_BACKBONE_BLOCK_KEY = re.compile(r"^backbone\.(res\d)\.(\d+)\.")
# Wrapper keys tried in order when a checkpoint is a dict holding the state_dict.
_STATE_DICT_WRAPPERS = ("model", "state_dict")
_PICKLE_ALLOWED = {
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    # Protocol-2 pickles written by Python 3 encode bytes with _codecs.encode(str, 'latin1').
    ("_codecs", "encode"),
}


class CheckpointError(ValueError):
  """A checkpoint file cannot be read or does not fit the model."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickler that rebuilds numpy arrays and plain containers, and nothing else."""

  def find_class(self, module: str, name: str) -> Any:
    # Pickles written with numpy < 2 name the private module 'numpy.core'.
    if module.startswith("numpy.core"):
      module = "numpy._core" + module[len("numpy.core"):]
    if (module, name) in _PICKLE_ALLOWED:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f"global {module}.{name} is not allowed (only numpy arrays)")


def _to_numpy(value: Any) -> Optional[np.ndarray]:
  """Array-like -> numpy (torch tensors via .numpy(), bfloat16 as float32); None if not one."""
  if isinstance(value, np.ndarray):
    return value
  if isinstance(value, np.generic):
    return np.asarray(value)
  if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
    import torch  # pylint: disable=g-import-not-at-top
    tensor = value.detach().cpu()
    if tensor.dtype == torch.bfloat16:
      tensor = tensor.float()
    return tensor.numpy()
  return None


def _read_raw(path: pathlib.Path) -> Any:
  suffix = path.suffix.lower()
  if suffix == ".pkl":
    with open(path, "rb") as f:
      return _NumpyOnlyUnpickler(f, encoding="latin1").load()
  if suffix in (".pth", ".pt"):
    import torch  # pylint: disable=g-import-not-at-top
    return torch.load(path, map_location="cpu", weights_only=True)
  if suffix == ".safetensors":
    from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
    return load_file(str(path), device="cpu")
  raise CheckpointError(f"checkpoint {path}: unknown suffix {path.suffix!r}; expected .pkl "
                        "(detectron2), .pth / .pt (PyTorch) or .safetensors")


def read_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a checkpoint file into {name: numpy array} (names as stored, no prefix fixes).

  Args:
    path: `.pkl` (detectron2 pickle of numpy arrays), `.pth` / `.pt` (torch.save of
      {'model': state_dict} or of a bare state_dict) or `.safetensors`.

  Returns:
    The state_dict as numpy arrays.

  Raises:
    FileNotFoundError: no such file.
    CheckpointError (ValueError): unreadable / truncated file, a disallowed pickle global,
      or a structure that is not a state_dict; the message names the file and the first
      offending key.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  try:
    raw = _read_raw(path)
  except CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # pickle, torch and safetensors each raise their own types for truncated/corrupt files.
    raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); is the "
                          "file truncated or not a checkpoint?") from e
  if not isinstance(raw, Mapping):
    raise CheckpointError(f"checkpoint {path}: expected a dict (a state_dict or {{'model': "
                          f"state_dict}}), found {type(raw).__name__}")
  state = raw
  for wrapper in _STATE_DICT_WRAPPERS:
    if wrapper in raw:
      if not isinstance(raw[wrapper], Mapping):
        raise CheckpointError(f"checkpoint {path}: key {wrapper!r} holds "
                              f"{type(raw[wrapper]).__name__}, not a state_dict")
      state = raw[wrapper]
      break
  if not state:
    raise CheckpointError(f"checkpoint {path} holds an empty state_dict")
  arrays = {}
  for key, value in state.items():
    if not isinstance(key, str):
      raise CheckpointError(f"checkpoint {path}: state_dict key {key!r} is not a string")
    array = _to_numpy(value)
    if array is None:
      raise CheckpointError(f"checkpoint {path}: entry {key!r} is a {type(value).__name__}, not "
                            "an array; not a state_dict (top-level keys: "
                            f"{sorted(map(str, raw))[:10]})")
    arrays[key] = array
  return arrays


def normalize_official_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Adds the 'backbone.' prefix to bare detectron2 backbone names ('stem.*', 'res<k>.*')."""
  return {("backbone." + k if _BARE_BACKBONE_KEY.match(k) else k): v
          for k, v in state_dict.items()}


@dataclasses.dataclass
class ImportReport:
  """Outcome of loading a checkpoint into Flax variables.

  Attributes:
    source: where the tensors came from (file name).
    loaded: official keys copied into the variables.
    skipped: checkpoint keys the model has no variable for (e.g. 'stem.fc.weight',
      criterion buffers, a checkpoint's extra heads).
    shape_mismatched: (key, checkpoint shape, model shape); left at initialisation
      (e.g. class_embed 81 COCO classes vs 41).
    missing: model keys absent from the checkpoint; left at initialisation.
    num_loaded_elements: elements copied.
  """
  source: str
  loaded: list[str] = dataclasses.field(default_factory=list)
  skipped: list[str] = dataclasses.field(default_factory=list)
  shape_mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = dataclasses.field(
      default_factory=list)
  missing: list[str] = dataclasses.field(default_factory=list)
  num_loaded_elements: int = 0

  def summary(self, max_names: int = 10) -> str:
    """Human-readable multi-line summary."""

    def names(keys):
      shown = ", ".join(keys[:max_names])
      return shown + (f", ... ({len(keys) - max_names} more)" if len(keys) > max_names else "")

    lines = [f"{self.source}: loaded {len(self.loaded)} tensors "
             f"({self.num_loaded_elements:,} values)"]
    if self.shape_mismatched:
      lines.append(f"  shape mismatch, left initialised ({len(self.shape_mismatched)}): "
                   + names([f"{k} checkpoint {c} vs model {m}"
                            for k, c, m in self.shape_mismatched]))
    if self.missing:
      lines.append(f"  missing from checkpoint, left initialised ({len(self.missing)}): "
                   + names(self.missing))
    if self.skipped:
      lines.append(f"  not in model, skipped ({len(self.skipped)}): " + names(self.skipped))
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.summary()


def _block_layout(keys) -> dict[str, set[int]]:
  layout = collections.defaultdict(set)
  for key in keys:
    match = _BACKBONE_BLOCK_KEY.match(key)
    if match:
      layout[match.group(1)].add(int(match.group(2)))
  return layout


def _check_backbone_layout(source: str, checkpoint_keys, model_keys, model_name: str) -> None:
  """Raises when the checkpoint's ResNet has other block counts than the model's.

  Loading res4.0-5 of a ResNet-101 into a ResNet-50 (or leaving res4.6-22 of a ResNet-101 at
  random init) would silently produce a broken backbone, so this is an error, not a report.
  """
  ckpt_layout, model_layout = _block_layout(checkpoint_keys), _block_layout(model_keys)
  for stage in sorted(set(ckpt_layout) & set(model_layout)):
    ckpt_blocks, model_blocks = ckpt_layout[stage], model_layout[stage]
    if ckpt_blocks == model_blocks:
      continue
    extra = sorted(ckpt_blocks - model_blocks)
    absent = sorted(model_blocks - ckpt_blocks)
    if extra:
      first = min((k for k in checkpoint_keys if k.startswith(f"backbone.{stage}.{extra[0]}.")))
      detail = f"first offending key {first!r} has no place in the model"
    else:
      first = min((k for k in model_keys if k.startswith(f"backbone.{stage}.{absent[0]}.")))
      detail = f"first offending key: model key {first!r} is not in the checkpoint"
    raise CheckpointError(
        f"checkpoint {source} is for another backbone: its {stage} has {len(ckpt_blocks)} "
        f"blocks, model {model_name} has {len(model_blocks)}; {detail}")


def _set(tree: dict, path: Sequence[str], value: Any) -> None:
  for part in path[:-1]:
    tree = tree[part]
  tree[path[-1]] = value


def _copy_tree(tree: Mapping[str, Any]) -> dict:
  return {k: _copy_tree(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def load_state_dict_into_variables(state_dict: Mapping[str, Any], variables: Mapping[str, Any],
                                   *, source: str = "state_dict",
                                   model_name: str = "model",
                                   check_backbone: bool = True) -> tuple[dict, ImportReport]:
  """Loads official-named tensors into (a copy of) Flax variables.

  Args:
    state_dict: {official or bare detectron2 backbone key: array / tensor} (PyTorch layouts).
    variables: the model's initialised variables (all collections); not modified.
    source: name used in messages (file name).
    model_name: model name used in messages.
    check_backbone: raise when the ResNet block counts differ (see `_check_backbone_layout`).

  Returns:
    (new variables, ImportReport). Matching names with matching shapes are loaded (cast to the
    variable's dtype); everything else keeps its value from `variables`.

  Raises:
    CheckpointError (ValueError): another backbone depth, or no tensor matches at all.
  """
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise CheckpointError(
        f"{source}: `variables` must be the model's full variables {{'params': ..., "
        "'frozen_params': ..., 'batch_stats': ...}, got "
        + (f"a mapping with keys {sorted(variables)[:5]}" if isinstance(variables, Mapping)
           else type(variables).__name__))
  arrays = {}
  for key, value in state_dict.items():
    array = _to_numpy(value)
    if array is None:
      raise CheckpointError(f"{source}: entry {key!r} is a {type(value).__name__}, not an array")
    arrays[key] = array
  original_names = dict(zip(normalize_official_keys(arrays), arrays))
  arrays = normalize_official_keys(arrays)
  entries = [e for e in official_names.official_name_map(variables) if e.collection is not None]
  by_key = {e.official_key: e for e in entries}
  if check_backbone:
    _check_backbone_layout(source, list(arrays), list(by_key), model_name)

  new_variables = _copy_tree(variables)
  report = ImportReport(source=source)
  for entry in entries:
    key = entry.official_key
    if key not in arrays:
      report.missing.append(key)
      continue
    array = arrays[key]
    if tuple(array.shape) != tuple(entry.official_shape):
      report.shape_mismatched.append((key, tuple(array.shape), tuple(entry.official_shape)))
      continue
    old = new_variables[entry.collection]
    for part in entry.flax_path:
      old = old[part]
    value = official_names.from_torch_array(array, entry.transform).astype(old.dtype, copy=False)
    _set(new_variables[entry.collection], entry.flax_path, value)
    report.loaded.append(key)
    report.num_loaded_elements += math.prod(array.shape)
  # Skipped names are reported as the checkpoint spells them.
  report.skipped = [original_names[k] for k in arrays if k not in by_key]
  if not report.loaded:
    first = next(iter(arrays))
    raise CheckpointError(
        f"{source}: no tensor matches model {model_name} (first key {first!r}; "
        f"{len(report.shape_mismatched)} names match with other shapes"
        + (f", e.g. {report.shape_mismatched[0]}" if report.shape_mismatched else "") + ")")
  return new_variables, report


def load_pretrained(path: str | os.PathLike, variables: Mapping[str, Any],
                    model_config: Any = None, *,
                    check_backbone: bool = True) -> tuple[dict, ImportReport]:
  """Initialises Flax variables from an official / detectron2 checkpoint file.

  Args:
    path: `.pkl`, `.pth` / `.pt` or `.safetensors` (see `read_checkpoint`).
    variables: freshly initialised model variables ({'params', 'frozen_params',
      'batch_stats'}); not modified.
    model_config: the preset-shaped model config, used to name the model in messages.
    check_backbone: raise if the checkpoint's ResNet depth differs from the model's.

  Returns:
    (variables with every matching tensor loaded, ImportReport of loaded / skipped /
    shape-mismatched / missing names). Shape mismatches (e.g. a COCO class head with 81
    outputs into a 41-output YouTube-VIS head) are reported and left initialised.

  Raises:
    FileNotFoundError, CheckpointError (ValueError) naming the file and the first offending key.
  """
  model_name = "model"
  if model_config is not None and hasattr(model_config, "get"):
    model_name = repr(model_config.get("name", "model"))
  state_dict = read_checkpoint(path)
  return load_state_dict_into_variables(state_dict, variables, source=str(path),
                                        model_name=model_name, check_backbone=check_backbone)
