"""Data sources by name: the videos and COCO pseudo clips a run reads.

`REGISTRY` maps each source name of ``config.data.name`` to its kind and factory:

  'synthetic'    video: the built-in synthetic dataset, generated on demand (`ensure_synthetic`).
  'ytvis'        video: a YouTube-VIS 2019/2021 or OVIS JSON + frame folder.
  'coco_pseudo'  COCO: still images as pseudo clips (`coco_pseudo.CocoPseudoClipSource`).

A joint run names a video source and 'coco_pseudo' ('ytvis+coco_pseudo',
'synthetic+coco_pseudo'): `source_names` parses the name, `is_joint` tells a joint run and
`source_configs` gives each source's config. With ``data.source == 'tfds'`` a video source reads
its TFDS build (``data.tfds``) instead of the JSON folder.

Video sources (`JsonVideoSource`, `tfds_builders.TfdsVideoSource`) share one interface:
``len(source)``, ``source.video(i)`` (a `ytvis_json.Video`), ``source.read_frames(i, frames)``
(uint8 [h, w, 3] each) and ``source.class_names``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np

from maskfreevis_jax.data import coco_pseudo
from maskfreevis_jax.data import synthetic
from maskfreevis_jax.data import tfds_builders
from maskfreevis_jax.data import transforms
from maskfreevis_jax.data import ytvis_json

VIDEO_SOURCE, COCO_SOURCE = "video", "coco"
SPLITS = ("train", "valid")

# The video dataset's class names in label order and the category id of each label (None: 1, 2,
# ...): what COCO categories are mapped to in a joint run.
ClassTarget = tuple[Sequence[str], Sequence[int] | None]


class JsonVideoSource:
  """Videos of a YouTube-VIS JSON file whose frames are image files."""

  def __init__(self, dataset: ytvis_json.YtvisDataset):
    self.dataset = dataset
    self.videos = dataset.videos
    self.class_names = dataset.class_names

  def __len__(self) -> int:
    return len(self.videos)

  def video(self, index: int) -> ytvis_json.Video:
    return self.videos[index]

  def read_frames(self, index: int, frame_indices: Sequence[int]) -> list[np.ndarray]:
    """The frames ``frame_indices`` of video ``index``: uint8 [H, W, 3] each."""
    video = self.videos[index]
    frames = []
    for t in frame_indices:
      path = video.file_names[int(t)]
      frame = transforms.read_rgb(path)
      if frame.shape[:2] != (video.height, video.width):
        raise ValueError(
            f"frame {path} is {frame.shape[0]}x{frame.shape[1]} but video id "
            f"{video.id} declares {video.height}x{video.width}"
        )
      frames.append(frame)
    return frames


@functools.lru_cache(maxsize=8)
def _load_json_cached(path: str, image_root: str | None, keep_segmentations: bool):
  return ytvis_json.load_ytvis_json(path, image_root, keep_segmentations=keep_segmentations)


def clear_json_cache() -> None:
  """Forgets the annotation files read so far (they are cached by path)."""
  _load_json_cached.cache_clear()


def _json_source(
    config: ml_collections.ConfigDict, split: str, path: str, image_root: str | None
) -> JsonVideoSource:
  keep_segmentations = config.data.with_masks or split != "train"
  return JsonVideoSource(_load_json_cached(path, image_root, keep_segmentations))


def ensure_synthetic(config: ml_collections.ConfigDict) -> str:
  """Generates the synthetic dataset of ``config.data.synthetic`` if absent; returns its folder.

  The folder, under ``synthetic.cache_dir`` (default `synthetic.default_cache_dir`), is named
  after the generation settings, so configs with other settings never share one.
  """
  s = config.data.synthetic
  out = s.cache_dir or synthetic.default_cache_dir()
  name = (
      (
          f"s{s.seed}_{s.frame_size[0]}x{s.frame_size[1]}_{s.num_train_videos}_"
          f"{s.num_val_videos}_{s.frames_per_video[0]}-{s.frames_per_video[1]}_o{s.max_objects}"
      )
      + (f"_camouflage{s.camouflage:g}" if s.camouflage else "")
      + (f"_cover{s.camouflage_cover:g}" if s.camouflage and s.camouflage_cover < 1 else "")
      + (f"_lookalike{s.lookalike:g}" if s.lookalike else "")
      + ("_recolour" if s.camouflage_recolour else "")
  )
  return synthetic.ensure_dataset(
      os.path.join(out, name),
      seed=s.seed,
      num_train_videos=s.num_train_videos,
      num_val_videos=s.num_val_videos,
      frame_size=tuple(s.frame_size),
      frames_per_video=tuple(s.frames_per_video),
      max_objects=s.max_objects,
      camouflage=s.camouflage,
      camouflage_cover=s.camouflage_cover,
      lookalike=s.lookalike,
      camouflage_recolour=s.camouflage_recolour,
  )


def _open_synthetic(config: ml_collections.ConfigDict, split: str) -> JsonVideoSource:
  root = ensure_synthetic(config)
  path = os.path.join(root, f"{split}.json")
  return _json_source(config, split, path, os.path.join(root, split, "JPEGImages"))


def _open_ytvis(config: ml_collections.ConfigDict, split: str) -> JsonVideoSource:
  data = config.data
  path = data.train_json if split == "train" else data.val_json
  image_root = (data.train_image_root if split == "train" else data.val_image_root) or None
  if not path:
    raise ValueError(f"data.{'train' if split == 'train' else 'val'}_json is not set")
  return _json_source(config, split, path, image_root)


def open_coco_source(
    config: ml_collections.ConfigDict, target: ClassTarget | None = None
) -> coco_pseudo.CocoPseudoClipSource:
  """COCO pseudo clips of ``config.data.coco``, labelled as `target`.

  Without `target`, ``coco.target_categories`` (a YouTube-VIS JSON) gives the classes, else
  the COCO file's own categories are the classes.
  """
  coco = config.data.coco
  names, ids = target if target is not None else (None, None)
  if names is None and coco.target_categories:
    dataset = ytvis_json.load_ytvis_json(coco.target_categories)
    names, ids = dataset.class_names, [c.id for c in dataset.categories]
  return coco_pseudo.CocoPseudoClipSource(
      coco.json,
      coco.image_root or None,
      target_class_names=names,
      category_map=coco.category_map,
      target_category_ids=ids,
      skip_unmapped=bool(coco.skip_unmapped_categories),
  )


@dataclasses.dataclass(frozen=True)
class RegisteredSource:
  """A source name's kind and factory.

  Attributes:
    kind: `VIDEO_SOURCE` or `COCO_SOURCE`.
    factory: a video source's ``factory(config, split)`` returns its JSON source of `split`
      (`open_video_source` adds the TFDS alternative); the COCO source's is `open_coco_source`.
  """

  kind: str
  factory: Callable[..., Any]


REGISTRY: dict[str, RegisteredSource] = {
    "synthetic": RegisteredSource(VIDEO_SOURCE, _open_synthetic),
    "ytvis": RegisteredSource(VIDEO_SOURCE, _open_ytvis),
    "coco_pseudo": RegisteredSource(COCO_SOURCE, open_coco_source),
}


def source_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The registered sources ``config.data.name`` names: one, or (video, 'coco_pseudo').

  Raises:
    ValueError: naming ``config.data.name`` and the registered names, for an unknown source or
      a combination other than '<video source>+coco_pseudo'.
  """
  name = config.data.name
  names = tuple(name.split("+"))
  unknown = [n for n in names if n not in REGISTRY]
  if unknown:
    raise ValueError(
        f"config.data.name={name!r}: unknown source {unknown[0]!r}; the registered sources are "
        f"{sorted(REGISTRY)} (a joint run is '<video source>+coco_pseudo')"
    )
  kinds = tuple(REGISTRY[n].kind for n in names)
  if kinds not in ((VIDEO_SOURCE,), (COCO_SOURCE,), (VIDEO_SOURCE, COCO_SOURCE)):
    raise ValueError(
        f"config.data.name={name!r} must name one of the registered sources {sorted(REGISTRY)} "
        "or a joint run '<video source>+coco_pseudo'"
    )
  return names


def is_joint(config: ml_collections.ConfigDict) -> bool:
  """Whether ``config.data.name`` trains on a video dataset and COCO pseudo clips together."""
  return len(source_names(config)) == 2


def source_kind(config: ml_collections.ConfigDict) -> str:
  """`VIDEO_SOURCE` or `COCO_SOURCE`: the kind of a single-source config's source."""
  names = source_names(config)
  if len(names) != 1:
    raise ValueError(f"config.data.name={config.data.name!r} has {len(names)} sources, not one")
  return REGISTRY[names[0]].kind


def open_video_source(config: ml_collections.ConfigDict, split: str = "train") -> Any:
  """Opens the video source of ``split`` ('train' or 'valid') described by ``config.data``.

  Returns:
    A `JsonVideoSource`, or a `tfds_builders.TfdsVideoSource` (same interface) when
    ``data.source == 'tfds'``.
  """
  data = config.data
  if split not in SPLITS:
    raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
  video = [n for n in source_names(config) if REGISTRY[n].kind == VIDEO_SOURCE]
  if not video:
    raise ValueError(
        f"config.data.name={data.name!r} has no video source; the video sources are "
        f"{sorted(n for n, s in REGISTRY.items() if s.kind == VIDEO_SOURCE)}"
    )
  if data.source == "tfds":
    return tfds_builders.TfdsVideoSource(data.tfds.name, split, data_dir=data.tfds.data_dir or None)
  if data.source != "json":
    raise ValueError(f"data.source must be 'json' or 'tfds', got {data.source!r}")
  return REGISTRY[video[0]].factory(config, split)


def source_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  """The config of each source of a run: {'video': ...} and/or {'coco': ...}.

  A joint config ('ytvis+coco_pseudo') splits into copies whose ``data.name`` is one source's;
  the COCO copy's ``num_frames``, ``pad_size``, ``max_instances`` and ``with_masks`` come from
  ``data.coco.*`` (-1 / () / 'box' meaning "as the video clips"). A single-source config is
  returned as is.
  """
  names = source_names(config)
  if len(names) == 1:
    return {REGISTRY[names[0]].kind: config}
  coco_cfg = config.data.coco
  if coco_cfg.supervision not in ("box", "mask"):
    raise ValueError(f"data.coco.supervision must be 'box' or 'mask', got {coco_cfg.supervision!r}")
  if not 0.0 <= float(coco_cfg.fraction) <= 1.0:
    raise ValueError(f"data.coco.fraction must lie in [0, 1], got {coco_cfg.fraction}")
  video, coco = copy.deepcopy(config), copy.deepcopy(config)
  video.data.name, coco.data.name = names
  if int(coco_cfg.num_frames) > 0:
    coco.data.num_frames = int(coco_cfg.num_frames)
  if coco_cfg.pad_size:
    coco.data.pad_size = tuple(int(v) for v in coco_cfg.pad_size)
  if int(coco_cfg.max_instances) > 0:
    coco.data.max_instances = int(coco_cfg.max_instances)
  coco.data.with_masks = coco_cfg.supervision == "mask"
  return {VIDEO_SOURCE: video, COCO_SOURCE: coco}
