"""FedMTL: federated multi-task learning with a fixed task-relationship regulariser.

Smith, Chiang, Sanjabi, Talwalkar, "Federated Multi-Task Learning", NeurIPS 2017 (MOCHA);
PFLlib's ``-algo FedMTL``, a MOCHA-like regulariser on deep models, not MOCHA's dual solver.

Every client k keeps its own model ``w_k`` (all start from the same initial model); the server
keeps the matrix ``W = [w_1 … w_N]`` of the latest model it received from each of the N
clients. A selected client trains its model on

    CE(w_k) + s·( ‖W‖_F² + tr(W Ω Wᵀ) ),     Ω = (I − 11ᵀ/N)²,
    s = lam · 10^(−f),  f = (number of digits of P) + 1,

where row k of ``W`` is the client's live ``w_k`` (gradient flows into it) and the other rows
are the server's copies (constants), and P is the number of parameters of one model (PFLlib's
scale: 10⁻⁷ for the 4-layer CNN's 878,538, 10⁻⁶ for the DNN's 79,510). Ω is the centring
matrix (idempotent), so ``tr(W Ω Wᵀ) = Σ_j ‖w_j − w̄‖²`` (the mean-regularised multi-task
relationship MOCHA cites) and the gradient of the regulariser w.r.t. ``w_k`` is
``2s·(w_k + (w_k − w̄))``: weight decay plus a pull toward the clients' mean
(:func:`mtl_regularizer`). It then uploads ``w_k``; the server writes every upload that
arrived into its row of ``W``. A client is evaluated with its own model. BatchNorm models
train in training mode; ``W`` holds parameters only (running statistics stay per client).

Vectorised form: the regulariser of client k needs only ``S_{−k} = Σ_{j≠k} w_j`` and
``Q_{−k} = Σ_{j≠k} ‖w_j‖²``, since ``‖W‖_F² = Q_{−k} + ‖w_k‖²`` and
``tr(W Ω Wᵀ) = ‖W‖_F² − ‖S_{−k} + w_k‖²/N``. The server keeps ``S = Σ_j w_j`` and
``Q = Σ_j ‖w_j‖²`` next to ``W`` (recomputed after every round); a client reads its own row
``W[k]`` (its id is in its state) to form ``S − W[k]`` and ``Q − ‖W[k]‖²``: O(P) work and
memory per client, never the N×P matrix.

State: server ``{"models": W [N, …params], "sum": S, "sum_sq": Q}``; client
``{"model": its variables, "id": its client id (int32)}``. Memory: ``W`` plus the clients'
own models, ``2·N·P`` floats (each client's model is also a row of ``W``; ``S`` adds P). For
the 4-layer CNN (P = 878,538, 3.51 MB in float32): 20 clients 141 MB, 100 clients 703 MB,
500 clients 3.51 GB (half of it the replicated server matrix, which every device holds in
full when the clients are sharded); a round adds the cohort's K uploads (K·P floats, as for
FedAvg). Download (counted): ``S_{−k}`` and ``Q_{−k}``, P + 1 floats; upload: ``w_k``, P
floats.

Differences from PFLlib (``pfllib_compat=True``, ``--pfllib-compat``, gives PFLlib's
no-gradient regulariser):

- PFLlib fills ``W`` from ``state_dict()`` (detached copies), so the regulariser contributes
  no gradient: its FedMTL trains every model on plain cross-entropy, i.e. runs Local.
  Default: the gradient flows through the client's own row; compat: PFLlib's value, added
  without gradient.
- PFLlib builds Ω from ``torch.ones`` instead of the identity and squares it element-wise,
  then uses only ``sqrt(Ω[0, 0]) = 1 − 1/m``, so its term is ``(1 − 1/m)²·‖Σ_j w_j‖²``, which
  (had it a gradient) would drive the models' sum to zero rather than the models toward
  their mean.
  Default: MOCHA's ``Ω = (I − 11ᵀ/N)²`` as a matrix; compat: PFLlib's expression.
- PFLlib's W has one column per client selected this round (m = ``int(N·join_ratio)``) and
  is rebuilt from their current models; here W has every client's latest upload and Ω is
  over all N clients (a client's update does not know the cohort). Identical with the default
  ``-jr 1`` and no drop-outs. A client that trained but dropped out keeps its new model,
  while the server's row keeps its previous one.
- PFLlib's flattened ``state_dict`` also holds BatchNorm buffers; here W holds parameters
  only. ``-itk`` (4000) is read only by a commented-out loop of PFLlib's client (row chunks
  of the same sum) and is not taken. ``lam`` is an addition: PFLlib's FedMTL ignores ``-lam``
  and has a fixed s = 10^(−f); the default ``lam = 1`` is PFLlib's scale.
- PFLlib sends every client the whole W (P·m floats); here S_{−k} and Q_{−k} (P + 1).
- New clients (``-nnc``) are not supported, as in PFLlib.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from fedjax_lib.algorithms.base import Algorithm, check_bool, check_number, stack_clients
from fedjax_lib.algorithms.registry import register
from fedjax_lib.core.local import cross_entropy_objective, train_model
from fedjax_lib.models.base import count_params


def pfllib_scale(num_params: int) -> float:
  """PFLlib's ``10^(−f)``, ``f = int(log10(P) + 1) + 1`` (P's digit count plus one)."""
  return 10.0 ** (-(int(math.log10(num_params) + 1) + 1))


def squared_norm(tree) -> jax.Array:
  """``Σ x²`` over every leaf, in float32."""
  return sum((jnp.sum(jnp.square(a.astype(jnp.float32))) for a in jax.tree.leaves(tree)),
             jnp.zeros((), jnp.float32))


def mtl_regularizer(params, others_sum, others_sq, num_clients: int, scale,
                    pfllib_compat: bool = False) -> jax.Array:
  """FedMTL's regulariser of one client, in float32.

  With ``W`` the N models (rows), this client's ``params`` one of them and the others given
  by their sum ``others_sum`` (a tree like ``params``) and sum of squared norms
  ``others_sq`` (constants):

      default:  s·( ‖W‖_F² + tr(W Ω Wᵀ) ),  Ω = I − 11ᵀ/N
                = s·( 2‖W‖_F² − ‖Σ_j w_j‖²/N ),      gradient  2s·(2w − (others_sum + w)/N)
      compat:   s·( ‖W‖_F² + (1 − 1/N)²·‖Σ_j w_j‖² )   (PFLlib's value, no gradient)

  Args:
    params: this client's parameters ``w`` (any pytree).
    others_sum: ``Σ_{j≠k} w_j``, the same structure.
    others_sq: ``Σ_{j≠k} ‖w_j‖²``, a scalar.
    num_clients: N.
    scale: s.
    pfllib_compat: PFLlib's expression, without gradient.
  """
  others_sum, others_sq = jax.lax.stop_gradient((others_sum, others_sq))
  if pfllib_compat:
    params = jax.lax.stop_gradient(params)
  frobenius = others_sq + squared_norm(params)
  column_sum = squared_norm(jax.tree.map(
      lambda s, w: s.astype(jnp.float32) + w.astype(jnp.float32), others_sum, params))
  if pfllib_compat:
    return scale * (frobenius + (1.0 - 1.0 / num_clients) ** 2 * column_sum)
  return scale * (2.0 * frobenius - column_sum / num_clients)


def _row_sums(models):
  """``(Σ_j W[j], Σ_j ‖W[j]‖²)`` of the stacked models ``W``."""
  total = jax.tree.map(lambda w: jnp.sum(w.astype(jnp.float32), axis=0).astype(w.dtype),
                       models)
  squares = sum((jnp.sum(jnp.square(w.astype(jnp.float32))) for w in jax.tree.leaves(models)),
                jnp.zeros((), jnp.float32))
  return total, squares


@register("FedMTL")
@dataclasses.dataclass(frozen=True)
class FedMTL(Algorithm):
  """Personal models tied by a mean-regularised multi-task penalty.

  Attributes:
    lam: multiplies PFLlib's scale 10^(−f) of the regulariser (``-lam``; 1.0 is PFLlib's
      FedMTL, which has no such flag; 0 is Local).
    pfllib_compat: PFLlib's gradient-free regulariser (module docstring).
  """
  DECAYED_RATES = ("local.learning_rate",)  # -ld: the one SGD optimizer

  lam: float = 1.0
  pfllib_compat: bool = False

  TRAIN_MODE = True

  def __post_init__(self):
    check_number(self.name, "lam", self.lam, 0.0)
    check_bool(self.name, "pfllib_compat", self.pfllib_compat)

  def init(self, key, sample_x, num_clients):
    variables = self.init_params(key, sample_x)
    models = stack_clients(variables["params"], num_clients)
    models = jax.tree.map(jnp.array, models)  # materialised rows, not a broadcast view
    total, squares = _row_sums(models)
    clients = {"model": stack_clients(variables, num_clients),
               "id": jnp.arange(num_clients, dtype=jnp.int32)}
    return {"models": models, "sum": total, "sum_sq": squares}, clients

  def client_update(self, server_state, client_state, data, key):
    models = server_state["models"]
    num_clients = jax.tree.leaves(models)[0].shape[0]
    cid = client_state["id"]
    variables = client_state["model"]
    counted = jax.tree.map(lambda w: w[cid].astype(jnp.float32), models)
    others_sum = jax.tree.map(lambda s, c: s.astype(jnp.float32) - c, server_state["sum"],
                              counted)
    others_sq = server_state["sum_sq"] - squared_norm(counted)
    scale = self.lam * pfllib_scale(count_params(variables))
    compat = self.pfllib_compat
    # The trained parts ({'base', 'head'}) have the structure of a row of W.
    variables, _, stats = train_model(
        self.model, variables, data, key, self.local, cross_entropy_objective,
        penalty=lambda parts: mtl_regularizer(parts, others_sum, others_sq, num_clients, scale,
                                              compat))
    return ({"model": variables, "id": cid}, {"params": variables["params"], "id": cid},
            stats)

  def server_update(self, server_state, uploads, weights, key):
    """Writes every upload that arrived (weight > 0) into its client's row of ``W``."""
    del key
    models = server_state["models"]
    num_clients = jax.tree.leaves(models)[0].shape[0]
    rows = jnp.where(jnp.asarray(weights) > 0, uploads["id"], num_clients)  # N: dropped
    models = jax.tree.map(lambda w, u: w.at[rows].set(u.astype(w.dtype), mode="drop"),
                          models, uploads["params"])
    total, squares = _row_sums(models)
    return {"models": models, "sum": total, "sum_sq": squares}

  def download(self, server_state):
    """What a client needs: ``S_{−k}`` (the size of S) and ``Q_{−k}``."""
    return {"sum": server_state["sum"], "sum_sq": server_state["sum_sq"]}

  def predict(self, server_state, client_state, x):
    return self.model.apply(client_state["model"], x)
