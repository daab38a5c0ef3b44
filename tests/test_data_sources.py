"""Tests for fedjax_lib.data.sources and load_federated."""

import os
import subprocess
import sys

import numpy as np
import pytest

from fedjax_lib.data import load_federated
from fedjax_lib.data import sources
from fedjax_lib.data.sources import BUILTIN_DATASETS
from fedjax_lib.data.sources import load_digits
from fedjax_lib.data.sources import load_tfds
from fedjax_lib.data.sources import resolve_builtin
from fedjax_lib.data.sources import synthetic
from fedjax_lib.errors import DataError


@pytest.fixture(scope="module")
def digits():
  return load_digits()


def test_load_digits_shape_dtype_range(digits):
  x, y = digits
  assert x.shape == (1797, 28, 28, 1) and x.dtype == np.float32
  assert y.shape == (1797,) and y.dtype == np.int32
  assert x.min() >= -1.0 and x.max() <= 1.0
  assert x.min() == -1.0 and x.max() == 1.0  # background 0 and full ink 16 both occur
  np.testing.assert_array_equal(np.unique(y), np.arange(10))
  assert np.bincount(y).min() >= 170  # roughly balanced (174..183 per class)


def test_load_digits_is_deterministic(digits):
  x, y = digits
  x2, y2 = load_digits()
  np.testing.assert_array_equal(x, x2)
  np.testing.assert_array_equal(y, y2)


def test_load_digits_is_the_bilinear_upsampling_of_sklearn_digits(digits):
  from sklearn import datasets
  images = datasets.load_digits().images / 16.0
  x, _ = digits
  scaled = x[..., 0] * 0.5 + 0.5  # undo the [-1, 1] normalisation
  # Corners sample the corner pixels exactly (half-pixel centres, clamped at the border).
  np.testing.assert_allclose(scaled[:, 0, 0], images[:, 0, 0], atol=1e-6)
  np.testing.assert_allclose(scaled[:, -1, -1], images[:, -1, -1], atol=1e-6)
  # Output pixel 3 lies at source position (3.5 · 8/28 − 0.5) = 0.5: the mean of pixels 0, 1.
  np.testing.assert_allclose(scaled[:, 3, 3], images[:, :2, :2].mean(axis=(1, 2)), atol=1e-6)
  # Mean brightness is preserved up to border effects.
  np.testing.assert_allclose(scaled.mean(), images.mean(), atol=0.01)


def test_digits_read_from_sklearns_file_are_sklearns_digits(monkeypatch):
  """The file read without importing scikit-learn, and the fallback through it, give
  ``sklearn.datasets.load_digits``'s data and target exactly."""
  from sklearn import datasets
  bunch = datasets.load_digits()
  pixels, labels = sources._sklearn_digits()
  np.testing.assert_array_equal(pixels, bunch.data)
  np.testing.assert_array_equal(labels, bunch.target)
  assert pixels.dtype == np.float64 and labels.dtype == np.int64
  monkeypatch.setattr(sources.os.path, "isfile", lambda path: False)  # the file moved
  fallback = sources._sklearn_digits()
  np.testing.assert_array_equal(fallback[0], bunch.data)
  np.testing.assert_array_equal(fallback[1], bunch.target)


def test_a_digits_run_does_not_import_sklearn():
  """scikit-learn's import is most of a digits run's start-up: the data are read from its
  file instead (`sources._sklearn_digits`)."""
  code = ("import sys; from fedjax_lib.data.sources import load_digits; x, y = load_digits(); "
          "print(x.shape, 'sklearn' in sys.modules)")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        check=True)
  assert proc.stdout.split() == ["(1797,", "28,", "28,", "1)", "False"], proc.stdout


def test_linear_resize_matrix_reproduces_a_linear_ramp():
  weights = sources._linear_resize_matrix(8, 28)
  np.testing.assert_allclose(weights.sum(axis=1), 1.0)
  assert (weights >= 0).all()
  ramp = np.arange(8, dtype=np.float64)
  expected = np.clip((np.arange(28) + 0.5) * 8 / 28 - 0.5, 0, 7)
  np.testing.assert_allclose(weights @ ramp, expected, atol=1e-12)


def test_synthetic_shapes_determinism_and_learnability():
  x, y = synthetic(600, (4, 4, 3), num_classes=5, seed=3)
  assert x.shape == (600, 4, 4, 3) and x.dtype == np.float32
  assert y.shape == (600,) and y.dtype == np.int32 and set(np.unique(y)) == set(range(5))
  x2, y2 = synthetic(600, (4, 4, 3), num_classes=5, seed=3)
  np.testing.assert_array_equal(x, x2)
  np.testing.assert_array_equal(y, y2)
  x3, _ = synthetic(600, (4, 4, 3), num_classes=5, seed=4)
  assert not np.array_equal(x, x3)
  # Nearest class mean (fitted on the first half) classifies the second half well.
  flat = x.reshape(600, -1)
  means = np.stack([flat[:300][y[:300] == c].mean(0) for c in range(5)])
  predicted = np.argmin(((flat[300:, None] - means[None]) ** 2).sum(-1), axis=1)
  assert np.mean(predicted == y[300:]) > 0.8


def test_synthetic_rejects_bad_sizes():
  with pytest.raises(DataError, match="num_samples >= 1, got 0"):
    synthetic(0)
  with pytest.raises(DataError, match="num_classes >= 1, got 0"):
    synthetic(10, num_classes=0)


def test_synthetic_cifar_loader():
  x, y, num_classes = BUILTIN_DATASETS["synthetic-cifar"](num_samples=50)
  assert x.shape == (50, 32, 32, 3) and num_classes == 10 and y.shape == (50,)


@pytest.mark.parametrize("name,key", [
    ("digits", "digits"), ("Digits", "digits"), ("MNIST", "mnist"), ("mnist", "mnist"),
    ("FashionMNIST", "fashion_mnist"), ("fmnist", "fmnist"), ("fashion_mnist", "fashion_mnist"),
    ("Cifar10", "cifar10"), ("CIFAR10", "cifar10"), ("Cifar100", "cifar100"),
    ("synthetic-cifar", "synthetic-cifar"), ("Synthetic_Cifar", "synthetic-cifar"),
])
def test_resolve_builtin_accepts_pfllib_spellings(name, key):
  assert resolve_builtin(name) == key


def test_resolve_builtin_unknown():
  assert resolve_builtin("imagenet") is None


# ---------------------------------------------------------------- load_federated


def test_load_federated_digits_defaults():
  data = load_federated("digits")
  assert data.num_clients == 20 and data.num_classes == 10
  assert data.sample_shape == (28, 28, 1)
  assert int(data.train_count.sum() + data.test_count.sum()) == 1797
  assert int((data.train_count + data.test_count).min()) >= 40  # least_samples
  again = load_federated("Digits", num_clients=20, num_classes=10, seed=0)
  np.testing.assert_array_equal(data.train_idx, again.train_idx)


def test_load_federated_passes_partition_settings():
  data = load_federated("digits", num_clients=10, scheme="pat", class_per_client=1,
                        balance=True, train_ratio=0.5, seed=1)
  assert data.num_clients == 10
  assert (np.count_nonzero(data.label_counts(), axis=1) == 1).all()
  sizes = data.train_count + data.test_count
  np.testing.assert_array_equal(data.train_count, sizes // 2)


def test_load_federated_unknown_name_lists_builtins_and_mentions_folders():
  with pytest.raises(DataError) as info:
    load_federated("imagenet")
  message = str(info.value)
  assert "'imagenet'" in message and "\n" not in message
  for name in ("digits", "synthetic-cifar", "mnist", "cifar10", "cifar100"):
    assert name in message
  assert "PFLlib dataset folder" in message


def test_load_federated_num_classes_mismatch():
  with pytest.raises(DataError, match=r"num_classes=7 but dataset 'digits' has 10 classes"):
    load_federated("digits", num_classes=7)


def test_load_federated_treats_paths_as_folders(tmp_path, monkeypatch):
  missing = os.path.join(str(tmp_path), "no_such_folder")
  with pytest.raises(DataError, match="does not exist"):
    load_federated(missing)
  # A bare name that exists on disk is a folder too.
  monkeypatch.chdir(tmp_path)
  os.mkdir("digits")
  with pytest.raises(DataError, match="has no train/ subfolder"):
    load_federated("digits")


# ---------------------------------------------------------------- tfds


def test_load_tfds_without_tensorflow_datasets_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
  with pytest.raises(DataError, match=r"pip install 'fedjax_lib\[tfds\]'"):
    load_tfds("mnist")


def _mock_images(tfds, name, num_examples):
  """The raw uint8 images and labels that tfds' mock yields for one split."""
  with tfds.testing.mock_data(num_examples=num_examples):
    source = tfds.data_source(name, split="train")
    examples = [source[i] for i in range(len(source))]
  return (np.stack([np.asarray(e["image"]) for e in examples]),
          np.array([int(e["label"]) for e in examples]))


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_load_tfds_on_mock_data(name, shape):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6):
    x, y, num_classes = load_tfds(name)
  assert num_classes == 10
  # train and test (mock data yields the same 6 examples for each split) are concatenated.
  assert x.shape == (12, *shape) and x.dtype == np.float32
  assert y.shape == (12,) and y.dtype == np.int32
  assert x.min() >= -1.0 and x.max() <= 1.0
  if not sources._has_tensorflow():  # the TF-free path reads the same examples as data_source
    images, labels = _mock_images(tfds, name, 6)
    np.testing.assert_allclose(x[:6], (images / 255.0 - 0.5) / 0.5, atol=1e-6)
    np.testing.assert_array_equal(y[:6], labels)
    np.testing.assert_array_equal(x[6:], x[:6])


def test_load_tfds_builtin_names_on_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=4):
    x, _, num_classes = BUILTIN_DATASETS[resolve_builtin("Cifar100")]()
    assert x.shape == (8, 32, 32, 3) and num_classes == 100
    x, _, num_classes = BUILTIN_DATASETS[resolve_builtin("FashionMNIST")]()
    assert x.shape == (8, 28, 28, 1) and num_classes == 10
    data = load_federated("MNIST", num_clients=2, scheme="iid", balance=True)
    assert data.num_clients == 2 and data.sample_shape == (28, 28, 1)


def test_load_tfds_tensorflow_path_merges_splits(monkeypatch):
  """The tf.data path (``tfds.load(batch_size=-1)`` + ``as_numpy``), with TFDS faked."""
  tfds = pytest.importorskip("tensorflow_datasets")
  rng = np.random.default_rng(0)
  splits = {
      "train": {"image": rng.integers(0, 256, (5, 28, 28, 1), dtype=np.uint8),
                "label": np.arange(5) % 10},
      "test": {"image": rng.integers(0, 256, (3, 28, 28, 1), dtype=np.uint8),
               "label": np.arange(3) % 10},
  }
  calls = []

  def fake_load(name, split, batch_size, data_dir):
    calls.append((name, tuple(split), batch_size, data_dir))
    return [splits[s] for s in split]

  monkeypatch.setattr(sources, "_has_tensorflow", lambda: True)
  monkeypatch.setattr(tfds, "load", fake_load)
  monkeypatch.setattr(tfds, "as_numpy", lambda tree: tree)
  with tfds.testing.mock_data(num_examples=1):  # for tfds.builder(...).info
    x, y, num_classes = load_tfds("mnist", data_dir="/some/dir")
  assert calls == [("mnist", ("train", "test"), -1, "/some/dir")]
  images = np.concatenate([splits["train"]["image"], splits["test"]["image"]])
  np.testing.assert_allclose(x, (images / 255.0 - 0.5) / 0.5, atol=1e-6)
  np.testing.assert_array_equal(y, [0, 1, 2, 3, 4, 0, 1, 2])
  assert num_classes == 10


def test_load_tfds_unknown_dataset_is_a_data_error():
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(DataError, match=r"could not load tfds dataset 'no_such_dataset_xyz'"):
    load_tfds("no_such_dataset_xyz")
