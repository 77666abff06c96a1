"""Video masked-attention transformer decoder (Mask2Former for video, official
VideoMultiScaleMaskedTransformerDecoder semantics).

Learnable queries attend, layer by layer and round robin over the three pixel-decoder scales
(stride 32, 16, 8), to the features of all T frames of a clip at once (keys = T * h * w
positions with a 3D sine position encoding). Each layer is masked cross-attention -> self-
attention -> FFN, all post-norm. The cross-attention of a layer only sees the positions where
the previous prediction's mask (bilinearly resized to that scale) has sigmoid >= 0.5; a query
whose mask is empty everywhere attends to everything.

Attention parameters are packed like torch.nn.MultiheadAttention: `in_proj` holds a [D, 3D]
kernel and a [3D] bias whose three D-wide blocks are the query, key and value projections, so
the torch `in_proj_weight` is just its transpose.
"""

from typing import Any
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from maskfreevis_jax.models.pixel_decoder import C2_XAVIER_FILL, resize_bilinear
from maskfreevis_jax.models.position_encoding import sine_position_encoding_3d
from maskfreevis_jax.models.remat import remat_module
from maskfreevis_jax.models.resnet import Conv2dNorm

Dtype = Any

# torch.nn.Linear's default kernel init (kaiming_uniform with a=sqrt(5)).
TORCH_LINEAR_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class PackedInProjection(nn.Module):
  """Query/key/value input projections stored as one [D, 3D] kernel and one [3D] bias."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self, query: jax.Array, key: jax.Array, value: jax.Array
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Projects query [..., D], key [..., D], value [..., D] with their own blocks."""
    d = self.features
    kernel = self.param(
        "kernel", nn.initializers.xavier_uniform(), (query.shape[-1], 3 * d), jnp.float32
    ).astype(self.dtype)
    bias = self.param("bias", nn.initializers.zeros, (3 * d,), jnp.float32).astype(self.dtype)
    project = (
        lambda x, i: x.astype(self.dtype) @ kernel[:, i * d : (i + 1) * d]
        + bias[i * d : (i + 1) * d]
    )
    return project(query, 0), project(key, 1), project(value, 2)


class MultiheadAttention(nn.Module):
  """Multi-head attention with torch.nn.MultiheadAttention's parameters (no dropout).

  Attributes:
    features: model width D.
    num_heads: number of heads.
    dtype: compute dtype (softmax always in float32).
  """

  features: int
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self, query: jax.Array, key: jax.Array, value: jax.Array, blocked: jax.Array | None = None
  ) -> jax.Array:
    """Attends.

    Args:
      query: [B, Q, D].
      key: [B, K, D].
      value: [B, K, D].
      blocked: optional bool, broadcastable to [B, heads, Q, K]; True = may not attend.

    Returns:
      [B, Q, D].
    """
    if self.features % self.num_heads:
      raise ValueError(f"features {self.features} not divisible by num_heads {self.num_heads}")
    head_dim = self.features // self.num_heads
    q, k, v = PackedInProjection(self.features, dtype=self.dtype, name="in_proj")(query, key, value)
    split = lambda x: x.reshape(x.shape[:-1] + (self.num_heads, head_dim))
    q, k, v = split(q) * (head_dim**-0.5), split(k), split(v)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    if blocked is not None:
      logits = jnp.where(blocked, jnp.finfo(jnp.float32).min, logits)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(query.shape[:-1] + (self.features,))
    return nn.Dense(
        self.features, kernel_init=TORCH_LINEAR_INIT, dtype=self.dtype, name="out_proj"
    )(out)


class SelfAttentionLayer(nn.Module):
  """Post-norm self-attention among queries: x = norm(x + attn(x + pos, x + pos, x))."""

  features: int
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, query_pos: jax.Array) -> jax.Array:
    q = x + query_pos
    out = MultiheadAttention(self.features, self.num_heads, dtype=self.dtype, name="self_attn")(
        q, q, x
    )
    return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm")(x + out)


class CrossAttentionLayer(nn.Module):
  """Post-norm masked cross-attention: x = norm(x + attn(x + qpos, mem + pos, mem, mask))."""

  features: int
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      memory: jax.Array,
      pos: jax.Array,
      query_pos: jax.Array,
      blocked: jax.Array | None,
  ) -> jax.Array:
    out = MultiheadAttention(
        self.features, self.num_heads, dtype=self.dtype, name="multihead_attn"
    )(x + query_pos, memory + pos, memory, blocked)
    return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm")(x + out)


class FFNLayer(nn.Module):
  """Post-norm feed-forward block with ReLU: x = norm(x + linear2(relu(linear1(x))))."""

  features: int
  ffn_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    xavier = nn.initializers.xavier_uniform()
    hidden = nn.relu(
        nn.Dense(self.ffn_dim, kernel_init=xavier, dtype=self.dtype, name="linear1")(x)
    )
    out = nn.Dense(self.features, kernel_init=xavier, dtype=self.dtype, name="linear2")(hidden)
    return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm")(x + out)


class MLP(nn.Module):
  """Dense layers layers_0..layers_{n-1} with ReLU between them."""

  hidden_dim: int
  output_dim: int
  num_layers: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      x = nn.Dense(
          self.output_dim if last else self.hidden_dim,
          kernel_init=TORCH_LINEAR_INIT,
          dtype=self.dtype,
          name=f"layers_{i}",
      )(x)
      if not last:
        x = nn.relu(x)
    return x


def attention_mask_from_predictions(mask_logits: jax.Array, height: int, width: int) -> jax.Array:
  """Cross-attention block mask from the previous mask prediction.

  Args:
    mask_logits: [B, Q, T, H, W] mask logits at the mask-feature resolution.
    height: target scale height h.
    width: target scale width w.

  Returns:
    bool [B, 1, Q, T * h * w]: True where the resized mask has sigmoid < 0.5 (blocked). Rows
    that would be blocked everywhere are fully unblocked. No gradient flows through it.
  """
  b, q, t = mask_logits.shape[:3]
  resized = resize_bilinear(mask_logits[..., None].astype(jnp.float32), height, width)[..., 0]
  blocked = jax.nn.sigmoid(resized).reshape(b, q, t * height * width) < 0.5
  blocked = blocked & ~jnp.all(blocked, axis=-1, keepdims=True)
  return jax.lax.stop_gradient(blocked)[:, None]


class VideoMultiScaleMaskedTransformerDecoder(nn.Module):
  """Video Mask2Former transformer decoder.

  Attributes:
    num_classes: foreground classes C; the class head predicts C + 1 (last = no object).
    hidden_dim: query width D.
    num_queries: Q.
    num_heads: attention heads.
    ffn_dim: FFN hidden width.
    num_layers: decoder layers (official DEC_LAYERS - 1 = 9); predictions L = num_layers + 1.
    mask_dim: mask feature channels.
    num_feature_levels: scales used round robin (3).
    enforce_input_proj: add 1x1 input projections even if channels already equal D.
    dtype: compute dtype.
    remat: rematerialisation policy of every cross-attention, self-attention and FFN layer
      ('none', 'full', 'dots'; see `maskfreevis_jax.models.remat`; same results).
  """

  num_classes: int = 40
  hidden_dim: int = 256
  num_queries: int = 100
  num_heads: int = 8
  ffn_dim: int = 2048
  num_layers: int = 9
  mask_dim: int = 256
  num_feature_levels: int = 3
  enforce_input_proj: bool = False
  dtype: Dtype = jnp.float32
  remat: str = "none"

  def _input_sources(
      self, multi_scale_features: Sequence[jax.Array], batch: int, num_frames: int
  ) -> tuple[list[jax.Array], list[jax.Array], list[tuple[int, int]]]:
    """Per level: keys [B, T*h*w, D] (projected features + level embedding), their 3D sine
    positions [1, T*h*w, D] and the level's (h, w)."""
    b, t, d = batch, num_frames, self.hidden_dim
    level_embed = nn.Embed(
        self.num_feature_levels, d, embedding_init=nn.initializers.normal(1.0), name="level_embed"
    ).embedding
    sources, positions, sizes = [], [], []
    for i, x in enumerate(multi_scale_features):
      _, h, w, c = x.shape
      if c != d or self.enforce_input_proj:
        x = Conv2dNorm(
            d,
            1,
            use_bias=True,
            kernel_init=C2_XAVIER_FILL,
            dtype=self.dtype,
            name=f"input_proj_{i}",
        )(x)
      sizes.append((h, w))
      sources.append(
          x.reshape(b, t * h * w, d).astype(self.dtype) + level_embed[i].astype(self.dtype)
      )
      positions.append(
          jnp.asarray(sine_position_encoding_3d(t, h, w, d // 2))
          .reshape(1, t * h * w, d)
          .astype(self.dtype)
      )
    return sources, positions, sizes

  def _initial_queries(self, batch: int) -> tuple[jax.Array, jax.Array]:
    """(query positions, query features), each [B, Q, D], from the learnt embeddings."""
    d = self.hidden_dim
    query_embed = nn.Embed(
        self.num_queries, d, embedding_init=nn.initializers.normal(1.0), name="query_embed"
    ).embedding
    query_feat = nn.Embed(
        self.num_queries, d, embedding_init=nn.initializers.normal(1.0), name="query_feat"
    ).embedding
    query_pos = jnp.broadcast_to(query_embed.astype(self.dtype)[None], (batch, self.num_queries, d))
    output = jnp.broadcast_to(query_feat.astype(self.dtype)[None], (batch, self.num_queries, d))
    return query_pos, output

  def _prediction_heads(self, mask_features: jax.Array):
    """`predict(queries [B, Q, D]) -> (class logits [B, Q, C + 1], mask logits [B, Q, T, h, w])`
    (float32), and the shared `decoder_norm`."""
    decoder_norm = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="decoder_norm")
    class_embed = nn.Dense(
        self.num_classes + 1, kernel_init=TORCH_LINEAR_INIT, dtype=self.dtype, name="class_embed"
    )
    mask_embed = MLP(self.hidden_dim, self.mask_dim, 3, dtype=self.dtype, name="mask_embed")

    def predict(queries):
      normed = decoder_norm(queries)
      logits = class_embed(normed).astype(jnp.float32)
      masks = jnp.einsum(
          "bqc,bthwc->bqthw", mask_embed(normed), mask_features, preferred_element_type=jnp.float32
      )
      return logits, masks

    return predict, decoder_norm

  @nn.compact
  def __call__(
      self, multi_scale_features: Sequence[jax.Array], mask_features: jax.Array, num_frames: int
  ) -> dict[str, jax.Array]:
    """Decodes queries into per-clip class logits and mask logits.

    Args:
      multi_scale_features: num_feature_levels maps [B*T, h_l, w_l, C] (coarse first).
      mask_features: [B*T, H/4, W/4, mask_dim].
      num_frames: T.

    Returns:
      pred_logits float32 [L, B, Q, C + 1], pred_masks float32 [L, B, Q, T, H/4, W/4] and
      pred_embeds float32 [B, Q, D] (the final prediction's normalised query embeddings).
    """
    if len(multi_scale_features) != self.num_feature_levels:
      raise ValueError(
          f"expected {self.num_feature_levels} feature levels, got {len(multi_scale_features)}"
      )
    bt, mask_h, mask_w, mask_c = mask_features.shape
    if bt % num_frames:
      raise ValueError(f"{bt} frames are not a multiple of num_frames={num_frames}")
    b, t, d = bt // num_frames, num_frames, self.hidden_dim
    mask_features = mask_features.reshape(b, t, mask_h, mask_w, mask_c).astype(self.dtype)
    sources, positions, sizes = self._input_sources(multi_scale_features, b, t)
    query_pos, output = self._initial_queries(b)
    predict, decoder_norm = self._prediction_heads(mask_features)

    # Wrapping each layer (not a layer group) keeps the official parameter paths.
    cross_attention_cls = remat_module(CrossAttentionLayer, self.remat)
    self_attention_cls = remat_module(SelfAttentionLayer, self.remat)
    ffn_cls = remat_module(FFNLayer, self.remat)
    logits, masks = predict(output)
    all_logits, all_masks = [logits], [masks]
    for i in range(self.num_layers):
      level = i % self.num_feature_levels
      blocked = attention_mask_from_predictions(masks, *sizes[level])
      output = cross_attention_cls(
          d, self.num_heads, dtype=self.dtype, name=f"transformer_cross_attention_layers_{i}"
      )(output, sources[level], positions[level], query_pos, blocked)
      output = self_attention_cls(
          d, self.num_heads, dtype=self.dtype, name=f"transformer_self_attention_layers_{i}"
      )(output, query_pos)
      output = ffn_cls(d, self.ffn_dim, dtype=self.dtype, name=f"transformer_ffn_layers_{i}")(
          output
      )
      logits, masks = predict(output)
      all_logits.append(logits)
      all_masks.append(masks)
    # The final normalised query embeddings identify objects across windows (MinVIS-style
    # association at inference); unused in training, so XLA drops them there.
    return {
        "pred_logits": jnp.stack(all_logits),
        "pred_masks": jnp.stack(all_masks),
        "pred_embeds": decoder_norm(output).astype(jnp.float32),
    }
