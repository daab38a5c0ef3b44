"""FedAS and FedPAC: their losses, statistics and server rules against numpy (and scipy's
SLSQP for FedPAC's quadratic programs), hyperparameter validation, one vs eight devices, and
learning on the bundled digits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize

from fedjax_lib import Config, run_experiment
from fedjax_lib.algorithms import fedas as as_lib
from fedjax_lib.algorithms import fedpac as pac_lib
from fedjax_lib.algorithms import get_algorithm, make_algorithm
from fedjax_lib.algorithms.base import SettingsContext, is_linear_server
from fedjax_lib.core import engine as engine_lib
from fedjax_lib.core.local import ClientData, LocalSpec, batch_schedule
from fedjax_lib.errors import ConfigError
from fedjax_lib.models import make_model
from tests.test_engine import _small_data
from tests.helpers import assert_replicated


def _client_data(x, y, counts, width=None):
  """One client owning the first ``counts`` rows of ``x``/``y`` (padded to ``width``)."""
  width = width or len(y)
  idx = np.r_[np.arange(counts), np.zeros(width - counts, int)].astype(np.int32)
  return ClientData(jnp.asarray(x), jnp.asarray(y), jnp.asarray(idx), jnp.asarray(counts))


# ---------------------------------------------------------------- FedAS
def np_alignment_loss(f, y, mask, protos, present):
  """PFLlib's loop: for each label of the batch with a prototype, MSELoss(f[y == c], P_c)."""
  f, y = f[mask > 0], y[mask > 0]
  return sum(np.mean((f[y == c] - protos[c]) ** 2) for c in np.unique(y) if present[c])


def test_alignment_loss_matches_pfllib_loop():
  r = np.random.default_rng(0)
  f = r.normal(size=(9, 5)).astype(np.float32)
  y = np.array([0, 2, 2, 1, 0, 2, 3, 1, 3], np.int32)
  mask = np.array([1, 1, 1, 1, 1, 1, 1, 0, 1], np.float32)  # class 1 keeps one row
  protos = r.normal(size=(4, 5)).astype(np.float32)
  present = np.array([True, True, True, False])  # class 3 has no prototype: no term
  got, grad = jax.jit(jax.value_and_grad(as_lib.alignment_loss))(f, y, mask, protos, present)
  np.testing.assert_allclose(got, np_alignment_loss(f, y, mask, protos, present), rtol=1e-6)
  # the gradient w.r.t. the features: 2 (f_i − P_c) / (n_c·d) on the rows that count
  n_c = np.array([(mask * (y == c)).sum() for c in range(4)])
  expected = 2 * (f - protos[y]) / (n_c[y] * 5)[:, None] * (mask * present[y])[:, None]
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("loop", ["scan", "valid"])
def test_fisher_trace_matches_numpy(loop):
  """Σ over the drop_last batches of ‖∇ mean NLL‖² for softmax regression, the gradient
  derived by hand: ∇W = Xᵀ(p − Y)/B, ∇b = Σ(p − Y)/B."""
  r = np.random.default_rng(1)
  x = r.normal(size=(23, 4)).astype(np.float32)
  y = r.integers(0, 3, 23).astype(np.int32)
  params = {"w": r.normal(size=(4, 3)).astype(np.float32),
            "b": r.normal(size=3).astype(np.float32)}
  spec = LocalSpec(batch_size=5, steps_per_epoch=30 // 5, loop=loop)
  data = _client_data(x, y, 17, width=30)  # 3 full batches, 2 samples left out
  key = jax.random.PRNGKey(4)

  def nll(p, batch):
    logp = jax.nn.log_softmax(batch.x @ p["w"] + p["b"])
    return -(jnp.take_along_axis(logp, batch.y[:, None], 1)[:, 0] * batch.mask).mean()

  got, (rows, valid) = jax.jit(lambda p: (as_lib.fisher_trace(nll, p, data, key, spec),
                                          batch_schedule(data, key, spec)))(params)
  expected = 0.0
  for step_rows, ok in zip(np.asarray(rows), np.asarray(valid)):
    if ok:
      xb, yb = x[step_rows], y[step_rows]
      delta = (np.exp(_np_log_softmax(xb @ params["w"] + params["b"])) - np.eye(3)[yb]) / 5
      expected += np.sum((xb.T @ delta) ** 2) + np.sum(delta.sum(0) ** 2)
  assert np.asarray(valid).sum() == 3
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def _model(data=None, name="dnn"):
  data = data or _small_data(num_clients=4)
  return make_model(name, data.sample_shape, data.num_classes)


def test_fedas_server_weights_by_fisher_trace():
  alg = make_algorithm("FedAS", _model(), LocalSpec())
  assert not is_linear_server(alg)
  r = np.random.default_rng(2)
  old = {"params": {"w": jnp.zeros((2, 3))}}
  uploads = {"params": {"w": jnp.asarray(r.normal(size=(4, 2, 3)), jnp.float32)},
             "fisher": jnp.asarray([2.0, 1e6, 0.5, 1.5], jnp.float32)}
  weights = jnp.asarray([10.0, 0.0, 3.0, 7.0])  # slot 1 dropped: its huge trace must not count
  new = alg.server_update(old, uploads, weights, jax.random.PRNGKey(0))
  f = np.array([2.0, 0.0, 0.5, 1.5])
  expected = np.tensordot(f / f.sum(), np.asarray(uploads["params"]["w"]), axes=1)
  np.testing.assert_allclose(new["params"]["w"], expected, rtol=1e-5, atol=1e-6)
  # every trace 0 (no client had a full batch): the global model stays
  zero = dict(uploads, fisher=jnp.zeros(4))
  np.testing.assert_array_equal(alg.server_update(old, zero, weights, None)["params"]["w"],
                                old["params"]["w"])


def test_fedas_client_substitutes_the_aligned_global_base():
  """With local lr ~0 the client's new model is the aligned global base under its own head;
  without alignment (``alignment_epochs=0``, the authors' wo_local) the base is the global
  one."""
  data = _small_data(num_clients=4)
  spec = LocalSpec(learning_rate=1e-30, batch_size=4,
                   steps_per_epoch=int(data.train_count.max()) // 4)
  model = _model(data)
  alg = make_algorithm("FedAS", model, spec, {"alignment_batch_size": 4})
  _, clients = alg.init(jax.random.PRNGKey(0), jnp.asarray(data.x[0]), 4)
  server = {"params": model.init(jax.random.PRNGKey(1), jnp.asarray(data.x[:1]))["params"]}
  client = jax.tree.map(lambda a: a[1], clients)
  cd = ClientData(jnp.asarray(data.x), jnp.asarray(data.y), jnp.asarray(data.train_idx[1]),
                  jnp.asarray(data.train_count[1]))
  state, upload, metrics = jax.jit(alg.client_update)(server, client, cd,
                                                      jax.random.PRNGKey(3))
  jax.tree.map(np.testing.assert_array_equal, state["model"]["params"]["head"],
               client["model"]["params"]["head"])
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                       state["model"]["params"]["base"], server["params"]["base"])
  assert max(jax.tree.leaves(moved)) > 0
  assert float(metrics["alignment_loss"]) > 0 and float(upload["fisher"]) > 0
  jax.tree.map(np.testing.assert_array_equal, upload["params"], state["model"]["params"])
  plain = make_algorithm("FedAS", model, spec, {"alignment_epochs": 0})
  base, loss = plain.aligned_base(server["params"], client["model"], cd, None)
  jax.tree.map(np.testing.assert_array_equal, base, server["params"]["base"])
  assert float(loss) == 0


def test_fedas_hyperparameters_and_validation():
  assert get_algorithm("fedas").hyperparameters() == {
      "alignment_learning_rate": 0.01, "alignment_batch_size": 16, "alignment_epochs": 1}
  model = _model()
  for params, needle in [({"alignment_batch_size": 0}, "alignment_batch_size=0"),
                         ({"alignment_epochs": -1}, "alignment_epochs=-1"),
                         ({"alignment_learning_rate": -0.1}, "alignment_learning_rate=-0.1"),
                         ({"alignment_learning_rate": float("inf")},
                          "alignment_learning_rate=inf")]:
    with pytest.raises(ConfigError, match=needle) as e:
      make_algorithm("FedAS", model, LocalSpec(), params)
    assert "\n" not in str(e.value) and "must be" in str(e.value)


def _context(name, counts=(20, 30, 40)):
  data = _small_data(num_clients=4)
  return (make_model(name, data.sample_shape, data.num_classes),
          SettingsContext(name, jnp.asarray(data.x[0]), np.asarray(counts)))


@pytest.mark.parametrize("algorithm", ["FedAS", "FedPAC"])
def test_model_without_a_base_is_refused(algorithm):
  model, context = _context("mlr")
  with pytest.raises(ConfigError, match="no base parameters") as e:
    make_algorithm(algorithm, model, LocalSpec()).check_settings(context)
  assert "\n" not in str(e.value) and "'mlr'" in str(e.value)
  model, context = _context("dnn")
  assert make_algorithm(algorithm, model, LocalSpec()).check_settings(context) == []


def test_fedas_warns_when_clients_have_no_alignment_batch():
  model, context = _context("dnn", counts=(8, 30, 12))
  (warning,) = make_algorithm("FedAS", model, LocalSpec()).check_settings(context)
  assert "alignment_batch_size=16" in warning and "2 of 3 clients" in warning
  assert not make_algorithm("FedAS", model, LocalSpec(),
                            {"alignment_batch_size": 8}).check_settings(context)


# ---------------------------------------------------------------- FedPAC: statistics
def np_feature_statistics(features, labels, num_classes):
  """PFLlib's statistics_extraction: per class the stacked features F_k; py the class
  shares; v = Σ_k py_k·tr(F_kᵀF_k)/n_k − py_k²·‖μ_k‖², divided by the sample count."""
  n = len(labels)
  py = np.bincount(labels, minlength=num_classes) / n
  v, h = 0.0, np.zeros((num_classes, features.shape[1]))
  for k in range(num_classes):
    feat_k = features[labels == k]
    if len(feat_k):
      mu = feat_k.mean(0)
      h[k] = py[k] * mu
      v += py[k] * np.trace(feat_k.T @ feat_k / len(feat_k)) - py[k] ** 2 * np.sum(mu * mu)
  return v / n, h


def test_feature_statistics_match_pfllib():
  r = np.random.default_rng(3)
  x = r.normal(size=(70, 5)).astype(np.float32)
  y = r.choice([0, 1, 3], size=70).astype(np.int32)  # class 2 absent
  proj = r.normal(size=(5, 6)).astype(np.float32)
  embed = lambda x: jnp.tanh(x @ proj) + 0.5
  data = _client_data(x, y, 61, width=70)  # the last 9 rows belong to nobody
  v, h = jax.jit(lambda d: pac_lib.feature_statistics(embed, d, 4))(data)
  v_ref, h_ref = np_feature_statistics(np.tanh(x[:61] @ proj) + 0.5, y[:61], 4)
  np.testing.assert_allclose(v, v_ref, rtol=1e-4)
  np.testing.assert_allclose(h, h_ref, rtol=1e-5, atol=1e-6)
  assert not np.any(np.asarray(h)[2])


# ---------------------------------------------------------------- FedPAC: the QP
def np_simplex_projection(z):
  """The projection onto the simplex by bisection on τ in Σ max(z − τ, 0) = 1 (float64)."""
  low, high = z.min() - 1.0, z.max()
  for _ in range(200):
    tau = (low + high) / 2
    low, high = (tau, high) if np.maximum(z - tau, 0).sum() > 1 else (low, tau)
  return np.maximum(z - (low + high) / 2, 0)


def test_masked_simplex_projection_matches_bisection_on_the_valid_entries():
  r = np.random.default_rng(4)
  z = (r.normal(size=(24, 7)) * 2).astype(np.float32)
  valid = r.uniform(size=(24, 7)) > 0.4
  valid[np.arange(24), r.integers(0, 7, 24)] = True
  valid[0] = [True] + [False] * 6  # one valid entry: it gets everything
  got = np.asarray(jax.jit(jax.vmap(pac_lib.masked_simplex_projection))(z, valid))
  for row, mask, out in zip(z, valid, got):
    assert np.all(out[~mask] == 0) and np.all(out >= 0)
    np.testing.assert_allclose(out[mask], np_simplex_projection(row[mask].astype(np.float64)),
                               atol=1e-6)
  assert got[0, 0] == pytest.approx(1.0, abs=1e-6)
  none = pac_lib.masked_simplex_projection(jnp.ones(3), jnp.zeros(3, bool))
  np.testing.assert_array_equal(none, 0)


def np_qp_matrix(v, h, i):
  """PFLlib's solve_quadratic matrix for client i: diag(v) + dist, with dist[j1, j2] the
  trace of Σ_k (h_i[k] − h_j1[k])(h_i[k] − h_j2[k])ᵀ, built pair by pair."""
  n = len(v)
  dist = np.zeros((n, n))
  for j1 in range(n):
    for j2 in range(j1, n):
      d = sum(np.trace(np.outer(h[i, k] - h[j1, k], h[i, k] - h[j2, k]))
              for k in range(h.shape[1]))
      dist[j1, j2] = dist[j2, j1] = d
  return np.diag(v) + dist


def slsqp_simplex(p):
  n = len(p)
  result = minimize(lambda a: a @ p @ a, np.full(n, 1 / n), jac=lambda a: 2 * p @ a,
                    method="SLSQP", bounds=[(0, None)] * n,
                    constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1,
                                  "jac": lambda a: np.ones(n)}],
                    options={"ftol": 1e-16, "maxiter": 1000})
  return result.x


def _qp_problem(r, size, classes=4, dim=5, slots=None):
  """Clients with related class distributions and features (solutions mix several heads),
  in ``slots`` slots (the rest invalid)."""
  slots = slots or size
  share = r.dirichlet(np.ones(classes) * 0.5, slots)
  mean = 1 + r.normal(size=(1, classes, dim)) + 0.4 * r.normal(size=(slots, classes, dim))
  h = (share[:, :, None] * mean).astype(np.float32)
  v = (r.uniform(0.2, 1.0, slots) * 10 ** r.uniform(-2, 0)).astype(np.float32)
  valid = np.zeros(slots, bool)
  valid[r.choice(slots, size, replace=False)] = True
  return v, h, valid


def test_head_weights_match_slsqp_on_random_problems():
  """The batched QP of every client against scipy's SLSQP on PFLlib's matrix (float64), over
  the valid clients only (3 to 8 of 8 slots); invalid rows and columns are 0."""
  r = np.random.default_rng(5)
  solve = jax.jit(pac_lib.head_weights_qp)
  mixed = 0
  for size in range(3, 9):
    v, h, valid = _qp_problem(r, size, slots=8)
    alpha = np.asarray(solve(v, h, valid))
    assert np.all(alpha[~valid] == 0) and np.all(alpha[:, ~valid] == 0)
    for i in np.flatnonzero(valid):
      p = np_qp_matrix(v[valid].astype(np.float64), h[valid].astype(np.float64),
                       int(valid[:i].sum()))
      reference = slsqp_simplex(p)
      np.testing.assert_allclose(alpha[i, valid], reference, atol=1e-5, err_msg=f"{size}/{i}")
      got, best = alpha[i, valid] @ p @ alpha[i, valid], reference @ p @ reference
      assert got <= best * (1 + 1e-5) + 1e-9
      mixed += int((reference > 1e-3).sum() > 1)
  assert mixed >= 10  # the problems are not trivial: most clients mix several heads
  # degenerate problems: one valid client takes its own head; identical clients with v = 0
  # (every point optimal) stay finite on the simplex
  one = np.asarray(solve(v, h, np.eye(8, dtype=bool)[3]))
  np.testing.assert_allclose(one, np.eye(8)[3][:, None] * np.eye(8)[3][None], atol=1e-6)
  flat = np.asarray(solve(np.zeros(8, np.float32), np.ones_like(h), np.ones(8, bool)))
  assert np.all(np.isfinite(flat)) and np.allclose(flat.sum(1), 1, atol=1e-5)
  # PFLlib's clean-up: weights below 1e-3 become 0, the others are kept as they are
  cut = np.asarray(jax.jit(pac_lib.combination_weights)(v, h, valid))
  np.testing.assert_array_equal(cut, np.where(alpha > 1e-3, alpha, 0))


def test_scrambled_weights_relabel_the_uploading_clients():
  """PFLlib's ordering bug: α'[π(a), π(j)] = α[a, j] for a random permutation π of the
  valid slots, the same π wherever padding slots sit."""
  valid = np.array([True, False, True, True, False, True])
  alpha = np.zeros((6, 6), np.float32)
  vs = np.flatnonzero(valid)
  for a_rank, a in enumerate(vs):
    for j_rank, j in enumerate(vs):
      alpha[a, j] = 10 * a_rank + j_rank + 1
  key = jax.random.PRNGKey(7)
  both = jax.jit(lambda a, packed: (pac_lib.scrambled_weights(a, jnp.asarray(valid), key),
                                    pac_lib.scrambled_weights(packed, jnp.ones(4, bool), key)))
  scrambled, packed = map(np.asarray, both(alpha, alpha[np.ix_(vs, vs)]))
  assert np.all(scrambled[~valid] == 0) and np.all(scrambled[:, ~valid] == 0)
  # π from the diagonal: α[a, a] = 11·rank(a) + 1 lands at π(a)
  pi = {int(np.argwhere(np.isclose(np.diag(scrambled), 11 * k + 1))[0, 0]): k for k in range(4)}
  perm = np.array([vs[pi[s]] for s in vs])  # slot π⁻¹ of each valid slot
  np.testing.assert_array_equal(scrambled[np.ix_(vs, vs)], alpha[np.ix_(perm, perm)])
  assert sorted(pi.values()) == [0, 1, 2, 3]
  # the same relabelling of the valid clients without the padding slots
  np.testing.assert_array_equal(packed, scrambled[np.ix_(vs, vs)])


# ---------------------------------------------------------------- FedPAC: the algorithm
def _pac(data, **params):
  spec = LocalSpec(learning_rate=0.1, batch_size=4,
                   steps_per_epoch=int(data.train_count.max()) // 4)
  return make_algorithm("FedPAC", _model(data), spec, params or None)


def test_fedpac_server_combines_heads_and_scatters_them_by_id():
  data = _small_data(num_clients=4)
  r = np.random.default_rng(6)
  alg = _pac(data)
  server, _ = alg.init(jax.random.PRNGKey(0), jnp.asarray(data.x[0]), 6)
  k, classes, dim = 4, data.num_classes, server["protos"].shape[1]
  v, h, _ = _qp_problem(r, k, classes=classes, dim=dim)
  heads = jax.tree.map(lambda t: jnp.asarray(r.normal(size=(k,) + t.shape[1:]), t.dtype),
                       server["heads"])
  uploads = {"base": jax.tree.map(lambda t: jnp.asarray(r.normal(size=(k,) + t.shape),
                                                        t.dtype), server["base"]),
             "head": heads,
             "protos": jnp.asarray(r.normal(size=(k, classes, dim)), jnp.float32),
             "present": jnp.asarray(r.uniform(size=(k, classes)) > 0.3),
             "variance": jnp.asarray(v), "h": jnp.asarray(h),
             "id": jnp.asarray([4, 1, 0, 5], jnp.int32)}
  weights = jnp.asarray([3.0, 5.0, 0.0, 2.0])  # client 0's slot dropped
  compat_alg = _pac(data, pfllib_compat=True)
  key = jax.random.PRNGKey(1)
  new, compat = jax.jit(lambda *a: (alg.server_update(*a), compat_alg.server_update(*a)))(
      server, uploads, weights, key)
  valid = np.asarray(weights) > 0
  alpha = np.zeros((k, k))
  for i in np.flatnonzero(valid):
    alpha[i, valid] = slsqp_simplex(np_qp_matrix(v[valid].astype(np.float64),
                                                 h[valid].astype(np.float64),
                                                 int(valid[:i].sum())))
  alpha = np.where(alpha > 1e-3, alpha, 0)
  for name in ("kernel", "bias"):
    table, uploaded = np.asarray(new["heads"][name]), np.asarray(heads[name])
    combined = np.tensordot(alpha, uploaded, axes=1)
    for slot, cid in enumerate([4, 1, 0, 5]):
      expected = combined[slot] if valid[slot] else np.asarray(server["heads"][name][cid])
      np.testing.assert_allclose(table[cid], expected, atol=1e-4, err_msg=f"{name} {cid}")
    for cid in (2, 3):  # not in the cohort: unchanged
      np.testing.assert_array_equal(table[cid], server["heads"][name][cid])
  np.testing.assert_array_equal(new["head_round"], [-1, 0, -1, -1, 0, 0])
  assert int(new["round"]) == 1
  w = np.asarray(weights) / np.asarray(weights).sum()
  jax.tree.map(lambda got, up: np.testing.assert_allclose(got, np.tensordot(w, up, axes=1),
                                                          rtol=1e-5, atol=1e-6),
               new["base"], uploads["base"])
  has = np.asarray(uploads["present"]) & valid[:, None]
  for c in range(classes):
    assert bool(new["present"][c]) == has[:, c].any()
    if has[:, c].any():
      np.testing.assert_allclose(new["protos"][c],
                                 np.asarray(uploads["protos"])[has[:, c], c].mean(0),
                                 rtol=1e-5, atol=1e-6)
  # pfllib_compat: the same weights relabelled by scrambled_weights (tested above), applied
  # as PFLlib's loop does: in upload order, each combined head written back into the list the
  # later combinations read (its uploaded heads are the clients' live modules).
  scrambled = np.asarray(pac_lib.scrambled_weights(jnp.asarray(alpha, jnp.float32),
                                                   jnp.asarray(valid), key))
  assert not np.allclose(scrambled, alpha)  # a non-trivial relabelling with this key
  order = np.asarray(pac_lib.valid_row_order(key, jnp.asarray(valid)))[:valid.sum()]
  for name in ("kernel", "bias"):
    live = np.where(valid.reshape((-1,) + (1,) * (heads[name].ndim - 1)),
                    np.asarray(heads[name], np.float64), 0.0)
    for t in order:
      live[t] = np.tensordot(scrambled[t], live, axes=1)
    for slot, cid in enumerate([4, 1, 0, 5]):
      if valid[slot]:
        np.testing.assert_allclose(compat["heads"][name][cid], live[slot], atol=1e-4)
  jax.tree.map(np.testing.assert_array_equal, compat["base"], new["base"])


def test_combined_in_place_is_pfllibs_loop_over_live_heads():
  """Slot t = order[0], order[1], ... takes Σ_j α[t, j]·H[j] of the heads as they are then
  (earlier slots already combined); invalid slots stay untouched; a spread α makes the order
  matter (one-shot combination differs)."""
  r = np.random.default_rng(3)
  alpha = r.uniform(size=(5, 5))
  valid = np.array([True, True, False, True, True])
  alpha = np.where(valid[:, None] & valid[None], alpha, 0.0)
  alpha /= np.maximum(alpha.sum(1, keepdims=True), 1e-9)
  heads = {"kernel": np.where(valid[:, None, None], r.normal(size=(5, 3, 2)), 0.0),
           "bias": np.where(valid[:, None], r.normal(size=(5, 2)), 0.0)}
  order = np.array([3, 0, 4, 1, 2])
  got = jax.jit(pac_lib.combined_in_place)(jnp.asarray(alpha, jnp.float32),
                                           jax.tree.map(lambda a: jnp.asarray(a, jnp.float32),
                                                        heads),
                                           jnp.asarray(valid), jnp.asarray(order))
  for name, table in heads.items():
    live = table.copy()
    for t in order[:4]:
      live[t] = np.tensordot(alpha[t], live, axes=1)
    np.testing.assert_allclose(got[name], live, rtol=1e-5, atol=1e-6)
    assert not np.allclose(live, np.tensordot(alpha, table, axes=1), atol=1e-3)


def test_fedpac_head_of_a_client_that_trained_and_dropped_out_is_its_own():
  data = _small_data(num_clients=4)
  alg = _pac(data)
  server, clients = alg.init(jax.random.PRNGKey(0), jnp.asarray(data.x[0]), 3)
  client = jax.tree.map(lambda a: a[1], clients)
  own = jax.tree.map(lambda a: a + 1.0, client["head"])
  table = jax.tree.map(lambda a: a - 1.0, server["heads"])
  server = dict(server, heads=table, head_round=jnp.asarray([-1, 2, -1]), round=jnp.int32(4))
  pick = lambda trained: alg.current_head(server, dict(client, head=own,
                                                       trained_round=jnp.int32(trained)))
  # combined in round 2 after training in round 2 → the server's; trained in 3 (dropped) → own
  jax.tree.map(np.testing.assert_array_equal, pick(2), jax.tree.map(lambda t: t[1], table))
  jax.tree.map(np.testing.assert_array_equal, pick(3), own)


def test_fedpac_client_statistics_and_prototypes():
  """With lr ~0 nothing moves: ``(v, h)`` and the prototypes are the numpy statistics and
  class means of the received model's features; the client keeps its trained head and
  records the round."""
  data = _small_data(num_clients=4)
  alg = dataclasses_replace_lr(_pac(data, lam=2.0), 1e-30)
  server, clients = alg.init(jax.random.PRNGKey(0), jnp.asarray(data.x[0]), 4)
  server = dict(server, round=jnp.int32(3))
  client = jax.tree.map(lambda a: a[2], clients)
  cd = ClientData(jnp.asarray(data.x), jnp.asarray(data.y), jnp.asarray(data.train_idx[2]),
                  jnp.asarray(data.train_count[2]))
  state, upload, _ = jax.jit(alg.client_update)(server, client, cd, jax.random.PRNGKey(5))
  rows = np.asarray(data.train_idx[2][: int(data.train_count[2])])
  variables = alg.variables(server, client)
  feats = np.asarray(alg.model.apply(variables, jnp.asarray(data.x[rows]), method="features"))
  v_ref, h_ref = np_feature_statistics(feats, np.asarray(data.y[rows]), data.num_classes)
  np.testing.assert_allclose(upload["variance"], v_ref, rtol=1e-4)
  np.testing.assert_allclose(upload["h"], h_ref, rtol=1e-4, atol=1e-6)
  for c in range(data.num_classes):
    mine = np.asarray(data.y[rows]) == c
    assert bool(upload["present"][c]) == mine.any()
    if mine.any():
      np.testing.assert_allclose(upload["protos"][c], feats[mine].mean(0), rtol=1e-4,
                                 atol=1e-6)
  assert int(state["trained_round"]) == 3 and int(state["id"]) == 2
  jax.tree.map(np.testing.assert_array_equal, state["head"], upload["head"])


def dataclasses_replace_lr(alg, lr):
  import dataclasses  # pylint: disable=import-outside-toplevel
  return dataclasses.replace(alg, local=dataclasses.replace(alg.local, learning_rate=lr))


def test_fedpac_hyperparameters_and_validation():
  assert get_algorithm("FedPAC").hyperparameters() == {"lam": 1.0, "pfllib_compat": False}
  model = _model()
  for params, needle in [({"lam": -1.0}, "lam=-1.0"), ({"lam": float("nan")}, "lam=nan"),
                         ({"pfllib_compat": 1}, "pfllib_compat=1")]:
    with pytest.raises(ConfigError, match=needle) as e:
      get_algorithm("FedPAC")(model=model, local=LocalSpec(), **params)
    assert "\n" not in str(e.value) and "must be" in str(e.value)


# ---------------------------------------------------------------- 1 vs 8 devices
def _server_inputs(name, slots=16):
  """A server state and ``slots`` random uploads shaped as the clients' are, five of weight 0
  (unselected, dropped or padding) scattered among them."""
  data = _small_data(num_clients=4)
  alg = make_algorithm(name, _model(data), LocalSpec())
  server, _ = alg.init(jax.random.PRNGKey(0), jnp.asarray(data.x[0]), slots)
  r = np.random.default_rng(8)
  rows = lambda tree: jax.tree.map(
      lambda a: jnp.asarray(r.uniform(0.1, 1.0, (slots,) + a.shape), jnp.float32), tree)
  if name == "FedAS":
    uploads = {"params": rows(server["params"]), "fisher": rows(jnp.zeros(()))}
  else:
    uploads = {"base": rows(server["base"]),
               "head": rows(jax.tree.map(lambda t: t[0], server["heads"])),
               "protos": rows(server["protos"]), "variance": rows(jnp.zeros(())),
               "h": rows(server["protos"]),
               "present": jnp.asarray(r.uniform(size=(slots,) + server["present"].shape) > .3),
               "id": jnp.asarray(r.permutation(slots), jnp.int32)}
  weights = r.integers(1, 9, slots).astype(np.float32)
  weights[[1, 6, 7, 12, 15]] = 0
  return alg, server, uploads, jnp.asarray(weights)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
@pytest.mark.parametrize("name", ["FedAS", "FedPAC"])
def test_server_on_eight_devices_equals_one(name):
  """The non-linear servers (FedAS's Fisher-weighted average; FedPAC's batched QPs, head
  combination and scatter by id) on uploads sharded over the ``clients`` axis of 8 devices
  (16 slots, 5 of weight 0): the server state is replicated and equals the one-device state
  (the pattern of tests/test_sharding.py's server test)."""
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel
  alg, server, uploads, weights = _server_inputs(name)
  key = jax.random.PRNGKey(2)
  one = jax.jit(alg.server_update)(server, uploads, weights, key)
  mesh = engine_lib.client_mesh(8)
  sharded = NamedSharding(mesh, PartitionSpec(engine_lib.CLIENTS))
  replicated = NamedSharding(mesh, PartitionSpec())
  put = lambda tree, where: jax.tree.map(lambda a: jax.device_put(a, where), tree)
  many = jax.jit(alg.server_update, out_shardings=replicated)(
      put(server, replicated), put(uploads, sharded), put(weights, sharded), key)
  assert_replicated(many)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), one, many)
  if name == "FedPAC":
    assert (np.asarray(many["head_round"]) == 0).sum() == 11  # every valid slot's client


# ---------------------------------------------------------------- learning
# Best test accuracy after 4 rounds on the bundled digits (20 clients, Dirichlet 0.1, the DNN,
# lr 0.05, batch 10, 1 local epoch; Config(algorithm=..., model="dnn", learning_rate=0.05,
# global_rounds=4, eval_gap=4, seed=s) with run_experiment), seeds 0 / 1 / 2, measured
# 2026-12:
#   FedAvg                       .660 / .635 / .592
#   FedAS                        .890 / .904 / .888
#   FedPAC                       .890 / .915 / .875
#   FedPAC, pfllib_compat=True   .884 / .897 / .849  (heads scrambled among the cohort)
# Both personalise well above FedAvg; the bars sit ~0.07 below the smallest measured value
# and 0.14 above FedAvg's best.
LEARNING_BARS = {"FedAS": 0.81, "FedPAC": 0.80}


@pytest.mark.parametrize("name", sorted(LEARNING_BARS))
def test_learns_on_digits(name, tmp_path):
  config = Config(algorithm=name, model="dnn", learning_rate=0.05, global_rounds=4,
                  eval_gap=4, seed=0, progress=False, out=str(tmp_path))
  results = run_experiment(config, log=lambda msg: None)
  history = results.runs[0].history
  assert history["test_acc"][0] < 0.3  # the untrained model is near chance
  assert results.best_test_acc[0] > LEARNING_BARS[name], history["test_acc"]
