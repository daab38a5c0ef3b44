"""Accuracy against PFLlib itself, algorithm by algorithm: PFLlib's own ``main.py`` and
``python -m fedjax_lib`` with the same flags on the same PFLlib-format folder.

The code audits compared each algorithm with PFLlib's source by reading; this runs both. For
every algorithm of PFLlib's ``main.py`` (or ``--algorithms``), on the bundled digits written as a
PFLlib folder (20 clients, Dirichlet α = 0.1, PFLlib's partition rule; the folder of
``experiments/benchmarks/bench_pfllib.py``), with PFLlib's flags ``-m CNN -lbs 10 -ls 1 -lr
0.005 -jr 1 -eg 1`` and every other hyperparameter at its default on both sides:

1. PFLlib's ``system/main.py``, unmodified, once (it seeds torch with 0 but not numpy, so a
   second run differs only a little), or once per ``--pfllib-seeds`` (seed 0: as it is;
   another: every ``torch.manual_seed`` call of the run, main.py's and each client's, seeds
   that number instead, through a wrapper that leaves the checkout as it is);
2. fedjax_lib over ``--seeds`` (one ``--sweep seed=...`` process) with our defaults, and again
   at PFLlib's exact settings where they differ from ours: ``--pfllib-compat`` for the
   algorithms that have that switch (where the reference has a bug, we implement the paper's
   intent by default and compat reproduces the reference) and PFLlib's default of every
   hyperparameter whose default differs here (``pfllib_settings``: pFedMe's and FedNTD's β,
   FedPHP's μ and λ, ..., each documented in the algorithm's docstring).

Each side's test accuracy per evaluation round: PFLlib's printed ``Average(d) Test Accuracy``
(the last one printed in a round where it prints several, as Ditto's global then personalized
evaluation), our results file's ``test_acc``. The table gives PFLlib's best accuracy and the
mean of its last 10 evaluations next to ours (mean ± std over the seeds; PFLlib's too where
it ran several), and a screen, not a test: ``within noise`` when PFLlib's last-10 mean lies
within max(3 std, 0.03) of our seeds' mean (std: the larger of the two sides'), ``differs``
otherwise (then look: a real divergence, a known reference bug or a
documented difference).

    python experiments/pfllib_agreement/run.py --pfllib /path/to/PFLlib \\
        --torch-python /path/to/python-with-torch --rounds 20 --jobs 2

``--jobs 2`` runs two processes at once (PFLlib with one torch thread): accuracy does not
depend on it, and nothing here is timed. Results are written after every run (``--json``),
so an interrupted invocation keeps what finished and ``--resume`` runs only what is missing;
``--table-from`` prints the table and writes RESULTS.md's section from a stored JSON.
The torch Python needs what PFLlib's ``main.py`` imports (see bench_pfllib.py).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))
import common  # noqa: E402  pylint: disable=wrong-import-position  (experiments/common.py)
import bench_pfllib  # noqa: E402  pylint: disable=wrong-import-position

# PFLlib's -algo names (its main.py, commit d832e76), and ours where the name differs.
PFLLIB_ALGORITHMS = (
    "FedAvg", "Local", "FedMTL", "PerAvg", "pFedMe", "FedProx", "FedFomo", "FedAMP", "APFL",
    "FedPer", "Ditto", "FedRep", "FedPHP", "FedBN", "FedROD", "FedProto", "FedDyn", "MOON",
    "FedBABU", "APPLE", "FedGen", "SCAFFOLD", "FD", "FedALA", "FedPAC", "LG-FedAvg", "FedGC",
    "FML", "FedKD", "FedPCL", "FedCP", "GPFL", "FedNTD", "FedGH", "FedDBE", "FedCross")
OURS = {"FedGen": "FedGen-PFLlib"}  # our "FedGen" is HtFLlib's (own bases, global head)

_ROUND = re.compile(r"-+Round number: (\d+)-+")
_ACC = re.compile(r"Average[d]? Test Accuracy: ([0-9.eE+-]+|nan)")


def parse_pfllib(stdout: str) -> dict:
  """PFLlib's printed test accuracies per round: ``test_acc`` (the last one printed in each
  round) and ``all_acc`` (every one, in order, per round)."""
  heads = list(_ROUND.finditer(stdout))
  rounds, all_acc = [], []
  for i, head in enumerate(heads):
    end = heads[i + 1].start() if i + 1 < len(heads) else len(stdout)
    values = [float(v) for v in _ACC.findall(stdout[head.end():end])]
    if values:
      rounds.append(int(head.group(1)))
      all_acc.append(values)
  return {"rounds": rounds, "test_acc": [v[-1] for v in all_acc], "all_acc": all_acc}


# PFLlib's main.py run with every torch.manual_seed call seeding ``seed`` instead (main.py
# seeds 0, and so does every client it builds), the checkout left as it is.
_SEEDED = ("import runpy, sys, torch; seed = int(sys.argv[1]); sys.argv = sys.argv[2:]; "
           "manual_seed = torch.manual_seed; "
           "torch.manual_seed = lambda _: manual_seed(seed); "
           "runpy.run_path(sys.argv[0], run_name='__main__')")


def run_pfllib(pfllib: str, python: str, threads: int, name: str, algorithm: str,
               rounds: int, timeout: float, seed: int = 0) -> dict:
  """PFLlib's printed accuracies (``parse_pfllib``) of one ``main.py`` run; ``seed`` other
  than PFLlib's 0 replaces the seed of its ``torch.manual_seed`` calls (``_SEEDED``)."""
  env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
  cmd = [python, *(["-c", _SEEDED, str(seed)] if seed else []), "main.py", "-data", name,
         "-algo", algorithm, "-gr", str(rounds), "-dev", "cpu", *bench_pfllib.FLAGS]
  out = subprocess.run(cmd, cwd=os.path.join(pfllib, "system"), env=env, capture_output=True,
                       text=True, timeout=timeout, check=False)
  parsed = parse_pfllib(out.stdout)
  if out.returncode != 0 or not parsed["test_acc"]:
    lines = (out.stderr.strip() or out.stdout.strip()).splitlines()
    heads = _ROUND.findall(out.stdout)
    return {"error": (lines[-1] if lines else f"exit {out.returncode}")[:300]
            + (f" (in round {heads[-1]})" if heads else ""),
            "returncode": out.returncode, **parsed}
  return parsed


# PFLlib's main.py defaults of the algorithm hyperparameters (commit d832e76), by our names.
PFLLIB_DEFAULTS = {
    "mu": 0.0, "lam": 1.0, "beta": 0.0, "alpha": 1.0, "tau": 1.0, "K": 5,
    "p_learning_rate": 0.01, "plocal_epochs": 1, "eta": 1.0, "rand_percent": 80,
    "layer_idx": 2, "momentum": 0.1, "kl_weight": 0.0, "fine_tuning_epochs": 10,
    "server_epochs": 1000, "server_learning_rate": 1.0, "noise_dim": 512,
    "generator_learning_rate": 0.005, "hidden_dim": 512, "mentee_learning_rate": 0.005,
    "energy_start": 0.95, "energy_end": 0.98, "M": 5, "alphaK": 1.0, "sigma": 1.0,
    "dr_learning_rate": 0.0, "L": 1.0, "first_stage_bound": 0, "fedcross_alpha": 0.99,
    "collaberative_model_select_strategy": 1, "localize_feature_extractor": False}
# Where PFLlib's algorithm does not read the flag's default: its FedGH server trains one epoch.
PFLLIB_READS = {"FedGH": {"server_epochs": 1}}


def pfllib_settings(algorithm: str) -> list[str]:
  """Our flags for PFLlib's exact settings of ``algorithm``: ``--pfllib-compat`` where our
  algorithm has that switch, and PFLlib's default of every hyperparameter whose default
  differs here (pFedMe's β, FedPHP's μ and λ, ... each documented in its docstring); a
  default of None (derived, as PerAvg's β = the learning rate, which PFLlib also uses) is
  already PFLlib's."""
  from fedjax_lib import cli  # pylint: disable=import-outside-toplevel
  from fedjax_lib.algorithms import registry  # pylint: disable=import-outside-toplevel
  flag = {name: flags[0] for flags, name, *_ in cli.ALGORITHM_FLAGS}
  reads = {**PFLLIB_DEFAULTS, **PFLLIB_READS.get(algorithm, {})}
  out = []
  for field in dataclasses.fields(registry.get_algorithm(OURS.get(algorithm, algorithm))):
    if field.name == "pfllib_compat":
      out.append("--pfllib-compat")
    elif (field.name in reads and field.default is not None
          and field.default != reads[field.name]):
      out += [flag[field.name], str(reads[field.name])]
  return out


def last_per_round(rounds: list[int], values: list[float]) -> tuple[list[int], list[float]]:
  """One value per round, the last one, as ``parse_pfllib`` reads PFLlib's (FedBABU evaluates
  its last round again after fine-tuning, as PFLlib does, and prints it in that round)."""
  last = {}
  for r, v in zip(rounds, values):
    last[r] = v
  return list(last), list(last.values())


def run_ours(folder: str, algorithm: str, rounds: int, seeds: list[int], extra: list[str],
             timeout: float) -> dict:
  """Our test accuracy per evaluation for each seed (one sweep process)."""
  with tempfile.TemporaryDirectory() as tmp:
    args = ["-data", folder, "-algo", OURS.get(algorithm, algorithm), "-gr", str(rounds),
            *bench_pfllib.FLAGS, "--out", tmp, "--no-progress", "--no-plot", "-q"]
    if len(seeds) > 1:
      args += ["--sweep", "seed=" + ",".join(map(str, seeds))]
    else:
      args += ["--seed", str(seeds[0])]
    args += extra
    try:
      common.run_cli(args, f"fedjax_lib {algorithm}", timeout)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
      lines = str(e).strip().splitlines()
      return {"error": lines[-1][:300] if lines else type(e).__name__}
    files = sorted(glob.glob(os.path.join(tmp, "*_sweep_[0-9]*.json")),
                   key=lambda p: int(re.search(r"_(\d+)\.json$", p).group(1)))
    if not files:
      files = glob.glob(os.path.join(tmp, "*_0.json"))
    if not files:
      return {"error": "no results file written"}
    curves, evaluated = [], []  # each seed's (a run that diverges stops early)
    for path in files:
      with open(path, encoding="utf-8") as f:
        res = json.load(f)
      evaluated_rounds, curve = last_per_round(res["rounds"], res["test_acc"])
      curves.append(curve)
      evaluated.append(evaluated_rounds)
  return {"seeds": seeds, "test_acc": curves, "rounds": evaluated, "flags": extra}


def last10(curve: list) -> float:
  return common.mean(curve[-10:])


def verdict(pfllib: list[float], ours: list[float]) -> str:
  """``within noise`` when PFLlib's mean lies within max(3 std, 0.03) of our seeds' mean,
  the std the larger of the two sides' (PFLlib's is 0 for one run)."""
  spread = max(common.std(ours), common.std(pfllib))
  gap = abs(common.mean(pfllib) - common.mean(ours))
  return "within noise" if gap <= max(3 * spread, 0.03) else "differs"


def pfllib_runs(r: dict) -> list[dict]:
  """An algorithm's PFLlib runs that finished: seed 0 (``pfllib``), then ``pfllib@<seed>``."""
  runs = [r.get("pfllib")] + [r[k] for k in sorted(r, key=_seed_of) if k.startswith("pfllib@")]
  return [p for p in runs if p is not None and "error" not in p]


def _seed_of(key: str) -> int:
  return int(key.split("@")[1]) if key.startswith("pfllib@") else -1


def _pfllib_cell(r: dict) -> str:
  p, runs = r.get("pfllib"), pfllib_runs(r)
  if p is not None and "error" in p:
    return f"failed: {p['error']}"
  if not runs:
    return "—"
  if len(runs) == 1:
    return f"{max(runs[0]['test_acc']):.3f} / {last10(runs[0]['test_acc']):.3f}"
  best = [max(q["test_acc"]) for q in runs]
  last = [last10(q["test_acc"]) for q in runs]
  return (f"{common.mean_std((common.mean(best), common.std(best)))} / "
          f"{common.mean_std((common.mean(last), common.std(last)))} ({len(runs)} seeds)")


def _ours_cell(run: dict | None, evaluations: int) -> tuple[str, str]:
  """Best and last-10 cells over the seeds; a seed whose run stopped early (a non-finite
  update stops a run) is named, with its last evaluated round."""
  if run is None:
    return "—", "—"
  if "error" in run:
    return f"failed: {run['error']}", ""
  best = [max(c) for c in run["test_acc"]]
  last = [last10(c) for c in run["test_acc"]]
  stopped = [f"seed {seed} after round {len(c) - 1}"
             for seed, c in zip(run["seeds"], run["test_acc"]) if len(c) < evaluations]
  return (common.mean_std((common.mean(best), common.std(best))),
          common.mean_std((common.mean(last), common.std(last)))
          + (f" (stopped, non-finite: {', '.join(stopped)})" if stopped else ""))


def table(results: dict, header: str, evaluations: int) -> str:
  lines = [header, "",
           "| algorithm | PFLlib best / last-10 | ours best (mean ± std) | ours last-10 | "
           "screen | ours at PFLlib's settings: flags, best / last-10 | screen |",
           "|---|---|---|---|---|---|---|"]
  for algorithm, r in results.items():
    p = r.get("pfllib")
    pcell = _pfllib_cell(r)
    pfllib = [last10(q["test_acc"]) for q in pfllib_runs(r)]
    cells = []
    for key in ("ours", "compat"):
      run = r.get(key)
      best, last = _ours_cell(run, evaluations)
      ok = (p is not None and "error" not in p and run is not None and "error" not in run)
      screen = verdict(pfllib, [last10(c) for c in run["test_acc"]]) if ok else ""
      if key == "ours":
        cells += [best, last, f"**{screen}**" if screen == "differs" else screen]
      elif run is None:
        cells += ["(ours are PFLlib's)", ""]
      else:
        flags = " ".join(run["flags"])
        cells += [f"`{flags}`: " + (f"{best} / {last}" if "error" not in run else best),
                  f"**{screen}**" if screen == "differs" else screen]
    name = algorithm + (f" (ours: {OURS[algorithm]})" if algorithm in OURS else "")
    lines.append(f"| {name} | {pcell} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def in_order(results: dict) -> dict:
  """``results`` in the order of PFLlib's main.py (then any other name)."""
  ordered = {a: results[a] for a in PFLLIB_ALGORITHMS if a in results}
  return {**ordered, **{a: v for a, v in results.items() if a not in ordered}}


def plot(results: dict, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  names = list(results)
  cols = 6
  rows = (len(names) + cols - 1) // cols
  fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.1 * rows), squeeze=False,
                           sharey=True)
  for ax in axes.flat[len(names):]:
    ax.axis("off")
  for ax, name in zip(axes.flat, names):
    r = results[name]
    for key, color in (("ours", "tab:orange"), ("compat", "tab:green")):
      run = r.get(key)
      if run and "error" not in run:
        for i, (rounds, curve) in enumerate(zip(run["rounds"], run["test_acc"])):
          ax.plot(rounds, curve, color=color, lw=0.8, alpha=0.7,
                  label=(f"fedjax_lib{' at PFLlib settings' if key == 'compat' else ''} (seeds)"
                         if i == 0 else None))
    for i, q in enumerate(pfllib_runs(r)):
      ax.plot(q["rounds"], q["test_acc"], color="black", lw=1.4 if i == 0 else 0.7,
              label="PFLlib" if i == 0 else "PFLlib, other torch seeds" if i == 1 else None)
    ax.set_title(name, fontsize=9)
    ax.tick_params(labelsize=7)
  handles, labels = [], []
  for ax in axes.flat:
    for h, l in zip(*ax.get_legend_handles_labels()):
      if l not in labels:
        handles.append(h)
        labels.append(l)
  fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8)
  fig.supxlabel("round", fontsize=9)
  fig.supylabel("test accuracy", fontsize=9)
  fig.tight_layout(rect=(0.01, 0, 1, 1 - 0.3 / rows))
  fig.savefig(path, dpi=100)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--pfllib", help="a PFLlib checkout (its system/main.py is run)")
  p.add_argument("--torch-python", default=sys.executable,
                 help="a Python with torch and PFLlib's requirements")
  p.add_argument("--algorithms", default="all", help="PFLlib -algo names, comma-separated")
  p.add_argument("--rounds", type=int, default=20)
  p.add_argument("--seeds", default="0,1,2", help="our seeds (one sweep per algorithm)")
  p.add_argument("--pfllib-seeds", default="0",
                 help="PFLlib's torch seeds: 0 is its main.py as it is; another seeds every "
                      "torch.manual_seed call of the run with that number instead")
  p.add_argument("--jobs", type=int, default=2, help="processes at once")
  p.add_argument("--threads", type=int, default=1, help="torch threads for PFLlib")
  p.add_argument("--timeout", type=float, default=3600, help="seconds per process")
  p.add_argument("--pfllib-commit", default=None,
                 help="the checkout's commit, for the header when it has no .git")
  p.add_argument("--json", default=os.path.join(HERE, "results.json"))
  p.add_argument("--plot", default=os.path.join(HERE, "curves.png"))
  p.add_argument("--results-md", default=os.path.join(HERE, "RESULTS.md"),
                 help="the Markdown file whose 'agreement' section gets the table")
  p.add_argument("--resume", action="store_true",
                 help="keep the runs --json already holds and run only the missing ones")
  p.add_argument("--table-from", metavar="JSON",
                 help="print the table (and write the section and plot) from a stored JSON")
  args = p.parse_args()

  def finish(stored: dict) -> None:
    stored["results"] = in_order(stored["results"])
    text = table(stored["results"], stored["header"], stored["rounds"] + 1)
    print(text)
    if common.has_section(args.results_md, "agreement"):
      common.replace_section(args.results_md, "agreement", text + "\n")
    if args.plot:
      plot(stored["results"], args.plot)

  if args.table_from:
    with open(args.table_from, encoding="utf-8") as f:
      finish(json.load(f))
    return
  algorithms = (list(PFLLIB_ALGORITHMS) if args.algorithms == "all"
                else args.algorithms.split(","))
  unknown = [a for a in algorithms if a not in PFLLIB_ALGORITHMS]
  if unknown:
    print(f"error: --algorithms {','.join(unknown)} not in PFLlib's main.py: use "
          f"{', '.join(PFLLIB_ALGORITHMS)} or all", file=sys.stderr)
    sys.exit(2)
  if not args.pfllib or not os.path.isfile(os.path.join(args.pfllib, "system", "main.py")):
    print(f"error: --pfllib {args.pfllib!r} has no system/main.py (a PFLlib checkout)",
          file=sys.stderr)
    sys.exit(2)
  try:
    seeds = [int(s) for s in args.seeds.split(",")]
    pfllib_seeds = [int(s) for s in args.pfllib_seeds.split(",")]
  except ValueError:
    print(f"error: --seeds {args.seeds!r} / --pfllib-seeds {args.pfllib_seeds!r}: each is a "
          "comma-separated list of integers", file=sys.stderr)
    sys.exit(2)
  if any(s < 0 for s in pfllib_seeds):
    print(f"error: --pfllib-seeds {args.pfllib_seeds!r}: torch seeds are 0 or more",
          file=sys.stderr)
    sys.exit(2)
  import jax  # pylint: disable=import-outside-toplevel
  name = "MNIST-digits"
  data = bench_pfllib.write_folder(args.pfllib, name)
  commit = args.pfllib_commit or subprocess.run(
      ["git", "-C", args.pfllib, "rev-parse", "--short", "HEAD"], capture_output=True,
      text=True, check=False).stdout.strip()
  torch_version = subprocess.run(
      [args.torch_python, "-c", "import torch; print(torch.__version__)"], capture_output=True,
      text=True, check=False).stdout.strip()
  header = (f"Measured {datetime.date.today().isoformat()} on {common.machine()}: PFLlib "
            f"{commit or '(checkout without git)'} system/main.py (torch {torch_version}) "
            f"against fedjax_lib (jax {jax.__version__}, {jax.default_backend()}), seeds "
            f"{args.seeds} (PFLlib's torch seeds: {args.pfllib_seeds}). Workload: {name} = "
            "bundled digits 1×28×28, 20 clients, Dir(0.1), "
            f"{data['train_samples']} training / {data['test_samples']} test samples; flags "
            f"`{' '.join(bench_pfllib.FLAGS)}`, {args.rounds} rounds, every other "
            "hyperparameter at its default.\nCommand: `python "
            f"experiments/pfllib_agreement/run.py {' '.join(sys.argv[1:])}`")
  stored = {"header": header, "rounds": args.rounds, "results": {}}
  if args.resume and os.path.isfile(args.json):
    with open(args.json, encoding="utf-8") as f:
      previous = json.load(f)
    stored["results"] = previous["results"]
    # The first invocation's header, and what each later one added.
    stored["header"] = (f"{previous['header']}\nThen ({datetime.date.today().isoformat()}): "
                        f"`python experiments/pfllib_agreement/run.py {' '.join(sys.argv[1:])}`")
  results = stored["results"]
  lock = threading.Lock()

  def save(algorithm: str, key: str, value: dict) -> None:
    with lock:
      results.setdefault(algorithm, {})[key] = value
      stored["results"] = in_order(results)
      with open(args.json, "w", encoding="utf-8") as f:
        json.dump(stored, f)
      print(json.dumps({algorithm: key, **({"error": value["error"]} if "error" in value
                                            else {})}), file=sys.stderr, flush=True)

  tasks = []
  for algorithm in algorithms:
    done = results.get(algorithm, {})
    for seed in pfllib_seeds:
      key = f"pfllib@{seed}" if seed else "pfllib"
      if key not in done:
        tasks.append((algorithm, key, lambda a=algorithm, seed=seed: run_pfllib(
            args.pfllib, args.torch_python, args.threads, name, a, args.rounds, args.timeout,
            seed)))
    if "ours" not in done:
      tasks.append((algorithm, "ours", lambda a=algorithm: run_ours(
          data["folder"], a, args.rounds, seeds, [], args.timeout)))
    settings = pfllib_settings(algorithm)
    if "compat" not in done and settings:
      tasks.append((algorithm, "compat", lambda a=algorithm, f=settings: run_ours(
          data["folder"], a, args.rounds, seeds, f, args.timeout)))
  with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
    futures = {pool.submit(fn): (a, key) for a, key, fn in tasks}
    for future in concurrent.futures.as_completed(futures):
      a, key = futures[future]
      try:
        value = future.result()
      except subprocess.TimeoutExpired:
        value = {"error": f"timed out after {args.timeout:.0f} s"}
      save(a, key, value)
  finish(stored)


if __name__ == "__main__":
  main()
