"""Official / detectron2 checkpoints -> Flax variables: round trips, reports and bad input."""

import os
import pickle

import jax
import numpy as np
import pytest
import torch

from maskfreevis_jax import export
from maskfreevis_jax.export import testing as export_testing
from maskfreevis_jax.models import get_model_config
from maskfreevis_jax.models import official_names


def _flat(tree):
  return {
      "/".join(str(getattr(k, "key", k)) for k in path): leaf
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _assert_bit_identical(actual, expected):
  actual, expected = _flat(actual), _flat(expected)
  assert set(actual) == set(expected)
  for name, value in expected.items():
    got = np.asarray(actual[name])
    assert got.dtype == value.dtype, name
    assert got.shape == value.shape, name
    assert got.tobytes() == np.asarray(value).tobytes(), name


@pytest.fixture(scope="module")
def tiny_config():
  return get_model_config("tiny")


@pytest.fixture(scope="module")
def tiny_variables(tiny_config):
  return export_testing.random_variables(tiny_config, seed=3)


@pytest.fixture(scope="module")
def tiny_init(tiny_config):
  """A second, different set of variables standing in for a fresh initialisation."""
  return export_testing.random_variables(tiny_config, seed=4)


@pytest.fixture(scope="module")
def tiny_state_dict(tiny_variables, tiny_config):
  return export.export_state_dict(tiny_variables, tiny_config)[0]


def test_r50_round_trip_is_bit_identical(tmp_path):
  config = get_model_config("r50")
  shapes = export_testing.abstract_variables(config)
  variables = export_testing.random_variables(shapes, seed=5)
  summary = export.export_checkpoint(variables, config, tmp_path / "r50.pth")
  assert summary.num_parameters == 43_959_977
  init = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  restored, report = export.load_pretrained(tmp_path / "r50.pth", init, config)
  assert len(report.loaded) == 557
  assert not report.missing and not report.shape_mismatched
  assert sorted(report.skipped) == ["criterion._iter", "criterion.empty_weight"]
  assert report.num_loaded_elements == sum(v.size for v in _flat(variables).values())
  _assert_bit_identical(restored, variables)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_tiny_round_trip_is_bit_identical(fmt, tiny_variables, tiny_init, tiny_config, tmp_path):
  path = tmp_path / f"tiny.{fmt}"
  export.export_checkpoint(tiny_variables, tiny_config, path, fmt=fmt)
  restored, report = export.load_pretrained(path, tiny_init, tiny_config)
  assert not report.missing and not report.shape_mismatched
  _assert_bit_identical(restored, tiny_variables)
  # The input variables are not modified.
  assert not np.array_equal(
      tiny_init["params"]["predictor"]["query_feat"]["embedding"],
      tiny_variables["params"]["predictor"]["query_feat"]["embedding"],
  )


def test_detectron2_pkl_with_bare_backbone_names(
    tiny_state_dict, tiny_init, tiny_variables, tmp_path
):
  """An ImageNet backbone converted from torchvision: no 'backbone.' prefix, an fc layer."""
  backbone = {
      k[len("backbone.") :]: v for k, v in tiny_state_dict.items() if k.startswith("backbone.")
  }
  backbone["stem.fc.weight"] = np.zeros((1000, 2048), np.float32)
  backbone["stem.fc.bias"] = np.zeros((1000,), np.float32)
  path = tmp_path / "R-50.pkl"
  with open(path, "wb") as f:
    pickle.dump(
        {"model": backbone, "__author__": "torchvision", "matching_heuristics": True}, f, protocol=2
    )
  restored, report = export.load_pretrained(path, tiny_init)
  assert sorted(report.skipped) == ["stem.fc.bias", "stem.fc.weight"]
  assert len(report.loaded) == len(backbone) - 2
  assert all(k.startswith("backbone.") for k in report.loaded)
  assert report.missing and all(not k.startswith("backbone.") for k in report.missing)
  for collection in ("params", "frozen_params", "batch_stats"):
    _assert_bit_identical(restored[collection]["backbone"], tiny_variables[collection]["backbone"])
  _assert_bit_identical(restored["params"]["predictor"], tiny_init["params"]["predictor"])
  _assert_bit_identical(restored["params"]["pixel_decoder"], tiny_init["params"]["pixel_decoder"])


def test_coco_class_head_is_reported_and_left_initialised(
    tiny_state_dict, tiny_init, tiny_variables, tmp_path
):
  """A COCO Mask2Former checkpoint (81 class outputs) into a YouTube-VIS model (41)."""
  coco = dict(tiny_state_dict)
  coco["sem_seg_head.predictor.class_embed.weight"] = np.ones((81, 64), np.float32)
  coco["sem_seg_head.predictor.class_embed.bias"] = np.ones((81,), np.float32)
  coco["criterion.empty_weight"] = np.ones((81,), np.float32)
  path = tmp_path / "model_final_coco.pkl"
  with open(path, "wb") as f:
    pickle.dump({"model": coco, "__author__": "Mask2Former"}, f)
  restored, report = export.load_pretrained(path, tiny_init, get_model_config("tiny"))
  assert sorted(report.shape_mismatched) == [
      ("sem_seg_head.predictor.class_embed.bias", (81,), (41,)),
      ("sem_seg_head.predictor.class_embed.weight", (81, 64), (41, 64)),
  ]
  assert not report.missing
  assert "class_embed.weight checkpoint (81, 64) vs model (41, 64)" in report.summary()
  _assert_bit_identical(
      restored["params"]["predictor"]["class_embed"],
      tiny_init["params"]["predictor"]["class_embed"],
  )
  _assert_bit_identical(
      restored["params"]["predictor"]["mask_embed"],
      tiny_variables["params"]["predictor"]["mask_embed"],
  )


def test_bare_state_dict_pth_and_model_into_other_num_classes(tiny_state_dict, tmp_path):
  path = tmp_path / "bare.pth"
  torch.save({k: torch.from_numpy(v) for k, v in tiny_state_dict.items()}, path)
  config = get_model_config("tiny", num_classes=25)
  init = export_testing.random_variables(config, seed=6)
  restored, report = export.load_pretrained(path, init, config)
  assert sorted(k for k, _, _ in report.shape_mismatched) == [
      "sem_seg_head.predictor.class_embed.bias",
      "sem_seg_head.predictor.class_embed.weight",
  ]
  np.testing.assert_array_equal(
      restored["params"]["predictor"]["query_embed"]["embedding"],
      official_names.from_torch_array(
          tiny_state_dict["sem_seg_head.predictor.query_embed.weight"], official_names.NONE
      ),
  )


# ---------------------------------------------------------------------------------------------
# Bad input.


def test_missing_file_and_unknown_suffix(tiny_init, tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere.pth"):
    export.load_pretrained(tmp_path / "nowhere.pth", tiny_init)
  (tmp_path / "weights.h5").write_bytes(b"x")
  with pytest.raises(export.CheckpointError, match=r"weights\.h5.*unknown suffix"):
    export.load_pretrained(tmp_path / "weights.h5", tiny_init)


@pytest.mark.parametrize("fmt", ["pkl", "pth", "safetensors"])
def test_truncated_file(fmt, tiny_state_dict, tiny_init, tmp_path):
  path = tmp_path / f"model.{fmt}"
  if fmt == "pkl":
    with open(path, "wb") as f:
      pickle.dump({"model": tiny_state_dict}, f)
  else:
    export.save_state_dict(tiny_state_dict, path, fmt)
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(export.CheckpointError, match=rf"model\.{fmt} cannot be read.*truncated"):
    export.load_pretrained(path, tiny_init)


def test_pickle_of_wrong_structure(tiny_init, tmp_path):
  path = tmp_path / "list.pkl"
  with open(path, "wb") as f:
    pickle.dump([1, 2, 3], f)
  with pytest.raises(export.CheckpointError, match=r"list\.pkl: expected a dict.*found list"):
    export.load_pretrained(path, tiny_init)
  path = tmp_path / "strings.pkl"
  with open(path, "wb") as f:
    pickle.dump({"model": {"backbone.stem.conv1.weight": np.zeros(3), "lr": "0.1"}}, f)
  with pytest.raises(export.CheckpointError, match=r"strings\.pkl: entry 'lr' is a str"):
    export.load_pretrained(path, tiny_init)
  path = tmp_path / "nested.pkl"
  with open(path, "wb") as f:
    pickle.dump({"model": [np.zeros(3)]}, f)
  with pytest.raises(export.CheckpointError, match=r"nested\.pkl: key 'model' holds list"):
    export.load_pretrained(path, tiny_init)


class _RunsCode:

  def __reduce__(self):
    return (os.system, ("touch should_not_exist",))


def test_pickle_with_code_is_refused_without_running_it(tiny_init, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  path = tmp_path / "evil.pkl"
  with open(path, "wb") as f:
    pickle.dump({"model": {"x": _RunsCode()}}, f)
  with pytest.raises(export.CheckpointError, match=r"evil\.pkl.*system is not allowed"):
    export.load_pretrained(path, tiny_init)
  assert not (tmp_path / "should_not_exist").exists()
  path = tmp_path / "evil.pth"
  torch.save({"model": {"x": _RunsCode()}}, path)
  with pytest.raises(export.CheckpointError, match=r"evil\.pth cannot be read"):
    export.load_pretrained(path, tiny_init)
  assert not (tmp_path / "should_not_exist").exists()


def test_checkpoint_of_another_backbone_depth():
  """r101 -> r50 and r50 -> r101: res4 has 23 vs 6 blocks; named by the first offending key."""
  r50 = export_testing.abstract_variables(get_model_config("r50"))
  r101 = export_testing.abstract_variables(get_model_config("r101"))
  # Only names matter for this check, so tiny placeholder arrays stand in for the tensors.
  r101_names = {k: np.zeros(1, np.float32) for k in official_names.official_shapes(r101)}
  with pytest.raises(
      export.CheckpointError,
      match=r"R-101\.pkl is for another backbone: its res4 has 23 blocks, model "
      r"'r50' has 6; first offending key 'backbone\.res4\.6\.",
  ):
    export.load_state_dict_into_variables(r101_names, r50, source="R-101.pkl", model_name="'r50'")
  r50_names = {k: np.zeros(1, np.float32) for k in official_names.official_shapes(r50)}
  with pytest.raises(
      export.CheckpointError,
      match=r"its res4 has 6 blocks, model model has 23; first offending key: "
      r"model key 'backbone\.res4\.6\.",
  ):
    export.load_state_dict_into_variables(r50_names, r101, source="r50.pkl")


def test_nothing_matches(tiny_init, tmp_path):
  path = tmp_path / "other.safetensors"
  export.save_state_dict(
      {"encoder.layer.0.weight": np.zeros((2, 2), np.float32)}, path, "safetensors"
  )
  with pytest.raises(
      export.CheckpointError,
      match=r"other\.safetensors: no tensor matches .*'encoder\.layer\.0\.weight'",
  ):
    export.load_pretrained(path, tiny_init)
  # Same names but every shape differs (a much wider model): also an error.
  wide = {
      k: np.zeros((3,) + tuple(v.shape), np.float32)
      for k, v in export.export_state_dict(tiny_init)[0].items()
  }
  with pytest.raises(export.CheckpointError, match=r"names match with other shapes"):
    export.load_state_dict_into_variables(wide, tiny_init, source="wide.pth")


def test_variables_must_be_the_full_collections(tiny_state_dict, tiny_init):
  with pytest.raises(export.CheckpointError, match=r"m\.pth: `variables` must be .*'backbone'"):
    export.load_state_dict_into_variables(tiny_state_dict, tiny_init["params"], source="m.pth")
