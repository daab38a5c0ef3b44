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
  paper's personalized model; ``pfllib_compat=True`` tests the global model, and reproduces
  what PFLlib does with a client that has not trained yet (``-jr < 1``): its personalized
  parameters are still the copy of the initial weights it was built with, so it tests the
  *initial* model, and the evaluation copies them into its model, so in the first round it
  trains, if that round was evaluated (``r % eval_gap == 0``), its ``θ`` starts from the
  initial weights (``w`` from the global model). With ``-jr 1`` every client trains in round
  0, when both are the initial model, so nothing differs. (The authors' code has the same
  aliasing but tests right after local training, so it reports each client's local ``w``.)
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
import jax.numpy as jnp

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


def tree_where(flag, on_true, on_false):
  """``on_true`` where the scalar ``flag`` holds, else ``on_false`` (leaf by leaf)."""
  return jax.tree.map(lambda a, b: jnp.where(flag, a, b), on_true, on_false)


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
    eval_gap: the run's ``-eg`` (the runner passes it; read with ``pfllib_compat`` only, to
      know which rounds PFLlib's evaluation ran before training).
    pfllib_compat: evaluate the global model as PFLlib's "personalized" evaluation does, its
      clients that have not trained yet their initial weights (module docstring).
  """
  DECAYED_RATES = ("p_learning_rate",)  # -ld: pFedMeOptimizer; the w step reads the undecayed lr

  lam: float = 1.0
  K: int = 5
  p_learning_rate: float = 0.01
  beta: float = 1.0
  weight_decay: float = 0.001
  eval_gap: int = 1
  pfllib_compat: bool = False

  def __post_init__(self):
    check_number(self.name, "lam", self.lam)
    check_int(self.name, "K", self.K, 1)
    check_number(self.name, "p_learning_rate", self.p_learning_rate)
    check_number(self.name, "beta", self.beta)
    check_number(self.name, "weight_decay", self.weight_decay)
    check_int(self.name, "eval_gap", self.eval_gap, 1)
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
    """Server ``{"params": w_g}`` and clients ``{"theta": θ}`` (the initial model); with
    ``pfllib_compat`` also the server's round and each client's ``trained`` flag."""
    params = self.init_params(key, sample_x)
    server, clients = {"params": params}, {"theta": stack_clients(params, num_clients)}
    if self.pfllib_compat:
      server["round"] = jnp.zeros((), jnp.int32)
      clients["trained"] = jnp.zeros((num_clients,), bool)
    return server, clients

  def download(self, server_state):
    return {"params": server_state["params"]}

  def envelope_loss(self, w, batch, key, theta):
    """The loss :func:`train_locally` runs with ``θ`` as its carry: the K inner steps give
    ``θ_K`` (from ``θ``, toward the constant ``w``), and the value ``CE + λ·½‖w − sg(θ_K)‖²``
    has the gradient ``λ·(w − θ_K)`` in ``w``, so its SGD step at ``lr`` is pFedMe's local
    update. Returns ``(value, θ_K)``."""
    theta, ce = inner_steps(self.ce_loss, theta, w, batch, key, self.K, self.p_learning_rate,
                            self.lam, self.weight_decay)
    return ce + self.lam * proximal_term(w, theta), theta

  def client_update(self, server_state, client_state, data, key):
    """``θ`` restarts from the received model every round, as ``w`` does (with
    ``pfllib_compat``, a client's first θ may start from its initial weights: see the
    module docstring)."""
    params = server_state["params"]
    start = params
    if self.pfllib_compat:
      evaluated = server_state["round"] % self.eval_gap == 0
      start = tree_where(client_state["trained"] | ~evaluated, params, client_state["theta"])
    w, _, stats = train_locally(params, data, key, self.local, self.envelope_loss, aux=start)
    theta = stats.pop("aux")
    state = {"theta": theta}
    if self.pfllib_compat:
      state["trained"] = jnp.ones((), bool)
    return state, w, stats

  @linear_server
  def server_update(self, server_state, uploads, weights, key):
    """``(1 − β)·w_g + β·(sample-weighted average of the uploads)``; no uploads: ``w_g``."""
    del key
    previous = server_state["params"]
    average = weighted_average(uploads, weights, fallback=previous)
    # w_g + β·(avg − w_g): the same as (1 − β)·w_g + β·avg, and exactly w_g without uploads.
    server = {"params": jax.tree.map(
        lambda p, a: (p + self.beta * (a - p)).astype(p.dtype), previous, average)}
    if self.pfllib_compat:
      server["round"] = server_state["round"] + 1
    return server

  def personalized_params(self, server_state, client_state):
    """``θ``; with ``pfllib_compat`` the global model, or the initial one (its ``θ``) for a
    client that has not trained yet."""
    if not self.pfllib_compat:
      return client_state["theta"]
    return tree_where(client_state["trained"], server_state["params"], client_state["theta"])

  def predict(self, server_state, client_state, x):
    """The personalized model's logits."""
    return self.model.apply(self.personalized_params(server_state, client_state), x)

  def eval_views(self, server_state, client_state, data, key):
    """The personalized model (``test_acc``, ``test_acc_personal``) and the global one."""
    del data, key
    return {"personal": functools.partial(self.predict, server_state, client_state),
            "global": functools.partial(self.model.apply, server_state["params"])}
