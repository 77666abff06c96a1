"""Deformable attention vs a PyTorch reference written with F.grid_sample."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskfreevis_jax.models.deformable_attention import MSDeformAttn, ms_deform_attn_core


def torch_deform_core(value, shapes, locations, weights):
  """Reference: sample every level with grid_sample, weight, sum over levels and points.

  value [N, S, M, D], locations [N, Lq, M, L, P, 2] in [0, 1], weights [N, Lq, M, L, P].
  """
  n, _, m, d = value.shape
  _, lq, _, num_levels, p, _ = locations.shape
  per_level = torch.split(value, [h * w for h, w in shapes], dim=1)
  grids = locations * 2.0 - 1.0  # grid_sample wants [-1, 1]
  samples = []
  for level, (h, w) in enumerate(shapes):
    # [N, HW, M, D] -> [N * M, D, H, W]
    v = per_level[level].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
    # [N, Lq, M, P, 2] -> [N * M, Lq, P, 2]
    g = grids[:, :, :, level].permute(0, 2, 1, 3, 4).reshape(n * m, lq, p, 2)
    samples.append(
        F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
    )  # [N*M, D, Lq, P]
  stacked = torch.stack(samples, dim=-2).reshape(n * m, d, lq, num_levels * p)
  w = weights.permute(0, 2, 1, 3, 4).reshape(n * m, 1, lq, num_levels * p)
  out = (stacked * w).sum(-1).reshape(n, m * d, lq)
  return out.permute(0, 2, 1)


SHAPES = ((6, 9), (3, 5), (2, 2))


def _random_inputs(seed, n=2, lq=17, m=4, d=8, p=3, spread=1.4):
  rng = np.random.default_rng(seed)
  s = sum(h * w for h, w in SHAPES)
  value = rng.normal(size=(n, s, m, d)).astype(np.float32)
  # Points beyond [0, 1] exercise the zero padding.
  locations = (rng.uniform(size=(n, lq, m, len(SHAPES), p, 2)) * spread - (spread - 1) / 2).astype(
      np.float32
  )
  logits = rng.normal(size=(n, lq, m, len(SHAPES) * p)).astype(np.float32)
  weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  weights = weights.reshape(n, lq, m, len(SHAPES), p).astype(np.float32)
  return value, locations, weights


@pytest.mark.parametrize("seed", [0, 1])
def test_core_matches_grid_sample(seed):
  value, locations, weights = _random_inputs(seed)
  ours = jax.jit(ms_deform_attn_core, static_argnums=1)(value, SHAPES, locations, weights)
  ref = torch_deform_core(
      torch.from_numpy(value), SHAPES, torch.from_numpy(locations), torch.from_numpy(weights)
  ).numpy()
  assert ours.shape == ref.shape == (2, 17, 32)
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5, rtol=1e-5)


def test_core_gradients_match_grid_sample():
  value, locations, weights = _random_inputs(3, lq=5)
  cotangent = np.random.default_rng(4).normal(size=(2, 5, 32)).astype(np.float32)

  def loss(v, loc, w):
    return jnp.sum(ms_deform_attn_core(v, SHAPES, loc, w) * cotangent)

  grads = jax.grad(loss, argnums=(0, 1, 2))(value, locations, weights)
  tv, tl, tw = (torch.tensor(a, requires_grad=True) for a in (value, locations, weights))
  (torch_deform_core(tv, SHAPES, tl, tw) * torch.from_numpy(cotangent)).sum().backward()
  for ours, ref in zip(grads, (tv.grad, tl.grad, tw.grad)):
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), atol=1e-4, rtol=1e-4)


def test_chunked_core_matches_grid_sample(monkeypatch):
  """Force several query chunks (the path large inputs take) and compare values and grads."""
  from maskfreevis_jax.models import deformable_attention

  monkeypatch.setattr(deformable_attention, "_GATHERED_FLOATS_PER_CHUNK", 2 * 4 * 3 * 4 * 8 * 5)
  value, locations, weights = _random_inputs(5)  # Lq = 17 -> chunks of 5 queries, padded
  cotangent = np.random.default_rng(6).normal(size=(2, 17, 32)).astype(np.float32)
  loss = lambda v, loc, w: jnp.sum(ms_deform_attn_core(v, SHAPES, loc, w) * cotangent)
  ours = ms_deform_attn_core(value, SHAPES, locations, weights)
  grads = jax.grad(loss, argnums=(0, 1, 2))(value, locations, weights)
  tv, tl, tw = (torch.tensor(a, requires_grad=True) for a in (value, locations, weights))
  ref = torch_deform_core(tv, SHAPES, tl, tw)
  (ref * torch.from_numpy(cotangent)).sum().backward()
  np.testing.assert_allclose(np.asarray(ours), ref.detach().numpy(), atol=1e-5, rtol=1e-5)
  for g, r in zip(grads, (tv.grad, tl.grad, tw.grad)):
    np.testing.assert_allclose(np.asarray(g), r.numpy(), atol=1e-4, rtol=1e-4)


def test_packed_gather_matches_grid_sample(monkeypatch):
  """The packed 4-corner gather gives the reference values and gradients over several query
  chunks, also for points far outside the maps (spread 3: whole 2x2 cells off the map)."""
  from maskfreevis_jax.models import deformable_attention

  monkeypatch.setattr(deformable_attention, "_GATHERED_FLOATS_PER_CHUNK", 2 * 4 * 3 * 4 * 8 * 5)
  value, locations, weights = _random_inputs(7, spread=3.0)
  cotangent = np.random.default_rng(8).normal(size=(2, 17, 32)).astype(np.float32)
  core = lambda v, loc, w: ms_deform_attn_core(v, SHAPES, loc, w, packed=True)
  ours = core(value, locations, weights)
  grads = jax.grad(lambda *a: jnp.sum(core(*a) * cotangent), argnums=(0, 1, 2))(
      value, locations, weights
  )
  tv, tl, tw = (torch.tensor(a, requires_grad=True) for a in (value, locations, weights))
  ref = torch_deform_core(tv, SHAPES, tl, tw)
  (ref * torch.from_numpy(cotangent)).sum().backward()
  np.testing.assert_allclose(np.asarray(ours), ref.detach().numpy(), atol=1e-5, rtol=1e-5)
  for g, r in zip(grads, (tv.grad, tl.grad, tw.grad)):
    np.testing.assert_allclose(np.asarray(g), r.numpy(), atol=1e-4, rtol=1e-4)


def test_core_rejects_inconsistent_shapes():
  value, locations, weights = _random_inputs(0)
  with pytest.raises(ValueError, match="do not add up"):
    ms_deform_attn_core(value, ((6, 9), (3, 5), (2, 3)), locations, weights)
  with pytest.raises(ValueError, match="levels"):
    ms_deform_attn_core(value, SHAPES[:2], locations, weights)


def torch_msdeform_attn(params, query, reference_points, input_flatten, shapes, m, levels, p):
  """Reference MSDeformAttn forward written with torch ops and our parameters."""
  lin = lambda x, name: F.linear(
      x,
      torch.from_numpy(np.array(params[name]["kernel"]).T.copy()),
      torch.from_numpy(np.array(params[name]["bias"])),
  )
  n, lq, c = query.shape
  value = lin(input_flatten, "value_proj").view(n, -1, m, c // m)
  offsets = lin(query, "sampling_offsets").view(n, lq, m, levels, p, 2)
  weights = F.softmax(lin(query, "attention_weights").view(n, lq, m, levels * p), -1)
  weights = weights.view(n, lq, m, levels, p)
  normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)
  locations = (
      reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
  )
  return lin(torch_deform_core(value, shapes, locations, weights), "output_proj")


def test_module_matches_torch_reference():
  c, m, p = 32, 4, 3
  rng = np.random.default_rng(7)
  s = sum(h * w for h, w in SHAPES)
  query = rng.normal(size=(2, 11, c)).astype(np.float32)
  inputs = rng.normal(size=(2, s, c)).astype(np.float32)
  reference_points = rng.uniform(size=(2, 11, len(SHAPES), 2)).astype(np.float32)
  module = MSDeformAttn(d_model=c, num_levels=len(SHAPES), num_heads=m, num_points=p)
  variables = module.init(jax.random.PRNGKey(0), query, reference_points, inputs, SHAPES)
  # Random (non-initial) offsets and weights so the test covers the projections' layout.
  params = jax.tree.map(
      lambda a: a + 0.3 * jax.random.normal(jax.random.PRNGKey(a.size), a.shape),
      variables["params"],
  )
  ours = module.apply({"params": params}, query, reference_points, inputs, SHAPES)
  ref = torch_msdeform_attn(
      params,
      torch.from_numpy(query),
      torch.from_numpy(reference_points),
      torch.from_numpy(inputs),
      SHAPES,
      m,
      len(SHAPES),
      p,
  )
  np.testing.assert_allclose(np.asarray(ours), ref.numpy(), atol=1e-4, rtol=1e-4)


def test_initial_sampling_offsets_follow_official_grid():
  module = MSDeformAttn(d_model=16, num_levels=2, num_heads=4, num_points=2)
  x = jnp.zeros((1, 3, 16))
  variables = module.init(
      jax.random.PRNGKey(0), x, jnp.zeros((1, 3, 2, 2)), jnp.zeros((1, 5, 16)), ((2, 2), (1, 1))
  )
  bias = np.asarray(variables["params"]["sampling_offsets"]["bias"]).reshape(4, 2, 2, 2)
  # Head h points along angle 2*pi*h/4 scaled so the max |component| is 1; point i at i+1.
  for h in range(4):
    direction = np.array([math.cos(h * math.pi / 2), math.sin(h * math.pi / 2)])
    direction = direction / np.abs(direction).max()
    for point in range(2):
      np.testing.assert_allclose(bias[h, 1, point], direction * (point + 1), atol=1e-6)
  assert not np.any(np.asarray(variables["params"]["sampling_offsets"]["kernel"]))
