"""Results files: a JSON per run, PFLlib-compatible ``.h5``, a PNG of the curves.

Every file is written atomically: into a temporary file in the same folder, then renamed over
the target, so an interrupted run never leaves a truncated results file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path next to ``path``; renames it onto ``path`` on success."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
  os.close(fd)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _jsonable(value: Any) -> Any:
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.ndarray):
    return _jsonable(value.tolist())
  if isinstance(value, (np.floating, float)):
    value = float(value)
    return value if np.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  return value


def write_json(path: str, payload: dict) -> None:
  with atomic_path(path) as tmp:
    with open(tmp, "w") as f:
      json.dump(_jsonable(payload), f, indent=1)


def write_text(path: str, text: str) -> None:
  with atomic_path(path) as tmp:
    with open(tmp, "w") as f:
      f.write(text)


def write_h5(path: str, history: dict) -> None:
  """PFLlib's result file: ``rs_test_acc``, ``rs_test_auc`` (filled), ``rs_train_loss``."""
  import h5py  # pylint: disable=import-outside-toplevel
  with atomic_path(path) as tmp:
    with h5py.File(tmp, "w") as f:
      f.create_dataset("rs_test_acc", data=np.asarray(history["test_acc"], np.float64))
      f.create_dataset("rs_test_auc", data=np.asarray(history["test_auc"], np.float64))
      f.create_dataset("rs_train_loss", data=np.asarray(history["train_loss"], np.float64))
      f.create_dataset("rounds", data=np.asarray(history["rounds"], np.int64))
      for key in sorted(history):  # per-view columns, e.g. rs_test_acc_personal
        if key.startswith(("test_acc_", "test_auc_")) and not key.endswith("_std"):
          f.create_dataset(f"rs_{key}", data=np.asarray(history[key], np.float64))


def write_plot(path: str, history: dict, title: str) -> None:
  """Test accuracy / AUC and train loss against the round number."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
  rounds = history["rounds"]
  ax_acc.plot(rounds, history["test_acc"], label="test accuracy")
  ax_acc.plot(rounds, history["test_auc"], label="test AUC", alpha=0.6)
  ax_acc.set_xlabel("round")
  ax_acc.set_ylim(0, 1)
  ax_acc.legend()
  ax_acc.grid(alpha=0.3)
  ax_loss.plot(rounds, history["train_loss"], color="tab:red")
  ax_loss.set_xlabel("round")
  ax_loss.set_ylabel("train loss")
  ax_loss.grid(alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  with atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=100)
  plt.close(fig)
