"""The real pieces together: the tiny model, the box-supervised criterion and synthetic box-only
clips from the input pipeline; repeated steps on the same clips must bring the loss down."""

import jax
import ml_collections
import numpy as np
import optax

from maskfreevis_jax import criterion
from maskfreevis_jax import models
from maskfreevis_jax.data import input_pipeline
from maskfreevis_jax.data import synthetic


def test_tiny_box_supervised_loss_goes_down(tmp_path):
  config = ml_collections.ConfigDict()
  config.data = input_pipeline.default_data_config()
  config.data.batch_size = 2
  config.data.synthetic.cache_dir = str(tmp_path / "synthetic")
  config.data.synthetic.num_train_videos = 4
  config.data.synthetic.num_val_videos = 1
  batch = next(input_pipeline.create_train_iterator(config, seed=0))
  assert batch["instance_valid"].any(), "the clips must hold box-annotated instances"
  assert "masks" not in batch  # box-only supervision

  model_config = models.get_model_config("tiny", num_classes=len(synthetic.SHAPE_CLASSES))
  model = models.build_model(model_config)
  variables = model.init(jax.random.PRNGKey(0), batch["frames"])
  params = variables["params"]
  others = {k: v for k, v in variables.items() if k != "params"}
  crit = criterion.default_criterion_config()
  crit.num_classes = model_config.num_classes
  tx = optax.adamw(1e-3, weight_decay=0.05)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, i):
    def loss_fn(p):
      outputs = model.apply({"params": p, **others}, batch["frames"],
                            image_valid=batch["image_valid"])
      return criterion.set_criterion(outputs, batch, i, crit)

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, terms

  losses = []
  for i in range(25):
    params, opt_state, loss, terms = step(params, opt_state, i)
    losses.append(float(loss))
  assert all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:3]), losses
  assert float(terms["loss_mask_proj"]) > 0 and float(terms["loss_bound"]) >= 0
