"""Architecture groups: clients of different architectures in one engine.

`-m cnn,dnn` gives client i the architecture i mod 2; each architecture is one group with its
own compiled program; what crosses groups must have the same shapes (checked before anything
is written); checkpoints hold ``{"server", "clients": {architecture: states}}``.
"""

import json
import os

import jax
import numpy as np
import pytest

from fedjax_lib import Config, run_experiment
from fedjax_lib.algorithms import make_algorithm
from fedjax_lib.core import checkpoint as checkpoint_lib
from fedjax_lib.core import engine as engine_lib
from fedjax_lib.core import rng
from fedjax_lib.core.local import LocalSpec
from fedjax_lib.errors import ConfigError
from fedjax_lib.models import make_model
from fedjax_lib.runner import build
from tests.test_engine import _small_data, assert_runs_agree

QUIET = dict(log=lambda msg: None)


def _groups_engine(algo, data, executor="vmap", jr=1.0, cdr=0.0, feature_dim=16,
                   names=("dnn", "mlr")):
  """Client i uses names[i % 2]: two groups over the toy data."""
  spec = LocalSpec(learning_rate=0.1, batch_size=4, local_epochs=1,
                   steps_per_epoch=int(data.train_count.max()) // 4, unroll=1)
  models = {n: make_model(n, data.sample_shape, data.num_classes, feature_dim=feature_dim)
            for n in names}
  base = make_algorithm(algo, models[names[0]], spec)
  groups = [engine_lib.Group(n, base.__class__(model=models[n], local=spec),
                             tuple(range(k, data.num_clients, len(names))))
            for k, n in enumerate(names)]
  return engine_lib.Engine(groups, engine_lib.DeviceData.from_federated(data),
                           engine_lib.Participation(data.num_clients, jr, False, cdr),
                           executor=executor, chunk_size=2, eval_chunk_size=4,
                           model_cycle=list(range(len(names))))


def _run(eng, rounds=2, seed=0):
  root = rng.root_key(seed)
  s, c = eng.init(root, eng.data.x[0])
  history = []
  for r in range(rounds):
    history.append(eng.evaluate(s, c, root, r))
    s, c, m = eng.run_round(s, c, root, r)
  history.append(eng.evaluate(s, c, root, rounds))
  return s, c, history


@pytest.mark.parametrize("algo", ["LG-FedAvg", "Local"])
def test_groups_executors_agree_and_compile_once_per_group(algo):
  data = _small_data(num_clients=7)
  out = {}
  for executor in ("vmap", "sequential", "chunked"):
    eng = _groups_engine(algo, data, executor, jr=0.6, cdr=0.25)
    out[executor] = _run(eng, rounds=3)
    # One compiled client program per group, one round program (traced executors). lax.map
    # traces a chunk that does not divide the slots (3 slots, chunks of 2) once more.
    if executor != "chunked":
      assert eng.trace_counts["client_update"] == 2, (executor, eng.trace_counts)
    if executor != "sequential":
      assert eng.trace_counts["round"] == 1
    assert eng.trace_counts["evaluate"] == 2
  _, c0, _ = out["vmap"]
  assert set(c0) == {"dnn", "mlr"}
  assert jax.tree.leaves(c0["dnn"])[0].shape[0] == 4  # ids 0, 2, 4, 6
  # ids 1, 3, 5 (LG-FedAvg's personal part of MLR is its identity base: no leaves)
  assert all(leaf.shape[0] == 3 for leaf in jax.tree.leaves(c0["mlr"]))
  for executor in ("sequential", "chunked"):
    assert_runs_agree(out["vmap"], out[executor], rtol=2e-4, atol=2e-5)


def test_regrouping_keeps_client_randomness():
  """Keys come from client ids: the same clients in another grouping train identically.

  With Local (no communication) and one architecture in two groups, every client's model
  equals the one-group run's."""
  data = _small_data(num_clients=6)
  one = _groups_engine("Local", data, names=("dnn",), feature_dim=None)
  spec = one.groups[0].algorithm.local
  model = one.groups[0].algorithm.model
  alg = make_algorithm("Local", model, spec)
  groups = [engine_lib.Group("a", alg, (0, 3, 5)), engine_lib.Group("b", alg, (1, 2, 4))]
  split = engine_lib.Engine(groups, one.data, one.participation, executor="vmap")
  _, c1, h1 = _run(one)
  _, c2, h2 = _run(split)
  params = lambda c, i: jax.tree.map(lambda a: a[i], c)
  for row, cid in enumerate((0, 3, 5)):
    jax.tree.map(np.testing.assert_array_equal, params(c1["dnn"], cid), params(c2["a"], row))
  assert h1[-1]["test_acc"] == h2[-1]["test_acc"]


def _first(states):
  """Client 0's row of stacked client states."""
  return jax.tree.map(lambda a: a[0], states)


def _head(states):
  """Client 0's head parameters, wherever the algorithm keeps them in its state."""
  flat = jax.tree_util.tree_flatten_with_path(_first(states))[0]
  return {jax.tree_util.keystr(p): np.asarray(a) for p, a in flat if "'head'" in
          jax.tree_util.keystr(p)}


def test_each_architecture_draws_its_own_initial_model():
  """HtFLlib draws each architecture's model, head included, independently. Flax derives a
  submodule's values from the key and the submodule's path, so one key for every group gave
  two architectures the same head (which aligned their feature spaces: FedProto on
  HtFE-img-2 ended 0.04 above HtFLlib). The first group keeps the run's init key, so a
  one-architecture run is unchanged; groups of one model share a draw
  (`test_regrouping_keeps_client_randomness`)."""
  data = _small_data(num_clients=4)
  root = rng.root_key(3)
  _, two = _groups_engine("Local", data).init(root, data.x[0])
  _, one = _groups_engine("Local", data, names=("dnn",)).init(root, data.x[0])
  heads = {name: _head(states) for name, states in two.items()}
  assert heads["dnn"] and heads["dnn"].keys() == heads["mlr"].keys()
  for path, value in heads["dnn"].items():
    assert value.shape == heads["mlr"][path].shape
    assert not np.allclose(value, heads["mlr"][path]), path
  jax.tree.map(np.testing.assert_array_equal, _first(two["dnn"]), _first(one["dnn"]))


def test_mismatched_uploads_are_refused_before_writing(tmp_path):
  with pytest.raises(ConfigError, match=r"FedAvg cannot mix architectures cnn and dnn: their "
                                        r"uploads differ at params/base/"):
    run_experiment(Config(model="cnn,dnn", algorithm="FedAvg", num_clients=4, global_rounds=1,
                          out=str(tmp_path), progress=False), **QUIET)
  assert not os.listdir(tmp_path)


def test_algorithms_with_per_client_server_state_run_one_architecture(tmp_path):
  """FedPCL uploads prototypes only (the same shapes for every architecture at one feature
  width), but its server keeps each client's prototype set by the client's id, which restarts
  in every group: two architectures are refused before anything is written."""
  with pytest.raises(ConfigError, match=r"FedPCL keeps server-side state per client.*one -m "
                                        r"model \(got 2: dnn, cnn\)"):
    run_experiment(Config(model="dnn,cnn", algorithm="FedPCL", num_clients=4, global_rounds=1,
                          feature_dim=16, out=str(tmp_path), progress=False), **QUIET)
  assert not os.listdir(tmp_path)


def test_feature_dim_makes_heads_interchangeable():
  built = build(Config(model="cnn,dnn,mlr", algorithm="LG-FedAvg", num_clients=6,
                       feature_dim=64))
  names = [g.name for g in built.engine.groups]
  assert names == ["cnn", "dnn", "mlr"]
  assert [g.ids for g in built.engine.groups] == [(0, 3), (1, 4), (2, 5)]
  heads = {n: jax.eval_shape(m.init, jax.random.key(0), built.data.x[:1])["params"]["head"]
           for n, m in built.models.items()}
  assert heads["cnn"] == heads["dnn"] == heads["mlr"]
  assert heads["cnn"]["kernel"].shape == (64, 10)
  one = build(Config(model="dnn", num_clients=4))
  assert one.engine.groups[0].name == "dnn" and one.models["dnn"].feature_dim is None


@pytest.mark.parametrize("algorithm,bar", [("Local", 0.8), ("LG-FedAvg", 0.8),
                                           ("FedProto", 0.8), ("FedTGP", 0.8)])
@pytest.mark.xla_optimized  # runs long enough to repay it: tests/conftest.py
def test_two_architectures_learn_on_digits(algorithm, bar, tmp_path):
  """CNN and DNN clients on the bundled digits (10 clients, Dir(0.1), lr 0.05, 5 rounds).

  Measured over seeds 0/1/2 (round 0 → round 5): Local .070/.082/.086 → .947/.927/.929,
  LG-FedAvg .070/.082/.086 → .941/.929/.943; seed 0 (2026-11-30, default -lam 1, -se 100):
  FedProto .108 → .934 and FedTGP .108 → .934 by the nearest prototype (heads .952, .956);
  the bar sits below the smallest."""
  res = run_experiment(Config(model="cnn,dnn", algorithm=algorithm, num_clients=10,
                              learning_rate=0.05, global_rounds=5, eval_gap=5,
                              out=str(tmp_path), progress=False), **QUIET)
  acc = res.runs[0].history["test_acc"]
  assert acc[0] < 0.3 and acc[-1] >= bar, acc
  payload = json.load(open(res.runs[0].files["json"]))
  assert payload["config"]["model"] == "cnn,dnn"


def test_group_checkpoint_round_trip_and_resume(tmp_path):
  """Checkpoints hold {"server", "clients": {arch: states}}; a resumed run equals a whole one."""
  cfg = dict(model="dnn,mlr", algorithm="LG-FedAvg", num_clients=5, learning_rate=0.05,
             checkpoint_every=1, progress=False, feature_dim=32)
  whole = run_experiment(Config(out=str(tmp_path / "whole"), global_rounds=3, **cfg), **QUIET)
  run_experiment(Config(out=str(tmp_path / "part"), global_rounds=1, **cfg), **QUIET)
  resumed = run_experiment(Config(out=str(tmp_path / "part"), global_rounds=3, **cfg), **QUIET)
  assert resumed.runs[0].history["test_acc"] == whole.runs[0].history["test_acc"]
  assert resumed.runs[0].history["train_loss"] == whole.runs[0].history["train_loss"]
  ckpt = checkpoint_lib.RunCheckpointer(
      str(tmp_path / "part" / "checkpoints" / "digits_LG-FedAvg_test_0"))
  restored = ckpt.manager.restore(ckpt.steps()[-1])
  assert set(restored["state"]["clients"]) == {"dnn", "mlr"}
  assert restored["meta"]["format"] == checkpoint_lib.FORMAT == 2


def test_format_1_checkpoint_restores_into_one_architecture_and_is_refused_for_two(tmp_path):
  """A checkpoint of the previous format ({"server", "clients": states}) continues a
  one-architecture run; a run with two architectures refuses it in one line."""
  data = _small_data(num_clients=4)
  eng = _groups_engine("Local", data, names=("dnn",), feature_dim=None)
  root = rng.root_key(0)
  s, c = eng.init(root, data.x[0])
  ckpt = checkpoint_lib.RunCheckpointer(str(tmp_path / "old"))
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  ckpt.manager.save(1, args=ocp.args.Composite(
      state=ocp.args.StandardSave({"server": s, "clients": c["dnn"]}),
      meta=ocp.args.JsonSave({"format": 1, "step": 1, "history": {}})), force=True)
  ckpt.manager.wait_until_finished()
  step, s_r, c_r, _ = checkpoint_lib.RunCheckpointer(str(tmp_path / "old")).restore_latest(s, c)
  assert step == 1 and set(c_r) == {"dnn"}
  jax.tree.map(np.testing.assert_array_equal, c, c_r)
  two = {"dnn": c["dnn"], "mlr": c["dnn"]}
  with pytest.raises(ConfigError, match="format 1 .* 2 architectures"):
    checkpoint_lib.RunCheckpointer(str(tmp_path / "old")).restore_latest(s, two)


def test_new_clients_follow_the_model_cycle():
  """-nnc with two architectures: new client ids keep HtFLlib's rule (id mod K)."""
  data = _small_data(num_clients=6)
  eng = _groups_engine("LG-FedAvg", data)
  assert [eng.new_client_group(i) for i in range(8)] == [0, 1, 0, 1, 0, 1, 0, 1]
  cfg = Config(model="dnn,mlr", algorithm="LG-FedAvg", num_clients=5, num_new_clients=2,
               fine_tuning_epoch_new=1, global_rounds=1, learning_rate=0.05, progress=False,
               feature_dim=32)
  built = build(cfg)
  assert built.engine.num_new_clients == 2
  new = built.engine.evaluate_new_clients(
      built.engine.init(rng.root_key(0), built.data.x[0])[0], rng.root_key(0),
      built.data.x[0], epochs=1)
  assert np.isfinite(new["test_acc"])
