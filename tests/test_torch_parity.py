"""Exported tensors in plain PyTorch forwards reproduce the Flax sub-modules (within 1e-4).

Each test writes a small PyTorch forward of one part of the official architecture, fills it
only from the exported state_dict (official names, PyTorch layouts) and compares with the Flax
module applied to its slice of the variables, on the same inputs. Variables are random (not
the initialisers) so that transposes, q/k/v packing and offset layouts cannot hide.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskfreevis_jax import export
from maskfreevis_jax.export import testing as export_testing
from maskfreevis_jax.models import get_model_config
from maskfreevis_jax.models.pixel_decoder import DeformableEncoderLayer, encoder_reference_points
from maskfreevis_jax.models.resnet import ResNet
from maskfreevis_jax.models.video_decoder import (
    CrossAttentionLayer,
    FFNLayer,
    SelfAttentionLayer,
    attention_mask_from_predictions,
)

TOLERANCE = 1e-4


def _close(actual_torch, expected_flax):
  np.testing.assert_allclose(
      actual_torch.detach().numpy(), np.asarray(expected_flax), rtol=TOLERANCE, atol=TOLERANCE
  )


@pytest.fixture(scope="module")
def tiny_config():
  return get_model_config("tiny")


@pytest.fixture(scope="module")
def tiny_variables(tiny_config):
  variables = export_testing.random_variables(tiny_config, seed=7)
  # Offsets of a few pixels, so that samples fall between pixels and off the map edges.
  offsets = variables["params"]["pixel_decoder"]["transformer"]["encoder"]["layers_0"]["self_attn"][
      "sampling_offsets"
  ]
  offsets["bias"] = offsets["bias"] * 4.0
  return variables


@pytest.fixture(scope="module")
def exported(tiny_variables, tiny_config):
  state_dict, _ = export.export_state_dict(tiny_variables, tiny_config)
  return {k: torch.from_numpy(v) for k, v in state_dict.items()}


def _slice(variables, *path):
  out = {}
  for collection, tree in variables.items():
    for part in path:
      if part not in tree:
        tree = None
        break
      tree = tree[part]
    if tree is not None:
      out[collection] = tree
  return out


# ---------------------------------------------------------------------------------------------
# ResNet backbone (detectron2 layout: stride on the 3x3 conv, FrozenBN after every conv).


def _torch_frozen_bn(x, sd, prefix, eps=1e-5):
  scale = sd[prefix + ".weight"] * torch.rsqrt(sd[prefix + ".running_var"] + eps)
  shift = sd[prefix + ".bias"] - sd[prefix + ".running_mean"] * scale
  return x * scale[None, :, None, None] + shift[None, :, None, None]


def _torch_conv_bn(x, sd, prefix, stride=1, relu=False):
  weight = sd[prefix + ".weight"]
  y = F.conv2d(x, weight, stride=stride, padding=weight.shape[-1] // 2)
  y = _torch_frozen_bn(y, sd, prefix + ".norm")
  return F.relu(y) if relu else y


def _torch_resnet(x, sd, block_counts):
  """x [N, 3, H, W] -> {'res2'..'res5'} [N, C, h, w] from official backbone.* tensors."""
  x = _torch_conv_bn(x, sd, "backbone.stem.conv1", stride=2, relu=True)
  x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
  features = {}
  for stage, count in enumerate(block_counts):
    name = f"res{stage + 2}"
    for block in range(count):
      prefix = f"backbone.{name}.{block}"
      stride = 2 if block == 0 and stage > 0 else 1
      if prefix + ".shortcut.weight" in sd:
        shortcut = _torch_conv_bn(x, sd, prefix + ".shortcut", stride=stride)
      else:
        shortcut = x
      y = _torch_conv_bn(x, sd, prefix + ".conv1", relu=True)
      y = _torch_conv_bn(y, sd, prefix + ".conv2", stride=stride, relu=True)
      y = _torch_conv_bn(y, sd, prefix + ".conv3")
      x = F.relu(y + shortcut)
    features[name] = x
  return features


def test_resnet_backbone_parity(tiny_variables, tiny_config, exported):
  bb = tiny_config.backbone
  images = np.random.default_rng(0).standard_normal((2, 64, 96, 3)).astype(np.float32)
  flax_features = ResNet(
      block_counts=tuple(bb.block_counts),
      stem_features=bb.stem_features,
      bottleneck_features=bb.bottleneck_features,
      stride_in_1x1=bb.stride_in_1x1,
      norm=bb.norm,
  ).apply(_slice(tiny_variables, "backbone"), jnp.asarray(images))
  torch_features = _torch_resnet(
      torch.from_numpy(images).permute(0, 3, 1, 2), exported, tuple(bb.block_counts)
  )
  assert set(torch_features) == set(flax_features) == {"res2", "res3", "res4", "res5"}
  for name, value in torch_features.items():
    _close(value.permute(0, 2, 3, 1), flax_features[name])


def test_resnet_with_two_blocks_per_stage_parity():
  """Also blocks without a projection shortcut (identity residual), as in r50's res*.1+."""
  config = get_model_config("tiny")
  config.backbone.block_counts = (2, 1, 2, 1)
  variables = export_testing.random_variables(config, seed=8)
  state_dict = {
      k: torch.from_numpy(v) for k, v in export.export_state_dict(variables, config)[0].items()
  }
  assert "backbone.res2.1.shortcut.weight" not in state_dict
  images = np.random.default_rng(1).standard_normal((1, 64, 64, 3)).astype(np.float32)
  flax_features = ResNet(block_counts=(2, 1, 2, 1), stem_features=16, bottleneck_features=16).apply(
      _slice(variables, "backbone"), jnp.asarray(images)
  )
  torch_features = _torch_resnet(
      torch.from_numpy(images).permute(0, 3, 1, 2), state_dict, (2, 1, 2, 1)
  )
  for name, value in torch_features.items():
    _close(value.permute(0, 2, 3, 1), flax_features[name])


# ---------------------------------------------------------------------------------------------
# One deformable-attention encoder layer of the pixel decoder.


def _torch_linear(x, sd, prefix):
  return F.linear(x, sd[prefix + ".weight"], sd[prefix + ".bias"])


def _torch_layer_norm(x, sd, prefix):
  return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps=1e-5)


def _torch_sample_levels(value, spatial_shapes, locations, weights):
  """Bilinear sampling with grid_sample, weighted sum over levels and points.

  value [N, S, M, Dh]; locations [N, Lq, M, L, P, 2] in [0, 1]; weights [N, Lq, M, L, P].
  Returns [N, Lq, M * Dh].
  """
  n, _, m, dh = value.shape
  lq, num_levels, p = locations.shape[1], locations.shape[3], locations.shape[4]
  samples, start = [], 0
  for level, (h, w) in enumerate(spatial_shapes):
    level_value = value[:, start : start + h * w].permute(0, 2, 3, 1).reshape(n * m, dh, h, w)
    start += h * w
    # grid_sample wants [-1, 1] coordinates, one grid per (image, head).
    grid = (2 * locations[:, :, :, level] - 1).permute(0, 2, 1, 3, 4).reshape(n * m, lq, p, 2)
    samples.append(
        F.grid_sample(level_value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    )  # [N*M, Dh, Lq, P]
  stacked = torch.stack(samples, dim=-2).reshape(n * m, dh, lq, num_levels * p)
  flat_weights = weights.permute(0, 2, 1, 3, 4).reshape(n * m, 1, lq, num_levels * p)
  out = (stacked * flat_weights).sum(-1).reshape(n, m * dh, lq)
  return out.transpose(1, 2)


def _torch_encoder_layer(
    src, pos, reference_points, spatial_shapes, sd, prefix, num_heads, num_points
):
  n, s, d = src.shape
  num_levels = len(spatial_shapes)
  attn = prefix + ".self_attn"
  query = src + pos
  value = _torch_linear(src, sd, attn + ".value_proj").reshape(n, s, num_heads, d // num_heads)
  offsets = _torch_linear(query, sd, attn + ".sampling_offsets").reshape(
      n, s, num_heads, num_levels, num_points, 2
  )
  weights = (
      _torch_linear(query, sd, attn + ".attention_weights")
      .reshape(n, s, num_heads, num_levels * num_points)
      .softmax(-1)
      .reshape(n, s, num_heads, num_levels, num_points)
  )
  # Offsets are in pixels of each level: divide by (width, height).
  size = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=src.dtype)
  locations = (
      reference_points[:, :, None, :, None, :] + offsets / size[None, None, None, :, None, :]
  )
  attended = _torch_linear(
      _torch_sample_levels(value, spatial_shapes, locations, weights), sd, attn + ".output_proj"
  )
  src = _torch_layer_norm(src + attended, sd, prefix + ".norm1")
  hidden = _torch_linear(
      F.relu(_torch_linear(src, sd, prefix + ".linear1")), sd, prefix + ".linear2"
  )
  return _torch_layer_norm(src + hidden, sd, prefix + ".norm2")


def test_deformable_encoder_layer_parity(tiny_variables, tiny_config, exported):
  pd = tiny_config.pixel_decoder
  spatial_shapes = ((6, 8), (3, 4), (2, 2))
  s = sum(h * w for h, w in spatial_shapes)
  rng = np.random.default_rng(2)
  src = rng.standard_normal((2, s, pd.conv_dim)).astype(np.float32)
  pos = rng.standard_normal((2, s, pd.conv_dim)).astype(np.float32)
  reference = encoder_reference_points(spatial_shapes)
  layer = DeformableEncoderLayer(
      d_model=pd.conv_dim,
      ffn_dim=pd.ffn_dim,
      num_levels=len(spatial_shapes),
      num_heads=pd.num_heads,
      num_points=pd.num_points,
  )
  layer_vars = _slice(tiny_variables, "pixel_decoder", "transformer", "encoder", "layers_0")
  flax_out = layer.apply(
      layer_vars, jnp.asarray(src), jnp.asarray(pos), jnp.asarray(reference), spatial_shapes
  )
  torch_out = _torch_encoder_layer(
      torch.from_numpy(src),
      torch.from_numpy(pos),
      torch.from_numpy(reference).expand(2, -1, -1, -1),
      spatial_shapes,
      exported,
      "sem_seg_head.pixel_decoder.transformer.encoder.layers.0",
      pd.num_heads,
      pd.num_points,
  )
  _close(torch_out, flax_out)
  # The parity must come from the weights: a perturbed export no longer matches.
  perturbed = dict(exported)
  key = "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.self_attn.sampling_offsets.weight"
  perturbed[key] = exported[key] + 0.1
  off = _torch_encoder_layer(
      torch.from_numpy(src),
      torch.from_numpy(pos),
      torch.from_numpy(reference).expand(2, -1, -1, -1),
      spatial_shapes,
      perturbed,
      "sem_seg_head.pixel_decoder.transformer.encoder.layers.0",
      pd.num_heads,
      pd.num_points,
  )
  assert np.abs(off.numpy() - np.asarray(flax_out)).max() > 1e-3


# ---------------------------------------------------------------------------------------------
# One video transformer decoder layer: masked cross-attention, self-attention, FFN.


def _torch_mha(sd, prefix, d, num_heads):
  mha = torch.nn.MultiheadAttention(d, num_heads)
  mha.load_state_dict(
      {
          name: sd[f"{prefix}.{name}"]
          for name in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
      },
      strict=True,
  )
  return mha.eval()


def _torch_block_mask(mask_logits, h, w, num_heads):
  """[B, Q, T, H, W] logits -> bool [B * heads, Q, T*h*w], True = may not attend."""
  b, q, t = mask_logits.shape[:3]
  resized = F.interpolate(
      mask_logits.flatten(0, 1), size=(h, w), mode="bilinear", align_corners=False
  )
  blocked = resized.sigmoid().reshape(b, q, t * h * w) < 0.5
  blocked = blocked & ~blocked.all(-1, keepdim=True)
  return blocked.repeat_interleave(num_heads, dim=0)


def _torch_decoder_layer(output, memory, pos, query_pos, attn_mask, sd, layer, d, num_heads):
  """Seq-first tensors as the official decoder: output/query_pos [Q, B, D], memory/pos [K, B, D]."""
  p = "sem_seg_head.predictor"
  cross = _torch_mha(
      sd, f"{p}.transformer_cross_attention_layers.{layer}.multihead_attn", d, num_heads
  )
  attended = cross(output + query_pos, memory + pos, memory, attn_mask=attn_mask)[0]
  output = _torch_layer_norm(
      output + attended, sd, f"{p}.transformer_cross_attention_layers.{layer}.norm"
  )
  after_cross = output
  self_attn = _torch_mha(
      sd, f"{p}.transformer_self_attention_layers.{layer}.self_attn", d, num_heads
  )
  q = output + query_pos
  output = _torch_layer_norm(
      output + self_attn(q, q, output)[0], sd, f"{p}.transformer_self_attention_layers.{layer}.norm"
  )
  after_self = output
  ffn = f"{p}.transformer_ffn_layers.{layer}"
  hidden = _torch_linear(F.relu(_torch_linear(output, sd, ffn + ".linear1")), sd, ffn + ".linear2")
  output = _torch_layer_norm(output + hidden, sd, ffn + ".norm")
  return after_cross, after_self, output


@pytest.mark.parametrize("layer", [0, 2])
def test_video_decoder_layer_parity(layer, tiny_variables, tiny_config, exported):
  dec = tiny_config.decoder
  d, heads, q = dec.hidden_dim, dec.num_heads, dec.num_queries
  b, t, h, w = 2, 3, 4, 5
  rng = np.random.default_rng(3 + layer)
  output = rng.standard_normal((b, q, d)).astype(np.float32)
  query_pos = rng.standard_normal((b, q, d)).astype(np.float32)
  memory = rng.standard_normal((b, t * h * w, d)).astype(np.float32)
  pos = rng.standard_normal((b, t * h * w, d)).astype(np.float32)
  mask_logits = 2.0 * rng.standard_normal((b, q, t, 2 * h, 2 * w)).astype(np.float32)
  mask_logits[0, 1] = -10.0  # a query whose mask is empty attends everywhere
  predictor = _slice(tiny_variables, "predictor")

  blocked = attention_mask_from_predictions(jnp.asarray(mask_logits), h, w)
  torch_blocked = _torch_block_mask(torch.from_numpy(mask_logits), h, w, heads)
  np.testing.assert_array_equal(
      torch_blocked.reshape(b, heads, q, -1).numpy(),
      np.broadcast_to(np.asarray(blocked), (b, heads, q, t * h * w)),
  )
  assert 0.2 < torch_blocked.float().mean() < 0.8

  flax_cross = CrossAttentionLayer(d, heads).apply(
      {"params": predictor["params"][f"transformer_cross_attention_layers_{layer}"]},
      output,
      memory,
      pos,
      query_pos,
      blocked,
  )
  flax_self = SelfAttentionLayer(d, heads).apply(
      {"params": predictor["params"][f"transformer_self_attention_layers_{layer}"]},
      flax_cross,
      query_pos,
  )
  flax_out = FFNLayer(d, dec.ffn_dim).apply(
      {"params": predictor["params"][f"transformer_ffn_layers_{layer}"]}, flax_self
  )

  seq_first = lambda x: torch.from_numpy(x).transpose(0, 1)
  with torch.no_grad():
    torch_cross, torch_self, torch_out = _torch_decoder_layer(
        seq_first(output),
        seq_first(memory),
        seq_first(pos),
        seq_first(query_pos),
        torch_blocked,
        exported,
        layer,
        d,
        heads,
    )
  _close(torch_cross.transpose(0, 1), flax_cross)
  _close(torch_self.transpose(0, 1), flax_self)
  _close(torch_out.transpose(0, 1), flax_out)
