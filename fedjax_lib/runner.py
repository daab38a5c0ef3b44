"""`run_experiment(config) -> Results`: the whole experiment, as the CLI runs it.

Data are loaded and partitioned once, moved to the device once, and every repetition (``times``)
reuses one compiled round. Each repetition ``t`` uses seed ``config.seed + t`` for the model
initialisation and every random event; the partition is drawn from ``config.seed``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
import time
from typing import Callable, Optional

import jax
import numpy as np

from fedjax_lib import algorithms as algorithms_lib
from fedjax_lib import data as data_lib
from fedjax_lib import models as models_lib
from fedjax_lib import results as results_lib
from fedjax_lib.config import Config
from fedjax_lib.core import checkpoint as checkpoint_lib
from fedjax_lib.core import engine as engine_lib
from fedjax_lib.core import rng
from fedjax_lib.core.local import LocalSpec
from fedjax_lib.data.loading import DEFAULT_NUM_CLIENTS, is_folder_path
from fedjax_lib.errors import ConfigError

HISTORY_KEYS = ("test_acc", "test_auc", "test_acc_std", "test_auc_std", "train_loss")


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


@dataclasses.dataclass
class Results:
  """All repetitions of an experiment, with PFLlib's mean ± std summary."""
  config: Config
  runs: list
  out_dir: str
  partition_file: str

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
    return [
        f"best test accuracy: {best:.4f} ± {best_std:.4f} (mean ± std over {n} run(s))",
        f"last test accuracy: {last:.4f} ± {last_std:.4f}",
        f"mean time per round: {self.mean_round_time_s:.3f} s (round 0, which compiles, "
        f"excluded); total time: {self.total_time_s:.1f} s",
        f"results in: {self.out_dir}",
    ]


def dataset_tag(dataset: str) -> str:
  """The dataset's name in results file names (a folder's base name)."""
  return os.path.basename(os.path.normpath(dataset)) if is_folder_path(dataset) else dataset


def algorithm_params(config: Config) -> dict:
  """``config.algo_params`` plus ``pfllib_compat`` for algorithms that offer it."""
  params = dict(config.algo_params)
  accepted = algorithms_lib.get_algorithm(config.algorithm).hyperparameters()
  if config.pfllib_compat and "pfllib_compat" in accepted:
    params["pfllib_compat"] = True
  return params


def build(config: Config):
  """Validates ``config`` and builds ``(data, model, algorithm, engine)``.

  With ``num_new_clients`` = M the data hold N + M clients; the engine trains and evaluates
  the first N and keeps the last M for new-client evaluation.
  """
  config.validate()
  new = config.num_new_clients
  if config.num_clients is not None:
    total_clients = config.num_clients + new
  elif is_folder_path(config.dataset):
    total_clients = None  # as many as the folder holds
  else:
    total_clients = DEFAULT_NUM_CLIENTS + new
  data = data_lib.load_federated(
      config.dataset, num_clients=total_clients, num_classes=config.num_classes,
      scheme=config.partition, alpha=config.alpha, class_per_client=config.class_per_client,
      balance=config.balance, train_ratio=config.train_ratio, batch_size=config.batch_size,
      seed=config.seed if config.partition_seed is None else config.partition_seed)
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
  model = models_lib.make_model(config.model, data.sample_shape, data.num_classes,
                                dtype=config.dtype)
  backend = jax.default_backend()
  algorithm = make_algorithm(config, data, model)
  if new and not algorithm.supports_new_clients:
    raise ConfigError(f"algorithm {algorithm.name} does not support new-client evaluation "
                      "(num_new_clients > 0)")
  mesh = make_mesh(config.devices)
  executor = config.executor
  if executor == "auto":
    executor = engine_lib.default_executor(backend) if mesh is None else "vmap"
  elif executor == "sequential" and mesh is not None:
    raise ConfigError(f"executor='sequential' runs on one device but devices={config.devices} "
                      "shards the clients; use --executor vmap or chunked")
  participation = engine_lib.Participation(
      num_clients=num_clients, join_ratio=config.join_ratio,
      random_join_ratio=config.random_join_ratio, client_drop_rate=config.client_drop_rate)
  engine = engine_lib.Engine(algorithm, engine_lib.DeviceData.from_federated(data),
                             participation, executor=executor, chunk_size=config.chunk_size,
                             eval_chunk_size=config.eval_chunk_size,
                             skip_nonfinite=config.on_nan == "skip-client", mesh=mesh)
  return data, model, algorithm, engine


def make_algorithm(config: Config, data, model):
  """The configured algorithm (local-training spec from ``config`` and the data's sizes)."""
  steps_per_epoch = int(data.train_count.max()) // config.batch_size
  num_steps = steps_per_epoch * config.local_epochs
  unroll = config.unroll if config.unroll is not None else engine_lib.default_unroll(
      jax.default_backend(), num_steps)
  local = LocalSpec(learning_rate=float(config.learning_rate), batch_size=config.batch_size,
                    local_epochs=config.local_epochs, steps_per_epoch=steps_per_epoch,
                    unroll=unroll)
  return algorithms_lib.make_algorithm(config.algorithm, model, local, algorithm_params(config))


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


def _record(history: dict, metrics: dict, r: int) -> None:
  """Appends one evaluation's metrics (all views) to the history lists."""
  history["rounds"].append(r)
  for k, v in metrics.items():
    if k in HISTORY_KEYS or k.startswith(("test_acc_", "test_auc_")) and not k.endswith("_std"):
      history.setdefault(k, []).append(v)


def _describe(metrics: dict) -> str:
  views = "".join(f" | {k[len('test_acc_'):]} {v:.4f}" for k, v in metrics.items()
                  if k.startswith("test_acc_") and k != "test_acc_std")
  return (f"test_acc {metrics['test_acc']:.4f} ± {metrics['test_acc_std']:.4f}{views}"
          f" | test_auc {metrics['test_auc']:.4f} | train_loss {metrics['train_loss']:.4f}")


class Interrupted(KeyboardInterrupt):
  """Ctrl-C / SIGTERM during a run; ``checkpoint`` is where the run was saved (or None)."""

  def __init__(self, message: str, checkpoint: Optional[str]):
    super().__init__(message)
    self.checkpoint = checkpoint


class _StopRequests:
  """Turns SIGINT/SIGTERM into a flag checked between rounds (states are never half-updated)."""

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None:  # a second Ctrl-C: stop at once
      raise KeyboardInterrupt
    self.signal = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def checkpoint_dir(config: Config, base: str, t: int) -> str:
  return os.path.join(os.path.abspath(config.out), "checkpoints", f"{base}_{t}")


def _check_resumable(config: Config, directory: str) -> None:
  """Refuses (before anything is written) to continue a checkpoint of a different config."""
  if not os.path.isdir(directory):
    if config.resume:
      raise ConfigError(f"resume=True but there is no checkpoint in {directory}; run without "
                        "--resume to start afresh")
    return
  meta = checkpoint_lib.RunCheckpointer(directory).latest_meta()
  if meta is None:
    if config.resume:
      raise ConfigError(f"resume=True but no readable checkpoint is in {directory}")
    return
  diff = config.resume_mismatch(meta.get("config", {}))
  if diff:
    raise ConfigError(f"the checkpoint in {directory} was written with a different config "
                      f"({'; '.join(diff)}); use another --out or remove that folder")


def _run_once(engine, config: Config, seed: int, desc: str, log: Callable[[str], None],
              ckpt_path: str, stops: _StopRequests):
  root = rng.root_key(seed)
  sample_x = engine.data.x[0]
  server_state, client_states = engine.init(root, sample_x)
  history = {k: [] for k in ("rounds",) + HISTORY_KEYS}
  history["nonfinite_clients"] = []
  train_times, eval_times = [], []
  start_round, last_ckpt, saved_step = 0, None, None
  checkpointer = None
  if os.path.isdir(ckpt_path) or config.checkpoint_every:
    checkpointer = checkpoint_lib.RunCheckpointer(ckpt_path, config.keep_checkpoints)
    restored = checkpointer.restore_latest(server_state, engine.export_states(client_states))
    if restored is not None:
      start_round, server_state, client_states, meta = restored
      server_state, client_states = engine.place(server_state, client_states)
      saved_step = start_round
      history, train_times, eval_times = meta["history"], meta["train_times"], meta["eval_times"]
      last_ckpt = checkpointer.path(start_round)
      log(f"{desc}: resuming at round {start_round} from {last_ckpt}")

  def save(next_round: int) -> str:
    nonlocal checkpointer, saved_step
    saved_step = next_round
    if checkpointer is None:
      checkpointer = checkpoint_lib.RunCheckpointer(ckpt_path, config.keep_checkpoints)
    meta = {"config": config.to_dict(), "seed": seed, "history": history,
            "train_times": train_times, "eval_times": eval_times}
    return checkpointer.save(next_round, server_state, engine.export_states(client_states), meta)

  best, best_at = -1.0, 0
  for i, acc in enumerate(history["test_acc"]):
    if acc > best:
      best, best_at = acc, i
  bar = _progress(range(start_round, config.global_rounds + 1), config.progress, desc)
  write = getattr(bar, "write", log)
  start = time.perf_counter()
  r, stop, finite = start_round - 1, None, True
  for r in bar:
    if stops.signal is not None:
      last_ckpt = save(r)
      raise Interrupted(f"{stops.signal} at round {r}: saved {last_ckpt}", last_ckpt)
    eval_time, train_time = 0.0, 0.0
    if r % config.eval_gap == 0:
      t0 = time.perf_counter()
      metrics = engine.evaluate(server_state, client_states, root, r)
      eval_time = time.perf_counter() - t0
      _record(history, metrics, r)
      if metrics["test_acc"] > best:
        best, best_at = metrics["test_acc"], len(history["test_acc"]) - 1
      if config.progress:
        bar.set_postfix(acc=f"{metrics['test_acc']:.4f}", loss=f"{metrics['train_loss']:.4f}")
      write(f"round {r:4d} | {_describe(metrics)}")
      if not np.isfinite(metrics["train_loss"]):
        stop, finite = f"round {r}: the train loss is not finite; stopping this run", False
      elif config.auto_break and len(history["test_acc"]) - 1 - best_at > config.top_cnt:
        stop = f"auto-break at round {r}: no improvement in {config.top_cnt} evaluations"
    if stop is None:
      t0 = time.perf_counter()
      server_state, client_states, round_metrics = engine.run_round(server_state, client_states,
                                                                    root, r)
      jax.block_until_ready((server_state, client_states))
      train_time = time.perf_counter() - t0
      bad = sorted(int(c) for c in np.asarray(round_metrics["nonfinite"]) if c >= 0)
      history["nonfinite_clients"].append(len(bad))
      if bad and config.on_nan == "skip-client":
        write(f"round {r}: skipped the non-finite update(s) of client(s) {bad}")
      elif bad:
        finite = False
        stop = (f"round {r}: non-finite update(s) from client(s) {bad}; stopping this run "
                f"(last finite checkpoint: {last_ckpt or 'none; use --checkpoint-every'}; "
                "--on-nan skip-client drops such updates instead)")
    train_times.append(train_time)
    eval_times.append(eval_time)
    if stop is not None:
      write(stop)
      break
    if config.checkpoint_every and (r + 1) % config.checkpoint_every == 0:
      last_ckpt = save(r + 1)
  extra = {"stopped": stop} if stop else {}
  if finite:
    if config.checkpoint_every and saved_step != r + 1:
      save(r + 1)
    # One more evaluation after fine-tuning (FedBABU), appended as PFLlib appends it.
    final = engine.evaluate(server_state, client_states, root, r, final=True)
    if final is not None:
      _record(history, final, r)
      extra["final_eval"] = {k: v for k, v in final.items() if k != "client_test_acc"}
      write(f"after fine-tuning | {_describe(final)}")
    if engine.num_new_clients:
      new = engine.evaluate_new_clients(server_state, root, sample_x,
                                        config.fine_tuning_epoch_new)
      extra["new_clients"] = {k: v for k, v in new.items() if k != "client_test_acc"}
      write(f"{engine.num_new_clients} new clients ({config.fine_tuning_epoch_new} fine-tuning "
            f"epochs) | test_acc {new['test_acc']:.4f} ± {new['test_acc_std']:.4f} | "
            f"test_auc {new['test_auc']:.4f}")
  total = time.perf_counter() - start
  round_times = [t + e for t, e in zip(train_times, eval_times)]
  history["round_time_s"] = round_times
  history["train_time_s"] = train_times
  history["eval_time_s"] = eval_times
  steady = round_times[1:] or round_times
  return history, extra, float(np.mean(steady)), total


def run_experiment(config: Config, log: Optional[Callable[[str], None]] = None) -> Results:
  """Runs ``config.times`` repetitions and writes their results under ``config.out``.

  With ``config.sweep`` set, runs every combination side by side in one compiled program and
  returns `fedjax_lib.sweep.SweepResults` instead.

  Raises:
    fedjax_lib.errors.FedJaxError: for bad configuration or data, before anything is written.
  """
  if config.sweep:
    from fedjax_lib import sweep  # pylint: disable=import-outside-toplevel
    return sweep.run_sweep(config, log)
  if log is None:
    log = (lambda msg: print(msg, file=sys.stderr)) if is_writer() else (lambda msg: None)
  data, model, algorithm, engine = build(config)
  tag = dataset_tag(config.dataset)
  out_dir = os.path.abspath(config.out)
  base = f"{tag}_{algorithm.name}_{config.goal}"
  num_params = models_lib.count_params(
      jax.eval_shape(algorithm.init_params, rng.root_key(0), data.x[0]))
  log(f"{algorithm.name} on {tag}: {data.num_clients} clients, {data.num_classes} classes, "
      f"model {config.model} ({num_params:,} parameters), executor {engine.executor}, "
      f"backend {jax.default_backend()}")
  for t in range(config.times):
    _check_resumable(config, checkpoint_dir(config, base, t))
  partition_file = os.path.join(out_dir, f"{base}_partition.json")
  if is_writer():
    results_lib.write_json(partition_file, data.summary())
  runs = []
  for t in range(config.times):
    seed = config.seed + t
    with _StopRequests() as stops:
      history, extra, mean_round, total = _run_once(engine, config, seed, f"run {t}", log,
                                                    checkpoint_dir(config, base, t), stops)
    acc = history["test_acc"]
    run_base = os.path.join(out_dir, f"{base}_{t}")
    payload = {"config": config.to_dict(), "run": t, "seed": seed,
               "algorithm": algorithm.name, "executor": engine.executor,
               "backend": jax.default_backend(), "jax_version": jax.__version__,
               **history, **extra, "best_test_acc": max(acc), "last_test_acc": acc[-1],
               "mean_round_time_s": mean_round, "total_time_s": total}
    files = {"json": run_base + ".json", "h5": run_base + ".h5", "png": run_base + ".png"}
    if is_writer():
      results_lib.write_json(files["json"], payload)
      results_lib.write_h5(files["h5"], history)
      results_lib.write_plot(files["png"], history, f"{algorithm.name} on {tag} (run {t})")
    runs.append(RunResult(seed=seed, history=history, best_test_acc=float(max(acc)),
                          last_test_acc=float(acc[-1]), mean_round_time_s=mean_round,
                          total_time_s=total, files=files))
    log(f"run {t}: best test accuracy {max(acc):.4f}, last {acc[-1]:.4f}, "
        f"{mean_round:.3f} s/round")
  return Results(config=config, runs=runs, out_dir=out_dir, partition_file=partition_file)
