"""Sweeps: every combination of seeds and numeric hyperparameters, advanced side by side.

``Config(sweep={"seed": [0, 1, 2], "learning_rate": [0.01, 0.005]})`` (CLI: ``--sweep
seed=0,1,2 lr=0.01,0.005``) runs the 6 combinations in the runner's one run loop
(`fedjax_lib.runner`), as S = 6 runs in lockstep: stacked on a leading axis of one compiled
round with the vmap or chunked executor, or one after another round by round with the
sequential executor (XLA:CPU, where it is faster). This module only defines the combinations.

How a hyperparameter becomes an array: the algorithm of each combination is built exactly as a
separate run would build it (so derived values follow, e.g. PerAvg's β = learning rate); the
numeric fields that differ between those algorithms become the runs' hyperparameter values
(:func:`swept_values`), passed to every compiled program as an argument and bound to the
algorithm while tracing (`Algorithm.with_hyperparameter_values`). A field that sets shapes or
loop lengths (epochs, batch size, an integer) cannot be an array and is refused with an error
naming it.

Seeds: combination ``seed = s`` uses root key ``s``; the partition is drawn once, from
``partition_seed`` (default: ``config.seed``), so every combination sees the same clients — as
``-t`` repetitions do. A separate run with ``--seed s --partition-seed <the same>`` gives the
same numbers (tested).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import numpy as np

from fedjax_lib import results as results_lib
from fedjax_lib.config import Config
from fedjax_lib.errors import ConfigError

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
    elif name.startswith("algo_"):  # PFLlib's -al is the algorithm's alpha, not the data's
      params[name[len("algo_"):]] = value
    elif name in fields:
      hint = " (the algorithm's α, PFLlib's -al: al=...)" if name == "alpha" else ""
      raise ConfigError(f"sweep {name}: only seed, learning_rate and numeric algorithm "
                        f"hyperparameters can be swept, not the config field {name!r}{hint}")
    else:
      params[name] = value
  return config.replace(algo_params=params, **changes)


def swept_values(algorithms: list, names: list[str]) -> dict[str, np.ndarray]:
  """The fields that differ between the combinations' algorithms, as ``{path: [S] float32}``.

  Raises:
    ConfigError: a differing field is not a float (it sets shapes or control flow).
  """
  per_algo = [a.hyperparameter_values() for a in algorithms]
  values = {}
  for path, first in per_algo[0].items():
    column = [fields[path] for fields in per_algo]
    if all(_same(v, first) for v in column):
      continue
    if not all(isinstance(v, float) for v in column):
      raise ConfigError(
          f"sweep over {', '.join(names)}: the algorithm field {path} takes the "
          f"values {column!r}, which cannot be one compiled program (only floating-point "
          "hyperparameters can be swept); run those settings separately")
    values[path] = np.asarray(column, np.float32)
  return values


def _same(a, b) -> bool:
  try:
    return bool(a == b) and type(a) is type(b)
  except Exception:  # pylint: disable=broad-except
    return a is b


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
  warnings: list = dataclasses.field(default_factory=list)

  def summary_lines(self) -> list[str]:
    return summary_table(self.summary) + [
        f"{len(self.combos)} combinations side by side: {self.mean_round_time_s:.3f} "
        f"s per round for all of them ({results_lib.warmup_note(self.runs)}); total "
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
