"""Evaluation: model inference over the evaluation videos, results JSON, YouTube-VIS AP table.

`evaluate(experiment, workdir)` restores the params of the checkpoint of `config.eval.step` in
`workdir` (default: the newest one that can be read) or takes `variables`, predicts every
evaluation video with the experiment's `VideoPredictor` (the official `inference_video`
post-processing, or windows), writes `workdir/eval/results_<step>.json` in the YouTube-VIS
submission format, scores it with `evaluate_ytvis` when ground-truth masks exist, reports the AP
table and writes the metrics to `workdir/eval/metrics_<step>.json` and TensorBoard.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

from absl import logging
from clu import metric_writers
import jax
import numpy as np

from maskfreevis_jax import console
from maskfreevis_jax import evaluation
from maskfreevis_jax import experiment as experiment_lib
from maskfreevis_jax import sharding as sharding_lib


def _gather_results(results: list[dict]) -> list[dict]:
  """Every host's results (each host predicts its own share of the videos)."""
  if jax.process_count() == 1:
    return results
  texts = sharding_lib.gather_host_strings(json.dumps(results))
  return [r for text in texts for r in json.loads(text)]


def _category_ids(dataset, num_classes: int, gt_path: str) -> list[int] | None:
  """The dataset's category ids by class index; checks their count against the model's."""
  if dataset.dataset is None:
    return None
  category_ids = [c.id for c in dataset.dataset.categories]
  if len(category_ids) != num_classes:
    raise ValueError(
        f"the evaluation dataset {gt_path} has {len(category_ids)} categories but "
        f"config.model.num_classes is {num_classes}"
    )
  return category_ids


def _predict_videos(experiment, variables, dataset, category_ids) -> list[dict]:
  """Results (YouTube-VIS submission entries) of every host's videos, gathered."""
  max_videos = int(experiment.config.eval.max_videos)
  videos = dataset if not max_videos else (v for _, v in zip(range(max_videos), dataset))
  start = time.perf_counter()
  results = evaluation.run_inference(
      experiment.video_predictor(), variables, videos, category_ids=category_ids
  )
  results = _gather_results(results)
  logging.info(
      "predicted %d videos in %.1f s",
      len({r["video_id"] for r in results}),
      time.perf_counter() - start,
  )
  return results


def _write_json(path: pathlib.Path, value: Any, **kwargs) -> None:
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump(value, f, **kwargs)


def _ground_truth(gt_path: str, dataset, results: list[dict], max_videos: int) -> str | dict:
  """The annotation file, restricted to the evaluated videos with `config.eval.max_videos`."""
  if not max_videos:
    return gt_path
  ids = [dataset.source.video(i).id for i in dataset.indices][:max_videos]
  video_ids = {r["video_id"] for r in results} | {int(v) for v in ids}
  with open(gt_path) as f:
    gt = json.load(f)
  gt["videos"] = [v for v in gt["videos"] if int(v["id"]) in video_ids]
  gt["annotations"] = [a for a in gt.get("annotations", []) if int(a["video_id"]) in video_ids]
  return gt


def _write_metrics(workdir: pathlib.Path, step: int, metrics: dict, writer) -> None:
  """metrics_<step>.json and the finite overall metrics as TensorBoard scalars."""
  _write_json(workdir / "eval" / f"metrics_{step}.json", metrics, indent=1)
  writer = writer or metric_writers.create_default_writer(
      str(workdir), just_logging=jax.process_index() > 0, collection="eval"
  )
  writer.write_scalars(
      step,
      {f"eval/{k}": v for k, v in metrics.items() if np.isfinite(v) and not k.startswith("AP-")},
  )
  writer.flush()


def evaluate(
    experiment: experiment_lib.Experiment,
    workdir: str | pathlib.Path,
    *,
    variables: Any = None,
    step: int | None = None,
    writer: metric_writers.MetricWriter | None = None,
) -> dict[str, float]:
  """Predicts the evaluation split, writes the results JSON, reports and returns the AP metrics.

  Args:
    experiment: `experiment.build_experiment(config)` (model, data, eval settings).
    workdir: run directory (checkpoints are read from it, eval outputs written to workdir/eval).
    variables: model variables to evaluate (default: the params of the checkpoint of
      `config.eval.step`, or of the newest readable one).
    step: the step number used in output names (default: the checkpoint's).
    writer: optional metric writer (default: a TensorBoard writer on workdir).

  Returns:
    Metrics of `evaluate_ytvis` (percent), or {} when the split has no ground-truth masks.
  """
  workdir = pathlib.Path(workdir)
  if variables is None:
    variables, restored_step = experiment.restore_variables(workdir)
    step = restored_step if step is None else step
  step = 0 if step is None else int(step)
  config = experiment.config
  dataset = experiment.eval_dataset()
  gt_path = config.eval.gt_json or getattr(dataset.dataset, "path", "")
  category_ids = _category_ids(dataset, int(config.model.num_classes), gt_path)
  results = _predict_videos(experiment, variables, dataset, category_ids)
  num_videos = len({r["video_id"] for r in results})
  (workdir / "eval").mkdir(parents=True, exist_ok=True)
  results_path = workdir / "eval" / f"results_{step}.json"
  _write_json(results_path, results)
  console.report(f"Wrote {len(results)} predictions for {num_videos} videos to {results_path}")
  if not gt_path or not dataset.with_annotations:
    console.report(
        "The evaluation split has no ground-truth masks: no AP computed (submit the results "
        "JSON to the benchmark server)."
    )
    return {}
  gt = _ground_truth(gt_path, dataset, results, int(config.eval.max_videos))
  metrics = evaluation.evaluate_ytvis(gt, results)
  console.report(
      f"YouTube-VIS mask AP at step {step} ({num_videos} videos, {gt_path}):\n"
      f"{evaluation.format_table(metrics)}"
  )
  _write_metrics(workdir, step, metrics, writer)
  return metrics
