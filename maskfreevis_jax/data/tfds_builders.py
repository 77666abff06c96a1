"""TFDS builder for YouTube-VIS style datasets from a local folder (nothing is downloaded).

One example per video: JPEG frames, per-track boxes/classes/ids and compressed RLE masks.
Builder configs give the folder layout of each release inside ``manual_dir``:

=============  ==============================================================
ytvis_2019     train.json + train/JPEGImages, valid.json + valid/JPEGImages
ytvis_2021     same layout as ytvis_2019 (the official folder is ytvis_2021/)
ovis           annotations_train.json + train, annotations_valid.json + valid
synthetic      the output of `maskfreevis_jax.data.synthetic.generate`
=============  ==============================================================

Build (array_record gives the random access the pipeline needs)::

  python -m maskfreevis_jax.data.build_tfds --config=ytvis_2019 \
      --manual_dir=/path/to/ytvis_2019 --data_dir=/path/to/tfds

or from Python with `build_dataset` (other layouts: ``splits={...}``). The ``tfds build
data/maskfreevis_vis ...`` command line works too where apache_beam is installed (the tfds
CLI imports it; it is not in requirements.txt).
"""

from __future__ import annotations

import functools
import os
from typing import Any
from collections.abc import Sequence

from absl import logging
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from maskfreevis_jax.data import transforms
from maskfreevis_jax.data import ytvis_json

BUILDER_NAME = "maskfreevis_vis"


class VisBuilderConfig(tfds.core.BuilderConfig):
  """Folder layout: ``splits[name] = (json file, image root)`` relative to manual_dir."""

  def __init__(self, *, splits: dict[str, tuple[str, str]], **kwargs):
    super().__init__(version=tfds.core.Version("1.0.0"), **kwargs)
    self.splits = dict(splits)


_YTVIS_LAYOUT = {
    "train": ("train.json", "train/JPEGImages"),
    "valid": ("valid.json", "valid/JPEGImages"),
}


class MaskfreevisVis(tfds.core.GeneratorBasedBuilder):
  """YouTube-VIS 2019/2021, OVIS and the synthetic set, from local files."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [
      VisBuilderConfig(
          name="ytvis_2019", splits=_YTVIS_LAYOUT, description="YouTube-VIS 2019 (40 classes)"
      ),
      VisBuilderConfig(
          name="ytvis_2021", splits=_YTVIS_LAYOUT, description="YouTube-VIS 2021 (40 classes)"
      ),
      VisBuilderConfig(
          name="ovis",
          splits={
              "train": ("annotations_train.json", "train"),
              "valid": ("annotations_valid.json", "valid"),
          },
          description="OVIS (25 classes)",
      ),
      VisBuilderConfig(
          name="synthetic", splits=_YTVIS_LAYOUT, description="maskfreevis_jax synthetic shapes"
      ),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download the release yourself and pass its folder as --manual_dir. It must contain the
  annotation JSON files and frame folders listed in the builder config (e.g. for ytvis_2019:
  train.json, train/JPEGImages/<video>/<frame>.jpg, valid.json, valid/JPEGImages/...).
  Splits whose JSON file is absent are skipped.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(
            {
                "video_id": np.int64,
                "height": np.int64,
                "width": np.int64,
                "file_names": tfds.features.Sequence(tfds.features.Text()),
                "frames": tfds.features.Sequence(
                    tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg")
                ),
                "track_ids": tfds.features.Tensor(shape=(None,), dtype=np.int64),
                "labels": tfds.features.Tensor(shape=(None,), dtype=np.int64),
                "iscrowd": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
                # Per (track, frame), flattened track-major ([N * L] rows, reshape to [N, L]):
                # x1, y1, x2, y2 pixels (clipped), non-empty flag, compressed COCO RLE counts
                # ('' = no mask in that frame).
                "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
                "box_valid": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
                "rle_counts": tfds.features.Tensor(shape=(None,), dtype=np.str_),
            }
        ),
        supervised_keys=None,
        homepage="https://github.com/SysCV/MaskFreeVIS",
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = dl_manager.manual_dir
    generators = {}
    for split, (json_rel, image_rel) in self.builder_config.splits.items():
      json_path = os.path.join(root, json_rel)
      if not os.path.isfile(json_path):
        logging.warning("%s: no %s, split %r skipped", BUILDER_NAME, json_path, split)
        continue
      dataset = ytvis_json.load_ytvis_json(json_path, os.path.join(root, image_rel))
      self.info.metadata["class_names"] = dataset.class_names
      self.info.metadata[f"{split}_unannotated_video_ids"] = [
          v.id for v in dataset.videos if not v.has_annotations()
      ]
      generators[split] = self._generate_examples(dataset)
    if not generators:
      raise ValueError(
          f"{root}: none of the annotation files "
          f"{[j for j, _ in self.builder_config.splits.values()]} exist"
      )
    return generators

  def _generate_examples(self, dataset: ytvis_json.YtvisDataset):
    for video in dataset.videos:
      yield video.id, _video_example(video, dataset.image_root)


def _frame_for_tfds(path: str) -> Any:
  """Passes RGB JPEG files through unchanged; anything else is decoded to RGB first."""
  try:
    with Image.open(path) as image:
      if image.format == "JPEG" and image.mode == "RGB":
        return path
  except (OSError, ValueError):
    pass
  return transforms.read_rgb(path)  # raises FrameReadError naming the file


def _video_example(video: ytvis_json.Video, image_root: str) -> dict[str, Any]:
  n, length = len(video.tracks), video.length
  boxes = np.zeros((n, length, 4), np.float32)
  valid = np.zeros((n, length), bool)
  rles = np.full((n, length), "", dtype=object)
  for k, track in enumerate(video.tracks):
    boxes[k], valid[k] = track.boxes, track.box_valid
    if track.segmentations is not None:
      for t, segm in enumerate(track.segmentations):
        if segm is not None:
          mask = ytvis_json.decode_segmentation(segm, video.height, video.width)
          rles[k, t] = ytvis_json.encode_mask(mask)["counts"]
  return {
      "video_id": video.id,
      "height": video.height,
      "width": video.width,
      "file_names": [os.path.relpath(p, image_root) for p in video.file_names],
      "frames": [_frame_for_tfds(p) for p in video.file_names],
      "track_ids": np.array([t.id for t in video.tracks], np.int64),
      "labels": np.array([t.label for t in video.tracks], np.int64),
      "iscrowd": np.array([t.iscrowd for t in video.tracks], bool),
      "boxes": boxes.reshape(n * length, 4),
      "box_valid": valid.reshape(n * length),
      "rle_counts": rles.reshape(n * length),
  }


def build_dataset(
    manual_dir: str,
    data_dir: str,
    config: str = "synthetic",
    splits: dict[str, tuple[str, str]] | None = None,
    file_format: str = "array_record",
) -> tfds.core.DatasetBuilder:
  """Builds (if needed) the TFDS dataset of a local folder and returns the builder.

  Args:
    manual_dir: the dataset folder (JSON files + frames).
    data_dir: where TFDS writes the build.
    config: builder config name ('ytvis_2019', 'ytvis_2021', 'ovis', 'synthetic'), or the
      name of a custom layout when ``splits`` is given.
    splits: custom layout ``{split: (json, image_root)}`` relative to ``manual_dir``.
    file_format: 'array_record' (random access, needed by the pipeline) or 'tfrecord'.
  """
  if splits is not None:
    builder = MaskfreevisVis(
        config=VisBuilderConfig(name=config, splits=splits),
        data_dir=data_dir,
        file_format=file_format,
    )
  else:
    builder = MaskfreevisVis(config=config, data_dir=data_dir, file_format=file_format)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


class TfdsVideoSource:
  """Random-access videos of a TFDS build (array_record); same interface as JsonVideoSource."""

  def __init__(self, name: str, split: str, data_dir: str | None = None):
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # tfds raises several types for a missing dataset
      raise ValueError(f"TFDS dataset {name!r} not found in data_dir={data_dir!r}: {e}") from None
    if split not in builder.info.splits:
      raise ValueError(
          f"TFDS dataset {name!r} has no split {split!r} " f"(has {list(builder.info.splits)})"
      )
    try:
      # Raw tf.train.Example protos: JPEG bytes stay undecoded until a clip needs them.
      self._records = builder.as_data_source(
          split, deserialize_method=tfds.decode.DeserializeMethod.DESERIALIZE_NO_DECODE
      )
    except Exception as e:
      raise ValueError(
          f"TFDS dataset {name!r} cannot be read with random access; build it "
          f"with file_format='array_record' ({e})"
      ) from None
    self.name = f"{name}/{split}"
    self.class_names = list(builder.info.metadata.get("class_names", []))
    self._unannotated = set(builder.info.metadata.get(f"{split}_unannotated_video_ids", []))
    self._indices = list(range(len(self._records)))
    self._video_ids = None

  def __len__(self) -> int:
    return len(self._indices)

  def drop_unannotated_videos(self) -> None:
    """Skips videos recorded as having no non-empty box at build time (logged)."""
    if not self._unannotated:
      return
    ids = [int(self._record(i)["video_id"][0]) for i in range(len(self._indices))]
    keep = [j for j, vid in zip(self._indices, ids) if vid not in self._unannotated]
    logging.warning(
        "%s: skipped %d videos whose every annotation is empty (video ids %s)",
        self.name,
        len(self._indices) - len(keep),
        sorted(self._unannotated)[:10],
    )
    self._indices = keep

  @functools.lru_cache(maxsize=16)
  def _record(self, index: int) -> dict[str, Any]:
    example = self._records[self._indices[index]]
    out = {}
    for key, feature in example.features.feature.items():
      kind = feature.WhichOneof("kind")
      values = getattr(feature, kind).value if kind else []
      if kind == "bytes_list":
        out[key] = list(values)
      elif kind == "float_list":
        out[key] = np.asarray(values, np.float32)
      else:
        out[key] = np.asarray(values, np.int64)
    return out

  def video(self, index: int) -> ytvis_json.Video:
    rec = self._record(index)
    height, width = int(rec["height"][0]), int(rec["width"][0])
    n, length = len(rec["track_ids"]), len(rec["file_names"])
    all_boxes = np.asarray(rec["boxes"], np.float32).reshape(n, length, 4)
    all_valid = np.asarray(rec["box_valid"], bool).reshape(n, length)
    all_counts = np.asarray(rec["rle_counts"], dtype=object).reshape(n, length)
    tracks = []
    for k in range(n):
      counts = all_counts[k]
      segms = [
          {"size": [height, width], "counts": c.decode() if isinstance(c, bytes) else c}
          if len(c)
          else None
          for c in counts
      ]
      tracks.append(
          ytvis_json.Track(
              id=int(rec["track_ids"][k]),
              category_id=int(rec["labels"][k]) + 1,
              label=int(rec["labels"][k]),
              iscrowd=bool(rec["iscrowd"][k]),
              boxes=all_boxes[k],
              box_valid=all_valid[k],
              segmentations=segms,
          )
      )
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in rec["file_names"]]
    return ytvis_json.Video(
        id=int(rec["video_id"][0]), height=height, width=width, file_names=names, tracks=tracks
    )

  def read_frames(self, index: int, frame_indices: Sequence[int]) -> list[np.ndarray]:
    rec = self._record(index)
    names = rec["file_names"]
    out = []
    for t in frame_indices:
      name = names[int(t)]
      name = name.decode() if isinstance(name, bytes) else str(name)
      out.append(transforms.decode_rgb(rec["frames"][int(t)], f"{self.name}:{name}"))
    return out
