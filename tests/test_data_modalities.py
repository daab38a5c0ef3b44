"""PFLlib dataset folders of every modality, written as PFLlib's generators write them, read and
learned through the command line.

Each fixture is a tiny folder in PFLlib's on-disk format (``np.savez_compressed(f,
data={'x': x, 'y': y})`` per client and split) with a signal a small model learns in a few
rounds:

============  ==========================================  ===================================
modality      stored ``x`` (PFLlib's layout)               label signal
============  ==========================================  ===================================
image         float32 ``[N, 1, 16, 16]`` (NCHW) in ±1      a brighter quadrant per class
text          ``[N, 2]`` object array of (200 ids, 200)    a keyword token per class
              (AG News / Sogou News)
characters    int64 ``[N, 80]`` ids, no config.json        the character repeated most
              (Shakespeare)
sensor        float32 ``[N, 9, 1, 128]`` (HAR)             an offset on one channel per class
tabular       float32 ``[N, 500]`` (AmazonReview: 5000)    higher counts in a feature block
============  ==========================================  ===================================

The learning tests run ``fedjax_lib.cli.main`` in-process with ``-algo FedAvg`` and read each
run's last test accuracy from its results file (``-t 3``: seeds 0, 1, 2). The bar, 0.9, is
below every accuracy measured (see the comment above the learning tests) and far above
chance.
"""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lib import cli
from fedjax_lib.data import load_federated
from fedjax_lib.data import registry
from fedjax_lib.data import write_pfllib_folder
from fedjax_lib.data.pfllib_format import read_pfllib_folder
from fedjax_lib.errors import DataError
from fedjax_lib.models import count_params, make_model, split_params

NUM_CLIENTS = 4
TRAIN, TEST = 48, 24  # samples per client and split


# ---------------------------------------------------------------- fixtures, as PFLlib writes


def write_client(folder, split, client, x, y):
  """One client file, as PFLlib's ``save_file`` writes it."""
  os.makedirs(os.path.join(folder, split), exist_ok=True)
  with open(os.path.join(folder, split, f"{client}.npz"), "wb") as f:
    np.savez_compressed(f, data={"x": x, "y": y})


def write_folder(folder, make_split, num_classes, seed=0, config=True):
  """A PFLlib folder of `NUM_CLIENTS` clients: ``make_split(rng, y)`` gives the stored ``x``
  of labels ``y``; config.json as PFLlib's generator writes it (unless ``config`` is false)."""
  rng = np.random.default_rng(seed)
  sizes = []
  for client in range(NUM_CLIENTS):
    labels = []
    for split, n in (("train", TRAIN), ("test", TEST)):
      y = rng.integers(0, num_classes, n).astype(np.int64)
      write_client(folder, split, client, make_split(rng, y), y)
      labels.append(y)
    counts = np.bincount(np.concatenate(labels), minlength=num_classes)
    sizes.append([[int(c), int(counts[c])] for c in np.flatnonzero(counts)])
  if config:
    with open(os.path.join(folder, "config.json"), "w") as f:
      json.dump({"num_clients": NUM_CLIENTS, "num_classes": num_classes, "non_iid": False,
                 "balance": True, "partition": None,
                 "Size of samples for labels in clients": sizes, "alpha": 0.1,
                 "batch_size": 10}, f)
  return str(folder)


def images(rng, y):
  """MNIST-like NCHW float32 in [-1, 1]: class c lights up quadrant c of a 16x16 image."""
  x = rng.uniform(-1.0, 0.2, (len(y), 1, 16, 16)).astype(np.float32)
  for i, c in enumerate(y):
    row, col = divmod(int(c), 2)
    x[i, 0, 8 * row:8 * row + 8, 8 * col:8 * col + 8] += 0.8
  return x


TEXT_LEN, TEXT_VOCAB = 200, 40


def news(rng, y):
  """AG News-like text as PFLlib stores it: an ``[N, 2]`` object array of (``<cls>`` id 1 +
  20-60 word ids zero-padded to 200, the padded length 200); class c has six copies of word
  ``2 + c`` among random words ``8..39``."""
  pairs = []
  for c in y:
    words = list(rng.integers(8, TEXT_VOCAB, rng.integers(20, 60)))
    for _ in range(6):
      words.insert(int(rng.integers(0, len(words) + 1)), 2 + int(c))
    text = [1] + [int(w) for w in words]
    text = (text + [0] * TEXT_LEN)[:TEXT_LEN]
    pairs.append((text, len(text)))
  return np.array(pairs, dtype=object)  # PFLlib's generate_AGNews.py


def characters(rng, y):
  """Shakespeare-like int64 ``[N, 80]`` character ids; in class c's windows character
  ``10 + c`` is every other character."""
  x = rng.integers(20, 80, (len(y), 80))
  x[:, ::2] = 10 + y[:, None]
  return x.astype(np.int64)


def har(rng, y):
  """HAR-like float32 ``[N, 9, 1, 128]`` windows (9 channels, 1 x 128 steps): noise plus an
  offset of 1 on channel c for class c."""
  x = rng.normal(0.0, 0.5, (len(y), 9, 1, 128)).astype(np.float32)
  x[np.arange(len(y)), y] += 1.0
  return x


TABULAR_DIM = 500


def reviews(rng, y):
  """AmazonReview-like float32 ``[N, 500]`` counts: features 0-19 are frequent in class 1,
  20-39 in class 0."""
  rates = np.full((len(y), TABULAR_DIM), 0.05)
  rates[:, :20] += 0.6 * y[:, None]
  rates[:, 20:40] += 0.6 * (1 - y[:, None])
  return rng.poisson(rates).astype(np.float32)


# ---------------------------------------------------------------- running the CLI


def run_cli(argv, out):
  """``cli.main(argv)`` in-process; the last test accuracy of every run, from its results
  file."""
  assert cli.main([*argv, "--out", str(out), "--no-progress", "-q"]) == 0
  files = sorted(f for f in glob.glob(os.path.join(str(out), "*.json"))
                 if not f.endswith("_partition.json"))
  accuracies = []
  for path in files:
    with open(path) as f:
      accuracies.append(json.load(f)["last_test_acc"])
  return accuracies


def pfllib_checkout(root, folder_name, make_split, num_classes, **kwargs):
  """``root/dataset/<folder_name>`` and ``root/system``, as a PFLlib checkout has them;
  returns the ``system`` directory."""
  write_folder(os.path.join(str(root), "dataset", folder_name), make_split, num_classes,
               **kwargs)
  system = os.path.join(str(root), "system")
  os.makedirs(system, exist_ok=True)
  return system


# ---------------------------------------------------------------- learning, per modality
#
# Every case was measured on three data seeds (write_folder's seed 0, 1, 2) with the runs of
# -t 3 (seeds 0, 1, 2): all 27 last test accuracies were 1.0 for the settings below (0.99 at
# worst for the news text); the bar is 0.9. With 4 rounds and 1 local epoch the image and
# sensor cases fell to 0.4-0.6 on some seeds, hence 10 rounds of 2 epochs.

LEARN = ["-algo", "FedAvg", "-gr", "10", "-ls", "2", "-t", "3"]


@pytest.mark.xla_optimized  # runs long enough to repay it: tests/conftest.py
def test_news_folder_learns_with_dropout_under_fedavg(tmp_path):
  """TextCNN has dropout: FedAvg trains it in training mode (dropout keys per client).
  Measured 2026-12-01 at lr 0.3, runs of -t 3 on data seeds 0, 1, 2: all nine 1.0 (lr 0.1:
  1.0 / .635 / .927 on data seed 0; lr 1.0: .427 once)."""
  folder = write_folder(tmp_path / "AGNews", news, 4)
  acc = run_cli(["-data", folder, "-m", "textcnn", "-fd", "32", "-vs", str(TEXT_VOCAB),
                 "-lr", "0.3", *LEARN], tmp_path / "out")
  assert len(acc) == 3 and min(acc) >= 0.9, acc  # chance: 0.25


@pytest.mark.xla_optimized  # runs long enough to repay it: tests/conftest.py
def test_image_folder_learns(tmp_path):
  folder = write_folder(tmp_path / "MNIST", images, 4)
  acc = run_cli(["-data", folder, "-m", "cnn", "-lr", "0.05", *LEARN], tmp_path / "out")
  assert len(acc) == 3 and min(acc) >= 0.9, acc  # chance: 0.25


def test_news_folder_learns(tmp_path):
  folder = write_folder(tmp_path / "AGNews", news, 4)
  acc = run_cli(["-data", folder, "-m", "fastText", "-fd", "32", "-vs", str(TEXT_VOCAB),
                 "-lr", "1.0", *LEARN], tmp_path / "out")
  assert len(acc) == 3 and min(acc) >= 0.9, acc  # chance: 0.25


def test_shakespeare_by_name_from_pfllib_system_folder(tmp_path, monkeypatch):
  system = pfllib_checkout(tmp_path, "Shakespeare", characters, 5, config=False)
  monkeypatch.chdir(system)  # PFLlib's main.py runs here and reads ../dataset/Shakespeare
  acc = run_cli(["-data", "Shakespeare", "-m", "fastText", "-fd", "32", "-lr", "1.0", *LEARN],
                tmp_path / "out")
  assert len(acc) == 3 and min(acc) >= 0.9, acc  # chance: 0.2


@pytest.mark.xla_optimized  # runs long enough to repay it: tests/conftest.py
def test_har_by_name_from_pfllib_system_folder(tmp_path, monkeypatch):
  system = pfllib_checkout(tmp_path, "HAR", har, 6)
  monkeypatch.chdir(system)
  acc = run_cli(["-data", "har", "-m", "HARCNN", "-lr", "0.05", *LEARN], tmp_path / "out")
  assert len(acc) == 3 and min(acc) >= 0.9, acc  # chance: 1/6


def test_tabular_folder_learns(tmp_path):
  folder = write_folder(tmp_path / "AmazonReview", reviews, 2)
  acc = run_cli(["-data", folder, "-m", "amazonmlp_64", "-lr", "0.05", *LEARN],
                tmp_path / "out")
  assert len(acc) == 3 and min(acc) >= 0.9, acc  # chance: 0.5


# ---------------------------------------------------------------- what each modality reads as


def test_news_pairs_read_as_exact_token_ids(tmp_path):
  folder = write_folder(tmp_path / "AGNews", news, 4)
  data = read_pfllib_folder(folder)
  assert data.sample_shape == (TEXT_LEN,) and data.num_classes == 4
  with np.load(os.path.join(folder, "test", "3.npz"), allow_pickle=True) as f:
    stored = f["data"].tolist()
  ids, lengths = zip(*stored["x"])  # PFLlib's read_client_data_text
  assert set(lengths) == {TEXT_LEN}
  np.testing.assert_array_equal(data.client_arrays(3, "test")[0], np.array(ids))
  np.testing.assert_array_equal(data.client_arrays(3, "test")[1], stored["y"])
  # written back (data.name "AGNews": PFLlib's pairs), the files hold what PFLlib wrote
  (tmp_path / "copy").mkdir()
  write_pfllib_folder(data, tmp_path / "copy" / "AGNews")
  with np.load(os.path.join(str(tmp_path), "copy", "AGNews", "test", "3.npz"),
               allow_pickle=True) as f:
    again = f["data"].tolist()
  assert again["x"].dtype == object and again["x"].shape == stored["x"].shape
  assert again["x"].tolist() == stored["x"].tolist()
  np.testing.assert_array_equal(again["y"], stored["y"])


def test_shakespeare_without_config_gets_the_registrys_classes(tmp_path, monkeypatch):
  system = pfllib_checkout(tmp_path, "Shakespeare", characters, 5, config=False)
  monkeypatch.chdir(system)
  data = load_federated("shakespeare")
  assert data.sample_shape == (80,) and data.num_clients == NUM_CLIENTS
  assert data.num_classes == registry.resolve("shakespeare").num_classes == 80
  with np.load(os.path.join("..", "dataset", "Shakespeare", "train", "0.npz"),
               allow_pickle=True) as f:
    np.testing.assert_array_equal(data.client_arrays(0)[0], f["data"].tolist()["x"])


def _trace(name, sample_shape, num_classes):
  """``(parameter count, feature shape)`` of model ``name`` on ``sample_shape`` (abstract)."""
  model = make_model(name, sample_shape, num_classes)
  x = jax.ShapeDtypeStruct((2, *sample_shape), jnp.float32)
  def run(x):
    (z, _), variables = model.init_with_output(jax.random.PRNGKey(0), x, method="forward")
    return variables, z
  variables, z = jax.eval_shape(run, x)
  base, head = split_params(variables)
  return count_params(base) + count_params(head), z.shape


@pytest.mark.parametrize("name, stored_shape, classes, models", [
    # PyTorch's counts of PFLlib's HARCNN (tests/test_models_text_sensor.py) and the
    # flattened widths (PFLlib's dim_hidden: 1664 for HAR, 3712 for PAMAP2).
    ("har", (9, 1, 128), 6, {"harcnn": (2_253_958, 1664), "harcnn1": (None, 1920),
                             "harcnn3": (None, 1536)}),
    ("pamap2", (9, 3, 256), 12, {"harcnn": (4_354_188, 3712)}),
])
def test_sensor_folders_fit_the_harcnn_models(tmp_path, name, stored_shape, classes, models):
  spec = registry.resolve(name)
  folder = os.path.join(str(tmp_path), spec.pfllib_folder)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, *stored_shape)).astype(np.float32)
  for split in ("train", "test"):
    write_client(folder, split, 0, x, np.array([0, 1, classes - 1]))
  data = load_federated(name, data_dir=str(tmp_path))
  assert data.sample_shape == spec.shape == (stored_shape[1], stored_shape[2], 9)
  # sample n, channel c, row h, step t is stored at [n, c, h, t] and read at [n, h, t, c]
  np.testing.assert_array_equal(data.client_arrays(0)[0], x.transpose(0, 2, 3, 1))
  for model, (count, width) in models.items():
    traced_count, features = _trace(model, data.sample_shape, classes)
    assert features == (2, width), model
    assert count is None or traced_count == count, model


def test_tabular_folder_reads_flat_features(tmp_path):
  folder = write_folder(tmp_path / "AmazonReview", reviews, 2)
  data = read_pfllib_folder(folder)
  assert data.sample_shape == (TABULAR_DIM,) and data.num_classes == 2
  assert _trace("amazonmlp_64", data.sample_shape, 2)[1] == (2, 100)  # input width inferred


# ---------------------------------------------------------------- -data NAME


def test_name_reads_data_dir_before_pfllib_dataset_folder(tmp_path, monkeypatch):
  system = pfllib_checkout(tmp_path / "pfllib", "HAR", har, 6)
  elsewhere = os.path.join(str(tmp_path), "mine")
  write_folder(os.path.join(elsewhere, "HAR"), har, 6, seed=1)
  monkeypatch.chdir(system)
  from_system = load_federated("HAR")
  from_data_dir = load_federated("har", data_dir=elsewhere)
  assert from_system.name == from_data_dir.name == "har"
  assert from_system.num_clients == NUM_CLIENTS and from_system.sample_shape == (1, 128, 9)
  assert not np.array_equal(from_system.x, from_data_dir.x)  # seed 1's folder, not seed 0's
  # a data_dir without the folder falls back to ../dataset/HAR
  np.testing.assert_array_equal(load_federated("har", data_dir=str(tmp_path)).x,
                                from_system.x)


def test_name_without_folder_says_where_it_looked(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(DataError) as info:
    load_federated("femnist", data_dir=str(tmp_path / "tfds"))
  message = str(info.value)
  assert "\n" not in message
  for part in (os.path.join(str(tmp_path), "tfds", "FEMNIST"),
               os.path.join(os.path.dirname(str(tmp_path)), "dataset", "FEMNIST"),
               "python generate_FEMNIST.py", "dataset/FEMNIST"):
    assert part in message, (part, message)


def test_bad_text_folder_is_a_one_line_cli_error(tmp_path, capsys):
  folder = write_folder(tmp_path / "AGNews", news, 4)
  pairs = news(np.random.default_rng(0), np.array([0, 1]))
  pairs[1, 0] = pairs[1, 0][:150]  # one sequence shorter than max_len
  write_client(folder, "train", 2, pairs, np.array([0, 1]))
  assert cli.main(["-data", folder, "-m", "fasttext", "--out", str(tmp_path / "out"),
                   "--no-progress"]) == 2
  errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, errors
  assert os.path.join(folder, "train", "2.npz") in errors[0] and "different lengths" in errors[0]


def test_token_ids_beyond_the_vocabulary_are_refused_before_training(tmp_path, capsys):
  """PFLlib's default -vs 80 under 40-word news is fine; -vs 30 would look up NaN rows."""
  from tests.helpers import assert_cli_refuses  # pylint: disable=import-outside-toplevel
  folder = write_folder(tmp_path / "AGNews", news, 4)
  assert_cli_refuses(["-data", folder, "-m", "fasttext", "-vs", "30"],
                     ["token ids up to 39", "'fasttext'", "vocabulary of 30", "-vs 40"],
                     tmp_path, capsys)


def test_max_len_must_match_the_text_datas_length(tmp_path, capsys):
  """PFLlib's -ml: its TextCNN pools over exactly max_len positions, so another length than
  the data's (200 here) is refused; -ml 200 is accepted."""
  from tests.helpers import assert_cli_refuses  # pylint: disable=import-outside-toplevel
  folder = write_folder(tmp_path / "AGNews", news, 4)
  assert_cli_refuses(["-data", folder, "-m", "fasttext", "-ml", "100"],
                     ["max_len=100", "length 200", "-ml 200"], tmp_path, capsys)
  assert cli.main(["-data", folder, "-m", "fasttext", "-ml", "200", "-gr", "1", "--out",
                   str(tmp_path / "ok"), "--no-progress", "--no-plot"]) == 0
