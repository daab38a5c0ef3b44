"""run_experiment behaviour: auto-break, eval gap, repetitions, summary."""

import numpy as np
import pytest

from fedjax_lib import Config, run_experiment


def _quiet(**kwargs):
  base = dict(model="mlr", num_clients=8, progress=False)
  base.update(kwargs)
  return Config(**base)


def test_auto_break_stops_after_top_cnt_evaluations_without_improvement(tmp_path):
  # A vanishing learning rate keeps the accuracy flat, so the best stays at round 0.
  results = run_experiment(_quiet(learning_rate=1e-30, global_rounds=50, auto_break=True,
                                  top_cnt=2, out=str(tmp_path)), log=lambda m: None)
  history = results.runs[0].history
  assert history["rounds"] == [0, 1, 2, 3]
  assert len(set(np.round(history["test_acc"], 12))) == 1


def test_eval_gap_and_repetitions(tmp_path, capsys):
  results = run_experiment(_quiet(learning_rate=0.05, global_rounds=6, eval_gap=3, times=2,
                                  out=str(tmp_path), progress=True), log=lambda m: None)
  # The repetitions advance side by side under one progress bar, named after both.
  assert "runs 0–1: 100%" in capsys.readouterr().err
  assert [r.seed for r in results.runs] == [0, 1]
  for run in results.runs:
    assert run.history["rounds"] == [0, 3, 6]
    assert len(run.history["round_time_s"]) == 7
    assert run.best_test_acc == max(run.history["test_acc"])
  mean, std = results.best_test_acc
  assert np.isclose(mean, np.mean([r.best_test_acc for r in results.runs]))
  assert np.isclose(std, np.std([r.best_test_acc for r in results.runs]))
  lines = results.summary_lines()
  assert lines[0].startswith("best test accuracy:") and str(tmp_path) in lines[-1]


@pytest.mark.xla_optimized  # runs long enough to repay it (19 -> 9 s): tests/conftest.py
def test_conv_impl_reaches_the_models_that_take_it_and_gives_the_same_numbers(tmp_path):
  """``--conv-impl`` / ``Config.conv_impl``: parsed, handed to the models with a convolution
  choice (only those, in a family), and a run with another lowering gives the default's
  numbers up to float rounding."""
  from fedjax_lib import cli  # pylint: disable=import-outside-toplevel
  from fedjax_lib.models import make_model  # pylint: disable=import-outside-toplevel
  from fedjax_lib.runner import build, model_options  # pylint: disable=import-outside-toplevel
  parse = lambda argv: cli.config_from_args(cli.build_parser().parse_args(argv))
  assert parse(["--conv-impl", "hybrid"]).conv_impl == "hybrid"
  assert parse([]).conv_impl == "auto"
  family = Config(model="cnn,dnn", conv_impl="hybrid")
  assert model_options(family, "cnn") == {"conv_impl": "hybrid"}
  assert model_options(family, "dnn") == {}
  assert model_options(Config(model="cnn"), "cnn") == {}
  assert build(_quiet(model="cnn", conv_impl="lax", num_clients=4))[1] == make_model(
      "cnn", (28, 28, 1), 10, conv_impl="lax")
  # `slices` everywhere against `auto` (on XLA:CPU `slices` for training batches, `hybrid` for
  # evaluation's large ones): XLA:CPU's own convolutions are slow inside loops, and the suite
  # compiles with most optimisations off.
  runs = {impl: run_experiment(Config(num_clients=8, global_rounds=1, learning_rate=0.05,
                                      conv_impl=impl, progress=False, plot=False,
                                      out=str(tmp_path / impl)), log=lambda m: None)
          for impl in ("auto", "slices")}
  a, b = (runs[impl].runs[0].history for impl in ("auto", "slices"))
  np.testing.assert_allclose(a["test_acc"], b["test_acc"], atol=1e-6)
  np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-4)
  assert a["train_loss"][0] != a["train_loss"][-1]  # it trained


@pytest.mark.xla_optimized  # runs long enough to repay it (18 -> 16 s): tests/conftest.py
def test_client_threads_from_the_cli_and_python_reach_the_engine_and_the_results(tmp_path):
  """``--client-threads`` / ``Config.client_threads``: parsed; left out, the backend's default
  for the sequential executor and 1 for a traced one; an HtFLlib family (two architecture
  groups, FedTGP's non-linear server) gives the same numbers to the bit on 1 and 3 threads;
  the results JSON records the count."""
  import json  # pylint: disable=import-outside-toplevel
  from fedjax_lib import cli  # pylint: disable=import-outside-toplevel
  from fedjax_lib.core import engine as engine_lib  # pylint: disable=import-outside-toplevel
  from fedjax_lib.runner import build  # pylint: disable=import-outside-toplevel
  parse = lambda argv: cli.config_from_args(cli.build_parser().parse_args(argv))
  assert parse(["--client-threads", "3"]).client_threads == 3
  assert parse([]).client_threads is None
  default = engine_lib.default_client_threads("cpu")
  assert build(_quiet(executor="sequential")).engine.client_threads == default
  assert build(_quiet(executor="vmap")).engine.client_threads == 1
  runs = {}
  for threads in (1, 3):
    out = tmp_path / str(threads)
    res = run_experiment(_quiet(model="cnn,dnn", algorithm="FedTGP", executor="sequential",
                                client_threads=threads, global_rounds=1, num_clients=4,
                                plot=False, out=str(out), algo_params={"server_epochs": 2}),
                         log=lambda m: None)
    runs[threads] = res.runs[0].history
    (path,) = out.glob("*_0.json")
    assert json.loads(path.read_text())["client_threads"] == threads
  for key in ("test_acc", "test_auc", "train_loss"):
    assert runs[1][key] == runs[3][key], key
