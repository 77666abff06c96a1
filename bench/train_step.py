"""Benchmarks the full train step (model + matcher + criterion + optimizer) on any jax backend.

The step is the real one: `Experiment.trainer` (maskfreevis_jax/experiment.py) on the release's main R50 recipe
(`configs/maskfreevis.py:ytvis19_r50`, its video-clip step) with the chosen preset, clip shape,
compute dtype and rematerialisation policies, fed a synthetic batch of that shape.

Usage:
  .venv/bin/python bench/train_step.py                      # r50, 2 clips x 3 frames/device, 480x864
  .venv/bin/python bench/train_step.py --frames 5 --dtype bfloat16 --remat full --steps 0
  .venv/bin/python bench/train_step.py --preset tiny --height 128 --width 128 --steps 5

Prints: compile time; step time and clips/s (median of --steps timed steps after one warm-up
step; --steps 0 only compiles); FLOPs per step and device (XLA cost analysis); MFU against the
device's peak FLOP/s (PEAK_FLOPS; "not meaningful" on CPU); device memory from the compiled
executable's memory analysis (arguments + outputs + temporaries - donated aliases) and, where the
backend reports it, the measured peak. --json appends the figures as one JSON line to a file.

Ahead-of-time TPU compile (no TPU needed): with libtpu importable (installed aside, see
requirements-tpu-aot.txt), --aot_topology compiles the same step for a TPU topology on this host
and prints its compile-time FLOPs and memory (nothing runs, so no step time):
  JAX_PLATFORMS=cpu PYTHONPATH=/tmp/libtpu .venv/bin/python bench/train_step.py \
      --aot_topology v5p:2x2x1 --frames 5 --dtype bfloat16 --remat full
"""

import argparse
import importlib.util
import json
import pathlib
import statistics
import time

import jax
import numpy as np

from maskfreevis_jax import train_step
from maskfreevis_jax import experiment
from maskfreevis_jax import models
from maskfreevis_jax import sharding as sharding_lib

RECIPES = pathlib.Path(__file__).resolve().parents[1] / "configs" / "maskfreevis.py"

# Peak dense FLOP/s per chip (vendor figures). "float32" is what a float32 matmul runs at under
# XLA's default precision: TPUs multiply float32 in bfloat16 passes (so the bfloat16 peak), NVIDIA
# Ampere/Hopper GPUs in TF32.
PEAK_FLOPS = {
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},  # v5e
    "TPU v5e": {"bfloat16": 197e12, "float32": 197e12},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12},
    "TPU v5": {"bfloat16": 459e12, "float32": 459e12},  # v5p reports itself as "TPU v5"
    "A100": {"bfloat16": 312e12, "float32": 156e12},
    "H100": {"bfloat16": 989e12, "float32": 495e12},  # SXM
    "H200": {"bfloat16": 989e12, "float32": 495e12},
}

# Shorthands for --remat: which model parts get the policy.
_REMAT_PARTS = ("backbone", "pixel_decoder", "decoder")


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """Peak FLOP/s of `device_kind` (e.g. 'TPU v4', 'NVIDIA H100 80GB HBM3') or None if unknown."""
  # Longest names first, so 'TPU v5 lite' wins over 'TPU v5'.
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):
    if name.lower() in device_kind.lower():
      return PEAK_FLOPS[name][dtype]
  return None


def parse_remat(spec: str) -> dict[str, str]:
  """'full' (every part) or 'backbone=full,decoder=dots' -> {part: policy}; others 'none'."""
  policies = dict.fromkeys(_REMAT_PARTS, "none")
  if "=" not in spec:
    return dict.fromkeys(_REMAT_PARTS, spec)
  for item in spec.split(","):
    part, _, policy = item.partition("=")
    if part not in policies:
      raise ValueError(f"--remat part {part!r} not in {_REMAT_PARTS}")
    policies[part] = policy
  return policies


def topology_options(topology: str) -> dict[str, list[int]]:
  """Extra `get_topology_desc` options for a TPU topology name such as 'v5p:2x2x1' or 'v5e:1x1'.

  libtpu assumes hosts of 2x2x1 chips; a smaller slice must name its own host bounds.
  """
  generation, _, layout = topology.partition(":")
  try:
    dims = [int(d) for d in layout.split("x")]
  except ValueError:
    dims = []
  if not generation or not 2 <= len(dims) <= 3 or min(dims) < 1:
    raise ValueError(f"--aot_topology must look like 'v5p:2x2x1' or 'v5e:2x2', got {topology!r}")
  if np.prod(dims) >= 4:
    return {}
  return {"chips_per_host_bounds": dims + [1] * (3 - len(dims))}


def aot_devices(topology: str) -> list:
  """Compile-only TPU devices of `topology` (needs libtpu importable, no TPU attached)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  options = topology_options(topology)
  try:
    return list(
        topologies.get_topology_desc(topology_name=topology, platform="tpu", **options).devices
    )
  except Exception as e:  # pylint: disable=broad-except
    raise SystemExit(
        f"--aot_topology {topology!r}: no TPU compiler ({type(e).__name__}: "
        f"{str(e).splitlines()[0]}); install libtpu aside, see "
        "requirements-tpu-aot.txt"
    ) from None


def bench_config(args: argparse.Namespace, num_devices: int):
  """The official recipe at the requested preset, shape, dtype, remat and loss-layer loop."""
  spec = importlib.util.spec_from_file_location("maskfreevis_recipes", RECIPES)
  recipes = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipes)
  config = recipes.get_config("ytvis19_r50")
  config.model = models.get_model_config(args.preset, num_classes=args.num_classes)
  config.criterion.num_classes = args.num_classes
  config.model.dtype = args.dtype
  for part, policy in parse_remat(args.remat).items():
    config.model[part].remat = policy
  config.model.pixel_decoder.force_float32 = not args.bf16_pixel_decoder
  config.model.pixel_decoder.packed_gather = args.packed_gather
  config.criterion.layer_loop = args.layer_loop
  config.train.batch_size = args.clips * num_devices
  return config


def synthetic_batch(
    clips: int,
    frames: int,
    height: int,
    width: int,
    max_instances: int,
    instances: int,
    seed: int = 0,
) -> dict[str, np.ndarray]:
  """A training batch of the pipeline's layout: `instances` boxed objects per clip.

  Returns:
    frames uint8 [B, T, H, W, 3], image_valid bool [B, H, W], boxes float32 [B, N, T, 4] (x1, y1,
    x2, y2 pixels), box_valid bool [B, N, T], labels int32 [B, N], instance_valid bool [B, N].
  """
  rng = np.random.default_rng(seed)
  shape = (clips, max_instances)
  size = rng.uniform(0.15, 0.45, shape + (frames, 2)) * (width, height)
  corner = rng.uniform(0.0, 1.0, shape + (frames, 2)) * ((width, height) - size)
  valid = np.arange(max_instances) < instances
  return {
      "frames": rng.integers(0, 256, (clips, frames, height, width, 3), dtype=np.uint8),
      "image_valid": np.ones((clips, height, width), bool),
      "boxes": np.concatenate([corner, corner + size], -1).astype(np.float32),
      "box_valid": np.broadcast_to(valid[None, :, None], shape + (frames,)).copy(),
      "labels": rng.integers(0, 40, shape).astype(np.int32),
      "instance_valid": np.broadcast_to(valid[None], shape).copy(),
  }


def memory_figures(compiled) -> dict[str, float]:
  """GiB per device from the compiled executable's memory analysis (empty if unavailable)."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return {}
  gib = 2.0**30
  figures = {
      "arguments_gib": analysis.argument_size_in_bytes / gib,
      "outputs_gib": analysis.output_size_in_bytes / gib,
      "temporaries_gib": analysis.temp_size_in_bytes / gib,
      "aliased_gib": analysis.alias_size_in_bytes / gib,
  }
  figures["peak_estimate_gib"] = (
      figures["arguments_gib"]
      + figures["outputs_gib"]
      + figures["temporaries_gib"]
      - figures["aliased_gib"]
  )
  return figures


def step_flops(compiled) -> float | None:
  """FLOPs of one step on one device from XLA's cost analysis (None if unavailable)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per device program
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  return float(analysis["flops"])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="r50", help="model preset (models.PRESETS)")
  parser.add_argument("--num_classes", type=int, default=40)
  parser.add_argument("--clips", type=int, default=2, help="clips per device")
  parser.add_argument("--frames", type=int, default=3)
  parser.add_argument("--height", type=int, default=480)
  parser.add_argument("--width", type=int, default=864)
  parser.add_argument("--max_instances", type=int, default=25, help="padded instance slots")
  parser.add_argument("--instances", type=int, default=5, help="real instances per clip")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument(
      "--bf16_pixel_decoder",
      action="store_true",
      help="run the pixel decoder in --dtype too (default float32, as official)",
  )
  parser.add_argument(
      "--packed_gather",
      action="store_true",
      help="deformable attention gathers packed 4-corner rows (try on TPU)",
  )
  parser.add_argument(
      "--remat",
      default="none",
      help="policy for every part ('none', 'full', 'dots') or per part, "
      "e.g. 'backbone=full,pixel_decoder=full,decoder=dots'",
  )
  parser.add_argument(
      "--layer_loop",
      default="vmap",
      choices=["vmap", "map"],
      help="criterion.layer_loop: 'map' rematerialises the loss layer by layer",
  )
  parser.add_argument("--steps", type=int, default=3, help="timed steps (0: compile only)")
  parser.add_argument("--json", default="", help="append the figures as a JSON line here")
  parser.add_argument(
      "--aot_topology",
      default="",
      help="compile only, for this TPU topology (e.g. 'v5p:2x2x1', 'v5e:1x1'); "
      "needs libtpu importable, see requirements-tpu-aot.txt",
  )
  args = parser.parse_args()

  if args.aot_topology:
    devices = aot_devices(args.aot_topology)
    backend = f"tpu, compile only for {args.aot_topology}"
    args.steps = 0
  else:
    devices = jax.devices()
    backend = jax.default_backend()
  device_kind = devices[0].device_kind
  config = bench_config(args, len(devices))
  mesh = sharding_lib.create_mesh(int(config.sharding.model_axis_size), devices)
  batch = synthetic_batch(
      args.clips * len(devices),
      args.frames,
      args.height,
      args.width,
      args.max_instances,
      args.instances,
  )
  trainer = experiment.build_experiment(config, mesh=mesh).trainer(
      train_step.abstract_batch(batch, process_count=1)
  )
  print(
      f"preset={args.preset} dtype={args.dtype} pixel_decoder="
      f"{'float32' if config.model.pixel_decoder.force_float32 else args.dtype} "
      f"remat={parse_remat(args.remat)} layer_loop={args.layer_loop} "
      f"packed_gather={args.packed_gather} "
      f"batch={args.clips} clips x {args.frames} frames x {args.height}x{args.width} per device, "
      f"{len(devices)} x {device_kind} ({backend})",
      flush=True,
  )

  start = time.perf_counter()
  abstract = train_step.abstract_batch(batch, process_count=1)
  compiled = trainer.train_step.lower(trainer.abstract_state, abstract).compile()
  compile_s = time.perf_counter() - start
  print(f"compile: {compile_s:.1f} s", flush=True)
  flops = step_flops(compiled)
  memory = memory_figures(compiled)
  if flops is not None:
    print(f"FLOPs per step and device (XLA cost analysis): {flops / 1e12:.3f} TFLOP")
  if memory:
    print(
        "memory per device (compiled memory analysis): "
        f"{memory['peak_estimate_gib']:.2f} GiB = arguments {memory['arguments_gib']:.2f} "
        f"+ outputs {memory['outputs_gib']:.2f} + temporaries {memory['temporaries_gib']:.2f} "
        f"- donated {memory['aliased_gib']:.2f}",
        flush=True,
    )

  results = dict(
      vars(args),
      device_kind=device_kind,
      num_devices=len(devices),
      backend=backend,
      compile_s=compile_s,
      flops=flops,
      **memory,
  )
  if args.steps > 0:
    state = trainer.init_state(jax.random.key(0))
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
      start = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    clips_per_s = args.clips * len(devices) / step_s
    print(
        f"step: {step_s:.3f} s (median of {args.steps}), {clips_per_s:.2f} clips/s, "
        f"loss {float(metrics['loss']):.4f}"
    )
    peak = peak_flops(device_kind, args.dtype)
    if jax.default_backend() == "cpu":
      print("MFU: not meaningful on CPU")
    elif flops is None or peak is None:
      print(f"MFU: unknown (no peak FLOP/s for {device_kind!r} in PEAK_FLOPS)")
    else:
      mfu = flops / step_s / peak
      results["mfu"] = mfu
      print(
          f"MFU: {100 * mfu:.1f}% of {peak / 1e12:.0f} TFLOP/s ({args.dtype} peak, "
          f"{device_kind})"
      )
    stats = devices[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      results["measured_peak_gib"] = stats["peak_bytes_in_use"] / 2**30
      print(f"measured peak device memory: {results['measured_peak_gib']:.2f} GiB")
    results.update(step_s=step_s, clips_per_s=clips_per_s)
  if args.json:
    with open(args.json, "a") as f:
      f.write(json.dumps(results) + "\n")


if __name__ == "__main__":
  main()
