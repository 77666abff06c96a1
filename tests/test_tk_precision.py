"""bench/tk_precision.py: the pairs each mask-free loss keeps, and their precision, on ground truth."""

import dataclasses

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_script
from maskfreevis_jax import losses
from maskfreevis_jax.losses import affinity as affinity_lib


def _load_bench():
  return load_script("bench/tk_precision.py", "tk_precision")


tk_precision = _load_bench()

SIZE = 32  # frames 32x32, masks 8x8 at stride 4
CONFIG = losses.MaskFreeLossConfig(box_window_fractions=())


def _clip(object_rgb, background_rgb, mask_cells, box_cells, shift=0, num_frames=3, box_pad=0):
  """A flat-coloured object on a flat (or static noise) background; cells are stride-4 cell slices.

  mask_cells: [8, 8] bool object shape in cells (frame 0); it moves `shift` cells right per frame.
  box_cells: (y1, x1, y2, x2) in cells of frame 0 (moves with the object), grown by `box_pad`
    pixels on each side (a pad that is not a multiple of 4 gives fractional box cells).
  """
  noise = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3)).astype(np.uint8)
  frames, masks, boxes = [], [], []
  for t in range(num_frames):
    cells = np.roll(mask_cells, shift * t, axis=1)
    full = np.kron(cells, np.ones((4, 4), bool))
    if background_rgb is None:
      frame = noise.copy()  # a static textured background
    else:
      frame = np.broadcast_to(np.asarray(background_rgb, np.uint8), (SIZE, SIZE, 3)).copy()
    frame[full] = object_rgb
    frames.append(frame)
    masks.append(full)
    y1, x1, y2, x2 = box_cells
    box = [4 * (x1 + shift * t), 4 * y1, 4 * (x2 + shift * t), 4 * y2]
    boxes.append([box[0] - box_pad, box[1] - box_pad, box[2] + box_pad, box[3] + box_pad])
  return dict(
      frames=jnp.asarray(np.stack(frames)),
      masks=jnp.asarray(np.stack(masks)[None].astype(np.uint8)),
      boxes=jnp.asarray(np.asarray(boxes, np.float32)[None]),
      box_valid=jnp.ones((1, num_frames), bool),
      instance_valid=jnp.ones((1,), bool),
  )


def _reference(clip, config, boundary_width=1):
  """Loops over every pair: the losses' kept maps, labels by cell majority, zones by p."""
  aff = losses.compute_color_affinities(clip["frames"][None], config)
  masks = np.asarray(clip["masks"][0], np.float32)  # [T, H, W]
  t_count, height, width = masks.shape
  h, w = height // 4, width // 4
  frac = masks.reshape(t_count, h, 4, w, 4).mean(axis=(2, 4))
  labels = (frac > 0.5).astype(int)  # one instance: label 1 where it covers most of the cell
  box = np.asarray(losses.box_masks_at_stride(clip["boxes"][0], clip["box_valid"][0], (32, 32)))
  union = (box.sum(axis=0) >= 1.0).astype(np.float32)

  def zones(lab, weight, y, x):
    near = False
    for dy in range(-boundary_width, boundary_width + 1):
      for dx in range(-boundary_width, boundary_width + 1):
        yy, xx = y + dy, x + dx
        inside = 0 <= yy < h and 0 <= xx < w  # the frame's edge is not the mask's
        near |= inside and lab[yy, xx] != lab[y, x]
    return [True, weight > 0 and lab[y, x] == 0, lab[y, x] == 1, near]

  def add(totals, zs, weight, same, partner_box):
    for z, inside in enumerate(zs):
      if inside:
        totals[z] += [weight, weight * same]
    if zs[1]:  # anchored: off the mask in the box, the partner outside the box (by its fraction)
      totals[4] += [weight * (1 - partner_box), weight * (1 - partner_box) * same]

  spatial = np.zeros((5, 2))
  offsets = affinity_lib.window_offsets(3, config.pairwise_dilation, False)
  kept = np.asarray(aff.spatial_affinity[0])
  for t in range(t_count):
    for k, (dy, dx) in enumerate(offsets):
      for y in range(h):
        for x in range(w):
          if 0 <= y + dy < h and 0 <= x + dx < w and kept[t, k, y, x]:
            same = labels[t, y, x] == labels[t, y + dy, x + dx]
            partner_box = box[t, y + dy, x + dx]
            add(spatial, zones(labels[t], box[t, y, x], y, x), box[t, y, x], same, partner_box)
  temporal = np.zeros((5, 2))
  offsets = affinity_lib.window_offsets(3, config.temporal_dilation, True)
  kept = np.asarray(aff.temporal_affinity[0])
  for j, (a, b) in enumerate(aff.pairs):
    for k, (dy, dx) in enumerate(offsets):
      for y in range(h):
        for x in range(w):
          if 0 <= y + dy < h and 0 <= x + dx < w and kept[j, k, y, x]:
            same = labels[b, y, x] == labels[a, y + dy, x + dx]
            partner_box = box[a, y + dy, x + dx]
            add(temporal, zones(labels[b], union[y, x], y, x), union[y, x], same, partner_box)
  return spatial, temporal


L_SHAPE = np.zeros((8, 8), bool)
L_SHAPE[2:6, 1:3] = True
L_SHAPE[4:6, 1:5] = True


CONFIG_K1_R1 = dataclasses.replace(CONFIG, temporal_topk=1, temporal_dilation=1)
CONFIG_CYCLIC_R1 = dataclasses.replace(CONFIG, frame_pairing="cyclic", pairwise_dilation=1)
EDGE_SHAPE = np.zeros((8, 8), bool)
EDGE_SHAPE[0:3, 0:3] = True  # touches the frame's top-left corner


@pytest.mark.parametrize(
    "background,shift,config,shape,box,box_pad",
    [
        ((20, 60, 200), 0, CONFIG, L_SHAPE, (2, 1, 6, 5), 0),
        ((200, 30, 30), 1, CONFIG, L_SHAPE, (2, 1, 6, 5), 0),
        (None, 1, CONFIG, L_SHAPE, (2, 1, 6, 5), 0),
        (None, 1, CONFIG_K1_R1, L_SHAPE, (2, 1, 6, 5), 0),
        ((200, 30, 30), 1, CONFIG_CYCLIC_R1, L_SHAPE, (2, 1, 6, 5), 0),
        # A dark object at the frame's corner: the zero padding outside the frame looks like it.
        ((60, 60, 60), 0, CONFIG, EDGE_SHAPE, (0, 0, 3, 3), 0),
        # Boxes 2 px larger than the mask: fractional box cells, summed over frames in the union.
        (None, 1, CONFIG, L_SHAPE, (2, 1, 6, 5), 2),
    ],
    ids=[
        "static-flat",
        "moving-contrast",
        "moving-noise",
        "noise-k1-r1",
        "cyclic-spatial-r1",
        "dark-corner",
        "fractional-box",
    ],
)
def test_counts_match_a_loop_over_every_pair(background, shift, config, shape, box, box_pad):
  object_rgb = (0, 0, 0) if background == (60, 60, 60) else (200, 30, 30)
  clip = _clip(object_rgb, background, shape, box, shift=shift, box_pad=box_pad)
  out = tk_precision.clip_pair_counts(**clip, config=config)
  spatial, temporal = _reference(clip, config)
  assert spatial[0, 0] > 0 and temporal[0, 0] > 0  # the case keeps pairs of both losses
  chex.assert_trees_all_close(np.asarray(out["spatial"]), spatial, atol=1e-4)
  chex.assert_trees_all_close(np.asarray(out["temporal"]), temporal, atol=1e-4)


def test_camouflage_lowers_spatial_precision_outside_the_mask():
  """An object of the background's colour: inside its box, colour links object to background."""
  contrast = _clip((200, 30, 30), (20, 60, 200), L_SHAPE, (2, 1, 6, 5))
  camouflage = _clip((20, 60, 200), (20, 60, 200), L_SHAPE, (2, 1, 6, 5))
  zone = tk_precision.ZONES.index("box_not_mask")
  stats_contrast = tk_precision.pair_statistics([contrast_batch(contrast)], CONFIG)
  stats_camo = tk_precision.pair_statistics([contrast_batch(camouflage)], CONFIG)
  assert stats_contrast["spatial"].precision[zone] == pytest.approx(1.0)
  assert stats_camo["spatial"].precision[zone] < 0.9


def contrast_batch(clip):
  """One clip as a batch of one."""
  return {k: np.asarray(v)[None] for k, v in clip.items()}


@pytest.mark.parametrize("cover,label", [(9, 1), (7, 0)], ids=["majority", "minority"])
def test_stride_labels_take_the_majority(cover, label):
  masks = np.zeros((2, 1, 4, 4), np.uint8)
  masks[0, 0].flat[:cover] = 1  # instance 0 covers `cover` of the cell's 16 pixels
  labels = tk_precision.stride_labels(jnp.asarray(masks), jnp.asarray([True, True]), 4)
  assert int(labels[0, 0, 0]) == label


def test_masks_are_required():
  clip = contrast_batch(_clip((200, 30, 30), (20, 60, 200), L_SHAPE, (2, 1, 6, 5)))
  del clip["masks"]
  with pytest.raises(ValueError, match="with_masks"):
    tk_precision.pair_statistics([clip], CONFIG)


def test_on_a_textured_background_only_tk_pairs_carry_the_box_inward():
  """A box moving over static noise: no colour pair reaches out of the box off the mask, while TK
  links box cells off the mask to cells outside the box in the other frames (`anchored`)."""
  clip = _clip((200, 30, 30), None, L_SHAPE, (2, 1, 6, 5), shift=1)
  out = tk_precision.clip_pair_counts(**clip, config=CONFIG)
  zone = tk_precision.ZONES.index("anchored")
  assert float(out["spatial"][zone, 0]) == 0.0
  assert float(out["temporal"][zone, 0]) > 0.0
  assert float(out["temporal"][zone, 1]) == pytest.approx(float(out["temporal"][zone, 0]))
