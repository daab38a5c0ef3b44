"""FedRoD: On Bridging Generic and Personalized Federated Learning for Image Classification.

Chen, Chao, ICLR 2022.

Each client holds the shared model (base φ + generic head g) and a personal head p. On every
mini-batch, with ``rep = φ(x)`` and ``out_g = g(rep)`` computed once:

1. φ and g take an SGD step on the balanced-softmax loss
   :func:`balanced_softmax_loss` ``= CE(out_g + log n_c, y)``, where ``n_c`` counts the client's
   training samples of class c (a class the client lacks gets a −∞ logit);
2. p takes an SGD step on ``CE(sg(out_g) + p(sg(rep)), y)`` — the personal head learns a residual
   on top of the generic prediction, with no gradient into φ or g.

Both steps use the local learning rate and the quantities computed before step 1, so the two
losses are independent in their parameters and one SGD step on their sum performs both
(:func:`fedrod_loss`). The client uploads φ and g; the server averages them weighted by sample
count (FedAvg). A client is evaluated with ``g(φ(x)) + p(φ(x))`` (the ``personal`` view,
``test_acc``); the ``global`` view is the generic model ``g(φ(x))``.

Differences from PFLlib: the class counts come from all of a client's training samples (PFLlib
counts one shuffled drop_last pass at start-up, which may miss up to ``batch_size − 1``
samples).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from fedjax_lib.algorithms.base import FeatureViews, stack_clients
from fedjax_lib.algorithms.fedavg import FedAvg
from fedjax_lib.algorithms.registry import register
from fedjax_lib.algorithms.split import split_parts
from fedjax_lib.core.local import class_counts, masked_cross_entropy, train_locally


def balanced_softmax_loss(logits, labels, mask, counts):
  """Balanced-softmax cross-entropy: softmax CE of ``logits + log(counts)``."""
  log_prior = jnp.where(counts > 0, jnp.log(jnp.maximum(counts, 1e-30)), -jnp.inf)
  return masked_cross_entropy(logits.astype(jnp.float32) + log_prior, labels, mask)


@register("FedROD", "FedRoD")
@dataclasses.dataclass(frozen=True)
class FedROD(FedAvg):
  """Generic model trained with balanced softmax, plus a personal residual head."""

  REFERENCE_SPLIT = True  # PFLlib's main.py wraps the model in BaseHeadSplit
  # -ld: both optimizers (body and generic head, personal head)
  DECAYED_RATES = ("local.learning_rate",)

  def init(self, key, sample_x, num_clients):
    params = self.init_params(key, sample_x)
    head = split_parts(params)["head"]
    return {"params": params}, {"head": stack_clients(head, num_clients)}

  def generic_and_personal(self, params, head, x):
    """``(out_g, out_p)``: the generic logits and the personal head's logits."""
    rep = self.model.apply(params, x, method="features")
    out_g = self.model.apply(params, rep, method="classify")
    return out_g, self.model.apply({"params": {"head": head}}, rep, method="classify")

  def fedrod_loss(self, counts):
    """Balanced softmax for (φ, g) plus the personal-head loss for p, in one scalar."""
    def loss(trainable, batch, key):
      del key
      params, head = trainable["params"], trainable["head"]
      rep = self.model.apply(params, batch.x, method="features")
      out_g = self.model.apply(params, rep, method="classify")
      out_p = self.model.apply({"params": {"head": head}}, jax.lax.stop_gradient(rep),
                               method="classify")
      generic = balanced_softmax_loss(out_g, batch.y, batch.mask, counts)
      personal = masked_cross_entropy(jax.lax.stop_gradient(out_g) + out_p, batch.y,
                                      batch.mask)
      return generic + personal
    return loss

  def client_update(self, server_state, client_state, data, key):
    params = server_state["params"]
    num_classes = jax.eval_shape(self.model.apply, params, data.x[:1]).shape[-1]
    counts = class_counts(data, num_classes)
    trainable = {"params": params, "head": client_state["head"]}
    trained, _, stats = train_locally(trainable, data, key, self.local, self.fedrod_loss(counts),
                                      tx=optax.sgd(self.local.learning_rate))
    return {"head": trained["head"]}, trained["params"], stats

  def predict(self, server_state, client_state, x):
    out_g, out_p = self.generic_and_personal(server_state["params"], client_state["head"], x)
    return out_g + out_p

  def eval_views(self, server_state, client_state, data, key):
    del data, key
    return {"personal": functools.partial(self.predict, server_state, client_state),
            "global": functools.partial(self.model.apply, server_state["params"])}

  def feature_views(self, server_state, client_state):
    """Both views on the global model's features: the generic head plus the client's
    personal head, and the generic head alone."""
    del client_state
    params = server_state["params"]
    generic = lambda z: self.model.apply(params, z, method="classify")
    personal = lambda head, z: self.model.apply({"params": {"head": head}}, z,
                                                method="classify")
    return FeatureViews(
        features=lambda x: self.model.apply(params, x, method="features"),
        heads={"personal": lambda state, z: generic(z) + personal(state["head"], z),
               "global": lambda state, z: generic(z)})
