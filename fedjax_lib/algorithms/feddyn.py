"""FedDyn: Federated Learning Based on Dynamic Regularization.

Acar, Zhao, Matas, Mattina, Whatmough, Saligrama, ICLR 2021.

Every client keeps a state ``h_i`` (the paper's ``∇L_i(θ_i^{t−1})``, PFLlib's ``old_grad``; zero
at the start) and the server a state ``h`` (zero at the start) next to the global model
``w_g``. A selected client receives ``w_g``, runs local SGD from it on

    CE(w) + (α/2)·‖w − w_g‖² − ⟨w − w_g, h_i⟩

(:func:`dynamic_regularizer`; ``w_g`` and ``h_i`` are constants; the offset ``w_g`` in the
linear term changes the value, not the gradient ``α(w − w_g) − h_i``), then sets
``h_i ← h_i − α(w_i − w_g)`` and uploads ``w_i``. The server, over the set ``S`` of clients
whose uploads arrived (weight > 0):

    h ← h − α·(1/N)·Σ_{i∈S} (w_i − w_g),        w_g ← (1/|S|)·Σ_{i∈S} w_i − h/α,

with ``N`` the number of (training) clients, kept in the server state from ``init``. Every
client is evaluated with the global model, as FedAvg. ``alpha`` = α (PFLlib ``-al``, default
1.0, must be > 0). A round in which no upload arrives changes nothing.

State: server ``{"params": w_g, "h": h, "num_clients": N, "num_join_clients":
int(N·join_ratio)}`` (the counts are int32 scalars); client ``{"h": h_i}`` stacked over all
clients. Only ``w_g`` is sent to the clients (:meth:`FedDyn.download`); the upload is ``w_i``.

Differences from PFLlib (``pfllib_compat=True``, ``--pfllib-compat``, gives PFLlib's
behaviour for the first two):

- PFLlib's proximal term is ``(α/2)·‖w − w_g‖₂``, the norm, not its square (the paper's
  regulariser is squared): its gradient ``(α/2)(w − w_g)/‖w − w_g‖`` has a constant length
  α/2 whatever the distance. Default: the paper's square; compat: the norm, with gradient 0
  at ``w = w_g`` as PyTorch's ``norm`` backward gives (:func:`safe_norm`).
- PFLlib's server divides ``Σ w_i`` by the planned join count ``int(N·join_ratio)``, not by the
  number of uploads that arrived, so with ``client_drop_rate`` > 0 its global model is the
  survivors' sum shrunk toward zero (and with ``random_join_ratio`` inflated). Default: the
  paper's mean over ``S``; compat: ``int(N·join_ratio)``, which needs ``join_ratio`` to be the
  run's ``-jr`` (the runner fills it). Identical when every planned client arrives.
- The linear term is ``−⟨w − w_g, h_i⟩`` instead of PFLlib's ``−⟨w, h_i⟩``: the same gradient,
  so the same training; only the reported local loss (the round's ``local_loss``, which
  includes the regulariser) differs by the constant ``⟨w_g, h_i⟩``. PFLlib's evaluated
  ``train_loss`` adds its regulariser; ours is plain cross-entropy of the global model.
- A client that trained but dropped out keeps its new ``h_i`` (as in PFLlib; the engine keeps
  a dropped client's state) while the server never adds its term to ``h``.
- Models with BatchNorm or dropout train in training mode; ``h``, ``h_i`` and the regulariser
  cover the parameters only and each client keeps its running statistics
  (``client_state['model_state']``), as PFLlib's loops over ``model.parameters()`` do.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fedjax_lib.algorithms.base import check_bool, check_positive
from fedjax_lib.algorithms.fedavg import FedAvg
from fedjax_lib.algorithms.registry import register
from fedjax_lib.algorithms.scaffold import check_join_ratio, client_counts
from fedjax_lib.core.aggregate import arrived_sum
from fedjax_lib.core.local import train_locally
from fedjax_lib.models.base import has_train_mode


def safe_norm(squared: jax.Array) -> jax.Array:
  """``sqrt(squared)`` with gradient 0 (not NaN) at 0, as PyTorch's ``norm`` backward."""
  positive = squared > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def dynamic_regularizer(params, anchor, h, alpha, squared: bool = True) -> jax.Array:
  """FedDyn's client regulariser ``(α/2)·‖w − w_g‖² − ⟨w − w_g, h⟩`` in float32.

  The norm runs over every leaf together (one flat parameter vector). ``anchor`` (``w_g``)
  and ``h`` are constants: the gradient is ``α(w − w_g) − h``.

  Args:
    params: ``w``, any pytree.
    anchor: ``w_g``, the same structure.
    h: the client state ``h_i``, the same structure.
    alpha: α.
    squared: False gives PFLlib's ``(α/2)·‖w − w_g‖`` (the norm, not squared).

  Returns:
    A float32 scalar.
  """
  anchor, h = jax.lax.stop_gradient((anchor, h))
  diffs = jax.tree.map(lambda p, a: p.astype(jnp.float32) - a.astype(jnp.float32),
                       params, anchor)
  zero = jnp.zeros((), jnp.float32)
  sq = sum((jnp.sum(jnp.square(d)) for d in jax.tree.leaves(diffs)), zero)
  linear = sum((jnp.sum(d * g.astype(jnp.float32))
                for d, g in zip(jax.tree.leaves(diffs), jax.tree.leaves(h))), zero)
  proximal = sq if squared else safe_norm(sq)
  return 0.5 * alpha * proximal - linear


@register("FedDyn")
@dataclasses.dataclass(frozen=True)
class FedDyn(FedAvg):
  """Dynamic regularisation: per-client linear terms that align local and global optima.

  Attributes:
    alpha: α of the regulariser and of both state updates (PFLlib ``-al``, default 1.0).
    join_ratio: the run's ``-jr``, only read with ``pfllib_compat`` (the planned join count
      ``int(N·join_ratio)`` PFLlib divides by); the runner fills it.
    pfllib_compat: PFLlib's unsquared norm and its division by the planned join count (see
      the module docstring).
  """
  DECAYED_RATES = ("local.learning_rate",)  # -ld: the one SGD optimizer

  alpha: float = 1.0
  join_ratio: float = 1.0
  pfllib_compat: bool = False

  def __post_init__(self):
    check_positive(self.name, "alpha", self.alpha, "-al")
    check_join_ratio(self.name, self.join_ratio)
    check_bool(self.name, "pfllib_compat", self.pfllib_compat)

  TRAIN_MODE = True

  def init(self, key, sample_x, num_clients):
    server, clients = super().init(key, sample_x, num_clients)  # FedAvg's: statistics apart
    params = server["params"]
    server = {"params": params, "h": jax.tree.map(jnp.zeros_like, params),
              **client_counts(num_clients, self.join_ratio)}
    clients = {"h": jax.tree.map(lambda a: jnp.zeros((num_clients,) + a.shape, a.dtype),
                                 params), **clients}
    return server, clients

  def download(self, server_state):
    return {"params": server_state["params"]}

  def local_loss(self, server_state, client_state):
    """``CE(w) + (α/2)·‖w − w_g‖² − ⟨w − w_g, h_i⟩`` (PFLlib's unsquared norm with compat)."""
    anchor, h = server_state["params"], client_state["h"]

    def loss(params, batch, key):
      return self.ce_loss(params, batch, key) + dynamic_regularizer(
          params, anchor, h, self.alpha, squared=not self.pfllib_compat)
    return loss

  def client_update(self, server_state, client_state, data, key):
    anchor = server_state["params"]
    new_state = {}
    if has_train_mode(self.model):  # anchor = {'params': ...}; statistics stay on the client
      h_params = client_state["h"]["params"]
      params, new_state, stats = self.train_global_copy(
          server_state, client_state, data, key,
          penalty=lambda p: dynamic_regularizer(p, anchor["params"], h_params, self.alpha,
                                                squared=not self.pfllib_compat))
    else:
      params, _, stats = train_locally(anchor, data, key, self.local,
                                       self.local_loss(server_state, client_state))
    h = jax.tree.map(
        lambda hi, w, a: (hi.astype(jnp.float32) - self.alpha * (
            w.astype(jnp.float32) - a.astype(jnp.float32))).astype(hi.dtype),
        client_state["h"], params, anchor)
    return {"h": h, **new_state}, params, stats

  def server_update(self, server_state, uploads, weights, key):
    """``h ← h − (α/N)·Σ(w_i − w_g)``, ``w_g ← Σw_i/|S| − h/α`` over the uploads that arrived."""
    del key
    anchor = server_state["params"]
    arrived = jnp.sum(jnp.asarray(weights) > 0)
    deltas = jax.tree.map(lambda u, a: u.astype(jnp.float32) - a.astype(jnp.float32)[None],
                          uploads, anchor)
    sum_delta = arrived_sum(deltas, weights)
    sum_params = arrived_sum(uploads, weights)
    num_clients = server_state["num_clients"].astype(jnp.float32)
    h = jax.tree.map(lambda hs, d: hs.astype(jnp.float32) - self.alpha * d / num_clients,
                     server_state["h"], sum_delta)
    if self.pfllib_compat:
      denominator = server_state["num_join_clients"].astype(jnp.float32)
    else:
      denominator = jnp.maximum(arrived, 1).astype(jnp.float32)
    params = jax.tree.map(lambda s, hs: s / denominator - hs / self.alpha, sum_params, h)
    # Nothing arrived: nothing changes (PFLlib asserts at least one upload).
    keep = lambda new, old: jnp.where(arrived > 0, new, old.astype(jnp.float32)).astype(
        old.dtype)
    return dict(server_state, params=jax.tree.map(keep, params, anchor),
                h=jax.tree.map(keep, h, server_state["h"]))
