"""APPLE: Adapt to Adaptation — Learning Personalization for Cross-Silo Federated Learning.

Luo, Wu, IJCAI 2022.

Every client ``i`` owns a **core model** ``θ_i`` and a **directed-relationship vector**
``p_i ∈ R^N``, its weights over the N clients' cores; its personalized model is the mixture

    w_i = Σ_j p_ij·θ_j.

The server keeps the latest core of every client (``[N, ...]`` per leaf) and every client
downloads all of them. A selected client trains, on every mini-batch, its own core (the
others are constants) and ``p_i`` on

    CE(w_i) + (λ_r·μ/2)·‖p_i − p_0‖²

with the SGD steps (PFLlib's ``clientapple.py``)

    θ_i  ← θ_i  − (N·lr)·p_ii·∇_w CE                       (N·lr offsets p_ii ≈ 1/N)
    p_ij ← p_ij − dlr·(⟨∇_w CE, θ_j⟩ + λ_r·μ·(p_ij − p_0j))   for every j,

then uploads ``θ_i``; the server stores it in row ``i``. ``p_0`` is every client's share of
the training samples, ``n_j / Σ_k n_k`` (computed by a warm-up over all clients before round
0), and ``p_i`` starts at ``p_0`` (the authors' code). The proximal weight follows a cosine
from 1 to 0 over the first ``L_R = int(L·global_rounds)`` rounds (:func:`proximal_weight`):

    λ_r = (1 + cos(π·r / L_R)) / 2  for r < L_R,   0 after.

PFLlib's defaults (``-dlr 0``, ``-mu 0``, ``-L 1``) leave ``p`` fixed at its start: every
client then trains and is evaluated with the same mixture (a warning says so).

**Vectorised.** The mixture is one contraction of ``p_i`` (its own entry zeroed) with the
server's stacked cores plus ``p_ii·θ_i`` (:func:`mixture`). Vmapped over a cohort of C
clients the cores stay one shared ``[N, P]`` array (P parameters): the contraction is a
``[C, N] × [N, P]`` matmul and its gradient in ``p`` a ``[C, P] × [P, N]`` one; nothing of
size ``C·N·P`` is formed. Memory: ``N·P`` (cores) ``+ N²`` (the ``p_i``) floats kept across
rounds, and about ``5·P`` of temporaries per client of a vmapped cohort (mixture, own core,
gradients; FedAvg's client ~2.6·P; XLA's count for the cnn on MNIST, C = N = 20 and 100).

Evaluation: ``w_i`` from the server's cores and the client's ``p_i`` — the model the client
starts its next round from. A new client (``-nnc``) starts from ``Σ_j p_0j·θ_j``.

State: server ``{"cores": [N, ...] per leaf, "p0": [N], "round": int32}``; client
``{"p_delta": p_i − p_start [N], "id": int32}`` (``p_start`` is ``p_0``, or uniform with
``pfllib_compat``; the client cannot know ``p_0`` before the warm-up, so it keeps the
offset).

Differences from PFLlib (``pfllib_compat=True`` reproduces the first four):

- **The uploaded core is the personalized model.** At the end of ``train`` PFLlib's client
  sets ``model_c`` (the core the server hands to the others) to a copy of its mixture ``w_i``
  as of its last step, so next round everyone mixes the others' *personalized* models; the
  trained core reaches the others only through that mixture, damped by ``p_ii``. (Its
  "recover" loop before that copies ``model_c`` onto ``model_cs[id]``, the same object: a
  no-op.) With compat the upload is the mixture of the last valid step (before that step's
  update; the round-start mixture for a client without a step) and a client is evaluated
  with it, as PFLlib evaluates that mixture; here the trained core is uploaded.
- **``p_i`` starts uniform** (``1/N``) in PFLlib while its proximal term pulls toward the
  sample shares ``p_0``; here it starts at ``p_0`` (the authors' ``init_pss``).
- **The ``p`` gradient.** PFLlib takes ``(1/T)·Σ_t mean(∇_t ⊙ θ_{j,t})`` over the T parameter
  tensors (a per-tensor mean, not the inner product), and for its own entry the core already
  stepped on this batch; here it is the exact ``⟨∇_w CE, θ_j⟩`` at the batch's iterates.
- **λ lags one round** in PFLlib (λ = 1 in rounds 0 and 1, then ``λ_{r−1}``: its client
  updates λ after training); here round r uses ``λ_r``.
- PFLlib trains every client every round and ignores ``-jr`` and ``-cdr``; here the selected
  clients train (the same with the default ``-jr 1``) and a dropped client's core does not
  reach the server (its ``p_i`` keeps the round's update). PFLlib's clients train one after
  another on shared model objects, so a client sees the cores that clients before it in
  the list already changed this round; here every client of a round starts from the
  round-start cores (the authors' code does too). Compat does not reproduce this (it would
  thread the cores through the round's clients, against the engine's contract that the
  clients of a round are independent), and at PFLlib's defaults it matters: every client's
  mixture is the uniform average of the cores, so in PFLlib each step moves everyone's
  mixture (by ``lr·∇/N``) and the round's steps add up across the clients, while here
  each client's mixture moves only with its own core's steps. On the bundled digits
  (``experiments/pfllib_agreement``, 25 rounds of PFLlib's flags) PFLlib's APPLE reached
  0.394 at its torch seed 0 (mean test accuracy of the last 10 rounds) and 0.165 with each
  client handed a copy of the round-start cores instead; at its seeds 1 and 2, 0.365 and
  0.177. Compat: 0.180 ± 0.021, the default 0.233 ± 0.039 over three seeds.
- The authors' code uses SGD with momentum 0.9 and ``coef·‖p − p_0‖²`` (gradient
  ``2·coef``); we follow PFLlib (plain SGD, ``μ/2``). PFLlib's new clients fine-tune its
  untrained initial model.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lib.algorithms.base import (Algorithm, SettingsContext, check_bool, check_int,
                                        check_number, stack_clients)
from fedjax_lib.algorithms.registry import register
from fedjax_lib.core.local import train_locally


def mixture(p, cores, own, index, scales: Optional[list] = None):
  """``Σ_{j≠i} p_j·cores_j + p_i·own`` leaf by leaf (``i = index``).

  ``own`` replaces row ``i`` of ``cores``, so the gradient in ``own`` is ``p_i·∇`` and in
  ``p_j`` it is ``⟨∇, cores_j⟩`` (``⟨∇, own⟩`` for ``j = i``).

  Args:
    p: ``[N]`` mixing weights.
    cores: a pytree whose leaves are ``[N, ...]`` (shared, not differentiated).
    own: a pytree like one row of ``cores``: the client's own (trained) core.
    index: the client's row (int scalar).
    scales: None, or one float per leaf: that leaf's gradient in ``p`` is multiplied by it
      (the forward value is unchanged); PFLlib's per-tensor mean (``pfllib_compat``).

  Returns:
    A pytree like ``own``, each leaf in its dtype.
  """
  own_entry = jnp.arange(p.shape[0]) == index
  leaves, treedef = jax.tree.flatten(own)
  core_leaves = jax.tree.leaves(cores)
  scales = [None] * len(leaves) if scales is None else scales
  out = []
  for o, c, s in zip(leaves, core_leaves, scales):
    q = p if s is None else jax.lax.stop_gradient(p) + s * (p - jax.lax.stop_gradient(p))
    others = jnp.where(own_entry, 0.0, q)
    mixed = jnp.tensordot(others, c.astype(jnp.float32), axes=1) + q[index] * o.astype(
        jnp.float32)
    out.append(mixed.astype(o.dtype))
  return jax.tree.unflatten(treedef, out)


def tensor_mean_scales(tree) -> list:
  """``1 / (T·n_t)`` for each of the T leaves (n_t entries each): with these
  :func:`mixture`'s gradient in ``p`` is PFLlib's ``(1/T)·Σ_t mean(∇_t ⊙ θ_{j,t})``."""
  leaves = jax.tree.leaves(tree)
  return [1.0 / (len(leaves) * max(1, int(np.prod(a.shape)))) for a in leaves]


def schedule_rounds(fraction, global_rounds: int):
  """``L_R = int(L·global_rounds)``: exact (float64) for a Python ``L``, ``floor`` for a
  swept (traced) one."""
  if isinstance(fraction, (int, float)):
    return int(fraction * global_rounds)
  return jnp.floor(fraction * global_rounds)


def proximal_weight(round_index, schedule_length, pfllib_compat: bool = False) -> jax.Array:
  """λ of round ``round_index``: ``(1 + cos(π·r/L_R))/2`` for ``r < L_R``, else 0.

  With ``pfllib_compat`` the schedule lags one round, as PFLlib's client updates λ after
  training: 1 in round 0, ``λ_{r−1}`` in round ``r ≥ 1``.
  """
  r = jnp.asarray(round_index, jnp.float32)
  if pfllib_compat:
    r = r - 1.0
  length = jnp.asarray(schedule_length, jnp.float32)
  cosine = (1.0 + jnp.cos(jnp.pi * r / jnp.maximum(length, 1.0))) / 2.0
  weight = jnp.where(r < length, cosine, 0.0)
  return jnp.where(r < 0, 1.0, weight)


def tree_scaled_vdot(a, b, scales: Optional[list] = None) -> jax.Array:
  """``Σ_t s_t·⟨a_t, b_t⟩`` over the leaves (``s_t = 1`` without ``scales``), float32."""
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  scales = [1.0] * len(leaves_a) if scales is None else scales
  return sum((s * jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
              for s, x, y in zip(scales, leaves_a, leaves_b)), jnp.zeros((), jnp.float32))


def apple_sgd(core_learning_rate, p_learning_rate, own_index=None,
              scales: Optional[list] = None) -> optax.GradientTransformation:
  """SGD on ``{"core": θ_i, "p": p_i}`` with the core's and ``p``'s own step sizes.

  With ``own_index`` (``pfllib_compat``) the gradient of ``p``'s own entry is taken at the
  core after this step, as PFLlib's client does: ``⟨g, θ_i − a·p_ii·g⟩_s`` instead of
  ``⟨g, θ_i⟩_s``, ``a`` the core's step size and ``⟨·,·⟩_s`` the ``scales``-weighted inner
  product; the core's gradient is ``p_ii·g``, so the correction is
  ``−a·⟨p_ii g, p_ii g⟩_s / p_ii`` (0 when ``p_ii = 0``).

  Returns:
    A stateless optax transform; its ``update`` needs ``params`` with ``own_index``.
  """
  def init(params):
    del params
    return optax.EmptyState()

  def update(grads, state, params=None):
    core_step = jax.tree.map(lambda g: -core_learning_rate * g, grads["core"])
    grad_p = grads["p"]
    if own_index is not None:
      p_own = params["p"][own_index]
      squared = tree_scaled_vdot(grads["core"], grads["core"], scales)
      nonzero = p_own != 0
      correction = jnp.where(nonzero, squared / jnp.where(nonzero, p_own, 1.0), 0.0)
      grad_p = grad_p.at[own_index].add(-core_learning_rate * correction)
    return {"core": core_step, "p": -p_learning_rate * grad_p}, state

  return optax.GradientTransformation(init, update)


@register("APPLE")
@dataclasses.dataclass(frozen=True)
class APPLE(Algorithm):
  """Per-client cores mixed by learned directed-relationship vectors.

  Attributes:
    dr_learning_rate: SGD step size of ``p_i`` (PFLlib ``-dlr``; 0 keeps ``p`` fixed).
    L: fraction of ``global_rounds`` over which λ falls from 1 to 0 (PFLlib ``-L``).
    mu: weight μ of the proximal term ``‖p_i − p_0‖²`` (PFLlib ``-mu``).
    global_rounds: the run's rounds, for the λ schedule (the runner fills it).
    pfllib_compat: PFLlib's upload, ``p`` start, ``p`` gradient and λ lag (module
      docstring).
  """
  DECAYED_RATES = ()  # -ld: PFLlib steps a scheduler on an optimizer it never steps

  dr_learning_rate: float = 0.0
  L: float = 1.0
  mu: float = 0.0
  global_rounds: int = 2000
  pfllib_compat: bool = False

  def __post_init__(self):
    check_number(self.name, "dr_learning_rate", self.dr_learning_rate)
    check_number(self.name, "L", self.L)
    check_number(self.name, "mu", self.mu)
    check_int(self.name, "global_rounds", self.global_rounds, 0)
    check_bool(self.name, "pfllib_compat", self.pfllib_compat)

  def check_settings(self, context: SettingsContext) -> list[str]:
    """Warns that ``dr_learning_rate = 0`` (PFLlib's default) never personalizes."""
    del context
    if self.dr_learning_rate == 0:
      return [f"{self.name} hyperparameter dr_learning_rate=0 never changes the directed-"
              "relationship vectors p_i, so every client trains and is evaluated with the "
              "same mixture of the cores (mu has no effect); use dr_learning_rate > 0 (-dlr)"]
    return []

  # ------------------------------------------------------------------ state
  def init(self, key, sample_x, num_clients):
    params = self.init_params(key, sample_x)
    server = {"cores": stack_clients(params, num_clients),
              "p0": jnp.full((num_clients,), 1.0 / num_clients, jnp.float32),
              "round": jnp.zeros((), jnp.int32)}
    clients = {"p_delta": jnp.zeros((num_clients, num_clients), jnp.float32),
               "id": jnp.arange(num_clients, dtype=jnp.int32)}
    return server, clients

  def warmup_client(self, server_state, client_state, data, key):
    """Sends the client's id; the engine weighs it by its training-sample count."""
    del server_state, data, key
    return client_state, {"id": client_state["id"]}

  def warmup_server(self, server_state, uploads, weights, key):
    """``p_0 = n_j / Σ_k n_k`` over all clients (uniform if no client has samples)."""
    del key
    n = server_state["p0"].shape[0]
    counts = jnp.zeros((n,), jnp.float32).at[_rows(uploads["id"], weights, n)].set(
        jnp.asarray(weights, jnp.float32), mode="drop")
    total = counts.sum()
    p0 = jnp.where(total > 0, counts / jnp.where(total > 0, total, 1.0), 1.0 / n)
    return dict(server_state, p0=p0)

  def start_weights(self, server_state) -> jax.Array:
    """Where every ``p_i`` starts: ``p_0`` (uniform with ``pfllib_compat``)."""
    p0 = server_state["p0"]
    if self.pfllib_compat:
      return jnp.full_like(p0, 1.0 / p0.shape[0])
    return p0

  def relationship(self, server_state, client_state) -> jax.Array:
    """The client's ``p_i`` ``[N]``."""
    return self.start_weights(server_state) + client_state["p_delta"]

  # ------------------------------------------------------------------ a round
  def client_update(self, server_state, client_state, data, key):
    cores, p0 = server_state["cores"], server_state["p0"]
    num_clients = p0.shape[0]
    index = client_state["id"]
    p = self.relationship(server_state, client_state)
    own = jax.tree.map(lambda c: c[index], cores)
    coefficient = self.mu * proximal_weight(
        server_state["round"], schedule_rounds(self.L, self.global_rounds), self.pfllib_compat)
    scales = tensor_mean_scales(own) if self.pfllib_compat else None

    def objective(trainable, batch, step_key):
      mixed = mixture(trainable["p"], cores, trainable["core"], index, scales)
      proximal = 0.5 * coefficient * jnp.sum(jnp.square(trainable["p"] - p0))
      return self.ce_loss(mixed, batch, step_key) + proximal, mixed

    tx = apple_sgd(self.local.learning_rate * num_clients, self.dr_learning_rate,
                   index if self.pfllib_compat else None, scales)
    trainable = {"core": own, "p": p}
    if self.pfllib_compat:  # carry the mixture each step trains, to upload the last one
      def loss(t, b, k, last):
        del last  # the carry is only written: the mixture of the latest valid step
        return objective(t, b, k)

      trained, _, stats = train_locally(trainable, data, key, self.local, loss, tx,
                                        aux=mixture(p, cores, own, index))
      uploaded = stats.pop("aux")
    else:
      trained, _, stats = train_locally(trainable, data, key, self.local,
                                        lambda t, b, k: objective(t, b, k)[0], tx)
      uploaded = trained["core"]
    state = {"p_delta": trained["p"] - self.start_weights(server_state), "id": index}
    return state, {"core": uploaded, "id": index}, stats

  def server_update(self, server_state, uploads, weights, key):
    """Stores each arrived core (weight > 0) in its client's row; counts the round."""
    del key
    n = server_state["p0"].shape[0]
    rows = _rows(uploads["id"], weights, n)
    cores = jax.tree.map(lambda c, u: c.at[rows].set(u.astype(c.dtype), mode="drop"),
                         server_state["cores"], uploads["core"])
    return dict(server_state, cores=cores, round=server_state["round"] + 1)

  # ------------------------------------------------------------------ evaluation
  def personalized_params(self, server_state, client_state):
    """``Σ_j p_ij·θ_j`` (with ``pfllib_compat``: the client's stored row, which holds
    PFLlib's last mixture)."""
    cores = server_state["cores"]
    if self.pfllib_compat:
      return jax.tree.map(lambda c: c[client_state["id"]], cores)
    p = self.relationship(server_state, client_state)
    return jax.tree.map(
        lambda c: jnp.tensordot(p, c.astype(jnp.float32), axes=1).astype(c.dtype), cores)

  def predict(self, server_state, client_state, x):
    return self.model.apply(self.personalized_params(server_state, client_state), x)

  def new_client_variables(self, server_state, client_state):
    """``Σ_j p_start,j·θ_j``: the mixture a client starts from before learning its ``p``."""
    del client_state
    p = self.start_weights(server_state)
    return jax.tree.map(
        lambda c: jnp.tensordot(p, c.astype(jnp.float32), axes=1).astype(c.dtype),
        server_state["cores"])

  def download(self, server_state):
    """Every client's core (PFLlib sends all N every round)."""
    return {"cores": server_state["cores"]}


def _rows(ids, weights, num_clients: int) -> jax.Array:
  """The row of every slot whose weight is positive, ``num_clients`` (dropped by a
  ``mode="drop"`` scatter) for the others."""
  return jnp.where(jnp.asarray(weights) > 0, ids, num_clients)

