"""FML: Federated Mutual Learning.

Shen et al., arXiv:2006.16765, 2020. HtFLlib's ``-algo FML``.

Every client keeps a **private model** (its own architecture) and trains it together with a
copy of one **shared model** ("meme" model; the same architecture for every client: HtFLlib's
``global_model``, architecture 0 of the family) by deep mutual learning. Per batch, with
``p = softmax(out)`` of the private model and ``p_g = softmax(out_g)`` of the shared one:

    L_private = α·CE(out, y) + (1 − α)·KL(p_g ‖ p)
    L_shared  = β·CE(out_g, y) + (1 − β)·KL(p ‖ p_g)
    KL(q ‖ p) = 1/(B·C) · Σ_b Σ_c q_bc (log q_bc − log p_bc)

(PyTorch's ``nn.KLDivLoss()`` with its default reduction ``'mean'``: divided by B·C, not B;
`fedjax_lib.core.local.kl_div_mean`). Each model's gradient is clipped to global norm 10
and both take a plain SGD step at the client learning rate. The client uploads its shared model; the server
replaces the shared model with the **uniform** mean of the uploads (1/#clients that trained,
not sample-weighted, as HtFLlib's server does), which every client loads at the start of its
next round. Clients are evaluated with their private model. Communication per round: the
whole shared model up and down (FedAvgCNN on 32×32×3 with C = 10: 878,538 floats).

The shared model, its running statistics and the private evaluation are
`fedjax_lib.algorithms.shared_model`'s (architecture 0's model, or the family's global model,
for every group, as HtFLlib does).

Differences from HtFLlib (``clientfml.py``/``serverfml.py``):

- **The peer's prediction is detached** (deep mutual learning's intent: each model learns
  from the other's current prediction as a fixed target, so ``L_private`` trains only the
  private model and ``L_shared`` only the shared one). HtFLlib backpropagates both losses
  through both targets, so each model also gets the gradient of the other's KL term;
  ``pfllib_compat=True`` (``--pfllib-compat``) restores that. In both modes the two models
  are updated simultaneously from the same batch (DML updates them in turn).
- HtFLlib's ``-al``/``--alpha`` is the hyperparameter ``alpha`` (on this CLI ``-al``,
  ``--algo-alpha``; ``--alpha`` is the Dirichlet partition's).
- The shared model's BatchNorm running statistics stay on each client (HtFLlib averages
  ``parameters()`` only, so its clients reload the server's never-updated buffers); the
  evaluation uses the private model only, so this touches training in neither version.
- ``train_loss`` is the private model's cross-entropy (HtFLlib: its whole loss
  ``α·CE + (1 − α)·KL``).
- New-client evaluation (``-nnc``, not in HtFLlib) fine-tunes a freshly initialised private
  model on cross-entropy.
"""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import optax

from fedjax_lib.algorithms.base import check_bool, check_number, stack_clients
from fedjax_lib.algorithms.registry import register
from fedjax_lib.algorithms.shared_model import SharedModelAlgorithm
from fedjax_lib.core.aggregate import uniform_average
from fedjax_lib.core.local import (clip_each, kl_div_mean, masked_cross_entropy,
                                   train_locally)
from fedjax_lib.models.base import apply_train, model_state

CLIP_NORM = 10.0  # HtFLlib's clip_grad_norm_ on each model


def mutual_learning_loss(out: jax.Array, out_shared: jax.Array, labels: jax.Array,
                         mask: jax.Array, alpha, beta, detach: bool = True) -> jax.Array:
  """``L_private + L_shared`` of one batch (module docstring).

  With ``detach`` each KL target (the peer's probabilities) is a constant, so the gradient
  of the sum w.r.t. each model's logits is that of its own loss; without it (HtFLlib) each
  model's logits also get the gradient of the peer's KL term.
  """
  out, out_shared = out.astype(jnp.float32), out_shared.astype(jnp.float32)
  log_p, log_p_shared = jax.nn.log_softmax(out), jax.nn.log_softmax(out_shared)
  target = (lambda a: jax.lax.stop_gradient(a)) if detach else (lambda a: a)
  private = (alpha * masked_cross_entropy(out, labels, mask)
             + (1.0 - alpha) * kl_div_mean(log_p, target(log_p_shared), mask))
  shared = (beta * masked_cross_entropy(out_shared, labels, mask)
            + (1.0 - beta) * kl_div_mean(log_p_shared, target(log_p), mask))
  return private + shared


@register("FML")
@dataclasses.dataclass(frozen=True)
class FML(SharedModelAlgorithm):
  """Private models and one shared model trained by mutual learning on every client.

  Attributes:
    alpha: α, the private model's cross-entropy weight (HtFLlib ``-al``; 1.0,
      total.sh 0.5); 1 − α weighs its KL to the shared model.
    beta: β, the shared model's cross-entropy weight (``-bt``; 1.0, total.sh 0.5).
    pfllib_compat: backpropagate through the KL targets as HtFLlib does.
    shared_model: the shared model (None: ``model``, see the module docstring).
  """

  REFERENCE_SPLIT = True  # HtFLlib's main.py wraps the model in BaseHeadSplit

  alpha: float = 1.0
  beta: float = 1.0
  pfllib_compat: bool = False

  TRAIN_MODE = True

  def __post_init__(self):
    for name in ("alpha", "beta"):
      check_number(self.name, name, getattr(self, name), 0.0, 1.0)
    check_bool(self.name, "pfllib_compat", self.pfllib_compat)
    super().__post_init__()

  def init(self, key, sample_x, num_clients):
    client, shared = self.init_private_and_shared(key, sample_x)
    return {"shared": shared}, stack_clients(client, num_clients)

  # ------------------------------------------------------------------ client
  def client_update(self, server_state, client_state, data, key):
    private = client_state["private"]
    shared = self.shared_variables(server_state, client_state)
    alpha, beta, detach = self.alpha, self.beta, not self.pfllib_compat

    def loss_fn(params, batch, step_key, states):
      private_state, shared_state = states
      (_, out), private_state = apply_train(
          self.model, {"params": params["private"], **private_state}, batch.x, step_key)
      (_, out_shared), shared_state = apply_train(
          self.shared_model, {"params": params["shared"], **shared_state}, batch.x,
          jax.random.fold_in(step_key, 1))
      loss = mutual_learning_loss(out, out_shared, batch.y, batch.mask, alpha, beta, detach)
      return loss, (private_state, shared_state)

    params = {"private": private["params"], "shared": shared["params"]}
    params, _, stats = train_locally(
        params, data, key, self.local, loss_fn,
        tx=clip_each(dict.fromkeys(("private", "shared"), optax.sgd(self.local.learning_rate)),
                     CLIP_NORM),
        aux=(model_state(private), model_state(shared)))
    private_state, shared_state = stats.pop("aux")
    new_state = self.trained_client_state(client_state, params["private"], private_state,
                                          shared_state)
    return new_state, params["shared"], stats

  # ------------------------------------------------------------------ server
  def server_update(self, server_state, uploads, weights, key):
    """The uniform mean of the uploaded shared models (not marked linear: the weights only
    say who trained)."""
    del key
    return {"shared": uniform_average(uploads, weights, server_state["shared"])}
