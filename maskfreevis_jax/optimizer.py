"""AdamW with the official Mask2Former/MaskFreeVIS parameter groups and schedule.

The official recipe (detectron2 `build_optimizer` in MaskFreeVIS `train_net_video.py`):
  * AdamW, base lr 1e-4, weight decay 0.05, betas (0.9, 0.999), eps 1e-8;
  * every parameter of the backbone trains at `lr * BACKBONE_MULTIPLIER` (0.1); since torch's AdamW
    multiplies the decoupled weight decay by the group lr, the backbone's decay is scaled too;
  * no weight decay on normalisation layers (WEIGHT_DECAY_NORM = 0) nor on embedding tables
    (WEIGHT_DECAY_EMBED = 0);
  * full-model gradient clipping by global L2 norm (CLIP_VALUE 0.01) before the AdamW step;
  * WarmupMultiStepLR: linear warm-up from `warmup_factor * lr`, then x `lr_decay_factor` at each
    step of `lr_decay_steps`.
Frozen parameters (FrozenBatchNorm lives outside 'params' in our models; anything matched by
`frozen_regex` besides) get neither gradient (they do not count in the clipping norm) nor update.
"""

from __future__ import annotations

import re
from typing import Any
from collections.abc import Mapping

import flax.linen as nn
import jax
import ml_collections
import optax

# Parameter-group labels.
DEFAULT = "default"
NO_DECAY = "no_decay"
BACKBONE = "backbone"
BACKBONE_NO_DECAY = "backbone_no_decay"
FROZEN = "frozen"

# Flax module types whose parameters get no weight decay (as detectron2's norm_module_types).
NORM_MODULE_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm, nn.RMSNorm)
EMBED_MODULE_TYPES = (nn.Embed,)


def learning_rate_schedule(train_config: ml_collections.ConfigDict) -> optax.Schedule:
  """detectron2's WarmupMultiStepLR as an optax schedule.

  lr(step) = lr * warm-up factor (linear from `warmup_factor` to 1 over `warmup_steps`) *
  `lr_decay_factor` ** (number of `lr_decay_steps` <= step).
  """
  warmup_steps = int(train_config.warmup_steps)
  # A boundary b counts from step b on in both (detectron2's bisect_right).
  decays = optax.piecewise_constant_schedule(
      float(train_config.lr),
      {int(s): float(train_config.lr_decay_factor) for s in train_config.lr_decay_steps},
  )
  if warmup_steps <= 0:
    return decays
  # A ramp from 0 (not a schedule from the factor to 1): no float32 cancellation at step 0.
  factor = float(train_config.warmup_factor)
  ramp = optax.linear_schedule(0.0, 1.0 - factor, warmup_steps)
  return lambda step: (factor + ramp(step)) * decays(step)


def module_types_by_path(model: nn.Module, *init_args, **init_kwargs) -> dict[str, type]:
  """Maps every submodule's '/'-joined path to its class, tracing `model.init` abstractly.

  Used to find normalisation and embedding layers by type (not by name), as detectron2 does.
  """
  types: dict[str, type] = {}

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if module.scope is not None:
      types["/".join(module.scope.path)] = type(module)
    return next_fun(*args, **kwargs)

  # Array-like leaves (arrays, ShapeDtypeStructs, keys) are traced; the rest (flags) stay static.
  leaves, treedef = jax.tree.flatten((init_args, init_kwargs))
  is_array = [hasattr(x, "shape") and hasattr(x, "dtype") for x in leaves]

  def init(*array_leaves):
    it = iter(array_leaves)
    args, kwargs = jax.tree.unflatten(
        treedef, [next(it) if a else x for x, a in zip(leaves, is_array)]
    )
    with nn.intercept_methods(interceptor):
      return model.init(*args, **kwargs)

  jax.eval_shape(init, *[x for x, a in zip(leaves, is_array) if a])
  return types


def param_labels(
    params: Any,
    train_config: ml_collections.ConfigDict,
    module_types: Mapping[str, type] | None = None,
) -> Any:
  """Labels every parameter with its optimizer group (a pytree of strings shaped like params).

  Args:
    params: the 'params' collection (pytree of arrays or ShapeDtypeStructs).
    train_config: `config.train` (`defaults.train_defaults` lists its fields).
    module_types: optional output of `module_types_by_path`; parameters owned directly by a norm
      or embedding module get no weight decay.
  """
  backbone_re = re.compile(train_config.backbone_regex) if train_config.backbone_regex else None
  no_decay_re = re.compile(train_config.no_decay_regex) if train_config.no_decay_regex else None
  frozen_re = re.compile(train_config.frozen_regex) if train_config.frozen_regex else None
  module_types = module_types or {}

  def label(path, _):
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    if frozen_re is not None and frozen_re.search(name):
      return FROZEN
    owner = module_types.get(name.rsplit("/", 1)[0] if "/" in name else "")
    no_decay = owner is not None and issubclass(owner, NORM_MODULE_TYPES + EMBED_MODULE_TYPES)
    if owner is not None and "Frozen" in owner.__name__:
      return FROZEN
    no_decay = no_decay or bool(no_decay_re is not None and no_decay_re.search(name))
    in_backbone = bool(backbone_re is not None and backbone_re.search(name))
    if in_backbone:
      return BACKBONE_NO_DECAY if no_decay else BACKBONE
    return NO_DECAY if no_decay else DEFAULT

  return jax.tree_util.tree_map_with_path(label, params)


def create_optimizer(
    train_config: ml_collections.ConfigDict, labels: Any
) -> optax.GradientTransformation:
  """Builds the full gradient transformation (frozen masking, clipping, grouped AdamW, schedule).

  Args:
    train_config: `config.train` (`defaults.train_defaults` lists its fields).
    labels: output of `param_labels` for the params the optimizer will see.
  """
  schedule = learning_rate_schedule(train_config)

  def adamw(lr_multiplier: float, weight_decay: float) -> optax.GradientTransformation:
    parts = [
        optax.scale_by_adam(
            b1=train_config.adam_b1, b2=train_config.adam_b2, eps=train_config.adam_eps
        )
    ]
    if weight_decay > 0:
      parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.scale_by_learning_rate(lambda step: lr_multiplier * schedule(step)))
    return optax.chain(*parts)

  backbone_mult = float(train_config.backbone_lr_multiplier)
  no_decay_wd = float(train_config.weight_decay_norm)  # norms and embeddings share 0.0 officially.
  if float(train_config.weight_decay_embed) != no_decay_wd:
    raise ValueError(
        "config.train.weight_decay_embed must equal weight_decay_norm "
        f"(got {train_config.weight_decay_embed} and {train_config.weight_decay_norm})"
    )
  groups = {
      DEFAULT: adamw(1.0, float(train_config.weight_decay)),
      NO_DECAY: adamw(1.0, no_decay_wd),
      BACKBONE: adamw(backbone_mult, float(train_config.weight_decay)),
      BACKBONE_NO_DECAY: adamw(backbone_mult, no_decay_wd),
      FROZEN: optax.set_to_zero(),
  }
  frozen_mask = jax.tree.map(lambda l: l == FROZEN, labels)
  parts = [optax.masked(optax.set_to_zero(), frozen_mask)]
  if train_config.clip_grad_norm and train_config.clip_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(float(train_config.clip_grad_norm)))
  parts.append(optax.multi_transform(groups, labels))
  return optax.chain(*parts)


def label_counts(labels: Any, params: Any) -> dict[str, int]:
  """Number of scalar parameters in each group (for logging)."""
  counts: dict[str, int] = {}
  for label, p in zip(jax.tree.leaves(labels), jax.tree.leaves(params)):
    counts[label] = counts.get(label, 0) + int(p.size)
  return counts


__all__ = [
    "learning_rate_schedule",
    "param_labels",
    "create_optimizer",
    "module_types_by_path",
    "label_counts",
    "DEFAULT",
    "NO_DECAY",
    "BACKBONE",
    "BACKBONE_NO_DECAY",
    "FROZEN",
]
