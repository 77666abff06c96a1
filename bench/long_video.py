"""Long videos: memory, speed, identity switches and AP of whole-video vs windowed inference.

Usage:
  .venv/bin/python bench/long_video.py --workdir WORKDIR          # a trained run's checkpoint
  .venv/bin/python bench/long_video.py --random_init --lengths 100  # smoke check, no checkpoint

For every length (default 100, 300, 1000 frames) `--videos` long synthetic videos (seeds
`--seed`, `--seed` + 1, ...) are written once (`synthetic.write_long_video`: residents crossing
and occluding each other, visitors entering and leaving) and predicted by `--mode predict`'s
streaming path (`predict.predict`, overlays off) in three modes, each in a fresh process so that
its peak RSS is its own:
  whole       one clip (official; only up to --whole_max_frames frames);
  windows     windows of --window frames sharing --overlap, one track per query slot (not
              associated: what the windows gave before object tracks);
  associated  the same windows, object tracks (`evaluation.track_builder`: born on a confident
              unmatched query, continued by Hungarian association, ended after missing
              `config.eval.track_patience` windows; knobs from `config.eval`).
Per video, whole and windows keep the official `config.eval.top_k` (track, class) pairs,
associated keeps `config.eval.track_top_k` (object tracks are open-ended in number).
Printed per length and mode, over its videos: peak RSS and peak device memory (when the backend
reports it), seconds per frame (compilation included), identity switches per 100 frames against
the ground-truth tracks (`evaluation.tracking`: the CLEAR MOT rule, matches at mask IoU >= 0.5)
and those among them at a window boundary (a window's first new frame), the fraction of
ground-truth masks matched, and the YouTube-VIS mask AP of all its videos together. A second
table diagnoses the tracks (`tracking.track_coverage`): per object covered, how many predicted
tracks cover it on some frame (mask IoU >= 0.5; "split": the fraction with more than one); per
covering track, how many objects it covers ("merged": more than one); and the scores of true
tracks (video IoU >= 0.5 with an object) and false ones.
`--bootstrap B` resamples a length's videos B times (the same draws for both modes) and prints the
AP ratio windows + tracks / whole video and their difference, with 90% intervals.
`--shuffle_queries` permutes the query slots of every window (a stress test of association on the
real model's embeddings and masks: the trained model keeps each slot on its object by itself).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

from flax import serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maskfreevis_jax import checkpointing
from maskfreevis_jax import experiment
from maskfreevis_jax import predict
from maskfreevis_jax.data import synthetic
from maskfreevis_jax.evaluation import inference
from maskfreevis_jax.evaluation import tracking
from maskfreevis_jax.evaluation import ytvis_eval

REPO = pathlib.Path(__file__).resolve().parents[1]
MODES = ("whole", "windows", "associated")
HEADER = (
    f"{'frames':>6} {'mode':>10} {'peak RSS MB':>11} {'device MB':>9} {'s/frame':>7} "
    f"{'ID sw/100f':>10} {'at bounds':>10} {'matched':>7} {'AP':>6}"
)


def _config(args, mode: str) -> ml_collections.ConfigDict:
  """configs/synthetic.py with the windowing of `mode`."""
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
  """Child process: predicts the videos in one mode, prints a JSON line of measurements."""
  config = _config(args, args.mode)
  model = experiment.build_experiment(config).model
  if args.random_init:
    variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 2, 128, 128, 3), np.uint8))
  else:
    variables = serialization.msgpack_restore(pathlib.Path(args.variables).read_bytes())
  if args.shuffle_queries and args.mode != "whole":
    model = _QueryShufflingModel(model)
  start = time.perf_counter()
  results = []
  for frames_dir, out_dir in zip(args.frames_dir, args.out):
    out = predict.predict(
        config,
        frames_dir,
        out_dir,
        variables=variables,
        model=model,
        overlay=False,
        progress_every=60.0,
    )
    results.append(out["results"])
  seconds = time.perf_counter() - start
  stats = jax.local_devices()[0].memory_stats() or {}
  measured = {
      "seconds": seconds,
      "results": results,
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "device_peak_mb": (
          stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None
      ),
  }
  print("RESULT " + json.dumps(measured), flush=True)


class _QueryShufflingModel:
  """The model with its query slots permuted differently in every window (a stress test).

  The trained model keeps each query slot on the same object from window to window, so windows
  without association switch nothing there. This wrapper permutes the queries of each window
  (permutation keyed by the window's first frame), as a model whose slots are not bound to
  objects would: association must then recover the tracks from the real embeddings and masks.
  """

  def __init__(self, model):
    self.model = model

  def apply(self, variables, frames, **kwargs):
    outputs = dict(self.model.apply(variables, frames, **kwargs))
    key = jax.random.fold_in(jax.random.PRNGKey(0), jnp.sum(frames[0, 0], dtype=jnp.int32))
    order = jax.random.permutation(key, outputs["pred_logits"].shape[2])
    outputs["pred_logits"] = outputs["pred_logits"][:, :, order]
    outputs["pred_masks"] = outputs["pred_masks"][:, :, order]
    if "pred_embeds" in outputs:
      outputs["pred_embeds"] = outputs["pred_embeds"][:, order]
    return outputs


def _merged_ground_truth(gts: list[dict]) -> dict:
  """One YouTube-VIS ground truth of several one-video files (video i gets id i + 1)."""
  merged = {**gts[0], "videos": [], "annotations": []}
  for index, gt in enumerate(gts):
    video = {**gt["videos"][0], "id": index + 1}
    merged["videos"].append(video)
    for annotation in gt["annotations"]:
      merged["annotations"].append(
          {**annotation, "id": len(merged["annotations"]) + 1, "video_id": video["id"]}
      )
  return merged


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="", help="training run whose latest checkpoint is used")
  parser.add_argument(
      "--random_init",
      action="store_true",
      help="randomly initialised tiny model (smoke check; figures meaningless)",
  )
  parser.add_argument("--lengths", type=int, nargs="+", default=[100, 300, 1000])
  parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
  parser.add_argument("--window", type=int, default=12)
  parser.add_argument("--overlap", type=int, default=4)
  parser.add_argument("--embed_weight", type=float, default=1.0)
  parser.add_argument("--mask_weight", type=float, default=1.0)
  parser.add_argument("--whole_max_frames", type=int, default=300)
  parser.add_argument("--data_dir", default="/tmp/maskfreevis_long_video")
  parser.add_argument("--seed", type=int, default=0, help="seed of the first video")
  parser.add_argument("--videos", type=int, default=5, help="videos per length")
  parser.add_argument(
      "--bootstrap",
      type=int,
      default=0,
      help="resamplings of the videos for the windows + tracks / whole AP ratio (paired)",
  )
  parser.add_argument(
      "--shuffle_queries",
      action="store_true",
      help="stress test: permute the query slots of every window",
  )
  # Internal: one measurement in a child process.
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--mode", help=argparse.SUPPRESS)
  parser.add_argument("--frames_dir", nargs="+", help=argparse.SUPPRESS)
  parser.add_argument("--out", nargs="+", help=argparse.SUPPRESS)
  parser.add_argument("--variables", help=argparse.SUPPRESS)
  return parser


def _save_variables(args) -> pathlib.Path:
  """The checkpoint's variables as plain msgpack for the children (Orbax is slow on a busy
  machine: restored once here)."""
  variables_path = pathlib.Path(args.data_dir) / "variables.msgpack"
  if not args.random_init:
    variables, step = checkpointing.restore_variables(
        pathlib.Path(args.workdir) / experiment.CHECKPOINT_DIR
    )
    variables_path.parent.mkdir(parents=True, exist_ok=True)
    variables_path.write_bytes(serialization.msgpack_serialize(jax.device_get(variables)))
    print(f"restored step {step}", flush=True)
  return variables_path


def _long_videos(args, length: int) -> tuple[list[pathlib.Path], dict]:
  """The `--videos` long videos of `length` frames (written once) and their merged ground truth."""
  seeds = range(args.seed, args.seed + args.videos)
  # The generator's format in the name: videos of an older format are not reused.
  datas = [
      pathlib.Path(args.data_dir) / f"v{synthetic.FORMAT_VERSION}_seed{seed}_{length}"
      for seed in seeds
  ]
  gts = []
  for seed, data in zip(seeds, datas):
    if not (data / "valid.json").exists():
      synthetic.write_long_video(str(data), length, seed=seed)
    gts.append(json.loads((data / "valid.json").read_text()))
  return datas, _merged_ground_truth(gts)


def _child_command(args, mode, length, datas, variables_path) -> list[str]:
  command = [sys.executable, __file__, "--child", "--mode", mode]
  command += ["--window", str(args.window), "--overlap", str(args.overlap)]
  command += ["--embed_weight", str(args.embed_weight), "--mask_weight", str(args.mask_weight)]
  command += ["--frames_dir"] + [
      str(d / "valid" / "JPEGImages" / f"long_{length:05d}") for d in datas
  ]
  command += ["--out"] + [str(d / f"out_{mode}") for d in datas]
  command += ["--random_init"] if args.random_init else ["--variables", str(variables_path)]
  command += ["--shuffle_queries"] if args.shuffle_queries else []
  return command


@dataclasses.dataclass
class _Scores:
  """A mode's figures over its videos; the lists are per ground-truth / predicted track."""

  switches: int = 0
  boundary_switches: int = 0
  matched: int = 0
  present: int = 0
  ap: float = 0.0
  splits: list = dataclasses.field(default_factory=list)
  merges: list = dataclasses.field(default_factory=list)
  true_scores: list = dataclasses.field(default_factory=list)
  false_scores: list = dataclasses.field(default_factory=list)

  def add_coverage(self, truths, predicted, scores) -> None:
    """Splits, merges and the scores of true (video IoU >= 0.5 with an object) and false tracks."""
    if not predicted or not truths:
      self.false_scores += scores
      self.splits += [0] * len(truths)
      return
    coverage = tracking.track_coverage(truths, predicted)
    self.splits += coverage.splits.tolist()
    self.merges += coverage.merges.tolist()
    true = coverage.video_iou.max(axis=1) >= 0.5
    self.true_scores += [s for s, t in zip(scores, true) if t]
    self.false_scores += [s for s, t in zip(scores, true) if not t]


def _video_results(gt: dict, result_paths: list[str]) -> list[list[dict]]:
  """Each video's results (one file per video, in `gt`'s video order), with its video id."""
  per_video = []
  for video, path in zip(gt["videos"], result_paths):
    entries = json.loads(pathlib.Path(path).read_text())
    for entry in entries:
      entry.pop("file_names", None)  # predict's frame names: not part of the evaluation format
      entry["video_id"] = video["id"]
    per_video.append(entries)
  return per_video


def _score(args, mode: str, length: int, gt: dict, result_paths: list[str]) -> _Scores:
  """Identity switches (all, at window boundaries), matched fraction and AP of a mode's results."""
  scores = _Scores()
  starts = inference.window_starts(length, None if mode == "whole" else args.window, args.overlap)
  # A window's first new frame (the frames after the previous window's end).
  boundaries = {previous + args.window for previous in starts[:-1]}
  results = []
  for video, video_results in zip(gt["videos"], _video_results(gt, result_paths)):
    results += video_results
    truths = [a["segmentations"] for a in gt["annotations"] if a["video_id"] == video["id"]]
    predicted, track_scores = tracking.scored_tracks_from_results(video_results)
    summary = tracking.identity_switches(truths, predicted)
    scores.add_coverage(truths, predicted, track_scores)
    scores.switches += summary.switches
    scores.boundary_switches += sum(t in boundaries for t in summary.switch_frames)
    scores.matched += summary.matched
    scores.present += summary.present
  scores.ap = ytvis_eval.evaluate_ytvis(gt, results)["AP"]
  return scores


def _row(length: int, mode: str, measured: dict, scores: _Scores, total_frames: int) -> str:
  device = measured["device_peak_mb"]
  return (
      f"{length:>6} {mode:>10} {measured['peak_rss_mb']:>11.0f} "
      f"{'n/a' if device is None else f'{device:.0f}':>9} "
      f"{measured['seconds'] / total_frames:>7.3f} "
      f"{100 * scores.switches / total_frames:>10.2f} "
      f"{100 * scores.boundary_switches / total_frames:>10.2f} "
      f"{scores.matched / max(scores.present, 1):>7.2f} {scores.ap:>6.2f}"
  )


DIAGNOSTIC_HEADER = (
    f"{'frames':>6} {'mode':>10} {'tracks/object':>13} {'split':>6} {'objects/track':>13} "
    f"{'merged':>6}  {'true tracks: n, score median [q25, q75]':<40} "
    f"{'false tracks: n, score median [q25, q75]':<40}"
)


def _quartiles(values: list) -> str:
  if not values:
    return "0"
  q25, median, q75 = np.percentile(values, [25, 50, 75])
  return f"{len(values)}, {median:.2f} [{q25:.2f}, {q75:.2f}]"


def _diagnostic_row(length: int, mode: str, scores: _Scores) -> str:
  """Splits (predicted tracks per covered object), merges (objects per covering track) and the
  score distributions of true and false tracks."""
  splits = [n for n in scores.splits if n]
  merges = [n for n in scores.merges if n]
  return (
      f"{length:>6} {mode:>10} {np.mean(splits) if splits else 0:>13.2f} "
      f"{np.mean(np.asarray(splits) > 1) if splits else 0:>6.2f} "
      f"{np.mean(merges) if merges else 0:>13.2f} "
      f"{np.mean(np.asarray(merges) > 1) if merges else 0:>6.2f}  "
      f"{_quartiles(scores.true_scores):<40} {_quartiles(scores.false_scores):<40}"
  )


def _measure(args, mode, length, datas, gt, variables_path) -> tuple[str, str, list] | None:
  """One mode on one length in a child process: its table and diagnostic rows and its results
  files (one per video), or None when it failed."""
  proc = subprocess.run(
      _child_command(args, mode, length, datas, variables_path),
      capture_output=True,
      text=True,
      cwd=REPO,
      env={**os.environ, "PYTHONPATH": str(REPO)},
  )
  lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
  if proc.returncode or not lines:
    print(f"{length} frames, {mode}: failed\n{proc.stderr[-2000:]}", flush=True)
    return None
  measured = json.loads(lines[-1][len("RESULT ") :])
  scores = _score(args, mode, length, gt, measured["results"])
  return (
      _row(length, mode, measured, scores, length * len(datas)),
      _diagnostic_row(length, mode, scores),
      measured["results"],
  )


def _bootstrap_row(length: int, gt: dict, result_paths: dict, draws: int) -> str:
  """Windows + tracks against the whole video on the same resampled videos (paired): the ratio
  and the difference of their AP, median and 90% interval over `draws` resamplings."""
  results = {mode: sum(_video_results(gt, paths), []) for mode, paths in result_paths.items()}
  boot = ytvis_eval.paired_bootstrap_ap(gt, results, draws)
  ratio = boot["associated"] / np.maximum(boot["whole"], 1e-9)
  diff = boot["associated"] - boot["whole"]
  q = lambda x: "{:.3f} [{:.3f}, {:.3f}]".format(*np.percentile(x, [50, 5, 95]))
  return (
      f"{length} frames, {len(gt['videos'])} videos resampled {draws} times: windows + tracks / "
      f"whole AP {q(ratio)}, difference {q(diff)} AP; share of draws with the ratio >= 0.95: "
      f"{np.mean(ratio >= 0.95):.2f}"
  )


def main(argv=None) -> None:
  parser = _parser()
  args = parser.parse_args(argv)
  if args.child:
    run_one(args)
    return
  if args.videos < 1:
    parser.error(f"--videos must be at least 1, got {args.videos}")
  if not args.random_init and not args.workdir:
    parser.error("pass --workdir of a trained run, or --random_init for a smoke check")
  model_name = "random init (smoke check)" if args.random_init else f"checkpoint in {args.workdir}"
  shuffled = "; query slots shuffled per window" if args.shuffle_queries else ""
  eval_config = _config(args, "associated").eval
  print(
      f"model: tiny VideoMaskFormer, {model_name}; {args.videos} videos per length; windows of "
      f"{args.window} frames sharing {args.overlap}; association weights embed "
      f"{args.embed_weight}, mask {args.mask_weight}{shuffled}; pairs kept per video: top_k "
      f"{eval_config.top_k}, track_top_k {eval_config.track_top_k} (associated)",
      flush=True,
  )
  variables_path = _save_variables(args)
  rows, diagnostics, bootstraps = [], [], []
  for length in args.lengths:
    datas, gt = _long_videos(args, length)
    result_paths = {}
    for mode in args.modes:
      if mode == "whole" and length > args.whole_max_frames:
        continue
      measured = _measure(args, mode, length, datas, gt, variables_path)
      if measured is not None:
        rows.append(measured[0])
        diagnostics.append(measured[1])
        result_paths[mode] = measured[2]
        print(HEADER + "\n" + rows[-1] if len(rows) == 1 else rows[-1], flush=True)
    if args.bootstrap and {"whole", "associated"} <= set(result_paths):
      pair = {mode: result_paths[mode] for mode in ("whole", "associated")}
      bootstraps.append(_bootstrap_row(length, gt, pair, args.bootstrap))
  print("\n" + HEADER + "\n" + "\n".join(rows), flush=True)
  print("\n" + DIAGNOSTIC_HEADER + "\n" + "\n".join(diagnostics), flush=True)
  if bootstraps:
    print("\n" + "\n".join(bootstraps), flush=True)


if __name__ == "__main__":
  main()
