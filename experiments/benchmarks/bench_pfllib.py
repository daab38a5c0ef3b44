"""fedjax_lib against PFLlib itself: the same flags on the same PFLlib-format folder, side by side.

Writes the bundled digits as a PFLlib dataset folder with the library's writer (20 clients,
Dirichlet α = 0.1 with PFLlib's partition rule, 75/25 train/test per client; 1,341 training
samples) into ``<pfllib>/dataset/<name>``, then, for each algorithm, one after the other:

1. PFLlib's own ``system/main.py``, unmodified, in ``--torch-python`` with ``--threads`` torch
   threads, through a small launcher that times PFLlib's evaluation methods (``evaluate`` and,
   where a server has them, ``evaluate_personalized`` …) from outside and then runs ``main.py``
   with ``runpy``. PFLlib prints each round's total (its ``Budget``); training is that total
   minus the timed evaluation.
2. ``python -m fedjax_lib`` with the same flags on the same folder (default executor), whose
   results JSON holds per-round training and evaluation times.

Seconds per round are means over rounds 1..R (round 0, which builds/compiles, excluded).
With ``--repeats K`` each algorithm's pair runs K times, alternating which goes first (PFLlib,
ours; ours, PFLlib; …) so that the machine's slow phases hit both alike: the table then
gives the means over all K runs' rounds, the median of the K runs' ratios and each run's
ratio; the accuracy columns and the plot are the first pair's.
Accuracy: PFLlib's printed "Averaged Test Accuracy" per round (for Ditto the personalized
evaluation, its second line per round) against our ``test_acc``; both runs are unseeded with
respect to each other (PFLlib does not seed), so curves agree within seed noise, not exactly.

    python experiments/benchmarks/bench_pfllib.py --pfllib /path/to/PFLlib \\
        --torch-python /path/to/python-with-torch --rounds 100 --algorithms FedAvg,FedALA,Ditto

The torch Python needs what PFLlib's ``main.py`` imports: torch, torchvision (a matching pair:
on the development machine ``pip install torch==2.14.1 torchvision==0.29.1``), numpy,
scikit-learn, h5py, matplotlib, cvxpy and calmsize.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(HERE))
import common  # noqa: E402  pylint: disable=wrong-import-position  (experiments/common.py)

FLAGS = ["-m", "CNN", "-lbs", "10", "-ls", "1", "-lr", "0.005", "-jr", "1", "-eg", "1",
         "-nc", "20", "-ncl", "10"]

# Runs PFLlib's main.py (cwd: PFLlib's system/) with its evaluation methods timed from outside.
LAUNCHER = r'''
import atexit, importlib, json, pkgutil, runpy, sys, time
import torch
torch.set_num_threads(int(sys.argv[1]))
record, argv = sys.argv[2], sys.argv[3:]
sys.path.insert(0, ".")
import flcore.servers
times = []
def timed(fn):
  def wrapper(*args, **kwargs):
    start = time.perf_counter()
    try:
      return fn(*args, **kwargs)
    finally:
      times.append(time.perf_counter() - start)
  return wrapper
for info in pkgutil.iter_modules(flcore.servers.__path__):
  module = importlib.import_module("flcore.servers." + info.name)
  for obj in list(vars(module).values()):
    # Only the classes this module defines (each also imports serverbase.Server).
    if isinstance(obj, type) and obj.__module__ == module.__name__:
      for name in ("evaluate", "evaluate_personalized"):
        if name in vars(obj):
          setattr(obj, name, timed(vars(obj)[name]))
atexit.register(lambda: json.dump({"eval_calls_s": times, "threads": torch.get_num_threads(),
                                   "torch": torch.__version__}, open(record, "w")))
sys.argv = ["main.py"] + argv
runpy.run_path("main.py", run_name="__main__")
'''


SOURCES = {"digits": "bundled digits, 1×28×28", "digits32": "bundled digits at 3×32×32 (RGB)"}


def write_folder(pfllib: str, name: str, source: str = "digits") -> dict:
  from fedjax_lib import Config  # pylint: disable=import-outside-toplevel
  from fedjax_lib.data import write_pfllib_folder  # pylint: disable=import-outside-toplevel
  from fedjax_lib.data.pfllib_format import partition_meta  # pylint: disable=import-outside-toplevel
  from fedjax_lib.runner import build  # pylint: disable=import-outside-toplevel
  data = build(Config(dataset=source, num_clients=20, alpha=0.1)).data
  folder = os.path.join(pfllib, "dataset", name)
  write_pfllib_folder(data, folder, partition_meta=partition_meta("dir", alpha=0.1),
                      overwrite=True)
  train = sum(len(data.client_arrays(i, "train")[1]) for i in range(data.num_clients))
  test = sum(len(data.client_arrays(i, "test")[1]) for i in range(data.num_clients))
  return {"folder": folder, "train_samples": train, "test_samples": test}


def run_pfllib(pfllib: str, python: str, threads: int, name: str, algorithm: str,
               rounds: int, extra: list[str], timeout: float) -> dict:
  env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
  with tempfile.TemporaryDirectory() as tmp:
    launcher, record = os.path.join(tmp, "launch.py"), os.path.join(tmp, "record.json")
    with open(launcher, "w", encoding="utf-8") as f:
      f.write(LAUNCHER)
    cmd = [python, launcher, str(threads), record, "-data", name, "-algo", algorithm,
           "-gr", str(rounds), "-dev", "cpu", *FLAGS, *extra]
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=os.path.join(pfllib, "system"), env=env, capture_output=True,
                         text=True, timeout=timeout, check=False)
    wall = time.perf_counter() - start
    if out.returncode != 0:
      raise RuntimeError(f"PFLlib {algorithm} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    with open(record, encoding="utf-8") as f:
      rec = json.load(f)
  totals = [float(v) for v in re.findall(r"time cost -+ ([0-9.eE+-]+)", out.stdout)]
  accs = [float(v) for v in re.findall(r"Averaged Test Accuracy: ([0-9.]+)", out.stdout)]
  calls = rec["eval_calls_s"]
  per_round = len(calls) // len(totals)   # Ditto: evaluate + evaluate_personalized
  evals = [sum(calls[i * per_round:(i + 1) * per_round]) for i in range(len(totals))]
  accs = accs[per_round - 1::per_round]    # the last evaluation of each round
  return {"total": totals, "eval": evals, "train": [t - e for t, e in zip(totals, evals)],
          "test_acc": accs, "wall_s": wall, "torch": rec["torch"], "threads": rec["threads"]}


def run_ours(folder: str, algorithm: str, rounds: int, extra: list[str], timeout: float) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    wall = common.run_cli(["-data", folder, "-algo", algorithm, "-gr", str(rounds), *FLAGS,
                           *extra, "--out", tmp, "--no-progress", "--no-plot"],
                          f"fedjax_lib {algorithm}", timeout)
    result = [f for f in os.listdir(tmp) if f.endswith("_0.json")]
    with open(os.path.join(tmp, result[0]), encoding="utf-8") as f:
      res = json.load(f)
  return {"total": res["round_time_s"], "eval": res["eval_time_s"], "train": res["train_time_s"],
          "test_acc": res["test_acc"], "wall_s": wall, "executor": res["executor"],
          "client_threads": res.get("client_threads")}


def summarize(run: dict) -> dict:
  """Means over rounds 1.. (round 0 excluded) and the median total, best accuracy, mean of
  the last 10 rounds."""
  return {"train": common.mean(run["train"][1:]), "eval": common.mean(run["eval"][1:]),
          "total": common.mean(run["total"][1:]),
          "median_total": float(statistics.median(run["total"][1:])),
          "best_acc": max(run["test_acc"]),
          "last10_acc": common.mean(run["test_acc"][-10:]), "first_round": run["total"][0]}


def plot(results: dict, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.2), squeeze=False)
  for ax, (algorithm, r) in zip(axes[0], results.items()):
    ax.plot(r["pfllib"]["test_acc"], label="PFLlib")
    ax.plot(r["fedjax_lib"]["test_acc"], label="fedjax_lib")
    ax.set_title(algorithm)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def pooled(runs: list[dict]) -> dict:
  """One run's per-round lists made of several runs' rounds 1.. (round 0 of each dropped, a
  placeholder 0 put first so that `summarize` drops it) and the first run's accuracies."""
  out = {k: [0.0] + [v for run in runs for v in run[k][1:]] for k in ("train", "eval", "total")}
  return {**out, "test_acc": runs[0]["test_acc"]}


def table(results: dict, header: str) -> str:
  repeated = any(len(r.get("repeats", [])) > 1 for r in results.values())
  lines = [header, "",
           "| algorithm | PFLlib train / eval / total s/round | fedjax_lib train / eval / total "
           "s/round | speed-up (total) | speed-up (train) | speed-up of the median rounds | best "
           "acc PFLlib / ours | mean acc of the last 10 rounds PFLlib / ours |"
           + (" speed-up of each pair (median) |" if repeated else ""),
           "|---|---|---|---|---|---|---|---|" + ("---|" if repeated else "")]
  for algorithm, r in results.items():
    pairs = r.get("repeats") or [{"pfllib": r["pfllib"], "fedjax_lib": r["fedjax_lib"]}]
    p = summarize(pooled([pair["pfllib"] for pair in pairs]))
    o = summarize(pooled([pair["fedjax_lib"] for pair in pairs]))
    ratios = [summarize(pair["pfllib"])["total"] / summarize(pair["fedjax_lib"])["total"]
              for pair in pairs]
    each = (f" {', '.join(f'{v:.2f}x' for v in ratios)} "
            f"({statistics.median(ratios):.2f}x) |" if repeated else "")
    lines.append(
        f"| {algorithm} | {p['train']:.3f} / {p['eval']:.3f} / {p['total']:.3f} | "
        f"{o['train']:.3f} / {o['eval']:.3f} / {o['total']:.3f} | "
        f"**{p['total'] / o['total']:.2f}x** | {p['train'] / o['train']:.2f}x | "
        f"{p['median_total']:.3f} / {o['median_total']:.3f} s: "
        f"{p['median_total'] / o['median_total']:.2f}x | "
        f"{p['best_acc']:.3f} / {o['best_acc']:.3f} | "
        f"{p['last10_acc']:.3f} / {o['last10_acc']:.3f} |" + each)
  return "\n".join(lines)


def _executor(run: dict) -> str:
  threads = run.get("client_threads")
  return run["executor"] + (f" with {threads} client threads" if threads and threads > 1 else "")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--pfllib", help="a PFLlib checkout (its system/main.py is run)")
  p.add_argument("--torch-python", default=sys.executable,
                 help="a Python with torch and PFLlib's requirements")
  p.add_argument("--threads", type=int, default=2, help="torch threads for PFLlib")
  p.add_argument("--algorithms", default="FedAvg,FedALA,Ditto")
  p.add_argument("--rounds", type=int, default=100)
  p.add_argument("--repeats", type=int, default=1,
                 help="run each algorithm's pair this many times, alternating which goes first")
  p.add_argument("--source", default="digits",
                 help="what the folder holds: digits (1x28x28) or digits32 (the same digits "
                 "at 3x32x32, CIFAR's shape)")
  p.add_argument("--name", default=None,
                 help="dataset folder name under <pfllib>/dataset ('MNIST' in it makes PFLlib "
                 "build its 1x28x28 CNN, 'Cifar10' its 3x32x32 one; default: MNIST-digits, "
                 "or Cifar10-digits32 with --source digits32)")
  p.add_argument("--timeout", type=float, default=3600)
  p.add_argument("--pfllib-commit", default=None,
                 help="the checkout's commit, for the header when it has no .git")
  p.add_argument("--json", help="write every per-round number here")
  p.add_argument("--plot", help="write the accuracy curves here (PNG)")
  p.add_argument("--table-from", metavar="JSON",
                 help="print the table of a run stored by --json (runs nothing)")
  args = p.parse_args()
  if args.source not in SOURCES:
    common.fail(f"--source {args.source!r} is not one of: {', '.join(SOURCES)}")
  if args.name is None:
    args.name = "MNIST-digits" if args.source == "digits" else "Cifar10-digits32"
  if args.table_from:
    with open(args.table_from, encoding="utf-8") as f:
      stored = json.load(f)
    print(table(stored["results"], stored["header"]))
    return
  if not args.pfllib or not os.path.isfile(os.path.join(args.pfllib, "system", "main.py")):
    common.fail(f"--pfllib {args.pfllib!r} has no system/main.py (a PFLlib checkout; "
                "required unless --table-from)")
  import jax  # pylint: disable=import-outside-toplevel
  data = write_folder(args.pfllib, args.name, args.source)
  extra = {"Ditto": ["-mu", "0.0", "-pls", "1"], "FedALA": ["-et", "1.0", "-s", "80", "-p", "2"]}
  results = {}
  for algorithm in args.algorithms.split(","):
    flags = extra.get(algorithm, [])
    runners = {"pfllib": lambda: run_pfllib(args.pfllib, args.torch_python, args.threads,
                                            args.name, algorithm, args.rounds, flags,
                                            args.timeout),
               "fedjax_lib": lambda: run_ours(data["folder"], algorithm, args.rounds, flags,
                                              args.timeout)}
    pairs = []
    for repeat in range(args.repeats):
      order = ("pfllib", "fedjax_lib") if repeat % 2 == 0 else ("fedjax_lib", "pfllib")
      pairs.append({side: runners[side]() for side in order})
      print(json.dumps({algorithm: {k: summarize(v) for k, v in pairs[-1].items()},
                        "repeat": repeat}), file=sys.stderr, flush=True)
    results[algorithm] = {**pairs[0], **({"repeats": pairs} if args.repeats > 1 else {})}
  torch_version = next(iter(results.values()))["pfllib"]["torch"]
  commit = args.pfllib_commit or subprocess.run(
      ["git", "-C", args.pfllib, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
      check=False).stdout.strip()
  header = (f"Measured {datetime.date.today().isoformat()} on {common.machine()}: PFLlib "
            f"{commit or '(checkout without git)'} "
            f"system/main.py with torch {torch_version} ({args.threads} threads) against "
            f"fedjax_lib (jax {jax.__version__}, {jax.default_backend()}, executor "
            f"{_executor(next(iter(results.values()))['fedjax_lib'])}), one after the other. "
            f"Workload: {args.name} = {SOURCES[args.source]}, 20 clients, Dir(0.1), "
            f"{data['train_samples']} training / {data['test_samples']} test samples; flags "
            f"`{' '.join(FLAGS)}`, {args.rounds} rounds; seconds per round are means over rounds "
            f"1–{args.rounds}"
            + (f" of {args.repeats} pairs of runs, alternating which goes first" if args.repeats
               > 1 else "") + ".\nCommand: `python experiments/benchmarks/bench_pfllib.py "
            f"{' '.join(sys.argv[1:])}`")
  print(table(results, header))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"header": header, "results": results}, f)
  if args.plot:
    plot(results, args.plot)


if __name__ == "__main__":
  main()
