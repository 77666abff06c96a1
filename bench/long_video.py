"""Long videos: memory, speed, identity switches and AP of whole-video vs windowed inference.

Usage:
  .venv/bin/python bench/long_video.py --workdir WORKDIR          # a trained run's checkpoint
  .venv/bin/python bench/long_video.py --random_init --lengths 100  # smoke check, no checkpoint

For every length (default 100, 300, 1000 frames) a long synthetic video is written once
(`synthetic.write_long_video`: residents crossing and occluding each other, visitors entering and
leaving) and predicted by `--mode predict`'s streaming path (`predict.predict`, overlays off) in
three modes, each in a fresh process so that its peak RSS is its own:
  whole       one clip (official; only up to --whole_max_frames frames);
  windows     windows of --window frames sharing --overlap, queries not associated;
  associated  the same windows, queries associated across windows (Hungarian).
Printed per run: peak RSS and peak device memory (when the backend reports it), seconds per frame
(compilation included), identity switches per 100 frames against the ground-truth tracks
(per frame, tracks matched to ground truth by Hungarian matching on mask IoU >= 0.5; a switch is a
ground-truth track matched to another predicted track than the last time), the fraction of
ground-truth masks matched, and the YouTube-VIS mask AP.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
MODES = ("whole", "windows", "associated")


def _config(args, mode: str):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("bench_config", REPO / "configs" / "synthetic.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.eval.window_size = 0 if mode == "whole" else args.window
  config.eval.window_overlap = args.overlap
  config.eval.associate = mode == "associated"
  config.eval.association_embed_weight = args.embed_weight
  config.eval.association_mask_weight = args.mask_weight
  return config


def run_one(args) -> None:
  """Child process: predicts one video in one mode, prints a JSON line of measurements."""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from maskfreevis_jax import models  # pylint: disable=g-import-not-at-top
  from maskfreevis_jax import predict  # pylint: disable=g-import-not-at-top
  from maskfreevis_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  config = _config(args, args.mode)
  if args.random_init:
    model = models.build_model(config.model)
    variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 2, 128, 128, 3), np.uint8))
  else:
    variables = serialization.msgpack_restore(pathlib.Path(args.variables).read_bytes())
  start = time.perf_counter()
  out = predict.predict(config, args.out, args.frames_dir, args.out, variables=variables,
                        class_names=synthetic.SHAPE_CLASSES, overlay=False, progress_every=60.0)
  seconds = time.perf_counter() - start
  stats = jax.local_devices()[0].memory_stats() or {}
  print("RESULT " + json.dumps({
      "seconds": seconds, "num_frames": out["num_frames"], "results": out["results"],
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "device_peak_mb": (stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats
                         else None)}), flush=True)


def identity_switches(gt: dict, results: list[dict], iou_threshold: float = 0.5
                      ) -> tuple[int, float]:
  """(identity switches, fraction of ground-truth masks matched) of one video's tracks."""
  from pycocotools import mask as mask_utils  # pylint: disable=g-import-not-at-top
  from scipy import optimize  # pylint: disable=g-import-not-at-top
  # A query kept with two classes is one track.
  tracks, seen = [], set()
  for r in sorted(results, key=lambda r: -r["score"]):
    key = json.dumps(r["segmentations"])
    if key not in seen:
      seen.add(key)
      tracks.append(r["segmentations"])
  truths = [a["segmentations"] for a in gt["annotations"]]
  num_frames = gt["videos"][0]["length"]
  last = {}
  switches = matched = present = 0
  for t in range(num_frames):
    gt_ids = [g for g, s in enumerate(truths) if s[t] is not None]
    present += len(gt_ids)
    pred_ids = [p for p, s in enumerate(tracks) if mask_utils.area(s[t]) > 0]
    if not gt_ids or not pred_ids:
      continue
    ious = mask_utils.iou([tracks[p][t] for p in pred_ids], [truths[g][t] for g in gt_ids],
                          [0] * len(gt_ids))
    rows, cols = optimize.linear_sum_assignment(-ious)
    for r, c in zip(rows, cols):
      if ious[r, c] < iou_threshold:
        continue
      matched += 1
      g, p = gt_ids[c], pred_ids[r]
      if g in last and last[g] != p:
        switches += 1
      last[g] = p
  return switches, matched / max(present, 1)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="", help="training run whose latest checkpoint is used")
  parser.add_argument("--random_init", action="store_true",
                      help="randomly initialised tiny model (smoke check; figures meaningless)")
  parser.add_argument("--lengths", type=int, nargs="+", default=[100, 300, 1000])
  parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
  parser.add_argument("--window", type=int, default=12)
  parser.add_argument("--overlap", type=int, default=4)
  parser.add_argument("--embed_weight", type=float, default=1.0)
  parser.add_argument("--mask_weight", type=float, default=1.0)
  parser.add_argument("--whole_max_frames", type=int, default=300)
  parser.add_argument("--data_dir", default="/tmp/maskfreevis_long_video")
  parser.add_argument("--seed", type=int, default=0)
  # Internal: one measurement in a child process.
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--mode", help=argparse.SUPPRESS)
  parser.add_argument("--frames_dir", help=argparse.SUPPRESS)
  parser.add_argument("--out", help=argparse.SUPPRESS)
  parser.add_argument("--variables", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    run_one(args)
    return
  if not args.random_init and not args.workdir:
    parser.error("pass --workdir of a trained run, or --random_init for a smoke check")

  from maskfreevis_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from maskfreevis_jax.evaluation import ytvis_eval  # pylint: disable=g-import-not-at-top
  model_name = "random init (smoke check)" if args.random_init else f"checkpoint in {args.workdir}"
  print(f"model: tiny VideoMaskFormer, {model_name}; windows of {args.window} frames sharing "
        f"{args.overlap}; association weights embed {args.embed_weight}, mask "
        f"{args.mask_weight}", flush=True)
  variables_path = pathlib.Path(args.data_dir) / "variables.msgpack"
  if not args.random_init:
    # Restored once here (Orbax is slow on a busy machine); the children read plain msgpack.
    from flax import serialization  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    from maskfreevis_jax.evaluate import restore_variables  # pylint: disable=g-import-not-at-top
    variables, step = restore_variables(args.workdir)
    variables_path.parent.mkdir(parents=True, exist_ok=True)
    variables_path.write_bytes(serialization.msgpack_serialize(jax.device_get(variables)))
    print(f"restored step {step}", flush=True)
  header = (f"{'frames':>6} {'mode':>10} {'peak RSS MB':>11} {'device MB':>9} {'s/frame':>7} "
            f"{'ID sw/100f':>10} {'matched':>7} {'AP':>6}")
  rows = []
  for length in args.lengths:
    data = pathlib.Path(args.data_dir) / f"seed{args.seed}_{length}"
    if not (data / "valid.json").exists():
      synthetic.write_long_video(str(data), length, seed=args.seed)
    gt = json.loads((data / "valid.json").read_text())
    frames_dir = data / "valid" / "JPEGImages" / f"long_{length:05d}"
    for mode in args.modes:
      if mode == "whole" and length > args.whole_max_frames:
        continue
      out = data / f"out_{mode}"
      command = [sys.executable, __file__, "--child", "--mode", mode, "--frames_dir",
                 str(frames_dir), "--out", str(out), "--window", str(args.window), "--overlap",
                 str(args.overlap), "--embed_weight", str(args.embed_weight), "--mask_weight",
                 str(args.mask_weight)]
      command += ["--random_init"] if args.random_init else ["--variables", str(variables_path)]
      proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
      lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
      if proc.returncode or not lines:
        print(f"{length} frames, {mode}: failed\n{proc.stderr[-2000:]}", flush=True)
        continue
      measured = json.loads(lines[-1][len("RESULT "):])
      results = json.loads(pathlib.Path(measured["results"]).read_text())
      for r in results:
        r["video_id"] = gt["videos"][0]["id"]
        r.pop("file_names", None)
      switches, matched = identity_switches(gt, results)
      ap = ytvis_eval.evaluate_ytvis(gt, results)["AP"]
      device = measured["device_peak_mb"]
      row = (f"{length:>6} {mode:>10} {measured['peak_rss_mb']:>11.0f} "
             f"{'n/a' if device is None else f'{device:.0f}':>9} "
             f"{measured['seconds'] / length:>7.3f} {100 * switches / length:>10.2f} "
             f"{matched:>7.2f} {ap:>6.2f}")
      rows.append(row)
      print(header + "\n" + row if len(rows) == 1 else row, flush=True)
  print("\n" + header + "\n" + "\n".join(rows), flush=True)


if __name__ == "__main__":
  main()
