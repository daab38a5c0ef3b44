"""tfds splits converted once to arrays (cached), and the label-skew datasets built on them.

`image_arrays` turns the splits of one tfds image dataset into uint8 NHWC arrays at a target
shape (`images.to_channels`, `images.resize`, or for an augmented official train split
`images.random_resized_crop`), with int32 labels and the index of the split each row came
from; `text_arrays` tokenises a text dataset as PFLlib does (`text`). Both go through
`cache.cached_arrays`, so only the first call reads tfds.

`load_arrays` is the centralised loader behind the ``tfds`` and ``text`` registry kinds:
``(x, y, num_classes)`` with x float32 in the spec's value range (images) or int32 token ids
(text), ready for `partition.build_federated`.

Under ``tfds.testing.mock_data`` the fake examples are cached only where the caller named a
``data_dir`` (tests pass a temporary one), never into the default tfds folder, where they
would later be mistaken for the real dataset.
"""

from __future__ import annotations

import zlib
from typing import Mapping, Optional, Sequence

import numpy as np

from fedjax_lib.data import cache
from fedjax_lib.data import images
from fedjax_lib.data import registry
from fedjax_lib.data import text
from fedjax_lib.data import tfds_io
from fedjax_lib.data.quantized import QuantizedImages
from fedjax_lib.errors import DataError

# Seed of the frozen train-split augmentation (PFLlib's is an unseeded torch draw).
AUGMENT_SEED = 0


def _may_write_cache(data_dir: Optional[str]) -> bool:
  return bool(data_dir) or not tfds_io.under_tfds_mock()


def _check_classes(tfds_name: str, feature, expected: Optional[int]) -> None:
  found = int(feature.num_classes)
  if expected is not None and found != expected:
    raise DataError(f"tfds dataset {tfds_name!r} has {found} classes but {expected} were "
                    "expected; the installed tensorflow-datasets version may differ")


def image_arrays(tfds_name: str, splits: Sequence[str], shape: Sequence[int], *,
                 data_dir: Optional[str] = None, upright: bool = False,
                 augment: bool = False, label_key: str = "label",
                 extra_keys: Mapping[str, str] | None = None,
                 num_classes: Optional[int] = None) -> cache.Arrays:
  """The splits of a tfds image dataset as uint8 arrays of ``shape`` (cached).

  Each image: transposed if ``upright``; brought to ``C`` planes (`images.to_channels`);
  resized to ``H × W`` with PIL's bilinear filter, or, for the ``train`` split when
  ``augment``, cropped and flipped by `images.random_resized_crop` (seeded by
  `AUGMENT_SEED` and the dataset name, drawn once and frozen in the cache).

  Args:
    tfds_name: e.g. ``"mnist"``, ``"domainnet/clipart"``.
    splits: splits to read; rows are concatenated in this order.
    shape: ``(H, W, C)``.
    data_dir: tfds data directory (also where the cache lives).
    upright: transpose H and W (EMNIST is stored transposed).
    augment: augment the ``train`` split (PFLlib's DomainNet).
    label_key: the ``ClassLabel`` feature stored as ``y``.
    extra_keys: ``{array name: integer feature}`` stored alongside (Omniglot's character).
    num_classes: expected classes of ``label_key`` (checked when converting).

  Returns:
    ``x`` uint8 ``[N, H, W, C]``, ``y`` int32 ``[N]``, ``split`` int8 ``[N]`` (index into
    ``splits``), ``label_names`` (the ``ClassLabel`` names; not per row), and the extras.
  """
  height, width, channels = (int(d) for d in shape)
  extra_keys = dict(extra_keys or {})
  entry = registry.image_entry(tfds_name, (height, width, channels), upright=upright,
                               augment=augment)

  def build():
    builder = tfds_io.builder(tfds_name, data_dir)
    label_feature = builder.info.features[label_key]
    _check_classes(tfds_name, label_feature, num_classes)
    xs, ys, split_ids, sizes = [], [], [], {}
    extras: dict[str, list] = {name: [] for name in extra_keys}
    for index, split in enumerate(splits):
      examples = tfds_io.iter_split(tfds_name, split, data_dir)
      rng = (np.random.default_rng([AUGMENT_SEED, zlib.crc32(tfds_name.encode())])
             if augment and split == "train" else None)
      count = 0
      for example in examples:
        image = np.asarray(example["image"])
        if upright:
          image = np.swapaxes(image, 0, 1)
        image = images.to_channels(image, channels)
        if rng is not None:
          image = images.random_resized_crop(image, height, rng)
        else:
          image = images.resize(image, height, width)
        xs.append(image)
        ys.append(int(example[label_key]))
        for name, key in extra_keys.items():
          extras[name].append(int(example[key]))
        count += 1
      split_ids.append(np.full(count, index, np.int8))
      sizes[split] = count
    x = (np.stack(xs).astype(np.uint8, copy=False) if xs
         else np.zeros((0, height, width, channels), np.uint8))
    arrays = {"x": x, "y": np.asarray(ys, np.int32), "split": np.concatenate(split_ids),
              "label_names": np.asarray([str(n) for n in label_feature.names])}
    arrays.update({name: np.asarray(values, np.int32) for name, values in extras.items()})
    meta = {"tfds_name": tfds_name, "tfds_version": str(builder.version),
            "splits": sizes, "label_key": label_key, "upright": upright, "augment": augment,
            "augment_seed": AUGMENT_SEED if augment else None}
    return arrays, meta

  return cache.cached_arrays(entry, registry.IMAGE_VERSION, build, data_dir=data_dir,
                             required=("x", "y", "split", *extra_keys),
                             also=("label_names",),
                             write=_may_write_cache(data_dir))


def text_arrays(tfds_name: str, splits: Sequence[str], *, data_dir: Optional[str] = None,
                max_len: int = text.MAX_LEN, max_tokens: int = text.MAX_TOKENS,
                num_classes: Optional[int] = None) -> cache.Arrays:
  """A tfds news dataset tokenised as PFLlib's AG News (cached; see `text`).

  Each text is ``title + " " + description`` (torchtext's AG_NEWS joins the CSV columns that
  way); the vocabulary is built over every split read, as PFLlib does.

  Returns:
    ``x`` int32 ``[N, max_len]`` token ids, ``y`` int32, ``split`` int8, ``vocab`` (the
    tokens by id; not per row).
  """
  entry = registry.text_entry(tfds_name, max_len, max_tokens)

  def build():
    builder = tfds_io.builder(tfds_name, data_dir)
    _check_classes(tfds_name, builder.info.features["label"], num_classes)
    texts, labels, split_ids, sizes = [], [], [], {}
    for index, split in enumerate(splits):
      examples = tfds_io.iter_split(tfds_name, split, data_dir)
      count = 0
      for example in examples:
        texts.append(tfds_io.text_of(example["title"]) + " "
                     + tfds_io.text_of(example["description"]))
        labels.append(int(example["label"]))
        count += 1
      split_ids.append(np.full(count, index, np.int8))
      sizes[split] = count
    ids, vocab = text.tokenize_texts(texts, max_len, max_tokens)
    arrays = {"x": ids, "y": np.asarray(labels, np.int32),
              "split": np.concatenate(split_ids), "vocab": np.asarray(vocab)}
    meta = {"tfds_name": tfds_name, "tfds_version": str(builder.version), "splits": sizes,
            "max_len": max_len, "max_tokens": max_tokens, "vocab_size": len(vocab)}
    return arrays, meta

  return cache.cached_arrays(entry, registry.TEXT_VERSION, build, data_dir=data_dir,
                             required=("x", "y", "split"), also=("vocab",),
                             write=_may_write_cache(data_dir))


def load_arrays(name: str, data_dir: Optional[str] = None) -> tuple[np.ndarray, np.ndarray, int]:
  """A ``tfds`` or ``text`` registry dataset, centralised: ``(x, y, num_classes)``.

  The first call converts the tfds splits and caches them (`image_arrays`, `text_arrays`);
  later calls read the cache.

  Returns:
    x: images NHWC as `QuantizedImages` (uint8, read as float32 in the spec's value range),
      or text int32 ``[N, L]`` token ids;
    y: int32 labels; num_classes.

  Raises:
    DataError: ``name`` is not such a dataset, or tfds cannot provide it.
  """
  spec = registry.resolve(name)
  if spec is None or spec.kind not in ("tfds", "text"):
    raise DataError(f"{name!r} is not a label-skew tfds dataset; those are: "
                    f"{', '.join(s.name for s in registry.SPECS if s.kind in ('tfds', 'text'))}")
  if spec.kind == "text":
    arrays = text_arrays(spec.tfds_name, spec.splits, data_dir=data_dir,
                         max_len=spec.shape[0], num_classes=spec.num_classes)
    return (arrays["x"].astype(np.int32, copy=False), arrays["y"].astype(np.int32),
            spec.num_classes)
  arrays = image_arrays(spec.tfds_name, spec.splits, spec.shape, data_dir=data_dir,
                        num_classes=spec.num_classes)
  return (QuantizedImages(arrays["x"], spec.value_range), arrays["y"].astype(np.int32),
          spec.num_classes)
