"""FD (FedDistill): federated distillation of per-class mean logits.

Jeong, Oh, Kim, Park, Bennis, Kim, "Communication-efficient on-device machine learning:
federated distillation and augmentation under non-IID private data", NeurIPS-W 2018
(arXiv:1811.11479). HtFLlib's ``-algo FD`` (its scripts: ``-lam 1``).

Every client keeps its whole model (any architecture; only C-dimensional logits cross the
network). A selected client trains for ``local_epochs`` on

    L = CE(z, y) + λ·(−Σ_c t_c · log softmax(z)_c),     t = softmax(G[y])      (λ = ``lam``)

where ``z`` are the model's logits and ``G [C, C]`` the server's global logits, row c the mean
logit vector of class c. Samples of a class the server has no row for get no soft term. While
training it accumulates, per class, the logits of the samples of every step (training mode, the
model changing as it trains, as HtFLlib does) and uploads their means ``{Z_i^c : c present}``
(``C_i x C`` floats). The server's new ``G^c`` is the unweighted mean of the uploaded
``Z_i^c`` over the clients that uploaded class c (:func:`~.prototypes.class_mean_server`);
classes nobody uploaded this round have no row (HtFLlib rebuilds its dict every round).
Download: ``C x C`` (the rows the server has). A client is evaluated with its own model.

``pfllib_compat=True`` (``--pfllib-compat``) uses HtFLlib's current soft target: since commit
ca3e29a (2025-11-29) it passes the RAW averaged logits ``t = G[y]`` to PyTorch's
probability-target cross-entropy. With un-normalised (and negative) ``t`` that term has no
lower bound (``−t_c·log p_c → −∞`` as ``p_c → 0`` for ``t_c < 0``), so training drifts to huge
logits and NaN; the default is the softmax target (the paper's, and HtFLlib's before that
commit). In compat mode, once the server has any row, a sample whose class has none is
distilled towards its own detached raw logits, as HtFLlib does (with a raw target that term
has a gradient).

Differences from HtFLlib (``clientfd.py``/``serverfd.py``):

- Default target: softmax(G[y]) (see above). For a class without a global row HtFLlib puts
  the sample's own detached output ``z̄`` there: ``−Σ softmax(z̄)_c log softmax(z)_c`` has a zero
  gradient (``softmax(z) − softmax(z̄) = 0``), so leaving the term out trains identically; the
  sample still counts in the batch mean.
- Dropped clients (``-cdr``) upload nothing; HtFLlib's FD server reads every selected client.
- ``train_loss`` is the evaluation cross-entropy (HtFLlib adds the soft term).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fedjax_lib.algorithms.base import (Algorithm, SettingsContext, Traffic, abstract_variables,
                                        check_bool, check_number, rows_traffic, stack_clients,
                                        untrained_new_clients)
from fedjax_lib.algorithms.prototypes import class_mean_server, class_sums
from fedjax_lib.algorithms.registry import register
from fedjax_lib.core.local import masked_cross_entropy, train_model


def distillation_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array,
                      global_logits: jax.Array, present: jax.Array,
                      raw_targets: bool = False) -> jax.Array:
  """FD's soft term, ``(1/n) Σ_i w_i · (−Σ_c t_{i,c} · log softmax(z_i)_c)``, ``n = Σ mask``.

  Args:
    logits: ``[B, C]`` the model's logits ``z``.
    labels: ``[B]`` classes.
    mask: ``[B]`` 1 for real samples.
    global_logits: ``[C, C]`` the server's per-class mean logits ``G``.
    present: ``[C]`` whether the server has a row for class c.
    raw_targets: False: ``t_i = softmax(G[y_i])`` and ``w_i = mask_i · present[y_i]``.
      True (HtFLlib since ca3e29a): ``t_i = G[y_i]`` un-normalised, or the sample's own
      detached ``z_i`` when class ``y_i`` has no row, and ``w_i = mask_i`` once any class has
      a row (no term at all before the first aggregation, as HtFLlib).

  Returns:
    The scalar term (targets carry no gradient).
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  rows = global_logits[labels].astype(jnp.float32)
  mask = mask.astype(jnp.float32)
  if raw_targets:
    targets = jnp.where(present[labels][:, None], rows, logits.astype(jnp.float32))
    weight = mask * present.any().astype(jnp.float32)
  else:
    targets = jax.nn.softmax(rows)
    weight = mask * present[labels].astype(jnp.float32)
  per_sample = -(jax.lax.stop_gradient(targets) * log_probs).sum(-1)
  return (weight * per_sample).sum() / jnp.maximum(mask.sum(), 1.0)


@register("FD", "FedDistill")
@dataclasses.dataclass(frozen=True)
class FD(Algorithm):
  """Personal models distilled towards the server's per-class mean logits.

  Attributes:
    lam: weight λ of the soft term (``-lam``; HtFLlib's default and scripts: 1).
    pfllib_compat: use HtFLlib's raw-logit soft target (unbounded below; see the module
      docstring) instead of the softmax target.
  """

  REFERENCE_SPLIT = True  # HtFLlib's main.py wraps the model in BaseHeadSplit

  lam: float = 1.0
  pfllib_compat: bool = False

  TRAIN_MODE = True

  def __post_init__(self):
    check_number(self.name, "lam", self.lam, 0.0)
    check_bool(self.name, "pfllib_compat", self.pfllib_compat)

  def num_classes(self, sample_x) -> int:
    """The model's number of logits (traced abstractly)."""
    variables = abstract_variables(self.model, sample_x)
    x = jax.ShapeDtypeStruct((1, *sample_x.shape), sample_x.dtype)
    return jax.eval_shape(self.model.apply, variables, x).shape[-1]

  def init(self, key, sample_x, num_clients):
    num_classes = self.num_classes(sample_x)
    server = {"protos": jnp.zeros((num_classes, num_classes), jnp.float32),
              "present": jnp.zeros((num_classes,), bool)}
    return server, {"params": stack_clients(self.init_params(key, sample_x), num_clients)}

  def objective(self, server_state):
    """``CE + lam·distillation_loss``; the carry accumulates per-class logit sums/counts."""
    num_classes = server_state["present"].shape[0]

    def loss(features, logits, batch, carry):
      del features
      soft = distillation_loss(logits, batch.y, batch.mask, server_state["protos"],
                               server_state["present"], self.pfllib_compat)
      sums, counts = class_sums(jax.lax.stop_gradient(logits), batch.y, batch.mask,
                                num_classes)
      return (masked_cross_entropy(logits, batch.y, batch.mask) + self.lam * soft,
              (carry[0] + sums, carry[1] + counts))
    return loss

  def client_update(self, server_state, client_state, data, key):
    zeros = (jnp.zeros_like(server_state["protos"]),
             jnp.zeros(server_state["present"].shape, jnp.float32))
    variables, (sums, counts), stats = train_model(
        self.model, client_state["params"], data, key, self.local,
        self.objective(server_state), carry=zeros)
    upload = {"protos": sums / jnp.maximum(counts, 1.0)[:, None], "present": counts > 0}
    return {"params": variables}, upload, stats

  def server_update(self, server_state, uploads, weights, key):
    del server_state, key
    return class_mean_server(uploads, weights)

  def client_model(self, server_state, client_state):
    """The client's own model (HtFLlib's saved ``model``; ``-sfn``/``-mfn``)."""
    del server_state
    return client_state['params']

  def predict(self, server_state, client_state, x):
    """The client's own model."""
    return self.model.apply(client_state["params"], x)

  def new_client_variables(self, server_state, client_state):
    """A new client trains its own freshly initialised model."""
    return client_state["params"]

  def upload_traffic(self, upload) -> Traffic:
    """The mean logits of the classes the client has (``C_i x C``)."""
    return rows_traffic(upload["protos"], upload["present"])

  def download_traffic(self, server_state) -> Traffic:
    """The global logits of the classes the server has (``C x C`` once all have one)."""
    return rows_traffic(server_state["protos"], server_state["present"])

  def check_settings(self, context: SettingsContext) -> list[str]:
    return untrained_new_clients(self.name, "model", context)
