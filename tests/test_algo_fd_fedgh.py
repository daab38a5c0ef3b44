"""FD (FedDistill) and FedGH: their loss and update rules against numpy references, the
communication they report against HtFLlib's formulas (reference §6), FD's raw-logit
(``pfllib_compat``) divergence, learning on the bundled digits with two architectures, one vs
eight devices, and the HtFL conformance suite."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lib import Config, run_experiment
from fedjax_lib.algorithms import fd as fd_lib  # importing registers "FD"/"FedDistill"
from fedjax_lib.algorithms import fedgh as gh_lib  # and "FedGH"
from fedjax_lib.algorithms import get_algorithm, make_algorithm
from fedjax_lib.algorithms import prototypes as proto_lib
from fedjax_lib.algorithms.base import SettingsContext, is_linear_server
from fedjax_lib.core import rng
from fedjax_lib.core.local import LocalSpec, batch_schedule, masked_cross_entropy
from fedjax_lib.errors import ConfigError
from fedjax_lib.models import make_model
from tests.helpers import assert_mixed_heads_refused
from tests.test_algo_proto import _alg, _client, _toy, _traffic
from tests.test_engine import _small_data

QUIET = dict(log=lambda msg: None)


# ---------------------------------------------------------------- numpy references
def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_soft_ce(logits, labels, mask, table, present, raw):
  """HtFLlib's loop: target row = the global row of the sample's class (softmax'd unless
  ``raw``), else the sample's own output; loss = mean over real samples of -Σ t log p. With
  the softmax target a sample without a row contributes 0 (its own-output term is constant)."""
  total = 0.0
  for z, y, m in zip(logits, labels, mask):
    if not m:
      continue
    if raw:
      if not present.any():
        continue
      t = table[y] if present[y] else z
    else:
      if not present[y]:
        continue
      t = np.exp(np_log_softmax(table[y]))
    total += -(t * np_log_softmax(z)).sum()
  return total / max(mask.sum(), 1)


def np_head_sgd(kernel, bias, points, labels, order_batches, lr):
  """Plain SGD on mean cross-entropy of ``points @ kernel + bias`` over the given batches."""
  for rows in order_batches:
    p, y = points[rows], labels[rows]
    probs = np.exp(np_log_softmax(p @ kernel + bias))
    delta = (probs - np.eye(kernel.shape[1])[y]) / len(rows)
    kernel, bias = kernel - lr * p.T @ delta, bias - lr * delta.sum(0)
  return kernel, bias


# ---------------------------------------------------------------- FD: loss and updates
def test_distillation_loss_matches_numpy_for_both_targets():
  r = np.random.default_rng(0)
  logits = r.normal(size=(6, 4)).astype(np.float32) * 2
  labels = np.array([0, 1, 2, 3, 1, 2])
  mask = np.array([1, 1, 1, 1, 0, 1], np.float32)
  table = r.normal(size=(4, 4)).astype(np.float32) * 3
  for present in ([1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0]):
    present = np.array(present, bool)
    for raw in (False, True):
      got = fd_lib.distillation_loss(jnp.asarray(logits), jnp.asarray(labels),
                                     jnp.asarray(mask), jnp.asarray(table),
                                     jnp.asarray(present), raw)
      want = np_soft_ce(logits, labels, mask, table, present, raw)
      assert float(got) == pytest.approx(want, rel=1e-5, abs=1e-6), (present, raw)


def test_leaving_out_absent_classes_equals_htfllib_own_output_target():
  """HtFLlib puts softmax(own detached output) as the target of a class without a global
  row: a zero-gradient term, so the gradients equal ours (which leave it out)."""
  r = np.random.default_rng(1)
  logits = jnp.asarray(r.normal(size=(5, 3)), jnp.float32)
  labels = jnp.array([0, 1, 2, 1, 0])
  table = jnp.asarray(r.normal(size=(3, 3)), jnp.float32)
  present = jnp.array([True, False, True])

  def htfllib(z):
    rows = jnp.where(present[labels][:, None], table[labels], jax.lax.stop_gradient(z))
    target = jax.lax.stop_gradient(jax.nn.softmax(rows))
    return -(target * jax.nn.log_softmax(z)).sum(-1).mean()

  ours = lambda z: fd_lib.distillation_loss(z, labels, jnp.ones(5), table, present)
  np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(htfllib)(logits), atol=1e-7)


def test_fd_collects_logits_during_training_and_trains_on_ce_plus_soft_term():
  """A Python replay of the same steps (same batches, lr 0.1): the logits of every step are
  taken before that step's update, per class, and the final model matches."""
  data = _toy()
  alg = _alg("FD", data, lr=0.1, lam=0.7)
  server, clients = alg.init(rng.root_key(0), jnp.asarray(data.x[0]), data.num_clients)
  r = np.random.default_rng(3)
  server = {"protos": jnp.asarray(r.normal(size=(4, 4)), jnp.float32),
            "present": jnp.array([True, False, True, True])}
  one = jax.tree.map(lambda a: a[2], clients)
  cd, key = _client(data, 2), jax.random.PRNGKey(7)
  new, upload, stats = alg.client_update(server, one, cd, key)

  rows, valid = batch_schedule(cd, jax.random.split(key)[0], alg.local)
  params = one["params"]
  sums, counts = np.zeros((4, 4)), np.zeros(4)

  def loss(p, x, y):
    z = alg.model.apply(p, x)
    return (masked_cross_entropy(z, y, jnp.ones(len(y)))
            + 0.7 * fd_lib.distillation_loss(z, y, jnp.ones(len(y)), server["protos"],
                                             server["present"]))
  apply, grad = jax.jit(alg.model.apply), jax.jit(jax.grad(loss))
  for step_rows, ok in zip(np.asarray(rows), np.asarray(valid)):
    if not ok:
      continue
    x, y = jnp.asarray(data.x[step_rows]), data.y[step_rows]
    for zi, yi in zip(np.asarray(apply(params, x)), y):
      sums[yi] += zi
      counts[yi] += 1
    grads = grad(params, x, jnp.asarray(y))
    params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
  assert int(stats["steps"]) == int(np.asarray(valid).sum()) > 1
  has = counts > 0
  np.testing.assert_allclose(np.asarray(upload["protos"])[has], sums[has] / counts[has, None],
                             rtol=1e-4, atol=1e-5)
  assert np.asarray(upload["present"]).tolist() == has.tolist()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               new["params"], params)


def test_fd_server_means_per_class_over_uploading_clients_only():
  data = _toy()
  alg = _alg("FD", data)
  server, _ = alg.init(rng.root_key(0), jnp.asarray(data.x[0]), data.num_clients)
  r = np.random.default_rng(4)
  logits = r.normal(size=(4, 4, 4)).astype(np.float32)
  logits[3] = 1e6                                  # a dropped slot's upload: ignored
  present = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], bool)
  weights = np.array([3.0, 5.0, 2.0, 0.0])
  out = alg.server_update(server, {"protos": jnp.asarray(logits), "present": jnp.asarray(
      present)}, jnp.asarray(weights), jax.random.PRNGKey(0))
  for c in range(4):
    senders = [k for k in range(4) if present[k, c] and weights[k] > 0]
    assert bool(out["present"][c]) == bool(senders)
    if senders:   # unweighted: the sample counts do not matter
      np.testing.assert_allclose(np.asarray(out["protos"][c]),
                                 np.mean([logits[k, c] for k in senders], 0), rtol=1e-6)
  assert not is_linear_server(alg)


def test_fd_raw_logit_targets_diverge_while_softmax_targets_stay_bounded():
  """The same client trained 10 rounds against fixed global logits (with negative entries):
  the softmax target keeps the loss >= 0 and small; HtFLlib's raw-logit target has no lower
  bound and ends non-finite or astronomically negative."""
  data = _toy()
  table = jnp.asarray(np.random.default_rng(0).normal(size=(4, 4)) * 3, jnp.float32)
  server = {"protos": table, "present": jnp.ones(4, bool)}
  losses = {}
  for compat in (False, True):
    alg = _alg("FD", data, lr=0.5, pfllib_compat=compat)
    _, clients = alg.init(rng.root_key(0), jnp.asarray(data.x[0]), data.num_clients)
    one, step, seen = jax.tree.map(lambda a: a[2], clients), jax.jit(alg.client_update), []
    for r in range(10):
      one, _, stats = step(server, one, _client(data, 2), jax.random.PRNGKey(r))
      seen.append(float(stats["loss"]))
    losses[compat] = np.array(seen)
  assert np.all(np.isfinite(losses[False])) and np.all(losses[False] >= 0)
  assert losses[False].max() < 10
  assert not np.all(np.isfinite(losses[True])) or losses[True].min() < -1e6, losses[True]


# ---------------------------------------------------------------- FedGH: server and client
def test_valid_row_order_puts_valid_rows_first_and_ignores_padding_positions():
  key = jax.random.PRNGKey(3)
  valid = jnp.array([1, 0, 1, 1, 0, 1, 1], bool)
  order = np.asarray(proto_lib.valid_row_order(key, valid))
  assert sorted(order[:5]) == [0, 2, 3, 5, 6] and sorted(order[5:]) == [1, 4]
  # the same five valid rows with the padding elsewhere: the same order of valid ranks
  moved = jnp.array([1, 1, 1, 1, 1, 0, 0], bool)
  rank = lambda v, o: list(np.cumsum(np.asarray(v))[o[:5]] - 1)
  assert rank(valid, order) == rank(moved, np.asarray(proto_lib.valid_row_order(key, moved)))


def test_fedgh_server_trains_the_head_like_numpy_sgd_on_the_shuffled_pairs():
  """3 epochs, batch 3, over the 7 valid (prototype, class) pairs (ceil(7/3) = 3 steps per
  epoch, the last with one pair), in the algorithm's own shuffle order; a dropped slot's
  garbage changes nothing."""
  data = _toy()
  alg = _alg("FedGH", data, server_epochs=3, server_learning_rate=0.3)
  server, _ = alg.init(rng.root_key(0), jnp.asarray(data.x[0]), data.num_clients)
  r = np.random.default_rng(5)
  protos = r.normal(size=(4, 4, 8)).astype(np.float32)
  protos[3] = np.nan                               # dropped slot
  present = np.array([[1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 0, 1], [1, 1, 1, 1]], bool)
  weights = np.array([3.0, 5.0, 2.0, 0.0])
  key = jax.random.PRNGKey(9)
  out = alg.server_update(server, {"protos": jnp.asarray(protos),
                                   "present": jnp.asarray(present)},
                          jnp.asarray(weights), key)
  valid = (present & (weights > 0)[:, None]).reshape(-1)
  assert valid.sum() == 7
  points, labels = protos.reshape(-1, 8), np.tile(np.arange(4), 4)
  batches = []
  for e in range(3):
    order = np.asarray(proto_lib.valid_row_order(jax.random.fold_in(key, e), jnp.asarray(valid)))
    batches += [order[s:min(s + 3, 7)] for s in range(0, 7, 3)]
  kernel, bias = np_head_sgd(np.asarray(server["head"]["kernel"], np.float64),
                             np.asarray(server["head"]["bias"], np.float64), points, labels,
                             batches, 0.3)
  np.testing.assert_allclose(np.asarray(out["head"]["kernel"]), kernel, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out["head"]["bias"]), bias, rtol=1e-4, atol=1e-6)
  # nobody uploaded: the head stays
  none = alg.server_update(server, {"protos": jnp.asarray(protos),
                                    "present": jnp.asarray(present)}, jnp.zeros(4), key)
  jax.tree.map(np.testing.assert_array_equal, none, server)
  assert not is_linear_server(alg)


def test_fedgh_client_starts_from_the_server_head_and_uploads_eval_mode_class_means():
  data = _toy()
  alg = _alg("FedGH", data, lr=0.1)
  server, clients = alg.init(rng.root_key(0), jnp.asarray(data.x[0]), data.num_clients)
  server = {"head": jax.tree.map(lambda a: a + 0.5, server["head"])}
  one = jax.tree.map(lambda a: a[2], clients)
  assert set(one) == {"base"}
  x = jnp.asarray(data.x[:5])
  variables = {"params": {"base": one["base"], "head": server["head"]}}
  np.testing.assert_allclose(alg.predict(server, one, x), alg.model.apply(variables, x),
                             rtol=1e-6)
  new, upload, _ = alg.client_update(server, one, _client(data, 2), jax.random.PRNGKey(1))
  # the client keeps no head: the server's replaces it every round, the trained one is dropped
  assert set(new) == {"base"}
  assert not all(jax.tree.leaves(jax.tree.map(np.allclose, new["base"], one["base"])))
  # ... and trains from the server's head: another server head, another trained base (a
  # scaled one: a constant shift of every kernel entry would leave the softmax unchanged)
  other = {"head": jax.tree.map(lambda a: 3.0 * a, server["head"])}
  moved, _, _ = alg.client_update(other, one, _client(data, 2), jax.random.PRNGKey(1))
  assert not all(jax.tree.leaves(jax.tree.map(np.allclose, new["base"], moved["base"])))
  # HtFLlib's prototype loader (batch 3, drop_last, in order): all of client 2's 24 samples.
  assert int(data.train_count[2]) == 24
  rows = np.asarray(data.train_idx[2][:24])
  feats = np.asarray(alg.model.apply({"params": {"base": new["base"],
                                                 "head": server["head"]}},
                                     jnp.asarray(data.x[rows]), method="features"))
  for c in range(4):
    np.testing.assert_allclose(np.asarray(upload["protos"][c]),
                               feats[data.y[rows] == c].mean(0), rtol=1e-5, atol=1e-6)
  assert bool(upload["present"].all())


def test_fedgh_prototypes_average_the_loader_samples():
  """The loader's first floor(24/B)*B of client 2's 24 samples (HtFLlib's
  ``collect_protos``): 20 at batch 5, 21 at batch 7."""
  data = _toy()
  for batch_size, count in ((5, 20), (7, 21)):
    alg = _alg("FedGH", data, lr=0.1)
    alg = dataclasses.replace(alg, local=dataclasses.replace(
        alg.local, batch_size=batch_size, steps_per_epoch=24 // batch_size))
    server, clients = alg.init(rng.root_key(0), jnp.asarray(data.x[0]), data.num_clients)
    one = jax.tree.map(lambda a: a[2], clients)
    new, upload, _ = alg.client_update(server, one, _client(data, 2), jax.random.PRNGKey(1))
    rows = np.asarray(data.train_idx[2][:count])
    labels = data.y[rows]
    assert np.asarray(upload["present"]).tolist() == [bool((labels == c).any())
                                                      for c in range(4)]
    feats = np.asarray(alg.model.apply({"params": {"base": new["base"],
                                                   "head": server["head"]}},
                                       jnp.asarray(data.x[rows]), method="features"))
    for c in range(4):
      if (labels == c).any():
        np.testing.assert_allclose(np.asarray(upload["protos"][c]),
                                   feats[labels == c].mean(0), rtol=1e-5, atol=1e-6)


def test_fedgh_refuses_heads_that_are_not_one_dense_layer():
  data = _small_data(num_clients=4)
  spec = LocalSpec(batch_size=4, steps_per_epoch=2)
  ctx = lambda name: SettingsContext(name, jnp.asarray(data.x[0]), np.array([8, 9]))
  for name in ("dnn+head16-8", "mlr"):
    model = make_model(name, data.sample_shape, data.num_classes, feature_dim=16)
    with pytest.raises(ConfigError) as err:
      make_algorithm("FedGH", model, spec).check_settings(ctx(name))
    assert "\n" not in str(err.value) and name in str(err.value)
  # two architecture groups, one with a two-layer head: refused before anything runs
  assert_mixed_heads_refused(make_algorithm("FedGH", make_model("dnn", data.sample_shape,
                                                                data.num_classes), spec),
                             data, "one global head Linear")


@pytest.mark.parametrize("name,params", [
    ("FD", {"lam": -1.0}), ("FD", {"lam": float("nan")}), ("FD", {"pfllib_compat": 1}),
    ("FedGH", {"server_epochs": -1}), ("FedGH", {"server_epochs": 1.5}),
    ("FedGH", {"server_learning_rate": -0.1}), ("FedGH", {"server_learning_rate": float("inf")})])
def test_bad_hyperparameters_are_one_line_config_errors(name, params):
  data = _toy()
  with pytest.raises(ConfigError) as err:
    _alg(name, data, **params)
  assert "\n" not in str(err.value) and list(params)[0] in str(err.value)


def test_registry_names_and_defaults():
  assert get_algorithm("FedDistill") is get_algorithm("fd") is fd_lib.FD
  assert fd_lib.FD.hyperparameters() == {"lam": 1.0, "pfllib_compat": False}
  assert gh_lib.FedGH.hyperparameters() == {"server_learning_rate": 0.01,
                                            "server_epochs": 100}


# ---------------------------------------------------------------- communication
def test_traffic_follows_the_reference_formulas():
  """Reference §6 per client: FD C_i·C up, C·C down (nothing before the first aggregation);
  FedGH C_i·d up, dC + C down (the head exists from the start)."""
  data = _toy()  # C = 4, d = 8; clients hold 2, 2, 4 and 1 classes: sum C_i = 9
  n, c, d, sum_ci = data.num_clients, 4, 8, 9
  fd = _traffic("FD", data)
  assert fd[0]["upload_floats"] == sum_ci * c and fd[1]["upload_floats"] == sum_ci * c
  assert fd[0]["download_floats"] == 0
  assert fd[1]["download_floats"] == n * c * c and fd[1]["download_bytes"] == 4 * n * c * c
  gh = _traffic("FedGH", data)
  for t in gh:
    assert t["upload_floats"] == sum_ci * d and t["upload_bytes"] == 4 * sum_ci * d
    assert t["download_floats"] == n * (d * c + c)


@pytest.mark.parametrize("algorithm,bar", [("FD", 0.8), ("FedGH", 0.9)])
@pytest.mark.xla_optimized  # runs long enough to repay it: tests/conftest.py
def test_two_architectures_learn_on_digits(algorithm, bar, tmp_path):
  """CNN and DNN clients on the bundled digits (10 clients, Dir(0.1), lr 0.05, 5 rounds,
  default hyperparameters: FD -lam 1, FedGH -slr 0.01 -se 100). Measured over seeds 0/1
  (2026-12-01, round 0 → round 5): FD .070/.082 → .934/.868, FedGH .070/.082 → .952/.934;
  the bar sits below the smaller one (the test runs seed 0)."""
  res = run_experiment(Config(model="cnn,dnn", algorithm=algorithm, num_clients=10,
                              learning_rate=0.05, global_rounds=5, eval_gap=5,
                              out=str(tmp_path), progress=False), **QUIET)
  acc = res.runs[0].history["test_acc"]
  assert acc[0] < 0.3 and acc[-1] >= bar, acc
