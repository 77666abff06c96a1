"""Long videos: query association across windows, streaming prediction, bad video inputs."""

import dataclasses
import json
import pathlib
import tracemalloc
import types

import chex
import imageio.v3 as iio
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from maskfreevis_jax import defaults
from maskfreevis_jax import model_presets
from maskfreevis_jax import models
from maskfreevis_jax import predict
from maskfreevis_jax.data import synthetic
from maskfreevis_jax.evaluation import inference, track_builder, visualize

NUM_OBJECTS = 4
NUM_QUERIES = 6  # two queries never find an object
NUM_CLASSES = 3
SIZE = 32  # frames are SIZE x SIZE, masks SIZE/4


def _object_codes():
  """Red level that paints object k (the stand-in model finds objects by it)."""
  return 40.0 * (np.arange(NUM_QUERIES) + 1)


def _scene(num_frames: int) -> tuple[np.ndarray, np.ndarray]:
  """Frames with NUM_OBJECTS 8x8 squares moving on a 4-pixel grid, and their masks.

  Returns:
    uint8 [T, SIZE, SIZE, 3] frames, bool [NUM_OBJECTS, T, SIZE, SIZE] masks.
  """
  frames = np.zeros((num_frames, SIZE, SIZE, 3), np.uint8)
  masks = np.zeros((NUM_OBJECTS, num_frames, SIZE, SIZE), bool)
  codes = _object_codes()
  for t in range(num_frames):
    frames[t, :, :, 1] = t % 256  # green: frame index (the model's per-window query shuffle)
    for k in range(NUM_OBJECTS):
      y = 4 * (2 * k % 7)
      x = 4 * ((t // 2 + 2 * k) % 7)
      masks[k, t, y : y + 8, x : x + 8] = True
      frames[t, y : y + 8, x : x + 8, 0] = codes[k]
  return frames, masks


def _shuffling_model():
  """A stand-in for the model whose query order changes in every window.

  Query q of a window starting at frame s follows object permutation_s[q] (a random permutation
  keyed by s, read from the first frame's green level): its mask logits are +8
  where the red level is that object's code (-8 elsewhere), its embedding is that object's fixed
  random vector, and its class is object % C. Without association a track switches object at
  every window boundary.
  """
  codes = jnp.asarray(_object_codes(), jnp.float32)
  object_embeds = jax.random.normal(jax.random.PRNGKey(0), (NUM_QUERIES, 16))
  class_logits = 6.0 * jax.nn.one_hot(jnp.arange(NUM_QUERIES) % NUM_CLASSES, NUM_CLASSES + 1)
  class_logits = class_logits.at[NUM_OBJECTS:].set(
      6.0 * jax.nn.one_hot(NUM_CLASSES, NUM_CLASSES + 1)
  )  # no-object queries

  def apply_fn(variables, frames, image_valid=None):
    del variables, image_valid
    x = frames.astype(jnp.float32)
    b, t, h, w, _ = x.shape
    red = x[..., 0].reshape(b, t, h // 4, 4, w // 4, 4).mean((3, 5))  # [B, T, h, w]
    start = jnp.round(x[0, 0, 0, 0, 1]).astype(jnp.int32)  # first frame index
    objects = jax.random.permutation(jax.random.fold_in(jax.random.PRNGKey(1), start), NUM_QUERIES)[
        None
    ]  # [B, Q]
    found = jnp.abs(red[:, None] - codes[objects][..., None, None, None]) < 1.0
    masks = jnp.where(found, 8.0, -8.0)  # [B, Q, T, h, w]
    return {
        "pred_logits": class_logits[objects][None],
        "pred_masks": masks[None],
        "pred_embeds": object_embeds[objects],
    }

  return apply_fn


SHUFFLING_MODEL = _shuffling_model()


def _track_objects(prediction_masks: np.ndarray, object_masks: np.ndarray) -> list[set[int]]:
  """For each predicted track [K, T, H, W], the objects it covers over the video."""
  covered = []
  for track in prediction_masks:
    objects = set()
    for t in np.flatnonzero(track.any(axis=(1, 2))):
      ious = [(track[t] & m[t]).sum() / (track[t] | m[t]).sum() for m in object_masks]
      objects.add(int(np.argmax(ious)) if max(ious) > 0.7 else -1)  # -1: no object's mask
    covered.append(objects)
  return covered


@pytest.mark.parametrize(
    "embed_weight,mask_weight",
    [(1.0, 0.0), (0.0, 1.0), (1.0, 1.0)],
    ids=["embeddings", "masks", "both"],
)
def test_association_recovers_a_permutation(embed_weight, mask_weight):
  rng = np.random.default_rng(0)
  num_queries = 12
  embeds = rng.normal(size=(num_queries, 8)).astype(np.float32)
  masks = np.where(rng.uniform(size=(num_queries, 2, 6, 6)) < 0.3, 6.0, -6.0).astype(np.float32)
  permutation = rng.permutation(num_queries)  # next window's query i = track permutation[i]
  noisy_embeds = embeds[permutation] + 0.05 * rng.normal(size=embeds.shape).astype(np.float32)
  order = inference.associate_queries(
      embeds,
      masks,
      noisy_embeds,
      masks[permutation],
      embed_weight=embed_weight,
      mask_weight=mask_weight,
  )
  # Track j must continue with the query that holds it: permutation[order[j]] == j.
  np.testing.assert_array_equal(permutation[order], np.arange(num_queries))


@pytest.mark.parametrize("associate", [True, False], ids=["associated", "unassociated"])
def test_windowed_tracks_keep_their_objects_only_with_association(associate):
  frames, object_masks = _scene(30)
  predictor = inference.VideoPredictor(
      SHUFFLING_MODEL, window_size=8, window_overlap=2, associate=associate, top_k=NUM_OBJECTS
  )
  prediction = predictor({}, frames)
  covered = _track_objects(prediction.masks, object_masks)
  one_object_each = all(len(c) == 1 and -1 not in c for c in covered)
  # The shuffle is real: without association a track visits several objects.
  assert one_object_each == associate, covered
  if associate:
    assert sorted(next(iter(c)) for c in covered) == list(range(NUM_OBJECTS))
    # Class k % C of the followed object, with the full window-averaged probability.
    for label, objects in zip(prediction.labels, covered):
      assert label == next(iter(objects)) % NUM_CLASSES


@pytest.mark.parametrize(
    "window_size,overlap", [(30, 0), (8, 2)], ids=["one-window", "windows-8-2"]
)
def test_streaming_equals_in_memory_prediction(window_size, overlap):
  frames, _ = _scene(30)
  kwargs = dict(window_size=window_size, window_overlap=overlap, associate=True, top_k=5)
  if window_size is None or window_size >= len(frames):
    # One window covers the video: the official whole-video inference.
    reference = inference.VideoPredictor(SHUFFLING_MODEL, top_k=5)({}, frames)
  else:
    reference = inference.VideoPredictor(SHUFFLING_MODEL, **kwargs)({}, frames)
  seen = []
  streamed = inference.StreamingVideoPredictor(SHUFFLING_MODEL, **kwargs)(
      {},
      iter(frames),
      on_frames=lambda first, masks, ids, scores: seen.append((first, masks.shape[1])),
  )
  chex.assert_trees_all_equal(
      inference.prediction_to_results(1, streamed), inference.prediction_to_results(1, reference)
  )
  # Every frame reaches the callback once, in order.
  assert [f for f, n in seen for f in range(f, f + n)] == list(range(len(frames)))


def _permuting(apply_fn):
  """`apply_fn` with the query slots of every window but the first permuted (keyed by the
  window's first frame index, its green level)."""

  def permuted(variables, frames, image_valid=None):
    outputs = dict(apply_fn(variables, frames, image_valid=image_valid))
    start = frames[0, 0, 0, 0, 1].astype(jnp.int32)
    num_queries = outputs["pred_logits"].shape[2]
    shuffled = jax.random.permutation(jax.random.fold_in(jax.random.PRNGKey(2), start), num_queries)
    order = jnp.where(start == 0, jnp.arange(num_queries), shuffled)
    outputs["pred_logits"] = outputs["pred_logits"][:, :, order]
    outputs["pred_masks"] = outputs["pred_masks"][:, :, order]
    outputs["pred_embeds"] = outputs["pred_embeds"][:, order]
    return outputs

  return permuted


@pytest.mark.slow
def test_association_undoes_permuted_queries_of_the_real_model():
  """The real (tiny) model's query embeddings and masks carry the tracks across windows: with
  association, permuting each window's query slots changes no prediction, to the bit."""
  config = model_presets.get_model_config("tiny", num_classes=NUM_CLASSES)
  model = models.build_model(config)
  frames, _ = _scene(10)
  frames = np.repeat(np.repeat(frames, 2, axis=1), 2, axis=2)  # 64x64, green = frame index
  variables = model.init(jax.random.PRNGKey(0), jnp.asarray(frames[None, :2]))
  permuted_apply = _permuting(model.apply)
  window = jnp.asarray(frames[None, 2:6])
  # The permutation is real: the second window's slots move.
  assert not np.array_equal(
      permuted_apply(variables, window)["pred_logits"],
      model.apply(variables, window)["pred_logits"],
  )
  # A random model is never confident: every query a track that always continues.
  kwargs = dict(
      window_size=4,
      window_overlap=2,
      associate=True,
      track_birth_score=0.0,
      track_keep_score=0.0,
      track_max_cost=1e9,
      top_k=10,
  )
  reference = inference.VideoPredictor(model.apply, **kwargs)(variables, frames)
  permuted = inference.VideoPredictor(permuted_apply, **kwargs)(variables, frames)
  chex.assert_trees_all_equal(dataclasses.asdict(permuted), dataclasses.asdict(reference))
  assert reference.masks.any()


def _predict_config(window_size: int) -> ml_collections.ConfigDict:
  config = defaults.get_config()
  config.data.min_size_test = config.data.max_size_test = SIZE
  config.data.class_names = ("a", "b", "c")
  config.eval.window_size = window_size
  config.eval.window_overlap = 2
  config.eval.associate = True
  config.eval.top_k = 5
  config.predict.overlay_min_size = 0
  return config


def _write_folder(path: pathlib.Path, frames: np.ndarray) -> pathlib.Path:
  path.mkdir(parents=True, exist_ok=True)
  for t, frame in enumerate(frames):
    Image.fromarray(frame).save(path / f"{t:05d}.png")
  return path


def test_streaming_predictor_memory_is_bounded():
  size, window, stride = 96, 16, 14
  num_frames = window + 42 * stride  # 604; the last window is a regular one
  frames, _ = _scene(20)
  frames = np.repeat(np.repeat(frames, 3, axis=1), 3, axis=2)  # 96x96, objects on the 4-grid

  def video(length):  # frames made on the fly, as a decoder would
    for t in range(length):
      yield frames[t % len(frames)].copy()

  predictor = inference.StreamingVideoPredictor(
      SHUFFLING_MODEL, window_size=window, window_overlap=window - stride, associate=True, top_k=5
  )
  predictor({}, video(window + stride))  # compile first (same shapes)
  tracemalloc.start()
  try:
    prediction = predictor({}, video(num_frames))
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert prediction.num_frames == num_frames
  assert all(len(s) == num_frames for s in prediction.segmentations)
  # One window of frames and the RLEs: far below the frames of the whole video.
  whole_video_bytes = num_frames * size * size * 3
  assert peak < whole_video_bytes / 4, (peak, whole_video_bytes)


@pytest.mark.slow
def test_streaming_predict_memory_is_bounded(tmp_path):
  # A long folder of 96x96 frames: 20 distinct images, linked over and over.
  size, window, stride = 96, 16, 14
  num_frames = window + 42 * stride  # 604; the last window is a regular one
  video = synthetic.LongVideo(20, seed=1, frame_size=(size, size))
  images = tmp_path / "images"
  _write_folder(images, np.stack([frame for frame, _ in video.frames()]))
  folder = tmp_path / "frames"
  folder.mkdir()
  for t in range(num_frames):
    (folder / f"{t:05d}.png").symlink_to(images / f"{t % 20:05d}.png")
  config = _predict_config(window)
  config.data.min_size_test = config.data.max_size_test = size
  config.eval.window_overlap = window - stride
  config.predict.gif_max_frames = 2
  kwargs = dict(
      variables={}, model=types.SimpleNamespace(apply=SHUFFLING_MODEL), progress_every=1e9
  )
  # Compile everything first (a video of two windows has the same shapes).
  predict.predict(config, str(images), str(tmp_path / "warm"), **kwargs)
  tracemalloc.start()
  try:
    out = predict.predict(config, str(folder), str(tmp_path / "out"), **kwargs)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  results = json.loads(pathlib.Path(out["results"]).read_text())
  assert out["num_frames"] == num_frames
  # One window of frames, an overlay chunk and the RLEs: far below the frames alone.
  whole_video_bytes = num_frames * size * size * 3
  assert peak < whole_video_bytes / 2, (peak, whole_video_bytes)
  # The values: the in-memory predictor on the whole video (96x96 frames need no resize).
  frames = np.stack([frame for frame, _ in video.frames()])[np.arange(num_frames) % 20]
  expected = inference.prediction_to_results(
      0,
      inference.VideoPredictor(
          SHUFFLING_MODEL,
          window_size=window,
          window_overlap=window - stride,
          associate=True,
          top_k=5,
      )({}, frames),
  )
  for r in results:
    assert r.pop("file_names") == [f"{t:05d}.png" for t in range(num_frames)]
    r.pop("track_id")
  assert results == expected


def test_predict_streams_a_folder_like_the_in_memory_predictor(tmp_path):
  frames, _ = _scene(20)
  folder = _write_folder(tmp_path / "frames", frames)
  model = types.SimpleNamespace(apply=SHUFFLING_MODEL)
  config = _predict_config(8)
  out = predict.predict(config, str(folder), str(tmp_path / "out"), variables={}, model=model)
  expected = inference.prediction_to_results(
      0, inference.VideoPredictor.from_config(SHUFFLING_MODEL, config.eval)({}, frames)
  )
  results = json.loads(pathlib.Path(out["results"]).read_text())
  for r in results:
    assert r.pop("file_names") == [f"{t:05d}.png" for t in range(20)]
    r.pop("track_id")
  assert results == expected
  assert pathlib.Path(out["overlay"]).exists()


def _bad_folder(tmp_path: pathlib.Path, kind: str) -> tuple[pathlib.Path, str]:
  frames, _ = _scene(12)
  folder = _write_folder(tmp_path / "frames", frames)
  if kind == "other-size":
    Image.fromarray(np.zeros((SIZE, SIZE + 8, 3), np.uint8)).save(folder / "00009.png")
    return folder, r"frame 9 \(00009.png\) .* is 40x32, but frame 0 \(00000.png\) is 32x32"
  (folder / "00009.png").write_bytes(b"not an image")
  return folder, r"cannot read frame 9 \(.*00009.png\)"


def _truncated_video(tmp_path: pathlib.Path) -> tuple[pathlib.Path, str]:
  import imageio_ffmpeg  # pylint: disable=g-import-not-at-top

  path = tmp_path / "clip.mp4"
  rng = np.random.default_rng(0)
  writer = imageio_ffmpeg.write_frames(
      str(path),
      (64, 64),
      fps=10,
      macro_block_size=16,
      output_params=["-movflags", "+faststart", "-g", "4"],
  )
  with visualize.quiet_subprocess():
    writer.send(None)  # starts ffmpeg
  for _ in range(20):
    writer.send(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8).tobytes())
  writer.close()
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  return path, r"clip.mp4 is truncated: frame \d+ cannot be decoded \(its header announces 20"


@pytest.mark.parametrize(
    "kind", ["other-size", "unreadable-frame", "truncated-video", "not-a-video"]
)
def test_bad_video_input_names_the_frame_and_writes_no_results(tmp_path, kind):
  if kind == "truncated-video":
    path, message = _truncated_video(tmp_path)
  elif kind == "not-a-video":
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"\x00" * 500)
    message = r"cannot read video file .*clip.mp4 \(frame 0\)"
  else:
    path, message = _bad_folder(tmp_path, kind)
  model = types.SimpleNamespace(apply=SHUFFLING_MODEL)
  out_dir = tmp_path / "out"
  with pytest.raises(ValueError, match=message) as error:
    predict.predict(_predict_config(4), str(path), str(out_dir), variables={}, model=model)
  assert not (out_dir / "results.json").exists()
  if kind in ("other-size", "unreadable-frame", "truncated-video"):
    # Frames before the bad one were drawn: the message says where the partial overlay is.
    assert "no " in str(error.value) and "results.json written" in str(error.value)


def _failing_model(fail_from: int):
  """SHUFFLING_MODEL whose device computation fails (an XLA runtime error, as out of memory)
  in every window that starts at frame `fail_from` or later."""

  def check(start):
    if int(start) >= fail_from:
      raise MemoryError(f"simulated device failure at frame {int(start)}")

  def apply_fn(variables, frames, image_valid=None):
    jax.debug.callback(check, frames[0, 0, 0, 0, 1])
    return SHUFFLING_MODEL(variables, frames, image_valid)

  return apply_fn


def test_predict_keeps_the_traceback_of_other_errors(tmp_path):
  """Only bad input becomes a one-line ValueError; a failure of the model keeps its type."""
  frames, _ = _scene(20)
  folder = _write_folder(tmp_path / "frames", frames)
  model = types.SimpleNamespace(apply=_failing_model(6))
  out_dir = tmp_path / "out"
  with pytest.raises(Exception) as error:
    predict.predict(_predict_config(8), str(folder), str(out_dir), variables={}, model=model)
  assert not isinstance(error.value, ValueError), error.value
  assert "simulated device failure at frame 6" in str(error.value)
  assert not (out_dir / "results.json").exists()
  assert (out_dir / "overlay.partial.mp4").exists()  # the first window's frames


def test_predict_reads_its_knobs_from_config(tmp_path):
  frames, _ = _scene(12)
  folder = _write_folder(tmp_path / "frames", frames)
  model = types.SimpleNamespace(apply=SHUFFLING_MODEL)
  config = _predict_config(8)
  config.predict.gif_max_frames = 3
  config.predict.overlay_min_size = 64  # 32x32 frames drawn at 64x64
  config.predict.fps = 5.0
  drawn = predict.predict(config, str(folder), str(tmp_path / "drawn"), variables={}, model=model)
  # Every track scores e^6 / (e^6 + 3) = 0.9926: a threshold above draws and keeps nothing.
  config.predict.score_threshold = 0.995
  nothing = predict.predict(config, str(folder), str(tmp_path / "none"), variables={}, model=model)
  assert (drawn["num_predictions"], nothing["num_predictions"]) == (NUM_OBJECTS, 0)
  gif = iio.imread(drawn["overlay"], index=None)
  assert gif.shape[:3] == (3, 64, 64)
  assert iio.immeta(drawn["overlay"])["duration"] == 200  # ms per frame at 5 fps
  plain = np.stack(
      [np.asarray(Image.fromarray(f).resize((64, 64), Image.BILINEAR)) for f in frames[:3]]
  )
  plain_gif = visualize.save_animation(tmp_path / "plain.gif", plain, fps=5.0)
  np.testing.assert_array_equal(
      iio.imread(nothing["overlay"], index=None), iio.imread(plain_gif, index=None)
  )
  assert not np.array_equal(gif, iio.imread(plain_gif, index=None))


def _scripted_scene(plan: np.ndarray) -> np.ndarray:
  """uint8 [T, SIZE, SIZE, 3] frames where object k (red level code k) is drawn in the frames
  where some slot of `plan` [T, Q] holds it, an 8x8 square in row 12 k moving 4 pixels every
  8 frames; green = frame index."""
  codes = _object_codes()
  frames = np.zeros((len(plan), SIZE, SIZE, 3), np.uint8)
  for t, row in enumerate(plan):
    frames[t, :, :, 1] = t
    for k in row[row >= 0]:
      y, x = 12 * k, 4 * (t // 8 % 4)  # on the model's 4-pixel grid
      frames[t, y : y + 8, x : x + 8, 0] = codes[k]
  return frames


def _scripted_model(plan: np.ndarray):
  """A stand-in whose slot q holds object plan[t, q] on frame t (-1: none).

  In a window, slot q's mask logits are +8 on its object's pixels in each frame (-8 elsewhere,
  and everywhere when it holds none), its class is its object's k % C with probability 0.99
  when it holds an object in the window (no-object otherwise), and its embedding is the
  slot's own vector whatever it holds: only presence and masks tell two visitors of one slot
  apart (the trained model's slots behave so).
  """
  codes = jnp.asarray(_object_codes(), jnp.float32)
  plan = jnp.asarray(plan, jnp.int32)
  slot_embeds = jax.random.normal(jax.random.PRNGKey(3), (plan.shape[1], 16))

  def apply_fn(variables, frames, image_valid=None):
    del variables, image_valid
    x = frames.astype(jnp.float32)
    b, t, h, w, _ = x.shape
    red = x[..., 0].reshape(b, t, h // 4, 4, w // 4, 4).mean((3, 5))[0]  # [T, h, w]
    indices = jnp.round(x[0, :, 0, 0, 1]).astype(jnp.int32)  # [T] frame indices
    held = plan[indices].T  # [Q, T]
    found = (jnp.abs(red[None] - codes[held][..., None, None]) < 1.0) & (held >= 0)[..., None, None]
    holds = (held >= 0).any(axis=1)
    label = jnp.where(holds, held.max(axis=1) % NUM_CLASSES, NUM_CLASSES)
    logits = 6.0 * jax.nn.one_hot(label, NUM_CLASSES + 1)
    return {
        "pred_logits": logits[None, None],
        "pred_masks": jnp.where(found, 8.0, -8.0)[None, None],
        "pred_embeds": slot_embeds[None],
    }

  return apply_fn


def _plan(spans: dict[int, list[tuple[int, int, int]]], num_frames: int, num_slots: int = 3):
  """int [T, Q] slot plan from {slot: [(object, first frame, end frame), ...]}."""
  plan = np.full((num_frames, num_slots), -1, np.int32)
  for slot, pieces in spans.items():
    for obj, first, end in pieces:
      plan[first:end, slot] = obj
  return plan


# Slot 0 holds object 0, then (after an absence of 4 windows) object 1; slot 1 holds object 2.
SLOT_REUSE = _plan({0: [(0, 0, 20), (1, 44, 64)], 1: [(2, 0, 64)]}, 64)
# Slot 0 holds object 0, loses it for frames [20, 32) (window [24, 32) never sees it), finds it
# again.
COMEBACK = _plan({0: [(0, 0, 20), (0, 32, 64)], 1: [(2, 0, 64)]}, 64)


def _track_masks(prediction) -> np.ndarray:
  """bool [N, T, H, W] masks of the distinct tracks of a prediction (a track may come with
  several classes)."""
  _, first = np.unique(prediction.query_indices, return_index=True)
  return prediction.masks[np.sort(first)]


@pytest.mark.parametrize("associate", [True, False], ids=["tracks", "query-slots"])
def test_a_slot_that_carries_two_objects_yields_two_tracks(associate):
  frames = _scripted_scene(SLOT_REUSE)
  object_masks = np.stack(
      [(frames[..., 0] == _object_codes()[k]) for k in range(3)]
  )  # [3, T, H, W]
  predictor = inference.VideoPredictor(
      _scripted_model(SLOT_REUSE),
      window_size=8,
      window_overlap=2,
      associate=associate,
      track_patience=2,
      top_k=3,
  )
  track_masks = _track_masks(predictor({}, frames))
  covered = _track_objects(track_masks, object_masks)
  if associate:
    # One track per object, each present exactly where its object is.
    assert sorted(covered, key=min) == [{0}, {1}, {2}], covered
    for masks in track_masks:
      (obj,) = _track_objects(masks[None], object_masks)[0]
      chex.assert_trees_all_equal(masks.any((1, 2)), object_masks[obj].any((1, 2)))
  else:
    assert {0, 1} in covered, covered  # the slot's track spans both visitors


@pytest.mark.parametrize(
    "associate,track_top_k,pairs,objects",
    [(True, 6, 6, 3), (True, None, 2, 2), (False, 6, 2, None)],
    ids=["tracks-beyond-top_k", "tracks-default-cap", "query-slots-keep-top_k"],
)
def test_windowed_tracks_keep_more_objects_than_top_k_up_to_track_top_k(
    associate, track_top_k, pairs, objects
):
  # 3 objects over the video (slot 0 carries two of them), top_k 2: object tracks over several
  # windows keep track_top_k (track, class) pairs (3 tracks x 3 classes >= 6), so every object
  # is an output; query-slot tracks (Q, like one window) keep the official top_k.
  frames = _scripted_scene(SLOT_REUSE)
  object_masks = np.stack([(frames[..., 0] == _object_codes()[k]) for k in range(3)])
  prediction = inference.VideoPredictor(
      _scripted_model(SLOT_REUSE),
      window_size=8,
      window_overlap=2,
      associate=associate,
      top_k=2,
      track_top_k=track_top_k,
  )({}, frames)
  assert len(prediction.scores) == pairs
  if objects is not None:
    covered = _track_objects(_track_masks(prediction), object_masks)
    assert len(set().union(*covered)) == objects, covered


@pytest.mark.parametrize("patience,tracks_of_object_0", [(2, 1), (0, 2)], ids=["kept", "ended"])
def test_a_track_that_comes_back_within_the_patience_keeps_its_identity(
    patience, tracks_of_object_0
):
  frames = _scripted_scene(COMEBACK)
  object_masks = np.stack([(frames[..., 0] == _object_codes()[k]) for k in range(3)])
  predictor = inference.VideoPredictor(
      _scripted_model(COMEBACK),
      window_size=8,
      window_overlap=2,
      associate=True,
      track_patience=patience,
      top_k=3,
  )
  track_masks = _track_masks(predictor({}, frames))
  covered = _track_objects(track_masks, object_masks)
  assert all(len(c) == 1 for c in covered), covered
  of_object_0 = [k for k, c in enumerate(covered) if c == {0}]
  assert len(of_object_0) == tracks_of_object_0, covered
  if tracks_of_object_0 == 1:
    # Its mask is empty in the frames where the object is absent.
    present = track_masks[of_object_0[0]].any((1, 2))
    chex.assert_trees_all_equal(present, object_masks[0].any((1, 2)))


@pytest.mark.parametrize("window_size", [30, 36], ids=["window-equals-video", "window-longer"])
@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streaming"])
def test_one_window_equals_the_whole_video_inference(window_size, streaming):
  frames, _ = _scene(30)

  def model(variables, frames, image_valid=None):
    # Class 0 a little likelier for later queries: no ties among the low scores.
    outputs = dict(SHUFFLING_MODEL(variables, frames, image_valid))
    bump = jnp.linspace(0.0, 2.0, NUM_QUERIES)[:, None] * jax.nn.one_hot(0, NUM_CLASSES + 1)
    outputs["pred_logits"] = outputs["pred_logits"] + bump
    return outputs

  whole = inference.VideoPredictor(model, top_k=10)({}, frames)
  # track_top_k is for object tracks over several windows: one window keeps the official top_k.
  kwargs = dict(window_size=window_size, window_overlap=4, associate=True, top_k=10, track_top_k=20)
  if streaming:
    windowed = inference.StreamingVideoPredictor(model, **kwargs)({}, iter(frames))
  else:
    windowed = inference.VideoPredictor(model, **kwargs)({}, frames)
  # top_k 10 > 4 objects: the whole video keeps pairs of queries that find no object, which
  # windows would never start a track for (birth score 0.5).
  best = {q: s for s, q in sorted(zip(whole.scores, whole.query_indices))}
  assert min(best.values()) < 0.1, best
  chex.assert_trees_all_equal(
      inference.prediction_to_results(1, windowed), inference.prediction_to_results(1, whole)
  )


@pytest.mark.parametrize("plan", [SLOT_REUSE, COMEBACK], ids=["slot-reuse", "comeback"])
def test_streaming_tracks_equal_the_in_memory_tracks(plan):
  frames = _scripted_scene(plan)
  model = _scripted_model(plan)
  kwargs = dict(window_size=8, window_overlap=2, associate=True, top_k=4)
  seen = {}
  streamed = inference.StreamingVideoPredictor(model, **kwargs)(
      {}, iter(frames), on_frames=lambda first, masks, ids, scores: seen.update({first: ids})
  )
  reference = inference.VideoPredictor(model, **kwargs)({}, frames)
  chex.assert_trees_all_equal(
      inference.prediction_to_results(1, streamed), inference.prediction_to_results(1, reference)
  )
  chex.assert_trees_all_equal(streamed.track_indices, reference.query_indices)
  # The callback sees the tracks by id: a new object, a new id.
  assert sorted({int(i) for ids in seen.values() for i in ids}) == list(
      range(len(streamed.track_scores))
  )


@pytest.mark.parametrize("num_tracks", [3, 40], ids=["few", "many"])
def test_every_track_id_has_its_own_colour(num_tracks):
  colors = visualize.track_colors_of(np.arange(num_tracks))
  chex.assert_trees_all_equal(colors, visualize.track_colors(num_tracks))
  # A track keeps its colour whichever tracks share its frames; a new id gets a new colour.
  chex.assert_trees_all_equal(visualize.track_colors_of([num_tracks - 1, 0])[0], colors[-1])
  assert len({tuple(c) for c in colors}) == num_tracks


@pytest.mark.parametrize("last", [True, False], ids=["one-window-video", "first-of-several"])
def test_embeddings_are_needed_only_to_associate_windows(last):
  """The whole-video path computes no query embeddings: a video in one window needs none."""
  builder = track_builder.TrackBuilder(track_builder.TrackSettings(associate=True))
  probabilities = np.full((3, 2), 0.9, np.float32)
  mask_logits = np.zeros((3, 4, 2, 2), np.float32)
  if last:
    first, present, logits = builder.add(0, probabilities, mask_logits, None, last=True)
    assert first == 0 and [t.track_id for t in present] == [0, 1, 2]
    chex.assert_shape(logits, (3, 4, 2, 2))
  else:
    with pytest.raises(ValueError, match="pred_embeds"):
      builder.add(0, probabilities, mask_logits, None, last=False)
