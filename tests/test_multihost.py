"""Multi-host training: two local processes (jax.distributed over gloo, 2 CPU devices each) feed
their halves of the global batch and train exactly as one process with 4 devices; their checkpoint
resumes on two processes."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

from maskfreevis_jax import testing

REPO = pathlib.Path(__file__).resolve().parents[1]


def _main_command(workdir, cache, steps):
  return [
      sys.executable,
      str(REPO / "main.py"),
      "--config",
      "configs/synthetic.py",
      "--mode",
      "train",
      "--workdir",
      str(workdir),
      f"--config.data.synthetic.cache_dir={cache}",
      "--config.data.synthetic.num_train_videos=8",
      "--config.data.synthetic.num_val_videos=2",
      "--config.train.batch_size=4",
      f"--config.train.steps={steps}",
      "--config.train.log_every=1",
      "--config.train.checkpoint_every=2",
      "--config.train.image_every=100",
  ]


def _env(devices, **extra):
  return dict(
      os.environ,
      XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
      TF_CPP_MIN_LOG_LEVEL="2",
      **extra,
  )


def _run_two_hosts(workdir, cache, steps):
  """Runs main.py as processes 0 and 1 of a 2-host job; returns (returncode, stdout, stderr)s."""
  return testing.run_local_processes(_main_command(workdir, cache, steps), cwd=REPO, timeout=900)


def _losses(stdout):
  return {
      int(m.group(1)): float(m.group(2))
      for m in re.finditer(r"step (\d+)/\d+ \| loss ([0-9.]+)", stdout)
  }


@pytest.mark.slow
def test_two_hosts_train_like_one_and_resume(tmp_path):
  cache = tmp_path / "synthetic"
  one = subprocess.run(
      _main_command(tmp_path / "one", cache, 2),
      cwd=REPO,
      env=_env(4),
      capture_output=True,
      text=True,
      timeout=900,
  )
  assert one.returncode == 0, one.stderr[-3000:]
  expected = _losses(one.stdout)
  assert sorted(expected) == [1, 2], one.stdout

  outs = _run_two_hosts(tmp_path / "two", cache, 2)
  for rc, _, stderr in outs:
    assert rc == 0, stderr[-3000:]
  got = _losses(outs[0][1])
  assert sorted(got) == [1, 2], outs[0][1]
  assert _losses(outs[1][1]) == {}  # only the chief reports progress
  for step in (1, 2):
    assert got[step] == pytest.approx(expected[step], rel=1e-4), (step, got, expected)
  assert (tmp_path / "two" / "checkpoints" / "2").is_dir()

  # Both hosts resume from the 2-host checkpoint (each with its own data position) and go on.
  outs = _run_two_hosts(tmp_path / "two", cache, 3)
  for rc, _, stderr in outs:
    assert rc == 0, stderr[-3000:]
  assert "Resuming from step 2" in outs[0][1], outs[0][1]
  assert sorted(_losses(outs[0][1])) == [3]
  assert (tmp_path / "two" / "checkpoints" / "3").is_dir()
