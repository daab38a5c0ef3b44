"""Sweeps: every combination of seeds and numeric hyperparameters in one compiled round.

``Config(sweep={"seed": [0, 1, 2], "learning_rate": [0.01, 0.005]})`` (CLI: ``--sweep
seed=0,1,2 lr=0.01,0.005``) runs the 6 combinations side by side: the server and client states
of all of them are stacked on one more leading axis, and one jitted, ``vmap``-ped round advances
every combination at once — one compilation, one program launch per round.

How a hyperparameter becomes an array: the algorithm of each combination is built exactly as a
separate run would build it (so derived values follow, e.g. PerAvg's β = learning rate); the
numeric fields that differ between those algorithms are stacked into ``[S]`` arrays and, while
tracing, substituted into a copy of the algorithm. A field that sets shapes or loop lengths
(epochs, batch size, an integer) cannot be an array and is refused with an error naming it.

Seeds: combination ``seed = s`` uses root key ``s``; the partition is drawn once, from
``partition_seed`` (default: ``config.seed``), so every combination sees the same clients — as
``-t`` repetitions do. A separate run with ``--seed s --partition-seed <the same>`` gives the
same numbers (tested).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import os
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lib import results as results_lib
from fedjax_lib import runner as runner_lib
from fedjax_lib.config import Config
from fedjax_lib.core import rng
from fedjax_lib.errors import ConfigError

Path = tuple  # attribute path inside an algorithm, e.g. ("local", "learning_rate")


def combinations(sweep: dict) -> list[dict]:
  """Every combination of the swept values, the first name varying slowest."""
  names = list(sweep)
  return [dict(zip(names, values)) for values in itertools.product(*sweep.values())]


def combo_config(config: Config, combo: dict) -> Config:
  """The config of one combination: the values set, the partition fixed, no sweep."""
  changes: dict[str, Any] = {"sweep": {}, "partition_seed": (
      config.seed if config.partition_seed is None else config.partition_seed)}
  params = dict(config.algo_params)
  fields = {f.name for f in dataclasses.fields(Config)}
  for name, value in combo.items():
    if name in ("seed", "learning_rate"):
      changes[name] = value
    elif name in fields:
      raise ConfigError(f"sweep {name}: only seed, learning_rate and numeric algorithm "
                        f"hyperparameters can be swept, not the config field {name!r}")
    else:
      params[name] = value
  return config.replace(algo_params=params, **changes)


def _fields(obj, prefix: Path = ()):
  """``{path: value}`` of the dataclass fields of ``obj``, nested dataclasses expanded."""
  out = {}
  for f in dataclasses.fields(obj):
    value = getattr(obj, f.name)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
      out.update(_fields(value, prefix + (f.name,)))
    else:
      out[prefix + (f.name,)] = value
  return out


def swept_leaves(algorithms: list, names: list[str]) -> dict[Path, np.ndarray]:
  """The fields that differ between the combinations' algorithms, as ``[S]`` float arrays.

  Raises:
    ConfigError: a differing field is not a float (it sets shapes or control flow).
  """
  per_algo = [_fields(a) for a in algorithms]
  leaves = {}
  for path, first in per_algo[0].items():
    values = [fields[path] for fields in per_algo]
    if all(_same(v, first) for v in values):
      continue
    if not all(isinstance(v, float) for v in values):
      raise ConfigError(
          f"sweep over {', '.join(names)}: the algorithm field {'.'.join(path)} takes the "
          f"values {values!r}, which cannot be one compiled program (only floating-point "
          "hyperparameters can be swept); run those settings separately")
    leaves[path] = np.asarray(values, np.float32)
  return leaves


def _same(a, b) -> bool:
  try:
    return bool(a == b) and type(a) is type(b)
  except Exception:  # pylint: disable=broad-except
    return a is b


def substitute(obj, values: dict[Path, Any]):
  """A copy of the frozen dataclass ``obj`` with the fields at ``values``' paths replaced.

  Bypasses ``__init__``/``__post_init__`` (the values may be tracers; every combination was
  validated when its algorithm was built).
  """
  if not values:
    return obj
  new = copy.copy(obj)
  heads = {}
  for path, value in values.items():
    heads.setdefault(path[0], {})[path[1:]] = value
  for name, rest in heads.items():
    value = rest[()] if () in rest else substitute(getattr(obj, name), rest)
    object.__setattr__(new, name, value)
  return new


class SweepEngine:
  """Runs an `Engine`'s round, evaluation and initialisation for S combinations at once.

  Args:
    engine: the engine of the first combination (vmap or chunked executor, one device).
    leaves: ``{path: [S] values}`` of the swept algorithm fields (see `swept_leaves`).
    size: S.
  """

  def __init__(self, engine, leaves: dict[Path, np.ndarray], size: int):
    if engine.executor == "sequential" or engine.mesh is not None:
      raise ValueError("a sweep needs the vmap or chunked executor on one device")
    self.engine = engine
    self.size = size
    self.paths = list(leaves)
    self.values = [jnp.asarray(leaves[p]) for p in self.paths]
    self.trace_counts = engine.trace_counts
    self._init = jax.jit(jax.vmap(self._init_impl, in_axes=(0, None, 0)))
    self._round = jax.jit(jax.vmap(self._round_impl, in_axes=(0, 0, None, 0, None, 0)),
                          donate_argnums=(0, 1))
    self._eval = {final: jax.jit(jax.vmap(functools.partial(self._eval_impl, final=final),
                                          in_axes=(0, 0, None, None, 0, None, 0)))
                  for final in (False, True)}

  def _with(self, hp) -> Any:
    """A shallow copy of the engine whose algorithm has this combination's values."""
    eng = copy.copy(self.engine)
    eng.algorithm = substitute(self.engine.algorithm, dict(zip(self.paths, hp)))
    return eng

  def _init_impl(self, root, sample_x, hp):
    eng = self._with(hp)
    server_state, client_states = eng.algorithm.init(rng.init_key(root), sample_x,
                                                     eng.num_clients)
    if eng.algorithm.HAS_WARMUP:
      return eng._warmup_all_impl(server_state, client_states, eng.data, rng.warmup_key(root))  # pylint: disable=protected-access
    return server_state, client_states

  def _round_impl(self, server_state, client_states, data, root, round_index, hp):
    return self._with(hp)._round_impl(server_state, client_states, data, root, round_index)  # pylint: disable=protected-access

  def _eval_impl(self, server_state, client_states, data, ids, root, round_index, hp, final):
    return self._with(hp)._eval_chunk_impl(server_state, client_states, data, ids, root,  # pylint: disable=protected-access
                                           round_index, final)

  def init(self, roots, sample_x):
    return self._init(roots, jnp.asarray(sample_x), self.values)

  def run_round(self, server_state, client_states, roots, round_index: int):
    """One round of every combination; the input states are donated."""
    return self._round(server_state, client_states, self.engine.data, roots,
                       jnp.asarray(round_index, jnp.int32), self.values)

  def evaluate(self, server_state, client_states, roots, round_index: int = 0,
               final: bool = False) -> Optional[list[dict]]:
    """Every combination's evaluation of every client (as `Engine.evaluate`), one list entry
    per combination."""
    eng = self.engine
    if final and not eng.algorithm.HAS_FINAL_EVAL:
      return None
    round_index = jnp.asarray(round_index, jnp.int32)
    chunk = eng.eval_chunk_size
    parts = []
    for start in range(0, eng.num_clients, chunk):
      ids = jnp.asarray(np.arange(start, start + chunk) % eng.num_clients, jnp.int32)
      parts.append(self._eval[final](server_state, client_states, eng.data, ids, roots,
                                     round_index, self.values))
    parts = jax.device_get(parts)
    ids = np.arange(eng.num_clients)
    return [eng._collect([jax.tree.map(lambda a: a[s], p) for p in parts], ids)  # pylint: disable=protected-access
            for s in range(self.size)]


@dataclasses.dataclass
class SweepResults:
  """Per-combination runs and the summary over seeds per hyperparameter setting."""
  config: Config
  combos: list
  runs: list
  summary: list
  out_dir: str
  files: dict
  mean_round_time_s: float
  total_time_s: float

  def summary_lines(self) -> list[str]:
    return summary_table(self.summary) + [
        f"{len(self.combos)} combinations in one compiled round: {self.mean_round_time_s:.3f} "
        f"s per round for all of them (round 0, which compiles, excluded); total "
        f"{self.total_time_s:.1f} s", f"results in: {self.out_dir}"]


def summarize(combos: list[dict], runs: list) -> list[dict]:
  """Mean ± std over seeds of best and last accuracy, per hyperparameter setting."""
  groups: dict[tuple, list] = {}
  for combo, run in zip(combos, runs):
    key = tuple((k, v) for k, v in combo.items() if k != "seed")
    groups.setdefault(key, []).append(run)
  rows = []
  for key, members in groups.items():
    best = np.array([r.best_test_acc for r in members])
    last = np.array([r.last_test_acc for r in members])
    rows.append({"setting": dict(key), "seeds": [r.seed for r in members],
                 "best_test_acc_mean": float(best.mean()), "best_test_acc_std": float(best.std()),
                 "last_test_acc_mean": float(last.mean()), "last_test_acc_std": float(last.std())})
  return rows


def summary_table(rows: list[dict]) -> list[str]:
  """The summary as markdown table lines."""
  names = list(rows[0]["setting"]) if rows else []
  header = names + ["seeds", "best acc (mean ± std)", "last acc (mean ± std)"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in rows:
    cells = [f"{row['setting'][n]:g}" for n in names] + [
        ",".join(map(str, row["seeds"])),
        f"{row['best_test_acc_mean']:.4f} ± {row['best_test_acc_std']:.4f}",
        f"{row['last_test_acc_mean']:.4f} ± {row['last_test_acc_std']:.4f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def _check_supported(config: Config) -> None:
  unsupported = {"times": config.times != 1, "num_new_clients": config.num_new_clients > 0,
                 "checkpoint_every": config.checkpoint_every > 0, "resume": config.resume,
                 "devices": config.devices != 1, "executor": config.executor == "sequential"}
  bad = [name for name, flag in unsupported.items() if flag]
  if bad:
    raise ConfigError(f"a sweep runs on one device with the vmap or chunked executor, without "
                      f"checkpoints, -t or new clients; drop {', '.join(bad)} "
                      f"({', '.join(f'{n}={getattr(config, n)!r}' for n in bad)})")


def build_sweep(config: Config):
  """``(data, combos, configs, sweep_engine)`` for ``config.sweep``; validates everything
  before anything runs."""
  config.validate()
  _check_supported(config)
  combos = combinations(config.sweep)
  configs = [combo_config(config, c).validate() for c in combos]
  base = configs[0]
  if base.executor == "auto":
    base = base.replace(executor="vmap")
  data, model, algorithm, engine = runner_lib.build(base)
  algorithms = [algorithm] + [runner_lib.make_algorithm(c, data, model) for c in configs[1:]]
  leaves = swept_leaves(algorithms, list(config.sweep))
  return data, combos, configs, SweepEngine(engine, leaves, len(combos))


def run_sweep(config: Config, log: Optional[Callable[[str], None]] = None) -> SweepResults:
  """Runs every combination of ``config.sweep`` side by side; writes per-combination results
  (JSON, h5, PNG, as a single run writes them) and a summary (JSON and markdown)."""
  log = log or (lambda msg: print(msg, file=sys.stderr))
  data, combos, configs, sweeper = build_sweep(config)
  engine = sweeper.engine
  tag = runner_lib.dataset_tag(config.dataset)
  out_dir = os.path.abspath(config.out)
  base = f"{tag}_{engine.algorithm.name}_{config.goal}_sweep"
  log(f"{engine.algorithm.name} on {tag}: sweep of {len(combos)} combinations over "
      f"{', '.join(config.sweep)}; {engine.num_clients} clients, executor {engine.executor}, "
      f"backend {jax.default_backend()}")
  roots = jnp.stack([rng.root_key(c.seed) for c in configs])
  start = time.perf_counter()
  server_state, client_states = sweeper.init(roots, data.x[0])
  histories = [{"rounds": []} for _ in combos]
  stopped: list[Optional[str]] = [None] * len(combos)
  train_times, eval_times = [], []

  def record(metrics_list, r):
    for s, metrics in enumerate(metrics_list):
      if stopped[s] is None:
        runner_lib._record(histories[s], metrics, r)  # pylint: disable=protected-access
        if not np.isfinite(metrics["train_loss"]):
          stopped[s] = f"round {r}: the train loss is not finite; stopped this combination"

  bar = runner_lib._progress(range(config.global_rounds + 1), config.progress, "sweep")  # pylint: disable=protected-access
  for r in bar:
    eval_time = train_time = 0.0
    if r % config.eval_gap == 0:
      t0 = time.perf_counter()
      metrics_list = sweeper.evaluate(server_state, client_states, roots, r)
      eval_time = time.perf_counter() - t0
      record(metrics_list, r)
      accs = ", ".join(f"{m['test_acc']:.4f}" for m in metrics_list)
      getattr(bar, "write", log)(f"round {r:4d} | test_acc per combination: {accs}")
    if r < config.global_rounds and not all(stopped):
      t0 = time.perf_counter()
      server_state, client_states, round_metrics = sweeper.run_round(
          server_state, client_states, roots, r)
      jax.block_until_ready((server_state, client_states))
      train_time = time.perf_counter() - t0
      num_bad = np.asarray(round_metrics["num_nonfinite"])
      for s in np.flatnonzero(num_bad):
        if stopped[s] is None and config.on_nan == "stop":
          stopped[s] = f"round {r}: non-finite update(s); stopped this combination"
    train_times.append(train_time)
    eval_times.append(eval_time)
    if all(stopped):
      break
  final = sweeper.evaluate(server_state, client_states, roots, r, final=True)
  if final is not None:
    record(final, r)
  total = time.perf_counter() - start
  round_times = [t + e for t, e in zip(train_times, eval_times)]
  mean_round = float(np.mean(round_times[1:] or round_times))

  runs, files = [], {}
  for s, (combo, cfg, history) in enumerate(zip(combos, configs, histories)):
    acc = history["test_acc"]
    run_base = os.path.join(out_dir, f"{base}_{s}")
    payload = {"config": cfg.to_dict(), "sweep": config.sweep, "combination": combo,
               "index": s, "seed": cfg.seed, "algorithm": engine.algorithm.name,
               "executor": engine.executor, "backend": jax.default_backend(),
               "jax_version": jax.__version__, **history,
               "round_time_s": round_times, "train_time_s": train_times,
               "eval_time_s": eval_times, "best_test_acc": max(acc), "last_test_acc": acc[-1],
               "mean_round_time_s": mean_round, "total_time_s": total,
               "round_time_note": "time of one round of all combinations together"}
    if stopped[s]:
      payload["stopped"] = stopped[s]
    run_files = {"json": run_base + ".json", "h5": run_base + ".h5", "png": run_base + ".png"}
    results_lib.write_json(run_files["json"], payload)
    results_lib.write_h5(run_files["h5"], history)
    label = ", ".join(f"{k}={v}" for k, v in combo.items())
    results_lib.write_plot(run_files["png"], history, f"{engine.algorithm.name} on {tag} ({label})")
    runs.append(runner_lib.RunResult(seed=cfg.seed, history=history,
                                     best_test_acc=float(max(acc)),
                                     last_test_acc=float(acc[-1]), mean_round_time_s=mean_round,
                                     total_time_s=total, files=run_files))
  summary = summarize(combos, runs)
  files["summary_json"] = os.path.join(out_dir, f"{base}_summary.json")
  files["summary_md"] = os.path.join(out_dir, f"{base}_summary.md")
  results_lib.write_json(files["summary_json"], {
      "config": config.to_dict(), "combinations": combos, "rows": summary,
      "mean_round_time_s": mean_round, "total_time_s": total})
  results_lib.write_text(files["summary_md"], "\n".join(summary_table(summary)) + "\n")
  results_lib.write_json(os.path.join(out_dir, f"{base}_partition.json"), data.summary())
  return SweepResults(config=config, combos=combos, runs=runs, summary=summary,
                      out_dir=out_dir, files=files, mean_round_time_s=mean_round,
                      total_time_s=total)
