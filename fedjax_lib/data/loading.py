"""`load_federated`: one entry point from a dataset name or a PFLlib folder to `FederatedData`."""

from __future__ import annotations

import os

from fedjax_lib.data import sources
from fedjax_lib.data.federated import FederatedData
from fedjax_lib.data.partition import build_federated
from fedjax_lib.data.partition import DEFAULT_MAX_RETRIES
from fedjax_lib.data.pfllib_format import read_pfllib_folder
from fedjax_lib.errors import DataError

DEFAULT_NUM_CLIENTS = 20


def is_folder_path(dataset: str) -> bool:
  """Whether ``dataset`` names a path: it contains a path separator or exists on disk."""
  separators = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
  return any(sep in dataset for sep in separators) or os.path.exists(dataset)


def load_federated(dataset: str, *, num_clients: int | None = None,
                   num_classes: int | None = None, scheme: str = "dir", alpha: float = 0.1,
                   class_per_client: int = 2, balance: bool = False,
                   train_ratio: float = 0.75, batch_size: int = 10, seed: int = 0,
                   max_retries: int = DEFAULT_MAX_RETRIES, pfllib_rng: bool = False,
                   rebalance: bool = False) -> FederatedData:
  """Builds a federated dataset from a built-in name or reads a PFLlib folder.

  * A path (contains a path separator, or exists on disk) is read with `read_pfllib_folder`;
    it is already partitioned, so the partition arguments are ignored and ``num_clients=None``
    means "as many as the folder has".
  * Otherwise ``dataset`` is a `sources.BUILTIN_DATASETS` name (case-insensitive; PFLlib
    spellings such as ``MNIST``, ``Cifar10`` work), partitioned by `build_federated` with
    ``num_clients`` defaulting to 20.

  Args:
    dataset: built-in name or folder path.
    num_clients: number of clients (see above).
    num_classes: expected number of classes; a built-in dataset with a different count is an
      error.
    scheme: ``"iid"``, ``"pat"``, ``"dir"`` or ``"exdir"``.
    alpha: Dirichlet concentration (``dir``/``exdir``).
    class_per_client: labels per client (``pat``/``exdir``).
    balance: equal shares for ``iid``/``pat``.
    train_ratio: per-client train fraction.
    batch_size: batch size, used for the minimum client size.
    seed: partition seed.
    max_retries: cap on Dirichlet redraws.
    pfllib_rng: draw from ``np.random.RandomState(seed)`` as PFLlib's scripts do.
    rebalance: move samples to clients below the minimum size instead of failing (see
      `partition.rebalance_pools`).

  Returns:
    The `FederatedData`.

  Raises:
    DataError: unknown name, bad folder, class-count mismatch; `PartitionError` for bad
      partition settings.
  """
  if is_folder_path(dataset):
    return read_pfllib_folder(dataset, num_clients=num_clients, num_classes=num_classes)
  key = sources.resolve_builtin(dataset)
  if key is None:
    raise DataError(f"unknown dataset {dataset!r}; built-in datasets are "
                    f"{', '.join(sources.BUILTIN_DATASETS)} (case-insensitive), or give the "
                    "path of a PFLlib dataset folder (with train/ and test/)")
  x, y, data_classes = sources.BUILTIN_DATASETS[key]()
  if num_classes is not None and num_classes != data_classes:
    raise DataError(f"num_classes={num_classes} but dataset {dataset!r} has {data_classes} "
                    f"classes; pass {data_classes} or leave it unset")
  return build_federated(
      key, x, y, data_classes,
      DEFAULT_NUM_CLIENTS if num_clients is None else num_clients, scheme, seed,
      pfllib_rng=pfllib_rng, train_ratio=train_ratio, balance=balance, alpha=alpha,
      class_per_client=class_per_client, batch_size=batch_size, max_retries=max_retries,
      rebalance=rebalance)
