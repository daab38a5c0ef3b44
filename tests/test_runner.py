"""run_experiment behaviour: auto-break, eval gap, repetitions, summary."""

import numpy as np

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


def test_eval_gap_and_repetitions(tmp_path):
  results = run_experiment(_quiet(learning_rate=0.05, global_rounds=6, eval_gap=3, times=2,
                                  out=str(tmp_path)), log=lambda m: None)
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
