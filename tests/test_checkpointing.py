"""Checkpoint/resume tests: SIGTERM (preemption) and SIGKILL mid-run, then resume, must end with the
same parameters as an uninterrupted run; a checkpoint of another config gives a clear error.

Run as a script, this file trains the stand-in model of `maskfreevis_jax.testing` (used as the
subprocess).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

if __name__ == "__main__":  # Subprocess mode: 2 CPU devices, set before jax is imported.
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import chex  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from maskfreevis_jax import array_digests  # noqa: E402
from maskfreevis_jax import checkpointing  # noqa: E402
from maskfreevis_jax import console  # noqa: E402
from maskfreevis_jax import defaults  # noqa: E402
from maskfreevis_jax import sharding as sharding_lib  # noqa: E402
from maskfreevis_jax import testing  # noqa: E402
from maskfreevis_jax import train as train_lib  # noqa: E402
from maskfreevis_jax import workdir_config  # noqa: E402

STEPS = 12


def _flat_params(params) -> dict[str, np.ndarray]:
  return {
      array_digests.path_name(p): np.asarray(v)
      for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
  }


def run_training(workdir, delay_s: float = 0.0, width: int = 8, devices=None, steps=STEPS):
  config = testing.make_config(steps=steps, checkpoint_every=2, keep=2, log_every=1)
  config.model.width = width
  mesh = sharding_lib.create_mesh(1, devices)
  return train_lib.train(
      testing.stand_in_experiment(
          config, testing.StandInIterator(8, seed=1, delay_s=delay_s), mesh=mesh
      ),
      workdir,
  )


def _start(workdir, delay_s):
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  return subprocess.Popen(
      [sys.executable, __file__, str(workdir), str(delay_s)],
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      env=env,
      cwd=str(pathlib.Path(__file__).resolve().parents[1]),
  )


def _finished_steps(workdir) -> list[int]:
  directory = pathlib.Path(workdir) / "checkpoints"
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _wait_for_checkpoint(proc, workdir, min_step, timeout=120.0):
  start = time.time()
  while time.time() - start < timeout:
    if proc.poll() is not None:
      raise AssertionError(f"training exited early:\n{proc.stdout.read()}")
    if any(s >= min_step for s in _finished_steps(workdir)):
      return
    time.sleep(0.1)
  proc.kill()
  raise AssertionError(f"no checkpoint >= {min_step} after {timeout} s")


def test_resume_in_process_matches_uninterrupted(tmp_path):
  devices = jax.devices()[:2]
  reference = run_training(tmp_path / "reference", devices=devices, steps=6)
  config = testing.make_config(steps=3, checkpoint_every=2, keep=2, log_every=1)
  first = train_lib.train(
      testing.stand_in_experiment(
          config, testing.StandInIterator(8, seed=1), mesh=sharding_lib.create_mesh(1, devices)
      ),
      tmp_path / "split",
  )
  assert first.step == 3 and _finished_steps(tmp_path / "split")[-1] == 3
  # A fresh iterator at position 0: the checkpoint must move it to batch 3.
  resumed = run_training(tmp_path / "split", devices=devices, steps=6)
  assert resumed.step == 6
  expected, got = _flat_params(reference.state.params), _flat_params(resumed.state.params)
  for name, value in expected.items():
    np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.slow
def test_sigterm_then_sigkill_then_resume_matches_uninterrupted(tmp_path):
  reference = run_training(tmp_path / "reference", devices=jax.devices()[:2])
  assert reference.step == STEPS
  workdir = tmp_path / "interrupted"

  # 1) Preemption: SIGTERM -> checkpoint at the current step, clean exit.
  proc = _start(workdir, delay_s=0.25)
  _wait_for_checkpoint(proc, workdir, 2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert "preemption" in out, out
  after_term = max(_finished_steps(workdir))
  assert 2 <= after_term < STEPS

  # 2) Hard kill mid-run, after at least one more periodic checkpoint.
  proc = _start(workdir, delay_s=0.25)
  _wait_for_checkpoint(proc, workdir, after_term + 2)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  proc.stdout.close()
  assert proc.returncode == -signal.SIGKILL
  after_kill = max(_finished_steps(workdir))
  assert after_term < after_kill < STEPS, (after_term, after_kill)

  # 3) Resume to the end.
  proc = _start(workdir, delay_s=0.0)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  assert f"resumed from step {after_kill}" in out, out
  resumed = dict(np.load(workdir / "final_params.npz"))
  expected = _flat_params(reference.state.params)
  assert sorted(resumed) == sorted(expected)
  for name, value in expected.items():
    np.testing.assert_allclose(resumed[name], value, rtol=1e-6, atol=1e-7, err_msg=name)
  # Stream position was restored too: a restart from scratch would have drawn other batches.
  final_line = [l for l in out.splitlines() if l.startswith(f"step {STEPS}/{STEPS}")]
  assert final_line, out


def test_checkpoint_from_another_config_is_a_clear_error(tmp_path):
  config = testing.make_config(steps=2, checkpoint_every=2)
  train_lib.train(
      testing.stand_in_experiment(config, testing.StandInIterator(8)),
      tmp_path,
  )
  config.model.width = 16
  with pytest.raises(checkpointing.CheckpointMismatchError) as info:
    train_lib.train(
        testing.stand_in_experiment(config, testing.StandInIterator(8)),
        tmp_path,
    )
  message = str(info.value)
  found = re.search(
      r"parameter 'params/(\S+)' has shape \(([\d, ]*)\) in the checkpoint but "
      r"\(([\d, ]*)\) in the model",
      message,
  )
  assert found, message
  assert "8" in found.group(2) and "16" in found.group(3), message
  assert "model.width=8 (now 16)" in message


def test_iterator_state_round_trip_with_bytes(tmp_path):
  checkpointer = checkpointing.Checkpointer(tmp_path, keep=1, save_every=1, async_save=False)
  state = {"w": np.arange(3.0, dtype=np.float32)}
  checkpointer.save(1, state, b"\x00\xffpos")
  checkpointer.wait_until_finished()
  abstract = {
      "w": jax.ShapeDtypeStruct(
          (3,), np.float32, sharding=sharding_lib.replicated(sharding_lib.create_mesh())
      )
  }
  restored, iterator_state, step = checkpointer.restore(abstract)
  checkpointer.close()
  assert step == 1 and iterator_state == b"\x00\xffpos"
  np.testing.assert_array_equal(np.asarray(restored["w"]), state["w"])


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
  """(workdir, config, final params) of a 4-step stand-in run with checkpoints at 2 and 4."""
  workdir = tmp_path_factory.mktemp("short_run")
  config = testing.make_config(steps=4, checkpoint_every=2, keep=3, log_every=2)
  config.eval.window_size = 24  # a non-default field, so the saved config is not the schema's
  result = train_lib.train(
      testing.stand_in_experiment(
          config,
          testing.StandInIterator(8, seed=1),
          mesh=sharding_lib.create_mesh(1, jax.devices()[:1]),
      ),
      workdir,
  )
  return workdir, config, jax.device_get(result.state.params)


@pytest.mark.parametrize("step", [None, 2, 4], ids=["newest", "step2", "step4"])
def test_every_checkpoint_saves_the_resolved_config(short_run, step):
  workdir, config, _ = short_run
  saved = checkpointing.saved_config(workdir / "checkpoints", step)
  assert saved == json.loads(json.dumps(config.to_dict()))  # as JSON: tuples are lists
  restored = defaults.config_from_dict(saved)
  assert restored.eval.window_size == 24 and restored.to_dict() == config.to_dict()


def test_workdir_config_reads_the_saved_config(short_run):
  workdir, config, _ = short_run
  assert workdir_config.get_config(str(workdir)).to_dict() == config.to_dict()


def test_params_only_restore(short_run):
  workdir, _, final_params = short_run
  variables, step = checkpointing.restore_variables(workdir / "checkpoints")
  assert step == 4 and set(variables) == {"params"}  # no optimizer state, no counters
  leaves = jax.tree.leaves(variables["params"])
  assert all(x.sharding.device_set == {jax.local_devices()[0]} for x in leaves)
  chex.assert_trees_all_close(jax.device_get(variables["params"]), final_params)
  older, older_step = checkpointing.restore_variables(workdir / "checkpoints", 2)
  assert older_step == 2
  assert not np.array_equal(older["params"]["query_feat"], final_params["query_feat"])


def test_checkpoints_of_earlier_versions_have_no_saved_config(short_run, tmp_path):
  """Before configs were saved, the config item held the fingerprint alone: still restorable."""
  workdir = tmp_path / "old"
  shutil.copytree(short_run[0], workdir)
  for item in (workdir / "checkpoints").glob("*/config/*"):
    if item.is_file() and item.read_text().startswith("{"):
      item.write_text(json.dumps(json.loads(item.read_text())["fingerprint"]))
  assert checkpointing.saved_config(workdir / "checkpoints") is None
  variables, step = checkpointing.restore_variables(workdir / "checkpoints")
  assert step == 4 and "params" in variables
  with pytest.raises(ValueError, match="holds no checkpoint with a saved config"):
    workdir_config.get_config(str(workdir))


class _NamedIterator(testing.StandInIterator):
  class_names = ("cat", "dog", "owl")


@pytest.mark.parametrize("given", [(), ("x", "y", "z")], ids=["from-data", "from-config"])
def test_the_saved_config_names_the_classes(tmp_path, given):
  config = testing.make_config(steps=2, checkpoint_every=2)
  config.data.class_names = given
  train_lib.train(
      testing.stand_in_experiment(
          config, _NamedIterator(8, seed=1), mesh=sharding_lib.create_mesh(1, jax.devices()[:1])
      ),
      tmp_path,
  )
  saved = checkpointing.saved_config(tmp_path / "checkpoints")
  assert tuple(saved["data"]["class_names"]) == (given or _NamedIterator.class_names)


if __name__ == "__main__":
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  absl_logging.set_verbosity(absl_logging.INFO)
  console.enable_echo()  # progress lines on stdout, as main.py shows them
  target = pathlib.Path(sys.argv[1])
  latest = checkpointing.Checkpointer(target / "checkpoints", keep=2, save_every=2).latest_step()
  if latest is not None:
    print(f"resumed from step {latest}", flush=True)
  result = run_training(target, delay_s=float(sys.argv[2]))
  if not result.preempted:
    np.savez(target / "final_params.npz", **_flat_params(result.state.params))
