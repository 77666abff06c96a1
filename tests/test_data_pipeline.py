"""Input pipeline: geometry, padding, sharding, determinism, restore, eval (JSON sources)."""

import json
import os

import numpy as np
import pytest

from maskfreevis_jax import defaults
from maskfreevis_jax.data import eval_dataset
from maskfreevis_jax.data import iterators
from maskfreevis_jax.data import synthetic
from maskfreevis_jax.data import testing
from maskfreevis_jax.data import transforms
from maskfreevis_jax.data import ytvis_json


def _ytvis_config(json_path, image_root, **overrides):
  config = defaults.get_config()
  c = config.data
  c.name = "ytvis"
  c.train_json, c.train_image_root = json_path, image_root
  c.val_json, c.val_image_root = json_path, image_root
  c.num_parallel_calls = 2
  for k, v in overrides.items():
    setattr(c, k, v)
  return config


@pytest.fixture(scope="module")
def rect_folder(tmp_path_factory):
  """Two videos of static, non-overlapping rectangles with known boxes (80x120 frames)."""
  root = str(tmp_path_factory.mktemp("rects"))
  h, w, length = 80, 120, 5
  boxes_a = [[10, 8, 30, 20], [70, 40, 25, 30]]  # x, y, w, h per track
  boxes_b = [[50, 30, 40, 12]]
  videos = []
  for vid, boxes in ((1, boxes_a), (2, boxes_b)):
    rects = [[b] * length for b in boxes]
    frames = testing.rect_frames(h, w, length, rects)
    tracks = [
        {"id": 10 * vid + k, "category_id": k + 1, "bboxes": [[float(v) for v in b]] * length}
        for k, b in enumerate(boxes)
    ]
    videos.append({"id": vid, "frames": frames, "tracks": tracks})
  json_path, image_root = testing.write_ytvis_folder(root, videos, image_format="png")
  return json_path, image_root


@pytest.fixture(scope="module")
def moving_folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("moving"))
  videos = [
      testing.moving_rect_video(v, 100 * v, num_frames=7, num_tracks=1 + v % 3) for v in range(1, 9)
  ]
  return testing.write_ytvis_folder(root, videos)


def _colour_bbox(frame, colour, tol=60):
  """Bounding box (x1, y1, x2, y2) of pixels close to ``colour`` (pixel-edge coordinates)."""
  hit = np.all(np.abs(frame.astype(int) - np.array(colour)) < tol, axis=-1)
  ys, xs = np.nonzero(hit)
  return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def test_boxes_follow_resize_and_flip_and_clip_shares_one_transform(rect_folder):
  json_path, image_root = rect_folder
  cfg = _ytvis_config(
      json_path,
      image_root,
      min_size_train=(48, 64, 96),
      pad_size=(128, 160),
      batch_size=8,
      max_instances=3,
  )
  it = iterators.create_train_iterator(cfg, seed=3, process_index=0, process_count=1)
  seen_flip = seen_noflip = False
  sizes = set()
  for _ in range(3):
    batch = next(it)
    for b in range(batch["frames"].shape[0]):
      frames = batch["frames"][b]
      # Source frames of a video are identical, so one shared transform gives equal frames.
      for t in range(1, frames.shape[0]):
        np.testing.assert_array_equal(frames[t], frames[0])
      valid = batch["image_valid"][b]
      h, w = int(valid.any(1).sum()), int(valid.any(0).sum())
      sizes.add((h, w))
      # Aspect preserved (source 80x120) up to rounding.
      assert abs(w / h - 1.5) < 0.05
      for k in np.flatnonzero(batch["instance_valid"][b]):
        colour = testing.CATEGORY_COLORS[batch["labels"][b, k]]
        for t in range(frames.shape[0]):
          assert batch["box_valid"][b, k, t]
          found = _colour_bbox(frames[t], colour)
          np.testing.assert_allclose(batch["boxes"][b, k, t], found, atol=1.01)
        # Which side the box is on tells whether the clip was flipped.
        vid = batch["video_id"][b]
        src_x = {1: [10, 70], 2: [50]}[int(vid)][batch["track_ids"][b, k] % 10]
        flipped = abs(batch["boxes"][b, k, 0, 0] - src_x * w / 120) > 1.5
        seen_flip |= flipped
        seen_noflip |= not flipped
  assert seen_flip and seen_noflip
  assert len(sizes) >= 2  # several short sides drawn


def test_padding_is_inert(moving_folder):
  json_path, image_root = moving_folder
  cfg = _ytvis_config(
      json_path,
      image_root,
      min_size_train=(48, 64),
      pad_size=(96, 128),
      batch_size=4,
      max_instances=5,
      with_masks=True,
  )
  batch = next(iterators.create_train_iterator(cfg, seed=0, process_index=0, process_count=1))
  assert batch["frames"].shape == (4, 3, 96, 128, 3)
  assert batch["masks"].shape == (4, 5, 3, 96, 128)
  outside = ~batch["image_valid"]
  assert outside.any()
  assert not batch["frames"][
      np.broadcast_to(outside[:, None, :, :, None], batch["frames"].shape)
  ].any()
  assert not batch["masks"][np.broadcast_to(outside[:, None, None], batch["masks"].shape)].any()
  pad = ~batch["instance_valid"]
  assert pad.any()
  assert (batch["track_ids"][pad] == -1).all()
  assert not batch["box_valid"][pad].any() and not batch["boxes"][pad].any()
  assert not batch["masks"][pad].any()
  # Boxes of real instances lie inside the valid image region, masks inside their boxes.
  for b in range(4):
    h, w = batch["image_valid"][b].any(1).sum(), batch["image_valid"][b].any(0).sum()
    bx = batch["boxes"][b][batch["box_valid"][b]]
    assert (bx[:, 2] <= w).all() and (bx[:, 3] <= h).all()
    assert (bx[:, 2] > bx[:, 0]).all() and (bx[:, 3] > bx[:, 1]).all()
    for k, t in zip(*np.nonzero(batch["box_valid"][b])):
      ys, xs = np.nonzero(batch["masks"][b, k, t])
      x1, y1, x2, y2 = batch["boxes"][b, k, t]
      assert xs.min() >= x1 - 1 and xs.max() + 1 <= x2 + 1
      assert ys.min() >= y1 - 1 and ys.max() + 1 <= y2 + 1


def test_host_sharding_is_disjoint_and_covers_an_epoch(moving_folder):
  json_path, image_root = moving_folder
  cfg = _ytvis_config(json_path, image_root, min_size_train=(32,), pad_size=(64, 96))
  per_host = []
  for host in range(2):
    it = iterators.create_train_iterator(
        cfg, seed=5, global_batch_size=4, process_index=host, process_count=2
    )
    ids = [int(v) for _ in range(2) for v in next(it)["video_id"]]  # 2 steps x 2 clips
    per_host.append(ids)
  assert not set(per_host[0]) & set(per_host[1])
  assert sorted(per_host[0] + per_host[1]) == list(range(1, 9))  # 8 videos = one epoch


def test_same_seed_same_stream_and_restore(moving_folder):
  json_path, image_root = moving_folder
  cfg = _ytvis_config(
      json_path, image_root, min_size_train=(32, 48), pad_size=(64, 96), batch_size=2
  )
  a = iterators.create_train_iterator(cfg, seed=11, process_index=0, process_count=1)
  b = iterators.create_train_iterator(cfg, seed=11, process_index=0, process_count=1)
  c = iterators.create_train_iterator(cfg, seed=12, process_index=0, process_count=1)
  stream_a = [next(a) for _ in range(3)]
  state = a.get_state()
  json.dumps(state)  # JSON-able for the checkpoint
  after = [next(a) for _ in range(2)]
  stream_b = [next(b) for _ in range(3)]
  for x, y in zip(stream_a, stream_b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  stream_c = [next(c) for _ in range(3)]
  assert any(
      not np.array_equal(x["frame_index"], y["frame_index"])
      or not np.array_equal(x["video_id"], y["video_id"])
      for x, y in zip(stream_a, stream_c)
  )
  restored = iterators.create_train_iterator(cfg, seed=11, process_index=0, process_count=1)
  restored.set_state(state)
  for x in after:
    y = next(restored)
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  with pytest.raises(ValueError, match="seed"):
    c.set_state(state)


def test_clip_frame_sampling_matches_official_rule():
  rng = np.random.default_rng(0)
  for _ in range(200):
    length = int(rng.integers(1, 40))
    idx = transforms.sample_clip_frame_indices(rng, length, 3, 5)
    assert idx.shape == (3,) and (np.diff(idx) >= 0).all()
    assert idx.min() >= 0 and idx.max() < length
    assert idx.max() - idx.min() <= 10  # all within +-5 of the reference frame


def test_resized_shape_rule():
  assert transforms.resized_shape(720, 1280, 360, 1333) == (360, 640)
  assert transforms.resized_shape(720, 1280, 480, 1333) == (480, 853)
  assert transforms.resized_shape(720, 1280, 480, 768) == (432, 768)
  # Portrait frames are fit inside a landscape canvas.
  h, w = transforms.resized_shape(1280, 720, 480, 1333, canvas=(480, 864))
  assert h <= 480 and w <= 864 and abs(h / w - 1280 / 720) < 0.02


def test_synthetic_generator_is_deterministic_and_consistent(tmp_path):
  kwargs = dict(num_train_videos=4, num_val_videos=2, frame_size=(64, 80), frames_per_video=(3, 5))
  synthetic.generate(str(tmp_path / "a"), seed=7, **kwargs)
  synthetic.generate(str(tmp_path / "b"), seed=7, **kwargs)
  synthetic.generate(str(tmp_path / "c"), seed=8, **kwargs)
  for split in ("train", "valid"):
    a = (tmp_path / "a" / f"{split}.json").read_bytes()
    assert a == (tmp_path / "b" / f"{split}.json").read_bytes()
    assert a != (tmp_path / "c" / f"{split}.json").read_bytes()
  fa = sorted((tmp_path / "a").rglob("*.jpg"))
  fb = sorted((tmp_path / "b").rglob("*.jpg"))
  assert len(fa) == len(fb) > 0
  assert all(x.read_bytes() == y.read_bytes() for x, y in zip(fa, fb))
  for split in ("train", "valid"):
    ds = ytvis_json.load_ytvis_json(str(tmp_path / "a" / f"{split}.json"))
    assert ds.num_classes == len(synthetic.SHAPE_CLASSES)
    assert all(v.has_annotations() for v in ds.videos)
    for video in ds.videos:
      for track in video.tracks:
        for t in range(video.length):
          mask = ytvis_json.decode_segmentation(track.segmentations[t], video.height, video.width)
          assert bool(mask.any()) == bool(track.box_valid[t])  # null when not visible
          if mask.any():
            ys, xs = np.nonzero(mask)
            np.testing.assert_array_equal(
                track.boxes[t], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            )
    # Visible masks of one frame never overlap (occlusion resolved).
    for video in ds.videos:
      for t in range(video.length):
        total = sum(
            ytvis_json.decode_segmentation(tr.segmentations[t], video.height, video.width).astype(
                int
            )
            for tr in video.tracks
        )
        assert np.max(total) <= 1


def test_synthetic_marker_regenerates_half_written(tmp_path):
  out = str(tmp_path / "syn")
  kwargs = dict(
      seed=1, num_train_videos=2, num_val_videos=1, frame_size=(32, 32), frames_per_video=(2, 3)
  )
  synthetic.ensure_dataset(out, **kwargs)
  assert synthetic.is_complete(out, **kwargs)
  reference = (tmp_path / "syn" / "train.json").read_bytes()
  # Simulate an interrupted write: marker missing, JSON truncated.
  os.remove(os.path.join(out, synthetic.MARKER_FILE))
  (tmp_path / "syn" / "train.json").write_bytes(reference[:20])
  assert not synthetic.is_complete(out, **kwargs)
  synthetic.ensure_dataset(out, **kwargs)
  assert (tmp_path / "syn" / "train.json").read_bytes() == reference
  mtime = os.path.getmtime(os.path.join(out, "train.json"))
  synthetic.ensure_dataset(out, **kwargs)  # complete: untouched
  assert os.path.getmtime(os.path.join(out, "train.json")) == mtime


def test_synthetic_training_and_eval(tmp_path):
  config = defaults.get_config()
  cfg = config.data
  cfg.synthetic.update(
      cache_dir=str(tmp_path), num_train_videos=6, num_val_videos=2, frames_per_video=(4, 6)
  )
  cfg.batch_size = 4
  cfg.num_parallel_calls = 2
  it = iterators.create_train_iterator(config, seed=0, process_index=0, process_count=1)
  batch = next(it)
  assert batch["frames"].shape == (4, 3, 128, 128, 3) and batch["frames"].dtype == np.uint8
  assert batch["boxes"].shape == (4, 10, 3, 4) and "masks" not in batch
  assert batch["instance_valid"].any(axis=1).all()
  assert it.class_names == list(synthetic.SHAPE_CLASSES)
  ev = eval_dataset.create_eval_dataset(config, process_index=0, process_count=1)
  assert len(ev) == 2
  ex = next(iter(ev))
  video = ev.dataset.videos[0]
  assert ex["frames"].shape == (video.length, 128, 128, 3)
  assert ex["video_id"] == video.id and tuple(ex["orig_size"]) == (128, 128)
  assert len(ex["file_names"]) == video.length
  assert ex["masks"].shape[:2] == ex["boxes"].shape[:2]
  # GT masks equal the decoded originals (test size == source size here).
  track = video.tracks[0]
  for t in range(video.length):
    np.testing.assert_array_equal(
        ex["masks"][0, t],
        ytvis_json.decode_segmentation(track.segmentations[t], video.height, video.width),
    )


def test_synthetic_object_textures_never_come_from_the_background_photo(monkeypatch):
  # An object textured with its own background photograph is camouflaged (only the pan gives it
  # away): the generator picks the texture among the other photographs.
  rng = np.random.default_rng(0)
  for excluded in range(len(synthetic.BACKGROUND_PHOTOS)):
    drawn = {
        synthetic._other_index(rng, len(synthetic.BACKGROUND_PHOTOS), excluded) for _ in range(300)
    }
    assert drawn == set(range(len(synthetic.BACKGROUND_PHOTOS))) - {excluded}
  calls = []
  original = synthetic._other_index

  def recording(rng, size, excluded):
    index = original(rng, size, excluded)
    calls.append((index, excluded))
    return index

  monkeypatch.setattr(synthetic, "_other_index", recording)
  renderer = synthetic._Renderer(32, 32)
  backgrounds = {id(b): i for i, b in enumerate(renderer.backgrounds)}
  for seed in range(12):
    renderer.video(np.random.default_rng(seed), length=2, max_objects=4)
  assert calls and all(index != excluded for index, excluded in calls)
  assert all(0 <= excluded < len(backgrounds) for _, excluded in calls)


def _render_visible_objects(source: str, seed: int):
  """(pixels uint8 [N, 3], label) of every object visible in one rendered sample of `source`."""
  from maskfreevis_jax.data import synthetic_images  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  if source == "video":
    frames, masks, labels = synthetic._Renderer(64, 64).video(rng, length=2, max_objects=4)
    return [
        (frames[t][m], labels[k])
        for k, clip in enumerate(masks)
        for t, m in enumerate(clip)
        if m.sum() > 30
    ]
  if source == "long_video":
    video = synthetic.LongVideo(3, seed=seed, frame_size=(64, 64), num_residents=3)
    return [
        (frame[visible[k]], video.labels[k])
        for frame, visible in video.frames()
        for k in range(len(video.labels))
        if visible[k].sum() > 30
    ]
  pixels, masks, labels = synthetic_images._StillRenderer(64, 64).image(rng, max_objects=4)
  return [(pixels[m], labels[k]) for k, m in enumerate(masks) if m.sum() > 30]


@pytest.mark.parametrize("source", ["video", "long_video", "still"])
def test_synthetic_objects_carry_their_class_hue(source):
  # Classes differ in colour as real categories do (synthetic.CLASS_HUES): every visible object's
  # median hue lies within the jitter (plus JPEG-free rounding) of its class's hue, and not
  # within it of any other class's.
  from skimage import color  # pylint: disable=g-import-not-at-top

  objects = [o for seed in range(6) for o in _render_visible_objects(source, seed)]
  assert len({label for _, label in objects}) >= 3, "too few classes drawn to test"
  for pixels, label in objects:
    hsv = color.rgb2hsv(pixels[None].astype(np.float64) / 255.0)[0]
    saturated = hsv[:, 1] > 0.3  # near-grey pixels (dark texture) have no meaningful hue
    hue = np.median(hsv[saturated, 0])
    distance = np.abs((hue - np.asarray(synthetic.CLASS_HUES) + 0.5) % 1.0 - 0.5)
    assert distance[label] <= synthetic.HUE_JITTER + 0.02, (label, hue)
    assert np.argmin(distance) == label


@pytest.mark.parametrize(
    "fill",
    [
        pytest.param({}, id="neither"),
        pytest.param({"shade": np.ones(2), "texture": np.zeros((2, 3), np.uint8)}, id="both"),
    ],
)
def test_paint_object_needs_exactly_one_fill(fill):
  colouring = synthetic.object_colouring(np.random.default_rng(0), 0)
  with pytest.raises(ValueError, match="exactly one of shade"):
    synthetic.paint_object(colouring, **fill)
