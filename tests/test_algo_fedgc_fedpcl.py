"""FedGC and FedPCL: their losses and update rules against float64 numpy references (written
as PFLlib's loops; gradients by central differences), the servers against numpy (weight-0
slots ignored), the communication they report, validation and settings checks, FedPCL's
``pfllib_compat`` training gate, one vs eight devices for both non-linear servers, and
learning on the bundled digits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from fedjax_lib import Config, run_experiment
from fedjax_lib.algorithms import get_algorithm, make_algorithm
from fedjax_lib.algorithms import fedgc as gc_lib
from fedjax_lib.algorithms import fedpcl as pcl_lib
from fedjax_lib.algorithms.base import SettingsContext, is_linear_server
from fedjax_lib.core import engine as engine_lib
from fedjax_lib.core.local import ClientData, LocalSpec
from fedjax_lib.errors import ConfigError
from fedjax_lib.models import make_model
from tests.test_engine import _small_data
from tests.helpers import assert_replicated
from tests.test_sharding import one_and_eight_device_states
from tests.helpers import numeric_grad as _numeric_grad

DIM, HIDDEN, CLASSES, LR = 4, 3, 3, 0.3


def _close(a, b, rtol=1e-4, atol=1e-5):
  np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol,
                             atol=atol)


def _f64(tree):
  return jax.tree.map(lambda a: np.array(a, np.float64), tree)


def _problem(labels=(0, 2, 0, 2, 2, 0), seed=0):
  """6 training samples (index table padded to 12) of the given labels; one full batch per
  epoch, 2 epochs: the client takes 2 steps on the whole batch (the shuffle does not
  matter)."""
  r = np.random.default_rng(seed)
  n = len(labels)
  x = r.normal(size=(2 * n, DIM)).astype(np.float32)
  y = np.r_[labels, labels].astype(np.int32)
  spec = LocalSpec(learning_rate=LR, batch_size=n, local_epochs=2, steps_per_epoch=1)
  data = ClientData(jnp.asarray(x), jnp.asarray(y), jnp.arange(2 * n), jnp.asarray(n))
  return spec, data, r


def _model():
  return make_model("dnn", (DIM,), CLASSES, hidden_dim=HIDDEN)


def _hidden(p, x):
  return np.maximum(x @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0.0)


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


# ================================================================ FedGC
def np_regulariser(heads, classes, anchors):
  """PFLlib's ``reg_train`` loop (float64): for every client k and class c it has, −log of
  e^{ē·ē} over itself plus e^{W_j[:, r]·ē} for every class r of every client j lacking c."""
  total = 0.0
  for k in range(heads.shape[0]):
    for c in np.flatnonzero(classes[k]):
      e = anchors[c]
      d1 = np.exp(e @ e)
      d2 = sum(np.exp(heads[j][:, classes[j]].T @ e).sum()
               for j in range(heads.shape[0]) if not classes[j, c])
      total += -np.log(d1 / (d1 + d2))
  return total


def np_anchors(heads, classes):
  """ē_c: the mean of the columns of class c over the clients that have it (zero if none)."""
  return np.stack([heads[classes[:, c], :, c].mean(0) if classes[:, c].any()
                   else np.zeros(heads.shape[1]) for c in range(heads.shape[2])])


def _heads_problem(seed=1):
  r = np.random.default_rng(seed)
  classes = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 1]], bool)   # class 3: only k=2
  heads = r.normal(size=(3, 2, 4)) * 0.7
  return heads, classes


def test_correction_loss_and_step_match_pfllib_loop():
  heads, classes = _heads_problem()
  anchors = np_anchors(heads, classes)
  loss_and_grad = jax.jit(jax.value_and_grad(gc_lib.correction_loss))
  loss, grad = loss_and_grad(jnp.asarray(heads, jnp.float32), jnp.asarray(classes))
  _close(loss, np_regulariser(heads, classes, anchors))
  # the anchors are constants: the gradient reaches only the negative columns
  numeric = _numeric_grad(lambda h: np_regulariser(h, classes, anchors), heads)
  _close(grad, numeric, atol=1e-5)
  assert np.all(np.asarray(grad)[~classes[:, None, :].repeat(2, 1)] == 0)  # absent columns
  new = jax.jit(gc_lib.corrected_heads)(jnp.asarray(heads, jnp.float32), jnp.asarray(classes),
                                        0.4)
  _close(new, heads - 0.4 * numeric, atol=1e-5)
  # every client has every class: no negatives, no loss, no correction
  loss, grad = loss_and_grad(jnp.asarray(heads, jnp.float32), jnp.ones(classes.shape, bool))
  assert float(loss) == pytest.approx(0.0, abs=1e-6) and not np.asarray(grad).any()
  # PFLlib's direct exponentials overflow (dot products ~ 400); the log-sum-exp does not
  loss, grad = loss_and_grad(jnp.asarray(heads * 20, jnp.float32), jnp.asarray(classes))
  assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))


@functools.lru_cache(maxsize=None)
def _fedgc(spec, lam=1.0, num_clients=3):
  """The algorithm and its initial states (shared by the tests: copy before changing)."""
  alg = make_algorithm("FedGC", _model(), spec, {"lam": lam})
  return alg, alg.init(jax.random.key(0), jnp.zeros(DIM), num_clients)


def test_fedgc_warmup_records_each_clients_classes():
  spec, data, _ = _problem()
  alg, (server, clients) = _fedgc(spec)
  assert not np.asarray(server["classes"]).any()          # nothing known before the warm-up
  one = jax.tree.map(lambda a: a[1], clients)
  state, upload = alg.warmup_client(server, one, data, jax.random.key(0))
  assert np.asarray(upload["present"]).tolist() == [True, False, True]
  uploads = jax.tree.map(lambda a: jnp.stack([a, a]), upload)
  uploads["id"] = jnp.array([1, 2])
  server = alg.warmup_server(server, uploads, jnp.array([6.0, 0.0]), jax.random.key(0))
  assert np.asarray(server["classes"]).tolist() == [[False] * 3, [True, False, True],
                                                    [False] * 3]   # weight 0: not recorded


def test_fedgc_client_trains_base_and_its_class_columns_like_numpy():
  """Two SGD steps on the cross-entropy over the client's classes {0, 2} of
  ``relu(x W1 + b1) K`` (no bias): column 1 and the bias never move."""
  spec, data, r = _problem()
  alg, (server, clients) = _fedgc(spec)
  server = jax.tree.map(lambda a: a + (0.3 * r.normal(size=a.shape)).astype(np.float32)
                        if a.dtype == jnp.float32 else a, server)
  server["classes"] = jnp.array([[True] * 3, [True, False, True], [True] * 3])
  one = jax.tree.map(lambda a: a[1], clients)
  new, upload, stats = jax.jit(alg.client_update)(server, one, data, jax.random.key(1))
  assert int(stats["steps"]) == 2 and set(new) == {"id"} and int(new["id"]) == 1
  x, y = np.float64(data.x)[:6], np.asarray(data.y)[:6]
  present = np.array([True, False, True])

  def loss(p):
    logits = _hidden(p["base"], x) @ p["kernel"]
    logp = _log_softmax(np.where(present, logits, -np.inf))
    return -logp[np.arange(6), y].mean()

  p = {"base": _f64(server["base"]), "kernel": np.float64(server["heads"][1])}
  for _ in range(2):
    p = jax.tree.map(lambda a, g: a - LR * g, p, _numeric_grad(loss, p))
  jax.tree.map(_close, upload["base"], p["base"])
  _close(upload["kernel"], p["kernel"])
  np.testing.assert_array_equal(upload["kernel"][:, 1], server["heads"][1][:, 1])
  assert int(upload["id"]) == 1 and np.asarray(upload["present"]).tolist() == present.tolist()
  # evaluation: the global base, the client's head, class 1 never predicted
  logits = np.asarray(alg.predict(server, one, data.x))
  _close(logits[:, [0, 2]], _hidden(_f64(server["base"]), np.float64(data.x))
         @ np.float64(server["heads"][1])[:, [0, 2]])
  assert np.all(logits[:, 1] == gc_lib.ABSENT_LOGIT) and np.all(logits.argmax(1) != 1)


def test_fedgc_server_averages_bases_stores_arrived_heads_and_corrects_all():
  spec, _, r = _problem()
  alg, (server, _) = _fedgc(spec, lam=2.0, num_clients=4)
  server = dict(server)
  classes = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1], [1, 1, 1]], bool)
  server["classes"] = jnp.asarray(classes)
  server["heads"] = jnp.asarray(r.normal(size=(4, HIDDEN, CLASSES)), jnp.float32)
  uploads = {"id": jnp.array([2, 0, 3]),
             "base": jax.tree.map(lambda a: jnp.asarray(r.normal(size=(3,) + a.shape),
                                                        jnp.float32), server["base"]),
             "kernel": jnp.asarray(r.normal(size=(3, HIDDEN, CLASSES)), jnp.float32),
             "present": jnp.asarray(classes[[2, 0, 3]])}
  uploads["base"]["fc1"]["bias"] = uploads["base"]["fc1"]["bias"].at[2].set(jnp.nan)
  uploads["kernel"] = uploads["kernel"].at[2].set(jnp.nan)            # slot 2 dropped
  weights = np.array([3.0, 5.0, 0.0], np.float32)
  new = jax.jit(alg.server_update)(server, uploads, jnp.asarray(weights), jax.random.key(0))
  base = jax.tree.map(lambda u: (3 * np.float64(u[0]) + 5 * np.float64(u[1])) / 8,
                      uploads["base"])
  jax.tree.map(_close, new["base"], base)
  heads = np.float64(server["heads"])
  heads[2], heads[0] = np.float64(uploads["kernel"][0]), np.float64(uploads["kernel"][1])
  anchors = np_anchors(heads, classes)
  grad = _numeric_grad(lambda h: np_regulariser(h, classes, anchors), heads)
  _close(new["heads"], heads - LR * 2.0 * grad)        # step lr·λ on all four heads
  np.testing.assert_array_equal(new["classes"], classes)
  assert not is_linear_server(alg)


def test_fedgc_traffic_counts_the_base_and_the_clients_columns():
  spec, _, _ = _problem()
  alg, (server, _) = _fedgc(spec)
  server = dict(server)
  base_floats = DIM * HIDDEN + HIDDEN
  upload = {"id": jnp.int32(0), "base": server["base"], "kernel": server["heads"][0],
            "present": jnp.array([True, False, True])}
  assert float(alg.upload_traffic(upload).floats) == base_floats + 2 * HIDDEN
  assert float(alg.upload_traffic(upload).bytes) == 4 * (base_floats + 2 * HIDDEN)
  assert float(alg.upload_traffic({"id": jnp.int32(0), "present": upload["present"]}).floats) \
      == 0.0                                                    # the warm-up's class vector
  server["classes"] = jnp.array([[True, False, True], [True] * 3, [False, False, True]])
  # per client on average: the base and (2 + 3 + 1) / 3 columns of d = HIDDEN floats
  assert float(alg.download_traffic(server).floats) == pytest.approx(base_floats + 2 * HIDDEN)


# ================================================================ FedPCL
def np_normalize(f):
  return f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)


def np_prototype_ce(z, y, protos, valid, tau):
  """Mean over samples of −log softmax over the valid prototypes (column c = class c); a
  sample whose class has no prototype adds 0."""
  total = 0.0
  for zi, yi in zip(z, y):
    if not valid[yi]:
      continue
    s = (zi @ protos.T) / tau
    s = np.where(valid, s, -np.inf)
    total += -(s[yi] - np.log(np.exp(s - s.max()).sum()) - s.max())
  return total / len(y)


def np_contrastive(z, y, protos, present, sets, set_valid, tau):
  """PFLlib's ``L_g + Σ_j L_p^j / N`` with class-aligned columns."""
  return np_prototype_ce(z, y, protos, present, tau) + sum(
      np_prototype_ce(z, y, s, v, tau) for s, v in zip(sets, set_valid)) / len(sets)


def test_prototype_losses_match_numpy():
  r = np.random.default_rng(2)
  z = np_normalize(r.normal(size=(5, 6)))
  y = np.array([0, 1, 2, 3, 1])
  protos = r.normal(size=(4, 6))
  mask = np.ones(5, np.float32)
  prototype_ce = jax.jit(pcl_lib.prototype_ce)
  for valid in ([1, 1, 1, 1], [1, 0, 1, 1], [0, 0, 0, 0]):
    valid = np.array(valid, bool)
    for tau in (1.0, 0.2):
      got = prototype_ce(jnp.asarray(z, jnp.float32), jnp.asarray(y), jnp.asarray(mask),
                         jnp.asarray(protos, jnp.float32), jnp.asarray(valid), tau)
      _close(got, np_prototype_ce(z, y, protos, valid, tau))
  # a padded row (mask 0) adds nothing and does not count
  got = prototype_ce(jnp.asarray(z, jnp.float32), jnp.asarray(y),
                     jnp.array([1, 1, 1, 1, 0.0]), jnp.asarray(protos, jnp.float32),
                     jnp.ones(4, bool), 0.5)
  _close(got, np_prototype_ce(z[:4], y[:4], protos, np.ones(4, bool), 0.5))
  sets = r.normal(size=(3, 4, 6))
  own = np.array([[1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]], bool)
  present = np.array([1, 1, 1, 0], bool)
  padded, set_valid = jax.jit(pcl_lib.padded_sets)(
      jnp.asarray(sets, jnp.float32), jnp.asarray(own), jnp.asarray(protos, jnp.float32),
      jnp.asarray(present))
  np_padded = np.where(own[..., None], sets, protos[None])
  _close(padded, np_padded)
  assert np.asarray(set_valid).tolist() == (own | present).tolist()
  got = jax.jit(pcl_lib.contrastive_loss)(
      jnp.asarray(z, jnp.float32), jnp.asarray(y), jnp.asarray(mask),
      jnp.asarray(protos, jnp.float32), jnp.asarray(present), padded, set_valid, 0.5)
  _close(got, np_contrastive(z, y, protos, present, np_padded, own | present, 0.5))
  # normalize: PyTorch's F.normalize, a zero row stays zero
  f = np.array([[3.0, 4.0], [0.0, 0.0]])
  _close(pcl_lib.normalize(jnp.asarray(f)), [[0.6, 0.8], [0.0, 0.0]])


def _fedpcl(spec, compat=False, tau=0.5, num_clients=3):
  alg = make_algorithm("FedPCL", _model(), spec, {"tau": tau, "pfllib_compat": compat})
  return alg, alg.init(jax.random.key(0), jnp.zeros(DIM), num_clients)


def _np_class_means(z, y, num_classes=CLASSES):
  has = np.array([(y == c).any() for c in range(num_classes)])
  means = np.stack([z[y == c].mean(0) if h else np.zeros(z.shape[1])
                    for c, h in enumerate(has)])
  return means, has


def test_fedpcl_client_trains_the_encoder_like_numpy_then_uploads_class_means():
  """With global prototypes: two steps of clipped SGD on L (tau 0.1, where the clip at 10
  matters), then the eval-mode class means of the unit features over all training samples.
  Without (round 0), or with compat before its own first upload: no training."""
  spec, data, r = _problem(labels=(0, 1, 0, 1, 1, 0))
  tau = 0.1
  alg, (server, clients) = _fedpcl(spec, tau=tau)
  one = jax.tree.map(lambda a: a[1], clients)
  update = jax.jit(alg.client_update)
  x, y = np.float64(data.x)[:6], np.asarray(data.y)[:6]

  # round 0: no prototypes anywhere -> the model does not move; uploads its class means
  new, upload, stats = update(server, one, data, jax.random.key(1))
  assert int(stats["steps"]) == 0
  jax.tree.map(np.testing.assert_array_equal, new["params"], one["params"])
  means, has = _np_class_means(np_normalize(_hidden(_f64(one["params"]["params"]["base"]), x)),
                               y)
  _close(upload["protos"], means)
  assert np.asarray(upload["present"]).tolist() == has.tolist() == [True, True, False]
  _close(new["protos"], means)

  # with global prototypes (class 2 has none) and the clients' sets
  g = np_normalize(r.normal(size=(CLASSES, HIDDEN)))
  server = {"protos": jnp.asarray(g, jnp.float32), "present": jnp.array([True, True, False]),
            "client_protos": jnp.asarray(r.normal(size=(3, CLASSES, HIDDEN)), jnp.float32),
            "client_present": jnp.array([[1, 0, 0], [1, 1, 0], [0, 0, 1]], bool)}
  new, upload, stats = update(server, one, data, jax.random.key(1))
  assert int(stats["steps"]) == 2
  sets = np.where(np.asarray(server["client_present"])[..., None],
                  np.float64(server["client_protos"]), g[None])
  set_valid = np.asarray(server["client_present"]) | np.array([True, True, False])

  def loss(base):
    z = np_normalize(_hidden(base, x))
    return np_contrastive(z, y, g, np.array([True, True, False]), sets, set_valid, tau)

  base = _f64(one["params"]["params"]["base"])
  clipped = False
  for _ in range(2):
    grad = _numeric_grad(loss, base)
    norm = np.sqrt(sum(np.sum(a ** 2) for a in jax.tree.leaves(grad)))
    clipped |= norm > pcl_lib.CLIP_NORM
    scale = min(1.0, pcl_lib.CLIP_NORM / norm)
    base = jax.tree.map(lambda p, gr: p - LR * scale * gr, base, grad)
  assert clipped
  jax.tree.map(_close, new["params"]["params"]["base"], base)
  jax.tree.map(np.testing.assert_array_equal, new["params"]["params"]["head"],
               one["params"]["params"]["head"])                       # never trained
  _close(upload["protos"], _np_class_means(np_normalize(_hidden(base, x)), y)[0])
  assert int(upload["id"]) == 1 and int(new["id"]) == 1

  # PFLlib's gate (compat): a client without prototypes of its own only collects them
  compat, _ = _fedpcl(spec, compat=True, tau=tau)
  server = {**server, "order": jnp.arange(CLASSES), "client_order": jnp.full((3, CLASSES), -1)}
  _, _, stats = jax.jit(compat.client_update)(server, one, data, jax.random.key(1))
  assert int(stats["steps"]) == 0
  trained_once = {**one, "protos": new["protos"], "present": new["present"]}
  _, _, stats = jax.jit(compat.client_update)(server, trained_once, data, jax.random.key(1))
  assert int(stats["steps"]) == 2


# PFLlib's dictionaries, in Python: what pfllib_compat's class orders must reproduce.
def _dict_order(labels, num_classes):
  """A client's padded set: classes as its prototype pass first meets them (a dict filled
  in that order), then the padding's `for k in range(num_classes)` adds the missing ones."""
  order = list(dict.fromkeys(int(c) for c in labels))
  return order + [k for k in range(num_classes) if k not in order]


def _global_dict_order(passes, selection, num_classes):
  """`proto_aggregation`: the uploads in selection order, each in its own key order."""
  order = list(dict.fromkeys(c for k in selection for c in dict.fromkeys(passes[k])))
  return order + [k for k in range(num_classes) if k not in order]


def test_fedpcl_compat_class_orders_are_pfllibs_dictionary_orders():
  r = np.random.default_rng(5)
  num_classes, batch = 6, 4
  for trial in range(20):
    n = int(r.integers(1, 15))
    y = r.integers(0, num_classes, 20).astype(np.int32)
    data = ClientData(jnp.zeros((20, 1)), jnp.asarray(y), jnp.asarray(r.permutation(20)[:16]),
                      jnp.asarray(n))
    visited, first = pcl_lib.shuffled_pass(data, jax.random.key(trial), batch, num_classes)
    count = n // batch * batch
    rows = np.asarray(visited.train_idx)
    assert int(visited.train_count) == count
    assert sorted(rows[:n].tolist()) == sorted(np.asarray(data.train_idx)[:n].tolist())
    labels = y[rows[:count]]
    has = np.isin(np.arange(num_classes), labels)
    expect_first = [int(np.flatnonzero(labels == c)[0]) if h else 16
                    for c, h in enumerate(has)]
    assert np.asarray(first).tolist() == expect_first
    assert np.asarray(pcl_lib.class_orders(first, jnp.asarray(has))).tolist() == _dict_order(
        labels, num_classes)
  # G's order over uploads (some slots not arrived), in a random selection order
  for trial in range(20):
    k = 5
    passes = [list(r.integers(0, num_classes, int(r.integers(0, 6)))) for _ in range(k)]
    arrived = r.random(k) < 0.8
    first = np.full((k, num_classes), 99, np.int32)
    for slot, labels in enumerate(passes):
      for pos, c in reversed(list(enumerate(labels))):
        first[slot, c] = pos
    has = (first < 99) & arrived[:, None]
    rank = r.permutation(k)
    selection = [slot for slot in np.argsort(rank) if arrived[slot]]
    got = pcl_lib.global_order(jnp.asarray(first), jnp.asarray(has), jnp.asarray(rank))
    assert np.asarray(got).tolist() == _global_dict_order(passes, selection, num_classes)


def test_fedpcl_compat_trains_on_pfllibs_stacked_columns():
  """With pfllib_compat, label j's target is the prototype in column j of PFLlib's stacks:
  the client update equals the default one on a server whose G and sets are already in
  those orders (a set never uploaded in G's), with the key's first half; its prototypes
  average its shuffled drop_last pass."""
  spec, data, r = _problem(labels=(0, 1, 2, 1, 1, 0))
  spec = LocalSpec(learning_rate=LR, batch_size=4, local_epochs=2, steps_per_epoch=1)  # 4 of 6
  default, (server, clients) = _fedpcl(spec, tau=0.5)
  compat, _ = _fedpcl(spec, compat=True, tau=0.5)
  g = r.normal(size=(CLASSES, HIDDEN)).astype(np.float32)
  server = {"protos": jnp.asarray(g), "present": jnp.ones(CLASSES, bool),
            "client_protos": jnp.asarray(r.normal(size=(3, CLASSES, HIDDEN)), jnp.float32),
            "client_present": jnp.array([[1, 0, 1], [1, 1, 0], [0, 0, 0]], bool)}
  order = np.array([2, 0, 1])
  client_order = np.array([[1, 0, 2], [2, 1, 0], [-1, -1, -1]])
  one = {**jax.tree.map(lambda a: a[1], clients), "present": jnp.ones(CLASSES, bool)}
  key = jax.random.key(3)
  new, upload, _ = jax.jit(compat.client_update)(
      {**server, "order": jnp.asarray(order), "client_order": jnp.asarray(client_order)},
      one, data, key)
  sets = np.where(np.asarray(server["client_present"])[..., None],
                  np.asarray(server["client_protos"]), g[None])
  orders = np.where(client_order < 0, order, client_order)
  permuted = {"protos": jnp.asarray(g[order]), "present": jnp.ones(CLASSES, bool),
              "client_protos": jnp.asarray(np.take_along_axis(sets, orders[..., None], 1)),
              "client_present": jnp.ones((3, CLASSES), bool)}
  train_key, pass_key = jax.random.split(key)
  ref, _, _ = jax.jit(default.client_update)(permuted, one, data, train_key)
  jax.tree.map(np.testing.assert_array_equal, new["params"], ref["params"])
  visited, first = pcl_lib.shuffled_pass(data, pass_key, 4, CLASSES)
  rows = np.asarray(visited.train_idx)[:4]
  z = np_normalize(_hidden(_f64(new["params"]["params"]["base"]), np.float64(data.x)[rows]))
  means, has = _np_class_means(z, np.asarray(data.y)[rows])
  _close(upload["protos"], means)
  assert np.asarray(upload["present"]).tolist() == has.tolist()
  assert np.asarray(upload["first"]).tolist() == np.asarray(first).tolist()


def test_fedpcl_server_means_this_rounds_uploads_and_keeps_each_clients_set():
  spec, _, r = _problem()
  alg, (server, clients) = _fedpcl(spec, num_clients=4)
  protos = r.normal(size=(3, CLASSES, HIDDEN)).astype(np.float32)
  protos[2] = np.nan                                              # slot 2 dropped
  present = np.array([[1, 1, 0], [0, 1, 0], [1, 1, 1]], bool)
  uploads = {"id": jnp.array([3, 0, 1]), "protos": jnp.asarray(protos),
             "present": jnp.asarray(present)}
  weights = np.array([4.0, 9.0, 0.0], np.float32)
  new = jax.jit(alg.server_update)(server, uploads, jnp.asarray(weights), jax.random.key(0))
  # unweighted per class over the arrived uploads; class 2 arrived from nobody
  _close(new["protos"][0], protos[0, 0])
  _close(new["protos"][1], (protos[0, 1] + protos[1, 1]) / 2)
  assert np.asarray(new["present"]).tolist() == [True, True, False]
  cp, cpres = np.asarray(new["client_protos"]), np.asarray(new["client_present"])
  _close(cp[3][present[0]], protos[0][present[0]])
  _close(cp[0][present[1]], protos[1][present[1]])
  assert cpres.tolist() == [[0, 1, 0], [0, 0, 0], [0, 0, 0], [1, 1, 0]]
  assert np.all(np.isfinite(cp))                                  # the dropped NaN is not kept
  assert not is_linear_server(alg)
  # evaluation: the client's own prototypes, padded with the global ones, 0 where neither
  state = {**jax.tree.map(lambda a: a[0], clients), "protos": jnp.asarray(protos[1]),
           "present": jnp.array([False, True, False])}
  x = jnp.asarray(r.normal(size=(4, DIM)), jnp.float32)
  z = np_normalize(_hidden(_f64(state["params"]["params"]["base"]), np.float64(x)))
  scores = np.asarray(alg.predict(new, state, x))
  _close(scores[:, 0], z @ np.float64(new["protos"][0]))
  _close(scores[:, 1], z @ np.float64(protos[1, 1]))
  assert np.all(scores[:, 2] == 0.0)
  # traffic: up |C_k|·d; down G's rows plus every client's padded set
  assert float(alg.upload_traffic(jax.tree.map(lambda a: a[0], uploads)).floats) == 2 * HIDDEN
  assert float(alg.download_traffic(new).floats) == (2 + 4 * 2) * HIDDEN
  assert float(alg.download_traffic(server).floats) == 0.0        # before any aggregation


# ================================================================ both
@pytest.mark.parametrize("name,params", [
    ("FedGC", {"lam": -1.0}), ("FedGC", {"lam": float("nan")}), ("FedGC", {"lam": float("inf")}),
    ("FedPCL", {"tau": 0.0}), ("FedPCL", {"tau": -1.0}), ("FedPCL", {"tau": float("nan")}),
    ("FedPCL", {"pfllib_compat": 1})])
def test_bad_hyperparameters_are_one_line_config_errors(name, params):
  with pytest.raises(ConfigError) as err:
    make_algorithm(name, _model(), LocalSpec(), params)
  message = str(err.value)
  assert "\n" not in message and f"{list(params)[0]}={list(params.values())[0]!r}" in message


def test_defaults_and_settings_checks():
  assert get_algorithm("FedGC").hyperparameters() == {"lam": 1.0}
  assert get_algorithm("FedPCL").hyperparameters() == {"tau": 1.0, "pfllib_compat": False}
  context = lambda name: SettingsContext(name, jnp.zeros(DIM), np.array([6, 8]))
  for name in ("FedGC", "FedPCL"):
    assert make_algorithm(name, _model(), LocalSpec()).check_settings(context("dnn")) == []
    mlr = make_algorithm(name, make_model("mlr", (DIM,), CLASSES), LocalSpec())
    with pytest.raises(ConfigError, match="'mlr' has no base") as err:
      mlr.check_settings(context("mlr"))
    assert "\n" not in str(err.value)
  two_layer = make_model("dnn+head16-8", (DIM,), CLASSES, feature_dim=16)
  with pytest.raises(ConfigError, match="bias-free dense head per client"):
    make_algorithm("FedGC", two_layer, LocalSpec()).check_settings(context("dnn+head16-8"))
  assert not get_algorithm("FedGC").__new__(get_algorithm("FedGC")).supports_new_clients
  assert not get_algorithm("FedPCL").__new__(get_algorithm("FedPCL")).supports_new_clients


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_fedgc_on_eight_devices_equals_one():
  """11 clients, 80% join, 25% drop: the warm-up and 2 rounds with the clients sharded over 8
  devices (padded to 16 rows): the server state (base, corrected heads, classes) is
  replicated and equals the one-device state, the client states too."""
  data = _small_data(num_clients=11)
  spec = LocalSpec(learning_rate=0.1, batch_size=4, local_epochs=1,
                   steps_per_epoch=int(data.train_count.max()) // 4, unroll=1)
  alg = make_algorithm("FedGC", make_model("dnn", data.sample_shape, data.num_classes), spec)
  (s1, c1), (s8, c8) = one_and_eight_device_states(alg, data)
  assert np.asarray(s8["classes"]).sum(1).min() >= 1    # the warm-up recorded every client


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
@pytest.mark.parametrize("compat", [False, True])
def test_fedpcl_server_on_sharded_uploads_equals_one_device(compat):
  """FedPCL's server on 16 upload slots sharded over 8 devices (slots of weight 0, some
  holding NaN, as padding and dropped clients do): the new state is replicated and equals
  the one-device state. (Its client update reads the replicated state as every algorithm's
  does; FedGC's test above runs the whole engine on the mesh.)"""
  spec, _, r = _problem()
  alg, (server, _) = _fedpcl(spec, compat=compat, num_clients=13)
  slots = 16
  present = r.random((slots, CLASSES)) < 0.6
  protos = r.normal(size=(slots, CLASSES, HIDDEN)).astype(np.float32)
  weights = np.r_[r.integers(1, 9, 10), np.zeros(6)].astype(np.float32)
  protos[[3, 12]] = np.nan
  weights[3] = 0.0
  uploads = {"id": jnp.asarray(np.r_[r.permutation(13)[:10], np.full(6, 13)], jnp.int32),
             "protos": jnp.asarray(protos), "present": jnp.asarray(present)}
  if compat:
    uploads["first"] = jnp.asarray(np.stack([r.permutation(20)[:CLASSES] for _ in range(slots)]))
  mesh = engine_lib.client_mesh(8)
  sharded = NamedSharding(mesh, P(engine_lib.CLIENTS))
  step = jax.jit(alg.server_update, out_shardings=NamedSharding(mesh, P()))
  key = jax.random.key(0)
  many = step(jax.device_put(server, NamedSharding(mesh, P())),
              jax.device_put(uploads, sharded), jax.device_put(jnp.asarray(weights), sharded),
              key)
  one = jax.jit(alg.server_update)(server, uploads, jnp.asarray(weights), key)
  assert_replicated(many)
  jax.tree.map(lambda a, b: _close(a, b, rtol=1e-6, atol=1e-7), one, many)
  assert np.all(np.isfinite(np.asarray(many["client_protos"])))
  assert np.asarray(many["client_present"]).any()
  if compat:
    assert (np.asarray(many["client_order"]) >= 0).any()


# ---------------------------------------------------------------- learning
# Best test accuracy over rounds 0-4 on the bundled digits (20 clients, Dirichlet 0.1, the DNN,
# lr 0.05; Config(algorithm=..., model="dnn", learning_rate=0.05, global_rounds=4, seed=s)),
# seeds 0 / 1 / 2, measured 2026-12:
#   FedAvg .660 / .635 / .592
#   FedGC  .906 / .904 / .897   (round 0: .320 / .350 / .329, the heads cover a client's
#          classes only; the server's correction moves the heads ~2% a round here: λ = 0
#          gives the same three digits, λ = 20 .901 / .899 / .897)
#   FedPCL .947 / .934 / .954   (round 0 before any prototype: .114 / .103 / .110; round 1,
#          local prototypes of the untrained encoder: .800 / .801 / .794; pfllib_compat
#          trains on PFLlib's scrambled class columns and is not measured here)
# The bars sit about 0.05 below the smallest measured value.
LEARNING = {"FedGC": (0.85, 0.45), "FedPCL": (0.88, 0.3)}


@pytest.mark.parametrize("name", sorted(LEARNING))
def test_learns_on_digits(name, tmp_path):
  bar, first = LEARNING[name]
  config = Config(algorithm=name, model="dnn", learning_rate=0.05, global_rounds=4,
                  eval_gap=4, executor="vmap", seed=0, progress=False, plot=False,
                  out=str(tmp_path))
  results = run_experiment(config, log=lambda msg: None)
  history = results.runs[0].history
  assert history["test_acc"][0] < first
  assert results.best_test_acc[0] > bar, history["test_acc"]
