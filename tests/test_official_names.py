"""The Flax <-> official state_dict name map, checked against the reference key listing."""

import collections
import math

import numpy as np
import pytest

from maskfreevis_jax.models import get_model_config
from maskfreevis_jax.models import official_names as on


@pytest.fixture(scope="module")
def r50_entries():
  return on.official_name_map(get_model_config("r50"))


def test_r50_map_covers_reference_exactly(r50_entries, reference_state_dict):
  keys = [e.official_key for e in r50_entries]
  duplicates = [k for k, c in collections.Counter(keys).items() if c > 1]
  assert not duplicates
  assert len(reference_state_dict) == 559
  assert set(keys) == set(reference_state_dict), (
      f"missing: {sorted(set(reference_state_dict) - set(keys))[:5]}, "
      f"extra: {sorted(set(keys) - set(reference_state_dict))[:5]}"
  )
  for entry in r50_entries:
    assert list(entry.official_shape) == list(reference_state_dict[entry.official_key]), entry


def test_r50_every_flax_variable_used_once(r50_entries):
  import jax
  import jax.numpy as jnp
  from flax import traverse_util
  from maskfreevis_jax.models import build_model

  model = build_model(get_model_config("r50"))
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.PRNGKey(0), x),
      jax.ShapeDtypeStruct((1, 1, 64, 64, 3), jnp.uint8),
  )
  flat = traverse_util.flatten_dict(variables)
  used = collections.Counter(
      (e.collection,) + e.flax_path for e in r50_entries if e.collection is not None
  )
  assert set(used) == set(flat)
  assert set(used.values()) == {1}
  for entry in r50_entries:
    if entry.collection is not None:
      assert tuple(flat[(entry.collection,) + entry.flax_path].shape) == entry.flax_shape


def test_r50_official_parameter_count(r50_entries, official_r50_reference):
  expected = official_r50_reference["num_parameters"]
  assert on.num_official_parameters(r50_entries) == expected == 43_959_977
  frozen = [e for e in r50_entries if e.collection in ("frozen_params", "batch_stats")]
  assert frozen and all(
      e.official_key.startswith("backbone.") and ".norm." in e.official_key for e in frozen
  )


def test_transforms_and_constants(r50_entries):
  by_key = {e.official_key: e for e in r50_entries}
  assert by_key["backbone.stem.conv1.weight"].transform == on.CONV
  assert by_key["backbone.stem.conv1.weight"].flax_shape == (7, 7, 3, 64)
  attn = by_key[
      "sem_seg_head.predictor.transformer_self_attention_layers.3.self_attn.in_proj_weight"
  ]
  assert attn.transform == on.DENSE and attn.flax_path[-2:] == ("in_proj", "kernel")
  assert by_key["backbone.res3.0.conv2.norm.running_var"].collection == "batch_stats"
  assert by_key["backbone.res3.0.conv2.norm.weight"].collection == "frozen_params"
  assert by_key["sem_seg_head.predictor.query_feat.weight"].transform == on.NONE
  assert by_key["criterion.empty_weight"].transform == on.CONSTANT
  weight = on.constant_value("criterion.empty_weight", num_classes=40)
  assert weight.shape == (41,) and weight[-1] == pytest.approx(0.1) and np.all(weight[:-1] == 1)
  assert on.constant_value("criterion._iter", 40, iteration=7).tolist() == [7.0]
  with pytest.raises(ValueError, match="not a constant"):
    on.constant_value("backbone.stem.conv1.weight", 40)


def test_array_round_trip():
  rng = np.random.default_rng(0)
  conv = rng.normal(size=(3, 5, 4, 6))
  torch_conv = on.to_torch_array(conv, on.CONV)
  assert torch_conv.shape == on.to_torch_shape(conv.shape, on.CONV) == (6, 4, 3, 5)
  assert torch_conv[2, 1, 0, 4] == conv[0, 4, 1, 2]
  np.testing.assert_array_equal(on.from_torch_array(torch_conv, on.CONV), conv)
  dense = rng.normal(size=(7, 3))
  np.testing.assert_array_equal(
      on.from_torch_array(on.to_torch_array(dense, on.DENSE), on.DENSE), dense
  )
  with pytest.raises(ValueError, match="rank-4"):
    on.to_torch_array(dense, on.CONV)
  with pytest.raises(ValueError, match="unknown transform"):
    on.to_torch_shape((3,), "bogus")


def test_r101_and_tiny_maps_are_consistent(reference_state_dict):
  r101 = on.official_shapes(get_model_config("r101"))
  # ResNet-101 differs only by 17 more res4 blocks of 4 tensors x 3 convs + norms.
  extra = set(r101) - set(reference_state_dict)
  assert all(k.startswith("backbone.res4.") for k in extra)
  assert {k.split(".")[2] for k in extra} == {str(i) for i in range(6, 23)}
  assert not set(reference_state_dict) - set(r101)
  for key, shape in reference_state_dict.items():
    assert list(r101[key]) == list(shape)
  tiny = on.official_name_map(get_model_config("tiny"))
  assert tiny[-1].official_key == "criterion._iter"
  assert len({e.official_key for e in tiny}) == len(tiny)


def test_bad_input_is_rejected():
  with pytest.raises(ValueError, match="expects model variables"):
    on.official_name_map(42)
  with pytest.raises(ValueError, match="class_embed"):
    on.official_name_map(
        {"params": {"backbone": {"stem": {"conv1": {"kernel": np.zeros((7, 7, 3, 8))}}}}}
    )


def test_flax_to_official_key_rules():
  assert on.flax_to_official_key("params", ("pixel_decoder", "input_proj_2", "norm", "scale")) == (
      "sem_seg_head.pixel_decoder.input_proj.2.1.weight"
  )
  assert on.flax_to_official_key(
      "batch_stats", ("backbone", "res5_2", "conv3", "norm", "mean")
  ) == ("backbone.res5.2.conv3.norm.running_mean")
  assert on.flax_to_official_key("params", ("pixel_decoder", "adapter_1", "kernel")) == (
      "sem_seg_head.pixel_decoder.adapter_1.weight"
  )
  assert math.prod(on.to_torch_shape((2, 3), on.DENSE)) == 6
