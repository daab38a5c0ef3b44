"""FedCAC and FedCross: their rules against numpy references written from PFLlib's procedures
(critical masks, overlaps and customised models; PFLlib's similarity walk and collaborator
scan, cross-aggregation, the middleware assignment), the client and server updates, the
compat switches, validation, 1 vs 8 devices for both non-linear servers, and learning on
digits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lib import Config, run_experiment
from fedjax_lib.algorithms import make_algorithm
from fedjax_lib.algorithms.base import SettingsContext, abstract_variables
from fedjax_lib.algorithms.fedala import parameter_order
from fedjax_lib.algorithms.fedcac import (collaboration_weights, critical_masks,
                                          customized_models, kth_largest, overlap_rates)
from fedjax_lib.algorithms.fedcross import (collaborators, cross_aggregate, draw_assignment,
                                            pair_indices, similarities, trained_middleware)
from fedjax_lib.core.local import ClientData, LocalSpec
from fedjax_lib.errors import ConfigError
from fedjax_lib.models import make_model
from tests.test_engine import _small_data
from tests.test_sharding import one_and_eight_device_states

DIM, CLASSES = 4, 3
SPEC = LocalSpec(learning_rate=0.3, batch_size=4, local_epochs=1, steps_per_epoch=2)


def _tree_close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x, np.float64),
                                                       np.asarray(y, np.float64),
                                                       rtol=rtol, atol=atol), a, b)


def _client_data(seed=0, count=8):
  r = np.random.default_rng(seed)
  x = r.normal(size=(12, DIM)).astype(np.float32)
  y = r.integers(0, CLASSES, 12)
  return ClientData(jnp.asarray(x), jnp.asarray(y), jnp.arange(12), jnp.asarray(count))


def _stacked(tree, num, r, scale=1.0):
  """``num`` random float32 copies of ``tree``'s shapes, stacked."""
  return jax.tree.map(lambda a: (scale * r.normal(size=(num,) + a.shape)).astype(np.float32),
                      tree)


# ----------------------------------------------------------------------------- FedCAC
def _numpy_mask(before, after, tau):
  """clientCAC.evaluate_critical_parameter for one tensor, in float32 as PyTorch."""
  c = np.abs((after - before) * after).astype(np.float32)
  metric = c.ravel()
  top = np.sort(metric)[::-1][: int(tau * metric.size)]
  thresh = top[-1] if len(top) else np.inf
  if thresh <= 1e-10:
    nonzero = metric[metric > 1e-20]
    if len(nonzero):
      thresh = nonzero.min()
  return c >= thresh


TAUS = (0.0, 0.1, 0.3, 0.5, 1.0)
STATIC_TAUS = (0.0, 0.3, 1.0)  # no selection, a selection, the minimum


def test_critical_masks_match_numpy_and_the_zero_threshold_rules():
  r = np.random.default_rng(0)
  before = {"a": r.normal(size=(5, 6)), "b": r.normal(size=7), "c": r.normal(size=4),
            "d": r.normal(size=(3, 3)), "e": r.normal(size=2)}
  before = jax.tree.map(lambda v: v.astype(np.float32), before)
  after = jax.tree.map(lambda v: (v + 0.1 * r.normal(size=v.shape)).astype(np.float32), before)
  after["b"][:5] = before["b"][:5]             # most entries unchanged: threshold 0 is replaced
  after["c"] = before["c"].copy()              # nothing changed: every entry critical
  after["d"][0, 0] = 0.0                       # a zero weight has zero sensitivity
  after["e"] = before["e"] + np.float32([1e-6, 0.0])  # a tiny change and none
  static = jax.jit(lambda b, a: [critical_masks(b, a, t) for t in STATIC_TAUS])(before, after)
  # a traced (swept) τ: float32 ⌊τ·n⌋, which agrees with PFLlib's on these sizes
  traced = jax.jit(jax.vmap(critical_masks, (None, None, 0)))(before, after,
                                                               jnp.asarray(TAUS, jnp.float32))
  for i, tau in enumerate(TAUS):
    for k in before:
      want = _numpy_mask(before[k], after[k], tau)
      np.testing.assert_array_equal(traced[k][i], want, err_msg=f"{k} {tau} traced")
      if tau in STATIC_TAUS:
        np.testing.assert_array_equal(static[STATIC_TAUS.index(tau)][k], want,
                                      err_msg=f"{k} {tau}")
  assert static[-1]["c"].all()
  assert not static[0]["a"].any()  # ⌊τ·n⌋ = 0: threshold +∞
  assert traced["a"][1].sum() == 3  # the top ⌊0.1·30⌋
  # the selection equals a sort, ties and zeros included
  values = np.abs(r.normal(size=50)).astype(np.float32)
  values[:10], values[10:15] = 0.0, values[20]
  ks = np.arange(1, 51)
  np.testing.assert_array_equal(jax.jit(jax.vmap(kth_largest, (None, 0)))(values, ks),
                                np.sort(values)[::-1][ks - 1])


def _numpy_customised(masks, uploads, arrived, factor):
  """servercac.get_customized_global_models over the arrived slots: (overlap, models)."""
  slots = [s for s in range(len(arrived)) if arrived[s]]
  flat = lambda s: np.concatenate([np.ravel(m[s]) for m in masks]).astype(np.int64)
  overlap = {(i, j): 1 - np.abs(flat(i) - flat(j)).sum() / float(flat(i).sum() * 2)
             for i in slots for j in slots if i != j}
  if len(slots) < 2:  # alone: its own model (PFLlib's max of no overlap raises)
    return overlap, {i: [np.float64(u[i]) for u in uploads] for i in slots}
  values = np.array(list(overlap.values()))
  mean = values.sum() / (len(slots) * (len(slots) - 1))
  threshold = mean + factor * (values.max() - mean)
  models = {}
  for i in slots:
    members = [i] + [j for j in slots if j != i and overlap[i, j] >= threshold]
    models[i] = [np.mean([np.float64(u[j]) for j in members], 0) for u in uploads]
  return overlap, models


def test_overlaps_collaboration_and_customised_models_match_numpy():
  r = np.random.default_rng(1)
  num_slots, num_clients = 6, 8
  masks = [r.random((num_slots, 5, 4)) < 0.6, r.random((num_slots, 3)) < 0.5]
  masks[0][4], masks[1][4] = masks[0][1], masks[1][1]  # two identical masks: overlap 1
  uploads = [r.normal(size=(num_slots, 5, 4)).astype(np.float32),
             r.normal(size=(num_slots, 3)).astype(np.float32)]
  arrived = np.array([True, True, False, True, True, False])
  for u in uploads:
    u[2] = np.nan  # a dropped slot's upload never reaches a result
  ids = np.array([6, 0, 3, 2, 5, num_clients])  # the last slot is padding
  previous = [r.normal(size=(num_clients,) + u.shape[1:]).astype(np.float32) for u in uploads]
  # (factor, arrived): climbing thresholds, past the largest overlap, a single arrival, and
  # the threshold at the largest overlap (round ⌊β⌋ − 1: only the identical masks, overlap 1)
  factors = np.array([0.01, 0.5, 1.5, 0.1, 1.0], np.float32)
  cases = np.stack([arrived] * 3 + [np.eye(num_slots, dtype=bool)[3], arrived])

  @jax.jit
  def customise(masks, uploads, previous):
    overlap = overlap_rates(masks)

    def one(factor, arrived):
      weights = collaboration_weights(overlap, arrived, factor)
      return weights, customized_models(previous, uploads, jnp.asarray(ids), weights, arrived)
    return overlap, jax.vmap(one)(jnp.asarray(factors), jnp.asarray(cases))

  overlap, (weights, new) = customise(masks, uploads, previous)
  for c, (factor, arrived_now) in enumerate(zip(factors, cases)):
    ref_overlap, ref_models = _numpy_customised(masks, uploads, arrived_now, factor)
    for (i, j), value in ref_overlap.items():
      np.testing.assert_allclose(overlap[i, j], value, rtol=1e-6)
    for n in range(num_clients):
      slot = [s for s in range(num_slots) if arrived_now[s] and ids[s] == n]
      expected = ref_models[slot[0]] if slot else [p[n] for p in previous]
      for got, want in zip(new, expected):
        np.testing.assert_allclose(got[c, n], want, rtol=1e-5, atol=1e-6)
  # past the largest overlap, or alone: every arrived client keeps its own model
  np.testing.assert_array_equal(weights[2], np.diag(arrived.astype(np.float32)))
  np.testing.assert_array_equal(weights[3], np.diag(cases[3].astype(np.float32)))
  assert weights[0][1, 4] > 0 and weights[0][4, 1] > 0  # identical masks collaborate
  np.testing.assert_array_equal(weights[4] > 0, np.diag(arrived) | np.isin(
      np.arange(num_slots), [1, 4])[:, None] & np.isin(np.arange(num_slots), [1, 4])[None, :])
  # an empty mask overlaps nothing
  empty = overlap_rates([jnp.zeros((2, 4), bool).at[1].set(True)])
  np.testing.assert_array_equal(empty[0], [0.0, 0.0])


def _fedcac(**params):
  return make_algorithm("FedCAC", make_model("mlr", (DIM,), CLASSES), SPEC, params)


def test_fedcac_client_trains_the_mix_and_uploads_its_mask():
  algo = _fedcac(tau=0.4)
  fedavg = make_algorithm("FedAvg", algo.model, SPEC)
  r = np.random.default_rng(2)
  server, clients = algo.init(jax.random.key(0), jnp.zeros(DIM), 4)
  assert clients["id"].tolist() == [0, 1, 2, 3] and not any(
      m.any() for m in jax.tree.leaves(clients["mask"]))
  server = dict(server, customized=_stacked(server["params"], 4, r))
  client = {"id": jnp.int32(2), "mask": jax.tree.map(lambda a: r.random(a.shape[1:]) < 0.5,
                                                     clients["mask"])}
  mixed = jax.tree.map(lambda m, v, g: np.where(m, v[2], g), client["mask"],
                       server["customized"], server["params"])
  data, key = _client_data(), jax.random.key(3)
  fresh = jax.tree.map(lambda a: a[0], clients)
  x = data.x[:5]

  @jax.jit
  def run(server, client, mixed):
    new_state, upload, _ = algo.client_update(server, client, data, key)
    _, trained, _ = fedavg.client_update({"params": mixed}, {}, data, key)
    logits = [algo.predict(server, client, x), algo.model.apply(mixed, x),
              algo.predict(server, fresh, x), algo.model.apply(server["params"], x)]
    return new_state, upload, trained, logits

  new_state, upload, trained, logits = run(server, client, mixed)
  _tree_close(upload["params"], trained)
  masks = jax.tree.map(lambda b, a: _numpy_mask(np.asarray(b), np.asarray(a), 0.4), mixed,
                       trained)
  jax.tree.map(np.testing.assert_array_equal, upload["mask"], masks)
  jax.tree.map(np.testing.assert_array_equal, new_state["mask"], masks)
  assert int(upload["id"]) == int(new_state["id"]) == 2
  np.testing.assert_allclose(logits[0], logits[1], rtol=1e-6)
  # a client that never trained has an empty mask: it is sent (and evaluated with) w_g
  np.testing.assert_allclose(logits[2], logits[3], rtol=1e-6)
  size = sum(a.size for a in jax.tree.leaves(server["params"]))
  assert float(algo.upload_traffic(upload).floats) == size
  assert float(algo.upload_traffic(upload).bytes) == 4 * size + size / 8
  assert float(algo.download_traffic(server).floats) == 2 * size


@pytest.mark.parametrize("compat", [False, True])
def test_fedcac_server_customises_the_arrived_clients(compat):
  algo = _fedcac(beta=2.9, pfllib_compat=compat)  # ⌊β⌋ = 2
  r = np.random.default_rng(3)
  server, _ = algo.init(jax.random.key(0), jnp.zeros(DIM), 5)
  server = dict(server, customized=_stacked(server["params"], 5, r))
  uploads = {"params": _stacked(server["params"], 4, r),
             "mask": jax.tree.map(lambda a: r.random((4,) + a.shape) < 0.5, server["params"]),
             "id": jnp.asarray([4, 1, 0, 2], jnp.int32)}
  weights = np.array([3.0, 5.0, 0.0, 2.0], np.float32)
  update = jax.jit(algo.server_update)
  for rounds in (0, 1):
    state = dict(server, round=jnp.int32(rounds))
    new = update(state, uploads, jnp.asarray(weights), jax.random.key(0))
    assert int(new["round"]) == rounds + 1
    _tree_close(new["params"], jax.tree.map(
        lambda u: np.tensordot(weights / weights.sum(), np.float64(u), axes=1),
        uploads["params"]))
    leaves = lambda t: jax.tree.leaves(t)
    _, ref = _numpy_customised([np.asarray(m) for m in leaves(uploads["mask"])],
                               [np.asarray(u) for u in leaves(uploads["params"])],
                               weights > 0, (rounds + 1) / 2)
    for n in range(5):
      slot = [s for s in range(4) if weights[s] > 0 and int(uploads["id"][s]) == n]
      customise = slot and not (compat and rounds == 0)
      expected = ref[slot[0]] if customise else [v[n] for v in leaves(server["customized"])]
      for got, want in zip(leaves(new["customized"]), expected):
        np.testing.assert_allclose(got[n], want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- FedCross
def _cosine(a, b):
  return float(a @ b / (max(np.linalg.norm(a), 1e-8) * max(np.linalg.norm(b), 1e-8)))


def _pfllib_similarity(models, order):
  """servercross.calculate_similarity's table (diagonal 0), ``models`` a list of
  ``{path: array}``, walked in ``order``."""
  num = len(models)
  table = np.zeros((num, num))
  for k in range(num):
    for j in range(k):
      s = 0.0
      sub_a = sub_b = None
      for cnt, path in enumerate(order):
        a, b = np.ravel(models[k][path]), np.ravel(models[j][path])
        if cnt % 2 == 0:
          sub_a, sub_b = a, b
        else:
          sub_a, sub_b = np.r_[sub_a, a], np.r_[sub_b, b]
          s += _cosine(sub_a, sub_b)
      s += _cosine(sub_a, sub_b)
      table[k, j] = table[j, k] = s
  return table


def _pfllib_partner(table, j, strategy, offset):
  """servercross.cross_aggregation's scan for model j."""
  num = len(table)
  maxtag, submax, mintag = 0, 1, (j + 1) % num
  for p in range(num):
    if table[j][p] > table[j][maxtag]:
      submax, maxtag = maxtag, p
    elif table[j][p] > table[j][submax]:
      submax = p
    if table[j][p] < table[j][mintag] and p != j:
      mintag = p
  return {0: (j + offset) % num, 1: mintag, 2: maxtag}[strategy]


def _get(tree, path):
  for name in path:
    tree = tree[name]
  return tree


def test_similarities_match_the_cosine_and_pfllib_walk():
  r = np.random.default_rng(4)
  # 5 tensors (an odd last one) and the DNN's 4 (its last pair counted twice); walk orders
  # that differ from the sorted leaf order
  shapes = {"w1": (3, 2), "b1": (2,), "w2": (2, 2), "b2": (2,), "w3": (4,)}
  odd_order = [("w1",), ("b1",), ("w2",), ("b2",), ("w3",)]
  dnn = make_model("dnn", (DIM,), CLASSES, hidden_dim=5)
  dnn_order = parameter_order(dnn, (DIM,))
  cases = []
  for order, template in ((odd_order, {k: np.zeros(v) for k, v in shapes.items()}),
                          (dnn_order, abstract_variables(dnn, np.zeros(DIM, np.float32)))):
    models = jax.tree.map(lambda a: (r.normal(size=(4,) + a.shape) + 0.5).astype(np.float32),
                          template)
    chunks = {path: i // 2 for i, path in enumerate(order)}
    chunks = jax.tree_util.tree_map_with_path(
        lambda path, _: np.int32(chunks[tuple(p.key for p in path)]), template)
    cases.append((order, models, chunks))
  # the algorithm's own pairs for the DNN: PyTorch order, halved
  jax.tree.map(np.testing.assert_array_equal, pair_indices(dnn, np.zeros(DIM, np.float32)),
               cases[1][2])
  got = jax.jit(lambda cases: [(similarities(m, c), similarities(m)) for _, m, c in cases])(
      [(None, m, c) for _, m, c in cases])
  off = ~np.eye(4, dtype=bool)
  for (order, models, _), (walked, whole) in zip(cases, got):
    as_dicts = [{p: np.float64(_get(models, p)[k]) for p in order} for k in range(4)]
    np.testing.assert_allclose(np.asarray(walked)[off],
                               _pfllib_similarity(as_dicts, order)[off], rtol=1e-5)
    flat = np.stack([np.concatenate([d[p].ravel() for p in order]) for d in as_dicts])
    for k in range(4):
      for j in range(4):
        np.testing.assert_allclose(whole[k, j], _cosine(flat[k], flat[j]), rtol=1e-5)


def _all_partners(num, table):
  """Every strategy's collaborators for offsets 1 and 2, PFLlib's max scan and the default's,
  in one compiled call."""
  run = jax.jit(lambda t: {(s, o, self_in_max): collaborators(s, num, o, t, self_in_max)
                           for s in (0, 1, 2) for o in (1, 2) for self_in_max in (True, False)})
  return run(jnp.asarray(table, jnp.float32))


def test_collaborators_match_pfllib_scan_and_ties():
  r = np.random.default_rng(5)
  for num in (2, 5):
    table = r.uniform(0.1, 1.0, (num, num))
    table = (table + table.T) / 2
    np.fill_diagonal(table, 0.0)
    if num == 5:
      # row 2: least similar tied at 0 and at (j+1) mod K = 3, where PFLlib's scan starts;
      # row 3: tied at 1 and 2 (the first wins); row 4: the most similar tied at 0 and 2
      table[2, 0] = table[0, 2] = table[2, 3] = table[3, 2] = 0.01
      table[3, 1] = table[1, 3] = 0.01
      table[4, 0] = table[0, 4] = table[4, 2] = table[2, 4] = 0.99
    partners = _all_partners(num, table)
    for (strategy, offset, self_in_max), got in partners.items():
      want = [_pfllib_partner(table, j, strategy, offset) for j in range(num)]
      np.testing.assert_array_equal(got, want, err_msg=f"{num} {strategy} {offset}")
  # every other model dissimilar: PFLlib's max scan keeps the model itself, the default not
  table = -np.ones((3, 3)) + np.eye(3)
  table[1, 2] = table[2, 1] = -0.5
  partners = _all_partners(3, table)
  assert partners[2, 1, True].tolist() == [0, 1, 2]
  assert partners[2, 1, False].tolist() == [1, 2, 1]
  assert partners[1, 1, True].tolist() == [1, 0, 0]
  assert collaborators(1, 1, similarity=jnp.zeros((1, 1))).tolist() == [0]  # K = 1: itself


def test_cross_aggregation_and_trained_middleware_match_numpy():
  r = np.random.default_rng(6)
  models = [r.normal(size=(4, 3)).astype(np.float32), r.normal(size=(4, 2, 2)).astype(np.float32)]
  partner = np.array([2, 0, 2, 1])
  uploads = [r.normal(size=(5,) + m.shape[1:]).astype(np.float32) for m in models]
  for u in uploads:
    u[3] = np.nan
  index = np.array([1, 3, 1, 0, 2])        # model 1 trained twice, model 0 only by a drop-out
  weights = np.array([2.0, 4.0, 6.0, 0.0, 0.0], np.float32)  # model 2's trainer dropped too

  @jax.jit
  def run(models, uploads):
    return (cross_aggregate(models, jnp.asarray(partner), 0.9),
            trained_middleware(models, uploads, jnp.asarray(index), jnp.asarray(weights)),
            draw_assignment(jax.random.key(0), 7, 3), draw_assignment(jax.random.key(1), 5, 5))

  crossed, trained, uneven, one_to_one = run(models, uploads)
  for got, m in zip(crossed, models):
    np.testing.assert_allclose(got, 0.9 * m + 0.1 * m[partner], rtol=1e-6)
  for g, m, u in zip(trained, models, uploads):
    np.testing.assert_allclose(g[0], m[0])
    np.testing.assert_allclose(g[1], (2 * u[0] + 6 * u[2]) / 8, rtol=1e-6)
    np.testing.assert_allclose(g[2], m[2])
    np.testing.assert_allclose(g[3], u[1], rtol=1e-6)
  assert sorted(np.bincount(np.asarray(uneven), minlength=3).tolist()) == [2, 2, 3]
  assert sorted(np.asarray(one_to_one).tolist()) == list(range(5))


def _fedcross(**params):
  return make_algorithm("FedCross", make_model("mlr", (DIM,), CLASSES), SPEC, params)


@pytest.mark.parametrize("compat", [False, True])
def test_fedcross_client_trains_its_middleware_model(compat):
  algo = _fedcross(join_ratio=0.5, pfllib_compat=compat)
  server, clients = algo.init(jax.random.key(0), jnp.zeros(DIM), 6)
  assert jax.tree.leaves(server["middleware"])[0].shape[0] == 3  # K = int(6·0.5)
  assert np.bincount(np.asarray(server["assign"]), minlength=3).tolist() == [2, 2, 2]
  r = np.random.default_rng(7)
  server = dict(server, middleware=_stacked(server["params"], 3, r))
  client = jax.tree.map(lambda a: a[4], clients)
  data, key = _client_data(1), jax.random.key(2)
  index = int(server["assign"][4])
  start = jax.tree.map(lambda w: w[index], server["middleware"])
  fedavg = make_algorithm("FedAvg", algo.model, SPEC)
  x = data.x[:5]

  @jax.jit
  def run(server, client, start):
    new_state, upload, _ = algo.client_update(server, client, data, key)
    _, trained, _ = fedavg.client_update({"params": start}, {}, data, key)
    # PFLlib evaluates the client's own last model; the default, the global model
    evaluated = trained if compat else server["params"]
    return upload, trained, algo.predict(server, new_state, x), algo.model.apply(evaluated, x)

  upload, trained, logits, want = run(server, client, start)
  _tree_close(upload["params"], trained)
  assert int(upload["model"]) == index
  np.testing.assert_allclose(logits, want, rtol=1e-6)
  size = sum(a.size for a in jax.tree.leaves(server["params"]))
  assert float(algo.download_traffic(server).floats) == (1 if compat else 2) * size


@pytest.mark.parametrize("compat", [False, True])
def test_fedcross_server_first_stage_then_cross_aggregation(compat):
  k, alpha = 4, 0.8
  algo = _fedcross(first_stage_bound=2, fedcross_alpha=alpha, pfllib_compat=compat,
                   collaberative_model_select_strategy=0)
  server, _ = algo.init(jax.random.key(0), jnp.zeros(DIM), k)
  r = np.random.default_rng(8)
  uploads = {"params": _stacked(server["params"], k, r), "model": jnp.asarray([2, 0, 3, 1])}
  weights = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
  leaves = lambda t: [np.asarray(a, np.float64) for a in jax.tree.leaves(t)]
  by_model = [u[[1, 3, 0, 2]] for u in leaves(uploads["params"])]  # row j: the upload of model j
  average = [np.tensordot(weights / weights.sum(), u, axes=1) for u in leaves(uploads["params"])]
  update = jax.jit(algo.server_update)
  for rounds in (0, 1, 2, 5):
    state = dict(server, round=jnp.int32(rounds))
    new = update(state, uploads, jnp.asarray(weights), jax.random.key(rounds))
    for got, want in zip(leaves(new["params"]), average):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # compat: PFLlib's round variable is K − 1 = 3 ≥ 2 in every round, with offset 1
    step = k - 1 if compat else rounds
    offset = step % (k - 1) + 1
    for got, trained, avg in zip(leaves(new["middleware"]), by_model, average):
      if step < 2:
        want = np.broadcast_to(avg, trained.shape)
      else:
        want = alpha * trained + (1 - alpha) * trained[(np.arange(k) + offset) % k]
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert int(new["round"]) == rounds + 1
    assert sorted(np.asarray(new["assign"]).tolist()) == list(range(k))
  # nothing arrived: the middleware models stay
  none = update(dict(server, round=jnp.int32(3)), uploads, jnp.zeros(k), jax.random.key(0))
  _tree_close(none["middleware"], server["middleware"], rtol=0, atol=0)


def test_validation_and_settings_warnings():
  model = make_model("mlr", (DIM,), CLASSES)
  bad = {"FedCAC": [("tau", -0.1), ("tau", 1.5), ("tau", float("nan")), ("beta", 0.5),
                    ("beta", 0.0), ("beta", float("inf")), ("pfllib_compat", "yes")],
         "FedCross": [("first_stage_bound", -1), ("first_stage_bound", 1.5),
                      ("fedcross_alpha", 1.01), ("fedcross_alpha", -0.5),
                      ("collaberative_model_select_strategy", 3),
                      ("join_ratio", 0.0), ("pfllib_compat", 1)]}
  for name, cases in bad.items():
    for field, value in cases:
      with pytest.raises(ConfigError, match=field) as error:
        make_algorithm(name, model, SPEC, {field: value})
      assert "\n" not in str(error.value) and repr(value) in str(error.value)
  assert make_algorithm("FedCAC", model, SPEC).hyperparameters() == {
      "tau": 1.0, "beta": 100.0, "pfllib_compat": False}
  assert make_algorithm("FedCross", model, SPEC).hyperparameters() == {
      "first_stage_bound": 0, "fedcross_alpha": 0.99, "collaberative_model_select_strategy": 1,
      "join_ratio": 1.0, "pfllib_compat": False}
  context = lambda n: SettingsContext("mlr", np.zeros(DIM, np.float32), np.full(n, 10))
  assert _fedcross(join_ratio=0.1).check_settings(context(20)) == []
  (warning,) = _fedcross(join_ratio=0.1).check_settings(context(10))
  assert "1 middleware model" in warning and "-jr" in warning


# ----------------------------------------------------------------------------- engines
@pytest.mark.parametrize("name", ["FedCAC", "FedCross"])
def test_server_on_eight_devices_equals_one(name):
  """The non-linear servers on uploads sharded over 8 devices (11 clients, 80% join, 25%
  drop): the server state is replicated and equals the one-device state, the client states
  too."""
  data = _small_data(num_clients=11)
  spec = LocalSpec(learning_rate=0.1, batch_size=4, local_epochs=1,
                   steps_per_epoch=int(data.train_count.max()) // 4, unroll=1)
  params = {"tau": 0.5, "beta": 2.0} if name == "FedCAC" else {"join_ratio": 0.8}
  alg = make_algorithm(name, make_model("mlr", data.sample_shape, data.num_classes), spec,
                       params)
  # one round: the clients gather their rows (customised model / middleware model) from the
  # replicated server state and the server's whole rule runs on sharded uploads
  (s1, _), _ = one_and_eight_device_states(alg, data, rounds=1)
  moved = s1["customized" if name == "FedCAC" else "middleware"]
  assert any(np.ptp(np.asarray(a), axis=0).max() > 0 for a in jax.tree.leaves(moved))


@pytest.mark.parametrize("name,params,bar", [
    ("FedCAC", {"tau": 0.5, "beta": 2.0}, 0.85),
    ("FedCross", {}, 0.40),
])
def test_learns_on_digits(name, params, bar, tmp_path):
  """Digits, 20 clients, Dirichlet α = 0.1, the DNN, lr 0.05, 4 rounds, evaluated at rounds 0
  and 4 (best test accuracy). Measured over seeds 0, 1, 2 (2026-12, this configuration):

  - FedAvg .660 / .635 / .592.
  - FedCAC τ = 0.5, β = 2 (personalised: the threshold passes the largest overlap after two
    rounds, so critical entries stay local) .934 / .921 / .941; with the defaults τ = 1,
    β = 100 (nearly every entry critical, customised models ≈ means of similar clients)
    .798 / .681 / .717; τ = 0.5, β = 100 .805 / .753 / .864. The bar, .85, is FedAvg's best
    plus .19.
  - FedCross (defaults: α = 0.99, least similar collaborator, global model evaluated)
    .581 / .457 / .553, below FedAvg: each middleware model is trained by one client a round
    and keeps 99% of itself, so the models drift apart and their average learns more slowly
    than FedAvg's (20 rounds: .798 / .755 / .779 vs FedAvg's .904 / .895 / .917; the paper
    reports FedCross ahead only after many rounds). With ``first_stage_bound`` beyond the
    run it is exactly FedAvg (.660 / .635 / .592); ``pfllib_compat`` (each client evaluated
    with its last trained model) .818 / .777 / .838. The bar, .40, is under the lowest seed.
  """
  config = Config(algorithm=name, model="dnn", learning_rate=0.05, global_rounds=4, eval_gap=4,
                  seed=0, progress=False, plot=False, out=str(tmp_path), algo_params=params)
  assert run_experiment(config, log=lambda msg: None).best_test_acc[0] >= bar
