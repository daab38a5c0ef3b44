"""The conformance suite: every registered algorithm goes through the same checks.

Finite outputs, stable state structure and dtypes across rounds, one compilation per run shape,
a checkpoint round trip, new-client evaluation, the vmap and sequential executors agree (the
states after two rounds, so a client's update cannot depend on the others it is vmapped with,
and the metrics, which the sequential executor computes from a client's own samples in
blocks), and a server marked linear (`linear_server`) gives the same state for the
uploads as for their weighted mean.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lib.algorithms import algorithm_names
from fedjax_lib.algorithms.base import has_hook, is_linear_server
from fedjax_lib.core import checkpoint as checkpoint_lib
from fedjax_lib.core import rng
from fedjax_lib.core.local import ClientData
from tests.helpers import as_images, suite_params
from tests.test_engine import _engine, _run, _small_data

# Hyperparameters that change what an algorithm's states hold (`registry.make_algorithm`'s
# `variant` hook): each is a case of its own.
VARIANTS = {"FedGen-PFLlib -lf": ("FedGen-PFLlib", {"localize_feature_extractor": True})}
ALGORITHMS = algorithm_names() + list(VARIANTS)

# Executors round differently (vmapped against per-client matmuls, ~3e-8 relative in round
# 0's loss). FedKTL's margin loss multiplies cosines by s = 64, and at this suite's lr 0.1
# those differences grow to ~5e-4 relative in the train loss by round 2 (measured
# 2026-12-01: 22.728 vs 22.716 with no server training), and on another CPU (an AVX2 AMD
# EPYC VM without AVX-512, 2026-12-07: XLA vectorises, so rounds, differently) to 6.4e-3
# (24.947 vs 24.790); accuracy still agrees exactly on both.
LOSS_RTOL = {"FedKTL": 2e-2}
# ... and in its states after two rounds to ~1e-2 (the server's feature transformer, measured
# 2026-12-01), too far for a meaningful tolerance: FedKTL's states are compared on the HtFL
# family instead (tests/test_conformance_htfl.py), where they stay within 1e-4.
STATES_NOT_COMPARED = ("FedKTL",)


def _structure(tree):
  return jax.tree.structure(tree), [(a.shape, a.dtype) for a in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def data():
  return _small_data(num_clients=5, seed=1)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_conformance(name, data, tmp_path):
  if name == "FedKTL":
    data = as_images(data)
  name, variant = VARIANTS.get(name, (name, {}))
  params = suite_params(name, **variant)
  # the last client never trains: the new-client evaluation below runs on it
  eng = _engine(name, "vmap", data, jr=0.8, cdr=0.25, new_clients=1, params=params)
  root = rng.root_key(0)
  server, clients = eng.init(root, data.x[0])
  init_structure = _structure((server, clients))
  for leaf in jax.tree.leaves(clients):
    assert leaf.shape[0] == data.num_clients - 1  # stacked over all training clients
  for r in range(3):
    server, clients, metrics = eng.run_round(server, clients, root, r)
    assert _structure((server, clients)) == init_structure, f"state changed in round {r}"
    for leaf in jax.tree.leaves((server, clients, metrics)):
      assert np.all(np.isfinite(np.asarray(leaf, np.float64))), f"non-finite in round {r}"
  summary = eng.evaluate(server, clients, root, 3)
  keys = [k for k in summary if k.startswith(("test_", "train_")) and k != "client_test_acc"]
  assert np.isfinite([summary[k] for k in keys]).all(), summary
  assert eng.trace_counts["round"] == 1 and eng.trace_counts["evaluate"] == 1

  assert_resume_is_exact(eng, root, data.x[0], str(tmp_path / "ckpt"), init_structure)

  final = eng.evaluate(server, clients, root, 3, final=True)
  assert final is None or np.isfinite(final["test_acc"])

  # new-client evaluation on the held-out client, from the initial server state
  if eng.algorithm.supports_new_clients:
    s0, _ = eng.init(root, data.x[0])
    new = eng.evaluate_new_clients(s0, root, data.x[0], epochs=1)
    assert np.isfinite([new["test_acc"], new["test_auc"], new["train_loss"]]).all()

  # vmap == sequential (the vmap engine above is reused: one compilation less per algorithm):
  # the states — the sequential executor updates each client alone, the vmapped one all
  # together — and the metrics.
  # The sequential executor evaluates each client's own samples in blocks
  # (`evaluate_lib.blocked_logits`): blocks of 4 here, whatever a forward pass costs, so
  # every view runs several, the last one ragged, against vmap's forward of the padded tables.
  s_v, c_v, vmap_hist = _run(eng, rounds=2)
  seq = _engine(name, "sequential", data, jr=0.8, cdr=0.25, new_clients=1, params=params)
  seq.eval_block, seq.eval_block_min_flops = 4, 0.0
  s_s, c_s, seq_hist = _run(seq, rounds=2)
  if name not in STATES_NOT_COMPARED:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
                 (s_v, c_v), (s_s, c_s))
  for a, b in zip(vmap_hist, seq_hist):
    for k in a:
      if k.startswith("test_acc"):
        assert a[k] == pytest.approx(b[k], abs=1e-6), k
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=LOSS_RTOL.get(name, 1e-4),
                                            abs=1e-6)

  alg = eng.algorithm
  if is_linear_server(alg):
    # server_update(U, w) == server_update(weighted_mean(U)[None], sum(w)[None]), for
    # uploads shaped as client_update's (traced, not compiled), of random values
    server, clients = eng.init(root, data.x[0])
    (clients,) = clients.values()  # one architecture group
    rkey = rng.round_key(root, 0)
    d = eng.data
    upload = jax.eval_shape(alg.client_update, server, jax.tree.map(lambda a: a[0], clients),
                            ClientData(d.x, d.y, d.train_idx[0], d.train_count[0]), rkey)[1]
    leaves, treedef = jax.tree.flatten(upload)
    draw = np.random.default_rng(0)
    uploads = jax.tree.unflatten(treedef, [
        jnp.asarray(draw.normal(size=(data.num_clients, *a.shape)), a.dtype) for a in leaves])
    weights = jnp.asarray(np.r_[np.arange(1, data.num_clients), 0.0], jnp.float32)
    full = alg.server_update(server, uploads, weights, rkey)
    mean = jax.tree.map(lambda u: jnp.tensordot(weights / weights.sum(), u, axes=1)[None],
                        uploads)
    reduced = alg.server_update(server, mean, weights.sum()[None], rkey)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 full, reduced)


def assert_resume_is_exact(eng, root, sample_x, folder: str, structure) -> None:
  """Checkpoint round trip: continuing from a restored round-1 state is bit-identical."""
  ckpt = checkpoint_lib.RunCheckpointer(folder)
  s1, c1 = eng.init(root, sample_x)
  s1, c1, _ = eng.run_round(s1, c1, root, 0)
  ckpt.save(1, s1, c1, {"history": {}})
  _, s_r, c_r, _ = ckpt.restore_latest(s1, c1)
  assert _structure((s_r, c_r)) == structure
  # placed as the live state is, so the compiled round runs on it without compiling again
  assert ([a.committed for a in jax.tree.leaves((s_r, c_r))]
          == [a.committed for a in jax.tree.leaves((s1, c1))])
  s1, c1, _ = eng.run_round(s1, c1, root, 1)
  s_r, c_r, _ = eng.run_round(s_r, c_r, root, 1)
  jax.tree.map(np.testing.assert_array_equal, (s1, c1), (s_r, c_r))


def test_linear_mark_is_not_inherited_by_an_overriding_server():
  from fedjax_lib.algorithms.fedavg import FedAvg  # pylint: disable=import-outside-toplevel

  class Median(FedAvg):
    def server_update(self, server_state, uploads, weights, key):
      return {"params": jax.tree.map(lambda u: jnp.median(u, axis=0), uploads)}

  class Renamed(FedAvg):  # inherits FedAvg's server_update: still linear
    pass

  assert is_linear_server(FedAvg.__new__(FedAvg))
  assert not is_linear_server(Median.__new__(Median))
  assert is_linear_server(Renamed.__new__(Renamed))
  assert has_hook(Renamed.__new__(Renamed), "new_client_variables")
  assert not has_hook(Renamed.__new__(Renamed), "final_views")
