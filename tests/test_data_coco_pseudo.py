"""COCO pseudo clips: category mapping, boxes carried through per-frame crops, batching."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from maskfreevis_jax.data import coco_pseudo
from maskfreevis_jax.data import input_pipeline as ip
from maskfreevis_jax.data import testing

COLOURS = {1: (230, 40, 40), 2: (40, 230, 40), 3: (40, 40, 230)}


@pytest.fixture(scope="module")
def coco_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("coco")
  cats = [{"id": 3, "name": "car"}, {"id": 34, "name": "frisbee"}, {"id": 70, "name": "toaster"}]
  images, anns = [], []
  rng = np.random.default_rng(0)
  for i in range(1, 5):
    h, w = 200 + 20 * i, 300
    boxes = {1: [20, 30, 60, 40], 2: [150, 90, 50, 70], 3: [230, 10, 40, 30]}
    frame = testing.rect_frames(h, w, 1, [[boxes[k]] for k in (1, 2, 3)],
                                colors=[COLOURS[k] for k in (1, 2, 3)])[0]
    Image.fromarray(frame).save(root / f"{i:06d}.png")
    images.append({"id": i, "file_name": f"{i:06d}.png", "height": h, "width": w})
    for k, cat in zip((1, 2, 3), (3, 34, 70)):
      anns.append({"id": 10 * i + k, "image_id": i, "category_id": cat, "iscrowd": 0,
                   "bbox": [float(v) for v in boxes[k]], "area": 1.0,
                   "segmentation": [[boxes[k][0], boxes[k][1], boxes[k][0] + boxes[k][2],
                                     boxes[k][1], boxes[k][0] + boxes[k][2],
                                     boxes[k][1] + boxes[k][3], boxes[k][0],
                                     boxes[k][1] + boxes[k][3]]]})
  path = root / "instances.json"
  path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
  return str(path), str(root)


def test_category_mapping_by_name():
  coco = {1: "person", 3: "car", 34: "frisbee", 70: "toaster", 35: "skis"}
  ytvis19 = ["person", "sedan", "snowboard"]
  assert coco_pseudo.category_mapping(coco, ytvis19) == {1: 0, 3: 1, 35: 2}
  ytvis21 = ["car", "flying_disc", "person"]
  assert coco_pseudo.category_mapping(coco, ytvis21) == {1: 2, 3: 0, 34: 1}


def test_pseudo_clips_carry_boxes_through_crops(coco_folder):
  path, root = coco_folder
  cfg = ip.default_data_config()
  cfg.name = "coco_pseudo"
  cfg.coco.update(json=path, image_root=root, crop_prob=1.0, crop_pre_sizes=(220,),
                  crop_size=(120, 180), min_size_train=(96, 128), max_size_train=256)
  cfg.coco.target_categories = ""
  cfg.pad_size = (128, 256)
  cfg.batch_size = 4
  cfg.num_parallel_calls = 1
  it = ip.create_train_iterator(cfg, seed=1, process_index=0, process_count=1)
  assert it.class_names == ["car", "frisbee", "toaster"]
  moved = False
  for _ in range(2):
    batch = next(it)
    assert batch["frames"].shape == (4, 3, 128, 256, 3)
    for b in range(4):
      frames = batch["frames"][b]
      moved |= not np.array_equal(frames[0], frames[-1])
      for k in np.flatnonzero(batch["instance_valid"][b]):
        colour = COLOURS[batch["labels"][b, k] + 1]
        for t in range(3):
          hit = np.all(np.abs(frames[t].astype(int) - colour) < 60, axis=-1)
          if not batch["box_valid"][b, k, t]:
            assert hit.sum() < 4  # cropped away
            continue
          x1, y1, x2, y2 = batch["boxes"][b, k, t]
          if min(x2 - x1, y2 - y1) < 2:  # a sliver left at the crop border blurs away
            continue
          ys, xs = np.nonzero(hit)
          np.testing.assert_allclose(batch["boxes"][b, k, t],
                                     [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=1.6)
  assert moved  # crops drift across frames


def test_joint_ytvis_and_coco(coco_folder, tmp_path):
  path, root = coco_folder
  videos = [testing.moving_rect_video(v, 100 * v) for v in (1, 2)]
  json_path, image_root = testing.write_ytvis_folder(
      str(tmp_path), videos, categories=("sedan", "flying_disc", "person"))
  cfg = ip.default_data_config()
  cfg.name = "ytvis+coco_pseudo"
  cfg.train_json, cfg.train_image_root = json_path, image_root
  cfg.coco.update(json=path, image_root=root, fraction=0.5, min_size_train=(96,),
                  max_size_train=256)
  cfg.pad_size = (128, 256)
  cfg.min_size_train = (64,)
  cfg.batch_size = 8
  cfg.num_parallel_calls = 1
  batch = next(ip.create_train_iterator(cfg, seed=0, process_index=0, process_count=1))
  from_coco = batch["orig_size"][:, 1] == 300
  assert from_coco.any() and (~from_coco).any()
  # 'toaster' has no counterpart: only labels 0 (car->sedan) and 1 (frisbee->flying_disc).
  assert set(batch["labels"][from_coco][batch["instance_valid"][from_coco]]) <= {0, 1}


def test_coco_errors_name_file(tmp_path):
  path = tmp_path / "bad.json"
  path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "height": 5}],
                              "annotations": [], "categories": []}))
  with pytest.raises(ValueError, match=r"bad\.json: image id 1: missing field 'width'"):
    coco_pseudo.load_coco_instances(str(path))
