"""FedProto and FedTGP: their pure pieces against numpy and hand-derived cases, and the
communication they report against HtFLlib's per-client formulas (reference §6)."""


import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lib.algorithms import make_algorithm
from fedjax_lib.algorithms import fedtgp as tgp_lib
from fedjax_lib.algorithms import prototypes as proto_lib
from fedjax_lib.core import engine as engine_lib
from fedjax_lib.core import rng
from fedjax_lib.core.local import ClientData, LocalSpec
from fedjax_lib.data.federated import FederatedData
from fedjax_lib.models import make_model


# ---------------------------------------------------------------- numpy references
def np_acl(points, labels, protos, margin, mask):
  dist = np.sqrt(((points[:, None, :] - protos[None]) ** 2).sum(-1))
  logits = -(dist + margin * np.eye(protos.shape[0])[labels])
  logits -= logits.max(1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  losses = -logp[np.arange(len(labels)), labels]
  return (losses * mask).sum() / max(mask.sum(), 1)


def np_margin(centres, present, tau):
  """HtFLlib's loop: gap[k] = min distance to another present centre, 1e9 if none; then
  gaps above 1e8 become the smallest gap; margin = min(max gap, tau)."""
  num = len(centres)
  gap = np.full(num, 1e9)
  keys = [c for c in range(num) if present[c]]
  for k1 in keys:
    for k2 in keys:
      if k1 > k2:
        d = np.linalg.norm(centres[k1] - centres[k2])
        gap[k1] = min(gap[k1], d)
        gap[k2] = min(gap[k2], d)
  min_gap = gap.min()
  gap[gap > 1e8] = min_gap
  return min(gap.max(), tau)


def test_acl_loss_matches_numpy():
  r = np.random.default_rng(0)
  points = r.normal(size=(7, 5)).astype(np.float32)
  labels = r.integers(0, 4, 7)
  protos = r.normal(size=(4, 5)).astype(np.float32)
  mask = np.array([1, 1, 1, 0, 1, 1, 0], np.float32)
  for margin in (0.0, 0.7, 3.0):
    got = tgp_lib.acl_loss(jnp.asarray(points), jnp.asarray(labels), jnp.asarray(protos),
                           margin, jnp.asarray(mask))
    assert float(got) == pytest.approx(np_acl(points, labels, protos, margin, mask), rel=1e-5)


def test_acl_loss_hand_case():
  """Two classes on a line: p = 0 of class 0, prototypes at 0 and 2, margin 1: logits
  -(d + 1) and -2, where the distance d to the prototype at 0 is the floor sqrt(1e-12) =
  1e-6, so L = -log(e^-(1 + d) / (e^-(1 + d) + e^-2)) = log(1 + e^-(1 - d)). (Against
  log(1 + e^-1), which leaves d out, the float32 loss was 1.0e-6 off, relative, with Optax
  0.2.3.)"""
  loss = tgp_lib.acl_loss(jnp.zeros((1, 1)), jnp.array([0]), jnp.array([[0.0], [2.0]]), 1.0,
                          jnp.ones(1))
  assert float(loss) == pytest.approx(np.log1p(np.exp(-(1.0 - 1e-6))), rel=5e-7)


def test_acl_gradient_is_finite_at_zero_distance():
  protos = jnp.array([[1.0, 2.0], [3.0, -1.0]])
  grad = jax.grad(lambda p: tgp_lib.acl_loss(p[:1], jnp.array([0]), p, 0.5, jnp.ones(1)))(
      protos)
  assert np.all(np.isfinite(np.asarray(grad)))
  d = tgp_lib.euclidean_distances(protos, protos)
  assert np.all(np.isfinite(np.asarray(d))) and float(d[0, 0]) == pytest.approx(1e-6)


def test_adaptive_margin_matches_numpy_and_hand_cases():
  r = np.random.default_rng(1)
  centres = r.normal(size=(6, 3)).astype(np.float32) * 3
  for present in ([1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 1], [0, 1, 0, 0, 1, 0]):
    present = np.array(present, bool)
    for tau in (100.0, 1.0):
      got = tgp_lib.adaptive_margin(jnp.asarray(centres), jnp.asarray(present), tau)
      assert float(got) == pytest.approx(np_margin(centres, present, tau), rel=1e-5)
  two = jnp.array([[0.0, 0.0], [3.0, 4.0], [9.0, 9.0]])
  # classes 0 and 1 present, 5 apart; class 2 absent: margin 5, capped at tau
  assert float(tgp_lib.adaptive_margin(two, jnp.array([True, True, False]), 100.0)) == \
      pytest.approx(5.0)
  assert float(tgp_lib.adaptive_margin(two, jnp.array([True, True, False]), 2.0)) == 2.0
  # one class present: no gap at all, the margin is tau
  assert float(tgp_lib.adaptive_margin(two, jnp.array([True, False, False]), 7.0)) == 7.0


def test_prototype_mse_counts_samples_without_a_prototype_in_the_mean():
  features = jnp.array([[1.0, 1.0], [2.0, 0.0], [5.0, 5.0]])
  labels = jnp.array([0, 1, 1])
  protos = jnp.array([[0.0, 1.0], [9.0, 9.0]])
  present = jnp.array([True, False])
  mask = jnp.array([1.0, 1.0, 1.0])
  # only sample 0 has a prototype: (1 - 0)^2 + 0 = 1, over n*d = 3*2 entries
  assert float(proto_lib.prototype_mse(features, labels, mask, protos, present)) == \
      pytest.approx(1 / 6)
  mask = jnp.array([1.0, 0.0, 0.0])
  assert float(proto_lib.prototype_mse(features, labels, mask, protos, present)) == \
      pytest.approx(1 / 2)


def test_mean_of_uploads_is_unweighted_over_clients_that_have_the_class():
  protos = jnp.array([[[1.0], [5.0]], [[3.0], [7.0]], [[100.0], [100.0]]])
  has = jnp.array([[True, False], [True, True], [False, False]])
  mean, present = proto_lib.mean_of_uploads(protos, has)
  np.testing.assert_allclose(np.asarray(mean), [[2.0], [7.0]])
  assert np.asarray(present).tolist() == [True, True]


def test_nearest_prototype_logits():
  features = jnp.array([[0.0, 0.0], [4.0, 4.0]])
  protos = jnp.array([[0.0, 1.0], [4.0, 3.0], [0.0, 0.0]])
  logits = proto_lib.nearest_prototype_logits(features, protos, jnp.array([True, True, False]))
  assert np.asarray(jnp.argmax(logits, -1)).tolist() == [0, 1]   # class 2 has no prototype
  assert float(logits[0, 0]) == pytest.approx(-0.5)              # MSE over d = 2
  none = proto_lib.nearest_prototype_logits(features, protos, jnp.zeros(3, bool))
  assert np.all(np.asarray(none) == 0)


# ---------------------------------------------------------------- algorithms on toy data
def _toy(num_clients=4, classes_of=((0, 1), (1, 2), (0, 1, 2, 3), (3,)), dim=6, per_class=8):
  r = np.random.default_rng(0)
  xs, ys, train, test, start = [], [], [], [], 0
  for cls in classes_of[:num_clients]:
    y = r.permutation(np.repeat(np.asarray(cls), per_class))
    x = r.normal(size=(len(y), dim)).astype(np.float32) + y[:, None]
    xs.append(x)
    ys.append(y)
    idx = np.arange(start, start + len(y))
    train.append(idx[: len(y) * 3 // 4])
    test.append(idx[len(y) * 3 // 4:])
    start += len(y)
  return FederatedData.from_client_indices("toy", np.concatenate(xs), np.concatenate(ys),
                                           train, test, 4)


def _alg(name, data, lr=0.1, **params):
  model = make_model("dnn", data.sample_shape, data.num_classes, feature_dim=8)
  spec = LocalSpec(learning_rate=lr, batch_size=3, local_epochs=1,
                   steps_per_epoch=int(data.train_count.max()) // 3, unroll=1)
  return make_algorithm(name, model, spec, params or None)


def _client(data, i):
  return ClientData(jnp.asarray(data.x), jnp.asarray(data.y), jnp.asarray(data.train_idx[i]),
                    jnp.asarray(data.train_count[i]))


def test_fedproto_collects_prototypes_during_training():
  """With lr 0 the model does not move, so the collected prototypes are the class means of
  the features of the samples the (drop_last) steps visited."""
  data = _toy()
  alg = _alg("FedProto", data, lr=1e-30)
  server, clients = alg.init(rng.root_key(0), jnp.asarray(data.x[0]), data.num_clients)
  one = jax.tree.map(lambda a: a[2], clients)
  cd = _client(data, 2)
  _, upload, stats = alg.client_update(server, one, cd, jax.random.PRNGKey(3))
  count = int(data.train_count[2])
  visited = (count // 3) * 3
  assert int(stats["steps"]) == count // 3
  # which samples were visited depends on the shuffle; with every sample visited (count a
  # multiple of the batch) the means are over the whole training set
  assert visited == count
  rows = np.asarray(data.train_idx[2][:count])
  feats = np.asarray(alg.model.apply(one["params"], jnp.asarray(data.x[rows]),
                                     method="features"))
  labels = data.y[rows]
  for c in range(4):
    if (labels == c).any():
      np.testing.assert_allclose(np.asarray(upload["protos"][c]), feats[labels == c].mean(0),
                                 rtol=1e-5, atol=1e-6)
  assert np.asarray(upload["present"]).tolist() == [bool((labels == c).any()) for c in range(4)]


@pytest.mark.parametrize("batch_size", [3, 5, 7, 30])
def test_fedtgp_local_prototypes_are_eval_mode_class_means_over_the_loader(batch_size):
  """HtFLlib's prototype loader: the first floor(n/B)*B training samples, in order (client 2
  has 24: all of them for B = 3, 20 for B = 5, 21 for B = 7, none for B = 30)."""
  data = _toy()
  alg = _alg("FedTGP", data, server_epochs=1)
  alg = dataclasses.replace(alg, local=dataclasses.replace(alg.local, batch_size=batch_size))
  _, clients = alg.init(rng.root_key(0), jnp.asarray(data.x[0]), data.num_clients)
  variables = jax.tree.map(lambda a: a[2], clients)["params"]
  protos, present = alg.local_prototypes(variables, _client(data, 2), 4)
  count = int(data.train_count[2])
  assert count == 24
  if batch_size > count:  # the loader yields nothing: no prototype
    assert not np.asarray(present).any() and not np.asarray(protos).any()
    return
  rows = np.asarray(data.train_idx[2][: count // batch_size * batch_size])
  feats = np.asarray(alg.model.apply(variables, jnp.asarray(data.x[rows]), method="features"))
  labels = data.y[rows]
  for c in range(4):
    expected = feats[labels == c].mean(0) if (labels == c).any() else np.zeros(feats.shape[1])
    np.testing.assert_allclose(np.asarray(protos[c]), expected, rtol=1e-5, atol=1e-6)
  assert np.asarray(present).tolist() == [bool((labels == c).any()) for c in range(4)]


@pytest.mark.parametrize("compat", [False, True])
def test_fedtgp_uploads_the_trained_model_or_with_compat_the_one_before(compat):
  """The paper uploads the prototypes of the model the round trained; HtFLlib's
  ``clientTGP.train`` collects them from the model saved before the round (compat)."""
  data = _toy()
  alg = _alg("FedTGP", data, lr=0.5, server_epochs=1, pfllib_compat=compat)
  server, clients = alg.init(rng.root_key(0), jnp.asarray(data.x[0]), data.num_clients)
  one = jax.tree.map(lambda a: a[2], clients)
  cd = _client(data, 2)
  new_state, upload, _ = alg.client_update(server, one, cd, jax.random.PRNGKey(3))
  before, _ = alg.local_prototypes(one["params"], cd, 4)
  after, _ = alg.local_prototypes(new_state["params"], cd, 4)
  assert float(jnp.abs(after - before).max()) > 1e-2  # the round moved the features
  np.testing.assert_allclose(np.asarray(upload["protos"]),
                             np.asarray(before if compat else after), rtol=1e-6, atol=1e-6)
  assert bool(upload["present"].all())


def test_fedtgp_server_ignores_dropped_uploads_and_trains_the_prototypes():
  data = _toy()
  alg = _alg("FedTGP", data, server_epochs=3)
  server, _ = alg.init(rng.root_key(0), jnp.asarray(data.x[0]), data.num_clients)
  r = np.random.default_rng(2)
  protos = jnp.asarray(r.normal(size=(3, 4, 8)), jnp.float32)
  present = jnp.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 1, 1]], bool)
  key = jax.random.PRNGKey(5)
  kept = alg.server_update(server, {"protos": protos[:2], "present": present[:2]},
                           jnp.array([3.0, 4.0]), key)
  garbage = protos.at[2].set(1e6)
  with_dropped = alg.server_update(server, {"protos": garbage, "present": present},
                                   jnp.array([3.0, 4.0, 0.0]), key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               kept, with_dropped)
  assert bool(kept["present"].all())
  tgp = alg.tgp(4, 8)
  np.testing.assert_allclose(np.asarray(kept["protos"]),
                             np.asarray(tgp.apply({"params": kept["tgp"]})), rtol=1e-6)
  assert not np.allclose(np.asarray(kept["tgp"]["embedding"]),
                         np.asarray(server["tgp"]["embedding"]))
  # the margin of the round: centres of classes 0..2 from clients 0 and 1
  centres, has = proto_lib.mean_of_uploads(protos[:2], present[:2])
  assert float(kept["margin"]) == pytest.approx(
      np_margin(np.asarray(centres), np.asarray(has), 100.0), rel=1e-5)


def test_fedtgp_server_steps_per_epoch_follow_the_number_of_pairs():
  """ceil(n / B) SGD steps per epoch over the n uploaded pairs: with one pair and B = 3 one
  step per epoch, so two epochs are two plain SGD steps on that pair's ACL loss."""
  data = _toy()
  alg = _alg("FedTGP", data, lr=0.5, server_epochs=2)
  server, _ = alg.init(rng.root_key(0), jnp.asarray(data.x[0]), data.num_clients)
  point = jnp.ones((1, 8))
  upload = {"protos": jnp.zeros((1, 4, 8)).at[0, 1].set(point[0]),
            "present": jnp.array([[False, True, False, False]])}
  out = alg.server_update(server, upload, jnp.array([1.0]), jax.random.PRNGKey(0))
  tgp = alg.tgp(4, 8)
  params = server["tgp"]
  loss = lambda p: tgp_lib.acl_loss(point, jnp.array([1]), tgp.apply({"params": p}),
                                    100.0, jnp.ones(1))
  for _ in range(2):
    params = jax.tree.map(lambda p, g: p - 0.5 * g, params, jax.grad(loss)(params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               out["tgp"], params)
  assert float(out["margin"]) == 100.0  # one class present: tau


# ---------------------------------------------------------------- communication
def _traffic(name, data, num_rounds=2, jr=1.0, cdr=0.0):
  alg = _alg(name, data, **({"server_epochs": 1} if name in ("FedTGP", "FedGH") else {}))
  eng = engine_lib.Engine(alg, engine_lib.DeviceData.from_federated(data),
                          engine_lib.Participation(data.num_clients, jr, False, cdr),
                          executor="vmap")
  root = rng.root_key(0)
  server, clients = eng.init(root, data.x[0])
  out = []
  for r in range(num_rounds):
    server, clients, metrics = eng.run_round(server, clients, root, r)
    out.append({k: float(metrics[k]) for k in ("upload_floats", "download_floats",
                                               "upload_bytes", "download_bytes")})
  return out


def test_traffic_follows_the_reference_formulas():
  """Reference §6 per client: LG-FedAvg 512C + C up and down (here d = 8: 8C + C), FedProto
  and FedTGP C_i·d up and C·d down (nothing down before the first aggregation), FedAvg the
  whole model (as FML's shared model), Local nothing."""
  data = _toy()  # C = 4; clients hold 2, 2, 4 and 1 classes: sum C_i = 9
  n, c, d = data.num_clients, 4, 8
  sum_ci = 2 + 2 + 4 + 1
  lg = _traffic("LG-FedAvg", data)
  assert lg[0]["upload_floats"] == n * (d * c + c)
  assert lg[0]["download_floats"] == n * (d * c + c)
  assert lg[0]["upload_bytes"] == 4 * lg[0]["upload_floats"]
  for name in ("FedProto", "FedTGP"):
    t = _traffic(name, data)
    assert t[0]["upload_floats"] == sum_ci * d, name
    assert t[0]["download_floats"] == 0, name          # no prototypes yet
    # FedProto: the classes some client uploaded (all 4 here); FedTGP: all C
    assert t[1]["download_floats"] == n * c * d, name
    assert t[1]["download_bytes"] == 4 * n * c * d, name
  avg = _traffic("FedAvg", data)
  alg = _alg("FedAvg", data)
  from fedjax_lib.models import count_params  # pylint: disable=import-outside-toplevel
  size = count_params(alg.init_params(jax.random.PRNGKey(0), jnp.asarray(data.x[0])))
  assert avg[0]["upload_floats"] == n * size and avg[0]["download_floats"] == n * size
  assert _traffic("Local", data)[0] == {"upload_floats": 0.0, "download_floats": 0.0,
                                        "upload_bytes": 0.0, "download_bytes": 0.0}


def test_traffic_counts_only_aggregated_uploads():
  """With client drop-outs only the kept clients' uploads count; every client downloads."""
  data = _toy()
  full = _traffic("LG-FedAvg", data, num_rounds=1)[0]
  dropped = _traffic("LG-FedAvg", data, num_rounds=1, cdr=0.5)[0]
  per_client = full["upload_floats"] / data.num_clients
  assert dropped["upload_floats"] == 2 * per_client
  assert dropped["download_floats"] == full["download_floats"]
