"""Boundary IoU (Cheng et al., CVPR 2021) of video masks: a mask-quality measure that looks at
the contour only, so it separates a sharp mask from a blob that covers the same box.

The boundary region of a mask is its pixels within `d` pixels of the contour (the mask minus
its erosion by `d`), with `d = max(1, round(dilation_ratio * image diagonal))`; pixels at the
image border count as contour. Boundary IoU of a video track pair sums the intersections and
unions of the two boundary regions over frames.

`matched_boundary_iou` summarises a results file: every ground-truth track is paired with the
prediction of its video and category that overlaps it most (video mask IoU), and the boundary
IoU and mask IoU of those pairs are averaged over the ground-truth tracks (0 for a track
without any prediction of its category).

  summary = matched_boundary_iou("valid.json", "results.json")
  boundary_iou, mask_iou = summary["boundary_iou"], summary["mask_iou"]
"""

from __future__ import annotations


import numpy as np
from pycocotools import mask as mask_utils
from scipy import ndimage

from maskfreevis_jax.evaluation import ytvis_eval

_SQUARE = np.ones((3, 3), bool)


def boundary_width(height: int, width: int, dilation_ratio: float = 0.02) -> int:
  """Boundary width `d` in pixels for a frame of this size (at least 1)."""
  return max(1, int(round(dilation_ratio * np.hypot(height, width))))


def boundary_region(masks: np.ndarray, dilation_ratio: float = 0.02) -> np.ndarray:
  """Pixels of each mask within `d` pixels of its contour.

  Args:
    masks: bool [..., H, W].
    dilation_ratio: `d` as a fraction of the frame diagonal.

  Returns:
    bool [..., H, W]: mask minus its erosion by `d` (3x3 square steps; outside the frame
    counts as background, so the frame edge is contour).
  """
  masks = np.asarray(masks, bool)
  height, width = masks.shape[-2:]
  d = boundary_width(height, width, dilation_ratio)
  flat = masks.reshape(-1, height, width)
  out = np.zeros_like(flat)
  for i, mask in enumerate(flat):
    if mask.any():
      out[i] = mask & ~ndimage.binary_erosion(mask, structure=_SQUARE, iterations=d, border_value=0)
  return out.reshape(masks.shape)


def boundary_iou_video(
    masks_a: np.ndarray, masks_b: np.ndarray, dilation_ratio: float = 0.02
) -> float:
  """Boundary IoU of two video masks bool [T, H, W] (sums over frames; 0 if both are empty)."""
  a = boundary_region(masks_a, dilation_ratio)
  b = boundary_region(masks_b, dilation_ratio)
  union = np.logical_or(a, b).sum()
  return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _dense(track: ytvis_eval.Track, shape: tuple[int, int, int]) -> np.ndarray:
  out = np.zeros(shape, bool)
  for f, rle in enumerate(track.frame_rles):
    if rle is not None:
      out[f] = mask_utils.decode(rle).astype(bool)
  return out


def matched_boundary_iou(
    gt: ytvis_eval.PathOrDict | ytvis_eval.GroundTruth,
    results: ytvis_eval.PathOrList,
    dilation_ratio: float = 0.02,
) -> dict[str, float]:
  """Mean boundary IoU and mask IoU of each ground-truth track's best prediction, in percent.

  Args:
    gt: YouTube-VIS ground truth (path, dict or `ytvis_eval.GroundTruth`).
    results: YouTube-VIS results (path or list).
    dilation_ratio: boundary width as a fraction of the frame diagonal.

  Returns:
    {'boundary_iou': ..., 'mask_iou': ..., 'num_tracks': ...}; crowd tracks are left out.
  """
  if not isinstance(gt, ytvis_eval.GroundTruth):
    gt = ytvis_eval.load_ground_truth(gt)
  predictions = ytvis_eval.load_results(results, gt)
  boundary, overlap = [], []
  for video_id, tracks in gt.tracks.items():
    height, width, num_frames = gt.videos[video_id]
    shape = (num_frames, height, width)
    candidates = predictions.get(video_id, [])
    for track in tracks:
      if track.iscrowd:
        continue
      same_class = [p for p in candidates if p.category_id == track.category_id]
      if not same_class:
        boundary.append(0.0)
        overlap.append(0.0)
        continue
      ious = ytvis_eval.track_ious(same_class, [track], num_frames)[:, 0]
      best = int(np.argmax(ious))
      overlap.append(float(ious[best]))
      boundary.append(
          boundary_iou_video(_dense(track, shape), _dense(same_class[best], shape), dilation_ratio)
      )
  return {
      "boundary_iou": 100.0 * float(np.mean(boundary)) if boundary else float("nan"),
      "mask_iou": 100.0 * float(np.mean(overlap)) if overlap else float("nan"),
      "num_tracks": float(len(boundary)),
  }
