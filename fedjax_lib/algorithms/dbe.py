"""FedDBE: Eliminating Domain Bias for Federated Learning in Representation Space.

Zhang, Hua, Cao, Wang, Song, Xue, Ma, Guan, NeurIPS 2023 (PFLlib ``-algo FedDBE``, alias ``DBE``).

FedAvg on the whole split model ``head(base(x))`` plus two pieces in the representation space
(``rep = base(x)``, a ``[D]`` feature vector per sample):

- **PRBM** (personalized representation bias memory): a per-client vector ``b`` of shape
  ``[D]``, zeros at the start, added to the representation before the head,
  ``logits = head(rep + b)``. It is trained together with the model by plain SGD at the same
  learning rate, persists on the client across rounds and is never uploaded.
- **MR** (mean regularization): a running mean of the representations,
  ``rm ← (1 − m)·rm + m·mean_batch(rep)`` over the local mini-batches, reset to zero at the
  start of every local training, is pulled toward a fixed global mean ``ḡ`` with
  ``kl_weight · mean(½·(rm − ḡ)²)``. The gradient flows through the current batch's
  contribution only: the carried ``rm`` is detached after every step.

Procedure (PFLlib's ``serverdbe.py`` / ``clientdbe.py``):

1. Initialisation period, once before round 0 (the engine's warm-up hook): every client trains a
   copy of the initial global model for ``local_epochs`` epochs on ``CE(head(rep))`` (no PRBM,
   no MR) while tracking ``rm`` (:meth:`FedDBE.warmup_client`); the server sets
   ``ḡ = Σ_i n_i·rm_i / Σ_i n_i`` over all clients (:meth:`FedDBE.warmup_server`). The warm-up
   training itself is discarded: round 0 sends the untrained initial global model.
2. Each round, a selected client trains ``{"params": w, "bias": b}`` from the received global
   model and its own PRBM on ``CE(head(rep + b), y) + kl_weight·mean(½·(rm − ḡ)²)``, uploads
   ``w`` and keeps ``b``; the server takes FedAvg's sample-weighted average of the models.
   ``ḡ`` never changes after the initialisation period.

State: server ``{"params": global model variables, "global_mean": ḡ [D]}``; client
``{"bias": b [D]}`` stacked over all clients.

Hyperparameters (PFLlib defaults and flags):

- ``momentum`` (``-mo``, default 0.1): the EMA momentum ``m`` of the running mean, in [0, 1].
- ``kl_weight`` (``-klw``, default 0.0): the MR weight, >= 0. With the default 0 the MR term is
  left out of the loss entirely and only the PRBM remains active (PFLlib's companion repo uses
  ``-mo 1 -klw 50``).

Evaluation views:

- ``personal`` (first, so also ``test_acc``/``test_auc``/``train_loss``): ``head(base(x) + b)``
  with the global model and the client's PRBM — PFLlib's ``test_metrics``/``train_metrics``.
- ``global``: the global model alone, ``head(base(x))``, without any PRBM.

Differences from PFLlib:

- PFLlib keeps two SGD optimizers (model and PRBM, same learning rate); here one plain SGD step
  updates the pytree ``{"params", "bias"}`` — the same update. (PFLlib's ``-ld`` decays only the
  model's learning rate, and its start-up training counts as the first step: with ``-ld`` the
  PRBM keeps the undecayed rate and round r's model rate is lr·γ^(k+1), as PFLlib's.)
- The extra ``global`` view (``test_acc_global``) is not in PFLlib, which evaluates only
  ``head(rep + b)``.
- New-client evaluation (``-nnc``) is not supported by PFLlib for FedDBE. Here a new client
  starts from the global model with a zero PRBM, i.e. exactly the global model, and is
  fine-tuned with cross-entropy like every other algorithm (no PRBM is fine-tuned).
- The reported ``local_loss`` includes the MR term (``kl_weight``·reg); the evaluated
  ``train_loss`` is cross-entropy with the PRBM, as PFLlib's ``train_metrics``.
- ``global_mean`` is a zero vector until the initialisation period has run (PFLlib: ``None``);
  the engine always runs it before round 0. PFLlib's unused ``num_batches_tracked`` is not kept.
- Library-wide: the DNN's base emits ReLU features, not PFLlib's ``log_softmax`` of them (see
  `fedjax_lib.models.mlp`), so the PRBM and the running mean live in that feature space;
  ``--pfllib-compat`` gives PFLlib's.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from fedjax_lib.algorithms.base import (FeatureViews, SettingsContext, check_number,
                                        known_zero, linear_server, stack_clients)
from fedjax_lib.algorithms.fedavg import FedAvg
from fedjax_lib.algorithms.registry import register
from fedjax_lib.core.aggregate import weighted_average
from fedjax_lib.core.local import Batch, masked_cross_entropy, sgd_by_part, train_locally


# ---------------------------------------------------------------- pure pieces
def batch_feature_mean(rep: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of the representations ``rep [B, ...]`` over the samples with ``mask == 1``.

  Returns zeros when no sample is valid.
  """
  m = mask.astype(rep.dtype).reshape(mask.shape + (1,) * (rep.ndim - 1))
  return (rep * m).sum(axis=0) / jnp.maximum(m.sum(), 1.0)


def ema_update(running_mean: jax.Array, batch_mean: jax.Array, momentum: float) -> jax.Array:
  """One step of the running mean: ``(1 − m)·running_mean + m·batch_mean``."""
  return (1.0 - momentum) * running_mean + momentum * batch_mean


def mean_regularization(running_mean: jax.Array, global_mean: jax.Array) -> jax.Array:
  """The MR term ``mean(½·(running_mean − global_mean)²)``; ``global_mean`` is a constant.

  Its gradient w.r.t. ``running_mean`` is ``(running_mean − global_mean) / D`` with ``D`` the
  number of elements.
  """
  diff = running_mean - jax.lax.stop_gradient(global_mean)
  return jnp.mean(0.5 * jnp.square(diff))


def biased_logits(model, params, bias: Optional[jax.Array], x: jax.Array) -> jax.Array:
  """``head(base(x) + bias)`` (``head(base(x))`` when ``bias`` is None)."""
  rep = model.apply(params, x, method="features")
  if bias is not None:
    rep = rep + bias
  return model.apply(params, rep, method="classify")


def dbe_loss(model, trainable, batch: Batch, running_mean: jax.Array, momentum: float,
             global_mean: Optional[jax.Array] = None, kl_weight: float = 0.0):
  """One step's FedDBE loss and the updated running mean.

  Args:
    model: the `BaseHeadModel`.
    trainable: ``{"params": variables}`` (initialisation period: no PRBM) or
      ``{"params": variables, "bias": b}`` (regular rounds).
    batch: the mini-batch (losses and the batch mean use ``batch.mask``).
    running_mean: the carried running mean (no gradient flows into it).
    momentum: the EMA momentum ``m``.
    global_mean: ``ḡ``; None (initialisation period) or ``kl_weight == 0`` leaves the MR term
      out of the loss entirely.
    kl_weight: the MR weight.

  Returns:
    ``(loss, new_running_mean)`` with ``loss = CE(head(rep [+ b]), y) [+ kl_weight·MR]`` and
    ``new_running_mean = (1 − m)·running_mean + m·mean_batch(rep)``.
  """
  params = trainable["params"]
  rep = model.apply(params, batch.x, method="features")
  new_running_mean = ema_update(jax.lax.stop_gradient(running_mean),
                                batch_feature_mean(rep, batch.mask), momentum)
  bias = trainable.get("bias")
  logits = model.apply(params, rep if bias is None else rep + bias, method="classify")
  loss = masked_cross_entropy(logits, batch.y, batch.mask)
  if global_mean is not None and not known_zero(kl_weight):
    loss = loss + kl_weight * mean_regularization(new_running_mean, global_mean)
  return loss, new_running_mean


# ---------------------------------------------------------------- the algorithm
@register("FedDBE", "DBE")
@dataclasses.dataclass(frozen=True)
class FedDBE(FedAvg):
  """FedAvg plus a per-client representation bias (PRBM) and mean regularization (MR).

  Server state ``{"params", "global_mean"}``; client state ``{"bias"}`` stacked over clients.

  Attributes:
    momentum: EMA momentum of the running mean of representations (PFLlib ``-mo``).
    kl_weight: weight of the mean regularization (PFLlib ``-klw``).
  """

  REFERENCE_SPLIT = True  # PFLlib's main.py wraps the model in BaseHeadSplit
  # -ld: the model optimizer; the PRBM keeps the undecayed rate
  DECAYED_RATES = ("local.learning_rate",)
  LR_DECAY_START = 1  # -ld: PFLlib's start-up period calls train(), stepping the scheduler

  momentum: float = 0.1
  kl_weight: float = 0.0


  def __post_init__(self):
    check_number(self.name, "momentum", self.momentum, 0, 1)
    check_number(self.name, "kl_weight", self.kl_weight)

  def check_settings(self, context: SettingsContext) -> list[str]:
    """Warns when ``momentum = 0`` silences a non-zero ``kl_weight``."""
    del context
    if self.momentum == 0 and self.kl_weight != 0:
      return [f"{self.name} hyperparameter momentum=0 keeps the running mean of the "
              f"representations at 0 (and the global mean with it), so the mean "
              f"regularization kl_weight={self.kl_weight} has no effect; use momentum > 0 "
              "(-mo)"]
    return []

  def _zero_features(self, params, sample_x):
    rep = jax.eval_shape(lambda p, x: self.model.apply(p, x, method="features"), params,
                         sample_x[None])
    return jnp.zeros(rep.shape[1:], rep.dtype)

  def init(self, key, sample_x, num_clients):
    params = self.init_params(key, sample_x)
    zeros = self._zero_features(params, sample_x)
    return ({"params": params, "global_mean": zeros},
            stack_clients({"bias": zeros}, num_clients))

  # ---------------------------------------------------------------- initialisation period
  def warmup_client(self, server_state, client_state, data, key):
    """Trains a copy of the global model on ``CE(head(rep))`` and returns its running mean.

    The PRBM is neither used nor trained; the trained model is discarded.
    """
    zeros = jnp.zeros_like(server_state["global_mean"])
    loss_fn = lambda trainable, batch, step_key, rm: dbe_loss(
        self.model, trainable, batch, rm, self.momentum)
    _, _, stats = train_locally({"params": server_state["params"]}, data, key, self.local,
                                loss_fn, aux=zeros)
    return client_state, stats["aux"]

  def warmup_server(self, server_state, uploads, weights, key):
    """``global_mean`` = the sample-weighted average of the running means; params unchanged."""
    del key
    global_mean = weighted_average(uploads, weights, fallback=server_state["global_mean"])
    return {"params": server_state["params"], "global_mean": global_mean}

  # ---------------------------------------------------------------- rounds
  def client_update(self, server_state, client_state, data, key):
    global_mean = server_state["global_mean"]
    loss_fn = lambda trainable, batch, step_key, rm: dbe_loss(
        self.model, trainable, batch, rm, self.momentum, global_mean, self.kl_weight)
    trainable = {"params": server_state["params"], "bias": client_state["bias"]}
    # -ld: PFLlib's PRBM optimizer has no scheduler, so the bias keeps the undecayed rate.
    tx = (sgd_by_part(self.local.learning_rate, {"bias": self.undecayed("local.learning_rate")})
          if self.is_decayed() else None)
    trained, _, stats = train_locally(trainable, data, key, self.local, loss_fn,
                                      aux=jnp.zeros_like(global_mean), tx=tx)
    metrics = {k: v for k, v in stats.items() if k != "aux"}
    return {"bias": trained["bias"]}, trained["params"], metrics

  @linear_server
  def server_update(self, server_state, uploads, weights, key):
    del key
    params = weighted_average(uploads, weights, fallback=server_state["params"])
    return {"params": params, "global_mean": server_state["global_mean"]}

  # ---------------------------------------------------------------- evaluation
  def predict(self, server_state, client_state, x):
    """The personalized logits ``head(base(x) + b)``."""
    return biased_logits(self.model, server_state["params"], client_state["bias"], x)

  def predict_global(self, server_state, client_state, x):
    """The global model's logits ``head(base(x))`` (no PRBM)."""
    del client_state
    return biased_logits(self.model, server_state["params"], None, x)

  def eval_views(self, server_state, client_state, data, key):
    """``personal`` (global model + PRBM; ``test_acc``) and ``global`` (no PRBM)."""
    del data, key
    return {"personal": functools.partial(self.predict, server_state, client_state),
            "global": functools.partial(self.predict_global, server_state, client_state)}

  def feature_views(self, server_state, client_state):
    """Both views on the global model's features: its head after the client's PRBM bias,
    and without it (as :func:`biased_logits`)."""
    del client_state
    params = server_state["params"]
    classify = lambda z: self.model.apply(params, z, method="classify")
    return FeatureViews(
        features=lambda x: self.model.apply(params, x, method="features"),
        heads={"personal": lambda state, z: classify(z + state["bias"]),
               "global": lambda state, z: classify(z)})

  def new_client_variables(self, server_state, client_state):
    """The global model: a new client has a zero PRBM (PFLlib does not support this)."""
    del client_state
    return server_state["params"]
