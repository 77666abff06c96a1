"""Video inference post-processing (the official `inference_video`) and windowed prediction.

Per video, from the final prediction of the model (`pred_logits` [Q, C + 1], `pred_masks`
[Q, T, H/4, W/4]):

1. class probabilities: softmax over C + 1 classes, the no-object class dropped;
2. the top-k (default 10) (query, class) pairs over the flattened Q * C probabilities;
3. the mask logits of those queries are upsampled (bilinear, half-pixel centres) to the padded input
   size, cropped to the valid image area (`image_size`, the resized frame before padding), resized
   (bilinear) to the original video size and thresholded at logit > 0.

Steps 1-2 and 3 are jit-compiled jnp functions with static shapes (`lax.top_k`, gathers,
and resize weights from `jax.image.resize` without antialiasing, which equals PyTorch's bilinear
`align_corners=False`).

Long videos: the official model runs the whole video as one clip. `VideoPredictor` does the same
when `window_size` is None or >= the video length. Otherwise it runs the model on consecutive
windows of `window_size` frames (the last window is shifted back to end at the last frame, so every
window has the same static shape and no frame is padded), concatenates the mask logits of the same
query index along time, and averages the per-window class probabilities weighted by the number of
new frames each window contributes. Device memory then stays bounded by the window size.
Limitation: queries are not matched across windows; the model has no explicit query-to-object
binding, so query q may follow different objects in different windows (an identity switch within
one predicted track), which lowers AP on long videos compared with whole-video inference. Use
windows only when the whole video does not fit in memory.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from pycocotools import mask as mask_utils

ApplyFn = Callable[..., Mapping[str, jax.Array]]


@dataclasses.dataclass
class VideoPrediction:
  """Post-processed predictions of one video.

  Attributes:
    scores: float32 [K] class probabilities, decreasing.
    labels: int32 [K] contiguous class indices in [0, C).
    masks: bool [K, T, H0, W0] at the original video size.
    query_indices: int32 [K] the query each prediction comes from.
  """
  scores: np.ndarray
  labels: np.ndarray
  masks: np.ndarray
  query_indices: np.ndarray


def class_probabilities(pred_logits: jax.Array) -> jax.Array:
  """Softmax over C + 1 classes without the last (no-object) class: [..., C + 1] -> [..., C]."""
  return jax.nn.softmax(pred_logits.astype(jnp.float32), axis=-1)[..., :-1]


@functools.partial(jax.jit, static_argnames=('top_k',))
def select_top_predictions(probabilities: jax.Array, top_k: int = 10):
  """Top-k (query, class) pairs over the flattened class probabilities.

  Args:
    probabilities: [Q, C] class probabilities (no-object class excluded).
    top_k: number of predictions kept.

  Returns:
    scores float32 [K], labels int32 [K], query_indices int32 [K] (sorted by decreasing score).
  """
  num_queries, num_classes = probabilities.shape
  if top_k > num_queries * num_classes:
    raise ValueError(
        f'top_k={top_k} exceeds the {num_queries} x {num_classes} (query, class) pairs')
  scores, flat = jax.lax.top_k(probabilities.reshape(-1), top_k)
  return scores, (flat % num_classes).astype(jnp.int32), (flat // num_classes).astype(jnp.int32)


def _resize_matrix(mask_size: int, padded_size: int, image_size: int,
                   output_size: int) -> jax.Array:
  """[output_size, mask_size] linear map of upsample-to-padded, crop, resize along one axis.

  Both steps are `jax.image.resize` (bilinear, no antialiasing) applied to an identity matrix, so
  the composition is exactly the two resizes of the official code, done as one small matmul.
  """
  eye = jnp.eye(mask_size, dtype=jnp.float32)
  up = jax.image.resize(eye, (padded_size, mask_size), 'bilinear', antialias=False)
  return jax.image.resize(up[:image_size], (output_size, mask_size), 'bilinear', antialias=False)


@functools.partial(jax.jit, static_argnames=('padded_size', 'image_size', 'output_size'))
def masks_to_original_size(mask_logits: jax.Array, padded_size: tuple[int, int],
                           image_size: tuple[int, int], output_size: tuple[int, int]) -> jax.Array:
  """Upsamples stride-4 mask logits to the padded input, crops the image and resizes it.

  Equivalent to `resize(resize(x, padded_size)[..., :H, :W], output_size)` (bilinear, half-pixel
  centres, as PyTorch's `align_corners=False`), computed as two separable matmuls, which is several
  times cheaper than resizing to the padded size first.

  Args:
    mask_logits: [K, T, h, w] mask logits (h, w = padded size / 4).
    padded_size: (Hp, Wp) padded model input size.
    image_size: (H, W) resized frame before padding, H <= Hp, W <= Wp.
    output_size: (H0, W0) original video size.

  Returns:
    bool [K, T, H0, W0], True where the resized logit is > 0.
  """
  h, w = mask_logits.shape[-2:]
  rows = _resize_matrix(h, padded_size[0], image_size[0], output_size[0])  # [H0, h]
  cols = _resize_matrix(w, padded_size[1], image_size[1], output_size[1])  # [W0, w]
  x = mask_logits.astype(jnp.float32)
  hi = jax.lax.Precision.HIGHEST  # TPUs would otherwise multiply in bfloat16
  x = jnp.einsum('kthw,Ww->kthW', x, cols, precision=hi)
  x = jnp.einsum('Hh,kthW->ktHW', rows, x, precision=hi)
  return x > 0


def postprocess_video(pred_logits: jax.Array, pred_masks: jax.Array, *,
                      image_size: tuple[int, int], output_size: tuple[int, int],
                      padded_size: Optional[tuple[int, int]] = None, top_k: int = 10):
  """The official per-video inference on one clip's final prediction.

  Args:
    pred_logits: [Q, C + 1] class logits.
    pred_masks: [Q, T, h, w] mask logits at stride 4.
    image_size: (H, W) valid (unpadded) input size.
    output_size: (H0, W0) original size.
    padded_size: model input size; defaults to 4 * (h, w).
    top_k: predictions kept.

  Returns:
    scores float32 [K], labels int32 [K], masks bool [K, T, H0, W0] (jax arrays).
  """
  if pred_logits.ndim != 2 or pred_masks.ndim != 4 or pred_masks.shape[0] != pred_logits.shape[0]:
    raise ValueError(f'pred_logits must be [Q, C+1] and pred_masks [Q, T, h, w] with the same Q; '
                     f'got {pred_logits.shape} and {pred_masks.shape}')
  padded_size = _padded_size(pred_masks, padded_size)
  scores, labels, queries = select_top_predictions(class_probabilities(pred_logits), top_k)
  masks = masks_to_original_size(jnp.take(pred_masks, queries, axis=0), padded_size,
                                 _check_size(image_size, padded_size), _as_size(output_size))
  return scores, labels, masks


def _as_size(size) -> tuple[int, int]:
  size = tuple(int(s) for s in np.asarray(size).reshape(-1))
  if len(size) != 2 or min(size) <= 0:
    raise ValueError(f'expected a (height, width) pair of positive ints, got {size}')
  return size


def _padded_size(pred_masks, padded_size) -> tuple[int, int]:
  if padded_size is None:
    return (4 * pred_masks.shape[-2], 4 * pred_masks.shape[-1])
  return _as_size(padded_size)


def _check_size(image_size, padded_size) -> tuple[int, int]:
  image_size = _as_size(image_size)
  if image_size[0] > padded_size[0] or image_size[1] > padded_size[1]:
    raise ValueError(f'image_size {image_size} exceeds the padded input size {padded_size}')
  return image_size


def valid_size(image_valid: np.ndarray) -> tuple[int, int]:
  """(H, W) of the real image in a top-left aligned padding mask [Hp, Wp]."""
  image_valid = np.asarray(image_valid, bool)
  if image_valid.ndim != 2:
    raise ValueError(f'image_valid must be [H, W], got shape {image_valid.shape}')
  rows, cols = np.flatnonzero(image_valid.any(1)), np.flatnonzero(image_valid.any(0))
  if rows.size == 0:
    raise ValueError('image_valid has no valid pixel')
  return int(rows[-1]) + 1, int(cols[-1]) + 1


def window_starts(num_frames: int, window_size: Optional[int]) -> list[int]:
  """Start frames of the windows covering a video (the last one ends at the last frame)."""
  if num_frames <= 0:
    raise ValueError(f'a video needs at least one frame, got {num_frames}')
  if window_size is None or window_size >= num_frames:
    return [0]
  if window_size <= 0:
    raise ValueError(f'window_size must be positive, got {window_size}')
  starts = list(range(0, num_frames - window_size + 1, window_size))
  if starts[-1] + window_size < num_frames:
    starts.append(num_frames - window_size)
  return starts


class VideoPredictor:
  """Runs a VideoMaskFormer on whole videos (or windows of them) and post-processes the output.

  Build it once and call it on every video: the model and post-processing functions are compiled
  once per distinct input / window / output shape.

  Example:
    model = build_model(config.model)
    predictor = VideoPredictor(model.apply, window_size=None)
    prediction = predictor(variables, video['frames'], image_valid=video['image_valid'],
                           output_size=video['orig_size'])
  """

  def __init__(self, apply_fn: ApplyFn, *, window_size: Optional[int] = None, top_k: int = 10,
               frame_chunk: int = 8):
    """Initialises the predictor.

    Args:
      apply_fn: `model.apply`-like function `(variables, frames [B, T, H, W, 3], image_valid=...)`
        returning `pred_logits` [L, B, Q, C + 1] and `pred_masks` [L, B, Q, T, H/4, W/4].
      window_size: frames per model call; None runs the whole video at once (official).
      top_k: predictions kept per video (official 10).
      frame_chunk: frames resized to the original size per device call (bounds memory).
    """
    if frame_chunk <= 0:
      raise ValueError(f'frame_chunk must be positive, got {frame_chunk}')
    self.window_size = window_size
    self.top_k = top_k
    self.frame_chunk = frame_chunk

    def forward(variables, frames, image_valid):
      outputs = apply_fn(variables, frames, image_valid=image_valid)
      # Only the final prediction of the single clip leaves the device.
      return class_probabilities(outputs['pred_logits'][-1, 0]), outputs['pred_masks'][-1, 0]

    self._forward = jax.jit(forward)

  def __call__(self, variables: Any, frames: np.ndarray, *,
               image_valid: Optional[np.ndarray] = None,
               image_size: Optional[Sequence[int]] = None,
               output_size: Optional[Sequence[int]] = None) -> VideoPrediction:
    """Predicts one video.

    Args:
      variables: model variables.
      frames: uint8 [T, Hp, Wp, 3] (or [1, T, Hp, Wp, 3]) RGB frames, padded to the model size.
      image_valid: optional bool [Hp, Wp] (or [1, Hp, Wp]) padding mask given to the model; also
        gives `image_size` when that is None.
      image_size: (H, W) resized frame before padding; default from image_valid, else (Hp, Wp).
      output_size: (H0, W0) original video size; default image_size.

    Returns:
      The top-k predictions with masks at the original size.
    """
    frames = np.asarray(frames)
    if frames.ndim == 5 and frames.shape[0] == 1:
      frames = frames[0]
    if frames.ndim != 4 or frames.shape[-1] != 3:
      raise ValueError(f'frames must be [T, H, W, 3], got shape {frames.shape}')
    num_frames, padded_h, padded_w = frames.shape[:3]
    if image_valid is not None:
      image_valid = np.asarray(image_valid, bool)
      if image_valid.ndim == 3 and image_valid.shape[0] == 1:
        image_valid = image_valid[0]
      if image_valid.shape != (padded_h, padded_w):
        raise ValueError(f'image_valid shape {image_valid.shape} does not match the frames '
                         f'{(padded_h, padded_w)}')
    if image_size is None:
      image_size = valid_size(image_valid) if image_valid is not None else (padded_h, padded_w)
    image_size = _check_size(image_size, (padded_h, padded_w))
    output_size = _as_size(output_size if output_size is not None else image_size)

    model_valid = None if image_valid is None else image_valid[None]
    covered = 0
    window_probabilities, window_weights, mask_pieces = [], [], []
    for start in window_starts(num_frames, self.window_size):
      end = start + min(self.window_size or num_frames, num_frames)
      probabilities, mask_logits = self._forward(variables, frames[None, start:end], model_valid)
      window_probabilities.append(np.asarray(probabilities, np.float32))
      window_weights.append(end - covered)  # frames this window adds
      mask_pieces.append(np.asarray(mask_logits[:, covered - start:]))
      covered = end
    if len(window_probabilities) == 1:
      probabilities = window_probabilities[0]  # whole video: exactly the official scores
    else:
      probabilities = sum(p * w for p, w in zip(window_probabilities, window_weights)) / num_frames
    mask_logits = np.concatenate(mask_pieces, axis=1)  # [Q, T, h, w]
    padded_size = (4 * mask_logits.shape[-2], 4 * mask_logits.shape[-1])
    if padded_size != (padded_h, padded_w):
      raise ValueError(f'model masks {mask_logits.shape[-2:]} are not 1/4 of the input '
                       f'{(padded_h, padded_w)}')
    scores, labels, queries = select_top_predictions(jnp.asarray(probabilities), self.top_k)
    queries = np.asarray(queries)
    selected = mask_logits[queries]  # [K, T, h, w]
    masks = np.zeros((len(queries), num_frames, *output_size), bool)
    for start in range(0, num_frames, self.frame_chunk):
      chunk = selected[:, start:start + self.frame_chunk]
      size = chunk.shape[1]
      if size < self.frame_chunk and num_frames > self.frame_chunk:
        # Pad the last chunk to the static chunk shape (no recompilation); padding is dropped.
        chunk = np.pad(chunk, ((0, 0), (0, self.frame_chunk - size), (0, 0), (0, 0)))
      masks[:, start:start + size] = np.asarray(masks_to_original_size(
          chunk, padded_size, image_size, output_size))[:, :size]
    return VideoPrediction(scores=np.asarray(scores, np.float32),
                           labels=np.asarray(labels, np.int32), masks=masks,
                           query_indices=queries.astype(np.int32))


def predict_video(apply_fn: ApplyFn, variables: Any, frames: np.ndarray,
                  window_size: Optional[int] = None, *, image_valid: Optional[np.ndarray] = None,
                  image_size: Optional[Sequence[int]] = None,
                  output_size: Optional[Sequence[int]] = None, top_k: int = 10,
                  frame_chunk: int = 8) -> VideoPrediction:
  """One-off prediction of a video; see `VideoPredictor` (reuse one for many videos)."""
  predictor = VideoPredictor(apply_fn, window_size=window_size, top_k=top_k,
                             frame_chunk=frame_chunk)
  return predictor(variables, frames, image_valid=image_valid, image_size=image_size,
                   output_size=output_size)


def encode_rle(masks: np.ndarray) -> list[dict]:
  """Compressed RLEs ({'size': [H, W], 'counts': str}) of bool masks [T, H, W], one per frame."""
  masks = np.asarray(masks)
  if masks.ndim != 3:
    raise ValueError(f'masks must be [T, H, W], got shape {masks.shape}')
  rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
  for rle in rles:
    rle['counts'] = rle['counts'].decode('utf-8')
  return rles


def prediction_to_results(video_id: int, prediction: VideoPrediction,
                          category_ids: Optional[Sequence[int]] = None) -> list[dict]:
  """YouTube-VIS submission entries of one video.

  Args:
    video_id: dataset video id.
    prediction: from `VideoPredictor`.
    category_ids: dataset category id of each contiguous label (default: label + 1, the
      YouTube-VIS convention of ids 1..C).

  Returns:
    list of {video_id, score, category_id, segmentations} (one RLE per frame).
  """
  results = []
  for score, label, masks in zip(prediction.scores, prediction.labels, prediction.masks):
    label = int(label)
    if category_ids is not None and not 0 <= label < len(category_ids):
      raise ValueError(f'label {label} has no category id ({len(category_ids)} categories)')
    results.append({
        'video_id': int(video_id),
        'score': float(score),
        'category_id': int(category_ids[label]) if category_ids is not None else label + 1,
        'segmentations': encode_rle(masks),
    })
  return results


def run_inference(predictor: VideoPredictor, variables: Any, videos: Iterable[Mapping[str, Any]],
                  category_ids: Optional[Sequence[int]] = None,
                  on_video: Optional[Callable[[Mapping[str, Any], VideoPrediction], None]] = None
                  ) -> list[dict]:
  """Predicts every video of an evaluation dataset and returns the YouTube-VIS results list.

  Args:
    predictor: a `VideoPredictor`.
    variables: model variables.
    videos: per-video dicts with 'video_id', 'frames' uint8 [T, Hp, Wp, 3], and optionally
      'image_valid' [Hp, Wp], 'resized_size' (H, W) and 'orig_size' (H0, W0) (the evaluation
      dataset's examples).
    category_ids: dataset category id per contiguous label (see `prediction_to_results`).
    on_video: optional callback (video, prediction), e.g. for visualisation.

  Returns:
    The results list, ready for `json.dump` and `evaluate_ytvis`.
  """
  results = []
  for video in videos:
    for key in ('video_id', 'frames'):
      if key not in video:
        raise ValueError(f'video example lacks "{key}" (has {sorted(video)})')
    prediction = predictor(variables, video['frames'], image_valid=video.get('image_valid'),
                           image_size=video.get('resized_size'),
                           output_size=video.get('orig_size'))
    video_id = int(np.asarray(video['video_id']).reshape(-1)[0])
    results.extend(prediction_to_results(video_id, prediction, category_ids))
    if on_video is not None:
      on_video(video, prediction)
  return results
