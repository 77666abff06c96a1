"""TFDS builder folder for `tfds build data/maskfreevis_vis` (code in maskfreevis_jax.data)."""
