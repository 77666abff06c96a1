"""Full model forward: the official R50 VideoMaskFormer on weights exported from Flax variables.

`--stage inputs` (project python) exports `random_variables(r50, R50_VARIABLES_SEED)` with
`maskfreevis_jax.export` and writes the batch of `common.r50_parity_batch` (2 clips x 3 frames of
64x96, the second clip 50x70 and padded). `--stage official` loads the weights strictly into the
official model (YouTube-VIS 2019 R50 config) and runs its eval forward, `VideoMaskFormer.forward`,
once per clip (in eval mode the official model treats the whole batch as one clip), on the valid
part of the frames: its own normalisation and `ImageList` padding to a multiple of 32. A hook on
`sem_seg_head` records the raw outputs of all 10 predictions. Writes
tests/fixtures/parity_model_forward.npz.
"""

from __future__ import annotations

import pathlib

import numpy as np

from tools.official_parity import common

FIXTURE_NAME = "parity_model_forward.npz"
# pred_masks are stored for these queries only (every layer, clip and frame), to keep the fixture
# small; the queries mix in every decoder layer's self-attention, so an error anywhere shows.
MASK_QUERIES = (0, 14, 28, 42, 57, 71, 85, 99)


def official_raw_outputs(
    model, frames: np.ndarray, valid_size: tuple[int, int]
) -> dict[str, np.ndarray]:
  """One clip through the official eval forward; the head's outputs, predictions stacked.

  Args:
    model: the official VideoMaskFormer in eval mode.
    frames: uint8 [T, H, W, 3] RGB.
    valid_size: (h, w) of the real frame; the rest is cropped off before the official forward.

  Returns:
    pred_logits [L, Q, C + 1] and pred_masks [L, Q, T, h, w] (layer L - 1 is the final one).
  """
  import torch  # pylint: disable=g-import-not-at-top

  height, width = valid_size
  captured = {}
  hook = model.sem_seg_head.register_forward_hook(lambda m, i, out: captured.update(out))
  video = [torch.as_tensor(f[:height, :width]).permute(2, 0, 1).contiguous() for f in frames]
  with torch.no_grad():
    model([{"image": video, "height": height, "width": width}])
  hook.remove()
  layers = list(captured["aux_outputs"]) + [captured]
  return {
      "pred_logits": torch.stack([o["pred_logits"][0] for o in layers]).numpy(),
      "pred_masks": torch.stack([o["pred_masks"][0] for o in layers]).numpy(),
  }


def run_official(workdir: pathlib.Path, out_dir: pathlib.Path) -> None:
  common.seed_everything(0)
  with np.load(workdir / "inputs.npz") as data:
    inputs = {k: data[k] for k in data.files}
  model = common.build_official_model(common.official_cfg(), workdir / "r50.pth")
  logits, masks = [], []
  for clip, valid in zip(inputs["frames"], inputs["image_valid"]):
    valid_size = (int(valid.any(1).sum()), int(valid.any(0).sum()))
    out = official_raw_outputs(model, clip, valid_size)
    logits.append(out["pred_logits"])
    masks.append(out["pred_masks"][:, list(MASK_QUERIES)])
  common.save_fixture(
      out_dir / FIXTURE_NAME,
      {
          "frames": inputs["frames"],
          "image_valid": inputs["image_valid"],
          "pred_logits": np.stack(logits, 1),  # [L, B, Q, C + 1]
          "pred_masks": np.stack(masks, 1),  # [L, B, len(MASK_QUERIES), T, H/4, W/4]
          "mask_queries": np.asarray(MASK_QUERIES, np.int32),
      },
      {
          "config": common.R50_YTVIS19_CONFIG,
          "variables_seed": common.R50_VARIABLES_SEED,
          "state_dict_sha256": str(inputs["state_dict_sha256"]),
          **common.official_provenance(),
      },
  )


if __name__ == "__main__":
  common.stage_main(__doc__.splitlines()[0], common.write_r50_inputs, run_official)
