"""Data transform fixture: the release's resize, flip and pseudo-clip rotation on one frame.

`--stage inputs` (project python) writes a frame (a crop of scikit-image's `coffee` photograph),
an instance mask and boxes. `--stage official` applies, for each case of CASES, the transforms the
release's mappers build (`ResizeShortestEdge` of `data_video/augmentation.py` -> detectron2
`ResizeTransform`; `HFlipTransform`; `RotationTransform(expand=False)` about the centre that
`RandomRotationClip` draws; for the pseudo-clip crop `ResizeShortestEdgeClip` and `CropTransform`
first) with fixed parameters, to the frame (`apply_image`), the mask
(`apply_segmentation`) and the boxes (`detection_utils.transform_instance_annotations`), and writes
`tests/fixtures/parity_transforms.npz`.
"""

from __future__ import annotations

import pathlib

import numpy as np

from tools.official_parity import common

# name: (transpose the frame (portrait), short side, max size, flip, angle in degrees (0: none),
#        rotation centre relative to the resized frame (x, y), pseudo-clip crop: None or
#        (pre-resize short side (max 1333), crop corner (y, x), crop size (h, w))).
CASES = {
    "resize_up": (False, 144, 1333, False, 0.0, None, None),
    "resize_down_flip": (False, 64, 1333, True, 0.0, None, None),
    "portrait_max_size": (True, 100, 120, False, 0.0, None, None),
    "rotate_flip": (False, 96, 768, True, 12.5, (0.45, 0.58), None),
    "rotate_portrait": (True, 80, 768, False, -14.2, (0.6, 0.41), None),
    "crop_rotate_flip": (False, 96, 768, True, -7.75, (0.52, 0.47), (150, (21, 37), (100, 140))),
}
# x1, y1, x2, y2 in the 90x120 landscape frame; the last one reaches out of the frame once rotated.
BOXES = np.array(
    [[10.0, 12.0, 50.0, 70.0], [60.5, 30.25, 110.0, 60.0], [0.0, 0.0, 120.0, 90.0]], np.float32
)


def make_inputs(workdir: pathlib.Path) -> None:
  from skimage import data  # pylint: disable=g-import-not-at-top

  frame = np.ascontiguousarray(data.coffee()[150:240, 240:360])  # [90, 120, 3]
  mask = np.zeros(frame.shape[:2], np.uint8)
  yy, xx = np.mgrid[0:90, 0:120]
  mask[((xx - 70) / 30.0) ** 2 + ((yy - 45) / 22.0) ** 2 <= 1.0] = 1
  np.savez_compressed(workdir / "transforms_inputs.npz", frame=frame, mask=mask, boxes=BOXES)


def _oriented(frame: np.ndarray, mask: np.ndarray, boxes: np.ndarray, transpose: bool):
  if not transpose:
    return frame, mask, boxes
  return (
      np.ascontiguousarray(frame.transpose(1, 0, 2)),
      np.ascontiguousarray(mask.T),
      boxes[:, [1, 0, 3, 2]],
  )


def oriented_inputs(arrays: dict, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The frame, mask and boxes case `name` starts from (transposed for portrait cases)."""
  return _oriented(arrays["frame"], arrays["mask"], arrays["boxes"], CASES[name][0])


def run_official(workdir: pathlib.Path, out_dir: pathlib.Path) -> None:
  from detectron2.data import detection_utils  # pylint: disable=g-import-not-at-top
  from detectron2.data import transforms as T  # pylint: disable=g-import-not-at-top
  from detectron2.structures import BoxMode  # pylint: disable=g-import-not-at-top
  from mask2former_video.data_video import augmentation  # pylint: disable=g-import-not-at-top

  with np.load(workdir / "transforms_inputs.npz") as data:
    inputs = {k: data[k] for k in data.files}
  arrays = dict(inputs)
  for name, (_, short, max_size, flip, angle, center, crop) in CASES.items():
    frame, mask, boxes = oriented_inputs(inputs, name)
    height, width = frame.shape[:2]
    transforms = []
    cropped = frame
    if crop is not None:
      # build_pseudo_augmentation's crop branch: ResizeShortestEdgeClip([400, 500, 600], 1333)
      # then RandomCropClip's CropTransform, here with a given short side and window.
      pre_short, (y0, x0), (crop_h, crop_w) = crop
      pre = augmentation.ResizeShortestEdgeClip([pre_short], 1333, "choice_by_clip")
      transforms += [pre.get_transform(frame), T.CropTransform(x0, y0, crop_w, crop_h)]
      cropped = np.zeros((crop_h, crop_w, 3), np.uint8)  # only its size is read below
    resize = augmentation.ResizeShortestEdge([short], max_size, "choice_by_clip")
    transforms.append(resize.get_transform(cropped))
    new_h, new_w = transforms[-1].new_h, transforms[-1].new_w
    if flip:
      transforms.append(T.HFlipTransform(new_w))
    if angle:
      # RandomRotationClip: centre drawn relative to the frame, made absolute (x, y).
      transforms.append(
          T.RotationTransform(
              new_h, new_w, angle, expand=False, center=(new_w * center[0], new_h * center[1])
          )
      )
    transform_list = T.TransformList(transforms)
    annos = [
        {"bbox": box.tolist(), "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0} for box in boxes
    ]
    out_boxes = [
        detection_utils.transform_instance_annotations(a, transform_list, (new_h, new_w))["bbox"]
        for a in annos
    ]
    arrays[f"{name}_frame"] = transform_list.apply_image(frame)
    arrays[f"{name}_mask"] = transform_list.apply_segmentation(mask)
    arrays[f"{name}_boxes"] = np.asarray(out_boxes, np.float64)
    arrays[f"{name}_size"] = np.asarray([height, width, new_h, new_w], np.int32)
  meta = dict(
      common.official_provenance(),
      cases={k: list(v[1:]) for k, v in CASES.items()},
      case_fields="short side, max size, flip, angle, centre (x, y) relative, crop "
      "(pre-resize short side, (y, x), (h, w)) or null",
  )
  common.save_fixture(out_dir / "parity_transforms.npz", arrays, meta)


if __name__ == "__main__":
  common.stage_main(__doc__.splitlines()[0], make_inputs, run_official)
