"""Inference post-processing fixture: the official `inference_video` on this project's outputs.

`--stage inputs` (project python) writes the final-layer outputs of two videos in this project's
layout (`pred_logits` [Q, C + 1], `pred_masks` [Q, T, h, w] at stride 4 of the padded input) with
their resized and original sizes: one unpadded, one whose resized frames (60x90) the official
`ImageList` pads to 64x96. `--stage official` runs the official `VideoMaskFormer.forward` in eval
mode with a stub backbone and head returning those outputs (the upsampling to the padded size, the
crop and the resize to the original size, top-10 and thresholding all run as released) and writes
`tests/fixtures/parity_inference.npz`.
"""

from __future__ import annotations

import pathlib

import numpy as np

from tools.official_parity import common
from tools.official_parity import criterion as criterion_case

SEED = 1603
NUM_FRAMES = 3
# name: (resized frame size before padding, original video size).
CASES = {
    "unpadded": ((64, 96), (100, 150)),
    "padded": ((60, 90), (130, 195)),
}
PADDED_SIZE = (64, 96)  # both resized sizes pad to this with size_divisibility 32


def make_inputs(workdir: pathlib.Path) -> None:
  rng = np.random.default_rng(SEED)
  h, w = PADDED_SIZE[0] // 4, PADDED_SIZE[1] // 4
  arrays = {}
  for name in CASES:
    logits = rng.normal(0.0, 2.0, (criterion_case.NUM_QUERIES, criterion_case.NUM_CLASSES + 1))
    masks = np.empty((criterion_case.NUM_QUERIES, NUM_FRAMES, h, w), np.float32)
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    for q in range(criterion_case.NUM_QUERIES):
      cx, cy = rng.uniform(0, w), rng.uniform(0, h)
      rx, ry = rng.uniform(2, w / 2), rng.uniform(2, h / 2)
      for t in range(NUM_FRAMES):
        d = ((xx - cx - t) / rx) ** 2 + ((yy - cy) / ry) ** 2
        masks[q, t] = 6.0 * (1.0 - d) + rng.normal(0.0, 0.5, (h, w))
    arrays[f"{name}_pred_logits_q"] = criterion_case._quantize(logits)  # pylint: disable=protected-access
    arrays[f"{name}_pred_masks_q"] = criterion_case._quantize(masks)  # pylint: disable=protected-access
  np.savez_compressed(workdir / "inference_inputs.npz", **arrays)


def run_official(workdir: pathlib.Path, out_dir: pathlib.Path) -> None:
  import torch  # pylint: disable=g-import-not-at-top

  with np.load(workdir / "inference_inputs.npz") as data:
    inputs = {k: data[k] for k in data.files}
  model = criterion_case._official_model(num_frames=NUM_FRAMES).eval()  # pylint: disable=protected-access
  arrays = dict(inputs)
  for name, (image_size, original_size) in CASES.items():
    logits = criterion_case.dequantize(inputs[f"{name}_pred_logits_q"])
    masks = criterion_case.dequantize(inputs[f"{name}_pred_masks_q"])
    # The official eval forward takes the first clip of the batch: [1, Q, ...].
    model.sem_seg_head.outputs = {
        "pred_logits": torch.from_numpy(logits[None]),
        "pred_masks": torch.from_numpy(masks[None]),
    }
    frames = [torch.zeros((3,) + image_size, dtype=torch.uint8) for _ in range(NUM_FRAMES)]
    batched = [{"image": frames, "height": original_size[0], "width": original_size[1]}]
    with torch.no_grad():
      out = model(batched)
    order = np.argsort(-np.asarray(out["pred_scores"]), kind="stable")  # official top-k: unsorted
    out_masks = torch.stack(out["pred_masks"]).numpy()[order]
    arrays[f"{name}_scores"] = np.asarray(out["pred_scores"], np.float32)[order]
    arrays[f"{name}_labels"] = np.asarray(out["pred_labels"], np.int32)[order]
    arrays[f"{name}_masks_packed"] = np.packbits(out_masks, axis=-1)
    arrays[f"{name}_sizes"] = np.asarray([image_size, original_size, PADDED_SIZE], np.int32)
  meta = dict(
      common.official_provenance(),
      cases=list(CASES),
      logit_scale=criterion_case.LOGIT_SCALE,
      sizes="rows: resized image size, original size, padded input size",
  )
  common.save_fixture(out_dir / "parity_inference.npz", arrays, meta)


if __name__ == "__main__":
  common.stage_main(__doc__.splitlines()[0], make_inputs, run_official)
