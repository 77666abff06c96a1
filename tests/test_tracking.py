"""Identity switches (CLEAR MOT rule) of predicted tracks against ground truth."""

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from maskfreevis_jax.evaluation import tracking

SIZE = 24
NUM_FRAMES = 6


def _square(y: int, x: int, side: int = 8) -> np.ndarray:
  mask = np.zeros((SIZE, SIZE), bool)
  mask[y : y + side, x : x + side] = True
  return mask


def _track(masks) -> list:
  """Per-frame RLEs of bool [H, W] masks (None: absent), as in results files."""
  track = []
  for m in masks:
    rle = None if m is None else mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    track.append(rle and {"size": rle["size"], "counts": rle["counts"].decode()})
  return track


# Two ground-truth objects, each still for the whole video.
OBJECT_A = [_square(0, 0)] * NUM_FRAMES
OBJECT_B = [_square(14, 14)] * NUM_FRAMES
GT = [_track(OBJECT_A), _track(OBJECT_B)]


def _duplicates_alternating():
  """Two near-identical predictions of A whose IoU with A swaps order every frame, and B."""
  tight = [_square(0, 0) if t % 2 else _square(0, 1) for t in range(NUM_FRAMES)]
  loose = [_square(0, 1) if t % 2 else _square(0, 0) for t in range(NUM_FRAMES)]
  return [_track(tight), _track(loose), _track(OBJECT_B)], 0


def _swap_at_frame_3():
  """Two tracks that exchange their objects after frame 2: one switch per object."""
  first = [OBJECT_A[t] if t < 3 else OBJECT_B[t] for t in range(NUM_FRAMES)]
  second = [OBJECT_B[t] if t < 3 else OBJECT_A[t] for t in range(NUM_FRAMES)]
  return [_track(first), _track(second)], 2


def _lost_and_refound_by_another():
  """A's track ends at frame 2 and another track takes A over from frame 4: one switch."""
  early = [OBJECT_A[t] if t < 3 else None for t in range(NUM_FRAMES)]
  late = [OBJECT_A[t] if t >= 4 else None for t in range(NUM_FRAMES)]
  return [_track(early), _track(late), _track(OBJECT_B)], 1


@pytest.mark.parametrize(
    "make_prediction",
    [_duplicates_alternating, _swap_at_frame_3, _lost_and_refound_by_another],
    ids=["duplicates-no-switch", "swap-two-switches", "refound-one-switch"],
)
def test_identity_switches(make_prediction):
  predicted, expected_switches = make_prediction()
  summary = tracking.identity_switches(GT, predicted)
  assert summary.switches == expected_switches
  assert summary.present == 2 * NUM_FRAMES
  assert len(summary.switch_frames) == expected_switches


def test_switch_frames_name_the_frame_of_each_switch():
  predicted, _ = _swap_at_frame_3()
  assert tracking.identity_switches(GT, predicted).switch_frames == (3, 3)


def test_matched_counts_only_overlaps_above_the_threshold():
  shifted = [_square(0, 4)] * NUM_FRAMES  # IoU 1/3 with A
  summary = tracking.identity_switches(GT, [_track(shifted), _track(OBJECT_B)])
  assert (summary.matched, summary.present, summary.switches) == (NUM_FRAMES, 2 * NUM_FRAMES, 0)


def test_tracks_from_results_merges_a_query_kept_with_two_classes():
  a, b = _track(OBJECT_A), _track(OBJECT_B)
  results = [
      {"score": 0.2, "segmentations": a},
      {"score": 0.9, "segmentations": b},
      {"score": 0.5, "segmentations": a},
  ]
  assert tracking.tracks_from_results(results) == [b, a]


def test_tracks_of_different_lengths_are_an_error():
  with pytest.raises(ValueError, match="same frames"):
    tracking.identity_switches(GT, [_track(OBJECT_A[:3])])


@pytest.mark.parametrize(
    "make_prediction,splits,merges,video_iou",
    [
        (lambda: [_track(OBJECT_A), _track(OBJECT_B)], [1, 1], [1, 1], [[1, 0], [0, 1]]),
        (_swap_at_frame_3, [2, 2], [2, 2], [[1 / 3, 1 / 3], [1 / 3, 1 / 3]]),
        (
            lambda: _lost_and_refound_by_another()[0],
            [2, 1],
            [1, 1, 1],
            [[0.5, 0], [2 / 6, 0], [0, 1]],
        ),
    ],
    ids=["one-track-per-object", "two-objects-per-track", "one-object-two-tracks"],
)
def test_track_coverage_counts_splits_and_merges(make_prediction, splits, merges, video_iou):
  prediction = make_prediction()
  if isinstance(prediction, tuple):
    prediction = prediction[0]
  coverage = tracking.track_coverage(GT, prediction)
  np.testing.assert_array_equal(coverage.splits, splits)
  np.testing.assert_array_equal(coverage.merges, merges)
  np.testing.assert_allclose(coverage.video_iou, video_iou, atol=1e-12)
