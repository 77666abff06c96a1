"""Flax variables -> official PyTorch state_dict: key set, layouts, files, errors."""

import copy
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from maskfreevis_jax import export
from maskfreevis_jax.export import testing as export_testing
from maskfreevis_jax.models import get_model_config
from maskfreevis_jax.models import official_names


@pytest.fixture(scope="module")
def r50_config():
  return get_model_config("r50")


@pytest.fixture(scope="module")
def r50_variables(r50_config):
  return export_testing.random_variables(r50_config, seed=1)


@pytest.fixture(scope="module")
def tiny_config():
  return get_model_config("tiny")


@pytest.fixture(scope="module")
def tiny_variables(tiny_config):
  return export_testing.random_variables(tiny_config, seed=2)


def test_r50_export_has_exactly_the_reference_keys_and_shapes(
    r50_variables, r50_config, reference_state_dict, official_r50_reference
):
  state_dict, summary = export.export_state_dict(
      r50_variables, r50_config, expected_shapes=reference_state_dict
  )
  assert set(state_dict) == set(reference_state_dict)
  assert len(state_dict) == 559 == summary.num_keys
  for key, shape in reference_state_dict.items():
    assert list(state_dict[key].shape) == list(shape), key
    assert state_dict[key].flags["C_CONTIGUOUS"], key
  assert summary.num_parameters == official_r50_reference["num_parameters"]
  assert summary.dtypes == {"float32": 559}
  assert summary.num_elements == sum(int(np.prod(s)) for s in reference_state_dict.values())


def test_r50_export_layouts_and_buffers(r50_variables, r50_config):
  state_dict, _ = export.export_state_dict(r50_variables, r50_config, eos_coef=0.25, iteration=1234)
  params = r50_variables["params"]
  # Conv HWIO -> OIHW: torch weight[o, i, y, x] == flax kernel[y, x, i, o].
  kernel = params["backbone"]["res3_1"]["conv2"]["kernel"]
  weight = state_dict["backbone.res3.1.conv2.weight"]
  assert weight.shape == (128, 128, 3, 3)
  assert weight[5, 7, 2, 0] == kernel[2, 0, 7, 5]
  np.testing.assert_array_equal(weight, np.transpose(kernel, (3, 2, 0, 1)))
  # Packed q/k/v: in_proj_weight rows [0:D] are the query projection, [2D:3D] the value one.
  in_proj = params["predictor"]["transformer_cross_attention_layers_4"]["multihead_attn"]["in_proj"]
  torch_in = state_dict[
      "sem_seg_head.predictor.transformer_cross_attention_layers.4." "multihead_attn.in_proj_weight"
  ]
  assert torch_in.shape == (768, 256)
  np.testing.assert_array_equal(torch_in[512:], in_proj["kernel"][:, 512:].T)
  np.testing.assert_array_equal(
      state_dict[
          "sem_seg_head.predictor.transformer_cross_attention_layers.4.multihead_attn."
          "in_proj_bias"
      ],
      in_proj["bias"],
  )
  # Dense kernels are transposed into Linear weights.
  np.testing.assert_array_equal(
      state_dict["sem_seg_head.pixel_decoder.transformer.encoder.layers.2.linear1.weight"],
      params["pixel_decoder"]["transformer"]["encoder"]["layers_2"]["linear1"]["kernel"].T,
  )
  # Frozen BN: affine from 'frozen_params', statistics from 'batch_stats'.
  np.testing.assert_array_equal(
      state_dict["backbone.res4.5.conv3.norm.weight"],
      r50_variables["frozen_params"]["backbone"]["res4_5"]["conv3"]["norm"]["scale"],
  )
  np.testing.assert_array_equal(
      state_dict["backbone.res4.5.conv3.norm.running_var"],
      r50_variables["batch_stats"]["backbone"]["res4_5"]["conv3"]["norm"]["var"],
  )
  np.testing.assert_array_equal(
      state_dict["sem_seg_head.pixel_decoder.input_proj.1.1.weight"],
      params["pixel_decoder"]["input_proj_1"]["norm"]["scale"],
  )
  expected_weight = np.ones(41, np.float32)
  expected_weight[40] = 0.25
  np.testing.assert_array_equal(state_dict["criterion.empty_weight"], expected_weight)
  assert state_dict["criterion._iter"].tolist() == [1234.0]


def test_export_checkpoint_writes_pth_and_safetensors(tiny_variables, tiny_config, tmp_path):
  expected, _ = export.export_state_dict(tiny_variables, tiny_config)
  pth = export.export_checkpoint(tiny_variables, tiny_config, tmp_path / "out" / "model.pth")
  assert pth.path == str(tmp_path / "out" / "model.pth") and pth.fmt == "pth"
  assert "exported 207 tensors" in str(pth)
  loaded = torch.load(tmp_path / "out" / "model.pth", weights_only=True)
  assert list(loaded) == ["model"]
  assert list(loaded["model"]) == list(expected)
  for key, array in expected.items():
    assert loaded["model"][key].dtype == torch.float32
    np.testing.assert_array_equal(loaded["model"][key].numpy(), array)
  export.export_checkpoint(
      tiny_variables, tiny_config, tmp_path / "model.safetensors", fmt="safetensors"
  )
  from safetensors.numpy import load_file

  flat = load_file(str(tmp_path / "model.safetensors"))
  assert set(flat) == set(expected)
  for key, array in expected.items():
    np.testing.assert_array_equal(flat[key], array)
  assert not list(tmp_path.glob("**/*.tmp"))


def test_exported_state_dict_loads_strictly_into_a_torch_module(tiny_variables, tiny_config):
  """A torch module declaring every expected parameter accepts the export with strict=True."""
  state_dict, _ = export.export_state_dict(tiny_variables, tiny_config)
  expected_shapes = official_names.official_shapes(tiny_config)
  module = torch.nn.Module()
  for key, shape in expected_shapes.items():
    module.register_buffer(key.replace(".", "__"), torch.zeros(shape))
  renamed = {k.replace(".", "__"): torch.from_numpy(v) for k, v in state_dict.items()}
  result = module.load_state_dict(renamed, strict=True)
  assert not result.missing_keys and not result.unexpected_keys


def test_missing_variable_is_named(tiny_variables, tiny_config):
  variables = copy.deepcopy(tiny_variables)
  del variables["params"]["predictor"]["transformer_ffn_layers_1"]["linear2"]
  with pytest.raises(
      export.ExportError, match=r"no source variable: .*ffn_layers\.1\.linear2\.(weight|bias)"
  ):
    export.export_state_dict(variables, tiny_config)


def test_extra_variable_is_named(tiny_variables, tiny_config):
  variables = copy.deepcopy(tiny_variables)
  variables["params"]["predictor"]["extra_head"] = {"kernel": np.zeros((4, 4), np.float32)}
  with pytest.raises(
      export.ExportError, match=r"left unexported\): params/predictor/extra_head/kernel"
  ):
    export.export_state_dict(variables, tiny_config)


def test_variables_of_another_config_are_rejected(tiny_variables):
  with pytest.raises(export.ExportError, match=r"(?s)'r50'.*no source variable"):
    export.export_state_dict(tiny_variables, get_model_config("r50"))
  with pytest.raises(export.ExportError, match=r"shapes differ: .*class_embed"):
    export.export_state_dict(tiny_variables, get_model_config("tiny", num_classes=80))


def test_bad_export_arguments(tiny_variables, tiny_config, tmp_path):
  with pytest.raises(ValueError, match="fmt='onnx'"):
    export.export_checkpoint(tiny_variables, tiny_config, tmp_path / "m.onnx", fmt="onnx")
  with pytest.raises(ValueError, match="is a directory"):
    export.export_checkpoint(tiny_variables, tiny_config, tmp_path)
  with pytest.raises(export.ExportError, match="'params' collection"):
    export.export_state_dict({"weights": {}}, tiny_config)
  abstract = export_testing.abstract_variables(tiny_config)
  with pytest.raises(export.ExportError, match="abstract"):
    export.export_state_dict(abstract, tiny_config)


def test_safetensors_weights_load_without_pytorch():
  """The default run initialises from the committed .safetensors file: no PyTorch needed."""
  weights = pathlib.Path(__file__).resolve().parents[1] / "weights" / "synthetic_stage1.safetensors"
  code = (
      "import sys\n"
      "from maskfreevis_jax.export import torch_import\n"
      f"state = torch_import.read_checkpoint({str(weights)!r})\n"
      "print(len(state), 'torch' in sys.modules)"
  )
  proc = subprocess.run(
      [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  count, torch_loaded = proc.stdout.split()
  assert int(count) > 100 and torch_loaded == "False", proc.stdout
