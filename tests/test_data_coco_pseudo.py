"""COCO pseudo clips: category mapping, boxes carried through per-frame crops, batching."""

import json

import numpy as np
import pytest
from PIL import Image

from maskfreevis_jax import defaults
from maskfreevis_jax.data import coco_pseudo
from maskfreevis_jax.data import iterators
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
    frame = testing.rect_frames(
        h, w, 1, [[boxes[k]] for k in (1, 2, 3)], colors=[COLOURS[k] for k in (1, 2, 3)]
    )[0]
    Image.fromarray(frame).save(root / f"{i:06d}.png")
    images.append({"id": i, "file_name": f"{i:06d}.png", "height": h, "width": w})
    for k, cat in zip((1, 2, 3), (3, 34, 70)):
      anns.append(
          {
              "id": 10 * i + k,
              "image_id": i,
              "category_id": cat,
              "iscrowd": 0,
              "bbox": [float(v) for v in boxes[k]],
              "area": 1.0,
              "segmentation": [
                  [
                      boxes[k][0],
                      boxes[k][1],
                      boxes[k][0] + boxes[k][2],
                      boxes[k][1],
                      boxes[k][0] + boxes[k][2],
                      boxes[k][1] + boxes[k][3],
                      boxes[k][0],
                      boxes[k][1] + boxes[k][3],
                  ]
              ],
          }
      )
  path = root / "instances.json"
  path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
  return str(path), str(root)


# The release's YouTube-VIS 2019 categories the tests need (id -> name), and 40 names in all.
_YTVIS19 = {1: "person", 6: "sedan", 33: "snowboard", 36: "mouse"}


def _ytvis19_names():
  """40 YouTube-VIS 2019 class names in id order: the release's where the table points."""
  names = [f"class{i}" for i in range(1, 41)]
  for coco_name, target_id, target_name in coco_pseudo.COCO_TO_YTVIS_2019.values():
    names[target_id - 1] = target_name
  for cid, name in _YTVIS19.items():
    names[cid - 1] = name
  return names


def test_table_maps_coco_ids_not_names():
  coco = {1: "person", 3: "car", 35: "skis", 74: "mouse", 70: "toaster"}
  mapping = coco_pseudo.category_mapping(coco, _ytvis19_names(), "ytvis_2019")
  # car -> sedan (id 6), skis -> snowboard (id 33); the computer mouse is not the animal.
  assert mapping == {1: 0, 3: 5, 35: 32}
  assert coco_pseudo.category_mapping(coco, _ytvis19_names(), "by_name")[74] == 35


def test_by_name_needs_equal_names():
  coco = {1: "person", 3: "car", 34: "frisbee"}
  assert coco_pseudo.category_mapping(coco, ["Car", "flying_disc", "person"]) == {1: 2, 3: 0}


def test_table_against_the_wrong_video_dataset_is_an_error():
  names = _ytvis19_names()
  names[5] = "car"  # YouTube-VIS 2021 names its category 'car', 2019 'sedan'.
  with pytest.raises(
      ValueError,
      match=r"category_map='ytvis_2019' maps COCO 'car' to category "
      r"id 6 'sedan', but the video dataset's category 6 is 'car'",
  ):
    coco_pseudo.category_mapping({3: "car"}, names, "ytvis_2019")


def test_pseudo_clips_carry_boxes_through_crops(coco_folder):
  path, root = coco_folder
  config = defaults.get_config()
  cfg = config.data
  cfg.name = "coco_pseudo"
  cfg.coco.update(
      json=path,
      image_root=root,
      crop_prob=1.0,
      crop_pre_sizes=(220,),
      crop_size=(120, 180),
      min_size_train=(96, 128),
      max_size_train=256,
  )
  cfg.coco.target_categories = ""
  cfg.pad_size = (128, 256)
  cfg.batch_size = 4
  cfg.num_parallel_calls = 1
  it = iterators.create_train_iterator(config, seed=1, process_index=0, process_count=1)
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
          np.testing.assert_allclose(
              batch["boxes"][b, k, t], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=1.6
          )
  assert moved  # crops drift across frames


def test_pseudo_clips_rotate_each_frame_boxes_enclose_objects(coco_folder):
  path, root = coco_folder
  config = defaults.get_config()
  cfg = config.data
  cfg.name = "coco_pseudo"
  cfg.coco.update(
      json=path,
      image_root=root,
      crop_prob=0.0,
      min_size_train=(128,),
      max_size_train=256,
      rotation_degrees=15.0,
  )
  cfg.coco.target_categories = ""
  cfg.pad_size = (128, 256)
  cfg.batch_size = 2
  cfg.num_parallel_calls = 1
  batch = next(iterators.create_train_iterator(config, seed=3, process_index=0, process_count=1))
  for b in range(2):
    frames = batch["frames"][b]
    assert not np.array_equal(frames[0], frames[1])  # one angle per frame
    for k in np.flatnonzero(batch["instance_valid"][b]):
      colour = COLOURS[batch["labels"][b, k] + 1]
      for t in np.flatnonzero(batch["box_valid"][b, k]):
        hit = np.all(np.abs(frames[t].astype(int) - colour) < 30, axis=-1)
        ys, xs = np.nonzero(hit)
        x1, y1, x2, y2 = batch["boxes"][b, k, t]
        # The box around the rotated box holds the rotated object, and is larger than it.
        assert xs.min() >= x1 - 1 and xs.max() < x2 + 1 and ys.min() >= y1 - 1 and ys.max() < y2 + 1
        assert (x2 - x1) * (y2 - y1) > hit.sum()


def _joint_config(
    tmp_path, coco_json, coco_root, categories=("car", "frisbee", "person"), category_map="by_name"
):
  videos = [testing.moving_rect_video(v, 100 * v, num_frames=8) for v in (1, 2, 3)]
  json_path, image_root = testing.write_ytvis_folder(
      str(tmp_path / "videos"), videos, categories=categories
  )
  config = defaults.get_config()
  cfg = config.data
  cfg.name = "ytvis+coco_pseudo"
  cfg.train_json, cfg.train_image_root = json_path, image_root
  cfg.coco.update(
      json=coco_json,
      image_root=coco_root,
      min_size_train=(64,),
      max_size_train=128,
      num_frames=4,
      pad_size=(96, 128),
      supervision="mask",
      crop_prob=0.0,
      category_map=category_map,
  )
  cfg.pad_size = (64, 96)
  cfg.min_size_train = (64,)
  cfg.batch_size = 2
  cfg.num_parallel_calls = 1
  cfg.prefetch = 1
  return config


def test_joint_batches_per_source(coco_folder, tmp_path):
  """Video batches: 3 frames, boxes only. COCO batches: 4 frames with masks, labels by name."""
  cfg = _joint_config(tmp_path, *coco_folder)
  it = iterators.create_train_iterator(cfg, seed=0, process_index=0, process_count=1)
  seen = set()
  for _ in range(6):
    batch = next(it)
    seen.add(batch["source"])
    if batch["source"] == "video":
      assert batch["frames"].shape == (2, 3, 64, 96, 3) and "masks" not in batch
    else:
      assert batch["frames"].shape == (2, 4, 96, 128, 3)
      assert batch["masks"].shape[:3] == (2, cfg.data.max_instances, 4)
      valid = batch["instance_valid"]
      assert batch["masks"][valid].any(axis=(-1, -2)).all()  # every kept instance has a mask
      # 'toaster' has no counterpart: only labels 0 (car) and 1 (frisbee).
      assert set(batch["labels"][valid]) <= {0, 1}
  assert seen == {"video", "coco"}


def test_joint_source_proportion_is_the_release_ratio(coco_folder, tmp_path):
  """Official DATASET_RATIO [1.0, 0.75] for (COCO, video): COCO on 4/7 of the steps."""
  cfg = _joint_config(tmp_path, *coco_folder)
  it = iterators.create_train_iterator(cfg, seed=3, process_index=0, process_count=1)
  draws = [it.source_of_step(s) for s in range(7000)]
  # 4 standard deviations of a binomial proportion over 7000 steps is 0.024.
  assert abs(draws.count("coco") / len(draws) - 4 / 7) < 0.024
  # The batches follow the draws, step by step.
  assert [next(it)["source"] for _ in range(8)] == draws[:8]


def test_joint_resume_mid_run_gives_the_same_batches(coco_folder, tmp_path):
  cfg = _joint_config(tmp_path, *coco_folder)
  make = lambda: iterators.create_train_iterator(cfg, seed=5, process_index=0, process_count=1)
  straight = [next(it) for it in [make()] for _ in range(7)]
  first = make()
  for _ in range(3):
    next(first)
  state = json.loads(json.dumps(first.get_state()))  # as the checkpoint stores it
  resumed = make()
  resumed.set_state(state)
  again = [next(resumed) for _ in range(4)]
  assert {b["source"] for b in straight[3:]} == {"video", "coco"}  # both sources resume
  for want, got in zip(straight[3:], again):
    assert want["source"] == got["source"]
    assert set(want) == set(got)
    for key in want:
      np.testing.assert_array_equal(want[key], got[key], err_msg=key)


def test_joint_labels_through_the_release_table(tmp_path):
  """COCO 'car' (id 3) trains as YouTube-VIS 'sedan', 'mouse' (74) is an error, or skipped."""
  coco_json, coco_root = testing.write_coco_folder(
      str(tmp_path / "coco"),
      {3: "car", 74: "mouse"},
      [[(3, (10, 10, 40, 30)), (74, (60, 40, 30, 30))]] * 2,
  )
  cfg = _joint_config(
      tmp_path, coco_json, coco_root, categories=_ytvis19_names(), category_map="ytvis_2019"
  )
  with pytest.raises(
      ValueError,
      match=r"instances\.json: annotation id 101: category_id 74 "
      r"\('mouse'\) is not in the release's 'ytvis_2019' table",
  ):
    iterators.create_train_iterator(cfg, seed=0, process_index=0, process_count=1)
  cfg.data.coco.skip_unmapped_categories = True
  it = iterators.create_train_iterator(cfg, seed=0, process_index=0, process_count=1)
  batch = next(it.coco)
  labels = batch["labels"][batch["instance_valid"]]
  assert labels.size == 2 and set(labels) == {5}  # sedan; the mouse annotations were dropped


def test_coco_errors_name_file(tmp_path):
  path = tmp_path / "bad.json"
  path.write_text(
      json.dumps(
          {
              "images": [{"id": 1, "file_name": "a.jpg", "height": 5}],
              "annotations": [],
              "categories": [],
          }
      )
  )
  with pytest.raises(ValueError, match=r"bad\.json: image id 1: missing field 'width'"):
    coco_pseudo.load_coco_instances(str(path))


_IMAGE = {"id": 1, "file_name": "a.jpg", "height": 5, "width": 5}
_MALFORMED = {
    "syntax": ('{"images": [', r"bad\.json: malformed JSON at line 1 column 13"),
    "no_annotations": (
        json.dumps({"images": [], "categories": []}),
        r"bad\.json: top level: missing field 'annotations'",
    ),
    "unknown_image": (
        json.dumps(
            {
                "images": [_IMAGE],
                "categories": [{"id": 3, "name": "car"}],
                "annotations": [{"id": 7, "image_id": 2, "category_id": 3, "bbox": [0, 0, 2, 2]}],
            }
        ),
        r"bad\.json: annotation id 7: image_id 2 is not in 'images'",
    ),
    "not_coco_ids": (
        json.dumps(
            {"images": [_IMAGE], "categories": [{"id": 3, "name": "sedan"}], "annotations": []}
        ),
        r"bad\.json: categories: id 3 is 'sedan' but COCO id 3 is 'car'",
    ),
}


@pytest.mark.parametrize("case", sorted(_MALFORMED), ids=sorted(_MALFORMED))
def test_malformed_coco_json_is_a_one_line_error(tmp_path, case):
  text, message = _MALFORMED[case]
  path = tmp_path / "bad.json"
  path.write_text(text)
  with pytest.raises(ValueError, match=message) as error:
    coco_pseudo.load_coco_instances(
        str(path), target_class_names=_ytvis19_names(), category_map="ytvis_2019"
    )
  assert "\n" not in str(error.value)
