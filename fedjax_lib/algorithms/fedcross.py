"""FedCross: federated learning by multi-model cross-aggregation.

Hu, Chen, Chen, Zhang, Wei, Luo, Sun, Wang, "FedCross: Towards Accurate Federated Learning
via Multi-Model Cross-Aggregation", ICDE 2024.

The server keeps K *middleware* models ``W_1 … W_K`` (K = the cohort size
``int(N·join_ratio)``), all starting as the initial global model. Every round each middleware
model is trained by one client (plain SGD on cross-entropy, from the middleware model), and
the server

1. averages the arrived uploads by sample count into the global model ``w_g`` (what new
   clients fine-tune from and, by default, every client is evaluated with);
2. before round ``first_stage_bound`` (the first stage) replaces every middleware model by
   ``w_g``; from then on *cross-aggregates* them: each trained middleware model ``W_j`` picks
   a collaborating model ``W_co(j)`` and becomes

       W_j ← α·W_j + (1 − α)·W_co(j)              (α = ``fedcross_alpha``, 0.99)

   where ``co(j)`` is chosen by ``collaberative_model_select_strategy``
   (:func:`collaborators`): 0, in order, ``(j + r mod (K−1) + 1) mod K`` in round r; 1, the
   least similar model; 2, the most similar one (never ``j`` itself). Similarity is the
   cosine of the flattened models, all pairs from one Gram matrix (:func:`similarities`).
   All K new models are one contraction ``A·W`` with ``A = α·I + (1 − α)·onehot(co)``.

How the cohort meets the middleware models (``assign``): PFLlib gives the i-th selected
client (in its random selection order) middleware model i. Here a client's update sees only
its own id and the server state, not the cohort, so the server draws, for the next round, a
middleware index for every client id: ``assign = π mod K`` for a uniformly random
permutation π of the N ids (:func:`draw_assignment`, from the server key; ``init`` draws
round 0's). With ``join_ratio = 1`` (K = N, the default) this is a uniformly random
one-to-one assignment, as PFLlib's. With K < N the cohort is a random K of the N clients and
two of them may hold the same index: that middleware model becomes the sample-weighted
average of their trained models, and a model no arrived client trained (its clients were not
selected or dropped out, weight 0) keeps its previous value; cross-aggregation then mixes all
K. Slots of weight 0 change nothing.

State: server ``{"params": w_g, "middleware": W [K, …], "assign": [N] int32, "round": r
(int32)}`` (with ``pfllib_compat`` also ``"chunks"``: per parameter tensor, the index of its
PyTorch-order pair, int32 scalars, for PFLlib's similarity); client ``{"id": its client id}``
(with ``pfllib_compat`` also ``"model"``: its last trained model, the initial model until it
trains). Memory: K + 1 models on the server. Download (counted): the middleware model, and
by default ``w_g``, which the clients are evaluated with (PFLlib never sends it); upload: the
trained model (its middleware index is metadata).

Differences from PFLlib (``pfllib_compat=True``, ``--pfllib-compat``, gives PFLlib's
behaviour for the first four):

- Evaluation: PFLlib's FedCross never sends the global model (its log says "Evaluate global
  model"), so each client is evaluated with its own model, i.e. the middleware model it last
  trained, or the initial model if it never trained. Default: every client is evaluated with
  the global model, as in the paper; compat: PFLlib's. The global model is PFLlib's ``w_g``
  in both (the sample-weighted average of the arrived uploads, before cross-aggregation; the
  paper's is the plain mean of the middleware models, the same mean before cross-aggregation
  with strategy 0 and with equal sample counts).
- PFLlib's round loop reuses its round variable ``i`` for the enumeration of the selected
  clients, so after training ``i = K − 1`` in every round: the first stage is decided by
  ``K − 1 ≥ first_stage_bound`` (cross-aggregation in every round or never) and strategy 0's
  offset is ``(K−1) mod (K−1) + 1 = 1`` (always the next model). Default: the round index;
  compat: ``K − 1``.
- PFLlib's similarity is not one cosine: it walks the ``state_dict`` tensors in pairs (in
  PyTorch order; a linear layer's weight and bias) and adds the cosine of each pair's
  concatenation, the last pair twice when the count is even (an odd last tensor once).
  Default: the cosine of the whole flattened models; compat: PFLlib's sum (over parameter
  tensors; PFLlib's ``state_dict`` also holds BatchNorm buffers, but models with BatchNorm
  are refused here).
- PFLlib's search for the most similar model (strategy 2) also visits the model itself,
  whose entry in its similarity table is 0; default: only the other models.
- A client that trained but dropped out (``-cdr``) leaves its middleware model unchanged;
  PFLlib still installs its trained model as the middleware model (only the global average
  excludes it; its code notes that the drop rate should be 0).
- The assignment of middleware models to clients (see above). PFLlib with
  ``random_join_ratio`` indexes past its K models and fails when more than K clients are
  selected; here extra clients share models. K = 1 cross-aggregates a model with itself
  (PFLlib divides by K − 1 = 0).
- Ties in the similarity search go to the first index, as PFLlib's scan (and to
  ``(j+1) mod K`` for the least similar model, where PFLlib's scan starts).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lib.algorithms.base import (Algorithm, SettingsContext, Traffic,
                                        abstract_variables, check_bool, check_int,
                                        check_number, stack_clients, tree_traffic)
from fedjax_lib.algorithms.fedala import parameter_order
from fedjax_lib.algorithms.registry import register
from fedjax_lib.algorithms.scaffold import check_join_ratio
from fedjax_lib.core.aggregate import weighted_average
from fedjax_lib.core.local import train_locally

# fold_in tag of round 0's middleware assignment (init's key also initialises the model).
ASSIGN_STREAM = 0xC2055
# torch.nn.functional.cosine_similarity's eps.
COSINE_EPS = 1e-8
STRATEGIES = {0: "in order", 1: "least similar", 2: "most similar"}


def num_models(num_clients: int, join_ratio: float) -> int:
  """K = ``int(N·join_ratio)`` (Python float64, as PFLlib), at least 1."""
  return max(int(num_clients * join_ratio), 1)


def draw_assignment(key: jax.Array, num_clients: int, k: int) -> jax.Array:
  """``[N]`` int32: the middleware model of every client id, ``π mod K`` for a uniformly
  random permutation π (one-to-one when K = N; otherwise each model has ⌊N/K⌋ or ⌈N/K⌉
  clients)."""
  return (jax.random.permutation(key, num_clients) % k).astype(jnp.int32)


def _cosines(gram: jax.Array) -> jax.Array:
  """Cosines from Gram matrices ``[..., K, K]``: ``G_ij / (max(‖i‖, ε)·max(‖j‖, ε))``."""
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram, axis1=-2, axis2=-1), 0.0))
  norms = jnp.maximum(norms, COSINE_EPS)
  return gram / (norms[..., :, None] * norms[..., None, :])


def similarities(models, chunks=None) -> jax.Array:
  """``[K, K]`` similarities of stacked models (leading axis K).

  Without ``chunks``: the cosine of the flattened models, from one Gram matrix (the sum of
  every leaf's ``U Uᵀ``). With ``chunks`` (a tree like one model of int32 scalars: each
  tensor's pair index ``p // 2`` in PyTorch order, L tensors): PFLlib's
  ``Σ_pairs cos(concatenated pair)``, the last pair counted twice when L is even.
  """
  leaves = jax.tree.leaves(models)
  k = leaves[0].shape[0]
  grams = jnp.stack([
      jnp.einsum("ip,jp->ij", a.reshape(k, -1).astype(jnp.float32),
                 a.reshape(k, -1).astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
      for a in leaves])
  if chunks is None:
    return _cosines(grams.sum(0))
  num = len(leaves)
  ids = jnp.stack([jnp.asarray(c, jnp.int32) for c in jax.tree.leaves(chunks)])
  per_pair = _cosines(jax.ops.segment_sum(grams, ids, num_segments=num))
  counted = np.zeros(num, np.float32)
  counted[: (num + 1) // 2] = 1.0
  if num % 2 == 0:
    counted[(num - 1) // 2] = 2.0  # PFLlib adds the last complete pair once more
  return jnp.tensordot(jnp.asarray(counted), per_pair, axes=1)


def collaborators(strategy: int, num: int, offset=1, similarity=None,
                  self_in_max: bool = False) -> jax.Array:
  """``[K]`` int32: the collaborating model of every middleware model.

  Args:
    strategy: 0, ``(j + offset) mod K``; 1, the least similar other model (ties: ``(j+1) mod
      K`` if it is one, else the first index); 2, the most similar other model (ties: the
      first index).
    num: K.
    offset: strategy 0's shift (traced or not).
    similarity: ``[K, K]`` for strategies 1 and 2 (the diagonal is ignored).
    self_in_max: strategy 2 also considers the model itself, with similarity 0 (PFLlib).
  """
  index = jnp.arange(num)
  if strategy == 0:
    return ((index + offset) % num).astype(jnp.int32)
  eye = jnp.eye(num, dtype=bool)
  if strategy == 1:
    masked = jnp.where(eye, jnp.inf, similarity)
    start = (index + 1) % num
    ties_start = masked[index, start] == masked.min(1)
    return jnp.where(ties_start, start, masked.argmin(1)).astype(jnp.int32)
  masked = jnp.where(eye, 0.0 if self_in_max else -jnp.inf, similarity)
  return masked.argmax(1).astype(jnp.int32)


def cross_aggregate(models, partner: jax.Array, alpha):
  """``W_j ← α·W_j + (1 − α)·W_partner[j]`` for every j: one contraction per leaf."""
  k = partner.shape[0]
  matrix = alpha * jnp.eye(k, dtype=jnp.float32) + (1.0 - alpha) * jax.nn.one_hot(
      partner, k, dtype=jnp.float32)
  return jax.tree.map(
      lambda w: jnp.einsum("kj,j...->k...", matrix, w.astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST).astype(w.dtype), models)


def trained_middleware(previous, uploads, model_index: jax.Array, weights: jax.Array):
  """Every middleware model after local training: the sample-weighted mean of the arrived
  uploads that trained it, or its previous value when none did."""
  k = jax.tree.leaves(previous)[0].shape[0]
  weights = jnp.asarray(weights, jnp.float32)
  arrived = weights > 0
  share = jax.nn.one_hot(model_index, k, dtype=jnp.float32) * jnp.where(arrived, weights,
                                                                         0.0)[:, None]
  totals = share.sum(0)
  share = share / jnp.maximum(totals, 1e-30)[None, :]

  def leaf(old, up):
    up = jnp.where(arrived.reshape((-1,) + (1,) * (up.ndim - 1)), up.astype(jnp.float32), 0.0)
    new = jnp.einsum("sk,s...->k...", share, up, precision=jax.lax.Precision.HIGHEST)
    keep = (totals > 0).reshape((-1,) + (1,) * (old.ndim - 1))
    return jnp.where(keep, new.astype(old.dtype), old)

  return jax.tree.map(leaf, previous, uploads)


def pair_indices(model, sample_x):
  """A tree like ``model``'s variables of int32 scalars: each tensor's PyTorch-order
  position ``p`` halved (``p // 2``), the pairs PFLlib's similarity walks."""
  order = parameter_order(model, np.shape(sample_x), sample_x.dtype)
  position = {path: i for i, path in enumerate(order)}
  variables = abstract_variables(model, sample_x)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: jnp.int32(position[tuple(p.key for p in path)] // 2), variables)


@register("FedCross")
@dataclasses.dataclass(frozen=True)
class FedCross(Algorithm):
  """K middleware models, each trained by one client and cross-aggregated with another.

  Attributes:
    first_stage_bound: rounds of the first stage, in which every middleware model is reset
      to the global model (PFLlib ``-fsb``, default 0).
    fedcross_alpha: α, the weight a middleware model keeps in cross-aggregation (``-ca``).
    collaberative_model_select_strategy: 0 in order, 1 least similar, 2 most similar
      (``-cmss``, PFLlib's spelling, default 1).
    join_ratio: the run's ``-jr``; K = int(N·join_ratio) middleware models (the runner
      fills it).
    pfllib_compat: PFLlib's evaluation, round index, similarity and max search (module
      docstring).
  """
  # -ld: the client's SGD (per client, not per middleware model)
  DECAYED_RATES = ("local.learning_rate",)

  first_stage_bound: int = 0
  fedcross_alpha: float = 0.99
  collaberative_model_select_strategy: int = 1
  join_ratio: float = 1.0
  pfllib_compat: bool = False

  def __post_init__(self):
    check_int(self.name, "first_stage_bound", self.first_stage_bound, 0)
    check_number(self.name, "fedcross_alpha", self.fedcross_alpha, 0.0, 1.0)
    check_int(self.name, "collaberative_model_select_strategy",
              self.collaberative_model_select_strategy, 0, 2)
    check_join_ratio(self.name, self.join_ratio)
    check_bool(self.name, "pfllib_compat", self.pfllib_compat)

  def check_settings(self, context: SettingsContext) -> list[str]:
    """Warns when there is a single middleware model (nothing to cross-aggregate)."""
    num_clients = len(context.train_counts)
    if num_models(num_clients, self.join_ratio) > 1:
      return []
    return [f"{self.name} join_ratio={self.join_ratio} with {num_clients} clients keeps "
            "int(N·join_ratio) = 1 middleware model, which cross-aggregation mixes with "
            "itself (FedAvg with one client per round); use join_ratio >= "
            f"{2 / max(num_clients, 2):.4g} (-jr)"]

  def init(self, key, sample_x, num_clients):
    params = self.init_params(key, sample_x)
    k = num_models(num_clients, self.join_ratio)
    server = {"params": params,
              "middleware": jax.tree.map(jnp.array, stack_clients(params, k)),
              "assign": draw_assignment(jax.random.fold_in(key, ASSIGN_STREAM), num_clients, k),
              "round": jnp.int32(0)}
    clients = {"id": jnp.arange(num_clients, dtype=jnp.int32)}
    if self.pfllib_compat:
      server["chunks"] = pair_indices(self.model, sample_x)
      clients["model"] = jax.tree.map(jnp.array, stack_clients(params, num_clients))
    return server, clients

  def client_update(self, server_state, client_state, data, key):
    index = server_state["assign"][client_state["id"]]
    start = jax.tree.map(lambda w: w[index], server_state["middleware"])
    params, _, stats = train_locally(start, data, key, self.local, self.ce_loss)
    new_state = dict(client_state)
    if self.pfllib_compat:
      new_state["model"] = params
    return new_state, {"params": params, "model": index}, stats

  def server_update(self, server_state, uploads, weights, key):
    """Global average, trained middleware models, first stage or cross-aggregation, and the
    next round's assignment."""
    previous = server_state["middleware"]
    k = jax.tree.leaves(previous)[0].shape[0]
    rounds = server_state["round"]
    params = weighted_average(uploads["params"], weights, fallback=server_state["params"])
    trained = trained_middleware(previous, uploads["params"], uploads["model"], weights)
    if self.pfllib_compat:  # PFLlib's round variable holds K − 1 here (module docstring)
      step, chunks = k - 1, server_state["chunks"]
    else:
      step, chunks = rounds, None
    offset = step % max(k - 1, 1) + 1
    strategy = self.collaberative_model_select_strategy
    similarity = similarities(trained, chunks) if strategy else None
    partner = collaborators(strategy, k, offset, similarity, self_in_max=self.pfllib_compat)
    crossed = cross_aggregate(trained, partner, self.fedcross_alpha)
    first_stage = step < self.first_stage_bound
    reset = jax.tree.map(lambda w, g: jnp.broadcast_to(g, w.shape).astype(w.dtype), previous,
                         params)
    arrived = jnp.any(jnp.asarray(weights) > 0)
    middleware = jax.tree.map(
        lambda c, r, old: jnp.where(arrived, jnp.where(first_stage, r, c), old),
        crossed, reset, previous)
    num_clients = server_state["assign"].shape[0]
    return dict(server_state, params=params, middleware=middleware, round=rounds + 1,
                assign=draw_assignment(key, num_clients, k))

  def predict(self, server_state, client_state, x):
    """The global model (compat: the client's own last trained model)."""
    if self.pfllib_compat:
      return self.model.apply(client_state["model"], x)
    return self.model.apply(server_state["params"], x)

  def new_client_variables(self, server_state, client_state):
    """A new client fine-tunes a copy of the global model."""
    del client_state
    return server_state["params"]

  def download_traffic(self, server_state) -> Traffic:
    """The middleware model a client trains, and by default the global model it is
    evaluated with."""
    model = tree_traffic(server_state["params"])
    copies = 1 if self.pfllib_compat else 2
    return Traffic(copies * model.floats, copies * model.bytes)
