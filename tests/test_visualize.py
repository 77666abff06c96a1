"""Tests of the mask overlays and animation writing."""

import imageio.v3 as iio
import numpy as np
import pytest

from maskfreevis_jax.evaluation import visualize


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
  from maskfreevis_jax import predict

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
