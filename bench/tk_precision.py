"""How right are the pixel pairs each mask-free loss keeps? Measured on ground truth alone.

The pairwise (BoxInst) term and TK-Loss both pull the masks of two pixels together when their
colours (a pixel, or a 3x3 patch) are similar enough. Whether that helps depends on how often the
two pixels really belong together. This bench counts, on training clips with their ground-truth
masks and no model at all, the pairs each loss keeps and their **precision**: the fraction of kept
pairs whose two pixels carry the same ground-truth label (the same instance, or both background).
Training noise cannot blur it, so it is the measurement to design the data with, not the AP.

Pairs are those of the losses themselves (`maskfreevis_jax.losses`: the same colour affinities,
thresholds, top-K and box masks):
  spatial  pixel p of frame t and its neighbour p + d (the dilated 3x3 window without its centre),
           colour similarity >= `pairwise_color_threshold` (0.3), weighted by instance n's box
           mask at p: the `pairwise_color_loss` weights.
  TK       pixel p of frame b and candidate p + d of frame a for each linked frame pair (a, b),
           among the top-K patch similarities and >= `temporal_threshold` (D = 0.05), weighted by
           the union of instance n's boxes over the clip: the `temporal_knn_patch_loss` weights.
Neighbours or candidates outside the frame are left out. Counts are those weights summed over
instances (a pixel in the boxes of two instances counts twice, as in the losses); box-border
pixels count by their box fraction.

Zones, by the centre pixel p and the instance n whose box weighs the pair:
  all            every weighted pair;
  box_not_mask   p inside n's box(es) but not on n's mask: where box supervision is ambiguous;
  mask           p on n's mask;
  boundary       p within `boundary_width` mask-stride pixels of n's mask edge (either side);
  anchored       p in box_not_mask, its partner outside n's box in the partner's own frame,
                 weighted by how much of the partner's cell is outside that box: the pairs that
                 carry what the box projection knows (outside a box is background) to a pixel the
                 box leaves ambiguous. Its precision is that of box_not_mask pairs that reach out
                 of the box; its count is how much box evidence a loss propagates inward.
Labels at mask stride: each cell takes the label covering most of it (background included).

  python bench/tk_precision.py --clips 60                      # today's default data
  python bench/tk_precision.py --config.data.synthetic.frame_size='(128,128)' --markdown /tmp/t.md
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Iterable, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from maskfreevis_jax import criterion
from maskfreevis_jax import losses
from maskfreevis_jax.data import iterators
from maskfreevis_jax.losses import affinity as affinity_lib

ZONES = ("all", "box_not_mask", "mask", "boundary", "anchored")
# Sweeps: TK's K at the default radius, TK's radius (search dilation) at the default K, the
# spatial window's dilation (radius).
TOPK_VALUES = (1, 3, 5, 9)
TK_DILATIONS = (1, 2, 3, 4)
SPATIAL_DILATIONS = (1, 2, 3)


def stride_labels(masks: jnp.ndarray, instance_valid: jnp.ndarray, stride: int) -> jnp.ndarray:
  """`[T, h, w]` int32 label per mask-stride cell: 0 background, n + 1 instance n.

  Args:
    masks: `[N, T, H, W]` visible (disjoint) ground-truth masks.
    instance_valid: `[N]` bool; padded slots never label a cell.
    stride: mask stride.
  """
  frac = criterion.downsample_instance_masks(masks[None], stride)[0]  # [N, T, h, w]
  frac = frac * instance_valid[:, None, None, None]
  background = jnp.clip(1.0 - jnp.sum(frac, axis=0), 0.0, 1.0)
  return jnp.argmax(jnp.concatenate([background[None], frac], axis=0), axis=0).astype(jnp.int32)


def _band(member: jnp.ndarray, width: int) -> jnp.ndarray:
  """Cells within `width` cells (Chebyshev) of the edge of the boolean `member` `[..., h, w]`."""
  grown, shrunk = member, member
  for dy in range(-width, width + 1):
    for dx in range(-width, width + 1):
      shifted_in = affinity_lib.shift_spatial(member, (dy, dx), fill=False)
      shifted_out = affinity_lib.shift_spatial(member, (dy, dx), fill=True)
      grown = grown | shifted_in
      shrunk = shrunk & shifted_out
  return grown & ~shrunk


def _zone_masks(member: jnp.ndarray, weight: jnp.ndarray, width: int) -> jnp.ndarray:
  """`[Z - 1, ...]` float32 zone indicators of the centre pixels (ZONES but `anchored`, which
  depends on the partner too: `_anchored_tally`)."""
  inside = weight > 0
  return jnp.stack(
      [
          jnp.ones_like(member),
          inside & ~member,
          member,
          _band(member, width),
      ]
  ).astype(jnp.float32)


def _neighbour_labels(labels: jnp.ndarray, offsets) -> jnp.ndarray:
  """`[..., K, h, w]`: the label at p + d_k (-1 outside the frame)."""
  return jnp.stack([affinity_lib.shift_spatial(labels, o, fill=-1) for o in offsets], axis=-3)


def _tally(weight, same, zones) -> jnp.ndarray:
  """`[Z, 2]`: kept-pair weight and same-label weight per zone.

  weight `[N, ..., K, h, w]`, same `[..., K, h, w]` (broadcast over N), zones `[Z, N, ..., h, w]`.
  """
  zoned = weight[None] * zones[..., None, :, :]
  axes = tuple(range(1, zoned.ndim))
  return jnp.stack([jnp.sum(zoned, axis=axes), jnp.sum(zoned * same, axis=axes)], axis=-1)


def _anchored_tally(weight, same, box_not_mask, partner_box) -> jnp.ndarray:
  """`[1, 2]`: kept-pair and same-label weight of the `anchored` zone.

  weight `[N, ..., K, h, w]`, same `[..., K, h, w]`, box_not_mask `[N, ..., h, w]` (centre in n's
  box, off n's mask), partner_box `[N, ..., K, h, w]` (n's box fraction at the partner).
  """
  anchored = weight * box_not_mask[..., None, :, :] * (1.0 - partner_box)
  return jnp.stack([jnp.sum(anchored), jnp.sum(anchored * same)])[None]


def _partner_boxes(box_masks: jnp.ndarray, offsets) -> jnp.ndarray:
  """`[..., K, h, w]`: box fraction at p + d_k (0 outside the frame, where no pair is kept)."""
  return jnp.stack([affinity_lib.shift_spatial(box_masks, o, fill=0.0) for o in offsets], axis=-3)


def clip_pair_counts(
    frames: jnp.ndarray,
    masks: jnp.ndarray,
    boxes: jnp.ndarray,
    box_valid: jnp.ndarray,
    instance_valid: jnp.ndarray,
    config: losses.MaskFreeLossConfig,
    boundary_width: int = 1,
) -> dict[str, jnp.ndarray]:
  """Kept pairs of both losses on one clip, by zone.

  Args:
    frames: `[T, H, W, 3]` uint8 RGB clip (T >= 2).
    masks: `[N, T, H, W]` ground-truth visible masks.
    boxes: `[N, T, 4]` boxes (x1, y1, x2, y2) in frame pixels.
    box_valid: `[N, T]` bool.
    instance_valid: `[N]` bool.
    config: the losses' hyper-parameters (thresholds, windows, K, frame pairing).
    boundary_width: the boundary zone's half-width in mask-stride cells.

  Returns:
    {'spatial': [Z, 2], 'temporal': [Z, 2]}: per zone (ZONES order) the summed weight of the kept
    pairs and of those whose two pixels share a ground-truth label.
  """
  stride = config.stride
  height, width = frames.shape[1:3]
  affinities = losses.compute_color_affinities(frames[None], config)
  labels = stride_labels(masks, instance_valid, stride)  # [T, h, w]
  h, w = labels.shape[-2:]
  box_masks = losses.box_masks_at_stride(boxes, box_valid, (height, width), stride)
  box_masks = box_masks * instance_valid[:, None, None, None]  # [N, T, h, w]
  ids = jnp.arange(1, masks.shape[0] + 1)[:, None, None, None]
  member = labels[None] == ids  # [N, T, h, w]

  s_offsets = affinity_lib.window_offsets(
      config.pairwise_size, config.pairwise_dilation, include_center=False
  )
  s_kept = affinities.spatial_affinity[0] * affinity_lib.inside_frame((h, w), s_offsets)
  s_same = (labels[:, None] == _neighbour_labels(labels, s_offsets)).astype(jnp.float32)
  s_weight = box_masks[:, :, None] * s_kept[None]  # [N, T, K, h, w]
  spatial = jnp.concatenate(
      [
          _tally(s_weight, s_same, _zone_masks(member, box_masks, boundary_width)),
          _anchored_tally(
              s_weight, s_same, (box_masks > 0) & ~member, _partner_boxes(box_masks, s_offsets)
          ),
      ]
  )

  t_offsets = affinity_lib.window_offsets(
      config.temporal_search_size, config.temporal_dilation, include_center=True
  )
  a_idx = np.asarray([a for a, _ in affinities.pairs])
  b_idx = np.asarray([b for _, b in affinities.pairs])
  t_kept = affinities.temporal_affinity[0] * affinity_lib.inside_frame((h, w), t_offsets)
  t_same = (labels[b_idx][:, None] == _neighbour_labels(labels[a_idx], t_offsets)).astype(
      jnp.float32
  )  # [P, K, h, w]
  union = (jnp.sum(box_masks, axis=1) >= 1.0).astype(jnp.float32)  # [N, h, w], as the loss
  union_p = jnp.broadcast_to(union[:, None], (union.shape[0], len(b_idx), h, w))
  t_weight = union_p[:, :, None] * t_kept[None]  # [N, P, K, h, w]
  temporal = jnp.concatenate(
      [
          _tally(t_weight, t_same, _zone_masks(member[:, b_idx], union_p, boundary_width)),
          _anchored_tally(
              t_weight,
              t_same,
              (union_p > 0) & ~member[:, b_idx],
              _partner_boxes(box_masks[:, a_idx], t_offsets),
          ),
      ]
  )
  return {"spatial": spatial, "temporal": temporal}


@dataclasses.dataclass
class PairStats:
  """Summed kept-pair weights over clips, per zone (ZONES order)."""

  kept: np.ndarray
  same: np.ndarray

  @property
  def precision(self) -> np.ndarray:
    return np.where(self.kept > 0, self.same / np.maximum(self.kept, 1e-9), np.nan)


def pair_statistics(
    batches: Iterable[dict[str, np.ndarray]],
    config: losses.MaskFreeLossConfig,
    boundary_width: int = 1,
) -> dict[str, PairStats]:
  """Sums `clip_pair_counts` over every clip of `batches` (training batches with masks)."""
  count = jax.jit(
      jax.vmap(lambda f, m, b, bv, iv: clip_pair_counts(f, m, b, bv, iv, config, boundary_width))
  )
  totals = {"spatial": np.zeros((len(ZONES), 2)), "temporal": np.zeros((len(ZONES), 2))}
  for batch in batches:
    if "masks" not in batch:
      raise ValueError("tk_precision needs ground-truth masks: set data.with_masks=True")
    out = count(
        batch["frames"],
        batch["masks"],
        batch["boxes"],
        batch["box_valid"],
        batch["instance_valid"],
    )
    for key in totals:
      totals[key] += np.asarray(out[key], np.float64).sum(axis=0)
  return {k: PairStats(kept=v[:, 0], same=v[:, 1]) for k, v in totals.items()}


def training_batches(config: ml_collections.ConfigDict, num_clips: int, seed: int = 0):
  """The first `num_clips` training clips of `config` (rounded up to whole batches), with masks."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.with_masks = True
  iterator = iterators.create_train_iterator(config, seed, process_index=0, process_count=1)
  batch_size = int(config.data.batch_size)
  return [next(iterator) for _ in range(-(-num_clips // batch_size))]


def variants(base: losses.MaskFreeLossConfig) -> list[tuple[str, losses.MaskFreeLossConfig]]:
  """(label, config) of each row: the sweeps over K, TK radius and spatial radius."""
  rows = []
  for k in TOPK_VALUES:
    rows.append((f"K={k}, R={base.temporal_dilation}", dataclasses.replace(base, temporal_topk=k)))
  for d in TK_DILATIONS:
    if d != base.temporal_dilation:
      rows.append(
          (f"K={base.temporal_topk}, R={d}", dataclasses.replace(base, temporal_dilation=d))
      )
  for d in SPATIAL_DILATIONS:
    if d != base.pairwise_dilation:
      rows.append((f"spatial R={d}", dataclasses.replace(base, pairwise_dilation=d)))
  return rows


def _cells(stats: PairStats, clips: int) -> list[str]:
  out = []
  for z in range(len(ZONES)):
    kept, prec = stats.kept[z] / clips, stats.precision[z]
    out.append(f"{kept:,.0f} / {100 * prec:.1f}%" if np.isfinite(prec) else "0 / -")
  return out


def markdown_table(
    rows: Sequence[tuple[str, losses.MaskFreeLossConfig, dict[str, PairStats]]], clips: int
) -> str:
  """One line per (variant, loss): kept pairs per clip / precision, per zone."""
  head = "| variant | loss | " + " | ".join(ZONES) + " |"
  lines = [head, "|" + " --- |" * (len(ZONES) + 2)]
  seen_spatial = set()
  for label, cfg, stats in rows:
    spatial_key = (cfg.pairwise_dilation, cfg.pairwise_color_threshold)
    if spatial_key not in seen_spatial:
      seen_spatial.add(spatial_key)
      name = f"spatial R={cfg.pairwise_dilation}, >= {cfg.pairwise_color_threshold}"
      lines.append(f"| {name} | pairwise | " + " | ".join(_cells(stats["spatial"], clips)) + " |")
    if not label.startswith("spatial"):
      name = f"{label}, D={cfg.temporal_threshold}, {cfg.frame_pairing}"
      lines.append(f"| {name} | TK | " + " | ".join(_cells(stats["temporal"], clips)) + " |")
  return "\n".join(lines)


def _define_flags():
  """Command-line flags (defined only when run as a script, so importing this module is free)."""
  config_flags.DEFINE_config_file(
      "config",
      str(pathlib.Path(__file__).resolve().parent.parent / "configs" / "synthetic.py"),
      "Stage-2 config whose training clips are measured.",
  )
  flags.DEFINE_integer("clips", 60, "Training clips measured.")
  flags.DEFINE_integer("seed", 0, "Clip stream seed.")
  flags.DEFINE_integer("boundary_width", 1, "Boundary zone half-width (stride cells).")
  flags.DEFINE_string("markdown", None, "Also write the table here.")
  flags.DEFINE_bool("quick", False, "Only the config's own losses, no sweeps.")


def main(argv: Sequence[str]) -> None:
  del argv
  opts = flags.FLAGS
  config = opts.config
  start = time.perf_counter()
  batches = training_batches(config, opts.clips, opts.seed)
  clips = sum(int(b["frames"].shape[0]) for b in batches)
  base = criterion.mask_free_config(config.criterion)
  rows = [("config", base)] if opts.quick else variants(base)
  measured = [
      (label, cfg, pair_statistics(batches, cfg, opts.boundary_width)) for label, cfg in rows
  ]
  data = config.data
  title = (
      f"{clips} training clips of {data.name} (frames {tuple(data.synthetic.frame_size)}, "
      f"pad {tuple(data.pad_size)}, T={data.num_frames}, stride {base.stride}); "
      "kept pairs per clip / precision, by zone of the centre pixel"
  )
  table = markdown_table(measured, clips)
  text = f"{title}\n\n{table}\n\n({time.perf_counter() - start:.0f} s)\n"
  print(text)
  if opts.markdown:
    with open(opts.markdown, "w") as f:
      f.write(text)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
