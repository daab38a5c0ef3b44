"""FedDBE: PRBM shift, running mean, mean regularization, warm-up, persistence, validation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lib.algorithms import get_algorithm, make_algorithm
from fedjax_lib.algorithms.base import has_warmup
from fedjax_lib.algorithms.dbe import (FedDBE, batch_feature_mean, dbe_loss, ema_update,
                                       mean_regularization)
from fedjax_lib.core import engine as engine_lib
from fedjax_lib.core import rng
from fedjax_lib.core.local import Batch, ClientData, LocalSpec, masked_cross_entropy
from fedjax_lib.errors import ConfigError
from fedjax_lib.models import make_model
from fedjax_lib.models.base import BaseHeadModel
from tests.test_engine import _small_data

CLOSE = dict(rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- helpers
def _engine(data, executor="vmap", params=None, jr=1.0, cdr=0.0):
  m = make_model("dnn", data.sample_shape, data.num_classes)
  spec = LocalSpec(learning_rate=0.1, batch_size=4, local_epochs=2,
                   steps_per_epoch=int(data.train_count.max()) // 4, unroll=1)
  return engine_lib.Engine(make_algorithm("FedDBE", m, spec, params),
                           engine_lib.DeviceData.from_federated(data),
                           engine_lib.Participation(data.num_clients, jr, False, cdr),
                           executor=executor, chunk_size=2, eval_chunk_size=4)


def _client(eng, cid):
  d = eng.data
  return ClientData(d.x, d.y, d.train_idx[cid], d.train_count[cid])


def _np(tree):
  return jax.tree.map(np.asarray, tree)


def _linear_problem(seed=0, n=6, d_in=4, dim=3, classes=3):
  """A linear base (Dense) and a linear head, with perturbed parameters, on full-batch data."""
  r = np.random.default_rng(seed)
  x = r.normal(size=(n, d_in)).astype(np.float32)
  y = r.integers(0, classes, n)
  model = BaseHeadModel(base=nn.Dense(dim), head=nn.Dense(classes))
  params = model.init(jax.random.key(0), x[:1])
  params = jax.tree.map(lambda a: a + 0.3 * r.normal(size=a.shape).astype(np.float32), params)
  # train_idx padded to two batches' width; only the first n rows are the client's.
  data = ClientData(jnp.asarray(x), jnp.asarray(y), jnp.arange(2 * n) % n, jnp.asarray(n))
  return r, x, y, model, params, data


def _np_params(params):
  p = params["params"]
  return [np.float64(p["base"]["kernel"]), np.float64(p["base"]["bias"]),
          np.float64(p["head"]["kernel"]), np.float64(p["head"]["bias"])]


def _np_sgd_steps(x, y, theta, prbm, global_mean, steps, lr, m, klw):
  """Full-batch SGD of a linear base/head on CE(head(rep + prbm)) + klw·MR, by hand.

  ``prbm`` None: the initialisation period (no PRBM, no MR). Returns the final parameters,
  PRBM and running mean (the EMA of the batch means, reset to 0, carried without gradient).
  """
  wb, bb, wh, bh = theta
  n, classes = len(y), wh.shape[1]
  onehot = np.eye(classes)[y]
  rm = np.zeros(wb.shape[1])
  for _ in range(steps):
    rep = x @ wb + bb
    rm = (1 - m) * rm + m * rep.mean(0)  # the carried rm is a constant here
    z = rep if prbm is None else rep + prbm
    logits = z @ wh + bh
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g = (p - onehot) / n
    d_wh, d_bh, d_z = z.T @ g, g.sum(0), g @ wh.T
    d_rep = d_z.copy()
    if prbm is not None:
      # d/d rep_b of klw·mean(½(rm − ḡ)²) with rm = (1−m)·rm_old + m·mean_b(rep_b).
      d_rep += klw * (rm - global_mean) / rm.size * m / n
      prbm = prbm - lr * d_z.sum(0)
    wb, bb = wb - lr * x.T @ d_rep, bb - lr * d_rep.sum(0)
    wh, bh = wh - lr * d_wh, bh - lr * d_bh
  return (wb, bb, wh, bh), prbm, rm


# ---------------------------------------------------------------- registration, validation
def test_registered_names_and_defaults():
  assert get_algorithm("DBE") is get_algorithm("feddbe") is FedDBE
  assert FedDBE.hyperparameters() == {"momentum": 0.1, "kl_weight": 0.0}
  assert has_warmup(FedDBE.__new__(FedDBE))


def test_hyperparameters_are_validated():
  m = make_model("dnn", (4,), 3)
  spec = LocalSpec()
  for bad in (-0.1, 1.5, float("nan"), True):
    with pytest.raises(ConfigError, match="momentum"):
      make_algorithm("FedDBE", m, spec, {"momentum": bad})
  with pytest.raises(ConfigError, match=r"FedDBE .*momentum=2\.0 must be a number in \[0, 1\]"):
    FedDBE(model=m, local=spec, momentum=2.0)
  for bad in (-1.0, float("nan"), float("inf"), False):
    with pytest.raises(ConfigError, match="kl_weight"):
      make_algorithm("FedDBE", m, spec, {"kl_weight": bad})
  with pytest.raises(ConfigError, match="does not take"):
    make_algorithm("FedDBE", m, spec, {"mu": 0.1})
  for ok in ({"momentum": 0.0}, {"momentum": 1, "kl_weight": 50}):
    make_algorithm("FedDBE", m, spec, ok)


# ---------------------------------------------------------------- pure pieces
def test_batch_mean_ema_and_mr_match_numpy():
  r = np.random.default_rng(0)
  rep = r.normal(size=(5, 4)).astype(np.float32)
  mask = np.array([1, 1, 0, 1, 0], np.float32)
  np.testing.assert_allclose(batch_feature_mean(rep, mask), rep[mask > 0].mean(0), **CLOSE)
  np.testing.assert_array_equal(batch_feature_mean(rep, np.zeros(5)), np.zeros(4))

  # EMA over a sequence of batch means, with masked steps that must not update it.
  means = r.normal(size=(6, 4)).astype(np.float32)
  valid = np.array([1, 0, 1, 1, 0, 1], bool)
  m = 0.3

  def scan_step(rm, inputs):
    bm, ok = inputs
    return jnp.where(ok, ema_update(rm, bm, m), rm), None

  got, _ = jax.lax.scan(scan_step, jnp.zeros(4), (means, valid))
  expected = np.zeros(4)
  for bm in means[valid]:
    expected = (1 - m) * expected + m * bm
  np.testing.assert_allclose(got, expected, **CLOSE)
  np.testing.assert_array_equal(ema_update(means[0], means[1], 1.0), means[1])
  np.testing.assert_array_equal(ema_update(means[0], means[1], 0.0), means[0])

  rm, gm = means[0], means[1]
  np.testing.assert_allclose(mean_regularization(rm, gm),
                             np.mean(0.5 * (np.float64(rm) - gm) ** 2), **CLOSE)
  g_rm, g_gm = jax.grad(mean_regularization, argnums=(0, 1))(rm, gm)
  np.testing.assert_allclose(g_rm, (rm - gm) / rm.size, **CLOSE)
  np.testing.assert_array_equal(g_gm, 0.0)  # the global mean is a constant


def test_prbm_shifts_the_head_input_by_exactly_the_bias():
  data = _small_data(num_clients=3)
  eng = _engine(data)
  alg = eng.algorithm
  s, c = alg.init(jax.random.key(0), eng.data.x[0], 3)
  assert c["bias"].shape == (3, 100) and s["global_mean"].shape == (100,)
  x = eng.data.x[:7]
  b = jnp.asarray(np.random.default_rng(0).normal(size=100).astype(np.float32))
  params = s["params"]
  feats = alg.model.apply(params, x, method="features")
  personal = alg.predict(s, {"bias": b}, x)
  np.testing.assert_array_equal(personal,
                                alg.model.apply(params, feats + b, method="classify"))
  # The head is linear, so the PRBM shifts every logit vector by b @ W_head.
  shift = np.asarray(b) @ np.asarray(params["params"]["head"]["kernel"])
  np.testing.assert_allclose(personal - alg.predict_global(s, {"bias": b}, x),
                             np.broadcast_to(shift, personal.shape), rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(alg.predict_global(s, {"bias": b}, x),
                                alg.model.apply(params, x))
  # A zero PRBM is the global model; the views are personal (first) and global.
  np.testing.assert_array_equal(alg.predict(s, {"bias": jnp.zeros(100)}, x),
                                alg.model.apply(params, x))
  views = alg.eval_views(s, {"bias": b}, None, None)
  assert list(views) == ["personal", "global"]
  np.testing.assert_array_equal(views["personal"](x), personal)
  # New clients start from the global model (a zero PRBM).
  assert alg.supports_new_clients
  assert alg.new_client_variables(s, {"bias": jnp.zeros(100)}) is params


def test_mr_value_and_gradient_match_hand_derivation():
  """DNN base relu(x W + b): the MR term's value and gradient, and its absence at klw = 0."""
  r = np.random.default_rng(1)
  n, d_in, dim, m, klw = 5, 6, 100, 0.4, 3.0
  x = r.normal(size=(n, d_in)).astype(np.float32)
  y = r.integers(0, 3, n)
  model = make_model("dnn", (d_in,), 3)
  trainable = {"params": model.init(jax.random.key(0), x[:1]),
               "bias": r.normal(size=dim).astype(np.float32)}
  rm_old = r.normal(size=dim).astype(np.float32)
  gm = r.normal(size=dim).astype(np.float32)
  batch = Batch(jnp.asarray(x), jnp.asarray(y), jnp.ones(n))

  def loss(tr, kl):
    return dbe_loss(model, tr, batch, rm_old, m, gm, kl)

  (l_kl, rm_new), g_kl = jax.value_and_grad(loss, has_aux=True)(trainable, klw)
  (l_0, rm_0), g_0 = jax.value_and_grad(loss, has_aux=True)(trainable, 0.0)

  w = np.float64(trainable["params"]["params"]["base"]["fc1"]["kernel"])
  b = np.float64(trainable["params"]["params"]["base"]["fc1"]["bias"])
  pre = x @ w + b
  rep = np.maximum(pre, 0)
  rm = (1 - m) * rm_old + m * rep.mean(0)
  np.testing.assert_allclose(rm_new, rm, **CLOSE)
  np.testing.assert_array_equal(rm_new, rm_0)  # tracked whatever the weight
  reg = np.mean(0.5 * (rm - gm) ** 2)
  np.testing.assert_allclose(l_kl - l_0, klw * reg, rtol=1e-4)

  # klw = 0: exactly CE(head(rep + b)), with exactly its gradient.
  def ce(tr):
    logits = model.apply(tr["params"],
                         model.apply(tr["params"], batch.x, method="features") + tr["bias"],
                         method="classify")
    return masked_cross_entropy(logits, batch.y, batch.mask)
  ce_value, ce_grad = jax.value_and_grad(ce)(trainable)
  np.testing.assert_array_equal(l_0, ce_value)
  jax.tree.map(np.testing.assert_array_equal, g_0, ce_grad)

  # The MR gradient: d rep_bj = klw·(rm_j − ḡ_j)/D · m/n, through the ReLU into fc1.
  d_rep = np.broadcast_to(klw * (rm - gm) / dim * m / n, (n, dim)) * (pre > 0)
  diff = jax.tree.map(lambda a, z: np.float64(a) - np.float64(z), g_kl, g_0)
  fc1 = diff["params"]["params"]["base"]["fc1"]
  np.testing.assert_allclose(fc1["kernel"], x.T @ d_rep, rtol=1e-3, atol=1e-7)
  np.testing.assert_allclose(fc1["bias"], d_rep.sum(0), rtol=1e-3, atol=1e-7)
  # The head and the PRBM get no MR gradient.
  for leaf in jax.tree.leaves((diff["params"]["params"]["head"], diff["bias"])):
    np.testing.assert_array_equal(leaf, 0.0)
  assert np.abs(x.T @ d_rep).max() > 1e-4  # the check above is not vacuous


# ---------------------------------------------------------------- local training
def test_client_update_matches_hand_derived_sgd():
  """Two valid full-batch steps (two masked ones between/after) of model + PRBM with MR."""
  r, x, y, model, params, data = _linear_problem()
  lr, m, klw = 0.4, 0.3, 5.0
  spec = LocalSpec(learning_rate=lr, batch_size=len(y), local_epochs=2, steps_per_epoch=2,
                   unroll=1)
  alg = make_algorithm("FedDBE", model, spec, {"momentum": m, "kl_weight": klw})
  prbm = r.normal(size=3).astype(np.float32)
  gm = r.normal(size=3).astype(np.float32)
  server = {"params": params, "global_mean": jnp.asarray(gm)}
  new_state, upload, metrics = jax.jit(alg.client_update)(server, {"bias": jnp.asarray(prbm)},
                                                         data, jax.random.key(3))
  assert int(metrics["steps"]) == 2 and set(metrics) == {"loss", "steps"}
  theta, prbm_new, _ = _np_sgd_steps(x, y, _np_params(params), np.float64(prbm), gm, 2, lr, m,
                                     klw)
  for got, want in zip(_np_params(upload), theta):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(new_state["bias"], prbm_new, rtol=1e-4, atol=1e-6)
  # The MR term changed the base: without it the upload is measurably different.
  theta_ce, _, _ = _np_sgd_steps(x, y, _np_params(params), np.float64(prbm), gm, 2, lr, m, 0.0)
  assert np.abs(theta_ce[0] - theta[0]).max() > 1e-3


def test_kl_weight_zero_makes_momentum_irrelevant():
  """With klw = 0 the running mean never enters the loss: any momentum gives the same update."""
  data = _small_data(num_clients=2)
  outs = []
  for momentum in (0.1, 0.9):
    eng = _engine(data, params={"momentum": momentum})
    s, c = eng.algorithm.init(jax.random.key(0), eng.data.x[0], 2)
    s = dict(s, global_mean=s["global_mean"] + 1.0)
    state = jax.tree.map(lambda a: a[1], c)
    outs.append(_np(jax.jit(eng.algorithm.client_update)(s, state, _client(eng, 1),
                                                         jax.random.key(2))[:2]))
  jax.tree.map(np.testing.assert_array_equal, outs[0], outs[1])
  assert np.abs(outs[0][0]["bias"]).max() > 0  # the PRBM was trained


def test_warmup_client_ema_matches_numpy():
  """Three valid steps (every other step masked): CE only, the PRBM unused and untouched."""
  r, x, y, model, params, data = _linear_problem(seed=2)
  lr, m = 0.5, 0.35
  spec = LocalSpec(learning_rate=lr, batch_size=len(y), local_epochs=3, steps_per_epoch=2,
                   unroll=1)
  alg = make_algorithm("FedDBE", model, spec, {"momentum": m, "kl_weight": 7.0})
  server = {"params": params, "global_mean": jnp.asarray(r.normal(size=3), jnp.float32)}
  prbm = jnp.asarray(r.normal(size=3), jnp.float32)
  state, rm = jax.jit(alg.warmup_client)(server, {"bias": prbm}, data, jax.random.key(4))
  np.testing.assert_array_equal(state["bias"], prbm)
  _, _, rm_np = _np_sgd_steps(x, y, _np_params(params), None, None, 3, lr, m, 0.0)
  np.testing.assert_allclose(rm, rm_np, rtol=1e-4, atol=1e-6)
  # Masked steps counted would give a different EMA (six updates instead of three).
  _, _, rm_six = _np_sgd_steps(x, y, _np_params(params), None, None, 6, lr, m, 0.0)
  assert np.abs(rm_six - rm_np).max() > 1e-3


# ---------------------------------------------------------------- engine
def test_warmup_sets_weighted_global_mean_and_keeps_init_params():
  data = _small_data(num_clients=4)
  root = rng.root_key(0)
  results = {}
  for executor in ("vmap", "sequential"):
    eng = _engine(data, executor, {"momentum": 0.5})
    alg, d = eng.algorithm, eng.data
    server, clients = _np(eng.init(root, d.x[0]))
    results[executor] = server, clients["model"]  # the one architecture group
    assert eng.trace_counts["warmup"] == 1
  s0, c0 = alg.init(rng.init_key(root), d.x[0], data.num_clients)
  wkey = rng.warmup_key(root)
  # Each client's running mean from warmup_client, one client at a time.
  warm = jax.jit(alg.warmup_client)
  rms = np.stack([np.asarray(warm(s0, jax.tree.map(lambda a, i=i: a[i], c0),
                                  ClientData(d.x, d.y, d.train_idx[i], d.train_count[i]),
                                  rng.client_key(wkey, i))[1])
                  for i in range(data.num_clients)])
  counts = np.asarray(data.train_count, np.float64)
  expected = counts @ rms / counts.sum()
  assert np.abs(rms - rms[0]).max() > 1e-3 and np.abs(expected).max() > 1e-2
  for executor, (s, c) in results.items():
    np.testing.assert_allclose(s["global_mean"], expected, rtol=1e-5, atol=1e-6,
                               err_msg=executor)
    jax.tree.map(np.testing.assert_array_equal, s["params"], _np(s0["params"]))
    np.testing.assert_array_equal(c["bias"], 0.0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               results["vmap"], results["sequential"])


def test_bias_persists_per_client_and_is_not_averaged():
  data = _small_data(num_clients=5)
  # 3 of 5 clients train; each client's update is recomputed below, one at a time.
  eng = _engine(data, "sequential", jr=0.6, params={"kl_weight": 2.0})
  alg, d = eng.algorithm, eng.data
  root = rng.root_key(0)
  s, c = alg.init(rng.init_key(root), d.x[0], data.num_clients)
  r = np.random.default_rng(0)
  # A non-zero global mean and distinct PRBMs, as after the warm-up and earlier rounds.
  s = dict(s, global_mean=jnp.asarray(r.normal(size=s["global_mean"].shape), jnp.float32))
  c = {"bias": jnp.asarray(r.normal(size=c["bias"].shape), jnp.float32)}
  rkey = rng.round_key(root, 0)
  cohort = np.asarray(engine_lib.plan_round(rkey, eng.participation).cohort)
  biases, uploads = np.array(c["bias"]), []
  train = jax.jit(alg.client_update)
  for cid in cohort:
    state = jax.tree.map(lambda a, cid=cid: a[cid], c)
    new_state, upload, _ = train(s, state, ClientData(d.x, d.y, d.train_idx[cid],
                                                      d.train_count[cid]),
                                 rng.client_key(rkey, int(cid)))
    biases[cid] = np.asarray(new_state["bias"])
    uploads.append(_np(upload))
  weights = np.asarray(d.train_count)[cohort].astype(np.float64)
  expected = jax.tree.map(lambda *u: np.tensordot(weights / weights.sum(), np.stack(u), 1),
                          *uploads)
  before_bias, global_mean = _np(c["bias"]), _np(s["global_mean"])
  s, c, _ = eng.run_round(s, {"model": c}, root, 0)
  c = c["model"]
  assert set(s) == {"params", "global_mean"} and set(c) == {"bias"}
  np.testing.assert_array_equal(s["global_mean"], global_mean)  # fixed after the warm-up
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               s["params"], expected)
  np.testing.assert_allclose(c["bias"], biases, rtol=1e-5, atol=1e-6)
  unselected = np.setdiff1d(np.arange(5), cohort)
  assert len(unselected) == 2
  np.testing.assert_array_equal(np.asarray(c["bias"])[unselected], before_bias[unselected])
  assert np.abs(np.asarray(c["bias"])[cohort] - before_bias[cohort]).min(axis=1).max() > 0
  # Personal evaluation uses each client's own PRBM.
  summary = eng.evaluate(s, {"model": c})
  assert {"test_acc_personal", "test_acc_global"} <= set(summary)
  assert summary["test_acc"] == summary["test_acc_personal"]
