"""Identity switches of predicted video tracks against ground-truth tracks (CLEAR MOT rule).

Frame by frame, a ground-truth track keeps the predicted track it was matched to while that
prediction still overlaps it (mask IoU >= threshold) and no other ground truth claims it; the
remaining ground truths and predictions are then paired by Hungarian matching on mask IoU,
pairs under the threshold dropped. A switch is a ground truth matched to another prediction
than the last one it was matched to (Bernardin & Stiefelhagen 2008, as py-motmetrics counts
IDSW). Keeping a still-valid pair first matters for VIS models: several queries often predict
near-identical masks of one object, and a plain per-frame argmax would count a switch every time
their IoUs swap order.

  summary = identity_switches(gt_tracks, predicted_tracks)
  switches, matched_fraction = summary.switches, summary.matched / summary.present

Tracks are per-frame RLE lists as in YouTube-VIS files (`annotation['segmentations']`, `None`
where absent): `tracks_from_results` turns a results file's entries into predicted tracks.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any
from collections.abc import Sequence

import numpy as np
from pycocotools import mask as mask_utils
from scipy import optimize

Track = Sequence[dict[str, Any] | None]  # per-frame RLE or None


@dataclasses.dataclass(frozen=True)
class SwitchSummary:
  """Counts over all frames of one video.

  Attributes:
    switches: identity switches.
    matched: ground-truth masks matched to a prediction (IoU >= threshold).
    present: ground-truth masks present.
    switch_frames: the frame of each switch (e.g. to count those at window boundaries).
  """

  switches: int
  matched: int
  present: int
  switch_frames: tuple[int, ...] = ()


def tracks_from_results(results: Sequence[dict[str, Any]]) -> list[Track]:
  """One predicted track per distinct mask sequence, highest score first.

  The official inference keeps a query once per class among its top-k pairs; those entries share
  their masks and are one track.
  """
  return scored_tracks_from_results(results)[0]


def scored_tracks_from_results(
    results: Sequence[dict[str, Any]],
) -> tuple[list[Track], list[float]]:
  """`tracks_from_results` and each track's best score."""
  tracks, scores, seen = [], [], set()
  for result in sorted(results, key=lambda r: -r["score"]):
    key = json.dumps(result["segmentations"], sort_keys=True)
    if key not in seen:
      seen.add(key)
      tracks.append(result["segmentations"])
      scores.append(float(result["score"]))
  return tracks, scores


def _present(rle: dict[str, Any] | None) -> bool:
  return rle is not None and mask_utils.area(rle) > 0


def identity_switches(
    gt_tracks: Sequence[Track], predicted_tracks: Sequence[Track], iou_threshold: float = 0.5
) -> SwitchSummary:
  """Identity switches of `predicted_tracks` against `gt_tracks` (CLEAR MOT rule).

  Args:
    gt_tracks: G ground-truth tracks, each T per-frame RLEs (None: absent).
    predicted_tracks: P predicted tracks of the same T frames.
    iou_threshold: least mask IoU of a match.

  Returns:
    The switches, matched and present ground-truth masks.
  """
  lengths = {len(track) for track in (*gt_tracks, *predicted_tracks)}
  if len(lengths) > 1:
    raise ValueError(f"tracks must cover the same frames, got lengths {sorted(lengths)}")
  num_frames = lengths.pop() if lengths else 0
  last: dict[int, int] = {}  # ground truth -> the prediction it was last matched to
  switch_frames = []
  matched = present = 0
  for t in range(num_frames):
    gt_ids = [g for g, track in enumerate(gt_tracks) if _present(track[t])]
    present += len(gt_ids)
    pred_ids = [p for p, track in enumerate(predicted_tracks) if _present(track[t])]
    if not gt_ids or not pred_ids:
      continue
    ious = np.asarray(
        mask_utils.iou(
            [predicted_tracks[p][t] for p in pred_ids],
            [gt_tracks[g][t] for g in gt_ids],
            [0] * len(gt_ids),
        )
    )
    pairs = {}  # ground-truth column -> prediction row
    for c, g in enumerate(gt_ids):  # still-valid pairs of the previous match are kept
      if last.get(g) in pred_ids:
        r = pred_ids.index(last[g])
        if ious[r, c] >= iou_threshold and r not in pairs.values():
          pairs[c] = r
    free_rows = [r for r in range(len(pred_ids)) if r not in pairs.values()]
    free_cols = [c for c in range(len(gt_ids)) if c not in pairs]
    if free_rows and free_cols:
      sub = ious[np.ix_(free_rows, free_cols)]
      for r, c in zip(*optimize.linear_sum_assignment(-sub)):
        if sub[r, c] >= iou_threshold:
          pairs[free_cols[c]] = free_rows[r]
    for c, r in pairs.items():
      g, p = gt_ids[c], pred_ids[r]
      matched += 1
      if g in last and last[g] != p:
        switch_frames.append(t)
      last[g] = p
  return SwitchSummary(
      switches=len(switch_frames),
      matched=matched,
      present=present,
      switch_frames=tuple(switch_frames),
  )


@dataclasses.dataclass(frozen=True)
class Coverage:
  """How predicted tracks and ground-truth tracks cover each other in one video.

  Attributes:
    splits: int [G] per ground-truth track, the predicted tracks matched to it (mask IoU >=
      threshold) on at least one frame; > 1 means the object was split into several tracks.
    merges: int [P] per predicted track, the ground-truth tracks it is matched to on some frame;
      > 1 means one track spans several objects.
    video_iou: float64 [P, G] spatio-temporal IoU (intersections and unions summed over frames,
      as YouTube-VIS AP matches them).
  """

  splits: np.ndarray
  merges: np.ndarray
  video_iou: np.ndarray


def _frame_overlaps(gt_rles, predicted_rles) -> tuple[np.ndarray, np.ndarray]:
  """float64 [P, G] intersections and IoUs of one frame's masks (absent: empty)."""
  gt_present = [g for g, r in enumerate(gt_rles) if _present(r)]
  pred_present = [p for p, r in enumerate(predicted_rles) if _present(r)]
  inter = np.zeros((len(predicted_rles), len(gt_rles)))
  ious = np.zeros_like(inter)
  if gt_present and pred_present:
    sub = np.asarray(
        mask_utils.iou(
            [predicted_rles[p] for p in pred_present],
            [gt_rles[g] for g in gt_present],
            [0] * len(gt_present),
        )
    )
    pred_area = np.asarray([mask_utils.area(predicted_rles[p]) for p in pred_present], float)
    gt_area = np.asarray([mask_utils.area(gt_rles[g]) for g in gt_present], float)
    # iou = i / (a + b - i)  =>  i = iou (a + b) / (1 + iou)
    sub_inter = sub * (pred_area[:, None] + gt_area[None]) / (1.0 + sub)
    inter[np.ix_(pred_present, gt_present)] = sub_inter
    ious[np.ix_(pred_present, gt_present)] = sub
  return inter, ious


def track_coverage(
    gt_tracks: Sequence[Track], predicted_tracks: Sequence[Track], iou_threshold: float = 0.5
) -> Coverage:
  """Splits (predicted tracks per object) and merges (objects per predicted track).

  Args:
    gt_tracks: G ground-truth tracks, each T per-frame RLEs (None: absent).
    predicted_tracks: P predicted tracks of the same T frames.
    iou_threshold: least per-frame mask IoU for a track to cover an object on that frame.

  Returns:
    The `Coverage`.
  """
  num_frames = len(gt_tracks[0]) if gt_tracks else 0
  num_gt, num_pred = len(gt_tracks), len(predicted_tracks)
  covers = np.zeros((num_pred, num_gt), bool)
  inter = np.zeros((num_pred, num_gt))
  gt_area = np.zeros(num_gt)
  pred_area = np.zeros(num_pred)
  for t in range(num_frames):
    gt_rles = [track[t] for track in gt_tracks]
    predicted_rles = [track[t] for track in predicted_tracks]
    frame_inter, frame_iou = _frame_overlaps(gt_rles, predicted_rles)
    inter += frame_inter
    covers |= frame_iou >= iou_threshold
    gt_area += [mask_utils.area(r) if r is not None else 0 for r in gt_rles]
    pred_area += [mask_utils.area(r) if r is not None else 0 for r in predicted_rles]
  union = pred_area[:, None] + gt_area[None] - inter
  video_iou = np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)
  return Coverage(splits=covers.sum(0), merges=covers.sum(1), video_iou=video_iou)
