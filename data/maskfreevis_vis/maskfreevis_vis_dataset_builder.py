"""`tfds build` entry point; the builder lives in maskfreevis_jax/data/tfds_builders.py.

The tfds CLI needs apache_beam; without it use
``python -m maskfreevis_jax.data.build_tfds --config=... --manual_dir=... --data_dir=...``.

  tfds build data/maskfreevis_vis --config=ytvis_2019 --manual_dir=/data/ytvis_2019 \
      --data_dir=/data/tfds --file_format=array_record
"""

from maskfreevis_jax.data.tfds_builders import MaskfreevisVis as Builder  # noqa: F401
