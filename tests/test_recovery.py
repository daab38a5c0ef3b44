"""Checkpoints, exact resume, interruption, determinism and divergence guards."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fedjax_lib import Config, output, run_experiment
from fedjax_lib.algorithms import get_algorithm
from fedjax_lib.core import checkpoint as checkpoint_lib
from fedjax_lib.errors import ConfigError
from fedjax_lib.runner import checkpoint_dir, schedule_change

QUIET = dict(log=lambda msg: None)
METRICS = ("test_acc", "test_auc", "train_loss")


def _config(out, **kw):
  base = dict(model="dnn", num_clients=4, learning_rate=0.05, global_rounds=3,
              checkpoint_every=1, out=str(out), progress=False, unroll=1)
  base.update(kw)
  return Config(**base)


def _final_state(config, name):
  """The arrays of the newest checkpoint of run 0."""
  ckpt = checkpoint_lib.RunCheckpointer(checkpoint_dir(config, f"digits_{name}_test", 0))
  step = ckpt.steps()[-1]
  restored = ckpt.manager.restore(step)
  return step, jax.tree.map(np.asarray, dict(restored["state"]))


# Client state (Ditto), an initialisation period (FedDBE), a final evaluation (FedBABU). Every
# registered algorithm's state goes through a checkpoint round trip in the conformance suite.
@pytest.mark.parametrize("name", ["FedAvg", "Ditto", "FedDBE", "FedBABU"])
def test_resumed_run_equals_uninterrupted(name, tmp_path):
  """Stop after round 1, continue to round 3: same metrics and bit-identical final state."""
  full = _config(tmp_path / "full", algorithm=name)
  whole = run_experiment(full, **QUIET).runs[0].history
  part = _config(tmp_path / "part", algorithm=name, global_rounds=1)
  run_experiment(part, **QUIET)
  resumed = run_experiment(part.replace(global_rounds=3), **QUIET).runs[0].history
  for key in METRICS + ("rounds",):
    assert resumed[key] == whole[key], key
  step_a, state_a = _final_state(full, get_algorithm(name).name)
  step_b, state_b = _final_state(part, get_algorithm(name).name)
  assert step_a == step_b == 4
  jax.tree.map(np.testing.assert_array_equal, state_a, state_b)


def test_mean_round_time_leaves_out_the_first_round_of_every_start(tmp_path):
  """Round 0 and the first round after each resume compile: the mean leaves them out, the
  checkpoint carries them to the next start, and the summary line names them."""
  part = _config(tmp_path, algorithm="FedAvg", global_rounds=1)
  assert run_experiment(part, **QUIET).runs[0].warmup_rounds == [0]
  run_experiment(part.replace(global_rounds=3), **QUIET)
  results = run_experiment(part.replace(global_rounds=5), **QUIET)
  run = results.runs[0]
  assert run.warmup_rounds == [0, 2, 4]
  times = run.history["round_time_s"]
  assert len(times) == 6
  assert run.mean_round_time_s == pytest.approx(np.mean([times[i] for i in (1, 3, 5)]))
  with open(run.files["json"]) as f:
    assert json.load(f)["warmup_rounds"] == [0, 2, 4]
  assert "(rounds 0, 2 and 4, the first of each start, which compile, excluded)" in (
      results.summary_lines()[2])


def test_extending_a_scheduled_run_warns(tmp_path):
  """FedPHP's μ_R = μ·R/global_rounds: extending the run changes its schedule from the
  checkpoint on, which the resumed run says (FedAvg, without a schedule, says nothing)."""
  for name, warns in (("FedPHP", True), ("FedAvg", False)):
    part = _config(tmp_path / name, algorithm=name, global_rounds=1)
    run_experiment(part, **QUIET)
    lines = []
    run_experiment(part.replace(global_rounds=2), log=lines.append)
    said = [line for line in lines if "schedules over global_rounds" in line]
    assert len(said) == warns, lines
    if warns:
      assert said[0].startswith("warning: ") and "from 1 to 2" in said[0], said
  # the same rounds again, or a schedule fixed by algo_params: nothing changes, nothing said
  base = _config(tmp_path, algorithm="FedKD", global_rounds=5)
  assert schedule_change({"global_rounds": 5}, base) is None
  assert "FedKD schedules over global_rounds" in schedule_change({"global_rounds": 3}, base)
  fixed = base.replace(algo_params={"global_rounds": 5}, global_rounds=8)
  assert schedule_change({"global_rounds": 3}, fixed) is None


def _cli(out, *extra, rounds=8):
  return [sys.executable, "-m", "fedjax_lib", "-m", "dnn", "-nc", "4", "-lr", "0.05",
          "-gr", str(rounds), "--out", str(out), "--no-progress", "--unroll", "1", *extra]


# Ditto: a server model and per-client state (FedAvg's server-only state is a part of that);
# each case is three CLI processes, ~40 s of test time.
@pytest.mark.parametrize("algorithm", ["Ditto"])
def test_sigkill_at_a_random_round_then_resume(algorithm, tmp_path):
  reference = tmp_path / "reference"
  subprocess.run(_cli(reference, "-algo", algorithm, "--checkpoint-every", "1"), check=True,
                 capture_output=True)
  out = tmp_path / "killed"
  kill_after = int(np.random.default_rng().integers(1, 7))  # a checkpoint step in 1..6
  proc = subprocess.Popen(_cli(out, "-algo", algorithm, "--checkpoint-every", "1"),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt = out / "checkpoints" / f"digits_{algorithm}_test_0" / str(kill_after)
  deadline = time.time() + 300
  while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (out / f"digits_{algorithm}_test_0.json").exists() or proc.returncode == 0
  done = subprocess.run(_cli(out, "-algo", algorithm, "--checkpoint-every", "1"),
                        capture_output=True, text=True, check=True)
  a = json.load(open(reference / f"digits_{algorithm}_test_0.json"))
  b = json.load(open(out / f"digits_{algorithm}_test_0.json"))
  for key in METRICS:
    assert a[key] == b[key], (key, kill_after, done.stderr[-500:])
  assert not output.leftovers(str(out))  # Orbax's temporary folder and the lock file: gone
  cfg_a = Config(out=str(reference))
  cfg_b = Config(out=str(out))
  _, state_a = _final_state(cfg_a, algorithm)
  _, state_b = _final_state(cfg_b, algorithm)
  jax.tree.map(np.testing.assert_array_equal, state_a, state_b)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  out = tmp_path / "run"
  proc = subprocess.Popen(_cli(out, rounds=400), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  for line in proc.stdout:  # wait until a round has been trained
    if line.startswith("round    1"):
      break
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err
  assert err.startswith("SIGTERM: stopping after this round"), err
  assert "saved" in err and "rerun the same command" in err
  assert "Traceback" not in err
  assert not (out / "digits_FedAvg_test_0.json").exists()  # no partial results file
  assert not (out / ".digits_FedAvg_test.lock").exists()
  steps = checkpoint_lib.RunCheckpointer(
      str(out / "checkpoints" / "digits_FedAvg_test_0")).steps()
  assert len(steps) == 1  # the round reached depends on the machine's speed


def test_config_mismatch_and_missing_checkpoint_are_refused(tmp_path):
  config = _config(tmp_path, global_rounds=1)
  run_experiment(config, **QUIET)
  with pytest.raises(ConfigError, match=r"different config \(learning_rate: 0\.05 → 0\.1"):
    run_experiment(config.replace(learning_rate=0.1), **QUIET)
  with pytest.raises(ConfigError, match="no checkpoint"):
    run_experiment(_config(tmp_path / "other", resume=True), **QUIET)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
  config = _config(tmp_path, global_rounds=2)
  whole = run_experiment(config, **QUIET).runs[0].history
  directory = checkpoint_dir(config, "digits_FedAvg_test", 0)
  latest = os.path.join(directory, str(max(int(s) for s in os.listdir(directory)
                                           if s.isdigit())))
  for root, _, files in os.walk(latest):
    for f in files:
      with open(os.path.join(root, f), "w") as fh:
        fh.write("garbage")
  lines = []
  again = run_experiment(config, log=lines.append).runs[0].history
  assert again["test_acc"] == whole["test_acc"]
  warned = [l for l in lines if l.startswith("warning: checkpoint")]
  assert len(warned) == 1 and "could not be read" in warned[0], lines
  assert os.path.isdir(latest + ".unreadable")


def test_same_seed_same_numbers_across_executors(tmp_path):
  runs = {ex: run_experiment(_config(tmp_path / ex, executor=ex, checkpoint_every=0,
                                     algorithm="Ditto"), **QUIET).runs[0].history
          for ex in ("sequential", "vmap", "chunked")}
  again = run_experiment(_config(tmp_path / "again", executor="sequential", checkpoint_every=0,
                                 algorithm="Ditto"), **QUIET).runs[0].history
  assert again["test_acc"] == runs["sequential"]["test_acc"]  # identical reruns
  assert again["train_loss"] == runs["sequential"]["train_loss"]
  for ex in ("vmap", "chunked"):
    np.testing.assert_allclose(runs[ex]["test_acc_global"], runs["sequential"]["test_acc_global"],
                               atol=1e-6)
    np.testing.assert_allclose(runs[ex]["test_acc"], runs["sequential"]["test_acc"], atol=1e-6)
    np.testing.assert_allclose(runs[ex]["train_loss"], runs["sequential"]["train_loss"],
                               rtol=1e-4)


def test_nonfinite_updates_stop_or_are_skipped(tmp_path):
  # A learning rate this large makes some client updates overflow within the first round.
  diverge = dict(learning_rate=1e30, checkpoint_every=0, global_rounds=2)
  result = run_experiment(_config(tmp_path / "stop", **diverge), **QUIET)
  payload = json.load(open(result.runs[0].files["json"]))
  assert "non-finite update(s) from client(s) [" in payload["stopped"]
  assert "round 0" in payload["stopped"] and "use --checkpoint-every" in payload["stopped"]
  # with checkpoints on, diverging before the first: the advice is not to turn them on, and
  # extending the run with --resume says there is no checkpoint (its folder exists, empty)
  saved = _config(tmp_path / "saved", **{**diverge, "checkpoint_every": 1})
  payload = json.load(open(run_experiment(saved, **QUIET).runs[0].files["json"]))
  assert "last finite checkpoint: none: it diverged before the first" in payload["stopped"]
  with pytest.raises(ConfigError, match="there is no checkpoint in .* saved none"):
    run_experiment(saved.replace(global_rounds=3, resume=True), **QUIET)
  skipped = run_experiment(_config(tmp_path / "skip", on_nan="skip-client", **diverge),
                           **QUIET)
  history = skipped.runs[0].history
  assert sum(history["nonfinite_clients"]) > 0
  assert np.isfinite(history["test_acc"]).all()


def test_reports_of_orbax_writes_after_a_failed_save_are_dropped():
  """After a failed save, Orbax's writes still in flight end in asyncio's "Task exception was
  never retrieved" or a dying writer thread; those reports (tracebacks through Orbax's code)
  are dropped, any other passes."""
  import logging  # pylint: disable=import-outside-toplevel
  import threading  # pylint: disable=import-outside-toplevel
  namespace = {}
  exec(compile("def write():\n  raise OSError(27, 'File too large')\n",  # pylint: disable=exec-used
               os.path.join(os.sep, "site", "orbax", "checkpoint", "fake.py"), "exec"), namespace)

  def raised(fn):
    try:
      fn()
    except OSError as e:
      return e
    raise AssertionError("no exception")

  def elsewhere():
    raise OSError(28, "No space left on device")

  hook, asyncio_filters = threading.excepthook, list(logging.getLogger("asyncio").filters)
  reported = []
  threading.excepthook = lambda args: reported.append(str(args.exc_value))
  try:
    checkpoint_lib._quiet_after_failed_write()  # pylint: disable=protected-access
    checkpoint_lib._quiet_after_failed_write()  # idempotent: one hook, whatever the count
    logger = logging.getLogger("asyncio")
    orbax_error, other_error = raised(namespace["write"]), raised(elsewhere)
    assert not logger.filter(logging.LogRecord(
        "asyncio", logging.ERROR, __file__, 1, "Task exception was never retrieved", None,
        (OSError, orbax_error, orbax_error.__traceback__)))
    assert logger.filter(logging.LogRecord(
        "asyncio", logging.ERROR, __file__, 1, "other", None,
        (OSError, other_error, other_error.__traceback__)))
    for target in (namespace["write"], elsewhere):
      thread = threading.Thread(target=target)
      thread.start()
      thread.join()
    assert reported == ["[Errno 28] No space left on device"], reported
  finally:
    threading.excepthook = hook
    logging.getLogger("asyncio").filters[:] = asyncio_filters
