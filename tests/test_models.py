"""VideoMaskFormer: shapes for every preset, parameter count, parity of building blocks with
PyTorch, gradients, attention-mask handling, jit and input validation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskfreevis_jax.models import build_model, get_model_config
from maskfreevis_jax.models import official_names as on
from maskfreevis_jax.models.pixel_decoder import resize_bilinear
from maskfreevis_jax.models.position_encoding import (
    sine_position_encoding_2d,
    sine_position_encoding_3d,
)
from maskfreevis_jax.models.resnet import BottleneckBlock, conv2d
from maskfreevis_jax.models.video_decoder import (
    MultiheadAttention,
    attention_mask_from_predictions,
)


def _abstract_init(model, shape):
  frames = jax.ShapeDtypeStruct(shape, jnp.uint8)
  variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), frames)
  return variables, frames


@pytest.mark.parametrize(
    "preset,shape,num_predictions,queries",
    [
        ("r50", (1, 3, 384, 640, 3), 10, 100),
        ("r101", (2, 2, 128, 192, 3), 10, 100),
        ("tiny", (2, 3, 128, 128, 3), 4, 16),
        ("tiny_fpn", (1, 2, 96, 160, 3), 4, 16),
    ],
)
def test_output_shapes(preset, shape, num_predictions, queries):
  model = build_model(get_model_config(preset))
  variables, frames = _abstract_init(model, shape)
  out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, frames)
  b, t, h, w, _ = shape
  assert out["pred_logits"].shape == (num_predictions, b, queries, 41)
  assert out["pred_masks"].shape == (num_predictions, b, queries, t, h // 4, w // 4)
  assert out["pred_logits"].dtype == out["pred_masks"].dtype == jnp.float32


def test_r50_trainable_parameter_count(official_r50_reference):
  """Exactly the official trainable parameters: the tensors of the official optimizer's groups
  (the official model's `requires_grad` parameters), by name through our name map and by size."""
  official_shapes = official_r50_reference["state_dict"]
  official_trainable = official_r50_reference["optimizer"]["groups"]
  expected = sum(math.prod(official_shapes[k]) for k in official_trainable)
  assert expected == official_r50_reference["num_parameters"]  # the figure the official code logs
  model = build_model(get_model_config("r50"))
  variables, _ = _abstract_init(model, (1, 1, 64, 64, 3))
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(variables["params"]))
  assert count == expected
  ours = {e.official_key: e for e in on.official_name_map(variables) if e.collection == "params"}
  assert set(ours) == set(official_trainable)
  for key in official_trainable:
    assert tuple(ours[key].official_shape) == tuple(official_shapes[key]), key
  # FrozenBN tensors are outside 'params'.
  assert set(variables) == {"params", "frozen_params", "batch_stats"}
  assert "norm" not in variables["params"]["backbone"]["stem"]["conv1"]


@pytest.fixture(scope="module")
def tiny_setup():
  model = build_model(get_model_config("tiny"))
  frames = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 2, 64, 96, 3), dtype=np.uint8))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), frames)
  return model, variables, frames


@pytest.fixture(scope="module")
def tiny_apply(tiny_setup):
  """One compiled forward with image_valid, shared by the tests below."""
  model, _, _ = tiny_setup
  return jax.jit(model.apply)


def test_tiny_forward_jit_and_gradients(tiny_setup, tiny_apply):
  model, variables, frames = tiny_setup
  params = variables["params"]
  others = {k: v for k, v in variables.items() if k != "params"}

  def loss_fn(params):
    out = model.apply({"params": params, **others}, frames)
    # Depends on every prediction so every layer receives gradient.
    return jnp.mean(jax.nn.sigmoid(out["pred_masks"])) + jnp.mean(
        jax.nn.log_softmax(out["pred_logits"])[..., 0]
    )

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  assert np.isfinite(loss)
  leaves = jax.tree_util.tree_leaves_with_path(grads)
  assert all(np.all(np.isfinite(g)) for _, g in leaves)
  norms = {jax.tree_util.keystr(p): float(jnp.linalg.norm(g)) for p, g in leaves}
  for name in (
      "['backbone']['stem']['conv1']['kernel']",
      "['pixel_decoder']['transformer']['encoder']['layers_1']['self_attn']['value_proj']['kernel']",
      "['predictor']['query_feat']['embedding']",
      "['predictor']['transformer_cross_attention_layers_2']['multihead_attn']['in_proj']['kernel']",
  ):
    assert norms[name] > 0, name
  all_valid = jnp.ones((2, 64, 96), bool)
  out = tiny_apply(variables, frames, all_valid)
  assert out["pred_masks"].shape == (4, 2, 16, 2, 16, 24)
  assert np.all(np.isfinite(out["pred_masks"])) and np.all(np.isfinite(out["pred_logits"]))
  # The loss above ran without image_valid: an all-valid mask must give the same outputs.
  expected = jnp.mean(jax.nn.sigmoid(out["pred_masks"])) + jnp.mean(
      jax.nn.log_softmax(out["pred_logits"])[..., 0]
  )
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_padding_content_is_ignored_with_image_valid(tiny_setup, tiny_apply):
  _, variables, frames = tiny_setup
  valid = np.zeros((2, 64, 96), bool)
  valid[:, :48, :80] = True
  noisy = np.asarray(frames).copy()
  noisy[:, :, 48:] = 255
  zeros = np.asarray(frames).copy()
  zeros[:, :, 48:] = 0
  a = tiny_apply(variables, jnp.asarray(noisy), jnp.asarray(valid))
  b = tiny_apply(variables, jnp.asarray(zeros), jnp.asarray(valid))
  np.testing.assert_allclose(a["pred_masks"], b["pred_masks"], atol=1e-5)
  c = tiny_apply(variables, jnp.asarray(noisy), jnp.ones((2, 64, 96), bool))
  assert not np.allclose(a["pred_masks"], c["pred_masks"], atol=1e-3)


def test_bfloat16_compute_keeps_float32_params():
  config = get_model_config("tiny_fpn")
  config.dtype = "bfloat16"
  model = build_model(config)
  frames = jnp.zeros((1, 1, 32, 32, 3), jnp.uint8)
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), frames)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  out = jax.jit(model.apply)(variables, frames)
  assert out["pred_masks"].dtype == jnp.float32
  assert np.all(np.isfinite(out["pred_masks"]))


def test_trainable_batch_norm_option():
  config = get_model_config("tiny_fpn")
  config.backbone.norm = "bn"
  model = build_model(config)
  frames = jnp.asarray(np.random.default_rng(2).integers(0, 256, (1, 1, 32, 32, 3), np.uint8))
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), frames)
  assert "frozen_params" not in variables
  assert "norm" in variables["params"]["backbone"]["stem"]["conv1"]
  train_apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  _, updates = train_apply(variables, frames)
  before = variables["batch_stats"]["backbone"]["stem"]["conv1"]["norm"]["mean"]
  after = updates["batch_stats"]["backbone"]["stem"]["conv1"]["norm"]["mean"]
  assert not np.allclose(before, after)


def test_group_norm_backbone_honours_num_groups():
  """backbone.num_groups reaches every backbone GroupNorm (the tiny stem has 16 channels, which
  the GroupNorm default of 32 groups cannot split)."""
  frames = jnp.asarray(np.random.default_rng(3).integers(0, 256, (1, 2, 32, 32, 3), np.uint8))
  outputs = {}
  for groups in (8, 4):
    config = get_model_config("tiny")
    config.backbone.norm = "gn"
    config.backbone.num_groups = groups
    model = build_model(config)
    if groups == 8:
      variables = jax.jit(model.init)(jax.random.PRNGKey(1), frames)
      assert "frozen_params" not in variables and "batch_stats" not in variables
      assert variables["params"]["backbone"]["stem"]["conv1"]["norm"]["scale"].shape == (16,)
      assert "norm" in variables["params"]["backbone"]["res2_0"]["shortcut"]
    # Same parameters, other grouping: the statistics (hence the outputs) must change.
    outputs[groups] = jax.jit(model.apply)(variables, frames)["pred_masks"]
  assert np.all(np.isfinite(outputs[8]))
  assert not np.allclose(outputs[8], outputs[4])
  config = get_model_config("tiny")
  config.backbone.norm = "gn"
  assert config.backbone.num_groups == 32  # default; 32 groups do not divide 16 channels
  with pytest.raises(ValueError):
    build_model(config).init(jax.random.PRNGKey(1), frames)


def test_bad_inputs_raise_clear_errors(tiny_setup):
  model, variables, _ = tiny_setup
  with pytest.raises(ValueError, match="multiple of 32"):
    model.apply(variables, jnp.zeros((1, 1, 100, 96, 3)))
  with pytest.raises(ValueError, match=r"\[B, T, H, W, 3\]"):
    model.apply(variables, jnp.zeros((1, 64, 96, 3)))
  with pytest.raises(ValueError, match="image_valid"):
    model.apply(variables, jnp.zeros((1, 1, 64, 96, 3)), jnp.ones((1, 64, 64), bool))
  with pytest.raises(ValueError, match="unknown model preset"):
    get_model_config("r18")
  config = get_model_config("tiny")
  config.pixel_decoder.name = "bogus"
  with pytest.raises(ValueError, match="pixel_decoder.name"):
    build_model(config)
  config = get_model_config("tiny")
  del config.decoder
  with pytest.raises(ValueError, match="decoder"):
    build_model(config)


def test_attention_mask_unblocks_fully_masked_rows():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 2, 16, 24)).astype(np.float32)
  logits[0, 1] = -5.0  # query with an empty mask everywhere
  blocked = np.asarray(attention_mask_from_predictions(jnp.asarray(logits), 4, 6))
  assert blocked.shape == (2, 1, 3, 2 * 4 * 6)
  assert not blocked[0, 0, 1].any()  # fully masked row -> attends everywhere
  # Other rows: sigmoid(bilinear resize) < 0.5, resized like F.interpolate.
  ref = (
      F.interpolate(
          torch.from_numpy(logits).flatten(0, 1), size=(4, 6), mode="bilinear", align_corners=False
      )
      .sigmoid()
      .view(2, 3, -1)
      < 0.5
  )
  ref = ref.numpy()
  ref[0, 1] = False
  np.testing.assert_array_equal(blocked[:, 0], ref)
  # A fully blocked row must still give finite attention output.
  mha = MultiheadAttention(features=8, num_heads=2)
  x = jnp.asarray(rng.normal(size=(1, 3, 8)), jnp.float32)
  mem = jnp.asarray(rng.normal(size=(1, 5, 8)), jnp.float32)
  all_blocked = jnp.ones((1, 1, 3, 5), bool)
  variables = mha.init(jax.random.PRNGKey(0), x, mem, mem, all_blocked)
  assert np.all(np.isfinite(mha.apply(variables, x, mem, mem, all_blocked)))


@pytest.mark.parametrize(
    "size_in,size_out",
    [((16, 24), (4, 6)), ((16, 24), (8, 12)), ((16, 24), (2, 3)), ((5, 7), (10, 14))],
)
def test_resize_matches_torch_interpolate(size_in, size_out):
  x = np.random.default_rng(1).normal(size=(2,) + size_in + (3,)).astype(np.float32)
  ours = resize_bilinear(jnp.asarray(x), *size_out)
  ref = (
      F.interpolate(
          torch.from_numpy(x).permute(0, 3, 1, 2),
          size=size_out,
          mode="bilinear",
          align_corners=False,
      )
      .permute(0, 2, 3, 1)
      .numpy()
  )
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5)


def test_multihead_attention_matches_torch_with_packed_weights():
  rng = np.random.default_rng(3)
  d, heads = 16, 4
  q = rng.normal(size=(2, 5, d)).astype(np.float32)
  kv = rng.normal(size=(2, 7, d)).astype(np.float32)
  blocked = rng.uniform(size=(2, 1, 5, 7)) < 0.4
  blocked[..., 0] = False
  mha = MultiheadAttention(features=d, num_heads=heads)
  params = mha.init(jax.random.PRNGKey(0), q, kv, kv)["params"]
  params = jax.tree.map(
      lambda a: a + 0.1 * jax.random.normal(jax.random.PRNGKey(1), a.shape), params
  )
  ours = mha.apply({"params": params}, q, kv + 1.0, kv, jnp.asarray(blocked))
  ref_mha = torch.nn.MultiheadAttention(d, heads)
  with torch.no_grad():
    ref_mha.in_proj_weight.copy_(
        torch.from_numpy(on.to_torch_array(params["in_proj"]["kernel"], on.DENSE))
    )
    ref_mha.in_proj_bias.copy_(torch.from_numpy(np.array(params["in_proj"]["bias"])))
    ref_mha.out_proj.weight.copy_(
        torch.from_numpy(on.to_torch_array(params["out_proj"]["kernel"], on.DENSE))
    )
    ref_mha.out_proj.bias.copy_(torch.from_numpy(np.array(params["out_proj"]["bias"])))
  # torch: sequence-first, mask [B*heads, Q, K] with True = not allowed.
  torch_mask = torch.from_numpy(np.repeat(blocked[:, 0], heads, axis=0))
  ref, _ = ref_mha(
      torch.from_numpy(q).transpose(0, 1),
      torch.from_numpy(kv + 1.0).transpose(0, 1),
      torch.from_numpy(kv).transpose(0, 1),
      attn_mask=torch_mask,
  )
  np.testing.assert_allclose(np.asarray(ours), ref.transpose(0, 1).detach().numpy(), atol=1e-5)


def test_bottleneck_block_matches_torch_conv_semantics():
  """Stride-2 block with converted weights equals torch convs (padding, stride on the 3x3)."""
  rng = np.random.default_rng(4)
  x = rng.normal(size=(1, 10, 14, 8)).astype(np.float32)
  block = BottleneckBlock(features=12, bottleneck_features=4, stride=2)
  variables = block.init(jax.random.PRNGKey(0), x)
  variables = jax.tree.map(
      lambda a: a + 0.2 * jax.random.uniform(jax.random.PRNGKey(a.size), a.shape), variables
  )
  ours = block.apply(variables, x)

  def conv_bn(t, name, stride, padding):
    weight = torch.from_numpy(on.to_torch_array(variables["params"][name]["kernel"], on.CONV))
    t = F.conv2d(t, weight, stride=stride, padding=padding)
    fp, bs = variables["frozen_params"][name]["norm"], variables["batch_stats"][name]["norm"]
    scale = np.array(fp["scale"]) / np.sqrt(np.array(bs["var"]) + 1e-5)
    shift = np.array(fp["bias"]) - np.array(bs["mean"]) * scale
    return t * torch.from_numpy(scale)[:, None, None] + torch.from_numpy(shift)[:, None, None]

  t = torch.from_numpy(x).permute(0, 3, 1, 2)
  y = F.relu(conv_bn(t, "conv1", 1, 0))
  y = F.relu(conv_bn(y, "conv2", 2, 1))
  y = conv_bn(y, "conv3", 1, 0)
  ref = F.relu(y + conv_bn(t, "shortcut", 2, 0)).permute(0, 2, 3, 1).numpy()
  assert ours.shape == ref.shape == (1, 5, 7, 12)
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4)


@pytest.mark.parametrize("kernel_size,stride", [(3, 1), (3, 2), (1, 2), (7, 2)])
def test_conv2d_kernel_gradient_matches_xla(kernel_size, stride):
  rng = np.random.default_rng(kernel_size + stride)
  x = jnp.asarray(rng.normal(size=(2, 12, 10, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, 3, 5)), jnp.float32)
  pad = kernel_size // 2
  reference = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  cotangent = jnp.asarray(rng.normal(size=reference(x, kernel).shape), jnp.float32)
  ours = jax.grad(lambda x, k: jnp.sum(conv2d(x, k, stride, pad) * cotangent), (0, 1))(x, kernel)
  ref = jax.grad(lambda x, k: jnp.sum(reference(x, k) * cotangent), (0, 1))(x, kernel)
  np.testing.assert_allclose(conv2d(x, kernel, stride, pad), reference(x, kernel), atol=1e-5)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def _torch_style_sine(not_mask, num_feats, temperature=10000.0, scale=2 * math.pi):
  """Reference: cumulative-sum positions of an all-valid map [B, H, W] -> [B, H, W, 2F]."""
  y = not_mask.cumsum(1, dtype=torch.float32)
  x = not_mask.cumsum(2, dtype=torch.float32)
  y = y / (y[:, -1:, :] + 1e-6) * scale
  x = x / (x[:, :, -1:] + 1e-6) * scale
  dim_t = temperature ** (2 * (torch.arange(num_feats, dtype=torch.float32) // 2) / num_feats)
  px, py = x[..., None] / dim_t, y[..., None] / dim_t
  px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
  py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
  return torch.cat((py, px), dim=3)


def test_position_encodings_match_reference_formulas():
  ref2d = _torch_style_sine(torch.ones(1, 5, 7, dtype=torch.bool), 8)[0].numpy()
  np.testing.assert_allclose(sine_position_encoding_2d(5, 7, 8), ref2d, atol=1e-5)
  enc3d = sine_position_encoding_3d(3, 5, 7, 8)
  assert enc3d.shape == (3, 5, 7, 16)
  z = torch.arange(1, 4, dtype=torch.float32)
  z = z / (z[-1] + 1e-6) * 2 * math.pi
  dim_t = 10000.0 ** (2 * (torch.arange(16, dtype=torch.float32) // 2) / 16)
  pz = z[:, None] / dim_t
  pz = torch.stack((pz[:, 0::2].sin(), pz[:, 1::2].cos()), dim=2).flatten(1).numpy()
  np.testing.assert_allclose(enc3d, ref2d[None] + pz[:, None, None, :], atol=1e-5)
