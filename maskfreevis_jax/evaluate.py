"""Evaluation glue: model inference over the evaluation videos, results JSON, YouTube-VIS AP table.

`evaluate(config, workdir)` restores the checkpoint of `config.eval.step` in `workdir` (default:
the newest one that can be read) or takes `variables`, predicts every validation video with
`maskfreevis_jax.evaluation.VideoPredictor` (the official `inference_video` post-processing),
writes `workdir/eval/results_<step>.json` in the YouTube-VIS submission format, scores it with
`evaluate_ytvis` when ground-truth masks exist, prints the AP table and writes the metrics to
`workdir/eval/metrics_<step>.json` and TensorBoard.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

from absl import logging
from clu import metric_writers
import jax
import ml_collections
import numpy as np

from maskfreevis_jax import checkpointing


def restore_variables(workdir: str | pathlib.Path, step: int | None = None) -> tuple[dict, int]:
  """Model variables ({'params': ..., other collections}) of a training checkpoint, replicated.

  Restores the saved tree as it is (every array is read, so a damaged checkpoint is noticed), so
  the optimizer settings of the current config do not matter. Nothing in the directory changes.

  Args:
    workdir: the training run directory (checkpoints in `workdir/checkpoints`).
    step: the checkpoint's step (`config.eval.step`); None, 0 or -1: the newest readable one,
      with a one-line warning naming each newer damaged checkpoint.

  Raises:
    FileNotFoundError: naming the directory when it has no checkpoint, or the step when there is
      no checkpoint of that step.
    checkpointing.DamagedCheckpointError: the checkpoint of `step` cannot be read.
    checkpointing.NoReadableCheckpointError: no checkpoint in the directory can be read.
  """
  directory = pathlib.Path(workdir) / "checkpoints"
  if not directory.is_dir():
    raise FileNotFoundError(
        f"no checkpoints in {directory}: train first (--mode train) or pass "
        "--workdir of a trained run"
    )
  checkpointer = checkpointing.Checkpointer(directory, read_only=True)
  try:
    restored = checkpointer.restore(step=None if step is None or int(step) <= 0 else int(step))
  finally:
    checkpointer.close()
  if restored is None:
    raise FileNotFoundError(f"no finished checkpoint in {directory}")
  state, _, restored_step = restored
  variables = {"params": state["params"], **dict(state.get("model_state") or {})}
  return variables, int(restored_step)


def _gather_results(results: list[dict]) -> list[dict]:
  """Every host's results (each host predicts its own share of the videos)."""
  if jax.process_count() == 1:
    return results
  texts = checkpointing._gather_host_strings(json.dumps(results))  # pylint: disable=protected-access
  return [r for text in texts for r in json.loads(text)]


def evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    variables: Any = None,
    step: int | None = None,
    model=None,
    writer: metric_writers.MetricWriter | None = None,
) -> dict[str, float]:
  """Predicts the evaluation split, writes results JSON, prints and returns the AP metrics.

  Args:
    config: full config (model, data, eval).
    workdir: run directory (checkpoints are read from it, eval outputs written to workdir/eval).
    variables: model variables to evaluate (default: restore the checkpoint of
      `config.eval.step`, or the newest readable one).
    step: the step number used in output names (default: the checkpoint's).
    model: override the model built from config.model.
    writer: optional metric writer (default: a TensorBoard writer on workdir).

  Returns:
    Metrics of `evaluate_ytvis` (percent), or {} when the split has no ground-truth masks.
  """
  from maskfreevis_jax import evaluation  # pylint: disable=g-import-not-at-top
  from maskfreevis_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from maskfreevis_jax import models  # pylint: disable=g-import-not-at-top

  workdir = pathlib.Path(workdir)
  ecfg = config.eval
  if variables is None:
    variables, restored_step = restore_variables(workdir, ecfg.get("step"))
    step = restored_step if step is None else step
  step = 0 if step is None else int(step)
  model = model if model is not None else models.build_model(config.model)

  dataset = input_pipeline.create_eval_dataset(config, split=ecfg.get("split", "valid"))
  gt_path = ecfg.get("gt_json", "") or getattr(dataset.dataset, "path", "")
  category_ids = None
  if dataset.dataset is not None:
    category_ids = [c.id for c in dataset.dataset.categories]
  num_classes = int(config.model.num_classes)
  if category_ids is not None and len(category_ids) != num_classes:
    raise ValueError(
        f"the evaluation dataset {gt_path} has {len(category_ids)} categories but "
        f"config.model.num_classes is {num_classes}"
    )

  predictor = evaluation.VideoPredictor.from_config(model.apply, ecfg)
  max_videos = int(ecfg.get("max_videos", 0))
  videos = dataset if not max_videos else (v for i, v in zip(range(max_videos), dataset))
  start = time.perf_counter()
  results = evaluation.run_inference(predictor, variables, videos, category_ids=category_ids)
  results = _gather_results(results)
  seconds = time.perf_counter() - start
  num_videos = len({r["video_id"] for r in results})
  logging.info("predicted %d videos in %.1f s", num_videos, seconds)

  out_dir = workdir / "eval"
  out_dir.mkdir(parents=True, exist_ok=True)
  results_path = out_dir / f"results_{step}.json"
  if jax.process_index() == 0:
    with open(results_path, "w") as f:
      json.dump(results, f)
  print(f"Wrote {len(results)} predictions for {num_videos} videos to {results_path}", flush=True)

  if not gt_path or not dataset.with_annotations:
    print(
        "The evaluation split has no ground-truth masks: no AP computed (submit the results "
        "JSON to the benchmark server).",
        flush=True,
    )
    return {}
  gt = gt_path
  if max_videos:
    gt = _subset_ground_truth(
        gt_path,
        {r["video_id"] for r in results} | {int(v) for v in _video_ids(dataset, max_videos)},
    )
  metrics = evaluation.evaluate_ytvis(gt, results)
  table = evaluation.format_table(metrics)
  print(
      f"YouTube-VIS mask AP at step {step} ({num_videos} videos, {gt_path}):\n{table}", flush=True
  )
  if jax.process_index() == 0:
    with open(out_dir / f"metrics_{step}.json", "w") as f:
      json.dump(metrics, f, indent=1)
  writer = writer or metric_writers.create_default_writer(
      str(workdir), just_logging=jax.process_index() > 0, collection="eval"
  )
  writer.write_scalars(
      step,
      {f"eval/{k}": v for k, v in metrics.items() if np.isfinite(v) and not k.startswith("AP-")},
  )
  writer.flush()
  return metrics


def _video_ids(dataset, limit: int) -> list[int]:
  ids = [dataset.source.video(i).id for i in dataset.indices]
  return ids[:limit]


def _subset_ground_truth(gt_path: str, video_ids: set[int]) -> dict:
  """The annotation file restricted to the evaluated videos (config.eval.max_videos)."""
  with open(gt_path) as f:
    gt = json.load(f)
  gt["videos"] = [v for v in gt["videos"] if int(v["id"]) in video_ids]
  gt["annotations"] = [a for a in gt.get("annotations", []) if int(a["video_id"]) in video_ids]
  return gt
