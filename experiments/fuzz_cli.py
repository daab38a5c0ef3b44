"""Random command lines against the bad-input bar: every run must end with exit 0, or exit 2
and one ``error: ...`` line — never a traceback, another status or a hang.

Each case is a fresh ``python -m fedjax_lib`` process on tiny settings (bundled digits, 2–8
clients, 1–3 rounds). ``single`` draws an algorithm, a model (one architecture, several, or an
HtFLlib family) and a random subset of the execution, participation, partition, precision,
repetition, privacy, DLG, new-client and hyperparameter flags. ``steps`` runs two commands in
a row: more rounds on a checkpointed run (resume), a rerun from the results JSON
(``--config``), ``-sfn`` then ``-mfn``, a compile cache written then read, or ``--devices``
over four fake CPU devices. A case is ``bad`` when a command ends otherwise; its output
folder is kept and its stderr logged. Not a test (a case takes 3–30 s): a campaign to run
after changing the checks or the run loop, e.g.

    python experiments/fuzz_cli.py --mode single --cases 150 --seed 7
    python experiments/fuzz_cli.py --mode steps --cases 80 --seed 3

2026-12-05 (29th session): throwaway precursors of this script (the same kinds of cases,
other draws) ran 416 cases: 186 single ones found PerAvg with ``-m cnn,dnn -dp`` crashing
while the architecture groups were checked (fixed: the settings are checked first); 150
more single ones and 80 two-step ones found nothing else. This script itself then ran 18
``steps`` cases (``--seed 11 --cases 6``, ``--seed 5 --cases 12``): none bad.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fedjax_lib.algorithms import registry  # pylint: disable=wrong-import-position

HTFL = ["FD", "FedGen", "FedKD", "FedL2G-feat", "FedL2G-logit", "FML", "FedProto", "FedTGP",
        "FedMRL", "LG-FedAvg", "FedGH", "Local"]
MODELS = ["dnn", "cnn", "mlr", "cnn,dnn", "dnn,mlr", "resnet4", "HtFE-img-2", "HtFE-img-3",
          "MLPs"]
# (probability, choices): one of the choices is appended when the draw is below the probability
OPTIONS = [
    (.5, [["-jr", "0.5"], ["-jr", "0.34"], ["-jr", "1"]]),
    (.2, [["-rjr", "true"]]),
    (.2, [["-cdr", "0.2"], ["-cdr", "0.5"]]),
    (.4, [["--executor", "vmap"], ["--executor", "chunked"], ["--executor", "sequential"]]),
    (.2, [["--chunk-size", "1"], ["--chunk-size", "3"]]),
    (.3, [["--client-threads", "1"], ["--client-threads", "3"]]),
    (.3, [["-ls", "2"]]),
    (.4, [["-lbs", "4"], ["-lbs", "64"]]),
    (.2, [["-eg", "2"]]),
    (.3, [["--partition", p] for p in ("dir", "pat", "iid", "exdir")]),
    (.1, [["--dtype", "bfloat16"]]),
    (.1, [["-t", "2"], ["--sweep", "seed=0,1"]]),
    (.1, [["-nnc", "1", "-ften", "0"], ["-nnc", "1", "-ften", "1"]]),
    (.1, [["-fs", "3"]]),
    (.1, [["-ab", "true", "-tc", "1"]]),
    (.1, [["-ld", "true"]]),
    (.05, [["-dp", "true"]]),
    (.05, [["-dlg", "true", "-dlgg", "1"]]),
    (.2, [["-fd", "16"], ["-fd", "64"]]),
    (.1, [["--on-nan", "skip-client"]]),
    (.1, [["--shuffle", "false"]]),
    (.1, [["--unroll", "0"], ["--unroll", "1"]]),
    (.1, [["-lr", "0.5"], ["-lr", "10"], ["-lr", "1e-6"]]),
    (.1, [["--rebalance", "true"]]),
    (.05, [["--pfllib-compat", "true"]]),
    (.1, [["-wu", "1"], ["-se", "2"]]),
]


def single_case(rng: random.Random, out: str) -> list[list[str]]:
  algorithm = rng.choice(HTFL if rng.random() < .3 else registry.algorithm_names())
  model = rng.choice(MODELS)
  data = "digits" if model in ("dnn", "mlr", "dnn,mlr") else rng.choice(["digits", "digits32"])
  argv = ["-algo", algorithm, "-m", model, "-data", data, "-nc", str(rng.randint(2, 8)),
          "-gr", str(rng.randint(1, 3)), "--seed", str(rng.randint(0, 5))]
  for probability, choices in OPTIONS:
    if rng.random() < probability:
      argv += rng.choice(choices)
  return [argv + ["--out", out]]


def steps_case(rng: random.Random, out: str) -> list[list[str]]:
  base = ["-algo", rng.choice([a for a in registry.algorithm_names() if a != "FedKTL"]),
          "-m", rng.choice(["dnn", "mlr", "cnn"]), "-nc", str(rng.randint(3, 8)), "-gr", "2"]
  kind = rng.choice(["resume", "config", "models", "cache", "devices"])
  first = base + ["--out", out]
  if kind == "resume":
    return [first + ["--checkpoint-every", "1"],
            base[:-1] + ["4", "--out", out, "--resume", "--checkpoint-every", "1"]]
  if kind == "config":  # RESULTS is replaced by the first command's results JSON
    return [first, ["--config", "RESULTS", "-gr", "3", "--out", out + "_rerun"]]
  if kind == "models":  # -sfn writes DIR/<dataset>/<algorithm>
    return [first + ["-sfn", f"{out}/models"],
            base[:-1] + ["1", "-mfn", f"{out}/models/digits/{base[1]}", "-go", "again", "--out",
                         out]]
  if kind == "cache":
    return [first + ["--compile-cache", f"{out}_cache"],
            first + ["--compile-cache", f"{out}_cache", "--overwrite"]]
  return [first + ["--devices", rng.choice(["2", "4", "0"]),
                   "--executor", rng.choice(["vmap", "chunked", "auto"])]]


def is_bad(status, err: str) -> bool:
  lines = [line for line in err.splitlines() if line.strip()]
  return (status not in (0, 2) or "Traceback" in err
          or (status == 2 and not any(line.startswith("error:") for line in lines)))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--mode", choices=["single", "steps"], default="single")
  p.add_argument("--cases", type=int, default=50)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="/tmp/fedjax_fuzz", help="folder of the cases' outputs")
  p.add_argument("--log", default=None, help="JSON lines, one per case (default: OUT/log.jsonl)")
  p.add_argument("--timeout", type=int, default=400, help="seconds per command")
  args = p.parse_args()
  rng = random.Random(args.seed)
  os.makedirs(args.out, exist_ok=True)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  bad_cases = 0
  with open(args.log or os.path.join(args.out, "log.jsonl"), "a", encoding="utf-8") as log:
    for case in range(args.cases):
      out = os.path.join(args.out, f"{args.mode}_{args.seed}_{case}")
      for path in (out, out + "_rerun", out + "_cache"):
        shutil.rmtree(path, ignore_errors=True)
      commands = (single_case if args.mode == "single" else steps_case)(rng, out)
      statuses, errors, bad, start = [], [], False, time.time()
      for argv in commands:
        if "RESULTS" in argv:
          found = sorted(glob.glob(os.path.join(out, "*_0.json")))
          if not found:
            break
          argv = [found[0] if a == "RESULTS" else a for a in argv]
        argv = argv + ["--no-progress", "-q", "--no-plot"]
        try:
          proc = subprocess.run([sys.executable, "-m", "fedjax_lib", *argv], capture_output=True,
                                text=True, timeout=args.timeout, cwd=ROOT, env=env, check=False)
          status, err = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired:
          status, err = "timeout", ""
        statuses.append(status)
        errors.append(err[-2000:])
        bad = is_bad(status, err)
        if bad or status != 0:
          break
      bad_cases += bad
      log.write(json.dumps({"case": case, "mode": args.mode, "seed": args.seed,
                            "commands": [" ".join(c) for c in commands], "status": statuses,
                            "bad": bad, "stderr": errors, "s": round(time.time() - start, 1)})
                + "\n")
      log.flush()
      print(f"{'BAD' if bad else 'ok '} {statuses} {time.time() - start:5.1f}s "
            f"{' '.join(commands[0][:6])}", flush=True)
      if not bad:
        for path in (out, out + "_rerun", out + "_cache"):
          shutil.rmtree(path, ignore_errors=True)
  print(f"{bad_cases} bad of {args.cases} cases")
  sys.exit(1 if bad_cases else 0)


if __name__ == "__main__":
  main()
