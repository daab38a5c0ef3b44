"""GPFL: GCE loss, CoV, conditional inputs, alignment norm, weight decay, state and rounds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lib.algorithms import get_algorithm, make_algorithm
from fedjax_lib.algorithms.gpfl import (GPFL, alignment_term, conditional_inputs, cov_apply,
                                        gce_loss, init_cov, label_frequencies)
from fedjax_lib.core import engine as engine_lib
from fedjax_lib.core import rng
from fedjax_lib.core.local import Batch, ClientData, LocalSpec
from fedjax_lib.errors import ConfigError
from fedjax_lib.models import make_model
from tests.test_engine import _small_data, cohort_plan

HIDDEN = 8  # a narrow DNN keeps compilation and steps cheap


# ---------------------------------------------------------------- numpy references
def np_normalize(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_masked_ce(logits, y, mask):
  nll = -np_log_softmax(logits)[np.arange(len(y)), y]
  return (nll * mask).sum() / max(mask.sum(), 1.0)


def np_gce_loss(f, y, emb, mask):
  return np_masked_ce(np_normalize(f) @ np_normalize(emb).T, y, mask)


def np_layer_norm(h, scale, bias, eps=1e-5):
  mean = h.mean(-1, keepdims=True)
  var = ((h - mean) ** 2).mean(-1, keepdims=True)
  return (h - mean) / np.sqrt(var + eps) * scale + bias


def np_cov(p, f, ctx):
  def branch(d, n):
    return np_layer_norm(np.maximum(ctx @ d["kernel"] + d["bias"], 0), n["scale"], n["bias"])
  gamma = branch(p["gamma"], p["gamma_norm"])
  beta = branch(p["beta"], p["beta_norm"])
  return np.maximum(f * (gamma + 1) + beta, 0)


def np_alignment(f_g, emb, y, mask):
  diff = (f_g - emb[y])[mask > 0]
  return np.sqrt((diff ** 2).sum())


def np_dnn_features(base, x):
  return np.maximum(x.reshape(len(x), -1) @ base["fc1"]["kernel"] + base["fc1"]["bias"], 0)


def _np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _random_cov(r, dim):
  """CoV parameters with non-trivial LayerNorm affines."""
  p = _np(init_cov(jax.random.key(int(r.integers(1 << 30))), dim))
  for name in ("gamma_norm", "beta_norm"):
    p[name] = {"scale": 1 + 0.3 * r.normal(size=dim), "bias": 0.2 * r.normal(size=dim)}
  return p


def _f32(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


# ---------------------------------------------------------------- setup helpers
def _algo(params=None, lr=0.1, batch_size=4, steps=3, dim=12, classes=3):
  model = make_model("dnn", (dim,), classes, hidden_dim=HIDDEN)
  spec = LocalSpec(learning_rate=lr, batch_size=batch_size, local_epochs=1,
                   steps_per_epoch=steps, unroll=1)
  return make_algorithm("GPFL", model, spec, params)


def _toy_client(n=12, dim=12, classes=3, seed=0, pad=0):
  r = np.random.default_rng(seed)
  x = r.normal(size=(n + pad, dim)).astype(np.float32)
  y = r.integers(0, classes, n + pad)
  idx = np.r_[np.arange(n), np.zeros(pad, int)]
  return ClientData(jnp.asarray(x), jnp.asarray(y), jnp.asarray(idx), jnp.int32(n))


def _trainable(alg, server, client):
  return {"base": server["base"], "head": client["head"], "gce": server["gce"],
          "cov": server["cov"]}


# ---------------------------------------------------------------- hyperparameters
def test_registered_with_pfllib_defaults_and_validated():
  assert get_algorithm("gpfl") is GPFL
  assert GPFL.hyperparameters() == {"lam": 1.0, "mu": 0.0}
  for bad in ({"lam": -0.1}, {"mu": -1.0}):
    with pytest.raises(ConfigError, match="GPFL hyperparameter"):
      _algo(bad)
  with pytest.raises(ConfigError, match="lam"):
    _algo({"lam": True})
  _algo({"lam": 0, "mu": 0})  # zero is accepted


# ---------------------------------------------------------------- pure functions vs numpy
def test_gce_loss_matches_numpy_softmax_over_cosines():
  r = np.random.default_rng(0)
  f = r.normal(size=(7, 5))
  f[2] = 0.0  # a zero row (ReLU output) normalises to zero, as F.normalize does
  emb = r.normal(size=(4, 5))
  y = r.integers(0, 4, 7)
  mask = np.array([1, 1, 1, 0, 1, 1, 0], np.float64)
  got = gce_loss(jnp.asarray(f, jnp.float32), jnp.asarray(y), *_f32((emb, mask)))
  np.testing.assert_allclose(got, np_gce_loss(f, y, emb, mask), rtol=1e-5)
  # No temperature: scaling features or embeddings leaves the loss unchanged.
  np.testing.assert_allclose(gce_loss(jnp.asarray(3 * f, jnp.float32), jnp.asarray(y),
                                      jnp.asarray(0.1 * emb, jnp.float32), jnp.asarray(mask)),
                             got, rtol=1e-5)
  # The gradient through the zero row is finite.
  g = jax.grad(gce_loss)(jnp.asarray(f, jnp.float32), jnp.asarray(y),
                         jnp.asarray(emb, jnp.float32), jnp.asarray(mask))
  assert np.isfinite(np.asarray(g)).all()


def test_cov_apply_matches_numpy():
  r = np.random.default_rng(1)
  dim = 6
  p = _random_cov(r, dim)
  f = r.normal(size=(5, dim))
  for ctx in (r.normal(size=dim), np.zeros(dim)):  # zeros: the round-0 conditional input
    got = cov_apply(_f32(p), jnp.asarray(f, jnp.float32), jnp.asarray(ctx, jnp.float32))
    np.testing.assert_allclose(got, np_cov(p, f, ctx), rtol=1e-5, atol=1e-5)
  # Fresh parameters: PyTorch's LayerNorm affine init and D -> D dense layers.
  fresh = init_cov(jax.random.key(0), dim)
  np.testing.assert_array_equal(fresh["gamma_norm"]["scale"], np.ones(dim))
  np.testing.assert_array_equal(fresh["beta_norm"]["bias"], np.zeros(dim))
  assert fresh["gamma"]["kernel"].shape == (dim, dim)
  assert np.abs(np.asarray(fresh["beta"]["kernel"])).max() <= 1 / np.sqrt(dim)


def test_conditional_inputs_match_numpy():
  r = np.random.default_rng(2)
  emb = r.normal(size=(4, 6))
  freq = np.array([0.5, 0.0, 0.25, 0.25])
  g_in, p_in = conditional_inputs(*_f32((emb, freq)))
  np.testing.assert_allclose(g_in, emb.sum(0) / 4, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(p_in, sum(freq[c] * emb[c] for c in range(4)), rtol=1e-5,
                             atol=1e-6)


def test_alignment_term_is_the_unsquared_frobenius_norm_over_the_batch():
  r = np.random.default_rng(3)
  f_g, emb = r.normal(size=(6, 5)), r.normal(size=(3, 5))
  y = r.integers(0, 3, 6)
  mask = np.array([1, 1, 0, 1, 1, 0], np.float64)
  args = lambda f: (jnp.asarray(f, jnp.float32), jnp.asarray(emb, jnp.float32),
                    jnp.asarray(y), jnp.asarray(mask))
  got = float(alignment_term(*args(f_g)))
  np.testing.assert_allclose(got, np_alignment(f_g, emb, y, mask), rtol=1e-5)
  # Not squared: doubling the differences doubles the term; not averaged: it is a norm of
  # the whole matrix (sqrt of the sum of all squared entries), not a mean of row norms.
  doubled = emb[y] + 2 * (f_g - emb[y])
  np.testing.assert_allclose(alignment_term(*args(doubled)), 2 * got, rtol=1e-5)
  rows = np.linalg.norm((f_g - emb[y])[mask > 0], axis=1)
  assert abs(got - rows.mean()) > 1e-3 and abs(got - rows.sum()) > 1e-3
  # The frozen table gets no gradient; a zero difference gives a zero (not NaN) gradient.
  g_f, g_e = jax.grad(alignment_term, argnums=(0, 1))(*args(f_g))
  np.testing.assert_array_equal(g_e, 0.0)
  np.testing.assert_allclose(g_f, (f_g - emb[y]) * mask[:, None] / got, rtol=1e-4, atol=1e-6)
  g0 = jax.grad(alignment_term)(*args(emb[y]))
  np.testing.assert_array_equal(g0, 0.0)


def test_label_frequencies_ignore_padding():
  y = jnp.asarray([2, 0, 2, 1, 2, 3, 3, 3])
  x = jnp.zeros((8, 1))
  idx = jnp.asarray([0, 1, 2, 4, 5, 5, 5, 5])  # 5 valid rows, then padding (label 3)
  freq = label_frequencies(ClientData(x, y, idx, jnp.int32(5)), 4)
  np.testing.assert_allclose(freq, [0.2, 0.0, 0.6, 0.2], rtol=1e-6)
  empty = label_frequencies(ClientData(x, y, idx, jnp.int32(0)), 4)
  np.testing.assert_array_equal(empty, 0.0)


# ---------------------------------------------------------------- the local loss
def test_local_loss_matches_numpy_and_lam_zero_drops_alignment():
  r = np.random.default_rng(4)
  dim, classes, n = 12, 3, 6
  alg = _algo({"lam": 0.7})
  server, clients = alg.init(jax.random.key(0), jnp.zeros(dim), 2)
  client = jax.tree.map(lambda a: a[0], clients)
  tr = _np(_trainable(alg, server, client))
  tr["cov"] = _random_cov(r, HIDDEN)
  tr["gce"] = r.normal(size=(classes, HIDDEN))
  e_frozen = r.normal(size=(classes, HIDDEN))
  g_in, p_in = r.normal(size=HIDDEN), r.normal(size=HIDDEN)
  x, y = r.normal(size=(n, dim)), r.integers(0, classes, n)
  mask = np.array([1, 1, 1, 1, 0, 1], np.float64)

  f = np_dnn_features(tr["base"], x)
  logits = np_cov(tr["cov"], f, p_in) @ tr["head"]["kernel"] + tr["head"]["bias"]
  f_g = np_cov(tr["cov"], f, g_in)
  ce, gce = np_masked_ce(logits, y, mask), np_gce_loss(f_g, y, tr["gce"], mask)
  align = np_alignment(f_g, e_frozen, y, mask)
  assert align > 1.0  # the term is material

  batch = Batch(jnp.asarray(x, jnp.float32), jnp.asarray(y), jnp.asarray(mask, jnp.float32))
  key = jax.random.key(0)
  args = (_f32(tr), batch, key, *_f32((g_in, p_in, e_frozen)))
  for lam in (0.7, 0.0):
    got = jax.jit(_algo({"lam": lam}).local_loss)(*args)
    np.testing.assert_allclose(got, ce + gce + lam * align, rtol=1e-5)
  terms = jax.jit(alg.loss_terms)(*args[:2], *args[3:])
  np.testing.assert_allclose(terms, (ce, gce, align), rtol=1e-5)


# ---------------------------------------------------------------- client update
def _one_step_update(mu, lr=0.2):
  """client_update with one full-batch step (the shuffle does not matter)."""
  n = 12
  alg = _algo({"lam": 0.5, "mu": mu}, lr=lr, batch_size=n, steps=1)
  server, clients = alg.init(jax.random.key(0), jnp.zeros(12), 1)
  client = jax.tree.map(lambda a: a[0], clients)
  r = np.random.default_rng(5)
  client = dict(client, g_in=jnp.asarray(r.normal(size=HIDDEN), jnp.float32),
                p_in=jnp.asarray(r.normal(size=HIDDEN), jnp.float32))
  data = _toy_client(n=n)
  new_state, upload, stats = jax.jit(alg.client_update)(server, client, data,
                                                        jax.random.key(1))
  assert int(stats["steps"]) == 1
  return alg, server, client, data, new_state, upload


def test_one_sgd_step_by_hand_and_weight_decay_only_on_gce_and_cov():
  lr, mu = 0.2, 0.3
  alg, server, client, data, state0, up0 = _one_step_update(0.0, lr)
  _, _, _, _, state_mu, up_mu = _one_step_update(mu, lr)
  # mu = 0: plain SGD on the GPFL loss over the whole batch.
  tr = _trainable(alg, server, client)
  batch = Batch(data.x, data.y, jnp.ones(12))
  grad_fn = jax.jit(jax.grad(lambda t, b, *a: alg.local_loss(t, b, None, *a)))
  grads = grad_fn(tr, batch, client["g_in"], client["p_in"], server["gce"])
  expected = jax.tree.map(lambda w, g: w - lr * g, tr, grads)
  got = {"base": up0["base"], "head": state0["head"], "gce": up0["gce"], "cov": up0["cov"]}
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               got, expected)
  # mu > 0: the GCE and CoV steps gain -lr·mu·w (PyTorch weight_decay); base and head do not.
  for part in ("gce", "cov"):
    jax.tree.map(lambda a, b, w: np.testing.assert_allclose(a - b, -lr * mu * np.asarray(w),
                                                            rtol=1e-4, atol=1e-6),
                 up_mu[part], up0[part], server[part])
  jax.tree.map(np.testing.assert_array_equal, up_mu["base"], up0["base"])
  jax.tree.map(np.testing.assert_array_equal, state_mu["head"], state0["head"])


def test_client_update_recomputes_conditional_inputs_from_its_own_embeddings():
  alg, server, client, data, new_state, upload = _one_step_update(0.1)
  assert set(new_state) == {"head", "g_in", "p_in"}
  assert set(upload) == {"base", "gce", "cov"}
  counts = np.bincount(np.asarray(data.y)[: int(data.train_count)], minlength=3)
  freq = counts / counts.sum()
  emb = np.asarray(upload["gce"], np.float64)  # the client's trained embeddings
  np.testing.assert_allclose(new_state["g_in"], emb.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_state["p_in"], freq @ emb, rtol=1e-5, atol=1e-6)
  assert not np.allclose(new_state["p_in"], freq @ np.asarray(server["gce"]), atol=1e-4)


def test_predict_is_the_personal_route_and_new_clients_get_a_plain_model():
  r = np.random.default_rng(6)
  alg = _algo()
  server, clients = alg.init(jax.random.key(2), jnp.zeros(12), 3)
  np.testing.assert_array_equal(clients["g_in"], 0.0)
  np.testing.assert_array_equal(clients["p_in"], 0.0)
  assert clients["p_in"].shape == (3, HIDDEN) and server["gce"].shape == (3, HIDDEN)
  client = dict(jax.tree.map(lambda a: a[1], clients),
                p_in=jnp.asarray(r.normal(size=HIDDEN), jnp.float32))
  x = r.normal(size=(5, 12))
  s, c = _np(server), _np(client)
  logits = (np_cov(s["cov"], np_dnn_features(s["base"], x), c["p_in"]) @ c["head"]["kernel"]
            + c["head"]["bias"])
  np.testing.assert_allclose(alg.predict(server, client, jnp.asarray(x, jnp.float32)),
                             np_log_softmax(logits), rtol=1e-4, atol=1e-5)
  variables = alg.new_client_variables(server, client)
  reference = alg.init_params(jax.random.key(2), jnp.zeros(12))
  assert jax.tree.structure(variables) == jax.tree.structure(reference)
  jax.tree.map(np.testing.assert_array_equal, variables["params"]["base"], server["base"])


# ---------------------------------------------------------------- one engine round
def test_round_averages_shared_parts_and_updates_only_trained_clients():
  data = _small_data()
  alg = _algo({"mu": 0.1}, steps=int(data.train_count.max()) // 4)
  eng = engine_lib.Engine(alg, engine_lib.DeviceData.from_federated(data),
                          engine_lib.Participation(data.num_clients, 0.5, False, 0.0),
                          eval_chunk_size=6)
  alg, d = eng.algorithm, eng.data
  root = rng.root_key(0)
  s, c = eng.init(root, d.x[0])
  plan, cohort_states, keys = cohort_plan(eng, c, root, 0)
  update, uploads = jax.jit(alg.client_update), []
  cohort = np.asarray(plan.cohort)
  for k, cid in enumerate(cohort):
    state_k = jax.tree.map(lambda a, k=k: a[k], cohort_states)
    data_k = ClientData(d.x, d.y, d.train_idx[cid], d.train_count[cid])
    uploads.append(_np(update(s, state_k, data_k, keys[k])[1]))
  active = np.asarray(plan.active)
  assert (np.asarray(plan.kept) == active).all()  # no drop-out here
  weights = np.where(active, np.asarray(d.train_count)[cohort], 0).astype(np.float64)
  expected = jax.tree.map(lambda *u: np.tensordot(weights / weights.sum(), np.stack(u), 1),
                          *uploads)
  s_before = _np(s)
  s, c, _ = eng.run_round(s, c, root, 0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), s, expected)
  assert not np.allclose(s["gce"], s_before["gce"])
  trained = set(cohort[active].tolist())
  assert 0 < len(trained) < data.num_clients
  p_in = np.asarray(c["model"]["p_in"])
  for cid in range(data.num_clients):
    assert (np.abs(p_in[cid]).max() > 0) == (cid in trained), cid
  assert np.isfinite(eng.evaluate(s, c)["test_acc"])
