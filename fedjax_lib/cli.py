"""Command line: PFLlib's flags (and readable long options) → Config → run_experiment.

    python -m fedjax_lib -data digits -m CNN -algo FedAvg -gr 100 -nc 20 -lr 0.005
    python -m fedjax_lib --dataset path/to/PFLlib/dataset/MNIST --algorithm Local --times 3

Bad input prints one line ``error: ...`` naming the value and what is accepted, and exits with
status 2 before anything is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from fedjax_lib.config import DTYPES, EXECUTORS, ON_NAN, PARTITIONS, Config
from fedjax_lib.errors import ConfigError, FedJaxError

_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off"}


def str2bool(text: str) -> bool:
  """Parses 0/1/true/false/yes/no (PFLlib's ``type=bool`` turns "False" into True)."""
  value = str(text).strip().lower()
  if value in _TRUE:
    return True
  if value in _FALSE:
    return False
  raise argparse.ArgumentTypeError(f"invalid boolean {text!r}; use 0/1/true/false")


def _algo_param(text: str) -> tuple[str, float]:
  name, sep, value = text.partition("=")
  if not sep or not name:
    raise argparse.ArgumentTypeError(f"invalid --algo-param {text!r}; use NAME=VALUE")
  try:
    number = float(value)
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"invalid --algo-param value {value!r} for {name}; use a number") from None
  return name, int(number) if number.is_integer() and "." not in value else number


def _sweep_item(text: str) -> tuple[str, list]:
  """``NAME=V1,V2,...`` → ``(name, [values])``; ``lr`` stands for ``learning_rate``."""
  name, sep, values = text.partition("=")
  name = name.strip().lstrip("-")
  if not sep or not name or not values:
    raise argparse.ArgumentTypeError(f"invalid --sweep item {text!r}; use NAME=V1,V2,... "
                                     "(e.g. seed=0,1,2 lr=0.01,0.005 mu=0.1,1)")
  parsed = []
  for v in values.split(","):
    try:
      number = float(v)
    except ValueError:
      raise argparse.ArgumentTypeError(
          f"invalid --sweep value {v!r} for {name}; use numbers separated by commas") from None
    parsed.append(int(number) if number.is_integer() and "." not in v and "e" not in v.lower()
                  else number)
  return SWEEP_ALIASES.get(name, name), parsed


# Short names accepted by --sweep.
SWEEP_ALIASES = {"lr": "learning_rate", "local_learning_rate": "learning_rate",
                 "lamda": "lam", "bt": "beta", "et": "eta", "mo": "momentum", "klw": "kl_weight"}


# PFLlib's algorithm flags: (flags, hyperparameter name, type, help). Each is passed to the
# algorithm only when given; an algorithm refuses hyperparameters it does not take.
ALGORITHM_FLAGS = (
    (("-mu", "--mu"), "mu", float, "proximal / weight-decay coefficient (FedProx, Ditto, GPFL)"),
    (("-lam", "--lamda", "--lam"), "lam", float, "regularisation weight λ (FedCP, GPFL)"),
    (("-bt", "--beta"), "beta", float, "meta step β (PerAvg; default: the learning rate)"),
    (("-pls", "--plocal_epochs", "--plocal-epochs"), "plocal_epochs", int,
     "personal/head epochs (Ditto, FedRep)"),
    (("-et", "--eta"), "eta", float, "ALA weight learning rate (FedALA)"),
    (("-s", "--rand_percent", "--rand-percent"), "rand_percent", int,
     "percent of local data for ALA (FedALA)"),
    (("-p", "--layer_idx", "--layer-idx"), "layer_idx", int,
     "ALA on the last p parameter tensors (FedALA)"),
    (("-mo", "--momentum"), "momentum", float, "running-mean momentum (FedDBE)"),
    (("-klw", "--kl_weight", "--kl-weight"), "kl_weight", float,
     "mean-regularisation weight (FedDBE)"),
    (("-fte", "--fine_tuning_epochs", "--fine-tuning-epochs"), "fine_tuning_epochs", int,
     "fine-tuning epochs after the last round (FedBABU)"),
)
_ALGO_DESTS = tuple(dest for _, dest, _, _ in ALGORITHM_FLAGS)


class _Parser(argparse.ArgumentParser):
  """An ArgumentParser whose errors are one line and exit with status 2."""

  def error(self, message: str):
    self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
  d = Config()
  p = _Parser(prog="python -m fedjax_lib", allow_abbrev=False,
              description="Simulate (personalized) federated learning, PFLlib-compatible.")
  add = p.add_argument
  add("-data", "--dataset", default=d.dataset,
      help="built-in dataset (digits, synthetic-cifar, mnist, fmnist, cifar10, cifar100) or a "
           "PFLlib dataset folder (config.json, train/<id>.npz, test/<id>.npz)")
  add("-m", "--model", default=d.model,
      help="model: cnn (FedAvgCNN), dnn, mlr; or a comma-separated list (cnn,dnn): client i "
           "uses model i mod K")
  add("-fd", "--feature_dim", "--feature-dim", type=int, default=d.feature_dim,
      dest="feature_dim", help="pool every model's features to this width (HtFLlib's -fd; "
                               "default: 512 with several models, the model's own with one)")
  add("-algo", "--algorithm", default=d.algorithm, help="algorithm (PFLlib names)")
  add("--dtype", choices=DTYPES, default=d.dtype,
      help="computation dtype of local training and evaluation: float32, or bfloat16 for "
           "mixed precision (float32 parameters, bfloat16 convolutions/matmuls)")
  add("-gr", "--global_rounds", "--global-rounds", type=int, default=d.global_rounds,
      dest="global_rounds", help="rounds after round 0 (the loop runs gr+1 times)")
  add("-ls", "--local_epochs", "--local-epochs", type=int, default=d.local_epochs,
      dest="local_epochs")
  add("-lbs", "--batch_size", "--batch-size", type=int, default=d.batch_size, dest="batch_size")
  add("-lr", "--local_learning_rate", "--learning-rate", type=float, default=d.learning_rate,
      dest="learning_rate")
  add("-nc", "--num_clients", "--num-clients", type=int, default=None, dest="num_clients",
      help="clients (default 20 for built-in data; a folder's own count)")
  add("-ncl", "--num_classes", "--num-classes", type=int, default=None, dest="num_classes")
  add("-jr", "--join_ratio", "--join-ratio", type=float, default=d.join_ratio, dest="join_ratio")
  add("-rjr", "--random_join_ratio", "--random-join-ratio", type=str2bool, nargs="?",
      const=True, default=d.random_join_ratio, dest="random_join_ratio")
  add("-cdr", "--client_drop_rate", "--client-drop-rate", type=float,
      default=d.client_drop_rate, dest="client_drop_rate")
  add("-eg", "--eval_gap", "--eval-gap", type=int, default=d.eval_gap, dest="eval_gap")
  add("-t", "--times", type=int, default=d.times, help="repetitions (seeds seed, seed+1, ...)")
  add("-ab", "--auto_break", "--auto-break", type=str2bool, nargs="?", const=True,
      default=d.auto_break, dest="auto_break")
  add("-tc", "--top_cnt", "--top-cnt", type=int, default=d.top_cnt, dest="top_cnt")
  add("-go", "--goal", default=d.goal, help="tag in result file names")
  add("--seed", type=int, default=d.seed)
  add("--out", default=d.out, help="output folder (default results/)")
  add("--partition", choices=PARTITIONS, default=d.partition,
      help="partition of built-in data: dir (Dirichlet), pat (pathological), iid, exdir")
  add("--alpha", type=float, default=d.alpha, help="Dirichlet concentration")
  add("--class-per-client", type=int, default=d.class_per_client, dest="class_per_client")
  add("--balance", type=str2bool, nargs="?", const=True, default=d.balance)
  add("--train-ratio", type=float, default=d.train_ratio, dest="train_ratio")
  add("--executor", choices=EXECUTORS, default=d.executor)
  add("--chunk-size", type=int, default=d.chunk_size, dest="chunk_size")
  add("--unroll", type=int, default=None, help="local steps unrolled per loop iteration "
      "(0 = all; default: per backend)")
  add("--eval-chunk-size", type=int, default=d.eval_chunk_size, dest="eval_chunk_size")
  for flags, dest, kind, text in ALGORITHM_FLAGS:
    add(*flags, type=kind, default=None, dest=dest, help=text)
  add("--pfllib-compat", type=str2bool, nargs="?", const=True, default=d.pfllib_compat,
      dest="pfllib_compat", help="reproduce PFLlib's documented quirks where an algorithm "
      "offers it (e.g. FedCP's Gumbel noise at test time)")
  add("-nnc", "--num_new_clients", "--num-new-clients", type=int, default=d.num_new_clients,
      dest="num_new_clients", help="clients held out of training and evaluated after it "
      "(the data get num_clients + nnc clients)")
  add("-ften", "--fine_tuning_epoch_new", "--fine-tuning-epoch-new", type=int,
      default=d.fine_tuning_epoch_new, dest="fine_tuning_epoch_new",
      help="fine-tuning epochs of each new client before its test")
  add("--checkpoint-every", type=int, default=d.checkpoint_every, dest="checkpoint_every",
      help="save an Orbax checkpoint every k rounds under <out>/checkpoints (0: only when "
      "interrupted); a rerun with the same --out continues from the latest one")
  add("--keep-checkpoints", type=int, default=d.keep_checkpoints, dest="keep_checkpoints",
      help="checkpoints kept per run")
  add("--resume", type=str2bool, nargs="?", const=True, default=d.resume,
      help="require a checkpoint to continue from (a rerun resumes anyway when one exists)")
  add("--on-nan", choices=ON_NAN, default=d.on_nan, dest="on_nan",
      help="non-finite client update: stop the run, or skip-client (drop it and count it)")
  add("--config", metavar="FILE", help="JSON of Config fields (or a results JSON, to rerun its "
      "configuration); flags given on the command line override it")
  add("--algo-param", type=_algo_param, action="append", default=[], dest="algo_params",
      metavar="NAME=VALUE", help="algorithm hyperparameter (repeatable)")
  add("--partition-seed", type=int, default=d.partition_seed, dest="partition_seed",
      help="seed of the data partition (default: --seed); fixes the partition across seeds")
  add("--sweep", type=_sweep_item, nargs="+", action="extend", default=[], metavar="NAME=V,..",
      help="run every combination in one compiled program: seed=0,1,2 lr=0.01,0.005 and any "
      "numeric hyperparameter of the algorithm (mu=..., lam=...)")
  add("--devices", type=int, default=d.devices, help="shard the clients over this many "
      "devices (0: all; default 1)")
  add("--distributed", type=str2bool, nargs="?", const=True, default=d.distributed,
      help="multi-host: call jax.distributed.initialize() first (coordinator, process count "
      "and id from the environment or the cluster); only process 0 writes results")
  add("-dev", "--device", choices=("auto", "cpu", "cuda", "gpu", "tpu"), default="auto",
      help="JAX platform (default: JAX's choice)")
  add("--no-progress", action="store_false", dest="progress", help="no progress bar")
  return p


def config_from_args(args: argparse.Namespace) -> Config:
  values = {k: v for k, v in vars(args).items()
            if k not in ("device", "config") + _ALGO_DESTS}
  values["algo_params"] = dict(values["algo_params"])
  sweep = {}
  for name, items in values["sweep"]:
    if name in sweep:
      raise ConfigError(f"--sweep names {name} twice; give all its values in one item")
    sweep[name] = items
  values["sweep"] = sweep
  # PFLlib's algorithm flags, passed only when given (an algorithm refuses those it lacks).
  for name in _ALGO_DESTS:
    if getattr(args, name) is not None:
      values["algo_params"][name] = getattr(args, name)
  return Config(**values)


def load_config_file(path: str) -> dict:
  """Config fields from a JSON file: a dict of fields, or a results JSON (its ``config``).

  Raises:
    ConfigError: unreadable file, invalid JSON, not an object, or unknown fields.
  """
  try:
    with open(path, encoding="utf-8") as f:
      values = json.load(f)
  except OSError as e:
    raise ConfigError(f"cannot read config file {path!r}: {e.strerror or e}") from None
  except json.JSONDecodeError as e:
    raise ConfigError(f"config file {path!r} is not valid JSON ({e.msg} at line {e.lineno}); "
                      "give a JSON object of Config fields") from None
  if isinstance(values, dict) and isinstance(values.get("config"), dict):
    values = values["config"]  # a results file: rerun its configuration
  if not isinstance(values, dict):
    raise ConfigError(f"config file {path!r} holds a JSON {type(values).__name__}; give a JSON "
                      "object of Config fields")
  Config.from_dict(values)  # unknown fields → one-line error listing the accepted ones
  return values


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  """Parses ``argv``; ``--config FILE`` supplies defaults that explicit flags override."""
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--config")
  known, _ = pre.parse_known_args(argv)
  parser = build_parser()
  if known.config:
    values = load_config_file(known.config)
    if "algo_params" in values:
      params = values["algo_params"]
      if not isinstance(params, dict):
        raise ConfigError(f"config file {known.config!r}: algo_params={params!r} must be an "
                          "object of name: value")
      values["algo_params"] = list(params.items())
    if isinstance(values.get("sweep"), dict):
      values["sweep"] = list(values["sweep"].items())
    parser.set_defaults(**values)
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  try:
    args = _parse(argv)
  except FedJaxError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.device != "auto":
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_platforms", "cuda" if args.device == "gpu" else args.device)
  from fedjax_lib.runner import run_experiment  # pylint: disable=import-outside-toplevel
  try:
    config = config_from_args(args).validate()
    if config.distributed:
      from fedjax_lib.runner import initialize_distributed  # pylint: disable=import-outside-toplevel
      initialize_distributed()
    results = run_experiment(config)
  except FedJaxError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt as e:
    saved = getattr(e, "checkpoint", None)
    where = (f"saved {saved}; rerun the same command to continue" if saved
             else "nothing of the unfinished run was saved")
    print(f"interrupted; no results file of the unfinished run was written; {where}",
          file=sys.stderr)
    return 130
  from fedjax_lib.runner import is_writer  # pylint: disable=import-outside-toplevel
  if is_writer():
    for line in results.summary_lines():
      print(line)
  return 0


if __name__ == "__main__":
  sys.exit(main())
