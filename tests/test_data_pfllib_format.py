"""Tests for fedjax_lib.data.pfllib_format: PFLlib dataset folders in and out."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fedjax_lib.data import pfllib_format
from fedjax_lib.data.federated import FederatedData
from fedjax_lib.data.partition import build_federated
from fedjax_lib.data.pfllib_format import partition_meta
from fedjax_lib.data.pfllib_format import read_pfllib_folder
from fedjax_lib.data.pfllib_format import write_pfllib_folder
from fedjax_lib.data.sources import load_digits
from fedjax_lib.errors import DataError
from tests.helpers import ended_pid


@pytest.fixture(scope="module")
def digits_data():
  x, y = load_digits()
  return build_federated("digits", x, y, 10, 20, "dir", 0, alpha=0.1)


def _save(path, x, y, pickled=True):
  """Writes one client file the way PFLlib does (or as a plain npz with keys x, y)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    if pickled:
      np.savez_compressed(f, data={"x": x, "y": y})
    else:
      np.savez_compressed(f, x=x, y=y)


def _make_folder(root, num_clients=3, train_sizes=None, test_sizes=None, num_classes=4,
                 sample_shape=(1, 5, 5), config=None, seed=0):
  """A small valid PFLlib folder (NCHW float32 x, int64 y); returns its path."""
  rng = np.random.default_rng(seed)
  train_sizes = train_sizes or [6] * num_clients
  test_sizes = test_sizes or [2] * num_clients
  folder = os.path.join(str(root), "Toy")
  for split, sizes in (("train", train_sizes), ("test", test_sizes)):
    for client, n in enumerate(sizes):
      x = rng.uniform(-1, 1, (n, *sample_shape)).astype(np.float32)
      y = rng.integers(0, num_classes, n).astype(np.int64)
      _save(os.path.join(folder, split, f"{client}.npz"), x, y)
  if config is not None:
    with open(os.path.join(folder, "config.json"), "w") as f:
      json.dump(config, f)
  return folder


def _assert_one_line_error(match, fn, *args, **kwargs):
  with pytest.raises(DataError, match=match) as info:
    fn(*args, **kwargs)
  assert "\n" not in str(info.value)
  return str(info.value)


# ---------------------------------------------------------------- round trip


def test_round_trip_preserves_every_client(tmp_path, digits_data):
  folder = os.path.join(str(tmp_path), "Digits")
  write_pfllib_folder(digits_data, folder, partition_meta=partition_meta("dir"))
  back = read_pfllib_folder(folder)
  assert back.name == "Digits"
  assert back.num_clients == digits_data.num_clients and back.num_classes == 10
  np.testing.assert_array_equal(back.train_count, digits_data.train_count)
  np.testing.assert_array_equal(back.test_count, digits_data.test_count)
  for client in range(digits_data.num_clients):
    for split in ("train", "test"):
      want_x, want_y = digits_data.client_arrays(client, split)
      got_x, got_y = back.client_arrays(client, split)
      np.testing.assert_array_equal(got_x, want_x)
      np.testing.assert_array_equal(got_y, want_y)
  np.testing.assert_array_equal(back.label_counts(), digits_data.label_counts())


def test_written_files_are_pfllib_nchw_pickled_dicts(tmp_path, digits_data):
  folder = os.path.join(str(tmp_path), "Digits")
  write_pfllib_folder(digits_data, folder, partition_meta=partition_meta("dir"))
  assert sorted(os.listdir(folder)) == ["config.json", "test", "train"]
  assert sorted(os.listdir(os.path.join(folder, "train"))) == sorted(
      f"{i}.npz" for i in range(20))
  with open(os.path.join(folder, "train", "0.npz"), "rb") as f:
    stored = np.load(f, allow_pickle=True)["data"].tolist()  # PFLlib's read_data
  x, y = stored["x"], stored["y"]
  want_x, want_y = digits_data.client_arrays(0, "train")
  assert x.dtype == np.float32 and x.shape == (want_x.shape[0], 1, 28, 28)  # NCHW
  assert y.dtype == np.int64
  np.testing.assert_array_equal(x, want_x.transpose(0, 3, 1, 2))
  np.testing.assert_array_equal(y, want_y)


def test_config_json_has_pfllib_fields(tmp_path, digits_data):
  folder = os.path.join(str(tmp_path), "Digits")
  write_pfllib_folder(digits_data, folder,
                      partition_meta={**partition_meta("dir", alpha=0.1, batch_size=10),
                                      "seed": 0})
  with open(os.path.join(folder, "config.json")) as f:
    config = json.load(f)
  assert list(config)[:8] == ["num_clients", "num_classes", "non_iid", "balance", "partition",
                              "Size of samples for labels in clients", "alpha", "batch_size"]
  assert config["num_clients"] == 20 and config["num_classes"] == 10
  assert config["non_iid"] is True and config["balance"] is False
  assert config["partition"] == "dir" and config["alpha"] == 0.1
  assert config["batch_size"] == 10 and config["seed"] == 0
  counts = digits_data.label_counts()
  sizes = config["Size of samples for labels in clients"]
  assert len(sizes) == 20
  for client, pairs in enumerate(sizes):
    assert pairs == [[c, int(counts[client, c])] for c in range(10) if counts[client, c]]


def test_partition_meta_for_iid():
  assert partition_meta("iid", balance=True) == {
      "non_iid": False, "balance": True, "partition": None, "alpha": 0.1, "batch_size": 10}


def test_round_trip_flat_features(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(60, 7)).astype(np.float32)
  y = rng.integers(0, 3, 60)
  data = build_federated("feat", x, y, 3, 4, "iid", 0, balance=True)
  folder = os.path.join(str(tmp_path), "feat")
  write_pfllib_folder(data, folder, partition_meta=partition_meta("iid"))
  back = read_pfllib_folder(folder)
  assert back.sample_shape == (7,)
  for client in range(4):
    np.testing.assert_array_equal(back.client_arrays(client)[0], data.client_arrays(client)[0])


def test_flat_x_holds_all_train_then_all_test(tmp_path):
  folder = _make_folder(tmp_path, train_sizes=[3, 4, 5], test_sizes=[1, 2, 3])
  data = read_pfllib_folder(folder)
  np.testing.assert_array_equal(data.train_count, [3, 4, 5])
  np.testing.assert_array_equal(data.test_count, [1, 2, 3])
  assert data.x.shape == (18, 5, 5, 1)  # NCHW (1, 5, 5) became NHWC
  np.testing.assert_array_equal(data.train_idx[1, :4], np.arange(3, 7))
  np.testing.assert_array_equal(data.test_idx[0, :1], [12])
  with np.load(os.path.join(folder, "test", "2.npz"), allow_pickle=True) as f:
    stored = f["data"].tolist()
  np.testing.assert_array_equal(data.client_arrays(2, "test")[0],
                                stored["x"].transpose(0, 2, 3, 1))


def test_reads_plain_npz_and_three_channel_images(tmp_path):
  folder = os.path.join(str(tmp_path), "plain")
  rng = np.random.default_rng(1)
  x = rng.normal(size=(4, 3, 2, 2)).astype(np.float32)
  for split in ("train", "test"):
    _save(os.path.join(folder, split, "0.npz"), x, np.array([0, 1, 2, 1]), pickled=False)
  data = read_pfllib_folder(folder)
  assert data.sample_shape == (2, 2, 3) and data.num_classes == 3
  np.testing.assert_array_equal(data.client_arrays(0)[0], x.transpose(0, 2, 3, 1))


def test_num_classes_comes_from_argument_config_or_labels(tmp_path):
  folder = _make_folder(tmp_path, num_classes=4, seed=3)
  labels = np.concatenate([np.load(os.path.join(folder, s, f"{c}.npz"),
                                   allow_pickle=True)["data"].tolist()["y"]
                           for s in ("train", "test") for c in range(3)])
  assert read_pfllib_folder(folder).num_classes == labels.max() + 1
  assert read_pfllib_folder(folder, num_classes=12).num_classes == 12
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump({"num_clients": 3, "num_classes": 9}, f)
  assert read_pfllib_folder(folder).num_classes == 9
  assert read_pfllib_folder(folder, num_clients=3, num_classes=9).num_classes == 9


def test_a_client_without_training_samples_is_allowed(tmp_path):
  folder = _make_folder(tmp_path, train_sizes=[4, 0, 4], test_sizes=[1, 1, 1])
  data = read_pfllib_folder(folder)
  np.testing.assert_array_equal(data.train_count, [4, 0, 4])


def test_write_is_atomic(tmp_path, digits_data, monkeypatch):
  calls = []
  original = pfllib_format._save_client

  def failing_save(path, *args):
    calls.append(path)
    if len(calls) == 5:
      raise KeyboardInterrupt  # an interrupted write
    original(path, *args)

  monkeypatch.setattr(pfllib_format, "_save_client", failing_save)
  folder = os.path.join(str(tmp_path), "Digits")
  with pytest.raises(KeyboardInterrupt):
    write_pfllib_folder(digits_data, folder, partition_meta={})
  assert os.listdir(str(tmp_path)) == []  # neither the target nor a temporary folder


def test_write_refuses_to_clobber_unless_asked(tmp_path, digits_data):
  folder = _make_folder(tmp_path)
  _assert_one_line_error(r"already exists.*overwrite=True", write_pfllib_folder,
                         digits_data, folder, partition_meta={})
  write_pfllib_folder(digits_data, folder, partition_meta={}, overwrite=True)
  assert read_pfllib_folder(folder).num_clients == 20
  assert os.listdir(str(tmp_path)) == ["Toy"]  # no leftovers of the old folder


def test_the_next_write_finishes_what_killed_writes_left(tmp_path, digits_data):
  """A writer killed between moving the old folder aside and renaming the new one in: the
  next write puts the old folder back (so it refuses to clobber it), and removes the killed
  writers' temporary and old folders; a running process's are kept."""
  old = _make_folder(tmp_path)
  dead = ended_pid()
  earlier = tmp_path / f".old-{2**40}-0123abcd-Toy"  # moved aside earlier (no such process)
  os.makedirs(earlier / "train")
  time.sleep(0.05)
  os.rename(old, tmp_path / f".old-{dead}-0123abcd-Toy")  # the last one moved aside
  staged = tmp_path / f".tmp-{dead}-89abcdef-Toy"
  os.makedirs(staged / "train")
  running = tmp_path / f".tmp-{os.getpid()}-0123abcd-Toy"  # this process's: kept
  running.mkdir()
  other = tmp_path / f".tmp-{dead}-0123abcd-Toy2"  # another target's: kept
  other.mkdir()
  _assert_one_line_error(r"already exists", write_pfllib_folder, digits_data, old,
                         partition_meta={})
  assert sorted(os.listdir(tmp_path)) == sorted(["Toy", running.name, other.name])
  assert read_pfllib_folder(old).num_clients == 3  # the old dataset, back
  # killed before the swap: the target stays, the temporary folder goes
  staged.mkdir()
  write_pfllib_folder(digits_data, old, partition_meta={}, overwrite=True)
  assert read_pfllib_folder(old).num_clients == 20
  assert sorted(os.listdir(tmp_path)) == sorted(["Toy", running.name, other.name])


_KILLED_WRITER = """
import os, sys, time
from fedjax_lib.data import pfllib_format
from fedjax_lib.data.partition import build_federated
from fedjax_lib.data.sources import load_digits
x, y = load_digits()
data = build_federated("digits", x, y, 10, 4, "iid", 0)
rename = os.rename
def rename_then_wait(src, dst):
  rename(src, dst)
  if os.path.basename(dst).startswith(".old-"):
    print("moved aside", flush=True)
    time.sleep(600)
pfllib_format.os.rename = rename_then_wait
pfllib_format.write_pfllib_folder(data, sys.argv[1], partition_meta={}, overwrite=True)
"""


def test_sigkill_between_the_two_renames_loses_no_dataset(tmp_path, digits_data):
  """A real SIGKILL where the target is missing (the old folder moved aside, the new one not
  yet renamed in): the next write of the same path brings the old one back."""
  folder = _make_folder(tmp_path)
  proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, folder],
                          stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "moved aside"
    assert not os.path.exists(folder)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert len(os.listdir(tmp_path)) == 2  # the old folder aside, the new one staged
  write_pfllib_folder(digits_data, tmp_path / "Other", partition_meta={})  # another target
  assert len(os.listdir(tmp_path)) == 3
  _assert_one_line_error(r"already exists", write_pfllib_folder, digits_data, folder,
                         partition_meta={})
  assert sorted(os.listdir(tmp_path)) == ["Other", "Toy"]
  assert read_pfllib_folder(folder).num_clients == 3


def test_write_into_missing_parent(tmp_path, digits_data):
  target = os.path.join(str(tmp_path), "a", "b")
  _assert_one_line_error(r"parent directory '.*/a' does not exist", write_pfllib_folder,
                         digits_data, target, partition_meta={})


# ---------------------------------------------------------------- bad folders


def test_missing_folder(tmp_path):
  path = os.path.join(str(tmp_path), "nope")
  message = _assert_one_line_error("does not exist", read_pfllib_folder, path)
  assert path in message


def test_not_a_directory(tmp_path):
  path = os.path.join(str(tmp_path), "file")
  open(path, "w").close()
  message = _assert_one_line_error("is not a directory", read_pfllib_folder, path)
  assert path in message


@pytest.mark.parametrize("split", ["train", "test"])
def test_missing_split_subfolder(tmp_path, split):
  folder = _make_folder(tmp_path)
  for name in os.listdir(os.path.join(folder, split)):
    os.remove(os.path.join(folder, split, name))
  os.rmdir(os.path.join(folder, split))
  _assert_one_line_error(f"has no {split}/ subfolder", read_pfllib_folder, folder)


def test_no_client_files(tmp_path):
  folder = os.path.join(str(tmp_path), "empty")
  os.makedirs(os.path.join(folder, "train"))
  os.makedirs(os.path.join(folder, "test"))
  message = _assert_one_line_error("contains no client files", read_pfllib_folder, folder)
  assert os.path.join(folder, "train") in message


def test_missing_test_file(tmp_path):
  folder = _make_folder(tmp_path)
  os.remove(os.path.join(folder, "test", "1.npz"))
  message = _assert_one_line_error("is missing", read_pfllib_folder, folder)
  assert os.path.join(folder, "test", "1.npz") in message


def test_gap_in_client_ids(tmp_path):
  folder = _make_folder(tmp_path)
  os.remove(os.path.join(folder, "train", "1.npz"))
  os.remove(os.path.join(folder, "test", "1.npz"))
  message = _assert_one_line_error("must be consecutive from 0", read_pfllib_folder, folder)
  assert os.path.join(folder, "train", "1.npz") in message


def test_test_file_without_train_file(tmp_path):
  folder = _make_folder(tmp_path)
  os.remove(os.path.join(folder, "train", "2.npz"))
  _assert_one_line_error(r"test/2\.npz' has no matching train/2\.npz", read_pfllib_folder,
                         folder)


def test_badly_named_client_file(tmp_path):
  folder = _make_folder(tmp_path)
  _save(os.path.join(folder, "train", "client_a.npz"), np.zeros((1, 2)), np.zeros(1, int))
  _assert_one_line_error(r"unexpected file .*client_a\.npz", read_pfllib_folder, folder)


def test_file_that_is_not_an_npz(tmp_path):
  folder = _make_folder(tmp_path)
  path = os.path.join(folder, "train", "1.npz")
  with open(path, "wb") as f:
    f.write(b"this is not a zip archive at all")
  message = _assert_one_line_error("is not a valid .npz file", read_pfllib_folder, folder)
  assert path in message


def test_truncated_npz(tmp_path):
  folder = _make_folder(tmp_path)
  path = os.path.join(folder, "test", "0.npz")
  with open(path, "rb") as f:
    content = f.read()
  with open(path, "wb") as f:
    f.write(content[: len(content) // 2])
  message = _assert_one_line_error(r"is not a (valid \.npz file|\.npz archive)",
                                   read_pfllib_folder, folder)
  assert path in message


def test_npz_without_x_and_y(tmp_path):
  folder = _make_folder(tmp_path)
  path = os.path.join(folder, "train", "0.npz")
  np.savez_compressed(path, features=np.zeros((2, 3)))
  message = _assert_one_line_error(r"lacks the arrays 'x' and 'y'.*'features'",
                                   read_pfllib_folder, folder)
  assert path in message


def test_pickled_data_that_is_not_a_dict(tmp_path):
  folder = _make_folder(tmp_path)
  path = os.path.join(folder, "train", "0.npz")
  np.savez_compressed(path, data=np.zeros((2, 3)))
  _assert_one_line_error(r"'data' must be a pickled dict with keys 'x' and 'y'",
                         read_pfllib_folder, folder)


def test_x_and_y_length_mismatch(tmp_path):
  folder = _make_folder(tmp_path)
  path = os.path.join(folder, "train", "2.npz")
  _save(path, np.zeros((5, 1, 5, 5), np.float32), np.zeros(4, np.int64))
  message = _assert_one_line_error(r"x has 5 samples .* but y has 4 labels",
                                   read_pfllib_folder, folder)
  assert path in message


def test_labels_out_of_range(tmp_path):
  folder = _make_folder(tmp_path, num_classes=4)
  path = os.path.join(folder, "test", "1.npz")
  _save(path, np.zeros((2, 1, 5, 5), np.float32), np.array([0, 7]))
  message = _assert_one_line_error(r"has label 7 but num_classes=4", read_pfllib_folder,
                                   folder, num_classes=4)
  assert path in message


def test_negative_labels(tmp_path):
  folder = _make_folder(tmp_path)
  _save(os.path.join(folder, "train", "0.npz"), np.zeros((2, 1, 5, 5), np.float32),
        np.array([0, -1]))
  _assert_one_line_error(r"has negative label -1", read_pfllib_folder, folder)


def test_non_integer_labels(tmp_path):
  folder = _make_folder(tmp_path)
  _save(os.path.join(folder, "train", "0.npz"), np.zeros((2, 1, 5, 5), np.float32),
        np.array([0.5, 1.0]))
  _assert_one_line_error(r"labels must be integers, got dtype float64", read_pfllib_folder,
                         folder)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_features(tmp_path, bad):
  folder = _make_folder(tmp_path)
  x = np.zeros((2, 1, 5, 5), np.float32)
  x[1, 0, 2, 2] = bad
  path = os.path.join(folder, "train", "1.npz")
  _save(path, x, np.array([0, 1]))
  message = _assert_one_line_error("contains NaN or inf", read_pfllib_folder, folder)
  assert path in message


def test_client_count_differs_from_request(tmp_path):
  folder = _make_folder(tmp_path, num_clients=3)
  _assert_one_line_error(r"has 3 clients but num_clients=5 was requested", read_pfllib_folder,
                         folder, num_clients=5)


def test_config_client_count_differs_from_files(tmp_path):
  folder = _make_folder(tmp_path, num_clients=3, config={"num_clients": 4, "num_classes": 4})
  message = _assert_one_line_error(r"says num_clients=4 but the folder has 3 clients",
                                   read_pfllib_folder, folder)
  assert "config.json" in message


def test_config_num_classes_differs_from_request(tmp_path):
  folder = _make_folder(tmp_path, config={"num_clients": 3, "num_classes": 4})
  _assert_one_line_error(r"num_classes=10 was requested but .*config.json' says num_classes=4",
                         read_pfllib_folder, folder, num_classes=10)


def test_config_num_classes_below_labels(tmp_path):
  folder = _make_folder(tmp_path, num_classes=4, config={"num_classes": 2}, seed=5)
  _assert_one_line_error(r"has label [23] but num_classes=2", read_pfllib_folder, folder)


def test_malformed_config(tmp_path):
  folder = _make_folder(tmp_path)
  with open(os.path.join(folder, "config.json"), "w") as f:
    f.write('{"num_clients": 3,')
  message = _assert_one_line_error(r"config.json' is not valid JSON", read_pfllib_folder,
                                   folder)
  assert os.path.join(folder, "config.json") in message


@pytest.mark.parametrize("content,pattern", [
    ("[1, 2]", r"must hold a JSON object, got list"),
    ('{"num_clients": "3"}', r"num_clients must be a positive integer, got '3'"),
    ('{"num_classes": 0}', r"num_classes must be a positive integer, got 0"),
])
def test_config_with_bad_values(tmp_path, content, pattern):
  folder = _make_folder(tmp_path)
  with open(os.path.join(folder, "config.json"), "w") as f:
    f.write(content)
  _assert_one_line_error(pattern, read_pfllib_folder, folder)


def test_all_clients_without_training_samples(tmp_path):
  folder = _make_folder(tmp_path, train_sizes=[0, 0, 0])
  _assert_one_line_error(r"every client in .*train' has 0 training samples",
                         read_pfllib_folder, folder)


def test_an_empty_client_is_an_error(tmp_path):
  folder = _make_folder(tmp_path, train_sizes=[5, 0, 4], test_sizes=[2, 0, 2])
  _assert_one_line_error(r"client 1 is empty: .*train/1\.npz' and its test file hold no "
                         "samples", read_pfllib_folder, folder)


def test_inconsistent_sample_shapes(tmp_path):
  folder = _make_folder(tmp_path)
  path = os.path.join(folder, "test", "2.npz")
  _save(path, np.zeros((2, 3, 5, 5), np.float32), np.array([0, 1]))
  message = _assert_one_line_error(r"has samples of shape \(5, 5, 3\) but .* has \(5, 5, 1\)",
                                   read_pfllib_folder, folder)
  assert path in message


# ---------------------------------------------------------------- text


def _text_pairs(ids, as_list=False, lengths=None):
  """PFLlib's text ``x``: (token list, length) pairs, as an ``[N, 2]`` object array (what
  ``np.array(pairs, dtype=object)`` in generate_AGNews.py makes) or a plain list."""
  lengths = [len(row) for row in ids] if lengths is None else lengths
  pairs = [(list(row), n) for row, n in zip(ids, lengths)]
  return pairs if as_list else np.array(pairs, dtype=object)


def _assert_same_clients(got, want):
  assert got.num_clients == want.num_clients
  for client in range(want.num_clients):
    for split in ("train", "test"):
      for g, w in zip(got.client_arrays(client, split), want.client_arrays(client, split)):
        np.testing.assert_array_equal(g, w)


def _text_folder(root, ids_per_client, labels_per_client, **kwargs):
  folder = os.path.join(str(root), "SogouNews")
  for client, (ids, y) in enumerate(zip(ids_per_client, labels_per_client)):
    for split in ("train", "test"):
      _save(os.path.join(folder, split, f"{client}.npz"), _text_pairs(ids, **kwargs), y)
  return folder


@pytest.mark.parametrize("as_list", [False, True])
def test_reads_pfllib_text_pairs_as_exact_token_ids(tmp_path, as_list):
  rng = np.random.default_rng(0)
  ids = [rng.integers(0, 2 ** 24, (5, 7)), rng.integers(0, 100, (3, 7))]
  ids[0][0, :3] = [1, 2 ** 24 - 1, 0]  # <cls>, the largest exact id, padding
  labels = [np.array([0, 1, 2, 3, 4]), np.array([4, 0, 1])]
  data = read_pfllib_folder(_text_folder(tmp_path, ids, labels, as_list=as_list))
  assert data.sample_shape == (7,) and data.num_classes == 5 and data.x.dtype == np.float32
  for client in range(2):
    got_x, got_y = data.client_arrays(client, "test")
    np.testing.assert_array_equal(got_x.astype(np.int64), ids[client])  # float32, exact
    np.testing.assert_array_equal(got_y, labels[client])


def test_reads_one_dimensional_object_arrays_of_pairs(tmp_path):
  folder = _make_folder(tmp_path, sample_shape=(4,))
  x = np.empty(6, dtype=object)  # pairs kept as tuples in a 1-D object array
  for i in range(6):
    x[i] = ([i, i + 1, 0, 0], 4)
  _save(os.path.join(folder, "train", "0.npz"), x, np.zeros(6, np.int64))
  np.testing.assert_array_equal(read_pfllib_folder(folder).client_arrays(0)[0],
                                [[i, i + 1, 0, 0] for i in range(6)])


def test_text_round_trip_writes_what_pfllib_reads(tmp_path):
  rng = np.random.default_rng(1)
  x = rng.integers(0, 32000, (40, 200)).astype(np.float32)
  y = rng.integers(0, 4, 40)
  data = build_federated("ag_news", x, y, 4, 4, "iid", 0, balance=True)
  folder = os.path.join(str(tmp_path), "AGNews")
  write_pfllib_folder(data, folder)  # ag_news: PFLlib's text pairs
  with open(os.path.join(folder, "train", "1.npz"), "rb") as f:
    stored = np.load(f, allow_pickle=True)["data"].tolist()
  assert stored["x"].dtype == object and stored["x"].shape[1] == 2
  tokens, lengths = list(zip(*stored["x"]))  # PFLlib's read_client_data_text
  assert all(isinstance(t, list) for t in tokens) and set(lengths) == {200}
  want_x, want_y = data.client_arrays(1)
  np.testing.assert_array_equal(np.array(tokens, dtype=np.int64), want_x)
  assert stored["y"].dtype == np.int64
  np.testing.assert_array_equal(stored["y"], want_y)
  _assert_same_clients(read_pfllib_folder(folder), data)


def test_shakespeare_style_int_ids_round_trip(tmp_path):
  rng = np.random.default_rng(2)
  x = rng.integers(0, 80, (30, 80)).astype(np.float32)
  rows = np.arange(30).reshape(3, 10)
  data = FederatedData.from_client_indices("shakespeare", x, rng.integers(0, 80, 30),
                                           [r[:7] for r in rows], [r[7:] for r in rows], 80)
  folder = os.path.join(str(tmp_path), "Shakespeare")
  write_pfllib_folder(data, folder)  # shakespeare: int64 [N, 80]
  with open(os.path.join(folder, "test", "0.npz"), "rb") as f:
    stored = np.load(f, allow_pickle=True)["data"].tolist()
  assert stored["x"].dtype == np.int64 and stored["x"].shape[1:] == (80,)
  os.remove(os.path.join(folder, "config.json"))  # PFLlib's Shakespeare has none
  _assert_same_clients(read_pfllib_folder(folder, num_classes=80), data)


def test_write_x_format_can_be_chosen_and_is_checked(tmp_path, digits_data):
  rng = np.random.default_rng(3)
  ids = build_federated("tokens", rng.integers(0, 50, (20, 6)).astype(np.float32),
                        rng.integers(0, 2, 20), 2, 2, "iid", 0)
  folder = os.path.join(str(tmp_path), "pairs")
  write_pfllib_folder(ids, folder, x_format="token_pairs")
  _assert_same_clients(read_pfllib_folder(folder), ids)
  _assert_one_line_error(r"x_format='text'; choose one of float32, token_pairs, token_ids",
                         write_pfllib_folder, ids, os.path.join(str(tmp_path), "a"),
                         x_format="text")
  _assert_one_line_error(r"x_format='token_ids', dataset 'digits', train client 0: token ids "
                         r"must be a numeric \[N, max_len\] array, got shape "
                         r"\(\d+, 28, 28, 1\)", write_pfllib_folder, digits_data,
                         os.path.join(str(tmp_path), "b"), x_format="token_ids")
  _assert_one_line_error(r"token ids must be integers", write_pfllib_folder,
                         build_federated("f", rng.normal(size=(20, 3)).astype(np.float32),
                                         rng.integers(0, 2, 20), 2, 2, "iid", 0),
                         os.path.join(str(tmp_path), "c"), x_format="token_pairs")
  assert not os.path.exists(os.path.join(str(tmp_path), "b"))


BAD_TEXT = [
    # (ids of the two samples, stored lengths, expected message)
    ([[1, 2, 3], [4, 5]], None, r"text sequences have different lengths \(sample 0 has 3 "
     r"tokens, sample 1 has 2\); PFLlib pads or cuts every sequence to max_len"),
    ([[1, 2, 3], [4, -5, 6]], None, r"negative token id -5 in sample 1; token ids must be >= 0"),
    ([[1, 2.5, 3], [4, 5, 6]], None, r"token ids must be integers, sample 0 has 2\.5"),
    ([[1, 2, 3], [4, 5, 2 ** 24]], None, r"token id 16777216 is above 16777215"),
    ([[1, 2, 3], [4, 5, 6]], [3, 4], r"stored text lengths must be integers in \[0, 3\]"),
    ([[1, 2, 3], [4, 5, 6]], [3, "3"], r"stored text lengths must be integers"),
    ([[1, 2, 3], ["a", "b", "c"]], None, r"token ids must be a numeric"),
]


@pytest.mark.parametrize("ids, lengths, pattern", BAD_TEXT,
                         ids=["ragged", "negative", "fractional", "too-large", "length",
                              "length-type", "strings"])
def test_bad_text_files_are_one_line_errors(tmp_path, ids, lengths, pattern):
  folder = _make_folder(tmp_path, sample_shape=(3,))
  path = os.path.join(folder, "train", "1.npz")
  _save(path, _text_pairs(ids, lengths=lengths, as_list=True), np.array([0, 1]))
  assert path in _assert_one_line_error(pattern, read_pfllib_folder, folder)


def test_object_x_that_is_not_text_pairs(tmp_path):
  folder = _make_folder(tmp_path)
  path = os.path.join(folder, "train", "0.npz")
  x = np.empty(2, dtype=object)
  x[0], x[1] = {"a": 1}, {"b": 2}
  _save(path, x, np.array([0, 1]))
  _assert_one_line_error(r"x is neither a numeric array nor PFLlib's text format",
                         read_pfllib_folder, folder)
  _save(path, np.array([(5, 1), (6, 1)], dtype=object), np.array([0, 1]))
  _assert_one_line_error(r"x holds pairs whose first item is not a list of token ids",
                         read_pfllib_folder, folder)


def test_federated_data_round_trip_is_a_federated_data(tmp_path):
  folder = _make_folder(tmp_path)
  assert isinstance(read_pfllib_folder(folder, name="toy"), FederatedData)
  assert read_pfllib_folder(folder, name="toy").name == "toy"
