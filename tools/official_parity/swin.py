"""Swin fixtures: the official Swin-L model's state_dict listing and forwards of the official code
on weights exported from seeded random Flax variables.

Writes to tests/fixtures/:
  * official_swinl_ytvis19_state_dict.json: every `state_dict()` key -> shape and dtype of the
    official Swin-L YouTube-VIS 2019 model (configs/youtubevis_2019/swin/
    video_maskformer2_swin_large_IN21k_384_bs16_8ep.yaml), its parameter count and the
    optimizer group [lr, weight_decay] of every trainable parameter;
  * parity_swin_<case>.npz for each case in CASES: the official outputs for the exported weights
    (`meta` holds the case, the input size, the seed and the sha256 of the exported tensors, so a
    test that regenerates the variables knows it has the same weights).

Two stages (the project's python makes the weights and inputs, the official python runs them):

  .venv/bin/python -m tools.official_parity.swin --stage inputs --workdir /tmp/op_swin
  cd /tmp/official/src/mfvis && PYTHONPATH=/work/main /tmp/official/python \\
      -m tools.official_parity.swin --stage official --workdir /tmp/op_swin --out /work/main/tests/fixtures
"""

from __future__ import annotations

import json
import pathlib
from typing import Any
from collections.abc import Mapping

import numpy as np

from tools.official_parity import common

SWINL_YTVIS19_CONFIG = (
    "configs/youtubevis_2019/swin/video_maskformer2_swin_large_IN21k_384_bs16_8ep.yaml"
)
STATE_DICT_FIXTURE = "official_swinl_ytvis19_state_dict.json"

# backbone: D2SwinTransformer alone on normalised images [N, 3, H, W];
# model: backbone + sem_seg_head (pixel decoder, video decoder) on one clip of T frames.
# Sizes are not multiples of the window (x patch 4): every stage pads, the shifted blocks mask
# padded windows, patch merging pads odd sizes; 70 x 102 is not even a multiple of the patch.
CASES = {
    "swint_backbone": dict(preset="swint", part="backbone", seed=7, height=70, width=102, frames=1),
    "swinl_model": dict(preset="swinl", part="model", seed=11, height=64, width=96, frames=2),
}
# MODEL.SWIN overrides that turn the Swin-L config into the preset's backbone.
_SWIN_OPTS = {
    "swint": [
        "MODEL.SWIN.EMBED_DIM",
        "96",
        "MODEL.SWIN.DEPTHS",
        "[2, 2, 6, 2]",
        "MODEL.SWIN.NUM_HEADS",
        "[3, 6, 12, 24]",
        "MODEL.SWIN.WINDOW_SIZE",
        "7",
        "MODEL.SWIN.PRETRAIN_IMG_SIZE",
        "224",
    ],
    "swinl": [],
}


def case_frames(case: Mapping[str, Any]) -> np.ndarray:
  """uint8 [T, H, W, 3]: smooth random colour fields plus noise (seeded by the case)."""
  rng = np.random.default_rng(case["seed"] + 1000)
  t, h, w = case["frames"], case["height"], case["width"]
  coarse = rng.uniform(0, 255, size=(t, -(-h // 8), -(-w // 8), 3))
  field = np.repeat(np.repeat(coarse, 8, 1), 8, 2)[:, :h, :w]
  return np.clip(field + rng.normal(0, 20, size=field.shape), 0, 255).astype(np.uint8)


def case_state_dict(case: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The official state_dict exported from `export.testing.random_variables(preset, seed)`."""
  from maskfreevis_jax import export  # pylint: disable=g-import-not-at-top
  from maskfreevis_jax.export import testing  # pylint: disable=g-import-not-at-top
  from maskfreevis_jax.models import get_model_config  # pylint: disable=g-import-not-at-top

  config = get_model_config(case["preset"])
  variables = testing.random_variables(config, seed=case["seed"])
  state_dict, _ = export.export_state_dict(variables, config)
  return state_dict


def make_inputs(workdir: pathlib.Path) -> None:
  from maskfreevis_jax import export  # pylint: disable=g-import-not-at-top
  from maskfreevis_jax.export import testing  # pylint: disable=g-import-not-at-top

  for name, case in CASES.items():
    state_dict = case_state_dict(case)
    prefix = "backbone." if case["part"] == "backbone" else ""
    state_dict = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
    export.save_state_dict(state_dict, workdir / f"{name}.pth")
    (workdir / f"{name}.json").write_text(
        json.dumps(
            {"sha256": testing.state_dict_sha256(state_dict), "num_tensors": len(state_dict)}
        )
    )
    print(f"{name}: {len(state_dict)} tensors", flush=True)


def _normalised(frames: np.ndarray, cfg: Any) -> Any:
  import torch  # pylint: disable=g-import-not-at-top

  x = torch.from_numpy(frames.astype(np.float32)).permute(0, 3, 1, 2)
  mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(cfg.MODEL.PIXEL_STD).view(1, 3, 1, 1)
  return (x - mean) / std


def _write_state_dict_listing(out_dir: pathlib.Path) -> None:
  import torch  # pylint: disable=g-import-not-at-top

  common.seed_everything(0)
  cfg = common.official_cfg(SWINL_YTVIS19_CONFIG)
  model = common.build_official_model(cfg)
  _, groups = common.official_optimizer_groups(cfg, model)
  state = model.state_dict()
  out = {
      "config": SWINL_YTVIS19_CONFIG,
      "num_parameters": sum(p.numel() for p in model.parameters()),
      "num_state_keys": len(state),
      "state_dict": {k: list(v.shape) for k, v in state.items()},
      "non_float32": {
          k: str(v.dtype).replace("torch.", "")
          for k, v in state.items()
          if v.dtype != torch.float32
      },
      "optimizer": {
          "base_lr": cfg.SOLVER.BASE_LR,
          "weight_decay": cfg.SOLVER.WEIGHT_DECAY,
          "backbone_multiplier": cfg.SOLVER.BACKBONE_MULTIPLIER,
          "groups": groups,
      },
      "provenance": common.official_provenance(),
  }
  path = out_dir / STATE_DICT_FIXTURE
  path.write_text(json.dumps(out, indent=1) + "\n")
  print(f"wrote {path} ({len(state)} keys, {out['num_parameters']:,} parameters)", flush=True)


def run_official(workdir: pathlib.Path, out_dir: pathlib.Path) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  from mask2former.modeling.backbone.swin import D2SwinTransformer  # pylint: disable=g-import-not-at-top

  out_dir.mkdir(parents=True, exist_ok=True)
  _write_state_dict_listing(out_dir)
  for name, case in CASES.items():
    common.seed_everything(case["seed"])
    cfg = common.official_cfg(SWINL_YTVIS19_CONFIG, _SWIN_OPTS[case["preset"]])
    state_dict = torch.load(workdir / f"{name}.pth", map_location="cpu")["model"]
    info = json.loads((workdir / f"{name}.json").read_text())
    frames = case_frames(case)
    x = _normalised(frames, cfg)
    arrays = {"frames": frames}
    with torch.no_grad():
      if case["part"] == "backbone":
        backbone = D2SwinTransformer(cfg, None)
        backbone.eval()  # its train() override returns None, so no chaining
        backbone.load_state_dict(
            {k[len("backbone.") :]: v for k, v in state_dict.items()}, strict=True
        )
        for key, value in backbone(x).items():
          arrays[key] = value.permute(0, 2, 3, 1).numpy()  # NHWC like the Flax backbone
      else:
        model = common.build_official_model(cfg)
        model.load_state_dict(state_dict, strict=True)
        outputs = model.sem_seg_head(model.backbone(x))  # eval: the T frames form one clip
        arrays["pred_logits"] = torch.stack(
            [o["pred_logits"] for o in outputs["aux_outputs"]] + [outputs["pred_logits"]]
        ).numpy()
        arrays["pred_masks_final"] = outputs["pred_masks"].numpy()  # [1, Q, T, H/4, W/4]
    meta = dict(
        case,
        name=name,
        sha256=info["sha256"],
        num_tensors=info["num_tensors"],
        config=SWINL_YTVIS19_CONFIG,
        swin_opts=_SWIN_OPTS[case["preset"]],
        **common.official_provenance(),
    )
    common.save_fixture(out_dir / f"parity_swin_{name}.npz", arrays, meta)


if __name__ == "__main__":
  common.stage_main(__doc__.splitlines()[0], make_inputs, run_official)
