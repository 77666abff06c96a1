"""Tests of the video inference post-processing and windowed prediction."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.optimize
import scipy.special
import torch
import torch.nn.functional as F

from maskfreevis_jax import defaults
from maskfreevis_jax import model_presets
from maskfreevis_jax import models
from maskfreevis_jax.evaluation import inference, track_builder, ytvis_eval


def _torch_reference(pred_logits, pred_masks, padded_size, image_size, output_size, top_k):
  """Per-video inference written with PyTorch ops, following the official recipe."""
  logits = torch.from_numpy(pred_logits)
  masks = torch.from_numpy(pred_masks)
  num_queries, num_classes = logits.shape[0], logits.shape[1] - 1
  scores = F.softmax(logits, dim=-1)[:, :-1]
  top_scores, flat = scores.flatten().topk(top_k, sorted=True)
  labels = flat % num_classes
  queries = flat // num_classes
  up = F.interpolate(masks, size=padded_size, mode="bilinear", align_corners=False)[queries]
  up = up[:, :, : image_size[0], : image_size[1]]
  out = F.interpolate(up, size=output_size, mode="bilinear", align_corners=False)
  return top_scores.numpy(), labels.numpy(), queries.numpy(), out.numpy()


@pytest.mark.parametrize("output_size", [(90, 130), (30, 50)])
def test_postprocess_matches_pytorch_bilinear(output_size):
  rng = np.random.default_rng(0)
  num_queries, num_classes, num_frames = 20, 5, 3
  pred_logits = rng.normal(size=(num_queries, num_classes + 1)).astype(np.float32) * 3
  pred_masks = rng.normal(size=(num_queries, num_frames, 12, 20)).astype(np.float32) * 4
  padded, image = (48, 80), (44, 70)
  scores, labels, masks = inference.postprocess_video(
      jnp.asarray(pred_logits),
      jnp.asarray(pred_masks),
      image_size=image,
      output_size=output_size,
      top_k=10,
  )
  ref_scores, ref_labels, ref_queries, ref_logits = _torch_reference(
      pred_logits, pred_masks, padded, image, output_size, 10
  )
  np.testing.assert_allclose(np.asarray(scores), ref_scores, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(labels), ref_labels)
  masks = np.asarray(masks)
  assert masks.shape == (10, num_frames, *output_size) and masks.dtype == bool
  # Same logits up to float rounding: thresholds agree except where |logit| is ~0.
  decided = np.abs(ref_logits) > 1e-4
  np.testing.assert_array_equal(masks[decided], ref_logits[decided] > 0)
  assert 0.2 < masks.mean() < 0.8
  # The resized logits themselves match.
  selected = jnp.take(jnp.asarray(pred_masks), jnp.asarray(ref_queries), axis=0)
  up = jax.image.resize(selected, (10, num_frames, *padded), "bilinear", antialias=False)
  down = jax.image.resize(
      up[:, :, : image[0], : image[1]], (10, num_frames, *output_size), "bilinear", antialias=False
  )
  np.testing.assert_allclose(np.asarray(down), ref_logits, atol=1e-4)


def test_top_predictions_can_share_a_query():
  # One query is confident for two classes: both (query, class) pairs are kept.
  probabilities = jnp.asarray([[0.45, 0.45, 0.0], [0.05, 0.0, 0.02], [0.0, 0.01, 0.0]])
  scores, labels, queries = inference.select_top_predictions(probabilities, top_k=3)
  np.testing.assert_allclose(np.asarray(scores), [0.45, 0.45, 0.05])
  assert sorted(zip(np.asarray(queries)[:2], np.asarray(labels)[:2])) == [(0, 0), (0, 1)]
  assert (int(queries[2]), int(labels[2])) == (1, 0)
  with pytest.raises(ValueError, match="top_k=10 exceeds"):
    inference.select_top_predictions(probabilities, top_k=10)


def _per_frame_model(num_queries=6, num_classes=3):
  """A stand-in for the model: mask logits of query q = (channel q % 3 at stride 4) - threshold_q,
  computed frame by frame; class logits from the mean red level of the clip."""
  thresholds = jnp.linspace(40.0, 200.0, num_queries)
  class_weights = (
      jnp.arange(num_queries * (num_classes + 1), dtype=jnp.float32).reshape(
          num_queries, num_classes + 1
      )
      % 5
      - 2.0
  )

  def apply_fn(variables, frames, image_valid=None):
    del image_valid
    x = frames.astype(jnp.float32) * variables["scale"]
    b, t, h, w, _ = x.shape
    pooled = x.reshape(b, t, h // 4, 4, w // 4, 4, 3).mean((3, 5))  # [B, T, h, w, 3]
    channels = jnp.stack([pooled[..., q % 3] for q in range(num_queries)], axis=1)
    masks = channels - thresholds[None, :, None, None, None]  # [B, Q, T, h, w]
    red = x[..., 0].mean((1, 2, 3))  # [B]
    logits = class_weights[None] * (1 + red[:, None, None] / 255.0)
    # L = 2 predictions; only the last one (index -1) must be used.
    return {"pred_logits": jnp.stack([-logits, logits]), "pred_masks": jnp.stack([-masks, masks])}

  return apply_fn, {"scale": jnp.float32(1.0)}


def _random_frames(rng, num_frames, height=32, width=48):
  frames = rng.integers(0, 256, size=(num_frames, height, width, 3), dtype=np.uint8)
  return frames


@pytest.mark.parametrize("window_size", [1, 2, 3, 4, 7])
def test_windows_concatenate_the_same_masks_as_whole_video(window_size):
  rng = np.random.default_rng(1)
  frames = _random_frames(rng, 7)
  frames[..., 0] = 100  # same class logits in every window
  apply_fn, variables = _per_frame_model()
  whole = inference.predict_video(apply_fn, variables, frames, None, output_size=(40, 60))
  windowed = inference.predict_video(
      apply_fn, variables, frames, window_size, output_size=(40, 60), frame_chunk=3
  )
  np.testing.assert_allclose(windowed.scores, whole.scores, rtol=1e-6)
  np.testing.assert_array_equal(windowed.labels, whole.labels)
  np.testing.assert_array_equal(windowed.masks, whole.masks)
  assert whole.masks.shape == (10, 7, 40, 60)
  # Frames differ, so a misplaced window would show: the masks are not constant over time.
  assert not np.array_equal(whole.masks[:, 0], whole.masks[:, 1])


def test_window_starts_cover_every_frame_once():
  assert inference.window_starts(7, None) == [0]
  assert inference.window_starts(7, 10) == [0]
  assert inference.window_starts(7, 3) == [0, 3, 4]
  assert inference.window_starts(6, 3) == [0, 3]
  with pytest.raises(ValueError, match="window_size"):
    inference.window_starts(7, 0)


def test_window_scores_are_frame_weighted_means():
  rng = np.random.default_rng(2)
  frames = _random_frames(rng, 5)
  frames[:3, ..., 0] = 0
  frames[3:, ..., 0] = 255
  apply_fn, variables = _per_frame_model()
  windowed = inference.predict_video(apply_fn, variables, frames, 3, top_k=4)
  # Windows [0, 3) and [2, 5): the second adds frames 3 and 4 only -> weights 3 and 2.
  probs = []
  for start, end in ((0, 3), (2, 5)):
    out = apply_fn(variables, jnp.asarray(frames[None, start:end]))
    probs.append(np.asarray(jax.nn.softmax(out["pred_logits"][-1, 0], -1)[:, :-1]))
  expected = (3 * probs[0] + 2 * probs[1]) / 5
  np.testing.assert_allclose(windowed.scores, np.sort(expected.reshape(-1))[::-1][:4], rtol=1e-5)


def test_crop_uses_the_valid_image_area():
  # A mask covering only the padding must vanish; a mask on the image is scaled to output_size.
  pred_logits = jnp.asarray([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
  masks = -np.ones((2, 1, 8, 8), np.float32) * 10
  masks[0, 0, :5, :5] = 10  # the 16 x 16 image of the 32 x 32 input and a bit of padding
  masks[1, 0, 5:, 5:] = 10  # padding only
  _, labels, out = inference.postprocess_video(
      pred_logits, jnp.asarray(masks), image_size=(16, 16), output_size=(20, 24), top_k=2
  )
  out = np.asarray(out)
  order = np.argsort(np.asarray(labels))
  assert out[order[0]].all()
  assert not out[order[1]].any()


def test_results_round_trip_through_the_evaluator():
  """Perfect stand-in predictions, encoded as submission RLEs, score AP 100."""
  height, width, num_frames = 32, 48, 4
  frames = np.zeros((num_frames, height, width, 3), np.uint8)
  gt_mask = np.zeros((num_frames, height, width), bool)
  for t in range(num_frames):
    gt_mask[t, 4 + 4 * t : 16 + 4 * t, 8:24] = True  # on the stride-4 grid
  frames[gt_mask] = (255, 0, 0)

  def apply_fn(variables, frames, image_valid=None):
    x = frames.astype(jnp.float32)
    b, t, h, w, _ = x.shape
    red = x[..., 0].reshape(b, t, h // 4, 4, w // 4, 4).mean((3, 5)) - 127.5
    masks = jnp.stack([red, -red, red - 1000], axis=1)  # [B, Q=3, T, h, w]
    logits = jnp.asarray([[0.0, 8.0, 0.0, 0.0], [0.0, 0.0, 0.0, 8.0], [0.0, 0.0, 0.0, 8.0]])
    return {"pred_logits": jnp.broadcast_to(logits, (1, b, 3, 4)), "pred_masks": masks[None]}

  predictor = inference.VideoPredictor(apply_fn, window_size=3, top_k=5)
  videos = [
      {
          "video_id": np.int32(7),
          "frames": frames,
          "orig_size": np.array([height, width]),
          "image_valid": np.ones((height, width), bool),
      }
  ]
  seen = []
  results = inference.run_inference(
      predictor, {}, videos, category_ids=[11, 12, 13], on_video=lambda v, p: seen.append(p)
  )
  assert len(results) == 5 and len(seen) == 1
  assert results[0]["category_id"] == 12 and results[0]["video_id"] == 7
  assert isinstance(results[0]["segmentations"][0]["counts"], str)
  # Bilinear upsampling of stride-4 logits only rounds off the 4 box corners of each frame.
  predicted = seen[0].masks[0]
  assert not (predicted & ~gt_mask).any() and (gt_mask & ~predicted).sum() == 4 * num_frames
  gt = {
      "videos": [{"id": 7, "height": height, "width": width, "length": num_frames}],
      "categories": [{"id": c, "name": f"c{c}"} for c in (11, 12, 13)],
      "annotations": [
          {
              "id": 1,
              "video_id": 7,
              "category_id": 12,
              "iscrowd": 0,
              "segmentations": inference.encode_rle(gt_mask),
              "areas": [int(m.sum()) for m in gt_mask],
          }
      ],
  }
  metrics = ytvis_eval.evaluate_ytvis(gt, results)
  assert metrics["AP"] == pytest.approx(100.0)


def test_bad_inputs_raise_clear_errors():
  apply_fn, variables = _per_frame_model()
  frames = np.zeros((3, 32, 48, 3), np.uint8)
  with pytest.raises(ValueError, match=r"frames must be \[T, H, W, 3\]"):
    inference.predict_video(apply_fn, variables, frames[..., 0])
  with pytest.raises(ValueError, match="exceeds the padded input size"):
    inference.predict_video(apply_fn, variables, frames, image_size=(40, 48))
  with pytest.raises(ValueError, match="image_valid shape"):
    inference.predict_video(apply_fn, variables, frames, image_valid=np.ones((8, 8), bool))
  with pytest.raises(ValueError, match="no valid pixel"):
    inference.valid_size(np.zeros((4, 4), bool))
  with pytest.raises(ValueError, match="same Q"):
    inference.postprocess_video(
        jnp.zeros((4, 3)), jnp.zeros((5, 1, 2, 2)), image_size=(8, 8), output_size=(8, 8)
    )
  with pytest.raises(ValueError, match='lacks "frames"'):
    inference.run_inference(inference.VideoPredictor(apply_fn), variables, [{"video_id": 1}])


def test_valid_size_and_image_valid_default():
  valid = np.zeros((32, 48), bool)
  valid[:20, :30] = True
  assert inference.valid_size(valid) == (20, 30)
  apply_fn, variables = _per_frame_model()
  frames = np.full((2, 32, 48, 3), 255, np.uint8)
  out = inference.predict_video(apply_fn, variables, frames, image_valid=valid, top_k=2)
  assert out.masks.shape == (2, 2, 20, 30)


def _independent_windows(outputs, associate):
  """The windowed prediction computed here from the model outputs of windows [0, 2) and [1, 3):
  track order (scipy's Hungarian on the association cost, or the query order), frame-weighted
  class probabilities and the mask logits of each frame (window 1 adds frame 2).

  Returns:
    float64 [Q, C] track probabilities, float32 [Q, 3, h, w] track mask logits.
  """
  probabilities = [
      scipy.special.softmax(np.asarray(o["pred_logits"][-1, 0], np.float64), -1)[:, :-1]
      for o in outputs
  ]
  masks = [np.asarray(o["pred_masks"][-1, 0], np.float32) for o in outputs]
  order = np.arange(masks[0].shape[0])
  if associate:
    embeds = [np.asarray(o["pred_embeds"][0], np.float64) for o in outputs]
    unit = [e / np.linalg.norm(e, axis=-1, keepdims=True) for e in embeds]
    a = scipy.special.expit(masks[0][:, 1].astype(np.float64)).reshape(len(order), -1)
    b = scipy.special.expit(masks[1][:, 0].astype(np.float64)).reshape(len(order), -1)
    dice = (2 * a @ b.T + 1) / (a.sum(-1)[:, None] + b.sum(-1)[None] + 1)
    cost = (1 - unit[0] @ unit[1].T) + (1 - dice)
    rows, cols = scipy.optimize.linear_sum_assignment(cost)
    order[rows] = cols
  scores = (2 * probabilities[0] + probabilities[1][order]) / 3
  return scores, np.concatenate([masks[0], masks[1][order][:, 1:]], axis=1)


@pytest.mark.slow
@pytest.mark.parametrize("associate", [False, True], ids=["query-order", "associated"])
def test_real_tiny_model_windows_match_an_independent_computation(associate):
  """The real (tiny) VideoMaskFormer in windows of 2 frames sharing 1, against the windows'
  outputs stitched, ranked and resized here (scipy, PyTorch's bilinear). The second window's
  query slots are reversed, so that association has tracks to recover."""
  config = model_presets.get_model_config("tiny", num_classes=3)
  model = models.build_model(config)
  rng = np.random.default_rng(3)
  frames = rng.integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
  frames[:, 0, 0, 0] = np.arange(3)  # the first pixel tells a window's first frame
  valid = np.zeros((64, 64), bool)
  valid[:60, :50] = True
  variables = model.init(
      jax.random.PRNGKey(0), jnp.asarray(frames[None, :2]), image_valid=jnp.asarray(valid[None])
  )

  def apply_fn(variables, frames, image_valid=None):
    outputs = dict(model.apply(variables, frames, image_valid=image_valid))
    slots = jnp.arange(outputs["pred_logits"].shape[2])
    slots = jnp.where(frames[0, 0, 0, 0, 0] == 0, slots, slots[::-1])
    outputs["pred_logits"] = outputs["pred_logits"][:, :, slots]
    outputs["pred_masks"] = outputs["pred_masks"][:, :, slots]
    outputs["pred_embeds"] = outputs["pred_embeds"][:, slots]
    return outputs

  # Every query a track that always continues (a random model is never confident): the tracks
  # are then the Hungarian association of all queries, computed independently below.
  predictor = inference.VideoPredictor(
      apply_fn,
      window_size=2,
      window_overlap=1,
      associate=associate,
      track_birth_score=0.0,
      track_keep_score=0.0,
      track_max_cost=1e9,
      top_k=10,
  )
  prediction = predictor(variables, frames, image_valid=valid, output_size=(120, 100))

  outputs = [
      apply_fn(variables, jnp.asarray(frames[None, s : s + 2]), image_valid=valid[None])
      for s in (0, 1)
  ]
  scores, track_logits = _independent_windows(outputs, associate)
  ranked = np.argsort(-scores.reshape(-1), kind="stable")[:10]
  np.testing.assert_allclose(prediction.scores, scores.reshape(-1)[ranked], rtol=1e-5)
  np.testing.assert_array_equal(prediction.labels, ranked % 3)
  np.testing.assert_array_equal(prediction.query_indices, ranked // 3)
  up = F.interpolate(torch.from_numpy(track_logits), size=(64, 64), mode="bilinear")
  expected = F.interpolate(up[:, :, :60, :50], size=(120, 100), mode="bilinear").numpy()
  expected = expected[ranked // 3]
  decided = np.abs(expected) > 1e-3  # float rounding decides the rest
  assert decided.mean() > 0.99 and 0.01 < (expected > 0).mean() < 0.99
  np.testing.assert_array_equal(prediction.masks[decided], expected[decided] > 0)


def test_from_config_reads_the_schema():
  """`config.eval` as the schema has it (associate True), nothing filled in behind it."""
  apply_fn, _ = _per_frame_model()
  config = defaults.get_config()
  predictor = inference.VideoPredictor.from_config(apply_fn, config.eval)
  assert (predictor.window_size, predictor.associate, predictor.top_k) == (None, True, 10)
  config.eval.window_size, config.eval.window_overlap, config.eval.top_k = 6, 2, 3
  config.eval.association_mask_weight = 0.5
  config.eval.track_birth_score, config.eval.track_keep_score = 0.6, 0.3
  config.eval.track_max_cost, config.eval.track_patience = 0.8, 4
  predictor = inference.VideoPredictor.from_config(apply_fn, config.eval, associate=False)
  assert (predictor.window_size, predictor.window_overlap, predictor.top_k) == (6, 2, 3)
  assert predictor.track_settings == track_builder.TrackSettings(
      associate=False,
      embed_weight=1.0,
      mask_weight=0.5,
      birth_score=0.6,
      keep_score=0.3,
      max_cost=0.8,
      patience=4,
  )
  partial = ml_collections.ConfigDict({k: v for k, v in config.eval.items() if k != "associate"})
  with pytest.raises(AttributeError, match="associate"):
    inference.VideoPredictor.from_config(apply_fn, partial)


def test_whole_video_predictor_equals_postprocess_of_the_final_prediction():
  rng = np.random.default_rng(4)
  frames = _random_frames(rng, 5)
  valid = np.zeros((32, 48), bool)
  valid[:28, :40] = True
  apply_fn, variables = _per_frame_model()
  out = apply_fn(variables, jnp.asarray(frames[None]))
  scores, labels, masks = inference.postprocess_video(
      out["pred_logits"][-1, 0], out["pred_masks"][-1, 0], image_size=(28, 40), output_size=(56, 70)
  )
  prediction = inference.predict_video(
      apply_fn, variables, frames, image_valid=valid, output_size=(56, 70), frame_chunk=2
  )
  np.testing.assert_array_equal(prediction.scores, np.asarray(scores))
  np.testing.assert_array_equal(prediction.labels, np.asarray(labels))
  np.testing.assert_array_equal(prediction.masks, np.asarray(masks))
