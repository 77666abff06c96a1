"""Benchmarks the two gathers of `ms_deform_attn_core`: 4 corner rows vs one packed-corner row.

Usage:
  .venv/bin/python bench/deformable_attention.py             # r50 encoder shapes, 3 x 384x640
  .venv/bin/python bench/deformable_attention.py --frames 1 --height 480 --width 864

Per variant: the gather ops and gathered indices in the optimised HLO of forward+backward, then
the median forward+backward time (runs interleaved, so machine load hits both alike).
"""

import argparse
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from maskfreevis_jax.models.deformable_attention import ms_deform_attn_core


def gather_counts(hlo_text: str) -> tuple[int, int]:
  """(number of gather ops, total gathered indices) in optimised HLO text."""
  ops, indices = 0, 0
  for line in hlo_text.splitlines():
    gather = re.search(r"= \w+\[([\d,]*)\]\S* gather\(", line)
    slices = re.search(r"slice_sizes=\{([\d,]*)\}", line)
    if gather and slices:
      ops += 1
      out_size = np.prod([int(x) for x in gather.group(1).split(",") if x])
      slice_size = np.prod([int(x) for x in slices.group(1).split(",") if x])
      indices += int(out_size // slice_size)
  return ops, indices


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--frames", type=int, default=3)
  parser.add_argument("--height", type=int, default=384)
  parser.add_argument("--width", type=int, default=640)
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  args = parser.parse_args()

  # The r50 encoder layer: levels at strides 32, 16, 8, 8 heads of 32 channels, 4 points.
  shapes = tuple((args.height // s, args.width // s) for s in (32, 16, 8))
  n, m, d, p = args.frames, 8, 32, 4
  lq = s = sum(h * w for h, w in shapes)
  rng = np.random.default_rng(0)
  value = jnp.asarray(rng.normal(size=(n, s, m, d)), args.dtype)
  locations = jnp.asarray(rng.uniform(-0.05, 1.05, size=(n, lq, m, len(shapes), p, 2)), jnp.float32)
  weights = jnp.asarray(rng.uniform(size=(n, lq, m, len(shapes), p)), jnp.float32)
  print(
      f"levels {shapes}, N={n}, Lq={lq}, M={m}, D={d}, P={p}, {args.dtype}, "
      f"backend {jax.default_backend()}"
  )

  compiled = {}
  for packed in (False, True):

    def loss(value, locations, weights, packed=packed):
      out = ms_deform_attn_core(value, shapes, locations, weights, packed=packed)
      return jnp.sum(out.astype(jnp.float32) ** 2)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    compiled[packed] = step.lower(value, locations, weights).compile()
    ops, indices = gather_counts(compiled[packed].as_text())
    print(
        f"{'packed' if packed else 'rows  '}: {ops} gather ops, {indices:,} gathered indices "
        "(forward+backward HLO)"
    )

  times = {False: [], True: []}
  for packed in (False, True):  # warm-up
    jax.block_until_ready(compiled[packed](value, locations, weights))
  for _ in range(args.runs):
    for packed in (False, True):
      start = time.perf_counter()
      jax.block_until_ready(compiled[packed](value, locations, weights))
      times[packed].append(time.perf_counter() - start)
  rows, packed = statistics.median(times[False]), statistics.median(times[True])
  print(
      f"forward+backward median of {args.runs}: rows {rows:.3f} s, packed {packed:.3f} s "
      f"(packed / rows = {packed / rows:.2f})"
  )


if __name__ == "__main__":
  main()
