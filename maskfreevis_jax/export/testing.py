"""Helpers for export / import tests: random model variables without running `model.init`."""

import hashlib
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maskfreevis_jax.models import build_model


def abstract_variables(model_config: Any) -> Any:
  """Variable shapes of the model (jax.eval_shape of init on a small clip, no compute)."""
  model = build_model(model_config)
  frames = jax.ShapeDtypeStruct((1, 1, 64, 64, 3), jnp.uint8)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), frames)


def random_variables(model_config_or_shapes: Any, seed: int = 0) -> dict:
  """Random numpy variables with the model's structure, scaled to keep activations O(1).

  Kernels ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1), running variances in [0.5, 1.5],
  everything else ~ N(0, 0.5). Unlike the initialisers (zero sampling-offset kernels,
  unit norms) no value is trivially structured, so layout mistakes show up.

  Args:
    model_config_or_shapes: a preset-shaped model config, or a tree of ShapeDtypeStructs.
    seed: numpy seed.

  Returns:
    Nested dict {collection: {...: np.ndarray}}.
  """
  shapes = model_config_or_shapes
  if hasattr(shapes, "backbone") and hasattr(shapes, "decoder"):
    shapes = abstract_variables(shapes)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    shape, dtype = tuple(leaf.shape), leaf.dtype
    if name == "var":
      value = rng.uniform(0.5, 1.5, shape)
    elif name == "kernel":
      value = rng.standard_normal(shape, dtype=np.float32) / math.sqrt(math.prod(shape[:-1]))
    elif name == "scale":
      value = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
    else:
      value = 0.5 * rng.standard_normal(shape, dtype=np.float32)
    return np.asarray(value, dtype=dtype)

  tree = jax.tree_util.tree_map_with_path(fill, shapes)
  return _to_dict(tree)


def _to_dict(tree: Any) -> Any:
  if hasattr(tree, "items"):
    return {k: _to_dict(v) for k, v in tree.items()}
  return tree


def state_dict_sha256(state_dict: Any, prefix: str = "") -> str:
  """sha256 over the sorted keys starting with `prefix`, with each array's dtype, shape and bytes.

  Parity fixtures store it, so a test that regenerates the variables from the seed knows it
  has the weights the official code ran with.
  """
  digest = hashlib.sha256()
  for key in sorted(k for k in state_dict if k.startswith(prefix)):
    array = np.ascontiguousarray(state_dict[key])
    digest.update(key.encode())
    digest.update(str(array.dtype).encode())
    digest.update(np.asarray(array.shape, np.int64).tobytes())
    digest.update(array.tobytes())
  return digest.hexdigest()
