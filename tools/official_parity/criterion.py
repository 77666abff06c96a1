"""Criterion and matcher fixtures: the official `VideoSetCriterion` on this project's outputs.

Two cases, one fixture each:
  * `parity_criterion_box.npz`: box mode (YouTube-VIS: T = 3, the official box matcher and the
    mask-free losses), 10 supervised layers, 2 clips;
  * `parity_criterion_mask.npz`: mask mode (the COCO pseudo clips of the joint recipe: T = 4, the
    Mask2Former matcher and point-sampled BCE + dice).

The inputs (model outputs in this project's `[L, B, Q, ...]` layout and a batch in its format) are
made by `--stage inputs`; `--stage official` runs the official `VideoMaskFormer.forward` in training
mode with its backbone and head replaced by stubs that return those outputs, so `prepare_targets`,
the matcher, the criterion and the `weight_dict` all run as released.

The official code samples random points (the matcher: 20,000 uniform points per clip; mask mode's
loss: importance-sampled points). For a deterministic comparison the generator also runs it with
the points at the centres of the stride-4 mask cells, which makes its costs and losses exactly the
dense ones this project computes (a target sampled there is the bilinear 4x downsampling). The
random-point results are stored too, to measure that design difference.

Usage, from the repository root (`bash tools/official_parity/make_fixtures.sh criterion` runs both):
  .venv/bin/python -m tools.official_parity.criterion --stage inputs --workdir /tmp/parity
  /tmp/official/python -m tools.official_parity.criterion --stage official --workdir /tmp/parity
"""

from __future__ import annotations

import contextlib
import json
import pathlib
from typing import Any

import numpy as np

from tools.official_parity import common

NUM_LAYERS = 10
NUM_CLASSES = 40
NUM_QUERIES = 16
HEIGHT, WIDTH = 64, 96
STRIDE = 4
# Logits are stored as int8 multiples of 1/16: exact in float32 and float16-sized.
LOGIT_SCALE = 16.0
# Official step counters of the three box-mode calls: the criterion's `_iter` before each call.
# The third starts 10 layer calls short of the 2000-call warm-up, so it crosses the cap.
WARMUP_START_ITERS = (0, 10, 1990)
BOX_SEED, MASK_SEED = 1601, 1602
# Mask mode's point-sampled loss with given points, and its importance sampling on given draws.
LOSS_POINTS = 256
IMPORTANCE_ROWS, IMPORTANCE_POINTS, OVERSAMPLE, IMPORTANCE_RATIO = 4, 64, 3.0, 0.75


def _quantize(x: np.ndarray) -> np.ndarray:
  return np.clip(np.round(x * LOGIT_SCALE), -128, 127).astype(np.int8)


def dequantize(q: np.ndarray) -> np.ndarray:
  """int8 stored logits -> float32 values (exact)."""
  return q.astype(np.float32) / LOGIT_SCALE


def _frames(
    rng: np.random.Generator, boxes: np.ndarray, box_valid: np.ndarray, num_frames: int
) -> np.ndarray:
  """uint8 [T, H, W, 3]: a smooth background with textured rectangles at the given boxes."""
  yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
  base = np.stack([60 + xx, 40 + 2 * yy, 200 - xx], -1).astype(np.float32)
  frames = np.repeat(base[None], num_frames, 0)
  for n in range(boxes.shape[0]):
    colour = rng.integers(0, 256, 3).astype(np.float32)
    for t in range(num_frames):
      if box_valid[n, t]:
        x1, y1, x2, y2 = boxes[n, t].astype(int)
        frames[t, y1:y2, x1:x2] = colour
  frames += rng.normal(0.0, 6.0, frames.shape)
  return np.clip(np.round(frames), 0, 255).astype(np.uint8)


def _blob_logits(rng: np.random.Generator, box: np.ndarray | None, num_frames: int) -> np.ndarray:
  """[T, h, w] logits of one query: a soft rectangle near `box` (or anywhere), plus noise."""
  h, w = HEIGHT // STRIDE, WIDTH // STRIDE
  yy, xx = np.mgrid[0:h, 0:w] + 0.5
  out = np.empty((num_frames, h, w), np.float32)
  if box is None:
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    rx, ry = rng.uniform(1.5, w / 3), rng.uniform(1.5, h / 3)
  for t in range(num_frames):
    if box is not None:
      x1, y1, x2, y2 = box[t] / STRIDE
      cx = (x1 + x2) / 2 + rng.normal(0, 1.0)
      cy = (y1 + y2) / 2 + rng.normal(0, 1.0)
      rx = max((x2 - x1) / 2 * rng.uniform(0.6, 1.4), 1.0)
      ry = max((y2 - y1) / 2 * rng.uniform(0.6, 1.4), 1.0)
    inside = 1.0 - np.maximum(np.abs(xx - cx) / rx, np.abs(yy - cy) / ry)
    out[t] = 4.0 * inside + rng.normal(0.0, 0.8, (h, w)) - 0.5
  if rng.uniform() < 0.1:
    out -= 8.0  # an empty prediction: no pixel above 0.5
  return out


def _outputs(
    rng: np.random.Generator,
    boxes: np.ndarray,
    box_valid: np.ndarray,
    labels: np.ndarray,
    real: np.ndarray,
    num_frames: int,
) -> dict[str, np.ndarray]:
  """Quantized [L, B, Q, C + 1] class and [L, B, Q, T, h, w] mask logits.

  In each layer a random subset of the queries is placed near the real instances (with the
  instance's class boosted), so matchings differ between layers and are not trivial.
  """
  batch = boxes.shape[0]
  h, w = HEIGHT // STRIDE, WIDTH // STRIDE
  logits = rng.normal(0.0, 1.5, (NUM_LAYERS, batch, NUM_QUERIES, NUM_CLASSES + 1))
  masks = np.empty((NUM_LAYERS, batch, NUM_QUERIES, num_frames, h, w), np.float32)
  for layer in range(NUM_LAYERS):
    for b in range(batch):
      near = {}
      for n in np.flatnonzero(real[b]):
        for q in rng.choice(NUM_QUERIES, size=2, replace=False):
          near.setdefault(int(q), int(n))
      for q in range(NUM_QUERIES):
        n = near.get(q)
        if n is None or not box_valid[b, n].any():
          masks[layer, b, q] = _blob_logits(rng, None, num_frames)
          continue
        frame_boxes = np.where(
            box_valid[b, n][:, None], boxes[b, n], boxes[b, n][np.argmax(box_valid[b, n])]
        )
        masks[layer, b, q] = _blob_logits(rng, frame_boxes, num_frames)
        logits[layer, b, q, labels[b, n]] += rng.uniform(0.0, 3.0)
  return {"pred_logits_q": _quantize(logits), "pred_masks_q": _quantize(masks)}


def _rect(rng: np.random.Generator, num_frames: int, block: int = 1) -> np.ndarray:
  """Integer boxes [T, 4] of a rectangle drifting over the frames (multiples of `block`)."""
  bw = int(rng.integers(16, WIDTH // 2)) // block * block
  bh = int(rng.integers(12, HEIGHT // 2)) // block * block
  x1 = int(rng.integers(0, WIDTH - bw - 6)) // block * block
  y1 = int(rng.integers(0, HEIGHT - bh - 3)) // block * block
  boxes = []
  for t in range(num_frames):
    dx, dy = block * int(rng.integers(0, 2)) * t, block * int(rng.integers(0, 2))
    x, y = min(x1 + dx, WIDTH - bw), min(y1 + dy, HEIGHT - bh)
    boxes.append((x, y, x + bw, y + bh))
  return np.asarray(boxes, np.float32)


def make_box_inputs(workdir: pathlib.Path) -> None:
  """Box mode: B = 2 clips of T = 3 frames, N = 5 slots.

  Clip 0: three instances (slot 1 absent from frame 2, slot 2 absent from frame 0), two padded
  slots holding garbage. Clip 1: two instances, one slot that is valid but has no box in any
  frame (the official `prepare_targets` drops it), two padded slots.
  """
  rng = np.random.default_rng(BOX_SEED)
  batch, slots, num_frames = 2, 5, 3
  boxes = np.zeros((batch, slots, num_frames, 4), np.float32)
  box_valid = np.zeros((batch, slots, num_frames), bool)
  labels = np.zeros((batch, slots), np.int32)
  instance_valid = np.zeros((batch, slots), bool)
  for b, n in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]:
    boxes[b, n] = _rect(rng, num_frames)
    box_valid[b, n] = True
    instance_valid[b, n] = True
    labels[b, n] = rng.integers(0, NUM_CLASSES)
  box_valid[0, 1, 2] = box_valid[0, 2, 0] = False
  boxes[~box_valid] = 0.0
  instance_valid[1, 2] = True
  labels[1, 2] = 7
  for b, n in [(0, 3), (0, 4), (1, 3), (1, 4)]:  # padding: garbage the criterion must ignore
    boxes[b, n] = (-1e4, -1e4, 1e4, 1e4)
    box_valid[b, n] = True
    labels[b, n] = 12345
  frames = np.stack(
      [
          _frames(rng, boxes[b], box_valid[b] & instance_valid[b, :, None], num_frames)
          for b in range(batch)
      ]
  )
  real = instance_valid & box_valid.any(-1)
  arrays = dict(
      frames=frames, boxes=boxes, box_valid=box_valid, labels=labels, instance_valid=instance_valid
  )
  arrays.update(_outputs(rng, boxes, box_valid & real[..., None], labels, real, num_frames))
  np.savez_compressed(workdir / "criterion_box_inputs.npz", **arrays)


def make_mask_inputs(workdir: pathlib.Path) -> None:
  """Mask mode: B = 2 clips of T = 4 frames (the official COCO-clip branch), N = 4 slots.

  Instance masks are ellipses made of whole 4x4 blocks, so this project's 4x4 average pooling and
  the official bilinear sampling at cell centres read the same target values. Clip 0: three
  instances (slot 2 empty in frame 1), one padded slot. Clip 1: one instance, one valid slot with
  empty masks in every frame (dropped officially), two padded slots.
  """
  rng = np.random.default_rng(MASK_SEED)
  batch, slots, num_frames = 2, 4, 4
  h, w = HEIGHT // STRIDE, WIDTH // STRIDE
  masks = np.zeros((batch, slots, num_frames, HEIGHT, WIDTH), bool)
  labels = np.zeros((batch, slots), np.int32)
  instance_valid = np.zeros((batch, slots), bool)
  boxes = np.zeros((batch, slots, num_frames, 4), np.float32)
  yy, xx = np.mgrid[0:h, 0:w] + 0.5
  for b, n in [(0, 0), (0, 1), (0, 2), (1, 0)]:
    rect = _rect(rng, num_frames, block=STRIDE) / STRIDE
    for t in range(num_frames):
      x1, y1, x2, y2 = rect[t]
      ellipse = (
          ((xx - (x1 + x2) / 2) / ((x2 - x1) / 2)) ** 2
          + ((yy - (y1 + y2) / 2) / ((y2 - y1) / 2)) ** 2
      ) <= 1.0
      masks[b, n, t] = np.kron(ellipse, np.ones((STRIDE, STRIDE), bool))
    instance_valid[b, n] = True
    labels[b, n] = rng.integers(0, NUM_CLASSES)
  masks[0, 2, 1] = False
  instance_valid[1, 1] = True
  labels[1, 1] = 3
  for b, n in [(0, 3), (1, 2), (1, 3)]:
    masks[b, n] = rng.uniform(size=masks[b, n].shape) < 0.5  # padding garbage
    labels[b, n] = 12345
  box_valid = masks.any(axis=(-2, -1))
  for b, n, t in zip(*np.nonzero(box_valid)):
    ys, xs = np.nonzero(masks[b, n, t])
    boxes[b, n, t] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
  frames = np.stack(
      [
          _frames(rng, boxes[b], box_valid[b] & instance_valid[b, :, None], num_frames)
          for b in range(batch)
      ]
  )
  real = instance_valid & box_valid.any(-1)
  arrays = dict(
      frames=frames,
      masks_packed=np.packbits(masks, axis=-1),
      boxes=boxes,
      box_valid=box_valid,
      labels=labels,
      instance_valid=instance_valid,
  )
  arrays.update(_outputs(rng, boxes, box_valid & real[..., None], labels, real, num_frames))
  # Given points for the release's point-sampled mask loss, and uniform draws for its importance
  # sampling (a separate generator, so the arrays above do not depend on these).
  points_rng = np.random.default_rng(MASK_SEED + 1)
  # Multiples of 1/1024 (plus half a step): exact in float32 and small once compressed.
  arrays["points_coords"] = (
      (points_rng.integers(0, 1024, (batch, slots, num_frames, LOSS_POINTS, 2)) + 0.5) / 1024
  ).astype(np.float32)
  rows = arrays["pred_masks_q"][-1, 0, :IMPORTANCE_ROWS, 0]  # [R, h, w] final layer, clip 0
  arrays["importance_logits_q"] = rows
  num_uncertain = int(IMPORTANCE_RATIO * IMPORTANCE_POINTS)
  arrays["importance_candidates"] = points_rng.uniform(
      size=(IMPORTANCE_ROWS, int(IMPORTANCE_POINTS * OVERSAMPLE), 2)
  ).astype(np.float32)
  arrays["importance_random"] = points_rng.uniform(
      size=(IMPORTANCE_ROWS, IMPORTANCE_POINTS - num_uncertain, 2)
  ).astype(np.float32)
  np.savez_compressed(workdir / "criterion_mask_inputs.npz", **arrays)


def unpack_masks(packed: np.ndarray) -> np.ndarray:
  """bool [B, N, T, H, W] from `masks_packed` (bits along the width)."""
  return np.unpackbits(packed, axis=-1, count=WIDTH).astype(bool)


def make_inputs(workdir: pathlib.Path) -> None:
  make_box_inputs(workdir)
  make_mask_inputs(workdir)


# ----------------------------------------------------------------------------------------------
# Official side (torch, detectron2, mask2former_video).


def _official_model(num_frames: int) -> Any:
  """The official `VideoMaskFormer` (training mode) with stub backbone and head.

  The head returns whatever `model.sem_seg_head.outputs` holds; everything else (criterion,
  matcher, weight_dict, prepare_targets, the Lab affinities) is built by the official
  `VideoMaskFormer.from_config` from the R50 YouTube-VIS 2019 config.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from mask2former_video.video_maskformer_model import VideoMaskFormer  # pylint: disable=g-import-not-at-top

  class StubBackbone(torch.nn.Module):

    def forward(self, x):
      del x
      return {}

  class StubHead(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.num_classes = NUM_CLASSES
      self.outputs = None

    def forward(self, features):
      del features
      return self.outputs

  cfg = common.official_cfg(
      opts=[
          "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
          str(NUM_CLASSES),
          "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES",
          str(NUM_QUERIES),
          "INPUT.SAMPLING_FRAME_NUM",
          str(num_frames),
      ]
  )
  # from_config builds the R50 backbone and head too; they are replaced right away.
  kwargs = VideoMaskFormer.from_config(cfg)
  kwargs["backbone"] = StubBackbone()
  kwargs["sem_seg_head"] = StubHead()
  model = VideoMaskFormer(**kwargs)
  return model.train()


def official_outputs(pred_logits: np.ndarray, pred_masks: np.ndarray) -> dict[str, Any]:
  """This project's stacked [L, ...] outputs as the official head returns them."""
  import torch  # pylint: disable=g-import-not-at-top

  logits, masks = torch.from_numpy(pred_logits), torch.from_numpy(pred_masks)
  return {
      "pred_logits": logits[-1],
      "pred_masks": masks[-1],
      "aux_outputs": [
          {"pred_logits": logits[i], "pred_masks": masks[i]} for i in range(logits.shape[0] - 1)
      ],
  }


def _batched_inputs(
    frames: np.ndarray,
    masks: np.ndarray,
    labels: np.ndarray,
    instance_valid: np.ndarray,
    reverse_channels: bool,
) -> tuple[list, list]:
  """The official mapper's output for each clip, and the slot kept as each official instance.

  Frame t of clip b holds every valid slot of the clip, in slot order: absent ones (no mask in
  that frame) carry class -1 and id -1, as the official mapper's dummy annotations and
  `filter_empty_instances` leave them. Padded slots are left out.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from detectron2.structures import BitMasks, Instances  # pylint: disable=g-import-not-at-top

  batched, kept_slots = [], []
  for b in range(frames.shape[0]):
    slots = np.flatnonzero(instance_valid[b])
    kept_slots.append([int(n) for n in slots if masks[b, n].any()])
    images, instances = [], []
    for t in range(frames.shape[1]):
      image = frames[b, t][..., ::-1] if reverse_channels else frames[b, t]
      images.append(torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))))
      present = masks[b, slots, t].any(axis=(-2, -1))
      inst = Instances((HEIGHT, WIDTH))
      inst.gt_classes = torch.as_tensor(np.where(present, labels[b, slots], -1), dtype=torch.int64)
      inst.gt_ids = torch.as_tensor(np.where(present, slots, -1), dtype=torch.int64)
      inst.gt_masks = BitMasks(torch.from_numpy(masks[b, slots, t].copy()))
      instances.append(inst)
    batched.append({"image": images, "instances": instances})
  return batched, kept_slots


@contextlib.contextmanager
def _recording(
    model: Any,
    grid_points: bool,
    loss_coords: np.ndarray | None = None,
    kept_slots: list | None = None,
):
  """Records the matcher's cost matrices and indices; optionally samples cell-centre points.

  With `grid_points`, the matcher's `torch.rand` points and the mask loss's uncertainty-sampled
  points are replaced by the centres of the h x w mask cells, which makes the official costs and
  losses the dense ones at stride 4. With `loss_coords` ([B, N, T, P, 2] per target slot) the
  mask loss reads those points instead, in the row order of its matched instance-frames.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from mask2former_video.modeling import criterion as criterion_module  # pylint: disable=g-import-not-at-top
  from mask2former_video.modeling import matcher as matcher_module  # pylint: disable=g-import-not-at-top

  record = {"costs": [], "indices": [], "iters": []}
  matcher = model.criterion.matcher
  h, w = HEIGHT // STRIDE, WIDTH // STRIDE
  ys, xs = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
  grid = torch.from_numpy(np.stack([xs, ys], -1).reshape(1, h * w, 2).astype(np.float32))

  original_lsa = matcher_module.linear_sum_assignment
  original_forward = matcher.forward
  original_rand = torch.rand
  original_uncertain = criterion_module.get_uncertain_point_coords_with_randomness
  original_num_points = matcher.num_points
  original_get_loss = model.criterion.get_loss

  def lsa(cost):
    record["costs"][-1].append(np.asarray(cost, np.float64))
    return original_lsa(cost)

  def forward(outputs, targets):
    record["costs"].append([])
    if grid_points:
      torch.rand = lambda *shape, **kw: grid.clone()
    try:
      indices = original_forward(outputs, targets)
    finally:
      torch.rand = original_rand
    record["indices"].append([(i.numpy(), j.numpy()) for i, j in indices])
    return indices

  def uncertain_points(coarse_logits, *args):
    del args
    if loss_coords is None:
      return grid.expand(coarse_logits.shape[0], -1, -1).clone()
    # Rows: clips in order, each clip's matched (query, target) pairs by query, then frames.
    rows = [
        loss_coords[b, kept_slots[b][j], t]
        for b, (_, targets) in enumerate(record["indices"][-1])
        for j in targets
        for t in range(loss_coords.shape[2])
    ]
    assert len(rows) == coarse_logits.shape[0], (len(rows), coarse_logits.shape)
    return torch.from_numpy(np.stack(rows))

  def get_loss(loss, *args):
    out = original_get_loss(loss, *args)
    if loss == "masks":
      record["iters"].append(int(model.criterion._iter.item()))  # pylint: disable=protected-access
    return out

  matcher_module.linear_sum_assignment = lsa
  matcher.forward = forward
  model.criterion.get_loss = get_loss
  if grid_points:
    matcher.num_points = h * w
  if grid_points or loss_coords is not None:
    criterion_module.get_uncertain_point_coords_with_randomness = uncertain_points
  try:
    yield record
  finally:
    matcher_module.linear_sum_assignment = original_lsa
    del matcher.forward
    del model.criterion.get_loss
    matcher.num_points = original_num_points
    criterion_module.get_uncertain_point_coords_with_randomness = original_uncertain


def _stacking_order(per_call: list) -> list:
  """Official call order (final layer, then aux 0..L-2) -> this project's stacking order."""
  return per_call[1:] + per_call[:1]


def _matching_arrays(record: dict, kept_slots: list, num_slots: int) -> tuple[np.ndarray, ...]:
  """[L, B, N] matched query (-1: none) and [L, B, N, Q] costs (NaN rows: no official target)."""
  costs = _stacking_order(record["costs"])
  indices = _stacking_order(record["indices"])
  num_layers, batch = len(costs), len(kept_slots)
  query = np.full((num_layers, batch, num_slots), -1, np.int32)
  cost = np.full((num_layers, batch, num_slots, NUM_QUERIES), np.nan, np.float32)
  for layer in range(num_layers):
    for b in range(batch):
      slots = kept_slots[b]
      if slots:
        cost[layer, b, slots] = costs[layer][b].T  # official C is [Q, n]
      for q, j in zip(*indices[layer][b]):
        query[layer, b, slots[j]] = q
  return query, cost


def _run(
    model: Any,
    inputs: dict,
    masks: np.ndarray,
    *,
    grid_points: bool,
    reverse_channels: bool,
    start_iter: int = 0,
    seed: int = 0,
    loss_coords: np.ndarray | None = None,
) -> dict[str, Any]:
  """One official training forward: weighted loss dict, matchings and warm-up counters."""
  import torch  # pylint: disable=g-import-not-at-top

  common.seed_everything(seed)
  batched, kept_slots = _batched_inputs(
      inputs["frames"], masks, inputs["labels"], inputs["instance_valid"], reverse_channels
  )
  model.sem_seg_head.outputs = official_outputs(
      dequantize(inputs["pred_logits_q"]), dequantize(inputs["pred_masks_q"])
  )
  model.criterion._iter.fill_(start_iter)  # pylint: disable=protected-access
  with _recording(model, grid_points, loss_coords, kept_slots) as record, torch.no_grad():
    losses = model(batched)
  query, cost = _matching_arrays(record, kept_slots, inputs["labels"].shape[1])
  return {
      "losses": {k: float(v) for k, v in losses.items()},
      "query_index": query,
      "costs": cost,
      "iters": np.asarray(_stacking_order(record["iters"]), np.int32),
  }


def _loss_table(runs: list[dict]) -> tuple[list[str], np.ndarray]:
  names = sorted(runs[0]["losses"])
  return names, np.asarray([[run["losses"][k] for k in names] for run in runs], np.float64)


def box_masks_full(boxes: np.ndarray, box_valid: np.ndarray) -> np.ndarray:
  """bool [..., H, W] rasters of integer boxes [..., 4] (pixels x1 <= x < x2, y1 <= y < y2)."""
  out = np.zeros(boxes.shape[:-1] + (HEIGHT, WIDTH), bool)
  for index in zip(*np.nonzero(box_valid)):
    x1, y1, x2, y2 = boxes[index].astype(int)
    out[index][max(y1, 0) : y2, max(x1, 0) : x2] = True
  return out


def run_official_box(workdir: pathlib.Path, out_dir: pathlib.Path) -> None:
  """Box mode: three warm-up calls with grid points, plus a random-point and a BGR-input run."""
  with np.load(workdir / "criterion_box_inputs.npz") as data:
    inputs = {k: data[k] for k in data.files}
  valid_slots = inputs["instance_valid"][..., None] & inputs["box_valid"]
  masks = box_masks_full(inputs["boxes"], valid_slots)
  model = _official_model(num_frames=3)
  # The official forward gets the RGB frames (INPUT.FORMAT RGB) and computes Lab after reversing
  # their channels: this project's `mask_free.lab_reverse_channels=True`. The `bgr_input` run feeds
  # it BGR frames instead, so its Lab is that of the true colours (`lab_reverse_channels=False`).
  runs = [
      _run(model, inputs, masks, grid_points=True, reverse_channels=False, start_iter=it)
      for it in WARMUP_START_ITERS
  ]
  sampled = _run(model, inputs, masks, grid_points=False, reverse_channels=False, seed=0)
  bgr_input = _run(model, inputs, masks, grid_points=True, reverse_channels=True)
  names, table = _loss_table(runs)
  _, sampled_table = _loss_table([sampled, bgr_input])
  cost_noise = np.nanmax(np.abs(sampled["costs"] - runs[0]["costs"]))
  arrays = dict(inputs)
  arrays.update(
      official_losses=table,
      official_iters=np.stack([r["iters"] for r in runs]),
      official_query_index=runs[0]["query_index"],
      official_costs=runs[0]["costs"],
      sampled_query_index=sampled["query_index"],
      sampled_costs=sampled["costs"],
      sampled_losses=sampled_table[0],
      bgr_input_losses=sampled_table[1],
  )
  meta = dict(
      common.official_provenance(),
      loss_names=names,
      warmup_start_iters=list(WARMUP_START_ITERS),
      logit_scale=LOGIT_SCALE,
      lab_input="official_losses: RGB frames (Lab of BGR, lab_reverse_channels=True); "
      "bgr_input_losses: BGR frames (Lab of RGB, lab_reverse_channels=False)",
      sampled_cost_max_abs_diff=float(cost_noise),
  )
  common.save_fixture(out_dir / "parity_criterion_box.npz", arrays, meta)
  _report("box", names, table[0], sampled_table[:1], cost_noise, runs[0], sampled)


def run_official_mask(workdir: pathlib.Path, out_dir: pathlib.Path) -> None:
  """Mask mode: grid points (deterministic) and the official random points."""
  with np.load(workdir / "criterion_mask_inputs.npz") as data:
    inputs = {k: data[k] for k in data.files}
  masks = unpack_masks(inputs["masks_packed"])
  masks &= inputs["instance_valid"][:, :, None, None, None]
  model = _official_model(num_frames=4)
  grid = _run(model, inputs, masks, grid_points=True, reverse_channels=False)
  sampled = [
      _run(model, inputs, masks, grid_points=False, reverse_channels=False, seed=s)
      for s in range(3)
  ]
  given = _run(
      model,
      inputs,
      masks,
      grid_points=True,
      reverse_channels=False,
      loss_coords=inputs["points_coords"],
  )
  names, table = _loss_table([grid])
  _, sampled_table = _loss_table(sampled)
  _, given_table = _loss_table([given])
  importance_coords = _official_importance_coords(inputs)
  cost_noise = np.nanmax(np.abs(sampled[0]["costs"] - grid["costs"]))
  arrays = dict(inputs)
  arrays.update(
      official_losses=table,
      official_query_index=grid["query_index"],
      official_costs=grid["costs"],
      sampled_query_index=sampled[0]["query_index"],
      sampled_costs=sampled[0]["costs"],
      sampled_losses=sampled_table,
      points_losses=given_table[0],
      importance_coords=importance_coords,
  )
  meta = dict(
      common.official_provenance(),
      loss_names=names,
      logit_scale=LOGIT_SCALE,
      sampled_cost_max_abs_diff=float(cost_noise),
      importance=dict(
          num_points=IMPORTANCE_POINTS,
          oversample_ratio=OVERSAMPLE,
          importance_sample_ratio=IMPORTANCE_RATIO,
      ),
  )
  common.save_fixture(out_dir / "parity_criterion_mask.npz", arrays, meta)
  _report("mask", names, table[0], sampled_table, cost_noise, grid, sampled[0])


def _official_importance_coords(inputs: dict) -> np.ndarray:
  """`get_uncertain_point_coords_with_randomness` on given logits, its `torch.rand` draws given."""
  import torch  # pylint: disable=g-import-not-at-top
  from detectron2.projects.point_rend import point_features  # pylint: disable=g-import-not-at-top
  from mask2former_video.modeling import criterion as criterion_module  # pylint: disable=g-import-not-at-top

  draws = [
      torch.from_numpy(inputs["importance_candidates"]),
      torch.from_numpy(inputs["importance_random"]),
  ]
  original_rand = torch.rand
  torch.rand = lambda *shape, **kw: draws.pop(0)
  try:
    coords = point_features.get_uncertain_point_coords_with_randomness(
        torch.from_numpy(dequantize(inputs["importance_logits_q"]))[:, None],
        criterion_module.calculate_uncertainty,
        IMPORTANCE_POINTS,
        OVERSAMPLE,
        IMPORTANCE_RATIO,
    )
  finally:
    torch.rand = original_rand
  assert not draws
  return coords.numpy()


def _report(
    mode: str,
    names: list,
    dense: np.ndarray,
    sampled: np.ndarray,
    cost_noise: float,
    grid_run: dict,
    sampled_run: dict,
) -> None:
  """Prints the measured size of the point-sampling differences (for docs/parity.md)."""
  nonzero = np.abs(dense) > 0
  rel = np.abs(sampled - dense)[:, nonzero] / np.abs(dense[nonzero])
  same = np.mean(
      (grid_run["query_index"] == sampled_run["query_index"])[grid_run["query_index"] >= 0]
  )
  print(
      json.dumps(
          {
              "mode": mode,
              "sampled_cost_max_abs_diff": round(float(cost_noise), 5),
              "sampled_loss_rel_diff_max": round(float(rel.max()), 5),
              "sampled_loss_rel_diff_median": round(float(np.median(rel)), 5),
              "matches_equal_fraction": round(float(same), 4),
              "worst_terms": [names[i] for i in np.argsort(-rel.max(0))[:3]] if rel.size else [],
          }
      ),
      flush=True,
  )


def run_official(workdir: pathlib.Path, out_dir: pathlib.Path) -> None:
  run_official_box(workdir, out_dir)
  run_official_mask(workdir, out_dir)


if __name__ == "__main__":
  common.stage_main(__doc__.splitlines()[0], make_inputs, run_official)
