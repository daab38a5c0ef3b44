"""FedKTL on the bundled digits: beside the heterogeneous-model baselines, what was tried for
it, and one edge client with few samples (the paper's cloud-edge KTL, its Table 9).

Setting of the main and ablation tables: exactly ``experiments/htfl_digits``'s (imported from
it): ``digits32`` (sklearn's 1,797 digits upsampled to 32×32×3), 20 clients, Dirichlet
α = 0.1, models ``cnn,resnet4,resnet8`` (client i uses architecture i mod 3), SGD lr 0.01,
batch 10, 1 local epoch, all clients every round, 10 rounds, seeds 0, 1, 2; FedProto and
FedTGP with htfl_digits' ``-lam 10`` (FedTGP ``-se 100 -mart 100``). FedKTL uses HtFLlib's
StyleGAN-XL script values (``-slr 0.01 -sbs 100 -se 100 -lam 1 -mu 50``, also its defaults)
and, unless a row says otherwise, the VAE trained on random crops of scikit-learn's two sample
photographs (``python -m fedjax_lib.generators train --data sample-photos``): not the clients'
data.

    python experiments/fedktl_digits/run.py                   # all three tables (26 min, 2 cores)
    python experiments/fedktl_digits/run.py --only ktl        # one table; the others are kept
    python experiments/fedktl_digits/run.py --generator-dir DIR   # reuse generator folders

Tables (written between markers into RESULTS.md, whose other text is kept; every summary into
results.json next to this file):

* ``main``: Local, LG-FedAvg, FedProto, FedTGP and FedKTL, each in a fresh process one after
  another, so the s/round are side by side; columns as in htfl_digits/RESULTS.md. FedKTL's
  seed-0 generated images after the last round are copied to ``generated_digits32.png``, the
  sample-photos generator's ``samples.png`` to ``generator_samples.png``.
* ``ablation``: FedKTL with the generator trained on sample photos (the main row, not rerun),
  on digits32 itself (data like the clients'), or untrained (random initialisation); μ = 0
  (no generated-pair task: the ETF/ArcFace clients alone); λ = 0.1. All rows are reported:
  nothing is selected on test accuracy.
* ``ktl``: ``num_clients=1, few_shot=k`` (the client keeps its first k training samples per
  class; its test split is its 25 %), k ∈ {2, 5, 10}, model ``cnn``, lr 0.01, batch 10,
  ``--ktl-rounds`` rounds: FedKTL (sample-photos generator) against Local, and FedKTL with
  μ = 0 to tell the generated-pair task from the ETF/ArcFace classifier. The difference is the
  mean ± std over seeds of FedKTL − Local of the same seed.

Generators live in ``--generator-dir`` (default ``<out>/generators``) as the generator folders
``sample-photos/``, ``digits32/`` (both ``python -m fedjax_lib.generators train`` with its
defaults: 2,000 steps, seed 0, about 3.5 min each here) and ``random/`` (`save_generator` of
`vae.init_params` with key 0); a missing one is made, an existing one is used as it is.
Options: ``--rounds`` (main and ablation, 10), ``--ktl-rounds`` (150), ``--times`` (3),
``--out`` (the runs' files, ``results/fedktl_digits``), ``--generator-dir``,
``--generator-steps`` (2000; only for a generator that has to be trained), ``--only``.
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import common  # pylint: disable=wrong-import-position  (experiments/common.py)
from htfl_digits import run as htfl  # pylint: disable=wrong-import-position

BASELINES = ("Local", "LG-FedAvg", "FedProto", "FedTGP")
# HtFLlib's StyleGAN-XL script (also FedKTL's defaults), written out so results.json shows them.
FEDKTL = {"lam": 1.0, "mu": 50.0, "server_learning_rate": 0.01, "server_batch_size": 100,
          "server_epochs": 100}
FEDKTL_NOTE = "λ = 1, μ = 50, server lr 0.01, batch 100, 100 epochs (HtFLlib's script)"
GENERATORS = {
    "sample-photos": "VAE trained on crops of sklearn's two sample photos",
    "digits32": "VAE trained on digits32 (all 1,797 images)",
    "random": "untrained VAE (random initialisation)",
}
# (generator, hyperparameters that differ from FEDKTL); the first is the main table's row.
ABLATION = (("sample-photos", {}), ("digits32", {}), ("random", {}),
            ("sample-photos", {"mu": 0.0}), ("sample-photos", {"lam": 0.1}))
KTL_SHOTS = (2, 5, 10)
KTL_RUNS = (("Local", None, {}), ("FedKTL", "sample-photos", {}),
            ("FedKTL μ=0", "sample-photos", {"mu": 0.0}))
RESULTS_MD = os.path.join(HERE, "RESULTS.md")
RESULTS_JSON = os.path.join(HERE, "results.json")
SECTIONS = ("setting", "main", "ablation", "ktl")


# ---------------------------------------------------------------------------- runs
def run(name: str, algorithm: str, params: dict, args, out: str, *, generator: str = "",
        ktl_shots: int = 0, plot: bool = False) -> dict:
  """Runs one configuration (``args.times`` seeds) in a fresh process and prints its line;
  ``ktl_shots`` > 0: the one-client few-shot setting instead of htfl_digits'."""
  algo_params = dict(params)
  if generator:
    algo_params["generator_path"] = os.path.abspath(args.generators[generator])
  config = htfl.config(algorithm, algo_params, rounds=args.ktl_rounds if ktl_shots else
                       args.rounds, times=args.times, lr=0.01, eval_gap=1, out=out)
  config["plot"] = plot
  if ktl_shots:
    config.update(model="cnn", num_clients=1, few_shot=ktl_shots)
  summary = common.run_config(config, name, curves=bool(ktl_shots))
  summary.update(params=params, generator=generator)
  print(f"{name:28s} best {common.mean_std(summary['best'])}  last "
        f"{common.mean_std(summary['last'])}  {summary['round_s']:.3f} s/round  "
        f"({summary['wall_s']:.0f} s)", flush=True)
  return summary


def run_main(args, results: dict, save) -> None:
  section = results["main"] = {"rounds": args.rounds, "times": args.times,
      "command": args.command, "rows": {}}
  out = os.path.join(args.out, "main")
  for name in BASELINES:
    section["rows"][name] = run(name, name, htfl.HYPERPARAMETERS.get(name, ({}, ""))[0],
                                args, out)
    save()
  section["rows"]["FedKTL"] = run("FedKTL", "FedKTL", FEDKTL, args, out,
                                  generator="sample-photos", plot=True)
  grids = sorted(glob.glob(os.path.join(out, "*FedKTL*_0_generated.png")))
  if grids:
    shutil.copyfile(grids[-1], os.path.join(HERE, "generated_digits32.png"))
  _small_png(os.path.join(args.generators["sample-photos"], "samples.png"),
             os.path.join(HERE, "generator_samples.png"))
  save()


def _small_png(source: str, target: str) -> None:
  """``source`` with at most 64 colours (the sample grids shrink about threefold)."""
  if not os.path.isfile(source):
    return
  from PIL import Image  # pylint: disable=import-outside-toplevel  (matplotlib's dependency)
  with Image.open(source) as image:
    image.convert("RGB").quantize(64).save(target, optimize=True)


def run_ablation(args, results: dict, save) -> None:
  section = results["ablation"] = {"rounds": args.rounds, "times": args.times,
      "command": args.command, "rows": []}
  main = results.get("main", {})
  for i, (generator, change) in enumerate(ABLATION):
    params = {**FEDKTL, **change}
    if i == 0 and (main.get("rounds"), main.get("times")) == (args.rounds, args.times):
      row = dict(main["rows"]["FedKTL"], from_main=True)
    else:
      row = run(f"FedKTL {generator} {_params_text(params)}", "FedKTL", params, args,
                os.path.join(args.out, "ablation", str(i)), generator=generator)
    section["rows"].append(row)
    save()


def run_ktl(args, results: dict, save) -> None:
  section = results["ktl"] = {"rounds": args.ktl_rounds, "times": args.times,
      "command": args.command, "rows": {}}
  for shots in KTL_SHOTS:
    row = section["rows"][str(shots)] = {}
    for name, generator, change in KTL_RUNS:
      algorithm = name.split()[0]
      params = {**FEDKTL, **change} if generator else {}
      tag = f"k{shots}_{algorithm}{'_mu0' if change else ''}"
      row[name] = run(f"k={shots} {name}", algorithm, params, args,
                      os.path.join(args.out, "ktl", tag), generator=generator or "",
                      ktl_shots=shots)
      save()


# ---------------------------------------------------------------------------- tables
_SYMBOLS = {"lam": "λ", "mu": "μ"}


def _params_text(params: dict) -> str:
  """The hyperparameters of ``params`` that differ from `FEDKTL`, as ``μ = 0``."""
  changed = {k: v for k, v in params.items() if FEDKTL.get(k) != v}
  return ", ".join(f"{_SYMBOLS.get(k, k)} = {v:g}" for k, v in changed.items()) or "—"


def setting_text(results: dict) -> str:
  gens = results.get("generators", {})
  wall = results["wall_s"]
  parts = ", ".join(f"{k} {v / 60:.1f} min" for k, v in wall.items() if k != "total")
  lines = [f"Measured {results['date']} on {results['machine']} (CPU), jax "
           f"{results['jax']}. Last invocation: `{results['args']['command']}`, "
           f"{wall['total'] / 60:.1f} min ({parts}).",
           "", "Generators (kind `vae`, w_dim 64, 32×32×3):", ""]
  for kind, info in gens.items():
    training = info.get("training", {})
    loss = f", final loss {info['loss']:.1f}" if "loss" in info else ""
    lines.append(f"- `{kind}`: {GENERATORS[kind]}; data `{training.get('data')}`, "
                 f"{training.get('steps')} steps{loss}.")
  return "\n".join(lines) + "\n"


def main_text(section: dict) -> str:
  notes = {name: note for name, (_, note) in htfl.HYPERPARAMETERS.items()}
  notes["FedKTL"] = f"sample-photos VAE; {FEDKTL_NOTE}"
  lines = [f"htfl_digits' setting: digits32, 20 clients, Dir(0.1), models `{htfl.MODEL}`, lr "
           f"0.01, batch 10, 1 local epoch, {section['rounds']} rounds, {section['times']} "
           "seeds; mean ± std over seeds. s/round: mean over rounds 1.. (round 0 compiles), "
           "training, server step and evaluation. Floats up/down: per round, all clients "
           "together (seed 0). Best head acc: FedProto/FedTGP's view with the local head. "
           f"Command: `{section['command']}`.", ""]
  return "\n".join(lines + htfl.table_rows(section["rows"], notes)) + "\n"


def ablation_text(section: dict) -> str:
  lines = [f"FedKTL, same setting ({section['rounds']} rounds, {section['times']} seeds); "
           f"every other hyperparameter as in the main row ({FEDKTL_NOTE}). Command: "
           f"`{section['command']}`.", "",
           "| Generator | Changed | Best acc | Last acc | s/round |", "|---|---|---|---|---|"]
  for (generator, _), row in zip(ABLATION, section["rows"]):
    source = " (the main table's run)" if row.get("from_main") else ""
    lines.append(f"| {GENERATORS[generator]}{source} | {_params_text(row['params'])} | "
                 f"{common.mean_std(row['best'])} | {common.mean_std(row['last'])} | "
                 f"{row['round_s']:.3f} |")
  return "\n".join(lines) + "\n"


def _diff(a: dict, b: dict, key: str) -> str:
  d = [x - y for x, y in zip(a[f"{key}_runs"], b[f"{key}_runs"])]
  return f"{common.mean(d):+.3f} ± {common.std(d):.3f}"


def plateau_round(curves: list, tolerance: float = 0.01) -> int:
  """The first round at which the seed-mean accuracy is within ``tolerance`` of its best."""
  length = min(len(c) for c in curves)
  mean_curve = [common.mean([c[r] for c in curves]) for r in range(length)]
  return next(r for r, v in enumerate(mean_curve) if v >= max(mean_curve) - tolerance)


def _stops(row: dict) -> str:
  rounds = [len(c) - 1 for c, bad in zip(row["acc_curves"], row["nonfinite_runs"]) if bad]
  return f"{len(rounds)}/{len(row['acc_curves'])}" + (f" (rounds {', '.join(map(str, rounds))})"
                                                        if rounds else "")


def ktl_text(section: dict) -> str:
  lines = [f"One client (`num_clients=1`), `few_shot=k`, model `cnn`, lr 0.01, batch 10, "
           f"{section['rounds']} rounds, {section['times']} seeds; the test split is the "
           "client's 25 % of digits32. Δ = FedKTL − Local, mean ± std over seeds of the "
           "per-seed difference. Stopped: runs that a non-finite update ended (the library's "
           "`on_nan='stop'`; their last accuracy is the last evaluation before it). Command: "
           f"`{section['command']}`.", "",
           "| k (train samples) | Local best | Local last | FedKTL best | FedKTL last | Δ best | "
           "Δ last | FedKTL stopped | FedKTL μ=0 best | FedKTL μ=0 last | Local plateau |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for shots, row in section["rows"].items():
    local, ktl, mu0 = (row[name] for name, _, _ in KTL_RUNS)
    lines.append(
        f"| {shots} ({int(shots) * 10}) | {common.mean_std(local['best'])} | "
        f"{common.mean_std(local['last'])} | {common.mean_std(ktl['best'])} | "
        f"{common.mean_std(ktl['last'])} | {_diff(ktl, local, 'best')} | "
        f"{_diff(ktl, local, 'last')} | {_stops(ktl)} | {common.mean_std(mu0['best'])} | "
        f"{common.mean_std(mu0['last'])} | round {plateau_round(local['acc_curves'])} |")
  lines += ["", "Local plateau: the first round at which Local's seed-mean accuracy is within "
            "0.01 of its best."]
  return "\n".join(lines) + "\n"


def write_results_md(results: dict) -> None:
  texts = {"setting": setting_text, "main": main_text, "ablation": ablation_text,
           "ktl": ktl_text}
  if not all(common.has_section(RESULTS_MD, name) for name in SECTIONS):
    titles = {"setting": "", "main": "## Main table\n\n",
              "ablation": "## What was tried for FedKTL\n\n",
              "ktl": "## One edge client (KTL, the paper's Table 9)\n\n"}
    with open(RESULTS_MD, "w", encoding="utf-8") as f:
      f.write("# FedKTL on digits\n\n" + "".join(
          f"{titles[name]}<!-- {name}:begin -->\n<!-- {name}:end -->\n\n" for name in SECTIONS))
  for name in SECTIONS:
    if name == "setting" or name in results:
      common.replace_section(RESULTS_MD, name,
                             texts[name](results if name == "setting" else results[name]))


def main() -> None:
  p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
  p.add_argument("--rounds", type=int, default=10, help="rounds of the main and ablation runs")
  p.add_argument("--ktl-rounds", type=int, default=150, dest="ktl_rounds",
                 help="rounds of the one-client KTL runs")
  p.add_argument("--times", type=int, default=3, help="seeds 0 .. times-1")
  p.add_argument("--out", default=os.path.join("results", "fedktl_digits"),
                 help="where the runs' results files go")
  p.add_argument("--generator-dir", dest="generator_dir",
                 help="folder of the generator folders sample-photos/, digits32/, random/ "
                      "(made when missing; default <out>/generators)")
  p.add_argument("--generator-steps", type=int, default=2000, dest="generator_steps",
                 help="training steps of a generator that has to be trained")
  p.add_argument("--only", choices=("main", "ablation", "ktl"), nargs="+",
                 default=["main", "ablation", "ktl"], help="the tables to run")
  args = p.parse_args()
  args.command = " ".join(["python experiments/fedktl_digits/run.py", *sys.argv[1:]])
  start = time.perf_counter()
  root = args.generator_dir or os.path.join(args.out, "generators")
  kinds = set()
  if "main" in args.only or "ktl" in args.only:
    kinds.add("sample-photos")
  if "ablation" in args.only:
    kinds.update(generator for generator, _ in ABLATION)
  args.generators = {kind: common.ensure_generator(kind, root, args.generator_steps)
                     for kind in GENERATORS if kind in kinds}
  results = {}
  if os.path.isfile(RESULTS_JSON):
    with open(RESULTS_JSON, encoding="utf-8") as f:
      results = json.load(f)
  results.update(date=time.strftime("%Y-%m-%d"), machine=common.machine(),
                 jax=importlib.metadata.version("jax"),
                 args={k: v for k, v in vars(args).items() if k != "generators"})
  results.setdefault("generators", {}).update(
      {kind: common.generator_info(path) for kind, path in args.generators.items()})
  results["wall_s"] = {"generators": time.perf_counter() - start}

  def save():
    with open(RESULTS_JSON + ".tmp", "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1)
    os.replace(RESULTS_JSON + ".tmp", RESULTS_JSON)

  for name, step in (("main", run_main), ("ablation", run_ablation), ("ktl", run_ktl)):
    if name in args.only:
      began = time.perf_counter()
      step(args, results, save)
      results["wall_s"][name] = time.perf_counter() - began
  results["wall_s"]["total"] = time.perf_counter() - start
  save()
  write_results_md(results)
  print(f"total {results['wall_s']['total'] / 60:.1f} min; tables in {RESULTS_MD}")


if __name__ == "__main__":
  main()
