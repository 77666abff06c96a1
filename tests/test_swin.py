"""Swin backbone: parity with the official D2SwinTransformer, presets, names and weights both ways.

The parity fixtures (tests/fixtures/parity_swin_*.npz, official_swinl_ytvis19_state_dict.json)
come from tools/official_parity/swin.py: the official code run on weights exported from
`export.testing.random_variables(preset, seed)`; the tests regenerate those variables and
check the sha256 of the exported tensors before comparing outputs.
"""

import functools
import json
import pickle
import re

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskfreevis_jax import defaults
from maskfreevis_jax import export
from maskfreevis_jax import optimizer as optimizer_lib
from maskfreevis_jax.export import testing
from maskfreevis_jax.models import build_model, get_model_config
from maskfreevis_jax.models import official_names
from maskfreevis_jax.models import swin

from conftest import load_config

PIXEL_MEAN = np.asarray((123.675, 116.28, 103.53), np.float32)
PIXEL_STD = np.asarray((58.395, 57.12, 57.375), np.float32)


def _assert_trees_equal(actual, expected):
  """Same tree structure (jax.tree.map raises otherwise) and bit-identical leaves."""
  jax.tree.map(np.testing.assert_array_equal, actual, expected)


def _fixture(fixtures_dir, name):
  with np.load(fixtures_dir / f"parity_swin_{name}.npz") as data:
    arrays = {k: data[k] for k in data.files}
  return arrays, json.loads(str(arrays.pop("meta")))


def _relative_error(ours, reference):
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  return float(np.abs(ours - reference).max() / max(np.abs(reference).max(), 1e-12))


def _seeded_variables(meta, prefix):
  """The fixture's random variables, after checking they export to the tensors it ran on."""
  config = get_model_config(meta["preset"])
  variables = testing.random_variables(config, seed=meta["seed"])
  state_dict, _ = export.export_state_dict(variables, config)
  assert (
      testing.state_dict_sha256(state_dict, prefix) == meta["sha256"]
  ), "regenerated variables differ from the fixture's weights; rerun tools/official_parity/swin.py"
  return config, variables


@functools.lru_cache(maxsize=None)
def _abstract_variables(preset, **backbone):
  config = get_model_config(preset)
  config.backbone.update(backbone)
  return config, testing.abstract_variables(config)


def _random_variables(preset, seed, **backbone):
  """(config, random variables) of a preset with backbone overrides; shapes traced once."""
  config, shapes = _abstract_variables(preset, **backbone)
  return config, testing.random_variables(shapes, seed)


def test_swin_optimizer_groups_match_official(fixtures_dir):
  """Backbone lr x0.1 and no weight decay on norms and relative position bias tables.

  The official Swin-L groups, by parameter name with the layer / block indices dropped, against
  tiny_swin's (same module names, fewer blocks: one cheap trace instead of Swin-L's).
  """
  with open(fixtures_dir / "official_swinl_ytvis19_state_dict.json") as f:
    reference = json.load(f)["optimizer"]
  official = {}
  for key, group in reference["groups"].items():
    official.setdefault(re.sub(r"\.\d+\.", ".#.", key), set()).add(tuple(group))
  config, shapes = _abstract_variables("tiny_swin")
  train_config = defaults.train_defaults()
  frames = jax.ShapeDtypeStruct((1, 1, 64, 64, 3), jnp.uint8)
  module_types = optimizer_lib.module_types_by_path(
      build_model(config), jax.random.PRNGKey(0), frames
  )
  labels = optimizer_lib.param_labels(shapes["params"], train_config, module_types)
  groups = {
      optimizer_lib.DEFAULT: (1.0, 0.05),
      optimizer_lib.NO_DECAY: (1.0, 0.0),
      optimizer_lib.BACKBONE: (0.1, 0.05),
      optimizer_lib.BACKBONE_NO_DECAY: (0.1, 0.0),
  }
  ours = {}
  for path, label in traverse_util.flatten_dict(labels).items():
    key = re.sub(r"\.\d+\.", ".#.", official_names.flax_to_official_key("params", path))
    ours.setdefault(key, set()).add((reference["base_lr"] * groups[label][0], groups[label][1]))
  assert set(ours) == set(official)
  wrong = {
      k: (sorted(ours[k]), sorted(official[k]))
      for k in ours
      if not np.allclose(sorted(ours[k]), sorted(official[k]))
  }
  assert not wrong, list(wrong.items())[:5]


def test_relative_position_index_by_hand():
  # Window 2, tokens (0,0), (0,1), (1,0), (1,1): (dy + 1) * 3 + (dx + 1).
  expected = [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]]
  np.testing.assert_array_equal(swin.relative_position_index(2), expected)


def test_shifted_window_mask_by_hand():
  # 4x4 map, window 2, shift 1: region rows/cols {0, 1}, {2}, {3}.
  mask = swin.shifted_window_mask(4, 4, window_size=2, shift_size=1)
  assert mask.shape == (4, 4, 4)
  np.testing.assert_array_equal(mask[0], np.zeros((4, 4)))  # rows 0-1 x cols 0-1: one region
  m = swin.SHIFT_MASK_VALUE
  # Window (0, 1): tokens (0,2), (0,3), (1,2), (1,3); columns 2 and 3 are different regions.
  np.testing.assert_array_equal(mask[1], [[0, m, 0, m], [m, 0, m, 0], [0, m, 0, m], [m, 0, m, 0]])
  # Window (1, 1): four different regions.
  np.testing.assert_array_equal(mask[3], np.where(np.eye(4, dtype=bool), 0.0, m))


def test_swint_backbone_matches_official(fixtures_dir):
  """Official D2SwinTransformer (Swin-T) vs ours at 70x102 (not a patch or window multiple)."""
  reference, meta = _fixture(fixtures_dir, "swint_backbone")
  config, variables = _seeded_variables(meta, "backbone.")
  bb = config.backbone
  backbone = swin.SwinTransformer(
      embed_dim=bb.embed_dim,
      depths=tuple(bb.depths),
      num_heads=tuple(bb.num_heads),
      window_size=bb.window_size,
      drop_path_rate=bb.drop_path_rate,
  )
  x = (reference["frames"].astype(np.float32) - PIXEL_MEAN) / PIXEL_STD
  ours = jax.jit(backbone.apply)({"params": variables["params"]["backbone"]}, x)
  assert sorted(ours) == ["res2", "res3", "res4", "res5"]
  for key in ours:
    assert ours[key].shape == reference[key].shape, key
    assert _relative_error(ours[key], reference[key]) < 1e-4, key


@pytest.mark.slow
def test_swinl_model_matches_official(fixtures_dir):
  """Official VideoMaskFormer Swin-L (backbone + heads) vs ours on a 2-frame 64x96 clip."""
  reference, meta = _fixture(fixtures_dir, "swinl_model")
  config, variables = _seeded_variables(meta, "")
  model = build_model(config)
  out = jax.jit(model.apply)(variables, reference["frames"][None])
  assert out["pred_logits"].shape == (10,) + reference["pred_logits"].shape[1:]
  assert _relative_error(out["pred_logits"][:, 0], reference["pred_logits"][:, 0]) < 1e-4
  assert _relative_error(out["pred_masks"][-1], reference["pred_masks_final"]) < 1e-4


def test_swinl_state_dict_and_parameter_count(fixtures_dir):
  with open(fixtures_dir / "official_swinl_ytvis19_state_dict.json") as f:
    reference = json.load(f)
  config, shapes = _abstract_variables("swinl")
  entries = official_names.official_name_map(shapes)
  assert {e.official_key: list(e.official_shape) for e in entries} == reference["state_dict"]
  assert official_names.num_official_parameters(entries) == reference["num_parameters"]
  assert (
      config.decoder.num_queries
      == reference["state_dict"]["sem_seg_head.predictor.query_feat.weight"][0]
      == 200
  )
  index_keys = [
      e.official_key
      for e in entries
      if e.official_key.endswith(official_names.RELATIVE_POSITION_INDEX_SUFFIX)
  ]
  assert sorted(index_keys) == sorted(
      k for k, d in reference["non_float32"].items() if d == "int64"
  )


def _tiny_swin_checkpoint(layout):
  """Exported tiny_swin tensors in one of the three Swin checkpoint layouts."""
  config, source = _random_variables("tiny_swin", 3)
  state_dict, _ = export.export_state_dict(source, config)
  if layout == "mask2former_pkl":
    # model_final_e5f453.pkl style: full model, numpy arrays, COCO class head.
    state_dict["sem_seg_head.predictor.class_embed.weight"] = np.zeros((81, 64), np.float32)
    state_dict["sem_seg_head.predictor.class_embed.bias"] = np.zeros((81,), np.float32)
    return config, source, state_dict
  # ImageNet layout: backbone names without 'backbone.', no output norms, a final norm and a
  # classification head, and the shifted blocks' attn_mask buffers.
  imagenet = {
      k[len("backbone.") :]: v
      for k, v in state_dict.items()
      if k.startswith("backbone.") and not re.match(r"backbone\.norm\d\.", k)
  }
  imagenet.update(
      {
          "norm.weight": np.ones(128, np.float32),
          "norm.bias": np.zeros(128, np.float32),
          "head.weight": np.zeros((1000, 128), np.float32),
          "head.bias": np.zeros(1000, np.float32),
          "layers.0.blocks.1.attn_mask": swin.shifted_window_mask(8, 8, 4, 2),
      }
  )
  return config, source, imagenet


@pytest.mark.parametrize(
    "layout",
    ["mask2former_pkl", "converted_imagenet_pkl", "microsoft_pth"],
    ids=["mask2former_coco_pkl", "convert_swin_to_d2_pkl", "microsoft_pth"],
)
def test_swin_checkpoint_layouts_load(tmp_path, layout):
  import torch  # pylint: disable=g-import-not-at-top

  config, source, state_dict = _tiny_swin_checkpoint(layout)
  if layout == "mask2former_pkl":
    path = tmp_path / "model_final_swin.pkl"
    with open(path, "wb") as f:
      pickle.dump({"model": state_dict, "__author__": "Mask2Former"}, f)
  elif layout == "converted_imagenet_pkl":
    # What tools/convert-pretrained-swin-model-to-d2.py writes: torch tensors, plain pickle.
    path = tmp_path / "swin_imagenet.pkl"
    with open(path, "wb") as f:
      pickle.dump(
          {
              "model": {k: torch.from_numpy(v) for k, v in state_dict.items()},
              "__author__": "third_party",
              "matching_heuristics": True,
          },
          f,
      )
  else:
    path = tmp_path / "swin_imagenet.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in state_dict.items()}}, path)
  _, fresh = _random_variables("tiny_swin", 4)
  loaded, report = export.load_pretrained(path, fresh, config)

  backbone_src = source["params"]["backbone"]
  if layout == "mask2former_pkl":
    _assert_trees_equal(loaded["params"]["backbone"], backbone_src)
    assert [k for k, _, _ in report.shape_mismatched] == [
        "sem_seg_head.predictor.class_embed.bias",
        "sem_seg_head.predictor.class_embed.weight",
    ]
    assert not report.missing
    assert sorted(report.skipped) == ["criterion._iter", "criterion.empty_weight"]
    assert len(report.regenerated) == 8  # one relative_position_index per block
    return
  # Everything of the backbone but its output norms comes from the checkpoint.
  output_norms = {f"norm{i}" for i in range(4)}
  _assert_trees_equal(
      {k: v for k, v in loaded["params"]["backbone"].items() if k not in output_norms},
      {k: v for k, v in backbone_src.items() if k not in output_norms},
  )
  _assert_trees_equal(loaded["params"]["backbone"]["norm0"], fresh["params"]["backbone"]["norm0"])
  assert sorted(report.skipped) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
  assert "layers.0.blocks.1.attn_mask" in report.regenerated and len(report.regenerated) == 9
  assert all(k.startswith("sem_seg_head.") or k.startswith("backbone.norm") for k in report.missing)


# case -> (checkpoint preset, its backbone overrides, model preset)
_MISMATCHES = {
    "resnet_into_swin": ("tiny", {}, "tiny_swin"),
    "swin_into_resnet": ("tiny_swin", {}, "tiny"),
    "swin_depth": ("tiny_swin", {"depths": (2, 2, 4, 2)}, "tiny_swin"),
    "swin_width": ("tiny_swin", {"embed_dim": 32, "num_heads": (2, 2, 4, 8)}, "tiny_swin"),
    "swin_window": ("tiny_swin", {"window_size": 7}, "tiny_swin"),
}


@pytest.mark.parametrize(
    "case, message",
    [
        ("resnet_into_swin", r"holds a ResNet backbone .* has a Swin backbone .*backbone mismatch"),
        ("swin_into_resnet", r"holds a Swin backbone .* has a ResNet backbone .*backbone mismatch"),
        ("swin_depth", r"its layers\.2 has 4 blocks, model 'tiny_swin' has 2"),
        ("swin_width", r"its embed dim is 32, model 'tiny_swin' has 16"),
        ("swin_window", r"its window is 7, model 'tiny_swin' has 4"),
    ],
    ids=["resnet_into_swin", "swin_into_resnet", "swin_depth", "swin_width", "swin_window"],
)
def test_backbone_mismatch_is_an_error(tmp_path, case, message):
  checkpoint_preset, overrides, model_preset = _MISMATCHES[case]
  checkpoint_config, checkpoint_variables = _random_variables(checkpoint_preset, 0, **overrides)
  state_dict, _ = export.export_state_dict(checkpoint_variables, checkpoint_config)
  path = tmp_path / "other.pkl"
  with open(path, "wb") as f:
    pickle.dump({"model": state_dict}, f)
  model_config, variables = _random_variables(model_preset, 1)
  with pytest.raises(export.CheckpointError, match=message):
    export.load_pretrained(path, variables, model_config)


def test_export_writes_regenerated_index_buffers():
  config, variables = _random_variables("tiny_swin", 0)
  state_dict, summary = export.export_state_dict(variables, config)
  key = "backbone.layers.3.blocks.1.attn.relative_position_index"
  assert state_dict[key].dtype == np.int64 and state_dict[key].shape == (16, 16)
  np.testing.assert_array_equal(state_dict[key], swin.relative_position_index(4))
  assert summary.dtypes["int64"] == 8


def _small_swin(**kwargs):
  return swin.SwinTransformer(
      embed_dim=8, depths=(2, 2), num_heads=(1, 2), window_size=3, drop_path_rate=0.5, **kwargs
  )


@pytest.fixture(scope="module")
def small_swin_inputs():
  """(x [4, 20, 22, 3], variables) of `_small_swin()`, shared so each program compiles once."""
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 20, 22, 3))
  return x, jax.jit(_small_swin().init)(jax.random.PRNGKey(1), x)


@functools.partial(jax.jit, static_argnames=("model", "train"))
def _apply(model, variables, x, seed=0, train=False):
  return model.apply(variables, x, train=train, rngs={"dropout": jax.random.PRNGKey(seed)})


def test_drop_path_only_in_training(small_swin_inputs):
  x, variables = small_swin_inputs
  model = _small_swin()
  evaluated = _apply(model, variables, x, seed=1)
  _assert_trees_equal(evaluated, _apply(model, variables, x, seed=2))
  trained = _apply(model, variables, x, seed=1, train=True)
  assert not np.allclose(trained["res3"], evaluated["res3"], atol=1e-3)


def test_bfloat16_compute_close_to_float32(small_swin_inputs):
  x, variables = small_swin_inputs
  ours = _apply(_small_swin(dtype=jnp.bfloat16), variables, x)
  reference = _apply(_small_swin(), variables, x)
  for key in reference:
    assert ours[key].dtype == jnp.bfloat16
    assert _relative_error(ours[key], reference[key]) < 0.05, key


def test_pickled_torch_tensors_become_numpy(tmp_path):
  """Views (offset, strides), int64 and bfloat16 tensors of a plain pickle, without torch."""
  import torch  # pylint: disable=g-import-not-at-top

  base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7
  tensors = {
      "transposed": base.t(),
      "sliced": base[1:3, 2:5],
      "int64": torch.arange(5) * 3,
      "bfloat16": base[0].to(torch.bfloat16),
  }
  path = tmp_path / "tensors.pkl"
  with open(path, "wb") as f:
    pickle.dump({"model": tensors, "__author__": "third_party"}, f)
  arrays = export.read_checkpoint(path)
  for name, tensor in tensors.items():
    expected = tensor.float().numpy() if name == "bfloat16" else tensor.numpy()
    assert arrays[name].dtype == expected.dtype, name
    np.testing.assert_array_equal(arrays[name], expected, err_msg=name)


def test_swinl_recipe_follows_the_release():
  # Hand-copied from the release's swin/video_maskformer2_swin_large_IN21k_384_bs16_8ep.yaml and
  # its bases (video_maskformer2_R50_bs16_8ep_swin.yaml, Base-...-VideoInstanceSegmentation_long).
  config = load_config("maskfreevis:ytvis19_swinl")
  t = config.train
  assert (config.model.name, config.model.decoder.num_queries) == ("swinl", 200)
  assert (
      config.model.backbone.embed_dim,
      tuple(config.model.backbone.depths),
      tuple(config.model.backbone.num_heads),
      config.model.backbone.window_size,
      config.model.backbone.drop_path_rate,
  ) == (192, (2, 2, 18, 2), (6, 12, 24, 48), 12, 0.3)
  assert (t.batch_size, t.lr, t.steps, tuple(t.lr_decay_steps)) == (8, 5e-5, 140000, (75000,))
  assert (t.weight_decay, t.backbone_lr_multiplier, t.clip_grad_norm, t.seed) == (
      0.05,
      0.1,
      0.01,
      29118357,
  )
  assert (config.data.name, config.data.min_size_test, tuple(config.data.min_size_train)) == (
      "ytvis+coco_pseudo",
      480,
      (360, 480),
  )
  assert config.init_from_required == "model_final_e5f453.pkl"
