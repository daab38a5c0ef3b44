"""FedFomo: Personalized Federated Learning with First Order Model Optimization.

Zhang, Sapra, Fidler, Yeung, Alvarez, ICLR 2021.

Every client keeps its own model ``θ_i``. The server keeps the latest uploaded model of every
client (``[N, ...]`` per leaf; the initial model until a client first uploads) and an
affinity matrix ``P`` (N×N, the identity at the start). A selected client, at the start of
its round (PFLlib's ``clientfomo.py`` / ``serverfomo.py``):

1. receives the server's stored models ``θ_n`` of the ``m`` clients with the largest
   ``P[i, n]`` (its own row; ``m = min(M, u)`` with ``u`` the number of uploads that
   arrived last round, so nothing in round 0; ties go to the lower client id);
2. scores each on its validation split (the last ``⌊n_i/5⌋`` of its training list, PFLlib's
   unshuffled 20%) against ``θ_old``, its model after the previous round's aggregation
   (before that round's local training; the initial model before its first round):

       w_n = (L_val(θ_old) − L_val(θ_n)) / (‖θ_n − θ_old‖₂ + 1e-5)      (:func:`fomo_scores`)

3. if some ``w_n > 0``, replaces ``θ_i`` with ``Σ_n w_n⁺ θ_n / Σ_n w_n⁺`` (``w⁺ = max(w, 0)``);
   otherwise keeps ``θ_i`` (:func:`aggregate_received`);
4. sets ``θ_old`` to that model, trains it with plain SGD on the rest of its training list,
   and uploads the trained model with the vector ``v_i`` of the raw scores (``v_i[n] = w_n``,
   0 elsewhere);

and the server stores each arrived model in its client's row and adds ``v_i`` to ``P[i]``.
Clients are evaluated with their own model ``θ_i``.

A client's own stored model is normally among those it receives (``P`` starts as the
identity), and it is scored like the others against ``θ_old``: its own local training
competes with the other clients' models. A client never selected keeps the initial model,
which stays the server's copy of it (the others may receive it: ties in ``P``); when first
selected it receives its own (initial) copy, scoring 0, and the others by ``P``.

**Vectorised.** ``client_update`` gathers its ``M`` rows of the shared ``[N, P]`` models
with one indexed read (vmapped: ``[C, M, P]`` for a cohort of C, inherent to downloading M
models) and scores them in one vmapped forward pass; the server writes the arrived rows with
one scatter. Memory: ``N·P`` (server copies) ``+ 2·N·P`` (each client's ``θ_i`` and
``θ_old``) ``+ N²`` (``P``) floats across rounds, plus ``C·M·P`` for a round's downloads
(and local training's temporaries, as FedAvg's).

Differences from PFLlib (``pfllib_compat=True`` reproduces the first two and the cap on
``M``):

- The validation loss is the mean over the validation samples; PFLlib averages its
  per-batch means (batches of ``-lbs``, the last one partial, so its samples weigh more).
- A client with fewer than 5 training samples has no validation split: it receives models
  but scores none (keeps its own) and trains on all its samples. PFLlib's slice ``[-0:]``
  then makes its whole training list the validation split and leaves nothing to train on.
- PFLlib's FedFomo training loader does not shuffle (every epoch the same batches in list
  order); here batches are reshuffled every epoch from the client's key, as for every
  algorithm, unless the run sets ``--shuffle false`` (``Config(shuffle=False)``), which takes
  the training list in order every epoch, as PFLlib's FedFomo does.
- Ties in ``P`` (e.g. every unvisited entry, 0) go to the lower client id
  (``lax.top_k``); PyTorch's ``topk`` leaves their order unspecified.
- The reported ``train_loss`` is over the whole training list (PFLlib: its 80% part).
- A client receives ``min(M, uploads of last round)`` models; PFLlib also caps ``M`` at its
  planned join count ``int(N·jr)`` at start-up, which ``pfllib_compat`` does too (it reads
  ``join_ratio``, the run's ``-jr``, filled by the runner). The two differ only with
  ``-rjr``, whose rounds can have more uploads than ``int(N·jr)`` (N = 20, ``-jr 0.1 -rjr``:
  PFLlib sends at most 2 models, here up to 5).
- The paper compares the received models with the client's current model and normalises by
  ``Σ|w|``; we follow PFLlib's ``θ_old`` and ``Σ w⁺``. New clients (``-nnc``) are not
  supported (PFLlib's FedFomo never evaluates them).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lib.algorithms.base import (Algorithm, SettingsContext, Traffic, check_bool,
                                        check_int, stack_clients, tree_traffic)
from fedjax_lib.algorithms.registry import register
from fedjax_lib.algorithms.scaffold import check_join_ratio, planned_join_count
from fedjax_lib.core.local import train_locally

# PFLlib's val_ratio 0.2: int(0.2·n) equals n // 5 for every n (0.2 rounds up in binary).
VALIDATION_DIVISOR = 5
# Added to the parameter distance (PFLlib's constant).
DISTANCE_EPS = 1e-5


def validation_split(count, pfllib_compat: bool = False):
  """``(train_count, val_start, val_count)`` of a client with ``count`` training samples.

  The validation split is the last ``count // 5`` positions of the training list and the
  rest is trained on. With ``pfllib_compat`` a client with ``count // 5 == 0`` validates on
  its whole list and trains on nothing (PFLlib's ``[-0:]`` slice).
  """
  count = jnp.asarray(count, jnp.int32)
  val_count = count // VALIDATION_DIVISOR
  train_count = count - val_count
  if pfllib_compat:
    whole = val_count == 0
    return (jnp.where(whole, 0, train_count), jnp.where(whole, 0, train_count),
            jnp.where(whole, count, val_count))
  return train_count, train_count, val_count


def validation_width(width: int, pfllib_compat: bool = False) -> int:
  """How many validation positions a client with an index table of ``width`` rows can have
  (static): ``width // 5``, or with ``pfllib_compat`` at least ``min(width, 4)`` (a client
  of fewer than 5 samples validates on all of them)."""
  static = width // VALIDATION_DIVISOR
  return max(static, min(width, VALIDATION_DIVISOR - 1)) if pfllib_compat else static


def validation_loss(losses, val_count, batch_size: int, pfllib_compat: bool = False):
  """The validation loss from per-sample losses ``[V]`` (the first ``val_count`` real).

  The mean over the real samples, or with ``pfllib_compat`` PFLlib's mean of the per-batch
  means over ``⌈val_count / batch_size⌉`` batches in order (the last one partial). 0 when
  ``val_count == 0``.
  """
  position = jnp.arange(losses.shape[-1])
  real = position < val_count
  losses = losses.astype(jnp.float32)
  if not pfllib_compat:
    return jnp.where(real, losses, 0.0).sum(-1) / jnp.maximum(val_count, 1)
  batch = position // batch_size
  size = jnp.clip(val_count - batch * batch_size, 1, batch_size)
  num_batches = (val_count + batch_size - 1) // batch_size
  return jnp.where(real, losses / size, 0.0).sum(-1) / jnp.maximum(num_batches, 1)


def tree_distance(a, b) -> jax.Array:
  """``‖a − b‖₂`` over every leaf together, float32."""
  squares = [jnp.sum(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
  return jnp.sqrt(sum(squares, jnp.zeros((), jnp.float32)))


def fomo_scores(old_loss, losses, distances, received) -> jax.Array:
  """``w_n = (L(θ_old) − L(θ_n)) / (‖θ_n − θ_old‖ + 1e-5)`` for the received ``n``, else 0.

  Args:
    old_loss: scalar validation loss of ``θ_old``.
    losses: ``[M]`` validation losses of the candidate models.
    distances: ``[M]`` their distances to ``θ_old``.
    received: ``[M]`` bool: which candidates were actually received.
  """
  return jnp.where(received, (old_loss - losses) / (distances + DISTANCE_EPS), 0.0)


def aggregate_received(scores, models, own):
  """``Σ_n w_n⁺ θ_n / Σ_n w_n⁺`` (``w⁺ = max(w, 0)``), or ``own`` when no score is positive.

  Args:
    scores: ``[M]`` raw scores (0 for candidates not received).
    models: a pytree whose leaves are ``[M, ...]``.
    own: the client's model (a pytree like one row of ``models``).
  """
  positive = jnp.maximum(scores, 0.0)
  total = positive.sum()
  weights = positive / jnp.where(total > 0, total, 1.0)

  def leaf(m, o):
    mixed = jnp.tensordot(weights, m.astype(jnp.float32), axes=1).astype(o.dtype)
    return jnp.where(total > 0, mixed, o)

  return jax.tree.map(leaf, models, own)


@register("FedFomo")
@dataclasses.dataclass(frozen=True)
class FedFomo(Algorithm):
  """Clients aggregate the server's copies of other clients' models, weighted by how much
  each improves their validation loss per unit of distance.

  State: server ``{"models": [N, ...] per leaf, "affinity": P [N, N], "uploaded": int32}``;
  client ``{"params": θ_i, "old": θ_old, "id": int32}`` stacked over all clients.

  Attributes:
    M: models each client receives per round (PFLlib ``-M``), at most the number of
      clients and of last round's uploads.
    join_ratio: the run's ``-jr`` (the runner fills it), read with ``pfllib_compat`` only:
      PFLlib caps ``M`` at ``int(N·join_ratio)``.
    pfllib_compat: PFLlib's validation loss, empty-split behaviour and cap on ``M`` (module
      docstring).
  """
  DECAYED_RATES = ("local.learning_rate",)  # -ld: the one SGD optimizer

  M: int = 5
  join_ratio: float = 1.0
  pfllib_compat: bool = False

  def __post_init__(self):
    check_int(self.name, "M", self.M, 1)
    check_join_ratio(self.name, self.join_ratio)
    check_bool(self.name, "pfllib_compat", self.pfllib_compat)

  def sent_at_most(self, num_clients: int) -> int:
    """``K = min(M, N)`` (static), with ``pfllib_compat`` also at most PFLlib's planned join
    count ``int(N·join_ratio)`` (its ``self.M = min(args.M, self.num_join_clients)``)."""
    count = min(self.M, num_clients)
    if self.pfllib_compat:
      count = min(count, planned_join_count(num_clients, self.join_ratio))
    return count

  def check_settings(self, context: SettingsContext) -> list[str]:
    """Warns about clients without a validation split and an ``M`` above the client count."""
    warnings = []
    counts = np.asarray(context.train_counts, np.int64)
    small = int((counts // VALIDATION_DIVISOR == 0).sum())
    if small:
      fate = ("validate on all their samples and train on none (pfllib_compat)"
              if self.pfllib_compat else "never take other clients' models")
      warnings.append(
          f"{self.name}: {small} of the {counts.size} clients have fewer than "
          f"{VALIDATION_DIVISOR} training samples, so their 20% validation split is empty and "
          f"they {fate}; give every client at least {VALIDATION_DIVISOR} training samples")
    if self.M > counts.size:
      warnings.append(f"{self.name} hyperparameter M={self.M} exceeds the {counts.size} "
                      f"clients: each client receives at most {counts.size} models; use "
                      f"M <= {counts.size} (-M)")
    return warnings

  # ------------------------------------------------------------------ state
  def init(self, key, sample_x, num_clients):
    params = self.init_params(key, sample_x)
    server = {"models": stack_clients(params, num_clients),
              "affinity": jnp.eye(num_clients, dtype=jnp.float32),
              "uploaded": jnp.zeros((), jnp.int32)}
    clients = {"params": stack_clients(params, num_clients),
               "old": stack_clients(params, num_clients),
               "id": jnp.arange(num_clients, dtype=jnp.int32)}
    return server, clients

  def received(self, server_state, index):
    """``(ids [K], received [K])``: the top ``K`` (:meth:`sent_at_most`) entries of
    ``P[index]`` and which of them are sent (the first ``min(K, uploads of last round)``)."""
    affinity = server_state["affinity"]
    count = self.sent_at_most(affinity.shape[0])
    _, ids = jax.lax.top_k(affinity[index], count)
    sent = jnp.minimum(count, server_state["uploaded"])
    return ids, jnp.arange(count) < sent

  def scores(self, old, models, received, data, val_start, val_count):
    """:func:`fomo_scores` of the candidate ``models`` ``[K, ...]`` on the validation split
    ``[val_start, val_start + val_count)`` of the client's training list."""
    width = data.train_idx.shape[0]
    positions = val_start + jnp.arange(validation_width(width, self.pfllib_compat))
    rows = data.train_idx[jnp.clip(positions, 0, width - 1)]
    x, y = data.x[rows], data.y[rows]

    def loss(variables):
      logits = self.model.apply(variables, x).astype(jnp.float32)
      per_sample = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      return validation_loss(per_sample, val_count, self.local.batch_size, self.pfllib_compat)

    losses = jax.vmap(loss)(models)
    distances = jax.vmap(lambda m: tree_distance(m, old))(models)
    return fomo_scores(loss(old), losses, distances, received & (val_count > 0))

  # ------------------------------------------------------------------ a round
  def client_update(self, server_state, client_state, data, key):
    index = client_state["id"]
    ids, received = self.received(server_state, index)
    models = jax.tree.map(lambda m: m[ids], server_state["models"])
    train_count, val_start, val_count = validation_split(data.train_count, self.pfllib_compat)
    scores = self.scores(client_state["old"], models, received, data, val_start, val_count)
    start = aggregate_received(scores, models, client_state["params"])
    params, _, stats = train_locally(start, data._replace(train_count=train_count), key,
                                     self.local, self.ce_loss)
    num_clients = server_state["affinity"].shape[0]
    vector = jnp.zeros((num_clients,), jnp.float32).at[ids].add(scores)
    state = {"params": params, "old": start, "id": index}
    upload = {"params": params, "scores": vector, "id": index}
    return state, upload, dict(stats, received=received.sum())

  def server_update(self, server_state, uploads, weights, key):
    """Stores each arrived model (weight > 0) in its client's row and adds its score vector
    to the client's row of ``P``; counts the arrivals."""
    del key
    arrived = jnp.asarray(weights) > 0
    num_clients = server_state["affinity"].shape[0]
    rows = jnp.where(arrived, uploads["id"], num_clients)  # out of range: dropped
    models = jax.tree.map(lambda m, u: m.at[rows].set(u.astype(m.dtype), mode="drop"),
                          server_state["models"], uploads["params"])
    affinity = server_state["affinity"].at[rows].add(uploads["scores"], mode="drop")
    return {"models": models, "affinity": affinity,
            "uploaded": arrived.sum().astype(jnp.int32)}

  def predict(self, server_state, client_state, x):
    """The client's own model."""
    del server_state
    return self.model.apply(client_state["params"], x)

  # ------------------------------------------------------------------ communication
  def download_traffic(self, server_state) -> Traffic:
    """The ``min(K, last round's uploads)`` models each client receives (:meth:`sent_at_most`)."""
    one = tree_traffic(jax.tree.map(lambda m: m[0], server_state["models"]))
    sent = jnp.minimum(self.sent_at_most(server_state["affinity"].shape[0]),
                       server_state["uploaded"]).astype(jnp.float32)
    return Traffic(one.floats * sent, one.bytes * sent)
