"""Heterogeneous-model FL on the bundled digits: every HtFLlib algorithm side by side.

Setting (HtFLlib's, scaled to the digits): ``digits32`` (sklearn's 1,797 digits upsampled to
32×32×3), 20 clients, Dirichlet α = 0.1, the model list ``cnn,resnet4,resnet8`` (client i uses
architecture i mod 3; every base pooled to 512 features), SGD lr 0.01 (HtFLlib's default),
batch 10, 1 local epoch, all clients every round, seeds 0, 1, 2 (``-t 3``). Each algorithm uses
HtFLlib's ``total.sh`` values (the table's last column; reference §2.13). The algorithms with a
shared model (FML, FedKD, FedMRL) share architecture 0 (``cnn``, HtFLlib's FedAvgCNN). FedKTL
uses the VAE trained on scikit-learn's sample photographs (not the clients' data), made in
``--generator-dir`` when missing (``python -m fedjax_lib.generators train --data
sample-photos``, about 3.5 min). FedL2G's warm-up (``-wu``, HtFLlib 50 of 2,000 rounds) is
scaled to ``--l2g-warmup`` rounds (1).

    python experiments/htfl_digits/run.py --rounds 10            # writes RESULTS.md + results.json
    python experiments/htfl_digits/run.py --rounds 10 --readme   # and the README table
    python experiments/htfl_digits/run.py --algorithms FedGen FedKD   # some rows (others kept)

Each algorithm runs in a fresh process, one after another, so timings are side by side on the
same machine. Seconds per round are the mean over rounds 1.. (round 0 compiles), training and
evaluation included; floats up/down are the mean per trained round over all clients.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import common  # pylint: disable=wrong-import-position  (experiments/common.py)

ALGORITHMS = ("Local", "FD", "FML", "LG-FedAvg", "FedGen", "FedProto", "FedKD", "FedGH",
              "FedTGP", "FedKTL", "FedMRL", "FedL2G-feat", "FedL2G-logit")
MODEL = "cnn,resnet4,resnet8"
# HtFLlib's total.sh values (written out so results.json shows them) and the table's note.
HYPERPARAMETERS = {
    "FD": ({"lam": 1.0}, "λ = 1"),
    "FML": ({"alpha": 0.5, "beta": 0.5}, "α = 0.5, β = 0.5"),
    "FedGen": ({"noise_dim": 32, "generator_learning_rate": 0.1, "hidden_dim": 512,
                "server_epochs": 100}, "noise 32, generator lr 0.1, hidden 512, 100 steps"),
    "FedProto": ({"lam": 10.0}, "λ = 10"),
    "FedKD": ({"mentee_learning_rate": 0.01, "energy_start": 0.95, "energy_end": 0.98},
              "mentee lr 0.01, energy 0.95 → 0.98"),
    "FedGH": ({"server_learning_rate": 0.01, "server_epochs": 1}, "server lr 0.01, 1 epoch"),
    "FedTGP": ({"lam": 10.0, "server_epochs": 100, "margin_threshold": 100.0},
               "λ = 10, 100 server epochs, τ = 100"),
    "FedKTL": ({"lam": 1.0, "mu": 50.0, "server_learning_rate": 0.01, "server_batch_size": 100,
                "server_epochs": 100},
               "λ = 1, μ = 50, server lr 0.01, batch 100, 100 epochs; sample-photos VAE"),
    "FedMRL": ({"sub_feature_dim": 128}, "sub-feature dim 128"),
    "FedL2G-feat": ({}, "HtFLlib defaults, 1 warm-up round (HtFLlib: 50 of 2,000)"),
    "FedL2G-logit": ({}, "HtFLlib defaults, 1 warm-up round (HtFLlib: 50 of 2,000)"),
}


def config(algorithm: str, params: dict, *, rounds: int, times: int, lr: float, eval_gap: int,
           out: str) -> dict:
  """The `Config` keywords of this setting for ``algorithm`` with ``params``."""
  return dict(dataset="digits32", algorithm=algorithm, model=MODEL, learning_rate=lr,
              batch_size=10, local_epochs=1, global_rounds=rounds, eval_gap=eval_gap,
              times=times, seed=0, out=out, progress=False, plot=False, overwrite=True,
              algo_params=params)


def run_one(algorithm: str, args) -> dict:
  """Runs one algorithm (``times`` seeds) in a subprocess; returns its summary."""
  params, _ = HYPERPARAMETERS.get(algorithm, ({}, ""))
  params = dict(params)
  if algorithm == "FedKTL":
    params["generator_path"] = os.path.abspath(common.ensure_generator(
        "sample-photos", args.generator_dir, args.generator_steps))
  if algorithm.startswith("FedL2G"):
    params["warmup_rounds"] = args.l2g_warmup
  summary = common.run_config(
      config(algorithm, params, rounds=args.rounds, times=args.times, lr=args.lr,
             eval_gap=args.eval_gap, out=args.out), algorithm)
  summary["params"] = params
  summary["date"] = time.strftime("%Y-%m-%d")
  return summary


def table_rows(results: dict, notes: dict) -> list:
  """The table's header and one row per algorithm; ``notes``: the hyperparameters column."""
  lines = [
      "| Algorithm | Best acc | Last acc | Best head acc | s/round | floats up | floats down | "
      "Hyperparameters |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for name, r in results.items():
    head = r.get("head_runs") or []
    head_text = f"{common.mean(head):.3f} ± {common.std(head):.3f}" if head else "—"
    lines.append(f"| {name} | {common.mean_std(r['best'])} | {common.mean_std(r['last'])} | "
                 f"{head_text} | {r['round_s']:.3f} | {common.floats_text(r['up'][0])} | "
                 f"{common.floats_text(r['down'][0])} | {notes.get(name, 'HtFLlib defaults')} |")
  return lines


def measured(results: dict) -> str:
  """The dates the rows were measured: the most common one, then the others' rows."""
  by_date = {}
  for name, r in results.items():
    by_date.setdefault(r.get("date", "an earlier day"), []).append(name)
  dates = sorted(by_date, key=lambda d: -len(by_date[d]))
  others = "; ".join(f"{', '.join(by_date[d])}: {d}" for d in dates[1:])
  return dates[0] + (f" ({others})" if others else "")


def table(results: dict, args) -> str:
  lines = [
      f"digits32 (sklearn's 1,797 digits at 32×32×3), 20 clients, Dir(0.1), models `{MODEL}` "
      f"(client i: architecture i mod 3, features pooled to 512), lr {args.lr}, batch 10, 1 "
      f"local epoch, {args.rounds} rounds, evaluation every {args.eval_gap} round(s), "
      f"{args.times} seeds (0–{args.times - 1}); mean ± std over seeds. Measured "
      f"{measured(results)} on {platform.processor() or platform.machine()} "
      f"({os.cpu_count()} cores, CPU), `python experiments/htfl_digits/run.py --rounds "
      f"{args.rounds}`. Floats up/down: per round, all clients together (seed 0's mean over "
      "the trained rounds).",
      "",
  ] + table_rows(results, {name: note for name, (_, note) in HYPERPARAMETERS.items()})
  return "\n".join(lines) + "\n"


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rounds", type=int, default=50)
  p.add_argument("--eval-gap", type=int, default=1, dest="eval_gap")
  p.add_argument("--times", type=int, default=3)
  p.add_argument("--lr", type=float, default=0.01)
  p.add_argument("--algorithms", nargs="*", default=list(ALGORITHMS))
  p.add_argument("--out", default=os.path.join("results", "htfl_digits"))
  p.add_argument("--readme", action="store_true", help="also replace the README table")
  p.add_argument("--generator-dir", dest="generator_dir", default=None,
                 help="FedKTL's generator folders (default <out>/generators)")
  p.add_argument("--generator-steps", type=int, default=2000, dest="generator_steps")
  p.add_argument("--l2g-warmup", type=int, default=1, dest="l2g_warmup",
                 help="FedL2G's warm-up rounds (-wu; HtFLlib 50 of 2,000 rounds)")
  args = p.parse_args()
  args.generator_dir = args.generator_dir or os.path.join(args.out, "generators")
  path = os.path.join(HERE, "results.json")
  results = {}
  if os.path.isfile(path):  # rows not rerun are kept (same settings: check results.json args)
    with open(path, encoding="utf-8") as f:
      old = json.load(f)
    if {k: old["args"].get(k) for k in ("rounds", "times", "lr", "eval_gap")} == {
        k: vars(args)[k] for k in ("rounds", "times", "lr", "eval_gap")}:
      results = {name: old["results"][name] for name in ALGORITHMS
                 if name in old["results"] and name not in args.algorithms}
  for name in args.algorithms:
    results[name] = r = run_one(name, args)
    print(f"{name:10s} best {r['best'][0]:.3f} ± {r['best'][1]:.3f}  last {r['last'][0]:.3f} ± "
          f"{r['last'][1]:.3f}  {r['round_s']:.3f} s/round  ({r['wall_s']:.0f} s)", flush=True)
    ordered = {n: results[n] for n in ALGORITHMS if n in results}
    with open(path + ".tmp", "w") as f:
      json.dump({"args": vars(args), "results": ordered}, f, indent=1)
    os.replace(path + ".tmp", path)
  text = table({n: results[n] for n in ALGORITHMS if n in results}, args)
  with open(os.path.join(HERE, "RESULTS.md"), "w") as f:
    f.write("# Heterogeneous-model FL on digits\n\n" + text)
  print(text)
  if args.readme:
    common.replace_readme_section("htfl_digits", text)

if __name__ == "__main__":
  main()
