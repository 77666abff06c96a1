"""Golden values of the mask-free losses, computed by the official release.

Writes tests/fixtures/losses_<case>.npz for each case in CASES: real photographs (scikit-image
sample images) cropped with a small shift per frame, random mask logits, boxes, and what the
official `mask2former_video` code computes from them: the colour similarities
(`get_images_color_similarity`, `get_neighbor_images_patch_color_similarity`) and the three losses
of `VideoSetCriterion.loss_masks_proj` with the given matching. Official python only:

  python -m tools.official_parity.losses --stage official --workdir /tmp/op --out tests/fixtures

Semantics (tests/fixtures/README.md lists the arrays): frames are true RGB; the official training
path converts Lab after reversing the channels (its Lab is computed on BGR when INPUT.FORMAT is
RGB), which these fixtures do not do, so the Lab and similarities are those of the true colours.
"""

from __future__ import annotations

import pathlib

import numpy as np

from tools.official_parity import common

STRIDE = 4
WARMUP_ITERS = 2000  # VideoSetCriterion._warmup_iters

# Per clip: a photograph and the (y, x) corner of its first crop; boxes (x1, y1, x2, y2) at full
# resolution per instance and frame; the queries matched to its instances, in order.
CASES = {
    "tk_basic": dict(
        photos=["astronaut", "coffee"],
        origins=[(0, 0), (100, 100)],
        size=(96, 128),
        num_queries=5,
        warmup_factor=1.0,
        queries=[[3, 1], [2]],
        seed=0,
        boxes=[
            [
                [[8, 12, 60, 80], [10, 14, 64, 82], [12, 16, 68, 84]],
                [[70, 20, 120, 70], [68, 22, 118, 72], [66, 24, 116, 74]],
            ],
            [[[20, 30, 100, 90], [24, 30, 104, 90], [28, 30, 108, 90]]],
        ],
    ),
    "tk_warmup": dict(
        photos=["chelsea"],
        origins=[(0, 0)],
        size=(80, 80),
        num_queries=4,
        warmup_factor=0.25,
        queries=[[0]],
        seed=1,
        boxes=[[[[4, 4, 50, 60], [6, 4, 52, 60], [8, 4, 54, 60]]]],
    ),
}
NUM_FRAMES = 3  # the official TK-Loss pairs (0, 1), (0, 2), (1, 2): three frames a clip


def clip_from_photo(name: str, origin: tuple[int, int], height: int, width: int) -> np.ndarray:
  """[T, H, W, 3] uint8: crops of the photo from `origin` (y, x), shifted (2, 3) px per frame."""
  from skimage import data  # pylint: disable=g-import-not-at-top

  photo = getattr(data, name)()
  y0, x0 = origin
  if photo.shape[0] < y0 + height + 2 * NUM_FRAMES or photo.shape[1] < x0 + width + 3 * NUM_FRAMES:
    raise ValueError(f"photo {name!r} {photo.shape} too small for {height}x{width} at {origin}")
  return np.stack(
      [
          photo[y0 + 2 * t : y0 + 2 * t + height, x0 + 3 * t : x0 + 3 * t + width]
          for t in range(NUM_FRAMES)
      ]
  )


def smooth_logits(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  """Random logits with spatial structure: a coarse N(0, 3) field upsampled 4x, plus N(0, 1)."""
  *lead, h, w = shape
  coarse = rng.normal(0, 3, size=tuple(lead) + (-(-h // 4), -(-w // 4)))
  field = np.repeat(np.repeat(coarse, 4, -2), 4, -1)[..., :h, :w]
  return (field + rng.normal(0, 1, size=shape)).astype(np.float32)


def run_case(case: dict) -> tuple[dict[str, np.ndarray], dict]:
  """Runs the official similarity functions and `loss_masks_proj` on one case."""
  # pylint: disable=g-import-not-at-top
  import torch
  import torch.nn.functional as F
  from mask2former_video import video_maskformer_model as official_model
  from mask2former_video.modeling.criterion import VideoSetCriterion
  from skimage import color
  # pylint: enable=g-import-not-at-top

  height, width = case["size"]
  h, w = height // STRIDE, width // STRIDE
  num_clips = len(case["photos"])
  rng = np.random.default_rng(case["seed"])
  frames = np.stack(
      [clip_from_photo(p, o, height, width) for p, o in zip(case["photos"], case["origins"])]
  )  # B,T,H,W,3
  mask_logits = smooth_logits(rng, (num_clips, case["num_queries"], NUM_FRAMES, h, w))

  # Pooling to stride 4 and Lab as the official training forward does (uint8 truncation), but on
  # the true RGB channels.
  images = torch.as_tensor(frames, dtype=torch.float32).permute(0, 1, 4, 2, 3).flatten(0, 1)
  pooled = F.avg_pool2d(images, kernel_size=STRIDE, stride=STRIDE).byte()
  lab = [
      torch.as_tensor(color.rgb2lab(p.permute(1, 2, 0).numpy()), dtype=torch.float32).permute(
          2, 0, 1
      )
      for p in pooled
  ]
  spatial = [official_model.get_images_color_similarity(x[None], 3, 2) for x in lab]
  temporal = {}
  for a, b in [(0, 1), (0, 2), (1, 2)]:
    temporal[(a, b)] = [
        official_model.get_neighbor_images_patch_color_similarity(
            lab[c * NUM_FRAMES + a][None], lab[c * NUM_FRAMES + b][None], 3, 3
        )
        for c in range(num_clips)
    ]

  # Full-resolution box masks per clip (the targets' "masks"), matched queries per clip.
  targets, indices = [], []
  for c in range(num_clips):
    boxes = np.asarray(case["boxes"][c], np.int64)
    masks = torch.zeros((len(boxes), NUM_FRAMES, height, width))
    for n, t in np.ndindex(len(boxes), NUM_FRAMES):
      x1, y1, x2, y2 = boxes[n, t]
      masks[n, t, y1:y2, x1:x2] = 1.0
    targets.append({"masks": masks, "labels": torch.zeros(len(boxes), dtype=torch.int64)})
    indices.append((torch.as_tensor(case["queries"][c]), torch.arange(len(boxes))))

  criterion = VideoSetCriterion(
      num_classes=40,
      matcher=None,
      weight_dict={},
      eos_coef=0.1,
      losses=["masks"],
      num_points=12544,
      oversample_ratio=3.0,
      importance_sample_ratio=0.75,
  )
  # `loss_masks_proj` advances the counter before using it.
  criterion._iter[0] = case["warmup_factor"] * WARMUP_ITERS - 1  # pylint: disable=protected-access
  num_masks = float(sum(len(b) for b in case["boxes"]))
  with torch.no_grad():
    out = criterion.loss_masks_proj(
        {"pred_masks": torch.as_tensor(mask_logits)},
        targets,
        indices,
        num_masks,
        spatial,
        temporal[(0, 1)],
        temporal[(0, 2)],
        temporal[(1, 2)],
    )
  iteration = criterion._iter.item()  # pylint: disable=protected-access
  warmup_factor = min(iteration / WARMUP_ITERS, 1.0)

  instance_video = np.concatenate([np.full(len(q), c) for c, q in enumerate(case["queries"])])
  box_masks = torch.cat([t["masks"] for t in targets]).flatten(0, 1)[:, None]
  box_masks_stride4 = F.interpolate(box_masks, (h, w), mode="bilinear", align_corners=False)
  arrays = {
      "frames_rgb": frames,
      "frames_rgb_stride4": pooled.permute(0, 2, 3, 1)
      .reshape(num_clips, NUM_FRAMES, h, w, 3)
      .numpy(),
      "lab": torch.stack(lab).reshape(num_clips, NUM_FRAMES, 3, h, w).numpy(),
      "mask_logits": mask_logits,
      "instance_video": instance_video.astype(np.int32),
      "instance_query": np.concatenate(case["queries"]).astype(np.int32),
      "box_masks_stride4": box_masks_stride4.reshape(-1, NUM_FRAMES, h, w).numpy(),
      "spatial_similarity": torch.cat(spatial).reshape(num_clips, NUM_FRAMES, 8, h, w).numpy(),
      "warmup_factor": np.float64(warmup_factor),
  }
  for (a, b), maps in temporal.items():
    arrays[f"temporal_similarity_{a}{b}"] = torch.cat(maps).numpy()
  for name in ("loss_mask_proj", "loss_bound", "loss_bound_neighbor"):
    arrays[name] = np.float64(out[name].item())
  meta = {
      "boxes_xyxy": case["boxes"],
      "matched_queries": case["queries"],
      "photos": case["photos"],
      "photo_origins": case["origins"],
      **common.official_provenance(),
  }
  return arrays, meta


def run_official(workdir: pathlib.Path, out_dir: pathlib.Path) -> None:
  del workdir  # the inputs are made here: photographs and seeded logits need no project code
  common.seed_everything(0)
  for name, case in CASES.items():
    arrays, meta = run_case(case)
    common.save_fixture(out_dir / f"losses_{name}.npz", arrays, meta)


if __name__ == "__main__":
  common.stage_main(__doc__.splitlines()[0], None, run_official)
