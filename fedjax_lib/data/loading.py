"""`load_federated`: one entry point from a dataset name or a PFLlib folder to `FederatedData`.

A name is looked up in `registry` and routed by its kind: centralised datasets (bundled,
synthetic, tfds images, tfds text) are partitioned with `build_federated`; feature-shift and
natural-split datasets come already split into clients (`feature_shift`); PFLlib datasets
tfds lacks are read from PFLlib's folder where one is found (`find_pfllib_folder`: PFLlib's
own ``../dataset/<Folder>``, as seen from its ``system/`` directory), else raise a
`DataError` naming the PFLlib script that generates it.
"""

from __future__ import annotations

import os

from fedjax_lib.data import feature_shift
from fedjax_lib.data import registry
from fedjax_lib.data import sources
from fedjax_lib.data import tfds_arrays
from fedjax_lib.data.federated import FederatedData
from fedjax_lib.data.partition import build_federated
from fedjax_lib.data.partition import DEFAULT_MAX_RETRIES
from fedjax_lib.data.pfllib_format import CONFIG_FILE
from fedjax_lib.data.pfllib_format import read_pfllib_folder
from fedjax_lib.errors import DataError

DEFAULT_NUM_CLIENTS = 20


def is_folder_path(dataset: str) -> bool:
  """Whether ``dataset`` names a path: it contains a path separator or exists on disk."""
  separators = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
  return any(sep in dataset for sep in separators) or os.path.exists(dataset)


def default_num_clients(dataset: str) -> int | None:
  """The client count a run uses when none is given: ``None`` ("as many as the data has")
  for a PFLlib folder (a path, or a ``pfllib-folder`` name), a feature-shift dataset (one
  client per domain) or a natural split (Omniglot: 20); `DEFAULT_NUM_CLIENTS` (20) for a
  centralised dataset."""
  if is_folder_path(dataset):
    return None
  spec = registry.resolve(dataset)
  if spec is not None and spec.kind in ("domains", "natural", "pfllib-folder"):
    return None
  return DEFAULT_NUM_CLIENTS


def pfllib_folder_candidates(spec: registry.DatasetSpec,
                             data_dir: str | None = None) -> list[str]:
  """Where `load_federated` looks for a ``pfllib-folder`` dataset's folder, in order:
  ``<data_dir>/<Folder>`` (when ``data_dir`` is given), then PFLlib's own
  ``../dataset/<Folder>`` relative to the current directory (PFLlib runs from its
  ``system/`` directory). ``<Folder>`` is the spec's ``pfllib_folder`` (``HAR``,
  ``TinyImagenet`` ...)."""
  candidates = [os.path.join(data_dir, spec.pfllib_folder)] if data_dir else []
  return candidates + [os.path.join(os.pardir, "dataset", spec.pfllib_folder)]


def find_pfllib_folder(spec: registry.DatasetSpec, data_dir: str | None = None) -> str | None:
  """The first of `pfllib_folder_candidates` that is a directory, or ``None``."""
  return next((path for path in pfllib_folder_candidates(spec, data_dir)
               if os.path.isdir(path)), None)


def unknown_dataset_error(dataset: str) -> DataError:
  """The one-line error for a name no loader knows."""
  return DataError(f"unknown dataset {dataset!r}; datasets are {', '.join(registry.names())} "
                   "(case-insensitive; --list-datasets describes them), or give the path of a "
                   "PFLlib dataset folder (with train/ and test/)")


def load_federated(dataset: str, *, num_clients: int | None = None,
                   num_classes: int | None = None, scheme: str = "dir", alpha: float = 0.1,
                   class_per_client: int = 2, balance: bool = False,
                   train_ratio: float = 0.75, batch_size: int = 10, seed: int = 0,
                   max_retries: int = DEFAULT_MAX_RETRIES, pfllib_rng: bool = False,
                   rebalance: bool = False, data_dir: str | None = None) -> FederatedData:
  """Builds a federated dataset from a built-in name or reads a PFLlib folder.

  * A path (contains a path separator, or exists on disk) is read with `read_pfllib_folder`;
    it is already partitioned, so the partition arguments are ignored and ``num_clients=None``
    means "as many as the folder has".
  * A centralised dataset name (`registry` kinds ``builtin``, ``tfds``, ``text``;
    case-insensitive, PFLlib spellings such as ``MNIST``, ``Cifar10``, ``AGNews`` work) is
    loaded (tfds sets: converted once and cached under ``data_dir``) and partitioned by
    `build_federated` with ``num_clients`` defaulting to 20.
  * A feature-shift name (``domainnet``, ``domainnet10``, ``digits-fs``) gives one client per
    domain (``num_clients=None``) or ``k`` IID shares per domain (``num_clients = k · D``);
    a natural split (``omniglot``) its 20 drawers. The partition arguments other than
    ``train_ratio``, ``seed`` and ``pfllib_rng`` do not apply to them.
  * A name only PFLlib's generators make (`registry` kind ``pfllib-folder``: ``har``,
    ``femnist``, ``shakespeare``, ``tiny_imagenet`` ...) is read from its PFLlib folder,
    ``<data_dir>/<Folder>`` or, as PFLlib's ``system/main.py`` does, ``../dataset/<Folder>``
    (`find_pfllib_folder`); without a config.json (Shakespeare) ``num_classes`` defaults
    to the registry's count (80) rather than the largest label + 1.

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
    data_dir: tfds data directory, also where converted arrays are cached (``None``:
      ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``); also searched for PFLlib folders.

  Returns:
    The `FederatedData`.

  Raises:
    DataError: unknown name, bad folder, a ``pfllib-folder`` name whose folder is in none
      of the places searched, class-count mismatch; `PartitionError` for bad partition
      settings.
  """
  if is_folder_path(dataset):
    return read_pfllib_folder(dataset, num_clients=num_clients, num_classes=num_classes)
  spec = registry.resolve(dataset)
  if spec is None:
    raise unknown_dataset_error(dataset)
  if not spec.available:
    return _read_named_folder(dataset, spec, num_clients, num_classes, data_dir)
  if spec.kind != "builtin":  # known before anything is downloaded or converted
    _check_num_classes(dataset, num_classes, spec.num_classes)
  if spec.kind in ("domains", "natural"):
    load = {"domains": feature_shift.load_feature_shift,
            "natural": feature_shift.load_natural}[spec.kind]
    return load(spec.name, data_dir=data_dir, num_clients=num_clients,
                train_ratio=train_ratio, seed=seed, pfllib_rng=pfllib_rng)
  if spec.kind == "builtin":
    x, y, data_classes = sources.BUILTIN_DATASETS[spec.builtin_key]()
    _check_num_classes(dataset, num_classes, data_classes)
  else:
    x, y, data_classes = tfds_arrays.load_arrays(spec.name, data_dir)
  return build_federated(
      spec.name, x, y, data_classes,
      DEFAULT_NUM_CLIENTS if num_clients is None else num_clients, scheme, seed,
      pfllib_rng=pfllib_rng, train_ratio=train_ratio, balance=balance, alpha=alpha,
      class_per_client=class_per_client, batch_size=batch_size, max_retries=max_retries,
      rebalance=rebalance)


def _check_num_classes(dataset: str, expected: int | None, found: int) -> None:
  if expected is not None and expected != found:
    raise DataError(f"num_classes={expected} but dataset {dataset!r} has {found} "
                    f"classes; pass {found} or leave it unset")


def _read_named_folder(dataset: str, spec: registry.DatasetSpec, num_clients: int | None,
                       num_classes: int | None, data_dir: str | None) -> FederatedData:
  """A ``pfllib-folder`` dataset from the first folder `find_pfllib_folder` finds."""
  folder = find_pfllib_folder(spec, data_dir)
  if folder is None:
    looked = " or ".join(repr(os.path.abspath(path))
                         for path in pfllib_folder_candidates(spec, data_dir))
    raise DataError(f"no PFLlib folder for dataset {dataset!r} ({spec.source}) at {looked}; "
                    f"{registry.folder_hint(spec)}")
  if num_classes is None and not os.path.exists(os.path.join(folder, CONFIG_FILE)):
    num_classes = spec.num_classes  # PFLlib's count, not the largest label seen + 1
  return read_pfllib_folder(folder, num_clients=num_clients, num_classes=num_classes,
                            name=spec.name)
