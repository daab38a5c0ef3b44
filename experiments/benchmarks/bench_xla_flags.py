"""XLA:CPU settings side by side: the CNN's SGD step and a real round, per ``XLA_FLAGS`` value.

Each setting runs in a fresh process (XLA reads ``XLA_FLAGS`` once, when the backend starts);
the settings alternate ``--repeats`` times so that a slow phase of the machine hits them alike.
A process times (a) ``--steps`` SGD steps of PFLlib's 4-layer CNN (batch 10, 28×28×1, the
digits workload's shape; `bench_cpu_step.py`'s ``fori_loop`` over the valid steps, the
library's CPU loop) with ``--conv-impl``: milliseconds per step, best
of ``--reps`` calls; (b) ``--algorithm``'s rounds on the bundled digits as the CLI builds them
(20 clients, Dir(0.1), ``-m CNN -lbs 10 -ls 1 -lr 0.005 -jr 1 -eg 1``): medians of the training
and the evaluation seconds of rounds 1..``--rounds`` (round 0 compiles).

    python experiments/benchmarks/bench_xla_flags.py --flags \\
        ";--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY"
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def measure(args) -> dict:
  """Runs in the child process: both timings under the inherited ``XLA_FLAGS``."""
  sys.path.insert(0, ROOT)
  sys.path.insert(0, HERE)
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from bench_cpu_step import training_forms  # the CNN's SGD steps, as bench_cpu_step times them
  from fedjax_lib import Config  # pylint: disable=import-outside-toplevel
  from fedjax_lib.core import rng  # pylint: disable=import-outside-toplevel
  from fedjax_lib.runner import build  # pylint: disable=import-outside-toplevel

  params, forms = training_forms(args.conv_impl, (28, 28, 1), args.steps)
  steps = forms["fori_loop over valid steps"]
  jax.block_until_ready(steps(params, args.steps))
  best = float("inf")
  for _ in range(args.reps):
    start = time.perf_counter()
    jax.block_until_ready(steps(params, args.steps))
    best = min(best, time.perf_counter() - start)

  cfg = Config(algorithm=args.algorithm, model="cnn", batch_size=10, local_epochs=1,
               learning_rate=0.005, join_ratio=1.0, eval_gap=1, progress=False)
  built = build(cfg)
  eng, root = built.engine, rng.root_key(0)
  server, clients = eng.init(root, built.data.x[0])
  train, evaluation = [], []
  for r in range(args.rounds + 1):
    start = time.perf_counter()
    eng.evaluate(server, clients, root, r)
    middle = time.perf_counter()
    server, clients, _ = eng.run_round(server, clients, root, r)
    jax.block_until_ready((server, clients))
    if r:
      evaluation.append(middle - start)
      train.append(time.perf_counter() - middle)
  return {"step_ms": best / args.steps * 1e3, "train_s": float(np.median(train)),
          "eval_s": float(np.median(evaluation))}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--flags", default=";--xla_cpu_experimental_xnn_graph_fusion_mode="
                 "XNN_GRAPH_FUSION_MODE_GREEDY",
                 help="XLA_FLAGS values separated by ';' (an empty one: XLA's defaults)")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--algorithm", default="FedAvg")
  p.add_argument("--conv-impl", default="auto")
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--reps", type=int, default=15)
  p.add_argument("--rounds", type=int, default=20)
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    print(json.dumps(measure(args)))
    return
  settings = args.flags.split(";")
  rows = []
  child_args = [a for a in sys.argv[1:] if a != "--child"]
  for repeat in range(args.repeats):
    for flags in settings:
      env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
      out = subprocess.run([sys.executable, os.path.abspath(__file__), *child_args, "--child"],
                           env=env, capture_output=True, text=True, check=True)
      result = json.loads(out.stdout.strip().splitlines()[-1])
      rows.append((repeat, flags, result))
      print(f"repeat {repeat} {flags or '(defaults)'}: {result}", flush=True)
  print(f"\n{datetime.date.today()}, {platform.machine()} {platform.processor() or ''}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, "
        f"jax {importlib.metadata.version('jax')}; {args.algorithm}, "
        f"conv_impl {args.conv_impl}\n")
  print("| XLA_FLAGS | step ms (per repeat) | training s/round | evaluation s/round |")
  print("|---|---|---|---|")
  for flags in settings:
    got = [r for _, f, r in rows if f == flags]
    cell = lambda k, fmt: " / ".join(fmt.format(r[k]) for r in got)
    name = f"`{flags}`" if flags else "(defaults)"
    print(f"| {name} | {cell('step_ms', '{:.3f}')} | {cell('train_s', '{:.3f}')} | "
          f"{cell('eval_s', '{:.3f}')} |")

if __name__ == "__main__":
  main()
