"""PFL-DA: Personalized Federated Learning via Domain Adaptation.

"Personalized Federated Learning via Domain Adaptation with an Application to Distributed 3D
Printing", Technometrics 2023; PFLlib's ``-algo PFL-DA``.

Each client keeps a personal model, a base ``φ_k`` and a local head ``h_k``; the server keeps
a global head ``g``. A selected client receives ``g`` and runs two phases of
``local_epochs`` epochs each:

1. local head, base frozen:   ``CE(h_k(φ_k(x)), y) + λ·‖h_k − g‖₂``  (``g`` a constant; the
   norm, not its square, over the head's parameters flattened into one vector, with
   gradient ``λ(h_k − g)/‖h_k − g‖``, 0 at ``h_k = g``);
2. base and global head, local head untouched:  ``CE(g(φ_k(x)), y)``, trained jointly (the
   client's copy of ``g`` moves to ``g_k``).

It uploads ``g_k`` and keeps ``φ_k`` and ``h_k``; the server sets
``g ← Σ_k n_k g_k / Σ_k n_k`` over the uploads that arrived. A client is evaluated with its
personal model ``h_k(φ_k(x))``. Every client starts from the same initial model, whose head is
also the initial ``g``. BatchNorm models train in training mode in both phases (running
statistics per client). ``lam`` = λ (PFLlib ``-lam``, default 1.0).

State: server ``{"head": g}``; client ``{"base": φ_k, "head": h_k}`` (plus ``"model_state"``,
the running statistics, for BatchNorm models) stacked over all clients. Download and upload:
the head. Local loss reported: phase 2's (``head_loss``: phase 1's, regulariser included);
``steps`` counts both phases.

Differences from PFLlib (``pfllib_compat=True``, ``--pfllib-compat``, gives PFLlib's
behaviour):

- PFLlib builds the regulariser from ``.data`` of both heads, so it contributes no gradient
  and phase 1 is plain cross-entropy training of the head. Default: the gradient flows into
  ``h_k`` (the regulariser the method describes); compat: its value is added to the loss
  without gradient (:func:`head_regularizer`).
- A new client (``-nnc``) in PFLlib fine-tunes a freshly initialised model and never reads
  the global head it received. Default: it starts from a fresh base under the global head
  ``g`` (the head its local head is pulled toward); compat: the fresh model.
- The two phases shuffle with independent keys (``fold_in(key, 0)``, ``fold_in(key, 1)``);
  PFLlib reshuffles its loader for each.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fedjax_lib.algorithms.base import (Algorithm, SettingsContext, check_bool, check_number,
                                        linear_server, stack_clients, untrained_new_clients)
from fedjax_lib.algorithms.feddyn import safe_norm
from fedjax_lib.algorithms.registry import register
from fedjax_lib.core.aggregate import weighted_average
from fedjax_lib.core.local import cross_entropy_objective, train_model
from fedjax_lib.models.base import merge_params, model_state, split_params


def head_regularizer(head, global_head, lam, detached: bool = False) -> jax.Array:
  """``λ·‖head − global_head‖₂`` over every leaf together, in float32.

  ``global_head`` is a constant; the gradient w.r.t. ``head`` is
  ``λ(head − global_head)/‖head − global_head‖`` (0, not NaN, where they are equal, as
  PyTorch's ``norm``). ``detached`` (PFLlib) returns the same value with no gradient.
  """
  global_head = jax.lax.stop_gradient(global_head)
  if detached:
    head = jax.lax.stop_gradient(head)
  squares = jax.tree.map(
      lambda h, g: jnp.sum(jnp.square(h.astype(jnp.float32) - g.astype(jnp.float32))),
      head, global_head)
  return lam * safe_norm(sum(jax.tree.leaves(squares), jnp.zeros((), jnp.float32)))


@register("PFL-DA")
@dataclasses.dataclass(frozen=True)
class PFLDA(Algorithm):
  """Personal base and head; the local head is pulled toward a shared global head.

  Attributes:
    lam: λ, the weight of ``‖h_k − g‖₂`` in the head phase (PFLlib ``-lam``, default 1.0).
    pfllib_compat: PFLlib's gradient-free regulariser and fresh new clients (module
      docstring).
  """

  REFERENCE_SPLIT = True  # PFLlib's main.py wraps the model in BaseHeadSplit
  DECAYED_RATES = ("local.learning_rate",)  # -ld: both optimizers (model, global head)

  lam: float = 1.0
  pfllib_compat: bool = False

  TRAIN_MODE = True

  def __post_init__(self):
    check_number(self.name, "lam", self.lam, 0.0)
    check_bool(self.name, "pfllib_compat", self.pfllib_compat)

  def init(self, key, sample_x, num_clients):
    variables = self.init_params(key, sample_x)
    base, head = split_params(variables)
    client = {"base": base, "head": head}
    if model_state(variables):
      client["model_state"] = model_state(variables)
    return {"head": head}, stack_clients(client, num_clients)

  def variables(self, client_state, head=None):
    """A client's model: its base and running statistics under ``head`` (its local head by
    default)."""
    head = client_state["head"] if head is None else head
    return {**merge_params(client_state["base"], head), **client_state.get("model_state", {})}

  def client_update(self, server_state, client_state, data, key):
    global_head = server_state["head"]
    detached = self.pfllib_compat
    lam = self.lam
    # Phase 1: the local head, toward the global head.
    variables, _, head_stats = train_model(
        self.model, self.variables(client_state), data, jax.random.fold_in(key, 0), self.local,
        cross_entropy_objective, trainable=("head",),
        penalty=lambda p: head_regularizer(p["head"], global_head, lam, detached))
    _, local_head = split_params(variables)
    # Phase 2: the base under the global head, both trained.
    variables, _, stats = train_model(
        self.model, {**merge_params(split_params(variables)[0], global_head),
                     **model_state(variables)},
        data, jax.random.fold_in(key, 1), self.local, cross_entropy_objective)
    base, trained_head = split_params(variables)
    new_state = {"base": base, "head": local_head}
    if model_state(variables):
      new_state["model_state"] = model_state(variables)
    stats = {"loss": stats["loss"], "head_loss": head_stats["loss"],
             "steps": stats["steps"] + head_stats["steps"]}
    return new_state, {"head": trained_head}, stats

  @linear_server
  def server_update(self, server_state, uploads, weights, key):
    del key
    return weighted_average(uploads, weights, fallback=server_state)

  def predict(self, server_state, client_state, x):
    return self.model.apply(self.variables(client_state), x)

  def new_client_variables(self, server_state, client_state):
    """A fresh base under the global head (compat: PFLlib's fresh model)."""
    return self.variables(client_state, None if self.pfllib_compat else server_state["head"])

  def check_settings(self, context: SettingsContext) -> list[str]:
    """Warns when new clients are tested with their freshly initialised base, untrained."""
    return untrained_new_clients(self.name, "base" if not self.pfllib_compat else "model",
                                 context)
