"""FedPAC: Personalized Federated Learning with Feature Alignment and Classifier Collaboration.

Xu, Tong, Huang, ICLR 2023. PFLlib's ``-algo FedPAC``.

Every client keeps a personal head ``g_i`` on the shared base ``φ``. In a round, a selected
client receiving the global base ``φ`` and the global prototypes ``P̄`` (classes without one
are skipped):

1. computes its feature statistics on the received base, in evaluation mode, over its
   training set (:func:`feature_statistics`): with ``p_c`` its class frequencies, ``μ_c`` the
   mean feature of class c, ``n`` its sample count,

       v_i = (Σ_c p_c·E[‖z‖² | c] − p_c²·‖μ_c‖²) / n,        h_i[c] = p_c·μ_c

   (``v_i·n`` is the variance of the vector ``z ⊗ e_y``, whose mean is ``h_i``);
2. trains its head alone for one epoch on cross-entropy (base frozen);
3. trains the base alone for ``local_epochs`` epochs on
   ``CE(g_i(φ(x)), y) + λ·MSE(φ(x), P̄[y])`` (λ = ``lam``, PFLlib's ``-lam``; head frozen;
   the MSE of `fedjax_lib.algorithms.prototypes.prototype_mse`, 0 before the first
   aggregation);
4. uploads the base, the head, ``(v_i, h_i)`` and its local prototypes (per-class mean
   features of the trained base, evaluation mode).

The server averages the bases by sample count, the prototypes per class over the clients
that have the class (FedProto's rule), and gives every uploading client i a head
``Σ_j α_ij g_j`` over the uploaded heads, with α_i the solution of the quadratic program

    min_α  Σ_j α_j² v_j + ‖h_i − Σ_j α_j h_j‖²    s.t.  α ≥ 0, Σ_j α_j = 1,

i.e. ``αᵀ P_i α`` with ``P_i = diag(v) + G_i``, ``G_i[j, k] = ⟨h_i − h_j, h_i − h_k⟩``
(PFLlib writes the same matrix as ``diag(v) + dist``). Weights below 10⁻³ are then set to 0
without renormalising, as PFLlib and the authors' code do (:data:`MIN_WEIGHT`). A client is
evaluated with the global base and its head: the combined head once it has uploaded, its
own trained head if it trained but dropped out.

The QPs of all uploading clients are one batched solve inside the compiled server
(:func:`head_weights_qp`): accelerated projected gradient (FISTA with gradient restarts,
:data:`QP_ITERATIONS` steps of size ``1/L``, ``L`` from power iteration) onto the simplex of
the uploading clients (:func:`masked_simplex_projection`). ``P_i`` is never materialised:
with the Gram matrix ``M = H Hᵀ`` of the (centred) ``h_j``, ``P_i α`` is ``v ∘ α + M α −
(m_i·α)·1 − (1ᵀα)·m_i + M_ii (1ᵀα)·1`` (``m_i`` row i of M), so a step for all K clients is
one ``K x K`` matmul. The QP is convex (``P_i`` is PSD by construction). The weights match
scipy's SLSQP (float64) to ~1e-5 on the tests' random problems, and to ~5e-5 on the
statistics of 20 digits clients with the DNN (condition number ~1e3), which is float32's
floor there (about the condition number times float32's epsilon): the objectives agree to
~1e-7 relative, and more steps change nothing.

State: server ``{"base", "protos", "present", "heads": [N, head], "head_round": [N],
"round"}`` — the server keeps the latest combined head of every client (a client's update
and its evaluation read row ``id``), ``head_round`` the round it was combined in; client
``{"head": its own head, "id", "trained_round"}`` (plus ``model_state`` for BatchNorm
models), ``trained_round`` the round it last trained in. The evaluated head is the server's
row when ``head_round ≥ trained_round`` (it is newer), else the client's own. Memory: N heads
on the server (N·(d·C + C) floats: 20 clients with the CNN's 512x10 head, 0.4 MB).

Differences from PFLlib (``serverpac.py`` / ``clientpac.py``):

- PFLlib collects ``(v, h)`` from the *selected* clients in selection order, but the heads
  and ids of the uploaded clients in the order ``random.sample`` returns them (a second
  random permutation of the selected clients): client ``U[k]`` receives the weights solved
  for client ``S[k]`` applied to the heads in ``U`` order, so the head collaboration is
  scrambled by a random permutation every round. Default: each client's QP uses its own
  statistics and the weights apply to the heads they were solved for.
  ``pfllib_compat=True`` (``--pfllib-compat``) reproduces the scrambling: with π a uniform
  random permutation of the uploading slots (drawn from the server's key), client π(a)
  receives ``Σ_j α_aj g_π(j)``. PFLlib crashes with ``-cdr > 0`` (``diag(v)`` over the
  selected clients against ``dist`` over the uploaded ones); with drop-outs the compat mode
  permutes the clients that uploaded.
- PFLlib makes ``P_i`` positive semi-definite by dropping eigen-directions with eigenvalue
  below 0.01 whenever a float rounding makes one negative, and falls back to the local head
  when cvxpy still finds no solution (with an indexing bug: ``uploaded_heads[cid]``). ``P_i``
  is PSD by construction here and the solver needs neither.
- Statistics and prototypes use all of a client's training samples (PFLlib's shuffled
  drop_last loaders leave out up to ``batch_size − 1``, and count classes on another pass).
- Prototypes come from the clients that uploaded (weight > 0); PFLlib also uses those of
  clients that dropped out after training.
- PFLlib's uploaded heads are the clients' live head modules, and it writes each combined
  head back into them as it goes (``set_head``): the k-th client's head is combined from the
  *already combined* heads of the clients before it in upload order. Here every combination
  reads the trained heads (the paper's rule); ``pfllib_compat=True`` combines in place in
  the (scrambled) upload order, as PFLlib (:func:`combined_in_place`). It matters when the QP
  spreads its weights (similar or small clients) and hardly when each client's weight sits on
  its own head (strongly non-IID data).
- In round 0 PFLlib computes the feature statistics with the model still in training mode
  (batch statistics, moving the running ones); here in evaluation mode. Only models with
  BatchNorm notice, and only before their first training.
- ``train_loss`` is the cross-entropy of the evaluated model (PFLlib reports none for
  FedPAC). New clients (``-nnc``) are not supported, as in PFLlib.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fedjax_lib.algorithms.base import (Algorithm, SettingsContext, Traffic,
                                        abstract_variables, check_bool, check_number,
                                        rows_traffic, tree_traffic)
from fedjax_lib.algorithms.prototypes import (class_mean_server, eval_class_means,
                                              prototype_mse, valid_row_order)
from fedjax_lib.algorithms.registry import register
from fedjax_lib.algorithms.split import merge_parts, split_parts
from fedjax_lib.core.aggregate import weighted_average
from fedjax_lib.core.local import (class_counts, cross_entropy_objective,
                                   masked_cross_entropy, train_model)
from fedjax_lib.errors import ConfigError
from fedjax_lib.models.base import model_state

# Steps of the QP solver: on random test problems 300 leave ~3e-4 in the weights, 1000 reach
# float32's floor (3000 and 10000 change nothing, there and on digits' statistics).
QP_ITERATIONS = 1000
# Power-iteration steps for the step size, and the safety factor on the estimated L.
POWER_ITERATIONS = 50
STEP_SAFETY = 1.05
# Combination weights below this are set to 0 (PFLlib's and the authors' ``eps``).
MIN_WEIGHT = 1e-3
_HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------- client statistics
def feature_statistics(embed, data, num_classes: int):
  """``(v, h [C, d])``: FedPAC's variance term and class-weighted means of one client.

  ``v = (Σ_c p_c·mean_c‖z‖² − p_c²·‖μ_c‖²) / n`` and ``h[c] = p_c·μ_c``, with ``z = embed(x)``
  over the client's ``n`` training samples, ``p_c`` the share of class c and ``μ_c`` its
  mean feature (a class the client lacks contributes nothing).
  """
  def with_square(x):
    z = embed(x).astype(jnp.float32)
    return jnp.concatenate([z, jnp.square(z).sum(-1, keepdims=True)], -1)

  means, _ = eval_class_means(with_square, data, num_classes)
  counts = class_counts(data, num_classes)
  n = jnp.maximum(counts.sum(), 1.0)
  share = counts / n
  mu, second = means[:, :-1], means[:, -1]
  variance = (share * second - jnp.square(share) * jnp.square(mu).sum(-1)).sum() / n
  return variance, share[:, None] * mu


# ---------------------------------------------------------------- the QP
def masked_simplex_projection(z: jax.Array, valid: jax.Array) -> jax.Array:
  """Euclidean projection of ``z [K]`` onto ``{α ≥ 0, Σα = 1, α_j = 0 where not valid}``.

  The sort-based rule (Held et al.; Duchi et al. 2008) on the valid entries:
  ``α_j = max(z_j − τ, 0)`` with ``τ`` chosen so the valid entries sum to 1. All zeros when
  no entry is valid.
  """
  size = z.shape[-1]
  count = valid.sum()
  ranks = jnp.arange(1, size + 1)
  ordered = jnp.sort(jnp.where(valid, z, -jnp.inf))[::-1]  # the valid entries first
  sums = jnp.cumsum(jnp.where(ranks <= count, ordered, 0.0))
  support = (ordered - (sums - 1.0) / ranks > 0) & (ranks <= count)
  rho = jnp.maximum(jnp.max(jnp.where(support, ranks, 0)), 1)
  tau = (sums[rho - 1] - 1.0) / rho
  return jnp.where(valid, jnp.maximum(z - tau, 0.0), 0.0)


def head_weights_qp(variance: jax.Array, h: jax.Array, valid: jax.Array,
                    iterations: int = QP_ITERATIONS) -> jax.Array:
  """``α [K, K]``: row i solves ``min αᵀ P_i α`` over the simplex of the valid clients.

  ``P_i = diag(v) + G_i``, ``G_i[j, k] = ⟨h_i − h_j, h_i − h_k⟩`` (module docstring); rows
  and columns of invalid clients are 0.

  Args:
    variance: ``[K]`` the clients' ``v``.
    h: ``[K, ...]`` the clients' ``h`` (flattened).
    valid: ``[K]`` bool, the clients that take part (uploaded).
    iterations: FISTA steps (static).
  """
  size = variance.shape[0]
  mask = valid.astype(jnp.float32)
  # where, not a product: whatever an invalid slot holds (even NaN) must not reach the rest
  flat = jnp.where(valid[:, None], h.reshape(size, -1).astype(jnp.float32), 0.0)
  # Centring changes no difference h_i − h_j and keeps the Gram entries small.
  mean = (mask @ flat) / jnp.maximum(mask.sum(), 1.0)
  centred = (flat - mean) * mask[:, None]
  gram = jnp.matmul(centred, centred.T, precision=_HIGHEST)
  gram_diag = jnp.diag(gram)
  v = jnp.where(valid, variance.astype(jnp.float32), 0.0)

  def apply_p(a):  # row i: P_i a_i, for every i at once
    a = a * mask[None]
    total = a.sum(1, keepdims=True)
    own = (gram * a).sum(1, keepdims=True)  # m_i · a_i
    out = (v[None] * a + jnp.matmul(a, gram, precision=_HIGHEST) - own - gram * total
           + gram_diag[:, None] * total)
    return out * mask[None]

  def power_step(_, x):
    y = apply_p(x)
    return y / jnp.maximum(jnp.linalg.norm(y, axis=1, keepdims=True), 1e-30)

  # A start with a component along every eigenvector of the valid block (almost surely).
  start = mask[None] * (1.0 + 0.1 * jnp.sin(jnp.arange(size, dtype=jnp.float32) + 1.0))[None]
  start = jnp.broadcast_to(start, (size, size))
  x = jax.lax.fori_loop(0, POWER_ITERATIONS, power_step,
                        start / jnp.maximum(jnp.linalg.norm(start, axis=1, keepdims=True),
                                            1e-30))
  top = (x * apply_p(x)).sum(1) / jnp.maximum((x * x).sum(1), 1e-30)
  lipschitz = 2.0 * STEP_SAFETY * jnp.maximum(top, 1e-30)  # of the gradient 2 P_i α
  project = jax.vmap(masked_simplex_projection, (0, None))

  def fista_step(_, carry):
    x, y, t = carry
    x_new = project(y - 2.0 * apply_p(y) / lipschitz[:, None], valid)
    t_new = (1.0 + jnp.sqrt(1.0 + 4.0 * t * t)) / 2.0
    y_new = x_new + ((t - 1.0) / t_new)[:, None] * (x_new - x)
    restart = ((y - x_new) * (x_new - x)).sum(1) > 0  # momentum points uphill: drop it
    return (x_new, jnp.where(restart[:, None], x_new, y_new),
            jnp.where(restart, 1.0, t_new))

  uniform = jnp.broadcast_to(mask / jnp.maximum(mask.sum(), 1.0), (size, size))
  alpha, _, _ = jax.lax.fori_loop(0, iterations, fista_step,
                                  (uniform, uniform, jnp.ones((size,), jnp.float32)))
  return alpha * mask[:, None]


def combination_weights(variance, h, valid) -> jax.Array:
  """:func:`head_weights_qp` with weights below :data:`MIN_WEIGHT` set to 0 (not
  renormalised, as PFLlib does)."""
  alpha = head_weights_qp(variance, h, valid)
  return jnp.where(alpha > MIN_WEIGHT, alpha, 0.0)


def combined_in_place(alpha: jax.Array, heads, valid: jax.Array, order: jax.Array):
  """PFLlib's head combination (``pfllib_compat``): slot by slot in ``order`` (its upload
  order), ``H[t] ← Σ_j α[t, j]·H[j]`` written back at once, so later slots combine heads
  already combined (PFLlib's uploaded heads are the clients' live modules, which ``set_head``
  overwrites). ``heads``: the uploaded heads (leaves ``[K, ...]``, invalid slots zero)."""
  def step(k, table):
    t = order[k]
    return jax.tree.map(
        lambda h: jnp.where(valid[t], h.at[t].set(jnp.tensordot(alpha[t], h, axes=1,
                                                                precision=_HIGHEST)), h),
        table)
  return jax.lax.fori_loop(0, valid.shape[0], step, heads)


def scrambled_weights(alpha: jax.Array, valid: jax.Array, key: jax.Array) -> jax.Array:
  """PFLlib's assignment (``pfllib_compat``): ``α'[π(a), π(j)] = α[a, j]`` for a uniform
  random permutation π of the valid slots (padding-independent: `valid_row_order`)."""
  order = valid_row_order(key, valid)
  rank = jnp.cumsum(valid) - 1
  target = jnp.where(valid, order[jnp.clip(rank, 0, None)], 0)  # π(a)
  perm = jax.nn.one_hot(target, alpha.shape[0], dtype=alpha.dtype) * valid[:, None]  # Q[a, π(a)]
  return jnp.matmul(jnp.matmul(perm.T, alpha, precision=_HIGHEST), perm, precision=_HIGHEST)


# ---------------------------------------------------------------- the algorithm
@register("FedPAC")
@dataclasses.dataclass(frozen=True)
class FedPAC(Algorithm):
  """Shared base with prototype alignment; personal heads combined by a QP on the server.

  Attributes:
    lam: weight λ of the feature-alignment MSE to the global prototypes (PFLlib ``-lam``,
      default 1.0).
    pfllib_compat: scramble the head combination by a random permutation and combine the
      heads in place, as PFLlib's ordering and aliasing bugs do (module docstring).
  """

  REFERENCE_SPLIT = True  # PFLlib's main.py wraps the model in BaseHeadSplit
  DECAYED_RATES = ("local.learning_rate",)  # -ld: the one optimizer (head epoch and base epochs)

  lam: float = 1.0
  pfllib_compat: bool = False

  TRAIN_MODE = True

  def __post_init__(self):
    check_number(self.name, "lam", self.lam, 0.0)
    check_bool(self.name, "pfllib_compat", self.pfllib_compat)

  def _shapes(self, sample_x):
    variables = abstract_variables(self.model, sample_x)
    x = jax.ShapeDtypeStruct((1, *sample_x.shape), sample_x.dtype)
    features, logits = jax.eval_shape(
        lambda v, x: self.model.apply(v, x, method="forward"), variables, x)
    return logits.shape[-1], features.shape[-1]

  def init(self, key, sample_x, num_clients):
    variables = self.init_params(key, sample_x)
    parts = split_parts(variables)
    num_classes, dim = self._shapes(sample_x)
    copies = lambda tree: jax.tree.map(
        lambda a: jnp.array(jnp.broadcast_to(a, (num_clients,) + a.shape)), tree)
    server = {"base": parts["base"],
              "protos": jnp.zeros((num_classes, dim), jnp.float32),
              "present": jnp.zeros((num_classes,), bool),
              "heads": copies(parts["head"]),
              "head_round": jnp.full((num_clients,), -1, jnp.int32),
              "round": jnp.zeros((), jnp.int32)}
    client = {"head": copies(parts["head"]),
              "id": jnp.arange(num_clients, dtype=jnp.int32),
              "trained_round": jnp.full((num_clients,), -1, jnp.int32)}
    if model_state(variables):
      client["model_state"] = copies(model_state(variables))
    return server, client

  def current_head(self, server_state, client_state):
    """The client's head: the server's combined one unless it trained (and dropped out)
    after that was made."""
    cid = client_state["id"]
    newer = server_state["head_round"][cid] >= client_state["trained_round"]
    return jax.tree.map(lambda table, own: jnp.where(newer, table[cid], own),
                        server_state["heads"], client_state["head"])

  def variables(self, server_state, client_state):
    """The model a client evaluates and starts training from."""
    parts = merge_parts({"base": server_state["base"],
                         "head": self.current_head(server_state, client_state)})
    return {**parts, **client_state.get("model_state", {})}

  def client_update(self, server_state, client_state, data, key):
    num_classes = server_state["protos"].shape[0]
    variables = self.variables(server_state, client_state)
    features = lambda v: (lambda x: self.model.apply(v, x, method="features"))
    variance, h = feature_statistics(features(variables), data, num_classes)

    head_spec = dataclasses.replace(self.local, local_epochs=1)
    variables, _, head_stats = train_model(self.model, variables, data,
                                           jax.random.fold_in(key, 0), head_spec,
                                           cross_entropy_objective, trainable=("head",))

    def aligned(features, logits, batch, carry):
      ce = masked_cross_entropy(logits, batch.y, batch.mask)
      mse = prototype_mse(features, batch.y, batch.mask, server_state["protos"],
                          server_state["present"])
      return ce + self.lam * mse, carry

    variables, _, stats = train_model(self.model, variables, data,
                                      jax.random.fold_in(key, 1), self.local, aligned,
                                      trainable=("base",))
    protos, present = eval_class_means(features(variables), data, num_classes)
    parts = split_parts(variables)
    upload = {"base": parts["base"], "head": parts["head"], "protos": protos,
              "present": present, "variance": variance, "h": h, "id": client_state["id"]}
    state = {"head": parts["head"], "id": client_state["id"],
             "trained_round": server_state["round"]}
    if model_state(variables):
      state["model_state"] = model_state(variables)
    metrics = {"loss": stats["loss"], "head_loss": head_stats["loss"],
               "steps": stats["steps"] + head_stats["steps"]}
    return state, upload, metrics

  def server_update(self, server_state, uploads, weights, key):
    valid = jnp.asarray(weights) > 0
    base = weighted_average(uploads["base"], weights, fallback=server_state["base"])
    prototypes = class_mean_server(uploads, weights)
    alpha = combination_weights(uploads["variance"], uploads["h"], valid)
    trained = jax.tree.map(
        lambda heads: jnp.where(valid.reshape((-1,) + (1,) * (heads.ndim - 1)),
                                heads.astype(jnp.float32), 0.0), uploads["head"])
    if self.pfllib_compat:
      alpha = scrambled_weights(alpha, valid, key)
      combined = combined_in_place(alpha, trained, valid, valid_row_order(key, valid))
    else:
      combined = jax.tree.map(
          lambda heads: jnp.tensordot(alpha, heads, axes=1, precision=_HIGHEST), trained)
    num_clients = server_state["head_round"].shape[0]
    rows = jnp.where(valid, uploads["id"], num_clients)  # N: dropped by the scatter
    heads = jax.tree.map(lambda table, new: table.at[rows].set(new.astype(table.dtype),
                                                                mode="drop"),
                         server_state["heads"], combined)
    head_round = server_state["head_round"].at[rows].set(server_state["round"], mode="drop")
    return {"base": base, **prototypes, "heads": heads, "head_round": head_round,
            "round": server_state["round"] + 1}

  def predict(self, server_state, client_state, x):
    return self.model.apply(self.variables(server_state, client_state), x)

  # ------------------------------------------------------------------ communication
  def download(self, server_state):
    """The global base and prototypes (and one client's head, counted in
    :meth:`download_traffic`); the server keeps the other clients' heads."""
    return {"base": server_state["base"], "protos": server_state["protos"],
            "present": server_state["present"]}

  def download_traffic(self, server_state) -> Traffic:
    """The base, the prototypes of the classes the server has, and the client's head."""
    base = tree_traffic(server_state["base"])
    protos = rows_traffic(server_state["protos"], server_state["present"])
    head = tree_traffic(jax.tree.map(lambda t: t[0], server_state["heads"]))
    return Traffic(*(a + b + c for a, b, c in zip(base, protos, head)))

  def upload_traffic(self, upload) -> Traffic:
    """The base, the head, ``v``, and the rows of the prototypes and of ``h`` of the
    classes the client has."""
    dense = tree_traffic({"base": upload["base"], "head": upload["head"],
                          "variance": upload["variance"]})
    protos = rows_traffic(upload["protos"], upload["present"])
    h = rows_traffic(upload["h"], upload["present"])
    return Traffic(*(a + b + c for a, b, c in zip(dense, protos, h)))

  def check_settings(self, context: SettingsContext) -> list[str]:
    """Refuses a model whose base has no parameters (nothing to share or align)."""
    parts = split_parts(abstract_variables(self.model, context.sample_x))
    if not jax.tree.leaves(parts["base"]):
      raise ConfigError(
          f"{self.name} shares and aligns the model's base, but model "
          f"{context.model_name!r} has no base parameters (its features are the raw "
          "inputs); use a model with a feature extractor (cnn, dnn, resnet18, ...)")
    return []
