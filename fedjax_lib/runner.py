"""`run_experiment(config) -> Results`: the whole experiment, as the CLI runs it.

Data are loaded and partitioned once and moved to the device once; `build` makes the models
(one per architecture of ``config.model``), the algorithm and the engine; `run_loop` — the one
run loop — advances every run side by side: the ``times`` repetitions (run ``t`` uses seed
``config.seed + t`` for the model initialisation and every random event; the partition is drawn
from ``partition_seed``, by default ``config.seed``) or every sweep combination
(`fedjax_lib.sweep`). Results files are written when the runs finish.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lib import algorithms as algorithms_lib
from fedjax_lib import checks as checks_lib
from fedjax_lib import client_models as client_models_lib
from fedjax_lib import compile_cache as compile_cache_lib
from fedjax_lib import data as data_lib
from fedjax_lib import dlg as dlg_lib
from fedjax_lib import memory as memory_lib
from fedjax_lib import models as models_lib
from fedjax_lib.algorithms.base import (abstract_variables, has_hook, reference_splits,
                                        supports_train_mode)
from fedjax_lib import output as output_lib
from fedjax_lib import privacy as privacy_lib
from fedjax_lib import results as results_lib
from fedjax_lib import sweep as sweep_lib
from fedjax_lib.config import Config
from fedjax_lib.core import checkpoint as checkpoint_lib
from fedjax_lib.core import engine as engine_lib
from fedjax_lib.core import rng
from fedjax_lib.core.local import LocalSpec
from fedjax_lib.data import registry as data_registry
from fedjax_lib.data.loading import default_num_clients, is_folder_path
from fedjax_lib import stopping
from fedjax_lib.errors import ConfigError, FedJaxError, FedJaxWarning, PeerError
from fedjax_lib.stopping import STOPPER, Interrupted  # pylint: disable=unused-import

DEFAULT_FEATURE_DIM = 512  # HtFLlib's -fd
HISTORY_KEYS = ("test_acc", "test_auc", "test_acc_std", "test_auc_std", "train_loss")
#: Per evaluated round of a run with ``privacy``: the worst-off client's ε spent before it.
EPSILON_KEY = "epsilon"
#: With ``dlg_eval``: the attacked rounds and the mean PSNR of each (`fedjax_lib.dlg`).
DLG_KEYS = ("dlg_rounds", "dlg_psnr")
#: Per trained round: what the aggregated clients uploaded and every client downloaded.
TRAFFIC_KEYS = ("upload_floats", "download_floats", "upload_bytes", "download_bytes")


def traffic_summary(history: dict) -> dict:
  """Total and per-round mean of each of :data:`TRAFFIC_KEYS` over the trained rounds."""
  out = {}
  for key in TRAFFIC_KEYS:
    values = np.asarray(history.get(key, []), np.float64)
    out[f"total_{key}"] = float(values.sum())
    out[f"mean_{key}"] = float(values.mean()) if values.size else 0.0
  return out


def _amount(floats: float) -> str:
  """``1.03M`` floats, readable."""
  for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if floats >= scale:
      return f"{floats / scale:.3g}{unit}"
  return f"{floats:.0f}"


def describe_traffic(summary: dict) -> str:
  """One line: floats (bytes) up and down per round, and in total."""
  mib = lambda b: f"{b / 2**20:.3g} MiB"
  return (f"communication per round: {_amount(summary['mean_upload_floats'])} floats up "
          f"({mib(summary['mean_upload_bytes'])}), {_amount(summary['mean_download_floats'])} "
          f"down ({mib(summary['mean_download_bytes'])}); total "
          f"{_amount(summary['total_upload_floats'])} up, "
          f"{_amount(summary['total_download_floats'])} down")


@dataclasses.dataclass
class RunResult:
  """One repetition: its seed, per-round history and where its files went."""
  seed: int
  history: dict
  best_test_acc: float
  last_test_acc: float
  mean_round_time_s: float
  total_time_s: float
  files: dict
  privacy: Optional[dict] = None  # with ``privacy``: `fedjax_lib.privacy.Accountant.summary`
  # rounds left out of ``mean_round_time_s``: the first of each process (they compile)
  warmup_rounds: list = dataclasses.field(default_factory=lambda: [0])

  @property
  def dlg_psnr(self) -> list:
    """``[(round, mean PSNR)]`` of the DLG attacks (empty without ``dlg_eval``)."""
    return list(zip(self.history.get("dlg_rounds", []), self.history.get("dlg_psnr", [])))

  @property
  def traffic(self) -> dict:
    """``total_`` and ``mean_`` (per trained round) of each of :data:`TRAFFIC_KEYS`."""
    return traffic_summary(self.history)


@dataclasses.dataclass
class Results:
  """All repetitions of an experiment, with PFLlib's mean ± std summary."""
  config: Config
  runs: list
  out_dir: str
  partition_file: str
  warnings: list = dataclasses.field(default_factory=list)

  def _stat(self, key: str) -> tuple[float, float]:
    values = np.array([getattr(r, key) for r in self.runs], np.float64)
    return float(values.mean()), float(values.std())

  @property
  def best_test_acc(self) -> tuple[float, float]:
    """Mean and std over runs of each run's best accuracy (PFLlib's reported number)."""
    return self._stat("best_test_acc")

  @property
  def last_test_acc(self) -> tuple[float, float]:
    return self._stat("last_test_acc")

  @property
  def mean_round_time_s(self) -> float:
    return self._stat("mean_round_time_s")[0]

  @property
  def total_time_s(self) -> float:
    return float(sum(r.total_time_s for r in self.runs))

  def summary_lines(self) -> list[str]:
    best, best_std = self.best_test_acc
    last, last_std = self.last_test_acc
    n = len(self.runs)
    first = f" (run {self.config.prev})" if n > 1 else ""
    privacy = [privacy_lib.describe(self.runs[0].privacy, self.config.dp_clip)
               + first] if self.runs[0].privacy else []
    attacks = self.runs[0].dlg_psnr  # the DLG evaluation, also a privacy line
    privacy += [dlg_lib.summary_line(attacks) + first] if attacks else []
    return [
        f"best test accuracy: {best:.4f} ± {best_std:.4f} (mean ± std over {n} run(s))",
        f"last test accuracy: {last:.4f} ± {last_std:.4f}",
        *privacy,
        f"mean time per round: {self.mean_round_time_s:.3f} s "
        f"({results_lib.warmup_note(self.runs)}); total time: {self.total_time_s:.1f} s",
        describe_traffic(self.runs[0].traffic) + first,
        f"results in: {self.out_dir}",
    ]


def dataset_tag(dataset: str) -> str:
  """The dataset's name in results file names (a folder's base name)."""
  return os.path.basename(os.path.normpath(dataset)) if is_folder_path(dataset) else dataset


def algorithm_params(config: Config) -> dict:
  """``config.algo_params`` plus ``pfllib_compat``, ``global_rounds``, ``join_ratio`` and
  ``eval_gap`` for the algorithms that take them: the run's own settings (`Config` refuses
  the ``config.RUN_SETTINGS`` in ``algo_params``), and ``global_rounds`` unless
  ``algo_params`` fixes a schedule's length."""
  params = dict(config.algo_params)
  accepted = algorithms_lib.get_algorithm(config.algorithm).hyperparameters()
  if config.pfllib_compat and "pfllib_compat" in accepted:
    params["pfllib_compat"] = True
  if "global_rounds" in accepted:  # FedKD's energy schedule runs over the whole run
    params.setdefault("global_rounds", config.global_rounds)
  if "join_ratio" in accepted:  # SCAFFOLD's / FedDyn's / FedNTD's PFLlib divisor int(N·jr)
    params["join_ratio"] = config.join_ratio
  if "eval_gap" in accepted:  # pFedMe's compat: PFLlib's evaluation rounds touch its clients
    params["eval_gap"] = config.eval_gap
  return params


@dataclasses.dataclass
class Built:
  """What `build` makes of a config: data, models by architecture, algorithm and engine."""
  data: Any
  models: dict
  algorithm: Any
  engine: engine_lib.Engine
  architectures: tuple  # the -m list: client i uses architectures[i mod K]
  warnings: tuple = ()  # one-line warnings about settings that waste work (fedjax_lib.checks)
  privacy: Optional[privacy_lib.Plan] = None  # private steps per client, with config.privacy
  dlg: Optional[dlg_lib.Evaluator] = None  # the DLG attack, with config.dlg_eval

  def _legacy(self):  # (data, model of the first architecture, algorithm, engine)
    return (self.data, self.models[self.architectures[0]], self.algorithm, self.engine)

  def __iter__(self):
    return iter(self._legacy())

  def __getitem__(self, index):
    return self._legacy()[index]


def feature_dim_of(config: Config, architectures: tuple) -> Optional[int]:
  """The common feature width: ``config.feature_dim``, or HtFLlib's 512 when clients use
  several architectures (none — each model's own width — for one architecture)."""
  if config.feature_dim is not None:
    return config.feature_dim
  return DEFAULT_FEATURE_DIM if len(set(architectures)) > 1 else None


def log_softmax_quirk(config: Config) -> bool:
  """Whether ``--pfllib-compat`` gives the models their references' log-softmax features:
  when the reference runs the model split into base and head (`reference_splits`: PFLlib's
  main.py for FedAvg, FedPer, MOON, ..., and HtFLlib, which splits for every algorithm, so
  every heterogeneous run); a whole model ending in ``log_softmax`` is raw logits (FedProx,
  Ditto, SCAFFOLD, ...)."""
  if not config.pfllib_compat:
    return False
  heterogeneous = len(set(models_lib.dataset_architectures(config.model, config.dataset))) > 1
  return heterogeneous or reference_splits(algorithms_lib.get_algorithm(config.algorithm))


def model_options(config: Config, arch: str) -> dict:
  """The options the runner gives model ``arch``: the text models' ``vocab_size`` (``-vs``,
  else the dataset's, else PFLlib's 80) and, with ``--pfllib-compat`` where the reference
  splits the model (:func:`log_softmax_quirk`), the references' log-softmax features of
  fasttext, textlr, textcnn, lstm and gru (`fedjax_lib.models.text`), and ``--conv-impl`` to
  the models that take ``conv_impl``."""
  names = models_lib.model_option_names(arch)
  options = {}
  if config.conv_impl != "auto" and "conv_impl" in names:
    options["conv_impl"] = config.conv_impl
  if "log_softmax_features" in names and log_softmax_quirk(config):
    options["log_softmax_features"] = True
  if "vocab_size" not in names:
    return options
  spec = data_registry.resolve(config.dataset) if not is_folder_path(config.dataset) else None
  vocab = config.vocab_size or (spec.vocab_size if spec is not None else None)
  return options if vocab is None else {**options, "vocab_size": vocab}


def load_data(config: Config):
  """The run's `FederatedData`: ``num_clients`` + ``num_new_clients`` clients of a built-in
  dataset partitioned as ``config`` says (or a PFLlib folder's), few-shot applied."""
  new = config.num_new_clients
  if config.num_clients is not None:
    total_clients = config.num_clients + new
  else:  # None: a folder's clients, one per domain, a natural split's
    default = default_num_clients(config.dataset)
    total_clients = None if default is None else default + new
  data = data_lib.load_federated(
      config.dataset, num_clients=total_clients, num_classes=config.num_classes,
      scheme=config.partition, alpha=config.alpha, class_per_client=config.class_per_client,
      balance=config.balance, train_ratio=config.train_ratio, batch_size=config.batch_size,
      seed=config.seed if config.partition_seed is None else config.partition_seed,
      pfllib_rng=config.partition_rng == "pfllib", rebalance=config.rebalance,
      data_dir=config.data_dir)
  return data.few_shot(config.few_shot) if config.few_shot else data


@contextlib.contextmanager
def collected_warnings():
  """Collects the `FedJaxWarning` messages raised inside the block into the yielded list (the
  run reports them as its ``warning:`` lines), each once; other warnings pass on as usual."""
  lines: list[str] = []
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", FedJaxWarning)
    yield lines
  for w in caught:
    if issubclass(w.category, FedJaxWarning):
      if str(w.message) not in lines:
        lines.append(str(w.message))
    else:
      warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def build(config: Config) -> Built:
  """Validates ``config`` and builds the data, models, algorithm and engine.

  With ``num_new_clients`` = M the data hold N + M clients; the engine trains and evaluates
  the first N and keeps the last M for new-client evaluation. With several architectures
  (``model="cnn,dnn"``) client i uses architecture i mod K, each architecture is one group of
  the engine, and groups whose uploads differ are refused here, before anything is written.
  """
  config.validate()
  new = config.num_new_clients
  with collected_warnings() as data_warnings:
    data = load_data(config)
  num_clients = data.num_clients - new
  if num_clients < 1:
    raise ConfigError(f"num_new_clients={new} leaves no training clients: the dataset has "
                      f"{data.num_clients} clients; use num_new_clients < {data.num_clients}")
  config.check_participation(num_clients)
  largest = int(data.train_count.max())
  steps_per_epoch = largest // config.batch_size
  if steps_per_epoch < 1:
    raise ConfigError(f"batch_size={config.batch_size} is larger than every client's training "
                      f"set (the largest has {largest} samples); use batch_size <= {largest}")
  architectures = models_lib.dataset_architectures(config.model, config.dataset)
  unique = tuple(dict.fromkeys(architectures))
  takes = lambda arch: "conv_impl" in models_lib.model_option_names(arch)
  if config.conv_impl != "auto" and not any(map(takes, unique)):
    offer = ", ".join(filter(takes, models_lib.MODEL_NAMES))
    raise ConfigError(f"conv_impl={config.conv_impl!r} applies to the models {offer}; "
                      f"{' and '.join(unique)} {'has' if len(unique) == 1 else 'have'} no "
                      "choice of convolution (leave --conv-impl at auto)")
  feature_dim = feature_dim_of(config, architectures)
  models = {arch: models_lib.make_model(arch, data.sample_shape, data.num_classes,
                                        dtype=config.dtype, feature_dim=feature_dim,
                                        **model_options(config, arch))
            for arch in unique}
  backend = jax.default_backend()
  algorithm = make_algorithm(config, data, models[unique[0]])
  check_train_mode(algorithm, models)
  if new and not algorithm.supports_new_clients:
    unsupported = [n for n in algorithms_lib.algorithm_names()
                   if not has_hook(algorithms_lib.get_algorithm(n), "new_client_variables")]
    raise ConfigError(f"algorithm {algorithm.name} does not support new-client evaluation "
                      f"(num_new_clients={new}, -nnc); use -nnc 0 (new clients are not "
                      f"evaluated by {', '.join(unsupported)}: each one's docstring says why)")
  mesh = make_mesh(config.devices)
  executor = config.executor
  if executor == "auto":
    executor = engine_lib.default_executor(backend) if mesh is None else "vmap"
  elif executor == "sequential" and mesh is not None:
    raise ConfigError(f"executor='sequential' runs on one device but devices={config.devices} "
                      "shards the clients; use --executor vmap or chunked")
  threads = config.client_threads
  if threads is not None and threads > 1 and executor != "sequential":
    raise ConfigError(f"client_threads={threads} applies to the sequential executor, but the "
                      f"executor is {executor!r}; leave --client-threads out or use "
                      "--executor sequential")
  participation = engine_lib.Participation(
      num_clients=num_clients, join_ratio=config.join_ratio,
      random_join_ratio=config.random_join_ratio, client_drop_rate=config.client_drop_rate)
  groups = [engine_lib.Group(arch, dataclasses.replace(algorithm, model=models[arch]),
                             tuple(i for i in range(num_clients)
                                   if architectures[i % len(architectures)] == arch))
            for arch in unique]
  groups = [g for g in groups if g.ids]
  if len(groups) < len(unique):
    raise ConfigError(f"model={config.model!r} lists {len(architectures)} architectures but "
                      f"there are only {num_clients} clients; give at most {num_clients}")
  engine = engine_lib.Engine(groups, engine_lib.DeviceData.from_federated(data),
                             participation, executor=executor, chunk_size=config.chunk_size,
                             eval_chunk_size=config.eval_chunk_size,
                             skip_nonfinite=config.on_nan == "skip-client", mesh=mesh,
                             model_cycle=[unique.index(a) for a in architectures],
                             client_threads=threads)
  # The settings first: check_compatible traces every group's client_update as configured
  # (with -dp, per example), which an algorithm the settings refuse may not survive.
  settings_warnings = [*data_warnings,
                       *checks_lib.check_settings(config, data, num_clients, algorithm, models)]
  engine.check_compatible(data.x[0])
  privacy = (privacy_lib.plan(engine, np.asarray(data.train_count), config) if config.privacy
             else None)
  dlg = (dlg_lib.Evaluator(engine, config, *dlg_lib.data_range(data.x)) if config.dlg_eval
         else None)
  if config.models_folder_name:
    engine.initial_models = initial_client_models(config, engine)
  return Built(data, models, algorithm, engine, architectures,
               warnings=tuple(settings_warnings), privacy=privacy, dlg=dlg)


def check_train_mode(algorithm, models: dict) -> None:
  """Refuses models with BatchNorm or dropout for an algorithm that would train them in
  evaluation mode (see `fedjax_lib.algorithms.base`)."""
  if supports_train_mode(algorithm):
    return
  needing = [arch for arch, model in models.items() if models_lib.has_train_mode(model)]
  if not needing:
    return
  takers = [n for n in algorithms_lib.algorithm_names()
            if supports_train_mode(algorithms_lib.get_algorithm(n))]
  free = [n for n in models_lib.MODEL_NAMES if not models_lib.architecture_has_train_mode(n)]
  raise ConfigError(
      f"algorithm {algorithm.name} cannot train model {needing[0]}: it has BatchNorm or "
      "dropout layers, whose training mode (batch statistics, running statistics kept per "
      f"client, dropout keys) only {', '.join(takers)} implement so far; use one of them, or "
      f"a model without BatchNorm or dropout ({', '.join(free)})")


def make_algorithm(config: Config, data, model):
  """The configured algorithm for the architecture ``model`` (local-training spec from
  ``config`` and the data's sizes; an algorithm with a shared model gets the family's global
  model where the family names one, see `fedjax_lib.models.family_global_model`)."""
  steps_per_epoch = int(data.train_count.max()) // config.batch_size
  num_steps = steps_per_epoch * config.local_epochs
  unroll = config.unroll if config.unroll is not None else engine_lib.default_unroll(
      jax.default_backend(), num_steps)
  loop = config.local_loop or engine_lib.default_local_loop(jax.default_backend())
  private = ({"dp_clip": float(config.dp_clip), "dp_sigma": float(config.dp_sigma)}
             if config.privacy else {})
  local = LocalSpec(learning_rate=float(config.learning_rate), batch_size=config.batch_size,
                    shuffle=config.shuffle,
                    local_epochs=config.local_epochs, steps_per_epoch=steps_per_epoch,
                    unroll=unroll, loop=loop, **private)
  params = algorithm_params(config)
  global_arch = models_lib.family_global_model(config.model)
  fields = {f.name for f in dataclasses.fields(algorithms_lib.get_algorithm(config.algorithm))}
  if global_arch is None or "shared_model" not in fields:
    return algorithms_lib.make_algorithm(config.algorithm, model, local, params)
  if "sub_feature_dim" in fields:
    # FedMRL re-pools the shared model's features to -sfd and reads them with a dense head
    # (Linear(s, C)); HtFLlib crashes here (its Head([512]) gets s features), so the family's
    # global base gets FedMRL's own head.
    global_arch = global_arch.split("+")[0]
  # The family's own global model (HtFLlib's args.global_model) is the shared model: the
  # algorithm made with it derives its shared model from it, which replacing the model keeps.
  architectures = models_lib.dataset_architectures(config.model, config.dataset)
  global_model = models_lib.make_model(global_arch, data.sample_shape, data.num_classes,
                                       dtype=config.dtype,
                                       feature_dim=feature_dim_of(config, architectures),
                                       **model_options(config, global_arch))
  return dataclasses.replace(
      algorithms_lib.make_algorithm(config.algorithm, global_model, local, params), model=model)


def make_mesh(devices: int):
  """The ``clients`` mesh for ``devices`` (0 = all), or None for one device."""
  available = jax.device_count()
  count = available if devices == 0 else devices
  if count > available:
    raise ConfigError(f"devices={devices} but {available} {jax.default_backend()} device(s) are "
                      f"available; use 0 (all) or 1..{available}")
  return engine_lib.client_mesh(count) if count > 1 else None


def initialize_distributed() -> None:
  """``jax.distributed.initialize()`` for one process per host, before any computation.

  The coordinator comes from ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0) and the
  process count and index from ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` when set; otherwise
  JAX detects them on SLURM, Open MPI, Kubernetes and Cloud TPU. CPU processes exchange
  collectives over gloo.

  Raises:
    ConfigError: the environment does not describe a cluster, or the coordinator cannot be
      reached.
  """
  kwargs = {}
  for var, name in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
    if os.environ.get(var):
      try:
        kwargs[name] = int(os.environ[var])
      except ValueError:
        raise ConfigError(f"{var}={os.environ[var]!r} is not an integer") from None
  previous = jax.config.jax_cpu_collectives_implementation
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(**kwargs)
    STOPPER.shared = jax.process_count() > 1  # a first signal: stop with the others
    STOPPER.reclaim()  # SIGTERM: JAX's preemption notifier took it over, and ignores it
  except (RuntimeError, ValueError) as e:
    jax.config.update("jax_cpu_collectives_implementation", previous)
    raise ConfigError(
        f"--distributed: jax.distributed.initialize() failed ({str(e).splitlines()[0][:200]}); "
        "set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID on every "
        "host, or launch under SLURM / Open MPI") from None


def is_writer() -> bool:
  """Only process 0 writes results files (every process runs the same program)."""
  return jax.process_index() == 0


def _progress(iterable, enabled: bool, desc: str):
  if not enabled:
    return iterable
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(iterable, desc=desc, dynamic_ncols=True, file=sys.stderr)


def _writer(bar, log: Callable[[str], None]) -> Callable[[str], None]:
  """``log`` that first clears the progress bar (on stderr) and redraws it after."""
  if not hasattr(bar, "external_write_mode"):
    return log

  def write(line: str) -> None:
    with bar.external_write_mode():
      log(line)
  return write


def _record(history: dict, metrics: dict, r: int) -> None:
  """Appends one evaluation's metrics (all views) to the history lists."""
  history["rounds"].append(r)
  for k, v in metrics.items():
    if k in HISTORY_KEYS or k == EPSILON_KEY or k.startswith(("test_acc_", "test_auc_")) \
        and not k.endswith("_std"):
      history.setdefault(k, []).append(v)


def _describe(metrics: dict) -> str:
  views = "".join(f" | {k[len('test_acc_'):]} {v:.4f}" for k, v in metrics.items()
                  if k.startswith("test_acc_") and k != "test_acc_std")
  privacy = f" | ε {metrics[EPSILON_KEY]:.3g}" if EPSILON_KEY in metrics else ""
  return (f"test_acc {metrics['test_acc']:.4f} ± {metrics['test_acc_std']:.4f}{views}"
          f" | test_auc {metrics['test_auc']:.4f} | train_loss {metrics['train_loss']:.4f}"
          f"{privacy}")


def checkpoint_dir(config: Config, base: str, t: int) -> str:
  return os.path.join(os.path.abspath(config.out), "checkpoints", f"{base}_{t}")


@dataclasses.dataclass
class RunSpec:
  """One of the S runs the loop advances side by side (a repetition or a sweep combination).

  ``hparams`` are the swept hyperparameter values of this run (``{path: value}``, empty when
  nothing is swept); ``config`` is the run's own config (a sweep combination's).
  """
  index: int
  seed: int
  config: Config
  name: str
  label: str
  checkpoint: str
  hparams: dict = dataclasses.field(default_factory=dict)
  combo: Optional[dict] = None
  number: Optional[int] = None  # the repetition's number t (``-pv``: from prev); else index

  @property
  def run_number(self) -> int:
    return self.index if self.number is None else self.number


class _Run:
  """The loop's bookkeeping of one run: history, timings, best, stop reason, checkpoints."""

  def __init__(self, spec: RunSpec, keep: int):
    self.spec = spec
    self.root = rng.root_key(spec.seed)
    self.history = {k: [] for k in ("rounds",) + HISTORY_KEYS}
    self.history["nonfinite_clients"] = []
    self.history.update({k: [] for k in TRAFFIC_KEYS})
    self.train_times: list = []
    self.eval_times: list = []
    # Rounds whose time includes compiling the programs: the first round each process runs
    # (round 0, and the first round after each resume); the mean round time leaves them out.
    self.warmup_rounds: list = []
    self.start_round = 0
    self.last_round = -1
    self.stop: Optional[str] = None
    self.finite = True
    self.done = False
    self.saved_step: Optional[int] = None
    self.last_ckpt: Optional[str] = None
    self.keep = keep
    self.checkpointer = None
    self.extra: dict = {}
    # {client id: (architecture, variables)} after the last round, for -sfn (None: not kept)
    self.client_models: Optional[dict] = None
    self.best, self.best_at = -1.0, 0
    self.accountant: Optional[privacy_lib.Accountant] = None
    # -ld: how many times each client has trained (PFLlib's scheduler steps), else None.
    self.trained: Optional[np.ndarray] = None

  def open_checkpointer(self):
    if self.checkpointer is None:
      self.checkpointer = checkpoint_lib.RunCheckpointer(self.spec.checkpoint, self.keep)
    return self.checkpointer

  def resume(self, meta: dict, step: int) -> None:
    self.history = meta["history"]
    for key in TRAFFIC_KEYS:  # checkpoints written before traffic was logged
      self.history.setdefault(key, [])
    self.train_times, self.eval_times = meta["train_times"], meta["eval_times"]
    self.warmup_rounds = list(meta.get("warmup_rounds", [0]))  # older checkpoints: round 0
    self.start_round = self.saved_step = step
    self.last_round = step - 1
    self.last_ckpt = self.open_checkpointer().path(step)
    if self.accountant is not None:
      self.accountant.load(meta.get("dp_steps"))
    if self.trained is not None:
      self.trained = np.asarray(meta["lr_decay_steps"], np.int64)
    for i, acc in enumerate(self.history["test_acc"]):
      if acc > self.best:
        self.best, self.best_at = acc, i

  def record(self, metrics: dict, r: int, config: Config) -> None:
    _record(self.history, metrics, r)
    if metrics["test_acc"] > self.best:
      self.best, self.best_at = metrics["test_acc"], len(self.history["test_acc"]) - 1
    if not np.isfinite(metrics["train_loss"]):
      self.stop, self.finite = f"round {r}: the train loss is not finite; stopping this run", False
    elif config.auto_break and len(self.history["test_acc"]) - 1 - self.best_at > config.top_cnt:
      self.stop = f"auto-break at round {r}: no improvement in {config.top_cnt} evaluations"

  def with_epsilon(self, metrics: dict) -> dict:
    """``metrics`` plus the privacy spent so far (a run with ``privacy``)."""
    if self.accountant is None:
      return metrics
    return {**metrics, EPSILON_KEY: self.accountant.epsilon()}

  def meta(self) -> dict:
    meta = {"config": self.spec.config.to_dict(), "seed": self.spec.seed,
            "history": self.history, "train_times": self.train_times,
            "eval_times": self.eval_times, "warmup_rounds": self.warmup_rounds}
    if self.accountant is not None:
      meta["dp_steps"] = self.accountant.state()
    if self.trained is not None:
      meta["lr_decay_steps"] = self.trained.tolist()
    return meta

  def lr_decay(self, gamma: float, r: int) -> Optional[dict]:
    """Round ``r``'s ``-ld`` factors (`fedjax_lib.core.engine.LR_DECAY`): γ^k for a client
    that has trained k times (the padding id's last, 1) and γ^r for the server; None
    without ``-ld``."""
    if self.trained is None:
      return None
    client = np.append(np.power(gamma, self.trained.astype(np.float64)), 1.0)
    return {"client": jnp.asarray(client, jnp.float32),
            "server": jnp.asarray(gamma ** r, jnp.float32)}

  def count_trained(self, selected) -> None:
    """Adds one training to each client in ``selected`` (ids; -1 is ignored)."""
    if self.trained is not None:
      ids = np.asarray(selected, np.int64)
      np.add.at(self.trained, ids[ids >= 0], 1)


def _check_resumable(spec: RunSpec, resume: bool, overwrite: bool) -> str:
  """What to do with the run's checkpoints, checked before anything is written.

  Returns ``"continue"`` (a checkpoint of the same config: the run continues from it),
  ``"none"`` (no readable checkpoint) or ``"replace"`` (a different config's checkpoints,
  removed once every check has passed, with ``overwrite``).

  Raises:
    ConfigError: a checkpoint of a different config without ``overwrite`` (or with
      ``resume``), or ``resume`` without a checkpoint.
  """
  directory = spec.checkpoint
  if not os.path.isdir(directory):
    if resume:
      raise ConfigError(f"resume=True but there is no checkpoint in {directory}; run without "
                        "--resume to start afresh")
    return "none"
  checkpointer = checkpoint_lib.RunCheckpointer(directory)
  meta = checkpointer.latest_meta()
  if meta is None and resume and not checkpointer.steps():
    # e.g. a run that diverged before its first checkpoint left the folder empty
    raise ConfigError(f"resume=True but there is no checkpoint in {directory} (its run saved "
                      "none); run without --resume to start afresh")
  if meta is None:  # none readable: restore_latest says which (and refuses with ``resume``)
    return "none"
  diff = spec.config.resume_mismatch(meta.get("config", {}))
  if not diff:
    return "continue"
  if overwrite and not resume:
    return "replace"
  raise ConfigError(f"the checkpoint in {directory} was written with a different config "
                    f"({'; '.join(diff)}); use --overwrite to start afresh, or another --out")


class _States:
  """The S runs' states: stacked on a leading axis (one program for all) or one per run."""

  def __init__(self, engine, specs: list, sample_x):
    self.engine = engine
    self.stacked = runs_stacked(engine, specs)
    roots = [rng.root_key(s.seed) for s in specs]
    if self.stacked:
      self.programs = engine.stacked()
      self.hparams = {k: jnp.asarray([s.hparams[k] for s in specs], jnp.float32)
                      for k in specs[0].hparams}
      self.roots = jnp.stack(roots)
      self.server, self.clients = self.programs.init(self.hparams, self.roots, sample_x)
    else:
      self.hparams = [{k: jnp.float32(v) for k, v in s.hparams.items()} for s in specs]
      self.roots = roots
      self.states = [engine.init(root, sample_x, hparams=hp)
                     for root, hp in zip(roots, self.hparams)]

  def get(self, s: int):
    """Run ``s``'s ``(server_state, client_states)`` as checkpointed (real clients only)."""
    if self.stacked:
      return jax.tree.map(lambda a: a[s], (self.server, self.clients))
    server, clients = self.states[s]
    return server, self.engine.export_states(clients)

  def set(self, s: int, server_state, client_states) -> None:
    """Replaces run ``s``'s states with restored ones (real clients only)."""
    if self.stacked:
      put = lambda a, b: a.at[s].set(b)
      self.server = jax.tree.map(put, self.server, server_state)
      self.clients = jax.tree.map(put, self.clients, client_states)
    else:
      self.states[s] = self.engine.place(server_state, client_states)

  def evaluate(self, runs: list, r: Optional[int] = None,
               final: bool = False) -> tuple[list, dict]:
    """Metrics of every run in ``runs`` (None for others, or without a final evaluation),
    and the seconds each took (stacked runs: each is charged the whole evaluation). The
    evaluation keys are of round ``r``, or of each run's last round when ``r`` is None."""
    wanted = [run.spec.index for run in runs]
    rounds = {run.spec.index: run.last_round if r is None else r for run in runs}
    if self.stacked:
      t0 = time.perf_counter()
      per_run = [rounds.get(s, 0) for s in range(len(self.roots))]
      out = self.programs.evaluate(self.hparams, self.server, self.clients, self.roots,
                                   np.asarray(per_run, np.int32), final=final)
      seconds = time.perf_counter() - t0
      return ([None if out is None or s not in wanted else out[s]
               for s in range(len(self.roots))], {s: seconds for s in wanted})
    out, seconds = [None] * len(self.states), {}
    for s in wanted:
      t0 = time.perf_counter()
      out[s] = self.engine.evaluate(*self.states[s], self.roots[s], rounds[s], final=final,
                                    hparams=self.hparams[s])
      seconds[s] = time.perf_counter() - t0
    return out, seconds

  def train(self, runs: list, r: int, decay: Optional[dict] = None) -> tuple[list, dict]:
    """One round of every run in ``runs``: each run's round metrics (None for others) and
    seconds (stacked runs: each is charged the whole round). Stacked runs not in ``runs``
    keep their states unchanged. ``decay``: each run's ``-ld`` factors (`_Run.lr_decay`)."""
    wanted = [run.spec.index for run in runs]
    if self.stacked:
      t0 = time.perf_counter()
      running = np.array([s in wanted for s in range(len(self.roots))])
      hparams = self.hparams
      if decay:
        ones = jax.tree.map(jnp.ones_like, next(iter(decay.values())))
        hparams = {**hparams, engine_lib.LR_DECAY: jax.tree.map(
            lambda *xs: jnp.stack(xs),
            *[decay.get(s, ones) for s in range(len(self.roots))])}
      self.server, self.clients, metrics = self.programs.run_round(
          hparams, self.server, self.clients, self.roots, r, running)
      jax.block_until_ready((self.server, self.clients))
      seconds = time.perf_counter() - t0
      metrics = jax.device_get(metrics)
      return ([jax.tree.map(lambda a, s=s: a[s], metrics) if s in wanted else None
               for s in range(len(self.roots))], {s: seconds for s in wanted})
    out, seconds = [None] * len(self.states), {}
    for s in wanted:
      t0 = time.perf_counter()
      hparams = self.hparams[s]
      if decay:
        hparams = {**hparams, engine_lib.LR_DECAY: decay[s]}
      server, clients, metrics = self.engine.run_round(*self.states[s], self.roots[s], r,
                                                       hparams=hparams)
      jax.block_until_ready((server, clients))
      seconds[s] = time.perf_counter() - t0
      self.states[s] = (server, clients)
      out[s] = jax.device_get(metrics)
    return out, seconds

  def hparams_of(self, s: int) -> dict:
    """Run ``s``'s swept hyperparameter values ``{path: scalar}`` (empty: none swept)."""
    return {k: v[s] for k, v in self.hparams.items()} if self.stacked else self.hparams[s]

  def new_clients(self, s: int, sample_x, epochs: int) -> dict:
    server, _ = self.get(s) if self.stacked else self.states[s]
    return self.engine.evaluate_new_clients(server, self.roots[s], sample_x, epochs,
                                            hparams=self.hparams_of(s))


def schedule_change(saved: dict, config: Config) -> Optional[str]:
  """What extending a run changes, for an algorithm that schedules over ``global_rounds``
  (APPLE's λ, FedKD's energy, FedPHP's μ; the runner fills it, `algorithm_params`): the
  rounds before the checkpoint followed the schedule over the saved run's rounds, those after
  follow it over ``config.global_rounds``, so the run is not the one an uninterrupted run of
  as many rounds gives. None otherwise (``saved``: the checkpoint's config)."""
  algorithm = algorithms_lib.get_algorithm(config.algorithm)
  before = saved.get("global_rounds")
  if ("global_rounds" not in algorithm.hyperparameters() or before is None
      or before == config.global_rounds or "global_rounds" in config.algo_params):
    return None
  return (f"{algorithm.name} schedules over global_rounds, which changes from {before} to "
          f"{config.global_rounds}: the rounds already run followed its schedule over "
          f"{before} rounds and the rest follow it over {config.global_rounds}, so the results "
          f"differ from an uninterrupted run of {config.global_rounds} rounds")


def run_loop(engine, specs: list, config: Config, log: Callable[[str], None],
             privacy: Optional[privacy_lib.Plan] = None,
             dlg: Optional[dlg_lib.Evaluator] = None) -> list:
  """Advances the runs ``specs`` side by side, round by round: the one run loop.

  A plain run is S = 1; ``-t`` repetitions and sweep combinations are S > 1. With the vmap or
  chunked executor on one device the S runs are stacked on a leading axis of one compiled
  program; otherwise (sequential executor, several devices) each round runs them one after
  another with the same compiled programs. Per run: evaluation every ``eval_gap`` rounds,
  auto-break, the non-finite guard, checkpoints, resume, the last round's training, the final
  evaluation (FedBABU) and new-client evaluation — written once, here.

  With ``privacy`` (the plan of `fedjax_lib.privacy`) each run has an accountant fed with
  every round's selected clients; every evaluation records the ε spent before it (history
  ``epsilon``) and the run's ``extra["privacy"]`` the ε after its last round.

  With ``dlg`` (`fedjax_lib.dlg.Evaluator`), every round it is due the states before the
  round are kept, and after the round each run's aggregated clients are attacked; the round
  and the mean PSNR go to the history (``dlg_rounds``, ``dlg_psnr``) and to one log line. The
  attack's time is not part of the round's time.

  Stop requests (`fedjax_lib.stopping.STOPPER`) are honoured at the loop's safe points: before
  every round, before the final and the new-client evaluations and before returning; every
  run with rounds since its last checkpoint is then saved and `Interrupted` is raised.

  Returns one ``_Run`` per spec (history, timings, stop reason and extra results).

  Raises:
    ConfigError: ``config.resume`` and no checkpoint of a run can be read; a checkpoint
      cannot be written (the file system's error, as one line).
    Interrupted: SIGINT/SIGTERM; its ``checkpoint`` names what was saved.
  """
  sample_x = engine.data.x[0]
  states = _States(engine, specs, sample_x)
  runs = [_Run(spec, config.keep_checkpoints) for spec in specs]
  many = len(runs) > 1
  if privacy is not None:
    for run in runs:
      run.accountant = privacy_lib.Accountant(privacy)
      run.accountant.start()
  if config.learning_rate_decay:
    for run in runs:
      run.trained = np.full(engine.num_clients, engine.algorithm.LR_DECAY_START, np.int64)
  for s, run in enumerate(runs):
    if os.path.isdir(run.spec.checkpoint) or config.checkpoint_every:
      restored = run.open_checkpointer().restore_latest(
          *states.get(s), required=config.resume, warn=lambda line: log(f"warning: {line}"))
      if restored is not None:
        step, server_state, client_states, meta = restored
        states.set(s, server_state, client_states)
        run.resume(meta, step)
        log(f"{run.spec.label}: resuming at round {step} from {run.last_ckpt}")
        schedule = schedule_change(meta.get("config", {}), config)
        if schedule:
          log(f"warning: {run.spec.label}: {schedule}")

  def save(run: _Run, next_round: int) -> str:
    run.saved_step = next_round
    run.last_ckpt = run.open_checkpointer().save(next_round, *states.get(run.spec.index),
                                                 run.meta())
    return run.last_ckpt

  def unsaved() -> list:
    return [run for run in runs
            if run.finite and run.last_round >= 0 and run.saved_step != run.last_round + 1]

  def note_progress() -> None:
    if unsaved():
      STOPPER.progress(f"round {max(run.last_round for run in runs)}")
    else:
      STOPPER.saved("every run is saved up to its last round, so nothing is lost" if any(
          run.last_round >= 0 for run in runs) else stopping.NOTHING_YET)

  def stop_if_requested(where: str) -> None:
    requested = agreed_stop(STOPPER.requested)
    if requested is None:
      return
    saved = [save(run, run.last_round + 1) for run in unsaved()]
    note_progress()
    what = saved[0] if len(saved) == 1 else (
        f"{len(saved)} checkpoints under {os.path.dirname(saved[0])}" if saved else None)
    raise Interrupted(f"{requested} {where}" + (f": saved {what}" if what else ""), what)

  note_progress()
  start_round = min(run.start_round for run in runs)
  for run in runs:  # this process compiles in its first round
    if run.start_round == start_round <= config.global_rounds:
      run.warmup_rounds.append(start_round)
  bar = _progress(range(start_round, config.global_rounds + 1), config.progress,
                  _bar_label(config, runs))
  write = _writer(bar, log)
  start = time.perf_counter()
  first_evaluated = engine.algorithm.first_evaluated_round()
  for r in bar:
    live = [run for run in runs if not run.done and run.start_round <= r]
    stop_if_requested(f"at round {r}")
    if not live:
      if all(run.done for run in runs):
        break
      continue
    eval_time, train_time = {}, {}
    if r % config.eval_gap == 0 and r >= first_evaluated:
      metrics, eval_time = states.evaluate(live, r)
      for run in live:
        m = run.with_epsilon(metrics[run.spec.index])
        run.record(m, r, config)
        prefix = f"{run.spec.label} | " if many else ""
        write(f"{prefix}round {r:4d} | {_describe(m)}")
      if config.progress and not many:
        m = metrics[live[0].spec.index]
        bar.set_postfix(acc=f"{m['test_acc']:.4f}", loss=f"{m['train_loss']:.4f}")
    training = [run for run in live if run.stop is None]
    if training:
      snapshots = {}
      if dlg is not None and dlg.due(r):  # before the round donates its input states
        snapshots = {run.spec.index: dlg.snapshot(*states.get(run.spec.index), run.root, r,
                                                  states.hparams_of(run.spec.index))
                     for run in training}
      decay = {run.spec.index: run.lr_decay(config.learning_rate_decay_gamma, r)
               for run in training} if config.learning_rate_decay else None
      with collected_warnings() as notices:  # once per process: the LAPACK check, round 1
        round_metrics, train_time = states.train(training, r, decay)
      for line in notices:
        write(f"warning: {line}")
      for run in training:
        if run.accountant is not None:
          run.accountant.record_round(round_metrics[run.spec.index]["selected"])
        run.count_trained(round_metrics[run.spec.index]["selected"])
      for run in training:
        bad = sorted(int(c) for c in np.asarray(round_metrics[run.spec.index]["nonfinite"])
                     if c >= 0)
        run.history["nonfinite_clients"].append(len(bad))
        for key in TRAFFIC_KEYS:
          run.history[key].append(float(round_metrics[run.spec.index][key]))
        if bad and config.on_nan == "skip-client":
          write(f"{run.spec.label}: round {r}: skipped the non-finite update(s) of "
                f"client(s) {bad}")
        elif bad:
          run.finite = False
          none = ("none: it diverged before the first" if config.checkpoint_every
                  else "none; use --checkpoint-every")
          run.stop = (f"round {r}: non-finite update(s) from client(s) {bad}; stopping this "
                      f"run (last finite checkpoint: {run.last_ckpt or none}; "
                      f"{engine.algorithm.divergence_advice()}, or --on-nan skip-client to "
                      "drop such updates)")
      for run in training:
        if run.spec.index in snapshots and run.finite:
          attack = dlg.attack(snapshots[run.spec.index])
          for key, value in zip(DLG_KEYS, (r, attack["psnr"])):
            run.history.setdefault(key, []).append(value)
          write(f"{run.spec.label + ' | ' if many else ''}round {r:4d} | "
                f"{dlg_lib.describe(attack)}")
    if training and config.plot and has_hook(engine.algorithm, "generated_images"):
      for run in training:
        write_generated(run, states, engine.algorithm, config)
    for run in live:
      run.train_times.append(train_time.get(run.spec.index, 0.0))
      run.eval_times.append(eval_time.get(run.spec.index, 0.0))
      run.last_round = r
      if run.stop is not None:
        write(f"{run.spec.label}: {run.stop}" if many else run.stop)
        run.done = True
        continue
      if config.checkpoint_every and (r + 1) % config.checkpoint_every == 0:
        save(run, r + 1)
    note_progress()
  for run in runs:
    run.done = True
    if run.stop:
      run.extra["stopped"] = run.stop
    if run.accountant is not None:
      run.extra["privacy"] = run.accountant.summary()
  finishing = [run for run in runs if run.finite]
  for run in finishing:
    if config.checkpoint_every and run.saved_step != run.last_round + 1:
      save(run, run.last_round + 1)
  note_progress()
  stop_if_requested("after the last round")
  if finishing:
    # One more evaluation after fine-tuning (FedBABU), appended as PFLlib appends it.
    finals, _ = states.evaluate(finishing, final=True)
    for run in finishing:
      final = finals[run.spec.index]
      if final is None:
        continue
      final = run.with_epsilon(final)
      _record(run.history, final, run.last_round)
      run.extra["final_eval"] = {k: v for k, v in final.items() if k != "client_test_acc"}
      write(f"{run.spec.label + ' | ' if many else ''}after fine-tuning | {_describe(final)}")
  if engine.num_new_clients:
    stop_if_requested("before the new-client evaluation")
    for run in finishing:
      new = states.new_clients(run.spec.index, sample_x, config.fine_tuning_epoch_new)
      run.extra["new_clients"] = {k: v for k, v in new.items() if k != "client_test_acc"}
      write(f"{run.spec.label + ' | ' if many else ''}{engine.num_new_clients} new clients "
            f"({config.fine_tuning_epoch_new} fine-tuning epochs) | test_acc "
            f"{new['test_acc']:.4f} ± {new['test_acc_std']:.4f} | test_auc {new['test_auc']:.4f}")
  if saves_client_models(config, engine.algorithm) and finishing:
    stop_if_requested("before keeping the client models")
    last = finishing[-1]  # HtFLlib's folder holds the last repetition's models
    last.client_models = engine.client_models(*states.get(last.spec.index))
  total = time.perf_counter() - start
  for run in runs:
    round_times = [t + e for t, e in zip(run.train_times, run.eval_times)]
    run.history["round_time_s"] = round_times
    run.history["train_time_s"] = run.train_times
    run.history["eval_time_s"] = run.eval_times
    steady = [t for i, t in enumerate(round_times) if i not in run.warmup_rounds] or round_times
    run.mean_round_time_s = float(np.mean(steady)) if steady else 0.0
    run.total_time_s = total
  stop_if_requested("before writing the results")
  return runs


def saves_client_models(config: Config, algorithm) -> bool:
  """Whether the run writes its client models (``-sfn``; see `fedjax_lib.client_models`)."""
  return client_models_lib.kept(config.save_folder_name) and has_hook(algorithm, "client_model")


def initial_client_models(config: Config, engine) -> dict:
  """``-mfn``: every group's clients' saved models, stacked in the group's client order (the
  engine's ``initial_models``); checked against the groups' models."""
  sample_x = engine.data.x[0]
  expected = {cid: (g.name, abstract_variables(g.algorithm.model, sample_x))
              for g in engine.groups for cid in g.ids}
  loaded = client_models_lib.read(config.models_folder_name, expected)
  return {g.name: jax.tree.map(lambda *rows: np.stack(rows), *[loaded[c] for c in g.ids])
          for g in engine.groups}


def write_generated(run, states: _States, algorithm, config: Config) -> None:
  """Writes the server's generated images of ``run`` as ``<run>_generated.png`` (replaced
  each round; the results JSON records the path as ``generated_images``)."""
  server_state, _ = states.get(run.spec.index)
  images = algorithm.generated_images(server_state)
  if images is None or not is_writer():
    return
  path = os.path.join(os.path.abspath(config.out), run.spec.name + "_generated.png")
  files = results_lib.FileSet()
  files.add(path, lambda tmp: results_lib.write_image_grid(tmp, images))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  files.commit()
  run.extra["generated_images"] = path


def _bar_label(config: Config, runs: list) -> str:
  """The progress bar's name: ``sweep``, ``run t``, or ``runs a–b`` for repetitions side by side."""
  if config.sweep:
    return "sweep"
  if len(runs) == 1:
    return runs[0].spec.label
  return f"runs {runs[0].spec.number}–{runs[-1].spec.number}"


def run_specs(config: Config, base: str, algorithm, data, model) -> list:
  """The S runs of ``config``: ``times`` repetitions, or every sweep combination."""
  out = os.path.abspath(config.out)
  ckpt = lambda name: os.path.join(out, "checkpoints", name)
  if not config.sweep:
    return [RunSpec(index=i, seed=config.seed + t, config=config, name=f"{base}_{t}",
                    label=f"run {t}", checkpoint=ckpt(f"{base}_{t}"), number=t)
            for i, t in enumerate(range(config.prev, config.times))]
  combos = sweep_lib.combinations(config.sweep)
  configs = [sweep_lib.combo_config(config, c).validate() for c in combos]
  algorithms = [algorithm] + [make_algorithm(c, data, model) for c in configs[1:]]
  swept = sweep_lib.swept_values(algorithms, list(config.sweep))
  specs = []
  for s, (combo, cfg) in enumerate(zip(combos, configs)):
    name = f"{base}_sweep_{s}"
    label = "combination " + ", ".join(f"{k}={v}" for k, v in combo.items())
    specs.append(RunSpec(index=s, seed=cfg.seed, config=cfg, name=name, label=label,
                         checkpoint=ckpt(name), combo=combo,
                         hparams={k: float(v[s]) for k, v in swept.items()}))
  return specs


def _stdout(line: str) -> None:
  print(line, flush=True)


def run_experiment(config: Config, log: Optional[Callable[[str], None]] = None,
                   quiet: bool = False):
  """Runs ``config.times`` repetitions, or every ``config.sweep`` combination, side by side,
  and writes their results under ``config.out``.

  Human-readable lines (the header, ``warning:`` lines, one line per evaluation) go to ``log``
  (default: stdout, process 0 only); ``quiet=True`` prints nothing and shows no progress
  bar. Files are written under ``config.out`` only, and with ``config.plot`` = False nothing
  else is written anywhere (matplotlib keeps a font cache in the home folder), except with
  ``config.compile_cache``: the compiled programs, in that folder; the results
  files appear together when the runs end. While it runs in the main thread, Ctrl-C or
  SIGTERM stops after the current round with a checkpoint (`fedjax_lib.stopping`).

  Returns `Results` (`fedjax_lib.sweep.SweepResults` for a sweep); ``.warnings`` lists the
  settings warnings (`fedjax_lib.checks`), also recorded in every results JSON.

  Raises:
    fedjax_lib.errors.FedJaxError: bad configuration or data (before anything is written), a
      second writer of the same results, results of a different config without
      ``overwrite``, or an operating-system error on the output folder (one line each).
    fedjax_lib.stopping.Interrupted: SIGINT/SIGTERM; what was saved is in its message.
  """
  if quiet:
    log = lambda line: None
    config = config.replace(progress=False)
  elif log is None:
    log = _stdout if is_writer() else (lambda line: None)
  installed = STOPPER.install(exit_now=False)
  STOPPER.shared = jax.process_count() > 1
  try:
    return _run_experiment(config, log)
  finally:
    if installed:
      STOPPER.uninstall()
      STOPPER.reset()


def _run_experiment(config: Config, log: Callable[[str], None]):
  config.validate()
  if config.sweep:
    sweep_config = config
    config = sweep_lib.combo_config(config, sweep_lib.combinations(config.sweep)[0]).validate()
  else:
    sweep_config = None
  built = build(config)
  data, model, algorithm, engine = built
  if sweep_config is not None:
    config = sweep_config
  tag = dataset_tag(config.dataset)
  base = f"{tag}_{algorithm.name}_{config.goal}"
  family = f"{base}_sweep" if config.sweep else base
  specs = run_specs(config, base, algorithm, data, model)
  sizes = {arch: models_lib.count_params(jax.eval_shape(model.init, rng.root_key(0),
                                                         data.x[:1]))
           for arch, model in built.models.items()}
  if len(sizes) == 1:
    arch = built.architectures[0]
    chosen = ("" if models_lib.parse_model_names(config.model) == built.architectures else
              f" → {arch} (PFLlib's choice on this dataset; -m FedAvgCNN keeps FedAvgCNN)")
    models_text = f"model {config.model}{chosen} ({sizes[arch]:,} parameters)"
  else:
    models_text = (f"models {', '.join(f'{a} ({n:,} parameters)' for a, n in sizes.items())}"
                   f", client i uses {config.model}[i mod {len(built.architectures)}], "
                   f"feature dim {feature_dim_of(config, built.architectures)}")
  what = (f"sweep of {len(specs)} combinations over {', '.join(config.sweep)}; "
          if config.sweep else "")
  log(f"{algorithm.name} on {tag}: {what}{data.num_clients} clients, {data.num_classes} "
      f"classes, {models_text}, executor {engine.executor}"
      f"{f' ({engine.client_threads} client threads)' if engine.client_threads > 1 else ''}, "
      f"backend {jax.default_backend()}")
  if config.privacy:
    log(f"differential privacy: DP-SGD with noise multiplier σ = {config.dp_sigma:g} and "
        f"per-example clip C = {config.dp_clip:g}; each evaluation reports ε at δ = "
        f"{config.dp_delta:g} of the worst-off client (RDP accountant)")
  if config.dlg_eval:
    log(f"DLG attack: every {config.dlg_gap} rounds from round 0, the first "
        f"{config.batch_num_per_client} training batches of every aggregated client are "
        f"reconstructed from its model delta; PSNR over the data's range "
        f"[{built.dlg.low:g}, {built.dlg.high:g}] (higher: more leakage)")
  for line in built.warnings:
    log(f"warning: {line}")
  with _output_folder(config, family) as out_dir:
    checkpoints = [_check_resumable(spec, config.resume, config.overwrite) for spec in specs]
    writer_step(lambda: output_lib.check_overwrite(
        [(os.path.join(out_dir, spec.name + ".json"), spec.config.to_dict(),
          Config.RESUMABLE_CHANGES if state == "continue" else ())
         for spec, state in zip(specs, checkpoints)], config.overwrite))
    if config.compile_cache:  # after the checks that compile nothing: they write nothing
      folder = compile_cache_lib.enable(config.compile_cache)
      log(f"compile cache: {folder} ({compile_cache_lib.entries(folder)} programs)")
    if len(specs) > 1:  # S runs side by side: state the memory they need, refuse what won't fit
      # (stacked runs compile their programs here, and the run reuses them: with the cache on)
      what = (f"the sweep of {len(specs)} combinations" if config.sweep
              else f"running {len(specs)} repetitions side by side")
      estimate = memory_lib.estimate_runs(engine, len(specs), list(specs[0].hparams),
                                          stacked=runs_stacked(engine, specs))
      log(f"memory: {what} needs {estimate.describe()}")
      estimate.check(what)
    else:  # one run: its states alone must fit (no compilation, nothing logged)
      memory_lib.estimate_runs(engine, 1).check("the run", memory_lib.ONE_RUN_ADVICE)
    replaced = [s for s, state in zip(specs, checkpoints) if state == "replace"]
    for spec in replaced:
      log(f"{spec.label}: --overwrite: removing the checkpoints of a different config in "
          f"{spec.checkpoint}")
    if replaced:  # by process 0 alone, the others waiting for it (one shared folder)
      writer_step(lambda: [output_lib.remove_tree(spec.checkpoint) for spec in replaced])
    runs = run_loop(engine, specs, config, log, privacy=built.privacy, dlg=built.dlg)
    return _write_results(config, built, specs, runs, out_dir, base, tag, log)


@contextlib.contextmanager
def _output_folder(config: Config, family: str):
  """The output folder, locked for ``family`` (process 0 only): yields its absolute path.

  A folder this run created is removed again when the run fails before writing anything.
  """
  if not is_writer():
    writer_step(lambda: None)  # process 0's verdict on the folder and its lock
    yield os.path.abspath(config.out)
    return
  cleanups = []

  def open_folder():
    path, created = output_lib.prepare_folder(config.out)
    lock = output_lib.OutputLock(path, family)
    cleanup = lambda: (lock.release(), output_lib.remove_if_created(path, created))
    STOPPER.cleanups.append(cleanup)  # also when the process is stopped now
    cleanups.append(cleanup)
    lock.acquire()
    return path

  try:
    yield writer_step(open_folder)
  finally:
    for cleanup in cleanups:
      cleanup()
      STOPPER.cleanups.remove(cleanup)


_STOP_SIGNALS = ("SIGINT", "SIGTERM")


def agreed_stop(requested: Optional[str]) -> Optional[str]:
  """This process's stop request (`fedjax_lib.stopping.Stopper.requested`), or with several
  processes the first process's that has one (``"SIGTERM on process 1"`` on the others).

  Every process calls it at the same safe points, so all stop at the same one — saving a
  checkpoint is collective, and a signal reaching the hosts a moment apart (a scheduler's
  SIGTERM) or one host alone (Ctrl-C there) would otherwise leave one saving while the
  others train the next round, both waiting for the other.
  """
  if jax.process_count() == 1:
    return requested
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  code = 0 if requested is None else (_STOP_SIGNALS.index(requested) + 1
                                      if requested in _STOP_SIGNALS else len(_STOP_SIGNALS) + 1)
  codes = np.asarray(multihost_utils.process_allgather(np.int32(code))).reshape(-1)
  if requested is not None or not codes.any():
    return requested
  first = int(np.flatnonzero(codes)[0])
  name = (_STOP_SIGNALS[codes[first] - 1] if codes[first] <= len(_STOP_SIGNALS)
          else "a stop request")
  return f"{name} on process {first}"


_MESSAGE_BYTES = 4096


def encode_outcome(error: Optional[BaseException]) -> np.ndarray:
  """A step's outcome as `_MESSAGE_BYTES` bytes for the other processes: all zero where it
  succeeded; else a kind byte (1: a refusal, a `FedJaxError`; 2: anything else, a bug or an
  interrupt) and the message, cut to fit."""
  outcome = np.zeros(_MESSAGE_BYTES, np.uint8)
  if error is not None:
    if isinstance(error, FedJaxError):
      kind, text = 1, str(error) or type(error).__name__
    else:
      kind, text = 2, f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    encoded = text.encode("utf-8")[:_MESSAGE_BYTES - 1]
    outcome[0] = kind
    outcome[1:1 + len(encoded)] = np.frombuffer(encoded, np.uint8)
  return outcome


def raise_peer_outcome(outcome: np.ndarray, process: int = 0) -> None:
  """Raises, on another process, what `encode_outcome` says happened on ``process``: its
  refusal as a `ConfigError` (``process 0: <its message>``), its failure as a `PeerError`."""
  outcome = np.asarray(outcome, np.uint8)
  if not outcome[0]:
    return
  message = outcome[1:].tobytes().rstrip(b"\0").decode("utf-8", "replace")
  if outcome[0] == 1:
    raise ConfigError(f"process {process}: {message}")
  raise PeerError(f"process {process} stopped ({message}); its output has the details")


def writer_step(step: Callable[[], Any]) -> Any:
  """``step()`` on process 0 (the writer) only; returns its value there, None elsewhere.

  With several processes (``--distributed``) every process calls this at the same point, and
  what ends process 0 there ends them all, instead of process 0 ending alone and the others
  waiting at the next collective until it fails with a traceback (or the coordination service
  times out, minutes later): a refusal (a `FedJaxError`: results of a different config, the
  folder's lock held, an unwritable folder) is raised on every process, named ``process 0:
  ...`` on the others; anything else (a bug, an interrupt) is raised on process 0 and a
  `PeerError` naming it on the others. The outcome travels as bytes (`encode_outcome`,
  ``broadcast_one_to_all``); one process: nothing is exchanged.
  """
  result, error = None, None
  if is_writer():
    try:
      result = step()
    except BaseException as e:  # pylint: disable=broad-except  (re-raised below)
      if jax.process_count() == 1:
        raise
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    shared = multihost_utils.broadcast_one_to_all(encode_outcome(error))
    if error is None:
      raise_peer_outcome(shared)
  if error is not None:
    raise error
  return result


def _write_results(config: Config, built: Built, specs: list, runs: list, out_dir: str,
                   base: str, tag: str, log: Callable[[str], None]):
  """Writes every results file in one transaction; returns `Results` / `SweepResults`."""
  data, algorithm, engine = built.data, built.algorithm, built.engine
  files_out = results_lib.FileSet()
  partition_file = os.path.join(out_dir, f"{base}{'_sweep' if config.sweep else ''}"
                                         "_partition.json")
  files_out.add(partition_file, lambda tmp: results_lib.write_json(tmp, data.summary()))
  kept = [run for run in runs if run.client_models is not None]
  models_dir = None
  if kept and is_writer():
    models_dir = os.path.abspath(client_models_lib.folder(config.save_folder_name, tag,
                                                          algorithm.name))
    kept[-1].extra["client_models"] = models_dir
    client_models_lib.add_files(files_out, models_dir, kept[-1].client_models, {
        "dataset": tag, "algorithm": algorithm.name, "model": config.model,
        "run": kept[-1].spec.run_number, "seed": kept[-1].spec.seed})
  results = []
  for run in runs:
    spec, history = run.spec, run.history
    acc = history["test_acc"]
    payload = {"config": spec.config.to_dict(), "run": spec.run_number, "seed": spec.seed,
               "algorithm": algorithm.name, "executor": engine.executor,
               "client_threads": engine.client_threads,
               "backend": jax.default_backend(), "jax_version": jax.__version__,
               **history, **run.extra, "best_test_acc": max(acc), "last_test_acc": acc[-1],
               "mean_round_time_s": run.mean_round_time_s, "warmup_rounds": run.warmup_rounds,
               "total_time_s": run.total_time_s, **traffic_summary(history),
               "warnings": list(built.warnings)}
    if config.sweep:
      payload.update({"sweep": config.sweep, "combination": spec.combo, "index": spec.index,
                      "round_time_note": "time of one round of all combinations together"
                      if len(runs) > 1 else ""})
    run_base = os.path.join(out_dir, spec.name)
    files = {"json": run_base + ".json", "h5": run_base + ".h5"}
    files_out.add(files["json"], lambda tmp, p=payload: results_lib.write_json(tmp, p))
    files_out.add(files["h5"], lambda tmp, h=history: results_lib.write_h5(tmp, h))
    if config.plot:
      files["png"] = run_base + ".png"
      title = (", ".join(f"{k}={v}" for k, v in spec.combo.items()) if spec.combo
               else f"run {spec.run_number}")
      files_out.add(files["png"], lambda tmp, h=history, t=title: results_lib.write_plot(
          tmp, h, f"{algorithm.name} on {tag} ({t})"))
    privacy = run.extra.get("privacy")
    results.append(RunResult(seed=spec.seed, history=history, best_test_acc=float(max(acc)),
                             last_test_acc=float(acc[-1]),
                             mean_round_time_s=run.mean_round_time_s,
                             total_time_s=run.total_time_s, files=files, privacy=privacy,
                             warmup_rounds=list(run.warmup_rounds)))
    if not config.sweep:
      spent = f", ε {privacy['epsilon']:.3g} at δ {privacy['delta']:g}" if privacy else ""
      log(f"run {spec.run_number}: best test accuracy {max(acc):.4f}, last {acc[-1]:.4f}, "
          f"{run.mean_round_time_s:.3f} s/round{spent}")
  if not config.sweep:
    out = Results(config=config, runs=results, out_dir=out_dir, partition_file=partition_file,
                  warnings=list(built.warnings))
  else:
    combos = [spec.combo for spec in specs]
    summary = sweep_lib.summarize(combos, results)
    sweep_base = os.path.join(out_dir, f"{base}_sweep")
    files = {"summary_json": sweep_base + "_summary.json",
             "summary_md": sweep_base + "_summary.md"}
    # Stacked runs are each charged the whole round; runs one after another add up.
    per_run = [r.mean_round_time_s for r in results]
    mean_round = float(np.mean(per_run) if runs_stacked(engine, specs) else np.sum(per_run))
    total = max(r.total_time_s for r in results)
    summary_payload = {"config": config.to_dict(), "combinations": combos, "rows": summary,
                       "mean_round_time_s": mean_round, "total_time_s": total,
                       "warnings": list(built.warnings)}
    files_out.add(files["summary_json"],
                  lambda tmp: results_lib.write_json(tmp, summary_payload))
    files_out.add(files["summary_md"], lambda tmp: results_lib.write_text(
        tmp, "\n".join(sweep_lib.summary_table(summary)) + "\n"))
    out = sweep_lib.SweepResults(config=config, combos=combos, runs=results, summary=summary,
                                 out_dir=out_dir, files=files, mean_round_time_s=mean_round,
                                 total_time_s=total, warnings=list(built.warnings))
  if is_writer():
    files_out.commit()
  if models_dir is not None:
    log(f"client models of run {kept[-1].spec.run_number}: {models_dir} "
        f"({len(kept[-1].client_models)} clients; -mfn {models_dir} starts a run from them)")
  STOPPER.saved("the results files are written")
  if STOPPER.requested is not None:
    raise Interrupted(f"{STOPPER.requested} while writing the results: they were written "
                      f"completely to {out_dir}", None)
  return out


def runs_stacked(engine, specs) -> bool:
  """Whether the loop stacks the runs in one program (else one after another per round)."""
  return len(specs) > 1 and engine.executors[0].traced and engine.mesh is None
