"""`FederatedData`: every sample once, plus per-client index tables.

All samples of a federated dataset live in one flat array ``x`` (NHWC images or flat
features) with labels ``y``. Each client owns rows of that array through padded index
tables: ``train_idx[i, :train_count[i]]`` are client ``i``'s training rows, and likewise for
test. Padding entries point at row 0 and are never used without their mask. The arrays are
moved to the accelerator once per run; batches are gathered by index inside compiled code, so
nothing is re-read from disk during a run.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from fedjax_lib.data.quantized import QuantizedImages
from fedjax_lib.errors import DataError

#: Keys of `FederatedData.summary` (a run's ``<...>_partition.json``) that no config or results
#: file has: ``--config`` names such a file for what it is (`fedjax_lib.cli.load_config_file`).
SUMMARY_MARKERS = frozenset({"samples_per_label", "train_samples"})


def _pad_table(lists: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  counts = np.array([len(ix) for ix in lists], dtype=np.int32)
  width = max(int(counts.max()) if len(counts) else 0, 1)
  table = np.zeros((len(lists), width), dtype=np.int32)
  for i, ix in enumerate(lists):
    table[i, : len(ix)] = ix
  return table, counts


@dataclasses.dataclass(frozen=True)
class FederatedData:
  """A federated dataset held in memory (numpy on the host; see `runner` for device copies).

  Attributes:
    name: dataset name (for results files).
    x: ``[num_samples, ...]`` float32 features (images NHWC), or a `QuantizedImages` (uint8
      pixels that read as float32 when indexed: the tfds image sets).
    y: ``[num_samples]`` int32 labels in ``[0, num_classes)``.
    train_idx: ``[num_clients, max_train]`` int32 rows of each client's training samples.
    train_count: ``[num_clients]`` int32 number of valid entries in ``train_idx``.
    test_idx: ``[num_clients, max_test]`` int32, as ``train_idx`` for test samples.
    test_count: ``[num_clients]`` int32.
    num_classes: number of classes.
  """

  name: str
  x: np.ndarray
  y: np.ndarray
  train_idx: np.ndarray
  train_count: np.ndarray
  test_idx: np.ndarray
  test_count: np.ndarray
  num_classes: int

  @property
  def num_clients(self) -> int:
    return int(self.train_idx.shape[0])

  @property
  def sample_shape(self) -> tuple[int, ...]:
    return tuple(self.x.shape[1:])

  @classmethod
  def from_client_indices(cls, name: str, x: np.ndarray, y: np.ndarray,
                          train_lists: Sequence[np.ndarray],
                          test_lists: Sequence[np.ndarray],
                          num_classes: int) -> "FederatedData":
    """Builds the padded tables from per-client lists of row indices, validating the data.

    ``x`` is converted to float32, except a `QuantizedImages` (uint8 pixels, finite by
    construction), which is kept as it is."""
    if not isinstance(x, QuantizedImages):
      x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y)
    if len(train_lists) != len(test_lists):
      raise DataError(f"got {len(train_lists)} train clients but {len(test_lists)} test "
                      "clients; every client needs both")
    if len(train_lists) == 0:
      raise DataError(f"dataset {name!r} has no clients; at least 1 is needed")
    if x.shape[0] != y.shape[0]:
      raise DataError(f"dataset {name!r}: {x.shape[0]} samples but {y.shape[0]} labels")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
      raise DataError(f"dataset {name!r} has labels in [{int(y.min())}, {int(y.max())}] but "
                      f"num_classes={num_classes}; labels must lie in [0, {num_classes - 1}] "
                      f"(set num_classes to at least {int(y.max()) + 1})")
    if not isinstance(x, QuantizedImages) and not np.all(np.isfinite(x)):
      raise DataError(f"dataset {name!r} has non-finite (NaN or inf) feature values")
    train_idx, train_count = _pad_table(train_lists)
    test_idx, test_count = _pad_table(test_lists)
    return cls(name=name, x=x, y=y.astype(np.int32), train_idx=train_idx,
               train_count=train_count, test_idx=test_idx, test_count=test_count,
               num_classes=int(num_classes))

  def few_shot(self, shots: int) -> "FederatedData":
    """A copy whose clients keep the first ``shots`` training samples of each class, in
    their order (HtFLlib's ``-fs``); test sets are unchanged."""
    lists = []
    for i in range(self.num_clients):
      rows = self.train_idx[i, : self.train_count[i]]
      seen = np.zeros(self.num_classes, np.int64)
      keep = []
      for row in rows:
        label = self.y[row]
        if seen[label] < shots:
          seen[label] += 1
          keep.append(row)
      lists.append(np.asarray(keep, np.int32))
    train_idx, train_count = _pad_table(lists)
    return dataclasses.replace(self, train_idx=train_idx, train_count=train_count)

  def client_arrays(self, client: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(x, y)`` of one client's train or test samples (host copies)."""
    idx, count = ((self.train_idx, self.train_count) if split == "train"
                  else (self.test_idx, self.test_count))
    rows = idx[client, : count[client]]
    return self.x[rows], self.y[rows]

  def label_counts(self) -> np.ndarray:
    """``[num_clients, num_classes]`` samples per label per client (train + test)."""
    counts = np.zeros((self.num_clients, self.num_classes), dtype=np.int64)
    for i in range(self.num_clients):
      for idx, n in ((self.train_idx, self.train_count), (self.test_idx, self.test_count)):
        counts[i] += np.bincount(self.y[idx[i, : n[i]]], minlength=self.num_classes)
    return counts

  def summary(self) -> dict:
    """A JSON-serialisable description: per-client sizes and samples per label (its keys
    include `SUMMARY_MARKERS`, by which ``--config`` recognises such a file)."""
    counts = self.label_counts()
    return {
        "dataset": self.name,
        "num_clients": self.num_clients,
        "num_classes": self.num_classes,
        "sample_shape": list(self.sample_shape),
        "train_samples": self.train_count.tolist(),
        "test_samples": self.test_count.tolist(),
        "samples_per_label": [
            {str(c): int(counts[i, c]) for c in range(self.num_classes) if counts[i, c]}
            for i in range(self.num_clients)
        ],
    }
