"""Video inference post-processing against the official `inference_video` (parity_inference.npz).

The fixture holds final-layer outputs of two videos (one whose resized frames were padded to the
model input size) and what the official eval forward returned for them: upsampling to the padded
size, crop, resize to the original size, top-10 (query, class) pairs, logit > 0.
`tools/official_parity/inference.py` writes it.
"""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from maskfreevis_jax.evaluation import inference

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
# Masks may differ only where a resized logit lies within float32 rounding of 0: both sides
# compute the same bilinear weights but sum them in a different order (separable matmuls here,
# two `F.interpolate` calls there).
MAX_DIFFERENT_PIXELS = 3


def _case(name: str):
  with np.load(FIXTURES / "parity_inference.npz") as data:
    arrays = {k: data[k] for k in data.files if k.startswith(name + "_") or k == "meta"}
  scale = json.loads(str(arrays["meta"]))["logit_scale"]
  image_size, original_size, padded_size = (
      tuple(int(v) for v in row) for row in arrays[f"{name}_sizes"]
  )
  logits = arrays[f"{name}_pred_logits_q"].astype(np.float32) / scale
  masks = arrays[f"{name}_pred_masks_q"].astype(np.float32) / scale
  official_masks = np.unpackbits(
      arrays[f"{name}_masks_packed"], axis=-1, count=original_size[1]
  ).astype(bool)
  ours = inference.postprocess_video(
      logits, masks, image_size=image_size, output_size=original_size, padded_size=padded_size
  )
  official = (arrays[f"{name}_scores"], arrays[f"{name}_labels"], official_masks)
  return [np.asarray(x) for x in ours], official


@pytest.mark.parametrize("name", ["unpadded", "padded"])
def test_scores_and_labels_match_official(name):
  (scores, labels, _), (official_scores, official_labels, _) = _case(name)
  np.testing.assert_allclose(scores, official_scores, rtol=1e-6)
  np.testing.assert_array_equal(labels, official_labels)


@pytest.mark.parametrize("name", ["unpadded", "padded"])
def test_masks_match_official(name):
  (_, _, masks), (_, _, official_masks) = _case(name)
  assert masks.shape == official_masks.shape
  different = int(np.sum(masks != official_masks))
  assert different <= MAX_DIFFERENT_PIXELS, f"{different} of {masks.size} pixels differ"


def _fixture_model(name: str):
  """A stand-in model that returns the fixture's outputs: the masks of the frames it is given
  (frame t is filled with the value t), the same class logits for every window."""
  with np.load(FIXTURES / "parity_inference.npz") as data:
    scale = json.loads(str(data["meta"]))["logit_scale"]
    logits = data[f"{name}_pred_logits_q"].astype(np.float32) / scale
    masks = data[f"{name}_pred_masks_q"].astype(np.float32) / scale
    sizes = [tuple(int(v) for v in row) for row in data[f"{name}_sizes"]]

  def apply_fn(variables, frames, image_valid=None):
    del variables, image_valid
    index = frames[0, :, 0, 0, 0].astype(jnp.int32)  # the frames' own indices
    return {
        "pred_logits": jnp.asarray(logits)[None, None],
        "pred_masks": jnp.asarray(masks)[:, index][None, None],
    }

  frames = np.zeros((masks.shape[1], *sizes[2], 3), np.uint8)
  frames += np.arange(masks.shape[1], dtype=np.uint8)[:, None, None, None]
  return apply_fn, frames, sizes


@pytest.mark.parametrize("name", ["unpadded", "padded"])
@pytest.mark.parametrize(
    "window_size,overlap",
    [(None, 0), (3, 0), (2, 1), (1, 0)],
    ids=["whole", "one-window", "2-1", "1-0"],
)
def test_video_predictor_matches_official(name, window_size, overlap):
  apply_fn, frames, (image_size, original_size, _) = _fixture_model(name)
  predictor = inference.VideoPredictor(
      apply_fn, window_size=window_size, window_overlap=overlap, frame_chunk=2
  )
  prediction = predictor({}, frames, image_size=image_size, output_size=original_size)
  (scores, labels, masks), (official_scores, official_labels, official_masks) = _case(name)
  np.testing.assert_allclose(prediction.scores, official_scores, rtol=1e-6)
  np.testing.assert_array_equal(prediction.labels, official_labels)
  different = int(np.sum(prediction.masks != official_masks))
  assert different <= MAX_DIFFERENT_PIXELS, f"{different} of {masks.size} pixels differ"
  # The same masks as the post-processing of the whole video, to the bit.
  np.testing.assert_array_equal(prediction.masks, masks)
  np.testing.assert_array_equal(prediction.labels, labels)
