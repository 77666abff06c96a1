"""The config schema: every field of an experiment config and its default, in one place.

Configs under `configs/` start from `get_config()` and change fields; they never add one. The
returned ConfigDict is locked, so a mistyped key (`config.train.stpes = 5`,
`--config.train.stpes=5`) is an error instead of a silently ignored setting. This module imports
no JAX, so configs load in well under a second.

  from maskfreevis_jax import defaults, model_presets

  config = defaults.get_config()                     # the official R50 YouTube-VIS 2019 recipe
  config.model = model_presets.get_model_config("tiny", num_classes=6)
  config.train.steps = 100

Sections: `model` (`model_presets`), `criterion`, `train` (optimizer and loop), `data`, `eval`,
`predict`, `sharding`, plus `mode`, `init_from`, `init_from_required`, `variant`.
A run saves its resolved config beside each checkpoint (`checkpointing`); `load_config` reads it
back over this schema.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import ml_collections

from maskfreevis_jax import model_presets

# Official DATASET_RATIO of train_net_video.py for DATASETS.TRAIN (COCO, video): [1.0, 0.75].
COCO_STEP_FRACTION = 1.0 / (1.0 + 0.75)
MODES = ("train", "evaluate", "predict", "train_and_evaluate", "export")


def mask_free_defaults() -> ml_collections.ConfigDict:
  """`config.criterion.mask_free`: the fields of `losses.MaskFreeLossConfig`, official values.

  tests/test_config.py checks that they equal the dataclass's defaults field for field.
  """
  return ml_collections.ConfigDict(
      dict(
          stride=4,
          pairwise_size=3,
          pairwise_dilation=2,
          pairwise_color_threshold=0.3,
          patch_size=3,
          temporal_search_size=3,
          temporal_dilation=3,
          temporal_topk=5,
          temporal_threshold=0.05,
          temporal_weight=0.1,
          warmup_steps=2000,
          frame_pairing="all_pairs",
          lab_reverse_channels=False,
          box_window_fractions=(0.5,),
      )
  )


def criterion_defaults() -> ml_collections.ConfigDict:
  """`config.criterion`: the official R50 YouTube-VIS 2019 MaskFreeVIS criterion."""
  c = ml_collections.ConfigDict()
  c.num_classes = 40
  # 'box': mask-free training from boxes; 'mask': fully mask-supervised upper bound.
  c.mode = "box"
  c.eos_coef = 0.1  # relative class weight of "no object" in the cross-entropy
  # Official weight_dict: CLASS_WEIGHT 2, MASK_WEIGHT 5 (loss_mask, loss_mask_proj, loss_bound,
  # loss_bound_neighbor), DICE_WEIGHT 5 (loss_dice).
  c.weights = ml_collections.ConfigDict(
      dict(
          loss_ce=2.0,
          loss_mask_proj=5.0,
          loss_bound=5.0,
          loss_bound_neighbor=5.0,
          loss_mask=5.0,
          loss_dice=5.0,
      )
  )
  # Matching costs (official cost_class, cost_mask, cost_dice; the box branch uses class + dice).
  c.matcher = ml_collections.ConfigDict(dict(class_weight=2.0, mask_weight=5.0, dice_weight=5.0))
  c.deep_supervision = True  # supervise every stacked prediction, not only the last
  # The official TK-Loss warm-up counter advances once per loss call, i.e. once per supervised
  # layer (L = 10 per iteration for R50). True mirrors that; False counts optimizer steps.
  c.warmup_counts_layer_calls = True
  # 'vmap': all layers at once (fastest); 'map': lax.map with remat, one layer's loss alive at a
  # time (small-memory accelerators; the matchings are saved, not re-solved).
  c.layer_loop = "vmap"
  # Mask mode's loss_mask / loss_dice: 'dense' (every stride-4 cell against the 4x4-pooled
  # target) or 'importance' (the release's point sampling: `num_points` per instance-frame,
  # `importance_sample_ratio` of them the most uncertain of `oversample_ratio` x as many).
  c.mask_points = ml_collections.ConfigDict(
      dict(
          sampling="dense",
          num_points=20000,  # TRAIN_NUM_POINTS of the R50 recipe
          oversample_ratio=3.0,
          importance_sample_ratio=0.75,
          seed=0,
      )
  )
  c.mask_free = mask_free_defaults()
  return c


def train_defaults() -> ml_collections.ConfigDict:
  """`config.train`: the release's optimizer and the mfvis_nococo schedule (6000 iterations,
  decay at 4000); `configs/maskfreevis.py` sets each published row's schedule."""
  c = ml_collections.ConfigDict()
  c.steps = 6000
  c.batch_size = 16  # global clips per step (SOLVER.IMS_PER_BATCH), split over hosts
  c.seed = 29118357  # official SEED
  # Optimizer (official build_optimizer): AdamW, per-group multipliers, full-model clipping.
  c.lr = 1e-4
  c.weight_decay = 0.05
  c.weight_decay_norm = 0.0
  c.weight_decay_embed = 0.0
  c.backbone_lr_multiplier = 0.1
  c.clip_grad_norm = 0.01  # <= 0 disables clipping
  c.adam_b1 = 0.9
  c.adam_b2 = 0.999
  c.adam_eps = 1e-8
  # Schedule: linear warm-up from lr * warmup_factor over warmup_steps, then x lr_decay_factor at
  # each of lr_decay_steps (detectron2 WarmupMultiStepLR; warmup_factor 1.0 is the release's).
  c.warmup_steps = 10
  c.warmup_factor = 1.0
  c.lr_decay_steps = (4000,)
  c.lr_decay_factor = 0.1
  # Regexes on the '/'-joined parameter path (e.g. 'backbone/res2_0/conv1/kernel').
  c.backbone_regex = r"(^|/)backbone(/|$)"
  # No-decay parameters on top of those found by module type (norm layers, nn.Embed): the
  # decoder's query / level embeddings (nn.Embedding officially) and Swin's bias tables.
  c.no_decay_regex = (
      r"(^|/)(query_feat|query_embed|decoder_level_embed)(/|$)|(^|/)predictor/level_embed(/|$)"
      r"|(^|/)relative_position_bias_table$"
  )
  c.frozen_regex = ""
  # Loop and periodic actions.
  c.checkpoint_every = 500
  c.keep = 3
  c.async_checkpoint = True
  c.log_every = 20
  c.image_every = 500  # 0 disables the predicted-mask images in TensorBoard
  c.profile_steps = 0  # > 0: a jax profiler trace of that many steps (after step 10)
  c.max_consecutive_nonfinite = 10
  # A failed checkpoint save (full disk, unwritable workdir) is logged and training goes on;
  # this many failures in a row stop it.
  c.max_consecutive_failed_saves = 3
  return c


def _coco_defaults() -> ml_collections.ConfigDict:
  """`config.data.coco`: COCO instances as pseudo clips (INPUT.PSEUDO.* of the release)."""
  return ml_collections.ConfigDict(
      dict(
          json="",
          image_root="",
          fraction=COCO_STEP_FRACTION,  # share of steps that are COCO in a joint run
          num_frames=-1,  # -1: data.num_frames
          pad_size=(),  # (): data.pad_size
          max_instances=-1,  # -1: data.max_instances
          supervision="box",  # 'mask' decodes masks for the mask-mode criterion (the release)
          target_categories="",
          category_map="by_name",
          skip_unmapped_categories=False,
          min_size_train=(288, 320, 352, 384, 416, 448, 480, 512),
          max_size_train=768,
          crop_prob=0.5,
          crop_pre_sizes=(400, 500, 600),
          crop_size=(384, 600),
          rotation_degrees=0.0,
          pseudo_length=(16, 48),
          frame_range=20,
      )
  )


def data_defaults() -> ml_collections.ConfigDict:
  """`config.data`: the built-in synthetic dataset (`official_ytvis_data` for YouTube-VIS).

  Sources (`name`; `maskfreevis_jax.data.sources` holds the registry):
    'synthetic': generated on demand into `synthetic.cache_dir`.
    'ytvis': a YouTube-VIS 2019/2021 or OVIS folder (`train_json` / `train_image_root`,
      `val_json` / `val_image_root`), or its TFDS build when `source == 'tfds'`.
    'coco_pseudo': COCO-format still images turned into pseudo clips (`coco.*`).
    'ytvis+coco_pseudo', 'synthetic+coco_pseudo': joint training, one source per step; a step's
      whole batch is COCO with probability `coco.fraction`, else video.
  """
  c = ml_collections.ConfigDict()
  c.name = "synthetic"
  c.source = "json"  # 'json': raw JSON + JPEG folder; 'tfds': a build from data/ builders
  c.batch_size = 8  # global clips per step; get_config ties it to train.batch_size
  c.num_frames = 3  # official SAMPLING_FRAME_NUM
  c.frame_range = 5  # official SAMPLING_FRAME_RANGE (YouTube-VIS)
  c.shuffle_frames = False  # official SAMPLING_FRAME_SHUFFLE (True there); sorted here
  c.min_size_train = (96, 112, 128)  # short side choices (official r50: (360, 480))
  c.max_size_train = 1333  # long side limit (detectron2 default, used by the official run)
  c.pad_size = (128, 128)  # fixed (H, W) canvas, multiples of 32; resize fits inside it
  c.random_flip = True  # horizontal flip by clip
  c.max_instances = 10
  c.with_masks = False  # decode GT masks (mask-supervised training only)
  c.min_size_test = 128  # official: 360
  c.max_size_test = 1333
  c.eval_pad_size = ()  # (): round each video up to a multiple of 32
  c.skip_corrupt_frames = False  # True: log and take another video instead of failing
  # With skip_corrupt_frames: stop with a clear message once more than this fraction of the last
  # skip_corrupt_window clips made had to be replaced (the dataset is going bad, not one frame).
  c.skip_corrupt_max_fraction = 0.1
  c.skip_corrupt_window = 200
  c.skip_empty_videos = True  # training drops videos without any non-empty box (logged)
  c.num_parallel_calls = -1  # -1: tf.data.AUTOTUNE
  c.prefetch = 2  # batches
  c.train_json = ""
  c.train_image_root = ""
  c.val_json = ""
  c.val_image_root = ""
  # Category names by contiguous class index: the labels of overlays and predictions. Configs
  # set them, so inference needs neither the dataset nor its JSON.
  c.class_names = ()
  c.tfds = ml_collections.ConfigDict(dict(name="maskfreevis_vis/synthetic", data_dir=""))
  c.synthetic = ml_collections.ConfigDict(
      dict(
          cache_dir="",  # '': $MASKFREEVIS_DATA_DIR or ~/.cache/maskfreevis_jax
          seed=0,
          num_train_videos=300,
          num_val_videos=30,
          frame_size=(128, 128),
          frames_per_video=(6, 10),
          max_objects=4,
          # > 0: format 4, that share of objects cut from their own background photo (docs/data.md)
          camouflage=0.0,
          # < 1: format 5, only that share of a camouflaged object's area wears the photo
          camouflage_cover=1.0,
          # > 0: format 6, that share of objects has a stripe of its own material across its path
          lookalike=0.0,
          # True: format 7, the camouflaged part (camouflage_cover < 1) recoloured from another photo
          camouflage_recolour=False,
      )
  )
  # Generated still images (data/synthetic_images.py) for the synthetic stage 1.
  # recoloured_share > 0 (opt-in): that share of objects with a half in the background's colours.
  c.stills = ml_collections.ConfigDict(
      dict(num_images=4000, size=(96, 96), seed=0, max_objects=4, recoloured_share=0.0)
  )
  c.coco = _coco_defaults()
  return c


def official_ytvis_data(
    train_json: str = "", train_image_root: str = "", val_json: str = "", val_image_root: str = ""
) -> ml_collections.ConfigDict:
  """`config.data` with the official r50 YouTube-VIS settings (360/480 short side)."""
  c = data_defaults()
  c.name = "ytvis"
  c.batch_size = 16
  c.min_size_train = (360, 480)
  c.max_size_train = 1333
  c.pad_size = (480, 864)  # 16:9 at short side 480; other aspects are fit inside
  c.min_size_test = 360
  c.max_instances = 25
  c.train_json, c.train_image_root = train_json, train_image_root
  c.val_json, c.val_image_root = val_json, val_image_root
  return c


def eval_defaults() -> ml_collections.ConfigDict:
  """`config.eval`: official inference (whole video, top-10 (query, class) pairs)."""
  c = ml_collections.ConfigDict()
  c.split = "valid"
  c.top_k = 10
  # Long videos (docs/evaluation.md): 0 runs the whole video as one clip (official); N runs a
  # video longer than N frames in windows of N frames sharing window_overlap frames, whose
  # queries are matched to the previous window's tracks when associate is True (Hungarian on the
  # cost weights x (query-embedding cosine distance, 1 - mask Dice on the shared frames)).
  c.window_size = 0
  c.window_overlap = 4
  c.associate = True
  c.association_embed_weight = 1.0
  c.association_mask_weight = 1.0
  # Windowed videos make object tracks, not query slots (evaluation/track_builder.py): a query
  # scoring >= track_birth_score that continues no live track starts one; a track continues with
  # the query Hungarian matching gives it when the cost is <= track_max_cost and the query scores
  # >= track_keep_score; it ends after missing track_patience windows. Chosen on long videos of
  # training-side seeds (docs/evaluation.md), not on the bench or validation videos.
  c.track_birth_score = 0.3
  c.track_keep_score = 0.2
  c.track_max_cost = 1.0
  c.track_patience = 2
  # (track, class) pairs kept per video of object tracks over several windows: their count grows
  # with the video (a 1000-frame video holds ~27 objects), so the official top_k (10) would cap
  # recall. At most 100 count (YouTube-VIS AP: maxDets 100). One window keeps top_k. Chosen with
  # track_birth_score on the same training-side seeds, 100 to 1000 frames (docs/evaluation.md).
  c.track_top_k = 30
  c.max_videos = 0  # 0: all
  c.gt_json = ""  # '': the dataset's own annotation file
  # Checkpoint evaluated, predicted with or exported: -1 (or 0) takes the newest readable one.
  c.step = -1
  return c


def predict_defaults() -> ml_collections.ConfigDict:
  """`config.predict`: `--mode predict` on a folder of frames or a video file."""
  c = ml_collections.ConfigDict()
  c.score_threshold = 0.3  # tracks whose best class probability is lower are not drawn
  c.fps = 6.0  # frame rate of the overlays
  c.gif_max_frames = 100  # the GIF holds at most this many frames (the MP4 has them all)
  c.overlay_min_size = 384  # overlays of smaller frames are upscaled to this short side (0: never)
  return c


def sharding_defaults() -> ml_collections.ConfigDict:
  """`config.sharding`: the ('data', 'model') device mesh."""
  c = ml_collections.ConfigDict()
  c.model_axis_size = 1  # > 1 splits large params / optimizer slots over a 'model' axis
  c.min_shard_size = 2**18  # smaller arrays stay replicated
  return c


def get_config(model: str = "r50", num_classes: int = 40) -> ml_collections.ConfigDict:
  """Every field with its default: the official R50 YouTube-VIS 2019 box-supervised recipe.

  Args:
    model: the `model_presets` preset of `config.model` ('r50', 'tiny', 'swinl', ...).
    num_classes: the dataset's category count (`criterion.num_classes` follows it).

  Returns:
    A locked ConfigDict: fields can be changed (same type), none can be added. Use
    `with config.unlocked():` only to attach something that is not a setting.
  """
  config = ml_collections.ConfigDict()
  config.mode = "train_and_evaluate"  # one of MODES; `--mode` overrides it
  # Weights to start from: a .pkl / .pth (official or detectron2) or .safetensors file, or 'none'
  # (from scratch on purpose). Recipes that start from COCO weights name them in
  # init_from_required; leaving init_from empty with them is an error.
  config.init_from = ""
  config.init_from_required = ""
  config.variant = ""  # configs/maskfreevis.py:<variant> that made this config
  config.model = model_presets.get_model_config(model, num_classes=num_classes)
  config.criterion = criterion_defaults()
  config.criterion.num_classes = config.model.get_ref("num_classes")
  config.train = train_defaults()
  config.data = data_defaults()
  config.data.batch_size = config.train.get_ref("batch_size")
  config.eval = eval_defaults()
  config.predict = predict_defaults()
  config.sharding = sharding_defaults()
  config.lock()
  return config


def to_json(config: ml_collections.ConfigDict) -> str:
  """The resolved config as JSON (field references resolved), as saved beside checkpoints."""
  return json.dumps(config.to_dict(), indent=1, sort_keys=True)


def config_from_dict(
    values: Mapping[str, Any], source: str = "config"
) -> ml_collections.ConfigDict:
  """A locked config: the schema updated with `values` (a saved, resolved config).

  `model` is taken whole (presets differ in their backbone fields); every other key must be in
  the schema. JSON lists become tuples where the schema has tuples.

  Raises:
    ValueError: a key the schema does not have, naming it and `source`.
  """
  config = get_config()
  with config.unlocked():
    config.model = ml_collections.ConfigDict(_tuples_like(values.get("model", {}), None))
  # The criterion's class count follows the (new) model's, as in every config; data.batch_size
  # already follows train.batch_size.
  if "num_classes" in config.model:
    config.criterion.num_classes = config.model.get_ref("num_classes")
  _update(config, {k: v for k, v in values.items() if k != "model"}, "", source)
  return config


def load_config(path: str | pathlib.Path) -> ml_collections.ConfigDict:
  """Reads a config saved by a run (`config.json` beside its checkpoints) over the schema.

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is not JSON, or names a field the schema does not have.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"saved config {path} does not exist")
  try:
    values = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"saved config {path} is not valid JSON: {e}") from None
  if not isinstance(values, dict):
    raise ValueError(f"saved config {path} must hold a JSON object, not {type(values).__name__}")
  return config_from_dict(values, source=str(path))


def _tuples_like(value: Any, default: Any) -> Any:
  """JSON lists as tuples (the schema's sequences are tuples), recursively."""
  if isinstance(value, dict):
    return {k: _tuples_like(v, None) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples_like(v, None) for v in value)
  if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  return value


def _update(node: ml_collections.ConfigDict, values: Mapping[str, Any], prefix: str, source: str):
  for key, value in values.items():
    name = f"{prefix}{key}"
    if key not in node:
      raise ValueError(f"{source}: field {name!r} is not in the config schema (defaults.py)")
    current = node[key]
    if isinstance(current, ml_collections.ConfigDict):
      if not isinstance(value, Mapping):
        raise ValueError(f"{source}: field {name!r} must be a mapping, got {value!r}")
      _update(current, value, f"{name}.", source)
    elif _tuples_like(value, current) != current:  # equal values: keep a tied field tied
      node[key] = _tuples_like(value, current)
