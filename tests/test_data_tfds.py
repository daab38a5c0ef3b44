"""The tfds dataset registry, the array cache, PFLlib's text pipeline and feature shift.

Every loader runs its real code path (tfds builder and info, split reading, preprocessing,
cache write, cache read) on ``tfds.testing.mock_data``: random examples, or hand-made ones
through ``as_data_source_fn`` where exact values are checked. Nothing is downloaded.
"""

import dataclasses
import json
import os
import warnings
import zlib

import numpy as np
import pytest

from fedjax_lib.data import cache
from fedjax_lib.data import feature_shift
from fedjax_lib.data import images
from fedjax_lib.data import load_federated
from fedjax_lib.data import loading
from fedjax_lib.data import registry
from fedjax_lib.data import sources
from fedjax_lib.data import text
from fedjax_lib.data import tfds_arrays
from fedjax_lib.data.quantized import QuantizedImages
from fedjax_lib.data import tfds_io
from fedjax_lib.errors import DataError
from tests.helpers import ended_pid

tfds = pytest.importorskip("tensorflow_datasets")


@pytest.fixture
def tf_free(monkeypatch):
  """Reads through ``tfds.data_source`` (where ``as_data_source_fn`` fakes apply), with or
  without TensorFlow installed."""
  monkeypatch.setattr(tfds_io, "has_tensorflow", lambda: False)


def forbid_tfds_reads(monkeypatch):
  """From now on any tfds access fails: what follows must come from the cache."""
  def refuse(*args, **kwargs):
    raise AssertionError(f"tfds was read: {args}")
  monkeypatch.setattr(tfds_io, "builder", refuse)
  monkeypatch.setattr(tfds_io, "iter_split", refuse)


def fake_source(examples_by_split, by_config=False):
  """An ``as_data_source_fn`` returning hand-made examples: ``{split: [example, ...]}``, or
  ``{config name: {split: [...]}}`` with ``by_config``."""
  def as_data_source(builder, split, **kwargs):
    del kwargs
    table = examples_by_split[builder.builder_config.name] if by_config else examples_by_split
    return list(table[split])
  return as_data_source


def mock_examples(name, split, num_examples):
  """The raw examples tfds' random mock yields for ``name``/``split``."""
  with tfds.testing.mock_data(num_examples=num_examples):
    source = tfds.data_source(name, split=split)
    return [source[i] for i in range(len(source))]


def cache_files(data_dir):
  folder = os.path.join(str(data_dir), cache.CACHE_FOLDER)
  return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


# ------------------------------------------------------------------ the registry


@pytest.mark.parametrize("spelling,name", [
    ("MNIST", "mnist"), ("EMNIST", "emnist"), ("FashionMNIST", "fashion_mnist"),
    ("fmnist", "fashion_mnist"), ("Cifar10", "cifar10"), ("Cifar100", "cifar100"),
    ("SVHN", "svhn"), ("svhn_cropped", "svhn"), ("Flowers102", "flowers102"),
    ("StanfordCars", "stanford_cars"), ("AGNews", "ag_news"), ("ag_news_subset", "ag_news"),
    ("Omniglot", "omniglot"), ("DomainNet", "domainnet"), ("domainnet-10", "domainnet10"),
    ("Digit5", "digit5"), ("TinyImagenet", "tiny_imagenet"), ("tiny-imagenet", "tiny_imagenet"),
    ("Tiny_ImageNet", "tiny_imagenet"), ("digits", "digits"), ("Synthetic_Cifar", "synthetic-cifar"),
])
def test_resolve_accepts_pfllib_spellings(spelling, name):
  assert registry.resolve(spelling).name == name


def test_resolve_unknown_is_none():
  assert registry.resolve("imagenet") is None


def test_every_tfds_source_exists_in_the_installed_tfds_with_the_stated_classes(tmp_path):
  known = tfds_io.known_builders()
  for spec in registry.SPECS:
    sources_ = ([(d.tfds_name, "label") for d in spec.domains] if spec.kind == "domains" else
                [(spec.tfds_name, "alphabet" if spec.kind == "natural" else "label")]
                if spec.needs_tfds else [])
    for tfds_name, label_key in sources_:
      assert tfds_name.split("/")[0] in known, tfds_name
      info = tfds.builder(tfds_name, data_dir=str(tmp_path)).info
      label = info.features[label_key]
      if spec.classes is None:
        assert label.num_classes == spec.num_classes, (spec.name, tfds_name)
      else:
        assert set(spec.classes) <= set(label.names)
      if spec.kind in ("tfds", "text"):
        assert set(spec.splits) <= set(info.splits) or not info.splits


def test_datasets_missing_from_tfds_are_really_missing_and_name_the_pfllib_folder():
  known = tfds_io.known_builders()
  folder_specs = [s for s in registry.SPECS if s.kind == "pfllib-folder"]
  assert {"tiny_imagenet", "digit5", "femnist", "shakespeare"} <= {s.name for s in folder_specs}
  for spec in folder_specs:
    assert spec.missing_from_tfds and not set(spec.missing_from_tfds) & known, spec.name
    with pytest.raises(DataError) as info:
      load_federated(spec.pfllib_folder)
    message = str(info.value)
    assert "\n" not in message
    assert spec.pfllib_command in message
    assert f"dataset/{spec.pfllib_folder}" in message


def test_list_datasets_rows_and_table(tmp_path):
  rows = registry.list_datasets(str(tmp_path))
  assert [r["name"] for r in rows] == [s.name for s in registry.SPECS]
  by_name = {r["name"]: r for r in rows}
  assert by_name["mnist"]["cached"] == "no" and by_name["digits"]["cached"] == "-"
  assert by_name["cifar100"]["shape"] == "32x32x3" and by_name["cifar100"]["classes"] == 100
  assert by_name["ag_news"]["modality"] == "text" and by_name["ag_news"]["shape"] == "200 tokens"
  assert by_name["domainnet"]["scenario"] == registry.FEATURE_SHIFT
  assert not by_name["tiny_imagenet"]["available"]
  with tfds.testing.mock_data(num_examples=3):
    tfds_arrays.load_arrays("mnist", str(tmp_path))
    tfds_arrays.image_arrays("domainnet/clipart", ("train", "test"), (64, 64, 3),
                             data_dir=str(tmp_path), augment=True)
  by_name = {r["name"]: r for r in registry.list_datasets(str(tmp_path))}
  assert by_name["mnist"]["cached"] == "yes"
  assert by_name["domainnet"]["cached"] == "partly (1/6 domains)"
  table = registry.format_table(registry.list_datasets(str(tmp_path)), str(tmp_path))
  lines = table.splitlines()
  assert lines[0].split() == ["name", "modality", "shape", "classes", "scenario", "cached",
                              "source"]
  assert len(lines) == 2 + len(registry.SPECS) + 2
  assert any(line.startswith("mnist ") and " yes " in line for line in lines)
  assert os.path.join(str(tmp_path), cache.CACHE_FOLDER) in lines[-1]


def test_builtin_tfds_datasets_use_the_cached_loader(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  assert sources.resolve_builtin("CIFAR-10") == "cifar10"
  assert sources.resolve_builtin("DomainNet") is None  # not centralised
  with tfds.testing.mock_data(num_examples=2):
    x, _, num_classes = sources.BUILTIN_DATASETS["fmnist"]()
  assert x.shape == (4, 28, 28, 1) and num_classes == 10
  assert cache_files(tmp_path) == []  # mock data: no data_dir given, nothing cached


# ------------------------------------------------------------------ label-skew tfds images


_PM1 = lambda raw: (raw.astype(np.float32) / 255.0 - 0.5) / 0.5  # noqa: E731


@pytest.mark.parametrize("name,tfds_name,shape,classes,splits", [
    ("mnist", "mnist", (28, 28, 1), 10, 2),
    ("emnist", "emnist/digits", (28, 28, 1), 10, 2),
    ("fashion_mnist", "fashion_mnist", (28, 28, 1), 10, 2),
    ("cifar10", "cifar10", (32, 32, 3), 10, 2),
    ("cifar100", "cifar100", (32, 32, 3), 100, 2),
    ("svhn", "svhn_cropped", (32, 32, 3), 10, 2),
    ("flowers102", "oxford_flowers102", (64, 64, 3), 102, 3),
    ("stanford_cars", "cars196", (64, 64, 3), 196, 2),
])
def test_image_loader_converts_caches_and_reads_back(tmp_path, monkeypatch, tf_free, name,
                                                     tfds_name, shape, classes, splits):
  with tfds.testing.mock_data(num_examples=4):
    x, y, num_classes = tfds_arrays.load_arrays(name, str(tmp_path))
  assert num_classes == classes
  assert x.shape == (4 * splits, *shape) and x.dtype == np.float32
  assert y.shape == (4 * splits,) and y.dtype == np.int32
  # uint8 pixels held as stored, scaled when indexed (4x less memory than float32)
  assert isinstance(x, QuantizedImages) and x.raw.dtype == np.uint8
  assert -1.0 <= np.asarray(x).min() and np.asarray(x).max() <= 1.0
  # The values are PFLlib's preprocessing of the raw examples (every split mocks the same 4).
  raw = mock_examples(tfds_name, "train", 4)
  expected = np.stack([images.resize(images.to_channels(e["image"], shape[2]), *shape[:2])
                       for e in raw])
  np.testing.assert_allclose(x[:4], _PM1(expected), atol=1e-6)
  np.testing.assert_array_equal(y[:4], [int(e["label"]) for e in raw])
  # One cache file; a second load reads it without tfds.
  assert cache_files(tmp_path) == [
      f"{registry.image_entry(tfds_name, shape)}-p{registry.IMAGE_VERSION}.npz"]
  forbid_tfds_reads(monkeypatch)
  x2, y2, _ = tfds_arrays.load_arrays(name, str(tmp_path))
  np.testing.assert_array_equal(np.asarray(x2), np.asarray(x))
  np.testing.assert_array_equal(y2, y)


def test_resized_images_are_pil_bilinear_of_the_stored_image(tmp_path, tf_free):
  rng = np.random.default_rng(0)
  photo = rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)
  example = {"image": photo, "label": 5, "file_name": "a.jpg"}
  with tfds.testing.mock_data(as_data_source_fn=fake_source(
      {"train": [example], "validation": [], "test": [example]})):
    x, y, _ = tfds_arrays.load_arrays("Flowers102", str(tmp_path))
  from PIL import Image
  expected = np.asarray(Image.fromarray(photo).resize((64, 64), Image.BILINEAR))
  assert x.shape == (2, 64, 64, 3)
  np.testing.assert_allclose(x[0], _PM1(expected), atol=1e-6)
  np.testing.assert_array_equal(y, [5, 5])


def test_tensorflow_read_path(tmp_path, monkeypatch):
  """With TensorFlow, splits are read through ``tfds.load`` + ``tfds.as_numpy``."""
  image = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28, 1)
  calls = []

  def fake_load(name, split, data_dir, shuffle_files):
    calls.append((name, split, shuffle_files))
    return [{"image": image, "label": 3 if split == "train" else 4}]

  monkeypatch.setattr(tfds_io, "has_tensorflow", lambda: True)
  monkeypatch.setattr(tfds, "load", fake_load)
  monkeypatch.setattr(tfds, "as_numpy", lambda dataset: dataset)
  with tfds.testing.mock_data(num_examples=1):
    x, y, _ = tfds_arrays.load_arrays("mnist", str(tmp_path))
  assert calls == [("mnist", "train", False), ("mnist", "test", False)]
  np.testing.assert_allclose(x[1], _PM1(image), atol=1e-6)
  np.testing.assert_array_equal(y, [3, 4])


def test_load_federated_routes_tfds_names_with_data_dir(tmp_path):
  with tfds.testing.mock_data(num_examples=20):
    data = load_federated("Cifar10", num_clients=2, scheme="iid", balance=True,
                          data_dir=str(tmp_path))
  assert data.name == "cifar10" and data.num_clients == 2 and data.sample_shape == (32, 32, 3)
  assert int(data.train_count.sum() + data.test_count.sum()) == 40
  assert cache_files(tmp_path) == ["cifar10-32x32x3-p1.npz"]


# ------------------------------------------------------------------ the cache


def test_mock_data_is_never_cached_into_the_default_folder(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  with tfds.testing.mock_data(num_examples=2):
    x, _, _ = tfds_arrays.load_arrays("mnist")
  assert x.shape == (4, 28, 28, 1)
  assert cache_files(tmp_path) == []


def test_resolve_data_dir_order(monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", "/from/env")
  assert cache.resolve_data_dir("/given") == "/given"
  assert cache.resolve_data_dir(None) == "/from/env"
  monkeypatch.delenv("TFDS_DATA_DIR")
  assert cache.resolve_data_dir(None) == os.path.expanduser("~/tensorflow_datasets")
  assert cache.cache_path("mnist-28x28x1", 1, "/d") == "/d/fedjax_arrays/mnist-28x28x1-p1.npz"


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other_entry"])
def test_unreadable_cache_file_is_rebuilt_with_one_warning(tmp_path, monkeypatch, damage):
  with tfds.testing.mock_data(num_examples=3):
    x, y, _ = tfds_arrays.load_arrays("cifar10", str(tmp_path))
  path = cache.cache_path("cifar10-32x32x3", registry.IMAGE_VERSION, str(tmp_path))
  if damage == "garbage":
    with open(path, "wb") as f:
      f.write(b"not a zip file")
  elif damage == "truncated":
    with open(path, "rb") as f:
      content = f.read()
    with open(path, "wb") as f:
      f.write(content[: len(content) // 2])
  else:  # a whole file, but written for another entry
    np.savez(path, x=x, y=y, __meta__=np.array(json.dumps({"entry": "mnist-28x28x1",
                                                            "version": 1})))
  with tfds.testing.mock_data(num_examples=3):
    with pytest.warns(UserWarning, match=r"dataset cache file .*cifar10-32x32x3-p1\.npz is "
                      r"unreadable .*; rebuilding it") as record:
      x2, y2, _ = tfds_arrays.load_arrays("cifar10", str(tmp_path))
  assert len(record) == 1 and "\n" not in str(record[0].message)
  np.testing.assert_array_equal(x2, x)
  np.testing.assert_array_equal(y2, y)
  forbid_tfds_reads(monkeypatch)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    tfds_arrays.load_arrays("cifar10", str(tmp_path))  # rebuilt: read back silently


def test_cache_write_is_atomic(tmp_path, monkeypatch):
  built = []

  def build():
    built.append(1)
    return {"x": np.arange(6).reshape(3, 2), "y": np.arange(3)}, {"source": "test"}

  arrays = cache.cached_arrays("entry", 7, build, data_dir=str(tmp_path), required=("x", "y"))
  again = cache.cached_arrays("entry", 7, build, data_dir=str(tmp_path), required=("x", "y"))
  assert len(built) == 1 and cache_files(tmp_path) == ["entry-p7.npz"]
  np.testing.assert_array_equal(again["x"], arrays["x"])
  assert "__meta__" not in again
  # A write that fails half-way leaves neither the target nor a temporary file.
  def broken_savez(f, **arrays):
    f.write(b"partial")
    raise OSError("disk full")
  monkeypatch.setattr(np, "savez", broken_savez)
  with pytest.raises(OSError, match="disk full"):
    cache.cached_arrays("entry", 8, build, data_dir=str(tmp_path))
  assert cache_files(tmp_path) == ["entry-p7.npz"]
  # A version bump is another file: the old one is never read for it.
  assert not cache.is_cached("entry", 8, str(tmp_path))


def test_a_killed_conversions_temporary_file_is_removed_by_the_next_write(tmp_path):
  """A conversion killed while it wrote its entry (entries can be gigabytes) leaves its
  temporary file; the next write of that entry removes it (a running process's is kept)."""
  dead = ended_pid()
  folder = tmp_path / cache.CACHE_FOLDER
  folder.mkdir()
  names = {f".tmp-{dead}-0123abcd-entry-p7.npz": False,
           f".tmp-{os.getpid()}-0123abcd-entry-p7.npz": True,
           f".tmp-{dead}-0123abcd-other-p7.npz": True}
  for name in names:
    (folder / name).write_bytes(b"partial")
  build = lambda: ({"x": np.arange(3)}, {"source": "test"})
  cache.cached_arrays("entry", 7, build, data_dir=str(tmp_path), required=("x",))
  assert sorted(os.listdir(folder)) == sorted(
      ["entry-p7.npz"] + [name for name, kept in names.items() if kept])


# ------------------------------------------------------------------ text


def test_basic_english_hand_worked():
  assert text.basic_english("Wall St. Bears Claw Back (Reuters)") == [
      "wall", "st", ".", "bears", "claw", "back", "(", "reuters", ")"]
  assert text.basic_english('Bears: the "return" of Wall St.\'s bears!') == [
      "bears", "the", "return", "of", "wall", "st", ".", "'", "s", "bears", "!"]
  assert text.basic_english("a<br />b;c  d?") == ["a", "b", "c", "d", "?"]


_TEXTS = ["Wall St. Bears Claw Back (Reuters)", 'Bears: the "return" of Wall St.\'s bears!']
# bears 3; '.', st, wall 2 (ties in code-point order); the rest 1, in code-point order.
_VOCAB = ["<pad>", "cls", "<unk>", "<eos>", "bears", ".", "st", "wall", "!", "'", "(", ")",
          "back", "claw", "of", "return", "reuters", "s", "the"]


def test_vocab_order_cut_and_specials_hand_worked():
  token_lists = [text.basic_english(t) for t in _TEXTS]
  assert text.build_vocab(token_lists) == _VOCAB
  assert text.build_vocab(token_lists, max_tokens=8) == _VOCAB[:8]
  # The list is cut before specials are dropped (torchtext), so a corpus 'cls' costs a slot.
  assert text.build_vocab([["cls", "cls", "a", "b"]], max_tokens=6) == [
      "<pad>", "cls", "<unk>", "<eos>", "a"]


def test_encode_hand_worked():
  ids, vocab = text.tokenize_texts(_TEXTS, max_len=12)
  assert vocab == _VOCAB
  # PFLlib looks up '<cls>', absent from its vocabulary, so every sequence starts with <unk>.
  np.testing.assert_array_equal(ids, [[2, 7, 6, 5, 4, 13, 12, 10, 16, 11, 0, 0],
                                      [2, 4, 18, 15, 14, 7, 6, 5, 9, 17, 4, 8]])
  cut, _ = text.tokenize_texts(_TEXTS, max_len=4)
  np.testing.assert_array_equal(cut, [[2, 7, 6, 5], [2, 4, 18, 15]])
  small, _ = text.tokenize_texts(_TEXTS, max_len=4, max_tokens=6)  # bears, '.' only
  np.testing.assert_array_equal(small, [[2, 2, 2, 5], [2, 4, 2, 2]])
  assert ids.dtype == np.int32


def test_ag_news_through_tfds_hand_worked(tmp_path, monkeypatch, tf_free):
  train = [{"title": "Wall St. Bears Claw Back", "description": "(Reuters)", "label": 2}]
  test = [{"title": b"Bears:", "description": b'the "return" of Wall St.\'s bears!',
           "label": 1}]
  with tfds.testing.mock_data(as_data_source_fn=fake_source({"train": train, "test": test})):
    x, y, num_classes = tfds_arrays.load_arrays("AGNews", str(tmp_path))
  assert num_classes == 4 and x.shape == (2, 200) and x.dtype == np.int32
  np.testing.assert_array_equal(x[:, :12], [[2, 7, 6, 5, 4, 13, 12, 10, 16, 11, 0, 0],
                                            [2, 4, 18, 15, 14, 7, 6, 5, 9, 17, 4, 8]])
  assert not x[:, 12:].any()
  np.testing.assert_array_equal(y, [2, 1])
  forbid_tfds_reads(monkeypatch)
  arrays = tfds_arrays.text_arrays("ag_news_subset", ("train", "test"), data_dir=str(tmp_path))
  assert list(arrays["vocab"]) == _VOCAB  # read from the cache
  data = load_federated("ag_news", num_clients=1, scheme="iid", data_dir=str(tmp_path),
                        batch_size=1)
  rows = np.concatenate([data.train_idx[0, :data.train_count[0]],
                         data.test_idx[0, :data.test_count[0]]])
  np.testing.assert_array_equal(np.sort(rows), [0, 1])
  np.testing.assert_array_equal(data.x.astype(np.int32), x)  # FederatedData stores float32


# ------------------------------------------------------------------ images


def test_random_resized_crop_full_box_is_a_resize_and_fallback_is_centred():
  rng = np.random.default_rng(0)
  square = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
  whole = images.resize(square, 16, 16)
  out = images.random_resized_crop(square, 16, np.random.default_rng(1), scale=(1.0, 1.0),
                                   ratio=(1.0, 1.0))
  assert np.array_equal(out, whole) or np.array_equal(out, whole[:, ::-1])
  # 10×100: no box of aspect ≤ 4/3 and area ≥ 75% fits; centred 10×13 crop (left = 43).
  wide = rng.integers(0, 256, (10, 100, 1), dtype=np.uint8)
  out = images.random_resized_crop(wide, 8, np.random.default_rng(2))
  crop = images.resize(wide[:, 43:56], 8, 8)
  assert out.shape == (8, 8, 1)
  assert np.array_equal(out, crop) or np.array_equal(out, crop[:, ::-1])


def test_to_channels_and_to_float():
  grey = np.array([[0, 255]], np.uint8)
  np.testing.assert_array_equal(images.to_channels(grey, 3)[0, 1], [255, 255, 255])
  rgb = np.zeros((2, 2, 3), np.uint8)
  rgb[..., 0] = 7
  np.testing.assert_array_equal(images.to_channels(rgb, 1)[..., 0], 7)
  np.testing.assert_allclose(images.to_float(np.array([0, 255], np.uint8)), [-1.0, 1.0])
  np.testing.assert_allclose(images.to_float(np.array([0, 255], np.uint8), "unit"), [0.0, 1.0])


# ------------------------------------------------------------------ feature shift


def _domain_image(domain, split, i):
  """A random image of any size (DomainNet's vary), the same for the same arguments."""
  rng = np.random.default_rng([domain, split, i])
  return rng.integers(0, 256, (30 + 7 * i, 50 - 3 * i, 3), dtype=np.uint8)


def _domainnet_source():
  table = {}
  for d, domain in enumerate(("clipart", "infograph", "painting", "quickdraw", "real",
                              "sketch")):
    table[domain] = {
        split: [{"image": _domain_image(d, s, i), "label": 50 * d + i} for i in range(count)]
        for s, (split, count) in enumerate((("train", 6 + d), ("test", 2)))}
  return fake_source(table, by_config=True)


def test_domainnet_one_client_per_domain(tmp_path, monkeypatch, tf_free):
  with tfds.testing.mock_data(as_data_source_fn=_domainnet_source()):
    data = load_federated("DomainNet", data_dir=str(tmp_path), seed=3)
  assert data.num_clients == 6 and data.num_classes == 345
  assert data.sample_shape == (64, 64, 3) and data.x.dtype == np.float32
  assert isinstance(data.x, QuantizedImages) and data.x.value_range == "unit"
  assert 0.0 <= np.asarray(data.x).min() and np.asarray(data.x).max() <= 1.0  # ToTensor only
  sizes = data.train_count + data.test_count
  np.testing.assert_array_equal(sizes, [8, 9, 10, 11, 12, 13])
  np.testing.assert_array_equal(data.train_count, np.floor(0.75 * sizes))
  for client in range(6):  # every sample of client d comes from domain d (labels 50d + i)
    for split in ("train", "test"):
      _, y = data.client_arrays(client, split)
      assert np.all(y // 50 == client)
  # Test-split images are PIL-resized; train-split images are crops drawn once from the
  # seeded generator and frozen in the cache.
  forbid_tfds_reads(monkeypatch)
  arrays = tfds_arrays.image_arrays("domainnet/real", ("train", "test"), (64, 64, 3),
                                    data_dir=str(tmp_path), augment=True)
  np.testing.assert_array_equal(arrays["split"], [0] * 10 + [1] * 2)
  np.testing.assert_array_equal(arrays["x"][11], images.resize(_domain_image(4, 1, 1), 64, 64))
  crop_rng = np.random.default_rng([tfds_arrays.AUGMENT_SEED, zlib.crc32(b"domainnet/real")])
  for i in range(10):
    np.testing.assert_array_equal(
        arrays["x"][i], images.random_resized_crop(_domain_image(4, 0, i), 64, crop_rng))
  assert len(cache_files(tmp_path)) == 6
  # Same seed → same clients; k clients per domain; counts that are not multiples refused.
  with tfds.testing.mock_data(as_data_source_fn=_domainnet_source()):
    again = load_federated("domainnet", data_dir=str(tmp_path), seed=3)
    np.testing.assert_array_equal(again.train_idx, data.train_idx)
    split12 = load_federated("domainnet", num_clients=12, data_dir=str(tmp_path))
    assert split12.num_clients == 12
    np.testing.assert_array_equal(
        (split12.train_count + split12.test_count).reshape(6, 2).sum(1), sizes)
    with pytest.raises(DataError, match=r"domainnet has 6 domains .* num_clients must be a "
                       r"multiple of 6 .* got 20"):
      load_federated("domainnet", num_clients=20, data_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"num_classes=10 but dataset 'domainnet' has 345"):
      load_federated("domainnet", num_classes=10, data_dir=str(tmp_path))


def test_domainnet10_keeps_fedbns_classes_relabelled(tmp_path, tf_free):
  names = tfds.builder("domainnet/real", data_dir=str(tmp_path)).info.features["label"].names
  bird, zebra, apple = names.index("bird"), names.index("zebra"), names.index("apple")
  table = {domain: {split: [{"image": np.zeros((8, 8, 3), np.uint8), "label": label}
                            for label in (bird, apple, zebra, bird)]
                    for split in ("train", "test")}
           for domain in ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")}
  with tfds.testing.mock_data(as_data_source_fn=fake_source(table, by_config=True)):
    data = load_federated("domainnet10", data_dir=str(tmp_path))
  assert data.num_clients == 6 and data.num_classes == 10
  np.testing.assert_array_equal(data.label_counts(), np.tile([4] + [0] * 8 + [2], (6, 1)))


def test_digits_fs_domains_shape_cap_and_upright_emnist(tmp_path, tf_free):
  rng = np.random.default_rng(0)
  digit = rng.integers(0, 256, (28, 28, 1), dtype=np.uint8)
  house = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
  table = {
      "mnist": {s: [{"image": digit, "label": 1}] * 3 for s in ("train", "test")},
      "svhn_cropped": {s: [{"image": house, "label": 2, "id": "x"}] * 4
                       for s in ("train", "test")},
      "digits": {s: [{"image": digit, "label": 3}] * 5 for s in ("train", "test")},
  }

  def as_data_source(builder, split, **kwargs):
    del kwargs
    key = builder.builder_config.name if builder.name == "emnist" else builder.name
    return list(table[key][split])

  with tfds.testing.mock_data(as_data_source_fn=as_data_source):
    data = load_federated("digits-fs", data_dir=str(tmp_path))
  assert data.num_clients == 3 and data.sample_shape == (32, 32, 3)
  np.testing.assert_array_equal(data.train_count + data.test_count, [6, 8, 10])
  x_mnist, y_mnist = data.client_arrays(0, "test")
  expected = _PM1(np.repeat(images.resize(digit, 32, 32), 3, axis=-1))
  np.testing.assert_allclose(x_mnist[0], expected, atol=1e-6)
  assert set(y_mnist) == {1}
  x_emnist, _ = data.client_arrays(2, "test")  # EMNIST is turned upright (transposed)
  upright = _PM1(np.repeat(images.resize(np.swapaxes(digit, 0, 1), 32, 32), 3, axis=-1))
  np.testing.assert_allclose(x_emnist[0], upright, atol=1e-6)
  # PFLlib's Digit5 cap: a random max_train of the train split, the first max_test of test.
  spec = dataclasses.replace(registry.resolve("digits-fs"), domain_cap=(2, 1))
  arrays = {"y": np.arange(8, dtype=np.int32),
            "split": np.array([0, 0, 0, 0, 0, 1, 1, 1], np.int8)}
  rows, labels = feature_shift._select_rows(spec, arrays, np.random.default_rng(0))
  assert rows.size == 3 and set(rows[:2]) <= {0, 1, 2, 3, 4} and rows[2] == 5
  np.testing.assert_array_equal(labels, rows)


def test_omniglot_natural_split_by_drawing(tmp_path, tf_free):
  examples = []
  for character in range(4):
    for drawing in range(3):
      image = np.full((105, 105, 3), 255, np.uint8)
      image[drawing, character] = 0  # a stroke pixel
      examples.append({"image": image, "alphabet": character // 2, "alphabet_char_id": 0,
                       "label": character})
  train, test = examples[:8], examples[8:]
  with tfds.testing.mock_data(as_data_source_fn=fake_source({"train": train, "test": test})):
    data = load_federated("Omniglot", data_dir=str(tmp_path), train_ratio=0.5)
  assert data.num_clients == 20 and data.num_classes == 50
  assert data.sample_shape == (105, 105, 1) and set(np.unique(data.x)) == {0.0, 1.0}
  sizes = data.train_count + data.test_count
  np.testing.assert_array_equal(sizes[:3], [4, 4, 4])
  assert not sizes[3:].any()
  for client in range(3):  # client j: the j-th drawing of every character
    rows = np.concatenate([data.train_idx[client, :data.train_count[client]],
                           data.test_idx[client, :data.test_count[client]]])
    strokes = np.argwhere(data.x[rows, :, :, 0] == 0)
    assert set(strokes[:, 1]) == {client}
    np.testing.assert_array_equal(np.sort(data.y[rows]), [0, 0, 1, 1])
  with pytest.raises(DataError, match="natural split into 20 clients"):
    load_federated("omniglot", num_clients=10, data_dir=str(tmp_path))


def test_drawing_ranks():
  np.testing.assert_array_equal(feature_shift.drawing_ranks(np.array([5, 3, 5, 5, 3])),
                                [0, 0, 1, 2, 1])


def test_default_num_clients():
  assert loading.default_num_clients("DomainNet") is None
  assert loading.default_num_clients("omniglot") is None
  assert loading.default_num_clients("cifar10") == 20
  assert loading.default_num_clients("digits") == 20


# ------------------------------------------------------------------ manual downloads


def test_manual_download_error_names_the_folder_and_files(tmp_path):
  with pytest.raises(DataError) as info:
    tfds_io.builder("imagenet2012", str(tmp_path))
  message = str(info.value)
  assert "\n" not in message
  assert os.path.join(str(tmp_path), "downloads", "manual") in message
  assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
  manual = tmp_path / "downloads" / "manual"
  manual.mkdir(parents=True)
  (manual / "ILSVRC2012_img_train.tar").write_bytes(b"")
  assert tfds_io.builder("imagenet2012", str(tmp_path)).name == "imagenet2012"


def test_unknown_tfds_name_is_a_data_error(tmp_path):
  with pytest.raises(DataError, match=r"tfds cannot build dataset 'no_such_dataset_xyz'"):
    tfds_arrays.image_arrays("no_such_dataset_xyz", ("train",), (8, 8, 1),
                             data_dir=str(tmp_path))
