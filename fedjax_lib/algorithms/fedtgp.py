"""FedTGP: Trainable Global Prototypes with Adaptive-Margin-Enhanced Contrastive Learning.

Zhang, Liu, Hua, Cao, AAAI 2024 (arXiv:2401.03230). HtFLlib's ``-algo FedTGP``.

Clients (any architectures; only prototypes cross the network) train for ``local_epochs`` on

    L = CE(h(f(x)), y) + λ·MSE(f(x), P̂[y])          (λ = ``lam``, HtFLlib's ``-lam``)

against the global prototypes ``P̂`` (none in round 0), then compute their prototypes in
evaluation mode, ``P_i^c = mean f(x)`` over the class-c samples of HtFLlib's prototype loader
(the client's first ``⌊n/B⌋·B`` training samples, in its order: a ``drop_last`` loader without
shuffling), and upload those of the classes they have.

The server owns the **trainable global prototypes** (TGP): a network ``Embedding(C, d) →
Linear(d, d) → ReLU → Linear(d, d)`` whose output row c is ``P̂^c``; it persists across
rounds and is never sent. Each round:

1. class centres ``Q^c`` = unweighted mean of the uploaded ``P_i^c``; the **adaptive margin**
   ``δ(t) = min(max_c min_{k≠c} ‖Q^c − Q^k‖, τ)`` (:func:`adaptive_margin`; τ = ``-mart``);
2. ``server_epochs`` epochs (``-se``) of SGD (lr = the clients' ``-lr``, as HtFLlib) over the
   uploaded (prototype, class) pairs, shuffled, in batches of ``-lbs``, on the **ACL loss**
   (:func:`acl_loss`): the cross-entropy over classes of the logits
   ``−(φ(P_i^c, P̂^k) + δ(t)·[k = c])``, φ the Euclidean distance;
3. the new ``P̂`` (all C classes) is sent to every client.

Clients are evaluated by the nearest ``P̂`` (MSE), and by their head (``test_acc_head``).

``pfllib_compat=True`` (``--pfllib-compat``) uploads HtFLlib's prototypes instead: its
``clientTGP.train`` calls ``collect_protos`` before it saves the model it has just trained, and
``collect_protos`` loads the saved model, so every client uploads the prototypes of its model
as it was *before* the round's training (in round 0, of the untrained initial model); the
paper (Algorithm 1) and FedGH, FedKTL and FedProto in HtFLlib use the trained model. Seen in
HtFLlib's run (e959261, also in the FedTGP repository): its round-0 uploads have the feature
norms of an untrained model (CNN ≈ 1.15, ResNet-18 ≈ 6.0, while one epoch of training takes
them to up to 2.6 and 8.8).

Differences from HtFLlib (``clienttgp.py``/``servertgp.py``):

- φ is ``sqrt(max(‖p‖² − 2p·q + ‖q‖², 1e-12))``: HtFLlib takes the square root unclamped, which
  is NaN for a slightly negative rounding error and has an infinite gradient at distance 0.
- The server's shuffles and the TGP's initialisation derive from the run's keys (HtFLlib: the
  unseeded global torch RNG); the TGP's SGD is stateless, so re-creating it every round, as
  HtFLlib does, is the same.
- Round 0 evaluation before any prototype exists: as FedProto (every class scores 0).
- ``train_loss`` is the head's cross-entropy (HtFLlib adds ``λ·MSE``).
- The uploaded prototypes are those of the trained model (see ``pfllib_compat`` above).
- Dropped clients (``-cdr``) upload nothing; HtFLlib's ``receive_protos`` reads every selected
  client's prototypes (its ``-cdr`` does not apply). The same at the default ``-cdr 0``.

Which samples the prototypes average matters here, and they are HtFLlib's: its loader leaves
out each client's last ``n mod B`` training samples, so a class seen only there is not uploaded
and a client with fewer than ``B`` samples uploads nothing (FedGH and FedKTL average the same
samples). Averaging every training sample instead made the test accuracy swing by up to 0.3
from round to round, on HtFE-img-2 and on ResNet-18 alone, with or without shuffling, where
HtFLlib's rises smoothly; with the loader's samples both rise alike. Every part was checked
against PyTorch separately: the ACL training from the same TGP on the same uploads (the same
loss and prototypes up to the shuffle's noise), one epoch of the client loss (FedAvgCNN to
2e-7; ResNet-18 to 1e-4 after one step, after which float32 rounding alone grows, in PyTorch
too, to differences of 7 at feature norms of 40 within five steps), and a PyTorch copy of the
whole loop swung as well until its prototypes left out the same samples
(``experiments/pfllib_agreement/RESULTS.md``).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedjax_lib.algorithms.base import check_bool, check_int, check_number
from fedjax_lib.algorithms.prototypes import (PrototypeAlgorithm, eval_class_means,
                                              loader_samples, mean_of_uploads, train_on_rows)
from fedjax_lib.algorithms.registry import register
from fedjax_lib.core.local import ClientData, train_model
from fedjax_lib.errors import ConfigError
from fedjax_lib.models.layers import TorchDense, normal_init

_FAR = 1e9  # HtFLlib's "no other class" gap


def euclidean_distances(points: jax.Array, centres: jax.Array) -> jax.Array:
  """``[n, C]`` Euclidean distances ``sqrt(max(‖p‖² − 2p·q + ‖q‖², 1e-12))``: finite, with a
  finite gradient, at distance 0."""
  squared = (jnp.square(points).sum(-1, keepdims=True) - 2.0 * points @ centres.T
             + jnp.square(centres).sum(-1)[None])
  return jnp.sqrt(jnp.maximum(squared, 1e-12))


def acl_loss(points: jax.Array, labels: jax.Array, global_protos: jax.Array, margin,
             mask: jax.Array) -> jax.Array:
  """The adaptive-margin-enhanced contrastive loss, averaged over the rows with ``mask``.

  For a client prototype ``p`` of class ``c``:
  ``−log softmax_c(−(φ(p, P̂^k) + margin·[k = c]))_k`` — pulled towards ``P̂^c`` and pushed
  from every other ``P̂^k`` by at least ``margin``.

  Args:
    points: ``[n, d]`` uploaded prototypes.
    labels: ``[n]`` their classes.
    global_protos: ``[C, d]`` the TGP's prototypes.
    margin: the scalar margin ``δ(t)``.
    mask: ``[n]`` 1 for real rows.
  """
  dist = euclidean_distances(points, global_protos)
  logits = -(dist + margin * jax.nn.one_hot(labels, global_protos.shape[0]))
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  mask = mask.astype(jnp.float32)
  return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def adaptive_margin(centres: jax.Array, present: jax.Array, threshold) -> jax.Array:
  """``δ(t) = min(max_c gap_c, τ)`` with ``gap_c = min_{k≠c, k present} ‖Q^c − Q^k‖``.

  A class without a centre, or with no other class present, gets the smallest gap of the
  others (HtFLlib); with fewer than two classes present the margin is ``τ``.
  """
  diff = centres[:, None, :] - centres[None, :, :]
  dist = jnp.sqrt(jnp.maximum(jnp.square(diff).sum(-1), 0.0))
  num = centres.shape[0]
  pair = present[:, None] & present[None, :] & ~jnp.eye(num, dtype=bool)
  gap = jnp.where(pair, dist, _FAR).min(axis=1)
  gap = jnp.where(present, gap, _FAR)
  min_gap = gap.min()
  gap = jnp.where(gap > _FAR / 10, min_gap, gap)
  return jnp.minimum(gap.max(), threshold)


class TrainableGlobalPrototypes(nn.Module):
  """``Embedding(C, d) → Linear(d, hidden) → ReLU → Linear(hidden, d)``; row c = ``P̂^c``.

  PyTorch's initialisation: embedding ``N(0, 1)``, linear layers ``U(±1/sqrt(fan_in))``.
  """
  num_classes: int
  dim: int
  hidden: int

  @nn.compact
  def __call__(self) -> jax.Array:
    table = self.param("embedding", normal_init(1.0), (self.num_classes, self.dim))
    x = nn.relu(TorchDense(self.hidden, name="fc0")(table))
    return TorchDense(self.dim, name="fc1")(x)


@register("FedTGP")
@dataclasses.dataclass(frozen=True)
class FedTGP(PrototypeAlgorithm):
  """Trainable global prototypes trained with the ACL loss on the uploaded prototypes.

  Attributes:
    lam: weight of ``MSE(f(x), P̂[y])`` in the client loss (``-lam``; scripts: 10).
    server_epochs: epochs of TGP training per round (``-se``; HtFLlib's default 100).
    margin_threshold: τ, the cap of the adaptive margin (``-mart``; 100).
    pfllib_compat: upload the prototypes of the model before the round's training, as
      HtFLlib does (see the module docstring).
  """

  REFERENCE_SPLIT = True  # HtFLlib's main.py wraps the model in BaseHeadSplit

  server_epochs: int = 100
  margin_threshold: float = 100.0
  pfllib_compat: bool = False

  TRAIN_MODE = True

  def __post_init__(self):
    super().__post_init__()
    check_int(self.name, "server_epochs", self.server_epochs, 0)
    check_number(self.name, "margin_threshold", self.margin_threshold, 0.0)
    check_bool(self.name, "pfllib_compat", self.pfllib_compat)
    if not self.margin_threshold > 0:
      raise ConfigError(f"FedTGP hyperparameter margin_threshold={self.margin_threshold!r} "
                        "must be a finite number > 0 (-mart)")

  def tgp(self, num_classes: int, dim: int) -> TrainableGlobalPrototypes:
    return TrainableGlobalPrototypes(num_classes, dim, dim)

  def init(self, key, sample_x, num_clients):
    server = self.empty_prototypes(sample_x)
    num_classes, dim = server["protos"].shape
    server["tgp"] = self.tgp(num_classes, dim).init(jax.random.fold_in(key, 1))["params"]
    server["margin"] = jnp.zeros((), jnp.float32)
    return server, self.init_clients(key, sample_x, num_clients)

  def client_update(self, server_state, client_state, data, key):
    variables, _, stats = train_model(self.model, client_state["params"], data, key,
                                      self.local, self.objective(server_state))
    described = client_state["params"] if self.pfllib_compat else variables
    protos, present = self.local_prototypes(described, data, server_state["present"].shape[0])
    return {"params": variables}, {"protos": protos, "present": present}, stats

  def local_prototypes(self, variables, data: ClientData, num_classes: int):
    """Per-class mean features, in evaluation mode, over the samples of HtFLlib's prototype
    loader: the first ``⌊n/B⌋·B`` of the client's ``n`` training samples."""
    return eval_class_means(lambda x: self.model.apply(variables, x, method="features"),
                            loader_samples(data, self.local.batch_size), num_classes)

  def server_update(self, server_state, uploads, weights, key):
    has = uploads["present"] & (weights > 0)[:, None]            # [K, C]
    num_classes, dim = server_state["protos"].shape
    centres, centre_present = mean_of_uploads(uploads["protos"], has)
    margin = adaptive_margin(centres, centre_present, self.margin_threshold)
    points = uploads["protos"].reshape(-1, dim).astype(jnp.float32)
    labels = jnp.tile(jnp.arange(num_classes), has.shape[0])
    valid = has.reshape(-1)
    tgp = self.tgp(num_classes, dim)
    params = self.train_tgp(tgp, server_state["tgp"], points, labels, valid, margin, key)
    any_upload = valid.any()
    return {"tgp": params,
            "protos": jnp.where(any_upload, tgp.apply({"params": params}),
                                server_state["protos"]),
            "present": server_state["present"] | any_upload,
            "margin": margin}

  def train_tgp(self, tgp, params, points, labels, valid, margin, key):
    """``server_epochs`` epochs of SGD on the ACL loss over the valid (point, label) pairs:
    each epoch shuffles them and takes ``ceil(n / batch_size)`` steps (the last batch holds
    the remainder), as PyTorch's ``DataLoader(shuffle=True)`` does."""
    def loss_fn(p, rows, mask):
      return acl_loss(points[rows], labels[rows], tgp.apply({"params": p}), margin, mask)

    return train_on_rows(params, loss_fn, valid, self.local.batch_size, self.server_epochs,
                         optax.sgd(self.local.learning_rate), key)

  def download(self, server_state):
    """The prototypes only: the TGP network stays on the server."""
    return {"protos": server_state["protos"], "present": server_state["present"]}
