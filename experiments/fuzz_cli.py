"""Random command lines against the bad-input bar: every run must end with exit 0, or exit 2
and one ``error: ...`` line — never a traceback, another status or a hang.

Each case is a fresh ``python -m fedjax_lib`` process on tiny settings (bundled digits, 2–8
clients, 1–3 rounds). ``single`` draws an algorithm, a model (one architecture, several, or an
HtFLlib family) and a random subset of the execution, participation, partition, precision,
repetition, privacy, DLG, new-client and hyperparameter flags. ``steps`` runs two commands in
a row: more rounds on a checkpointed run (resume), a rerun from the results JSON
(``--config``), ``-sfn`` then ``-mfn``, a compile cache written then read, or ``--devices``
over four fake CPU devices. A case is ``bad`` when a command ends otherwise; its output
folder is kept and its stderr logged. ``agree`` runs two arms that the README promises give
the same numbers (``agree_case``: to the bit, or within float tolerance) and compares their
results JSONs round by round; a case is also ``bad`` when they differ, or when one arm runs
and the other is refused (``--relations`` draws from some of ``RELATIONS`` only). Its
``interrupt`` relation sends SIGINT, SIGTERM or SIGKILL at a random fraction of the first
arm's duration (sometimes with a compile cache both arms share) and runs the same command
again: a process stopped by SIGINT or SIGTERM must exit 130 with the signal's line first, and
every command that ends (SIGKILL aside) must leave no temporary or lock file in its
``--out`` (`fedjax_lib.output.leftovers`). Not a test (a case takes 3–30 s, a
few minutes with a ResNet family): a campaign to run after changing the checks, the engine or
the run loop, e.g.

    python experiments/fuzz_cli.py --mode single --cases 150 --seed 7
    python experiments/fuzz_cli.py --mode steps --cases 80 --seed 3
    python experiments/fuzz_cli.py --mode agree --cases 60 --seed 4

2026-12-05 (29th session): throwaway precursors of this script (the same kinds of cases,
other draws) ran 416 cases: 186 single ones found PerAvg with ``-m cnn,dnn -dp`` crashing
while the architecture groups were checked (fixed: the settings are checked first); 150
more single ones and 80 two-step ones found nothing else. This script itself then ran 18
``steps`` cases (``--seed 11 --cases 6``, ``--seed 5 --cases 12``): none bad.

2026-12-05 (30th session): ``agree`` campaigns of 200 cases (seeds 2–5; the generator grew
between them, so only seed 5's 40 cases are this script's draws, before ``--unroll`` joined
ARM_FLAGS and ``-lr`` left the ``close`` relations), 94 of which ran both arms, found: sharded
rounds with every client in the cohort handing FedTGP's/FedGH's/FedPAC's/FedKTL's servers
their uploads in another order than one device (fixed in the engine); extending a FedKD run
changing its energy schedule (now warned; the ``resume`` relation fixes ``global_rounds``);
a run that diverged before its first checkpoint advising ``--checkpoint-every`` although it
was set, and its ``--resume`` refused over the results file (both messages fixed). The
other differences were float noise grown by BatchNorm ResNets, bfloat16 and ``-lr 10``,
which the ``close`` relations now leave out (see ``agree_case``). This script as committed
then ran ``--mode agree --cases 20 --seed 6`` and ``--seed 7``: 40 cases, 21 compared, none
bad.

2026-12-05 (31st session): ``--mode agree --cases 30 --seed 8`` (all relations of then: 18
compared, none bad); the new ``hsweep`` relation (``--relations hsweep --cases 40 --seed 20``,
then ``hsweep,sweep,devices,executors --cases 40 --seed 21``: 45 compared) found a sweep of
FedCP's ``lam`` ending in a traceback (its loss branched on the weight in Python; a test
tracing every algorithm's float hyperparameters as a sweep then found FedDBE's
``kl_weight`` too: both fixed) and ``--algo-param join_ratio=0.5`` accepted against ``-jr 1``
(FedCross kept K = 2 middleware models for a cohort of 4; now refused, as ``eval_gap`` and
``pfllib_compat``); the new ``interrupt`` relation (``--relations interrupt``, seeds 30 and
31, 54 cases, 41 compared; seed 31 stopped after 24 of its 30) found nothing, nor did
``--relations hsweep,interrupt,resume,config,knob --cases 30 --seed 40`` (18 compared) or
``--relations hsweep --cases 15 --seed 60`` (10 compared).

2026-12-06 (32nd session): the ``interrupt`` relation sends SIGKILL too and sometimes shares a
compile cache between its arms (the draws of earlier seeds changed with it);
``--relations interrupt --cases 8 --seed 70``: 8 cases, 3 of them killed, 5 compared (2 after
a kill; 3 refused in both arms), none bad.

2026-12-06 (33rd session), after the bundled digits stopped going through scikit-learn:
``--mode single --cases 60 --seed 33``: 15 ran, 45 were refused with one `error:` line, none bad;
``--mode steps --cases 25 --seed 33``: 13 first commands ran alone or with a second that ran,
8 with a second refused as it should be (``-mfn`` for algorithms that keep no client model),
4 refused, none bad.

2026-12-06 (34th session): ``--mode agree --cases 30 --seed 34``: 30 cases over every relation,
22 compared (an ``interrupt`` of FML on HtFE-img-3 in bfloat16 with ``-t 2`` took 475 s), none
bad; ``--mode single --cases 60 --seed 34``: 24 ran, 36 were refused with one `error:` line,
none bad; ``--mode steps --cases 25 --seed 34``: 14 ran both commands, 2 one command alone, 4 a
first one with a second refused as it should be (``-mfn`` where no client model is kept), 5
refused (models without a base for FedRep, FedPer, FedAS, FedPCL; ``-sfd`` wider than the DNN's
features for FedMRL), none bad; ``--mode agree --relations interrupt,resume,cache,config
--cases 20 --seed 35``: 17 compared (6 interrupted), none bad; ``--mode single --cases 40
--seed 36``: 16 ran, 24 were refused with one `error:` line, none bad.

2026-12-07 (44th session): ``--mode single --cases 40 --seed 145`` and ``--mode steps --cases 25
--seed 145``: none bad. Then boundary values, which the random draws never reach: a throwaway
precursor of ``bounds`` (the algorithm flags with every taker, 277 of its 677 cases) found
``--seed -1`` and ``2**64`` ending in tracebacks (and seed 2**32 silently running seed 0's run),
``inf`` accepted for FedProx's/Ditto's ``-mu``, GPFL's and FedCP's ``-lam`` and FedALA's ``-et``,
pFedMe ``-K 2**31`` and FedMRL ``-sfd 2**63`` ending in tracebacks and FedMRL ``-sfd 2**31``
filling memory; all fixed, then ``--mode bounds --cases 1000 --seed 145`` (all 732 cases, 40 s
each at most) found FedGen ``-nd 2147483647`` and ``-gr 2147483647`` filling memory before the
first round (fixed) and 10 accepted values that ask for long runs (``-ls``, ``-pls``, ``-se``,
``-K``, ``-fte`` at 2**31 - 1, and ``-t 2147483647``, which filled memory too: now at most
65,536); 489 cases were refused with one `error:` line, 231 ran (the first ~130 cases ran
before the precursor's fixes had landed).

2026-12-07 (45th session): ``--mode agree --cases 30 --seed 147`` (every relation; the first
cases on the code before the single-run memory check and the multi-host changes): none bad.
Two-process (``--distributed``) runs are not drawn here: their edges (a signal on one host,
a refusal of process 0, one memory verdict) are tests in tests/test_sharding.py.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fedjax_lib import output as output_lib  # pylint: disable=wrong-import-position
from fedjax_lib.algorithms import registry  # pylint: disable=wrong-import-position
from fedjax_lib.config import RUN_SETTINGS  # pylint: disable=wrong-import-position
from fedjax_lib.runner import HISTORY_KEYS, TRAFFIC_KEYS  # pylint: disable=wrong-import-position

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


# ``bounds``: every numeric flag at each of these values, an algorithm flag with every algorithm
# that takes it, the others with FedAvg, on the DNN with 4 clients for 1 round. 2**31 - 1 is the
# largest int32; 1e30 and 1e-30 are finite but extreme.
INT_BOUNDS = ("-1", "0", "1", str(2**31 - 1), str(2**31), str(2**63))
FLOAT_BOUNDS = ("-1", "0", "1e-30", "1e30", "nan", "inf")
BOUNDS_BASE = ["-data", "digits", "-m", "dnn", "-nc", "4", "-gr", "1"]


def bounds_cases() -> list[list[str]]:
  """Every (flag, boundary value) pair of ``bounds``, in the parser's order."""
  from fedjax_lib import cli  # pylint: disable=import-outside-toplevel
  values = lambda kind: INT_BOUNDS if kind is int else FLOAT_BOUNDS
  cases, algorithm_flags = [], set()
  for flags, dest, kind, _ in cli.ALGORITHM_FLAGS:
    algorithm_flags.update(flags)
    takers, _ = cli.algorithm_flag_defaults(dest)
    cases += [["-algo", name, flags[0], v] for name in takers for v in values(kind)]
  for action in cli.build_parser()._actions:  # pylint: disable=protected-access
    flag = action.option_strings[0] if action.option_strings else ""
    if action.type in (int, float) and flag not in algorithm_flags:
      cases += [["-algo", "FedAvg", flag, v] for v in values(action.type)]
  return [BOUNDS_BASE + case for case in cases]


# Flags an ``agree`` case sets itself (its relation's two arms), so its base draws none of them.
ARM_FLAGS = {"--executor", "--chunk-size", "--client-threads", "-t", "--sweep", "-ab",
             "--unroll"}
# Metrics compared between the arms: the evaluated ones exactly, or (``close`` relations)
# within the tolerances; the per-round counts and traffic always exactly.
PER_ROUND = ("nonfinite_clients", *TRAFFIC_KEYS)
METRICS = (*HISTORY_KEYS, *PER_ROUND)
# The README's promises: resume, client threads, the compile cache, a --config rerun, run t of
# -t against its separate run and evaluating every other round give the same numbers to the
# bit; executors, device counts, a sweep's entry against its separate run and the settings
# documented as equal up to float rounding (--conv-impl, --chunk-size, --eval-chunk-size,
# --unroll) agree within float tolerance (accuracies and AUC within ACC_TOL, a handful of
# flipped test samples after a few rounds; losses within LOSS_RTOL relative).
EXACT = ("resume", "threads", "cache", "config", "times", "evalgap", "interrupt")
CLOSE_MODELS = ["dnn", "mlr", "cnn", "cnn,dnn", "dnn,mlr"]
ACC_TOL, LOSS_RTOL = 0.02, 1e-3


def with_flag(argv: list[str], flag: str, value=None) -> list[str]:
  """``argv`` with ``flag``'s value replaced by ``value`` (None: the flag and its value left
  out)."""
  i = argv.index(flag)
  return argv[:i] + ([flag, str(value)] if value is not None else []) + argv[i + 2:]


RELATIONS = ("resume", "threads", "cache", "config", "times", "evalgap", "interrupt", "executors",
             "devices", "sweep", "hsweep", "knob")


def agree_case(rng: random.Random, out: str,
               relations=RELATIONS) -> tuple[str, list[list[list[str]]]]:
  """A relation (one of ``relations``) and its two arms, each a list of commands; the last
  writes the results."""
  relation = rng.choice(relations)
  close = relation not in EXACT
  algorithm = rng.choice(HTFL if rng.random() < .3 else registry.algorithm_names())
  # Models with BatchNorm (the ResNets of HtFE-img-*) and bfloat16 turn float noise into
  # percent-level differences within a round, in PyTorch too: measured 2026-12-05, ResNet-10
  # on 270 digits, one epoch of batch 10 at lr 0.005 after a 1e-7 relative perturbation of
  # the initial parameters: 0.67% relative parameter difference (0.84% moved), PyTorch
  # 0.39% (0.75% moved). The `close` relations compare on models without them.
  models = CLOSE_MODELS if close else [m for m in MODELS if m not in ("resnet4", "MLPs")]
  if algorithm not in HTFL:  # (PFLlib's algorithms refuse several architectures: a wasted case)
    models = [m for m in models if "," not in m and not m.startswith("HtFE")]
  model = rng.choice(models)
  argv = ["-algo", algorithm, "-m", model, "-nc", str(rng.randint(4, 6)), "--seed",
          str(rng.randint(0, 5))]
  # (and learning rates of 0.5 or 10, at which float noise grows as fast: FedKD, dnn, -lr 10,
  # 1 against 4 devices, train loss 3.8333 against 3.8335 after a round, 3.90 against 3.59
  # after two; at -lr 0.05, equal to 1e-7)
  skip = ARM_FLAGS | ({"--dtype", "-lr"} if close else set())
  for probability, choices in OPTIONS:  # fewer flags than `single`: more cases that run
    flags = rng.choice(choices)
    if rng.random() < .6 * probability and not skip & set(flags):
      argv += flags
  a, b = out + "_a", out + "_b"
  if relation == "resume":  # 4 rounds straight against 2, then resumed to 4
    if "global_rounds" in registry.get_algorithm(algorithm).hyperparameters():
      argv += ["--algo-param", "global_rounds=4"]  # its schedule: the same in both arms
    whole = argv + ["-gr", "4", "--checkpoint-every", str(rng.choice([1, 2]))]
    return relation, [[whole + ["--out", a]],
                      [argv + ["-gr", "2", "--checkpoint-every", "1", "--out", b],
                       whole + ["--resume", "--out", b]]]
  if relation == "interrupt":  # Ctrl-C, SIGTERM or SIGKILL at a random moment of the run (a
    # fraction of the first arm's duration: start-up, compilation, rounds, writing), then the
    # same command (after SIGKILL the rerun cleans up: the lock, temporary files, cache entries)
    signal_name = rng.choice(["SIGINT", "SIGTERM", "SIGKILL"])
    whole = (argv + ["-gr", str(rng.randint(3, 8))]
             + rng.choice([[], ["--checkpoint-every", "2"]])
             + rng.choice([[], [], ["--compile-cache", out + "_cache"]])
             + rng.choice([[], [], ["-t", "2"], ["--sweep", "seed=0,1"]])  # S runs: all saved
             + rng.choice([[], ["--executor", "vmap"], ["--executor", "chunked"]]))
    return relation, [[whole + ["--out", a]],
                      [[f"@{signal_name}={rng.uniform(.05, 1):.3f}"] + whole + ["--out", b],
                       whole + ["--out", b]]]
  if relation == "evalgap":  # evaluating every round or every other: the same rounds 0, 2, 4
    argv = with_flag(argv, "-eg") if "-eg" in argv else argv
    return relation, [[argv + ["-gr", "4", "-eg", "1", "--out", a]],
                      [argv + ["-gr", "4", "-eg", "2", "--out", b]]]
  argv = argv + ["-gr", "2"]
  seed = int(argv[argv.index("--seed") + 1])
  if relation == "times":  # run 1 of -t 2 against the separate run with seed + 1
    return relation, [[argv + ["-t", "2", "--out", a]],
                      [with_flag(argv, "--seed", seed + 1) + ["--partition-seed", str(seed),
                                                              "--out", b]]]
  if relation == "threads":
    seq = argv + ["--executor", "sequential"]
    return relation, [[seq + ["--client-threads", "1", "--out", a]],
                      [seq + ["--client-threads", "3", "--out", b]]]
  if relation == "cache":  # the second run loads what the first compiled
    cache = ["--compile-cache", out + "_cache"]
    return relation, [[argv + cache + ["--out", a]], [argv + cache + ["--out", b]]]
  if relation == "config":  # RESULTS is replaced by the first arm's results JSON
    return relation, [[argv + ["--out", a]], [["--config", "RESULTS", "--out", b]]]
  if relation == "executors":
    first, second = rng.sample([["--executor", "sequential"], ["--executor", "vmap"],
                                ["--executor", "chunked", "--chunk-size", "2"]], 2)
    return relation, [[argv + first + ["--out", a]], [argv + second + ["--out", b]]]
  if relation == "knob":  # two values of a setting documented as equal up to float rounding
    knob = rng.choice(["conv", "chunk", "eval-chunk", "unroll"])
    if knob == "conv":
      argv = with_flag(argv, "-m", rng.choice(["cnn", "cnn,dnn"]))
      pair = [["--conv-impl", impl] for impl in rng.sample(["lax", "patches", "slices",
                                                            "hybrid"], 2)]
    elif knob == "chunk":
      pair = [["--executor", "chunked", "--chunk-size", size] for size in ("1", "3")]
    elif knob == "eval-chunk":
      executor = ["--executor", rng.choice(["vmap", "chunked"])]
      pair = [executor + ["--eval-chunk-size", size] for size in ("1", "64")]
    else:
      pair = [["--unroll", "0"], ["--unroll", "1"]]
    return relation, [[argv + pair[0] + ["--out", a]], [argv + pair[1] + ["--out", b]]]
  if relation == "devices":
    executor = ["--executor", rng.choice(["vmap", "chunked"])]
    return relation, [[argv + executor + ["--devices", "1", "--out", a]],
                      [argv + executor + ["--devices", "4", "--out", b]]]
  if relation == "hsweep":  # a hyperparameter sweep's entry against the separate run
    name, first, second = swept_hyperparameter(rng, algorithm)
    flag = ["-lr", str(second)] if name == "lr" else ["--algo-param", f"{name}={second}"]
    executor = ["--executor", rng.choice(["sequential", "vmap", "chunked"])]
    return relation, [[argv + executor + ["--sweep", f"{SWEEP_NAMES.get(name, name)}={first},"
                                          f"{second}", "--out", a]],
                      [argv + executor + flag + ["--out", b]]]
  # a sweep's entry for seed s against the separate run --seed s, one partition for both
  other, swept = rng.sample([s for s in range(6) if s != seed], 2)
  partition = ["--partition-seed", str(seed)]
  return relation, [[argv + partition + ["--sweep", f"seed={other},{swept}", "--out", a]],
                    [with_flag(argv, "--seed", swept) + partition + ["--out", b]]]


# --sweep's names for hyperparameters whose own name it refuses (`alpha` is the partition's).
SWEEP_NAMES = {"alpha": "al"}


def swept_hyperparameter(rng: random.Random, algorithm: str) -> tuple[str, float, float]:
  """A floating-point hyperparameter of ``algorithm`` (or the learning rate; not the run's
  settings it reads, `config.RUN_SETTINGS`, which --algo-param refuses) and two values
  of it: fractions of its default, which stay within a [0, 1] range, or for a default of 0
  two of 0 (a term some algorithms skip when it is 0), 0.05 and 0.1."""
  defaults = {"lr": .005, **{name: value for name, value in
                             registry.get_algorithm(algorithm).hyperparameters().items()
                             if isinstance(value, float) and name not in RUN_SETTINGS}}
  name = rng.choice(list(defaults))
  default = defaults[name]
  first, second = rng.sample([0.0, 0.05, 0.1] if default == 0 else
                             [default * f for f in (.25, .5, .75)], 2)
  return name, first, second


def results_path(folder: str, relation: str) -> str | None:
  """The results JSON in ``folder`` that a relation compares (a sweep's second combination,
  run 1 of ``-t 2``, the last run of an interrupted one, else run 0), or None."""
  name = "*_[0-9].json" if relation == "interrupt" else "*_0.json"
  if folder.endswith("_a") and relation in ("sweep", "hsweep", "times"):
    name = "*_1.json" if relation == "times" else "*_sweep_1.json"
  found = sorted(glob.glob(os.path.join(folder, name)))
  return found[-1] if found else None


def results_of(folder: str, relation: str) -> dict | None:
  path = results_path(folder, relation)
  if path is None:
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def differences(relation: str, first: dict, second: dict) -> list[str]:
  """What the two arms' metrics break of the relation's promise, one line per metric."""
  found = []
  evaluated = set(first.get("rounds") or []) & set(second.get("rounds") or [])
  for metric in METRICS:
    x, y = first.get(metric), second.get(metric)
    if relation == "evalgap" and metric in HISTORY_KEYS and x is not None and y is not None:
      # the rounds both arms evaluated (the last round is evaluated whatever the gap)
      x, y = ([v for r, v in zip(arm["rounds"], values) if r in evaluated]
              for arm, values in ((first, x), (second, y)))
    if x is None or y is None or len(x) != len(y):
      found.append(f"{metric}: {x} against {y}")
      continue
    for i, (u, v) in enumerate(zip(x, y)):
      if u is None or v is None or u != u or v != v:  # a NaN or a round not evaluated
        same = (u is None) == (v is None) and (u != u) == (v != v)
      elif relation in EXACT or metric in PER_ROUND:
        same = u == v
      elif metric == "train_loss":
        same = abs(u - v) <= LOSS_RTOL * max(abs(u), abs(v), 1e-12)
      else:
        same = abs(u - v) <= ACC_TOL
      if not same:
        found.append(f"{metric}[{i}]: {u!r} against {v!r}")
        break
  return found


def is_bad(status, err: str, signal_name: str = "") -> bool:
  """Against the bad-input bar: exit 0, or 2 with an ``error:`` line; after ``signal_name``
  also 130 with the signal's line first (README: "Ctrl-C / SIGTERM at any moment"; warnings
  the run gave before it aside)."""
  lines = [line for line in err.splitlines() if line.strip()]
  if signal_name == "SIGKILL":  # killed (-9), or done before the signal
    return status not in (0, -signal.SIGKILL) or "Traceback" in err
  if signal_name and status == 130:
    said = [line for line in lines if not line.startswith("warning:")]
    return "Traceback" in err or not said or not said[0].startswith(f"{signal_name}: stopping")
  return (status not in (0, 2) or "Traceback" in err
          or (status == 2 and not any(line.startswith("error:") for line in lines)))


def rss_bytes(pid: int) -> int:
  """The resident memory of process ``pid`` (0 once it has ended)."""
  try:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
      return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
  except OSError:
    return 0


def run_watched(command: list[str], timeout: int, env: dict,
                max_rss: float) -> tuple[object, str]:
  """``command``'s exit status and stderr; "timeout" after ``timeout`` seconds, "memory" once
  it holds more than ``max_rss`` bytes (both killed)."""
  proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          cwd=ROOT, env=env)
  chunks = []
  reader = threading.Thread(target=lambda: chunks.append(proc.stderr.read()), daemon=True)
  reader.start()
  start, status = time.time(), None
  while proc.poll() is None:
    if time.time() - start > timeout or rss_bytes(proc.pid) > max_rss:
      status = "timeout" if time.time() - start > timeout else "memory"
      proc.kill()
      break
    time.sleep(0.2)
  proc.wait()
  reader.join()
  return (status or proc.returncode), "".join(chunks)


def run_command(argv: list[str], timeout: int, env: dict,
                max_rss: float = 0) -> tuple[object, str]:
  """One ``python -m fedjax_lib`` process: its exit status (or "timeout") and stderr. A first
  item ``@SIGINT=T`` (or ``@SIGTERM=T``) sends that signal T seconds after the start. With
  ``max_rss`` (bytes) the process is killed once it holds more (status "memory")."""
  command = [sys.executable, "-m", "fedjax_lib", *argv, "--no-progress", "-q", "--no-plot"]
  if argv and argv[0].startswith("@"):
    signal_name, delay = argv[0][1:].split("=")
    command.remove(argv[0])
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env=env)
    try:
      proc.wait(timeout=float(delay))
    except subprocess.TimeoutExpired:
      proc.send_signal(getattr(signal, signal_name))
    try:
      _, err = proc.communicate(timeout=timeout)
      return proc.returncode, err
    except subprocess.TimeoutExpired:
      proc.kill()
      return "timeout", ""
  return run_watched(command, timeout, env, max_rss or math.inf)


def run_case(mode: str, rng: random.Random, out: str, timeout: int, env: dict,
             relations=RELATIONS, bounds: list[str] | None = None, max_rss: float = 0) -> dict:
  """Draws one case (``bounds``: runs that command line), runs its commands in order (stopping
  at the first that fails) and says whether it is bad: a command against the bad-input bar,
  or (``agree``) two arms that both ran and break their relation, or that one ran and the
  other was refused. In ``bounds`` mode a command past ``timeout`` is "long", not bad (an
  accepted value can ask for a long run: ``-gr 2147483647``), and one past ``max_rss`` bad."""
  if mode == "agree":
    relation, arms = agree_case(rng, out, relations)
  elif mode == "bounds":
    relation, arms = mode, [[bounds + ["--out", out]]]
  else:
    relation, arms = mode, [(single_case if mode == "single" else steps_case)(rng, out)]
  record = {"relation": relation, "commands": [[" ".join(c) for c in arm] for arm in arms],
            "status": [], "stderr": [], "bad": False}
  durations = []
  for arm in arms:
    statuses = []
    for argv in arm:
      if "RESULTS" in argv:
        found = results_path(out + ("_a" if mode == "agree" else ""), "config")
        if found is None:
          break
        argv = [found if a == "RESULTS" else a for a in argv]
      if argv[0].startswith("@"):  # @SIGINT=f: at f times the first arm's command's duration
        signal_name, fraction = argv[0][1:].split("=")
        argv = [f"@{signal_name}={float(fraction) * durations[-1]:.2f}", *argv[1:]]
      start = time.time()
      status, err = run_command(argv, timeout, env, max_rss)
      durations.append(time.time() - start)
      statuses.append(status)
      record["stderr"].append(err[-2000:])
      signal_name = argv[0][1:].split("=")[0] if argv[0].startswith("@") else ""
      if mode == "bounds" and status == "timeout":  # (killed: its lock is the next run's)
        record["long"] = True
        break
      if is_bad(status, err, signal_name):
        record["bad"] = True
      killed = status == -signal.SIGKILL
      left = (output_lib.leftovers(argv[argv.index("--out") + 1])
              if "--out" in argv and status in (0, 2, 130) else [])
      if left:  # (a killed process leaves its lock: the next command's to remove)
        record["leftovers"] = left
        record["bad"] = True
      if status != 0 and not (signal_name and (status == 130 or killed)):
        break
    record["status"].append(statuses)
    if record["bad"] or (mode != "agree" and statuses[-1:] != [0]):
      return record
  if mode == "agree":
    ran = [statuses[-1:] == [0] and len(statuses) == len(arm)
           for statuses, arm in zip(record["status"], arms)]
    first = results_of(out + "_a", relation) if ran[0] else None
    if first is not None and first.get("stopped"):
      # diverged: nothing to compare (a resume of it is refused: it saved no checkpoint)
      record["differences"] = []
      record["relation"] += " (diverged)"
    elif ran == [True, True]:
      second = results_of(out + "_b", relation)
      record["differences"] = (["a results JSON is missing"] if first is None or second is None
                               else differences(relation, first, second))
      record["bad"] = bool(record["differences"])
    elif any(ran):  # one arm refused what the other ran
      record["differences"] = [f"arm {'ab'[ran.index(False)]} did not run"]
      record["bad"] = True
  return record


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--mode", choices=["single", "steps", "agree", "bounds"], default="single")
  p.add_argument("--cases", type=int, default=50)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="/tmp/fedjax_fuzz", help="folder of the cases' outputs")
  p.add_argument("--log", default=None, help="JSON lines, one per case (default: OUT/log.jsonl)")
  p.add_argument("--timeout", type=int, default=400, help="seconds per command")
  p.add_argument("--max-rss-gb", type=float, default=6.0,
                 help="bounds: a command holding more memory is killed and the case is bad")
  p.add_argument("--relations", default=",".join(RELATIONS),
                 help="agree: the relations to draw from (comma-separated; default: all)")
  args = p.parse_args()
  relations = args.relations.split(",")
  if not set(relations) <= set(RELATIONS):
    p.error(f"--relations {args.relations!r}: use some of {','.join(RELATIONS)}")
  rng = random.Random(args.seed)
  os.makedirs(args.out, exist_ok=True)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  bad_cases = 0
  bounds = bounds_cases() if args.mode == "bounds" else []
  rng.shuffle(bounds)
  max_rss = args.max_rss_gb * 2**30 if args.mode == "bounds" else 0
  with open(args.log or os.path.join(args.out, "log.jsonl"), "a", encoding="utf-8") as log:
    for case in range(args.cases):
      out = os.path.join(args.out, f"{args.mode}_{args.seed}_{case}")
      paths = [out + tail for tail in ("", "_a", "_b", "_rerun", "_cache")]
      for path in paths:
        shutil.rmtree(path, ignore_errors=True)
      start = time.time()
      if args.mode == "bounds" and case >= len(bounds):
        break
      record = run_case(args.mode, rng, out, args.timeout, env, relations,
                        bounds[case] if bounds else None, max_rss)
      bad_cases += record["bad"]
      record.update(case=case, mode=args.mode, seed=args.seed, s=round(time.time() - start, 1))
      log.write(json.dumps(record) + "\n")
      log.flush()
      verdict = "BAD" if record["bad"] else "long" if record.get("long") else "ok "
      print(f"{verdict} {record['relation']:9} {record['status']} "
            f"{record['s']:5.1f}s {record['commands'][0][0][:90]}", flush=True)
      for line in record.get("differences", []) + record.get("leftovers", []):
        print(f"    {line}", flush=True)
      if not record["bad"]:
        for path in paths:
          shutil.rmtree(path, ignore_errors=True)
  print(f"{bad_cases} bad of {min(args.cases, len(bounds) or args.cases)} cases")
  sys.exit(1 if bad_cases else 0)


if __name__ == "__main__":
  main()
