"""Name map between our Flax variables and the official MaskFreeVIS (detectron2) state_dict.

The map is data: `PATH_REWRITES` turns a Flax variable path '<collection>/<module>/.../<leaf>'
into the official key by applying every regex substitution in order, and `LEAF_TRANSFORMS`
gives the layout change from (leaf name, rank). Two official keys have no Flax variable: the
criterion buffers, written from constants (`CONSTANT_ENTRIES`).

Layout transforms (Flax -> PyTorch):
  conv_hwio_to_oihw : conv kernel [kH, kW, I, O] -> weight [O, I, kH, kW]
  dense_transpose   : Dense kernel [in, out] -> Linear weight [out, in]. Packed attention
                      projections (`in_proj`, kernel [D, 3D] whose column blocks are q, k, v)
                      become torch's `in_proj_weight` [3D, D] by this same transpose, so q/k/v
                      packing needs no extra step.
  none              : same array (biases, norm scale/bias/mean/var, embeddings, level_embed).

Collections: trainable weights are in 'params'; the FrozenBatchNorm affine parameters of the
backbone are in 'frozen_params' and its running statistics in 'batch_stats'.
"""
import dataclasses
import math
import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

CONV = "conv_hwio_to_oihw"
DENSE = "dense_transpose"
NONE = "none"
CONSTANT = "constant"

# Applied in order to '<collection>/<path>' (every rule, each at most once per match).
PATH_REWRITES: tuple[tuple[str, str], ...] = (
    # Leaves and collections.
    (r"^batch_stats/(.*)/mean$", r"\1/running_mean"),
    (r"^batch_stats/(.*)/var$", r"\1/running_var"),
    (r"^(params|frozen_params)/", ""),
    (r"/(kernel|scale|embedding)$", "/weight"),
    # Packed q/k/v projections of torch.nn.MultiheadAttention.
    (r"/in_proj/weight$", "/in_proj_weight"),
    (r"/in_proj/bias$", "/in_proj_bias"),
    # The official head nests both decoders in `sem_seg_head`.
    (r"^(pixel_decoder|predictor)/", r"sem_seg_head/\1/"),
    # nn.Sequential(conv, GroupNorm) input projections of the pixel decoder.
    (r"/input_proj_(\d+)/conv/", r"/input_proj/\1/0/"),
    (r"/input_proj_(\d+)/norm/", r"/input_proj/\1/1/"),
    # ModuleList indices: Flax 'name_<i>' -> torch 'name.<i>'.
    (r"/(res\d|layers|transformer_\w+_layers|input_proj)_(\d+)/", r"/\1/\2/"),
    ("/", "."),
)

# (leaf name, rank) -> transform; anything else is NONE.
LEAF_TRANSFORMS: Mapping[tuple[str, int], str] = {
    ("kernel", 4): CONV,
    ("kernel", 2): DENSE,
}

# Official keys written from constants (criterion buffers): key -> description.
CONSTANT_ENTRIES: Mapping[str, str] = {
    "criterion.empty_weight": "ones(num_classes + 1) with the last (no-object) entry = eos_coef",
    "criterion._iter": "float32 [1] training iteration counter (0 for a fresh export)",
}


@dataclasses.dataclass(frozen=True)
class NameMapEntry:
  """One official state_dict key and where it lives on the Flax side.

  Attributes:
    official_key: official state_dict key.
    official_shape: PyTorch shape.
    collection: Flax collection ('params', 'frozen_params', 'batch_stats'); None for constants.
    flax_path: path inside the collection; () for constants.
    flax_shape: Flax shape; () for constants.
    transform: CONV, DENSE, NONE or CONSTANT.
  """
  official_key: str
  official_shape: tuple[int, ...]
  collection: Optional[str]
  flax_path: tuple[str, ...]
  flax_shape: tuple[int, ...]
  transform: str


def flax_to_official_key(collection: str, path: Sequence[str]) -> str:
  """Official state_dict key of the Flax variable `collection`/`path`."""
  key = "/".join((collection,) + tuple(path))
  for pattern, replacement in PATH_REWRITES:
    key = re.sub(pattern, replacement, key)
  return key


def leaf_transform(path: Sequence[str], rank: int) -> str:
  """Layout transform of a Flax variable, from its leaf name and rank."""
  return LEAF_TRANSFORMS.get((path[-1], rank), NONE)


def to_torch_shape(flax_shape: Sequence[int], transform: str) -> tuple[int, ...]:
  """Shape the official tensor has for a Flax variable of `flax_shape` under `transform`."""
  flax_shape = tuple(int(s) for s in flax_shape)
  if transform == CONV:
    if len(flax_shape) != 4:
      raise ValueError(f"{CONV} needs a rank-4 kernel, got shape {flax_shape}")
    kh, kw, cin, cout = flax_shape
    return (cout, cin, kh, kw)
  if transform == DENSE:
    if len(flax_shape) != 2:
      raise ValueError(f"{DENSE} needs a rank-2 kernel, got shape {flax_shape}")
    return flax_shape[::-1]
  if transform in (NONE, CONSTANT):
    return flax_shape
  raise ValueError(f"unknown transform {transform!r}")


def to_flax_shape(torch_shape: Sequence[int], transform: str) -> tuple[int, ...]:
  """Inverse of `to_torch_shape`."""
  torch_shape = tuple(int(s) for s in torch_shape)
  if transform == CONV:
    if len(torch_shape) != 4:
      raise ValueError(f"{CONV} needs a rank-4 weight, got shape {torch_shape}")
    cout, cin, kh, kw = torch_shape
    return (kh, kw, cin, cout)
  return to_torch_shape(torch_shape, transform)


def to_torch_array(array: Any, transform: str) -> np.ndarray:
  """Converts a Flax array to the official PyTorch layout (numpy)."""
  array = np.asarray(array)
  if transform == CONV:
    to_torch_shape(array.shape, transform)
    return np.ascontiguousarray(array.transpose(3, 2, 0, 1))
  if transform == DENSE:
    to_torch_shape(array.shape, transform)
    return np.ascontiguousarray(array.T)
  if transform in (NONE, CONSTANT):
    return array
  raise ValueError(f"unknown transform {transform!r}")


def from_torch_array(array: Any, transform: str) -> np.ndarray:
  """Converts an official PyTorch-layout array to the Flax layout (numpy)."""
  array = np.asarray(array)
  if transform == CONV:
    to_flax_shape(array.shape, transform)
    return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
  return to_torch_array(array, transform)


def constant_value(official_key: str, num_classes: int, eos_coef: float = 0.1,
                   iteration: int = 0) -> np.ndarray:
  """Value of a constant-written official key (the criterion buffers)."""
  if official_key == "criterion.empty_weight":
    weight = np.ones(num_classes + 1, np.float32)
    weight[-1] = eos_coef
    return weight
  if official_key == "criterion._iter":
    return np.asarray([iteration], np.float32)
  raise ValueError(f"{official_key!r} is not a constant entry; known: {sorted(CONSTANT_ENTRIES)}")


def _abstract_variables(model_config) -> Mapping[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from maskfreevis_jax.models import build_model  # pylint: disable=g-import-not-at-top
  model = build_model(model_config)
  # Parameter shapes do not depend on the input size; use a small clip.
  frames = jax.ShapeDtypeStruct((1, 1, 64, 64, 3), jnp.uint8)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), frames)


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()):
  for name, value in tree.items():
    if isinstance(value, Mapping):
      yield from _flatten(value, prefix + (str(name),))
    else:
      yield prefix + (str(name),), value


def official_name_map(variables_or_config: Any) -> list[NameMapEntry]:
  """Lists every official state_dict key with its Flax variable and layout transform.

  Args:
    variables_or_config: model variables ({'params': ..., 'frozen_params': ...,
      'batch_stats': ...}, arrays or ShapeDtypeStructs) or a model config (ConfigDict from
      presets), in which case the variable shapes are derived with jax.eval_shape.

  Returns:
    One NameMapEntry per Flax variable, followed by the constant criterion entries.

  Raises:
    ValueError: if two Flax variables map to the same official key, or the input is neither.
  """
  if hasattr(variables_or_config, "backbone") and hasattr(variables_or_config, "decoder"):
    variables = _abstract_variables(variables_or_config)
  elif isinstance(variables_or_config, Mapping):
    variables = variables_or_config
  else:
    raise ValueError("official_name_map expects model variables (a mapping of collections) or "
                     f"a model config, got {type(variables_or_config).__name__}")
  entries: list[NameMapEntry] = []
  seen: dict[str, tuple[str, ...]] = {}
  num_classes = None
  for full_path, value in _flatten(variables):
    collection, path = full_path[0], full_path[1:]
    shape = tuple(int(s) for s in np.shape(value))
    transform = leaf_transform(path, len(shape))
    key = flax_to_official_key(collection, path)
    if key in seen:
      raise ValueError(f"Flax variables {seen[key]} and {full_path} both map to {key!r}")
    seen[key] = full_path
    entries.append(NameMapEntry(key, to_torch_shape(shape, transform), collection, path, shape,
                                transform))
    if key == "sem_seg_head.predictor.class_embed.bias":
      num_classes = shape[0] - 1
  if num_classes is None:
    raise ValueError("variables have no predictor/class_embed/bias; not a VideoMaskFormer")
  entries.append(NameMapEntry("criterion.empty_weight", (num_classes + 1,), None, (), (),
                              CONSTANT))
  entries.append(NameMapEntry("criterion._iter", (1,), None, (), (), CONSTANT))
  return entries


def official_shapes(variables_or_config: Any) -> dict[str, tuple[int, ...]]:
  """{official key: PyTorch shape} for a model, like the reference state_dict listing."""
  return {e.official_key: e.official_shape for e in official_name_map(variables_or_config)}


def num_official_parameters(entries: Sequence[NameMapEntry]) -> int:
  """Parameter count as the official figure counts it: trainable 'params' only."""
  return sum(math.prod(e.flax_shape) for e in entries if e.collection == "params")
