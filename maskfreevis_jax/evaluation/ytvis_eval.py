"""YouTube-VIS video instance segmentation metrics (AP, AP50, AP75, APs/m/l, AR1/10/100).

A vectorised numpy re-implementation of the protocol of the official YouTube-VIS evaluation
(`ytvoseval.py` of the youtubevos cocoapi fork used by Mask2Former-VIS / MaskFreeVIS). It produces
the same numbers as the official code on the same files:

* A track (ground-truth annotation or predicted instance) has one segmentation per video frame (or
  None where absent). The IoU of two tracks is spatio-temporal: intersections and unions are summed
  over all frames of the video; a frame where only one side is present adds its area to the union.
* A track's area for the small/medium/large ranges is the mean of its non-zero per-frame areas;
  the ranges are [0, 128^2], [128^2, 256^2], [256^2, 1e10] (not the COCO image ranges).
* Ground-truth tracks with `iscrowd` are ignored (a detection matched to them is neither a true nor
  a false positive) and may be matched by several detections; their IoU is the plain IoU.
* Per video and category, detections are sorted by score (stable) and greedily matched to the
  unmatched ground truth with the highest IoU above each threshold; precision is the COCO 101-point
  interpolated precision, maxDets (1, 10, 100) count detections per video and category.

Entry points: `evaluate_ytvis` (metrics dict), `accumulate_ytvis` (precision / recall arrays),
`format_table` (pretty table), and a command line:

  python -m maskfreevis_jax.evaluation.ytvis_eval --gt valid.json --results results.json
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import numbers
import os
from typing import Any
from collections.abc import Iterable, Mapping, Sequence

from absl import logging
import numpy as np
from pycocotools import mask as mask_utils

# Same constructions as the official parameters, so the float values are bit-identical.
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
MAX_DETECTIONS = (1, 10, 100)
AREA_RANGES = ((0**2, 1e5**2), (0**2, 128**2), (128**2, 256**2), (256**2, 1e5**2))
AREA_LABELS = ("all", "small", "medium", "large")
# Name -> (is_precision, iou threshold or None for the mean, area label, maxDets), in the order of
# the official summary (stats[0..11]).
SUMMARY_METRICS = collections.OrderedDict(
    [
        ("AP", (True, None, "all", 100)),
        ("AP50", (True, 0.5, "all", 100)),
        ("AP75", (True, 0.75, "all", 100)),
        ("APs", (True, None, "small", 100)),
        ("APm", (True, None, "medium", 100)),
        ("APl", (True, None, "large", 100)),
        ("AR1", (False, None, "all", 1)),
        ("AR10", (False, None, "all", 10)),
        ("AR100", (False, None, "all", 100)),
        ("ARs", (False, None, "small", 100)),
        ("ARm", (False, None, "medium", 100)),
        ("ARl", (False, None, "large", 100)),
    ]
)

PathOrDict = str | os.PathLike | Mapping[str, Any]
PathOrList = str | os.PathLike | Sequence[Mapping[str, Any]]


@dataclasses.dataclass
class Track:
  """One ground-truth annotation or one predicted instance of a video.

  Attributes:
    id: annotation id (ground truth) or 1-based position in the results list (predictions).
    video_id: dataset video id.
    category_id: dataset category id.
    score: confidence (0 for ground truth).
    iscrowd: crowd ground truth (always False for predictions).
    avg_area: mean of the non-zero per-frame areas (0 if there are none).
    frame_rles: per frame a compressed pycocotools RLE, or None where the track is absent.
  """

  id: int
  video_id: int
  category_id: int
  score: float
  iscrowd: bool
  avg_area: float
  frame_rles: list


@dataclasses.dataclass
class GroundTruth:
  """Parsed YouTube-VIS annotation file.

  Attributes:
    videos: video id -> (height, width, num_frames).
    categories: category id -> name, sorted by id.
    tracks: video id -> ground-truth tracks in file order.
  """

  videos: dict
  categories: dict
  tracks: dict


@dataclasses.dataclass
class Accumulation:
  """Accumulated precision / recall, the `eval` arrays of the official code.

  Attributes:
    precision: [T=10, R=101, K, A=4, M=3] interpolated precision, -1 where a category has no
      (non-ignored) ground truth in that area range.
    recall: [T, K, A, M] maximum recall, -1 likewise.
    category_ids: the K category ids (sorted).
    category_names: their names.
  """

  precision: np.ndarray
  recall: np.ndarray
  category_ids: list
  category_names: list


def _load_json(source, what: str):
  """Returns parsed JSON from a path, or `source` itself when it is already parsed."""
  if isinstance(source, (str, os.PathLike)):
    path = os.fspath(source)
    try:
      with open(path) as f:
        return json.load(f)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"{what} file not found: {path}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{what} file {path} is not valid JSON: {e}") from e
  return source


def _rle_string_counts(counts: bytes) -> np.ndarray | None:
  """The run lengths of a compressed RLE string, or None when it is malformed.

  The format (pycocotools'): each run length is written in characters from '0' carrying 5 bits,
  least significant first; 0x20 marks a character that continues the number, 0x10 on its last
  character makes it negative; from the fourth run on, the number is the difference to the run
  two before.
  """
  chars = np.frombuffer(counts, np.uint8).astype(np.int64) - 48
  if chars.size == 0:
    return np.zeros((0,), np.int64)
  if chars.min() < 0 or chars.max() > 63 or chars[-1] & 0x20:
    return None
  ends = (chars & 0x20) == 0
  starts = np.flatnonzero(np.concatenate([[True], ends[:-1]]))
  number = np.cumsum(np.concatenate([[0], ends[:-1]]))  # which run each character belongs to
  position = np.arange(chars.size) - starts[number]
  if position.max() >= 12:  # more than 60 bits: not a run length
    return None
  values = np.add.reduceat((chars & 0x1F) << (5 * position), starts)
  negative = (chars[ends] & 0x10) != 0
  values[negative] -= np.left_shift(1, 5 * (position[ends][negative] + 1))
  runs = values.copy()
  runs[1::2] = np.cumsum(values[1::2])
  runs[2::2] = np.cumsum(values[2::2])
  return runs


def _check_run_lengths(runs: Sequence[Any] | np.ndarray | None, size: list[int], where: str):
  """Raises unless ``runs`` are non-negative integers covering exactly the ``size`` pixels.

  pycocotools does not check this: fewer pixels decode to garbage, and its IoU never returns.
  """
  if runs is not None and not isinstance(runs, np.ndarray):
    if not all(isinstance(r, numbers.Integral) and not isinstance(r, bool) for r in runs):
      runs = None
    else:
      runs = np.asarray(runs, np.int64)
  if runs is None or (runs < 0).any():
    raise ValueError(f"{where}: the RLE 'counts' are not valid run lengths")
  if int(runs.sum()) != size[0] * size[1]:
    raise ValueError(
        f"{where}: the RLE 'counts' cover {int(runs.sum())} pixels but its size {size} has "
        f"{size[0] * size[1]}"
    )


def _to_compressed_rle(segmentation, height: int, width: int, where: str):
  """Converts a polygon / uncompressed RLE / compressed RLE segmentation to compressed RLE.

  An RLE is checked before pycocotools sees it: its size is the video's frame size and its run
  lengths cover exactly that many pixels; ``where`` starts the error messages.
  """
  if isinstance(segmentation, list):
    return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
  if (
      not isinstance(segmentation, Mapping)
      or "counts" not in segmentation
      or ("size" not in segmentation)
  ):
    raise ValueError(
        f"{where}: a segmentation must be a polygon list, an RLE dict with "
        f'"size" and "counts", or null; got {type(segmentation).__name__}'
    )
  try:
    size = [int(s) for s in segmentation["size"]]
  except (TypeError, ValueError):
    size = None
  if size != [height, width]:
    raise ValueError(
        f"{where}: RLE size {str(segmentation['size'])[:40]} differs from the video's frame "
        f"size {[height, width]}"
    )
  counts = segmentation["counts"]
  if isinstance(counts, list):
    _check_run_lengths(counts, size, where)
    return mask_utils.frPyObjects(dict(segmentation), height, width)
  if isinstance(counts, str):
    counts = counts.encode("utf-8")
  if not isinstance(counts, bytes):
    raise ValueError(
        f"{where}: RLE 'counts' must be a string or a list, got {type(counts).__name__}"
    )
  _check_run_lengths(_rle_string_counts(counts), size, where)
  return {"size": size, "counts": counts}


def _average_area(areas: Iterable) -> float:
  # Absent frames (None) and empty frames (0) do not count, as in the official code.
  present = [a for a in areas if a]
  return float(np.array(present).mean()) if present else 0.0


def load_ground_truth(gt: PathOrDict) -> GroundTruth:
  """Parses a YouTube-VIS annotation file (path or already loaded dict).

  Args:
    gt: dict with 'videos' ({id, height, width, length or file_names}), 'categories' ({id, name})
      and 'annotations' ({id, video_id, category_id, segmentations, areas (optional), iscrowd}).

  Returns:
    The parsed ground truth.

  Raises:
    ValueError: on malformed content, naming the offending entry.
  """
  name = os.fspath(gt) if isinstance(gt, (str, os.PathLike)) else "<ground-truth dict>"
  data = _load_json(gt, "ground-truth")
  if not isinstance(data, Mapping):
    raise ValueError(f"ground truth {name}: expected a JSON object, got {type(data).__name__}")
  for key in ("videos", "categories", "annotations"):
    if key not in data:
      raise ValueError(f'ground truth {name}: missing field "{key}"')
  videos = {}
  for v in data["videos"]:
    try:
      length = v["length"] if "length" in v else len(v["file_names"])
      videos[int(v["id"])] = (int(v["height"]), int(v["width"]), int(length))
    except (KeyError, TypeError) as e:
      raise ValueError(
          f'ground truth {name}: video entry {v.get("id", v)!r} lacks field {e} '
          "(needs id, height, width and length or file_names)"
      ) from e
  try:
    categories = {int(c["id"]): str(c.get("name", c["id"])) for c in data["categories"]}
  except (KeyError, TypeError) as e:
    raise ValueError(f"ground truth {name}: malformed categories ({e})") from e
  categories = dict(sorted(categories.items()))
  tracks = collections.defaultdict(list)
  for ann in data["annotations"]:
    where = f'ground truth {name}, annotation {ann.get("id")!r}'
    for key in ("id", "video_id", "category_id", "segmentations"):
      if key not in ann:
        raise ValueError(f'{where}: missing field "{key}"')
    video_id = int(ann["video_id"])
    if video_id not in videos:
      raise ValueError(f"{where}: unknown video_id {video_id}")
    height, width, num_frames = videos[video_id]
    segs = ann["segmentations"]
    if len(segs) != num_frames:
      raise ValueError(
          f"{where}: {len(segs)} segmentations for video {video_id} with " f"{num_frames} frames"
      )
    rles = [
        _to_compressed_rle(s, height, width, f'{where}, field "segmentations[{i}]"') if s else None
        for i, s in enumerate(segs)
    ]
    if ann.get("areas") is not None:
      areas = ann["areas"]
    else:
      areas = [int(mask_utils.area(r)) if r is not None else None for r in rles]
    tracks[video_id].append(
        Track(
            id=int(ann["id"]),
            video_id=video_id,
            category_id=int(ann["category_id"]),
            score=0.0,
            iscrowd=bool(ann.get("iscrowd", 0)),
            avg_area=_average_area(areas),
            frame_rles=rles,
        )
    )
  return GroundTruth(videos=videos, categories=categories, tracks=dict(tracks))


def _integer_field(entry: Mapping[str, Any], key: str, where: str) -> int:
  value = entry[key]
  integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
  if not integral and not (isinstance(value, float) and value.is_integer()):
    raise ValueError(f'{where}, field "{key}": expected an integer id, got {value!r:.40}')
  return int(value)


def _check_result_entry(
    entry: Any, where: str, ground_truth: GroundTruth, unknown_videos: Sequence[int]
) -> tuple[int, int, float]:
  """The (video id, category id, score) of a results entry, each checked against the ground
  truth; ``where`` ('results <file>, entry <i>') starts the error messages."""
  if not isinstance(entry, Mapping):
    raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
  missing = [k for k in ("video_id", "category_id", "score", "segmentations") if k not in entry]
  if missing:
    raise ValueError(f"{where}: missing field(s) {missing}")
  video_id = _integer_field(entry, "video_id", where)
  if video_id not in ground_truth.videos:
    raise ValueError(
        f'{where}, field "video_id": {video_id} is not a video of the ground truth (video ids '
        f"not in the ground truth: {list(unknown_videos)})"
    )
  category_id = _integer_field(entry, "category_id", where)
  # A category id the ground truth lacks is not an error: the official evaluation ignores such
  # predictions (accumulate_ytvis counts them in a warning).
  score = entry["score"]
  if isinstance(score, bool) or not isinstance(score, numbers.Real) or not math.isfinite(score):
    raise ValueError(f'{where}, field "score": expected a finite number, got {score!r:.40}')
  return video_id, category_id, float(score)


def _unknown_video_ids(data: Sequence[Any], ground_truth: GroundTruth) -> list[int]:
  ids = set()
  for entry in data:
    video_id = entry.get("video_id") if isinstance(entry, Mapping) else None
    if isinstance(video_id, numbers.Integral) and int(video_id) not in ground_truth.videos:
      ids.add(int(video_id))
  return sorted(ids)


def load_results(results: PathOrList, ground_truth: GroundTruth) -> dict:
  """Parses YouTube-VIS results and checks them against the ground truth.

  Args:
    results: list (or JSON file of a list) of {video_id, category_id, score, segmentations}, one
      segmentation per video frame: a compressed RLE ({'size': [H, W], 'counts': str}) or None.
    ground_truth: from `load_ground_truth`.

  Returns:
    video id -> predicted tracks in results order (ids are 1-based positions in the list).

  Raises:
    ValueError: one line naming the results file (or '<results list>'), the entry and the field:
      a malformed entry, a video id (all unknown ones listed) or category id not in the ground
      truth, a score that is not a finite number, a number of frames or an RLE whose size or run
      lengths do not match its video.
  """
  name = os.fspath(results) if isinstance(results, (str, os.PathLike)) else "<results list>"
  data = _load_json(results, "results")
  if not isinstance(data, (list, tuple)):
    raise ValueError(f"results {name}: expected a list of predictions, got {type(data).__name__}")
  unknown_videos = _unknown_video_ids(data, ground_truth)
  tracks = collections.defaultdict(list)
  for i, r in enumerate(data):
    where = f"results {name}, entry {i}"
    video_id, category_id, score = _check_result_entry(r, where, ground_truth, unknown_videos)
    height, width, num_frames = ground_truth.videos[video_id]
    segs = r["segmentations"]
    if not isinstance(segs, (list, tuple)) or len(segs) != num_frames:
      count = f"{len(segs)} segmentations" if isinstance(segs, (list, tuple)) else "not a list"
      raise ValueError(
          f'{where}, field "segmentations": {count} but video {video_id} has {num_frames} frames'
      )
    rles = [
        _to_compressed_rle(s, height, width, f'{where}, field "segmentations[{f}]"') if s else None
        for f, s in enumerate(segs)
    ]
    areas = [int(mask_utils.area(x)) if x is not None else None for x in rles]
    tracks[video_id].append(
        Track(
            id=i + 1,
            video_id=video_id,
            category_id=category_id,
            score=score,
            iscrowd=False,
            avg_area=_average_area(areas),
            frame_rles=rles,
        )
    )
  return dict(tracks)


def _frame_areas(tracks: Sequence[Track], num_frames: int) -> np.ndarray:
  """[N, F] int64 per-frame areas (0 where absent)."""
  areas = np.zeros((len(tracks), num_frames), np.int64)
  for f in range(num_frames):
    present = [i for i, t in enumerate(tracks) if t.frame_rles[f] is not None]
    if present:
      areas[present, f] = mask_utils.area([tracks[i].frame_rles[f] for i in present])
  return areas


def track_ious(
    detections: Sequence[Track], ground_truths: Sequence[Track], num_frames: int
) -> np.ndarray:
  """Spatio-temporal mask IoU between every detection and ground-truth track of one video.

  Args:
    detections: D tracks.
    ground_truths: G tracks.
    num_frames: frames of the video.

  Returns:
    [D, G] float64: sum over frames of intersections / sum over frames of unions (0 when the
    union is empty).
  """
  num_dt, num_gt = len(detections), len(ground_truths)
  if num_dt == 0 or num_gt == 0:
    return np.zeros((num_dt, num_gt))
  dt_areas = _frame_areas(detections, num_frames)
  gt_areas = _frame_areas(ground_truths, num_frames)
  intersection = np.zeros((num_dt, num_gt), np.int64)
  for f in range(num_frames):
    dt_idx = np.flatnonzero(dt_areas[:, f] > 0)
    gt_idx = np.flatnonzero(gt_areas[:, f] > 0)
    if dt_idx.size == 0 or gt_idx.size == 0:
      continue
    # pycocotools' crowd IoU is intersection / detection area, from which the integer intersection
    # is recovered exactly (areas are far below 2^52); one C call per frame instead of D*G merges.
    ratio = mask_utils.iou(
        [detections[i].frame_rles[f] for i in dt_idx],
        [ground_truths[j].frame_rles[f] for j in gt_idx],
        [1] * gt_idx.size,
    )
    inter = np.rint(np.asarray(ratio) * dt_areas[dt_idx, f][:, None]).astype(np.int64)
    intersection[np.ix_(dt_idx, gt_idx)] += inter
  union = dt_areas.sum(1)[:, None] + gt_areas.sum(1)[None, :] - intersection
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(union > 0, intersection / np.maximum(union, 1), 0.0)


def mask_iou_video(masks_a: np.ndarray, masks_b: np.ndarray) -> np.ndarray:
  """Spatio-temporal IoU between two sets of dense video masks.

  Args:
    masks_a: bool [A, T, H, W].
    masks_b: bool [B, T, H, W].

  Returns:
    [A, B] float64 IoU with intersection and union summed over the T frames (0 if both empty).
  """
  a = np.asarray(masks_a, bool).reshape(len(masks_a), -1).astype(np.float64)
  b = np.asarray(masks_b, bool).reshape(len(masks_b), -1).astype(np.float64)
  inter = a @ b.T
  union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
  return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def _greedy_match(
    ious: np.ndarray,
    gt_ignore: np.ndarray,
    gt_crowd: np.ndarray,
    gt_ids: np.ndarray,
    thresholds: np.ndarray,
):
  """Greedy score-ordered matching for all area ranges and IoU thresholds at once.

  Args:
    ious: [D, G] IoUs, detections sorted by decreasing score.
    gt_ignore: bool [A, G] ground truth ignored in each area range.
    gt_crowd: bool [G].
    gt_ids: int [G] annotation ids.
    thresholds: [T] IoU thresholds.

  Returns:
    dt_gt_id: [A, T, D] id of the matched ground truth, 0 if unmatched.
    dt_on_ignored: bool [A, T, D] matched to an ignored ground truth.
  """
  num_dt, num_gt = ious.shape
  num_areas, num_thr = gt_ignore.shape[0], thresholds.shape[0]
  dt_gt_id = np.zeros((num_areas, num_thr, num_dt), np.int64)
  dt_on_ignored = np.zeros((num_areas, num_thr, num_dt), bool)
  if num_gt == 0:
    return dt_gt_id, dt_on_ignored
  thr = np.minimum(thresholds, 1 - 1e-10)[None, :, None]
  ignore = gt_ignore[:, None, :]
  gt_taken = np.zeros((num_areas, num_thr, num_gt), bool)
  area_idx, thr_idx = np.meshgrid(np.arange(num_areas), np.arange(num_thr), indexing="ij")
  for d in range(num_dt):
    iou = ious[d][None, None, :]
    usable = (iou >= thr) & (~gt_taken | gt_crowd[None, None, :])
    regular = usable & ~ignore
    # A non-ignored ground truth always wins over an ignored one.
    cand = np.where(regular.any(-1, keepdims=True), regular, usable & ignore)
    scored = np.where(cand, iou, -np.inf)
    is_best = cand & (scored == scored.max(-1, keepdims=True))
    # Among equal IoUs the official loop keeps the last ground truth (in file order).
    best = num_gt - 1 - np.argmax(is_best[..., ::-1], axis=-1)
    matched = cand.any(-1)
    dt_gt_id[:, :, d] = np.where(matched, gt_ids[best], 0)
    dt_on_ignored[:, :, d] = matched & gt_ignore[area_idx, best]
    gt_taken[area_idx[matched], thr_idx[matched], best[matched]] = True
  return dt_gt_id, dt_on_ignored


@dataclasses.dataclass
class _GroupResult:
  scores: np.ndarray  # [D] sorted decreasing, at most max(MAX_DETECTIONS)
  dt_gt_id: np.ndarray  # [A, T, D]
  dt_ignore: np.ndarray  # [A, T, D]
  num_gt_regular: np.ndarray  # [A] ground truths not ignored


def _evaluate_group(dts: Sequence[Track], gts: Sequence[Track], ious: np.ndarray) -> _GroupResult:
  """Matching of one (video, category): detections vs ground truth for every area range."""
  order = np.argsort([-d.score for d in dts], kind="mergesort")[: MAX_DETECTIONS[-1]]
  ious = ious[order]
  scores = np.array([dts[i].score for i in order], np.float64)
  dt_area = np.array([dts[i].avg_area for i in order], np.float64)
  gt_area = np.array([g.avg_area for g in gts], np.float64)
  ranges = np.array(AREA_RANGES, np.float64)
  gt_crowd = np.array([g.iscrowd for g in gts], bool)
  gt_ignore = (
      gt_crowd[None, :] | (gt_area[None, :] < ranges[:, :1]) | (gt_area[None, :] > ranges[:, 1:])
  )
  gt_ids = np.array([g.id for g in gts], np.int64)
  dt_gt_id, dt_on_ignored = _greedy_match(ious, gt_ignore, gt_crowd, gt_ids, IOU_THRESHOLDS)
  dt_out_of_range = (dt_area[None, :] < ranges[:, :1]) | (dt_area[None, :] > ranges[:, 1:])
  dt_ignore = dt_on_ignored | ((dt_gt_id == 0) & dt_out_of_range[:, None, :])
  return _GroupResult(scores, dt_gt_id, dt_ignore, (~gt_ignore).sum(1))


def _accumulate_category(
    category_groups: Sequence[_GroupResult], precision: np.ndarray, recall: np.ndarray
) -> None:
  """Fills one category's precision [T, R, A, M] and recall [T, A, M] (views, in place) from its
  per-video matchings."""
  num_regular = np.sum([g.num_gt_regular for g in category_groups], axis=0)  # [A]
  for m, max_det in enumerate(MAX_DETECTIONS):
    scores = np.concatenate([g.scores[:max_det] for g in category_groups])
    order = np.argsort(-scores, kind="mergesort")
    gt_id = np.concatenate([g.dt_gt_id[..., :max_det] for g in category_groups], -1)[..., order]
    ignore = np.concatenate([g.dt_ignore[..., :max_det] for g in category_groups], -1)[..., order]
    num_dt = scores.shape[0]
    for a in range(len(AREA_RANGES)):
      if num_regular[a] == 0:
        continue
      tp_sum = np.cumsum((gt_id[a] != 0) & ~ignore[a], axis=1).astype(np.float64)  # [T, N]
      fp_sum = np.cumsum((gt_id[a] == 0) & ~ignore[a], axis=1).astype(np.float64)
      rc = tp_sum / num_regular[a]
      pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
      recall[:, a, m] = rc[:, -1] if num_dt else 0
      # Precision envelope: the best precision at any higher recall.
      pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
      for t in range(len(IOU_THRESHOLDS)):
        idx = np.searchsorted(rc[t], RECALL_THRESHOLDS, side="left")
        inside = idx < num_dt
        precision[t, :, a, m] = np.where(
            inside, pr[t, np.minimum(idx, max(num_dt - 1, 0))] if num_dt else 0.0, 0.0
        )


def accumulate_ytvis(gt: PathOrDict | GroundTruth, results: PathOrList) -> Accumulation:
  """Matches results to the ground truth and accumulates precision / recall.

  Args:
    gt: annotation file path, its parsed dict, or a `GroundTruth`.
    results: results list or path to its JSON file (see `load_results`).

  Returns:
    The accumulated precision [T, R, K, A, M] and recall [T, K, A, M] arrays.
  """
  ground_truth = gt if isinstance(gt, GroundTruth) else load_ground_truth(gt)
  predictions = load_results(results, ground_truth)
  category_ids = list(ground_truth.categories)
  category_index = {c: k for k, c in enumerate(category_ids)}
  # groups[k] lists, in increasing video id order, the matching of category k in each video.
  groups = [[] for _ in category_ids]
  for video_id in sorted(ground_truth.videos):
    num_frames = ground_truth.videos[video_id][2]
    gts = [g for g in ground_truth.tracks.get(video_id, []) if g.category_id in category_index]
    dts = [d for d in predictions.get(video_id, []) if d.category_id in category_index]
    if not gts and not dts:
      continue
    ious = track_ious(dts, gts, num_frames)
    gt_cats = np.array([g.category_id for g in gts], np.int64)
    dt_cats = np.array([d.category_id for d in dts], np.int64)
    for cat in sorted(set(gt_cats.tolist()) | set(dt_cats.tolist())):
      gi, di = np.flatnonzero(gt_cats == cat), np.flatnonzero(dt_cats == cat)
      groups[category_index[cat]].append(
          _evaluate_group([dts[i] for i in di], [gts[j] for j in gi], ious[np.ix_(di, gi)])
      )

  num_dropped = sum(
      1 for v in predictions.values() for d in v if d.category_id not in category_index
  )
  if num_dropped:
    logging.warning(
        "%d predictions have a category id not in the ground truth; ignored as in "
        "the official evaluation",
        num_dropped,
    )
  num_t, num_r = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS)
  num_k, num_a, num_m = len(category_ids), len(AREA_RANGES), len(MAX_DETECTIONS)
  precision = -np.ones((num_t, num_r, num_k, num_a, num_m))
  recall = -np.ones((num_t, num_k, num_a, num_m))
  for k, category_groups in enumerate(groups):
    if category_groups:
      _accumulate_category(category_groups, precision[:, :, k], recall[:, k])
  return Accumulation(
      precision, recall, category_ids, [ground_truth.categories[c] for c in category_ids]
  )


def summarize(accumulation: Accumulation) -> dict:
  """The 12 official summary numbers (fractions in [0, 1]; -1 where undefined)."""
  stats = {}
  for name, (is_precision, iou_thr, area, max_det) in SUMMARY_METRICS.items():
    a = AREA_LABELS.index(area)
    m = MAX_DETECTIONS.index(max_det)
    values = accumulation.precision if is_precision else accumulation.recall
    if iou_thr is not None:
      values = values[np.where(iou_thr == IOU_THRESHOLDS)[0]]
    values = values[..., a, m]
    valid = values[values > -1]
    stats[name] = float(np.mean(valid)) if valid.size else -1.0
  return stats


def evaluate_ytvis(gt: PathOrDict | GroundTruth, results: PathOrList) -> dict:
  """YouTube-VIS metrics of `results` against the ground truth `gt`.

  Args:
    gt: annotation file path (e.g. `valid.json` with masks), its parsed dict, or a `GroundTruth`.
    results: predictions in the submission format (list or JSON file): {video_id, category_id
      (dataset id), score, segmentations (one RLE with str counts, or None, per frame)}.

  Returns:
    dict in percent (as detectron2 reports them; NaN where undefined): 'AP', 'AP50', 'AP75', 'APs',
    'APm', 'APl', 'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl', and 'AP-<category name>' for each
    category (area 'all', maxDets 100).
  """
  accumulation = accumulate_ytvis(gt, results)
  metrics = {
      name: value * 100 if value >= 0 else float("nan")
      for name, value in summarize(accumulation).items()
  }
  for k, name in enumerate(accumulation.category_names):
    values = accumulation.precision[:, :, k, 0, -1]
    values = values[values > -1]
    metrics[f"AP-{name}"] = float(np.mean(values)) * 100 if values.size else float("nan")
  return metrics


def format_table(metrics: Mapping[str, float], columns: int = 3) -> str:
  """Formats `evaluate_ytvis` metrics as a Markdown table plus a per-category AP table.

  Args:
    metrics: output of `evaluate_ytvis`.
    columns: (category, AP) column pairs per row of the per-category table.

  Returns:
    Multi-line string.
  """

  def fmt(v):
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

  names = [n for n in SUMMARY_METRICS if n in metrics]
  widths = [max(len(n), 7) for n in names]
  lines = [
      "| " + " | ".join(n.ljust(w) for n, w in zip(names, widths)) + " |",
      "|" + "|".join("-" * (w + 2) for w in widths) + "|",
      "| " + " | ".join(fmt(metrics[n]).ljust(w) for n, w in zip(names, widths)) + " |",
  ]
  per_category = [(k[3:], v) for k, v in metrics.items() if k.startswith("AP-")]
  if per_category:
    name_width = max(8, max(len(n) for n, _ in per_category))
    cols = max(1, min(columns, len(per_category)))
    cell = lambda name, value: f"{name.ljust(name_width)} | {value.ljust(7)}"
    lines += [
        "",
        "Per-category AP:",
        "| " + " | ".join([cell("category", "AP")] * cols) + " |",
        "|" + "|".join(["-" * (name_width + 2) + "|" + "-" * 9] * cols) + "|",
    ]
    for start in range(0, len(per_category), cols):
      row = [cell(n, fmt(v)) for n, v in per_category[start : start + cols]]
      row += [cell("", "")] * (cols - len(row))
      lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def resample_videos(gt: dict, results: list[dict], video_ids: list[int]) -> tuple[dict, list]:
  """Ground truth and results of the videos `video_ids` (repeats allowed), renumbered 1..n.

  For a bootstrap over videos: a video drawn twice counts twice, with its predictions.
  """
  anns_by_video, results_by_video = {}, {}
  for ann in gt["annotations"]:
    anns_by_video.setdefault(ann["video_id"], []).append(ann)
  for entry in results:
    results_by_video.setdefault(entry["video_id"], []).append(entry)
  videos_by_id = {v["id"]: v for v in gt["videos"]}
  videos, anns, out_results = [], [], []
  for new_id, vid in enumerate(video_ids, start=1):
    videos.append({**videos_by_id[vid], "id": new_id})
    for ann in anns_by_video.get(vid, []):
      anns.append({**ann, "id": len(anns) + 1, "video_id": new_id})
    out_results += [{**e, "video_id": new_id} for e in results_by_video.get(vid, [])]
  return {**gt, "videos": videos, "annotations": anns}, out_results


def paired_bootstrap_ap(
    gt: dict, results: Mapping[Any, list[dict]], num_samples: int, seed: int = 0
) -> dict[Any, np.ndarray]:
  """AP of every set of results on `num_samples` resamplings of the videos of `gt` (with
  replacement), the same draws for every set, so differences between them are paired.

  Returns:
    {key of `results`: float64 [num_samples] AP in percent}.
  """
  video_ids = [v["id"] for v in gt["videos"]]
  rng = np.random.default_rng(seed)
  out = {key: np.zeros(num_samples) for key in results}
  for b in range(num_samples):
    sample = [int(v) for v in rng.choice(video_ids, size=len(video_ids), replace=True)]
    for key, entries in results.items():
      sample_gt, sample_results = resample_videos(gt, entries, sample)
      out[key][b] = evaluate_ytvis(sample_gt, sample_results)["AP"]
  return out


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description="YouTube-VIS mask AP of a results JSON file.")
  parser.add_argument("--gt", required=True, help="annotation JSON with segmentations")
  parser.add_argument("--results", required=True, help="results JSON (submission format)")
  parser.add_argument("--output", default=None, help="optional JSON file for the metrics")
  args = parser.parse_args(argv)
  metrics = evaluate_ytvis(args.gt, args.results)
  print(format_table(metrics))
  if args.output:
    with open(args.output, "w") as f:
      json.dump(metrics, f, indent=1)
  return metrics


if __name__ == "__main__":
  main()
