"""pFedMe: Personalized Federated Learning with Moreau Envelopes.

T. Dinh, Tran, Nguyen, NeurIPS 2020.

Each client minimises the Moreau envelope of its loss,
``F(w) = min_θ CE(θ) + (λ/2)·‖θ − w‖²``, whose gradient is ``λ·(w − θ̂(w))`` with ``θ̂`` the
personalized model that attains the minimum. A selected client sets ``w`` and ``θ`` to the
received global model and, on every mini-batch,

1. approximates ``θ̂`` with ``K`` gradient steps on the batch, warm-started from the previous
   batch's ``θ``:  ``θ ← θ − lr_p·(∇CE(θ) + λ·(θ − w) + μ·θ)``  (:func:`inner_steps`; μ is a
   small weight decay, 0.001 as in PFLlib's ``pFedMeOptimizer``), then
2. takes one step on the envelope:  ``w ← w − lr·λ·(w − θ)``.

The client uploads ``w`` and keeps its last ``θ``. The server averages the uploads by sample
count and moves the global model by β:

    w_g ← (1 − β)·w_g + β·Σ_k n_k w_k / Σ_k n_k

(β = 1 is FedAvg of the ``w``; β > 1 extrapolates). The server uses the uploads only through
their weighted mean, so it is marked :func:`linear_server`. A client is evaluated with its
personalized ``θ`` (the ``personal`` view, ``test_acc``); the ``global`` view is ``w_g``.

Hyperparameters (PFLlib's flags and defaults): ``lam`` λ (``-lam``, 1.0), ``K`` (``-K``, 5),
``p_learning_rate`` lr_p (``-lrp``, 0.01), ``beta`` β (``-bt``), ``weight_decay`` μ (0.001,
not a flag in PFLlib) and ``pfllib_compat``. The paper uses λ = 15, β = 1 or 2 and K = 5;
the PFLlib maintainer suggests ``-lrp 0.01 -bt 3 -lam 15`` at PFLlib's learning rate 0.005.

Differences from PFLlib:

- ``beta`` defaults to 1.0, not PFLlib's 0.0: with β = 0 the global model never leaves its
  initialisation, so PFLlib's default trains nothing that is shared (every round starts
  from the initial weights). ``-bt 0`` is still accepted, with a warning.
- PFLlib's "personalized" evaluation tests the β-mixed global model: the personalized
  parameters its optimizer returns are the client model's own tensors, which hold the
  received global weights by the time they are tested. We test the client's ``θ``, the
  paper's personalized model; ``pfllib_compat=True`` tests the global model (a client that
  never trained in PFLlib tests its initial weights, which equal the initial global model).
  (The authors' code has the same aliasing but tests right after local training, so it
  reports each client's local ``w``.)
- Only the selected clients train (as PFLlib; the authors' code trains every client each
  round), so an unselected client's ``θ`` is the one from its last training.
- The round's ``local_loss`` is the envelope objective on each batch, ``CE(θ)`` at the last
  inner step plus ``(λ/2)·‖θ − w‖²``; PFLlib reports ``CE + (λ/2)·‖θ − w‖₂`` (the norm) of its
  evaluated model.
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from fedjax_lib.algorithms.base import (SettingsContext, check_bool, check_int, check_number,
                                        linear_server, stack_clients)
from fedjax_lib.algorithms.fedavg import FedAvg
from fedjax_lib.algorithms.fedprox import proximal_term
from fedjax_lib.algorithms.registry import register
from fedjax_lib.core.aggregate import weighted_average
from fedjax_lib.core.local import train_locally


def inner_steps(loss_fn, theta, anchor, batch, key, steps: int, learning_rate, lam,
                weight_decay):
  """``steps`` steps ``θ ← θ − lr_p·(∇loss(θ) + λ·(θ − w) + μ·θ)`` on one batch.

  Args:
    loss_fn: ``loss_fn(params, batch, key)``; step ``k`` gets ``fold_in(key, k)``.
    theta: the starting personalized parameters.
    anchor: the local model ``w`` (a constant here).
    batch: the mini-batch.
    key: the batch's key.
    steps: K, a Python int.
    learning_rate, lam, weight_decay: lr_p, λ and μ.

  Returns:
    ``(θ_K, loss)``: the final parameters and ``loss_fn`` at the last step's starting point.
  """
  anchor = jax.lax.stop_gradient(anchor)
  grad_fn = jax.value_and_grad(loss_fn)

  def step(k, carry):
    theta, _ = carry
    loss, grads = grad_fn(theta, batch, jax.random.fold_in(key, k))
    theta = jax.tree.map(
        lambda t, g, w: (t - learning_rate * (g + lam * (t - w) + weight_decay * t)).astype(
            t.dtype), theta, grads, anchor)
    return theta, loss.astype(jax.numpy.float32)

  return jax.lax.fori_loop(0, steps, step, (theta, jax.numpy.zeros((), jax.numpy.float32)))


@register("pFedMe")
@dataclasses.dataclass(frozen=True)
class PFedMe(FedAvg):
  """Local models trained on their Moreau envelopes; personalized models θ per client.

  Server state ``{"params": w_g}``; client state ``{"theta": θ}`` stacked over all clients.

  Attributes:
    lam: λ, the envelope's pull between θ and w (PFLlib ``-lam``).
    K: inner steps per batch (PFLlib ``-K``).
    p_learning_rate: lr_p, the inner step size (PFLlib ``-lrp``).
    beta: β, the server's step toward the uploads' average (PFLlib ``-bt``; 1.0 here, 0.0
      in PFLlib: see the module docstring).
    weight_decay: μ of the inner steps (PFLlib's hard-coded 0.001).
    pfllib_compat: evaluate the global model as PFLlib's "personalized" evaluation does.
  """
  DECAYED_RATES = ("p_learning_rate",)  # -ld: pFedMeOptimizer; the w step reads the undecayed lr

  lam: float = 1.0
  K: int = 5
  p_learning_rate: float = 0.01
  beta: float = 1.0
  weight_decay: float = 0.001
  pfllib_compat: bool = False

  def __post_init__(self):
    check_number(self.name, "lam", self.lam, finite=True)
    check_int(self.name, "K", self.K, 1)
    check_number(self.name, "p_learning_rate", self.p_learning_rate, finite=True)
    check_number(self.name, "beta", self.beta, finite=True)
    check_number(self.name, "weight_decay", self.weight_decay, finite=True)
    check_bool(self.name, "pfllib_compat", self.pfllib_compat)

  def check_settings(self, context: SettingsContext) -> list[str]:
    """Warns about β = 0 (a frozen global model) and an overshooting envelope step."""
    del context
    warnings = []
    if self.beta == 0:
      warnings.append(f"{self.name} beta=0.0 (PFLlib's default -bt) keeps the global model at "
                      "its initialisation, so every round restarts from it; set beta > 0 "
                      "(-bt 1 is FedAvg of the local models, the paper uses 1 or 2)")
    step = self.lam * self.local.learning_rate
    if step > 1:
      warnings.append(f"{self.name} lam*learning_rate = {self.lam:g}*{self.local.learning_rate:g}"
                      f" = {step:g} > 1: the local step w <- w - lam*lr*(w - theta) overshoots "
                      "theta (and diverges above 2); lower lam (-lam) or the learning rate (-lr)")
    return warnings

  def init(self, key, sample_x, num_clients):
    params = self.init_params(key, sample_x)
    return {"params": params}, {"theta": stack_clients(params, num_clients)}

  def envelope_loss(self, w, batch, key, theta):
    """The loss :func:`train_locally` runs with ``θ`` as its carry: the K inner steps give
    ``θ_K`` (from ``θ``, toward the constant ``w``), and the value ``CE + λ·½‖w − sg(θ_K)‖²``
    has the gradient ``λ·(w − θ_K)`` in ``w``, so its SGD step at ``lr`` is pFedMe's local
    update. Returns ``(value, θ_K)``."""
    theta, ce = inner_steps(self.ce_loss, theta, w, batch, key, self.K, self.p_learning_rate,
                            self.lam, self.weight_decay)
    return ce + self.lam * proximal_term(w, theta), theta

  def client_update(self, server_state, client_state, data, key):
    del client_state  # θ restarts from the received model every round, as w does
    params = server_state["params"]
    w, _, stats = train_locally(params, data, key, self.local, self.envelope_loss, aux=params)
    theta = stats.pop("aux")
    return {"theta": theta}, w, stats

  @linear_server
  def server_update(self, server_state, uploads, weights, key):
    """``(1 − β)·w_g + β·(sample-weighted average of the uploads)``; no uploads: ``w_g``."""
    del key
    previous = server_state["params"]
    average = weighted_average(uploads, weights, fallback=previous)
    # w_g + β·(avg − w_g): the same as (1 − β)·w_g + β·avg, and exactly w_g without uploads.
    return {"params": jax.tree.map(
        lambda p, a: (p + self.beta * (a - p)).astype(p.dtype), previous, average)}

  def personalized_params(self, server_state, client_state):
    """``θ`` (the global model with ``pfllib_compat``)."""
    return server_state["params"] if self.pfllib_compat else client_state["theta"]

  def predict(self, server_state, client_state, x):
    """The personalized model's logits."""
    return self.model.apply(self.personalized_params(server_state, client_state), x)

  def eval_views(self, server_state, client_state, data, key):
    """The personalized model (``test_acc``, ``test_acc_personal``) and the global one."""
    del data, key
    return {"personal": functools.partial(self.predict, server_state, client_state),
            "global": functools.partial(self.model.apply, server_state["params"])}
