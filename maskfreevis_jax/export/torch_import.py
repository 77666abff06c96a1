"""Official / detectron2 checkpoints -> Flax variables.

Reads detectron2 `.pkl` files ({'model': {name: numpy array}, '__author__', ...}; ImageNet
backbones converted from torchvision use names without the 'backbone.' prefix), PyTorch
`.pth` / `.pt` files ({'model': state_dict} or a bare state_dict) and `.safetensors`, and
loads every tensor whose official name and shape match the model. Nothing executes code
from the file: `.pth` goes through `torch.load(weights_only=True)` and `.pkl` through an
unpickler that only rebuilds numpy arrays and plain containers (torch tensors pickled with
plain `pickle`, as the release's `convert-pretrained-swin-model-to-d2.py` writes them, are
rebuilt as numpy arrays from their raw bytes, without torch).

Swin checkpoints: the Mask2Former / MaskFreeVIS layout ('backbone.patch_embed.*',
'backbone.layers.<i>.blocks.<j>.*', 'backbone.norm<i>.*') and the ImageNet / raw Microsoft
layout (the same names without 'backbone.', plus 'norm.*' and 'head.*', which are skipped)
both load. The buffers `relative_position_index` and `attn_mask` are not loaded: the model
computes them from its window size (reported as regenerated).

  variables, report = load_pretrained("model_final_3c8ec9.pkl", variables, model_config)
  logging.info("%s", report.summary())
"""

import collections
import dataclasses
import io
import math
import os
import pathlib
import pickle
import re
from typing import Any
from collections.abc import Mapping, Sequence

import ml_collections
import numpy as np

from maskfreevis_jax.models import official_names

# Top-level names of a backbone-only checkpoint (no 'backbone.' prefix): detectron2 ResNets
# (stem, res<k>) and Swin (patch_embed, layers, norm<k>; ImageNet / Microsoft layout).
_BARE_BACKBONE_KEY = re.compile(r"^(stem|res\d|patch_embed|layers|norm\d)\.")
# Blocks of a stage: ResNet 'backbone.res4.<j>.', Swin 'backbone.layers.2.blocks.<j>.'.
_BACKBONE_BLOCK_KEY = re.compile(r"^backbone\.(res\d|layers\.\d+)\.(?:blocks\.)?(\d+)\.")
# Backbone families, told apart by their top-level module names.
_BACKBONE_KINDS = (
    ("ResNet", re.compile(r"^backbone\.(stem|res\d)\.")),
    ("Swin", re.compile(r"^backbone\.(patch_embed|layers)\.")),
)
# Buffers the model computes from static sizes (Swin): never loaded, reported as regenerated.
_REGENERATED_BUFFER_KEY = re.compile(r"\.(relative_position_index|attn_mask)$")
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


# Element types of torch's legacy storage classes ('torch.FloatStorage', ...).
_TORCH_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickler that rebuilds numpy arrays and plain containers, and nothing else.

  Torch tensors pickled with plain `pickle` (`torch._utils._rebuild_tensor_v2` of a storage
  serialised by `torch.storage._load_from_bytes`) become numpy arrays built from the raw
  storage bytes by `_legacy_storage_array`; no torch code runs.
  """

  def find_class(self, module: str, name: str) -> Any:
    # Pickles written with numpy < 2 name the private module 'numpy.core'.
    if module.startswith("numpy.core"):
      module = "numpy._core" + module[len("numpy.core") :]
    if (module, name) in _PICKLE_ALLOWED:
      return super().find_class(module, name)
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return _rebuild_tensor
    if (module, name) == ("torch._utils", "_rebuild_parameter"):
      return lambda data, requires_grad, backward_hooks: data
    if (module, name) == ("torch.storage", "_load_from_bytes"):
      return _legacy_storage_array
    raise pickle.UnpicklingError(f"global {module}.{name} is not allowed (only numpy arrays)")


class _StorageUnpickler(_NumpyOnlyUnpickler):
  """The main record of a legacy `torch.save` stream: storage classes become dtypes and
  persistent storage ids are recorded as (key, dtype, numel)."""

  def find_class(self, module: str, name: str) -> Any:
    if module == "torch" and name in _TORCH_STORAGE_DTYPES:
      return np.dtype(_TORCH_STORAGE_DTYPES[name])
    return super().find_class(module, name)

  def persistent_load(self, pid: Any) -> Any:
    # ('storage', storage dtype, key, location, numel[, view metadata])
    if not (
        isinstance(pid, tuple)
        and len(pid) >= 5
        and pid[0] == "storage"
        and isinstance(pid[1], np.dtype)
    ):
      raise pickle.UnpicklingError(f"unsupported torch persistent id {pid!r:.80}")
    return (str(pid[2]), pid[1], int(pid[4]))


def _legacy_storage_array(data: bytes) -> np.ndarray:
  """A torch storage written by `torch.save(storage, _use_new_zipfile_serialization=False)`
  (what pickling a tensor embeds) -> flat numpy array (bfloat16 widened to float32)."""
  stream = io.BytesIO(data)
  for _ in range(3):  # magic number, protocol version, system info
    _NumpyOnlyUnpickler(stream).load()
  key, dtype, numel = _StorageUnpickler(stream).load()
  stored_keys = _NumpyOnlyUnpickler(stream).load()
  if list(stored_keys) != [key]:
    raise pickle.UnpicklingError(
        f"torch storage record holds keys {stored_keys!r}, expected " f"[{key!r}]"
    )
  size = int.from_bytes(stream.read(8), "little")
  if size != numel:
    raise pickle.UnpicklingError(f"torch storage has {size} elements, its header says {numel}")
  raw = stream.read(size * dtype.itemsize)
  if len(raw) != size * dtype.itemsize:
    raise pickle.UnpicklingError("torch storage bytes are truncated")
  array = np.frombuffer(raw, dtype).copy()
  if dtype == np.uint16:  # bfloat16: the upper half of a float32.
    array = (array.astype(np.uint32) << 16).view(np.float32)
  return array


def _rebuild_tensor(
    storage: np.ndarray, offset: int, size: Sequence[int], stride: Sequence[int], *unused_args: Any
) -> np.ndarray:
  """numpy equivalent of torch._utils._rebuild_tensor_v2 (a strided view, copied)."""
  if not isinstance(storage, np.ndarray):
    raise pickle.UnpicklingError(f"tensor storage is a {type(storage).__name__}, not an array")
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if size and any(s > 0 for s in size):
    last = offset + sum((n - 1) * st for n, st in zip(size, stride))
    if offset < 0 or last >= storage.size:
      raise pickle.UnpicklingError(f"tensor view {size} at offset {offset} exceeds its storage")
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=size, strides=tuple(st * storage.itemsize for st in stride)
  )
  return np.array(view)


def _to_numpy(value: Any) -> np.ndarray | None:
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


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  """numpy arrays without PyTorch (the default run loads its stage-1 weights so); bfloat16
  (an ml_dtypes array here) as float32, as from PyTorch files."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  with safe_open(str(path), framework="numpy") as f:
    arrays = {name: f.get_tensor(name) for name in f.keys()}
  return {k: v.astype(np.float32) if v.dtype.name == "bfloat16" else v for k, v in arrays.items()}


def _read_raw(path: pathlib.Path) -> Any:
  suffix = path.suffix.lower()
  if suffix == ".pkl":
    with open(path, "rb") as f:
      return _NumpyOnlyUnpickler(f, encoding="latin1").load()
  if suffix in (".pth", ".pt"):
    import torch  # pylint: disable=g-import-not-at-top

    return torch.load(path, map_location="cpu", weights_only=True)
  if suffix == ".safetensors":
    return _read_safetensors(path)
  raise CheckpointError(
      f"checkpoint {path}: unknown suffix {path.suffix!r}; expected .pkl "
      "(detectron2), .pth / .pt (PyTorch) or .safetensors"
  )


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
    raise CheckpointError(
        f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); is the "
        "file truncated or not a checkpoint?"
    ) from e
  if not isinstance(raw, Mapping):
    raise CheckpointError(
        f"checkpoint {path}: expected a dict (a state_dict or {{'model': "
        f"state_dict}}), found {type(raw).__name__}"
    )
  state = raw
  for wrapper in _STATE_DICT_WRAPPERS:
    if wrapper in raw:
      if not isinstance(raw[wrapper], Mapping):
        raise CheckpointError(
            f"checkpoint {path}: key {wrapper!r} holds "
            f"{type(raw[wrapper]).__name__}, not a state_dict"
        )
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
      raise CheckpointError(
          f"checkpoint {path}: entry {key!r} is a {type(value).__name__}, not "
          "an array; not a state_dict (top-level keys: "
          f"{sorted(map(str, raw))[:10]})"
      )
    arrays[key] = array
  return arrays


def normalize_official_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Adds the 'backbone.' prefix to bare detectron2 backbone names ('stem.*', 'res<k>.*')."""
  return {("backbone." + k if _BARE_BACKBONE_KEY.match(k) else k): v for k, v in state_dict.items()}


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
    regenerated: checkpoint buffers the model computes itself (Swin `relative_position_index`,
      `attn_mask`); not loaded.
    num_loaded_elements: elements copied.
  """

  source: str
  loaded: list[str] = dataclasses.field(default_factory=list)
  skipped: list[str] = dataclasses.field(default_factory=list)
  shape_mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = dataclasses.field(
      default_factory=list
  )
  missing: list[str] = dataclasses.field(default_factory=list)
  regenerated: list[str] = dataclasses.field(default_factory=list)
  num_loaded_elements: int = 0

  def summary(self, max_names: int = 10) -> str:
    """Human-readable multi-line summary."""

    def names(keys):
      shown = ", ".join(keys[:max_names])
      return shown + (f", ... ({len(keys) - max_names} more)" if len(keys) > max_names else "")

    lines = [
        f"{self.source}: loaded {len(self.loaded)} tensors "
        f"({self.num_loaded_elements:,} values)"
    ]
    if self.shape_mismatched:
      lines.append(
          f"  shape mismatch, left initialised ({len(self.shape_mismatched)}): "
          + names([f"{k} checkpoint {c} vs model {m}" for k, c, m in self.shape_mismatched])
      )
    if self.missing:
      lines.append(
          f"  missing from checkpoint, left initialised ({len(self.missing)}): "
          + names(self.missing)
      )
    if self.skipped:
      lines.append(f"  not in model, skipped ({len(self.skipped)}): " + names(self.skipped))
    if self.regenerated:
      lines.append(
          f"  buffers the model regenerates, not loaded ({len(self.regenerated)}): "
          + names(self.regenerated)
      )
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
  """Raises when the checkpoint's ResNet / Swin has other block counts than the model's.

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
    blocks = "blocks." if stage.startswith("layers.") else ""  # Swin: layers.<i>.blocks.<j>.
    if extra:
      prefix = f"backbone.{stage}.{blocks}{extra[0]}."
      first = min(k for k in checkpoint_keys if k.startswith(prefix))
      detail = f"first offending key {first!r} has no place in the model"
    else:
      prefix = f"backbone.{stage}.{blocks}{absent[0]}."
      first = min(k for k in model_keys if k.startswith(prefix))
      detail = f"first offending key: model key {first!r} is not in the checkpoint"
    raise CheckpointError(
        f"checkpoint {source} is for another backbone: its {stage} has {len(ckpt_blocks)} "
        f"blocks, model {model_name} has {len(model_blocks)}; {detail}"
    )


def _backbone_kind(keys) -> tuple[str | None, str | None]:
  """(family name, first key that shows it) of the backbone names in `keys`, or (None, None)."""
  for kind, pattern in _BACKBONE_KINDS:
    found = sorted(k for k in keys if pattern.match(k))
    if found:
      return kind, found[0]
  return None, None


def _check_backbone_kind(
    source: str,
    arrays: Mapping[str, np.ndarray],
    model_shapes: Mapping[str, tuple[int, ...]],
    model_name: str,
) -> None:
  """Raises when the checkpoint's backbone is of another family or Swin size than the model's.

  A ResNet checkpoint in a Swin model (or the reverse) would load only the heads and leave the
  whole backbone random; a Swin of another width or window would do the same for the backbone.
  """
  ckpt_kind, ckpt_key = _backbone_kind(arrays)
  model_kind, model_key = _backbone_kind(model_shapes)
  if ckpt_kind and model_kind and ckpt_kind != model_kind:
    raise CheckpointError(
        f"checkpoint {source} holds a {ckpt_kind} backbone (e.g. {ckpt_key!r}) but model "
        f"{model_name} has a {model_kind} backbone (e.g. {model_key!r}); backbone mismatch: "
        f"use a {model_kind} checkpoint or a {ckpt_kind} preset"
    )
  if ckpt_kind != "Swin" or model_kind != "Swin":
    return
  checks = (
      ("embed dim", "backbone.patch_embed.proj.weight", 0),
      ("window", "backbone.layers.0.blocks.0.attn.relative_position_bias_table", None),
  )
  for what, key, axis in checks:
    if key not in arrays or key not in model_shapes:
      continue
    ckpt_shape, model_shape = tuple(arrays[key].shape), tuple(model_shapes[key])
    if ckpt_shape == model_shape:
      continue
    if axis is None:  # (2w - 1)^2 table rows -> window w.
      ckpt_value = (math.isqrt(ckpt_shape[0]) + 1) // 2
      model_value = (math.isqrt(model_shape[0]) + 1) // 2
    else:
      ckpt_value, model_value = ckpt_shape[axis], model_shape[axis]
    raise CheckpointError(
        f"checkpoint {source} is for another Swin: its {what} is {ckpt_value}, model "
        f"{model_name} has {model_value} (first offending key {key!r}: checkpoint shape "
        f"{ckpt_shape} vs model {model_shape})"
    )


def _set(tree: dict, path: Sequence[str], value: Any) -> None:
  for part in path[:-1]:
    tree = tree[part]
  tree[path[-1]] = value


def _copy_tree(tree: Mapping[str, Any]) -> dict:
  return {k: _copy_tree(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def _check_variables(variables: Any, source: str) -> None:
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise CheckpointError(
        f"{source}: `variables` must be the model's full variables {{'params': ..., "
        "'frozen_params': ..., 'batch_stats': ...}, got "
        + (
            f"a mapping with keys {sorted(variables)[:5]}"
            if isinstance(variables, Mapping)
            else type(variables).__name__
        )
    )


def _state_dict_arrays(state_dict: Mapping[str, Any], source: str) -> dict[str, np.ndarray]:
  arrays = {}
  for key, value in state_dict.items():
    array = _to_numpy(value)
    if array is None:
      raise CheckpointError(f"{source}: entry {key!r} is a {type(value).__name__}, not an array")
    arrays[key] = array
  return arrays


def _copy_matching(
    arrays: Mapping[str, np.ndarray],
    entries: Sequence[official_names.NameMapEntry],
    new_variables: dict,
    report: ImportReport,
) -> None:
  """Copies every entry's array of the official shape into `new_variables`; reports the rest."""
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


def load_state_dict_into_variables(
    state_dict: Mapping[str, Any],
    variables: Mapping[str, Any],
    *,
    source: str = "state_dict",
    model_name: str = "model",
    check_backbone: bool = True,
) -> tuple[dict, ImportReport]:
  """Loads official-named tensors into (a copy of) Flax variables.

  Args:
    state_dict: {official or bare detectron2 backbone key: array / tensor} (PyTorch layouts).
    variables: the model's initialised variables (all collections); not modified.
    source: name used in messages (file name).
    model_name: model name used in messages.
    check_backbone: raise when the backbone family (ResNet / Swin), the ResNet or Swin block
      counts, or the Swin width / window differ from the model's.

  Returns:
    (new variables, ImportReport). Matching names with matching shapes are loaded (cast to the
    variable's dtype); everything else keeps its value from `variables`.

  Raises:
    CheckpointError (ValueError): another backbone family or size, or no tensor matches.
  """
  _check_variables(variables, source)
  arrays = _state_dict_arrays(state_dict, source)
  original_names = dict(zip(normalize_official_keys(arrays), arrays))
  arrays = normalize_official_keys(arrays)
  entries = [e for e in official_names.official_name_map(variables) if e.collection is not None]
  by_key = {e.official_key: e for e in entries}
  regenerated = {k for k in arrays if _REGENERATED_BUFFER_KEY.search(k)}
  if check_backbone:
    _check_backbone_kind(
        source, arrays, {k: e.official_shape for k, e in by_key.items()}, model_name
    )
    _check_backbone_layout(source, list(arrays), list(by_key), model_name)

  new_variables = _copy_tree(variables)
  report = ImportReport(source=source)
  _copy_matching(arrays, entries, new_variables, report)
  # Skipped names are reported as the checkpoint spells them.
  report.skipped = [original_names[k] for k in arrays if k not in by_key and k not in regenerated]
  report.regenerated = [original_names[k] for k in arrays if k in regenerated]
  if not report.loaded:
    first = next(iter(arrays))
    raise CheckpointError(
        f"{source}: no tensor matches model {model_name} (first key {first!r}; "
        f"{len(report.shape_mismatched)} names match with other shapes"
        + (f", e.g. {report.shape_mismatched[0]}" if report.shape_mismatched else "")
        + ")"
    )
  return new_variables, report


def load_pretrained(
    path: str | os.PathLike,
    variables: Mapping[str, Any],
    model_config: ml_collections.ConfigDict | None = None,
    *,
    check_backbone: bool = True,
) -> tuple[dict, ImportReport]:
  """Initialises Flax variables from an official / detectron2 checkpoint file.

  Args:
    path: `.pkl`, `.pth` / `.pt` or `.safetensors` (see `read_checkpoint`).
    variables: freshly initialised model variables ({'params', 'frozen_params',
      'batch_stats'}); not modified.
    model_config: the preset-shaped model config, used to name the model in messages.
    check_backbone: raise if the checkpoint's backbone family (ResNet / Swin) or size differs
      from the model's.

  Returns:
    (variables with every matching tensor loaded, ImportReport of loaded / skipped /
    shape-mismatched / missing names). Shape mismatches (e.g. a COCO class head with 81
    outputs into a 41-output YouTube-VIS head) are reported and left initialised.

  Raises:
    FileNotFoundError, CheckpointError (ValueError) naming the file and the first offending key.
  """
  model_name = "model" if model_config is None else repr(model_config.name)
  state_dict = read_checkpoint(path)
  return load_state_dict_into_variables(
      state_dict, variables, source=str(path), model_name=model_name, check_backbone=check_backbone
  )
