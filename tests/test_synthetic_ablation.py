"""bench/ablation.py on the synthetic videos: paired resampling of the validation videos."""

import json

import numpy as np
import pytest

from conftest import load_script
from maskfreevis_jax.data import ytvis_json
from maskfreevis_jax.evaluation import ytvis_eval

ablation = load_script("bench/ablation.py", "ablation")


def _square(y, x):
  mask = np.zeros((8, 8), np.uint8)
  mask[y : y + 3, x : x + 3] = 1
  return ytvis_json.encode_mask(mask)


def _ground_truth():
  """Three one-frame videos with one square each."""
  return {
      "videos": [{"id": i, "height": 8, "width": 8, "length": 1} for i in (1, 2, 3)],
      "categories": [{"id": 1, "name": "square"}],
      "annotations": [
          {"id": i, "video_id": i, "category_id": 1, "iscrowd": 0, "segmentations": [_square(1, 1)]}
          for i in (1, 2, 3)
      ],
  }


def _results(hits):
  """One prediction per video: the right square where `hits[i]`, else a disjoint one."""
  return [
      {
          "video_id": i,
          "category_id": 1,
          "score": 0.9,
          "segmentations": [_square(1, 1) if hit else _square(5, 5)],
      }
      for i, hit in zip((1, 2, 3), hits)
  ]


@pytest.mark.parametrize(
    "sample,expected_ap",
    [([1, 1, 1], 100.0), ([3, 3, 3], 0.0), ([1, 3, 1], None)],
    ids=["hit-repeated", "miss-repeated", "mixed"],
)
def test_resampled_videos_are_renumbered_with_their_predictions(sample, expected_ap):
  gt, results = _ground_truth(), _results([True, True, False])
  sample_gt, sample_results = ytvis_eval.resample_videos(gt, results, sample)
  assert [v["id"] for v in sample_gt["videos"]] == [1, 2, 3]
  assert len({a["id"] for a in sample_gt["annotations"]}) == 3
  ap = ytvis_eval.evaluate_ytvis(sample_gt, sample_results)["AP"]
  if expected_ap is None:  # the same as an evaluation of those videos written out by hand
    expected_ap = ytvis_eval.evaluate_ytvis(_ground_truth(), _results([True, False, True]))["AP"]
  assert ap == pytest.approx(expected_ap)


def test_paired_bootstrap_uses_the_same_videos_for_every_run(tmp_path):
  gt_path = tmp_path / "valid.json"
  gt_path.write_text(json.dumps(_ground_truth()))
  paths = {}
  for key, hits in ((("a", 0), [True, True, False]), (("b", 0), [True, True, False])):
    paths[key] = str(tmp_path / f"{key[0]}.json")
    with open(paths[key], "w") as f:
      json.dump(_results(hits), f)
  boot = ablation.paired_bootstrap(str(gt_path), paths, num_samples=6, seed=1)
  np.testing.assert_array_equal(boot[("a", 0)], boot[("b", 0)])  # same runs, same draws
  assert boot[("a", 0)].std() > 0  # the draws differ from one another


def test_paired_differences_pair_runs_by_seed():
  rows = [
      {"arm": "boxinst", "seed": 0, "AP": 30.0},
      {"arm": "boxinst", "seed": 1, "AP": 40.0},
      {"arm": "maskfreevis", "seed": 0, "AP": 31.0},
      {"arm": "maskfreevis", "seed": 1, "AP": 42.0},
      {"arm": "maskfreevis", "seed": 2, "AP": 99.0},  # no boxinst seed 2: not paired
  ]
  (line,) = ablation.paired_differences(rows)
  # Differences +1 and +2: mean +1.5, std 0.71, 2.12 std.
  assert line.startswith("- maskfreevis - boxinst: +1.50 AP over 2 paired seeds")
  assert "std of the paired difference 0.71 -> 2.12 std" in line
