"""MaskFreeVIS R50 on YouTube-VIS 2019, the official 8-epoch recipe (box supervision only).

Official (video_maskformer2_R50_bs16_8ep / mfvis_nococo Base config): AdamW lr 1e-4, weight decay
0.05 (0 on norms and embeddings), backbone lr x0.1, full-model gradient clipping at L2 norm 0.01,
step decay x0.1 at 4000, 6000 iterations, batch 16 clips of 3 frames, short side 360/480.

  python main.py --config configs/ytvis19_r50.py --workdir DIR \
      --config.data.train_json=/data/ytvis19/train.json \
      --config.data.train_image_root=/data/ytvis19/train/JPEGImages \
      --config.data.val_json=/data/ytvis19/valid.json \
      --config.data.val_image_root=/data/ytvis19/valid/JPEGImages
The official 46.6 AP starts from COCO mask-pretrained Mask2Former weights: set --config.init_from.
"""
import ml_collections

from maskfreevis_jax import recipes


def get_config() -> ml_collections.ConfigDict:
  return recipes.official_recipe(num_classes=40)
