"""Per-FedAvg, FedBABU and FedRoD: their distinctive pieces against hand-derived references."""

import json

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lib import Config, run_experiment
from fedjax_lib.algorithms import make_algorithm
from fedjax_lib.algorithms.fedrod import balanced_softmax_loss, class_counts
from fedjax_lib.algorithms.perfedavg import adaptation_batch, first_order_maml_loss
from fedjax_lib.algorithms.split import split_parts
from fedjax_lib.core import rng
from fedjax_lib.core.local import Batch, ClientData, LocalSpec
from fedjax_lib.errors import ConfigError
from fedjax_lib.models import make_model
from tests.test_engine import _engine, _small_data


def _client(eng, cid=0):
  d = eng.data
  return ClientData(d.x, d.y, d.train_idx[cid], d.train_count[cid])


# ----------------------------------------------------------------------------- Per-FedAvg
def test_first_order_maml_gradient_matches_hand_derivation():
  r = np.random.default_rng(0)
  w = r.normal(size=3).astype(np.float32)
  x = r.normal(size=(8, 3)).astype(np.float32)
  y = r.normal(size=8).astype(np.float32)
  alpha = 0.3

  def sq_loss(params, batch, key):
    del key
    err = batch.x @ params - batch.y
    return 0.5 * jnp.sum(batch.mask * err ** 2) / batch.mask.sum()

  batch = Batch(jnp.asarray(x), jnp.asarray(y), jnp.ones(8))
  loss = first_order_maml_loss(sq_loss, alpha)
  value, grad = jax.value_and_grad(loss)(jnp.asarray(w), batch, jax.random.key(0))
  x1, y1, x2, y2 = x[:4], y[:4], x[4:], y[4:]
  g1 = x1.T @ (x1 @ w - y1) / 4
  w_adapted = w - alpha * g1
  g2 = x2.T @ (x2 @ w_adapted - y2) / 4  # first order: the gradient at w', no Hessian term
  np.testing.assert_allclose(grad, g2, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(value, 0.5 * np.mean((x2 @ w_adapted - y2) ** 2), rtol=1e-5)


def test_peravg_meta_spec_and_beta():
  data = _small_data()
  eng = _engine("PerAvg", "vmap", data)
  spec = eng.algorithm.meta_spec()
  local = eng.algorithm.local
  assert (spec.batch_size, spec.steps_per_epoch, spec.local_epochs) == (
      2 * local.batch_size, local.steps_per_epoch // 2, 2 * local.local_epochs)
  assert eng.algorithm.meta_step == local.learning_rate
  # A vanishing β leaves the upload at the received model: β is the meta step.
  tiny = _engine("PerAvg", "vmap", data, params={"beta": 1e-12})
  server, clients = tiny.init(rng.root_key(0), data.x[0])
  _, upload, _ = tiny.algorithm.client_update(server, {}, _client(tiny), jax.random.key(1))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-9), upload,
               server["params"])


def test_peravg_evaluates_after_one_adaptation_step():
  data = _small_data()
  eng = _engine("PerAvg", "vmap", data)
  algo = eng.algorithm
  server, clients = eng.init(rng.root_key(0), data.x[0])
  client, key = _client(eng, 2), jax.random.key(5)
  batch = adaptation_batch(client, key, algo.local.batch_size)
  rows = np.asarray(data.train_idx[2])[: int(data.train_count[2])]
  assert batch.mask.sum() == algo.local.batch_size
  # The batch is distinct training samples of this client.
  xs = np.asarray(batch.x)
  matches = [np.flatnonzero((np.asarray(data.x)[rows] == row).all(1)) for row in xs]
  assert all(len(m) == 1 for m in matches) and len({int(m[0]) for m in matches}) == len(xs)
  grads = jax.grad(algo.ce_loss)(server["params"], batch, key)
  adapted = jax.tree.map(lambda p, g: p - algo.local.learning_rate * g, server["params"], grads)
  views = algo.eval_views(server, {}, client, key)
  assert list(views) == ["personal", "global"]
  np.testing.assert_allclose(views["personal"](data.x[:5]), algo.model.apply(adapted, data.x[:5]),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(views["global"](data.x[:5]),
                             algo.model.apply(server["params"], data.x[:5]), rtol=1e-6)


def test_peravg_needs_two_batches():
  data = _small_data()
  model = make_model("dnn", data.sample_shape, data.num_classes)
  with pytest.raises(ConfigError, match="2\\*batch_size"):
    make_algorithm("PerAvg", model, LocalSpec(batch_size=20, steps_per_epoch=1))
  with pytest.raises(ConfigError, match="beta"):
    make_algorithm("PerAvg", model, LocalSpec(steps_per_epoch=4), {"beta": -1.0})


# ----------------------------------------------------------------------------- FedBABU
def test_fedbabu_head_stays_at_init_and_fine_tunes_at_the_end():
  data = _small_data()
  eng = _engine("FedBABU", "vmap", data, params={"fine_tuning_epochs": 2})
  root = rng.root_key(0)
  server0, clients = eng.init(root, data.x[0])
  server0 = jax.tree.map(np.asarray, server0)
  server, clients = eng.init(root, data.x[0])
  for r in range(2):
    server, clients, _ = eng.run_round(server, clients, root, r)
  jax.tree.map(np.testing.assert_array_equal, server["head"], server0["head"])
  assert not np.allclose(jax.tree.leaves(server["base"])[0], jax.tree.leaves(server0["base"])[0])
  algo = eng.algorithm
  tuned = algo.fine_tune(server, {}, _client(eng), jax.random.key(0))
  assert not np.allclose(split_parts(tuned)["head"]["kernel"], server["head"]["kernel"])
  final = eng.evaluate(server, clients, root, 2, final=True)
  regular = eng.evaluate(server, clients, root, 2)
  assert final["train_loss"] < regular["train_loss"]
  # Without fine-tuning epochs the final view is the regular model.
  none = _engine("FedBABU", "vmap", data, params={"fine_tuning_epochs": 0})
  assert none.evaluate(server, clients, root, 2, final=True)["test_acc"] == pytest.approx(
      regular["test_acc"])
  # Algorithms without a final step report none.
  assert _engine("FedAvg", "vmap", data).evaluate(server, clients, final=True) is None


# ----------------------------------------------------------------------------- FedRoD
def test_balanced_softmax_loss_matches_numpy():
  r = np.random.default_rng(1)
  logits = r.normal(size=(6, 4)).astype(np.float32)
  labels = np.array([0, 1, 1, 3, 0, 3])
  counts = np.array([5.0, 2.0, 0.0, 7.0], np.float32)  # class 2 absent: −inf logit
  mask = np.array([1, 1, 1, 1, 1, 0], np.float32)
  got = balanced_softmax_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask),
                              jnp.asarray(counts))
  z = logits[:, [0, 1, 3]] + np.log(counts[[0, 1, 3]])
  log_probs = z - np.log(np.exp(z).sum(1, keepdims=True))
  column = {0: 0, 1: 1, 3: 2}
  want = -np.mean([log_probs[i, column[labels[i]]] for i in range(5)])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  grad = jax.grad(balanced_softmax_loss)(jnp.asarray(logits), jnp.asarray(labels),
                                         jnp.asarray(mask), jnp.asarray(counts))
  assert np.isfinite(np.asarray(grad)).all() and np.all(np.asarray(grad)[:, 2] == 0)


def test_fedrod_gradients_are_separated_and_predict_adds_heads():
  data = _small_data()
  eng = _engine("FedROD", "vmap", data)
  algo = eng.algorithm
  server, clients = eng.init(rng.root_key(0), data.x[0])
  client = _client(eng, 1)
  counts = class_counts(client, data.num_classes)
  labels = np.asarray(data.y)[np.asarray(data.train_idx[1])[: int(data.train_count[1])]]
  np.testing.assert_array_equal(counts, np.bincount(labels, minlength=data.num_classes))
  head = jax.tree.map(lambda a: a[1] + 0.1, clients["model"]["head"])  # a personal head != generic
  batch = Batch(data.x[:8], data.y[:8], jnp.ones(8))
  grads = jax.grad(algo.fedrod_loss(counts))({"params": server["params"], "head": head}, batch,
                                             None)

  def generic_only(params):
    return balanced_softmax_loss(algo.model.apply(params, batch.x), batch.y, batch.mask, counts)

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               grads["params"], jax.grad(generic_only)(server["params"]))

  def personal_only(h):
    rep = algo.model.apply(server["params"], batch.x, method="features")
    out_g = algo.model.apply(server["params"], rep, method="classify")
    out_p = algo.model.apply({"params": {"head": h}}, rep, method="classify")
    return optax.softmax_cross_entropy_with_integer_labels(out_g + out_p, batch.y).mean()

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               grads["head"], jax.grad(personal_only)(head))
  state = {"head": head}
  x = data.x[:5]
  rep = algo.model.apply(server["params"], x, method="features")
  want = (algo.model.apply(server["params"], x)
          + algo.model.apply({"params": {"head": head}}, rep, method="classify"))
  np.testing.assert_allclose(algo.predict(server, state, x), want, rtol=1e-6)
  views = algo.eval_views(server, state, client, None)
  np.testing.assert_allclose(views["global"](x), algo.model.apply(server["params"], x))


# ----------------------------------------------------------------------------- runner paths
def test_views_final_eval_and_new_clients_in_results(tmp_path):
  results = run_experiment(Config(algorithm="FedBABU", model="dnn", learning_rate=0.05,
                                  global_rounds=1, num_new_clients=2, fine_tuning_epoch_new=1,
                                  algo_params={"fine_tuning_epochs": 1}, out=str(tmp_path),
                                  progress=False), log=lambda m: None)
  run = results.runs[0]
  assert run.history["rounds"] == [0, 1, 1]  # the fine-tuned evaluation is appended
  payload = json.load(open(run.files["json"]))
  assert payload["final_eval"]["test_acc"] == run.history["test_acc"][-1]
  assert payload["new_clients"]["test_acc"] > 0.2

  results = run_experiment(Config(algorithm="Ditto", model="dnn", learning_rate=0.05,
                                  global_rounds=1, out=str(tmp_path), progress=False),
                           log=lambda m: None)
  history = results.runs[0].history
  assert history["test_acc_personal"] == history["test_acc"]
  assert len(history["test_acc_global"]) == 2
  with h5py.File(results.runs[0].files["h5"]) as f:
    np.testing.assert_allclose(f["rs_test_acc_global"][:], history["test_acc_global"])


def test_new_clients_need_training_clients(tmp_path):
  with pytest.raises(ConfigError, match="num_new_clients"):
    run_experiment(Config(num_new_clients=-1, out=str(tmp_path)), log=lambda m: None)
