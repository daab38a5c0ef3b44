"""FedPCL: Federated Learning from Pre-Trained Models: A Contrastive Learning Approach.

Tan, Long, Liu, Zhou, Lu, Jiang, Zhang, NeurIPS 2022. PFLlib's ``-algo FedPCL``.

Every client keeps its own model, used as an encoder: its representation is the unit vector
``z = f(x)/‖f(x)‖`` of the base's features (PFLlib removes the classifier, ``fc = Identity``;
the head here is never used nor trained). PFLlib has no pre-trained backbones: the encoders
are trained from scratch. Only prototypes cross the network.

- **Local prototypes.** ``P_k^c`` = mean of ``z`` over client k's training samples of class c,
  in evaluation mode after its local training (not re-normalised).
- **Server.** The global prototypes ``G^c`` are, per class, the unweighted mean of this
  round's uploaded ``P_k^c`` (a class nobody uploaded this round has none). The server also
  keeps every client's latest upload; client j's *prototype set* ``S_j`` is its own ``P_j^c``
  where it has class c, padded with ``G^c`` elsewhere (PFLlib's ``prototype_padding``).
  Every client receives ``G`` and all N sets.
- **Local training** (a selected client, once global prototypes exist) for ``local_epochs``
  on the prototype-contrastive loss (:func:`contrastive_loss`)

      L = CE(z·Gᵀ/τ, y) + (1/N) Σ_j CE(z·S_jᵀ/τ, y)            (τ = ``tau``, ``-tau``)

  with gradients clipped to global norm 10 (PFLlib's ``clip_grad_norm_``); then it computes
  and uploads its local prototypes. A selected client with no global prototypes yet (round
  0) only computes and uploads them.
- **Evaluation**: a client scores class c by ``z·S^c`` with its own set ``S`` (its latest
  local prototypes, padded with the current ``G``); the argmax is the prediction.

A prototype that does not exist (a class neither the client nor the server has) is left out
of the softmax in training (a sample of such a class adds 0 to that term, still counting in
the batch mean) and scores 0 in evaluation, as in PFLlib's test.

State: server ``{"protos" [C, d], "present" [C], "client_protos" [N, C, d],
"client_present" [N, C]}``; client ``{"params", "protos", "present", "id"}``. Traffic per
round: up ``|C_k|·d`` floats per client; down, to every client, the prototypes of ``G`` and of
all N sets (PFLlib's ``send_protos``).

Differences from PFLlib (``clientpcl.py``/``serverpcl.py``; ``pfllib_compat=True``,
``--pfllib-compat``, gives PFLlib's training gate, class orders and prototype pass):

- **Class order.** PFLlib stacks the prototypes of ``G`` and of each set in the order their
  dictionaries were filled and uses the label as the column index of that stack, so in
  training a sample is pulled toward another class's prototype in general (evaluation
  indexes by class and is unaffected); a class missing from ``G`` makes it fail (a label
  beyond the stack, or an empty list stacked). Here column c is class c's prototype.
  ``pfllib_compat`` reproduces PFLlib's orders (:func:`class_orders`, :func:`global_order`):
  a set's are its client's classes in the order they first appear in its prototype pass
  (a shuffled ``drop_last`` pass, which the prototypes then average, as PFLlib's), then the
  classes padded from ``G`` ascending; ``G``'s are the classes in the order they first
  appear over the uploads taken in a random selection order (PFLlib's ``select_clients``
  draws one), each upload in its own order. The shuffles come from the run's keys, so the
  orders match PFLlib's in distribution, not draw for draw. A label beyond the classes of
  ``G`` adds 0 (PFLlib stops with an index error).
- **Training gate.** PFLlib trains a selected client only once the client itself has
  prototypes, i.e. from its second selection on (its first only collects them), although the
  global prototypes exist after round 0. Here a client trains whenever global prototypes
  exist; ``pfllib_compat`` gives PFLlib's gate. Identical with ``-jr 1`` (every client is
  selected in round 0).
- **Padding.** PFLlib pads a set once, with the ``G`` of the round it was uploaded in (and a
  set never uploaded aliases round 0's ``G``); here a set is padded with the current ``G``
  whenever it is used. Identical with ``-jr 1``.
- **Drop-outs.** PFLlib's FedPCL ignores ``-cdr`` (every selected client's prototypes are
  used); here a dropped client uploads nothing, as in the other algorithms. It keeps its own
  new prototypes (it computed them) for evaluation.
- Prototypes average all of a client's training samples; PFLlib's loader is shuffled and
  drop_last, which leaves out ``count mod B`` random samples (and possibly a class);
  ``pfllib_compat`` averages those of such a pass.
- Before a client has prototypes PFLlib reports it as 0 correct of 1e-5 samples (round 0: an
  accuracy of 0) and its AUC as 0; here it is scored with the global prototypes (all scores 0
  before any exist: the argmax is class 0), and the AUC is computed from the scores.
- ``train_loss`` is the cross-entropy of the evaluation scores ``z·Sᵀ`` (PFLlib reports
  ``L``, with τ and the N sets).
- PFLlib's DNN emits ``log_softmax`` of its hidden features once ``fc`` is removed; here the
  encoder's output is the ReLU features (see `fedjax_lib.models.mlp`); ``--pfllib-compat``
  gives PFLlib's.
- New clients (``-nnc``) are not supported, as in PFLlib.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from fedjax_lib.algorithms.base import (Algorithm, SettingsContext, Traffic,
                                        abstract_variables, check_bool, check_positive,
                                        rows_traffic, stack_clients)
from fedjax_lib.algorithms.fedgc import ABSENT_LOGIT
from fedjax_lib.algorithms.prototypes import (eval_class_means, mean_of_uploads,
                                              shuffled_loader_samples)
from fedjax_lib.algorithms.registry import register
from fedjax_lib.algorithms.split import split_parts
from fedjax_lib.core.local import Batch, train_model
from fedjax_lib.errors import ConfigError

# PyTorch's F.normalize eps, and PFLlib's gradient-norm clip.
NORMALIZE_EPS = 1e-12
CLIP_NORM = 10.0


def normalize(features: jax.Array) -> jax.Array:
  """``f / max(‖f‖₂, 1e-12)`` row-wise in float32 (PyTorch's ``F.normalize``), features
  flattened after the batch axis."""
  f = features.reshape(features.shape[0], -1).astype(jnp.float32)
  norm = jnp.sqrt(jnp.maximum(jnp.square(f).sum(-1, keepdims=True), NORMALIZE_EPS ** 2))
  return f / norm


def padded_sets(client_protos, client_present, protos, present):
  """Clients' prototype sets ``S_j``: their own prototype where they have the class, the
  global one elsewhere. Returns ``(sets [..., C, d], valid [..., C])``."""
  sets = jnp.where(client_present[..., None], client_protos, protos)
  return sets, client_present | present


def prototype_ce(z: jax.Array, labels: jax.Array, mask: jax.Array, protos: jax.Array,
                 valid: jax.Array, tau) -> jax.Array:
  """``CE(z·Pᵀ/τ, y)`` averaged over the rows with ``mask``.

  Prototypes without ``valid`` are left out of the softmax; a sample whose own class has no
  valid prototype adds 0 (and still counts in the mean).

  Args:
    z: ``[B, d]`` unit representations.
    labels: ``[B]`` classes.
    mask: ``[B]`` 1 for real samples.
    protos: ``[C, d]`` prototypes (row c = class c).
    valid: ``[C]`` bool.
    tau: the temperature τ > 0.
  """
  logits = (z @ protos.T) / tau
  # A finite stand-in for -inf: exactly 0 softmax weight, and finite gradients even when no
  # prototype is valid (round 0, whose training is discarded).
  log_norm = jax.nn.logsumexp(jnp.where(valid, logits, ABSENT_LOGIT), axis=-1)
  label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  weight = mask.astype(jnp.float32) * valid[labels].astype(jnp.float32)
  losses = jnp.where(weight > 0, log_norm - label_logit, 0.0)
  return (losses * weight).sum() / jnp.maximum(mask.astype(jnp.float32).sum(), 1.0)


def contrastive_loss(z, labels, mask, protos, present, sets, valid, tau) -> jax.Array:
  """FedPCL's local loss ``CE(z·Gᵀ/τ, y) + mean_j CE(z·S_jᵀ/τ, y)``.

  Args:
    z, labels, mask, tau: as for :func:`prototype_ce`.
    protos, present: the global prototypes ``G [C, d]`` and which exist ``[C]``.
    sets, valid: the N clients' prototype sets ``[N, C, d]`` and which exist ``[N, C]``.
  """
  global_term = prototype_ce(z, labels, mask, protos, present, tau)
  set_terms = jax.vmap(prototype_ce, (None, None, None, 0, 0, None))(z, labels, mask, sets,
                                                                       valid, tau)
  return global_term + set_terms.mean()


def shuffled_pass(data, key: jax.Array, batch_size: int, num_classes: int):
  """PFLlib's prototype pass: one shuffled ``drop_last`` epoch. Returns ``(visited, first)``:
  ``data`` restricted to the ``⌊n/B⌋·B`` samples visited, in the pass's order, and each
  class's first position in it ``[C]`` int32 (the width of ``train_idx`` where never)."""
  width = data.train_idx.shape[0]
  visited = shuffled_loader_samples(data, key, batch_size)
  positions = jnp.arange(width, dtype=jnp.int32)
  hits = ((data.y[visited.train_idx][:, None] == jnp.arange(num_classes))
          & (positions < visited.train_count)[:, None])
  return visited, jnp.min(jnp.where(hits, positions[:, None], width), axis=0)


def class_orders(first: jax.Array, has: jax.Array) -> jax.Array:
  """The stack order of a padded set, as PFLlib's dictionary fills: the uploaded classes by
  first appearance in the pass, then the classes padded from ``G`` ascending. ``first, has
  [..., C]``; returns ``[..., C]`` int32 (column j holds class ``order[j]``)."""
  classes = jnp.arange(first.shape[-1], dtype=jnp.int32)
  late = jnp.iinfo(jnp.int32).max - first.shape[-1]
  return jnp.argsort(jnp.where(has, first, late + classes), axis=-1).astype(jnp.int32)


def global_order(first: jax.Array, has: jax.Array, rank: jax.Array) -> jax.Array:
  """``G``'s stack order, as PFLlib's aggregation fills its dictionary: the uploads taken in
  selection order (``rank [K]``, each slot's position), each upload's classes in its order,
  a class placed at its first occurrence; classes nobody uploaded last, ascending.
  ``first, has [K, C]``; returns ``[C]`` int32."""
  num_slots, num_classes = has.shape
  ranks = jnp.where(has, rank[:, None], num_slots)                             # [K, C]
  owner = jnp.argmin(ranks, axis=0)[None]                                      # [1, C]
  owner_rank = jnp.take_along_axis(ranks, owner, axis=0)[0]
  within = jnp.take_along_axis(first, owner, axis=0)[0]
  classes = jnp.arange(num_classes, dtype=jnp.int32)
  within = jnp.where(owner_rank < num_slots, within, classes)
  return jnp.lexsort((within, owner_rank)).astype(jnp.int32)


def prototype_scores(z: jax.Array, protos: jax.Array, valid: jax.Array) -> jax.Array:
  """Evaluation scores ``z·P^c``; 0 for a class without a prototype (PFLlib's test)."""
  return jnp.where(valid, z @ protos.T, 0.0)


@register("FedPCL")
@dataclasses.dataclass(frozen=True)
class FedPCL(Algorithm):
  """Prototype-contrastive training of personal encoders; nearest-prototype evaluation.

  Attributes:
    tau: temperature τ > 0 of the contrastive loss (PFLlib's ``-tau``, default 1.0).
    pfllib_compat: PFLlib's training gate (a client trains from its second selection on),
      its class orders of the stacked prototypes and its shuffled drop_last prototype pass.
      Server state then also holds ``"order" [C]`` (G's stack order) and ``"client_order"
      [N, C]`` (each set's; -1: never uploaded, G's order, as PFLlib's alias of G), uploads
      ``"first" [C]`` (each class's first position in the pass).
  """

  REFERENCE_SPLIT = True  # PFLlib's main.py wraps the model in BaseHeadSplit

  tau: float = 1.0
  pfllib_compat: bool = False

  TRAIN_MODE = True

  def __post_init__(self):
    check_positive(self.name, "tau", self.tau, "-tau")
    check_bool(self.name, "pfllib_compat", self.pfllib_compat)

  def shapes(self, sample_x):
    """``(num_classes, d)``: the data's classes and the width of the flattened features."""
    variables = abstract_variables(self.model, sample_x)
    x = jax.ShapeDtypeStruct((1, *sample_x.shape), sample_x.dtype)
    features, logits = jax.eval_shape(
        lambda v, x: self.model.apply(v, x, method="forward"), variables, x)
    return logits.shape[-1], math.prod(features.shape[1:])

  def init(self, key, sample_x, num_clients):
    num_classes, dim = self.shapes(sample_x)
    protos = jnp.zeros((num_classes, dim), jnp.float32)
    present = jnp.zeros((num_classes,), bool)
    server = {"protos": protos, "present": present,
              "client_protos": jnp.zeros((num_clients, num_classes, dim), jnp.float32),
              "client_present": jnp.zeros((num_clients, num_classes), bool)}
    if self.pfllib_compat:
      server["order"] = jnp.arange(num_classes, dtype=jnp.int32)
      server["client_order"] = jnp.full((num_clients, num_classes), -1, jnp.int32)
    clients = stack_clients({"params": self.init_params(key, sample_x), "protos": protos,
                             "present": present}, num_clients)
    clients["id"] = jnp.arange(num_clients, dtype=jnp.int32)
    return server, clients

  def represent(self, variables, x):
    """The unit representation ``z`` of ``x`` (evaluation mode)."""
    return normalize(self.model.apply(variables, x, method="features"))

  def stacked(self, server_state):
    """``(G, present, sets, valid)`` with column j the prototype training reads for label j:
    class j's, or with ``pfllib_compat`` the class PFLlib's stack holds there."""
    protos, present = server_state["protos"], server_state["present"]
    sets, valid = padded_sets(server_state["client_protos"], server_state["client_present"],
                              protos, present)
    if not self.pfllib_compat:
      return protos, present, sets, valid
    order = server_state["order"]
    orders = jnp.where(server_state["client_order"] < 0, order, server_state["client_order"])
    return (protos[order], present[order], jnp.take_along_axis(sets, orders[..., None], axis=1),
            jnp.take_along_axis(valid, orders, axis=1))

  def client_update(self, server_state, client_state, data, key):
    protos, present, sets, valid = self.stacked(server_state)
    tau = self.tau
    if self.pfllib_compat:
      key, pass_key = jax.random.split(key)

    def objective(features, logits, batch: Batch, carry):
      del logits
      loss = contrastive_loss(normalize(features), batch.y, batch.mask, protos, present, sets,
                              valid, tau)
      return loss, carry

    tx = optax.chain(optax.clip_by_global_norm(CLIP_NORM), optax.sgd(self.local.learning_rate))
    trained, _, stats = train_model(self.model, client_state["params"], data, key, self.local,
                                    objective, trainable=("base",), tx=tx)
    # Round 0 (no global prototypes) only collects; with compat, a client's first selection.
    ready = client_state["present"].any() if self.pfllib_compat else present.any()
    variables = jax.tree.map(lambda new, old: jnp.where(ready, new, old), trained,
                             client_state["params"])
    stats = {"loss": jnp.where(ready, stats["loss"], 0.0),
             "steps": jnp.where(ready, stats["steps"], 0)}
    num_classes = protos.shape[0]
    upload = {"id": client_state["id"]}
    if self.pfllib_compat:
      data, upload["first"] = shuffled_pass(data, pass_key, self.local.batch_size, num_classes)
    own, has = eval_class_means(lambda x: self.represent(variables, x), data, num_classes)
    state = {"params": variables, "protos": own, "present": has, "id": client_state["id"]}
    return state, {**upload, "protos": own, "present": has}, stats

  def server_update(self, server_state, uploads, weights, key):
    arrived = weights > 0
    has = uploads["present"] & arrived[:, None]
    # A slot of weight 0 may hold anything (a dropped client's NaN): zero it before use.
    uploaded = jnp.where(has[..., None], uploads["protos"], 0.0)
    protos, present = mean_of_uploads(uploaded, has)
    num_clients = server_state["client_protos"].shape[0]
    rows = jnp.where(arrived, uploads["id"], num_clients)
    new = {"protos": protos, "present": present,
           "client_protos": server_state["client_protos"].at[rows].set(uploaded, mode="drop"),
           "client_present": server_state["client_present"].at[rows].set(has, mode="drop")}
    if self.pfllib_compat:
      rank = jax.random.permutation(key, arrived.shape[0])
      new["order"] = global_order(uploads["first"], has, rank)
      new["client_order"] = server_state["client_order"].at[rows].set(
          class_orders(uploads["first"], has), mode="drop")
    return new

  def predict(self, server_state, client_state, x):
    """Scores against the client's own prototypes, padded with the global ones."""
    own, valid = padded_sets(client_state["protos"], client_state["present"],
                             server_state["protos"], server_state["present"])
    return prototype_scores(self.represent(client_state["params"], x), own, valid)

  # ---------------------------------------------------------------- communication
  def download_traffic(self, server_state) -> Traffic:
    """``G``'s prototypes and every client's (padded) set: PFLlib sends all of them."""
    _, valid = padded_sets(server_state["client_protos"], server_state["client_present"],
                           server_state["protos"], server_state["present"])
    protos = server_state["protos"]
    sent = rows_traffic(protos, server_state["present"])
    sets = valid.astype(jnp.float32).sum() * protos.shape[-1]
    return Traffic(sent.floats + sets, sent.bytes + sets * protos.dtype.itemsize)

  def upload_traffic(self, upload) -> Traffic:
    """The prototypes of the classes the client has (``|C_k|·d``)."""
    return rows_traffic(upload["protos"], upload["present"])

  def check_settings(self, context: SettingsContext) -> list[str]:
    """Refuses a model whose base has no parameters: its "features" are the raw inputs and
    there is no encoder to train."""
    if not jax.tree.leaves(split_parts(abstract_variables(self.model, context.sample_x))["base"]):
      raise ConfigError(
          f"FedPCL trains the model's base as an encoder, but model {context.model_name!r} "
          "has no base parameters (its features are the raw inputs); use a model with a "
          "feature extractor (cnn, dnn, resnet18, ...)")
    return []
