"""Accuracy against PFLlib and HtFLlib themselves, algorithm by algorithm: the reference's
own ``main.py`` and ``python -m fedjax_lib`` with the same flags on the same PFLlib-format
folder.

The code audits compared each algorithm with the references' source by reading; this runs
both. For every algorithm of the reference's ``main.py`` (or ``--algorithms``), with every
hyperparameter the flags below leave at its default on both sides:

- ``--pfllib DIR``: PFLlib's algorithms on the bundled digits written as a PFLlib folder
  (``MNIST-digits``: 20 clients, Dirichlet α = 0.1, PFLlib's partition rule; the folder of
  ``experiments/benchmarks/bench_pfllib.py``), PFLlib's flags ``-m CNN -lbs 10 -ls 1 -lr
  0.005 -jr 1 -eg 1``;
- ``--htfllib DIR``: HtFLlib's algorithms but FedKTL (its generators' weights cannot be had
  here) on the same digits at 3×32×32 (``digits32``), HtFLlib's smallest image family
  ``-m HtFE-img-2`` (its 4-layer CNN and torchvision's ResNet-18, client i architecture
  i mod 2), its scripts' flags (``total.sh``: ``-lr 0.01 -lbs 10 -ls 1 -jr 1 -fd 512`` and
  each algorithm's, as ``FedProto -lam 10``; FedL2G, not in ``total.sh``, ``-wu 5``).
  HtFLlib's ``main.py`` runs unmodified, with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` in its
  environment (it ``torch.load``s whole pickled models, which torch 2.6 and later refuse by
  default).

1. The reference's ``system/main.py`` once (it seeds torch with 0 but not numpy, so a second
   run differs only a little), or once per ``--pfllib-seeds`` (seed 0: as it is; another:
   every ``torch.manual_seed`` call of the run, main.py's and each client's, seeds that
   number instead, through a wrapper that leaves the checkout as it is);
2. fedjax_lib over ``--seeds`` (one ``--sweep seed=...`` process) with our defaults, and again
   at the reference's exact settings where they differ from ours (``reference_settings``):
   ``--pfllib-compat`` for the algorithms that have that switch (where the reference has a
   bug, we implement the paper's intent by default and compat reproduces the reference), the
   reference's default of every hyperparameter whose default differs here (pFedMe's and
   FedNTD's β, FedPHP's μ and λ, ..., each documented in the algorithm's docstring), and for
   HtFLlib ``--shuffle false`` (its training loader takes a client's samples in the same
   order every epoch).

Each side's test accuracy per evaluation round: the reference's printed ``Average(d) Test
Accuracy`` (the last one printed in a round where it prints several, as Ditto's global then
personalized evaluation), our results file's ``test_acc``. The table gives the reference's
best accuracy and the mean of its last 10 evaluations next to ours (mean ± std over the
seeds; the reference's too where it ran several), and a screen, not a test: ``within noise``
when the reference's last-10 mean lies within max(3 std, 0.03) of our seeds' mean (std: the
larger of the two sides'), ``differs`` otherwise (then look: a real divergence, a known
reference bug or a documented difference).

    python experiments/pfllib_agreement/run.py --pfllib /path/to/PFLlib \\
        --torch-python /path/to/python-with-torch --rounds 20 --jobs 2
    python experiments/pfllib_agreement/run.py --htfllib /path/to/HtFLlib \\
        --torch-python /path/to/python-with-torch --rounds 20 --jobs 2

``--jobs 2`` runs two processes at once (the reference with one torch thread): accuracy does
not depend on it, and nothing here is timed. Results are written after every run (``--json``;
``results.json`` or ``htfllib_results.json`` here), so an interrupted invocation keeps what
finished and ``--resume`` runs only what is missing; ``--table-from`` prints the table and
writes RESULTS.md's section (``agreement`` or ``htfllib-agreement``) from a stored JSON.
The torch Python needs what the reference's ``main.py`` imports (see bench_pfllib.py;
HtFLlib's imports its FedKTL servers' StyleGAN code too, which needs ``click`` and
``requests``, and FedL2G needs ``higher``).
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

@dataclasses.dataclass(frozen=True)
class Reference:
  """A reference library whose ``system/main.py`` runs next to ours.

  Attributes:
    name: how the tables name it.
    algorithms: its ``-algo`` names that run here, in its ``main.py``'s order.
    ours: our ``-algo`` name where it differs from the reference's.
    dataset: the PFLlib-format folder's name under ``<checkout>/dataset``, and ``source``
      our built-in dataset written there (20 clients, Dir 0.1, PFLlib's partition rule).
    flags: flags both sides get for every algorithm; ``algorithm_flags``: per algorithm.
    defaults: the reference ``main.py``'s default of each hyperparameter, by our field
      names; ``reads``: where an algorithm does not read the flag's default.
    settings: flags of our run at the reference's settings for every algorithm.
    env: environment of the reference's process.
    workload: the header's description of the data.
    section, outputs: the RESULTS.md section and the default JSON and plot names.
  """
  name: str
  algorithms: tuple
  ours: dict
  dataset: str
  source: str
  flags: tuple
  algorithm_flags: dict
  defaults: dict
  reads: dict
  settings: tuple
  env: dict
  workload: str
  section: str
  outputs: tuple


PFLLIB = Reference(
    name="PFLlib",
    # PFLlib's -algo names (its main.py, commit d832e76).
    algorithms=(
        "FedAvg", "Local", "FedMTL", "PerAvg", "pFedMe", "FedProx", "FedFomo", "FedAMP", "APFL",
        "FedPer", "Ditto", "FedRep", "FedPHP", "FedBN", "FedROD", "FedProto", "FedDyn", "MOON",
        "FedBABU", "APPLE", "FedGen", "SCAFFOLD", "FD", "FedALA", "FedPAC", "LG-FedAvg",
        "FedGC", "FML", "FedKD", "FedPCL", "FedCP", "GPFL", "FedNTD", "FedGH", "FedDBE",
        "FedCross"),
    ours={"FedGen": "FedGen-PFLlib"},  # our "FedGen" is HtFLlib's (own bases, global head)
    dataset="MNIST-digits", source="digits", flags=tuple(bench_pfllib.FLAGS),
    algorithm_flags={},
    # PFLlib's main.py defaults of the algorithm hyperparameters (commit d832e76).
    defaults={
        "mu": 0.0, "lam": 1.0, "beta": 0.0, "alpha": 1.0, "tau": 1.0, "K": 5,
        "p_learning_rate": 0.01, "plocal_epochs": 1, "eta": 1.0, "rand_percent": 80,
        "layer_idx": 2, "momentum": 0.1, "kl_weight": 0.0, "fine_tuning_epochs": 10,
        "server_epochs": 1000, "server_learning_rate": 1.0, "noise_dim": 512,
        "generator_learning_rate": 0.005, "hidden_dim": 512, "mentee_learning_rate": 0.005,
        "energy_start": 0.95, "energy_end": 0.98, "M": 5, "alphaK": 1.0, "sigma": 1.0,
        "dr_learning_rate": 0.0, "L": 1.0, "first_stage_bound": 0, "fedcross_alpha": 0.99,
        "collaberative_model_select_strategy": 1, "localize_feature_extractor": False},
    # PFLlib's FedGH server trains one epoch whatever -se says.
    reads={"FedGH": {"server_epochs": 1}},
    settings=(), env={},
    workload="bundled digits 1×28×28",
    section="agreement", outputs=("results.json", "curves.png"))

HTFLLIB = Reference(
    name="HtFLlib",
    # HtFLlib's -algo names (its main.py, commit e959261) but FedKTL's three, whose
    # generators (StyleGAN-XL, StyleGAN3, Stable Diffusion weights) cannot be had here.
    algorithms=("Local", "FedProto", "FedGen", "FD", "LG-FedAvg", "FML", "FedKD", "FedGH",
                "FedTGP", "FedMRL", "FedL2G-feat", "FedL2G-logit"),
    ours={}, dataset="digits32", source="digits32",
    # HtFLlib's scripts' flags (total.sh) on its smallest image family, 10 classes.
    flags=("-m", "HtFE-img-2", "-lbs", "10", "-ls", "1", "-lr", "0.01", "-jr", "1", "-eg",
           "1", "-nc", "20", "-ncl", "10", "-fd", "512"),
    # total.sh's per-algorithm flags; FedL2G (not in total.sh) with 5 warm-up rounds, not
    # main.py's 50, which would leave a short run all warm-up.
    algorithm_flags={
        "FedProto": ("-lam", "10"), "FedGen": ("-nd", "32", "-glr", "0.1", "-hd", "512",
                                               "-se", "100"),
        "FD": ("-lam", "1"), "FML": ("-al", "0.5", "-bt", "0.5"),
        "FedKD": ("-mlr", "0.01", "-Ts", "0.95", "-Te", "0.98"), "FedGH": ("-slr", "0.01",
                                                                          "-se", "1"),
        "FedTGP": ("-lam", "10", "-se", "100", "-mart", "100"), "FedMRL": ("-sfd", "128"),
        "FedL2G-feat": ("-wu", "5"), "FedL2G-logit": ("-wu", "5")},
    # HtFLlib's main.py defaults (commit e959261) of what the flags above leave.
    defaults={
        "lam": 1.0, "noise_dim": 512, "generator_learning_rate": 0.005, "hidden_dim": 512,
        "server_epochs": 100, "alpha": 1.0, "beta": 1.0, "mentee_learning_rate": 0.01,
        "energy_start": 0.95, "energy_end": 0.98, "server_learning_rate": 0.01,
        "margin_threshold": 100.0, "mu": 50.0, "sub_feature_dim": 128,
        "meta_study_batches": 1, "meta_quiz_batches": 1, "warmup_rounds": 50},
    reads={},
    # HtFLlib's training loader takes each client's samples in the same order every epoch.
    settings=("--shuffle", "false"),
    # HtFLlib torch.loads whole pickled models, which torch >= 2.6 refuses by default.
    env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"},
    workload="the bundled digits at 3×32×32",
    section="htfllib-agreement", outputs=("htfllib_results.json", "htfllib_curves.png"))

REFERENCES = {ref.name: ref for ref in (PFLLIB, HTFLLIB)}


_ROUND = re.compile(r"-+Round number: (\d+)-+")
_ACC = re.compile(r"Average[d]? Test Accuracy: ([0-9.eE+-]+|nan)")


def parse_reference(stdout: str) -> dict:
  """The reference's printed test accuracies per round: ``test_acc`` (the last one printed in
  each round) and ``all_acc`` (every one, in order, per round). PFLlib and HtFLlib print alike."""
  heads = list(_ROUND.finditer(stdout))
  rounds, all_acc = [], []
  for i, head in enumerate(heads):
    end = heads[i + 1].start() if i + 1 < len(heads) else len(stdout)
    values = [float(v) for v in _ACC.findall(stdout[head.end():end])]
    if values:
      rounds.append(int(head.group(1)))
      all_acc.append(values)
  return {"rounds": rounds, "test_acc": [v[-1] for v in all_acc], "all_acc": all_acc}


# The reference's main.py run with every torch.manual_seed call seeding ``seed`` instead
# (main.py seeds 0, and so does every client it builds), the checkout left as it is.
_SEEDED = ("import runpy, sys, torch; seed = int(sys.argv[1]); sys.argv = sys.argv[2:]; "
           "manual_seed = torch.manual_seed; "
           "torch.manual_seed = lambda _: manual_seed(seed); "
           "runpy.run_path(sys.argv[0], run_name='__main__')")


def run_reference(ref: Reference, checkout: str, python: str, threads: int, algorithm: str,
                  rounds: int, timeout: float, seed: int = 0) -> dict:
  """The printed accuracies (``parse_reference``) of one run of the reference's ``main.py``;
  ``seed`` other than its 0 replaces the seed of its ``torch.manual_seed`` calls
  (``_SEEDED``)."""
  env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
             **ref.env)
  cmd = [python, *(["-c", _SEEDED, str(seed)] if seed else []), "main.py", "-data",
         ref.dataset, "-algo", algorithm, "-gr", str(rounds), "-dev", "cpu", *ref.flags,
         *ref.algorithm_flags.get(algorithm, ())]
  out = subprocess.run(cmd, cwd=os.path.join(checkout, "system"), env=env,
                       capture_output=True, text=True, timeout=timeout, check=False)
  parsed = parse_reference(out.stdout)
  if out.returncode != 0 or not parsed["test_acc"]:
    lines = (out.stderr.strip() or out.stdout.strip()).splitlines()
    heads = _ROUND.findall(out.stdout)
    return {"error": (lines[-1] if lines else f"exit {out.returncode}")[:300]
            + (f" (in round {heads[-1]})" if heads else ""),
            "returncode": out.returncode, **parsed}
  return parsed


def reference_settings(ref: Reference, algorithm: str) -> list[str]:
  """Our flags for the reference's exact settings of ``algorithm``: ``--pfllib-compat`` where
  our algorithm has that switch (it reproduces PFLlib's or HtFLlib's code where that differs
  from the paper), the reference's default of every hyperparameter whose default differs here
  and that no flag of ``ref`` sets (pFedMe's β, FedPHP's μ and λ, ... each documented in its
  docstring; a default of None, derived, as PerAvg's β = the learning rate, which PFLlib also
  uses, is already the reference's), and ``ref.settings``."""
  from fedjax_lib import cli  # pylint: disable=import-outside-toplevel
  from fedjax_lib.algorithms import registry  # pylint: disable=import-outside-toplevel
  flags = {name: flags for flags, name, *_ in cli.ALGORITHM_FLAGS}
  given = set(ref.algorithm_flags.get(algorithm, ()))
  reads = {**ref.defaults, **ref.reads.get(algorithm, {})}
  out = []
  for field in dataclasses.fields(registry.get_algorithm(ref.ours.get(algorithm, algorithm))):
    if field.name == "pfllib_compat":
      out.append("--pfllib-compat")
    elif (field.name in reads and field.default is not None
          and field.default != reads[field.name] and not given & set(flags[field.name])):
      out += [flags[field.name][0], str(reads[field.name])]
  return out + list(ref.settings)


def last_per_round(rounds: list[int], values: list[float]) -> tuple[list[int], list[float]]:
  """One value per round, the last one, as ``parse_reference`` reads the reference's (FedBABU
  evaluates its last round again after fine-tuning, as PFLlib does, and prints it in that
  round)."""
  last = {}
  for r, v in zip(rounds, values):
    last[r] = v
  return list(last), list(last.values())


def run_ours(ref: Reference, folder: str, algorithm: str, rounds: int, seeds: list[int],
             extra: list[str], timeout: float) -> dict:
  """Our test accuracy per evaluation for each seed (one sweep process)."""
  with tempfile.TemporaryDirectory() as tmp:
    args = ["-data", folder, "-algo", ref.ours.get(algorithm, algorithm), "-gr", str(rounds),
            *ref.flags, *ref.algorithm_flags.get(algorithm, ()), "--out", tmp,
            "--no-progress", "--no-plot", "-q"]
    if len(seeds) > 1:
      args += ["--sweep", "seed=" + ",".join(map(str, seeds))]
    else:
      args += ["--seed", str(seeds[0])]
    args += extra
    try:
      common.run_cli(args, f"fedjax_lib {algorithm}", timeout)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
      lines = str(e).strip().splitlines()
      return {"error": lines[-1][:300] if lines else type(e).__name__, "flags": extra}
    files = sorted(glob.glob(os.path.join(tmp, "*_sweep_[0-9]*.json")),
                   key=lambda p: int(re.search(r"_(\d+)\.json$", p).group(1)))
    if not files:
      files = glob.glob(os.path.join(tmp, "*_0.json"))
    if not files:
      return {"error": "no results file written"}
    curves, evaluated, stopped = [], [], []  # each seed's (a non-finite update stops a run)
    for path in files:
      with open(path, encoding="utf-8") as f:
        res = json.load(f)
      evaluated_rounds, curve = last_per_round(res["rounds"], res["test_acc"])
      curves.append(curve)
      evaluated.append(evaluated_rounds)
      stopped.append(res.get("stopped"))
  return {"seeds": seeds, "test_acc": curves, "rounds": evaluated, "flags": extra,
          "stopped": stopped}


def last10(curve: list) -> float:
  return common.mean(curve[-10:])


def verdict(reference: list[float], ours: list[float]) -> str:
  """``within noise`` when the reference's mean lies within max(3 std, 0.03) of our seeds'
  mean, the std the larger of the two sides' (the reference's is 0 for one run)."""
  spread = max(common.std(ours), common.std(reference))
  gap = abs(common.mean(reference) - common.mean(ours))
  return "within noise" if gap <= max(3 * spread, 0.03) else "differs"


def reference_runs(r: dict) -> list[dict]:
  """An algorithm's reference runs that finished: seed 0 (``ref``), then ``ref@<seed>``."""
  runs = [r.get("ref")] + [r[k] for k in sorted(r, key=_seed_of) if k.startswith("ref@")]
  return [p for p in runs if p is not None and "error" not in p]


def _seed_of(key: str) -> int:
  return int(key.split("@")[1]) if key.startswith("ref@") else -1


def upgrade(results: dict) -> dict:
  """Results stored before HtFLlib was compared name PFLlib's runs ``pfllib`` and
  ``pfllib@<seed>``: now ``ref`` and ``ref@<seed>``."""
  return {a: {re.sub(r"^pfllib(?=@|$)", "ref", k): v for k, v in r.items()}
          for a, r in results.items()}


def _reference_cell(r: dict) -> str:
  p, runs = r.get("ref"), reference_runs(r)
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
  update stops a run) is named, with its last evaluated round: its results file says so
  (``stopped``), or, in results stored before that was kept, it has fewer than
  ``evaluations``."""
  if run is None:
    return "—", "—"
  if "error" in run:
    return f"failed: {run['error']}", ""
  best = [max(c) for c in run["test_acc"]]
  last = [last10(c) for c in run["test_acc"]]
  early = run.get("stopped") or [len(c) < evaluations for c in run["test_acc"]]
  stopped = [f"seed {seed} after round {rounds[-1]}"
             for seed, rounds, stop in zip(run["seeds"], run["rounds"], early) if stop]
  return (common.mean_std((common.mean(best), common.std(best))),
          common.mean_std((common.mean(last), common.std(last)))
          + (f" (stopped, non-finite: {', '.join(stopped)})" if stopped else ""))


def table(ref: Reference, results: dict, header: str, rounds: int) -> str:
  lines = [header, "",
           f"| algorithm | {ref.name} best / last-10 | ours best (mean ± std) | ours last-10 | "
           f"screen | ours at {ref.name}'s settings: flags, best / last-10 | screen |",
           "|---|---|---|---|---|---|---|"]
  for algorithm, r in results.items():
    p = r.get("ref")
    reference = [last10(q["test_acc"]) for q in reference_runs(r)]
    cells = []
    for key in ("ours", "compat"):
      run = r.get(key)
      best, last = _ours_cell(run, rounds + 1)
      ok = (p is not None and "error" not in p and run is not None and "error" not in run)
      screen = verdict(reference, [last10(c) for c in run["test_acc"]]) if ok else ""
      if key == "ours":
        cells += [best, last, f"**{screen}**" if screen == "differs" else screen]
      elif run is None:
        cells += [f"(ours are {ref.name}'s)", ""]
      else:
        flags = " ".join(run["flags"])
        cells += [f"`{flags}`: " + (f"{best} / {last}" if "error" not in run else best),
                  f"**{screen}**" if screen == "differs" else screen]
    name = algorithm + (f" (ours: {ref.ours[algorithm]})" if algorithm in ref.ours else "")
    lines.append(f"| {name} | {_reference_cell(r)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def in_order(ref: Reference, results: dict) -> dict:
  """``results`` in the order of the reference's main.py (then any other name)."""
  ordered = {a: results[a] for a in ref.algorithms if a in results}
  return {**ordered, **{a: v for a, v in results.items() if a not in ordered}}


def plot(ref: Reference, results: dict, path: str) -> None:
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
                  label=(f"fedjax_lib{f' at {ref.name} settings' if key == 'compat' else ''}"
                         " (seeds)" if i == 0 else None))
    for i, q in enumerate(reference_runs(r)):
      ax.plot(q["rounds"], q["test_acc"], color="black", lw=1.4 if i == 0 else 0.7,
              label=ref.name if i == 0 else f"{ref.name}, other torch seeds" if i == 1
              else None)
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
  p.add_argument("--htfllib", help="an HtFLlib checkout instead (its system/main.py is run)")
  p.add_argument("--torch-python", default=sys.executable,
                 help="a Python with torch and the reference's requirements")
  p.add_argument("--algorithms", default="all", help="the reference's -algo names, "
                 "comma-separated")
  p.add_argument("--rounds", type=int, default=20)
  p.add_argument("--seeds", default="0,1,2", help="our seeds (one sweep per algorithm)")
  p.add_argument("--pfllib-seeds", "--reference-seeds", default="0", dest="reference_seeds",
                 help="the reference's torch seeds: 0 is its main.py as it is; another seeds "
                      "every torch.manual_seed call of the run with that number instead")
  p.add_argument("--jobs", type=int, default=2, help="processes at once")
  p.add_argument("--threads", type=int, default=1, help="torch threads for the reference")
  p.add_argument("--timeout", type=float, default=3600, help="seconds per process")
  p.add_argument("--pfllib-commit", "--reference-commit", default=None, dest="commit",
                 help="the checkout's commit, for the header when it has no .git")
  p.add_argument("--json", default=None, help="results (default: results.json here, "
                 "htfllib_results.json with --htfllib)")
  p.add_argument("--plot", default=None, help="the curves (default: curves.png here, "
                 "htfllib_curves.png with --htfllib)")
  p.add_argument("--results-md", default=os.path.join(HERE, "RESULTS.md"),
                 help="the Markdown file whose 'agreement' (or 'htfllib-agreement') section "
                      "gets the table")
  p.add_argument("--resume", action="store_true",
                 help="keep the runs --json already holds and run only the missing ones")
  p.add_argument("--table-from", metavar="JSON",
                 help="print the table (and write the section and plot) from a stored JSON")
  args = p.parse_args()
  if args.pfllib and args.htfllib:
    common.fail("--pfllib and --htfllib: give one of them")
  ref = HTFLLIB if args.htfllib else PFLLIB
  if args.table_from:
    with open(args.table_from, encoding="utf-8") as f:
      stored = json.load(f)
    ref = REFERENCES[stored.get("reference", PFLLIB.name)]
  json_path = args.json or os.path.join(HERE, ref.outputs[0])
  plot_path = args.plot if args.plot is not None else os.path.join(HERE, ref.outputs[1])

  def finish(stored: dict) -> None:
    stored["results"] = in_order(ref, upgrade(stored["results"]))
    text = table(ref, stored["results"], stored["header"], stored["rounds"])
    print(text)
    if common.has_section(args.results_md, ref.section):
      common.replace_section(args.results_md, ref.section, text + "\n")
    if plot_path:
      plot(ref, stored["results"], plot_path)

  if args.table_from:
    finish(stored)
    return
  algorithms = (list(ref.algorithms) if args.algorithms == "all"
                else args.algorithms.split(","))
  unknown = [a for a in algorithms if a not in ref.algorithms]
  if unknown:
    common.fail(f"--algorithms {','.join(unknown)} not in {ref.name}'s main.py (or not "
                f"runnable here): use {', '.join(ref.algorithms)} or all")
  checkout = args.htfllib or args.pfllib
  if not checkout or not os.path.isfile(os.path.join(checkout, "system", "main.py")):
    common.fail(f"--{ref.name.lower()} {checkout!r} has no system/main.py (a {ref.name} "
                "checkout)")
  try:
    seeds = [int(s) for s in args.seeds.split(",")]
    reference_seeds = [int(s) for s in args.reference_seeds.split(",")]
  except ValueError:
    common.fail(f"--seeds {args.seeds!r} / --pfllib-seeds {args.reference_seeds!r}: each is "
                "a comma-separated list of integers")
  if any(s < 0 for s in reference_seeds):
    common.fail(f"--pfllib-seeds {args.reference_seeds!r}: torch seeds are 0 or more")
  import jax  # pylint: disable=import-outside-toplevel
  data = bench_pfllib.write_folder(checkout, ref.dataset, ref.source)
  commit = args.commit or subprocess.run(
      ["git", "-C", checkout, "rev-parse", "--short", "HEAD"], capture_output=True,
      text=True, check=False).stdout.strip()
  torch_version = subprocess.run(
      [args.torch_python, "-c", "import torch; print(torch.__version__)"], capture_output=True,
      text=True, check=False).stdout.strip()
  command = f"`python experiments/pfllib_agreement/run.py {' '.join(sys.argv[1:])}`"
  per_algorithm = "; ".join(f"{a} `{' '.join(f)}`" for a, f in ref.algorithm_flags.items())
  header = (f"Measured {datetime.date.today().isoformat()} on {common.machine()}: "
            f"{ref.name} {commit or '(checkout without git)'} system/main.py (torch "
            f"{torch_version}) against fedjax_lib (jax {jax.__version__}, "
            f"{jax.default_backend()}), seeds {args.seeds} ({ref.name}'s torch seeds: "
            f"{args.reference_seeds}). Workload: {ref.dataset} = {ref.workload}, 20 clients, "
            f"Dir(0.1), {data['train_samples']} training / {data['test_samples']} test "
            f"samples; flags `{' '.join(ref.flags)}`"
            + (f", and on both sides {per_algorithm}" if per_algorithm else "")
            + f", {args.rounds} rounds, every other hyperparameter at its default.\n"
            f"Command: {command}")
  stored = {"header": header, "rounds": args.rounds, "reference": ref.name, "results": {}}
  if args.resume and os.path.isfile(json_path):
    with open(json_path, encoding="utf-8") as f:
      previous = json.load(f)
    stored["results"] = upgrade(previous["results"])
    # The first invocation's header, and what each later one added.
    stored["header"] = (f"{previous['header']}\nThen ({datetime.date.today().isoformat()}): "
                        f"{command}")
  results = stored["results"]
  lock = threading.Lock()

  def save(algorithm: str, key: str, value: dict) -> None:
    with lock:
      results.setdefault(algorithm, {})[key] = value
      stored["results"] = in_order(ref, results)
      with open(json_path, "w", encoding="utf-8") as f:
        json.dump(stored, f)
      print(json.dumps({algorithm: key, **({"error": value["error"]} if "error" in value
                                            else {})}), file=sys.stderr, flush=True)

  tasks = []
  for algorithm in algorithms:
    done = results.get(algorithm, {})
    for seed in reference_seeds:
      key = f"ref@{seed}" if seed else "ref"
      if key not in done:
        tasks.append((algorithm, key, lambda a=algorithm, seed=seed: run_reference(
            ref, checkout, args.torch_python, args.threads, a, args.rounds, args.timeout,
            seed)))
    if "ours" not in done:
      tasks.append((algorithm, "ours", lambda a=algorithm: run_ours(
          ref, data["folder"], a, args.rounds, seeds, [], args.timeout)))
    settings = reference_settings(ref, algorithm)
    if "compat" not in done and settings:
      tasks.append((algorithm, "compat", lambda a=algorithm, f=settings: run_ours(
          ref, data["folder"], a, args.rounds, seeds, f, args.timeout)))
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
