"""The MaskFreeVIS release's training recipes, one variant per published row.

  python main.py --config configs/maskfreevis.py:ytvis19_r50 --workdir DIR \
      --config.data.train_json=/data/ytvis19/train.json \
      --config.data.train_image_root=/data/ytvis19/train/JPEGImages \
      --config.data.val_json=/data/ytvis19/valid.json \
      --config.data.val_image_root=/data/ytvis19/valid/JPEGImages \
      --config.data.coco.json=/data/coco/annotations/coco2ytvis2019_train.json \
      --config.data.coco.image_root=/data/coco/train2017 \
      --config.init_from=/weights/model_final_3c8ec9.pkl

Variants (the official files are those of SysCV/MaskFreeVIS; AP is YouTube-VIS 2019 val mask AP
as the release's README publishes it):

| variant | official config | published AP |
| --- | --- | --- |
| `ytvis19_r50` | `configs/youtubevis_2019/video_maskformer2_R50_bs16_8ep.yaml` | 46.6 |
| `ytvis19_r101` | `configs/youtubevis_2019/video_maskformer2_R101_bs16_8ep.yaml` | 49.1 |
| `ytvis19_swinl` | `configs/youtubevis_2019/swin/video_maskformer2_swin_large_IN21k_384_bs16_8ep.yaml` | 56.0 |
| `nococo_r50_boxinit` | `mfvis_nococo/configs/youtubevis_2019/video_maskformer2_R50_bs16_8ep.yaml` | 42.5 |
| `nococo_r50_maskinit` | `mfvis_nococo/configs/youtubevis_2019/video_maskformer2_R50_bs16_8ep_coco.yaml` | 43.8 |
| `nococo_r101_maskinit` | `mfvis_nococo/configs/youtubevis_2019/video_maskformer2_R101_bs16_8ep_coco.yaml` | 47.3 |
| `ytvis21_r50` | none: the release has no YouTube-VIS 2021 config | - |
| `ovis_r50` | none: the release has no OVIS config | - |
| `ytvis19_r50_mask_supervised` | none: upper bound with video masks | - |

One Swin-L training step on CPU at a tiny frame size (synthetic clips, no weights; about 35 min
on the loaded 2-core development machine, mostly compilation, peak RSS ~7.7 GB):

  python main.py --config configs/maskfreevis.py:ytvis19_swinl --workdir /tmp/swinl --mode train \
      --config.train.steps=1 --config.init_from=none --config.data.name=synthetic \
      --config.train.batch_size=2 "--config.data.pad_size=(64, 64)" \
      "--config.data.min_size_train=(64,)" "--config.data.synthetic.frame_size=(64, 64)" \
      --config.data.synthetic.num_train_videos=4 --config.data.synthetic.num_val_videos=1

Every recipe starts from COCO weights, as the release does: `init_from_required` names the file,
a run without `--config.init_from=PATH` stops with a message naming it, and
`--config.init_from=none` trains from scratch on purpose.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

from maskfreevis_jax import defaults

COCO_STEP_FRACTION = defaults.COCO_STEP_FRACTION


def _base(num_classes: int, backbone: str, init_weights: str) -> ml_collections.ConfigDict:
  """Settings every release config shares (Base-YouTubeVIS-VideoInstanceSegmentation*.yaml)."""
  config = defaults.get_config(backbone, num_classes)  # AdamW 1e-4, wd 0.05, backbone x0.1, ...
  # The release starts every row from COCO weights: the file it names (set per variant). A run
  # without init_from stops and names it.
  config.init_from_required = init_weights
  # Release quirk: Lab of `ds_image[[2, 1, 0]]` of RGB frames (docs/criterion.md).
  config.criterion.mask_free.lab_reverse_channels = True
  config.train.batch_size = 16  # SOLVER.IMS_PER_BATCH
  config.train.seed = 29118357  # SEED
  config.data = defaults.official_ytvis_data()
  config.data.batch_size = config.train.get_ref("batch_size")
  config.data.num_frames = 3  # INPUT.SAMPLING_FRAME_NUM (mask2former_video/config.py)
  config.data.frame_range = 5  # INPUT.SAMPLING_FRAME_RANGE
  config.data.shuffle_frames = True  # INPUT.SAMPLING_FRAME_SHUFFLE
  return config


def _coco_joint(config: ml_collections.ConfigDict, category_map: str) -> None:
  """COCO pseudo clips with masks next to the video clips (DATASETS.TRAIN of the main release).

  `CocoClipDatasetMapper` with `build_pseudo_augmentation` (INPUT.PSEUDO.* of
  video_maskformer2_R50_bs16_8ep.yaml): 4 frames within 20 of a pretend 16 to 48 frame video;
  with probability 0.5 a resize to short side 400/500/600 and a 384-600 crop that drifts across
  the frames; short side 288..512 (long side <= 768); flip by clip; rotation by up to 15 degrees
  per frame. The model supervises these clips with masks (`criterion.mode='mask'`).
  """
  data = config.data
  data.name = "ytvis+coco_pseudo"
  data.coco.fraction = COCO_STEP_FRACTION
  data.coco.supervision = "mask"
  data.coco.num_frames = 4  # INPUT.PSEUDO.SAMPLING_FRAME_NUM
  data.coco.frame_range = 20  # INPUT.PSEUDO.SAMPLING_FRAME_RANGE
  data.coco.pseudo_length = (16, 48)  # random.randrange(16, 49) in CocoClipDatasetMapper
  data.coco.min_size_train = (288, 320, 352, 384, 416, 448, 480, 512)
  data.coco.max_size_train = 768
  data.coco.crop_prob = 0.5  # RandomApplyClip's default probability
  data.coco.crop_pre_sizes = (400, 500, 600)
  data.coco.crop_size = (384, 600)
  data.coco.rotation_degrees = 15.0  # PSEUDO.AUGMENTATIONS ['rotation']: RandomRotationClip
  # Long side <= 768 in either orientation: a square canvas holds every clip unshrunk.
  data.coco.pad_size = (768, 768)
  data.coco.max_instances = 25
  data.coco.category_map = category_map
  data.coco.skip_unmapped_categories = False  # The release's COCO file is filtered to the table.


def _joint(backbone: str, init_weights: str) -> ml_collections.ConfigDict:
  """Main release: COCO (masks) + YouTube-VIS 2019 (boxes), 70k iterations."""
  config = _base(40, backbone, init_weights)
  _coco_joint(config, "ytvis_2019")
  # Base-YouTubeVIS-VideoInstanceSegmentation_long_bs16.yaml: MAX_ITER 70000, STEPS (37500,).
  config.train.steps = 70000
  config.train.lr_decay_steps = (37500,)
  config.train.checkpoint_every = 5000
  config.train.image_every = 5000
  return config


def ytvis19_r50() -> ml_collections.ConfigDict:
  """46.6 AP: main release R50 (configs/youtubevis_2019/video_maskformer2_R50_bs16_8ep.yaml).

  COCO pseudo clips with masks and YouTube-VIS 2019 clips with boxes, 70000 iterations of 16
  clips, decay at 37500. Init: COCO Mask2Former R50 instance model `model_final_3c8ec9.pkl`.
  """
  return _joint("r50", "model_final_3c8ec9.pkl")


def ytvis19_r101() -> ml_collections.ConfigDict:
  """49.1 AP: main release R101 (configs/youtubevis_2019/video_maskformer2_R101_bs16_8ep.yaml).

  The R50 recipe with a ResNet-101. Init: COCO Mask2Former R101 model `model_final_eba159.pkl`.
  """
  return _joint("r101", "model_final_eba159.pkl")


def ytvis19_swinl() -> ml_collections.ConfigDict:
  """56.0 AP: main release Swin-L (configs/youtubevis_2019/swin/video_maskformer2_swin_large_IN21k_384_bs16_8ep.yaml).

  Its chain (video_maskformer2_R50_bs16_8ep_swin.yaml on
  Base-YouTubeVIS-VideoInstanceSegmentation_long.yaml) differs from ytvis19_r50 only in: batch
  8 clips, lr 5e-5, 140000 iterations with the decay at 75000, the Swin-L backbone (IN21k 384,
  window 12, drop path 0.3) with 200 queries, and test short side 480. No weight decay on the
  relative position bias tables comes with the default optimizer fields, as officially.
  Init: COCO Mask2Former Swin-L instance model `model_final_e5f453.pkl`.
  """
  config = _joint("swinl", "model_final_e5f453.pkl")
  config.train.batch_size = 8  # SOLVER.IMS_PER_BATCH
  config.train.lr = 5e-5  # SOLVER.BASE_LR
  config.train.steps = 140000  # SOLVER.MAX_ITER
  config.train.lr_decay_steps = (75000,)  # SOLVER.STEPS
  config.data.min_size_test = 480  # INPUT.MIN_SIZE_TEST
  return config


def _nococo(backbone: str, init_weights: str) -> ml_collections.ConfigDict:
  """mfvis_nococo/: YouTube-VIS 2019 boxes only, 5-frame clips, cyclic TK pairs, 6000 iterations."""
  config = _base(40, backbone, init_weights)
  config.data.name = "ytvis"
  config.data.num_frames = 5  # mfvis_nococo/mask2former_video/config.py
  # Its criterion hard-codes the pairs 0->1, 1->2, 2->3, 3->4, 4->0.
  config.criterion.mask_free.frame_pairing = "cyclic"
  # mfvis_nococo Base-YouTubeVIS-VideoInstanceSegmentation.yaml: MAX_ITER 6000, STEPS (4000,).
  config.train.steps = 6000
  config.train.lr_decay_steps = (4000,)
  return config


def nococo_r50_boxinit() -> ml_collections.ConfigDict:
  """42.5 AP: no COCO masks at all (mfvis_nococo/configs/youtubevis_2019/video_maskformer2_R50_bs16_8ep.yaml).

  Init: the release's COCO *box*-supervised R50 model `model_final_proj.pth` (the release's
  README links it), so no mask label is used anywhere.
  """
  return _nococo("r50", "model_final_proj.pth")


def nococo_r50_maskinit() -> ml_collections.ConfigDict:
  """43.8 AP: video boxes only from COCO mask weights (mfvis_nococo/.../video_maskformer2_R50_bs16_8ep_coco.yaml).

  Init: COCO Mask2Former R50 instance model `model_final_3c8ec9.pkl`.
  """
  return _nococo("r50", "model_final_3c8ec9.pkl")


def nococo_r101_maskinit() -> ml_collections.ConfigDict:
  """47.3 AP: the R101 of nococo_r50_maskinit (mfvis_nococo/.../video_maskformer2_R101_bs16_8ep_coco.yaml).

  Init: COCO Mask2Former R101 instance model `model_final_eba159.pkl`.
  """
  return _nococo("r101", "model_final_eba159.pkl")


def ytvis21_r50() -> ml_collections.ConfigDict:
  """No release recipe: the main R50 recipe on YouTube-VIS 2021, by analogy.

  The release registers the 2021 dataset and ships `COCO_TO_YTVIS_2021`, but no config uses
  them; the paper's 2021 results come with no recipe. This variant swaps the dataset and the
  COCO table of `ytvis19_r50` and keeps everything else. Init: `model_final_3c8ec9.pkl`.
  """
  config = _joint("r50", "model_final_3c8ec9.pkl")
  _coco_joint(config, "ytvis_2021")
  return config


def ovis_r50() -> ml_collections.ConfigDict:
  """No release recipe: OVIS (25 classes) from boxes only, by analogy with nococo_r50_maskinit.

  The release has no OVIS config, and no COCO-to-OVIS table (its mapper names `COCO_TO_OVIS`
  but never defines it), so this is the video-only recipe with the main release's 3-frame clips
  and all-pairs TK-Loss. OVIS videos are longer and denser: up to 50 instances per clip and a
  frame range of 20 are this repository's choices. Init: `model_final_3c8ec9.pkl` (its 81-class
  head stays at initialisation).
  """
  config = _nococo("r50", "model_final_3c8ec9.pkl")
  config.model.num_classes = 25
  config.data.num_frames = 3
  config.criterion.mask_free.frame_pairing = "all_pairs"
  config.data.max_instances = 50
  config.data.frame_range = 20
  return config


def ytvis19_r50_mask_supervised() -> ml_collections.ConfigDict:
  """Not a MaskFreeVIS row: the upper bound, the same model trained WITH YouTube-VIS masks.

  `nococo_r50_maskinit` with `criterion.mode='mask'` (point-free BCE + dice at stride 4, matcher
  with mask costs) and the video masks decoded, 3-frame clips. Compare its AP with the box rows.
  """
  config = _nococo("r50", "model_final_3c8ec9.pkl")
  config.data.num_frames = 3
  config.criterion.mask_free.frame_pairing = "all_pairs"  # unused in mask mode
  config.criterion.mode = "mask"
  config.data.with_masks = True
  return config


_VARIANTS: dict[str, Callable[[], ml_collections.ConfigDict]] = {
    "ytvis19_r50": ytvis19_r50,
    "ytvis19_r101": ytvis19_r101,
    "ytvis19_swinl": ytvis19_swinl,
    "nococo_r50_boxinit": nococo_r50_boxinit,
    "nococo_r50_maskinit": nococo_r50_maskinit,
    "nococo_r101_maskinit": nococo_r101_maskinit,
    "ytvis21_r50": ytvis21_r50,
    "ovis_r50": ovis_r50,
    "ytvis19_r50_mask_supervised": ytvis19_r50_mask_supervised,
}
VARIANTS = tuple(_VARIANTS)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The variant `arg` (`--config configs/maskfreevis.py:<variant>`)."""
  if arg not in _VARIANTS:
    raise ValueError(
        f"configs/maskfreevis.py needs a variant, e.g. "
        f"--config configs/maskfreevis.py:ytvis19_r50; got {arg!r}, choose one of "
        f"{', '.join(VARIANTS)}"
    )
  config = _VARIANTS[arg]()
  config.variant = arg
  return config
