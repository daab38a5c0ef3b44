"""Feature-shift and natural-split federated datasets: clients are domains, not label shares.

**Feature shift** (PFLlib's ``generate_DomainNet.py`` / ``generate_Digit5.py``): every
domain's official train and test splits are merged, and each domain is one client, so clients
differ in what their images look like (clipart vs photos; MNIST vs SVHN) while sharing the
label set. With ``k`` clients per domain (``num_clients = k · D``) each domain's samples are
shuffled and cut into ``k`` near-equal IID shares. Clients are numbered domain-major: client
``i`` belongs to domain ``i // k`` of the spec's domain order.

**Natural split** (PFLlib's ``generate_Omniglot.py``): Omniglot's 20 clients are its 20
drawers; the label is the alphabet (50 classes). tfds does not keep the drawer id, and
PFLlib's script takes the ``i``-th file of each character folder in ``os.listdir`` order
(arbitrary), so here client ``j`` receives the ``j``-th drawing of every character in the
order tfds stores them: as in PFLlib, each client holds one drawing of each of the 1,623
characters.

Then, as PFLlib's ``split_data``, each client's pool is split 75/25 into train and test
(`partition.split_train_test`); all randomness (domain caps, IID shares, splits) comes from
``np.random.default_rng(seed)``, or ``RandomState(seed)`` with ``pfllib_rng``.

Deliberate differences from PFLlib:

* Digit5's mnistm, syn and usps domains are not in tfds: ``digits-fs`` uses the digit
  domains tfds has (mnist, svhn_cropped, and EMNIST digits transposed upright); PFLlib's
  own Digit5 folder can be passed as a path.
* DomainNet's frozen train augmentation is drawn from a seeded numpy generator.
* ``domainnet10`` (FedBN's 10 classes) is offered beside PFLlib's 345-class ``domainnet``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from fedjax_lib.data import registry
from fedjax_lib.data import tfds_arrays
from fedjax_lib.data.federated import FederatedData
from fedjax_lib.data.partition import Rng
from fedjax_lib.data.quantized import QuantizedImages
from fedjax_lib.data.partition import split_train_test
from fedjax_lib.errors import DataError


def _rng(seed: int, pfllib_rng: bool) -> Rng:
  return np.random.RandomState(seed) if pfllib_rng else np.random.default_rng(seed)


def clients_per_domain(spec: registry.DatasetSpec, num_clients: Optional[int]) -> int:
  """``k`` for ``num_clients`` (``None``: one client per domain).

  Raises:
    DataError: ``num_clients`` is not a positive multiple of the number of domains.
  """
  num_domains = len(spec.domains)
  if num_clients is None:
    return 1
  if num_clients < 1 or num_clients % num_domains:
    raise DataError(f"{spec.name} has {num_domains} domains "
                    f"({', '.join(d.name for d in spec.domains)}), one client each by "
                    f"default; num_clients must be a multiple of {num_domains} (k clients per "
                    f"domain, split IID), got {num_clients}")
  return num_clients // num_domains


def _select_rows(spec: registry.DatasetSpec, arrays, rng: Rng) -> tuple[np.ndarray, np.ndarray]:
  """Rows of one domain's arrays that the spec keeps, and their labels."""
  rows = np.arange(len(arrays["y"]))
  labels = arrays["y"].astype(np.int32)
  if spec.classes is not None:
    names = [str(n) for n in arrays["label_names"]]
    missing = [c for c in spec.classes if c not in names]
    if missing:
      raise DataError(f"{spec.name}: classes {missing} are not in the tfds label names")
    relabel = np.full(len(names), -1, np.int32)
    relabel[[names.index(c) for c in spec.classes]] = np.arange(len(spec.classes))
    rows = rows[relabel[labels] >= 0]
    labels = relabel[labels]
  if spec.domain_cap is not None:
    max_train, max_test = spec.domain_cap
    split = arrays["split"][rows]
    train_rows = rows[split == 0]
    train_rows = train_rows[rng.permutation(train_rows.size)][:max_train]
    test_rows = rows[split == 1][:max_test]
    rows = np.concatenate([train_rows, test_rows])
  return rows, labels[rows]


def load_feature_shift(name: str, *, data_dir: Optional[str] = None,
                       num_clients: Optional[int] = None, train_ratio: float = 0.75,
                       seed: int = 0, pfllib_rng: bool = False) -> FederatedData:
  """A feature-shift dataset (registry kind ``domains``) as a `FederatedData`.

  Args:
    name: ``domainnet``, ``domainnet10``, ``digits-fs`` (any accepted spelling).
    data_dir: tfds data directory (and cache location).
    num_clients: ``None`` (one client per domain) or ``k ·`` the number of domains.
    train_ratio: each client's train fraction.
    seed: seed of the domain caps, IID shares and train/test splits.
    pfllib_rng: draw from ``np.random.RandomState(seed)`` as PFLlib's scripts do.

  Returns:
    The dataset; client ``i`` holds domain ``i // k``'s share ``i % k``.

  Raises:
    DataError: not a feature-shift name, bad ``num_clients``, or tfds cannot provide a domain.
  """
  spec = registry.resolve(name)
  if spec is None or spec.kind != "domains":
    raise DataError(f"{name!r} is not a feature-shift dataset; those are: "
                    f"{', '.join(s.name for s in registry.SPECS if s.kind == 'domains')}")
  shares = clients_per_domain(spec, num_clients)
  rng = _rng(seed, pfllib_rng)
  xs, ys, pools, offset = [], [], [], 0
  for domain in spec.domains:
    arrays = tfds_arrays.image_arrays(domain.tfds_name, domain.splits, spec.shape,
                                      data_dir=data_dir, upright=domain.upright,
                                      augment=spec.train_augment,
                                      num_classes=None if spec.classes else spec.num_classes)
    rows, labels = _select_rows(spec, arrays, rng)
    indices = offset + np.arange(rows.size, dtype=np.int64)
    if shares == 1:
      pools.append(indices)
    else:
      pools.extend(np.array_split(indices[rng.permutation(indices.size)], shares))
    xs.append(arrays["x"][rows])
    ys.append(labels)
    offset += rows.size
  x = QuantizedImages(np.concatenate(xs), spec.value_range)
  y = np.concatenate(ys)
  train_lists, test_lists = split_train_test(pools, rng, train_ratio)
  return FederatedData.from_client_indices(spec.name, x, y, train_lists, test_lists,
                                           spec.num_classes)


def drawing_ranks(characters: np.ndarray) -> np.ndarray:
  """``r[n]`` = how many earlier rows share row ``n``'s character (0 for the first)."""
  characters = np.asarray(characters)
  order = np.argsort(characters, kind="stable")
  sorted_chars = characters[order]
  starts = np.flatnonzero(np.r_[True, sorted_chars[1:] != sorted_chars[:-1]])
  group_start = np.repeat(starts, np.diff(np.r_[starts, sorted_chars.size]))
  ranks = np.empty(characters.size, np.int64)
  ranks[order] = np.arange(characters.size) - group_start
  return ranks


def load_natural(name: str, *, data_dir: Optional[str] = None,
                 num_clients: Optional[int] = None, train_ratio: float = 0.75,
                 seed: int = 0, pfllib_rng: bool = False) -> FederatedData:
  """A natural-split dataset (registry kind ``natural``: Omniglot) as a `FederatedData`.

  Client ``j`` (of 20) holds the drawings whose rank among their character's drawings is
  ``j`` (mod 20); see the module docstring.

  Raises:
    DataError: not a natural-split name, or ``num_clients`` other than ``None``/20.
  """
  spec = registry.resolve(name)
  if spec is None or spec.kind != "natural":
    raise DataError(f"{name!r} is not a natural-split dataset; those are: "
                    f"{', '.join(s.name for s in registry.SPECS if s.kind == 'natural')}")
  count = spec.num_natural_clients
  if num_clients not in (None, count):
    raise DataError(f"{spec.name} has a natural split into {count} clients (its drawers); "
                    f"num_clients must be {count} or unset, got {num_clients}")
  arrays = tfds_arrays.image_arrays(spec.tfds_name, spec.splits, spec.shape,
                                    data_dir=data_dir, label_key="alphabet",
                                    extra_keys={"character": "label"},
                                    num_classes=spec.num_classes)
  client_of = drawing_ranks(arrays["character"]) % count
  pools = [np.flatnonzero(client_of == j) for j in range(count)]
  train_lists, test_lists = split_train_test(pools, _rng(seed, pfllib_rng), train_ratio)
  x = QuantizedImages(arrays["x"], spec.value_range)
  return FederatedData.from_client_indices(spec.name, x, arrays["y"], train_lists,
                                           test_lists, spec.num_classes)
