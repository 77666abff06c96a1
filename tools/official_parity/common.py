"""Helpers shared by the official-parity generators.

Each generator module has up to two halves, run by two interpreters:
  * `--stage inputs` with the project's python (jax, flax): makes Flax variables, exports them with
    `maskfreevis_jax.export`, writes batches in the project's format into a work directory;
  * `--stage official` with the official CPU python (torch 2.x, detectron2, the official
    `mask2former_video`): reads the work directory, runs the official code, writes the fixture.
This module imports neither jax nor torch at the top, so both interpreters can import it.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
from typing import Any
from collections.abc import Callable, Mapping, Sequence

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES_DIR = REPO_ROOT / "tests" / "fixtures"
# The extracted official work tree (SysCV/MaskFreeVIS); config paths below are relative to it.
OFFICIAL_SRC = pathlib.Path(os.environ.get("OFFICIAL_MFVIS_SRC", "/tmp/official/src/mfvis"))
R50_YTVIS19_CONFIG = "configs/youtubevis_2019/video_maskformer2_R50_bs16_8ep.yaml"
# Random Flax variables of the R50 fixtures: `export.testing.random_variables(r50, seed)`.
R50_VARIABLES_SEED = 16


# The R50 parity batch (`r50_parity_batch`): 2 clips of 3 frames (the official training forward
# splits a batch of 6 or 3 frames into clips of INPUT.SAMPLING_FRAME_NUM = 3), 64x96 pixels; the
# second clip's frames are 50x70, padded to 64x96 as the official ImageList pads them.
R50_BATCH_SHAPE = (2, 3, 64, 96)
R50_VALID_SIZES = ((64, 96), (50, 70))
R50_BATCH_SEED = 1616


def r50_parity_batch(seed: int = R50_BATCH_SEED) -> dict[str, np.ndarray]:
  """A batch in the project's format: smooth random colour fields with noise per frame.

  Returns:
    frames uint8 [B, T, H, W, 3] (random garbage outside each clip's valid size) and
    image_valid bool [B, H, W].
  """
  rng = np.random.default_rng(seed)
  b, t, h, w = R50_BATCH_SHAPE
  coarse = rng.integers(0, 256, size=(b, 1, h // 16, w // 16, 3))
  frames = np.repeat(np.repeat(np.repeat(coarse, t, 1), 16, 2), 16, 3)
  frames = np.clip(frames + rng.integers(-20, 21, size=frames.shape), 0, 255).astype(np.uint8)
  image_valid = np.zeros((b, h, w), bool)
  for i, (valid_h, valid_w) in enumerate(R50_VALID_SIZES):
    image_valid[i, :valid_h, :valid_w] = True
  garbage = rng.integers(0, 256, size=frames.shape, dtype=np.uint8)
  frames = np.where(image_valid[:, None, :, :, None], frames, garbage)
  return {"frames": frames, "image_valid": image_valid}


def write_r50_inputs(workdir: pathlib.Path) -> None:
  """Project side: random R50 variables exported to `workdir/r50.pth`, and `workdir/inputs.npz`.

  inputs.npz holds the batch of `r50_parity_batch` and `state_dict_sha256`, the exported weights'
  fingerprint (`maskfreevis_jax.export.testing.state_dict_sha256`), which tests check after
  regenerating the variables from R50_VARIABLES_SEED.
  """
  # pylint: disable=g-import-not-at-top
  from maskfreevis_jax import export
  from maskfreevis_jax.export import testing
  from maskfreevis_jax.models import get_model_config
  # pylint: enable=g-import-not-at-top
  config = get_model_config("r50")
  variables = testing.random_variables(config, seed=R50_VARIABLES_SEED)
  state_dict, _ = export.export_state_dict(variables, config)
  export.save_state_dict(state_dict, workdir / "r50.pth")
  np.savez(
      workdir / "inputs.npz",
      **r50_parity_batch(),
      state_dict_sha256=testing.state_dict_sha256(state_dict),
  )


def seed_everything(seed: int) -> None:
  """Seeds python, numpy and (when importable) torch."""
  random.seed(seed)
  np.random.seed(seed)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  torch.manual_seed(seed)


def official_cfg(config_file: str = R50_YTVIS19_CONFIG, opts: Sequence[str] = ()) -> Any:
  """The official detectron2 config as `train_net_video.setup` builds it, on CPU.

  Args:
    config_file: yaml path relative to OFFICIAL_SRC (or absolute).
    opts: extra `KEY VALUE ...` overrides, as on the official command line.

  Returns:
    A frozen detectron2 CfgNode.
  """
  from detectron2.config import get_cfg  # pylint: disable=g-import-not-at-top
  from detectron2.projects.deeplab import add_deeplab_config  # pylint: disable=g-import-not-at-top
  from mask2former import add_maskformer2_config  # pylint: disable=g-import-not-at-top
  from mask2former_video import add_maskformer2_video_config  # pylint: disable=g-import-not-at-top

  cfg = get_cfg()
  add_deeplab_config(cfg)
  add_maskformer2_config(cfg)
  add_maskformer2_video_config(cfg)
  path = pathlib.Path(config_file)
  if not path.is_absolute():
    path = OFFICIAL_SRC / path
  if not path.is_file():
    raise FileNotFoundError(f"official config {path} not found; set OFFICIAL_MFVIS_SRC")
  cfg.merge_from_file(str(path))  # resolves _BASE_ relative to the yaml's folder
  cfg.merge_from_list(list(opts) + ["MODEL.DEVICE", "cpu"])
  cfg.freeze()
  return cfg


def build_official_model(cfg: Any, checkpoint: str | os.PathLike | None = None) -> Any:
  """The official model (`detectron2.modeling.build_model`), loading `checkpoint` strictly.

  Args:
    cfg: from `official_cfg`.
    checkpoint: a `.pth` written by `maskfreevis_jax.export` ({"model": state_dict}), or None.

  Returns:
    The torch module in eval mode.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from detectron2.modeling import build_model  # pylint: disable=g-import-not-at-top

  model = build_model(cfg)
  if checkpoint is not None:
    state_dict = torch.load(checkpoint, map_location="cpu")["model"]
    model.load_state_dict(state_dict, strict=True)
  return model.eval()


def official_optimizer_groups(cfg: Any, model: Any) -> tuple[Any, dict[str, list[float]]]:
  """The release's `build_optimizer` for `model`, and {parameter name: [lr, weight decay]}."""
  import train_net_video  # pylint: disable=g-import-not-at-top

  optimizer = train_net_video.Trainer.build_optimizer(cfg, model)
  name_of = {id(p): n for n, p in model.named_parameters()}
  return optimizer, {
      name_of[id(param)]: [group["lr"], group["weight_decay"]]
      for group in optimizer.param_groups
      for param in group["params"]
  }


def save_fixture(
    path: str | os.PathLike, arrays: Mapping[str, Any], meta: Mapping[str, Any] | None = None
) -> pathlib.Path:
  """Writes a compressed `.npz`: the arrays plus `meta`, a JSON string (provenance, settings)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  out = {k: np.asarray(v) for k, v in arrays.items()}
  if meta is not None:
    out["meta"] = np.asarray(json.dumps(dict(meta), sort_keys=True))
  np.savez_compressed(path, **out)
  print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB, {len(out)} arrays)", flush=True)
  return path


def load_fixture(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Reads a `.npz` written by `save_fixture`: (arrays, meta)."""
  with np.load(path) as data:
    arrays = {k: data[k] for k in data.files}
  meta = json.loads(str(arrays.pop("meta"))) if "meta" in arrays else {}
  return arrays, meta


def official_provenance() -> dict[str, str]:
  """What produced a fixture: torch version and the official tree's location."""
  import torch  # pylint: disable=g-import-not-at-top

  return {"official_src": str(OFFICIAL_SRC), "torch": torch.__version__}


def stage_main(
    description: str,
    make_inputs: Callable[[pathlib.Path], None] | None,
    run_official: Callable[[pathlib.Path, pathlib.Path], None],
    argv: Sequence[str] | None = None,
) -> None:
  """Command line of a generator module: `--stage inputs|official --workdir DIR --out DIR`.

  Args:
    description: the module's one-line summary.
    make_inputs: `f(workdir)`, run by the project's python; None when the case needs no inputs
      from the project.
    run_official: `f(workdir, out_dir)`, run by the official python; writes the fixture(s).
    argv: command line (default sys.argv).
  """
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--stage", choices=("inputs", "official"), required=True)
  parser.add_argument(
      "--workdir", type=pathlib.Path, required=True, help="scratch folder shared by the two stages"
  )
  parser.add_argument(
      "--out",
      type=pathlib.Path,
      default=FIXTURES_DIR,
      help="fixture folder (default tests/fixtures)",
  )
  args = parser.parse_args(argv)
  args.workdir.mkdir(parents=True, exist_ok=True)
  if args.stage == "inputs":
    if make_inputs is not None:
      make_inputs(args.workdir)
  else:
    run_official(args.workdir, args.out)
