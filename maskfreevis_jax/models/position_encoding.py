"""Sine position encodings (DETR style) for 2D feature maps and (T, H, W) videos.

The official model never passes a padding mask to these encodings, so every position counts as
valid and the encodings depend only on the static feature shape. We therefore compute them with
numpy at trace time; they enter the jitted graph as constants.
"""

import math

import numpy as np


def _normalized_cumulative(length: int, scale: float) -> np.ndarray:
  """Positions 1..length normalised to (0, scale], as the official cumsum / (last + eps)."""
  positions = np.arange(1, length + 1, dtype=np.float32)
  return positions / (positions[-1] + 1e-6) * scale


def _sin_cos_interleaved(positions: np.ndarray, num_feats: int, temperature: float) -> np.ndarray:
  """Encodes positions [...] into [..., num_feats]: sin on even channels, cos on odd ones.

  Channel 2i and 2i+1 share the frequency temperature ** (2i / num_feats).
  """
  channel = np.arange(num_feats, dtype=np.float32)
  frequencies = temperature ** (2.0 * (channel // 2) / num_feats)
  angles = positions[..., None] / frequencies
  encoded = np.empty_like(angles)
  encoded[..., 0::2] = np.sin(angles[..., 0::2])
  encoded[..., 1::2] = np.cos(angles[..., 1::2])
  return encoded


def sine_position_encoding_2d(
    height: int,
    width: int,
    num_feats: int,
    temperature: float = 10000.0,
    scale: float = 2 * math.pi,
) -> np.ndarray:
  """Normalised 2D sine encoding of an all-valid map.

  Args:
    height: map height.
    width: map width.
    num_feats: channels per axis; the output has 2 * num_feats channels (y first, then x).
    temperature: frequency base.
    scale: positions are normalised to (0, scale].

  Returns:
    float32 array [height, width, 2 * num_feats].
  """
  y = _sin_cos_interleaved(_normalized_cumulative(height, scale), num_feats, temperature)
  x = _sin_cos_interleaved(_normalized_cumulative(width, scale), num_feats, temperature)
  y = np.broadcast_to(y[:, None, :], (height, width, num_feats))
  x = np.broadcast_to(x[None, :, :], (height, width, num_feats))
  return np.concatenate([y, x], axis=-1).astype(np.float32)


def sine_position_encoding_3d(
    frames: int,
    height: int,
    width: int,
    num_feats: int,
    temperature: float = 10000.0,
    scale: float = 2 * math.pi,
) -> np.ndarray:
  """Normalised (T, H, W) sine encoding used by the video transformer decoder.

  The spatial part is the 2D encoding (y then x, num_feats channels each); the temporal part
  has 2 * num_feats channels (its frequencies use 2 * num_feats as the dimension) and is added
  to the spatial part, not concatenated.

  Args:
    frames: number of frames T.
    height: map height.
    width: map width.
    num_feats: channels per spatial axis; output has 2 * num_feats channels.
    temperature: frequency base.
    scale: positions are normalised to (0, scale].

  Returns:
    float32 array [frames, height, width, 2 * num_feats].
  """
  spatial = sine_position_encoding_2d(height, width, num_feats, temperature, scale)
  temporal = _sin_cos_interleaved(_normalized_cumulative(frames, scale), 2 * num_feats, temperature)
  return (spatial[None] + temporal[:, None, None, :]).astype(np.float32)
