"""Tests of the mask overlays and animation writing."""

import warnings

import imageio.v3 as iio
import jax
import numpy as np
import pytest

from maskfreevis_jax import predict
from maskfreevis_jax.evaluation import inference, visualize


def _scene(num_frames=4, height=48, width=64):
  rng = np.random.default_rng(0)
  frames = (rng.integers(90, 110, size=(num_frames, height, width, 3))).astype(np.uint8)
  masks = np.zeros((2, num_frames, height, width), bool)
  for t in range(num_frames):
    masks[0, t, 20:40, 4 + 4 * t : 24 + 4 * t] = True
    masks[1, t, 2:14, 40:60] = t % 2 == 0  # absent in odd frames
  return frames, masks


def test_overlay_tints_masked_pixels_only():
  frames, masks = _scene()
  colors = np.array([[255, 0, 0], [0, 0, 255]], np.uint8)
  out = visualize.overlay_frames(
      frames,
      masks,
      [0, 1],
      [0.9, 0.8],
      ["cat", "dog"],
      alpha=0.5,
      colors=colors,
      draw_text=False,
      min_size=0,
  )
  assert out.shape == frames.shape and out.dtype == np.uint8
  inside = masks[0]
  # Under track 0: red up, blue down, relative to the input.
  assert np.all(out[inside][:, 0].astype(int) > frames[inside][:, 0].astype(int) + 50)
  assert np.all(out[inside][:, 2] < frames[inside][:, 2])
  # Track 1 is blue and only where present.
  np.testing.assert_array_equal(out[1][masks[1, 0]], frames[1][masks[1, 0]])
  assert np.all(out[0][masks[1, 0]][:, 2] > 150)
  outside = ~(masks[0] | masks[1])
  np.testing.assert_array_equal(out[outside], frames[outside])


def test_overlay_writes_labels_and_respects_threshold():
  frames, masks = _scene()
  with_text = visualize.overlay_frames(
      frames, masks, [0, 1], [0.9, 0.2], ["cat", "dog"], min_size=0
  )
  no_text = visualize.overlay_frames(
      frames, masks, [0, 1], [0.9, 0.2], ["cat", "dog"], draw_text=False, min_size=0
  )
  assert (with_text != no_text).any()  # text drawn
  thresholded = visualize.overlay_frames(
      frames,
      masks,
      [0, 1],
      [0.9, 0.2],
      ["cat", "dog"],
      score_threshold=0.5,
      draw_text=False,
      min_size=0,
  )
  np.testing.assert_array_equal(thresholded[:, 2:14, 40:60], frames[:, 2:14, 40:60])
  assert (thresholded[masks[0]] != frames[masks[0]]).any()


def test_small_frames_are_upscaled_with_exact_masks():
  frames, masks = _scene(height=48, width=64)
  colors = np.array([[255, 0, 0], [0, 0, 255]], np.uint8)
  out = visualize.overlay_frames(
      frames, masks, [0, 1], [0.9, 0.8], colors=colors, draw_text=False, min_size=128
  )
  factor = visualize.upscale_factor(48, 64, 128)
  assert factor == 3 and out.shape == (4, 144, 192, 3)
  big = np.repeat(np.repeat(masks[0], 3, axis=-2), 3, axis=-1)
  # Red tint exactly on the repeated mask of track 0, nowhere else in frame 1 (track 1 absent).
  red = out[1][..., 0].astype(int) - out[1][..., 2].astype(int) > 60
  np.testing.assert_array_equal(red, big[1])


def test_labels_of_stacked_objects_do_not_overlap():
  """Four objects with the same top-left corner on a 128x128 frame: each label shows (its
  exact track colour fills a rectangle), no two labels overlap, and all labels together cover
  a small part of the frame."""
  rng = np.random.default_rng(1)
  frames = rng.integers(90, 110, size=(1, 128, 128, 3)).astype(np.uint8)
  masks = np.zeros((4, 1, 128, 128), bool)
  for k in range(4):
    masks[k, 0, 64 : 100 + 4 * k, 40 : 70 + 10 * k] = True
  colors = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], np.uint8)
  names = ["ellipse", "ring", "star", "crescent"]
  out = visualize.overlay_frames(
      frames, masks, [0, 1, 2, 3], [0.9, 0.8, 0.7, 0.6], names, colors=colors, alpha=0.3
  )
  no_text = visualize.overlay_frames(
      frames,
      masks,
      [0, 1, 2, 3],
      [0.9, 0.8, 0.7, 0.6],
      names,
      colors=colors,
      alpha=0.3,
      draw_text=False,
  )
  assert out.shape == (1, 384, 384, 3)
  rects = []
  for color in colors:
    ys, xs = np.nonzero(np.all(out[0] == color, axis=-1) & np.all(no_text[0] != color, axis=-1))
    assert ys.size > 0, color
    rects.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
  for i in range(4):
    for j in range(i + 1, 4):
      assert not visualize._intersects(rects[i], rects[j]), (rects[i], rects[j])
  changed = np.any(out[0] != no_text[0], axis=-1).mean()
  assert changed < 0.1, changed


@pytest.mark.parametrize(
    "taken, expected",
    [
        ((), (10, 30, 50, 40)),  # free: just above the object
        (((0, 30, 60, 40),), (10, 40, 50, 50)),  # above taken: inside the top edge
        (((0, 30, 60, 50),), (10, 80, 50, 90)),
    ],  # both taken: below the object
    ids=["above", "inside_top", "below"],
)
def test_place_label_prefers_spots_near_the_object(taken, expected):
  assert visualize.place_label((10, 40, 30, 80), (40, 10), (100, 100), taken) == expected


def test_place_label_gives_up_when_the_frame_is_full():
  assert visualize.place_label((0, 0, 5, 5), (40, 10), (20, 100), [(0, 0, 100, 20)]) is None


def test_gif_is_readable_with_frames_and_tint(tmp_path):
  frames, masks = _scene(num_frames=5)
  colors = np.array([[255, 0, 0], [0, 255, 0]], np.uint8)
  out = visualize.overlay_frames(
      frames, masks, [0, 1], [0.9, 0.8], ["cat", "dog"], colors=colors, alpha=0.6, min_size=0
  )
  text = np.any(
      out
      != visualize.overlay_frames(
          frames, masks, [0, 1], [0.9, 0.8], colors=colors, alpha=0.6, min_size=0, draw_text=False
      ),
      axis=-1,
  )
  path = visualize.save_animation(tmp_path / "overlay.gif", out, fps=5)
  read = iio.imread(path, index=None)
  assert read.shape[:3] == (5, 48, 64)
  read = read[..., :3].astype(int)
  for t in range(5):
    interior = masks[0, t].copy()
    interior[:, :] &= np.roll(masks[0, t], 2, 0) & np.roll(masks[0, t], -2, 0)
    interior &= np.roll(masks[0, t], 2, 1) & np.roll(masks[0, t], -2, 1)
    interior &= ~text[t]  # keep away from the label text
    red = read[t][interior]
    assert red[:, 0].mean() > 170 and red[:, 1].mean() < 80, t
    background = read[t][~(masks[0, t] | masks[1, t])]
    assert abs(background.mean() - 100) < 10


def test_mp4_and_clear_error_without_a_writer(tmp_path, monkeypatch):
  frames, _ = _scene()
  assert visualize.mp4_writer_available()  # imageio-ffmpeg is in requirements.txt
  path = visualize.save_animation(tmp_path / "overlay.mp4", frames)
  with visualize.quiet_subprocess():
    assert iio.imread(path, index=None).shape[0] == frames.shape[0]
  monkeypatch.setattr(visualize, "mp4_writer_available", lambda: False)
  with pytest.raises(RuntimeError, match="imageio-ffmpeg or av"):
    visualize.save_animation(tmp_path / "other.mp4", frames)


def test_bad_inputs_raise_clear_errors(tmp_path):
  frames, masks = _scene()
  with pytest.raises(ValueError, match="masks must be"):
    visualize.overlay_frames(frames, masks[:, :2], [0, 1], [1.0, 1.0])
  with pytest.raises(ValueError, match="2 masks but 1 labels"):
    visualize.overlay_frames(frames, masks, [0], [1.0, 1.0])
  with pytest.raises(ValueError, match="uint8"):
    visualize.overlay_frames(frames.astype(np.float32), masks, [0, 1], [1.0, 1.0])
  with pytest.raises(ValueError, match="unsupported animation format"):
    visualize.save_animation(tmp_path / "x.avi", frames)


def test_frames_at_original_size_and_colors():
  frames = np.zeros((2, 32, 48, 3), np.uint8)
  frames[:, :16, :24] = 200
  out = visualize.frames_at_original_size(frames, (16, 24), (40, 60))
  assert out.shape == (2, 40, 60, 3) and np.all(out == 200)
  colors = visualize.track_colors(10)
  assert colors.shape == (10, 3) and len({tuple(c) for c in colors}) == 10


def test_video_file_input_round_trip(tmp_path):
  """--mode predict reads video files: an MP4 written here decodes to the same frame count/size."""
  frames, _ = _scene()
  path = visualize.save_animation(tmp_path / "clip.mp4", frames)
  decoded, names = predict.read_frames(path)
  assert decoded.shape == frames.shape and decoded.dtype == np.uint8
  assert names == [f"clip.mp4#{t}" for t in range(len(frames))]
  # Lossy, but the picture is the same one (flat regions survive H.264 closely).
  assert np.abs(decoded.astype(float) - frames.astype(float)).mean() < 8
  (tmp_path / "broken.mp4").write_bytes(b"not a video")
  with pytest.raises(ValueError, match="broken.mp4"):
    predict.read_frames(tmp_path / "broken.mp4")


def _summary_clip():
  """Two 8x8 frames, 3 queries at stride 4: query 1 (confident) holds the top-left cell, query 2
  (less confident) the bottom-right cell and padding, query 0 (no object) everything."""
  frames = np.full((2, 8, 8, 3), 100, np.uint8)
  masks = np.full((3, 2, 2, 2), -1.0, np.float32)
  masks[0] = 5.0
  masks[1, :, 0, 0] = 5.0
  masks[2, :, 1, 1] = 5.0
  logits = np.zeros((3, 4), np.float32)
  logits[0, 3] = 9.0  # no object
  logits[1, 0] = 9.0
  logits[2, 2] = 4.0
  return frames, logits, masks


@pytest.mark.parametrize("top_k", [1, 2], ids=["top-1", "top-2"])
def test_mask_overlay_image_tints_the_top_queries(top_k):
  frames, logits, masks = _summary_clip()
  valid = np.zeros((8, 8), bool)
  valid[:6, :8] = True  # the bottom two rows are padding
  image = visualize.mask_overlay_image(frames, logits, masks, valid, top_k=top_k)
  assert image.shape == (8, 16, 3) and image.dtype == np.uint8
  colors = visualize.track_colors(top_k).astype(float)
  expected = np.full((8, 16, 3), 100.0)
  for t in range(2):
    # Interior pixels blend; the 4x4 cell is small enough to be all outline but one pixel each.
    cell = (slice(0, 4), slice(8 * t, 8 * t + 4))
    expected[cell] = colors[0]
    expected[1:3, 8 * t + 1 : 8 * t + 3] = 0.45 * 100 + 0.55 * colors[0]
    if top_k == 2:  # rows 4-5 only: rows 6-7 are padding
      expected[4:6, 8 * t + 4 : 8 * t + 8] = colors[1]
  np.testing.assert_array_equal(image, np.rint(expected).astype(np.uint8))


def _eval_video(num_frames=3):
  """An evaluation example at 2x the model size: 32x32 padded frames of a 24x32 image shown at
  48x64; one ground-truth object (label 1) and its masks."""
  rng = np.random.default_rng(2)
  frames = np.zeros((num_frames, 32, 32, 3), np.uint8)
  frames[:, :24] = rng.integers(90, 110, (num_frames, 24, 32, 3))
  masks = np.zeros((2, num_frames, 32, 32), np.uint8)
  masks[0, :, 4:12, 8:16] = 1
  masks[1, :, 0:4, 0:4] = 1  # not a valid instance
  return {
      "frames": frames,
      "image_valid": np.pad(np.ones((24, 32), bool), ((0, 8), (0, 0))),
      "resized_size": np.array([24, 32]),
      "orig_size": np.array([48, 64]),
      "masks": masks,
      "labels": np.array([1, 2]),
      "instance_valid": np.array([True, False]),
  }


def test_ground_truth_masks_at_the_original_size():
  masks, labels = visualize.ground_truth_masks(_eval_video())
  expected = np.zeros((1, 3, 48, 64), bool)
  expected[0, :, 8:24, 16:32] = True
  np.testing.assert_array_equal(masks, expected)
  np.testing.assert_array_equal(labels, [1])
  video = _eval_video()
  del video["masks"]
  assert visualize.ground_truth_masks(video)[0].shape == (0, 3, 48, 64)


def test_ground_truth_and_prediction_side_by_side():
  video = _eval_video()
  predicted = np.zeros((2, 3, 48, 64), bool)
  predicted[0, :, 24:33, 40:60] = True
  predicted[1, :, 0:10, 0:10] = True  # scores below the threshold: not drawn
  prediction = inference.VideoPrediction(
      scores=np.array([0.9, 0.1], np.float32),
      labels=np.array([0, 2], np.int32),
      masks=predicted,
      query_indices=np.array([3, 5], np.int32),
  )
  out = visualize.ground_truth_and_prediction(
      video, prediction, ("a", "b", "c"), score_threshold=0.5, min_size=0
  )
  assert out.shape == (3, 48, 128, 3)
  frames = visualize.frames_at_original_size(video["frames"], (24, 32), (48, 64))
  truth, pred = out[..., :64, :], out[..., 64:, :]
  gt_masks = np.zeros((1, 3, 48, 64), bool)
  gt_masks[0, :, 8:24, 16:32] = True  # the valid instance, at 2x
  np.testing.assert_array_equal(
      truth,
      visualize.overlay_frames(
          frames,
          gt_masks,
          [1],
          [1.0],
          ("a", "b", "c"),
          show_scores=False,
          min_size=0,
          title="ground truth",
      ),
  )
  np.testing.assert_array_equal(
      pred,
      visualize.overlay_frames(
          frames, predicted[:1], [0], [0.9], ("a", "b", "c"), min_size=0, title="prediction"
      ),
  )
  interior_gt, interior_pred = (slice(None), slice(10, 22), slice(18, 30)), (
      slice(None),
      slice(26, 31),
      slice(42, 58),
  )
  assert np.all(truth[interior_gt] != frames[interior_gt]) and np.all(
      pred[interior_pred] != frames[interior_pred]
  )
  np.testing.assert_array_equal(truth[interior_pred], frames[interior_pred])
  np.testing.assert_array_equal(pred[:, 0:10, 0:10], frames[:, 0:10, 0:10])  # below threshold


def test_stack_videos_holds_the_last_frame_and_pads():
  short = np.full((2, 4, 6, 3), 50, np.uint8)
  short[1] = 60
  wide = np.full((3, 5, 8, 3), 200, np.uint8)
  grid = visualize.stack_videos([short, wide])
  assert grid.shape == (3, 9, 8, 3)
  np.testing.assert_array_equal(grid[2, :4, :6], 60)  # held
  np.testing.assert_array_equal(grid[:, :4, 6:], 0)  # padded
  np.testing.assert_array_equal(grid[:, 4:], wide)


def test_save_ground_truth_and_prediction_writes_the_grid(tmp_path):
  calls = []

  def predictor(variables, frames, *, image_valid, image_size, output_size):
    calls.append((variables, frames.shape, tuple(image_size), tuple(output_size)))
    masks = np.zeros((1, frames.shape[0], *output_size), bool)
    masks[0, :, 30:40, 40:60] = True
    return inference.VideoPrediction(
        np.array([0.9], np.float32), np.array([0], np.int32), masks, np.array([0], np.int32)
    )

  videos = [_eval_video(3), _eval_video(5)]
  paths = visualize.save_ground_truth_and_prediction(
      tmp_path / "overlays", iter(videos), predictor, "vars", ("a", "b", "c"), fps=5.0
  )
  assert calls == [
      ("vars", (3, 32, 32, 3), (24, 32), (48, 64)),
      ("vars", (5, 32, 32, 3), (24, 32), (48, 64)),
  ]
  assert set(paths) == {"gif", "mp4", "png"}
  gif = iio.imread(paths["gif"], index=None)
  # Two videos at 384 (x8 of 48) high, each ground truth | prediction (2 x 512 wide).
  assert gif.shape[:3] == (5, 768, 1024)
  png = iio.imread(paths["png"])
  first = visualize.ground_truth_and_prediction(
      videos[1],
      predictor(
          "vars", videos[1]["frames"], image_valid=None, image_size=(24, 32), output_size=(48, 64)
      ),
      ("a", "b", "c"),
  )
  np.testing.assert_array_equal(png[384:], first[2])  # the middle frame of the second video


def test_label_text_names_the_class_or_its_index():
  assert visualize.label_text(1, ("cat", "dog")) == "dog"
  assert visualize.label_text(3, ()) == "class 3"
  assert visualize.label_text(2, None) == "class 2"


def test_mp4_writing_is_quiet(tmp_path, capfd):
  """No ffmpeg log line (a 1152x768 rawvideo probe says 'not enough frames to estimate rate' at
  the default level) and no JAX fork warning when ffmpeg starts."""
  jax.devices()  # JAX's fork handler is installed with its backends
  frames = np.random.default_rng(0).integers(0, 255, (3, 1152, 768, 3), dtype=np.uint8)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    visualize.save_animation(tmp_path / "big.mp4", frames, fps=4)
    writer = visualize.Mp4Writer(tmp_path / "one.mp4", fps=6.0)
    writer.write(frames[0])
    writer.close()
  assert not [str(w.message) for w in caught if "fork" in str(w.message)]
  captured = capfd.readouterr()
  assert captured.err == "" and captured.out == ""
  assert writer.num_frames == 1 and (tmp_path / "one.mp4").stat().st_size > 0
