"""FedCAC: cautiously aggressive collaboration through critical parameters.

Wu, Liu, Wang, Wang, Huang, Ma, "Bold but Cautious: Unlocking the Potential of Personalized
Federated Learning through Cautiously Aggressive Collaboration", ICCV 2023.

Every client keeps a binary mask of its *critical* parameters. A selected client starts from
the model it was last sent, ``w⁰``, trains it with plain SGD on cross-entropy to ``w``, and
marks as critical, per parameter tensor, the entries with the largest sensitivity

    c = |(w − w⁰) ⊙ w|,        critical = c ≥ t,   t = the ⌊τ·n⌋-th largest c of the tensor

(:func:`critical_masks`; n entries; t = +∞ when ⌊τ·n⌋ = 0, and when t ≤ 1e-10 it becomes the
smallest c above 1e-20, if any, as in the authors' code; t is found by an exact selection on
the floats' bit patterns, :func:`kth_largest`, not a sort). It uploads ``w`` and its mask.

The server averages the uploads by sample count into the global model ``w_g`` (FedAvg) and
builds a *customised global model* for every client i whose upload arrived, from the clients
whose critical parameters overlap with its own (:func:`overlap_rates`,
:func:`collaboration_weights`):

    overlap(i, j) = 1 − Σ|m_i − m_j| / (2·Σ m_i)            (i ≠ j, both arrived)
    θ = mean + (r+1)/⌊β⌋ · (max − mean)                      (over every pair i ≠ j)
    C_i = {i} ∪ {j ≠ i : overlap(i, j) ≥ θ},   v_i = (1/|C_i|)·Σ_{j∈C_i} w_j

(r: the round; the threshold climbs from the mean overlap to the largest one over ⌊β⌋
rounds, after which every client collaborates only with itself.) The model a client is sent,
evaluated with and next trains from mixes them by its mask:

    w_i = m_i ⊙ v_i + (1 − m_i) ⊙ w_g      (critical: customised; non-critical: global)

It is applied to every client in every round (PFLlib's ``send_models``), to the clients not
selected with their last mask and customised model; a client that never trained has an empty
mask and gets ``w_g``.

Vectorised over the cohort: with the masks flattened to rows ``M [S, P]`` (binary),
``Σ|m_i − m_j| = n_i + n_j − 2·(M Mᵀ)_ij`` (``n_i`` = ``Σ m_i``), so the overlap matrix is one
batched contraction; the collaboration matrix (rows normalised) and the scatter to client ids
are one ``[N, S]`` matrix ``R``, and all customised models are one contraction ``R·U`` of the
stacked uploads ``U [S, P]``. No loop over clients.

Hyperparameters: ``tau`` τ ∈ [0, 1], the fraction of critical entries per tensor (PFLlib
``-tau``, default 1.0; the paper and the authors' configurations use 0.5), and ``beta`` β ≥ 1
(``-bt``), truncated to an integer as PFLlib does. PFLlib's ``-bt`` default 0.0 fails its own
assertion ``β ≥ 1`` in round 1, so the default here is the authors' CIFAR-10 configuration,
β = 100.

State: server ``{"params": w_g, "customized": v [N, …] (every client's latest customised
model; the initial model until its first), "round": r (int32)}``; client ``{"id": its client
id (int32), "mask": m (bool, shaped like the variables; all False until it trains)}``. The
server keeps the customised models because it computes them after the clients' updates; a
client reads its row. Memory: ``N + 1`` models on the server plus N masks (one byte per
entry). Download (counted): ``w_g`` and the client's ``v_i``, 2P floats; upload: ``w`` (P
floats) and the mask (one bit per entry).

Differences from PFLlib (``pfllib_compat=True``, ``--pfllib-compat``, gives PFLlib's round 0):

- PFLlib skips the customisation at the end of round 0 (``send_models`` checks
  ``epoch != 0``, a guard meant for the initial broadcast that also covers the end of round
  0), so after round 0 the critical entries of every client that trained revert to the
  initial model (its ``customized_model`` is still the copy taken at construction), and with
  the default τ = 1 nearly all of round 0's training is discarded. The authors' code
  customises after every round, round 0 included (threshold factor (0+1)/β). Default: the
  authors'; compat: PFLlib's.
- The customisation runs over the clients whose upload arrived (weight > 0). PFLlib runs it
  over every selected client, drop-outs (``-cdr``) included, whose trained models also
  count as collaborators. A client that trained but dropped out keeps its new mask (the
  engine keeps a dropped client's state) and its previous customised model. Identical
  without drop-outs.
- A round in which a single upload arrives gives that client its own model (PFLlib's
  ``max`` of an empty overlap list raises); a client with no critical entry (τ·n < 1 in every
  tensor) has overlap 0 with every client (PFLlib divides by zero).
- The parameters are the model's variables (PFLlib's ``named_parameters``); models with
  BatchNorm or dropout are refused, as for every algorithm without a training mode.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from fedjax_lib.algorithms.base import (Algorithm, Traffic, check_bool, check_number,
                                        stack_clients, tree_traffic)
from fedjax_lib.algorithms.registry import register
from fedjax_lib.core.aggregate import weighted_average
from fedjax_lib.core.local import train_locally

# A sensitivity at or below this counts as zero when it is the threshold (authors' code).
ZERO_THRESHOLD = 1e-10
# The smallest sensitivity that replaces a zero threshold must exceed this.
NONZERO_FLOOR = 1e-20


def critical_count(tau, size: int):
  """``⌊τ·n⌋`` critical entries of a tensor of ``n = size`` entries: Python's ``int(τ·n)``
  (float64, exactly PFLlib's) for a Python ``tau``, float32 for a traced (swept) one."""
  if isinstance(tau, (int, float)):
    return int(tau * size)
  return jnp.floor(jnp.asarray(tau, jnp.float32) * size).astype(jnp.int32)


def kth_largest(values: jax.Array, k) -> jax.Array:
  """The ``k``-th largest of the non-negative float32 ``values`` (1-D; ``1 ≤ k ≤ n``), exactly.

  A selection rather than a sort (XLA:CPU sorts 78k floats in ~25 ms, 20 clients a round):
  non-negative floats order like their bit patterns as integers, so the answer's bits are
  fixed from the highest down, keeping a bit when at least ``k`` values are at or above the
  candidate: 31 counting passes.
  """
  bits = jax.lax.bitcast_convert_type(values.astype(jnp.float32), jnp.int32)

  def step(i, answer):
    candidate = answer | jnp.left_shift(jnp.int32(1), 30 - i)
    return jnp.where(jnp.sum(bits >= candidate) >= k, candidate, answer)

  answer = jax.lax.fori_loop(0, 31, step, jnp.int32(0))
  return jax.lax.bitcast_convert_type(answer, jnp.float32)


def critical_masks(before, after, tau):
  """The critical-parameter mask of one client, per tensor.

  ``c = |(after − before) ⊙ after|``; an entry is critical when ``c ≥ t`` with ``t`` the
  ``k = ⌊τ·n⌋``-th largest ``c`` of its tensor (+∞ when ``k = 0``). A threshold ``t ≤ 1e-10``
  is replaced by the smallest ``c > 1e-20`` when there is one; when every ``c`` is zero it
  stays, and the whole tensor is critical (the authors' and PFLlib's rule).

  Args:
    before: the variables the client started training from.
    after: the trained variables (same structure).
    tau: τ ∈ [0, 1].

  Returns:
    A tree of bool arrays shaped like ``after``.
  """
  def leaf(b, a):
    a32 = a.astype(jnp.float32)
    c = jnp.abs((a32 - b.astype(jnp.float32)) * a32).reshape(-1)
    n = c.shape[0]
    k = critical_count(tau, n)
    if isinstance(k, int) and k in (0, n):  # static: no selection needed
      t = jnp.min(c) if k else jnp.float32(jnp.inf)
    else:
      t = jnp.where(k > 0, kth_largest(c, jnp.maximum(k, 1)), jnp.inf)
    smallest_nonzero = jnp.min(jnp.where(c > NONZERO_FLOOR, c, jnp.inf))
    t = jnp.where((t <= ZERO_THRESHOLD) & jnp.isfinite(smallest_nonzero), smallest_nonzero, t)
    return (c >= t).reshape(a.shape)

  return jax.tree.map(leaf, before, after)


def mix(mask, customized, global_):
  """``m ⊙ v + (1 − m) ⊙ w_g`` leaf-wise: critical entries from ``customized``."""
  return jax.tree.map(lambda m, v, g: jnp.where(m, v, g), mask, customized, global_)


def overlap_rates(masks) -> jax.Array:
  """``[S, S]`` ``1 − Σ|m_i − m_j| / (2·Σ m_i)`` of stacked binary masks (leading axis S).

  ``Σ|m_i − m_j| = n_i + n_j − 2·m_i·m_j`` for binary masks, so the whole matrix is one Gram
  matrix of the flattened masks (exact integer counts in float32 up to 2²⁴ entries per
  model). Rows with no critical entry (``n_i = 0``) are 0.
  """
  gram, counts = 0.0, 0.0
  for leaf in jax.tree.leaves(masks):
    flat = leaf.reshape(leaf.shape[0], -1).astype(jnp.float32)
    gram = gram + jnp.einsum("ip,jp->ij", flat, flat, precision=jax.lax.Precision.HIGHEST)
    counts = counts + flat.sum(1)
  differ = counts[:, None] + counts[None, :] - 2.0 * gram
  return jnp.where(counts[:, None] > 0,
                   1.0 - differ / jnp.maximum(2.0 * counts[:, None], 1.0), 0.0)


def collaboration_weights(overlap: jax.Array, arrived: jax.Array, factor) -> jax.Array:
  """``[S, S]``: row i holds ``1/|C_i|`` at the members of ``C_i`` (module docstring).

  Args:
    overlap: ``[S, S]`` overlap rates (:func:`overlap_rates`).
    arrived: ``[S]`` bool, the slots whose upload arrived; the others neither collaborate nor
      count in the mean and max (their rows are 0).
    factor: ``(r+1)/⌊β⌋``, how far the threshold has climbed from the mean to the max.
  """
  size = overlap.shape[0]
  eye = jnp.eye(size, dtype=bool)
  pairs = arrived[:, None] & arrived[None, :] & ~eye
  num_pairs = jnp.sum(pairs)
  mean = jnp.sum(jnp.where(pairs, overlap, 0.0)) / jnp.maximum(num_pairs, 1)
  largest = jnp.max(jnp.where(pairs, overlap, -jnp.inf))
  threshold = mean + factor * (largest - mean)
  members = (pairs & (overlap >= threshold)) | (eye & arrived[:, None])
  members = members.astype(jnp.float32)
  return members / jnp.maximum(members.sum(1, keepdims=True), 1.0)


def customized_models(previous, uploads, ids, weights_matrix, arrived):
  """Every client's customised model after a round: ``[N, …]``.

  Client n whose upload arrived (slot s: ``ids[s] = n``) gets ``Σ_j W[s, j]·U_j``; the others
  keep ``previous[n]``. The scatter and the averages are one matrix ``R = E·W`` (``E [N, S]``
  the arrived slots' one-hot ids) and one contraction ``R·U`` per leaf.
  """
  num_clients = jax.tree.leaves(previous)[0].shape[0]
  owner = (ids[None, :] == jnp.arange(num_clients)[:, None]) & arrived[None, :]  # [N, S]
  mix_matrix = owner.astype(jnp.float32) @ weights_matrix
  has_new = owner.any(1)

  def leaf(old, up):
    up = jnp.where(arrived.reshape((-1,) + (1,) * (up.ndim - 1)), up.astype(jnp.float32), 0.0)
    new = jnp.einsum("ns,s...->n...", mix_matrix, up, precision=jax.lax.Precision.HIGHEST)
    keep = has_new.reshape((-1,) + (1,) * (old.ndim - 1))
    return jnp.where(keep, new.astype(old.dtype), old)

  return jax.tree.map(leaf, previous, uploads)


@register("FedCAC")
@dataclasses.dataclass(frozen=True)
class FedCAC(Algorithm):
  """Critical parameters from customised global models, the rest from the global model.

  Attributes:
    tau: τ, the fraction of each tensor's entries that are critical (PFLlib ``-tau``).
    beta: β ≥ 1, the rounds over which the collaboration threshold climbs to the largest
      overlap (PFLlib ``-bt``), truncated to an integer as PFLlib does.
    pfllib_compat: PFLlib's round 0 without customisation (module docstring).
  """
  DECAYED_RATES = ("local.learning_rate",)  # -ld: the one SGD optimizer

  tau: float = 1.0
  beta: float = 100.0
  pfllib_compat: bool = False

  def __post_init__(self):
    check_number(self.name, "tau", self.tau, 0.0, 1.0)
    check_number(self.name, "beta", self.beta, 1.0)
    check_bool(self.name, "pfllib_compat", self.pfllib_compat)

  def init(self, key, sample_x, num_clients):
    params = self.init_params(key, sample_x)
    customized = jax.tree.map(jnp.array, stack_clients(params, num_clients))  # materialised
    mask = jax.tree.map(lambda a: jnp.zeros((num_clients,) + a.shape, bool), params)
    server = {"params": params, "customized": customized, "round": jnp.int32(0)}
    return server, {"id": jnp.arange(num_clients, dtype=jnp.int32), "mask": mask}

  def sent_model(self, server_state, client_state):
    """The model client ``client_state["id"]`` was sent: ``m ⊙ v + (1 − m) ⊙ w_g``."""
    customized = jax.tree.map(lambda v: v[client_state["id"]], server_state["customized"])
    return mix(client_state["mask"], customized, server_state["params"])

  def client_update(self, server_state, client_state, data, key):
    start = self.sent_model(server_state, client_state)
    params, _, stats = train_locally(start, data, key, self.local, self.ce_loss)
    mask = critical_masks(start, params, self.tau)
    cid = client_state["id"]
    return {"id": cid, "mask": mask}, {"params": params, "mask": mask, "id": cid}, stats

  def server_update(self, server_state, uploads, weights, key):
    """FedAvg's global model and the arrived clients' customised models."""
    del key
    arrived = jnp.asarray(weights) > 0
    rounds = server_state["round"]
    params = weighted_average(uploads["params"], weights, fallback=server_state["params"])
    factor = (rounds + 1).astype(jnp.float32) / jnp.floor(jnp.asarray(self.beta, jnp.float32))
    weights_matrix = collaboration_weights(overlap_rates(uploads["mask"]), arrived, factor)
    customized = customized_models(server_state["customized"], uploads["params"],
                                   uploads["id"], weights_matrix, arrived)
    if self.pfllib_compat:  # PFLlib: no customisation at the end of round 0
      customized = jax.tree.map(lambda new, old: jnp.where(rounds > 0, new, old), customized,
                                server_state["customized"])
    return {"params": params, "customized": customized, "round": rounds + 1}

  def predict(self, server_state, client_state, x):
    return self.model.apply(self.sent_model(server_state, client_state), x)

  def new_client_variables(self, server_state, client_state):
    """A new client has no mask: it fine-tunes a copy of the global model (as PFLlib)."""
    del client_state
    return server_state["params"]

  def upload_traffic(self, upload) -> Traffic:
    """The trained model, plus its mask at one bit per entry."""
    model = tree_traffic(upload["params"])
    bits = sum(math.prod(a.shape) for a in jax.tree.leaves(upload["mask"]))
    return Traffic(model.floats, model.bytes + jnp.float32(bits / 8))

  def download_traffic(self, server_state) -> Traffic:
    """The global model and the client's own customised model."""
    model = tree_traffic(server_state["params"])
    return Traffic(2 * model.floats, 2 * model.bytes)
