"""Typed, frozen experiment configuration with validation.

A :class:`Config` holds everything that defines a run. Field names are readable; the CLI maps
PFLlib's short flags onto them (``-lr`` → ``learning_rate`` ...). :func:`Config.validate`
checks every field at the boundary and raises :class:`~fedjax_lib.errors.ConfigError` with a
one-line message naming the field, the bad value and what is accepted.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from fedjax_lib import compile_cache as compile_cache_lib
from fedjax_lib.errors import ConfigError

EXECUTORS = ("auto", "vmap", "chunked", "sequential")
ON_NAN = ("stop", "skip-client")
PARTITIONS = ("dir", "pat", "iid", "exdir")
PARTITION_RNGS = ("numpy", "pfllib")
DTYPES = ("float32", "bfloat16")
#: How the convolutions of the models that take ``conv_impl`` are lowered
#: (`fedjax_lib.models.layers.TorchConv`).
CONV_IMPLS = ("auto", "lax", "patches", "slices", "hybrid")
# Run settings some algorithms read, which the runner hands them from the config
# (`runner.algorithm_params`): as an algorithm parameter they would contradict the run.
# Seeds are 32-bit: `jax.random.key` keeps a seed's low 32 bits (without x64), so seed 2**32 would
# repeat seed 0 and -1 seed 2**32 - 1; numpy's legacy RandomState (PFLlib's partition stream)
# takes the same range.
MAX_SEED = 2**32 - 1
# Integer settings travel into compiled programs as int32 (JAX without x64): a larger value would
# overflow there (2**63 ended in an OverflowError traceback, 2**31 wraps around).
MAX_INT = 2**31 - 1
# Feature widths (-fd, FedMRL's -sfd): a model pools its features to this width through a dense
# (input width × width) matrix, so 2**31 took all memory before anything ran. HtFLlib uses 512.
MAX_FEATURE_DIM = 2**16
# Repetitions (-t) run side by side and cost memory each (the memory check refused -t 100000
# here), but preparing 2**31 - 1 of them filled memory before that check could run.
MAX_TIMES = 2**16
RUN_SETTINGS = {"join_ratio": "-jr", "eval_gap": "-eg", "pfllib_compat": "--pfllib-compat"}


@dataclasses.dataclass(frozen=True)
class Config:
  """One federated experiment. Defaults are PFLlib's (`system/main.py`) unless noted.

  Data:
    dataset: a built-in name (``digits``, ``synthetic-cifar``, tfds names) or a path to a
      PFLlib-format folder (``config.json``, ``train/<id>.npz``, ``test/<id>.npz``).
    num_clients: clients to partition a built-in dataset into; ``None`` means 20 for built-in
      datasets and "as many as the folder holds" for folders.
    num_classes: ``None`` takes the data's class count; a given value must match the data.
    partition, alpha, class_per_client, balance, train_ratio: partitioning of built-in data
      (PFLlib's ``dir`` with α=0.1 and a 75/25 per-client split by default).
    few_shot: HtFLlib's ``-fs``: each client keeps the first ``few_shot`` training samples of
      each class (0: all); test splits are unchanged.
    partition_rng: ``numpy`` (a ``np.random.Generator``) or ``pfllib``: numpy's legacy
      ``RandomState`` stream in PFLlib's call order, so ``pfllib`` with ``partition_seed=1``
      gives the clients PFLlib's ``generate_*.py`` scripts give from the same source order.
    rebalance: ``dir``/``exdir``: when no draw gives every client the minimum size (HtFLlib
      issue #14), move random samples from the largest clients to the short ones instead of
      failing (`fedjax_lib.data.partition.rebalance_pools`).
    data_dir: the tfds data directory (``None``: ``$TFDS_DATA_DIR``, else
      ``~/tensorflow_datasets``); converted arrays are cached in ``<data_dir>/fedjax_arrays``.
    vocab_size: the text models' vocabulary (PFLlib's ``-vs``); ``None``: the dataset's
      (32,000 for ``ag_news``), else PFLlib's 80.
    max_len: PFLlib's ``-ml``, the token sequences' length the text models are built for;
      ``None``: the data's. When given it must equal the data's sequence length (PFLlib's
      TextCNN pools over exactly ``max_len`` positions); image and sensor data ignore it.
  Training (per round): ``local_epochs`` passes over each selected client's data with batch
    ``batch_size`` (drop_last, reshuffled every epoch), plain SGD at ``learning_rate``;
    ``shuffle=False`` keeps every epoch in the client's own sample order (HtFLlib's training
    loader, ``shuffle=False``, and PFLlib's FedFomo's).
  Learning-rate decay (PFLlib's ``-ld``/``-ldg``): with ``learning_rate_decay`` a client's
    learning rate(s) at its (k+1)-th round of training are ``learning_rate_decay_gamma``^k
    times the given ones — PFLlib's ``ExponentialLR``, stepped once per ``train()`` call;
    which of an algorithm's rates decay is PFLlib's choice, per algorithm
    (`fedjax_lib.algorithms.base.Algorithm.DECAYED_RATES`).
  Rounds: ``global_rounds`` + 1 iterations as in PFLlib (round 0 evaluates the initial model).
  Participation: ``join_ratio`` of the clients per round, or with ``random_join_ratio`` a
    uniform count in ``[int(N·join_ratio), N]``; ``client_drop_rate`` of them are dropped after
    training (their update is not aggregated).
  Evaluation every ``eval_gap`` rounds; ``auto_break`` stops once the best accuracy is more
    than ``top_cnt`` evaluations old.
  Repetitions: ``times`` runs with seeds ``seed, seed+1, ...`` on the same partition (the
    partition is drawn from ``partition_seed``, by default ``seed``); with ``prev`` = p only
    runs p .. times-1 (PFLlib's ``-pv``: continue a series; run t keeps seed ``seed + t``
    and its files ``..._t``).
  Sweeps: ``sweep`` maps ``seed`` and numeric hyperparameters (``learning_rate``, or any
    ``algo_params`` name such as ``mu``) to lists of values; every combination runs as one
    more leading axis of the same compiled round (see `fedjax_lib.sweep`).
  Execution: ``executor`` (``vmap`` | ``chunked`` | ``sequential`` | ``auto``), ``chunk_size``
    clients per chunk for ``chunked``, ``unroll`` local steps per compiled loop iteration
    (0 = fully unrolled; ``None`` = the backend default, see `core.engine`), ``local_loop``
    how local steps run: ``'valid'`` (only each client's own steps) or ``'scan'`` (every
    client the largest client's steps, masked; ``None`` = per backend, see `core.local`),
    ``client_threads`` clients the sequential executor trains at once, each on a host thread
    (``None`` = per backend: 2 on a CPU with two cores or more, else 1; one at a time for a
    client program that calls LAPACK, as FedKD's; the results are the same to the bit
    whatever the number).
    ``devices``: shard the clients over this many devices (0 = all; 1 = no sharding);
    ``distributed``: call ``jax.distributed.initialize()`` first (one process per host;
    only process 0 writes results).
  model: one architecture name (``cnn``), or a comma-separated list (``cnn,dnn``): client i
    uses architecture i mod K (HtFLlib's rule), each architecture is one group of the engine.
  feature_dim: the common feature width every base is pooled to (PyTorch's
    ``AdaptiveAvgPool1d``; HtFLlib's ``-fd``); ``None``: 512 with several architectures, each
    model's own width with one.
  dtype: the computation dtype of local training and evaluation: ``float32``, or ``bfloat16``
    for mixed precision (parameters and optimizer state stay float32; convolutions, matmuls
    and activations run in bfloat16; logits, losses and metrics are float32).
  conv_impl: how the convolutions are computed, for the models that offer the choice (``cnn``,
    ``digit5cnn``, the ``harcnn`` models, ``textcnn``; in a heterogeneous family those members
    only): ``auto`` (the backend's: im2col ``slices``/``hybrid`` on XLA:CPU, XLA's ``lax``
    convolutions elsewhere), ``lax``, ``patches``, ``slices``, ``hybrid`` (XLA's convolution
    forward, im2col's gradient). Equal up to float rounding; a speed and memory setting.
  algo_params: algorithm hyperparameters by name (e.g. ``{"mu": 0.01}``); each algorithm
    declares which it accepts. Not the run settings some algorithms read (``RUN_SETTINGS``:
    ``join_ratio``, ``eval_gap``, ``pfllib_compat``), which the runner hands them from the
    config's own fields; ``global_rounds`` may be given (a schedule's length, see README).
  pfllib_compat: reproduce PFLlib's documented quirks where an algorithm offers it (e.g.
    FedCP's Gumbel noise at test time) and the text models' log-softmax features
    (`fedjax_lib.models.text`); by default every algorithm and model follows its paper.
  Recovery: ``checkpoint_every`` = k > 0 saves an Orbax checkpoint every k rounds under
    ``<out>/checkpoints/`` (keeping the last ``keep_checkpoints``), and on Ctrl-C / SIGTERM and
    at the end; a rerun with the same ``out`` continues from the latest complete checkpoint
    (``resume`` makes a missing checkpoint an error). ``on_nan``: ``stop`` ends the run at the
    first non-finite client update; ``skip-client`` drops those updates and counts them.
  Output: the results files go to ``out`` (see `fedjax_lib.output`: one writer per run family,
    a different config's results are replaced only with ``overwrite``); ``plot`` = False
    writes no PNG (and does not import matplotlib, which keeps a font cache in the home
    folder); ``progress`` shows a progress bar on stderr.
  compile_cache: a folder for a persistent cache of the compiled programs
    (`fedjax_lib.compile_cache`; ``auto``: ``~/.cache/fedjax_lib/xla``; '' off): a later run
    that compiles the same programs loads them, with the same results to the bit.
  Differential privacy (`fedjax_lib.privacy`): with ``privacy`` every client trains with
    DP-SGD — each example's gradient clipped to L2 norm ``dp_clip`` (PFLlib's
    ``MAX_GRAD_NORM`` = 1.0), Gaussian noise of standard deviation ``dp_sigma``·``dp_clip``
    (``dp_sigma``: the noise multiplier, PFLlib's ``-dps``, default 0.0 = no noise) — and an
    RDP accountant reports each evaluated round's ε at ``dp_delta`` (PFLlib's 1e-5) for the
    worst-off client. Algorithms whose uploads are not all DP-SGD outputs refuse it.
  DLG privacy evaluation (`fedjax_lib.dlg`; PFLlib's ``-dlg``/``-dlgg``/``-bnpc``): with
    ``dlg_eval``, every ``dlg_gap`` rounds (from round 0) the server attacks each aggregated
    client's model delta with Deep Leakage from Gradients, reconstructing its first
    ``batch_num_per_client`` training batches, and the run reports their mean PSNR. Only
    algorithms that upload their whole model accept it.
  New clients (PFLlib's ``-nnc``/``-ften``): with ``num_new_clients`` = M > 0 the data hold
    N + M clients, the last M never train, and after the last round each of them fine-tunes
    the global model for ``fine_tuning_epoch_new`` epochs and is tested.
  Client models (HtFLlib's ``-sfn``/``-mfn``, `fedjax_lib.client_models`; algorithms with
    the ``client_model`` hook): with ``save_folder_name`` = D a finished run writes every
    client's model to ``D/<dataset>/<algorithm>/`` (a name containing ``temp``, HtFLlib's
    deleted working folder, writes nothing); with ``models_folder_name`` = F every client
    starts from its model in F instead of a fresh initialisation.
  """

  # data
  dataset: str = "digits"
  num_clients: Optional[int] = None
  num_classes: Optional[int] = None
  partition: str = "dir"
  alpha: float = 0.1
  class_per_client: int = 2
  balance: bool = False
  train_ratio: float = 0.75
  few_shot: int = 0
  partition_rng: str = "numpy"
  rebalance: bool = False
  data_dir: Optional[str] = None
  # model and algorithm
  model: str = "cnn"
  feature_dim: Optional[int] = None
  vocab_size: Optional[int] = None
  max_len: Optional[int] = None
  dtype: str = "float32"
  conv_impl: str = "auto"
  algorithm: str = "FedAvg"
  algo_params: dict = dataclasses.field(default_factory=dict)
  pfllib_compat: bool = False
  # training
  global_rounds: int = 2000
  local_epochs: int = 1
  batch_size: int = 10
  shuffle: bool = True
  learning_rate: float = 0.005
  join_ratio: float = 1.0
  random_join_ratio: bool = False
  client_drop_rate: float = 0.0
  learning_rate_decay: bool = False
  learning_rate_decay_gamma: float = 0.99
  # differential privacy (PFLlib's removed -dp/-dps; MAX_GRAD_NORM = 1.0, DELTA = 1e-5)
  privacy: bool = False
  dp_sigma: float = 0.0
  dp_clip: float = 1.0
  dp_delta: float = 1e-5
  # DLG privacy evaluation (PFLlib's -dlg/-dlgg/-bnpc)
  dlg_eval: bool = False
  dlg_gap: int = 100
  batch_num_per_client: int = 2
  # evaluation and repetitions
  eval_gap: int = 1
  times: int = 1
  prev: int = 0
  auto_break: bool = False
  top_cnt: int = 100
  goal: str = "test"
  seed: int = 0
  partition_seed: Optional[int] = None
  num_new_clients: int = 0
  fine_tuning_epoch_new: int = 0
  # client models (HtFLlib's -sfn / -mfn)
  save_folder_name: str = ""
  models_folder_name: str = ""
  # execution and output
  executor: str = "auto"
  chunk_size: int = 8
  unroll: Optional[int] = None
  local_loop: Optional[str] = None
  client_threads: Optional[int] = None
  eval_chunk_size: int = 64
  devices: int = 1
  distributed: bool = False
  sweep: dict = dataclasses.field(default_factory=dict)
  out: str = "results"
  progress: bool = True
  overwrite: bool = False
  plot: bool = True
  checkpoint_every: int = 0
  keep_checkpoints: int = 3
  resume: bool = False
  on_nan: str = "stop"
  compile_cache: str = ""

  # Fields that may differ between a checkpointed run and its continuation (the DLG attack
  # reads the states and never changes them).
  RESUMABLE_CHANGES = ("global_rounds", "times", "prev", "out", "progress", "overwrite", "plot",
                       "checkpoint_every", "keep_checkpoints", "resume", "auto_break",
                       "top_cnt", "devices", "distributed", "eval_chunk_size", "dlg_eval",
                       "dlg_gap", "batch_num_per_client", "data_dir", "compile_cache",
                       "save_folder_name", "client_threads")

  def resume_mismatch(self, saved: dict) -> list[str]:
    """``field: saved → now`` for every field that must match to continue a checkpoint.

    A field missing from ``saved`` (a checkpoint written before the field existed) counts as
    its default.
    """
    now = self.to_dict()
    saved = Config.with_defaults(saved)
    return [f"{k}: {saved.get(k)!r} → {now[k]!r}" for k in sorted(now)
            if k not in self.RESUMABLE_CHANGES and _jsonish(saved.get(k)) != _jsonish(now[k])]

  @staticmethod
  def with_defaults(saved: dict) -> dict:
    """``saved`` (a config written to a checkpoint or results file) with the fields it lacks
    (written before they existed) at their defaults."""
    return {**Config().to_dict(), **saved}

  def replace(self, **changes: Any) -> "Config":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict) -> "Config":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ConfigError(f"unknown config field(s) {', '.join(map(repr, unknown))}; "
                        f"accepted fields: {', '.join(sorted(known))}")
    return cls(**values)

  # ---------------------------------------------------------------- validation
  def validate(self) -> "Config":
    """Checks every field; returns ``self`` so calls can be chained."""
    _positive_int("global_rounds", self.global_rounds, minimum=0)
    _positive_int("local_epochs", self.local_epochs)
    _positive_int("batch_size", self.batch_size)
    _positive_int("eval_gap", self.eval_gap)
    _positive_int("times", self.times, maximum=MAX_TIMES)
    _positive_int("prev", self.prev, minimum=0)
    if self.prev >= self.times:
      raise ConfigError(f"prev={self.prev} with times={self.times} runs nothing (runs prev .. "
                        f"times-1 are run); accepted: 0 <= prev < times")
    _positive_int("top_cnt", self.top_cnt)
    _positive_int("chunk_size", self.chunk_size)
    _positive_int("eval_chunk_size", self.eval_chunk_size)
    _positive_int("class_per_client", self.class_per_client)
    _positive_int("num_new_clients", self.num_new_clients, minimum=0)
    _positive_int("checkpoint_every", self.checkpoint_every, minimum=0)
    _positive_int("keep_checkpoints", self.keep_checkpoints)
    _positive_int("fine_tuning_epoch_new", self.fine_tuning_epoch_new, minimum=0)
    _positive_int("dlg_gap", self.dlg_gap)
    _positive_int("batch_num_per_client", self.batch_num_per_client)
    if self.num_clients is not None:
      _positive_int("num_clients", self.num_clients)
    if self.num_classes is not None:
      _positive_int("num_classes", self.num_classes, minimum=2)
    if self.unroll is not None:
      _positive_int("unroll", self.unroll, minimum=0)
    if self.client_threads is not None:
      _positive_int("client_threads", self.client_threads)
    if self.local_loop not in (None, "valid", "scan"):
      raise ConfigError(f"local_loop must be 'valid', 'scan' or None (per backend), got "
                        f"{self.local_loop!r}")
    if self.feature_dim is not None:
      _positive_int("feature_dim", self.feature_dim, maximum=MAX_FEATURE_DIM)
    if self.vocab_size is not None:
      _positive_int("vocab_size", self.vocab_size)
    if self.max_len is not None:
      _positive_int("max_len", self.max_len)
    if self.data_dir is not None and (not isinstance(self.data_dir, str) or not self.data_dir):
      raise ConfigError(f"data_dir={self.data_dir!r}: give a folder path or leave it unset")
    from fedjax_lib.models.zoo import parse_model_names  # pylint: disable=import-outside-toplevel
    parse_model_names(self.model)
    _seed("seed", self.seed)
    if self.seed + self.times - 1 > MAX_SEED:
      raise ConfigError(f"seed={self.seed} with times={self.times}: repetition t runs with seed "
                        f"seed + t, and {self.seed + self.times - 1} is above {MAX_SEED} (seeds "
                        f"are 32-bit); accepted: seed <= {MAX_SEED - self.times + 1}")
    _positive_float("learning_rate", self.learning_rate)
    _positive_float("alpha", self.alpha)
    _in_range("train_ratio", self.train_ratio, 0.0, 1.0, low_open=True, high_open=True)
    _positive_int("few_shot", self.few_shot, minimum=0)
    _in_range("join_ratio", self.join_ratio, 0.0, 1.0, low_open=True)
    _in_range("client_drop_rate", self.client_drop_rate, 0.0, 1.0, high_open=True)
    _positive_float("learning_rate_decay_gamma", self.learning_rate_decay_gamma)
    if isinstance(self.dp_sigma, bool) or not isinstance(self.dp_sigma, (int, float)) \
        or not math.isfinite(self.dp_sigma) or self.dp_sigma < 0:
      raise ConfigError(f"dp_sigma={self.dp_sigma!r} is invalid; accepted: the noise "
                        "multiplier σ, a finite number >= 0")
    _positive_float("dp_clip", self.dp_clip)
    if self.privacy and self.shuffle is False:
      raise ConfigError("privacy=True with shuffle=False: DP-SGD's accounting assumes batches "
                        "drawn at random; keep shuffle=True (--shuffle true) with -dp")
    _in_range("dp_delta", self.dp_delta, 0.0, 1.0, low_open=True, high_open=True)
    if self.on_nan not in ON_NAN:
      raise ConfigError(f"on_nan={self.on_nan!r} is invalid; choose one of: {', '.join(ON_NAN)}")
    for name in ("balance", "random_join_ratio", "auto_break", "progress", "pfllib_compat",
                 "resume", "overwrite", "plot", "privacy", "dlg_eval", "learning_rate_decay",
                 "shuffle"):
      if not isinstance(getattr(self, name), bool):
        raise ConfigError(f"{name}={getattr(self, name)!r} is not a boolean; use true/false")
    if self.executor not in EXECUTORS:
      raise ConfigError(f"unknown executor {self.executor!r}; choose one of: "
                        f"{', '.join(EXECUTORS)}")
    if self.dtype not in DTYPES:
      raise ConfigError(f"unknown dtype {self.dtype!r}; choose one of: {', '.join(DTYPES)}")
    if self.conv_impl not in CONV_IMPLS:
      raise ConfigError(f"unknown conv_impl {self.conv_impl!r}; choose one of: "
                        f"{', '.join(CONV_IMPLS)}")
    if self.partition not in PARTITIONS:
      raise ConfigError(f"unknown partition {self.partition!r}; choose one of: "
                        f"{', '.join(PARTITIONS)}")
    if self.partition_rng not in PARTITION_RNGS:
      raise ConfigError(f"unknown partition_rng {self.partition_rng!r}; choose one of: "
                        f"{', '.join(PARTITION_RNGS)}")
    if not isinstance(self.rebalance, bool):
      raise ConfigError(f"rebalance={self.rebalance!r} is not a boolean; use true/false")
    if not isinstance(self.dataset, str) or not self.dataset:
      raise ConfigError(f"dataset={self.dataset!r}: give a built-in name or a folder path")
    if not isinstance(self.out, str) or not self.out.strip():
      raise ConfigError(f"out={self.out!r} is empty; give an output folder (default results)")
    cache_problem = compile_cache_lib.problem(self.compile_cache)
    if cache_problem:
      raise ConfigError(f"compile_cache={self.compile_cache!r} {cache_problem}; accepted: '' "
                        f"(off), 'auto' ({compile_cache_lib.default_folder()}) or a folder only "
                        "this user can write to (created if missing)")
    if not isinstance(self.goal, str) or not self.goal or "/" in self.goal:
      raise ConfigError(f"goal={self.goal!r}: give a non-empty tag without '/'")
    if not isinstance(self.algo_params, dict):
      raise ConfigError(f"algo_params={self.algo_params!r} must be a dict of name: value")
    for name, flag in RUN_SETTINGS.items():
      if name in self.algo_params:
        raise ConfigError(
            f"algo_params {name}={self.algo_params[name]!r} (--algo-param): {name} is the "
            f"run's setting, which the algorithm reads from the run; set {flag} "
            f"(Config.{name}) instead")
    _positive_int("devices", self.devices, minimum=0)
    if not isinstance(self.distributed, bool):
      raise ConfigError(f"distributed={self.distributed!r} is not a boolean; use true/false")
    if self.partition_seed is not None:
      _seed("partition_seed", self.partition_seed)
    for name in ("save_folder_name", "models_folder_name"):
      if not isinstance(getattr(self, name), str):
        raise ConfigError(f"{name}={getattr(self, name)!r} must be a folder path ('' for none)")
    if self.models_folder_name and self.num_new_clients:
      raise ConfigError(
          f"models_folder_name={self.models_folder_name!r} (-mfn) with num_new_clients="
          f"{self.num_new_clients} (-nnc): the folder holds the training clients' models and "
          "new clients would start untrained; use -nnc 0 with -mfn")
    if self.save_folder_name and self.sweep:
      raise ConfigError(
          f"save_folder_name={self.save_folder_name!r} (-sfn) with a sweep: the folder holds "
          "one run's client models; run the combination to keep without --sweep")
    self._validate_sweep()
    return self

  def _validate_sweep(self) -> None:
    """``sweep``: a dict of name → non-empty list of numbers (integers for ``seed``)."""
    if not isinstance(self.sweep, dict):
      raise ConfigError(f"sweep={self.sweep!r} must be a dict of name: list of values")
    for name, values in self.sweep.items():
      if not isinstance(name, str) or not name:
        raise ConfigError(f"sweep name {name!r} must be a non-empty string")
      if not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"sweep {name}={values!r} must be a non-empty list of values")
      for v in values:
        if name == "seed":
          _seed("sweep seed", v)
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
          raise ConfigError(f"sweep {name}: value {v!r} is not a finite number; only numeric "
                            "hyperparameters can be swept")
      if len(set(values)) != len(values):
        raise ConfigError(f"sweep {name}={list(values)!r} repeats a value")
    if self.sweep and self.times != 1:
      raise ConfigError(f"times={self.times} with sweep: sweep over seeds instead "
                        "(sweep seed=0,1,2 equals -t 3)")

  def check_participation(self, num_clients: int) -> None:
    """Checks that every round selects, and keeps, at least one client."""
    num_join = int(num_clients * self.join_ratio)
    if num_join < 1:
      raise ConfigError(
          f"join_ratio={self.join_ratio} selects int({num_clients}*{self.join_ratio}) = 0 "
          f"clients; use join_ratio >= {1 / num_clients:.4g} with {num_clients} clients")
    kept = int((1 - self.client_drop_rate) * num_join)
    if kept < 1:
      # The largest 4-decimal rate that keeps a client as PFLlib counts, in floats:
      # (1 - 0.8) * 5 is 0.9999999999999998, so 0.8 keeps none of 5 clients.
      bound = math.floor((1 - 1 / num_join) * 1e4) / 1e4
      while bound > 0 and int((1 - bound) * num_join) < 1:
        bound = round(bound - 1e-4, 4)
      raise ConfigError(
          f"client_drop_rate={self.client_drop_rate} drops every one of the {num_join} "
          f"selected clients; use client_drop_rate <= {bound:g} (-cdr) or select more "
          "clients (-jr)")


def _jsonish(value: Any) -> Any:
  """``value`` as it reads back from JSON (tuples become lists)."""
  if isinstance(value, (list, tuple)):
    return [_jsonish(v) for v in value]
  if isinstance(value, dict):
    return {str(k): _jsonish(v) for k, v in value.items()}
  return value


def _int(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, int):
    raise ConfigError(f"{name}={value!r} is not an integer")


def _seed(name: str, value: Any) -> None:
  _int(name, value)
  if not 0 <= value <= MAX_SEED:
    raise ConfigError(f"{name}={value} is invalid; accepted: an integer in [0, {MAX_SEED}] "
                      "(seeds are 32-bit: JAX's keys keep a seed's low 32 bits)")


def _positive_int(name: str, value: Any, minimum: int = 1, maximum: int = MAX_INT) -> None:
  _int(name, value)
  if value < minimum:
    raise ConfigError(f"{name}={value} is invalid; accepted: an integer >= {minimum}")
  if value > maximum:
    raise ConfigError(f"{name}={value} is invalid; accepted: an integer in [{minimum}, "
                      f"{maximum}]")


def _positive_float(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
      or value <= 0:
    raise ConfigError(f"{name}={value!r} is invalid; accepted: a finite number > 0")


def _in_range(name: str, value: Any, low: float, high: float, low_open: bool = False,
              high_open: bool = False) -> None:
  ok = (not isinstance(value, bool) and isinstance(value, (int, float))
        and math.isfinite(value)
        and (value > low if low_open else value >= low)
        and (value < high if high_open else value <= high))
  if not ok:
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    raise ConfigError(f"{name}={value!r} is invalid; accepted: a number in {lo}{low}, {high}{hi}")
