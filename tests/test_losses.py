"""Mask-free losses: golden parity with the official release, an independent torch reference for
other clip lengths and pairings, gradients, padding invariance, jit/vmap and input checking."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import color as skcolor

from maskfreevis_jax import losses

GOLDEN_FILES = ["tk_basic", "tk_warmup"]
LOSS_NAMES = ["loss_mask_proj", "loss_bound", "loss_bound_neighbor"]


def load_golden(fixtures_dir, name):
  """Golden arrays plus the instances re-packed into the padded [B, N, ...] layout."""
  data = dict(np.load(fixtures_dir / f"losses_{name}.npz"))
  meta = json.loads(str(data["meta"]))
  num_clips, num_frames, height, width = data["frames_rgb"].shape[:4]
  videos, queries = data["instance_video"], data["instance_query"]
  max_inst = int(np.bincount(videos, minlength=num_clips).max())
  logits = np.zeros((num_clips, max_inst) + data["mask_logits"].shape[2:], np.float32)
  boxes = np.zeros((num_clips, max_inst, num_frames, 4), np.float32)
  box_masks = np.zeros_like(logits)
  valid = np.zeros((num_clips, max_inst), bool)
  slot = [0] * num_clips
  for i, (b, q) in enumerate(zip(videos, queries)):
    n = slot[b]
    slot[b] += 1
    logits[b, n] = data["mask_logits"][b, q]
    boxes[b, n] = np.asarray(meta["boxes_xyxy"][b][n], np.float32)
    box_masks[b, n] = data["box_masks_stride4"][i]
    valid[b, n] = True
  return data, dict(
      logits=logits,
      boxes=boxes,
      box_valid=boxes.sum(-1) > 0,
      box_masks=box_masks,
      valid=valid,
      image_size=(height, width),
  )


@pytest.fixture(scope="module", params=GOLDEN_FILES)
def golden(request, fixtures_dir):
  return load_golden(fixtures_dir, request.param)


def test_downsample_and_lab_match_golden(golden):
  data, _ = golden
  pooled = losses.downsample_frames(jnp.asarray(data["frames_rgb"]), 4)
  np.testing.assert_array_equal(np.asarray(pooled), data["frames_rgb_stride4"].astype(np.float32))
  lab = np.moveaxis(np.asarray(losses.rgb_to_lab(pooled)), -1, 2)
  np.testing.assert_allclose(lab, data["lab"], atol=1e-3)


def test_similarity_maps_match_golden(golden):
  data, _ = golden
  lab = jnp.asarray(np.moveaxis(data["lab"], 2, -1))  # golden Lab, [B, T, h, w, 3]
  spatial = losses.spatial_color_similarity(lab, 3, 2)
  np.testing.assert_allclose(np.asarray(spatial), data["spatial_similarity"], atol=1e-5, rtol=0)
  for a, b in [(0, 1), (0, 2), (1, 2)]:
    temporal = losses.temporal_patch_similarity(lab[:, a], lab[:, b], 3, 3, 3)
    np.testing.assert_allclose(
        np.asarray(temporal), data[f"temporal_similarity_{a}{b}"], atol=1e-5, rtol=0
    )


def test_affinities_from_frames_match_golden(golden):
  """End to end from uint8 frames: our float32 Lab differs from skimage's float64 by <1e-4."""
  data, _ = golden
  affinities = losses.compute_color_affinities(jnp.asarray(data["frames_rgb"]))
  np.testing.assert_allclose(
      np.asarray(affinities.spatial_similarity), data["spatial_similarity"], atol=1e-4, rtol=0
  )
  assert affinities.pairs == ((0, 1), (0, 2), (1, 2))
  for p, (a, b) in enumerate(affinities.pairs):
    raw = data[f"temporal_similarity_{a}{b}"]
    ranked = -np.sort(-raw, axis=1)
    expected = raw >= np.maximum(ranked[:, 4:5], 0.05)  # top-5 kept, then thresholded
    # Pixels whose 5th/6th candidates or threshold crossing are within float noise may differ.
    tie = (ranked[:, 4] - ranked[:, 5] < 1e-4) & (ranked[:, 4] > 0.05 - 1e-4)
    ambiguous = tie[:, None] | (np.abs(raw - 0.05) < 1e-4)
    got = np.asarray(affinities.temporal_affinity[:, p]) > 0
    assert np.all((got == expected) | ambiguous)
    assert expected.sum() > 0 and (~ambiguous).mean() > 0.99


def test_box_masks_match_golden(golden):
  data, packed = golden
  masks = losses.box_masks_at_stride(
      jnp.asarray(packed["boxes"]), jnp.asarray(packed["box_valid"]), packed["image_size"], 4
  )
  np.testing.assert_allclose(
      np.asarray(masks)[packed["valid"]], data["box_masks_stride4"], atol=1e-6
  )


def test_losses_match_golden(golden):
  data, packed = golden
  affinities = losses.compute_color_affinities(jnp.asarray(data["frames_rgb"]))
  step = float(data["warmup_factor"]) * 2000
  out = losses.mask_free_losses(
      jnp.asarray(packed["logits"]),
      jnp.asarray(packed["box_masks"]),
      jnp.asarray(packed["valid"]),
      affinities,
      step,
  )
  for name in LOSS_NAMES:
    np.testing.assert_allclose(float(out[name]), float(data[name]), rtol=2e-4, err_msg=name)


# --- An independent reference, written directly from the golden README with torch unfold. ---


def _unfold(x, size, dilation):
  """[N, C, h, w] -> [N, C, size*size, h, w], zero padded, row-major window (centre included)."""
  pad = dilation * (size // 2)
  cols = F.unfold(x, kernel_size=size, dilation=dilation, padding=pad)
  return cols.reshape(x.shape[0], x.shape[1], size * size, x.shape[2], x.shape[3])


def _same_cost(center_logits, neighbour_logits_unfolded):
  """-log(P P' + (1-P)(1-P')) in log space, neighbours zero padded in log-prob space."""
  log_fg = F.logsigmoid(center_logits)[:, :, None]
  log_bg = F.logsigmoid(-center_logits)[:, :, None]
  return -torch.logaddexp(
      log_fg + neighbour_logits_unfolded[0], log_bg + neighbour_logits_unfolded[1]
  )


def reference_losses(frames, logits, boxes, box_valid, valid, step, pairs, cfg):
  """Straightforward torch version of the three losses (float64) for any T and pairing."""
  frames = torch.as_tensor(frames, dtype=torch.float64)
  num_clips, num_frames, height, width, _ = frames.shape
  stride = cfg.stride
  pooled = torch.floor(F.avg_pool2d(frames.permute(0, 1, 4, 2, 3).flatten(0, 1), stride, stride))
  lab = np.stack([skcolor.rgb2lab(p.permute(1, 2, 0).numpy().astype(np.uint8)) for p in pooled])
  lab = (
      torch.as_tensor(lab)
      .permute(0, 3, 1, 2)
      .reshape(num_clips, num_frames, 3, height // stride, width // stride)
  )
  h, w = lab.shape[-2:]
  # Spatial similarity per clip-frame: [B, T, 8, h, w].
  flat = lab.flatten(0, 1)
  unf = _unfold(flat, cfg.pairwise_size, cfg.pairwise_dilation)
  centre = (cfg.pairwise_size**2) // 2
  unf = torch.cat([unf[:, :, :centre], unf[:, :, centre + 1 :]], dim=2)
  spatial = torch.exp(-0.5 * torch.norm(flat[:, :, None] - unf, dim=1)).reshape(
      num_clips, num_frames, -1, h, w
  )
  # Box masks: rasterise at full size, bilinear resize.
  full = torch.zeros(logits.shape[:3] + (height, width), dtype=torch.float64)
  for idx in np.ndindex(*logits.shape[:3]):
    if box_valid[idx]:
      x1, y1, x2, y2 = [int(v) for v in boxes[idx]]
      full[idx][y1:y2, x1:x2] = 1.0
  box_masks = F.interpolate(
      full.flatten(0, 2)[:, None], (h, w), mode="bilinear", align_corners=False
  ).reshape(logits.shape)
  x = torch.as_tensor(logits, dtype=torch.float64).requires_grad_(True)
  sel = torch.as_tensor(valid)
  xs, ms = x[sel], box_masks[sel]  # [M, T, h, w]
  clip_of = torch.nonzero(sel)[:, 0]
  # Projection.
  probs = xs.sigmoid()

  def dice(a, b):
    return 1 - 2 * (a * b).sum(-1) / ((a * a).sum(-1) + (b * b).sum(-1) + 1e-5)

  proj = (dice(probs.amax(-2), ms.amax(-2)) + dice(probs.amax(-1), ms.amax(-1))).mean()
  # Spatial pairwise.
  flat_x = xs.flatten(0, 1)[:, None]
  lf, lb = F.logsigmoid(flat_x), F.logsigmoid(-flat_x)
  unf_f = _unfold(lf, cfg.pairwise_size, cfg.pairwise_dilation)
  unf_b = _unfold(lb, cfg.pairwise_size, cfg.pairwise_dilation)
  unf_f = torch.cat([unf_f[:, :, :centre], unf_f[:, :, centre + 1 :]], dim=2)
  unf_b = torch.cat([unf_b[:, :, :centre], unf_b[:, :, centre + 1 :]], dim=2)
  cost = _same_cost(flat_x, (unf_f, unf_b))[:, 0]
  weight = (spatial[clip_of].flatten(0, 1) >= cfg.pairwise_color_threshold) * ms.flatten(0, 1)[
      :, None
  ]
  bound = (cost * weight).sum() / weight.sum().clamp(min=1)
  # TK-Loss.
  union = (ms.sum(1) >= 1).double()[:, None]  # [M, 1, h, w]
  tk = 0
  for a, b in pairs:
    patches = [_unfold(lab[:, t], cfg.patch_size, 1).flatten(1, 2) for t in (a, b)]
    cand = _unfold(patches[0], cfg.temporal_search_size, cfg.temporal_dilation)
    sim = torch.exp(-0.5 * torch.norm(patches[1][:, :, None] - cand, dim=1))  # [B, 9, h, w]
    top, idx = torch.topk(sim, cfg.temporal_topk, dim=1)
    kept = torch.zeros_like(sim).scatter(1, idx, top)[clip_of]
    weight = (kept >= cfg.temporal_threshold) * union
    xa, xb = xs[:, a : a + 1], xs[:, b : b + 1]
    unf_f = _unfold(F.logsigmoid(xa), cfg.temporal_search_size, cfg.temporal_dilation)[:, 0]
    unf_b = _unfold(F.logsigmoid(-xa), cfg.temporal_search_size, cfg.temporal_dilation)[:, 0]
    cost = -torch.logaddexp(F.logsigmoid(xb) + unf_f, F.logsigmoid(-xb) + unf_b)
    tk = tk + (cost * weight).sum() / weight.sum().clamp(min=1)
  tk = tk * cfg.temporal_weight * min(step / cfg.warmup_steps, 1.0)
  values = {"loss_mask_proj": proj, "loss_bound": bound, "loss_bound_neighbor": tk}
  grads = {k: torch.autograd.grad(v, x, retain_graph=True)[0].numpy() for k, v in values.items()}
  return {k: float(v.detach()) for k, v in values.items()}, grads


def make_problem(seed, num_clips=2, num_inst=3, num_frames=3, height=48, width=64):
  rng = np.random.default_rng(seed)
  # Smooth colour fields plus noise: realistic similarity statistics (many pass the thresholds).
  base = rng.integers(0, 256, size=(num_clips, 1, height // 16, width // 16, 3))
  frames = np.repeat(np.repeat(np.repeat(base, num_frames, 1), 16, 2), 16, 3)
  frames = np.clip(frames + rng.integers(-6, 7, size=frames.shape), 0, 255).astype(np.uint8)
  logits = rng.normal(0, 2, size=(num_clips, num_inst, num_frames, height // 4, width // 4))
  x1 = rng.integers(0, width // 2, size=(num_clips, num_inst, num_frames))
  y1 = rng.integers(0, height // 2, size=(num_clips, num_inst, num_frames))
  boxes = np.stack(
      [
          x1,
          y1,
          x1 + rng.integers(4, width // 2, size=x1.shape),
          y1 + rng.integers(4, height // 2, size=y1.shape),
      ],
      -1,
  ).astype(np.float32)
  box_valid = rng.random((num_clips, num_inst, num_frames)) > 0.2
  valid = np.ones((num_clips, num_inst), bool)
  valid[-1, -1] = False
  return frames, logits.astype(np.float32), boxes, box_valid, valid


def jax_losses(frames, logits, boxes, box_valid, valid, step, cfg):
  affinities = losses.compute_color_affinities(jnp.asarray(frames), cfg)
  box_masks = losses.box_masks_at_stride(
      jnp.asarray(boxes), jnp.asarray(box_valid), frames.shape[2:4], cfg.stride
  )

  def all_losses(x):
    return losses.mask_free_losses(x, box_masks, jnp.asarray(valid), affinities, step, cfg)

  values = all_losses(jnp.asarray(logits))
  grads = jax.jacrev(all_losses)(jnp.asarray(logits))  # one trace for the three gradients
  return ({k: float(v) for k, v in values.items()}, {k: np.asarray(v) for k, v in grads.items()})


@pytest.mark.parametrize("num_frames", [2, 3, 5])
@pytest.mark.parametrize("pairing", ["all_pairs", "cyclic"])
def test_matches_reference_for_clip_lengths_and_pairings(num_frames, pairing):
  cfg = losses.MaskFreeLossConfig(frame_pairing=pairing, warmup_steps=100)
  problem = make_problem(num_frames, num_frames=num_frames)
  pairs = losses.frame_pairs(num_frames, pairing)
  ref_values, ref_grads = reference_losses(*problem, 40, pairs, cfg)
  values, grads = jax_losses(*problem, 40, cfg)
  for name in LOSS_NAMES:
    np.testing.assert_allclose(values[name], ref_values[name], rtol=2e-4, err_msg=name)
    scale = np.abs(ref_grads[name]).max()
    np.testing.assert_allclose(grads[name], ref_grads[name], atol=2e-4 * scale, err_msg=name)


def test_configurable_window_sizes_match_reference():
  cfg = losses.MaskFreeLossConfig(
      pairwise_size=5,
      pairwise_dilation=1,
      patch_size=5,
      temporal_search_size=5,
      temporal_dilation=2,
      temporal_topk=7,
      temporal_threshold=0.02,
      pairwise_color_threshold=0.2,
      temporal_weight=0.5,
      warmup_steps=10,
  )
  problem = make_problem(7)
  ref_values, _ = reference_losses(*problem, 4, losses.frame_pairs(3, "all_pairs"), cfg)
  values, _ = jax_losses(*problem, 4, cfg)
  for name in LOSS_NAMES:
    np.testing.assert_allclose(values[name], ref_values[name], rtol=2e-4, err_msg=name)


def test_frame_pairs():
  assert losses.frame_pairs(3, "all_pairs") == ((0, 1), (0, 2), (1, 2))
  assert losses.frame_pairs(4, "cyclic") == ((0, 1), (1, 2), (2, 3), (3, 0))
  assert losses.frame_pairs(2, "cyclic") == ((0, 1), (1, 0))


def test_gradients_match_finite_differences():
  cfg = losses.MaskFreeLossConfig(warmup_steps=0)
  frames, logits, boxes, box_valid, valid = make_problem(
      3, num_clips=1, num_inst=2, height=32, width=32
  )
  affinities = losses.compute_color_affinities(jnp.asarray(frames), cfg)
  box_masks = losses.box_masks_at_stride(jnp.asarray(boxes), jnp.asarray(box_valid), (32, 32))
  direction = np.random.default_rng(0).normal(size=logits.shape).astype(np.float32)
  for name in LOSS_NAMES:
    f = lambda x: losses.mask_free_losses(x, box_masks, jnp.asarray(valid), affinities, 0, cfg)[
        name
    ]
    analytic = float(jnp.vdot(jax.grad(f)(jnp.asarray(logits)), direction))
    eps = 1e-2
    numeric = (
        float(f(jnp.asarray(logits + eps * direction)))
        - float(f(jnp.asarray(logits - eps * direction)))
    ) / (2 * eps)
    np.testing.assert_allclose(analytic, numeric, rtol=2e-2, atol=1e-4, err_msg=name)
    assert abs(analytic) > 1e-4, name  # the check is not vacuous


def test_padding_is_inert():
  cfg = losses.MaskFreeLossConfig(warmup_steps=10)
  frames, logits, boxes, box_valid, valid = make_problem(5)
  valid[:] = True
  affinities = losses.compute_color_affinities(jnp.asarray(frames), cfg)

  def run(logits, boxes, box_valid, valid):
    masks = losses.box_masks_at_stride(jnp.asarray(boxes), jnp.asarray(box_valid), (48, 64))
    f = lambda x, k: losses.mask_free_losses(x, masks, jnp.asarray(valid), affinities, 5, cfg)[k]
    return (
        {k: float(f(jnp.asarray(logits), k)) for k in LOSS_NAMES},
        {k: np.asarray(jax.grad(f)(jnp.asarray(logits), k)) for k in LOSS_NAMES},
    )

  base_values, base_grads = run(logits, boxes, box_valid, valid)
  # Two padded instances per clip holding garbage: inf/nan logits and full-frame boxes.
  pad = np.full(logits.shape[:1] + (2,) + logits.shape[2:], np.nan, np.float32)
  pad[:, 1] = np.inf
  padded_values, padded_grads = run(
      np.concatenate([logits, pad], 1),
      np.concatenate([boxes, np.tile([[[[0, 0, 64, 48]]]], (2, 2, 3, 1))], 1).astype(np.float32),
      np.concatenate([box_valid, np.ones((2, 2, 3), bool)], 1),
      np.concatenate([valid, np.zeros((2, 2), bool)], 1),
  )
  for name in LOSS_NAMES:
    assert padded_values[name] == pytest.approx(base_values[name], rel=1e-6), name
    np.testing.assert_allclose(padded_grads[name][:, :3], base_grads[name], rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(padded_grads[name][:, 3:], 0.0)


def test_no_valid_instance_gives_zero():
  frames, logits, boxes, box_valid, _ = make_problem(1)
  affinities = losses.compute_color_affinities(jnp.asarray(frames))
  masks = losses.box_masks_at_stride(jnp.asarray(boxes), jnp.asarray(box_valid), (48, 64))
  out = losses.mask_free_losses(
      jnp.asarray(logits), masks, jnp.zeros(logits.shape[:2], bool), affinities, 3000
  )
  assert all(float(v) == 0.0 for v in out.values())


def test_jit_and_vmap_over_layers():
  cfg = losses.MaskFreeLossConfig()
  frames, logits, boxes, box_valid, valid = make_problem(2)
  layers = np.stack([logits, logits * 0.5 - 1.0, logits + 1.5])  # [L, B, N, T, h, w]

  @jax.jit
  def per_layer(frames, layers, boxes, box_valid, valid, step):
    affinities = losses.compute_color_affinities(frames, cfg)
    masks = losses.box_masks_at_stride(boxes, box_valid, (48, 64), cfg.stride)
    return jax.vmap(lambda x: losses.mask_free_losses(x, masks, valid, affinities, step, cfg))(
        layers
    )

  out = per_layer(
      jnp.asarray(frames),
      jnp.asarray(layers),
      jnp.asarray(boxes),
      jnp.asarray(box_valid),
      jnp.asarray(valid),
      jnp.int32(700),
  )
  affinities = losses.compute_color_affinities(jnp.asarray(frames), cfg)
  masks = losses.box_masks_at_stride(jnp.asarray(boxes), jnp.asarray(box_valid), (48, 64))
  for i in range(3):
    eager = losses.mask_free_losses(
        jnp.asarray(layers[i]), masks, jnp.asarray(valid), affinities, 700, cfg
    )
    for name in LOSS_NAMES:
      np.testing.assert_allclose(float(out[name][i]), float(eager[name]), rtol=1e-5)
  assert len({float(out["loss_bound"][i]) for i in range(3)}) == 3


def test_warmup_scales_tk_only():
  frames, logits, boxes, box_valid, valid = make_problem(4)
  affinities = losses.compute_color_affinities(jnp.asarray(frames))
  masks = losses.box_masks_at_stride(jnp.asarray(boxes), jnp.asarray(box_valid), (48, 64))
  args = (jnp.asarray(logits), masks, jnp.asarray(valid), affinities)
  half, full, later = (losses.mask_free_losses(*args, s) for s in (1000, 2000, 5000))
  assert float(half["loss_bound_neighbor"]) == pytest.approx(
      0.5 * float(full["loss_bound_neighbor"]), rel=1e-6
  )
  assert float(later["loss_bound_neighbor"]) == pytest.approx(float(full["loss_bound_neighbor"]))
  assert float(half["loss_bound"]) == float(full["loss_bound"])


def test_lab_matches_skimage_over_colour_cube():
  rng = np.random.default_rng(0)
  rgb = np.concatenate(
      [
          rng.integers(0, 256, size=(20000, 3)),
          np.array(
              [
                  [0, 0, 0],
                  [255, 255, 255],
                  [255, 0, 0],
                  [0, 255, 0],
                  [0, 0, 255],
                  [1, 1, 1],
                  [10, 3, 7],
              ]
          ),
      ]
  ).astype(np.uint8)
  expected = skcolor.rgb2lab(rgb[None])[0]
  np.testing.assert_allclose(np.asarray(losses.rgb_to_lab(jnp.asarray(rgb))), expected, atol=1e-3)


def test_bad_input_names_the_argument():
  frames, logits, boxes, box_valid, valid = make_problem(0)
  affinities = losses.compute_color_affinities(jnp.asarray(frames))
  masks = losses.box_masks_at_stride(jnp.asarray(boxes), jnp.asarray(box_valid), (48, 64))
  with pytest.raises(ValueError, match="frames"):
    losses.compute_color_affinities(jnp.asarray(frames[0]))
  with pytest.raises(ValueError, match="at least 2 frames"):
    losses.compute_color_affinities(jnp.asarray(frames[:, :1]))
  with pytest.raises(ValueError, match="frames"):
    losses.compute_color_affinities(jnp.asarray(frames).astype(bool))
  with pytest.raises(ValueError, match="mask_logits"):
    losses.mask_free_losses(jnp.asarray(logits[0]), masks, valid, affinities, 0)
  with pytest.raises(ValueError, match="box_masks"):
    losses.mask_free_losses(jnp.asarray(logits), masks[..., :-1], valid, affinities, 0)
  with pytest.raises(ValueError, match="instance_valid"):
    losses.mask_free_losses(jnp.asarray(logits), masks, valid[:, :-1], affinities, 0)
  with pytest.raises(ValueError, match="T >= 2"):
    losses.mask_free_losses(jnp.asarray(logits[:, :, :1]), masks[:, :, :1], valid, affinities, 0)
  with pytest.raises(ValueError, match="affinities"):
    losses.mask_free_losses(
        jnp.asarray(logits[..., :-1, :]), masks[..., :-1, :], valid, affinities, 0
    )
  with pytest.raises(ValueError, match="boxes"):
    losses.box_masks_at_stride(jnp.asarray(boxes[..., :3]), jnp.asarray(box_valid), (48, 64))
  with pytest.raises(ValueError, match="box_valid"):
    losses.box_masks_at_stride(jnp.asarray(boxes), jnp.asarray(box_valid[..., 0]), (48, 64))
  with pytest.raises(ValueError, match="frame_pairing"):
    losses.MaskFreeLossConfig(frame_pairing="random")
  with pytest.raises(ValueError, match="patch_size"):
    losses.MaskFreeLossConfig(patch_size=4)


# --- Box windows: the pairwise and TK costs computed on per-instance windows around the boxes. ---


def small_box_problem(seed, placement, num_frames=3):
  """96x128 clips whose boxes (<= 14 px, moving <= 4 px) sit in the interior or on frame edges."""
  frames, logits, _, box_valid, valid = make_problem(
      seed, num_frames=num_frames, height=96, width=128
  )
  rng = np.random.default_rng(seed)
  size = rng.integers(6, 15, size=box_valid.shape + (2,))
  jitter = rng.integers(0, 5, size=box_valid.shape + (2,))
  if placement == "interior":
    corner = rng.integers(20, 60, size=box_valid.shape[:2] + (1, 2)) + jitter
  elif placement == "top_left":
    corner = jitter
  else:  # bottom_right: the boxes touch the far edges
    corner = np.array([128, 96]) - size - jitter
  boxes = np.concatenate([corner, corner + size], -1).astype(np.float32)
  return frames, logits, boxes, box_valid, valid


def losses_and_grads(problem, cfg, step=40):
  frames, logits, boxes, box_valid, valid = problem
  affinities = losses.compute_color_affinities(jnp.asarray(frames), cfg)
  masks = losses.box_masks_at_stride(
      jnp.asarray(boxes), jnp.asarray(box_valid), frames.shape[2:4], cfg.stride
  )

  def total(x):
    out = losses.mask_free_losses(x, masks, jnp.asarray(valid), affinities, step, cfg)
    return out["loss_bound"] + out["loss_bound_neighbor"], out

  (_, values), grad = jax.jit(jax.value_and_grad(total, has_aux=True))(jnp.asarray(logits))
  return (
      {k: float(v) for k, v in values.items()},
      np.asarray(grad),
      losses.box_windows(masks, cfg),
  )


@pytest.mark.parametrize("placement", ["interior", "top_left", "bottom_right"])
@pytest.mark.parametrize("num_frames,pairing", [(3, "all_pairs"), (2, "cyclic")])
def test_box_windows_change_no_value(placement, num_frames, pairing):
  problem = small_box_problem(11, placement, num_frames)
  windowed_cfg = losses.MaskFreeLossConfig(
      frame_pairing=pairing, warmup_steps=100, box_window_fractions=(0.25, 0.5)
  )
  whole_cfg = losses.MaskFreeLossConfig(
      frame_pairing=pairing, warmup_steps=100, box_window_fractions=()
  )
  values, grad, windows = losses_and_grads(problem, windowed_cfg)
  whole_values, whole_grad, _ = losses_and_grads(problem, whole_cfg)
  # The windowed path ran: 12x16 windows (half of the 24x32 mask grid), not the whole frame.
  assert windows.sizes == ((6, 8), (12, 16)) and int(windows.size_index) == 1
  for name in LOSS_NAMES:
    np.testing.assert_allclose(values[name], whole_values[name], rtol=1e-5, err_msg=name)
  assert values["loss_bound"] > 0 and values["loss_bound_neighbor"] > 0
  np.testing.assert_allclose(grad, whole_grad, rtol=1e-5, atol=1e-6 * np.abs(whole_grad).max())
  # ...and both agree with the independent float64 reference.
  ref_values, _ = reference_losses(
      *problem, 40, losses.frame_pairs(num_frames, pairing), windowed_cfg
  )
  for name in LOSS_NAMES:
    np.testing.assert_allclose(values[name], ref_values[name], rtol=2e-4, err_msg=name)


def test_box_windows_choice():
  frames, logits, boxes, box_valid, valid = small_box_problem(3, "interior")
  cfg = losses.MaskFreeLossConfig(box_window_fractions=(0.5, 0.25))
  assert cfg.box_window_fractions == (0.25, 0.5)  # sorted: the smallest that fits wins
  masks = losses.box_masks_at_stride(jnp.asarray(boxes), jnp.asarray(box_valid), (96, 128))
  windows = losses.box_windows(masks, cfg)
  # Window corners: the support of each instance's boxes over the clip, less the margin of 3.
  support = np.asarray(masks).any(2)
  for b, n in np.ndindex(*support.shape[:2]):
    if support[b, n].any():
      rows, cols = np.nonzero(support[b, n].any(1))[0], np.nonzero(support[b, n].any(0))[0]
      assert int(windows.start_y[b, n]) == max(rows[0] - 3, 0)
      assert int(windows.start_x[b, n]) == max(cols[0] - 3, 0)
  # One instance spanning the frame forces the whole frame for the batch.
  big = masks.at[0, 0, 0].set(1.0)
  assert int(losses.box_windows(big, cfg).size_index) == 2
  # No box at all: the smallest window.
  assert int(losses.box_windows(jnp.zeros_like(masks), cfg).size_index) == 0
  # Without fractions there is nothing to choose.
  assert losses.box_windows(masks, losses.MaskFreeLossConfig(box_window_fractions=())).sizes == ()
  with pytest.raises(ValueError, match="box_window_fractions"):
    losses.MaskFreeLossConfig(box_window_fractions=(0.5, 1.0))


def test_box_windows_stay_one_branch_under_vmap_over_layers():
  """Per-layer matchings differ, but the window choice comes from the box masks alone: one branch
  (a `cond`), not every branch evaluated and selected."""
  cfg = losses.MaskFreeLossConfig()
  frames, logits, boxes, box_valid, valid = small_box_problem(5, "interior")
  affinities = losses.compute_color_affinities(jnp.asarray(frames), cfg)
  masks = losses.box_masks_at_stride(jnp.asarray(boxes), jnp.asarray(box_valid), (96, 128))
  layers = jnp.stack([jnp.asarray(logits), jnp.asarray(logits) * 2.0])
  layer_valid = jnp.stack([jnp.asarray(valid), jnp.ones_like(jnp.asarray(valid))])

  def per_layer(x, v):
    return losses.mask_free_losses(x, masks, v, affinities, 40, cfg)["loss_bound_neighbor"]

  jaxpr = str(
      jax.make_jaxpr(jax.grad(lambda x: jnp.sum(jax.vmap(per_layer)(x, layer_valid))))(layers)
  )
  assert "cond[" in jaxpr
  out = jax.vmap(per_layer)(layers, layer_valid)
  for i in range(2):
    np.testing.assert_allclose(
        float(out[i]), float(per_layer(layers[i], layer_valid[i])), rtol=1e-5
    )


def test_lab_reverse_channels_equals_reversing_the_frames():
  """The release's `ds_image[[2, 1, 0]]` quirk: the flag gives exactly the affinities of BGR input."""
  frames = jnp.asarray(make_problem(6)[0])
  quirk = losses.compute_color_affinities(
      frames, losses.MaskFreeLossConfig(lab_reverse_channels=True)
  )
  reversed_input = losses.compute_color_affinities(frames[..., ::-1], losses.MaskFreeLossConfig())
  plain = losses.compute_color_affinities(frames, losses.MaskFreeLossConfig())
  for field in ("spatial_similarity", "temporal_similarity"):
    np.testing.assert_array_equal(
        np.asarray(getattr(quirk, field)), np.asarray(getattr(reversed_input, field)), err_msg=field
    )
    # The flag matters on coloured frames (R != B), so the equality above is not vacuous.
    assert not np.allclose(
        np.asarray(getattr(quirk, field)), np.asarray(getattr(plain, field)), atol=1e-3
    ), field
