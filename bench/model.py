"""Benchmarks the VideoMaskFormer forward and forward+backward on CPU (or any jax backend).

Usage:
  .venv/bin/python bench/model.py                       # r50, 1 clip x 3 frames, 384x640
  .venv/bin/python bench/model.py --preset tiny --height 128 --width 128 --batch 2

Prints compile times, median step times over --runs runs and the peak RSS of the process.
Official reference on the 2-core dev CPU (torch 2.13): 3.85 s forward, 14.6 s fwd+bwd.
"""

import argparse
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from maskfreevis_jax import defaults
from maskfreevis_jax import experiment


def _median_seconds(fn, runs):
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="r50")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--frames", type=int, default=3)
  parser.add_argument("--height", type=int, default=384)
  parser.add_argument("--width", type=int, default=640)
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--skip_backward", action="store_true")
  args = parser.parse_args()

  config = defaults.get_config(args.preset)
  config.model.dtype = args.dtype
  model = experiment.build_experiment(config).model
  rng = np.random.default_rng(0)
  frames = jnp.asarray(
      rng.integers(0, 256, (args.batch, args.frames, args.height, args.width, 3), dtype=np.uint8)
  )
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), frames)
  params = variables["params"]
  others = {k: v for k, v in variables.items() if k != "params"}
  print(
      f"preset={args.preset} dtype={args.dtype} input={tuple(frames.shape)} "
      f"backend={jax.default_backend()} devices={jax.local_device_count()}"
  )

  @jax.jit
  def forward(params, frames):
    return model.apply({"params": params, **others}, frames)

  def loss_fn(params, frames):
    out = model.apply({"params": params, **others}, frames)
    return jnp.mean(out["pred_masks"] ** 2) + jnp.mean(out["pred_logits"] ** 2)

  grad_step = jax.jit(jax.value_and_grad(loss_fn))

  start = time.perf_counter()
  compiled_forward = forward.lower(params, frames).compile()
  print(f"forward compile: {time.perf_counter() - start:.1f} s")
  jax.block_until_ready(compiled_forward(params, frames))
  fwd = _median_seconds(lambda: compiled_forward(params, frames), args.runs)
  print(f"forward: {fwd:.3f} s (median of {args.runs})")
  if not args.skip_backward:
    start = time.perf_counter()
    compiled_grad = grad_step.lower(params, frames).compile()
    print(f"fwd+bwd compile: {time.perf_counter() - start:.1f} s")
    jax.block_until_ready(compiled_grad(params, frames))
    both = _median_seconds(lambda: compiled_grad(params, frames), args.runs)
    print(f"forward+backward: {both:.3f} s (median of {args.runs})")
  peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print(f"peak RSS: {peak_gib:.2f} GiB")


if __name__ == "__main__":
  main()
