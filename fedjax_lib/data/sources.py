"""Raw (not yet federated) datasets: bundled digits, synthetic data and tfds image sets.

Every loader returns centralised arrays ``x`` (float32, images NHWC) and ``y`` (int32 labels);
`fedjax_lib.data.partition` then splits them across clients. Images are normalised the way
PFLlib's generator scripts do it (``ToTensor`` then ``Normalize(0.5, 0.5)``):

.. math::  v' = (v / v_{max} - 0.5) / 0.5 \\in [-1, 1].

`BUILTIN_DATASETS` maps centralised dataset names to loaders that return
``(x, y, num_classes)``: the bundled and synthetic sets here, and MNIST, Fashion-MNIST and
CIFAR through the registry's cached tfds loader (`tfds_arrays.load_arrays`: converted once,
then read from the array cache); `resolve_builtin` does the case-insensitive lookup, including
PFLlib's spellings (``MNIST``, ``FashionMNIST``, ``Cifar10``, ``Cifar100``). Every other
dataset name (`registry`) is routed by `loading.load_federated`. `load_tfds` is the uncached
whole-split reader for any other tfds image set.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
from typing import Callable, Sequence

import numpy as np

from fedjax_lib.data import registry
from fedjax_lib.data import tfds_arrays
from fedjax_lib.errors import DataError

# (x float32 [N, ...], y int32 [N], num_classes)
RawDataset = tuple[np.ndarray, np.ndarray, int]

_DIGITS_SIDE = 28


def _linear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """``[out_size, in_size]`` matrix of 1-D linear interpolation with half-pixel centres.

  Output pixel ``i`` samples the input at ``s = (i + 0.5) * in_size / out_size - 0.5``,
  clamped to ``[0, in_size - 1]``, and mixes its two neighbours ``floor(s)`` and
  ``floor(s) + 1`` with weights ``1 - frac(s)`` and ``frac(s)``. This is the convention of
  ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` and of
  ``jax.image.resize(method="linear")`` for upsampling. Every row sums to 1, so the output
  stays inside the input's value range.
  """
  src = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
  src = np.clip(src, 0.0, in_size - 1)
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  weights = np.zeros((out_size, in_size), dtype=np.float64)
  rows = np.arange(out_size)
  np.add.at(weights, (rows, lo), 1.0 - frac)
  np.add.at(weights, (rows, hi), frac)
  return weights


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits as ``(pixels float64 [1797, 64], labels int64 [1797])``.

  Read from the file scikit-learn ships them in (``sklearn/datasets/data/digits.csv.gz``: one
  row per image, 64 pixel values then the label), found without importing scikit-learn, whose
  import took 0.8 s of a one-round CLI run's 5 s (0.05 s for the file; RESULTS.md, "Starting
  a run", 2026-12-06). The values are those ``sklearn.datasets.load_digits`` returns
  (``data`` and ``target``; a test checks it). Where the file is not there (a scikit-learn
  that moved it), through scikit-learn.
  """
  spec = importlib.util.find_spec("sklearn")
  if spec is not None and spec.origin:
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz")
    if os.path.isfile(path):
      with gzip.open(path) as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64)
      if table.shape == (1797, 65):
        return table[:, :-1], table[:, -1].astype(np.int64)
  from sklearn import datasets  # pylint: disable=g-import-not-at-top  (heavy import)
  bunch = datasets.load_digits()
  return (np.asarray(bunch.data, dtype=np.float64),
          np.asarray(bunch.target, dtype=np.int64))


def load_digits(side: int = _DIGITS_SIDE, channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's bundled 8×8 handwritten digits, shaped and scaled like PFLlib's MNIST.

  The 1,797 images (10 classes, pixel values 0..16) ship with scikit-learn, so this works
  offline. Each image ``I`` is scaled to ``[0, 1]`` (``I / 16``), upsampled to side × side
  (28 by default) by separable bilinear interpolation ``A I A^T`` (``A`` from
  `_linear_resize_matrix`, half-pixel centres; implemented in numpy, not
  ``scipy.ndimage.zoom``), normalised to ``[-1, 1]`` by ``(v - 0.5) / 0.5`` as PFLlib's
  MNIST, and repeated over ``channels`` (``digits32``: 32×32×3, the CIFAR shape HtFLlib's
  image families are built for).

  Returns:
    ``(x, y)``: x float32 ``[1797, side, side, channels]`` (NHWC) in ``[-1, 1]``; y int32
    ``[1797]``.
  """
  pixels, labels = _sklearn_digits()
  images = pixels.reshape(-1, 8, 8) / 16.0  # [N, 8, 8] in [0, 1]
  resize = _linear_resize_matrix(images.shape[1], side)  # [side, 8]
  upsampled = np.einsum("ij,njk,lk->nil", resize, images, resize)  # [N, side, side]
  upsampled = np.clip(upsampled, 0.0, 1.0)  # guard against rounding just outside [0, 1]
  x = ((upsampled - 0.5) / 0.5).astype(np.float32)[..., None]
  y = labels.astype(np.int32)
  return np.repeat(x, channels, axis=-1) if channels > 1 else x, y


def synthetic(num_samples: int, sample_shape: Sequence[int] = (32, 32, 3),
              num_classes: int = 10, seed: int = 0,
              class_separation: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
  """Random, learnable data of any shape, for benchmarks and tests.

  .. math::  y_n \\sim \\mathcal{U}\\{0, …, C-1\\}, \\quad
             x_n = \\mu_{y_n} + \\varepsilon_n, \\quad
             \\mu_c \\sim \\mathcal{N}(0, s^2 I), \\ \\varepsilon_n \\sim \\mathcal{N}(0, I)

  with ``s = class_separation``: every class has its own fixed mean pattern, so a classifier
  can learn it.

  Args:
    num_samples: number of samples ``N`` (>= 1).
    sample_shape: shape of one sample, NHWC images by default (CIFAR-like 32×32×3).
    num_classes: number of classes ``C`` (>= 1).
    seed: seed of the numpy generator; same seed, same arrays.
    class_separation: standard deviation ``s`` of the class mean patterns.

  Returns:
    ``(x, y)``: x float32 ``[N, *sample_shape]``; y int32 ``[N]``.
  """
  if num_samples < 1:
    raise DataError(f"synthetic data needs num_samples >= 1, got {num_samples}")
  if num_classes < 1:
    raise DataError(f"synthetic data needs num_classes >= 1, got {num_classes}")
  shape = tuple(int(d) for d in sample_shape)
  rng = np.random.default_rng(seed)
  y = rng.integers(0, num_classes, size=num_samples).astype(np.int32)
  means = rng.standard_normal((num_classes, *shape), dtype=np.float32) * np.float32(
      class_separation)
  x = rng.standard_normal((num_samples, *shape), dtype=np.float32)
  x += means[y]
  return x, y


def load_synthetic_cifar(num_samples: int = 6000, seed: int = 0) -> RawDataset:
  """CIFAR-10-shaped synthetic data: ``num_samples`` × 32×32×3, 10 classes (see `synthetic`)."""
  x, y = synthetic(num_samples, (32, 32, 3), num_classes=10, seed=seed)
  return x, y, 10


def _load_digits_raw(side: int = _DIGITS_SIDE, channels: int = 1) -> RawDataset:
  x, y = load_digits(side, channels)
  return x, y, 10


def _images_to_float(images: np.ndarray, source: str) -> np.ndarray:
  """uint8 ``[N, H, W(, C)]`` images → float32 NHWC in ``[-1, 1]``: ``(v / 255 - 0.5) / 0.5``."""
  images = np.asarray(images)
  if images.ndim == 3:  # [N, H, W] grayscale without a channel axis
    images = images[..., None]
  if images.ndim != 4:
    raise DataError(f"{source}: expected images of rank 4 (N, H, W, C), got shape "
                    f"{images.shape}")
  return ((images.astype(np.float32) / 255.0 - 0.5) / 0.5).astype(np.float32)


def _has_tensorflow() -> bool:
  """Whether the ``tensorflow`` package is importable (selects `load_tfds`'s read path)."""
  return importlib.util.find_spec("tensorflow") is not None


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0] if text else ''}"


def load_tfds(name: str, split_names: Sequence[str] = ("train", "test"),
              data_dir: str | None = None, *, image_key: str = "image",
              label_key: str = "label") -> RawDataset:
  """Loads a TensorFlow Datasets image dataset, all splits merged, normalised to ``[-1, 1]``.

  PFLlib merges the official train and test sets and re-splits per client, so the splits in
  ``split_names`` are concatenated in that order. Images become float32 NHWC with
  ``v' = (v / 255 - 0.5) / 0.5``; labels int32.

  Two read paths, chosen by what is installed:

  * with ``tensorflow``: ``tfds.load(name, split=..., batch_size=-1)`` then ``tfds.as_numpy``
    (whole splits as one batch);
  * without it: ``tfds.data_source(name, split=...)``, TFDS's TensorFlow-free random-access
    reader over ArrayRecord files (needs only ``tensorflow-datasets`` and ``array_record``).

  Args:
    name: a TFDS name such as ``"mnist"``, ``"fashion_mnist"``, ``"cifar10"``, ``"cifar100"``,
      ``"emnist/digits"``.
    split_names: the splits to concatenate.
    data_dir: TFDS data directory (``None``: TFDS's default, ``~/tensorflow_datasets``).
    image_key: feature holding the image.
    label_key: feature holding the class label (a ``ClassLabel``; its ``num_classes`` is used).

  Returns:
    ``(x, y, num_classes)``.

  Raises:
    DataError: ``tensorflow-datasets`` is not installed, or TFDS cannot provide the dataset.
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError(f"loading the tfds dataset {name!r} needs tensorflow-datasets, which is "
                    "not installed; run: pip install 'fedjax_lib[tfds]'") from e
  splits = list(split_names)
  if not splits:
    raise DataError(f"load_tfds({name!r}) needs at least one split name, got none")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    label_feature = builder.info.features[label_key]
    num_classes = int(label_feature.num_classes)
    if _has_tensorflow():
      batches = tfds.as_numpy(tfds.load(name, split=splits, batch_size=-1, data_dir=data_dir))
      images = [np.asarray(b[image_key]) for b in batches]
      labels = [np.asarray(b[label_key]) for b in batches]
    else:
      sources = tfds.data_source(name, split=splits, data_dir=data_dir)
      images, labels = [], []
      for source in sources:
        examples = [source[i] for i in range(len(source))]
        images.append(np.stack([np.asarray(ex[image_key]) for ex in examples]))
        labels.append(np.asarray([ex[label_key] for ex in examples]))
  except DataError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (boundary: any TFDS failure)
    raise DataError(f"could not load tfds dataset {name!r} (splits {splits}, data_dir "
                    f"{data_dir!r}): {_first_line(e)}") from e
  x = _images_to_float(np.concatenate(images), f"tfds dataset {name!r}")
  y = np.concatenate(labels).astype(np.int32)
  return x, y, num_classes


def _cached_tfds(name: str) -> Callable[[], RawDataset]:
  """The registry's cached loader of a label-skew tfds dataset (`tfds_arrays.load_arrays`)."""
  return functools.partial(tfds_arrays.load_arrays, name)


# Names accepted on the command line (lower case) → loader returning (x, y, num_classes).
# The registry knows more (emnist, svhn, flowers102, stanford_cars, ag_news, and the
# feature-shift sets); `loading.load_federated` routes every registry name.
BUILTIN_DATASETS: dict[str, Callable[[], RawDataset]] = {
    "digits": _load_digits_raw,
    "digits32": functools.partial(_load_digits_raw, 32, 3),
    "synthetic-cifar": load_synthetic_cifar,
    "mnist": _cached_tfds("mnist"),
    "fmnist": _cached_tfds("fashion_mnist"),
    "fashion_mnist": _cached_tfds("fashion_mnist"),
    "cifar10": _cached_tfds("cifar10"),
    "cifar100": _cached_tfds("cifar100"),
}

# Other spellings (compared in lower case), among them PFLlib's dataset folder names.
_ALIASES = {
    "fashionmnist": "fashion_mnist",
    "fashion-mnist": "fashion_mnist",
    "synthetic_cifar": "synthetic-cifar",
    "syntheticcifar": "synthetic-cifar",
}


def resolve_builtin(name: str) -> str | None:
  """The `BUILTIN_DATASETS` key for ``name`` (case-insensitive, aliases), or ``None``.

  ``"MNIST"`` → ``"mnist"``, ``"FashionMNIST"`` → ``"fashion_mnist"``, ``"Cifar10"`` →
  ``"cifar10"``.
  """
  key = name.strip().lower()
  key = _ALIASES.get(key, key)
  if key in BUILTIN_DATASETS:
    return key
  spec = registry.resolve(name)  # other spellings of the registry's names ("CIFAR-10")
  return spec.name if spec is not None and spec.name in BUILTIN_DATASETS else None


def load_builtin(name: str) -> RawDataset:
  """Loads a built-in dataset by (any accepted spelling of) its name."""
  key = resolve_builtin(name)
  if key is None:
    raise DataError(f"unknown dataset {name!r}; built-in datasets are: "
                    f"{', '.join(BUILTIN_DATASETS)}")
  return BUILTIN_DATASETS[key]()
