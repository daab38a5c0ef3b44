"""APFL: Adaptive Personalized Federated Learning.

Deng, Kamani, Mahdavi, arXiv:2003.13461, 2020.

Every client keeps a personal model ``v`` and a mixing weight ``α ∈ [0, 1]`` next to the
shared model ``w``; its personalized model is the mixture

    v̄ = α·v + (1 − α)·w.

A selected client receives the global ``w_g``, sets ``w = w_g`` and, on every mini-batch,
updates all three from the current iterates (the paper's Algorithm 1 with adaptive α):

    w ← w − lr·∇CE(w)
    v ← v − lr·∇_v CE(v̄) = v − lr·α·∇CE(v̄)
    α ← clip(α − lr·(⟨v − w, ∇CE(v̄)⟩ + 0.02·α), 0, 1)

``⟨v − w, ∇CE(v̄)⟩`` is ∂CE(v̄)/∂α summed over every parameter, and ``0.02·α`` the gradient of
the ``0.01·α²`` penalty of the authors' code (FedTorch's ``alpha_update``, copied by PFLlib).
One value-and-gradient of :meth:`APFL.apfl_loss` (``CE(w) + CE(α·v + (1 − α)·sg(w))``) gives
all three gradients, and :func:`apfl_sgd` applies them with the α penalty and the clip. The
client uploads ``w``; the server is FedAvg's sample-weighted average. ``v`` and ``α`` stay
with the client between rounds; ``v`` starts from the same initial parameters as ``w`` and
``α`` from ``alpha`` (PFLlib ``-al``, default 1.0).

Evaluation: the ``personal`` view (``test_acc``) is ``α·v + (1 − α)·w_g`` with the client's
``v``, ``α`` and the current global model (the paper's output ``α_i·v_i + (1 − α_i)·w``); the
``global`` view is ``w_g``.

Differences from PFLlib (``pfllib_compat=True`` reproduces PFLlib's client):

- PFLlib trains ``v`` on ``CE(v)``, its own cross-entropy, instead of the personalized
  model's loss, and approximates the α gradient by ``⟨v' − w', α·∇CE(v) + (1 − α)·∇CE(w)⟩ +
  0.02·α`` with the gradients taken before the step and the difference of the stepped
  models ``v'``, ``w'``. After its local epochs it overwrites ``v ← (1 − α)·w + α·v`` (the
  trained ``w``) and evaluates that ``v``. The paper keeps ``v`` and mixes only to predict.
- The updates on one batch are simultaneous (all three gradients at the batch's starting
  iterates, as in the paper); PFLlib steps ``w`` and ``v`` first and uses the stepped models
  in the α update, which ``pfllib_compat`` follows.
- The round's ``local_loss`` is ``CE(w) + CE(v̄)`` (``CE(w) + CE(v)`` with ``pfllib_compat``),
  the sum the step differentiates. With ``-ld`` both models' steps
  decay and α's keeps the undecayed rate, as PFLlib's (its α step reads
  ``self.learning_rate``).
- New clients (``-nnc``): PFLlib fine-tunes a copy of the global model but tests the new
  client's personal model, which it never trained (its initial weights, about chance
  accuracy: a reference bug). We test the fine-tuned global model; ``pfllib_compat=True``
  tests the initial weights as PFLlib does.
- The official code mixes the two models' outputs (``α·v(x) + (1 − α)·w(x)``) and updates α
  once per round; we follow the paper's parameter mixture and per-step α, as PFLlib's final
  mixing of parameters does.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from fedjax_lib.algorithms.base import check_bool, check_number, stack_clients
from fedjax_lib.algorithms.fedavg import FedAvg
from fedjax_lib.algorithms.registry import register
from fedjax_lib.core.local import train_locally

# Gradient coefficient of the α penalty 0.01·α² (FedTorch's and PFLlib's constant 0.02).
ALPHA_DECAY = 0.02


def mix(personal, shared, alpha):
  """``α·personal + (1 − α)·shared`` leaf by leaf (each leaf keeps its dtype)."""
  return jax.tree.map(lambda v, w: (alpha * v + (1.0 - alpha) * w).astype(v.dtype),
                      personal, shared)


def tree_vdot(a, b) -> jax.Array:
  """``Σ ⟨a, b⟩`` over every leaf, in float32."""
  dots = jax.tree.map(lambda x, y: jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32)),
                      a, b)
  return sum(jax.tree.leaves(dots), jnp.zeros((), jnp.float32))


def apfl_sgd(learning_rate, pfllib_compat: bool = False,
             alpha_learning_rate=None) -> optax.GradientTransformation:
  """SGD on ``{"global": w, "personal": v, "alpha": α}`` with APFL's α rule.

  ``w`` and ``v`` take plain SGD steps with their gradients. α moves by
  ``−lr·(g_α + 0.02·α)`` and is clipped to [0, 1], where ``g_α`` is the gradient of the loss
  in α (the paper's ``⟨v − w, ∇CE(v̄)⟩``) or, with ``pfllib_compat``, PFLlib's approximation
  ``⟨v' − w', α·g_v + (1 − α)·g_w⟩`` from the stepped models ``v' = v − lr·g_v``,
  ``w' = w − lr·g_w`` (the gradient in α is then ignored).

  Args:
    learning_rate: the step size of ``w`` and ``v`` (the client learning rate).
    pfllib_compat: use PFLlib's approximate α gradient.
    alpha_learning_rate: α's step size (None: ``learning_rate``; under ``-ld`` the undecayed
      rate, as PFLlib's α step reads ``self.learning_rate``).

  Returns:
    A stateless optax transform; its ``update`` needs ``params``.
  """
  def init(params):
    del params
    return optax.EmptyState()

  def update(grads, state, params):
    alpha = params["alpha"]
    step = lambda g: jax.tree.map(lambda x: -learning_rate * x, g)
    w_step, v_step = step(grads["global"]), step(grads["personal"])
    if pfllib_compat:
      stepped = lambda p, u: jax.tree.map(lambda a, b: a + b.astype(a.dtype), p, u)
      difference = jax.tree.map(jnp.subtract, stepped(params["personal"], v_step),
                                stepped(params["global"], w_step))
      grad_alpha = tree_vdot(difference, mix(grads["personal"], grads["global"], alpha))
    else:
      grad_alpha = grads["alpha"]
    grad_alpha = grad_alpha + ALPHA_DECAY * alpha
    alpha_rate = learning_rate if alpha_learning_rate is None else alpha_learning_rate
    new_alpha = jnp.clip(alpha - alpha_rate * grad_alpha, 0.0, 1.0)
    updates = {"global": w_step, "personal": v_step, "alpha": new_alpha - alpha}
    return updates, state

  return optax.GradientTransformation(init, update)


@register("APFL")
@dataclasses.dataclass(frozen=True)
class APFL(FedAvg):
  """FedAvg's shared model plus a personal model mixed in by a learned per-client α.

  Server state ``{"params": w}``; client state ``{"params": v, "alpha": α}`` stacked over all
  clients. ``server_update`` is FedAvg's (inherited).

  Attributes:
    alpha: initial mixing weight α of every client (PFLlib ``-al``), in [0, 1].
    pfllib_compat: train ``v`` and α as PFLlib does (see the module docstring).
  """
  # -ld: both optimizers; the α step keeps the undecayed rate
  DECAYED_RATES = ("local.learning_rate",)

  alpha: float = 1.0
  pfllib_compat: bool = False

  def __post_init__(self):
    check_number(self.name, "alpha", self.alpha, 0, 1)
    check_bool(self.name, "pfllib_compat", self.pfllib_compat)

  def init(self, key, sample_x, num_clients):
    params = self.init_params(key, sample_x)
    client = {"params": params, "alpha": jnp.asarray(self.alpha, jnp.float32)}
    return {"params": params}, stack_clients(client, num_clients)

  def apfl_loss(self, trainable, batch, key):
    """``CE(w) + CE(α·v + (1 − α)·sg(w))`` (``CE(w) + CE(v)`` with ``pfllib_compat``).

    Its gradient is ``∇CE(w)`` for ``w``, ``α·∇CE(v̄)`` for ``v`` and ``⟨v − w, ∇CE(v̄)⟩`` for
    α: the stop-gradient keeps the personalized loss from moving ``w``.
    """
    w, v = trainable["global"], trainable["personal"]
    shared = self.ce_loss(w, batch, key)
    if self.pfllib_compat:
      return shared + self.ce_loss(v, batch, key)
    personalized = mix(v, jax.lax.stop_gradient(w), trainable["alpha"])
    return shared + self.ce_loss(personalized, batch, key)

  def client_update(self, server_state, client_state, data, key):
    trainable = {"global": server_state["params"], "personal": client_state["params"],
                 "alpha": client_state["alpha"]}
    trained, _, stats = train_locally(
        trainable, data, key, self.local, self.apfl_loss,
        tx=apfl_sgd(self.local.learning_rate, self.pfllib_compat,
                    self.undecayed("local.learning_rate")))
    w, v, alpha = trained["global"], trained["personal"], trained["alpha"]
    if self.pfllib_compat:  # PFLlib keeps the mixture as the personal model
      v = mix(v, w, alpha)
    return {"params": v, "alpha": alpha}, w, dict(stats, alpha=alpha)

  def new_client_tested_variables(self, server_state, client_state, tuned):
    """``tuned`` (the fine-tuned global model); with ``pfllib_compat`` the new client's
    untrained personal model ``v`` (its initial weights), as PFLlib tests it."""
    del server_state
    return client_state["params"] if self.pfllib_compat else tuned

  def personalized_params(self, server_state, client_state):
    """The parameters a client is evaluated with: ``α·v + (1 − α)·w_g`` (``v`` with
    ``pfllib_compat``, which already holds PFLlib's mixture)."""
    if self.pfllib_compat:
      return client_state["params"]
    return mix(client_state["params"], server_state["params"], client_state["alpha"])

  def predict(self, server_state, client_state, x):
    """The personalized model's logits."""
    return self.model.apply(self.personalized_params(server_state, client_state), x)

  def eval_views(self, server_state, client_state, data, key):
    """The personalized model (``test_acc``, ``test_acc_personal``) and the global one."""
    del data, key
    return {"personal": functools.partial(self.model.apply,
                                          self.personalized_params(server_state, client_state)),
            "global": functools.partial(self.model.apply, server_state["params"])}
