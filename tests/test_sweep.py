"""Sweeps: every combination side by side in the one run loop, equal to separate runs."""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lib import Config, run_experiment
from fedjax_lib import cli
from fedjax_lib import runner as runner_lib
from fedjax_lib import sweep as sweep_lib
from fedjax_lib.config import RUN_SETTINGS
from fedjax_lib.core import rng
from fedjax_lib.core.engine import LR_DECAY, StackedPrograms
from fedjax_lib.core.local import LocalSpec
from fedjax_lib.errors import ConfigError
from tests.helpers import as_images, suite_params
from tests.test_conformance import ALGORITHMS, VARIANTS
from tests.test_engine import _engine, _small_data

QUIET = dict(log=lambda msg: None)


def _config(out, **kw):
  base = dict(model="dnn", num_clients=6, learning_rate=0.05, global_rounds=2,
              executor="vmap", out=str(out), progress=False)
  base.update(kw)
  return Config(**base)


def _separate(tmp_path, combo, **kw):
  """The combination run on its own (the sweep fixes the partition to the base seed 0)."""
  values = dict(kw)
  params = dict(values.pop("algo_params", {}))
  for name, value in combo.items():
    if name in ("seed", "learning_rate"):
      values[name] = value
    else:
      params[name] = value
  out = tmp_path / f"separate_{len(os.listdir(tmp_path))}"
  return run_experiment(_config(out, partition_seed=0, algo_params=params, **values),
                        **QUIET).runs[0]


def _assert_same(a, b):
  np.testing.assert_allclose(a.history["test_acc"], b.history["test_acc"], atol=1e-9)
  np.testing.assert_allclose(a.history["train_loss"], b.history["train_loss"], rtol=2e-5)


def test_seed_and_lr_sweep_equals_separate_runs(tmp_path):
  res = run_experiment(_config(tmp_path / "sweep",
                               sweep={"seed": [0, 1], "learning_rate": [0.05, 0.02]}), **QUIET)
  assert res.combos == [{"seed": 0, "learning_rate": 0.05}, {"seed": 0, "learning_rate": 0.02},
                        {"seed": 1, "learning_rate": 0.05}, {"seed": 1, "learning_rate": 0.02}]
  for i in (1, 2):  # two of the four, against runs of their own
    _assert_same(res.runs[i], _separate(tmp_path, res.combos[i]))
  # Different seeds and learning rates give different trajectories.
  losses = {tuple(r.history["train_loss"]) for r in res.runs}
  assert len(losses) == 4
  # Files: one JSON/h5/PNG per combination, and the summary (mean ± std over seeds per lr).
  for s, run in enumerate(res.runs):
    payload = json.load(open(run.files["json"]))
    assert payload["combination"] == res.combos[s] and payload["seed"] == run.seed
    assert os.path.exists(run.files["h5"]) and os.path.exists(run.files["png"])
  summary = json.load(open(res.files["summary_json"]))
  assert [row["setting"] for row in summary["rows"]] == [{"learning_rate": 0.05},
                                                         {"learning_rate": 0.02}]
  row = summary["rows"][0]
  best = [res.runs[0].best_test_acc, res.runs[2].best_test_acc]
  assert row["seeds"] == [0, 1]
  np.testing.assert_allclose(row["best_test_acc_mean"], np.mean(best))
  np.testing.assert_allclose(row["best_test_acc_std"], np.std(best))
  table = open(res.files["summary_md"]).read()
  assert table.startswith("| learning_rate | seeds |") and "0.05 | 0,1 |" in table


def _spy_engine(monkeypatch):
  """Captures the engines run_experiment builds (their trace counters)."""
  built = []
  original = runner_lib.build

  def spy(config):
    out = original(config)
    built.append(out.engine)
    return out

  monkeypatch.setattr(runner_lib, "build", spy)
  return built


def test_algorithm_hyperparameter_sweep_one_compilation(tmp_path, monkeypatch):
  """Ditto's μ as a leading axis: one traced round for both values, equal to separate runs."""
  built = _spy_engine(monkeypatch)
  res = run_experiment(_config(tmp_path / "sweep", algorithm="Ditto",
                               sweep={"mu": [0.0, 0.5]}), **QUIET)
  traces = built[0].trace_counts
  assert traces["round_stacked"] == 1 and traces["client_update"] == 1, traces
  assert "test_acc_global" in res.runs[1].history
  _assert_same(res.runs[1], _separate(tmp_path, {"mu": 0.5}, algorithm="Ditto"))
  assert res.runs[0].history["train_loss"] != res.runs[1].history["train_loss"]


@pytest.mark.parametrize("algorithm,executor", [("FedBABU", "vmap"), ("FedALA", "sequential"),
                                                ("FedBABU", "sequential")])
def test_sweep_entry_equals_its_separate_run_with_final_evaluation(algorithm, executor,
                                                                   tmp_path, monkeypatch):
  """The one run loop: a sweep entry equals the run of its own, FedBABU's fine-tuned final
  evaluation included (stacked runs with vmap, one after another with sequential, where the
  swept learning rate reaches one compiled per-client program as an argument)."""
  built = _spy_engine(monkeypatch)
  # A rolled local loop and 2 fine-tuning epochs keep the compiled programs small.
  small = dict(unroll=1, algo_params={"fine_tuning_epochs": 2} if algorithm == "FedBABU" else {})
  res = run_experiment(_config(tmp_path / "sweep", algorithm=algorithm, executor=executor,
                               sweep={"seed": [0, 1], "learning_rate": [0.05, 0.02]}, **small),
                       **QUIET)
  if executor == "sequential":
    assert built[0].trace_counts["client_update"] == 1  # 4 combinations, one program
  for i in (0, 3):
    combo = res.combos[i]
    separate = _separate(tmp_path, combo, algorithm=algorithm, executor=executor, **small)
    _assert_same(res.runs[i], separate)
    sweep_json = json.load(open(res.runs[i].files["json"]))
    own_json = json.load(open(separate.files["json"]))
    if algorithm == "FedBABU":
      assert len(sweep_json["test_acc"]) == 4  # 3 evaluations + the final one
      np.testing.assert_allclose(sweep_json["final_eval"]["test_acc"],
                                 own_json["final_eval"]["test_acc"], atol=1e-9)


def test_auto_break_in_a_sweep_stops_each_combination_on_its_own(tmp_path):
  """-ab in a sweep: a combination that stops keeps its state; the others go on."""
  res = run_experiment(_config(tmp_path / "sweep", auto_break=True, top_cnt=1,
                               global_rounds=6, sweep={"learning_rate": [1e-30, 0.05]}),
                       **QUIET)
  flat, learning = res.runs
  assert flat.history["rounds"] == [0, 1, 2]  # no improvement after round 0
  assert "auto-break at round 2" in json.load(open(flat.files["json"]))["stopped"]
  assert len(learning.history["rounds"]) > 3
  alone = _separate(tmp_path, {"learning_rate": 1e-30}, auto_break=True, top_cnt=1,
                    global_rounds=6)
  assert alone.history["rounds"] == flat.history["rounds"]
  assert alone.history["test_acc"] == flat.history["test_acc"]


def test_sweep_with_checkpoints_resumes(tmp_path):
  """Sweeps checkpoint each combination and continue like a run of its own."""
  cfg = dict(sweep={"seed": [0, 1]}, checkpoint_every=1)
  whole = run_experiment(_config(tmp_path / "whole", global_rounds=3, **cfg), **QUIET)
  run_experiment(_config(tmp_path / "part", global_rounds=1, **cfg), **QUIET)
  resumed = run_experiment(_config(tmp_path / "part", global_rounds=3, **cfg), **QUIET)
  for a, b in zip(whole.runs, resumed.runs):
    assert a.history["test_acc"] == b.history["test_acc"]


def test_swept_values_follow_derived_values():
  """PerAvg's β defaults to the learning rate: sweeping lr sweeps both leaves."""
  from fedjax_lib.algorithms import make_algorithm
  from fedjax_lib.models import make_model
  model = make_model("dnn", (8,), 3)
  algos = [make_algorithm("PerAvg", model, LocalSpec(learning_rate=lr, steps_per_epoch=4))
           for lr in (0.1, 0.01)]
  values = sweep_lib.swept_values(algos, ["learning_rate"])
  assert list(values) == ["local.learning_rate"]
  np.testing.assert_allclose(values["local.learning_rate"], [0.1, 0.01])
  swapped = algos[0].with_hyperparameter_values({"local.learning_rate": 0.01})
  assert swapped.meta_step == 0.01 and algos[0].meta_step == 0.1
  assert dataclasses.asdict(swapped.local) == dataclasses.asdict(algos[1].local)


@pytest.mark.parametrize("kw,needle", [
    (dict(algorithm="Ditto", sweep={"plocal_epochs": [1, 2]}), "plocal_epochs"),
    (dict(sweep={"mu": [0.1, 0.2]}), "mu"),
    (dict(sweep={"join_ratio": [0.5, 1.0]}), "join_ratio"),
    (dict(algorithm="FedDyn", sweep={"alpha": [0.5, 1.0]}), "the algorithm's α.*al="),
    (dict(sweep={"seed": [0, 0]}), "repeats"),
    (dict(sweep={"learning_rate": ["a"]}), "'a'"),
    (dict(sweep={"seed": [0, 1]}, times=2), "times=2"),
])
def test_bad_sweeps_fail_before_writing(kw, needle, tmp_path):
  with pytest.raises(ConfigError, match=needle):
    run_experiment(_config(tmp_path, **kw), **QUIET)
  assert not os.listdir(tmp_path)


def test_cli_sweep_flags():
  args = cli.build_parser().parse_args(["--sweep", "seed=0,1", "lr=0.05,0.02", "--sweep",
                                        "mu=1e-2,1"])
  config = cli.config_from_args(args)
  assert config.sweep == {"seed": [0, 1], "learning_rate": [0.05, 0.02], "mu": [0.01, 1]}


def test_pfllib_al_sweeps_the_algorithms_alpha_not_the_partitions():
  config = cli.config_from_args(cli.build_parser().parse_args(
      ["-algo", "FedDyn", "--alpha", "0.3", "--sweep", "al=0.1,0.5"]))
  assert config.sweep == {"algo_alpha": [0.1, 0.5]}
  combos = [sweep_lib.combo_config(config, c) for c in sweep_lib.combinations(config.sweep)]
  assert [(c.alpha, c.algo_params) for c in combos] == [(0.3, {"alpha": 0.1}),
                                                        (0.3, {"alpha": 0.5})]


def test_integer_values_of_a_float_hyperparameter_are_swept():
  """``--sweep mu=0,0.1`` parses 0 as an int; the algorithm takes it as the float 0.0, so the
  combinations stay one compiled program."""
  from fedjax_lib import algorithms, models  # pylint: disable=import-outside-toplevel
  from fedjax_lib.core.local import LocalSpec  # pylint: disable=import-outside-toplevel
  model = models.make_model("mlr", (1, 8, 8), 10)
  algos = [algorithms.make_algorithm("FedProx", model, LocalSpec(), {"mu": mu})
           for mu in (0, 0.1)]
  assert algos[0].mu == 0.0 and isinstance(algos[0].mu, float)
  values = sweep_lib.swept_values(algos, ["mu"])
  np.testing.assert_allclose(values["mu"], [0.0, 0.1])


@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_float_hyperparameter_can_be_swept(name):
  """A sweep may vary any float field an algorithm lists (`swept_values` refuses the others)
  and binds it as a traced array: no program may branch on one in Python (FedCP's ``if lam:``
  and FedDBE's ``kl_weight != 0`` did, a traceback from inside JAX). Traces init (with the
  warm-up), the round (with ``-ld``'s factors where the algorithm offers it) and the
  evaluations of a 2-run stack with every float field swept, and the new-client fine-tuning
  of one run; nothing is compiled. The run settings the runner fills
  (`config.RUN_SETTINGS`: join_ratio sets K = int(N·jr) shapes) are not hyperparameters and
  cannot be swept."""
  data = _small_data(num_clients=5, seed=1)
  data = as_images(data) if name == "FedKTL" else data
  algorithm, variant = VARIANTS.get(name, (name, {}))
  eng = _engine(algorithm, "vmap", data, params=suite_params(algorithm, **variant),
                new_clients=1)
  paths = [path for path, value in eng.algorithm.hyperparameter_values().items()
           if isinstance(value, float) and path not in RUN_SETTINGS]
  assert "local.learning_rate" in paths
  swept = {path: jax.ShapeDtypeStruct((2,), jnp.float32) for path in paths}
  if eng.algorithm.decayed_rates() is not None:  # -ld's factors, which scale the swept rates
    swept[LR_DECAY] = {"client": jax.ShapeDtypeStruct((2, eng.num_clients + 1), jnp.float32),
                       "server": jax.ShapeDtypeStruct((2,), jnp.float32)}
  roots = jnp.stack([rng.root_key(0), rng.root_key(1)])
  names = [n for n, _ in StackedPrograms(eng).trace(swept, roots, data.x[0])]
  assert names[:2] == ["init", "round"] and "evaluation" in names
  if eng.algorithm.supports_new_clients:  # (one run of a sequential sweep: scalars)
    one = {path: jax.ShapeDtypeStruct((), jnp.float32) for path in paths}
    server, clients = jax.eval_shape(eng._init_fn, one, rng.root_key(0), data.x[0])  # pylint: disable=protected-access
    template = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype),
                            next(iter(clients.values())))
    jax.eval_shape(functools.partial(eng._new_client_fn, gi=0, epochs=1), one, server,  # pylint: disable=protected-access
                   template, eng.arrays, jnp.int32(eng.num_clients), rng.root_key(2))
