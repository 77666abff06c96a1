"""Clip transforms against the release's detectron2 transforms (tests/fixtures/parity_transforms.npz).

The fixture holds a frame, a mask and boxes, and what the release's `ResizeShortestEdge`,
`HFlipTransform` and the pseudo-clip `RotationTransform` (with fixed parameters) made of them
through `apply_image`, `apply_segmentation` and `transform_instance_annotations`;
`tools/official_parity/transforms.py` writes it.
"""

import functools
import json
import pathlib

import numpy as np
import pytest

from maskfreevis_jax.data import transforms

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
CASES = [
    "resize_up",
    "resize_down_flip",
    "portrait_max_size",
    "rotate_flip",
    "rotate_portrait",
    "crop_rotate_flip",
]


@functools.lru_cache(maxsize=None)
def _fixture():
  with np.load(FIXTURES / "parity_transforms.npz") as data:
    arrays = {k: data[k] for k in data.files}
  return arrays, json.loads(str(arrays.pop("meta")))


def _ours(name: str):
  """(official size row, ours ClipTransform, the case's input frame, mask and boxes)."""
  arrays, meta = _fixture()
  short, max_size, flip, angle, center, crop = meta["cases"][name]
  height, width = (int(v) for v in arrays[f"{name}_size"][:2])
  frame, mask, boxes = arrays["frame"], arrays["mask"], arrays["boxes"]
  if (height, width) != frame.shape[:2]:  # portrait case: the landscape inputs transposed
    frame, mask, boxes = frame.transpose(1, 0, 2), mask.T, boxes[:, [1, 0, 3, 2]]
  crop_args, src_hw = {}, (height, width)
  if crop is not None:  # the pseudo-clip crop: pre-resize (max 1333), then a window of it
    pre_short, crop_yx, src_hw = crop
    crop_args = dict(
        pre_hw=transforms.resized_shape(height, width, pre_short, 1333),
        crop_yx=tuple(crop_yx),
        crop_hw=tuple(src_hw),
    )
  out_h, out_w = transforms.resized_shape(*src_hw, short, max_size)
  center_xy = None if center is None else (out_w * center[0], out_h * center[1])
  transform = transforms.ClipTransform(
      (height, width), (out_h, out_w), flip=flip, angle=angle, center_xy=center_xy, **crop_args
  )
  return transform, np.ascontiguousarray(frame), np.ascontiguousarray(mask), boxes


@pytest.mark.parametrize("name", CASES)
def test_resized_size_matches_official(name):
  transform = _ours(name)[0]
  assert transform.out_hw == tuple(int(v) for v in _fixture()[0][f"{name}_size"][2:])


@pytest.mark.parametrize("name", CASES)
def test_frame_matches_official_within_one_grey_level(name):
  transform, frame, _, _ = _ours(name)
  ours = transform.apply_image(frame).astype(np.int32)
  official = _fixture()[0][f"{name}_frame"].astype(np.int32)
  assert ours.shape == official.shape
  assert np.abs(ours - official).max() <= 1


@pytest.mark.parametrize("name", CASES)
def test_mask_matches_official(name):
  transform, _, mask, _ = _ours(name)
  np.testing.assert_array_equal(transform.apply_mask(mask), _fixture()[0][f"{name}_mask"])


@pytest.mark.parametrize("name", CASES)
def test_boxes_match_official(name):
  transform, _, _, boxes = _ours(name)
  np.testing.assert_allclose(
      transform.apply_boxes(boxes), _fixture()[0][f"{name}_boxes"], rtol=0, atol=1e-3
  )
