"""MaskFreeVIS in JAX/Flax: video instance segmentation trained from bounding boxes only."""

__version__ = "0.1.0"
