"""Per-FedAvg: Personalized Federated Learning with Theoretical Guarantees: A Model-Agnostic
Meta-Learning Approach.

Fallah, Mokhtari, Ozdaglar, NeurIPS 2020. First-order variant (Per-FedAvg (FO)), as in PFLlib's
``-algo PerAvg``.

The global model ``w`` is meta-trained so that ONE local SGD step personalises it well. A
selected client walks over its training data in batches of ``2B`` (drop_last); each batch is
split into halves ``D1`` (the first B samples) and ``D2`` (the next B) and gives one
meta-update

    w' = w − α·∇L(w; D1)                (the adaptation step, α = the local learning rate)
    w  ← w − β·∇L(w'; D2)               (first order: the gradient at w' is applied to w)

:func:`first_order_maml_loss` is a loss whose gradient w.r.t. ``w`` is exactly ``∇L(w'; D2)``
(the adaptation step is taken through ``stop_gradient``), so the shared local-training routine
runs the meta-updates with plain SGD at step β. PFLlib calls the client's ``train`` twice per
round (to match the data volume of other methods); here that is ``2·local_epochs`` epochs in one
call. The server is FedAvg's sample-weighted average.

Evaluation (PFLlib's ``evaluate_one_step``): every client takes the global model, makes ONE SGD
step at α on one random training batch of B samples and is tested with the result — the
``personal`` view (``test_acc``); the ``global`` view is the global model without adaptation.

Hyperparameters: ``beta`` — the meta step β (PFLlib ``-bt``); ``None`` (the default) means β = the
local learning rate α.

Differences from PFLlib:

- PFLlib ignores ``-bt`` for Per-FedAvg (the line reading it is commented out), so its β always
  equals the learning rate. Here ``-bt`` sets β when given; leaving it unset reproduces PFLlib.
  (``pfllib_compat`` is not needed.)
- PFLlib's reported train loss is the loss after a step-1 update on the second half-batch; here
  ``train_loss`` is the cross-entropy of the evaluated (adapted) model on the training split.
- The evaluation's adaptation batch is drawn from the evaluation key (PFLlib: the first batch of
  a freshly shuffled loader).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lib.algorithms.base import SettingsContext
from fedjax_lib.algorithms.fedavg import FedAvg
from fedjax_lib.algorithms.registry import register
from fedjax_lib.core.local import Batch, ClientData, train_locally
from fedjax_lib.errors import ConfigError


def sgd_step(params, grads, lr: float):
  """``params − lr·grads`` leaf by leaf."""
  return jax.tree.map(lambda p, g: p - lr * g.astype(p.dtype), params, grads)


def first_order_maml_loss(loss_fn, alpha: float):
  """A loss over batches of 2B whose gradient is the first-order MAML meta-gradient.

  Args:
    loss_fn: ``loss_fn(params, batch, key)`` averaging over ``batch.mask``.
    alpha: the adaptation step size α.

  Returns:
    ``loss(params, batch, key) = loss_fn(params − α·sg(∇loss_fn(params; D1)); D2)`` where D1 /
    D2 are the first and second halves of ``batch``. Its gradient w.r.t. ``params`` equals
    ``∇loss_fn`` evaluated at the adapted parameters on D2.
  """
  def loss(params, batch: Batch, key):
    half = batch.x.shape[0] // 2
    first = Batch(batch.x[:half], batch.y[:half], batch.mask[:half])
    second = Batch(batch.x[half:], batch.y[half:], batch.mask[half:])
    k1, k2 = jax.random.split(key)
    inner = jax.lax.stop_gradient(jax.grad(loss_fn)(params, first, k1))
    return loss_fn(sgd_step(params, inner, alpha), second, k2)
  return loss


def adaptation_batch(data: ClientData, key: jax.Array, batch_size: int) -> Batch:
  """``batch_size`` distinct random training samples of one client (fewer are masked)."""
  width = data.train_idx.shape[0]
  scores = jnp.where(jnp.arange(width) < data.train_count,
                     jax.random.uniform(key, (width,)), 2.0)
  positions = jnp.argsort(scores)[:batch_size]
  if positions.shape[0] < batch_size:  # clients are narrower than a batch: pad with masks
    positions = jnp.pad(positions, (0, batch_size - positions.shape[0]))
  mask = (jnp.arange(batch_size) < jnp.minimum(data.train_count, width)).astype(jnp.float32)
  rows = data.train_idx[positions]
  return Batch(data.x[rows], data.y[rows], mask)


@register("PerAvg", "Per-FedAvg", "PerFedAvg")
@dataclasses.dataclass(frozen=True)
class PerAvg(FedAvg):
  """First-order Per-FedAvg; evaluated after one adaptation step.

  Attributes:
    beta: meta step size β (PFLlib ``-bt``); None = the local learning rate.
  """

  beta: Optional[float] = None

  def __post_init__(self):
    if self.beta is not None and (isinstance(self.beta, bool)
                                  or not isinstance(self.beta, (int, float))
                                  or not self.beta > 0):
      raise ConfigError(f"{self.name} hyperparameter beta={self.beta!r} must be a number > 0 "
                        "(or unset: beta = the learning rate)")
    if self.local.steps_per_epoch < 2:
      raise ConfigError(
          f"{self.name} trains on batches of 2*batch_size = {2 * self.local.batch_size} "
          "samples, but no client has that many training samples; use a smaller batch_size")

  def check_settings(self, context: SettingsContext) -> list[str]:
    """Warns about clients too small for one meta-batch of ``2·batch_size`` samples."""
    counts = np.asarray(context.train_counts)
    meta_batch = 2 * self.local.batch_size
    small = int((counts < meta_batch).sum())
    if not small:
      return []
    return [f"{self.name} takes meta-steps on 2*batch_size = {meta_batch} samples: {small} of "
            f"{counts.size} clients have fewer training samples and never train (the smallest "
            f"has {int(counts.min())}); use a smaller batch_size or fewer clients"]

  @property
  def meta_step(self) -> float:
    return self.local.learning_rate if self.beta is None else self.beta

  def meta_spec(self):
    """Batches of 2B, and twice the epochs (PFLlib trains twice per round)."""
    return dataclasses.replace(self.local, batch_size=2 * self.local.batch_size,
                               steps_per_epoch=self.local.steps_per_epoch // 2,
                               local_epochs=2 * self.local.local_epochs)

  def client_update(self, server_state, client_state, data, key):
    loss = first_order_maml_loss(self.ce_loss, self.local.learning_rate)
    params, _, stats = train_locally(server_state["params"], data, key, self.meta_spec(), loss,
                                     tx=optax.sgd(self.meta_step))
    return client_state, params, stats

  def adapt(self, params, data: ClientData, key):
    """One SGD step at α on one random training batch of B samples."""
    batch = adaptation_batch(data, key, self.local.batch_size)
    grads = jax.grad(self.ce_loss)(params, batch, key)
    return sgd_step(params, grads, self.local.learning_rate)

  def eval_views(self, server_state, client_state, data, key):
    adapted = self.adapt(server_state["params"], data, key)
    return {"personal": functools.partial(self.model.apply, adapted),
            "global": functools.partial(self.model.apply, server_state["params"])}

