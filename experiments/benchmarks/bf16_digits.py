"""Accuracy (and time) of bfloat16 mixed precision vs float32 on the bundled digits data.

Setting: PFLlib's defaults on digits — 20 clients, Dirichlet α = 0.1 label skew, the 4-layer
CNN (FedAvgCNN), SGD lr 0.005, batch 10, 1 local epoch, every client every round, evaluation
every round — for ``--rounds`` rounds (default 25), seeds 0, 1, 2 (``times=3``: one partition,
three initialisations and training streams). Each algorithm runs once with ``dtype="float32"``
and once with ``dtype="bfloat16"`` (float32 parameters and optimizer state; convolutions,
matmuls and activations in bfloat16; float32 logits, losses and metrics), through
``fedjax_lib.runner.run_experiment`` exactly as the CLI would, writing into a temporary folder.
Ditto uses μ = 0.01 as in ``experiments/pfl_digits``.

    python experiments/benchmarks/bf16_digits.py                       # FedAvg and Ditto
    python experiments/benchmarks/bf16_digits.py --algorithms FedAvg --rounds 10

Prints a markdown table: best and last test accuracy (mean ± std over the seeds, PFLlib's
``average_data``), the last train loss, and seconds per round (mean over rounds 1.., round 0
compiles; training and evaluation included). ``--json FILE`` also writes every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

# Non-default hyperparameters (as in experiments/pfl_digits/run.py).
HYPERPARAMETERS = {"Ditto": {"mu": 0.01}}
DTYPES = ("float32", "bfloat16")


def run(algorithm: str, dtype: str, args) -> dict:
  """One algorithm at one dtype, ``args.seeds`` seeds; returns per-seed and summary numbers."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from fedjax_lib import Config, run_experiment  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as out:
    config = Config(dataset="digits", algorithm=algorithm, model="cnn", dtype=dtype,
                    learning_rate=args.lr, batch_size=10, local_epochs=1, num_clients=20,
                    global_rounds=args.rounds, times=args.seeds, seed=0, eval_gap=1,
                    algo_params=dict(HYPERPARAMETERS.get(algorithm, {})), out=out,
                    progress=False)
    start = time.perf_counter()
    results = run_experiment(config, log=lambda msg: None)
    wall = time.perf_counter() - start
  runs = results.runs
  best = np.array([r.best_test_acc for r in runs])
  last = np.array([r.last_test_acc for r in runs])
  loss = np.array([r.history["train_loss"][-1] for r in runs])
  s_round = np.array([r.mean_round_time_s for r in runs])
  return {"algorithm": algorithm, "dtype": dtype, "seeds": [r.seed for r in runs],
          "best_test_acc": best.tolist(), "last_test_acc": last.tolist(),
          "last_train_loss": loss.tolist(), "s_per_round": s_round.tolist(),
          "best_mean": float(best.mean()), "best_std": float(best.std()),
          "last_mean": float(last.mean()), "last_std": float(last.std()),
          "loss_mean": float(loss.mean()), "loss_std": float(loss.std()),
          "s_per_round_mean": float(s_round.mean()), "wall_s": wall}


def table(rows: list[dict]) -> str:
  lines = ["| algorithm | dtype | best test acc | last test acc | last train loss | s/round |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['algorithm']} | {r['dtype']} | {r['best_mean']:.4f} ± {r['best_std']:.4f} "
                 f"| {r['last_mean']:.4f} ± {r['last_std']:.4f} "
                 f"| {r['loss_mean']:.4f} ± {r['loss_std']:.4f} | {r['s_per_round_mean']:.2f} |")
  return "\n".join(lines)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--algorithms", default="FedAvg,Ditto",
                      help="comma-separated algorithm names (default FedAvg,Ditto)")
  parser.add_argument("--rounds", type=int, default=25)
  parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. seeds-1")
  parser.add_argument("--lr", type=float, default=0.005)
  parser.add_argument("--json", metavar="FILE", help="also write every number here")
  args = parser.parse_args()
  import jax  # pylint: disable=import-outside-toplevel
  machine = (f"{platform.machine()}, {os.cpu_count()} CPU(s), backend "
             f"{jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}")
  print(f"# {machine}", file=sys.stderr)
  rows = []
  for algorithm in args.algorithms.split(","):
    for dtype in DTYPES:
      row = run(algorithm.strip(), dtype, args)
      rows.append(row)
      print(f"# {row['algorithm']} {dtype}: best {row['best_test_acc']}, last "
            f"{row['last_test_acc']}, {row['s_per_round_mean']:.2f} s/round, "
            f"{row['wall_s']:.0f} s wall", file=sys.stderr, flush=True)
      if args.json:  # after every row, so a long run that is stopped keeps what it measured
        with open(args.json, "w", encoding="utf-8") as f:
          json.dump({"machine": machine, "rounds": args.rounds, "lr": args.lr, "rows": rows},
                    f, indent=1)
  print(table(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
