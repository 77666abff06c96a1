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
when `window_size` is None or >= the video length. Otherwise it runs the model on windows of
`window_size` frames that overlap by `window_overlap` frames (the last window is shifted back to end
at the last frame, so every window has the same static shape and no frame is padded), and
`track_builder.TrackBuilder` turns the windows' queries into object tracks: a confident query that
continues no live track starts one, Hungarian association (query embeddings + mask agreement on
the shared frames) continues it, and it ends after missing `track_patience` windows; its mask is
empty where it is absent and its class probabilities are the mean over the windows where it is
present. Device memory stays bounded by the window size. Without association
(`associate=False`) query q of every window feeds track q (query-slot tracks).

`StreamingVideoPredictor` does the same on frames that arrive one at a time (a long video file):
it keeps the frames of one window and the live tracks (ended ones go to a spool file), and hands
the masks of every new frame, at the original size, with the tracks' ids, to a callback (for the
overlay).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from pycocotools import mask as mask_utils

from maskfreevis_jax.evaluation import track_builder

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


@functools.partial(jax.jit, static_argnames=("top_k",))
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
        f"top_k={top_k} exceeds the {num_queries} x {num_classes} (query, class) pairs"
    )
  scores, flat = jax.lax.top_k(probabilities.reshape(-1), top_k)
  return scores, (flat % num_classes).astype(jnp.int32), (flat // num_classes).astype(jnp.int32)


def _resize_matrix(
    mask_size: int, padded_size: int, image_size: int, output_size: int
) -> jax.Array:
  """[output_size, mask_size] linear map of upsample-to-padded, crop, resize along one axis.

  Both steps are `jax.image.resize` (bilinear, no antialiasing) applied to an identity matrix, so
  the composition is exactly the two resizes of the official code, done as one small matmul.
  """
  eye = jnp.eye(mask_size, dtype=jnp.float32)
  up = jax.image.resize(eye, (padded_size, mask_size), "bilinear", antialias=False)
  return jax.image.resize(up[:image_size], (output_size, mask_size), "bilinear", antialias=False)


@functools.partial(jax.jit, static_argnames=("padded_size", "image_size", "output_size"))
def masks_to_original_size(
    mask_logits: jax.Array,
    padded_size: tuple[int, int],
    image_size: tuple[int, int],
    output_size: tuple[int, int],
) -> jax.Array:
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
  x = jnp.einsum("kthw,Ww->kthW", x, cols, precision=hi)
  x = jnp.einsum("Hh,kthW->ktHW", rows, x, precision=hi)
  return x > 0


def postprocess_video(
    pred_logits: jax.Array,
    pred_masks: jax.Array,
    *,
    image_size: tuple[int, int],
    output_size: tuple[int, int],
    padded_size: tuple[int, int] | None = None,
    top_k: int = 10,
):
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
    raise ValueError(
        f"pred_logits must be [Q, C+1] and pred_masks [Q, T, h, w] with the same Q; "
        f"got {pred_logits.shape} and {pred_masks.shape}"
    )
  padded_size = _padded_size(pred_masks, padded_size)
  scores, labels, queries = select_top_predictions(class_probabilities(pred_logits), top_k)
  masks = masks_to_original_size(
      jnp.take(pred_masks, queries, axis=0),
      padded_size,
      _check_size(image_size, padded_size),
      _as_size(output_size),
  )
  return scores, labels, masks


def _as_size(size) -> tuple[int, int]:
  size = tuple(int(s) for s in np.asarray(size).reshape(-1))
  if len(size) != 2 or min(size) <= 0:
    raise ValueError(f"expected a (height, width) pair of positive ints, got {size}")
  return size


def _padded_size(pred_masks, padded_size) -> tuple[int, int]:
  if padded_size is None:
    return (4 * pred_masks.shape[-2], 4 * pred_masks.shape[-1])
  return _as_size(padded_size)


def _check_size(image_size, padded_size) -> tuple[int, int]:
  image_size = _as_size(image_size)
  if image_size[0] > padded_size[0] or image_size[1] > padded_size[1]:
    raise ValueError(f"image_size {image_size} exceeds the padded input size {padded_size}")
  return image_size


def valid_size(image_valid: np.ndarray) -> tuple[int, int]:
  """(H, W) of the real image in a top-left aligned padding mask [Hp, Wp]."""
  image_valid = np.asarray(image_valid, bool)
  if image_valid.ndim != 2:
    raise ValueError(f"image_valid must be [H, W], got shape {image_valid.shape}")
  rows, cols = np.flatnonzero(image_valid.any(1)), np.flatnonzero(image_valid.any(0))
  if rows.size == 0:
    raise ValueError("image_valid has no valid pixel")
  return int(rows[-1]) + 1, int(cols[-1]) + 1


def window_starts(num_frames: int, window_size: int | None, overlap: int = 0) -> list[int]:
  """Start frames of the windows covering a video.

  Consecutive windows share `overlap` frames; the last window is shifted back to end at the last
  frame (it may then share more).

  Args:
    num_frames: video length T.
    window_size: frames per window; None or >= T: one window [0].
    overlap: frames shared by consecutive windows, in [0, window_size).

  Returns:
    The sorted window starts.
  """
  if num_frames <= 0:
    raise ValueError(f"a video needs at least one frame, got {num_frames}")
  if window_size is None or window_size >= num_frames:
    return [0]
  _check_window(window_size, overlap)
  starts = list(range(0, num_frames - window_size + 1, window_size - overlap))
  if starts[-1] + window_size < num_frames:
    starts.append(num_frames - window_size)
  return starts


def _check_window(window_size: int | None, overlap: int) -> None:
  if window_size is None:
    return
  if window_size <= 0:
    raise ValueError(f"window_size must be positive, got {window_size}")
  if not 0 <= overlap < window_size:
    raise ValueError(f"window_overlap must be in [0, window_size={window_size}), got {overlap}")


@jax.jit
def association_cost(
    track_embeds: jax.Array,
    track_masks: jax.Array,
    query_embeds: jax.Array,
    query_masks: jax.Array,
    embed_weight: float = 1.0,
    mask_weight: float = 1.0,
) -> jax.Array:
  """Cost of continuing each track with each query of the next window.

  cost = embed_weight * (1 - cosine(track, query)) + mask_weight * (1 - soft Dice), the Dice of
  the sigmoid masks over the frames both windows cover (no mask term when they share none).

  Args:
    track_embeds: [N, D] query embeddings of the tracks in the previous window.
    track_masks: [N, O, h, w] their mask logits on the O shared frames.
    query_embeds: [Q, D] query embeddings of the next window.
    query_masks: [Q, O, h, w] its mask logits on the same frames.
    embed_weight: weight of the embedding term.
    mask_weight: weight of the mask term.

  Returns:
    float32 [N, Q].
  """

  def unit(x):
    x = x.astype(jnp.float32)
    return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)

  hi = jax.lax.Precision.HIGHEST
  cost = embed_weight * (1.0 - jnp.matmul(unit(track_embeds), unit(query_embeds).T, precision=hi))
  if track_masks.shape[1]:
    a = jax.nn.sigmoid(track_masks.astype(jnp.float32)).reshape(track_masks.shape[0], -1)
    b = jax.nn.sigmoid(query_masks.astype(jnp.float32)).reshape(query_masks.shape[0], -1)
    dice = (2.0 * jnp.matmul(a, b.T, precision=hi) + 1.0) / (
        a.sum(-1)[:, None] + b.sum(-1)[None, :] + 1.0
    )
    cost = cost + mask_weight * (1.0 - dice)
  return cost


_hungarian = jax.jit(optax.assignment.hungarian_algorithm)


def associate_queries(
    track_embeds: np.ndarray,
    track_masks: np.ndarray,
    query_embeds: np.ndarray,
    query_masks: np.ndarray,
    *,
    embed_weight: float = 1.0,
    mask_weight: float = 1.0,
) -> np.ndarray:
  """Hungarian matching of the next window's queries to the current tracks.

  Args:
    track_embeds, track_masks, query_embeds, query_masks: as `association_cost` (N == Q).
    embed_weight, mask_weight: cost weights.

  Returns:
    int32 [N]: the query of the next window that continues each track.
  """
  if track_embeds.shape != query_embeds.shape or track_masks.shape != query_masks.shape:
    raise ValueError(
        f"tracks {track_embeds.shape} / {track_masks.shape} and queries "
        f"{query_embeds.shape} / {query_masks.shape} must have equal shapes"
    )
  cost = association_cost(
      track_embeds, track_masks, query_embeds, query_masks, embed_weight, mask_weight
  )
  rows, cols = _hungarian(cost)
  order = np.zeros(cost.shape[0], np.int32)
  order[np.asarray(rows)] = np.asarray(cols)
  return order


def _make_forward(apply_fn: ApplyFn, with_embeds: bool):
  """The jitted forward pass; shared by the predictors of one apply_fn (no recompilation)."""
  try:
    return _cached_forward(apply_fn, with_embeds)
  except TypeError:  # an unhashable apply_fn
    return _build_forward(apply_fn, with_embeds)


def _build_forward(apply_fn: ApplyFn, with_embeds: bool):
  def forward(variables, frames, image_valid):
    outputs = apply_fn(variables, frames, image_valid=image_valid)
    # Only the final prediction of the single clip leaves the device.
    embeds = None
    if with_embeds:
      if "pred_embeds" not in outputs:
        raise ValueError(
            "associate=True needs the model output 'pred_embeds' [B, Q, D] (have "
            f"{sorted(outputs)})"
        )
      embeds = outputs["pred_embeds"][0]
    return (
        class_probabilities(outputs["pred_logits"][-1, 0]),
        outputs["pred_masks"][-1, 0],
        embeds,
    )

  return jax.jit(forward)


_cached_forward = functools.lru_cache(maxsize=8)(_build_forward)


def masks_in_chunks(
    mask_logits: np.ndarray,
    padded_size: tuple[int, int],
    image_size: tuple[int, int],
    output_size: tuple[int, int],
    frame_chunk: int,
) -> Iterator[tuple[int, np.ndarray]]:
  """`masks_to_original_size` over at most `frame_chunk` frames per device call.

  Every call has the static shape [K, frame_chunk, h, w] (a shorter last chunk is padded with
  frames that are dropped), so videos and windows of any length compile it once.

  Args:
    mask_logits: [K, T, h, w] mask logits.
    padded_size, image_size, output_size: as `masks_to_original_size`.
    frame_chunk: frames per call.

  Yields:
    (first frame index, bool [K, n, H0, W0] masks of frames [first, first + n)), in frame order.
  """
  num_frames = mask_logits.shape[1]
  for start in range(0, num_frames, frame_chunk):
    chunk = mask_logits[:, start : start + frame_chunk]
    size = chunk.shape[1]
    if size < frame_chunk:
      chunk = np.pad(chunk, ((0, 0), (0, frame_chunk - size), (0, 0), (0, 0)))
    masks = masks_to_original_size(chunk, padded_size, image_size, output_size)
    yield start, np.asarray(masks)[:, :size]


@dataclasses.dataclass
class _VideoState:
  """One video on its way through the windows.

  Attributes:
    image_valid, image_size, output_size: the checked geometry (`_check_geometry`), set by the
      first frame.
    builder: the tracks across windows.
    frame_shape: (Hp, Wp, 3) of every frame.
    num_frames: frames read so far.
  """

  image_valid: np.ndarray | None
  image_size: Sequence[int] | None
  output_size: Sequence[int] | None
  builder: track_builder.TrackBuilder
  frame_shape: tuple[int, ...] | None = None
  num_frames: int = 0

  def add_frame(self, frame: np.ndarray) -> np.ndarray:
    """Checks the next uint8 [Hp, Wp, 3] frame (the first one fixes the geometry)."""
    frame = np.asarray(frame)
    if self.frame_shape is None:
      if frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"frame 0 must be [H, W, 3], got shape {frame.shape}")
      self.image_valid, self.image_size, self.output_size = _check_geometry(
          frame.shape[:2], self.image_valid, self.image_size, self.output_size
      )
      self.frame_shape = frame.shape
    elif frame.shape != self.frame_shape:
      raise ValueError(
          f"frame {self.num_frames} has shape {frame.shape}, frame 0 {self.frame_shape}"
      )
    self.num_frames += 1
    return frame

  @property
  def padded_size(self) -> tuple[int, int]:
    return tuple(self.frame_shape[:2])


@dataclasses.dataclass(frozen=True)
class _Window:
  """One model call: window [start, start + W) of the video.

  Attributes:
    start: first frame.
    probabilities: float32 [Q, C] class probabilities.
    mask_logits: float32 [Q, W, h, w].
    embeds: float32 [Q, D] query embeddings, or None.
    last: whether it is the video's last window.
  """

  start: int
  probabilities: np.ndarray
  mask_logits: np.ndarray
  embeds: np.ndarray | None
  last: bool


def _with_lookahead(frames: Iterable[np.ndarray]) -> Iterator[tuple[np.ndarray, bool]]:
  """(frame, whether it is the last one): a window knows whether the video goes on."""
  iterator = iter(frames)
  sentinel = object()
  frame = next(iterator, sentinel)
  while frame is not sentinel:
    following = next(iterator, sentinel)
    yield frame, following is sentinel
    frame = following


def _rle_counts(masks: np.ndarray) -> list[list[bytes]]:
  """Compressed RLE counts of bool [N, n, H0, W0] masks: per track, its n frames."""
  counts = []
  for track_masks in masks:
    encoded = mask_utils.encode(np.asfortranarray(track_masks.transpose(1, 2, 0), dtype=np.uint8))
    counts.append([r["counts"] for r in encoded])
  return counts


def _pad_rows(x: np.ndarray, multiple: int) -> np.ndarray:
  """Pads axis 0 to a multiple of `multiple` (the resize then compiles for few track counts)."""
  rows = -(-max(x.shape[0], 1) // multiple) * multiple
  return np.pad(x, ((0, rows - x.shape[0]),) + ((0, 0),) * (x.ndim - 1))


def _top_track_pairs(scores: np.ndarray, top_k: int):
  """Top (track, class) pairs of float32 [N, C] scores, as `select_top_predictions` ranks them
  (decreasing score, ties to the lower flat index): scores [K], labels [K], tracks [K]."""
  flat = scores.reshape(-1)
  order = np.argsort(-flat, kind="stable")[: min(top_k, flat.size)]
  num_classes = scores.shape[1]
  return (
      flat[order].astype(np.float32),
      (order % num_classes).astype(np.int32),
      (order // num_classes).astype(np.int32),
  )


# Called with (first frame index, bool [N, n, H0, W0] masks of the N tracks present in the
# frames [first, first + n), int [N] their track ids, float32 [N, C] their class probabilities
# so far). A new id is a new track (draw it in a new colour).
FramesCallback = Callable[[int, np.ndarray, np.ndarray, np.ndarray], None]


class VideoPredictor:
  """Runs a VideoMaskFormer on whole videos (or windows of them) and post-processes the output.

  Build it once and call it on every video: the model and post-processing functions are compiled
  once per distinct input / window / output shape. A video that fits in one window runs whole
  (the official inference); a longer one runs in windows whose queries `TrackBuilder` turns into
  object tracks (`_track_windows`, shared with `StreamingVideoPredictor`).

  Example:
    model = build_model(config.model)
    predictor = VideoPredictor(model.apply, window_size=None)
    prediction = predictor(variables, video['frames'], image_valid=video['image_valid'],
                           output_size=video['orig_size'])
  """

  def __init__(
      self,
      apply_fn: ApplyFn,
      *,
      window_size: int | None = None,
      window_overlap: int = 0,
      associate: bool = False,
      association_embed_weight: float = 1.0,
      association_mask_weight: float = 1.0,
      track_birth_score: float = 0.5,
      track_keep_score: float = 0.2,
      track_max_cost: float = 1.0,
      track_patience: int = 2,
      top_k: int = 10,
      track_top_k: int | None = None,
      frame_chunk: int = 8,
  ):
    """Initialises the predictor.

    Args:
      apply_fn: `model.apply`-like function `(variables, frames [B, T, H, W, 3], image_valid=...)`
        returning `pred_logits` [L, B, Q, C + 1] and `pred_masks` [L, B, Q, T, H/4, W/4] (and
        `pred_embeds` [B, Q, D] when associating windows).
      window_size: frames per model call; None runs the whole video at once (official).
      window_overlap: frames shared by consecutive windows, in [0, window_size).
      associate: object tracks across windows (`track_builder`); False keeps query q on track q.
        Unused without windows.
      association_embed_weight: weight of the query-embedding cosine distance.
      association_mask_weight: weight of the mask disagreement on the shared frames.
      track_birth_score: least best-class probability of a query that starts a track.
      track_keep_score: least best-class probability of a query that continues a track.
      track_max_cost: largest association cost of a continuation.
      track_patience: windows a track may miss before it ends.
      top_k: predictions kept per video (official 10) when it runs as one window (or with query-slot
        tracks, which are Q like the queries of one window).
      track_top_k: (track, class) pairs kept per video of object tracks over several windows
        (their count grows with the video's length); None: top_k.
      frame_chunk: frames resized to the original size per device call (bounds memory).
    """
    if frame_chunk <= 0:
      raise ValueError(f"frame_chunk must be positive, got {frame_chunk}")
    _check_window(window_size, window_overlap)
    self.window_size = window_size
    self.window_overlap = window_overlap
    self.associate = associate
    self.track_settings = track_builder.TrackSettings(
        associate=associate,
        embed_weight=association_embed_weight,
        mask_weight=association_mask_weight,
        birth_score=track_birth_score,
        keep_score=track_keep_score,
        max_cost=track_max_cost,
        patience=track_patience,
    )
    self.top_k = top_k
    self.track_top_k = top_k if track_top_k is None else track_top_k
    if self.track_top_k <= 0:
      raise ValueError(f"track_top_k must be positive, got {self.track_top_k}")
    self.frame_chunk = frame_chunk
    self._forward = _make_forward(apply_fn, associate and window_size is not None)

  @classmethod
  def from_config(
      cls, apply_fn: ApplyFn, eval_config: ml_collections.ConfigDict, **kwargs
  ) -> VideoPredictor:
    """A predictor with `config.eval`'s window_size (0: whole video), window_overlap, associate,
    association weights, track rules, top_k and track_top_k; `kwargs` override them."""
    settings = dict(
        window_size=int(eval_config.window_size) or None,
        window_overlap=int(eval_config.window_overlap),
        associate=bool(eval_config.associate),
        association_embed_weight=float(eval_config.association_embed_weight),
        association_mask_weight=float(eval_config.association_mask_weight),
        track_birth_score=float(eval_config.track_birth_score),
        track_keep_score=float(eval_config.track_keep_score),
        track_max_cost=float(eval_config.track_max_cost),
        track_patience=int(eval_config.track_patience),
        top_k=int(eval_config.top_k),
        track_top_k=int(eval_config.track_top_k),
    )
    return cls(apply_fn, **{**settings, **kwargs})

  def _new_video(self, image_valid, image_size, output_size) -> _VideoState:
    builder = track_builder.TrackBuilder(self.track_settings)
    return _VideoState(image_valid, image_size, output_size, builder)

  def _windows(
      self, variables: Any, frames: Iterable[np.ndarray], video: _VideoState
  ) -> Iterator[_Window]:
    """Runs the model on the windows of a stream of frames.

    Keeps only the frames of one window: a window runs as soon as its last frame arrives; the
    last window ends at the last frame (`window_starts`).

    Args:
      variables: model variables.
      frames: iterable of uint8 [Hp, Wp, 3] frames.
      video: the video's state (geometry, frame count), updated as frames come.

    Yields:
      The windows, in frame order; together they cover every frame.
    """
    buffer = collections.deque(maxlen=self.window_size)
    next_end = self.window_size  # None: one window of the whole video
    for frame, last in _with_lookahead(frames):
      buffer.append(video.add_frame(frame))
      if last or (next_end is not None and video.num_frames == next_end):
        yield self._run_window(variables, video, np.stack(buffer), last)
        next_end = None if next_end is None else next_end + self.window_size - self.window_overlap
    if video.num_frames == 0:
      raise ValueError("the video has no frames")

  def _run_window(
      self, variables: Any, video: _VideoState, window_frames: np.ndarray, last: bool
  ) -> _Window:
    """The model on uint8 [W, Hp, Wp, 3] frames ending at the latest one."""
    model_valid = None if video.image_valid is None else video.image_valid[None]
    probabilities, mask_logits, embeds = self._forward(variables, window_frames[None], model_valid)
    mask_logits = np.asarray(mask_logits)
    _model_padded_size(mask_logits, video.padded_size)
    return _Window(
        start=video.num_frames - len(window_frames),
        probabilities=np.asarray(probabilities, np.float32),
        mask_logits=mask_logits,
        embeds=None if embeds is None else np.asarray(embeds),
        last=last,
    )

  def _track_windows(
      self,
      variables: Any,
      frames: Iterable[np.ndarray],
      video: _VideoState,
      on_frames: FramesCallback | None = None,
  ) -> track_builder.ClosedTracks:
    """The windows' object tracks, with one RLE per track and present frame (`TrackBuilder`).

    Masks are resized to the original size for the tracks present in each window's new frames
    only, then RLE-encoded; `on_frames` sees them in frame order.

    Returns:
      All tracks of the video (ended).
    """
    builder = video.builder
    for window in self._windows(variables, frames, video):
      first, tracks, logits = builder.add(
          window.start, window.probabilities, window.mask_logits, window.embeds, window.last
      )
      track_ids = np.asarray([t.track_id for t in tracks], np.int64)
      scores = np.stack([t.scores for t in tracks]) if tracks else window.probabilities[:0]
      padded = _pad_rows(logits, 8)
      for offset, masks in masks_in_chunks(
          padded, video.padded_size, video.image_size, video.output_size, self.frame_chunk
      ):
        masks = masks[: len(tracks)]
        for track, counts in zip(tracks, _rle_counts(masks)):
          track.add_rles(first + offset, counts)
        if on_frames is not None:
          on_frames(first + offset, masks, track_ids, scores)
    return builder.finish()

  def _pairs_kept(self, builder: track_builder.TrackBuilder) -> int:
    """(track, class) pairs a video keeps: track_top_k for object tracks over several windows
    (open-ended in number), the official top_k for one window or query-slot tracks."""
    if self.associate and builder.num_windows > 1:
      return self.track_top_k
    return self.top_k

  def _tracks_prediction(self, video: _VideoState, closed: track_builder.ClosedTracks):
    """(scores [K], labels [K], track ids [K], K lists of T RLE dicts, scores [N, C] of all)."""
    num_classes = next(iter(closed.scores.values())).shape[0] if closed.scores else 1
    all_scores = np.zeros((len(closed.scores), num_classes), np.float32)
    for track_id, track_scores in closed.scores.items():
      all_scores[track_id] = track_scores
    scores, labels, tracks = _top_track_pairs(all_scores, self._pairs_kept(video.builder))
    size = [int(s) for s in video.output_size]
    empty = mask_utils.encode(np.zeros((*size, 1), np.uint8, order="F"))[0]["counts"].decode()
    segmentations = [
        [{"size": size, "counts": c} for c in closed.rles(int(t), video.num_frames, empty)]
        for t in tracks
    ]
    closed.close()
    return scores, labels, tracks, segmentations, all_scores

  def __call__(
      self,
      variables: Any,
      frames: np.ndarray,
      *,
      image_valid: np.ndarray | None = None,
      image_size: Sequence[int] | None = None,
      output_size: Sequence[int] | None = None,
  ) -> VideoPrediction:
    """Predicts one video.

    Args:
      variables: model variables.
      frames: uint8 [T, Hp, Wp, 3] (or [1, T, Hp, Wp, 3]) RGB frames, padded to the model size.
      image_valid: optional bool [Hp, Wp] (or [1, Hp, Wp]) padding mask given to the model; also
        gives `image_size` when that is None.
      image_size: (H, W) resized frame before padding; default from image_valid, else (Hp, Wp).
      output_size: (H0, W0) original video size; default image_size.

    Returns:
      The top-k predictions with masks at the original size; `query_indices` are the queries
      of a whole video, the track ids of a windowed one.
    """
    frames = np.asarray(frames)
    if frames.ndim == 5 and frames.shape[0] == 1:
      frames = frames[0]
    if frames.ndim != 4 or frames.shape[-1] != 3:
      raise ValueError(f"frames must be [T, H, W, 3], got shape {frames.shape}")
    video = self._new_video(image_valid, image_size, output_size)
    if self.window_size is not None and self.window_size < len(frames):
      scores, labels, tracks, segmentations, _ = self._tracks_prediction(
          video, self._track_windows(variables, frames, video)
      )
      masks = np.zeros((len(tracks), video.num_frames, *video.output_size), bool)
      for k, rles in enumerate(segmentations):
        masks[k] = mask_utils.decode(rles).transpose(2, 0, 1)
      return VideoPrediction(scores, labels, masks, tracks)
    (window,) = self._windows(variables, frames, video)
    scores, labels, queries = (
        np.asarray(x) for x in select_top_predictions(jnp.asarray(window.probabilities), self.top_k)
    )
    masks = np.zeros((len(queries), video.num_frames, *video.output_size), bool)
    for start, chunk in masks_in_chunks(
        window.mask_logits[queries],
        video.padded_size,
        video.image_size,
        video.output_size,
        self.frame_chunk,
    ):
      masks[:, start : start + chunk.shape[1]] = chunk
    return VideoPrediction(
        scores=scores.astype(np.float32),
        labels=labels.astype(np.int32),
        masks=masks,
        query_indices=queries.astype(np.int32),
    )


def _check_geometry(padded_size, image_valid, image_size, output_size):
  """Validated (image_valid [Hp, Wp] or None, image_size, output_size)."""
  if image_valid is not None:
    image_valid = np.asarray(image_valid, bool)
    if image_valid.ndim == 3 and image_valid.shape[0] == 1:
      image_valid = image_valid[0]
    if image_valid.shape != tuple(padded_size):
      raise ValueError(
          f"image_valid shape {image_valid.shape} does not match the frames "
          f"{tuple(padded_size)}"
      )
  if image_size is None:
    image_size = valid_size(image_valid) if image_valid is not None else tuple(padded_size)
  image_size = _check_size(image_size, tuple(padded_size))
  output_size = _as_size(output_size if output_size is not None else image_size)
  return image_valid, image_size, output_size


def _model_padded_size(mask_logits: np.ndarray, padded_size: tuple[int, int]) -> tuple[int, int]:
  model_size = (4 * mask_logits.shape[-2], 4 * mask_logits.shape[-1])
  if model_size != tuple(padded_size):
    raise ValueError(
        f"model masks {mask_logits.shape[-2:]} are not 1/4 of the input {tuple(padded_size)}"
    )
  return model_size


@dataclasses.dataclass
class StreamedPrediction:
  """Predictions of a streamed video: per-frame compressed RLEs instead of dense masks.

  Attributes:
    scores: float32 [K] class probabilities, decreasing.
    labels: int32 [K] contiguous class indices in [0, C).
    track_indices: int32 [K] the track (id) each prediction comes from.
    segmentations: K lists of T compressed RLEs ({'size': [H0, W0], 'counts': str}); empty
      masks where the track is absent.
    track_scores: float32 [N, C] class probabilities of every track (row = track id).
    num_frames: T.
  """

  scores: np.ndarray
  labels: np.ndarray
  track_indices: np.ndarray
  segmentations: list[list[dict]]
  track_scores: np.ndarray
  num_frames: int


class StreamingVideoPredictor(VideoPredictor):
  """`VideoPredictor` for frames that arrive one by one (videos too long to hold in memory).

  Keeps the frames of one window, what association needs of each live track (its embedding and
  last window's mask logits) and, per live track and frame, the compressed RLE of its mask at the
  original size; ended tracks go to a spool file. The results equal `VideoPredictor`'s with the
  same settings.

  Example:
    predictor = StreamingVideoPredictor(model.apply, window_size=36, window_overlap=4,
                                        associate=True)
    prediction = predictor(variables, padded_frame_iterator, image_valid=valid,
                           image_size=(h, w), output_size=(h0, w0), on_frames=draw)
  """

  def __call__(
      self,
      variables: Any,
      frames: Iterable[np.ndarray],
      *,
      image_valid: np.ndarray | None = None,
      image_size: Sequence[int] | None = None,
      output_size: Sequence[int] | None = None,
      on_frames: FramesCallback | None = None,
  ) -> StreamedPrediction:
    """Predicts a video given as an iterable of padded frames.

    Args:
      variables: model variables.
      frames: iterable of uint8 [Hp, Wp, 3] frames, all of one size (read lazily).
      image_valid: optional bool [Hp, Wp] padding mask.
      image_size: (H, W) resized frame before padding; default from image_valid, else (Hp, Wp).
      output_size: (H0, W0) original video size; default image_size.
      on_frames: optional callback (`FramesCallback`), called in frame order once each frame's
        masks are final.

    Returns:
      The top-k predictions (track, class) with per-frame RLEs.
    """
    video = self._new_video(image_valid, image_size, output_size)
    closed = self._track_windows(variables, frames, video, on_frames)
    scores, labels, tracks, segmentations, all_scores = self._tracks_prediction(video, closed)
    return StreamedPrediction(
        scores=scores,
        labels=labels,
        track_indices=tracks,
        segmentations=segmentations,
        track_scores=all_scores,
        num_frames=video.num_frames,
    )


def predict_video(
    apply_fn: ApplyFn,
    variables: Any,
    frames: np.ndarray,
    window_size: int | None = None,
    *,
    image_valid: np.ndarray | None = None,
    image_size: Sequence[int] | None = None,
    output_size: Sequence[int] | None = None,
    top_k: int = 10,
    frame_chunk: int = 8,
) -> VideoPrediction:
  """One-off prediction of a video; see `VideoPredictor` (reuse one for many videos)."""
  predictor = VideoPredictor(
      apply_fn, window_size=window_size, top_k=top_k, frame_chunk=frame_chunk
  )
  return predictor(
      variables, frames, image_valid=image_valid, image_size=image_size, output_size=output_size
  )


def encode_rle(masks: np.ndarray) -> list[dict]:
  """Compressed RLEs ({'size': [H, W], 'counts': str}) of bool masks [T, H, W], one per frame."""
  masks = np.asarray(masks)
  if masks.ndim != 3:
    raise ValueError(f"masks must be [T, H, W], got shape {masks.shape}")
  rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
  for rle in rles:
    rle["counts"] = rle["counts"].decode("utf-8")
  return rles


def prediction_to_results(
    video_id: int,
    prediction: VideoPrediction | StreamedPrediction,
    category_ids: Sequence[int] | None = None,
) -> list[dict]:
  """YouTube-VIS submission entries of one video.

  Args:
    video_id: dataset video id.
    prediction: from `VideoPredictor` or `StreamingVideoPredictor`.
    category_ids: dataset category id of each contiguous label (default: label + 1, the
      YouTube-VIS convention of ids 1..C).

  Returns:
    list of {video_id, score, category_id, segmentations} (one RLE per frame).
  """
  if isinstance(prediction, StreamedPrediction):
    segmentations = prediction.segmentations
  else:
    segmentations = (encode_rle(masks) for masks in prediction.masks)
  results = []
  for score, label, segmentation in zip(prediction.scores, prediction.labels, segmentations):
    label = int(label)
    if category_ids is not None and not 0 <= label < len(category_ids):
      raise ValueError(f"label {label} has no category id ({len(category_ids)} categories)")
    results.append(
        {
            "video_id": int(video_id),
            "score": float(score),
            "category_id": int(category_ids[label]) if category_ids is not None else label + 1,
            "segmentations": segmentation,
        }
    )
  return results


def run_inference(
    predictor: VideoPredictor,
    variables: Any,
    videos: Iterable[Mapping[str, Any]],
    category_ids: Sequence[int] | None = None,
    on_video: Callable[[Mapping[str, Any], VideoPrediction], None] | None = None,
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
    for key in ("video_id", "frames"):
      if key not in video:
        raise ValueError(f'video example lacks "{key}" (has {sorted(video)})')
    prediction = predictor(
        variables,
        video["frames"],
        image_valid=video.get("image_valid"),
        image_size=video.get("resized_size"),
        output_size=video.get("orig_size"),
    )
    video_id = int(np.asarray(video["video_id"]).reshape(-1)[0])
    results.extend(prediction_to_results(video_id, prediction, category_ids))
    if on_video is not None:
      on_video(video, prediction)
  return results
