"""Personalized and traditional FL on the bundled digits data: every PFLlib algorithm.

Setting (PFLlib's defaults): 20 clients, Dirichlet α = 0.1 label skew, the 4-layer CNN
(FedAvgCNN), SGD lr 0.005, batch 10, 1 local epoch, all clients every round, evaluation every
``--eval-gap`` rounds, seeds 0, 1, 2 (``-t 3``). Hyperparameters are PFLlib's defaults except
where the paper or its companion repository recommends values (listed in HYPERPARAMETERS).

    python experiments/pfl_digits/run.py --rounds 50            # writes RESULTS.md + results.json
    python experiments/pfl_digits/run.py --rounds 50 --readme   # and the README table

Each algorithm runs in a fresh process, one after another, so timings are side by side on the
same machine. Seconds per round are the mean over rounds 1.. (round 0 compiles), training and
evaluation included.
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

# PFLlib's -algo names, in the order of its table (traditional FL first).
ALGORITHMS = ("FedAvg", "SCAFFOLD", "FedProx", "FedDyn", "MOON", "FedLC", "FedGen", "FedNTD",
              "FedCross", "Local", "PerAvg", "pFedMe", "Ditto", "APFL", "FedFomo", "FedAMP",
              "FedPHP", "APPLE", "FedALA", "FedPer", "LG-FedAvg", "FedRep", "FedROD", "FedBABU",
              "FedGC", "FedCP", "GPFL", "FedGH", "FedDBE", "FedCAC", "PFL-DA", "FedAS", "FD",
              "FML", "FedKD", "FedProto", "FedPCL", "FedPAC", "FedMTL", "FedBN")

# Non-default hyperparameters and where they come from.
HYPERPARAMETERS = {
    "FedProx": ({"mu": 0.01}, "μ = 0.01 (PFLlib's default 0 is FedAvg)"),
    "MOON": ({"mu": 1.0}, "μ = 1 (MOON paper; PFLlib's default 0 is FedAvg)"),
    "pFedMe": ({"lam": 15.0}, "λ = 15 (PFLlib issue #102), β = 1 (PFLlib's 0 freezes the "
               "global model)"),
    "FedPHP": ({"mu": 0.9, "lam": 0.01}, "μ = 0.9, λ = 0.01 (PFLlib issue #102)"),
    "Ditto": ({"mu": 0.01}, "μ = 0.01 (default 0 trains the personal model purely locally)"),
    "FedCP": ({"lam": 5.0}, "λ = 5 (FedCP repository, MNIST)"),
    "GPFL": ({"lam": 0.01, "mu": 0.1}, "λ = 0.01, μ = 0.1 (GPFL run_me.sh, 4-layer CNN)"),
    "FedDBE": ({"momentum": 1.0, "kl_weight": 50.0}, "momentum 1, κ = 50 (FedDBE repository)"),
    "FedGen": ({}, "HtFLlib's variant (own bases, global head); PFLlib's global-model FedGen is not offered"),
    "FedGH": ({}, "HtFLlib's variant, `-se 100` (PFLlib's server trains 1 epoch)"),
    "FedBABU": ({}, "PFLlib defaults (`-fte 10`; best/last are after the final fine-tuning, "
                "which s/round excludes)"),
}


def run_one(algorithm: str, args) -> dict:
  """Runs one algorithm (3 seeds) in a subprocess; returns its summary."""
  params, _ = HYPERPARAMETERS.get(algorithm, ({}, ""))
  code = (
      "import json, sys\n"
      "from fedjax_lib import Config, run_experiment\n"
      f"c = Config(algorithm={algorithm!r}, model='cnn', learning_rate={args.lr}, batch_size=10,"
      f" local_epochs=1, global_rounds={args.rounds}, eval_gap={args.eval_gap},"
      f" times={args.times}, seed=0, out={args.out!r}, progress=False, algo_params={params!r})\n"
      "r = run_experiment(c, log=lambda m: None)\n"
      "best, last = r.best_test_acc, r.last_test_acc\n"
      "views = {}\n"
      "if 'test_acc_global' in r.runs[0].history:\n"
      "  views['test_acc_global'] = [float(max(run.history['test_acc_global'])) for run in r.runs]\n"
      "print(json.dumps({'best': best, 'last': last, 'round_s': r.mean_round_time_s,"
      " 'best_runs': [run.best_test_acc for run in r.runs],"
      " 'up': r.runs[0].traffic['mean_upload_floats'],"
      " 'down': r.runs[0].traffic['mean_download_floats'],"
      " 'last_runs': [run.last_test_acc for run in r.runs], **views}))\n")
  summary = common.run_python(code, algorithm)
  summary["params"] = params
  return summary


def table(results: dict, args) -> str:
  fedavg = results["FedAvg"]["round_s"]
  lines = [
      f"Digits (sklearn, 1,797 images upsampled to 28×28), 20 clients, Dir(0.1), 4-layer CNN, "
      f"lr {args.lr}, batch 10, 1 local epoch, {args.rounds} rounds, evaluation every "
      f"{args.eval_gap} round(s), {args.times} seeds (0–{args.times - 1}); mean ± std over "
      f"seeds. Measured {time.strftime('%Y-%m-%d')} on {platform.processor() or platform.machine()}"
      f" ({os.cpu_count()} cores), `python experiments/pfl_digits/run.py --rounds {args.rounds}`.",
      "",
  ]
  timing = next((r["timing"] for r in results.values() if "timing" in r), None)
  if timing:
    lines[-1:] = [f"Seconds per round (training + evaluation, round 0 excluded) come from a "
                  f"separate timing pass, {timing['rounds']} rounds × {timing['times']} seed, "
                  "all algorithms one after another on the otherwise idle machine; ×FedAvg is "
                  "their ratio to FedAvg's.", ""]
  lines += [
      "| Algorithm | Best acc | Last acc | Best global-model acc | s/round | × FedAvg | floats up / down per round | Hyperparameters |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for name, r in results.items():
    glob = r.get("test_acc_global")
    glob_text = "—" if glob is None else f"{common.mean(glob):.3f} ± {common.std(glob):.3f}"
    _, note = HYPERPARAMETERS.get(name, ({}, "PFLlib defaults"))
    traffic = (f"{common.floats_text(r['up'])} / {common.floats_text(r['down'])}" if "up" in r
               else "not recorded")
    lines.append(f"| {name} | {r['best'][0]:.3f} ± {r['best'][1]:.3f} | "
                 f"{r['last'][0]:.3f} ± {r['last'][1]:.3f} | {glob_text} | {r['round_s']:.3f} | "
                 f"{r['round_s'] / fedavg:.2f} | {traffic} | {note} |")
  return "\n".join(lines) + "\n"



def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rounds", type=int, default=50)
  p.add_argument("--eval-gap", type=int, default=1, dest="eval_gap")
  p.add_argument("--times", type=int, default=3)
  p.add_argument("--lr", type=float, default=0.005)
  p.add_argument("--algorithms", nargs="*", default=list(ALGORITHMS))
  p.add_argument("--out", default=os.path.join("results", "pfl_digits"))
  p.add_argument("--readme", action="store_true", help="also replace the README table")
  p.add_argument("--update", action="store_true",
                 help="keep the other algorithms' entries of results.json (rerun a few)")
  p.add_argument("--timing-only", action="store_true", dest="timing_only",
                 help="with --update: re-measure only the seconds per round (a short run on an "
                      "otherwise idle machine), keeping the accuracies")
  args = p.parse_args()
  path = os.path.join(HERE, "results.json")
  results = {}
  if args.update and os.path.exists(path):
    results = json.load(open(path))["results"]
  for name in args.algorithms:
    try:
      fresh = run_one(name, args)
    except RuntimeError as e:  # one algorithm's failure is reported, the others still run
      print(f"{name}: FAILED {str(e).splitlines()[-1][:300]}", flush=True)
      continue
    if args.timing_only and name in results:
      results[name]["round_s"] = fresh["round_s"]
      results[name].update({k: fresh[k] for k in ("up", "down")})  # per round, seed-independent
      results[name]["timing"] = {"rounds": args.rounds, "times": args.times}
    else:
      results[name] = fresh
    r = results[name]
    print(f"{name:10s} best {r['best'][0]:.3f} ± {r['best'][1]:.3f}  last {r['last'][0]:.3f} ± "
          f"{r['last'][1]:.3f}  {r['round_s']:.3f} s/round  ({r['wall_s']:.0f} s)", flush=True)
    saved_args = (json.load(open(path))["args"] if args.timing_only and os.path.exists(path)
                  else vars(args))
    with open(path + ".tmp", "w") as f:
      json.dump({"args": saved_args, "results": results}, f, indent=1)
    os.replace(path + ".tmp", path)
  results = {name: results[name] for name in ALGORITHMS if name in results}
  if args.timing_only:  # the table describes the accuracy runs
    args = argparse.Namespace(**{**json.load(open(path))["args"], "readme": args.readme})
  text = table(results, args)
  with open(os.path.join(HERE, "RESULTS.md"), "w") as f:
    f.write("# Personalized FL on digits\n\n" + text)
  print(text)
  if args.readme:
    common.replace_readme_section("pfl_digits", text)

if __name__ == "__main__":
  main()
