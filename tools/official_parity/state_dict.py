"""The official R50 YouTube-VIS 2019 model's state_dict names and shapes, and its optimizer groups.

Writes tests/fixtures/official_r50_ytvis19_state_dict.json from the model that the official
code builds (`detectron2.modeling.build_model` on
configs/youtubevis_2019/video_maskformer2_R50_bs16_8ep.yaml):
  * "state_dict": every `state_dict()` key -> shape (PyTorch layouts);
  * "num_parameters": the number of elements of `model.parameters()`;
  * "optimizer": every trainable parameter -> [lr, weight_decay] of its group in the optimizer of
    `train_net_video.Trainer.build_optimizer` (AdamW), with "base_lr", "weight_decay" and
    "clip_gradients" beside it.
Official python only:

  python -m tools.official_parity.state_dict --stage official --workdir /tmp/op --out tests/fixtures
"""

from __future__ import annotations

import json
import pathlib

from tools.official_parity import common

FIXTURE_NAME = "official_r50_ytvis19_state_dict.json"


def run_official(workdir: pathlib.Path, out_dir: pathlib.Path) -> None:
  del workdir  # nothing from the project: the official model alone
  common.seed_everything(0)
  cfg = common.official_cfg()
  model = common.build_official_model(cfg)
  optimizer, groups = common.official_optimizer_groups(cfg, model)
  state_dict = {k: list(v.shape) for k, v in model.state_dict().items()}
  out = {
      "config": common.R50_YTVIS19_CONFIG,
      "num_parameters": sum(p.numel() for p in model.parameters()),
      "num_state_keys": len(state_dict),
      "state_dict": state_dict,
      "optimizer": {
          "type": type(optimizer).__mro__[1].__name__,  # AdamW under the clipping wrapper
          "base_lr": cfg.SOLVER.BASE_LR,
          "weight_decay": cfg.SOLVER.WEIGHT_DECAY,
          "backbone_multiplier": cfg.SOLVER.BACKBONE_MULTIPLIER,
          "clip_gradients": {
              "type": cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE,
              "value": cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE,
          },
          "groups": groups,
      },
      "provenance": common.official_provenance(),
  }
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / FIXTURE_NAME
  path.write_text(json.dumps(out, indent=1) + "\n")
  print(f"wrote {path} ({len(state_dict)} keys, {len(groups)} trainable parameters)", flush=True)


if __name__ == "__main__":
  common.stage_main(__doc__.splitlines()[0], None, run_official)
