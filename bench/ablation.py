"""Ablation of the mask-free losses on the synthetic videos, every arm from the same stage-1 weights.

Arms (stage 2 of the embedded default, `configs/synthetic.py`, with these overrides):
  proj         box projection only
  boxinst      projection + pairwise (the BoxInst baseline)
  maskfreevis  projection + pairwise + TK-Loss (MaskFreeVIS, the default)
  mask         mask-supervised video training (the upper bound)
  tk_cyclic    MaskFreeVIS with the paper's cyclic frame pairs instead of all pairs
  tk_all       MaskFreeVIS with K = all 9 TK candidates instead of the top 5
  tk_k1        MaskFreeVIS with K = 1 (the paper's K=1 row: 1.7 AP below K=5)

Protocols (`--protocol`): the stage-1 weights every arm starts from, `boxes` (no mask anywhere:
`weights/synthetic_stage1_boxes.safetensors`, the release's `mfvis_nococo/`) or `masks`
(`weights/synthetic_stage1.safetensors`). `--val_videos N` evaluates every run on N validation
videos (the training videos do not change: each video is drawn from its own seed). `--camouflage
c` trains and evaluates on format-4 videos (a share c of camouflaged objects, docs/data.md:
`--config.data.synthetic.camouflage=c`); with `--camouflage_cover f < 1`, format-5 videos (only
a share f of each camouflaged object's area camouflaged); `--lookalike l`, format-6 videos (a
share l of objects with a stripe of their own material across their path); `--camouflage_recolour`,
format-7 videos (format 5 whose camouflaged part is another photo recoloured to the background's
colours); `--data_seed s`, another synthetic data seed (a design set: new training and validation
videos). After the runs, `--bootstrap B`
resamples the validation videos B times (the same draws for every run) and reports each arm's AP
spread over videos and the paired differences of the arms' mean AP.

Every run is `main.py --mode train_and_evaluate` in `WORKDIR/<arm>/seed<N>` (a finished run is
reused); then the matched boundary IoU and mask IoU of its results are computed
(`maskfreevis_jax.evaluation.boundary`) and the summary table (mean ± sample std over seeds)
is printed and written as markdown:

  python bench/ablation.py --workdir workdir/ablation --arms proj boxinst maskfreevis mask \
      --seeds 0 1 2 --parallel 3 --markdown docs/ablation_table.md
  python bench/ablation.py --workdir workdir/ablation --arms boxinst --seeds 1   # one arm
  python bench/ablation.py --workdir workdir/ablation --print_commands            # commands only
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import shlex
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent

ARMS = {
    "proj": (
        "box projection only",
        [
            "--config.criterion.weights.loss_bound=0",
            "--config.criterion.weights.loss_bound_neighbor=0",
        ],
    ),
    "boxinst": (
        "projection + pairwise (BoxInst)",
        ["--config.criterion.weights.loss_bound_neighbor=0"],
    ),
    "maskfreevis": ("projection + pairwise + TK-Loss (MaskFreeVIS)", []),
    "mask": (
        "mask-supervised (upper bound)",
        ["--config.criterion.mode=mask", "--config.data.with_masks=True"],
    ),
    "tk_cyclic": (
        "MaskFreeVIS, cyclic TK frame pairs",
        ["--config.criterion.mask_free.frame_pairing=cyclic"],
    ),
    "tk_all": (
        "MaskFreeVIS, TK without top-K (K = 9)",
        ["--config.criterion.mask_free.temporal_topk=9"],
    ),
    "tk_k1": (
        "MaskFreeVIS, TK with K = 1",
        ["--config.criterion.mask_free.temporal_topk=1"],
    ),
}
# Paired comparisons reported after the table (first minus second).
PAIRS = (
    ("boxinst", "proj"),
    ("maskfreevis", "boxinst"),
    ("mask", "maskfreevis"),
    ("maskfreevis", "tk_k1"),
    ("maskfreevis", "tk_cyclic"),
    ("tk_cyclic", "boxinst"),  # the release's video-only recipe (`mfvis_nococo/`) pairs cyclically
)
METRICS = (
    ("AP", "AP"),
    ("AP75", "AP75"),
    ("boundary_iou", "boundary IoU"),
    ("mask_iou", "mask IoU"),
)


def run_command(arm: str, seed: int, workdir: pathlib.Path, extra: list[str]) -> list[str]:
  """The main.py command line of one (arm, seed) run."""
  return [
      sys.executable,
      str(REPO / "main.py"),
      "--config",
      str(REPO / "configs/synthetic.py"),
      "--workdir",
      str(workdir / arm / f"seed{seed}"),
      "--mode",
      "train_and_evaluate",
      f"--config.train.seed={seed}",
      *ARMS[arm][1],
      *extra,
  ]


def _latest_metrics(run_dir: pathlib.Path) -> tuple[int, dict] | None:
  files = sorted((run_dir / "eval").glob("metrics_*.json"), key=lambda p: int(p.stem.split("_")[1]))
  if not files:
    return None
  return int(files[-1].stem.split("_")[1]), json.loads(files[-1].read_text())


def run_one(
    arm: str, seed: int, workdir: pathlib.Path, extra: list[str], steps: int, gt_json: str
) -> dict:
  """Runs (or reuses) one arm/seed; returns its metrics including the boundary measures."""
  from maskfreevis_jax.evaluation import boundary  # pylint: disable=g-import-not-at-top

  run_dir = workdir / arm / f"seed{seed}"
  summary_path = run_dir / "ablation.json"
  if summary_path.exists():
    cached = json.loads(summary_path.read_text())
    step = cached["step"]
    cached.setdefault("results", str(run_dir / "eval" / f"results_{step}.json"))
    return cached
  found = _latest_metrics(run_dir)
  if found is None or found[0] < steps:
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(run_dir / "log.txt", "w") as log:
      code = subprocess.call(
          run_command(arm, seed, workdir, extra), cwd=REPO, stdout=log, stderr=subprocess.STDOUT
      )
    if code:
      raise RuntimeError(f"{arm} seed {seed} failed (exit {code}); see {run_dir / 'log.txt'}")
    seconds = time.perf_counter() - start
    found = _latest_metrics(run_dir)
    if found is None:
      raise RuntimeError(f"{arm} seed {seed}: no metrics in {run_dir / 'eval'}")
  else:
    seconds = float("nan")
  step, metrics = found
  results = run_dir / "eval" / f"results_{step}.json"
  metrics = {k: float(v) for k, v in metrics.items() if not k.startswith("AP-")}
  metrics.update(boundary.matched_boundary_iou(gt_json, str(results)))
  metrics.update(arm=arm, seed=seed, step=step, seconds=seconds, results=str(results))
  summary_path.write_text(json.dumps(metrics, indent=1))
  print(
      f"{arm} seed {seed}: AP {metrics['AP']:.2f} AP75 {metrics['AP75']:.2f} boundary IoU "
      f"{metrics['boundary_iou']:.2f} ({seconds:.0f} s)",
      flush=True,
  )
  return metrics


def paired_bootstrap(
    gt_json: str, results: dict[tuple[str, int], str], num_samples: int, seed: int = 0
) -> dict[tuple[str, int], np.ndarray]:
  """AP of every run on `num_samples` resamplings of the validation videos, the same draws for
  every run (so differences between runs are paired); returns `[num_samples]` per run."""
  from maskfreevis_jax.evaluation import ytvis_eval  # pylint: disable=g-import-not-at-top

  gt = json.loads(pathlib.Path(gt_json).read_text())
  loaded = {key: json.loads(pathlib.Path(path).read_text()) for key, path in results.items()}
  return ytvis_eval.paired_bootstrap_ap(gt, loaded, num_samples, seed)


def paired_differences(
    rows: list[dict], boot: dict[tuple[str, int], np.ndarray] | None = None
) -> list[str]:
  """Per PAIRS (a, b): the mean AP difference, its spread over seeds (the same seed paired) and,
  with `boot`, over resampled validation videos (the same videos for both arms)."""
  by_run = {(r["arm"], r["seed"]): r["AP"] for r in rows}
  lines = []
  for a, b in PAIRS:
    seeds = sorted(s for arm, s in by_run if arm == a and (b, s) in by_run)
    if not seeds:
      continue
    diffs = np.array([by_run[(a, s)] - by_run[(b, s)] for s in seeds])
    std = diffs.std(ddof=1) if len(diffs) > 1 else float("nan")
    line = (
        f"- {a} - {b}: {diffs.mean():+.2f} AP over {len(seeds)} paired seeds "
        f"({' / '.join(f'{d:+.2f}' for d in diffs)}); std of the paired difference {std:.2f} "
        f"-> {diffs.mean() / std:.2f} std; standard error {std / np.sqrt(len(diffs)):.2f}"
    )
    if boot:
      sample_diff = np.mean([boot[(a, s)] - boot[(b, s)] for s in seeds], axis=0)
      line += (
          f"; over resampled videos: std {sample_diff.std(ddof=1):.2f} "
          f"({len(sample_diff)} draws), {np.mean(sample_diff > 0) * 100:.0f}% of draws > 0"
      )
    lines.append(line)
  return lines


def bootstrap_spread(rows: list[dict], boot: dict[tuple[str, int], np.ndarray]) -> list[str]:
  """Per arm: the spread of its seed-mean AP over resampled validation videos."""
  lines = []
  for arm in dict.fromkeys(r["arm"] for r in rows):
    samples = np.mean([v for (a, _), v in boot.items() if a == arm], axis=0)
    lines.append(f"- {arm}: AP spread over resampled videos (std) {samples.std(ddof=1):.2f}")
  return lines


def summary_table(rows: list[dict], arms: list[str]) -> str:
  """Markdown table: per arm, mean ± sample std over seeds of each metric."""
  lines = [
      "| arm | seeds | " + " | ".join(name for _, name in METRICS) + " |",
      "| --- | --- | " + " | ".join("---" for _ in METRICS) + " |",
  ]
  for arm in arms:
    runs = [r for r in rows if r["arm"] == arm]
    if not runs:
      continue
    cells = []
    for key, _ in METRICS:
      values = np.array([r[key] for r in runs], np.float64)
      std = values.std(ddof=1) if len(values) > 1 else float("nan")
      cells.append(f"{values.mean():.2f} ± {std:.2f}")
    lines.append(f"| {arm}: {ARMS[arm][0]} | {len(runs)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def ordering_checks(rows: list[dict]) -> list[str]:
  """The paper's claims on AP, stated as measured (no threshold is tuned here)."""

  def stats(arm):
    values = np.array([r["AP"] for r in rows if r["arm"] == arm], np.float64)
    if len(values) == 0:
      return None
    return values.mean(), (values.std(ddof=1) if len(values) > 1 else float("nan"))

  s = {arm: stats(arm) for arm in ("proj", "boxinst", "maskfreevis", "mask")}
  out = []
  if all(s.values()):
    order = [s[a][0] for a in ("proj", "boxinst", "maskfreevis", "mask")]
    holds = order[0] < order[1] < order[2] <= order[3]
    out.append(
        f"- ordering proj < boxinst < maskfreevis <= mask: "
        f"{' / '.join(f'{v:.2f}' for v in order)} -> {'holds' if holds else 'does not hold'}"
    )
  if s["boxinst"] and s["maskfreevis"]:
    spread = float(np.hypot(s["boxinst"][1], s["maskfreevis"][1]))
    margin = s["maskfreevis"][0] - s["boxinst"][0]
    out.append(
        f"- maskfreevis - boxinst = {margin:.2f} AP; std of that difference "
        f"sqrt(std_b^2 + std_m^2) = {spread:.2f} -> {margin / spread:.2f} std "
        f"(goal > 2)"
    )
  if s["maskfreevis"] and s["mask"]:
    out.append(
        f"- maskfreevis / mask = {100 * s['maskfreevis'][0] / s['mask'][0]:.0f}% of the "
        "upper bound's AP (goal >= 85%)"
    )
  return out


def _parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="workdir/ablation")
  parser.add_argument(
      "--arms", nargs="+", default=["proj", "boxinst", "maskfreevis", "mask"], choices=sorted(ARMS)
  )
  parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  parser.add_argument(
      "--steps",
      type=int,
      default=0,
      help="stage-2 steps per run (0: the config's); the lr decays at 80%%",
  )
  parser.add_argument(
      "--protocol",
      choices=("boxes", "masks"),
      default=None,
      help="stage-1 weights of every arm: box-only or mask-supervised stills (default: the "
      "config's)",
  )
  parser.add_argument(
      "--init_from",
      default="",
      help="stage-1 weights for every arm (default: the protocol's committed file)",
  )
  parser.add_argument(
      "--val_videos", type=int, default=0, help="validation videos (0: the config's 30)"
  )
  parser.add_argument(
      "--camouflage", type=float, default=0.0, help="format-4 videos with this camouflaged share"
  )
  parser.add_argument(
      "--camouflage_cover",
      type=float,
      default=1.0,
      help="format-5 videos: the camouflaged share of a camouflaged object's area",
  )
  parser.add_argument(
      "--lookalike", type=float, default=0.0, help="format-6 videos: the look-alike share"
  )
  parser.add_argument(
      "--camouflage_recolour",
      action="store_true",
      help="format-7 videos: the camouflaged part recoloured from another photo",
  )
  parser.add_argument(
      "--data_seed",
      type=int,
      default=None,
      help="synthetic data seed (default: the config's 0); another seed is a design set, "
      "training and validation videos both new",
  )
  parser.add_argument(
      "--bootstrap", type=int, default=0, help="paired resamplings of the validation videos"
  )
  parser.add_argument("--parallel", type=int, default=1, help="runs at the same time")
  parser.add_argument("--markdown", default="", help="also write the table to this file")
  parser.add_argument("--print_commands", action="store_true")
  parser.add_argument("overrides", nargs="*", help="extra --config.* overrides for every run")
  return parser.parse_args(argv)


def _stage2_config(protocol: str | None):
  import importlib.util  # pylint: disable=g-import-not-at-top

  spec = importlib.util.spec_from_file_location("synthetic_config", REPO / "configs/synthetic.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(protocol)


def data_overrides(
    config,
    val_videos: int,
    camouflage: float,
    camouflage_cover: float = 1.0,
    lookalike: float = 0.0,
    data_seed: int | None = None,
    camouflage_recolour: bool = False,
):
  """(overrides, validation JSON): the synthetic set with `val_videos` validation videos (0: the
  config's), a `camouflage` share of camouflaged objects (> 0: format 4), each on a
  `camouflage_cover` share of its area (< 1: format 5), and a `lookalike` share of objects with a
  look-alike stripe (> 0: format 6), the camouflaged part recoloured if `camouflage_recolour`
  (format 7), from `data_seed` (None: the config's), generated if absent."""
  from maskfreevis_jax.data import sources  # pylint: disable=g-import-not-at-top

  s = config.data.synthetic
  s.num_val_videos = val_videos or s.num_val_videos
  s.camouflage = camouflage
  s.camouflage_cover = camouflage_cover
  s.lookalike = lookalike
  s.seed = s.seed if data_seed is None else data_seed
  s.camouflage_recolour = camouflage_recolour
  extra = [
      f"--config.data.synthetic.num_val_videos={s.num_val_videos}",
      f"--config.data.synthetic.camouflage={camouflage}",
      f"--config.data.synthetic.camouflage_cover={camouflage_cover}",
      f"--config.data.synthetic.lookalike={lookalike}",
      f"--config.data.synthetic.seed={s.seed}",
      f"--config.data.synthetic.camouflage_recolour={camouflage_recolour}",
  ]
  return extra, os.path.join(sources.ensure_synthetic(config), "valid.json")


def main(argv=None) -> None:
  args = _parse_args(argv)
  sys.path.insert(0, str(REPO))
  config = _stage2_config(args.protocol)
  extra = list(args.overrides)
  steps = int(config.train.steps)
  if args.steps:
    steps = args.steps
    extra += [
        f"--config.train.steps={steps}",
        f"--config.train.lr_decay_steps=({int(0.8 * steps)},)",
    ]
  init_from = args.init_from or config.init_from
  if not pathlib.Path(init_from).is_file():
    raise SystemExit(
        f"stage-1 weights {init_from} not found: run bash scripts/"
        "make_stage1_weights.sh or pass --init_from"
    )
  extra.append(f"--config.init_from={os.path.abspath(init_from)}")
  workdir = pathlib.Path(args.workdir).absolute()
  jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]
  data_extra, gt_json = data_overrides(
      config,
      args.val_videos,
      args.camouflage,
      args.camouflage_cover,
      args.lookalike,
      args.data_seed,
      args.camouflage_recolour,
  )
  extra += data_extra
  if args.print_commands:
    for arm, seed in jobs:
      print(shlex.join(run_command(arm, seed, workdir, extra)))
    return

  def attempt(job):
    try:
      return run_one(*job, workdir, extra, steps, gt_json)
    except RuntimeError as e:  # one failed run must not lose the others
      print(f"error: {e}", flush=True)
      return None

  with concurrent.futures.ThreadPoolExecutor(max(1, args.parallel)) as pool:
    rows = [r for r in pool.map(attempt, jobs) if r is not None]
  boot = None
  if args.bootstrap:
    results = {(r["arm"], r["seed"]): r["results"] for r in rows}
    boot = paired_bootstrap(gt_json, results, args.bootstrap)
  checks = ordering_checks(rows) + paired_differences(rows, boot)
  if boot:
    checks += bootstrap_spread(rows, boot)
  text = (
      f"{summary_table(rows, args.arms)}\n\n" + "\n".join(checks) + f"\n\nStage-2 steps per "
      f"run: {steps}; stage-1 weights: {init_from}; seeds: {args.seeds}; validation videos: "
      f"{config.data.synthetic.num_val_videos}; camouflage: {args.camouflage:g} (cover "
      f"{args.camouflage_cover:g}); look-alike: {args.lookalike:g}; recoloured: "
      f"{args.camouflage_recolour}; data seed: "
      f"{config.data.synthetic.seed}.\n"
  )
  print(text, flush=True)
  if args.markdown:
    pathlib.Path(args.markdown).write_text(text)


if __name__ == "__main__":
  main()
