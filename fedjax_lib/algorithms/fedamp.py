"""FedAMP: Personalized Cross-Silo Federated Learning on Non-IID Data.

Huang, Chu, Zhou, Wang, Liu, Pei, Zhang, AAAI 2021 (PFLlib ``-algo FedAMP``).

Every client keeps its own model ``w_c``; there is no global model. Federated attentive message
passing alternates two steps:

1. **Server** (:func:`attentive_messages`): from the models ``w_j`` uploaded in a round, every
   uploader ``c`` gets its personalised cloud model

       u_c = Σ_{j≠c} ξ_cj·w_j + (1 − Σ_{j≠c} ξ_cj)·w_c,    ξ_cj = α_K·exp(−‖w_c − w_j‖²/σ)/σ,

   i.e. ``ξ_cj = α_K·A'(‖w_c − w_j‖²)`` for the attention-inducing ``A(t) = 1 − exp(−t/σ)``:
   the closer two models, the more they pass to each other.
2. **Client** ``c``, the next time it is selected: starting from ``u_c``, local SGD on

       CE(w) + (λ/(2α_K))·‖w − u_c‖²

   (the paper's proximal step toward ``u_c``, :func:`amp_penalty`); the client keeps the
   result as its model and uploads it. A client is evaluated with its own model.

Vectorised server: the uploads, flattened leaf by leaf and centred on their mean (distances do
not change; float32 cancellation in ``‖a‖² + ‖b‖² − 2⟨a, b⟩`` shrinks), give the Gram matrix
``G = Σ_leaves X Xᵀ`` [C, C] and every pairwise squared distance at once
(:func:`pairwise_squared_distances`); the mixing matrix ``Ξ`` [C, C] (``ξ`` off the diagonal,
``1 − row sum`` on it, zero columns for uploads that did not arrive; :func:`attention_weights`)
then gives all messages in one contraction ``U = Ξ W`` per leaf. The server writes the
messages into its bank of one message per client by the uploaders' ids (a client's id is in
its state), and a client reads its own row at its next update.

State: server ``{"messages": u [N, ...params]}``, every row the initial model until that client
first uploads (PFLlib's ``client_u``, a copy of the initial model); client ``{"model": its
variables, "id": its client id (int32)}``. Traffic: up ``w_c``, down ``u_c`` (P floats each).

Memory, for N clients, a cohort of C (``int(N·join_ratio)``) and P parameters: kept between
rounds ``2·N·P`` floats (the clients' models and the server's N messages; on a mesh the bank is
replicated, so every device holds its N·P), plus per round the C uploads and C new messages
(``2·C·P``) and two C×C matrices. PFLlib's FedAvgCNN on MNIST (P = 582,026, 2.33 MB in float32)
with C = N (``-jr 1``): 20 clients 93 MB kept + 93 MB per round (186 MB); 100 clients
466 + 466 MB (931 MB); 500 clients 2.33 + 2.33 GB (4.66 GB; the C×C matrices add 2 MB).

Hyperparameters (PFLlib flags and defaults): ``alphaK`` α_K > 0 (``-alk``, 1.0), ``sigma``
σ > 0 (``-sg``, 1.0), ``lam`` λ >= 0 (``-lam``, 1.0). Each ``ξ`` is at most α_K/σ, so
``α_K <= σ/(N − 1)`` keeps every message a convex combination; with PFLlib's defaults the
attention is all or nothing. On the bundled digits (20 clients, the DNN) the models are still
close after round 0 (``‖w_c − w_j‖²`` from 0.08 to 0.9), ``Σ_j ξ_cj`` is 9 to 13, and
``u_c = w_c + Σ_j ξ_cj (w_j − w_c)`` extrapolates far beyond the other models
(:meth:`FedAMP.check_settings` warns); from round 1 on they are far apart (12 to 70),
``ξ < 1e-5`` and ``u_c ≈ w_c``: each client then trains alone with a proximal pull toward its
previous model.

Differences from PFLlib (``pfllib_compat=True``, ``--pfllib-compat``, gives PFLlib's client):

- PFLlib's client continues from its own model and never loads ``u`` (``set_parameters`` only
  writes ``client_u``), and its regulariser ``0.5·(λ/α_K)·‖w − u‖₂`` (the norm, not its
  square) is built from ``.data`` copies, so it adds no gradient: PFLlib's FedAMP trains
  exactly like Local (its issue #95, "FedAMP curve identical to Local"). Default: the paper's
  client, starting from ``u_c``, with the squared term's gradient. Compat: PFLlib's client
  (its own model as the start, the unsquared term's value added to the round's ``local_loss``
  without gradient; the ``train_loss`` column stays the cross-entropy, where PFLlib's adds
  that term too).
- PFLlib builds ``u_c`` at the start of a round for that round's selected clients, from the
  previous round's uploads and the client's current model; here the server builds it at the
  end of a round for that round's uploaders (the same numbers with ``-jr 1`` and no
  drop-outs). With partial participation a client uses the message of its last upload
  (PFLlib: recomputed against the latest uploads with its stale model); a client that trained
  but dropped out keeps its previous message (PFLlib: recomputed from its new model).
- The messages mix parameters only; BatchNorm running statistics stay with each client
  (PFLlib's ``parameters()`` has no buffers either), trained in training mode.
- New clients (``-nnc``) are not supported, as in PFLlib.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fedjax_lib.algorithms.base import (Algorithm, SettingsContext, check_bool, check_number,
                                        check_positive, stack_clients)
from fedjax_lib.algorithms.fedprox import proximal_term
from fedjax_lib.algorithms.registry import register
from fedjax_lib.core.local import cross_entropy_objective, train_model

HIGHEST = jax.lax.Precision.HIGHEST  # float32 products on accelerators too (no TF32/bf16 passes)


def _row_mask(valid: jax.Array, leaf: jax.Array) -> jax.Array:
  return valid.reshape((-1,) + (1,) * (leaf.ndim - 1))


def pairwise_squared_distances(stacked, valid: jax.Array) -> jax.Array:
  """``D[i, j] = ‖w_i − w_j‖²`` over every leaf together, in float32 ``[C, C]``.

  Computed as ``diag(G)1ᵀ + 1diag(G)ᵀ − 2G`` from the Gram matrix ``G`` of the rows centred on
  the mean of the valid rows, clipped at 0, with an exact zero diagonal.

  Args:
    stacked: a pytree whose leaves have a leading axis of C rows.
    valid: ``[C]`` bool; invalid rows are read as zeros (their content, even NaN, never
      reaches a valid row's distances).
  """
  num = valid.shape[0]
  weights = valid.astype(jnp.float32)
  gram = jnp.zeros((num, num), jnp.float32)
  for leaf in jax.tree.leaves(stacked):
    rows = jnp.where(valid[:, None], leaf.reshape(num, -1).astype(jnp.float32), 0.0)
    rows = rows - (weights @ rows) / jnp.maximum(weights.sum(), 1.0)
    gram = gram + jnp.matmul(rows, rows.T, precision=HIGHEST)
  norms = jnp.diag(gram)
  distances = jnp.maximum(norms[:, None] + norms[None, :] - 2.0 * gram, 0.0)
  return jnp.where(jnp.eye(num, dtype=bool), 0.0, distances)


def attention_weights(distances: jax.Array, valid: jax.Array, alphaK, sigma) -> jax.Array:
  """The mixing matrix ``Ξ`` [C, C]: ``Ξ[c, j] = α_K·exp(−D[c, j]/σ)/σ`` for ``j ≠ c`` with
  ``valid[j]`` (0 for the other columns), ``Ξ[c, c] = 1 − Σ_{j≠c} Ξ[c, j]`` (rows sum to 1)."""
  num = distances.shape[0]
  others = valid[None, :] & ~jnp.eye(num, dtype=bool)
  xi = jnp.where(others, alphaK * jnp.exp(-distances / sigma) / sigma, 0.0)
  return xi + jnp.diag(1.0 - xi.sum(axis=1))


def attentive_messages(stacked, valid: jax.Array, alphaK, sigma):
  """Every row's cloud model ``u_c = Σ_j Ξ[c, j]·w_j`` (module docstring), one contraction per
  leaf; rows of invalid slots are meaningless.

  Args:
    stacked: the uploaded models, leaves ``[C, ...]``.
    valid: ``[C]`` bool, the uploads that arrived.
    alphaK, sigma: α_K and σ.

  Returns:
    A pytree like ``stacked`` (each leaf in its dtype, computed in float32).
  """
  mix = attention_weights(pairwise_squared_distances(stacked, valid), valid, alphaK, sigma)

  def combine(leaf):
    rows = jnp.where(_row_mask(valid, leaf), leaf.astype(jnp.float32), 0.0)
    return jnp.tensordot(mix, rows, axes=1, precision=HIGHEST).astype(leaf.dtype)

  return jax.tree.map(combine, stacked)


def amp_penalty(params, message, coefficient, pfllib_compat: bool = False) -> jax.Array:
  """FedAMP's pull toward the cloud model ``u`` (a constant), in float32.

  Default (the paper): ``(c/2)·‖w − u‖²``, gradient ``c·(w − u)``. Compat (PFLlib):
  ``(c/2)·‖w − u‖₂``, the unsquared norm, without gradient (PFLlib builds it from ``.data``).

  Args:
    params: the trained parameters ``w`` (any pytree).
    message: ``u``, the same structure.
    coefficient: ``c = λ/α_K``.
    pfllib_compat: PFLlib's value without gradient.
  """
  message = jax.lax.stop_gradient(message)
  if pfllib_compat:
    half_square = proximal_term(jax.lax.stop_gradient(params), message)
    return 0.5 * coefficient * jnp.sqrt(2.0 * half_square)
  return coefficient * proximal_term(params, message)


@register("FedAMP")
@dataclasses.dataclass(frozen=True)
class FedAMP(Algorithm):
  """Personal models pulled toward attentive per-client mixtures of the uploaded models.

  Attributes:
    alphaK: α_K, the attention step (``-alk``; PFLlib's help: λ/sqrt(global iteration)).
    sigma: σ, the attention kernel's scale (``-sg``).
    lam: λ; the proximal coefficient is λ/α_K (``-lam``).
    pfllib_compat: PFLlib's client (module docstring): its own model as the start and a
      regulariser without gradient, i.e. Local.
  """
  DECAYED_RATES = ("local.learning_rate",)  # -ld: the one SGD optimizer

  alphaK: float = 1.0
  sigma: float = 1.0
  lam: float = 1.0
  pfllib_compat: bool = False

  TRAIN_MODE = True

  def __post_init__(self):
    check_positive(self.name, "alphaK", self.alphaK, "-alk")
    check_positive(self.name, "sigma", self.sigma, "-sg")
    check_number(self.name, "lam", self.lam, 0.0)
    check_bool(self.name, "pfllib_compat", self.pfllib_compat)

  def init(self, key, sample_x, num_clients):
    variables = self.init_params(key, sample_x)
    messages = jax.tree.map(jnp.array, stack_clients(variables["params"], num_clients))
    clients = {"model": stack_clients(variables, num_clients),
               "id": jnp.arange(num_clients, dtype=jnp.int32)}
    return {"messages": messages}, clients

  def client_update(self, server_state, client_state, data, key):
    cid = client_state["id"]
    own = client_state["model"]
    message = jax.tree.map(lambda bank: bank[cid], server_state["messages"])
    start = own if self.pfllib_compat else {**own, "params": message}
    coefficient = self.lam / self.alphaK
    variables, _, stats = train_model(
        self.model, start, data, key, self.local, cross_entropy_objective,
        penalty=lambda params: amp_penalty(params, message, coefficient, self.pfllib_compat))
    return ({"model": variables, "id": cid}, {"params": variables["params"], "id": cid},
            stats)

  def server_update(self, server_state, uploads, weights, key):
    """The uploaders' messages (:func:`attentive_messages`), written into their rows."""
    del key
    bank = server_state["messages"]
    num_clients = jax.tree.leaves(bank)[0].shape[0]
    arrived = jnp.asarray(weights) > 0
    messages = attentive_messages(uploads["params"], arrived, self.alphaK, self.sigma)
    rows = jnp.where(arrived, uploads["id"], num_clients)  # N: not written
    bank = jax.tree.map(lambda b, m: b.at[rows].set(m.astype(b.dtype), mode="drop"),
                        bank, messages)
    return {"messages": bank}

  def check_settings(self, context: SettingsContext) -> list[str]:
    """Warns when a message's weights can leave [0, 1]: each ``ξ`` is at most α_K/σ, so with
    N clients the self weight ``1 − Σξ`` can reach ``1 − (N − 1)·α_K/σ`` (models still close,
    as after round 0) and ``u_c`` then extrapolates beyond the uploaded models."""
    others = len(context.train_counts) - 1
    lowest = 1.0 - others * self.alphaK / self.sigma
    if self.pfllib_compat or lowest >= 0.0:
      return []  # (PFLlib's client never trains toward u)
    return [f"FedAMP alphaK={self.alphaK} with sigma={self.sigma} and {others + 1} clients: a "
            f"message's self weight 1 - sum(xi) can reach {lowest:.3g} when the models are "
            "close (e.g. after round 0), so u_c extrapolates beyond the uploaded models; "
            f"alphaK <= sigma/(N-1) = {self.sigma / others:.3g} keeps every message a convex "
            "combination"]

  def download(self, server_state):
    """One client's message ``u_c`` (each client receives its own, all the same size)."""
    return jax.tree.map(lambda bank: bank[0], server_state["messages"])

  def predict(self, server_state, client_state, x):
    del server_state
    return self.model.apply(client_state["model"], x)
