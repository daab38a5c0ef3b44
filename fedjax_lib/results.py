"""Results files: a JSON per run, PFLlib-compatible ``.h5``, a PNG of the curves.

An experiment's results files are written as one transaction (:class:`FileSet`): every file
goes to a temporary file in the same folder, and only when all of them are complete are they
renamed over their targets, so an interrupted run, a full disk or a permission error never
leaves a truncated or partial set of results. Files are created with mode ``0666`` minus the
user's umask (readable by teammates in a shared folder when the umask allows it). A process
killed with SIGKILL while it wrote (or by the kernel's out-of-memory killer) leaves its temporary
files behind; the next commit of the same files removes those whose process has ended.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional

import numpy as np

from fedjax_lib.output import create_temp, os_error, remove_stale_temps
from fedjax_lib.stopping import STOPPER


class FileSet:
  """Files written all together or not at all.

  ``add(path, write)`` registers a file and the function that writes it to a given (temporary)
  path; :meth:`commit` writes every temporary file, then renames them onto their targets.
  """

  def __init__(self):
    self._files: list[tuple[str, Callable[[str], None]]] = []

  def add(self, path: str, write: Callable[[str], None]) -> None:
    self._files.append((path, write))

  def commit(self) -> list[str]:
    """Writes every registered file; returns their paths.

    Raises:
      ConfigError: an operating-system error (no space, no permission, ...); then no target
        was created or replaced and no temporary file is left.
    """
    temps: list[str] = []
    with STOPPER.writing():
      for path, _ in self._files:
        remove_stale_temps(path)
      try:
        for path, write in self._files:
          current = path
          temps.append(create_temp(path))
          write(temps[-1])
        for (path, _), tmp in zip(self._files, temps):
          current = path
          os.replace(tmp, path)
      except OSError as e:
        for tmp in temps:
          if os.path.exists(tmp):
            os.remove(tmp)
        raise os_error("write the results file", current, e) from None
    return [path for path, _ in self._files]


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
  with open(path, "w", encoding="utf-8") as f:
    json.dump(_jsonable(payload), f, indent=1)


def write_text(path: str, text: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


def write_h5(path: str, history: dict) -> None:
  """PFLlib's result file: ``rs_test_acc``, ``rs_test_auc`` (filled), ``rs_train_loss``;
  ``rounds``, and ``rs_epsilon`` (``-dp``), ``rs_dlg_psnr`` with ``dlg_rounds`` (``-dlg``)."""
  import h5py  # pylint: disable=import-outside-toplevel
  with h5py.File(path, "w") as f:
    f.create_dataset("rs_test_acc", data=np.asarray(history["test_acc"], np.float64))
    f.create_dataset("rs_test_auc", data=np.asarray(history["test_auc"], np.float64))
    f.create_dataset("rs_train_loss", data=np.asarray(history["train_loss"], np.float64))
    f.create_dataset("rounds", data=np.asarray(history["rounds"], np.int64))
    if "epsilon" in history:  # differential privacy: ε per evaluated round (inf: no noise)
      f.create_dataset("rs_epsilon", data=np.asarray(history["epsilon"], np.float64))
    if "dlg_psnr" in history:  # DLG attack: mean PSNR per attacked round (NaN: none)
      f.create_dataset("rs_dlg_psnr", data=np.asarray(
          [np.nan if v is None else v for v in history["dlg_psnr"]], np.float64))
      f.create_dataset("dlg_rounds", data=np.asarray(history["dlg_rounds"], np.int64))
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
  try:
    fig.savefig(path, format="png", dpi=100)
  finally:
    plt.close(fig)


def image_grid(images, columns: Optional[int] = None, min_side: int = 64,
               gap: int = 2) -> np.ndarray:
  """``uint8 [rows·h', cols·w', 3]``: NHWC images in ``[-1, 1]`` tiled row by row.

  One channel is shown as grey; each image is enlarged by an integer factor (nearest
  neighbour) to at least ``min_side`` pixels; ``gap`` pixels of white separate the tiles.
  """
  arr = np.clip(np.asarray(images, np.float32), -1.0, 1.0)
  if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
    raise ValueError(f"expected images [n, H, W, 1 or 3], got shape {arr.shape}")
  arr = np.round((arr + 1.0) * 127.5).astype(np.uint8)
  if arr.shape[-1] == 1:
    arr = np.repeat(arr, 3, axis=-1)
  n, h, w, _ = arr.shape
  factor = max(1, -(-min_side // max(h, w)))
  arr = arr.repeat(factor, axis=1).repeat(factor, axis=2)
  h, w = h * factor, w * factor
  cols = columns or int(np.ceil(np.sqrt(n)))
  rows = -(-n // cols)
  grid = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, np.uint8)
  for i in range(n):
    r, c = divmod(i, cols)
    grid[r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + w] = arr[i]
  return grid


def write_image_grid(path: str, images, columns: Optional[int] = None,
                     min_side: int = 64) -> None:
  """Writes :func:`image_grid` of ``images`` as a PNG (Pillow, no matplotlib)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  Image.fromarray(image_grid(images, columns, min_side)).save(path, format="PNG")


def warmup_note(runs: list) -> str:
  """Which rounds a mean round time leaves out (``runs``: objects with ``warmup_rounds``):
  round 0 and, after a resume, the first round of each later start (they compile)."""
  rounds = sorted(set(r for run in runs for r in run.warmup_rounds) - {0})
  if not rounds:
    return "round 0, which compiles, excluded"
  return (f"rounds {', '.join(map(str, [0] + rounds[:-1]))} and {rounds[-1]}, the first of "
          "each start, which compile, excluded")
