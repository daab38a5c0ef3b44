"""Evaluation paths side by side: the engine's default against the per-client path.

For each algorithm: the CLI's bundled-digits configuration (20 clients, Dir(0.1), the 4-layer
CNN, ``-lbs 10 -lr 0.005 -jr 1``, the CPU's sequential executor), ``--rounds`` rounds, then
``--repeats`` evaluations by the default path (the shared forward pass of a global model,
`Algorithm.shared_views`, or of global features under personal heads,
`Algorithm.feature_views`, where they apply) alternating with as many by the per-client path
(``Engine.shared_eval = False``: each client's full model on its padded tables), the first of
each excluded. Reports the median seconds of both and the largest difference of any metric
between them.

    python experiments/benchmarks/bench_eval_paths.py --algorithms FedALA,FedPer,FedAvg
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from fedjax_lib import Config  # pylint: disable=wrong-import-position
from fedjax_lib.core import rng  # pylint: disable=wrong-import-position
from fedjax_lib.runner import build  # pylint: disable=wrong-import-position


def max_difference(a: dict, b: dict) -> float:
  worst = 0.0
  for key in a:
    x, y = np.asarray(a[key], np.float64), np.asarray(b[key], np.float64)
    both = ~(np.isnan(x) & np.isnan(y))
    worst = max(worst, float(np.max(np.abs(x[both] - y[both]), initial=0.0)))
  return worst


def measure(algorithm: str, rounds: int, repeats: int) -> dict:
  cfg = Config(algorithm=algorithm, model="cnn", batch_size=10, local_epochs=1,
               learning_rate=0.005, join_ratio=1.0, eval_gap=1, global_rounds=rounds,
               progress=False)
  eng = build(cfg).engine
  root = rng.root_key(0)
  server, clients = eng.init(root, eng.data.x[0])
  for r in range(rounds):
    server, clients, _ = eng.run_round(server, clients, root, r)
  seconds = {True: [], False: []}
  metrics = {}
  for _ in range(repeats + 1):
    for default in (True, False):
      eng.shared_eval = default
      start = time.perf_counter()
      metrics[default] = eng.evaluate(server, clients, root, rounds)
      seconds[default].append(time.perf_counter() - start)
  eng.shared_eval = True
  alg = eng.groups[0].algorithm
  one = jax.tree.map(lambda a: a[0], clients[eng.groups[0].name])
  if alg.shared_views(server, one) is not None:
    path = "shared (global model)"
  elif alg.feature_views(server, one) is None:
    path = "per client"
  elif eng.trace_counts["evaluate_forward"]:
    path = "features + personal heads"
  else:
    path = "per client (a client's base differs)"
  return {"algorithm": algorithm, "path": path,
          "default_s": float(np.median(seconds[True][1:])),
          "per_client_s": float(np.median(seconds[False][1:])),
          "max_diff": max_difference(metrics[True], metrics[False]),
          "test_acc": metrics[True]["test_acc"]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--algorithms", default="FedALA,FedPer,FedRep,FedROD,FedDBE,GPFL,FedCP")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=8)
  args = parser.parse_args()
  print(f"Measured {datetime.date.today()} on {platform.machine()} ({os.cpu_count()} cores), "
        f"jax {jax.__version__} ({jax.default_backend()}). Bundled digits, CNN, 20 clients, "
        f"{args.rounds} rounds, median of {args.repeats} evaluations each, alternating.\n")
  print("| algorithm | default path | default s | per-client s | max metric difference | "
        "test acc |")
  print("|---|---|---|---|---|---|")
  for name in args.algorithms.split(","):
    row = measure(name, args.rounds, args.repeats)
    print(f"| {row['algorithm']} | {row['path']} | {row['default_s']:.4f} | "
          f"{row['per_client_s']:.4f} | {row['max_diff']:.1e} | {row['test_acc']:.4f} |",
          flush=True)


if __name__ == "__main__":
  main()
