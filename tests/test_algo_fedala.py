"""FedALA: parameter order, the ALA pieces against numpy, the start phase, state across rounds."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lib.algorithms import get_algorithm
from fedjax_lib.algorithms.fedala import (adaptive_local_aggregation, ala_mix,
                                          losses_converged, parameter_order, pytorch_order,
                                          sample_window, take, upper_mask, upper_paths,
                                          weight_step)
from fedjax_lib.core import rng
from fedjax_lib.core.local import (ClientData, SampleFeatures, masked_cross_entropy,
                                   train_locally)
from fedjax_lib.errors import ConfigError
from fedjax_lib.models import make_model
from tests import test_engine as engine_test
from tests.test_engine import _small_data

# ---------------------------------------------------------------- a toy 2-parameter model
# pred = w·x + b with squared error; PyTorch order (w, b): w is the "first tensor".
TOY_ORDER = (("params", "w"), ("params", "b"))
NAMES = ("w", "b")


def _toy_loss(variables, batch):
  p = variables["params"]
  resid = batch.x[:, 0] * p["w"][0] + p["b"][0] - batch.y
  return jnp.sum(batch.mask * resid ** 2) / jnp.maximum(batch.mask.sum(), 1.0)


def _toy_data(count=13, width=16, seed=0):
  r = np.random.default_rng(seed)
  total = width + 4
  x = r.normal(size=(total, 1)).astype(np.float32)
  y = (1.5 * x[:, 0] - 0.5 + 0.3 * r.normal(size=total)).astype(np.float32)
  idx = np.zeros(width, np.int32)
  idx[:count] = r.permutation(total)[:count]
  return ClientData(jnp.asarray(x), jnp.asarray(y), jnp.asarray(idx), jnp.int32(count))


def _toy_vars(w, b):
  return {"params": {"w": jnp.array([w], jnp.float32), "b": jnp.array([b], jnp.float32)}}


def _ala(local, glob, weights, start_phase, data, key, layer_idx=0, **kw):
  settings = dict(eta=0.5, rand_percent=80, batch_size=4, threshold=0.1, num_pre_loss=3,
                  max_start_epochs=50)
  settings.update(kw)
  fn = jax.jit(lambda l, g, w, s, d, k: adaptive_local_aggregation(
      l, g, w, s, d, k, loss_fn=_toy_loss, order=TOY_ORDER, layer_idx=layer_idx, **settings))
  return fn(local, glob, weights, jnp.asarray(start_phase), data, key)


def _numpy_ala(local, glob, weights, start_phase, data, rows, layer_idx, eta=0.5, batch_size=4,
               threshold=0.1, num_pre_loss=3, max_start_epochs=50):
  """PFLlib's ALA by hand, in float64, for the toy model (rows: the sampled window)."""
  f64 = lambda tree: {n: np.float64(np.asarray(tree["params"][n])[0]) for n in NAMES}
  theta, theta_g = f64(local), f64(glob)
  upper = NAMES[-layer_idx:] if layer_idx else NAMES
  w = {n: np.float64(np.asarray(weights["params"][n])[0]) for n in upper}
  if np.sum(theta_g["w"] - theta["w"]) == 0:
    return theta, w, start_phase, 0
  x, y = np.asarray(data.x, np.float64)[:, 0], np.asarray(data.y, np.float64)
  losses = []
  while True:
    for s in range(0, len(rows), batch_size):
      xb, yb = x[rows[s:s + batch_size]], y[rows[s:s + batch_size]]
      t = {n: theta[n] + (theta_g[n] - theta[n]) * w[n] if n in upper else theta_g[n]
           for n in NAMES}
      resid = t["w"] * xb + t["b"] - yb
      loss = np.mean(resid ** 2)
      grad = {"w": 2 * np.mean(resid * xb), "b": 2 * np.mean(resid)}
      for n in upper:
        w[n] = np.clip(w[n] - eta * grad[n] * (theta_g[n] - theta[n]), 0, 1)
    losses.append(loss)
    if not start_phase:
      break
    if len(losses) > num_pre_loss and np.std(losses[-num_pre_loss:]) < threshold:
      break
    if len(losses) >= max_start_epochs:
      break
  new = {n: theta[n] + (theta_g[n] - theta[n]) * w[n] if n in upper else theta_g[n]
         for n in NAMES}
  return new, w, False, len(losses)


def _window_rows(data, key, rand_percent=80):
  start, n = sample_window(key, data.train_count, rand_percent, data.train_idx.shape[0])
  return np.asarray(data.train_idx)[int(start):int(start) + int(n)]


def _check_against_numpy(out, ref, layer_idx):
  new, w, start_phase, epochs = out
  ref_new, ref_w, ref_start, ref_epochs = ref
  assert int(epochs) == ref_epochs and bool(start_phase) == ref_start
  for n in NAMES:
    np.testing.assert_allclose(np.asarray(new["params"][n])[0], ref_new[n], rtol=1e-4,
                               atol=1e-5)
  upper = NAMES[-layer_idx:] if layer_idx else NAMES
  assert sorted(w["params"]) == sorted(upper)
  for n in upper:
    np.testing.assert_allclose(np.asarray(w["params"][n])[0], ref_w[n], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- parameter order
def test_pytorch_order_of_fedavg_cnn():
  model = make_model("cnn", (28, 28, 1), 10)
  order = parameter_order(model, (28, 28, 1))
  modules = [("base", "conv1"), ("base", "conv2"), ("base", "fc1"), ("head",)]
  assert order == tuple(("params", *m, leaf) for m in modules for leaf in ("kernel", "bias"))
  head = ("params", "head")
  assert upper_paths(order, 1) == (head + ("bias",),)
  assert upper_paths(order, 2) == (head + ("kernel",), head + ("bias",))
  assert upper_paths(order, 3) == (("params", "base", "fc1", "bias"), head + ("kernel",),
                                   head + ("bias",))
  assert upper_paths(order, 0) == order and upper_paths(order, 99) == order
  # jax.tree's own leaf order puts bias first: the selection must not depend on it.
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1))))
  leaf_names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]]
  assert leaf_names[-2:] == ["['params']['head']['bias']", "['params']['head']['kernel']"]
  mask = upper_mask(shapes, order, 1)
  assert mask["params"]["head"] == {"bias": True, "kernel": False}
  assert not any(jax.tree.leaves(mask["params"]["base"]))
  mask = upper_mask(shapes, order, 3)
  assert mask["params"]["base"]["fc1"] == {"bias": True, "kernel": False}
  assert all(jax.tree.leaves(mask["params"]["head"]))
  assert all(jax.tree.leaves(upper_mask(shapes, order, 0)))


def test_pytorch_order_puts_bias_last_within_a_module():
  created = {"params": {"b_mod": {"bias": 0, "kernel": 1}, "a_mod": {"scale": 2, "bias": 3}}}
  assert pytorch_order(created) == (("params", "b_mod", "kernel"), ("params", "b_mod", "bias"),
                                    ("params", "a_mod", "scale"), ("params", "a_mod", "bias"))


# ---------------------------------------------------------------- pure pieces vs numpy
def test_mix_and_weight_step_match_numpy_and_clip():
  r = np.random.default_rng(0)
  shape = {"a": (3, 2), "b": (2,)}
  local, glob, grads = ({k: r.normal(size=s).astype(np.float32) for k, s in shape.items()}
                        for _ in range(3))
  weights = {k: r.uniform(size=s).astype(np.float32) for k, s in shape.items()}
  eta = 0.7
  for k in shape:
    np.testing.assert_allclose(ala_mix(local, glob, weights)[k],
                               local[k] + (glob[k] - local[k]) * weights[k], rtol=1e-6)
    expected = np.clip(weights[k] - eta * grads[k] * (glob[k] - local[k]), 0, 1)
    np.testing.assert_allclose(weight_step(weights, grads, local, glob, eta)[k], expected,
                               rtol=1e-6, atol=1e-7)
  big = {k: 100.0 * np.sign(glob[k] - local[k]) for k in shape}
  assert all(np.all(v == 0.0) for v in weight_step(weights, big, local, glob, 1.0).values())
  assert all(np.all(v == 1.0) for v in weight_step(weights, {k: -v for k, v in big.items()},
                                                   local, glob, 1.0).values())


def test_sample_window_size_and_offset():
  for percent in (80, 29, 100, 1):
    for count in range(0, 40):
      _, n = sample_window(jax.random.key(0), count, percent, 40)
      assert int(n) == int(percent / 100 * count)  # float64 rounding (0.29·100 -> 28)
  starts = {int(sample_window(jax.random.key(i), 10, 80, 16)[0]) for i in range(60)}
  assert starts == {0, 1, 2}


def test_losses_converged_uses_population_std():
  losses = np.array([1.0, 1.1, 0.9], np.float32)
  std = np.std(losses)  # 0.0816 (ddof=0); the sample std would be 0.1
  assert bool(losses_converged(jnp.asarray(losses), 4, 0.09))
  assert not bool(losses_converged(jnp.asarray(losses), 3, 0.09))  # needs MORE than 3 losses
  assert not bool(losses_converged(jnp.asarray(losses), 4, std - 1e-3))


# ---------------------------------------------------------------- ALA vs numpy
@pytest.mark.parametrize("loop", ["scan", "valid"])
@pytest.mark.parametrize("layer_idx", [0, 1])
def test_one_epoch_ala_matches_numpy(layer_idx, loop):
  data, key = _toy_data(), jax.random.key(3)
  local, glob = _toy_vars(0.2, 0.9), _toy_vars(1.4, -0.8)
  upper = NAMES[-layer_idx:] if layer_idx else NAMES
  weights = {"params": {n: jnp.full((1,), 0.6, jnp.float32) for n in upper}}
  rows = _window_rows(data, key)
  assert len(rows) == 10  # int(0.8·13): batches of 4, 4 and a partial 2
  out = _ala(local, glob, weights, False, data, key, layer_idx, loop=loop)
  ref = _numpy_ala(local, glob, weights, False, data, rows, layer_idx)
  _check_against_numpy(out, ref, layer_idx)
  if layer_idx == 1:  # the lower tensor w is the global one
    assert float(out[0]["params"]["w"][0]) == pytest.approx(1.4)


def test_round0_guard_leaves_everything_unchanged():
  data, key = _toy_data(), jax.random.key(0)
  weights = {"params": {n: jnp.full((1,), 0.5, jnp.float32) for n in NAMES}}
  # The first tensor w agrees; b differs: still skipped (PFLlib checks the first tensor only).
  local, glob = _toy_vars(0.3, 1.0), _toy_vars(0.3, -2.0)
  for start_phase in (True, False):
    new, w, sp, epochs = _ala(local, glob, weights, start_phase, data, key)
    jax.tree.map(np.testing.assert_array_equal, (new, w), (local, weights))
    assert bool(sp) == start_phase and int(epochs) == 0


def test_lower_layers_come_from_the_global_model():
  data = _small_data()
  model = make_model("dnn", data.sample_shape, data.num_classes)
  order = parameter_order(model, data.sample_shape)
  x = jnp.asarray(data.x)
  local = model.init(jax.random.PRNGKey(0), x[:1])
  glob = model.init(jax.random.PRNGKey(1), x[:1])
  weights = jax.tree.map(jnp.ones_like, take(local, upper_paths(order, 1)))  # the head bias
  d = ClientData(x, jnp.asarray(data.y), jnp.asarray(data.train_idx[0]),
                 jnp.int32(data.train_count[0]))
  new, w, sp, epochs = jax.jit(lambda l, g, w_: adaptive_local_aggregation(
      l, g, w_, jnp.bool_(False), d, jax.random.key(0),
      loss_fn=lambda v, b: masked_cross_entropy(model.apply(v, b.x), b.y, b.mask), order=order,
      layer_idx=1, eta=1.0, rand_percent=80, batch_size=4, threshold=0.1, num_pre_loss=10,
      max_start_epochs=5))(local, glob, weights)
  assert int(epochs) == 1 and not bool(sp)
  assert jax.tree.structure(w) == jax.tree.structure(weights)
  assert not np.allclose(w["params"]["head"]["bias"], 1.0)  # the weights were learned
  lower = [("base", "fc1", "kernel"), ("base", "fc1", "bias"), ("head", "kernel")]
  get = lambda tree, path: tree["params"][path[0]][path[1]] if len(path) == 2 else \
      tree["params"][path[0]][path[1]][path[2]]
  for path in lower:
    np.testing.assert_array_equal(get(new, path), get(glob, path))
  bl, bg = local["params"]["head"]["bias"], glob["params"]["head"]["bias"]
  np.testing.assert_allclose(new["params"]["head"]["bias"],
                             bl + (bg - bl) * w["params"]["head"]["bias"], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- the start phase
@pytest.mark.parametrize("loop", ["scan", "valid"])
def test_start_phase_stops_by_the_std_criterion(loop):
  data, key = _toy_data(), jax.random.key(3)
  local, glob = _toy_vars(0.2, 0.9), _toy_vars(1.4, -0.8)
  weights = {"params": {n: jnp.full((1,), 0.6, jnp.float32) for n in NAMES}}
  rows = _window_rows(data, key)
  kw = dict(eta=0.05, threshold=0.02, num_pre_loss=3, max_start_epochs=50)
  ref = _numpy_ala(local, glob, weights, True, data, rows, 0, **kw)
  assert 3 + 1 < ref[3] < 50  # the criterion, not the minimum count or the cap, stopped it
  _check_against_numpy(_ala(local, glob, weights, True, data, key, loop=loop, **kw), ref, 0)


def test_start_phase_stops_at_the_cap():
  data, key = _toy_data(), jax.random.key(3)
  local, glob = _toy_vars(0.2, 0.9), _toy_vars(1.4, -0.8)
  weights = {"params": {n: jnp.full((1,), 0.6, jnp.float32) for n in NAMES}}
  kw = dict(threshold=0.0, max_start_epochs=7)  # std < 0 never holds
  ref = _numpy_ala(local, glob, weights, True, data, _window_rows(data, key), 0, **kw)
  assert ref[3] == 7
  _check_against_numpy(_ala(local, glob, weights, True, data, key, **kw), ref, 0)


# ---------------------------------------------------------------- the algorithm
def _fedala_engine(data, jr=1.0, **params):
  return engine_test._engine("FedALA", "vmap", data, jr=jr, cdr=0.0, unroll=1,
                             params=params or None)


@pytest.fixture(scope="module")
def rounds():
  """An engine (4 of 6 clients selected per round) and its states after init, round 0 and
  round 1, and who trained in rounds 0 and 1 (shared: compiling is slow)."""
  data = _small_data()
  eng = _fedala_engine(data, jr=0.67, max_start_epochs=20)
  root = rng.root_key(0)
  s, c = eng.init(root, eng.data.x[0])
  states = [(s, c["model"])]  # the one architecture group's client states
  selected = []
  for r in range(2):
    s, c, m = eng.run_round(*jax.tree.map(jnp.copy, (s, c)), root, r)
    states.append((s, c["model"]))
    selected.append(sorted(set(np.asarray(m["selected"]).tolist()) - {-1}))
  assert [len(ids) for ids in selected] == [4, 4]
  return eng, states, selected


def _client(eng, states, cid):
  s, c = states
  d = eng.data
  return s, jax.tree.map(lambda a: a[cid], c), ClientData(d.x, d.y, d.train_idx[cid],
                                                          d.train_count[cid])


def test_hyperparameters_and_validation():
  cls = get_algorithm("fedala")
  assert cls.hyperparameters() == {"eta": 1.0, "rand_percent": 80, "layer_idx": 2,
                                   "threshold": 0.1, "num_pre_loss": 10, "max_start_epochs": 100}
  data = _small_data()
  for bad in ({"rand_percent": 0}, {"rand_percent": 101}, {"rand_percent": 50.5},
              {"layer_idx": -1}, {"eta": -1.0}, {"num_pre_loss": 0}, {"max_start_epochs": 0},
              {"threshold": -0.1}):
    with pytest.raises(ConfigError, match="FedALA"):
      _fedala_engine(data, **bad)


def test_state_persists_across_rounds_and_every_client_receives_by_ala(rounds):
  eng, states, selected = rounds
  alg = eng.algorithm
  c = states[0][1]  # init: before round 0 nothing is received
  assert set(c) == {"params", "weights", "start_phase"} and c["start_phase"].dtype == jnp.bool_
  assert jax.tree.structure(c["weights"]["params"]) == jax.tree.structure(
      {"head": {"bias": 0, "kernel": 0}})  # layer_idx = 2: the classifier's weight and bias
  assert np.all(np.asarray(c["start_phase"]))
  jax.tree.map(lambda w: np.testing.assert_array_equal(w, 1.0), c["weights"])
  c = states[1][1]  # after round 0: every client, selected or not, ALA'd the aggregate
  assert not np.any(np.asarray(c["start_phase"]))  # (PFLlib's round-1 start phase)
  assert not all(np.allclose(w, 1.0) for w in jax.tree.leaves(c["weights"]))

  # Round 1 of a selected client, by hand: local SGD from the stored model (client_update),
  # the aggregate, then ALA of it into the trained model (receive_client), the engine's keys.
  cid = selected[1][0]
  rkey = rng.round_key(rng.root_key(0), 1)
  s, state, cd = _client(eng, states[1], cid)
  new_server = states[2][0]
  receive_key = rng.client_key(rng.receive_round_key(rkey), cid)

  @jax.jit
  def by_hand(state):
    trained, upload, metrics = alg.client_update(s, state, cd, rng.client_key(rkey, cid))
    sgd, _, _ = train_locally(state["params"], cd, rng.client_key(rkey, cid), alg.local,
                              alg.ce_loss)
    received = alg.receive_client(new_server, trained, cd, receive_key)
    ala = alg.ala(new_server, trained, cd, receive_key)
    return trained, upload, metrics, sgd, received, ala

  trained, upload, metrics, sgd, received, ala = by_hand(state)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  jax.tree.map(close, (trained["params"], upload), (sgd, sgd))
  jax.tree.map(np.testing.assert_array_equal, (trained["weights"], trained["start_phase"]),
               (state["weights"], state["start_phase"]))  # training leaves W alone
  assert "loss" in metrics
  local, w, start_phase, epochs = ala
  assert int(epochs) == 1 and not bool(start_phase)  # after the start phase: one epoch
  jax.tree.map(close, (received["params"], received["weights"]), (local, w))
  assert not jax.tree.all(jax.tree.map(np.allclose, w, state["weights"]))  # W moved on
  # ... which is the engine's state of that client after round 1.
  jax.tree.map(close, received, jax.tree.map(lambda a: a[cid], states[2][1]))

  # A client not selected in round 1 does not train, but still receives (PFLlib's
  # send_models runs ALA on every client): its state is the ALA of its stored model.
  other = sorted(set(range(eng.num_clients)) - set(selected[1]))[0]
  s, state, cd = _client(eng, states[1], other)
  received = jax.jit(alg.receive_client)(
      new_server, state, cd, rng.client_key(rng.receive_round_key(rkey), other))
  jax.tree.map(close, received, jax.tree.map(lambda a: a[other], states[2][1]))
  assert not jax.tree.all(jax.tree.map(np.allclose, received["weights"], state["weights"]))


@pytest.mark.parametrize("loop", ["scan", "valid"])
def test_head_only_ala_equals_the_full_model_ala(rounds, loop):
  """With head-only upper tensors FedALA learns W on features computed once; the result is
  the full-model procedure's, in the start phase (many epochs) and after it. With the
  ``valid`` loop the features are of the smallest window bucket holding the client's window
  (clients of 4 to 22 training samples here: windows of 3 to 17 in buckets 4, 8, 16, 20)."""
  eng, states, _ = rounds
  alg = dataclasses.replace(eng.algorithm,
                            local=dataclasses.replace(eng.algorithm.local, loop=loop))
  order = parameter_order(alg.model, eng.data.x.shape[1:], eng.data.x.dtype)
  key = jax.random.key(11)
  fast = jax.jit(lambda s, st, cd: alg.ala(s, st, cd, key))
  full = jax.jit(lambda s, st, cd: adaptive_local_aggregation(
      st["params"], s["params"], st["weights"], st["start_phase"], cd, key,
      loss_fn=lambda v, b: alg.ce_loss(v, b, None), order=order, layer_idx=alg.layer_idx,
      eta=alg.eta, rand_percent=alg.rand_percent, batch_size=alg.local.batch_size,
      threshold=alg.threshold, num_pre_loss=alg.num_pre_loss,
      max_start_epochs=alg.max_start_epochs))
  windows = set()
  order_rows = np.random.default_rng(0).permutation(eng.data.x.shape[0])
  position = jnp.asarray(np.argsort(order_rows), jnp.int32)
  for r, start in ((0, True), (1, False)):
    for cid in range(eng.num_clients):  # the stored models of round r, the aggregate of r + 1
      _, state, cd = _client(eng, states[r], cid)
      s = states[r + 1][0]
      assert alg._head_split(s["params"], order) is not None  # pylint: disable=protected-access
      state = dict(state, start_phase=jnp.asarray(start))
      a, b = fast(s, state, cd), full(s, state, cd)
      # The engine's shared features of every sample (a shuffled table, as the engine's
      # blocks place them) in place of the window's forward pass.
      z = alg.model.apply(s["params"], eng.data.x[order_rows], method="features")
      c = fast(s, state, cd._replace(features=SampleFeatures(z, position)))
      for got in (a, c):
        assert int(got[3]) == int(b[3]) >= 1
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
                     got[:2], b[:2])
      windows.add(int(0.8 * int(cd.train_count)))
  assert len(windows) >= 3


def test_receive_reads_shared_features_only_with_head_only_ala():
  data = _small_data()
  model = make_model("dnn", data.sample_shape, data.num_classes)
  sample = jax.ShapeDtypeStruct(data.x.shape[1:], data.x.dtype)
  for layer_idx, expected in ((2, True), (1, True), (3, False), (0, False)):
    alg = get_algorithm("FedALA")(model=model, local=None, layer_idx=layer_idx)
    assert alg.receive_features(sample) == expected, layer_idx


def test_eval_views_evaluate_the_stored_model_and_the_global_model(rounds):
  """The personal view is the stored model, already ALA-initialised by the last receive."""
  eng, states, _ = rounds
  alg = eng.algorithm
  key = jax.random.key(5)
  x = eng.data.x[:6]
  s, state, cd = _client(eng, states[0], 1)  # init: every client holds the global model
  views = alg.eval_views(s, state, cd, key)
  assert list(views) == ["personal", "global"]
  np.testing.assert_array_equal(views["personal"](x), views["global"](x))

  s, state, cd = _client(eng, states[2], 1)
  views = alg.eval_views(s, state, cd, key)
  personal, global_ = views["personal"](x), views["global"](x)
  np.testing.assert_array_equal(personal, alg.model.apply(state["params"], x))
  np.testing.assert_array_equal(global_, alg.model.apply(s["params"], x))
  assert not np.allclose(personal, global_)
