"""Command line: PFLlib's flags (and readable long options) → Config → run_experiment.

    python -m fedjax_lib -data digits -m CNN -algo FedAvg -gr 100 -nc 20 -lr 0.005
    python -m fedjax_lib --dataset path/to/PFLlib/dataset/MNIST --algorithm Local --times 3

Bad input prints one line ``error: ...`` naming the value and what is accepted, and exits with
status 2 before anything is written.
"""

from __future__ import annotations

import argparse
import os
import re
import json
import sys
import textwrap
from typing import Callable, Optional, Sequence

from fedjax_lib import versions
from fedjax_lib.algorithms import algorithm_names, get_algorithm
from fedjax_lib.config import (CONV_IMPLS, DTYPES, EXECUTORS, ON_NAN, PARTITION_RNGS,
                               PARTITIONS, Config)
from fedjax_lib.data import registry as data_registry
from fedjax_lib.data.federated import SUMMARY_MARKERS
from fedjax_lib.data.loading import DEFAULT_NUM_CLIENTS
from fedjax_lib.errors import ConfigError, FedJaxError, PeerError, exit_out_of_memory
from fedjax_lib.models import FAMILIES, MODEL_NAMES

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
                 "lamda": "lam", "mart": "margin_threshold", "lrp": "p_learning_rate", "slr": "server_learning_rate",
                 "bt": "beta", "al": "algo_alpha", "glr": "generator_learning_rate",
                 "mlr": "mentee_learning_rate", "Ts": "energy_start", "Te": "energy_end", "et": "eta", "mo": "momentum", "klw": "kl_weight",
                 "alk": "alphaK", "sg": "sigma", "dlr": "dr_learning_rate",
                 "ca": "fedcross_alpha"}


# PFLlib's algorithm flags: (flags, hyperparameter name, type, help). Each is passed to the
# algorithm only when given; an algorithm refuses hyperparameters it does not take. --help adds
# the algorithms that take each one and its default, both read from the algorithm registry.
ALGORITHM_FLAGS = (
    (("-mu", "--mu"), "mu", float, "proximal coefficient; GCE/CoV weight decay in GPFL; "
     "generated-pair MSE weight in FedKTL; model-contrastive loss weight in MOON; weight of "
     "APPLE's proximal term ‖p_i − p_0‖²; final weight μ of FedPHP's inherited private model "
     "(μ·R/global_rounds)"),
    (("-lam", "--lamda", "--lam"), "lam", float, "regularisation weight λ (MMD in FedCP, "
     "alignment in GPFL, prototype MSE in FedProto and FedTGP, centroid MSE in FedKTL, "
     "soft-target cross-entropy in FD, the Moreau envelope's pull in pFedMe, the pull toward "
     "the attentive message in FedAMP (λ/α_K), MMD in FedPHP (1 − λ on cross-entropy), the "
     "server's correction step λ·lr on FedGC's heads, feature alignment in FedPAC)"),
    (("-bt", "--beta"), "beta", float,
     "meta step β (PerAvg); the shared model's cross-entropy weight β (FML); the server's "
     "step toward the uploads' average (pFedMe); not-true distillation weight (FedNTD); "
     "rounds ⌊β⌋ over which FedCAC's collaboration threshold rises to the largest overlap"),
    (("-al", "--algo_alpha", "--algo-alpha", "--fml_alpha", "--fml-alpha"), "alpha", float,
     "PFLlib's -al/--alpha (--alpha here is the Dirichlet partition's): the private model's "
     "cross-entropy weight α in FML (1 − α on its KL to the shared model); the "
     "regularisation α in FedDyn; the initial mixing weight α in APFL"),
    (("-sfd", "--sub_feature_dim", "--sub-feature-dim"), "sub_feature_dim", int,
     "feature width s of FedMRL's shared model (its head reads the first s fused features)"),
    (("-tau", "--tau"), "tau", float, "temperature τ of MOON's contrastive loss, of "
     "FedNTD's not-true distillation and of FedPCL's prototype-contrastive loss; calibration "
     "strength τ of FedLC; fraction τ of each tensor's critical parameters in FedCAC"),
    (("-K", "--K"), "K", int, "pFedMe's inner steps on the personalised model θ per batch"),
    (("-lrp", "--p_learning_rate", "--p-learning-rate"), "p_learning_rate", float,
     "pFedMe's inner step size on θ"),
    (("-pls", "--plocal_epochs", "--plocal-epochs"), "plocal_epochs", int,
     "personal-model / head epochs"),
    (("-et", "--eta"), "eta", float, "ALA weight learning rate"),
    (("-s", "--rand_percent", "--rand-percent"), "rand_percent", int,
     "percent of local data ALA learns its weights on"),
    (("-p", "--layer_idx", "--layer-idx"), "layer_idx", int,
     "ALA on the last p parameter tensors"),
    (("-mo", "--momentum"), "momentum", float, "running-mean momentum"),
    (("-klw", "--kl_weight", "--kl-weight"), "kl_weight", float, "mean-regularisation weight"),
    (("-fte", "--fine_tuning_epochs", "--fine-tuning-epochs"), "fine_tuning_epochs", int,
     "fine-tuning epochs after the last round"),
    (("-se", "--server_epochs", "--server-epochs"), "server_epochs", int,
     "server training epochs per round (FedGen: Adam steps on its generator, B labels each)"),
    (("-mart", "--margin_threshold", "--margin-threshold", "--margin_threthold"),
     "margin_threshold", float,
     "cap τ of the adaptive margin"),
    (("-slr", "--server_learning_rate", "--server-learning-rate"), "server_learning_rate",
     float, "server learning rate (FedKTL's feature transformer and centroids, FedGH's global "
     "head, FedL2G's guiding vectors)"),
    (("-sbs", "--server_batch_size", "--server-batch-size"), "server_batch_size", int,
     "server batch size"),
    (("-gbs", "--generation_batch_size", "--generation-batch-size", "--gen_batch_size"),
     "generation_batch_size", int, "images decoded per generator call"),
    (("-GPath", "--generator_path", "--generator-path"), "generator_path", str,
     "generator folder (python -m fedjax_lib.generators train ... --out DIR)"),
    (("-nd", "--noise_dim", "--noise-dim"), "noise_dim", int,
     "width of FedGen's uniform generator noise ε"),
    (("-glr", "--generator_learning_rate", "--generator-learning-rate"),
     "generator_learning_rate", float, "Adam step size of FedGen's server generator"),
    (("-hd", "--hidden_dim", "--hidden-dim"), "hidden_dim", int,
     "hidden width of FedGen's generator"),
    (("-mlr", "--mentee_learning_rate", "--mentee-learning-rate"), "mentee_learning_rate",
     float, "SGD learning rate of FedKD's shared mentee (the mentor and W_h use -lr)"),
    (("-Ts", "--T_start", "--T-start", "--energy_start", "--energy-start"), "energy_start",
     float, "singular-value energy FedKD's SVD compression keeps in round 0"),
    (("-Te", "--T_end", "--T-end", "--energy_end", "--energy-end"), "energy_end", float,
     "energy FedKD keeps from round -gr on (linear from -Ts)"),
    (("-mdb", "--meta_study_batches", "--meta-study-batches"), "meta_study_batches", int,
     "study batches of FedL2G's meta step (its loss before the differentiable SGD step)"),
    (("-mqb", "--meta_quiz_batches", "--meta-quiz-batches"), "meta_quiz_batches", int,
     "quiz batches of FedL2G's meta step; the quiz set is the first mqb·batch_size training "
     "samples, the rest is trained on"),
    (("-wu", "--warm_up_rounds", "--warmup-rounds", "--warmup_rounds"), "warmup_rounds", int,
     "FedL2G's first rounds with meta steps only (no local training)"),
    (("-M", "--M"), "M", int,
     "models each FedFomo client receives per round (the top M of its affinity row)"),
    (("-alk", "--alphaK"), "alphaK", float,
     "attention step α_K of FedAMP's messages (the pull toward them is λ/α_K)"),
    (("-sg", "--sigma"), "sigma", float,
     "scale σ of FedAMP's attention kernel exp(−‖w_c − w_j‖²/σ)/σ"),
    (("-dlr", "--dr_learning_rate", "--dr-learning-rate"), "dr_learning_rate", float,
     "SGD step size of APPLE's directed-relationship vectors p_i (0: p never changes)"),
    (("-L", "--L"), "L", float,
     "fraction of the rounds over which APPLE's proximal weight λ falls from 1 to 0 (cosine)"),
    (("-fsb", "--first_stage_bound", "--first-stage-bound"), "first_stage_bound", int,
     "FedCross's first rounds, in which every middleware model is reset to the global model"),
    (("-ca", "--fedcross_alpha", "--fedcross-alpha"), "fedcross_alpha", float,
     "weight α a FedCross middleware model keeps in cross-aggregation"),
    (("-cmss", "--collaberative_model_select_strategy",
      "--collaborative-model-select-strategy"), "collaberative_model_select_strategy", int,
     "FedCross's collaborator: 0 in order, 1 least similar, 2 most similar"),
    (("-lf", "--localize_feature_extractor", "--localize-feature-extractor"),
     "localize_feature_extractor", str2bool,
     "PFLlib's FedGen with bases kept on the clients, only heads sent (-lf, -lf True)"),
)
_ALGO_DESTS = tuple(dest for _, dest, _, _ in ALGORITHM_FLAGS)

# PFLlib flags that change nothing in PFLlib either, or nothing that exists here: (flags,
# dest, type, why). Accepted so that PFLlib's command lines run; each one given warns.
NO_EFFECT_FLAGS = (
    (("-itk", "--itk"), "itk", int, "FedMTL's -itk: PFLlib reads it only in a commented-out "
     "loop of its client"),
    (("-ts", "--time_select", "--time-select"), "time_select", str2bool,
     "PFLlib stores -ts and never reads it"),
)

# HtFLlib flags for what is not available here: (flags, dest, why). Each one given is a
# one-line error (an unknown flag would be misread: -prompt as -p rompt).
REFUSED_FLAGS = (
    (("-prompt", "--stable_diffusion_prompt"), "stable_diffusion_prompt",
     "the prompt of HtFLlib's FedKTL-stable-diffusion, whose PyTorch Stable Diffusion "
     "cannot run here; FedKTL takes a Flax generator folder with -GPath (python -m "
     "fedjax_lib.generators train ...), which has no prompt"),
)


def _refused(flag: str, why: str) -> Callable[[str], str]:
  """An argparse type that refuses every value: ``flag`` is ``why``."""
  def refuse(text: str) -> str:
    raise argparse.ArgumentTypeError(f"{flag} {text!r} is not available: {why}")
  return refuse


# PFLlib's straggler simulation: (flags, dest, type, PFLlib's default, help). Only the default
# is accepted: the simulation (sleeps, wall-clock thresholds) is not reproduced.
STRAGGLER_FLAGS = (
    (("-tsr", "--train_slow_rate", "--train-slow-rate"), "train_slow_rate", float, 0.0,
     "fraction of slow trainers (fewer epochs, sleeps); only 0"),
    (("-ssr", "--send_slow_rate", "--send-slow-rate"), "send_slow_rate", float, 0.0,
     "fraction of slow senders (sleeps); only 0"),
    (("-tth", "--time_threthold", "--time-threshold"), "time_threthold", float, 10000.0,
     "drop uploads whose mean wall-clock train + send time exceeds it (s); only 10000, "
     "which PFLlib's clients never reach"),
)
_CLI_ONLY = ({"device", "device_id", "config", "quiet", "list_datasets"}
             | {dest for _, dest, _, _ in NO_EFFECT_FLAGS}
             | {dest for _, dest, _ in REFUSED_FLAGS}
             | {dest for _, dest, _, _, _ in STRAGGLER_FLAGS})


def _arg_dest(name: str) -> str:
  """The argparse dest of algorithm hyperparameter ``name`` (``alpha`` is also a data flag)."""
  return f"algo_{name}"

# What an algorithm hyperparameter whose default is None stands for, as --help shows it.
_UNSET_HYPERPARAMETER = {"beta": "the learning rate", "generator_path": "required by FedKTL"}


def _format_default(value) -> str:
  return str(value).lower() if isinstance(value, bool) else str(value)


def default_text(action: argparse.Action) -> Optional[str]:
  """A flag's default as ``--help`` and the README's flag table show it; None for none.

  A flag whose value stays ``None`` unless given shows what that means (``-ncl``: "the
  data's"); a switch without a value and a repeatable flag show none.
  """
  shown = getattr(action, "shown_default", None)
  if shown is not None:
    return shown
  value = action.default
  if action.nargs == 0 or value is None or value is argparse.SUPPRESS or value == []:
    return None
  return _format_default(value)


def algorithm_flag_defaults(dest: str) -> tuple[list[str], Optional[str]]:
  """(algorithms that take hyperparameter ``dest``, its default as --help shows it).

  Read from the registry; one value when every taker agrees, else ``value (names), ...``.
  """
  takers: dict[str, list[str]] = {}  # default text -> algorithm names
  for name in algorithm_names():
    accepted = get_algorithm(name).hyperparameters()
    if dest in accepted:
      value = accepted[dest]
      text = _UNSET_HYPERPARAMETER.get(dest, "unset") if value is None else _format_default(value)
      takers.setdefault(text, []).append(name)
  names = [name for group in takers.values() for name in group]
  if len(takers) <= 1:
    return names, next(iter(takers), None)
  return names, ", ".join(f"{text} ({', '.join(group)})" for text, group in takers.items())


class _HelpFormatter(argparse.HelpFormatter):
  """Help listing a flag's spellings once before its value, with its default appended."""

  def _format_action_invocation(self, action: argparse.Action) -> str:
    if not action.option_strings or action.nargs == 0:
      return super()._format_action_invocation(action)
    value = self._format_args(action, self._get_default_metavar_for_optional(action))
    return f"{', '.join(action.option_strings)} {value}"

  def _split_lines(self, text: str, width: int) -> list[str]:
    # Never inside a hyphenated name (PFL-DA, FedL2G-feat): wrap at spaces only.
    return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width,
                         break_on_hyphens=False)

  def _get_help_string(self, action: argparse.Action) -> str:
    shown = default_text(action)
    if shown is None:
      return action.help or ""
    return f"{action.help or ''} (default: {shown.replace('%', '%%')})"


class _Parser(argparse.ArgumentParser):
  """An ArgumentParser whose errors are one line and exit with status 2."""

  def error(self, message: str):
    self.exit(2, f"error: {message} (see --help)\n")


def _add(group, *flags: str, shown_default: Optional[str] = None, **kwargs) -> None:
  """``group.add_argument``; ``shown_default`` is what a ``None`` default means in --help."""
  action = group.add_argument(*flags, **kwargs)
  action.shown_default = shown_default


def build_parser() -> argparse.ArgumentParser:
  """The command line: PFLlib's flags and readable long options, grouped, with defaults."""
  d = Config()
  p = _Parser(prog="python -m fedjax_lib", usage="%(prog)s [options]", allow_abbrev=False,
              formatter_class=_HelpFormatter,
              description="Simulate (personalized) federated learning with PFLlib's flags. "
              "A first run: python -m fedjax_lib -gr 50 (FedAvg on the bundled digits, 20 "
              "clients).")
  boolean = dict(type=str2bool, nargs="?", const=True, metavar="BOOL")
  _add(p, "--config", metavar="FILE", help="JSON of Config fields (or a results JSON, to rerun "
       "its configuration); flags given on the command line override it")

  data = p.add_argument_group("data")
  _add(data, "-data", "--dataset", default=d.dataset,
       help=f"a dataset name ({', '.join(data_registry.names())}; case-insensitive, PFLlib's "
       "spellings too; --list-datasets describes them) or a PFLlib dataset folder "
       "(config.json, train/<id>.npz, test/<id>.npz)")
  _add(data, "--data-dir", "--data_dir", default=d.data_dir, dest="data_dir",
       shown_default="$TFDS_DATA_DIR or ~/tensorflow_datasets",
       help="tfds data directory; converted arrays are cached in <data-dir>/fedjax_arrays")
  _add(data, "--list-datasets", action="store_true", default=False, dest="list_datasets",
       help="list every dataset name (modality, shape, classes, scenario, source, whether "
       "cached) and exit")
  _add(data, "-nc", "--num_clients", "--num-clients", type=int, default=None, dest="num_clients",
       shown_default=f"{DEFAULT_NUM_CLIENTS} for built-in data, else the folder's",
       help="number of clients")
  _add(data, "-ncl", "--num_classes", "--num-classes", type=int, default=None,
       dest="num_classes", shown_default="the data's",
       help="number of classes; must match the data when given")
  _add(data, "--partition", choices=PARTITIONS, default=d.partition,
       help="how built-in data is split over clients: dir (Dirichlet), pat (pathological), "
       "iid, exdir (extended Dirichlet)")
  _add(data, "--alpha", type=float, default=d.alpha,
       help="Dirichlet concentration of dir and exdir (smaller: more label skew)")
  _add(data, "--class-per-client", type=int, default=d.class_per_client,
       dest="class_per_client", help="labels per client in pat and exdir")
  _add(data, "--balance", default=d.balance, **boolean,
       help="equal client sizes in iid and pat")
  _add(data, "--train-ratio", type=float, default=d.train_ratio, dest="train_ratio",
       help="fraction of each client's samples it trains on; the rest is its test split")
  _add(data, "-fs", "--few_shot", "--few-shot", type=int, default=d.few_shot, dest="few_shot",
       help="keep the first k training samples of each class per client (HtFLlib's "
       "few-shot setting; 0: all)")
  _add(data, "--partition-seed", type=int, default=d.partition_seed, dest="partition_seed",
       shown_default="--seed", help="seed of the data partition alone (fixes the clients "
       "across seeds; 0 to 4294967295)")
  _add(data, "--partition-rng", choices=PARTITION_RNGS, default=d.partition_rng,
       dest="partition_rng", help="numpy (Generator) or pfllib: numpy's legacy stream in "
       "PFLlib's call order (with --partition-seed 1, PFLlib's generate_*.py clients)")
  _add(data, "--rebalance", default=d.rebalance, **boolean,
       help="dir/exdir: when no draw gives every client the minimum size, move random "
       "samples from the largest clients to the short ones instead of failing")

  model = p.add_argument_group("model")
  _add(model, "-m", "--model", "--model_family", default=d.model,
       help=f"architecture, one of {', '.join(MODEL_NAMES)} (case-insensitive; cnn is PFLlib's "
       "FedAvgCNN), or a comma-separated list (cnn,dnn): client i uses model i mod K, or an "
       f"HtFLlib model family: {', '.join(FAMILIES)}"),
  _add(model, "-fd", "--feature_dim", "--feature-dim", type=int, default=d.feature_dim,
       dest="feature_dim", shown_default="512 with several models, else the model's own",
       help="pool every model's features to this width (HtFLlib's -fd)")
  _add(model, "-vs", "--vocab_size", "--vocab-size", type=int, default=d.vocab_size,
       dest="vocab_size", shown_default="the dataset's (ag_news 32000), else 80",
       help="vocabulary of the text models (token ids must lie below it)")
  _add(model, "-ml", "--max_len", "--max-len", type=int, default=d.max_len, dest="max_len",
       shown_default="the data's", help="token sequence length of the text models; must "
       "match the data")
  _add(model, "--dtype", choices=DTYPES, default=d.dtype,
       help="computation dtype of local training and evaluation: float32, or bfloat16 for "
       "mixed precision (float32 parameters, bfloat16 convolutions/matmuls)")
  _add(model, "--conv-impl", choices=CONV_IMPLS, default=d.conv_impl, dest="conv_impl",
       help="how convolutions are computed, in the models that offer it (cnn, digit5cnn, "
       "harcnn*, textcnn): auto (the backend's), lax (XLA's convolutions), patches, slices "
       "(im2col + matmul), hybrid (XLA's forward, im2col's gradient)")

  algorithm = p.add_argument_group(
      "algorithm", "Hyperparameter flags are passed only when given; an algorithm refuses one "
      "it does not take.")
  _add(algorithm, "-algo", "--algorithm", default=d.algorithm,
       help=f"one of {', '.join(algorithm_names())} (case-insensitive)")
  for flags, dest, kind, text in ALGORITHM_FLAGS:
    names, shown = algorithm_flag_defaults(dest)
    form = boolean if kind is str2bool else dict(type=kind)
    _add(algorithm, *flags, **form, default=None, dest=_arg_dest(dest), shown_default=shown,
         help=f"{text}; taken by {', '.join(names) or 'no algorithm'}")
  _add(algorithm, "--algo-param", type=_algo_param, action="append", default=[],
       dest="algo_params", metavar="NAME=VALUE",
       help="any other algorithm hyperparameter (repeatable)")
  _add(algorithm, "--pfllib-compat", default=d.pfllib_compat, dest="pfllib_compat", **boolean,
       help="reproduce PFLlib's / HtFLlib's documented quirks where an algorithm offers it "
       "(FedCP's Gumbel noise at test time, FD's raw-logit targets, FedKTL's and FedMRL's "
       "projector reset, FML's undetached peers, FedGen's untrained generator, FedKD's "
       "compressed parameters and per-slice SVD, SCAFFOLD's and FedDyn's int(N·jr) divisor, "
       "SCAFFOLD's undecayed control divisor under -ld, "
       "FedDyn's unsquared norm, FedLC's global counts, FedNTD's unweighted mean, APFL's "
       "CE(v) and final mix, pFedMe's evaluation of the global model, FedAMP's client (its "
       "own model, an unsquared regulariser without gradient: Local), FedPHP's evaluation of "
       "the locally trained model, FedPCL's training gate, FedPAC's permuted head "
       "combination, FedFomo's per-batch validation mean and [-0:] split, APPLE's uploaded "
       "mixture, uniform p start, per-tensor-mean p gradient and λ lag, FedCAC's round 0, "
       "FedCross's evaluation, round index and similarity) and in the models (fasttext, textlr, "
       "textcnn, lstm, gru, dnn and mlr emit log_softmax of their hidden representation as "
       "features where the reference wraps them in BaseHeadSplit: PFLlib's FedAvg, FedPer, "
       "FedRep, ... and every heterogeneous run)")

  training = p.add_argument_group("training")
  _add(training, "-gr", "--global_rounds", "--global-rounds", type=int,
       default=d.global_rounds, dest="global_rounds",
       help=f"rounds after round 0 (the loop runs gr+1 times); PFLlib's {d.global_rounds} take "
       "~50 min on digits on a 2-core CPU: try -gr 50 first")
  _add(training, "-ls", "--local_epochs", "--local-epochs", type=int, default=d.local_epochs,
       dest="local_epochs", help="local epochs per round")
  _add(training, "-lbs", "--batch_size", "--batch-size", type=int, default=d.batch_size,
       dest="batch_size", help="local batch size (the last incomplete batch is dropped)")
  _add(training, "--shuffle", default=d.shuffle, **boolean,
       help="reshuffle each client's training samples every epoch (PFLlib's loader); "
       "--shuffle false keeps the clients' own sample order every epoch (HtFLlib's loader)")
  _add(training, "-lr", "--local_learning_rate", "--learning-rate", type=float,
       default=d.learning_rate, dest="learning_rate", help="local SGD learning rate")
  _add(training, "-jr", "--join_ratio", "--join-ratio", type=float, default=d.join_ratio,
       dest="join_ratio", help="fraction of the clients selected per round")
  _add(training, "-rjr", "--random_join_ratio", "--random-join-ratio",
       default=d.random_join_ratio, dest="random_join_ratio", **boolean,
       help="select a uniform count in [int(N·jr), N] each round")
  _add(training, "-cdr", "--client_drop_rate", "--client-drop-rate", type=float,
       default=d.client_drop_rate, dest="client_drop_rate",
       help="fraction of the selected clients whose update is dropped")
  _add(training, "-ld", "--learning_rate_decay", "--learning-rate-decay",
       default=d.learning_rate_decay, dest="learning_rate_decay", **boolean,
       help="decay each client's learning rate(s) by -ldg every round it trains (PFLlib's "
       "ExponentialLR, stepped once per local training; which rates decay follows PFLlib, "
       "per algorithm)")
  _add(training, "-ldg", "--learning_rate_decay_gamma", "--learning-rate-decay-gamma",
       type=float, default=d.learning_rate_decay_gamma, dest="learning_rate_decay_gamma",
       help="decay factor γ of -ld: a client's (k+1)-th training uses lr·γ^k")
  _add(training, "-t", "--times", type=int, default=d.times,
       help="repetitions, with seeds seed, seed+1, ... on one partition")
  _add(training, "-pv", "--prev", type=int, default=d.prev,
       help="first repetition to run: runs prev .. times-1 (seed seed+t, files ..._t), to "
       "continue a series")
  _add(training, "--seed", type=int, default=d.seed,
       help="seed of the partition and of run 0 (0 to 4294967295)")
  _add(training, "--sweep", type=_sweep_item, nargs="+", action="extend", default=[],
       metavar="NAME=V,..", help="run every combination side by side: seed=0,1,2 "
       "lr=0.01,0.005 and any numeric hyperparameter of the algorithm (mu=..., lam=...)")
  _add(training, "-ab", "--auto_break", "--auto-break", default=d.auto_break,
       dest="auto_break", **boolean,
       help="stop when the best accuracy is more than -tc evaluations old")
  _add(training, "-tc", "--top_cnt", "--top-cnt", type=int, default=d.top_cnt, dest="top_cnt",
       help="patience of -ab, in evaluations")
  _add(training, "--on-nan", choices=ON_NAN, default=d.on_nan, dest="on_nan",
       help="non-finite client update: stop the run, or skip-client (drop it and count it)")

  privacy = p.add_argument_group(
      "differential privacy", "DP-SGD in every client's local training, with an RDP "
      "accountant's ε per evaluated round (see the README's \"Differential privacy\").")
  _add(privacy, "-dp", "--privacy", default=d.privacy, dest="privacy", **boolean,
       help="train with DP-SGD: per-example clipping and Gaussian noise; refused by algorithms "
       "that upload anything else computed from client data")
  _add(privacy, "-dps", "--dp_sigma", "--dp-sigma", type=float, default=d.dp_sigma,
       dest="dp_sigma", help="noise multiplier σ: the noise's standard deviation is σ·C "
       "(0: clipping only, ε = ∞)")
  _add(privacy, "--dp-clip", type=float, default=d.dp_clip, dest="dp_clip",
       help="per-example L2 clipping norm C over the whole trained tree")
  _add(privacy, "--dp-delta", type=float, default=d.dp_delta, dest="dp_delta",
       help="δ of the reported (ε, δ)")

  leakage = p.add_argument_group(
      "DLG privacy evaluation", "Deep Leakage from Gradients against the clients' uploads, "
      "with the reconstructions' PSNR (see the README's \"DLG privacy evaluation\").")
  _add(leakage, "-dlg", "--dlg_eval", "--dlg-eval", default=d.dlg_eval, dest="dlg_eval",
       **boolean, help="every -dlgg rounds, reconstruct each aggregated client's first -bnpc "
       "training batches from its model delta and report their PSNR (higher: more leakage); "
       "algorithms that upload their whole model only")
  _add(leakage, "-dlgg", "--dlg_gap", "--dlg-gap", type=int, default=d.dlg_gap,
       dest="dlg_gap", help="attack every dlgg rounds, from round 0")
  _add(leakage, "-bnpc", "--batch_num_per_client", "--batch-num-per-client", type=int,
       default=d.batch_num_per_client, dest="batch_num_per_client",
       help="training batches attacked per client")

  evaluation = p.add_argument_group("evaluation")
  _add(evaluation, "-eg", "--eval_gap", "--eval-gap", type=int, default=d.eval_gap,
       dest="eval_gap", help="evaluate every eg rounds")
  _add(evaluation, "-nnc", "--num_new_clients", "--num-new-clients", type=int,
       default=d.num_new_clients, dest="num_new_clients", help="clients held out of training "
       "and evaluated after it (the data get num_clients + nnc clients)")
  _add(evaluation, "-ften", "--fine_tuning_epoch_new", "--fine-tuning-epoch-new", type=int,
       default=d.fine_tuning_epoch_new, dest="fine_tuning_epoch_new",
       help="fine-tuning epochs of each new client before its test")

  output = p.add_argument_group("output and checkpoints")
  _add(output, "--out", default=d.out, help="output folder")
  _add(output, "-go", "--goal", default=d.goal, help="tag in result file names")
  _add(output, "-sfn", "--save_folder_name", "--save-folder-name", default=d.save_folder_name,
       dest="save_folder_name", metavar="DIR", shown_default="none",
       help="HtFLlib's -sfn: after the run write every client's model to "
       "DIR/<dataset>/<algorithm>/ (algorithms whose clients keep their own model; a name "
       "containing 'temp', HtFLlib's deleted folder, writes nothing)")
  _add(output, "-mfn", "--models_folder_name", "--models-folder-name",
       default=d.models_folder_name, dest="models_folder_name", metavar="DIR",
       shown_default="none", help="HtFLlib's -mfn: start every client from its model in DIR "
       "(a folder -sfn wrote, e.g. by Local: pre-trained models) instead of a fresh "
       "initialisation")
  _add(output, "--checkpoint-every", type=int, default=d.checkpoint_every,
       dest="checkpoint_every", help="save an Orbax checkpoint every k rounds under "
       "<out>/checkpoints (0: only when interrupted); a rerun with the same --out continues "
       "from the latest one")
  _add(output, "--keep-checkpoints", type=int, default=d.keep_checkpoints,
       dest="keep_checkpoints", help="checkpoints kept per run")
  _add(output, "--resume", default=d.resume, **boolean,
       help="require a checkpoint to continue from (a rerun resumes anyway when one exists)")
  _add(output, "--overwrite", action="store_true", default=d.overwrite,
       help="replace results files and checkpoints of a different config in --out (without "
       "it, such a run is refused naming the file and the fields that differ)")
  _add(output, "--no-plot", action="store_false", dest="plot",
       help="write no PNG of the curves (skips matplotlib)")
  _add(output, "--no-progress", action="store_false", dest="progress", help="no progress bar")
  _add(output, "-q", "--quiet", action="store_true", default=False,
       help="print only warnings, errors and the final summary")

  execution = p.add_argument_group("execution")
  _add(execution, "--executor", choices=EXECUTORS, default=d.executor,
       help="how the selected clients are trained: auto (sequential on CPU, vmap on "
       "accelerators), vmap, chunked (lax.map), sequential (a loop over one compiled program)")
  _add(execution, "--chunk-size", type=int, default=d.chunk_size, dest="chunk_size",
       help="clients per lax.map step of the chunked executor")
  _add(execution, "--unroll", type=int, default=d.unroll, shown_default="per backend",
       help="local steps unrolled per loop iteration of the scan loop (0: all)")
  _add(execution, "--local-loop", choices=("valid", "scan"), default=d.local_loop,
       dest="local_loop", shown_default="per backend",
       help="valid: each client runs only its own steps (CPU default); scan: every client "
       "runs the largest client's step count, masked (accelerator default)")
  _add(execution, "--client-threads", type=int, default=d.client_threads,
       dest="client_threads", shown_default="per backend",
       help="clients the sequential executor trains at once, each on a host thread (CPU "
       "default 2 with two cores or more; 1 for a client program that calls LAPACK, as "
       "FedKD's; the same results to the bit)")
  _add(execution, "--eval-chunk-size", type=int, default=d.eval_chunk_size,
       dest="eval_chunk_size", help="clients evaluated per lax.map step")
  _add(execution, "--devices", type=int, default=d.devices,
       help="shard the clients over this many devices (0: all)")
  _add(execution, "--distributed", default=d.distributed, **boolean,
       help="multi-host: call jax.distributed.initialize() first (coordinator, process count "
       "and id from the environment or the cluster); only process 0 writes results")
  _add(execution, "--compile-cache", nargs="?", const="auto", default=d.compile_cache,
       dest="compile_cache", metavar="DIR", shown_default="off",
       help="keep the compiled programs in DIR (without DIR: ~/.cache/fedjax_lib/xla) so that "
       "a later run compiling the same ones loads them: the same results, seconds sooner")
  _add(execution, "-dev", "--device", choices=("auto", "cpu", "cuda", "gpu", "tpu"),
       default="auto", help="JAX platform (auto: JAX's choice)")
  _add(execution, "-did", "--device_id", "--device-id", default=None, dest="device_id",
       shown_default="every device", help="the GPUs to use, as CUDA_VISIBLE_DEVICES lists "
       "them (0 or 0,1,2,3); with several, --devices 0 shards the clients over all of them")

  compat = p.add_argument_group(
      "PFLlib flags without effect here", "Accepted so that PFLlib's command lines run; each "
      "one given prints a warning.")
  for flags, dest, kind, text in NO_EFFECT_FLAGS:
    _add(compat, *flags, type=kind, default=None, dest=dest, help=text)
  refused = p.add_argument_group(
      "HtFLlib flags for what is not available here", "Each one given is an error naming "
      "what to use instead.")
  for flags, dest, text in REFUSED_FLAGS:
    _add(refused, *flags, type=_refused(flags[0], text), default=None, dest=dest, help=text)
  simulated = p.add_argument_group(
      "PFLlib's wall-clock straggler simulation", "Not simulated here (PFLlib sleeps and "
      "measures wall-clock time); accepted only at PFLlib's defaults.")
  for flags, dest, kind, default, text in STRAGGLER_FLAGS:
    _add(simulated, *flags, type=kind, default=default, dest=dest, help=text)
  return p


def config_from_args(args: argparse.Namespace) -> Config:
  values = {k: v for k, v in vars(args).items()
            if k not in _CLI_ONLY
            and k not in {_arg_dest(name) for name in _ALGO_DESTS}}
  values["algo_params"] = dict(values["algo_params"])
  sweep = {}
  for name, items in values["sweep"]:
    if name in sweep:
      raise ConfigError(f"--sweep names {name} twice; give all its values in one item")
    sweep[name] = items
  values["sweep"] = sweep
  # PFLlib's algorithm flags, passed only when given (an algorithm refuses those it lacks).
  for name in _ALGO_DESTS:
    if getattr(args, _arg_dest(name)) is not None:
      values["algo_params"][name] = getattr(args, _arg_dest(name))
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
  elif isinstance(values, dict) and SUMMARY_MARKERS <= values.keys():
    raise ConfigError(f"config file {path!r} is a run's partition description (per-client "
                      "sample counts), not a configuration; give that run's results JSON "
                      "(<dataset>_<algo>_<goal>_<t>.json) or a JSON object of Config fields")
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


def one_blas_thread() -> None:
  """OpenBLAS on one thread unless ``OPENBLAS_NUM_THREADS`` is set: scipy's, which jaxlib's
  LAPACK kernels (SVD, eigh, solve, ...) call and which loads at the first such call, through
  the environment; numpy's, loaded already, through threadpoolctl. Its threads compete with
  XLA's own for the cores: on an idle 2-core machine FedKD (an SVD per client per round) ran
  3.17–3.20 s per round with one against 3.96–4.22 s with OpenBLAS's default two, the same
  accuracy to the bit; FedAvg and Ditto unchanged within noise
  (experiments/benchmarks/RESULTS.md, 2026-12-07). The command line's process only: the
  Python API leaves a user's process as it is."""
  if os.environ.get("OPENBLAS_NUM_THREADS"):
    return
  os.environ["OPENBLAS_NUM_THREADS"] = "1"
  import threadpoolctl  # pylint: disable=import-outside-toplevel  (scikit-learn's dependency)
  threadpoolctl.threadpool_limits(1, user_api="blas")


def _select_devices(args: argparse.Namespace) -> Optional[str]:
  """Applies ``-dev`` and ``-did`` before JAX starts its backends; returns the one-line
  problem with them (or with PFLlib's straggler flags), else None."""
  for flags, dest, _, default, text in STRAGGLER_FLAGS:
    value = getattr(args, dest)
    if value != default:
      return (f"{flags[0]} {value:g}: PFLlib's straggler simulation is not reproduced here "
              f"(it sleeps and thresholds wall-clock time); accepted: {default:g}, PFLlib's "
              f"default ({text})")
  if args.device == "auto" and args.device_id is None:
    return None
  import jax  # pylint: disable=import-outside-toplevel
  if args.device_id is not None:
    ids = args.device_id.strip()
    if not re.fullmatch(r"\d+(,\d+)*", ids):
      return (f"-did {args.device_id!r} is not a list of device ids; accepted: "
              "comma-separated integers such as 0 or 0,1,2,3 (as CUDA_VISIBLE_DEVICES)")
    jax.config.update("jax_cuda_visible_devices", ids)
    jax.config.update("jax_rocm_visible_devices", ids)
  if args.device != "auto":
    jax.config.update("jax_platforms", "cuda" if args.device == "gpu" else args.device)
  try:
    devices = jax.devices()
  except Exception as e:  # pylint: disable=broad-except
    reason = (str(e).strip().splitlines() or ["no device of it is visible"])[0]
    return (f"-dev {args.device}: JAX cannot start this platform here ({reason}); accepted: "
            "auto, cpu, or a platform whose JAX plugin and devices this machine has")
  wanted = {"cuda": "gpu", "gpu": "gpu"}.get(args.device, args.device)
  if args.device != "auto" and devices[0].platform != wanted:  # JAX had started already
    return (f"-dev {args.device}: JAX cannot start this platform here (JAX already runs on "
            f"{devices[0].platform} in this process); accepted: auto or "
            f"{devices[0].platform}")
  if args.device_id is not None and devices[0].platform in ("gpu", "cuda", "rocm"):
    wanted = len(args.device_id.split(","))
    if len(devices) != wanted:
      return (f"-did {args.device_id}: JAX sees {len(devices)} GPU(s) of the {wanted} "
              "named; accepted: ids of GPUs this machine has")
  return None


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the command line; returns the exit status (0, 2 for bad input, 130 when stopped).

  The run's report (header, warnings, round lines, summary) goes to stdout; ``error:`` lines,
  stop notices and the progress bar go to stderr.
  """
  problem = versions.problem()
  if problem:
    print(f"error: {problem}", file=sys.stderr)
    return 2
  try:
    args = _parse(argv)
  except FedJaxError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.list_datasets:
    print(data_registry.format_table(data_registry.list_datasets(args.data_dir), args.data_dir))
    return 0
  one_blas_thread()
  problem = _select_devices(args)
  if problem:
    print(f"error: {problem}", file=sys.stderr)
    return 2
  for flags, dest, _, text in NO_EFFECT_FLAGS:
    if getattr(args, dest) is not None:
      print(f"warning: {flags[0]} {getattr(args, dest)} has no effect: {text}", flush=True)
  from fedjax_lib import runner  # pylint: disable=import-outside-toplevel
  quiet = args.quiet
  try:
    config = config_from_args(args).validate()
    if config.distributed:
      runner.initialize_distributed()
    log = None
    if quiet:
      config = config.replace(progress=False)
      log = lambda line: print(line, flush=True) if line.startswith("warning:") else None
    results = runner.run_experiment(config, log=log)
  except FedJaxError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except PeerError as e:  # another process of a --distributed run failed: its output says why
    print(f"error: {e}", file=sys.stderr)
    return 1
  except (MemoryError, RuntimeError) as e:  # (JAX's runtime errors are RuntimeErrors)
    return exit_out_of_memory(e, "use fewer clients (-nc, -jr), a smaller model, batch (-lbs) "
                              "or --eval-chunk-size, or --executor sequential")
  except KeyboardInterrupt as e:
    if isinstance(e, runner.Interrupted):
      more = "; rerun the same command to continue" if e.checkpoint else ""
      print(f"stopped: {e}{more}", file=sys.stderr)
    else:
      print("stopped: nothing since the last checkpoint was saved; no results file of the "
            "unfinished run was written", file=sys.stderr)
    return 130
  if runner.is_writer():
    for line in results.summary_lines():
      print(line)
  return 0


def console() -> None:
  """The ``fedjax`` command: the signal handlers first (see `fedjax_lib.stopping`)."""
  from fedjax_lib.stopping import STOPPER  # pylint: disable=import-outside-toplevel
  STOPPER.install(exit_now=True)
  sys.exit(STOPPER.finish(main()))


if __name__ == "__main__":
  sys.exit(main())
