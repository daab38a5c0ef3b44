"""PFLlib's label-skew partitioners and per-client train/test split, on an explicit generator.

A partition maps the ``N`` samples of a centralised dataset (labels ``y``, ``C`` classes) to
``K`` clients. The schemes follow PFLlib's ``dataset/utils/dataset_utils.py``:

* ``iid``: the pathological routine with every class allowed (``class_per_client = C``).
* ``pat`` (pathological): each client receives samples of at most ``class_per_client``
  labels, assigned round-robin by client id.
* ``dir`` (practical): per class ``k``, proportions ``p ~ Dir(alpha · 1_K)`` split that class
  across clients; redrawn until every client holds at least ``least_samples``.
* ``exdir`` (extended Dirichlet, arXiv 2311.03154): each client first draws
  ``class_per_client`` labels it may hold, then ``dir`` restricted to those labels.

The minimum client size is PFLlib's

.. math::  \\text{least\\_samples} = \\lfloor \\min(B / (1 - r),\\ N / K / 2) \\rfloor

(batch size ``B``, train ratio ``r``), enough for one test batch per client.

Randomness comes only from the ``rng`` argument, never from numpy's global state. The random
calls (``shuffle``, ``dirichlet``, ``randint``/``integers``, ``choice``, ``permutation``) are
issued in the same order as PFLlib's scripts, so passing ``np.random.RandomState(1)`` instead
of a ``np.random.Generator`` reproduces PFLlib's generated partitions draw for draw (its
scripts call ``np.random.seed(1)``; see ``pfllib_rng`` in `build_federated`), e.g. the per-client
counts of PFLlib's README MNIST Dir(0.1) split, except where a difference below applies.

Deliberate differences from PFLlib (each replaces a hang, a crash, silent garbage or a
lopsided split):

* Dirichlet retries are capped by ``max_retries``; exceeding it raises `PartitionError`
  (PFLlib loops forever, issue #120). With ``rebalance`` (``--rebalance``), a setting no draw
  can satisfy (HtFLlib issue #14: 200 clients at Dir(0.1)) is made to: after
  ``max_retries`` failed draws the last one is kept and, until every client holds the
  minimum, the smallest client receives a random sample (drawn from ``rng``) of the currently
  largest one (`rebalance_pools`). The samples keep their labels, so an ``exdir`` client may
  end up with a few samples of labels it did not draw.
* Balanced ``pat``/``iid`` spread a class's remainder one sample each over the first
  receiving clients, so balanced client sizes differ by at most ``C``; PFLlib gives the whole
  remainder to the last receiving client.
* When every eligible client's Dirichlet proportion underflows to 0 (tiny ``alpha``), the class
  is split uniformly over the eligible clients instead of producing NaN cut points; in
  ``exdir``, when every owner of a label is at the cap, the cap is ignored for that label
  (PFLlib divides by zero there too).
* ``pat`` classes left without any client (possible for some ``K``, ``class_per_client``) are
  reported with a warning; PFLlib drops them silently.
"""

from __future__ import annotations

import math
from typing import Sequence, Union
import warnings

import numpy as np

from fedjax_lib.data.federated import FederatedData
from fedjax_lib.errors import FedJaxWarning, PartitionError

SCHEMES = ("iid", "pat", "dir", "exdir")

# Either API works: Generator (the default) or the legacy RandomState (PFLlib's stream).
Rng = Union[np.random.Generator, np.random.RandomState]

# exdir stops redrawing once every client has this many samples (fixed in PFLlib).
EXDIR_MIN_CLIENT_SIZE = 10

# Cap on Dirichlet redraws. One attempt costs ~0.4 ms for 20 clients and 10 classes. The
# bundled digits (1,797 samples) with 20 clients and Dir(0.1) need least_samples = 40 and
# succeed on ~0.13% of attempts (measured), so 10,000 tries fail for ~4 seeds in a million
# (1,000 would fail for ~30% of seeds), while a hopeless setting still fails in ~4 s.
DEFAULT_MAX_RETRIES = 10_000


def least_samples(num_samples: int, num_clients: int, batch_size: int = 10,
                  train_ratio: float = 0.75) -> int:
  """PFLlib's minimum client size ``int(min(B / (1 - r), N / K / 2))``."""
  return int(min(batch_size / (1 - train_ratio), num_samples / num_clients / 2))


def _randint(rng: Rng, low: int, high: int, size: int) -> np.ndarray:
  """Uniform integers in ``[low, high)``: ``integers`` on a Generator, ``randint`` on RandomState."""
  if isinstance(rng, np.random.RandomState):
    return rng.randint(low, high, size)
  return rng.integers(low, high, size)


def _validate(labels: np.ndarray, num_clients: int, num_classes: int, scheme: str,
              alpha: float, class_per_client: int, batch_size: int, train_ratio: float,
              max_retries: int) -> None:
  if scheme not in SCHEMES:
    raise PartitionError(f"unknown partition scheme {scheme!r}; accepted: "
                         f"{', '.join(SCHEMES)}")
  if labels.ndim != 1:
    raise PartitionError(f"labels must be a 1-D array, got shape {labels.shape}")
  if labels.size and not np.issubdtype(labels.dtype, np.integer):
    raise PartitionError(f"labels must be integers, got dtype {labels.dtype}")
  if num_classes < 1:
    raise PartitionError(f"num_classes must be >= 1, got {num_classes}")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise PartitionError(f"labels lie in [{int(labels.min())}, {int(labels.max())}] but "
                         f"num_classes={num_classes}; labels must be in [0, {num_classes - 1}]")
  if num_clients < 1:
    raise PartitionError(f"num_clients must be >= 1, got {num_clients}")
  if num_clients > labels.size:
    raise PartitionError(f"num_clients={num_clients} exceeds the {labels.size} samples; use "
                         f"at most {labels.size} clients")
  if not (alpha > 0 and math.isfinite(alpha)):
    raise PartitionError(f"alpha must be a finite number > 0, got {alpha}")
  if scheme in ("pat", "exdir") and not 1 <= class_per_client <= num_classes:
    raise PartitionError(f"class_per_client must be in [1, {num_classes}] (num_classes), got "
                         f"{class_per_client}")
  if batch_size < 1:
    raise PartitionError(f"batch_size must be >= 1, got {batch_size}")
  if not 0 < train_ratio < 1:
    raise PartitionError(f"train_ratio must be in (0, 1), got {train_ratio}")
  if max_retries < 1:
    raise PartitionError(f"max_retries must be >= 1, got {max_retries}")


def _pathological(labels: np.ndarray, num_clients: int, num_classes: int,
                  class_per_client: int, balance: bool, min_size: int,
                  rng: Rng) -> list[np.ndarray]:
  """PFLlib's ``pat`` routine (``iid`` is this with ``class_per_client = num_classes``).

  Each client starts with a quota of ``class_per_client`` labels. For class ``i = 0..C-1``
  the receivers are the first ``m = ceil(K / C · class_per_client)`` clients (in id order)
  that still have quota; class ``i``'s samples, in dataset order, are cut into contiguous
  pieces for them and each receiver's quota drops by one. With ``n_i`` samples and ``k``
  receivers, ``q = n_i / k``:

  * balanced: ``floor(q)`` each, the remainder spread one per receiver from the first;
  * unbalanced: the first ``k - 1`` amounts ``~ U{int(max(q / 10, least / C)), …, int(q) - 1}``,
    the last receiver gets the rest.
  """
  pools: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
  quota = np.full(num_clients, class_per_client, dtype=np.int64)
  receivers_per_class = int(np.ceil(num_clients / num_classes * class_per_client))
  all_indices = np.arange(labels.size)
  unassigned_classes = []
  for cls in range(num_classes):
    class_indices = all_indices[labels == cls]
    receivers = np.flatnonzero(quota > 0)[:receivers_per_class]
    if receivers.size == 0:
      unassigned_classes.append(cls)
      continue
    num_in_class = class_indices.size
    share = num_in_class / receivers.size
    if balance:
      amounts = np.full(receivers.size, num_in_class // receivers.size, dtype=np.int64)
      amounts[: num_in_class % receivers.size] += 1
    else:
      low, high = int(max(share / 10, min_size / num_classes)), int(share)
      if receivers.size > 1 and high <= low:
        raise PartitionError(
            f"unbalanced {'pat' if class_per_client < num_classes else 'iid'} partition: "
            f"class {cls} has {num_in_class} samples for {receivers.size} clients, too few to "
            f"draw amounts in [{low}, {high}); use balance=True or fewer clients")
      head = _randint(rng, low, high, receivers.size - 1).astype(np.int64)
      amounts = np.append(head, num_in_class - head.sum())
    offsets = np.concatenate([[0], np.cumsum(amounts)])
    for j, client in enumerate(receivers):
      pools[client].append(class_indices[offsets[j]: offsets[j + 1]])
    quota[receivers] -= 1
  if unassigned_classes:
    dropped = int(np.isin(labels, unassigned_classes).sum())
    warnings.warn(
        f"pat partition with {num_clients} clients, {num_classes} classes and "
        f"class_per_client={class_per_client} leaves classes {unassigned_classes} "
        f"({dropped} samples) without a client; they are left out (as in PFLlib)",
        FedJaxWarning, stacklevel=3)
  return [np.concatenate(p).astype(np.int64) if p else np.zeros(0, np.int64) for p in pools]


def _dirichlet_amounts(num_in_class: int, proportions: np.ndarray,
                       eligible: np.ndarray) -> np.ndarray:
  """Per-client amounts of one class: cut points ``floor(n_k · cumsum(p'))``, ``p' ∝ p · e``.

  Client ``j`` gets the samples between consecutive cut points. The float operations match
  PFLlib's exactly (mask multiply, divide by the sum, cumsum, scale, truncate), so the amounts
  do too; the last client's amount is what the truncated cut points leave. If every eligible
  proportion is 0 (underflow at tiny alpha) the eligible clients share the class uniformly.
  """
  masked = proportions * eligible
  total = masked.sum()
  if not total > 0:
    masked = eligible.astype(np.float64)
    total = masked.sum()
  cuts = np.empty(masked.size + 1, dtype=np.int64)
  cuts[0] = 0
  cuts[1:] = np.cumsum(masked / total) * num_in_class  # truncation, as astype(int)
  cuts[-1] = num_in_class
  return cuts[1:] - cuts[:-1]


def _gather_pools(class_orders: list[np.ndarray],
                  class_amounts: list[np.ndarray]) -> list[np.ndarray]:
  """Client ``j``'s pool: for each class in order, its slice of that class's shuffled indices."""
  num_clients = class_amounts[0].size
  pieces: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
  for order, amounts in zip(class_orders, class_amounts):
    for client, part in enumerate(np.split(order, np.cumsum(amounts)[:-1])):
      pieces[client].append(part)
  return [np.concatenate(p).astype(np.int64) for p in pieces]


def _too_few_error(scheme: str, max_retries: int, smallest: int, required: int,
                   alpha: float, num_clients: int, num_samples: int) -> PartitionError:
  return PartitionError(
      f"{scheme} partition failed after {max_retries} tries: the smallest client got "
      f"{smallest} samples but at least {required} are required ({num_samples} samples over "
      f"{num_clients} clients); use a larger alpha (got {alpha}), fewer clients (got "
      f"{num_clients}), a larger max_retries, or --rebalance (rebalance=True: move random "
      "samples from the largest clients to the smallest until each has the minimum)")


def rebalance_pools(pools: list[np.ndarray], min_size: int, rng: Rng) -> list[np.ndarray]:
  """Moves samples until every pool holds ``min_size``: while some pool is short, the
  smallest pool (lowest index among ties) receives one sample, drawn uniformly from the
  currently largest pool (lowest index among ties) with ``rng``. Pools already at the
  minimum are returned unchanged, and no pool is taken below it.

  Raises:
    PartitionError: the pools hold fewer than ``len(pools) · min_size`` samples.
  """
  total = sum(p.size for p in pools)
  if total < len(pools) * min_size:
    raise PartitionError(f"cannot rebalance {total} samples over {len(pools)} clients to "
                         f"at least {min_size} each; use fewer clients")
  pools = [list(p) for p in pools]
  sizes = np.array([len(p) for p in pools])
  while sizes.min() < min_size:
    small, large = int(np.argmin(sizes)), int(np.argmax(sizes))
    moved = pools[large].pop(int(_randint(rng, 0, sizes[large], 1)[0]))
    pools[small].append(moved)
    sizes[small] += 1
    sizes[large] -= 1
  return [np.asarray(p, dtype=np.int64) for p in pools]


def _dirichlet_attempts(labels: np.ndarray, num_clients: int, num_classes: int, alpha: float,
                        min_size: int, max_retries: int, rng: Rng,
                        owners: np.ndarray | None, scheme: str,
                        rebalance: bool = False) -> list[np.ndarray]:
  """The Dirichlet loop shared by ``dir`` (``owners=None``) and ``exdir``.

  One attempt: for each class ``k`` in order, shuffle its indices, draw
  ``p ~ Dir(alpha · 1_K)``, zero ``p_j`` for every client already holding ``>= N / K``
  samples (and, for ``exdir``, for clients not owning label ``k``), renormalise and cut (see
  `_dirichlet_amounts`). ``exdir`` hands the samples the truncation leaves over to label
  ``k``'s last owner. Attempts repeat until the smallest client holds ``>= min_size``, at
  most ``max_retries`` times; with ``rebalance`` the last draw is then rebalanced.
  """
  num_samples = labels.size
  cap = num_samples / num_clients
  class_indices = [np.flatnonzero(labels == cls) for cls in range(num_classes)]
  concentration = np.repeat(alpha, num_clients)
  smallest = 0
  for attempt in range(max_retries):
    sizes = np.zeros(num_clients, dtype=np.int64)
    orders, amounts_per_class = [], []
    for cls in range(num_classes):
      order = class_indices[cls].copy()
      rng.shuffle(order)
      proportions = rng.dirichlet(concentration)
      if owners is None:
        amounts = _dirichlet_amounts(order.size, proportions, sizes < cap)
      else:
        eligible = owners[cls] & (sizes < cap)
        if not eligible.any():  # every owner is at the cap: ignore the cap for this class
          eligible = owners[cls]
        amounts = _dirichlet_amounts(order.size, proportions, eligible)
        last_owner = int(np.flatnonzero(owners[cls])[-1])
        leftover = amounts[last_owner + 1:].sum()  # truncation leftovers past the last owner
        amounts[last_owner + 1:] = 0
        amounts[last_owner] += leftover
      sizes += amounts
      orders.append(order)
      amounts_per_class.append(amounts)
    smallest = int(sizes.min())
    if smallest >= min_size:
      return _gather_pools(orders, amounts_per_class)
    if rebalance and attempt == max_retries - 1:
      return rebalance_pools(_gather_pools(orders, amounts_per_class), min_size, rng)
  raise _too_few_error(scheme, max_retries, smallest, min_size, alpha, num_clients,
                       num_samples)


def _dirichlet(labels: np.ndarray, num_clients: int, num_classes: int, alpha: float,
               min_size: int, max_retries: int, rng: Rng,
               rebalance: bool = False) -> list[np.ndarray]:
  """PFLlib's ``dir`` routine: Dirichlet label skew with a per-client cap.

  For each class ``k``: shuffle, ``p ~ Dir(alpha · 1_K)``, ``p_j = 0`` for clients holding
  ``>= N / K`` samples, renormalise; client ``j`` gets the slice between cut points
  ``floor(n_k Σ_{i<j} p_i)`` and ``floor(n_k Σ_{i<=j} p_i)`` (the last client takes the
  rest). Redrawn until every client holds ``>= min_size`` samples (at most ``max_retries``
  times).
  """
  return _dirichlet_attempts(labels, num_clients, num_classes, alpha, min_size, max_retries,
                             rng, owners=None, scheme="dir", rebalance=rebalance)


def _extended_dirichlet(labels: np.ndarray, num_clients: int, num_classes: int, alpha: float,
                        class_per_client: int, max_retries: int,
                        rng: Rng, rebalance: bool = False) -> list[np.ndarray]:
  """PFLlib's ``exdir`` routine (two-level label skew, arXiv 2311.03154).

  Level 1: every client draws ``class_per_client`` distinct labels uniformly; redrawn until each
  label has at least ``max(class_per_client · K // C // 2, 1)`` owners. Level 2: as ``dir``, but
  ``p_j`` is non-zero only if client ``j`` owns label ``k`` (and is under the cap ``N / K``);
  samples left over by the truncation go to the label's last owner (highest id). Level 2 repeats
  until every client holds ``>= 10`` samples; finally each client's indices are shuffled.
  """
  min_owners = max(class_per_client * num_clients // num_classes // 2, 1)
  if class_per_client * num_clients < num_classes:  # no draw can give every label an owner
    raise PartitionError(
        f"exdir partition cannot give each of the {num_classes} labels an owning client: "
        f"{num_clients} clients x class_per_client={class_per_client} own "
        f"{num_clients * class_per_client} labels; use class_per_client >= "
        f"{-(-num_classes // num_clients)} (--class-per-client) or at least "
        f"{-(-num_classes // class_per_client)} clients")
  most = 0  # the best draw's fewest owners of a label
  for _ in range(max_retries):
    owners = np.zeros((num_classes, num_clients), dtype=bool)
    for client in range(num_clients):
      owners[rng.choice(num_classes, class_per_client, replace=False), client] = True
    fewest_owners = int(owners.sum(axis=1).min())
    most = max(most, fewest_owners)
    if fewest_owners >= min_owners:
      break
  else:
    raise PartitionError(
        f"exdir partition failed after {max_retries} tries to give every label at least "
        f"{min_owners} owning client{'s' if min_owners > 1 else ''} (best: {most}); use a "
        f"larger class_per_client (got {class_per_client}) or more clients (got {num_clients})")
  pools = _dirichlet_attempts(labels, num_clients, num_classes, alpha, EXDIR_MIN_CLIENT_SIZE,
                              max_retries, rng, owners=owners, scheme="exdir",
                              rebalance=rebalance)
  for pool in pools:
    rng.shuffle(pool)
  return pools


def partition(labels: np.ndarray, num_clients: int, num_classes: int, *, scheme: str,
              rng: Rng, balance: bool = False, alpha: float = 0.1,
              class_per_client: int = 2, batch_size: int = 10, train_ratio: float = 0.75,
              max_retries: int = DEFAULT_MAX_RETRIES,
              rebalance: bool = False) -> list[np.ndarray]:
  """Splits sample indices across clients with one of PFLlib's schemes.

  Args:
    labels: ``[N]`` integer labels in ``[0, num_classes)``.
    num_clients: number of clients ``K`` (1 <= K <= N).
    num_classes: number of classes ``C``.
    scheme: ``"iid"``, ``"pat"``, ``"dir"`` or ``"exdir"`` (see the module docstring).
    rng: the only source of randomness; a ``np.random.Generator``, or a
      ``np.random.RandomState`` to reproduce PFLlib's stream.
    balance: ``iid``/``pat`` only: equal shares instead of random amounts. ``dir`` and
      ``exdir`` ignore it (as PFLlib).
    alpha: Dirichlet concentration for ``dir``/``exdir`` (> 0; smaller is more skewed).
    class_per_client: labels per client for ``pat`` and ``exdir``, in ``[1, C]``.
    batch_size: used only for the minimum client size ``least_samples``.
    train_ratio: used only for ``least_samples`` here (the split is `split_train_test`).
    max_retries: cap on Dirichlet redraws for ``dir``/``exdir``.
    rebalance: ``dir``/``exdir`` only: after ``max_retries`` draws without every client at
      the minimum size, move samples to the short clients of the last one
      (`rebalance_pools`) instead of failing; a setting some draw satisfies is unchanged.

  Returns:
    ``K`` int64 arrays, each client's pool of sample indices (train and test together).
    The pools are disjoint; their union is every sample (``pat`` may leave out a class when
    the client quotas run out, with a warning).

  Raises:
    PartitionError: invalid arguments, or no valid ``dir``/``exdir`` draw within
      ``max_retries`` tries.
  """
  labels = np.asarray(labels)
  _validate(labels, num_clients, num_classes, scheme, alpha, class_per_client, batch_size,
            train_ratio, max_retries)
  min_size = least_samples(labels.size, num_clients, batch_size, train_ratio)
  if scheme == "iid":
    return _pathological(labels, num_clients, num_classes, num_classes, balance, min_size, rng)
  if scheme == "pat":
    return _pathological(labels, num_clients, num_classes, class_per_client, balance, min_size,
                         rng)
  if scheme == "dir":
    return _dirichlet(labels, num_clients, num_classes, alpha, min_size, max_retries, rng,
                      rebalance)
  return _extended_dirichlet(labels, num_clients, num_classes, alpha, class_per_client,
                             max_retries, rng, rebalance)


def split_train_test(client_pools: Sequence[np.ndarray], rng: Rng,
                     train_ratio: float = 0.75) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Splits each client's pool into train and test, as sklearn's ``train_test_split``.

  For a pool of ``n`` samples, ``n_train = floor(r · n)`` and ``n_test = n - n_train``
  (sklearn's rounding when only ``train_size`` is given). With ``π = rng.permutation(n)`` the
  test set is ``pool[π[:n_test]]`` and the train set ``pool[π[n_test:]]``, which is what
  ``train_test_split(pool, train_size=r, shuffle=True)`` returns for the same stream. Unlike
  sklearn, a pool so small that one side is empty is allowed (the engine masks empty clients).

  Args:
    client_pools: each client's sample indices.
    rng: ``np.random.Generator`` or ``np.random.RandomState`` (one ``permutation`` per client,
      in client order).
    train_ratio: ``r`` in ``(0, 1)``.

  Returns:
    ``(train_lists, test_lists)``, disjoint per client, together equal to the pool.
  """
  if not 0 < train_ratio < 1:
    raise PartitionError(f"train_ratio must be in (0, 1), got {train_ratio}")
  train_lists, test_lists = [], []
  for pool in client_pools:
    pool = np.asarray(pool, dtype=np.int64)
    n = pool.size
    n_train = int(math.floor(train_ratio * n))
    n_test = n - n_train
    order = rng.permutation(n)
    test_lists.append(pool[order[:n_test]])
    train_lists.append(pool[order[n_test:]])
  return train_lists, test_lists


def build_federated(name: str, x: np.ndarray, y: np.ndarray, num_classes: int,
                    num_clients: int, scheme: str, seed: int, *, pfllib_rng: bool = False,
                    train_ratio: float = 0.75, **partition_kwargs) -> FederatedData:
  """Partitions a centralised dataset and splits every client into train and test.

  ``rng = np.random.default_rng(seed)`` drives `partition` then `split_train_test`, so the
  same arguments give the same `FederatedData`.

  Args:
    name: dataset name (kept in the result).
    x: ``[N, ...]`` features (images NHWC).
    y: ``[N]`` labels in ``[0, num_classes)``.
    num_classes: number of classes.
    num_clients: number of clients.
    scheme: ``"iid"``, ``"pat"``, ``"dir"`` or ``"exdir"``.
    seed: the random seed.
    pfllib_rng: use ``np.random.RandomState(seed)`` (numpy's legacy stream) instead: with
      ``seed=1`` the partition and split equal those of PFLlib's ``generate_*.py`` scripts.
    train_ratio: per-client fraction of training samples.
    **partition_kwargs: ``balance``, ``alpha``, ``class_per_client``, ``batch_size``,
      ``max_retries`` (see `partition`).

  Returns:
    The `FederatedData`; ``x`` is every sample once, in the original order.
  """
  rng: Rng = np.random.RandomState(seed) if pfllib_rng else np.random.default_rng(seed)
  pools = partition(y, num_clients, num_classes, scheme=scheme, rng=rng,
                    train_ratio=train_ratio, **partition_kwargs)
  train_lists, test_lists = split_train_test(pools, rng, train_ratio)
  return FederatedData.from_client_indices(name, x, y, train_lists, test_lists, num_classes)
