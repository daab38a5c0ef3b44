"""The bad-input catalogue: every entry is one line ``error: ...`` naming the bad value and
what is accepted, exit status 2 from the CLI, and no output written.

Covers CLI flags, config files, dataset folders, partition settings that cannot be met and
checkpoint folders; then property-based tests of the config validator.
"""

import json
import math
import os
import re
import sys

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fedjax_lib import Config, cli, runner
from fedjax_lib.errors import ConfigError
from tests.test_data_pfllib_format import _make_folder, _save

# (argv, words the error line must contain)
FLAGS = [
    (["-nnc", "-1"], ["num_new_clients", "-1"]),
    (["-ften", "-2"], ["fine_tuning_epoch_new", "-2"]),
    (["--checkpoint-every", "-1"], ["checkpoint_every", "-1"]),
    (["--keep-checkpoints", "0"], ["keep_checkpoints", "0"]),
    (["--on-nan", "ignore"], ["ignore", "skip-client"]),
    (["-algo", "FedALA", "-s", "0"], ["rand_percent", "0"]),
    (["-algo", "FedALA", "-p", "-1"], ["layer_idx", "-1"]),
    (["-algo", "FedDBE", "-mo", "1.5"], ["momentum", "1.5"]),
    (["-algo", "FedCP", "-lam", "-1"], ["lam", "-1"]),
    # infinite weights and rates (accepted until 2026-12-07, then the run stopped non-finite)
    (["-algo", "FedProx", "-mu", "inf"], ["FedProx", "mu=inf", "finite number >= 0"]),
    (["-algo", "Ditto", "-mu", "inf"], ["Ditto", "mu=inf", "finite number >= 0"]),
    (["-algo", "FedCP", "-lam", "inf"], ["FedCP", "lam=inf", "finite number >= 0"]),
    (["-algo", "GPFL", "-lam", "inf"], ["GPFL", "lam=inf", "finite number >= 0"]),
    (["-algo", "FedALA", "-et", "inf"], ["FedALA", "eta=inf", "finite number >= 0"]),
    (["-algo", "PerAvg", "-bt", "0"], ["beta", "0"]),
    (["-algo", "FedBABU", "-fte", "-1"], ["fine_tuning_epochs", "-1"]),
    (["-algo", "GPFL", "-mu", "-0.5"], ["mu", "-0.5"]),
    (["-algo", "FedRep", "-pls", "0"], ["plocal_epochs", "0"]),
    (["-eg", "0"], ["eval_gap", "0"]),
    (["-t", "0"], ["times", "0"]),
    (["--alpha", "0"], ["alpha", "0"]),
    (["--partition", "weird"], ["weird", "dir"]),
    (["--train-ratio", "1.0"], ["train_ratio", "1.0"]),
    (["-nc", "0"], ["num_clients", "0"]),
    (["-lr", "nan"], ["learning_rate", "nan"]),
    (["--resume"], ["resume", "no checkpoint"]),
    (["--algo-param", "mu"], ["mu", "NAME=VALUE"]),
    (["-algo", "FedProx", "--algo-param", "mu=abc"], ["abc", "number"]),
    # run settings the algorithm reads from the run (it would contradict -jr / -eg)
    (["-algo", "FedCross", "--algo-param", "join_ratio=0.5"], ["join_ratio=0.5", "-jr"]),
    (["-algo", "pFedMe", "--algo-param", "eval_gap=3"], ["eval_gap=3", "-eg"]),
    (["-algo", "FedDyn", "--sweep", "algo_join_ratio=0.5,1"], ["join_ratio=0.5", "-jr"]),
    (["--sweep", "seed=0,x"], ["'x'", "seed"]),
    (["--sweep", "seed=0,1", "seed=2"], ["seed", "twice"]),
    (["-algo", "Ditto", "--sweep", "plocal_epochs=1,2"], ["plocal_epochs", "floating-point"]),
    (["--sweep", "seed=0,1", "-t", "2"], ["times=2", "sweep seed"]),
    # Seeds are 32-bit (JAX's keys keep the low 32 bits: 2**32 would repeat seed 0, -1 2**32-1)
    (["--seed", "-1"], ["seed=-1", "[0, 4294967295]"]),
    (["--seed", "4294967296"], ["seed=4294967296", "32-bit"]),
    (["--partition-seed", "-2"], ["partition_seed=-2", "[0, 4294967295]"]),
    (["--seed", "4294967295", "-t", "2"], ["times=2", "seed <= 4294967294"]),
    (["--sweep", "seed=0,4294967296"], ["sweep seed=4294967296", "[0, 4294967295]"]),
    (["-m", "cnn,,dnn"], ["empty model name", "cnn, dnn, mlr"]),
    (["-m", "cnn,resnet999"], ["resnet999", "accepted names"]),
    (["-fd", "0"], ["feature_dim", "0"]),
    # integers travel into compiled programs as int32; feature widths build a (D × fd) pooling
    # matrix (2**31 took all memory before anything ran, 2**63 ended in a traceback)
    (["-gr", "2147483648"], ["global_rounds=2147483648", "[0, 2147483647]"]),
    (["-t", "2147483647"], ["times=2147483647", "[1, 65536]"]),
    (["-algo", "pFedMe", "-K", "9223372036854775808"], ["K=9223372036854775808",
                                                         "[1, 2147483647]"]),
    (["-fd", "65537"], ["feature_dim=65537", "[1, 65536]"]),
    (["-algo", "FedMRL", "-sfd", "2147483648"], ["sub_feature_dim=2147483648", "[1, 65536]"]),
    (["-algo", "FedGen", "-nd", "2147483647"], ["noise_dim=2147483647", "[1, 65536]"]),
    (["-algo", "FedGen-PFLlib", "-hd", "65537"], ["hidden_dim=65537", "[1, 65536]"]),
    (["--conv-impl", "fast"], ["fast", "hybrid"]),
    (["-m", "dnn", "--conv-impl", "lax"], ["conv_impl='lax'", "dnn", "auto"]),
    (["-m", "cnn,dnn", "-algo", "FedAvg"], ["cnn and dnn", "uploads differ"]),
    (["--devices", "99"], ["devices=99", "available"]),
    (["--client-threads", "0"], ["client_threads=0", ">= 1"]),
    (["--client-threads", "2", "--executor", "vmap"], ["client_threads=2", "sequential"]),
    (["--distributed"], ["JAX_COORDINATOR_ADDRESS"]),
    (["--compile-cache", os.path.abspath(__file__)], ["compile_cache", "is a file"]),
    (["--compile-cache", os.path.join(os.path.abspath(__file__), "cache")],
     ["compile_cache", "cannot be created", "auto"]),
    # partition settings that cannot be met
    (["--partition", "pat", "--class-per-client", "11"], ["class_per_client", "11"]),
    (["-nc", "2000"], ["2000"]),
    (["-nc", "3", "--partition", "exdir"], ["10 labels", "class_per_client >= 4",
                                            "at least 5 clients"]),
    (["--overwrite", "yes"], ["unrecognized arguments: yes"]),
    (["--no-plot", "0"], ["unrecognized arguments: 0"]),
    (["--config", "/nonexistent/config.json"], ["cannot read config file", "/nonexistent"]),
    # settings that would waste the run (fedjax_lib.checks; tests/test_settings_checks.py)
    (["-m", "dnn", "-nc", "4", "-gr", "3", "-eg", "5"], ["eval_gap=5", "global_rounds=3"]),
    (["-m", "dnn", "-nc", "4", "-algo", "FedALA", "-p", "5"], ["layer_idx=5", "0 (all"]),
    (["-m", "dnn", "--partition", "iid", "--balance", "-algo", "FedALA", "-s", "1"],
     ["rand_percent=1", "rand_percent >= 2"]),
    (["-m", "mlr", "-nc", "4", "-algo", "FedPer"], ["FedPer", "'mlr'"]),
    (["-m", "mlr", "-nc", "4", "-algo", "FedRep"], ["FedRep", "'mlr'"]),
    (["-m", "mlr", "-nc", "4", "-algo", "FedBABU"], ["FedBABU", "'mlr'"]),
    # heterogeneous models (HtFLlib's zoo, FedProto, FedTGP)
    (["-m", "HtFE-img-7"], ["HtFE-img-7", "HtFE-img-8", "resnet18"]),
    (["-m", "cnn,HtFE-img-8"], ["HtFE-img-8", "whole -m value"]),
    (["-m", "resnet18+head256"], ["head", "first dimension 256", "feature dimension 512"]),
    (["-m", "vit_b_16"], ["vit_b_16", "32x32"]),
    (["-data", "digits32", "-nc", "4", "-m", "Res34-HtC-img-4", "-algo", "LG-FedAvg"],
     ["LG-FedAvg shares the head", "different heads"]),
    (["-data", "digits32", "-nc", "4", "-m", "resnet4", "-algo", "MOON"],
     ["MOON cannot train model resnet4", "BatchNorm", "SCAFFOLD"]),
    (["-m", "cnn,dnn", "-fd", "-3"], ["feature_dim", "-3"]),
    (["-algo", "FedTGP", "-mart", "0"], ["margin_threshold=0", "> 0", "-mart"]),
    (["-algo", "FedTGP", "-se", "-1"], ["server_epochs=-1"]),
    (["-m", "cnn,mlr", "-nc", "4", "-algo", "FedProto"], ["FedProto", "'mlr'",
                                                        "base/head split"]),
    (["-m", "mlr", "-nc", "4", "-algo", "FedTGP"], ["FedTGP", "'mlr'", "base/head split"]),
    (["-dp", "-dps", "1", "--shuffle", "false"], ["shuffle=False", "drawn at random"]),
    # refused before the architecture groups' updates are traced (per example with -dp):
    # PerAvg's per-example loss splits one example into two empty half-batches
    (["-m", "cnn,dnn", "-nc", "4", "-algo", "PerAvg", "-dp"],
     ["privacy (-dp) is not available for PerAvg"]),
    (["--shuffle", "sometimes"], ["--shuffle", "sometimes"]),
    (["-m", "mlr", "-nc", "4", "-jr", "0.25", "-cdr", "0.5"],
     ["client_drop_rate=0.5", "1 selected", "client_drop_rate <= 0 (-cdr)", "(-jr)"]),
    (["-m", "mlr", "-nc", "4", "-algo", "FedAMP", "-nnc", "1"],
     ["FedAMP", "num_new_clients=1", "-nnc 0", "FedFomo", "FedPCL"]),
    (["-m", "mlr", "-nc", "4", "-jr", "0.75", "-cdr", "0.67"],
     ["client_drop_rate=0.67", "3 selected", "client_drop_rate <= 0.6666 (-cdr)"]),
]


def _run(argv, tmp_path, capsys):
  """Runs the CLI; returns (exit status, the error lines, whether output was written)."""
  out = tmp_path / "out"
  before = sorted(p.name for p in out.rglob("*")) if out.exists() else []
  with pytest.raises(SystemExit) as exc:
    sys.exit(cli.main(argv + ["--out", str(out), "--no-progress"]))
  err = capsys.readouterr().err.strip()
  after = sorted(p.name for p in out.rglob("*")) if out.exists() else []
  return exc.value.code, [l for l in err.splitlines() if l.startswith("error:")], before != after


def _check(argv, words, tmp_path, capsys):
  code, lines, wrote = _run(argv, tmp_path, capsys)
  assert code == 2
  assert len(lines) == 1, lines
  for word in words:
    assert word in lines[0], (word, lines[0])
  assert not wrote


@pytest.mark.parametrize("argv,words", FLAGS, ids=[" ".join(a) for a, _ in FLAGS])
def test_bad_flags(argv, words, tmp_path, capsys):
  _check(argv, words, tmp_path, capsys)


@pytest.mark.parametrize("argv", [["-nc", "0"], ["-m", "mlr", "-nc", "4", "--resume"]],
                         ids=["config", "resume"])
def test_refused_run_creates_no_compile_cache(argv, tmp_path, capsys):
  """The cache folder is made only after the checks that compile nothing (``--resume``
  without a checkpoint is refused after the data and the engine are built)."""
  _check(argv + ["--compile-cache", str(tmp_path / "cache")], [], tmp_path, capsys)
  assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------------- config files
CONFIG_FILES = [
    (None, ["cannot read config file"]),
    ("{not json", ["not valid JSON", "line 1"]),
    ('[1, 2]', ["JSON list", "object"]),
    ('{"learning_rat": 0.1}', ["learning_rat", "accepted fields"]),
    ('{"learning_rate": -1}', ["learning_rate", "-1"]),
    ('{"algo_params": [1]}', ["algo_params", "object"]),
    ('{"config": {"batch_size": 0}}', ["batch_size", "0"]),  # a results file's config
    # a run's <...>_partition.json, next to its results JSON
    ('{"dataset": "digits", "num_clients": 2, "train_samples": [3, 4], "test_samples": [1, 1], '
     '"samples_per_label": [{"0": 4}, {"1": 5}]}', ["partition description", "results JSON"]),
]


@pytest.mark.parametrize("content,words", CONFIG_FILES,
                         ids=["missing", "invalid", "list", "unknown", "bad-value", "params",
                              "results-file", "partition-file"])
def test_bad_config_files(content, words, tmp_path, capsys):
  path = tmp_path / "config.json"
  if content is not None:
    path.write_text(content)
  _check(["--config", str(path)], words, tmp_path, capsys)


def test_config_file_that_is_a_partition_summary(tmp_path, capsys):
  """What a run writes as ``<...>_partition.json`` (`FederatedData.summary`), given to
  ``--config``, is recognised as such (the literal case above would not notice new keys)."""
  data = runner.load_data(Config(num_clients=3))
  path = tmp_path / "digits_FedAvg_test_partition.json"
  path.write_text(json.dumps(data.summary()))
  _check(["--config", str(path)], ["partition description", "results JSON"], tmp_path, capsys)


# ---------------------------------------------------------------------------- dataset folders
def _folder_case(kind, root):
  folder = _make_folder(root, num_classes=4, config={"num_clients": 3, "num_classes": 4})
  if kind == "missing-test-file":
    os.remove(os.path.join(folder, "test", "2.npz"))
  elif kind == "wrong-keys":
    np.savez(os.path.join(folder, "train", "1.npz"), data=np.array([1, 2]))
  elif kind == "mismatched-counts":
    with open(os.path.join(folder, "config.json"), "w") as f:
      json.dump({"num_clients": 5, "num_classes": 4}, f)
  elif kind == "label-out-of-range":
    _save(os.path.join(folder, "train", "0.npz"), np.zeros((6, 1, 5, 5), np.float32),
          np.array([0, 1, 2, 3, 4, 9]))
  elif kind == "nan-features":
    x = np.zeros((6, 1, 5, 5), np.float32)
    x[2, 0, 1, 1] = np.nan
    _save(os.path.join(folder, "train", "1.npz"), x, np.zeros(6, np.int64))
  elif kind == "empty-client":
    for split in ("train", "test"):
      _save(os.path.join(folder, split, "1.npz"), np.zeros((0, 1, 5, 5), np.float32),
            np.zeros(0, np.int64))
  elif kind == "no-train-dir":
    os.rename(os.path.join(folder, "train"), os.path.join(folder, "training"))
  return folder


FOLDERS = [
    ("missing-test-file", ["test/2.npz", "missing"]),
    ("wrong-keys", ["1.npz"]),
    ("mismatched-counts", ["num_clients=5", "3"]),
    ("label-out-of-range", ["label 9", "num_classes=4"]),
    ("nan-features", ["NaN"]),
    ("empty-client", ["client 1 is empty", "1.npz"]),
    ("no-train-dir", ["train/"]),
]


@pytest.mark.parametrize("kind,words", FOLDERS, ids=[k for k, _ in FOLDERS])
def test_bad_dataset_folders(kind, words, tmp_path, capsys):
  folder = _folder_case(kind, tmp_path / "data")
  _check(["-data", folder, "-m", "dnn"], words, tmp_path, capsys)


# ---------------------------------------------------------------------------- checkpoints
def test_bad_checkpoint_folders(tmp_path, capsys):
  base = ["-m", "dnn", "-nc", "4", "-gr", "1", "--checkpoint-every", "1"]
  code, lines, _ = _run(base, tmp_path, capsys)
  assert code == 0 and not lines
  # a different config on the same --out is refused, naming the differing fields
  _check(base + ["-lr", "0.1", "-ls", "2"],
         ["different config", "learning_rate: 0.005 → 0.1", "local_epochs: 1 → 2"], tmp_path,
         capsys)
  # every checkpoint unreadable + --resume
  ckpts = tmp_path / "out" / "checkpoints" / "digits_FedAvg_test_0"
  for f in ckpts.rglob("*"):
    if f.is_file():
      f.write_text("garbage")
  _check(base + ["--resume"], ["none of the 2 checkpoint(s)", "can be read"], tmp_path, capsys)
  assert sorted(os.listdir(ckpts)) == ["1", "2"]  # nothing moved aside


# ---------------------------------------------------------------------------- properties
_NUMBERS = st.one_of(st.integers(-5, 50), st.floats(allow_nan=True, allow_infinity=True),
                     st.booleans(), st.text(max_size=3), st.none())
_FIELDS = ("learning_rate", "batch_size", "join_ratio", "client_drop_rate", "global_rounds",
           "eval_gap", "alpha", "train_ratio", "num_clients", "times", "checkpoint_every",
           "num_new_clients", "auto_break", "on_nan", "executor", "partition", "conv_impl",
           "seed", "partition_seed")


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(_FIELDS), _NUMBERS, max_size=4))
def test_validator_accepts_or_names_the_field(changes):
  """Any values: either valid, or a ConfigError naming one of the changed fields."""
  try:
    config = Config(**changes).validate()
  except ConfigError as e:
    assert any(name in str(e) for name in changes), (changes, str(e))
    assert "\n" not in str(e)
    return
  assert config.learning_rate > 0 and math.isfinite(config.learning_rate)
  assert isinstance(config.batch_size, int) and config.batch_size >= 1
  assert 0 < config.join_ratio <= 1 and 0 <= config.client_drop_rate < 1
  assert config.on_nan in ("stop", "skip-client")
  assert 0 <= config.seed and (config.partition_seed is None or config.partition_seed >= 0)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 500), st.floats(0.01, 1.0), st.floats(0.0, 0.99))
@example(5, 1.0, 0.875)  # (1 - 0.8) * 5 < 1 in floats: 0.8 would keep no client
def test_participation_check_matches_pfllib_counts(num_clients, join_ratio, drop_rate):
  config = Config(join_ratio=join_ratio, client_drop_rate=drop_rate)
  joined = int(num_clients * join_ratio)
  kept = int((1 - drop_rate) * joined)
  if joined >= 1 and kept >= 1:
    config.check_participation(num_clients)
  else:
    with pytest.raises(ConfigError, match="join_ratio|client_drop_rate") as refused:
      config.check_participation(num_clients)
    if joined >= 1:  # the rate it suggests keeps a client
      bound = float(re.search(r"client_drop_rate <= ([0-9.e-]+)", str(refused.value))[1])
      assert int((1 - bound) * joined) >= 1 and bound < drop_rate, str(refused.value)
