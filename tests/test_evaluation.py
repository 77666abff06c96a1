"""Tests of the YouTube-VIS metrics against pycocotools' COCOeval and hand-computed cases."""

import contextlib
import io
import json
import math
import re

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskfreevis_jax.evaluation import ytvis_eval

YTVIS_AREA_RANGES = [[0**2, 1e5**2], [0**2, 128**2], [128**2, 256**2], [256**2, 1e5**2]]


def _rle(mask):
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  rle["counts"] = rle["counts"].decode("utf-8")
  return rle


def _random_box_mask(rng, height, width, size_class):
  """A rectangle (sometimes with a hole) whose area falls in a chosen range."""
  side = {"small": (8, 100), "medium": (130, 240), "large": (260, 300)}[size_class]
  h = int(rng.integers(side[0], min(side[1], height)))
  w = int(rng.integers(side[0], min(side[1] + 40, width)))
  y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
  mask = np.zeros((height, width), bool)
  mask[y : y + h, x : x + w] = True
  if rng.random() < 0.3:
    mask[y + h // 3 : y + h // 2, x + w // 3 : x + w // 2] = False
  return mask


def _perturb(rng, masks):
  """Shifts a [T, H, W] track by a few pixels (independently per frame)."""
  out = np.zeros_like(masks)
  for t, m in enumerate(masks):
    dy, dx = rng.integers(-25, 26, size=2)
    out[t] = np.roll(m, (int(dy), int(dx)), axis=(0, 1))
  return out


def _make_dataset(
    seed, num_videos=8, num_frames=3, height=300, width=320, num_categories=4, absent_frames=True
):
  """Random YouTube-VIS ground truth and results, with their dense masks.

  Returns:
    gt dict, results list, gt_masks {ann id: [T, H, W] bool or None per frame list},
    dt_masks [list of [T, H, W] bool with None-frames zeroed].
  """
  rng = np.random.default_rng(seed)
  categories = [{"id": c, "name": f"class{c}"} for c in range(1, num_categories + 1)]
  videos, annotations, results = [], [], []
  gt_dense, dt_dense = {}, []
  ann_id = 1
  for v in range(num_videos):
    video_id = 10 + 3 * v  # not contiguous, not sorted in the file below
    videos.append(
        {
            "id": video_id,
            "height": height,
            "width": width,
            "length": num_frames,
            "file_names": [f"{video_id}/{t}.jpg" for t in range(num_frames)],
        }
    )
    tracks = []
    for _ in range(int(rng.integers(0, 5))):
      size_class = rng.choice(["small", "medium", "large"], p=[0.5, 0.3, 0.2])
      masks = np.stack(
          [_random_box_mask(rng, height, width, size_class) for _ in range(num_frames)]
      )
      present = np.ones(num_frames, bool)
      if absent_frames and num_frames > 1:
        present = rng.random(num_frames) < 0.75
        present[rng.integers(num_frames)] = True
      masks[~present] = False
      tracks.append((int(rng.integers(1, num_categories + 1)), masks, present))
    if tracks and rng.random() < 0.3:  # exact duplicate: equal IoUs exercise tie breaking
      tracks.append(tracks[0])
    for category, masks, present in tracks:
      annotations.append(
          {
              "id": ann_id,
              "video_id": video_id,
              "category_id": category,
              "iscrowd": 0,
              "segmentations": [_rle(m) if p else None for m, p in zip(masks, present)],
              "areas": [int(m.sum()) if p else None for m, p in zip(masks, present)],
              "height": height,
              "width": width,
          }
      )
      gt_dense[ann_id] = masks
      ann_id += 1
    # Predictions: perturbed copies (sometimes the wrong class), false positives, rounded scores
    # (ties), some absent frames.
    for category, masks, _ in tracks:
      for _ in range(int(rng.integers(0, 3))):
        cat = category if rng.random() < 0.8 else int(rng.integers(1, num_categories + 1))
        dt = _perturb(rng, masks)
        results.append((video_id, cat, round(float(rng.random()), 1), dt))
    for _ in range(int(rng.integers(0, 4))):
      size_class = rng.choice(["small", "medium", "large"])
      dt = np.stack([_random_box_mask(rng, height, width, size_class) for _ in range(num_frames)])
      results.append(
          (video_id, int(rng.integers(1, num_categories + 1)), round(float(rng.random()), 1), dt)
      )
  rng.shuffle(videos)
  result_list = []
  for video_id, cat, score, dt in results:
    present = np.ones(num_frames, bool)
    if absent_frames and num_frames > 1 and rng.random() < 0.3:
      present[rng.integers(num_frames)] = False
    dt = dt & present[:, None, None]
    result_list.append(
        {
            "video_id": video_id,
            "category_id": cat,
            "score": score,
            "segmentations": [_rle(m) if p else None for m, p in zip(dt, present)],
        }
    )
    dt_dense.append(dt)
  gt = {"videos": videos, "categories": categories, "annotations": annotations}
  return gt, result_list, gt_dense, dt_dense


def _average_area(masks):
  areas = [int(m.sum()) for m in masks if m.any()]
  return float(np.mean(areas)) if areas else 0.0


def _coco_eval_tiled(gt, results, gt_dense, dt_dense):
  """Runs pycocotools' COCOeval with every video tiled into one image (frames side by side).

  Tiling keeps the summed spatio-temporal intersections and unions; areas are overwritten with the
  YouTube-VIS per-frame averages so that the area ranges agree.
  """
  images, annotations = [], []
  for video in gt["videos"]:
    images.append(
        {"id": video["id"], "height": video["height"], "width": video["width"] * video["length"]}
    )
  for ann in gt["annotations"]:
    tiled = np.concatenate(list(gt_dense[ann["id"]]), axis=1)
    annotations.append(
        {
            "id": ann["id"],
            "image_id": ann["video_id"],
            "category_id": ann["category_id"],
            "iscrowd": ann["iscrowd"],
            "segmentation": _rle(tiled),
            "area": _average_area(gt_dense[ann["id"]]),
        }
    )
  coco_results = []
  for r, dt in zip(results, dt_dense):
    coco_results.append(
        {
            "image_id": r["video_id"],
            "category_id": r["category_id"],
            "score": r["score"],
            "segmentation": _rle(np.concatenate(list(dt), 1)),
        }
    )
  with contextlib.redirect_stdout(io.StringIO()):
    coco_gt = COCO()
    coco_gt.dataset = {"images": images, "annotations": annotations, "categories": gt["categories"]}
    coco_gt.createIndex()
    coco_dt = coco_gt.loadRes(coco_results)
    for i, dt in enumerate(dt_dense):
      coco_dt.anns[i + 1]["area"] = _average_area(dt)
    evaluator = COCOeval(coco_gt, coco_dt, "segm")
    evaluator.params.areaRng = YTVIS_AREA_RANGES
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  return evaluator


def _coco_eval_single_frame(gt, results):
  """Stock COCOeval on single-frame videos converted to COCO images (only areaRng changed)."""
  images = [{"id": v["id"], "height": v["height"], "width": v["width"]} for v in gt["videos"]]
  annotations = [
      {
          "id": a["id"],
          "image_id": a["video_id"],
          "category_id": a["category_id"],
          "iscrowd": a["iscrowd"],
          "segmentation": a["segmentations"][0],
          "area": a["areas"][0],
      }
      for a in gt["annotations"]
  ]
  coco_results = [
      {
          "image_id": r["video_id"],
          "category_id": r["category_id"],
          "score": r["score"],
          "segmentation": r["segmentations"][0],
      }
      for r in results
  ]
  with contextlib.redirect_stdout(io.StringIO()):
    coco_gt = COCO()
    coco_gt.dataset = {"images": images, "annotations": annotations, "categories": gt["categories"]}
    coco_gt.createIndex()
    coco_dt = coco_gt.loadRes(coco_results)
    evaluator = COCOeval(coco_gt, coco_dt, "segm")
    evaluator.params.areaRng = YTVIS_AREA_RANGES
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  return evaluator


def _assert_same_as_coco(gt, results, evaluator):
  acc = ytvis_eval.accumulate_ytvis(gt, results)
  np.testing.assert_allclose(acc.precision, evaluator.eval["precision"], rtol=0, atol=1e-12)
  np.testing.assert_allclose(acc.recall, evaluator.eval["recall"], rtol=0, atol=1e-12)
  metrics = ytvis_eval.evaluate_ytvis(gt, results)
  for idx, name in enumerate(ytvis_eval.SUMMARY_METRICS):
    expected = evaluator.stats[idx]
    if expected < 0:
      assert math.isnan(metrics[name]), name
    else:
      assert abs(metrics[name] - expected * 100) <= 1e-12, (name, metrics[name], expected)
  # The test data must be informative: some AP neither 0 nor 1.
  assert 0.05 < evaluator.stats[0] < 0.95
  return metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_single_frame_videos_match_cocoeval(seed):
  gt, results, _, _ = _make_dataset(seed, num_videos=10, num_frames=1)
  _assert_same_as_coco(gt, results, _coco_eval_single_frame(gt, results))


@pytest.mark.parametrize("seed", [3, 4])
def test_multi_frame_videos_match_tiled_cocoeval(seed):
  gt, results, gt_dense, dt_dense = _make_dataset(seed, num_videos=8, num_frames=4)
  assert any(s is None for a in gt["annotations"] for s in a["segmentations"])
  assert any(s is None for r in results for s in r["segmentations"])
  _assert_same_as_coco(gt, results, _coco_eval_tiled(gt, results, gt_dense, dt_dense))


def test_max_detections_truncation_matches_cocoeval():
  """More than 100 detections of one category in one video: maxDets 1/10/100 truncation."""
  gt, results, _, _ = _make_dataset(5, num_videos=3, num_frames=1)
  rng = np.random.default_rng(0)
  video = gt["videos"][0]
  base = [a for a in gt["annotations"] if a["video_id"] == video["id"]]
  assert base
  target = base[0]
  gt_mask = mask_utils.decode(target["segmentations"][0]).astype(bool)
  for i in range(130):
    shifted = np.roll(gt_mask, int(rng.integers(-30, 31)), axis=1)
    results.append(
        {
            "video_id": video["id"],
            "category_id": target["category_id"],
            "score": float(rng.random()),
            "segmentations": [_rle(shifted)],
        }
    )
  _assert_same_as_coco(gt, results, _coco_eval_single_frame(gt, results))


def _tiny_gt(tracks, num_frames=2, height=8, width=8, categories=(1, 2), crowd=()):
  """Ground truth from dense tracks: list of (video_id, category, [T, H, W] or None-per-frame)."""
  videos = sorted({v for v, _, _ in tracks} | {1})
  annotations = []
  for i, (video_id, category, masks) in enumerate(tracks):
    annotations.append(
        {
            "id": i + 1,
            "video_id": video_id,
            "category_id": category,
            "iscrowd": int(i + 1 in crowd),
            "segmentations": [_rle(m) if m is not None else None for m in masks],
            "areas": [int(m.sum()) if m is not None else None for m in masks],
        }
    )
  return {
      "videos": [{"id": v, "height": height, "width": width, "length": num_frames} for v in videos],
      "categories": [{"id": c, "name": f"c{c}"} for c in categories],
      "annotations": annotations,
  }


def _box(y0, y1, x0, x1, height=8, width=8):
  m = np.zeros((height, width), bool)
  m[y0:y1, x0:x1] = True
  return m


def _result(video_id, category, score, masks):
  return {
      "video_id": video_id,
      "category_id": category,
      "score": score,
      "segmentations": [_rle(m) if m is not None else None for m in masks],
  }


def test_perfect_predictions_give_one():
  gt = _tiny_gt(
      [
          (1, 1, [_box(0, 4, 0, 4), _box(1, 5, 0, 4)]),
          (1, 2, [None, _box(4, 8, 4, 8)]),
          (2, 1, [_box(0, 2, 0, 8), None]),
      ]
  )
  results = [
      _result(
          a["video_id"],
          a["category_id"],
          0.9,
          [mask_utils.decode(s).astype(bool) if s else None for s in a["segmentations"]],
      )
      for a in gt["annotations"]
  ]
  metrics = ytvis_eval.evaluate_ytvis(gt, results)
  for name in ("AP", "AP50", "AP75", "APs", "AR1", "AR10", "AR100", "AP-c1", "AP-c2"):
    assert metrics[name] == pytest.approx(100.0), name
  # No ground truth in those ranges.
  assert math.isnan(metrics["APm"]) and math.isnan(metrics["APl"])


def test_spatio_temporal_iou_by_hand():
  # GT: 4 px in frame 0, 4 px in frame 1. Prediction: same in frame 0, absent in frame 1, and 2 px
  # in frame 2 where the GT is absent. IoU = 4 / (4 + 4 + 2) = 0.4.
  g = [_box(0, 2, 0, 2), _box(2, 4, 2, 4), None]
  d = [_box(0, 2, 0, 2), None, _box(6, 7, 6, 8)]
  gt = _tiny_gt([(1, 1, g)], num_frames=3)
  ious = ytvis_eval.track_ious(
      ytvis_eval.load_results([_result(1, 1, 0.5, d)], ytvis_eval.load_ground_truth(gt))[1],
      ytvis_eval.load_ground_truth(gt).tracks[1],
      3,
  )
  assert ious.shape == (1, 1) and ious[0, 0] == pytest.approx(0.4)
  dense = lambda ms: np.stack([m if m is not None else np.zeros((8, 8), bool) for m in ms])
  assert ytvis_eval.mask_iou_video(dense(d)[None], dense(g)[None])[0, 0] == pytest.approx(0.4)
  # IoU 0.4 < 0.5: no true positive at any threshold.
  metrics = ytvis_eval.evaluate_ytvis(gt, [_result(1, 1, 0.5, d)])
  assert metrics["AP"] == 0.0 and metrics["AR100"] == 0.0


def test_hand_computed_ap_with_a_false_positive_ranked_first():
  # Two GT tracks of class 1 in two videos; predictions ranked: FP (0.9), TP (0.8), TP (0.7).
  # Precision at recall 0.5: 1/2, at recall 1: 2/3 -> envelope 2/3 on all 101 recall points.
  a, b = _box(0, 4, 0, 4), _box(4, 8, 4, 8)
  gt = _tiny_gt([(1, 1, [a, a]), (2, 1, [b, b])], categories=(1,))
  results = [_result(1, 1, 0.9, [b, b]), _result(1, 1, 0.8, [a, a]), _result(2, 1, 0.7, [b, b])]
  metrics = ytvis_eval.evaluate_ytvis(gt, results)
  assert metrics["AP"] == pytest.approx(100 * 2 / 3, abs=1e-9)
  assert metrics["AR100"] == pytest.approx(100.0)
  # maxDets=1 per video: video 1 keeps only its FP, video 2 its TP -> recall 1/2.
  assert metrics["AR1"] == pytest.approx(50.0)
  # Swapping the scores so the FP ranks last gives AP 1.
  results[0]["score"], results[2]["score"] = 0.1, 0.95
  assert ytvis_eval.evaluate_ytvis(gt, results)["AP"] == pytest.approx(100.0)


def test_shuffled_scores_and_wrong_ids_lower_ap():
  gt, results, _, _ = _make_dataset(7, num_videos=6, num_frames=3)
  perfect = [
      _result(
          a["video_id"],
          a["category_id"],
          1.0,
          [mask_utils.decode(s).astype(bool) if s else None for s in a["segmentations"]],
      )
      for a in gt["annotations"]
  ]
  rng = np.random.default_rng(0)
  noisy = perfect + [dict(r, score=0.5) for r in results]
  base = ytvis_eval.evaluate_ytvis(gt, perfect)["AP"]
  assert base == pytest.approx(100.0)
  assert ytvis_eval.evaluate_ytvis(gt, noisy)["AP"] == pytest.approx(100.0)  # ranked below TPs
  shuffled = [dict(r, score=float(rng.random())) for r in noisy]
  assert ytvis_eval.evaluate_ytvis(gt, shuffled)["AP"] < base
  other_video = {
      v["id"]: gt["videos"][(i + 1) % len(gt["videos"])]["id"] for i, v in enumerate(gt["videos"])
  }
  wrong_video = [dict(r, video_id=other_video[r["video_id"]]) for r in perfect]
  assert ytvis_eval.evaluate_ytvis(gt, wrong_video)["AP"] < 20.0


def test_no_predictions_give_zero():
  gt = _tiny_gt([(1, 1, [_box(0, 4, 0, 4), None])])
  metrics = ytvis_eval.evaluate_ytvis(gt, [])
  assert metrics["AP"] == 0.0 and metrics["AR100"] == 0.0 and metrics["AP-c1"] == 0.0
  assert math.isnan(metrics["AP-c2"])  # no ground truth of class 2


def test_empty_frames_and_empty_masks():
  # Prediction with an empty (all-zero) RLE frame and a None frame; the GT is only in frame 0.
  g = [_box(0, 4, 0, 4), None]
  gt = _tiny_gt([(1, 1, g)])
  empty = np.zeros((8, 8), bool)
  ap = lambda masks: ytvis_eval.evaluate_ytvis(gt, [_result(1, 1, 0.5, masks)])["AP"]
  assert ap([g[0], empty]) == pytest.approx(100.0)
  assert ap([g[0], None]) == pytest.approx(100.0)
  assert ytvis_eval.evaluate_ytvis(gt, [_result(1, 1, 0.5, [empty, None])])["AP"] == 0.0


def test_crowd_ground_truth_is_ignored():
  a, b = _box(0, 4, 0, 4), _box(4, 8, 4, 8)
  gt = _tiny_gt([(1, 1, [a, a]), (1, 1, [b, b])], categories=(1,), crowd=(2,))
  # Two detections on the crowd region and one on the regular GT: the crowd matches are neither
  # true nor false positives, so AP = 1 even though they score highest.
  results = [_result(1, 1, 0.9, [b, b]), _result(1, 1, 0.95, [b, b]), _result(1, 1, 0.5, [a, a])]
  assert ytvis_eval.evaluate_ytvis(gt, results)["AP"] == pytest.approx(100.0)
  # Without the crowd flag the second detection on b is a false positive ranked above a's TP.
  gt["annotations"][1]["iscrowd"] = 0
  metrics = ytvis_eval.evaluate_ytvis(gt, results)
  assert metrics["AP"] < 100.0
  # Crowd IoU is the plain spatio-temporal IoU (not intersection over detection area as in COCO):
  # a detection covering the crowd region plus as much outside has IoU 0.5 at most.
  gt["annotations"][1]["iscrowd"] = 1
  big = _box(4, 8, 0, 8)
  results = [_result(1, 1, 0.9, [big, big]), _result(1, 1, 0.5, [a, a])]
  # big overlaps a (IoU 16/48) and the crowd b (IoU 0.5): matched to crowd only at IoU 0.5 -> it is
  # a false positive at the thresholds above 0.5 and ignored at 0.5.
  metrics = ytvis_eval.evaluate_ytvis(gt, results)
  assert metrics["AP50"] == pytest.approx(100.0)
  assert metrics["AP75"] < 100.0


def test_area_ranges_use_mean_of_present_frames():
  # 200x200 px in one frame and absent in the other: mean area 40000 (medium), not 20000.
  h = w = 260
  m = np.zeros((h, w), bool)
  m[:200, :200] = True
  gt = _tiny_gt([(1, 1, [m, None])], height=h, width=w, categories=(1,))
  metrics = ytvis_eval.evaluate_ytvis(gt, [_result(1, 1, 0.5, [m, None])])
  assert metrics["APm"] == pytest.approx(100.0)
  assert math.isnan(metrics["APs"]) and math.isnan(metrics["APl"])


def test_category_ids_map_to_names_and_unknown_categories_ignored():
  """As the official evaluation: a prediction of a category the ground truth lacks is ignored."""
  gt = _tiny_gt([(1, 2, [_box(0, 4, 0, 4), None])])
  results = [
      _result(1, 2, 0.5, [_box(0, 4, 0, 4), None]),
      _result(1, 99, 0.9, [_box(0, 4, 0, 4), None]),
  ]
  metrics = ytvis_eval.evaluate_ytvis(gt, results)
  assert metrics["AP-c2"] == pytest.approx(100.0) and math.isnan(metrics["AP-c1"])


def test_results_and_gt_from_files(tmp_path):
  gt = _tiny_gt([(1, 1, [_box(0, 4, 0, 4), None])])
  results = [_result(1, 1, 0.5, [_box(0, 4, 0, 4), None])]
  gt_path, res_path = tmp_path / "gt.json", tmp_path / "res.json"
  gt_path.write_text(json.dumps(gt))
  res_path.write_text(json.dumps(results))
  metrics = ytvis_eval.evaluate_ytvis(str(gt_path), res_path)
  assert metrics["AP"] == pytest.approx(100.0)
  out = tmp_path / "metrics.json"
  with contextlib.redirect_stdout(io.StringIO()) as printed:
    ytvis_eval.main(["--gt", str(gt_path), "--results", str(res_path), "--output", str(out)])
  assert "AP50" in printed.getvalue() and json.loads(out.read_text())["AP"] == pytest.approx(100.0)


def test_uncompressed_rle_and_polygon_ground_truth():
  m = _box(2, 6, 1, 5)
  rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
  # Uncompressed RLE (column-major run lengths) as in the YouTube-VIS annotation files.
  flat = m.T.reshape(-1).astype(np.int64)
  change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
  counts = np.diff(np.concatenate([[0], change])).tolist()
  uncompressed = {"size": [8, 8], "counts": counts}
  assert mask_utils.area(mask_utils.frPyObjects(uncompressed, 8, 8)) == mask_utils.area(rle)
  polygon = [[1.0, 2.0, 5.0, 2.0, 5.0, 6.0, 1.0, 6.0]]
  gt = _tiny_gt([(1, 1, [m, None])])
  gt["annotations"][0]["segmentations"] = [uncompressed, None]
  gt["annotations"].append(
      dict(gt["annotations"][0], id=2, category_id=2, segmentations=[polygon, None])
  )
  del gt["annotations"][1]["areas"]  # computed from the polygon
  results = [
      _result(1, 1, 0.5, [m, None]),
      _result(
          1,
          2,
          0.5,
          [
              mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygon, 8, 8))).astype(
                  bool
              ),
              None,
          ],
      ),
  ]
  metrics = ytvis_eval.evaluate_ytvis(gt, results)
  assert metrics["AP-c1"] == pytest.approx(100.0) and metrics["AP-c2"] == pytest.approx(100.0)


def test_track_ious_match_dense_computation():
  rng = np.random.default_rng(1)
  masks_a = rng.random((4, 3, 20, 30)) < 0.4
  masks_b = rng.random((3, 3, 20, 30)) < 0.3
  masks_a[0, 1] = False
  expected = np.zeros((4, 3))
  for i in range(4):
    for j in range(3):
      expected[i, j] = (masks_a[i] & masks_b[j]).sum() / (masks_a[i] | masks_b[j]).sum()
  np.testing.assert_allclose(ytvis_eval.mask_iou_video(masks_a, masks_b), expected, atol=1e-15)
  track = lambda ms: ytvis_eval.Track(
      0,
      1,
      1,
      0.0,
      False,
      0.0,
      [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in ms],
  )
  got = ytvis_eval.track_ious([track(m) for m in masks_a], [track(m) for m in masks_b], 3)
  np.testing.assert_array_equal(got, expected)


def test_bad_inputs_raise_clear_errors(tmp_path):
  gt = _tiny_gt([(1, 1, [_box(0, 4, 0, 4), None])])
  good = _result(1, 1, 0.5, [_box(0, 4, 0, 4), None])
  with pytest.raises(ValueError, match=r"not in the ground truth: \[7, 8\]"):
    ytvis_eval.evaluate_ytvis(gt, [good, dict(good, video_id=8), dict(good, video_id=7)])
  with pytest.raises(ValueError, match=r'field "segmentations": 3 segmentations but video 1 has 2'):
    ytvis_eval.evaluate_ytvis(gt, [dict(good, segmentations=good["segmentations"] + [None])])
  with pytest.raises(ValueError, match=r"missing field.*score"):
    ytvis_eval.evaluate_ytvis(gt, [{k: v for k, v in good.items() if k != "score"}])
  wrong_size = _result(1, 1, 0.5, [np.zeros((4, 4), bool), None])
  with pytest.raises(ValueError, match=r"size \[4, 4\].*\[8, 8\]"):
    ytvis_eval.evaluate_ytvis(gt, [wrong_size])
  broken = tmp_path / "broken.json"
  broken.write_text('[{"video_id": 1,')
  with pytest.raises(ValueError, match="broken.json"):
    ytvis_eval.evaluate_ytvis(gt, str(broken))
  with pytest.raises(ValueError, match="broken.json"):
    ytvis_eval.evaluate_ytvis(str(broken), [good])
  with pytest.raises(FileNotFoundError, match="missing.json"):
    ytvis_eval.evaluate_ytvis(gt, str(tmp_path / "missing.json"))
  with pytest.raises(ValueError, match='"videos"'):
    ytvis_eval.evaluate_ytvis({"annotations": [], "categories": []}, [])
  with pytest.raises(ValueError, match="expected a list"):
    ytvis_eval.evaluate_ytvis(gt, {"video_id": 1})


def _rle_counts(mask):
  return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("utf-8")


# id: (field, value of the second entry's field, what the message says); the video is 8x8.
BAD_RESULT_ENTRIES = {
    "rle-size-differs-from-the-frame": (
        "segmentations[0]",
        {"size": [4, 4], "counts": _rle_counts(np.ones((4, 4)))},
        r"RLE size \[4, 4\] differs from the video's frame size \[8, 8\]",
    ),
    "rle-counts-cover-fewer-pixels": (
        "segmentations[0]",
        {"size": [8, 8], "counts": _rle_counts(np.ones((4, 4)))},
        r"the RLE 'counts' cover 16 pixels but its size \[8, 8\] has 64",
    ),
    "rle-counts-cover-more-pixels": (
        "segmentations[0]",
        {"size": [8, 8], "counts": _rle_counts(np.ones((16, 16)))},
        r"the RLE 'counts' cover 256 pixels but its size \[8, 8\] has 64",
    ),
    "uncompressed-rle-counts-cover-fewer-pixels": (
        "segmentations[0]",
        {"size": [8, 8], "counts": [0, 10]},
        r"the RLE 'counts' cover 10 pixels",
    ),
    "rle-counts-not-run-lengths": (
        "segmentations[0]",
        {"size": [8, 8], "counts": "~~"},
        r"the RLE 'counts' are not valid run lengths",
    ),
    "unknown-video-id": ("video_id", 7, r"7 is not a video of the ground truth"),
    "nan-score": ("score", float("nan"), r"expected a finite number, got nan"),
    "infinite-score": ("score", float("inf"), r"expected a finite number, got inf"),
    "string-score": ("score", "0.9", r"expected a finite number, got '0.9'"),
}


@pytest.mark.parametrize("given", ["list", "file"])
@pytest.mark.parametrize(
    "field, value, says", BAD_RESULT_ENTRIES.values(), ids=BAD_RESULT_ENTRIES.keys()
)
def test_bad_result_entry_is_one_line_naming_file_entry_and_field(
    tmp_path, given, field, value, says
):
  gt = ytvis_eval.load_ground_truth(_tiny_gt([(1, 1, [_box(0, 4, 0, 4), None])]))
  good = _result(1, 1, 0.5, [_box(0, 4, 0, 4), None])
  bad = _result(1, 1, 0.5, [_box(0, 4, 0, 4), None])
  if field.startswith("segmentations["):
    bad["segmentations"][0] = value
  else:
    bad[field] = value
  results, name = [good, bad], "<results list>"
  if given == "file":
    results = name = str(tmp_path / "results.json")
    with open(results, "w") as f:
      json.dump([good, bad], f)
  with pytest.raises(ValueError) as err:
    ytvis_eval.load_results(results, gt)  # before pycocotools ever sees the entry
  message = str(err.value)
  assert "\n" not in message
  assert message.startswith(f'results {name}, entry 1, field "{field}": ')
  assert re.search(says, message), message


def test_format_table_lists_metrics_and_categories():
  gt = _tiny_gt([(1, 1, [_box(0, 4, 0, 4), None])])
  metrics = ytvis_eval.evaluate_ytvis(gt, [_result(1, 1, 0.5, [_box(0, 4, 0, 4), None])])
  table = ytvis_eval.format_table(metrics)
  assert "AP75" in table and "AR10" in table and "100.000" in table
  assert "c1" in table and "c2" in table and "nan" in table


def test_equal_iou_tie_goes_to_last_ground_truth():
  # GT A (cols 0-5) and B (cols 2-7) overlap; det1 (cols 2-5) has IoU 2/3 with both. The official
  # loop keeps the last of equal-IoU ground truths (B), leaving A for det2 (= A, IoU 1 with A and
  # 0.5 with B). Taking A first would turn det2 into a false positive for thresholds above 0.5.
  a, b, d1 = _box(0, 4, 0, 6), _box(0, 4, 2, 8), _box(0, 4, 2, 6)
  gt = _tiny_gt([(1, 1, [a]), (1, 1, [b])], num_frames=1, categories=(1,))
  results = [_result(1, 1, 0.9, [d1]), _result(1, 1, 0.8, [a])]
  metrics = ytvis_eval.evaluate_ytvis(gt, results)
  # Thresholds 0.5..0.65: two TPs (AP 1). 0.7..0.95: FP then TP, recall 1/2 at precision 1/2.
  assert metrics["AP"] == pytest.approx(100 * (4 + 6 * 0.5 * 51 / 101) / 10, rel=1e-12)
  for ann in gt["annotations"]:
    ann["height"] = ann["width"] = 8
  gt["videos"][0]["length"] = 1
  coco = _coco_eval_single_frame(gt, results)
  assert metrics["AP"] == pytest.approx(coco.stats[0] * 100, abs=1e-12)
