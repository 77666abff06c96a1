"""Swin Transformer backbone, the `D2SwinTransformer` of the official Mask2Former / MaskFreeVIS.

Layout (names as in the official state_dict, Flax `name_<i>` for torch `name.<i>`):
  patch_embed/{proj (4x4 stride-4 conv), norm}: the image is zero-padded on the bottom/right
    to a multiple of the patch size first;
  layers_<i>/blocks_<j>/{norm1, attn/{relative_position_bias_table, qkv, proj}, norm2,
    mlp/{fc1, fc2}}: pre-norm blocks with window attention; odd blocks shift the windows by
    window_size // 2 (cyclic roll) and mask attention across the wrapped-around regions;
    feature maps are zero-padded on the bottom/right to window multiples (after norm1; the
    padded tokens take part in the attention exactly as in the official code) and cropped back;
  layers_<i>/downsample/{norm, reduction}: patch merging (2x2 neighbours concatenated in the
    order (0,0), (1,0), (0,1), (1,1), LayerNorm, bias-free Linear to 2C) after stages 0-2,
    padding odd sizes by one row / column;
  norm<i>: a LayerNorm on each output res<i+2>.

The relative-position index and the shifted-window attention mask are not variables: they
depend only on static sizes and are computed with numpy at trace time (`relative_position_index`,
`shifted_window_mask`). Exports write the index as the official buffer; imports skip it.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maskfreevis_jax.models.remat import remat_module

Dtype = Any

# torch.nn.LayerNorm's epsilon (flax's default is 1e-6).
LAYER_NORM_EPSILON = 1e-5
# Logit added between tokens of different regions of a shifted window (official value).
SHIFT_MASK_VALUE = -100.0


def relative_position_index(window_size: int) -> np.ndarray:
  """Index into the relative position bias table for every query/key pair of a window.

  Args:
    window_size: side w of the square window.

  Returns:
    int64 [w*w, w*w]: for tokens i=(yi, xi), j=(yj, xj) (row-major in the window),
    (yi - yj + w - 1) * (2w - 1) + (xi - xj + w - 1), the official buffer's values.
  """
  coords = np.stack(np.meshgrid(np.arange(window_size), np.arange(window_size), indexing="ij"))
  coords = coords.reshape(2, -1)
  relative = coords[:, :, None] - coords[:, None, :] + (window_size - 1)  # [2, N, N]
  return (relative[0] * (2 * window_size - 1) + relative[1]).astype(np.int64)


def window_partition(x: jax.Array, window_size: int) -> jax.Array:
  """[B, H, W, C] (H, W multiples of window_size) -> [B * nW, window_size**2, C], windows
  in row-major order per image."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window_size, window_size, w // window_size, window_size, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, c)


def window_reverse(windows: jax.Array, window_size: int, height: int, width: int) -> jax.Array:
  """Inverse of `window_partition`: [B * nW, window_size**2, C] -> [B, H, W, C]."""
  c = windows.shape[-1]
  x = windows.reshape(-1, height // window_size, width // window_size, window_size, window_size, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


def shifted_window_mask(height: int, width: int, window_size: int, shift_size: int) -> np.ndarray:
  """Additive attention mask of shifted windows on a padded map of height x width.

  After the cyclic shift, a window at the bottom / right edge holds tokens from up to 3 x 3
  regions that are not neighbours in the image; attention between different regions gets
  SHIFT_MASK_VALUE (as the official code, not -inf).

  Args:
    height, width: padded feature map size (multiples of window_size).
    window_size: window side.
    shift_size: cyclic shift (window_size // 2 in the odd blocks).

  Returns:
    float32 [nW, window_size**2, window_size**2] with 0 or SHIFT_MASK_VALUE.
  """
  region = np.zeros((1, height, width, 1), np.float32)
  bounds = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
  label = 0
  for rows in bounds:
    for cols in bounds:
      region[:, rows, cols, :] = label
      label += 1
  windows = np.asarray(window_partition(region, window_size))[..., 0]  # [nW, N]
  different = windows[:, None, :] != windows[:, :, None]
  return np.where(different, SHIFT_MASK_VALUE, 0.0).astype(np.float32)


def drop_path(module: nn.Module, x: jax.Array, rate: float, deterministic: bool) -> jax.Array:
  """Stochastic depth: zeroes whole samples of a residual branch with probability `rate` and
  scales the rest by 1 / (1 - rate) (timm's DropPath); identity when deterministic."""
  if deterministic or rate == 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(module.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


def _layer_norm(name: str, dtype: Dtype) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=dtype, name=name)


def _dense(features: int, name: str, dtype: Dtype, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(
      features,
      use_bias=use_bias,
      dtype=dtype,
      name=name,
      kernel_init=nn.initializers.truncated_normal(0.02),
  )


class WindowAttention(nn.Module):
  """Multi-head self-attention inside windows, with a learned relative position bias.

  Attributes:
    dim: channels C.
    num_heads: heads (C must be divisible by it).
    window_size: window side w.
    qkv_bias: bias on the packed q/k/v projection.
    dtype: compute dtype (softmax in float32).
  """

  dim: int
  num_heads: int
  window_size: int
  qkv_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, windows: jax.Array, mask: np.ndarray | None = None) -> jax.Array:
    """windows [B * nW, w*w, C], mask [nW, w*w, w*w] additive or None -> [B * nW, w*w, C]."""
    num_windows_total, n, c = windows.shape
    head_dim = c // self.num_heads
    table = self.param(
        "relative_position_bias_table",
        nn.initializers.truncated_normal(0.02),
        ((2 * self.window_size - 1) ** 2, self.num_heads),
        jnp.float32,
    )
    # q | k | v blocks of C columns, each split into heads: torch's reshape(B, N, 3, nH, hd).
    qkv = _dense(3 * c, "qkv", self.dtype, self.qkv_bias)(windows)
    qkv = qkv.reshape(num_windows_total, n, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B*nW, N, nH, hd]
    q = q * (head_dim**-0.5)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    index = relative_position_index(self.window_size).reshape(-1)
    bias = table[index].reshape(n, n, self.num_heads).transpose(2, 0, 1)  # [nH, N, N]
    logits = logits + bias[None]
    if mask is not None:
      num_windows = mask.shape[0]
      logits = logits.reshape(num_windows_total // num_windows, num_windows, self.num_heads, n, n)
      logits = logits + jnp.asarray(mask)[None, :, None]
      logits = logits.reshape(num_windows_total, self.num_heads, n, n)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(num_windows_total, n, c)
    return _dense(c, "proj", self.dtype)(out)


class Mlp(nn.Module):
  """fc1 -> exact (erf) GELU -> fc2, as torch nn.GELU()."""

  hidden_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out_dim = x.shape[-1]
    x = nn.gelu(_dense(self.hidden_dim, "fc1", self.dtype)(x), approximate=False)
    return _dense(out_dim, "fc2", self.dtype)(x)


class SwinBlock(nn.Module):
  """One Swin Transformer block on a [B, H, W, C] map (window or shifted-window attention).

  Attributes:
    num_heads: attention heads.
    window_size: window side.
    shift_size: cyclic shift (0 for W-MSA, window_size // 2 for SW-MSA).
    mlp_ratio: MLP hidden size / C.
    qkv_bias: bias on the q/k/v projection.
    drop_path_rate: stochastic depth rate of both residual branches.
    dtype: compute dtype.
  """

  num_heads: int
  window_size: int
  shift_size: int = 0
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    """x [B, H, W, C] -> [B, H, W, C]; `deterministic` turns drop path off."""
    _, h, w, c = x.shape
    ws = self.window_size
    shortcut = x
    x = _layer_norm("norm1", self.dtype)(x)
    pad_b, pad_r = (-h) % ws, (-w) % ws
    x = jnp.pad(x, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
    hp, wp = h + pad_b, w + pad_r
    mask = None
    if self.shift_size > 0:
      x = jnp.roll(x, (-self.shift_size, -self.shift_size), axis=(1, 2))
      mask = shifted_window_mask(hp, wp, ws, self.shift_size)
    attended = WindowAttention(c, self.num_heads, ws, self.qkv_bias, self.dtype, name="attn")(
        window_partition(x, ws), mask
    )
    x = window_reverse(attended, ws, hp, wp)
    if self.shift_size > 0:
      x = jnp.roll(x, (self.shift_size, self.shift_size), axis=(1, 2))
    x = x[:, :h, :w]
    x = shortcut + drop_path(self, x, self.drop_path_rate, deterministic)
    y = Mlp(int(c * self.mlp_ratio), self.dtype, name="mlp")(_layer_norm("norm2", self.dtype)(x))
    return x + drop_path(self, y, self.drop_path_rate, deterministic)


class PatchMerging(nn.Module):
  """2x2 patch merging: [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), 2C]."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    x = jnp.concatenate(
        [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1
    )
    x = _layer_norm("norm", self.dtype)(x)
    return _dense(2 * c, "reduction", self.dtype, use_bias=False)(x)


class PatchEmbed(nn.Module):
  """Non-overlapping patch_size x patch_size conv (+ LayerNorm): [B, H, W, 3] ->
  [B, ceil(H/p), ceil(W/p), embed_dim]; the image is zero-padded bottom/right to multiples of p."""

  embed_dim: int
  patch_size: int = 4
  patch_norm: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.patch_size
    _, h, w, _ = x.shape
    x = jnp.pad(x, ((0, 0), (0, (-h) % p), (0, (-w) % p), (0, 0)))
    x = nn.Conv(
        self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="proj"
    )(x)
    if self.patch_norm:
      x = _layer_norm("norm", self.dtype)(x)
    return x


class BasicLayer(nn.Module):
  """One Swin stage: `depth` blocks alternating W-MSA / SW-MSA, then optional patch merging.

  Attributes:
    depth: blocks.
    num_heads: heads.
    window_size: window side.
    mlp_ratio, qkv_bias: as SwinBlock.
    drop_path_rates: per-block stochastic depth rates (length depth).
    downsample: patch merging after the blocks.
    dtype: compute dtype.
    remat: rematerialisation policy of every block (see `maskfreevis_jax.models.remat`).
  """

  depth: int
  num_heads: int
  window_size: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_path_rates: Sequence[float] = ()
  downsample: bool = True
  dtype: Dtype = jnp.float32
  remat: str = "none"

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """x [B, H, W, C] -> (stage output [B, H, W, C], next input [B, H', W', C'])."""
    # `deterministic` (argument 2, counting self) is static under remat.
    block_cls = remat_module(SwinBlock, self.remat, static_argnums=(2,))
    for i in range(self.depth):
      x = block_cls(
          num_heads=self.num_heads,
          window_size=self.window_size,
          shift_size=0 if i % 2 == 0 else self.window_size // 2,
          mlp_ratio=self.mlp_ratio,
          qkv_bias=self.qkv_bias,
          drop_path_rate=float(self.drop_path_rates[i]),
          dtype=self.dtype,
          name=f"blocks_{i}",
      )(x, deterministic)
    if not self.downsample:
      return x, x
    return x, PatchMerging(self.dtype, name="downsample")(x)


class SwinTransformer(nn.Module):
  """Swin Transformer backbone with the official D2SwinTransformer's outputs.

  Attributes:
    embed_dim: channels of stage 0 (doubling per stage).
    depths: blocks per stage.
    num_heads: attention heads per stage.
    window_size: attention window side (12 for the 384-pretrained Swin-B/L).
    patch_size: patch embedding stride.
    mlp_ratio: MLP hidden size / channels.
    qkv_bias: bias on the q/k/v projections.
    drop_path_rate: stochastic depth rate of the last block; rates rise linearly from 0 over
      all blocks (timm's rule); only applied with train=True (needs a 'dropout' rng).
    patch_norm: LayerNorm after the patch embedding.
    dtype: compute dtype (parameters float32).
    remat: rematerialisation policy of every block.
  """

  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 7
  patch_size: int = 4
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_path_rate: float = 0.3
  patch_norm: bool = True
  dtype: Dtype = jnp.float32
  remat: str = "none"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """x [N, H, W, 3] (normalised) -> {'res2': [N, H/4, W/4, C], 'res3': [N, H/8, W/8, 2C],
    'res4': [..., 4C], 'res5': [N, H/32, W/32, 8C]} (sizes rounded up), each LayerNorm-ed."""
    if len(self.depths) != len(self.num_heads):
      raise ValueError(
          f"Swin depths {tuple(self.depths)} and num_heads {tuple(self.num_heads)} "
          "must have the same length"
      )
    x = PatchEmbed(
        self.embed_dim, self.patch_size, self.patch_norm, self.dtype, name="patch_embed"
    )(x.astype(self.dtype))
    rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
    outputs = {}
    start = 0
    for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
      stage_out, x = BasicLayer(
          depth=depth,
          num_heads=heads,
          window_size=self.window_size,
          mlp_ratio=self.mlp_ratio,
          qkv_bias=self.qkv_bias,
          drop_path_rates=tuple(float(r) for r in rates[start : start + depth]),
          downsample=i < len(self.depths) - 1,
          dtype=self.dtype,
          remat=self.remat,
          name=f"layers_{i}",
      )(x, not train)
      start += depth
      outputs[f"res{i + 2}"] = _layer_norm(f"norm{i}", self.dtype)(stage_out)
    return outputs
