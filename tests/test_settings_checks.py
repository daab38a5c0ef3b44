"""Settings that waste a run (`fedjax_lib.checks` and `Algorithm.check_settings`).

Refusals go through the CLI: exit status 2, one ``error:`` line naming the value, nothing
written. Warnings come from ``runner.build(config).warnings``; their numbers are recomputed
from the built data rather than pinned. Nothing here trains: every test only builds.
"""

import os
import subprocess
import sys
import warnings as py_warnings

import pytest

from fedjax_lib import Config
from fedjax_lib.errors import FedJaxWarning
from fedjax_lib.runner import build, collected_warnings
from tests.test_bad_inputs import _check
from tests.test_data_pfllib_format import _make_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small and quick to partition: 4 balanced iid clients of the digits, a one-layer DNN.
SMALL = dict(model="dnn", num_clients=4, partition="iid", balance=True, progress=False)
# PFLlib's default Dirichlet partition (uneven clients), 8 clients.
UNEVEN = dict(model="dnn", num_clients=8, progress=False)


def _warnings(**changes):
  return build(Config(**{**SMALL, **changes})).warnings


def _one(warnings, *words):
  """The one warning containing every word in ``words``."""
  found = [w for w in warnings if all(word in w for word in words)]
  assert len(found) == 1, (words, warnings)
  assert "\n" not in found[0] and not found[0].startswith("warning")
  return found[0]


def _folder(tmp_path, train_sizes, test_sizes):
  return _make_folder(tmp_path / "data", num_clients=len(train_sizes), train_sizes=train_sizes,
                      test_sizes=test_sizes)


# ---------------------------------------------------------------------------- refusals
REFUSED = [
    (["-m", "dnn", "-nc", "4", "-gr", "3", "-eg", "5"], ["eval_gap=5", "global_rounds=3"]),
    (["-m", "dnn", "-nc", "4", "-algo", "FedALA", "-p", "5"],
     ["layer_idx=5", "4 parameter tensors", "'dnn'"]),
    (["-m", "cnn", "-nc", "4", "-algo", "FedALA", "-p", "9"],
     ["layer_idx=9", "8 parameter tensors", "'cnn'"]),
    (["-m", "dnn", "--partition", "iid", "--balance", "-algo", "FedALA", "-s", "1"],
     ["rand_percent=1", "every client", "rand_percent >= 2"]),
    (["-m", "mlr", "-nc", "4", "-algo", "FedPer"], ["FedPer", "'mlr'", "no base"]),
    (["-m", "mlr", "-nc", "4", "-algo", "FedRep"], ["FedRep", "'mlr'", "no base"]),
    (["-m", "mlr", "-nc", "4", "-algo", "FedBABU"], ["FedBABU", "'mlr'", "no base"]),
]


@pytest.mark.parametrize("argv,words", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_refused(argv, words, tmp_path, capsys):
  _check(argv, words, tmp_path, capsys)


FOLDER_REFUSED = [
    # train sizes, test sizes, flags, words
    ([6, 6, 6], [0, 0, 0], [], ["none of the 3 training clients has a test sample"]),
    ([6, 6, 6, 6], [2, 2, 2, 0], ["-nnc", "1"],
     ["num_new_clients=1", "none of the 1 new clients has a test sample"]),
    ([6, 6, 6, 20], [2, 2, 2, 2], ["-nnc", "1", "-lbs", "10"],
     ["batch_size=10", "largest has 6", "batch_size <= 6"]),
    ([0, 0, 0, 6], [2, 2, 2, 2], ["-nnc", "1", "-lbs", "2"],
     ["none of the 3 training clients has a training sample"]),
]


@pytest.mark.parametrize("train,test,flags,words", FOLDER_REFUSED,
                         ids=["no-test", "new-no-test", "batch-only-new", "no-train"])
def test_refused_folders(train, test, flags, words, tmp_path, capsys):
  folder = _folder(tmp_path, train, test)
  _check(["-data", folder, "-m", "dnn", "-lbs", "5"] + flags, words, tmp_path, capsys)


# ---------------------------------------------------------------------------- clients
def test_clients_that_never_train_or_test():
  built = build(Config(model="dnn", num_clients=900, progress=False))
  train, test = built.data.train_count, built.data.test_count
  empty, small = int((train == 0).sum()), int(((train > 0) & (train < 10)).sum())
  assert empty and small and (test == 0).any()
  _one(built.warnings, f"{empty + small} of 900 clients never take a training step",
       f"{empty} have no training sample", f"{small} have fewer than batch_size=10")
  untested = int((test == 0).sum())
  _one(built.warnings, f"{untested} of 900 clients have no test sample",
       f"covers only the other {900 - untested}")


def test_batch_size_few_clients_fill():
  built = build(Config(**UNEVEN, batch_size=150))
  small = int((built.data.train_count < 150).sum())
  assert 0 < small < 8
  text = _one(built.warnings, f"{small} of 8 clients never take a training step",
              "batch_size=150", "smaller batch_size")
  assert "no training sample" not in text


def test_folder_clients_without_test_samples(tmp_path):
  folder = _folder(tmp_path, [6, 6, 6], [2, 0, 2])
  warnings = build(Config(dataset=folder, model="dnn", batch_size=5, progress=False)).warnings
  text = _one(warnings, "1 of 3 clients have no test sample", "the other 2")
  assert "num_clients" not in text  # a folder's client count is not a choice


def test_new_clients_without_test_samples_or_fine_tuning(tmp_path):
  folder = _folder(tmp_path, [12, 12, 12, 3, 12], [2, 2, 2, 0, 2])
  warnings = build(Config(dataset=folder, model="dnn", num_new_clients=2,
                          fine_tuning_epoch_new=2, progress=False)).warnings
  _one(warnings, "1 of the 2 new clients", "no test sample")
  _one(warnings, "1 of the 2 new clients have fewer than batch_size=10", "not fine-tuned",
       "fine_tuning_epoch_new=2")


# ---------------------------------------------------------------------------- rounds
def test_rounds_not_a_multiple_of_eval_gap():
  _one(_warnings(global_rounds=10, eval_gap=3), "global_rounds=10", "eval_gap=3",
       "round 9 is never evaluated", "global_rounds=9 or 12")
  _one(_warnings(global_rounds=11, eval_gap=3), "rounds 9..10")
  assert not _warnings(global_rounds=9, eval_gap=3)
  assert not _warnings(global_rounds=0, eval_gap=5)  # round 0 alone: PFLlib's smoke run


def test_auto_break_that_can_never_stop():
  _one(_warnings(global_rounds=50, auto_break=True), "top_cnt=100", "51 evaluations",
       "top_cnt <= 49")
  _one(_warnings(global_rounds=10, eval_gap=5, auto_break=True, top_cnt=2),
       "top_cnt=2", "3 evaluations", "top_cnt <= 1")
  assert not _warnings(global_rounds=50, auto_break=True, top_cnt=10)


def test_checkpoint_interval_longer_than_the_run():
  _one(_warnings(global_rounds=5, checkpoint_every=10), "checkpoint_every=10",
       "global_rounds=5", "checkpoint_every <= 5")
  assert not _warnings(global_rounds=5, checkpoint_every=5)


# ---------------------------------------------------------------------------- participation
def test_join_ratio_that_leaves_clients_untrained():
  _one(_warnings(num_clients=20, global_rounds=2, join_ratio=0.1), "join_ratio=0.1",
       "selects 2 of 20", "at most 4 clients", "at least 16 never train")
  assert not _warnings(num_clients=20, global_rounds=10, join_ratio=0.1)


def test_random_join_ratio_without_effect():
  _one(_warnings(random_join_ratio=True), "random_join_ratio", "join_ratio=1.0", "all 4")
  assert not _warnings(random_join_ratio=True, join_ratio=0.5)


def test_client_drop_rate_without_aggregation():
  _one(_warnings(algorithm="Local", client_drop_rate=0.25), "client_drop_rate=0.25", "Local")
  assert not _warnings(algorithm="FedAvg", client_drop_rate=0.25)


# ---------------------------------------------------------------------------- new clients
def test_fine_tuning_epochs_without_new_clients():
  text = _one(_warnings(fine_tuning_epoch_new=3), "fine_tuning_epoch_new=3",
              "num_new_clients=0")
  assert "-fte" not in text
  _one(_warnings(algorithm="FedBABU", fine_tuning_epoch_new=3), "fine_tuning_epoch_new=3",
       "fine_tuning_epochs (-fte)")


@pytest.mark.parametrize("algorithm,part", [("FedPer", "head"), ("FedRep", "head"),
                                            ("LG-FedAvg", "base"), ("GPFL", "head"),
                                            ("Local", "model")])
def test_new_clients_tested_untrained(algorithm, part):
  _one(_warnings(algorithm=algorithm, num_new_clients=1), "num_new_clients=1",
       f"new {algorithm} client", f"freshly initialised {part}", "fine_tuning_epoch_new")
  assert not _warnings(algorithm=algorithm, num_new_clients=1, fine_tuning_epoch_new=1)


# ---------------------------------------------------------------------------- ignored flags
def test_flags_the_dataset_or_algorithm_does_not_read(tmp_path):
  from fedjax_lib.algorithms import algorithm_names, get_algorithm  # pylint: disable=import-outside-toplevel
  offering = [n for n in algorithm_names() if "pfllib_compat" in get_algorithm(n).hyperparameters()]
  assert {"FD", "FedCP", "FML", "SCAFFOLD"} <= set(offering)
  _one(_warnings(pfllib_compat=True, algorithm="FedProx"), "pfllib_compat=True", "FedProx",
       f"only {', '.join(offering)} offer")
  # FedAvg's reference splits PFLlib's DNN: compat gives it log-softmax features (an effect)
  assert not _warnings(pfllib_compat=True)
  assert not _warnings(algorithm="FedCP", pfllib_compat=True)
  _one(_warnings(alpha=0.5), "alpha=0.5", "partition='iid'")
  _one(build(Config(**UNEVEN, class_per_client=3)).warnings, "class_per_client=3",
       "partition='dir'")
  _one(build(Config(**UNEVEN, balance=True)).warnings, "balance=True", "partition='dir'")
  folder = _folder(tmp_path, [6, 6, 6], [2, 2, 2])
  warnings = build(Config(dataset=folder, model="dnn", batch_size=5, alpha=0.5,
                          partition="pat", progress=False)).warnings
  _one(warnings, "is a folder", "partition='pat'", "alpha=0.5", "are ignored")


def test_feature_dim_wider_than_a_model():
  _one(_warnings(feature_dim=256), "feature_dim=256", "dnn model's 100 features", "2.6 times",
       "feature_dim <= 100")
  assert not _warnings(feature_dim=64)
  warnings = _warnings(model="cnn,dnn", algorithm="LG-FedAvg", feature_dim=256)
  _one(warnings, "dnn model's 100 features")
  assert not any("cnn model" in w for w in warnings)  # the CNN has 512 features


# ---------------------------------------------------------------------------- algorithms
def test_lg_fedavg_without_a_personal_base():
  _one(_warnings(model="mlr", algorithm="LG-FedAvg"), "LG-FedAvg keeps the base personal",
       "'mlr'")


def test_multi_architecture_warnings_are_per_architecture():
  warnings = _warnings(model="dnn,mlr", algorithm="LG-FedAvg", num_clients=5,
                       num_new_clients=2)
  # client 5 (new) uses mlr, client 6 (new) dnn: one new dnn client, tested with a fresh base
  _one(warnings, "model dnn: num_new_clients=1", "freshly initialised base")
  _one(warnings, "model mlr: LG-FedAvg keeps the base personal")
  assert len(warnings) == 2


def test_fedala_hyperparameters():
  built = build(Config(**UNEVEN, algorithm="FedALA", algo_params={"rand_percent": 1}))
  counts = built.data.train_count
  empty = int(((counts > 0) & (counts < 100)).sum())
  assert 0 < empty < 8
  _one(built.warnings, "rand_percent=1", f"{empty} of the 8 clients", "0 ALA samples")
  _one(_warnings(algorithm="FedALA", algo_params={"eta": 0.0}), "eta=0", "as in FedAvg")
  _one(_warnings(algorithm="FedALA", algo_params={"threshold": 0.0}), "threshold=0",
       "max_start_epochs=100")
  _one(_warnings(algorithm="FedALA", algo_params={"max_start_epochs": 5}),
       "max_start_epochs=5 <= num_pre_loss=10", "threshold=0.1")
  assert not _warnings(algorithm="FedALA", algo_params={"layer_idx": 4})  # = every tensor


def test_perfedavg_meta_batches():
  built = build(Config(**UNEVEN, algorithm="PerAvg", batch_size=75))
  small = int((built.data.train_count < 150).sum())
  assert 0 < small < 8
  _one(built.warnings, "2*batch_size = 150", f"{small} of 8 clients")


def test_feddbe_momentum_zero_silences_kl_weight():
  _one(_warnings(algorithm="FedDBE", algo_params={"momentum": 0.0, "kl_weight": 50.0}),
       "momentum=0", "kl_weight=50.0")
  assert not _warnings(algorithm="FedDBE", algo_params={"momentum": 0.0})
  assert not _warnings(algorithm="FedDBE", algo_params={"momentum": 1.0, "kl_weight": 50.0})


# ---------------------------------------------------------------------------- no warnings
COMMON = [
    dict(),  # the default config: 20 clients, CNN, FedAvg, 2000 rounds
    dict(model="dnn", algorithm="FedProx", algo_params={"mu": 0.01}, join_ratio=0.5,
         client_drop_rate=0.1, global_rounds=100, eval_gap=5, checkpoint_every=10),
    dict(model="dnn", auto_break=True, times=3),  # 2000 rounds, top_cnt 100
    dict(model="dnn", algorithm="FedALA", num_clients=10, num_new_clients=2),
    dict(model="dnn", algorithm="Ditto", algo_params={"mu": 0.1, "plocal_epochs": 2}),
    dict(model="dnn", algorithm="FedRep", num_new_clients=2, num_clients=10,
         fine_tuning_epoch_new=5),
    dict(model="dnn", algorithm="FedBABU", algo_params={"fine_tuning_epochs": 5}),
    dict(model="dnn", algorithm="PerAvg"),
    dict(model="dnn", algorithm="FedDBE", algo_params={"momentum": 1.0, "kl_weight": 50.0}),
    dict(model="dnn", algorithm="FedCP", pfllib_compat=True),
    dict(model="mlr", algorithm="GPFL", partition="pat", class_per_client=2),
    dict(model="cnn,dnn", algorithm="LG-FedAvg"),  # HtFLlib's default feature_dim 512
]


@pytest.mark.parametrize("changes", COMMON, ids=[str(c) for c in COMMON])
def test_common_settings_give_no_warning(changes):
  assert build(Config(progress=False, **changes)).warnings == ()


def test_data_warnings_become_run_warnings(recwarn):
  """A partition that leaves classes without a client is one of the run's warnings (printed
  as a ``warning:`` line, recorded in results), not a Python warning with a file path."""
  warnings = _warnings(num_clients=4, partition="pat")
  _one(warnings, "pat partition with 4 clients", "leaves classes [8, 9]", "without a client")
  assert not [w for w in recwarn if "without a client" in str(w.message)]


def test_collected_warnings_passes_other_warnings_on():
  with pytest.warns(DeprecationWarning, match="not ours"):
    with collected_warnings() as lines:
      py_warnings.warn("a notice", FedJaxWarning)
      py_warnings.warn("a notice", FedJaxWarning)  # the same line twice: reported once
      py_warnings.warn("not ours", DeprecationWarning)
  assert lines == ["a notice"]


def test_the_round_checks_take_no_memory_per_round():
  """`-gr 2147483647` (an accepted value) once listed every evaluated round while checking the
  settings and filled memory before anything ran; under a 3 GB address-space limit the checks of
  that many rounds must finish."""
  code = ("import resource\n"
          "resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))\n"
          "from fedjax_lib import checks\n"
          "from fedjax_lib.config import Config, MAX_INT\n"
          "class WarmUp:  # an algorithm that evaluates from round 1 (FedL2G's warm-up)\n"
          "  name = 'X'\n"
          "  def first_evaluated_round(self):\n"
          "    return 1\n"
          "print(checks._rounds(Config(global_rounds=MAX_INT), WarmUp()))\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=120, cwd=ROOT, check=False)
  assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr[-2000:]
