"""HtFLlib's ``-sfn`` / ``-mfn``: client models written after a run and read back as the
initial models of another (`fedjax_lib.client_models`, `Algorithm.client_model`,
`fedjax_lib.algorithms.base.init_clients_from_models`).

The contract is checked per algorithm at the engine (a client started from a model holds that
model, the server starts as without it), the folder format on its own (exact round trip, and
every damaged or foreign folder one line), and the CLI end to end: Local stopped after round
1 and started again from its written models evaluates, to the bit, what an uninterrupted Local
evaluates at round 2.
"""

import json
import os

import jax
import numpy as np
import pytest

from fedjax_lib import Config, cli
from fedjax_lib import client_models as client_models_lib
from fedjax_lib.algorithms.base import abstract_variables, has_hook
from fedjax_lib.algorithms.split import SplitAlgorithm, split_parts
from fedjax_lib.checks import model_savers
from fedjax_lib.core import rng
from fedjax_lib.errors import ConfigError
from fedjax_lib.runner import run_experiment
from tests.helpers import as_images, assert_cli_refuses, suite_params
from tests.test_conformance import VARIANTS
from tests.test_engine import _engine, _small_data

# HtFLlib's thirteen algorithms (FedGen-PFLlib -lf is PFLlib's, with FedGen's clients).
HTFLLIB = ["FD", "FedGen", "FedGH", "FedKD", "FedKTL", "FedL2G-feat", "FedL2G-logit", "FedMRL",
           "FedProto", "FedTGP", "FML", "LG-FedAvg", "Local"]


def test_the_htfllib_algorithms_are_the_ones_that_keep_client_models():
  assert model_savers() == sorted(HTFLLIB, key=str.lower)


@pytest.fixture(scope="module")
def data():
  return _small_data(num_clients=4, seed=3)


@pytest.mark.parametrize("name", HTFLLIB + ["FedGen-PFLlib -lf"])
def test_clients_start_from_the_given_models(name, data):
  if name == "FedKTL":
    data = as_images(data)
  name, variant = VARIANTS.get(name, (name, {}))
  eng = _engine(name, "sequential", data, params=suite_params(name, **variant))
  assert has_hook(eng.algorithm, "client_model")
  root, sample_x = rng.root_key(0), data.x[0]
  s0, c0 = eng.init(root, sample_x)
  fresh = eng.client_models(s0, c0)
  draw = np.random.default_rng(1)
  models = {cid: jax.tree.map(lambda a: np.asarray(a) + draw.normal(size=a.shape).astype(a.dtype),
                              variables)
            for cid, (_, variables) in fresh.items()}
  (group,) = eng.groups
  eng.initial_models = {group.name: jax.tree.map(lambda *rows: np.stack(rows),
                                                 *[models[c] for c in group.ids])}
  s1, c1 = eng.init(root, sample_x)
  jax.tree.map(np.testing.assert_array_equal, s1, s0)  # the server starts as without models
  assert jax.tree.structure(c1) == jax.tree.structure(c0)
  assert ([(a.shape, a.dtype) for a in jax.tree.leaves(c1)]
          == [(a.shape, a.dtype) for a in jax.tree.leaves(c0)])
  loaded = eng.client_models(s1, c1)
  alg = eng.algorithm
  for cid, (_, variables) in loaded.items():
    if isinstance(alg, SplitAlgorithm):  # the shared part is the server's
      got, want, server = map(split_parts, (variables, models[cid], fresh[cid][1]))
      jax.tree.map(np.testing.assert_array_equal, got[alg.personal], want[alg.personal])
      jax.tree.map(np.testing.assert_array_equal, got[alg.SHARED], server[alg.SHARED])
    else:
      jax.tree.map(np.testing.assert_array_equal, variables, models[cid])


@pytest.mark.parametrize("name", ["FedGen", "FedGH", "LG-FedAvg", "FedGen-PFLlib -lf"])
def test_a_base_without_parameters_is_saved_and_loaded(name, data):
  """`mlr`'s base has no parameters, so these split algorithms keep client states without
  arrays; saving their models ended in a vmap error (fuzz_cli steps seed 144: ``-algo FedGen
  -m mlr -sfn ...``)."""
  name, variant = VARIANTS.get(name, (name, {}))
  eng = _engine(name, "sequential", data, model="mlr", params=suite_params(name, **variant))
  root, sample_x = rng.root_key(0), data.x[0]
  s0, c0 = eng.init(root, sample_x)
  assert not jax.tree.leaves(c0)
  fresh = eng.client_models(s0, c0)
  assert sorted(fresh) == list(range(data.num_clients))
  head = split_parts(fresh[0][1])[eng.algorithm.SHARED]
  assert jax.tree.leaves(head)
  for _, variables in fresh.values():  # every client's model is the server's head
    jax.tree.map(np.testing.assert_array_equal, split_parts(variables)[eng.algorithm.SHARED],
                 head)
  (group,) = eng.groups
  eng.initial_models = {group.name: jax.tree.map(lambda *rows: np.stack(rows),
                                                 *[fresh[c][1] for c in group.ids])}
  s1, c1 = eng.init(root, sample_x)
  jax.tree.map(np.testing.assert_array_equal, s1, s0)
  assert eng.client_models(s1, c1).keys() == fresh.keys()


def _models(data, draw):
  from fedjax_lib.models import make_model  # pylint: disable=import-outside-toplevel
  archs = {"dnn": make_model("dnn", data.sample_shape, 3),
           "mlr": make_model("mlr", data.sample_shape, 3)}
  shapes = {a: abstract_variables(m, data.x[0]) for a, m in archs.items()}
  fill = lambda s: draw.normal(size=s.shape).astype(s.dtype)
  models = {c: (a, jax.tree.map(fill, shapes[a])) for c, a in enumerate(["dnn", "mlr", "dnn"])}
  return models, {c: (a, shapes[a]) for c, (a, _) in models.items()}


def test_folder_round_trip_is_exact(data, tmp_path):
  models, expected = _models(data, np.random.default_rng(0))
  files = client_models_lib.write(str(tmp_path), models, {"dataset": "toy", "model": "dnn,mlr"})
  assert sorted(os.path.basename(f) for f in files) == [
      "Client_0_model.msgpack", "Client_1_model.msgpack", "Client_2_model.msgpack",
      "models.json"]
  manifest = json.loads((tmp_path / "models.json").read_text())
  assert manifest["clients"] == {"0": "dnn", "1": "mlr", "2": "dnn"}
  back = client_models_lib.read(str(tmp_path), expected)
  for c, (_, variables) in models.items():
    assert jax.tree.structure(back[c]) == jax.tree.structure(variables)
    jax.tree.map(np.testing.assert_array_equal, back[c], variables)
  # a subset of the clients reads too (a run with fewer clients)
  assert sorted(client_models_lib.read(str(tmp_path), {0: expected[0]})) == [0]


def test_damaged_or_foreign_folders_are_one_line_errors(data, tmp_path):
  models, expected = _models(data, np.random.default_rng(0))
  folder = tmp_path / "m"
  client_models_lib.write(str(folder), models, {})

  def refused(path, match, want=expected):
    with pytest.raises(ConfigError, match=match) as e:
      client_models_lib.read(str(path), want)
    assert "\n" not in str(e.value)

  refused(tmp_path / "none", "does not exist")
  (tmp_path / "torch").mkdir()
  (tmp_path / "torch" / "Client_0_model.pt").write_bytes(b"x")
  refused(tmp_path / "torch", "PyTorch files")
  (tmp_path / "empty").mkdir()
  refused(tmp_path / "empty", "has no models.json")
  refused(folder, "client 3 has none", {**expected, 3: expected[0]})
  refused(folder, "client 1's saved model .* is a mlr, but this run gives client 1 a dnn",
          {**expected, 1: expected[0]})
  wider = jax.eval_shape(lambda: jax.tree.map(lambda s: np.zeros(s.shape + (2,), s.dtype),
                                              expected[1][1]))
  refused(folder, "does not fit this run's model: .* expected shape", {1: ("mlr", wider)})
  refused(folder, "does not fit this run's model: it has", {0: ("dnn", {
      "params": {k: v for k, v in expected[0][1]["params"].items() if k != "head"}})})
  (folder / "Client_2_model.msgpack").write_bytes(b"\x93garbage")
  refused(folder, "is damaged")
  (folder / "models.json").write_text('{"format": "other"}')
  refused(folder, "is not a fedjax_lib models manifest")


def _cli(tmp_path, name, *argv, model="dnn,mlr"):
  code = cli.main(["-algo", "Local", "-m", model, "-nc", "4", "--out",
                   str(tmp_path / name), "--no-progress", "--no-plot", *argv])
  assert code == 0


def test_a_run_started_from_saved_models_continues_where_they_were_written(tmp_path):
  """Local with -sfn after rounds 0-1, then Local -mfn evaluates at its round 0 exactly what
  Local run on without a break evaluates at round 2 (each client's model after two local
  trainings)."""
  saved = tmp_path / "models"
  _cli(tmp_path, "first", "-gr", "1", "-sfn", str(saved))
  folder = saved / "digits" / "Local"
  manifest = json.loads((folder / "models.json").read_text())
  assert manifest["clients"] == {"0": "dnn", "1": "mlr", "2": "dnn", "3": "mlr"}
  assert manifest["algorithm"] == "Local" and manifest["dataset"] == "digits"
  first = json.loads((tmp_path / "first" / "digits_Local_test_0.json").read_text())
  assert first["client_models"] == str(folder)
  _cli(tmp_path, "then", "-gr", "0", "-mfn", str(folder))
  _cli(tmp_path, "straight", "-gr", "2")
  then = json.loads((tmp_path / "then" / "digits_Local_test_0.json").read_text())
  straight = json.loads((tmp_path / "straight" / "digits_Local_test_0.json").read_text())
  for key in ("test_acc", "test_auc", "train_loss"):
    assert then[key][0] == straight[key][2], key
  assert straight["test_acc"][2] > 0.5 > then["config"]["learning_rate"]  # trained, not chance


def test_another_algorithm_starts_from_local_models_and_repetitions_keep_the_last(tmp_path):
  """FedTGP from Local's models: its clients' heads score at round 0 what Local's models
  score; with -t 2 the folder holds repetition 1's models (HtFLlib's folder after -t)."""
  saved = tmp_path / "models"
  _cli(tmp_path, "pre", "-gr", "1", "-t", "2", "-sfn", str(saved), model="dnn")
  folder = saved / "digits" / "Local"
  assert json.loads((folder / "models.json").read_text())["run"] == 1
  pre = json.loads((tmp_path / "pre" / "digits_Local_test_1.json").read_text())
  assert "client_models" not in json.loads(
      (tmp_path / "pre" / "digits_Local_test_0.json").read_text())
  code = cli.main(["-algo", "FedTGP", "-m", "dnn", "-nc", "4", "-gr", "0", "-se", "1",
                   "-mfn", str(folder), "--out", str(tmp_path / "tgp"), "--no-progress",
                   "--no-plot"])
  assert code == 0
  tgp = json.loads((tmp_path / "tgp" / "digits_FedTGP_test_0.json").read_text())
  local_again = run_experiment(Config(algorithm="Local", model="dnn", num_clients=4,
                                      global_rounds=0, models_folder_name=str(folder),
                                      out=str(tmp_path / "again"), plot=False, progress=False),
                               quiet=True)
  assert tgp["test_acc_head"][0] == local_again.runs[0].history["test_acc"][0]
  assert local_again.runs[0].history["test_acc"][0] > pre["test_acc"][0]


@pytest.mark.parametrize("argv, words", [
    (["-algo", "FedAvg", "-mfn", "x"], ["-mfn", "FedAvg has none of", "FedTGP"]),
    (["-algo", "Ditto", "-mfn", "x"], ["-mfn", "Ditto has none of", "run's checkpoints"]),
    (["-algo", "Local", "-mfn", "x", "-nnc", "1"], ["-mfn", "-nnc", "use -nnc 0"]),
    (["-algo", "Local", "-sfn", "x", "--sweep", "seed=0,1"], ["-sfn", "with a sweep"]),
    (["-algo", "Local", "-mfn", "/no/such/folder"], ["/no/such/folder", "does not exist"]),
    (["-prompt", "a cat"], ["-prompt 'a cat' is not available", "-GPath"]),
    (["-algo", "FedKTL-stable-diffusion"], ["FedKTL-stable-diffusion is HtFLlib's FedKTL",
                                            "-algo FedKTL -GPath"]),
])
def test_refusals_are_one_line(argv, words, tmp_path, capsys):
  assert_cli_refuses(argv, words, tmp_path, capsys)


def test_a_folder_for_other_architectures_is_refused_before_anything_is_written(tmp_path,
                                                                                 capsys):
  saved = tmp_path / "models"
  _cli(tmp_path, "first", "-gr", "0", "-sfn", str(saved))
  capsys.readouterr()
  assert_cli_refuses(["-algo", "Local", "-m", "mlr,dnn", "-mfn",
                      str(saved / "digits" / "Local")],
                     ["client 0's saved model", "is a dnn", "gives client 0 a mlr",
                      "dnn,mlr"], tmp_path, capsys)


def test_sfn_writes_nothing_where_it_cannot_and_says_so(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  _cli(tmp_path, "temp_run", "-gr", "0", "-sfn", "temp")
  code = cli.main(["-algo", "FedAvg", "-m", "mlr", "-nc", "4", "-gr", "0", "-sfn", "items",
                   "--out", str(tmp_path / "avg"), "--no-progress", "--no-plot"])
  assert code == 0
  printed = capsys.readouterr().out
  assert "warning: save_folder_name='temp' (-sfn) writes nothing: HtFLlib deletes" in printed
  assert "warning: save_folder_name='items' (-sfn) writes nothing with FedAvg" in printed
  assert not (tmp_path / "temp").exists() and not (tmp_path / "items").exists()


def test_htfllib_long_flag_names_are_accepted():
  args = cli.build_parser().parse_args(["--model_family", "HtFE-img-2", "--margin_threthold",
                                        "5", "--gen_batch_size", "2"])
  config = cli.config_from_args(args)
  assert config.model == "HtFE-img-2"
  assert config.algo_params == {"margin_threshold": 5.0, "generation_batch_size": 2}
