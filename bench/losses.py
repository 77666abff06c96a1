"""Times the mask-free losses (forward + backward) against the official PyTorch release.

Workload (same as ../shared/tools/official_loss_bench.py): per step, from uint8 frames, 4x pooling,
RGB -> Lab, spatial and temporal colour similarities, then projection, pairwise and TK losses for
every deep-supervision layer over the matched instances, forward and backward.

  python bench/losses.py                              # ours only
  python bench/losses.py --official_repo /path/to/SysCV/MaskFreeVIS   # plus the official, side by side

Each side runs in its own process so that peak RSS is its own.
"""

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--clips", type=int, default=2)
  p.add_argument("--frames", type=int, default=3)
  p.add_argument("--height", type=int, default=384)
  p.add_argument("--width", type=int, default=640)
  p.add_argument("--instances", type=int, default=5)
  p.add_argument("--queries", type=int, default=100)
  p.add_argument("--layers", type=int, default=10)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument(
      "--box_window_fractions",
      type=float,
      nargs="*",
      default=[0.5],
      help="MaskFreeLossConfig.box_window_fractions; none: whole frames always",
  )
  p.add_argument(
      "--official_repo",
      default="",
      help="git dir of SysCV/MaskFreeVIS; also runs the official losses",
  )
  p.add_argument(
      "--official_tool", default=str(REPO.parent / "shared/tools/official_loss_bench.py")
  )
  p.add_argument("--ours_only", action="store_true", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def run_ours(a):
  """Runs our losses in this process; returns a dict of figures."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from maskfreevis_jax import losses

  cfg = losses.MaskFreeLossConfig(box_window_fractions=tuple(a.box_window_fractions))
  b, t, h, w, n, q = a.clips, a.frames, a.height, a.width, a.instances, a.queries
  rng = np.random.default_rng(0)
  frames = jnp.asarray(rng.integers(0, 256, size=(b, t, h, w, 3)), jnp.uint8)
  x1 = rng.integers(0, w // 2, size=(b, n))
  y1 = rng.integers(0, h // 2, size=(b, n))
  boxes = np.stack([x1, y1, x1 + w // 3, y1 + h // 3], -1)[:, :, None].repeat(t, 2)
  boxes = jnp.asarray(boxes, jnp.float32)  # [B, N, T, 4]
  box_valid = jnp.ones((b, n, t), bool)
  instance_valid = jnp.ones((b, n), bool)
  matched = jnp.tile(jnp.arange(n), (b, 1))  # query matched to each target, [B, N]
  logits = jnp.asarray(rng.normal(size=(b, q, t, h // 4, w // 4)), jnp.float32)

  @jax.jit
  def step(frames, logits, step_index):
    affinities = losses.compute_color_affinities(frames, cfg)  # once per batch
    box_masks = losses.box_masks_at_stride(boxes, box_valid, (h, w), cfg.stride)

    def total(logits):
      # Matched queries' logits, [B, N, T, h, w]; every layer reads the same predictions, as in
      # the official bench, but through a distinct scale so no layer's work can be shared.
      gathered = jnp.take_along_axis(logits, matched[:, :, None, None, None], axis=1)

      def one_layer(scale):
        terms = losses.mask_free_losses(
            gathered * scale, box_masks, instance_valid, affinities, step_index, cfg
        )
        return sum(terms.values())

      return jnp.sum(jax.vmap(one_layer)(1.0 + 0.01 * jnp.arange(a.layers)))

    return jax.value_and_grad(total)(logits)

  t0 = time.perf_counter()
  compiled = step.lower(frames, logits, 5000).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(frames, logits, 5000))
  times = []
  for _ in range(a.repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(frames, logits, 5000))
    times.append(time.perf_counter() - t0)
  times.sort()
  return {
      "compile_s": compile_s,
      "min_s": times[0],
      "median_s": times[len(times) // 2],
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "devices": str(jax.devices()[0].platform),
  }


def run_official(a):
  """Runs the shared official bench in a child process; returns its figures and its peak RSS."""
  tool_args = [
      "--repo",
      a.official_repo,
      "--layers",
      str(a.layers),
      "--clips",
      str(a.clips),
      "--frames",
      str(a.frames),
      "--height",
      str(a.height),
      "--width",
      str(a.width),
      "--instances",
      str(a.instances),
      "--repeats",
      str(a.repeats),
  ]
  # Run the tool inside a tiny wrapper that reports the child's own peak RSS.
  wrapper = (
      "import resource, runpy, sys; sys.argv = sys.argv[1:]; "
      "runpy.run_path(sys.argv[0], run_name='__main__'); "
      "print('peak_rss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
  )
  out = (
      subprocess.run(
          [sys.executable, "-c", wrapper, a.official_tool] + tool_args,
          check=True,
          capture_output=True,
          text=True,
      )
      .stdout.strip()
      .splitlines()
  )
  rss_kb = float(out[-1].split()[1])
  line = out[-2]
  parts = line.split()
  return {
      "min_s": float(parts[parts.index("min") + 1].rstrip("s")),
      "median_s": float(parts[parts.index("median") + 1].rstrip("s")),
      "peak_rss_mb": rss_kb / 1024,
      "line": line,
  }


def main(argv=None):
  a = parse_args(argv)
  if a.ours_only:
    print(json.dumps(run_ours(a)))
    return
  workload = (
      f"clips={a.clips} frames={a.frames} {a.height}x{a.width} instances={a.instances} "
      f"queries={a.queries} layers={a.layers}, forward+backward from uint8 frames"
  )
  print(f"workload: {workload}")

  def ours_with(fractions):
    args = [
        f"--{name}={getattr(a, name)}"
        for name in (
            "clips",
            "frames",
            "height",
            "width",
            "instances",
            "queries",
            "layers",
            "repeats",
        )
    ]
    args += ["--box_window_fractions"] + [str(f) for f in fractions]
    out = subprocess.run(
        [sys.executable, __file__, "--ours_only"] + args, check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])

  # The windowed path runs when every box of the batch fits the window (as in this workload); a
  # batch with a large box takes the whole-frame path, timed too so both figures are on record.
  variants = [("box windows " + str(a.box_window_fractions), a.box_window_fractions)]
  if a.box_window_fractions:
    variants.append(("whole frames", []))
  results = []
  for label, fractions in variants:
    ours = ours_with(fractions)
    results.append(ours)
    print(
        f"maskfreevis_jax ({ours['devices']}, {label}): compile {ours['compile_s']:.2f}s, "
        f"step min {ours['min_s']:.3f}s median {ours['median_s']:.3f}s, "
        f"peak RSS {ours['peak_rss_mb']:.0f} MB"
    )
  ours = results[0]
  if a.official_repo:
    official = run_official(a)
    print(
        f"official (torch, CPU):  step min {official['min_s']:.3f}s "
        f"median {official['median_s']:.3f}s, peak RSS {official['peak_rss_mb']:.0f} MB"
    )
    for (label, _), ours in zip(variants, results):
      print(
          f"speed-up ({label}, median): {official['median_s'] / ours['median_s']:.1f}x; "
          f"peak RSS ratio official/ours: {official['peak_rss_mb'] / ours['peak_rss_mb']:.2f}"
      )


if __name__ == "__main__":
  main()
