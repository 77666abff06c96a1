"""Rematerialisation (activation checkpointing) policies of the model parts, chosen by name.

A rematerialised block keeps only what its policy saves from the forward pass and recomputes
the rest in the backward pass: less memory for more compute, identical values and gradients.

Policies (config value -> what a block keeps for the backward pass):
  'none': everything (no rematerialisation).
  'full': only the block's inputs (`jax.checkpoint_policies.nothing_saveable`).
  'dots': also the outputs of its matmuls without batch dimensions
          (`dots_with_no_batch_dims_saveable`): Dense layers are not recomputed, the attention
          einsums, norms and elementwise ops are. ResNet convolutions are not matmuls, so for
          the backbone 'dots' is the same as 'full'.
"""

from typing import Any
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax

REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_policy(policy: str, field: str) -> None:
  """Raises a ValueError naming the config `field` when `policy` is not a known name."""
  if policy not in REMAT_POLICIES:
    raise ValueError(f"{field} must be one of {sorted(REMAT_POLICIES)}, got {policy!r}")


def remat_module(module_cls: type, policy: str, static_argnums: Sequence[int] = ()) -> type:
  """`module_cls`, wrapped in `nn.remat` with the named policy unless the policy is 'none'.

  Args:
    module_cls: a Flax module class.
    policy: a key of REMAT_POLICIES.
    static_argnums: positions of static `__call__` arguments, counting `self` as 0.

  Returns:
    A module class with the same parameters and results.
  """
  check_policy(policy, "remat policy")
  if policy == "none":
    return module_cls
  return nn.remat(module_cls, policy=REMAT_POLICIES[policy], static_argnums=tuple(static_argnums))
