"""Evaluation videos: whole videos of a split, resized to the test size, this host's share."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import ml_collections
import numpy as np

from maskfreevis_jax.data import clips
from maskfreevis_jax.data import sources
from maskfreevis_jax.data import transforms
from maskfreevis_jax.data import ytvis_json


def _annotations(
    video: ytvis_json.Video,
    transform: transforms.ClipTransform,
    out_hw: tuple[int, int],
    pad_hw: tuple[int, int],
    with_masks: bool,
) -> dict[str, np.ndarray]:
  """The video's non-crowd tracks on its resized frames.

  Returns:
    boxes float32 [N, L, 4] (resized pixels), box_valid bool [N, L], labels int32 [N],
    track_ids int32 [N], instance_valid bool [N]; with `with_masks`, masks uint8
    [N, L, PH, PW] (zero for a track without segmentations).
  """
  tracks = [t for t in video.tracks if not t.iscrowd]
  n = len(tracks)
  boxes = np.zeros((n, video.length, 4), np.float32)
  valid = np.zeros((n, video.length), bool)
  for k, t in enumerate(tracks):
    boxes[k], valid[k] = t.boxes, t.box_valid
  boxes = transform.apply_boxes(boxes)
  valid &= transforms.nonempty_boxes(boxes)
  out = dict(
      boxes=np.where(valid[..., None], boxes, 0).astype(np.float32),
      box_valid=valid,
      labels=np.array([t.label for t in tracks], np.int32),
      track_ids=np.array([t.id for t in tracks], np.int32),
      instance_valid=np.ones((n,), bool),
  )
  if with_masks:
    masks = np.zeros((n, video.length) + pad_hw, np.uint8)
    for k, t in enumerate(tracks):
      if t.segmentations is None:
        continue
      for f in range(video.length):
        m = ytvis_json.decode_segmentation(t.segmentations[f], video.height, video.width)
        masks[k, f, : out_hw[0], : out_hw[1]] = transform.apply_mask(m)
    out["masks"] = masks
  return out


class EvalDataset:
  """Whole videos for evaluation (this host's share), resized to the test size.

  Iterating yields one dict per video:
    frames uint8 [L, PH, PW, 3]; image_valid bool [PH, PW]; video_id int;
    orig_size int32 [2]; resized_size int32 [2] (before padding); frame_index int32 [L];
    file_names list[str];
    with annotations: boxes float32 [N, L, 4] (resized pixels), box_valid [N, L], labels,
    track_ids, instance_valid [N]; and ``masks`` uint8 [N, L, PH, PW] when ``with_masks``.
  ``dataset`` (for JSON sources) gives the original annotations for the evaluator.
  """

  def __init__(
      self,
      config: ml_collections.ConfigDict,
      split: str = "valid",
      with_annotations: bool | None = None,
      with_masks: bool | None = None,
      process_index: int | None = None,
      process_count: int | None = None,
  ):
    """Opens the videos of `split`.

    Args:
      config: the full config; ``config.data`` names the source and the test size.
      split: 'valid' or 'train'.
      with_annotations: yield the ground truth (default: when the split has any).
      with_masks: yield ground-truth masks too (default: `with_annotations`).
      process_index, process_count: this host and the host count (default: jax's).
    """
    clips.check_clip_config(config)
    self.config = config
    self.source = sources.open_video_source(config, split)
    self.dataset = getattr(self.source, "dataset", None)
    self.class_names = self.source.class_names
    has_ann = any(v.tracks for v in (self.source.video(i) for i in range(len(self.source))))
    self.with_annotations = has_ann if with_annotations is None else with_annotations
    self.with_masks = self.with_annotations if with_masks is None else with_masks
    if process_index is None or process_count is None:
      import jax  # pylint: disable=g-import-not-at-top

      process_index, process_count = jax.process_index(), jax.process_count()
    self.indices = list(range(process_index, len(self.source), process_count))

  def __len__(self) -> int:
    return len(self.indices)

  def __iter__(self) -> Iterator[dict[str, Any]]:
    for i in self.indices:
      yield self.video_example(i)

  def video_example(self, index: int) -> dict[str, Any]:
    """Video ``index`` of the source (all hosts' numbering), as the class docstring says."""
    data = self.config.data
    video = self.source.video(index)
    out_hw = transforms.resized_shape(
        video.height,
        video.width,
        data.min_size_test,
        data.max_size_test,
        canvas=tuple(data.eval_pad_size) or None,
    )
    pad_hw = (
        tuple(int(v) for v in data.eval_pad_size)
        if data.eval_pad_size
        else (transforms.round_up(out_hw[0]), transforms.round_up(out_hw[1]))
    )
    transform = transforms.ClipTransform((video.height, video.width), out_hw, flip=False)
    frame_idx = np.arange(video.length, dtype=np.int32)
    frames = np.stack([transform.apply_image(f) for f in self.source.read_frames(index, frame_idx)])
    frames, image_valid = transforms.pad_frames(frames, pad_hw)
    out = dict(
        frames=frames,
        image_valid=image_valid,
        video_id=video.id,
        orig_size=np.array([video.height, video.width], np.int32),
        resized_size=np.array(out_hw, np.int32),
        frame_index=frame_idx,
        file_names=list(video.file_names),
    )
    if self.with_annotations:
      out.update(_annotations(video, transform, out_hw, pad_hw, self.with_masks))
    return out


def create_eval_dataset(
    config: ml_collections.ConfigDict,
    split: str = "valid",
    with_annotations: bool | None = None,
    with_masks: bool | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> EvalDataset:
  """Evaluation videos of `split` (see `EvalDataset`); ``config`` is the full config."""
  return EvalDataset(config, split, with_annotations, with_masks, process_index, process_count)
