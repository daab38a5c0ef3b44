"""Evaluation paths side by side: the engine's default against the per-client paths.

For each algorithm: the CLI's bundled-digits configuration (20 clients, Dir(0.1), the 4-layer
CNN or ``--model``, ``-lbs 10 -lr 0.005 -jr 1``, the CPU's sequential executor), ``--rounds``
rounds, then ``--repeats`` evaluations by each path in turn, the first of each excluded:

* the default: the shared forward pass of a global model (`Algorithm.shared_views`) or of
  global features under personal heads (`Algorithm.feature_views`) where they apply, else
  per client;
* per client (``Engine.shared_eval = False``): each client's full model on its own samples,
  in blocks of ``Engine.eval_block`` (`evaluate_lib.blocked_logits`, for views of at least
  ``Engine.eval_block_min_flops`` per sample);
* per client, padded: each client's full model on its tables padded to the largest client's
  (a second engine, ``eval_block_min_flops = inf``), the path before the blocks.

Reports the median seconds of each and the largest difference of any metric from the
default.

    python experiments/benchmarks/bench_eval_paths.py --algorithms FedALA,FedPer,FedAvg
    python experiments/benchmarks/bench_eval_paths.py --algorithms Ditto,Local --model dnn
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


def measure(algorithm: str, rounds: int, repeats: int, model: str, block: int) -> dict:
  cfg = Config(algorithm=algorithm, model=model, batch_size=10, local_epochs=1,
               learning_rate=0.005, join_ratio=1.0, eval_gap=1, global_rounds=rounds,
               progress=False)
  eng, padded = build(cfg).engine, build(cfg).engine
  if block:
    eng.eval_block = block
  padded.eval_block_min_flops, padded.shared_eval = float("inf"), False
  root = rng.root_key(0)
  server, clients = eng.init(root, eng.data.x[0])
  for r in range(rounds):
    server, clients, _ = eng.run_round(server, clients, root, r)
  paths = {"default": (eng, True), "blocked": (eng, False), "padded": (padded, False)}
  seconds = {name: [] for name in paths}
  metrics = {}
  for _ in range(repeats + 1):
    for name, (engine, shared) in paths.items():
      engine.shared_eval = shared
      start = time.perf_counter()
      metrics[name] = engine.evaluate(server, clients, root, rounds)
      seconds[name].append(time.perf_counter() - start)
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
          **{f"{name}_s": float(np.median(seconds[name][1:])) for name in paths},
          "max_diff": max(max_difference(metrics["default"], metrics[name])
                          for name in paths),
          "test_acc": metrics["default"]["test_acc"]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--algorithms", default="FedALA,FedPer,FedRep,FedROD,FedDBE,GPFL,FedCP")
  parser.add_argument("--model", default="cnn")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=8)
  parser.add_argument("--block", type=int, default=0,
                      help="Engine.eval_block of the per-client blocks (0: the engine's)")
  args = parser.parse_args()
  print(f"Measured {datetime.date.today()} on {platform.machine()} ({os.cpu_count()} cores), "
        f"jax {jax.__version__} ({jax.default_backend()}). Bundled digits, {args.model}, 20 "
        f"clients, {args.rounds} rounds, median of {args.repeats} evaluations each, "
        "alternating.\n")
  print("| algorithm | default path | default s | per client, blocks s | per client, padded s "
        "| max metric difference | test acc |")
  print("|---|---|---|---|---|---|---|")
  for name in args.algorithms.split(","):
    row = measure(name, args.rounds, args.repeats, args.model, args.block)
    print(f"| {row['algorithm']} | {row['path']} | {row['default_s']:.4f} | "
          f"{row['blocked_s']:.4f} | {row['padded_s']:.4f} | {row['max_diff']:.1e} | "
          f"{row['test_acc']:.4f} |", flush=True)


if __name__ == "__main__":
  main()
