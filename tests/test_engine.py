"""Engine-level tests: executors agree, one compilation, client-order invariance."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lib.algorithms import make_algorithm
from fedjax_lib.core import engine as engine_lib
from fedjax_lib.core import rng
from fedjax_lib.core.local import LocalSpec
from fedjax_lib.data.federated import FederatedData
from fedjax_lib.models import make_model
from tests.helpers import suite_params


def _small_data(num_clients=6, seed=0, dim=12):
  r = np.random.default_rng(seed)
  sizes = r.integers(8, 30, num_clients)
  n = int(sizes.sum())
  means = r.normal(size=(3, dim)) * 2
  y = r.integers(0, 3, n)
  x = (means[y] + r.normal(size=(n, dim))).astype(np.float32)
  starts = np.r_[0, np.cumsum(sizes)]
  pools = [np.arange(starts[i], starts[i + 1]) for i in range(num_clients)]
  train = [p[: int(0.75 * len(p))] for p in pools]
  test = [p[int(0.75 * len(p)):] for p in pools]
  return FederatedData.from_client_indices("toy", x, y, train, test, 3)


def _engine(algo, executor, data, model="dnn", jr=0.7, rjr=False, cdr=0.25, unroll=1,
            params=None, new_clients=0, loop="scan", device_data=None, threads=None):
  m = make_model(model, data.sample_shape, data.num_classes)
  if params is None:
    params = suite_params(algo)
  spec = LocalSpec(learning_rate=0.1, batch_size=4, local_epochs=2,
                   steps_per_epoch=int(data.train_count.max()) // 4, unroll=unroll, loop=loop)
  return engine_lib.Engine(
      make_algorithm(algo, m, spec, params),
      device_data or engine_lib.DeviceData.from_federated(data),
      engine_lib.Participation(data.num_clients - new_clients, jr, rjr, cdr), executor=executor,
      chunk_size=2, eval_chunk_size=4, client_threads=threads)


def cohort_plan(eng, client_states, root, round_index):
  """``(plan, the cohort's states, their keys)`` of a one-group engine's round, drawn as the
  engine draws them: selection from the round key, client keys from client ids."""
  rkey = rng.round_key(root, round_index)
  plan = engine_lib.plan_round(rkey, eng.participation)
  (states,) = client_states.values()
  cohort_states = jax.tree.map(lambda a: a[plan.cohort], states)
  return plan, cohort_states, jax.vmap(rng.client_key, (None, 0))(rkey, plan.cohort)


def _run(eng, rounds=3, seed=0):
  root = rng.root_key(seed)
  s, c = eng.init(root, eng.data.x[0])
  history = []
  for r in range(rounds):
    history.append(eng.evaluate(s, c))
    s, c, _ = eng.run_round(s, c, root, r)
  history.append(eng.evaluate(s, c))
  return s, c, history


@pytest.mark.parametrize("algo", ["FedAvg", "Local"])
@pytest.mark.parametrize("rjr", [False, True])
def test_executors_agree(algo, rjr):
  data = _small_data()
  outs = {ex: _run(_engine(algo, ex, data, rjr=rjr)) for ex in
          ("vmap", "chunked", "sequential")}
  for ex in ("chunked", "sequential"):
    assert_runs_agree(outs["vmap"], outs[ex])


@pytest.mark.parametrize("slots", [7, 6, 2])  # whole chunks and a remainder; whole; remainder
def test_chunked_executor_sums_a_linear_servers_uploads_chunk_by_chunk(slots):
  """With a linear server the chunked executor hands one row, the weighted mean (numpy
  reference) with the total weight; a slot of weight 0 adds nothing even when its upload is
  NaN; the states and per-slot statistics are lax.map's."""
  from fedjax_lib.core import executors as executors_lib  # pylint: disable=import-outside-toplevel
  r = np.random.default_rng(slots)
  x = r.normal(size=(slots, 4, 3)).astype(np.float32)
  w = r.integers(1, 9, slots).astype(np.float32)
  w[1] = 0.0
  x[1] = np.nan

  def step(args):
    state, weight = args
    upload = {"a": state * 2.0, "b": state[:, 0].astype(jnp.bfloat16)}
    return state + 1.0, upload, weight, (weight > 0, state.sum())

  ex = executors_lib.ChunkedExecutor(3)
  per_slot = (jnp.asarray(x), jnp.asarray(w))
  states, uploads, total, stats = jax.jit(lambda p: ex.map_linear(step, p))(per_slot)
  ref_states, _, _, ref_stats = jax.lax.map(step, per_slot, batch_size=3)
  keep = w > 0
  mean = np.tensordot(w[keep] / w[keep].sum(), x[keep].astype(np.float64) * 2.0, axes=1)
  np.testing.assert_allclose(uploads["a"], mean[None], rtol=1e-6, atol=1e-6)
  assert uploads["a"].shape == (1, 4, 3) and uploads["b"].dtype == jnp.bfloat16
  rounded = np.asarray(jnp.asarray(x[keep, :, 0]).astype(jnp.bfloat16), np.float64)
  mean_b = np.tensordot(w[keep] / w[keep].sum(), rounded, axes=1)  # summed in float32
  np.testing.assert_allclose(uploads["b"].astype(np.float32), mean_b[None], rtol=8e-3)
  np.testing.assert_allclose(total, [w.sum()])
  np.testing.assert_array_equal(states, ref_states)
  np.testing.assert_array_equal(stats[0], ref_stats[0])
  np.testing.assert_array_equal(stats[1], ref_stats[1])


def test_chunked_round_does_not_hold_every_clients_upload():
  """FedAvg (a linear server) on the chunked executor: the compiled round's scratch stays
  below the 48 clients' uploads (before the running sum it held them all: 1.43 MB of scratch
  for 1.31 MB of uploads; now 0.16 MB)."""
  data = _small_data(num_clients=48, dim=64)
  eng = _engine("FedAvg", "chunked", data, jr=1.0, cdr=0.0)
  root = rng.root_key(0)
  s, c = eng.init(root, eng.data.x[0])
  compiled = eng._round_program.lower({}, s, c, eng.arrays, root, 0).compile()  # pylint: disable=protected-access
  uploads = 48 * sum(a.nbytes for a in jax.tree.leaves(s))
  assert compiled.memory_analysis().temp_size_in_bytes < uploads / 2


@pytest.mark.parametrize("algo", ["FedAvg", "FedProto"])
def test_a_dropped_clients_nan_upload_reaches_no_executors_server(algo):
  """A client that trains on a NaN sample and is then dropped weighs 0: every executor's
  server state stays finite and the three agree (FedAvg: the vmap weighted average, the
  chunked running sum and the sequential running sum; FedProto: a non-linear server), and
  the client is still reported non-finite."""
  data = _small_data()
  probe = _engine(algo, "vmap", data, jr=1.0, cdr=0.5)
  root = rng.root_key(0)
  plan = engine_lib.plan_round(rng.round_key(root, 0), probe.participation)
  dropped = int(np.asarray(plan.cohort)[np.asarray(plan.active & ~plan.kept)][0])
  x = np.array(data.x)  # past the data checks, which refuse NaN features
  x[data.train_idx[dropped][: data.train_count[dropped]]] = np.nan
  device_data = engine_lib.DeviceData.from_federated(data)._replace(x=jnp.asarray(x))
  servers = {}
  for ex in ("vmap", "chunked", "sequential"):
    eng = _engine(algo, ex, data, jr=1.0, cdr=0.5, device_data=device_data)
    s, c = eng.init(root, jnp.asarray(data.x[0]))
    s, c, metrics = eng.run_round(s, c, root, 0)
    assert int(metrics["num_nonfinite"]) == 1
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(s)), ex
    servers[ex] = s
  for ex in ("chunked", "sequential"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 servers["vmap"], servers[ex])


def assert_runs_agree(reference, other, rtol=1e-4, atol=1e-5):
  """Two `_run` outputs: states close, accuracies equal, losses close."""
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol),
               reference[:2], other[:2])
  for a, b in zip(reference[2], other[2]):
    assert a["test_acc"] == pytest.approx(b["test_acc"], abs=1e-6)
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


@pytest.mark.parametrize("algo", ["FedAvg", "Ditto", "FedALA", "SCAFFOLD", "FedProto",
                                  "FedDyn"])
def test_client_threads_give_the_same_bits(algo):
  """The sequential executor training clients on three threads (more rows in flight than the
  round's four or so clients) writes what one thread writes, to the bit: states, metrics and
  uploads (a linear server's running sum, FedProto's stacked prototypes); each per-client
  program is traced once, on the calling thread."""
  data = _small_data()
  one = _run(_engine(algo, "sequential", data, loop="valid", threads=1), rounds=3)
  eng = _engine(algo, "sequential", data, loop="valid", threads=3)
  three = _run(eng, rounds=3)
  jax.tree.map(np.testing.assert_array_equal, one[:2], three[:2])
  for a, b in zip(one[2], three[2]):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert eng.trace_counts["client_update"] == 1


def test_lapack_calls_are_read_from_lowered_programs():
  """`executors.lapack_calls` finds the LAPACK kernels of a lowered CPU program (a batched
  SVD and a Cholesky), none in a program of matrix products."""
  if jax.default_backend() != "cpu":
    pytest.skip("LAPACK custom calls are XLA:CPU's")
  from fedjax_lib.core.executors import lapack_calls  # pylint: disable=import-outside-toplevel
  a = jnp.ones((16, 5, 5))
  both = jax.jit(lambda a: (jnp.linalg.svd(a)[1], jnp.linalg.cholesky(a[0] @ a[0].T + 1)))
  assert lapack_calls(both.lower(a).as_text()) == ["lapack_sgesdd_ffi", "lapack_spotrf_ffi"]
  assert lapack_calls(jax.jit(lambda a: a @ a + 1).lower(a).as_text()) == []


_LAPACK_CLIENTS = """
import sys
from fedjax_lib.config import Config
from fedjax_lib.runner import run_experiment
lines = []
run_experiment(Config(algorithm="FedKD", model="cnn", num_clients=4, global_rounds=1,
                      pfllib_compat=True, executor="sequential", client_threads=2,
                      progress=False, plot=False, out=sys.argv[1]), log=lines.append)
print("\\n".join(lines))
"""


def test_a_client_program_calling_lapack_trains_one_client_at_a_time(tmp_path):
  """FedKD's --pfllib-compat SVDs every conv kernel slice by slice (a batch of 2,048 5×5
  matrices); two such client programs at once on XLA:CPU wait for each other forever (two
  client threads never finished, 2026-12-06). The sequential executor reads the LAPACK call
  from the lowered program and trains the clients one at a time, and the run says so in one
  ``warning:`` line. In a child process, so that a regression fails on its timeout instead of
  hanging the suite. (The lowering traces nothing again: see the client-threads test.)"""
  if jax.default_backend() != "cpu":
    pytest.skip("the pool starvation is XLA:CPU's")
  done = subprocess.run([sys.executable, "-c", _LAPACK_CLIENTS, str(tmp_path)],
                        capture_output=True, text=True, timeout=180)
  assert done.returncode == 0, done.stderr[-2000:]
  warned = [line for line in done.stdout.splitlines() if "LAPACK" in line]
  assert warned == ["warning: FedKD's client program calls LAPACK (lapack_sgesdd_ffi), which "
                    "XLA:CPU cannot run in two programs at once: its clients train one at a "
                    "time (--client-threads 1)"], done.stdout
  assert "round    1 |" in done.stdout, done.stdout


def test_one_compilation_per_run_shape():
  data = _small_data()
  for executor in ("vmap", "sequential"):
    eng = _engine("FedAvg", executor, data, model="dnn")
    _run(eng, rounds=4)
    _run(eng, rounds=2, seed=1)  # a second repetition reuses the compiled programs
    if executor == "vmap":
      assert eng.trace_counts["round"] == 1
    assert eng.trace_counts["client_update"] == 1
    assert eng.trace_counts["evaluate"] == 1


def test_cnn_round_compiles_once():
  r = np.random.default_rng(0)
  x = r.normal(size=(60, 28, 28, 1)).astype(np.float32)
  y = r.integers(0, 10, 60)
  pools = np.split(np.arange(60), 3)
  data = FederatedData.from_client_indices("img", x, y, [p[:15] for p in pools],
                                           [p[15:] for p in pools], 10)
  eng = _engine("FedAvg", "vmap", data, model="cnn", jr=1.0, cdr=0.0)
  _run(eng, rounds=3)
  assert eng.trace_counts["round"] == 1 and eng.trace_counts["evaluate"] == 1


def test_same_seed_same_numbers_different_seed_different():
  data = _small_data()
  eng = _engine("FedAvg", "vmap", data)
  _, _, h1 = _run(eng, seed=3)
  _, _, h2 = _run(eng, seed=3)
  _, _, h3 = _run(eng, seed=4)
  assert [h["train_loss"] for h in h1] == [h["train_loss"] for h in h2]
  assert [h["train_loss"] for h in h1] != [h["train_loss"] for h in h3]


def test_dropped_clients_are_not_aggregated_but_selected_ones_train():
  """With Local, dropped clients still keep their trained models (PFLlib semantics)."""
  data = _small_data()
  eng = _engine("Local", "vmap", data, jr=1.0, cdr=0.5)
  root = rng.root_key(0)
  s, c = eng.init(root, data.x[0])
  before = jax.tree.map(np.asarray, c["model"])  # the one architecture group
  s, c, m = eng.run_round(s, c, root, 0)
  assert int(m["num_aggregated"]) == 3 and int(m["num_selected"]) == 6
  changed = np.array([not np.allclose(before["params"]["params"]["head"]["kernel"][i],
                                      c["model"]["params"]["params"]["head"]["kernel"][i])
                      for i in range(6)])
  assert changed.all()


@pytest.mark.parametrize("executor", ["sequential", "vmap"])
def test_shared_evaluation_equals_per_client_evaluation(executor):
  """A global-model evaluation (FedAvg) forwards every sample once, in blocks (here of 16,
  the last one padded), and gives every per-client metric of the per-client path (each
  client's padded tables), also for a client without test samples; compiled once."""
  data = _small_data(num_clients=7, seed=3)
  train = [data.train_idx[i, : data.train_count[i]] for i in range(7)]
  test = [data.test_idx[i, : data.test_count[i]] for i in range(7)]
  train[2] = np.r_[train[2], test[2]]
  test[2] = test[2][:0]
  data = FederatedData.from_client_indices("toy", data.x, data.y, train, test, 3)
  eng = _engine("FedAvg", executor, data, jr=1.0, cdr=0.0)
  eng.shared_eval_block = 16
  root = rng.root_key(0)
  server, clients = eng.init(root, eng.data.x[0])
  server, clients, _ = eng.run_round(server, clients, root, 0)
  shared = eng.evaluate(server, clients)
  assert eng.trace_counts["evaluate_forward"] == 1
  eng.shared_eval = False
  per_client = eng.evaluate(server, clients)
  assert set(shared) == set(per_client)
  for key, value in per_client.items():
    np.testing.assert_allclose(shared[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
  assert np.isnan(shared["client_test_acc"][2])
  eng.shared_eval = True
  eng.evaluate(server, clients)
  assert eng.trace_counts["evaluate_forward"] == 1


def _data_with_a_client_without_test_samples():
  data = _small_data(num_clients=7, seed=3)
  train = [data.train_idx[i, : data.train_count[i]] for i in range(7)]
  test = [data.test_idx[i, : data.test_count[i]] for i in range(7)]
  train[2] = np.r_[train[2], test[2]]
  test[2] = test[2][:0]
  return FederatedData.from_client_indices("toy", data.x, data.y, train, test, 3)


def _count_calls(eng, name):
  """Records every call of the engine's program ``name`` (one entry per call)."""
  calls, program = [], getattr(eng, name)

  def counted(*args, **kwargs):
    calls.append(kwargs.get("gi"))
    return program(*args, **kwargs)

  setattr(eng, name, counted)
  return calls


def _both_paths(eng, server, clients):
  """``(the engine's default evaluation, the per-client path's)``."""
  default = eng.evaluate(server, clients)
  eng.shared_eval = False
  per_client = eng.evaluate(server, clients)
  eng.shared_eval = True
  assert set(default) == set(per_client)
  for key, value in per_client.items():
    np.testing.assert_allclose(default[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
  return default, per_client


@pytest.mark.parametrize("algo,executor", [
    ("FedALA", "sequential"), ("FedALA", "vmap"), ("FedPer", "sequential"),
    ("FedROD", "sequential"), ("FedDBE", "sequential"), ("GPFL", "sequential"),
    ("FedCP", "sequential")])
def test_feature_evaluation_equals_per_client_evaluation(algo, executor):
  """Personal heads on the global model's features (`Algorithm.feature_views`): every
  sample is forwarded through the features once, in blocks (here of 16, the last one padded),
  and each client's heads on its samples' features give every per-client metric of the
  per-client path (each client's full model on its padded tables), also for a client without
  test samples; each program compiled once."""
  eng = _engine(algo, executor, _data_with_a_client_without_test_samples(), jr=1.0, cdr=0.0)
  eng.shared_eval_block = 16
  root = rng.root_key(0)
  server, clients = eng.init(root, eng.data.x[0])
  for r in range(2):  # FedALA: round 0's ALA is skipped, round 1's learns weights
    server, clients, _ = eng.run_round(server, clients, root, r)
  alg = eng.groups[0].algorithm
  one = jax.tree.map(lambda a: a[0], clients[eng.groups[0].name])
  assert alg.feature_views(server, one) is not None
  default, _ = _both_paths(eng, server, clients)
  assert np.isnan(default["client_test_acc"][2])
  eng.evaluate(server, clients)
  assert eng.trace_counts["evaluate_forward"] == 1
  assert eng.trace_counts["evaluate_check"] == (1 if algo == "FedALA" else 0)


def test_feature_evaluation_falls_back_where_a_client_base_differs():
  """FedALA's clients evaluate their own model; where one client's base is not the global
  one bit for bit (here perturbed), the engine evaluates the group per client."""
  eng = _engine("FedALA", "sequential", _small_data(), jr=1.0, cdr=0.0)
  root = rng.root_key(0)
  server, clients = eng.init(root, eng.data.x[0])
  for r in range(2):
    server, clients, _ = eng.run_round(server, clients, root, r)
  name = eng.groups[0].name
  params = clients[name]["params"]
  leaves, treedef = jax.tree.flatten(params["params"]["base"])
  leaves[0] = leaves[0].at[3].add(1e-3)  # client 3's first base tensor
  base = jax.tree.unflatten(treedef, leaves)
  params = {**params, "params": {**params["params"], "base": base}}
  clients = {name: {**clients[name], "params": params}}
  forwards = _count_calls(eng, "_shared_forward")
  _both_paths(eng, server, clients)
  assert eng.trace_counts["evaluate_check"] == 1
  assert forwards == []  # the evaluation forwarded no features


@pytest.mark.parametrize("loop", ["scan", "valid"])
def test_fedala_receives_on_features_forwarded_once_per_round(loop):
  """On the sequential executor FedALA's head-only ALA reads the global model's features of
  every training sample (`Algorithm.receive_features`), forwarded once per round in the
  shared evaluation's blocks, every client's ALA in one vmapped program (its weight loop
  vmapped too: ``valid`` runs each client's own batches); the evaluation that follows
  forwards only the blocks of test-only samples. The states are those of the per-client
  receive (each client forwarding its own window: ``shared_eval=False``) up to float
  rounding, and so are the metrics."""
  data = _small_data()
  root = rng.root_key(0)
  runs = []
  for shared in (True, False):
    eng = _engine("FedALA", "sequential", data, jr=1.0, cdr=0.0, loop=loop)
    eng.shared_eval_block, eng.shared_eval = 16, shared
    server, clients = eng.init(root, eng.data.x[0])
    for r in range(3):
      server, clients, _ = eng.run_round(server, clients, root, r)
    runs.append((eng, server, clients))
  (eng, server, clients), (_, server_b, clients_b) = runs
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               (server, clients), (server_b, clients_b))
  assert eng.trace_counts["receive"] == 1  # one vmapped program, every round
  tables = eng._shared_group_tables(0)  # pylint: disable=protected-access
  assert 0 < tables.train_blocks < len(tables.blocks)
  forwards = _count_calls(eng, "_shared_forward")
  server, clients, _ = eng.run_round(server, clients, root, 3)
  assert len(forwards) == tables.train_blocks
  default = eng.evaluate(server, clients)
  assert len(forwards) == len(tables.blocks)  # only the test-only blocks
  again, _ = _both_paths(eng, server, clients)  # nothing kept: every block forwarded
  assert len(forwards) == 2 * len(tables.blocks)
  for key, value in again.items():
    np.testing.assert_array_equal(default[key], value, err_msg=key)


def test_feature_views_where_clients_evaluate_a_head_on_global_features():
  data = _small_data()
  m = make_model("dnn", data.sample_shape, data.num_classes)
  spec = LocalSpec(learning_rate=0.1, batch_size=4, local_epochs=1, steps_per_epoch=2)
  for name, expected in [("FedALA", True), ("FedPer", True), ("FedRep", True),
                         ("FedROD", True), ("FedDBE", True), ("GPFL", True), ("FedCP", True),
                         ("LG-FedAvg", False), ("FedAvg", False), ("Ditto", False),
                         ("Local", False)]:
    alg = make_algorithm(name, m, spec, suite_params(name))
    server, clients = alg.init(jax.random.key(0), data.x[0], data.num_clients)
    one = jax.tree.map(lambda a: a[0], clients)
    assert (alg.feature_views(server, one) is not None) == expected, name
  compat = make_algorithm("FedCP", m, spec, suite_params("FedCP", pfllib_compat=True))
  server, clients = compat.init(jax.random.key(0), data.x[0], data.num_clients)
  assert compat.feature_views(server, jax.tree.map(lambda a: a[0], clients)) is None


def test_shared_views_only_where_every_client_evaluates_the_global_model():
  data = _small_data()
  m = make_model("dnn", data.sample_shape, data.num_classes)
  spec = LocalSpec(learning_rate=0.1, batch_size=4, local_epochs=1, steps_per_epoch=2)
  server = {"params": m.init(jax.random.key(0), data.x[:1])}
  for name, shared in [("FedAvg", True), ("FedProx", True), ("Ditto", False),
                       ("FedALA", False), ("Local", False), ("FedPer", False)]:
    alg = make_algorithm(name, m, spec, suite_params(name))
    assert (alg.shared_views(server, {}) is not None) == shared, name
  # A client that keeps BatchNorm running statistics evaluates with them.
  assert make_algorithm("FedAvg", m, spec).shared_views(server, {"model_state": {}}) is None
