"""Tests of the boundary IoU measure (maskfreevis_jax.evaluation.boundary)."""

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from maskfreevis_jax.evaluation import boundary


def _square(size, y0, x0, side):
  mask = np.zeros((size, size), bool)
  mask[y0 : y0 + side, x0 : x0 + side] = True
  return mask


def _ring(size, y0, x0, side, width):
  """Independent reference: a square's boundary region is the square minus its inner square."""
  return _square(size, y0, x0, side) & ~_square(size, y0 + width, x0 + width, side - 2 * width)


def test_boundary_width_follows_the_diagonal():
  assert boundary.boundary_width(100, 100) == 3  # 0.02 * 141.4
  assert boundary.boundary_width(10, 10) == 1


@pytest.mark.parametrize("y0, x0", [(30, 40), (0, 0)], ids=["interior", "frame_corner"])
def test_boundary_region_of_a_square_is_a_ring(y0, x0):
  mask = _square(100, y0, x0, 30)
  if y0 == 0:  # the frame edge counts as contour: same ring as away from it
    expected = _ring(100, 0, 0, 30, 3)
  else:
    expected = _ring(100, y0, x0, 30, 3)
  np.testing.assert_array_equal(boundary.boundary_region(mask), expected)


def test_boundary_iou_punishes_a_small_shift_more_than_mask_iou():
  a, b = _square(100, 30, 30, 40), _square(100, 32, 32, 40)
  ring_a, ring_b = _ring(100, 30, 30, 40, 3), _ring(100, 32, 32, 40, 3)
  expected = (ring_a & ring_b).sum() / (ring_a | ring_b).sum()
  got = boundary.boundary_iou_video(a[None], b[None])
  assert got == pytest.approx(expected)
  mask_iou = (a & b).sum() / (a | b).sum()
  assert got < mask_iou - 0.3, (got, mask_iou)


def _rle(mask):
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  rle["counts"] = rle["counts"].decode()
  return rle


def test_matched_boundary_iou_pairs_each_track_with_its_best_same_class_prediction():
  a, b = _square(64, 4, 4, 20), _square(64, 30, 30, 20)
  gt = {
      "videos": [{"id": 1, "height": 64, "width": 64, "length": 2}],
      "categories": [{"id": 1, "name": "x"}, {"id": 2, "name": "y"}],
      "annotations": [
          {
              "id": 1,
              "video_id": 1,
              "category_id": 1,
              "iscrowd": 0,
              "segmentations": [_rle(a), _rle(a)],
          },
          {
              "id": 2,
              "video_id": 1,
              "category_id": 2,
              "iscrowd": 0,
              "segmentations": [_rle(b), _rle(b)],
          },
      ],
  }
  results = [
      # Exact mask of track 1, plus a worse one of the same class.
      {"video_id": 1, "category_id": 1, "score": 0.5, "segmentations": [_rle(a), _rle(a)]},
      {
          "video_id": 1,
          "category_id": 1,
          "score": 0.9,
          "segmentations": [_rle(_square(64, 6, 6, 20))] * 2,
      },
      # Exact mask of track 2 but the wrong class: does not count.
      {"video_id": 1, "category_id": 1, "score": 0.8, "segmentations": [_rle(b), _rle(b)]},
  ]
  summary = boundary.matched_boundary_iou(gt, results)
  assert summary == {"boundary_iou": 50.0, "mask_iou": 50.0, "num_tracks": 2.0}
