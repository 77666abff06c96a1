"""One training step: the official optimizer on the official R50 model, exported Flax weights.

`--stage inputs` (project python) is `model_forward`'s: random R50 variables exported with
`maskfreevis_jax.export` and the 2-clip batch of `common.r50_parity_batch`. `--stage official`
loads the weights strictly, runs the official network in training mode on the batch (its
normalisation and `ImageList` padding, then `backbone` and `sem_seg_head`: a batch of 6 frames is
2 clips of 3), computes `parity_loss_torch` on all 10 predictions, back-propagates, and takes one
step of the optimizer of `train_net_video.Trainer.build_optimizer` (AdamW, backbone lr x0.1, no
weight decay on norms and embeddings, full-model gradient clipping at 0.01) at the base lr (the
schedule's warm-up factor is 1.0). Writes tests/fixtures/parity_train_step.npz.

The loss is not the set criterion: its box matcher samples random points, and on random weights
the Hungarian matching has near-ties, so a flipped match would swamp the optimizer comparison
(the criterion has its own fixtures). `parity_loss_torch` is a smooth function of every output
(class log-probabilities and mask probabilities of every layer, weighted by fixed random
coefficients); `tests/test_parity_model.py` computes the same formula in jax.
"""

from __future__ import annotations

import pathlib

import numpy as np

from tools.official_parity import common

FIXTURE_NAME = "parity_train_step.npz"
LOSS_SEED = 1617
# Official parameters whose gradient and update the fixture stores: one of each optimizer group
# and kind (backbone convs; GroupNorm and LayerNorm; nn.Embedding tables; the pixel decoder's
# level embedding, a plain nn.Parameter with weight decay; decoder linear weights and biases).
TRACKED_PARAMETERS = (
    "backbone.stem.conv1.weight",
    "backbone.res2.0.conv1.weight",
    "sem_seg_head.pixel_decoder.input_proj.0.1.weight",
    "sem_seg_head.pixel_decoder.transformer.level_embed",
    "sem_seg_head.predictor.level_embed.weight",
    "sem_seg_head.predictor.query_feat.weight",
    "sem_seg_head.predictor.transformer_self_attention_layers.0.norm.weight",
    "sem_seg_head.predictor.transformer_self_attention_layers.0.self_attn.in_proj_bias",
    "sem_seg_head.predictor.transformer_ffn_layers.8.linear1.bias",
    "sem_seg_head.predictor.class_embed.weight",
)


def loss_coefficients(
    num_queries: int, num_classes: int, num_frames: int, height: int, width: int
) -> dict[str, np.ndarray]:
  """Fixed random coefficients of the parity loss (float32, from LOSS_SEED)."""
  rng = np.random.default_rng(LOSS_SEED)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  return {
      "class_weights": normal(num_queries, num_classes + 1),
      "query_weights": normal(num_queries),
      "frame_weights": normal(num_frames),
      "row_weights": normal(height),
      "col_weights": normal(width),
  }


def parity_loss_torch(pred_logits, pred_masks, coefficients):
  """sum over layers l of mean(W_cls * log_softmax(logits_l)) + mean(W_mask * sigmoid(masks_l)).

  Args:
    pred_logits: [L, B, Q, C + 1] torch tensor.
    pred_masks: [L, B, Q, T, h, w] torch tensor.
    coefficients: `loss_coefficients` arrays: W_cls[q, c] = class_weights, and W_mask[q, t, y, x]
      = query_weights[q] * frame_weights[t] * row_weights[y] * col_weights[x].
  """
  import torch  # pylint: disable=g-import-not-at-top

  c = {k: torch.as_tensor(v) for k, v in coefficients.items()}
  mask_weights = torch.einsum(
      "q,t,y,x->qtyx", c["query_weights"], c["frame_weights"], c["row_weights"], c["col_weights"]
  )
  class_term = (torch.log_softmax(pred_logits, -1) * c["class_weights"]).mean((1, 2, 3))
  mask_term = (torch.sigmoid(pred_masks) * mask_weights).mean((1, 2, 3, 4, 5))
  return (class_term + mask_term).sum()


def run_official(workdir: pathlib.Path, out_dir: pathlib.Path) -> None:
  # pylint: disable=g-import-not-at-top
  import torch
  import train_net_video
  from detectron2.structures import ImageList
  # pylint: enable=g-import-not-at-top
  common.seed_everything(0)
  with np.load(workdir / "inputs.npz") as data:
    inputs = {k: data[k] for k in data.files}
  cfg = common.official_cfg()
  model = common.build_official_model(cfg, workdir / "r50.pth").train()
  optimizer = train_net_video.Trainer.build_optimizer(cfg, model)

  # The official forward's input path: frames of each clip, normalised, padded by ImageList.
  images = []
  for clip, valid in zip(inputs["frames"], inputs["image_valid"]):
    height, width = int(valid.any(1).sum()), int(valid.any(0).sum())
    for frame in clip:
      image = torch.as_tensor(frame[:height, :width]).permute(2, 0, 1)
      images.append((image - model.pixel_mean) / model.pixel_std)
  images = ImageList.from_tensors(images, model.size_divisibility)
  outputs = model.sem_seg_head(model.backbone(images.tensor))
  layers = list(outputs["aux_outputs"]) + [outputs]
  pred_logits = torch.stack([o["pred_logits"] for o in layers])
  pred_masks = torch.stack([o["pred_masks"] for o in layers])
  coefficients = loss_coefficients(
      pred_masks.shape[2], pred_logits.shape[-1] - 1, *pred_masks.shape[3:]
  )
  loss = parity_loss_torch(pred_logits, pred_masks, coefficients)
  optimizer.zero_grad()
  loss.backward()

  params = dict(model.named_parameters())
  with_grad = [p for p in params.values() if p.grad is not None]
  grad_norm = torch.sqrt(sum(p.grad.double().square().sum() for p in with_grad))
  before = {k: params[k].detach().clone() for k in TRACKED_PARAMETERS}
  grads = {k: params[k].grad.detach().clone() for k in TRACKED_PARAMETERS}
  optimizer.step()  # clips the full model's gradients to norm 0.01, then AdamW
  group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}

  arrays = {
      "frames": inputs["frames"],
      "image_valid": inputs["image_valid"],
      "loss": np.float64(loss.item()),
      "grad_norm": np.float64(grad_norm.item()),
      **coefficients,
  }
  for key in TRACKED_PARAMETERS:
    arrays[f"grad/{key}"] = grads[key].numpy()
    arrays[f"update/{key}"] = (params[key].detach() - before[key]).numpy()
  meta = {
      "config": common.R50_YTVIS19_CONFIG,
      "variables_seed": common.R50_VARIABLES_SEED,
      "state_dict_sha256": str(inputs["state_dict_sha256"]),
      "num_parameters_with_grad": len(with_grad),
      "num_parameters": len(params),
      "groups": {
          k: [group_of[id(params[k])]["lr"], group_of[id(params[k])]["weight_decay"]]
          for k in TRACKED_PARAMETERS
      },
      # The optimizer's own settings (build_optimizer passes only the lr: torch's AdamW
      # defaults) and the gradient clipping it wraps AdamW with.
      "adam_betas": list(optimizer.param_groups[0]["betas"]),
      "adam_eps": optimizer.param_groups[0]["eps"],
      "clip_gradients": {
          "type": cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE,
          "value": cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE,
      },
      **common.official_provenance(),
  }
  common.save_fixture(out_dir / FIXTURE_NAME, arrays, meta)


if __name__ == "__main__":
  common.stage_main(__doc__.splitlines()[0], common.write_r50_inputs, run_official)
