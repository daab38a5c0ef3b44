"""FedCP: the policy masks, the MMD, the context, the ensemble forward, training and evaluation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lib.algorithms import get_algorithm, make_algorithm
from fedjax_lib.algorithms.fedcp import (context_from_head, cpn_masks, fedcp_logits, fedcp_loss,
                                         init_cpn, mix_heads, mmd_rbf)
from fedjax_lib.core.local import Batch, ClientData, LocalSpec, masked_cross_entropy
from fedjax_lib.errors import ConfigError
from fedjax_lib.models import make_model
from tests.test_engine import _small_data


# ---------------------------------------------------------------- helpers
def _np64(a):
  return np.asarray(a, np.float64)


@functools.lru_cache(maxsize=None)
def _cached_setup(params, num_clients):
  data = _small_data(num_clients=num_clients, seed=3, dim=6)
  model = make_model("dnn", data.sample_shape, data.num_classes)
  spec = LocalSpec(learning_rate=0.1, batch_size=4, local_epochs=1,
                   steps_per_epoch=int(data.train_count.max()) // 4, unroll=1)
  alg = make_algorithm("FedCP", model, spec, dict(params))
  server, clients = jax.jit(alg.init, static_argnums=2)(jax.random.key(0),
                                                        jnp.asarray(data.x[0]), num_clients)
  return data, alg, server, clients, jax.jit(alg.client_update)


def _setup(params=None, num_clients=4):
  """Toy data, the algorithm and its initial states (cached: compiled once per setting)."""
  return _cached_setup(tuple(sorted((params or {}).items())), num_clients)[:4]


def _update(params=None):
  """The jitted ``client_update`` of :func:`_setup`'s algorithm."""
  return _cached_setup(tuple(sorted((params or {}).items())), 4)[4]


def _client_data(data, cid):
  return ClientData(jnp.asarray(data.x), jnp.asarray(data.y), jnp.asarray(data.train_idx[cid]),
                    jnp.asarray(data.train_count[cid]))


def _first(tree):
  return jax.tree.map(lambda a: a[0], tree)


def _perturb(tree, seed, scale=0.3):
  """``tree`` plus Gaussian noise (numpy, so that no JAX op needs compiling)."""
  r = np.random.default_rng(seed)
  return jax.tree.map(lambda a: (np.asarray(a) + scale * r.normal(size=a.shape)).astype(
      np.float32), tree)


def _randomized_cpn(seed, dim):
  """A CPN with non-trivial LayerNorm scale/bias so that every parameter matters."""
  cpn = dict(jax.jit(init_cpn, static_argnums=1)(jax.random.key(seed), dim))
  cpn["ln"] = _perturb(cpn["ln"], seed, 0.5)
  return cpn


# ---------------------------------------------------------------- hyperparameters
def test_registered_with_pfllib_defaults():
  assert get_algorithm("fedcp").hyperparameters() == {"lam": 1.0, "pfllib_compat": False}
  data = _small_data(num_clients=2)
  model = make_model("dnn", data.sample_shape, data.num_classes)
  for bad in ({"lam": -0.5}, {"lam": "1"}, {"pfllib_compat": "yes"}):
    with pytest.raises(ConfigError, match="FedCP"):
      make_algorithm("FedCP", model, LocalSpec(), bad)


# ---------------------------------------------------------------- policy masks
def test_masks_lie_in_unit_interval_and_sum_to_one():
  dim, b = 7, 5
  cpn = _randomized_cpn(0, dim)
  gate_in = jax.random.normal(jax.random.key(1), (b, dim)) * 3
  masks = jax.jit(cpn_masks)
  pm0, gm0 = masks(cpn, gate_in)
  pm1, gm1 = masks(cpn, gate_in, jax.random.key(2))
  pm2, _ = masks(cpn, gate_in, jax.random.key(3))
  for pm, gm in ((pm0, gm0), (pm1, gm1)):
    assert pm.shape == gm.shape == (b, dim)
    np.testing.assert_allclose(pm + gm, 1.0, atol=1e-6)
    assert np.all((np.asarray(pm) >= 0) & (np.asarray(pm) <= 1))
    assert np.all((np.asarray(gm) >= 0) & (np.asarray(gm) <= 1))
  # No key: deterministic; a key adds noise that depends on it.
  np.testing.assert_array_equal(pm0, masks(cpn, gate_in)[0])
  assert not np.allclose(pm0, pm1) and not np.allclose(pm1, pm2)


# ---------------------------------------------------------------- MMD
def _mmd_numpy(x, y, bandwidths=(10, 15, 20, 50)):
  x, y = _np64(x), _np64(y)
  n = len(x)
  k = lambda u, v: sum(np.exp(-0.5 * np.sum((u - v) ** 2) / a) for a in bandwidths)
  total = 0.0
  for i in range(n):
    for j in range(n):
      total += k(x[i], x[j]) + k(y[i], y[j]) - 2 * k(x[i], y[j])
  return total / n ** 2


def test_mmd_matches_numpy_double_loop():
  r = np.random.default_rng(0)
  x = r.normal(size=(6, 9)).astype(np.float32) * 2
  y = (r.normal(size=(6, 9)) + 0.7).astype(np.float32)
  got = float(mmd_rbf(x, y))
  np.testing.assert_allclose(got, _mmd_numpy(x, y), rtol=2e-5, atol=1e-6)
  assert got > 0
  assert float(mmd_rbf(x, x)) == 0.0
  # Symmetric in its arguments.
  np.testing.assert_allclose(mmd_rbf(y, x), got, rtol=1e-5)


# ---------------------------------------------------------------- context
def test_context_matches_numpy_and_rejects_deep_heads():
  r = np.random.default_rng(1)
  torch_weight = r.normal(size=(4, 11)).astype(np.float32)  # PyTorch layout [C, D]
  head = {"kernel": jnp.asarray(torch_weight.T), "bias": jnp.zeros(4)}  # Flax layout [D, C]
  ctx = context_from_head(head)
  assert ctx.shape == (11,)
  np.testing.assert_allclose(ctx, torch_weight.sum(axis=0), rtol=1e-6, atol=1e-6)
  deep = {"Dense_0": {"kernel": jnp.ones((11, 5))}, "Dense_1": {"kernel": jnp.ones((5, 4))}}
  with pytest.raises(ConfigError, match="FedCP"):
    context_from_head(deep)


# ---------------------------------------------------------------- forward
def _dense(x, p):
  return x @ _np64(p["kernel"]) + _np64(p["bias"])


def _logits_numpy(server, head_p, context, x, noise):
  rep = np.maximum(_dense(_np64(x), server["base"]["fc1"]), 0.0)  # DNN base: dense + ReLU
  ctx = _np64(context)
  gate_in = rep * (ctx / np.linalg.norm(ctx))
  cpn = server["cpn"]
  h = _dense(gate_in, cpn["fc"])
  h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
  h = np.maximum(h * _np64(cpn["ln"]["scale"]) + _np64(cpn["ln"]["bias"]), 0.0)
  z = h.reshape(len(x), 2, -1) + noise
  e = np.exp(z - z.max(1, keepdims=True))
  probs = e / e.sum(1, keepdims=True)
  pm, gm = probs[:, 0], probs[:, 1]
  return _dense(rep * pm, head_p) + _dense(rep * gm, server["head"])


def test_logits_match_numpy():
  data, alg, server, clients = _setup()
  server = dict(server, cpn=_randomized_cpn(4, 100),
                head=_perturb(server["head"], 5))
  head_p, context = _first(clients)["head"], _first(clients)["context"]
  x = jnp.asarray(data.x[:5])
  key = jax.random.key(6)
  noise = _np64(jax.random.gumbel(key, (5, 2, 100)))  # D = 100

  @functools.partial(jax.jit, static_argnums=0)
  def logits(noisy):
    rep = alg.model.apply({"params": {"base": server["base"]}}, x, method="features")
    return fedcp_logits(alg.model, rep, head_p, server["head"], server["cpn"], context,
                        key if noisy else None)

  for noisy, nz in ((False, 0.0), (True, noise)):
    got = logits(noisy)
    want = _logits_numpy(server, head_p, context, x, nz)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # predict = the same ensemble on raw inputs.
  np.testing.assert_allclose(jax.jit(alg.predict)(server, {"head": head_p, "context": context},
                                                  x),
                             _logits_numpy(server, head_p, context, x, 0.0), rtol=1e-4,
                             atol=1e-5)


# ---------------------------------------------------------------- loss
def _loss_inputs():
  data, alg, server, clients = _setup()
  client = _first(clients)
  trainable = {"base": _perturb(server["base"], 7, 0.1), "head": client["head"],
               "cpn": server["cpn"]}
  batch = Batch(jnp.asarray(data.x[:6]), jnp.asarray(data.y[:6]), jnp.ones(6))
  return alg, server, client, trainable, batch


def test_frozen_base_and_global_head_get_no_gradient():
  alg, server, client, trainable, batch = _loss_inputs()
  key = jax.random.key(8)
  loss = lambda t, hg, fb: fedcp_loss(alg.model, t, hg, fb, client["context"], 1.0, batch, key)
  g_train, g_head_g, g_frozen = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(
      trainable, server["head"], server["base"])
  for g in jax.tree.leaves((g_head_g, g_frozen)):
    np.testing.assert_array_equal(g, 0.0)
  for part in ("base", "head", "cpn"):
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(g_train[part])), part


def test_lam_weights_the_mmd_term_and_zero_removes_it():
  alg, server, client, trainable, batch = _loss_inputs()
  key = jax.random.key(9)

  @jax.jit
  def pieces():
    rep = alg.model.apply({"params": {"base": trainable["base"]}}, batch.x, method="features")
    rep0 = alg.model.apply({"params": {"base": server["base"]}}, batch.x, method="features")
    logits = fedcp_logits(alg.model, rep, trainable["head"], server["head"], trainable["cpn"],
                          client["context"], key)
    return rep, rep0, masked_cross_entropy(logits, batch.y, batch.mask)

  rep, rep0, ce = pieces()
  ce = float(ce)
  mmd = _mmd_numpy(rep, rep0)
  assert mmd > 1e-4
  for lam in (0.0, 2.5):
    got = float(jax.jit(lambda t, lam=lam: fedcp_loss(
        alg.model, t, server["head"], server["base"], client["context"], lam, batch, key))(
            trainable))
    np.testing.assert_allclose(got, ce + lam * mmd, rtol=1e-5)


def test_lam_changes_training():
  data, _, server, clients = _setup()  # lam = 1
  client, cdata, key = _first(clients), _client_data(data, 0), jax.random.key(10)
  out0 = _update({"lam": 0.0})(server, client, cdata, key)
  out1 = _update()(server, client, cdata, key)
  # The MMD term and its gradient vanish at the first step (φ = φ_frozen), not afterwards.
  assert int(out0[2]["steps"]) >= 2
  assert not np.allclose(out0[1]["base"]["fc1"]["kernel"], out1[1]["base"]["fc1"]["kernel"])


# ---------------------------------------------------------------- algorithm
def test_init_shares_one_model_and_one_context():
  data, alg, server, clients = _setup(num_clients=3)
  assert set(server) == {"base", "head", "cpn"} and set(clients) == {"head", "context"}
  ctx = np.asarray(clients["context"])
  assert ctx.shape == (3, 100) and ctx.dtype == np.float32
  assert np.all((ctx >= 0) & (ctx < 1)) and np.unique(ctx[0]).size > 1
  for a, b in zip(jax.tree.leaves(clients["head"]), jax.tree.leaves(server["head"])):
    for c in range(3):
      np.testing.assert_array_equal(a[c], b)
  np.testing.assert_array_equal(ctx[1], ctx[0])
  # The model is FedAvg's initial model for the same key.
  fedavg = make_algorithm("FedAvg", alg.model, alg.local)
  params = jax.jit(fedavg.init, static_argnums=2)(jax.random.key(0), jnp.asarray(data.x[0]),
                                                  3)[0]["params"]["params"]
  jax.tree.map(np.testing.assert_array_equal, params["base"], server["base"])


def test_client_update_uploads_mixed_head_and_recomputes_context():
  data, alg, server, clients = _setup()
  server = dict(server, head=_perturb(server["head"], 11))
  client = _first(clients)
  new_state, upload, stats = _update()(server, client, _client_data(data, 1),
                                       jax.random.key(12))
  assert np.isfinite(float(stats["loss"])) and int(stats["steps"]) > 0
  assert set(upload) == {"base", "head", "cpn"} and set(new_state) == {"head", "context"}
  jax.tree.map(lambda u, p, g: np.testing.assert_allclose(u, 0.5 * p + 0.5 * g, rtol=1e-6),
               upload["head"], new_state["head"], server["head"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               mix_heads(new_state["head"], server["head"]), upload["head"])
  np.testing.assert_allclose(new_state["context"], context_from_head(new_state["head"]),
                             rtol=1e-6)
  for part in ("base", "cpn"):  # φ and the CPN were trained
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(upload[part]),
                                                        jax.tree.leaves(server[part])))
  assert not np.allclose(new_state["head"]["kernel"], client["head"]["kernel"])


def test_server_update_is_the_weighted_average_with_fallback():
  _, alg, server, _ = _setup()
  ups = [_perturb(server, 20 + k) for k in range(3)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *ups)
  w = np.array([3.0, 0.0, 5.0])
  got = alg.server_update(server, stacked, w, jax.random.key(0))
  want = jax.tree.map(lambda a, c: (3 * _np64(a) + 5 * _np64(c)) / 8, ups[0], ups[2])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
  same = alg.server_update(server, stacked, np.zeros(3), jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, same, server)


def test_compat_flag_changes_evaluation_only():
  data, plain, server, clients = _setup()
  _, compat, _, _ = _setup({"pfllib_compat": True})
  # With h_p == h_g (as at init) the masks cancel out of a linear head; make them differ.
  server = dict(server, head=_perturb(server["head"], 14))
  client, cdata, key = _first(clients), _client_data(data, 2), jax.random.key(13)
  # Training is the same computation: identical programs.
  trace = lambda alg: str(jax.make_jaxpr(alg.client_update)(server, client, cdata, key))
  assert trace(plain) == trace(compat)

  x = jnp.asarray(data.x[:8])
  views = [jax.jit(lambda k, alg=alg: alg.eval_views(server, client, cdata, k)[""](x))
           for alg in (plain, compat)]
  view = lambda alg, k: views[alg is compat](k)
  view_of = jax.jit(lambda alg, rows: alg.eval_views(server, client, cdata, jax.random.key(1))
                    [""](rows), static_argnums=0)
  predict = jax.jit(plain.predict)  # pfllib_compat does not enter predict
  assert list(plain.eval_views(server, client, cdata, key)) == [""]
  # Default: the noise-free policy, independent of the key; log-probabilities of predict.
  np.testing.assert_array_equal(view(plain, jax.random.key(1)), view(plain, jax.random.key(2)))
  np.testing.assert_allclose(view(plain, key),
                             jax.nn.log_softmax(predict(server, client, x)), rtol=1e-6,
                             atol=1e-6)
  # Compat: Gumbel noise from the evaluation key.
  noisy1, noisy2 = view(compat, jax.random.key(1)), view(compat, jax.random.key(2))
  assert not np.allclose(noisy1, noisy2)
  assert not np.allclose(noisy1, view(plain, jax.random.key(1)))
  np.testing.assert_allclose(noisy1, jax.nn.log_softmax(
      predict(server, client, x, jax.random.key(1))), rtol=1e-6, atol=1e-6)
  # The noise is drawn for the batch the view is given, so a row's output depends on the
  # batch: the sequential executor must not forward compat's samples in blocks.
  halves = jnp.concatenate([view_of(compat, x[:4]), view_of(compat, x[4:])])
  assert not np.allclose(halves, noisy1)
  assert plain.rowwise_views() and not compat.rowwise_views()


def test_new_client_variables_are_global_base_and_global_head():
  data, alg, server, clients = _setup()
  assert alg.supports_new_clients
  variables = alg.new_client_variables(server, _first(clients))
  assert variables == {"params": {"base": server["base"], "head": server["head"]}}
  assert alg.model.apply(variables, jnp.asarray(data.x[:2])).shape == (2, data.num_classes)
