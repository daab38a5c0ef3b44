"""FML and FedMRL: losses, gradients and the fused forward pass against numpy, the uniform
server mean, traffic, the projector's persistence, learning on digits and the HtFL
conformance suite."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lib.algorithms import fedmrl, fml  # importing them registers FML and FedMRL
from fedjax_lib.algorithms.base import SettingsContext, tree_traffic
from fedjax_lib.algorithms.registry import make_algorithm
from fedjax_lib.config import Config
from fedjax_lib.core.local import ClientData, LocalSpec, clip_each, kl_div_mean
from fedjax_lib.errors import ConfigError
from fedjax_lib.models import make_model
from fedjax_lib.runner import run_experiment
from tests.test_engine import _small_data

QUIET = dict(log=lambda msg: None)
SPEC = LocalSpec(learning_rate=0.1, batch_size=4, local_epochs=1, steps_per_epoch=3, unroll=1)


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _logits(seed=0, b=5, c=4):
  r = np.random.default_rng(seed)
  return (r.normal(size=(b, c)).astype(np.float32), r.normal(size=(b, c)).astype(np.float32),
          r.integers(0, c, b))


def _client_data(data, client=0):
  return ClientData(jnp.asarray(data.x), jnp.asarray(data.y), jnp.asarray(data.train_idx[client]),
                    jnp.asarray(data.train_count[client]))


# ---------------------------------------------------------------------------- FML's losses
def test_kl_div_mean_divides_by_rows_times_classes():
  """PyTorch's nn.KLDivLoss() (reduction 'mean'): the sum over the valid rows / (rows·C)."""
  out, out_g, _ = _logits()
  log_input = np.log(_softmax(out))
  target = _softmax(out_g)
  mask = np.array([1, 1, 0, 1, 1], np.float32)
  expected = (target * (np.log(target) - log_input)).sum(-1)[mask > 0].sum() / (4 * 4)
  got = kl_div_mean(jnp.asarray(log_input), jnp.asarray(np.log(target)), jnp.asarray(mask))
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_mutual_learning_loss_matches_numpy():
  out, out_g, y = _logits(1)
  alpha, beta = 0.3, 0.6
  p, q = _softmax(out), _softmax(out_g)
  ce = lambda pr: -np.log(pr[np.arange(len(y)), y]).mean()
  kl = lambda a, b: (a * (np.log(a) - np.log(b))).sum() / a.size  # KL(a || b), mean over B·C
  expected = (alpha * ce(p) + (1 - alpha) * kl(q, p)) + (beta * ce(q) + (1 - beta) * kl(p, q))
  for detach in (True, False):
    got = fml.mutual_learning_loss(out, out_g, y, jnp.ones(len(y)), alpha, beta, detach)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("detach", [True, False])
def test_mutual_learning_gradients_route_as_documented(detach):
  """Detached: each model's logits get only their own loss's gradient (independent of the
  peer's weight); HtFLlib's (not detached): plus the gradient of the peer's KL term."""
  out, out_g, y = _logits(2)
  alpha, beta = 0.3, 0.6
  b, c = out.shape
  p, q = _softmax(out), _softmax(out_g)
  onehot = np.eye(c)[y]
  g_out = alpha * (p - onehot) / b + (1 - alpha) * (p - q) / (b * c)
  g_out_g = beta * (q - onehot) / b + (1 - beta) * (q - p) / (b * c)
  if not detach:  # d/dz of KL(softmax(z) || t) with t fixed: p ⊙ (log p − log t − KL_row)
    kl_pq = (p * (np.log(p) - np.log(q))).sum(-1, keepdims=True)
    kl_qp = (q * (np.log(q) - np.log(p))).sum(-1, keepdims=True)
    g_out += (1 - beta) * p * (np.log(p) - np.log(q) - kl_pq) / (b * c)
    g_out_g += (1 - alpha) * q * (np.log(q) - np.log(p) - kl_qp) / (b * c)
  grads = jax.grad(lambda o, og: fml.mutual_learning_loss(o, og, y, jnp.ones(b), alpha, beta,
                                                          detach), argnums=(0, 1))(out, out_g)
  np.testing.assert_allclose(grads[0], g_out, atol=1e-6)
  np.testing.assert_allclose(grads[1], g_out_g, atol=1e-6)


def test_each_model_is_clipped_to_norm_ten_separately():
  """HtFLlib clips each model's gradient (not their joint one) to norm 10, then SGD."""
  tx = clip_each(dict.fromkeys(("private", "shared"), optax.sgd(0.5)), fml.CLIP_NORM)
  params = {"private": {"w": jnp.zeros(4)}, "shared": {"w": jnp.zeros(3)}}
  grads = {"private": {"w": jnp.asarray([30.0, 40.0, 0.0, 0.0])},
           "shared": {"w": jnp.asarray([1.0, 2.0, 2.0])}}
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["private"]["w"], -0.5 * np.array([6.0, 8.0, 0, 0]),
                             rtol=1e-6)
  np.testing.assert_allclose(updates["shared"]["w"], -0.5 * np.array([1.0, 2.0, 2.0]),
                             rtol=1e-6)


def _fml(data, **params):
  model = make_model("dnn", data.sample_shape, data.num_classes, hidden_dim=8)
  spec = dataclasses.replace(SPEC, steps_per_epoch=int(data.train_count.max()) // 4)
  return make_algorithm("FML", model, spec, params)


def test_fml_client_update_detaching_matters_only_with_kl_terms():
  """With α = β = 1 (no KL) HtFLlib's and the detached update agree; with α = β = 0.5
  they differ, and each changes both models and keeps the private one on the client."""
  data = _small_data(num_clients=2, seed=3)
  key = jax.random.key(1)
  out = {}
  for weights in ((1.0, 1.0), (0.5, 0.5)):
    for compat in (False, True):
      alg = _fml(data, alpha=weights[0], beta=weights[1], pfllib_compat=compat)
      server, clients = alg.init(jax.random.key(0), jnp.asarray(data.x[0]), 2)
      client = jax.tree.map(lambda a: a[0], clients)
      new_client, upload, stats = alg.client_update(server, client, _client_data(data), key)
      assert np.isfinite(float(stats["loss"]))
      out[weights, compat] = (new_client, upload)
  same = lambda a, b: all(jax.tree.leaves(jax.tree.map(np.allclose, a, b)))
  assert same(out[(1.0, 1.0), False], out[(1.0, 1.0), True])
  assert not same(out[(0.5, 0.5), False][1], out[(0.5, 0.5), True][1])
  assert not same(out[(0.5, 0.5), False][0], out[(0.5, 0.5), True][0])
  assert not same(server["shared"], out[(0.5, 0.5), False][1])
  assert not same(client["private"], out[(0.5, 0.5), False][0]["private"])


# ---------------------------------------------------------------------------- the server
@pytest.mark.parametrize("name", ["FML", "FedMRL"])
def test_server_takes_the_uniform_mean_of_the_clients_that_trained(name):
  """HtFLlib averages the shared models with 1/#uploads, not by sample counts; a round
  without uploads keeps the shared model."""
  r = np.random.default_rng(0)
  server = {"shared": {"w": r.normal(size=(3, 2)).astype(np.float32)}}
  uploads = {"w": r.normal(size=(4, 3, 2)).astype(np.float32)}
  weights = jnp.asarray([30.0, 0.0, 5.0, 1.0])
  alg = _fml(_small_data(num_clients=2)) if name == "FML" else _fedmrl(_small_data(2))
  new = alg.server_update(server, uploads, weights, jax.random.key(0))
  np.testing.assert_allclose(new["shared"]["w"], uploads["w"][[0, 2, 3]].mean(0), rtol=1e-6)
  same = alg.server_update(server, uploads, jnp.zeros(4), jax.random.key(0))
  np.testing.assert_array_equal(same["shared"]["w"], server["shared"]["w"])


@pytest.mark.parametrize("name,floats", [("FML", 878_538), ("FedMRL", 874_698)])
def test_traffic_is_the_whole_shared_model_up_and_down(name, floats):
  """FedAvgCNN on 32×32×3, C = 10: 878,538 parameters (HtFLlib's count); FedMRL's pools the
  512 features to 128 for a Linear(128, 10) head: 874,698."""
  model = make_model("cnn", (32, 32, 3), 10)
  alg = make_algorithm(name, model, SPEC)
  x = jnp.zeros((16, 32, 32, 3))
  server, clients = jax.eval_shape(lambda: alg.init(jax.random.key(0), x[0], 2))
  client = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), clients)
  data = ClientData(x, jnp.zeros(16, jnp.int32), jnp.arange(12), jnp.int32(12))
  upload = jax.eval_shape(alg.client_update, server, client, data, jax.random.key(0))[1]
  for traffic in (alg.upload_traffic(upload), alg.download_traffic(server)):
    assert float(traffic.floats) == floats and float(traffic.bytes) == 4 * floats
  assert float(tree_traffic(server).floats) == floats


# ---------------------------------------------------------------------------- FedMRL
def _fedmrl(data, **params):
  model = make_model("dnn", data.sample_shape, data.num_classes, hidden_dim=8)
  spec = dataclasses.replace(SPEC, steps_per_epoch=int(data.train_count.max()) // 4)
  return make_algorithm("FedMRL", model, spec, {"sub_feature_dim": 4, **params})


def test_fedmrl_forward_matches_numpy():
  """r = [f_g(x), f(x)] W + b; out = h(r); out_g = h_g(r[:, :s]); predict = out."""
  data = _small_data(num_clients=2, seed=4)
  alg = _fedmrl(data)
  server, clients = alg.init(jax.random.key(0), jnp.asarray(data.x[0]), 2)
  client = jax.tree.map(lambda a: a[0], clients)
  x = jnp.asarray(data.x[:7])
  private = client["private"]
  shared = {"params": server["shared"]}
  f = np.asarray(alg.model.apply(private, x, method="features"))
  f_g = np.asarray(alg.shared_model.apply(shared, x, method="features"))
  assert f.shape == (7, 8) and f_g.shape == (7, 4)
  proj = client["projector"]
  assert proj["kernel"].shape == (12, 8)
  r = np.concatenate([f_g, f], 1) @ np.asarray(proj["kernel"]) + np.asarray(proj["bias"])
  head, head_g = private["params"]["head"], server["shared"]["head"]
  out = r @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
  out_g = r[:, :4] @ np.asarray(head_g["kernel"]) + np.asarray(head_g["bias"])
  params = {"private": private["params"], "shared": server["shared"], "projector": proj}
  (got, got_g), _ = alg.forward(params, ({}, {}), x)
  np.testing.assert_allclose(got, out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_g, out_g, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(alg.predict(server, client, x), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compat", [False, True])
def test_fedmrl_projector_persists_unless_compat(compat):
  """The trained projector is kept (the paper); HtFLlib's never-saved proj stays at its
  initial value; both train the private and the shared model."""
  data = _small_data(num_clients=2, seed=5)
  alg = _fedmrl(data, pfllib_compat=compat)
  server, clients = alg.init(jax.random.key(0), jnp.asarray(data.x[0]), 2)
  client = jax.tree.map(lambda a: a[0], clients)
  new, upload, stats = alg.client_update(server, client, _client_data(data), jax.random.key(1))
  assert np.isfinite(float(stats["loss"])) and int(stats["steps"]) > 0
  kept = jax.tree.map(np.array_equal, new["projector"], client["projector"])
  assert all(jax.tree.leaves(kept)) == compat
  for a, b in ((upload, server["shared"]), (new["private"], client["private"])):
    assert not all(jax.tree.leaves(jax.tree.map(np.allclose, a, b)))


@pytest.mark.parametrize("compat", [False, True])
def test_fedmrl_shared_running_statistics_kept_unless_compat(compat):
  """A shared model with BatchNorm: the client keeps the running statistics its training
  updated and evaluates with them; HtFLlib evaluates the server's shared model, whose
  statistics stay the initial ones (its server averages parameters only). Training uses batch
  statistics either way: the same loss."""
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(12, 8, 8, 3)).astype(np.float32), rng.integers(0, 3, 12)
  data = ClientData(jnp.asarray(x), jnp.asarray(y), jnp.arange(12), jnp.asarray(12))
  model = make_model("resnet4", (8, 8, 3), 3, feature_dim=8)
  losses = []
  for mode in (compat, not compat):
    alg = make_algorithm("FedMRL", model, SPEC, {"sub_feature_dim": 4, "pfllib_compat": mode})
    server, clients = alg.init(jax.random.key(0), jnp.asarray(x[0]), 2)
    client = jax.tree.map(lambda a: a[0], clients)
    new, _, stats = alg.client_update(server, client, data, jax.random.key(1))
    losses.append(float(stats["loss"]))
    if mode == compat:
      kept = jax.tree.leaves(jax.tree.map(np.array_equal, new["shared_state"],
                                          client["shared_state"]))
      assert all(kept) == compat
      initial = alg.predict(server, dict(new, shared_state=client["shared_state"]), x[:5])
      assert np.array_equal(alg.predict(server, new, x[:5]), initial) == compat
  assert losses[0] == losses[1]


# ---------------------------------------------------------------------------- settings
@pytest.mark.parametrize("name,params,match", [
    ("FML", {"alpha": 1.5}, r"alpha=1.5 must be a number in \[0.0, 1.0\]"),
    ("FML", {"beta": float("nan")}, r"beta=nan must be"),
    ("FML", {"pfllib_compat": "yes"}, r"pfllib_compat='yes' must be true or false"),
    ("FedMRL", {"sub_feature_dim": 0}, r"sub_feature_dim=0 must be an integer in \[1, 65536\]"),
    ("FedMRL", {"sub_feature_dim": 2.5}, r"must be"),
    ("FML", {"shared_model": None}, r"does not take hyperparameter\(s\) shared_model"),
])
def test_bad_hyperparameters_are_one_line_errors(name, params, match):
  model = make_model("dnn", (12,), 3)
  with pytest.raises(ConfigError, match=match) as err:
    make_algorithm(name, model, SPEC, params)
  assert "\n" not in str(err.value)


def test_settings_refuse_shapes_that_cannot_work():
  """FedMRL: s above the private feature width; FML: a shared model of other classes."""
  x = np.zeros((12,), np.float32)
  context = SettingsContext("dnn", x, np.array([20, 30]))
  model = make_model("dnn", (12,), 3)  # 100 features
  with pytest.raises(ConfigError, match=r"sub_feature_dim=128 exceeds the feature width 100 "
                     r"of model 'dnn'; use -sfd <= 100"):
    make_algorithm("FedMRL", model, SPEC).check_settings(context)
  with pytest.raises(ConfigError, match="exceeds the feature width 100"):
    make_algorithm("FedMRL", model, SPEC).init(jax.random.key(0), jnp.asarray(x), 2)
  assert make_algorithm("FedMRL", model, SPEC, {"sub_feature_dim": 100}).check_settings(
      context) == []
  alg = dataclasses.replace(make_algorithm("FML", model, SPEC),
                            shared_model=make_model("dnn", (12,), 4))
  with pytest.raises(ConfigError, match="shared model has 4 outputs but model 'dnn' has 3"):
    alg.check_settings(context)


def test_groups_share_the_model_the_algorithm_was_made_with():
  """dataclasses.replace(algorithm, model=...) (the runner's groups) keeps the shared model."""
  cnn, dnn = (make_model(n, (28, 28, 1), 10, feature_dim=512) for n in ("cnn", "dnn"))
  for name in ("FML", "FedMRL"):
    alg = make_algorithm(name, cnn, SPEC)
    other = dataclasses.replace(alg, model=dnn)
    assert other.shared_model is alg.shared_model and other.model is dnn
  assert make_algorithm("FML", cnn, SPEC).shared_model is cnn
  mrl = make_algorithm("FedMRL", cnn, SPEC)
  assert isinstance(mrl, fedmrl.FedMRL) and mrl.shared_model.feature_dim == 128


# ---------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("algorithm,params,bar", [
    ("FML", {"alpha": 0.5, "beta": 0.5}, 0.85),
    ("FedMRL", {}, 0.85),
])
@pytest.mark.xla_optimized  # runs long enough to repay it: tests/conftest.py
def test_two_architectures_learn_on_digits(algorithm, params, bar, tmp_path):
  """CNN and DNN clients on the bundled digits (10 clients, Dir(0.1), lr 0.05, 5 rounds;
  the shared model is architecture 0's, the CNN).

  Measured (round 0 → round 5) over seeds 0/1 (2026-12-01, x86_64 CPU): FML (α = β = 0.5)
  .090/.128 → .927/.929 (pfllib_compat, seed 0: .927); FedMRL (s = 128) .141/.066 →
  .932/.918 (pfllib_compat, seed 0: .927); the bar sits below the smaller. Since 2026-12-04
  ``--pfllib-compat`` also gives the DNN clients HtFLlib's log-softmax features: FML .740,
  and FedMRL's DNN clients turn non-finite in round 0 (seed 0)."""
  res = run_experiment(Config(model="cnn,dnn", algorithm=algorithm, num_clients=10,
                              learning_rate=0.05, global_rounds=5, eval_gap=5,
                              algo_params=params, out=str(tmp_path), progress=False), **QUIET)
  acc = res.runs[0].history["test_acc"]
  assert acc[0] < 0.3 and acc[-1] >= bar, acc


@pytest.mark.parametrize("name", ["FML", "FedKD", "FedMRL"])
def test_htc_families_share_fedavgcnn_as_htfllib_does(name):
  """HtFLlib's HtC families name their own global model, FedAvgCNN with the family's first
  head (Head([512]): ReLU on the logits) for FML and FedKD; FedMRL, whose shared head reads -sfd
  features (HtFLlib crashes there), gives it its dense head. The other families and model
  lists share architecture 0 (reference §1.4)."""
  import types  # pylint: disable=import-outside-toplevel
  from fedjax_lib.runner import make_algorithm as runner_algorithm  # pylint: disable=import-outside-toplevel
  data = types.SimpleNamespace(train_count=np.array([40]), sample_shape=(32, 32, 3),
                               num_classes=10)
  resnet = make_model("resnet34+head512-256", (32, 32, 3), 10, feature_dim=512)
  alg = runner_algorithm(Config(algorithm=name, model="Res34-HtC-img-4"), data, resnet)
  assert alg.model is resnet
  assert type(alg.shared_model.base).__name__ == "FedAvgCNNBase"
  head = "cnn" if name == "FedMRL" else "cnn+head512"
  assert alg.shared_model.head == make_model(head, (32, 32, 3), 10).head
  assert (type(alg.shared_model.head).__name__ == "TorchDense") == (name == "FedMRL")
  assert dataclasses.replace(alg, model=make_model("cnn", (32, 32, 3), 10)).shared_model \
      is alg.shared_model  # every architecture group keeps it
  alg = runner_algorithm(Config(algorithm=name, model="resnet34,cnn"), data, resnet)
  assert type(alg.shared_model.base).__name__ == "ResNetBase"
