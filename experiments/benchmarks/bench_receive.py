"""FedALA's receive phase on shared features against per-client windows, side by side.

Two engines of the CLI's bundled-digits configuration (the 4-layer CNN, ``-lbs 10 -lr 0.005
-jr 1``, Dir(0.1) or ``--alpha``, ``--clients`` clients, the CPU's sequential executor) in one
process, their rounds alternating: the default, where every client's ALA reads the global
model's features of every training sample, forwarded once per round and kept for the
evaluation that follows (`Algorithm.receive_features`), all clients' ALA in one vmapped
program; the same engine with that turned off (the engine's ``_receive_reads``, as before
the change: each client forwards its own sample window in its own program, and the
evaluation forwards every sample through the global features); and ``shared_eval=False``
(the receive as just said, and every client evaluated on its own padded tables). Each round
is followed by an evaluation. Reports medians over the rounds after the first ``--skip`` of: the training phase
(local SGD, aggregation), the rest of the round (the receive phase), the evaluation, and the
sum; and the largest difference of any client-state leaf and any metric after the last round.

    python experiments/benchmarks/bench_receive.py --rounds 20
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from fedjax_lib import Config  # pylint: disable=wrong-import-position
from fedjax_lib.core import rng  # pylint: disable=wrong-import-position
from fedjax_lib.runner import build  # pylint: disable=wrong-import-position

sys.path.insert(0, HERE)
from bench_eval_paths import max_difference  # pylint: disable=wrong-import-position


VARIANTS = ("shared features, one program / their remaining blocks",
            "per client, own windows / shared features",
            "per client, own windows / per client")


def timed_training(eng, seconds: list) -> None:
  """Records the seconds of every training phase (``executor.train`` of the round phase)."""
  executor = eng.executors[0]
  train = type(executor).train

  def timed(self, program, states, slots, keys, linear):
    start = time.perf_counter()
    out = jax.block_until_ready(train(self, program, states, slots, keys, linear))
    if program.write.phase == "round":
      seconds.append(time.perf_counter() - start)
    return out

  executor.train = types.MethodType(timed, executor)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--algorithm", default="FedALA")
  parser.add_argument("--clients", type=int, default=20)
  parser.add_argument("--alpha", type=float, default=0.1)
  parser.add_argument("--rounds", type=int, default=20)
  parser.add_argument("--skip", type=int, default=3, help="first rounds left out (compiling)")
  args = parser.parse_args()
  cfg = Config(algorithm=args.algorithm, model="cnn", batch_size=10, local_epochs=1,
               learning_rate=0.005, join_ratio=1.0, eval_gap=1, global_rounds=args.rounds,
               progress=False, num_clients=args.clients, alpha=args.alpha)
  root = rng.root_key(0)
  runs = {}
  for variant in VARIANTS:
    eng = build(cfg).engine
    if variant != VARIANTS[0]:
      eng._receive_reads[0] = False  # pylint: disable=protected-access
    eng.shared_eval = variant != VARIANTS[2]
    server, clients = eng.init(root, eng.data.x[0])
    train = []
    timed_training(eng, train)
    runs[variant] = {"eng": eng, "state": (server, clients), "train": train, "round": [],
                    "eval": [], "metrics": None}
  for r in range(args.rounds):
    for run in runs.values():
      eng, (server, clients) = run["eng"], run["state"]
      start = time.perf_counter()
      server, clients, _ = eng.run_round(server, clients, root, r)
      jax.block_until_ready((server, clients))
      middle = time.perf_counter()
      run["metrics"] = eng.evaluate(server, clients, root, r)
      run["eval"].append(time.perf_counter() - middle)
      run["round"].append(middle - start)
      run["state"] = (server, clients)
  first, *others = runs.values()
  state_diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)),
                                initial=0.0))
                   for run in others
                   for a, b in zip(jax.tree.leaves(first["state"]), jax.tree.leaves(run["state"])))
  metric_diff = max(max_difference(first["metrics"], run["metrics"]) for run in others)
  print(f"Measured {datetime.date.today()} on {platform.machine()} ({os.cpu_count()} cores), "
        f"jax {jax.__version__} ({jax.default_backend()}). {args.algorithm}, bundled digits, "
        f"CNN, {args.clients} clients, Dir({args.alpha}), {args.rounds} rounds alternating, "
        f"medians of rounds {args.skip}-{args.rounds - 1}, seconds.\n")
  print("| receive / evaluation | training | receive phase | evaluation | round + evaluation |")
  print("|---|---|---|---|---|")
  for variant, run in runs.items():
    skip = args.skip
    train, rounds, evals = (np.asarray(run[k][skip:]) for k in ("train", "round", "eval"))
    print(f"| {variant} | {np.median(train):.4f} | {np.median(rounds - train):.4f} | "
          f"{np.median(evals):.4f} | {np.median(rounds + evals):.4f} |")
  accuracies = " / ".join(f"{run['metrics']['test_acc']:.4f}" for run in runs.values())
  print(f"\nLargest difference to the first row after round {args.rounds - 1}: client and "
        f"server state leaves {state_diff:.1e}, metrics {metric_diff:.1e}; test accuracy "
        f"{accuracies}.")


if __name__ == "__main__":
  main()
