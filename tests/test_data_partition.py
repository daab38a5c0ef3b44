"""Tests for fedjax_lib.data.partition: PFLlib's iid/pat/dir/exdir schemes and the split."""

import warnings

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np
import pytest

from fedjax_lib.data.partition import build_federated
from fedjax_lib.data.partition import EXDIR_MIN_CLIENT_SIZE
from fedjax_lib.data.partition import least_samples
from fedjax_lib.data.partition import partition
from fedjax_lib.data.partition import rebalance_pools
from fedjax_lib.data.partition import split_train_test
from fedjax_lib.data.sources import load_digits
from fedjax_lib.errors import PartitionError

NUM_CLASSES = 10
# MNIST's per-class counts, official train + test (70,000 samples): client sizes of a
# partition depend only on these counts and on the random stream.
MNIST_CLASS_COUNTS = (np.array([5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]) +
                      np.array([980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]))


@pytest.fixture(scope="module")
def digits_labels():
  _, y = load_digits()
  return y


def _assert_exact_cover(pools, num_samples):
  """Every index in [0, num_samples) appears in exactly one pool."""
  merged = np.concatenate(pools)
  assert merged.size == num_samples
  np.testing.assert_array_equal(np.sort(merged), np.arange(num_samples))


def _labels_per_client(pools, labels):
  return [np.unique(labels[p]).size for p in pools]


@pytest.mark.parametrize("scheme,kwargs", [
    ("iid", dict(balance=True)),
    ("iid", dict(balance=False)),
    ("pat", dict(balance=True)),
    ("pat", dict(balance=False)),
    ("dir", dict(alpha=0.1)),
    ("exdir", dict(alpha=100.0)),
])
def test_every_index_assigned_exactly_once(digits_labels, scheme, kwargs):
  pools = partition(digits_labels, 20, NUM_CLASSES, scheme=scheme,
                    rng=np.random.default_rng(0), **kwargs)
  assert len(pools) == 20
  assert all(p.dtype == np.int64 for p in pools)
  _assert_exact_cover(pools, digits_labels.size)


@pytest.mark.parametrize("class_per_client", [1, 2, 3])
@pytest.mark.parametrize("balance", [True, False])
def test_pat_respects_class_per_client(digits_labels, class_per_client, balance):
  pools = partition(digits_labels, 20, NUM_CLASSES, scheme="pat", balance=balance,
                    class_per_client=class_per_client, rng=np.random.default_rng(1))
  assert max(_labels_per_client(pools, digits_labels)) <= class_per_client
  # 20 clients × class_per_client slots are a multiple of 10 classes: every class is used.
  _assert_exact_cover(pools, digits_labels.size)


def test_pat_is_round_robin_by_client_id(digits_labels):
  # 20 clients, 2 classes each → 4 receivers per class: class 0 → clients 0-3, class 1 →
  # clients 0-3 (their second label), class 2 → clients 4-7, ...
  pools = partition(digits_labels, 20, NUM_CLASSES, scheme="pat", balance=True,
                    rng=np.random.default_rng(0))
  for client, pool in enumerate(pools):
    group = client // 4
    np.testing.assert_array_equal(np.unique(digits_labels[pool]), [2 * group, 2 * group + 1])


def test_pat_balanced_shares_differ_by_at_most_one(digits_labels):
  pools = partition(digits_labels, 20, NUM_CLASSES, scheme="pat", balance=True,
                    class_per_client=2, rng=np.random.default_rng(0))
  for cls in range(NUM_CLASSES):
    shares = [np.sum(digits_labels[p] == cls) for p in pools]
    shares = [s for s in shares if s]
    assert sum(shares) == np.sum(digits_labels == cls)
    assert max(shares) - min(shares) <= 1


def test_pat_unbalanced_amounts_are_within_pfllib_bounds(digits_labels):
  # The first k-1 receivers of a class get randint(max(q/10, least/C), q) samples, q = n/k.
  num_clients = 20
  pools = partition(digits_labels, num_clients, NUM_CLASSES, scheme="pat", balance=False,
                    rng=np.random.default_rng(3))
  least = least_samples(digits_labels.size, num_clients)
  for cls in range(NUM_CLASSES):
    n = np.sum(digits_labels == cls)
    receivers = [i for i, p in enumerate(pools) if np.any(digits_labels[p] == cls)]
    assert len(receivers) == 4
    q = n / 4
    for client in receivers[:-1]:
      amount = np.sum(digits_labels[pools[client]] == cls)
      assert int(max(q / 10, least / NUM_CLASSES)) <= amount < int(q)


@pytest.mark.parametrize("num_clients", [7, 20, 45])
def test_balanced_iid_sizes_differ_by_at_most_num_classes(digits_labels, num_clients):
  pools = partition(digits_labels, num_clients, NUM_CLASSES, scheme="iid", balance=True,
                    rng=np.random.default_rng(0))
  sizes = [p.size for p in pools]
  assert max(sizes) - min(sizes) <= NUM_CLASSES
  assert all(n == NUM_CLASSES for n in _labels_per_client(pools, digits_labels))
  _assert_exact_cover(pools, digits_labels.size)


def test_unbalanced_iid_gives_every_client_every_class_in_random_amounts(digits_labels):
  pools = partition(digits_labels, 10, NUM_CLASSES, scheme="iid", balance=False,
                    rng=np.random.default_rng(0))
  assert all(n == NUM_CLASSES for n in _labels_per_client(pools, digits_labels))
  sizes = [p.size for p in pools]
  assert max(sizes) - min(sizes) > NUM_CLASSES  # not balanced


@pytest.mark.parametrize("num_clients,alpha", [(20, 0.1), (10, 0.5), (50, 1.0)])
def test_dir_minimum_client_size(digits_labels, num_clients, alpha):
  pools = partition(digits_labels, num_clients, NUM_CLASSES, scheme="dir", alpha=alpha,
                    rng=np.random.default_rng(0))
  least = least_samples(digits_labels.size, num_clients, batch_size=10, train_ratio=0.75)
  assert least == int(min(10 / 0.25, digits_labels.size / num_clients / 2))
  assert min(p.size for p in pools) >= least
  _assert_exact_cover(pools, digits_labels.size)


def test_dir_small_alpha_is_label_skewed(digits_labels):
  skewed = partition(digits_labels, 20, NUM_CLASSES, scheme="dir", alpha=0.1,
                     rng=np.random.default_rng(0))
  mixed = partition(digits_labels, 20, NUM_CLASSES, scheme="dir", alpha=1000.0,
                    rng=np.random.default_rng(0))
  assert np.mean(_labels_per_client(skewed, digits_labels)) < 6
  assert np.mean(_labels_per_client(mixed, digits_labels)) == NUM_CLASSES


@pytest.mark.parametrize("class_per_client", [2, 4])
def test_exdir_respects_class_per_client(digits_labels, class_per_client):
  pools = partition(digits_labels, 20, NUM_CLASSES, scheme="exdir", alpha=100.0,
                    class_per_client=class_per_client, rng=np.random.default_rng(0))
  counts = _labels_per_client(pools, digits_labels)
  assert max(counts) <= class_per_client
  assert min(p.size for p in pools) >= EXDIR_MIN_CLIENT_SIZE
  _assert_exact_cover(pools, digits_labels.size)


@pytest.mark.parametrize("scheme,kwargs", [
    ("iid", dict(balance=False)),
    ("pat", dict(balance=False)),
    ("dir", dict(alpha=0.1)),
    ("exdir", dict(alpha=100.0)),
])
def test_partition_is_deterministic_given_the_seed(digits_labels, scheme, kwargs):
  def run(seed):
    return partition(digits_labels, 20, NUM_CLASSES, scheme=scheme,
                     rng=np.random.default_rng(seed), **kwargs)
  first, again, other = run(7), run(7), run(8)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  assert any(a.size != b.size or not np.array_equal(a, b) for a, b in zip(first, other))


def test_build_federated_is_deterministic_given_the_seed(digits_labels):
  x = np.zeros((digits_labels.size, 2), np.float32)
  def run(seed, scheme="pat"):
    return build_federated("digits", x, digits_labels, NUM_CLASSES, 20, scheme, seed,
                           balance=True)
  first, again, other = run(0), run(0), run(1)
  np.testing.assert_array_equal(first.train_idx, again.train_idx)
  np.testing.assert_array_equal(first.test_idx, again.test_idx)
  # Balanced pat pools do not depend on the seed (as in PFLlib), but the split does.
  np.testing.assert_array_equal(first.train_count, other.train_count)
  assert not np.array_equal(first.train_idx, other.train_idx)


def test_partition_never_touches_numpys_global_rng(digits_labels):
  np.random.seed(123)
  before = np.random.get_state()[1].copy()
  for scheme in ("iid", "pat", "dir"):
    pools = partition(digits_labels, 20, NUM_CLASSES, scheme=scheme,
                      rng=np.random.default_rng(0))
    split_train_test(pools, np.random.default_rng(0))
  np.testing.assert_array_equal(np.random.get_state()[1], before)


def test_reproduces_pfllib_mnist_dir_readme_counts():
  # PFLlib's generate_MNIST.py noniid - dir (np.random.seed(1), Dir(0.1), 20 clients) gives
  # these per-client train/test counts (its README); the same draws on a RandomState(1).
  labels = np.repeat(np.arange(NUM_CLASSES), MNIST_CLASS_COUNTS)
  rng = np.random.RandomState(1)
  pools = partition(labels, 20, NUM_CLASSES, scheme="dir", alpha=0.1, rng=rng)
  train, test = split_train_test(pools, rng, train_ratio=0.75)
  assert [t.size for t in train] == [1972, 374, 1222, 1905, 1437, 4641, 942, 951, 2700, 3004,
                                     2337, 2829, 2709, 1600, 4297, 4086, 2721, 4239, 3949,
                                     4577]
  assert [t.size for t in test] == [658, 125, 408, 636, 480, 1548, 314, 318, 900, 1002, 779,
                                    943, 904, 534, 1433, 1362, 907, 1414, 1317, 1526]


def test_retry_cap_raises_quickly_with_an_informative_message(digits_labels):
  with pytest.raises(PartitionError) as info:
    partition(digits_labels, 200, NUM_CLASSES, scheme="dir", alpha=0.01, max_retries=25,
              rng=np.random.default_rng(0))
  message = str(info.value)
  least = least_samples(digits_labels.size, 200)
  assert least == 4
  assert "\n" not in message
  assert "after 25 tries" in message
  assert f"at least {least} are required" in message
  assert "smallest client got" in message
  assert "larger alpha (got 0.01)" in message and "fewer clients (got 200)" in message
  assert "--rebalance" in message


def test_rebalance_meets_the_minimum_where_no_draw_can(digits_labels):
  """HtFLlib issue #14's setting in small: 200 clients at Dir(0.01) never give every client
  least_samples = 4, however often redrawn; rebalanced, every client has it, every sample is
  still assigned once, and the same seed gives the same clients."""
  kwargs = dict(scheme="dir", alpha=0.01, rebalance=True, max_retries=20)
  pools = partition(digits_labels, 200, NUM_CLASSES, rng=np.random.default_rng(0), **kwargs)
  assert min(p.size for p in pools) == least_samples(digits_labels.size, 200) == 4
  np.testing.assert_array_equal(np.sort(np.concatenate(pools)), np.arange(digits_labels.size))
  again = partition(digits_labels, 200, NUM_CLASSES, rng=np.random.default_rng(0), **kwargs)
  assert all(np.array_equal(a, b) for a, b in zip(pools, again))
  exdir = partition(digits_labels, 150, NUM_CLASSES, rng=np.random.default_rng(0),
                    scheme="exdir", alpha=0.01, class_per_client=2, rebalance=True,
                    max_retries=20)
  assert min(p.size for p in exdir) >= EXDIR_MIN_CLIENT_SIZE


def test_rebalance_moves_from_the_largest_pools_and_leaves_a_valid_draw_alone(digits_labels):
  pools = [np.arange(0, 10), np.arange(10, 12), np.arange(12, 20), np.arange(20, 21)]
  out = rebalance_pools(pools, 4, np.random.default_rng(0))
  # sizes 10 2 8 1 -> 9 2 8 2 -> 8 3 8 2 -> 7 3 8 3 -> 7 4 7 3 -> 6 4 7 4 (smallest takes one
  # from the largest; ties go to the lowest index)
  assert [p.size for p in out] == [6, 4, 7, 4]
  assert set(np.concatenate(out)) == set(range(21))
  assert set(out[1]) >= {10, 11} and set(out[3]) >= {20}
  assert set(out[0]) < set(range(10)) and set(out[2]) < set(range(12, 20))
  with pytest.raises(PartitionError, match="cannot rebalance 21 samples over 4 clients"):
    rebalance_pools(pools, 6, np.random.default_rng(0))
  # where draws succeed, rebalance changes nothing
  plain = partition(digits_labels, 20, NUM_CLASSES, scheme="dir", rng=np.random.default_rng(3))
  kept = partition(digits_labels, 20, NUM_CLASSES, scheme="dir", rng=np.random.default_rng(3),
                   rebalance=True)
  assert all(np.array_equal(a, b) for a, b in zip(plain, kept))


def test_exdir_retry_cap_raises(digits_labels):
  with pytest.raises(PartitionError, match=r"exdir partition failed after 5 tries"):
    partition(digits_labels, 150, NUM_CLASSES, scheme="exdir", alpha=0.1, max_retries=5,
              rng=np.random.default_rng(0))


def test_exdir_with_fewer_label_slots_than_labels_fails_at_once(digits_labels):
  """3 clients of 2 labels own at most 6 of the 10: no draw can succeed, so none is tried."""
  rng = np.random.default_rng(0)
  with pytest.raises(PartitionError, match=r"cannot give each of the 10 labels an owning client: "
                     r"3 clients x class_per_client=2 own 6 labels; use class_per_client >= 4 "
                     r"\(--class-per-client\) or at least 5 clients"):
    partition(digits_labels, 3, NUM_CLASSES, scheme="exdir", alpha=0.1, class_per_client=2,
              rng=rng)
  assert rng.bit_generator.state == np.random.default_rng(0).bit_generator.state
  # 5 clients of 2 labels can own all 10 (every label once)
  pools = partition(digits_labels, 5, NUM_CLASSES, scheme="exdir", alpha=0.1,
                    class_per_client=2, rng=np.random.default_rng(0))
  assert sorted(np.concatenate(pools).tolist()) == list(range(len(digits_labels)))


def test_pat_warns_when_quotas_leave_classes_without_a_client():
  labels = np.repeat(np.arange(NUM_CLASSES), 30)
  with pytest.warns(UserWarning, match=r"leaves classes \[6, 7, 8, 9\] \(120 samples\)"):
    pools = partition(labels, 3, NUM_CLASSES, scheme="pat", class_per_client=2, balance=True,
                      rng=np.random.default_rng(0))
  assert sum(p.size for p in pools) == 180


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(scheme="noniid"), r"unknown partition scheme 'noniid'; accepted: iid, pat, dir, exdir"),
    (dict(scheme="dir", alpha=0.0), r"alpha must be a finite number > 0, got 0.0"),
    (dict(scheme="dir", alpha=-1.0), r"alpha must be .*got -1.0"),
    (dict(scheme="pat", class_per_client=0), r"class_per_client must be in \[1, 10\].*got 0"),
    (dict(scheme="exdir", class_per_client=11), r"class_per_client must be in \[1, 10\].*got 11"),
    (dict(scheme="dir", num_clients=0), r"num_clients must be >= 1, got 0"),
    (dict(scheme="dir", num_clients=101), r"num_clients=101 exceeds the 100 samples"),
    (dict(scheme="dir", train_ratio=1.0), r"train_ratio must be in \(0, 1\), got 1.0"),
    (dict(scheme="dir", train_ratio=0.0), r"train_ratio must be in \(0, 1\), got 0.0"),
    (dict(scheme="dir", num_classes=5), r"labels lie in \[0, 9\] but num_classes=5"),
    (dict(scheme="dir", max_retries=0), r"max_retries must be >= 1, got 0"),
    (dict(scheme="dir", batch_size=0), r"batch_size must be >= 1, got 0"),
])
def test_invalid_arguments_raise_one_line_partition_errors(kwargs, pattern):
  labels = np.repeat(np.arange(NUM_CLASSES), 10)
  args = dict(num_clients=4, num_classes=NUM_CLASSES, rng=np.random.default_rng(0))
  args.update(kwargs)
  with pytest.raises(PartitionError, match=pattern) as info:
    partition(labels, **args)
  assert "\n" not in str(info.value)


def test_unbalanced_pat_with_too_few_samples_raises():
  labels = np.repeat(np.arange(NUM_CLASSES), 3)
  with pytest.raises(PartitionError, match=r"class 0 has 3 samples for 4 clients"):
    partition(labels, 20, NUM_CLASSES, scheme="pat", balance=False,
              rng=np.random.default_rng(0))


# ---------------------------------------------------------------- split_train_test


@pytest.mark.parametrize("train_ratio", [0.75, 0.5, 0.9])
def test_split_sizes_ratio_and_disjointness(train_ratio):
  rng = np.random.default_rng(0)
  pools = [rng.permutation(1000)[:n] for n in (0, 1, 2, 3, 7, 40, 101, 999)]
  train, test = split_train_test(pools, np.random.default_rng(1), train_ratio=train_ratio)
  for pool, tr, te in zip(pools, train, test):
    assert tr.size == int(np.floor(train_ratio * pool.size))
    assert tr.size + te.size == pool.size
    assert np.intersect1d(tr, te).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, te])), np.sort(pool))


def test_split_matches_sklearn_train_test_split_on_the_same_stream():
  from sklearn.model_selection import train_test_split
  pools = [np.arange(10, 10 + n) for n in (4, 9, 57, 250)]
  ours_train, ours_test = split_train_test(pools, np.random.RandomState(5), 0.75)
  sklearn_rng = np.random.RandomState(5)
  for pool, tr, te in zip(pools, ours_train, ours_test):
    want_train, want_test = train_test_split(pool, train_size=0.75, shuffle=True,
                                             random_state=sklearn_rng)
    np.testing.assert_array_equal(tr, want_train)
    np.testing.assert_array_equal(te, want_test)


def test_split_rejects_bad_train_ratio():
  with pytest.raises(PartitionError, match=r"train_ratio must be in \(0, 1\), got 1.5"):
    split_train_test([np.arange(4)], np.random.default_rng(0), train_ratio=1.5)


# ---------------------------------------------------------------- build_federated


def test_build_federated_layout(digits_labels):
  x = np.arange(digits_labels.size, dtype=np.float32)[:, None]
  data = build_federated("digits", x, digits_labels, NUM_CLASSES, 20, "dir", 0, alpha=0.1)
  assert data.num_clients == 20 and data.num_classes == NUM_CLASSES
  assert int(data.train_count.sum() + data.test_count.sum()) == digits_labels.size
  rows = np.concatenate([data.train_idx[i, :data.train_count[i]] for i in range(20)] +
                        [data.test_idx[i, :data.test_count[i]] for i in range(20)])
  np.testing.assert_array_equal(np.sort(rows), np.arange(digits_labels.size))
  sizes = data.train_count + data.test_count
  np.testing.assert_array_equal(data.train_count, np.floor(0.75 * sizes).astype(int))
  # x keeps the original order: row r holds sample r.
  xs, _ = data.client_arrays(3, "train")
  np.testing.assert_array_equal(xs[:, 0], data.train_idx[3, :data.train_count[3]])


# ---------------------------------------------------------------- properties


@settings(max_examples=25, deadline=None)
@given(num_clients=st.integers(1, 40), alpha=st.floats(0.05, 50.0), seed=st.integers(0, 2**31),
       num_samples=st.integers(200, 800), num_classes=st.integers(2, 12))
def test_dir_properties(num_clients, alpha, seed, num_samples, num_classes):
  labels = np.random.default_rng(seed).integers(0, num_classes, num_samples)
  try:
    pools = partition(labels, num_clients, num_classes, scheme="dir", alpha=alpha,
                      max_retries=50, rng=np.random.default_rng(seed))
  except PartitionError as e:
    assert "after 50 tries" in str(e) and "\n" not in str(e)
    return
  assert len(pools) == num_clients
  _assert_exact_cover(pools, num_samples)
  assert min(p.size for p in pools) >= least_samples(num_samples, num_clients)


@settings(max_examples=25, deadline=None)
@given(num_clients=st.integers(1, 40), class_per_client=st.integers(1, 10),
       balance=st.booleans(), seed=st.integers(0, 2**31), num_classes=st.integers(2, 10))
def test_pat_properties(num_clients, class_per_client, balance, seed, num_classes):
  class_per_client = min(class_per_client, num_classes)
  labels = np.random.default_rng(seed).integers(0, num_classes, 1500)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
      pools = partition(labels, num_clients, num_classes, scheme="pat", balance=balance,
                        class_per_client=class_per_client, rng=np.random.default_rng(seed))
    except PartitionError as e:  # unbalanced amounts impossible for tiny shares
      assert not balance and "too few to draw amounts" in str(e)
      return
  assert len(pools) == num_clients
  assert max(_labels_per_client(pools, labels)) <= class_per_client
  merged = np.concatenate(pools)
  assert np.unique(merged).size == merged.size  # disjoint
  if not caught:  # no class left without a client: every sample is assigned
    _assert_exact_cover(pools, labels.size)
  else:
    assert "without a client" in str(caught[0].message)


def test_cli_partition_rng_and_rebalance_reach_the_partition(monkeypatch):
  """--partition-rng pfllib draws from numpy's legacy stream, as PFLlib's scripts; with
  --partition-seed 1 that is their np.random.seed(1). --rebalance reaches the partition."""
  from fedjax_lib import cli, runner  # pylint: disable=import-outside-toplevel
  from fedjax_lib.data.sources import BUILTIN_DATASETS  # pylint: disable=import-outside-toplevel
  args = cli.build_parser().parse_args(["--partition-rng", "pfllib", "--partition-seed", "1",
                                        "-nc", "10"])
  config = cli.config_from_args(args)
  assert (config.partition_rng, config.rebalance) == ("pfllib", False)
  x, y, classes = BUILTIN_DATASETS["digits"]()
  expected = build_federated("digits", x, y, classes, 10, "dir", 1, pfllib_rng=True)
  np.testing.assert_array_equal(runner.load_data(config).train_count, expected.train_count)
  numpy = runner.load_data(config.replace(partition_rng="numpy"))
  assert not np.array_equal(numpy.train_count, expected.train_count)
  rebalanced = cli.config_from_args(cli.build_parser().parse_args(["--rebalance"]))
  seen = {}
  monkeypatch.setattr(runner.data_lib, "load_federated",
                      lambda *a, **kw: seen.update(kw) or "data")
  assert runner.load_data(rebalanced) == "data"
  assert seen["rebalance"] is True and seen["pfllib_rng"] is False
  with pytest.raises(SystemExit):
    cli.build_parser().parse_args(["--partition-rng", "torch"])
