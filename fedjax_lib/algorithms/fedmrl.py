"""FedMRL: Federated Model Heterogeneous Matryoshka Representation Learning.

Yi et al., NeurIPS 2024. HtFLlib's ``-algo FedMRL``.

Every client keeps its **private model** (base ``f``, features of width d, head ``h``), a copy
of one small **shared model** (base ``f_g`` with features pooled to ``s`` = ``sub_feature_dim``
(``-sfd``, 128), head ``h_g = Linear(s, C)``; the same for every client) and its own
**projector** ``P = Linear(s + d, d)``. Per batch:

    r     = P([f_g(x), f(x)])          (s + d → d: the fused, "Matryoshka" representation)
    out_g = h_g(r[:, :s])              (the shared head reads the first s features of r)
    out   = h(r)
    loss  = CE(out, y) + CE(out_g, y)

and one plain SGD step on all three modules (private model, shared model, projector) at the
client learning rate. The client uploads its shared model; the server replaces the shared
model with the **uniform** mean of the uploads (1/#clients that trained, as HtFLlib's server
does), which clients load at the start of their next round. A client is evaluated with
``h(P([f_g(x), f(x)]))`` using the server's shared base (:meth:`FedMRL.predict`).
Communication per round: the whole shared model up and down.

The shared model is the field ``shared_model``; when None it is the ``model`` the algorithm
is constructed with, its features pooled to ``s`` (``model.clone(feature_dim=s)``: for the
runner, architecture 0 — FedAvgCNN in HtFLlib's image families — with head Linear(s, C); the
HtC families' global FedAvgCNN with that dense head too, where HtFLlib's ``Head([512])`` would
get s features and crash).
Groups made with ``dataclasses.replace(algorithm, model=...)`` keep it. A model with
BatchNorm keeps the running statistics of both models on each client; only parameters are
communicated.

Differences from HtFLlib (``clientmrl.py``/``servermrl.py``):

- **The projector is each client's own and persists across rounds** (the paper's trainable
  projector). HtFLlib never saves ``proj`` after training (open HtFLlib issue #15), so every
  client trains and is evaluated with its projector at initialisation each round;
  ``pfllib_compat=True`` (``--pfllib-compat``) restores that (the trained projector is
  discarded).
- **A shared model with BatchNorm is evaluated with running statistics** — each client's, kept
  from its training. HtFLlib evaluates the *server's* shared model in evaluation mode, and its
  server averages ``parameters()`` only, so those statistics stay at their initial values (mean
  0, variance 1) for the whole run: its evaluation feeds un-normalised shared features to the
  projector. ``pfllib_compat=True`` reproduces that (the clients' statistics are not kept, so
  the initial ones evaluate). Training uses batch statistics in both, so only evaluation
  differs, and only for families whose architecture 0 has BatchNorm (HtFE-img-3, -5, -9: not
  FedAvgCNN's).
- ``train_loss`` is the cross-entropy of ``out`` (HtFLlib: ``CE(out) + CE(out_g)``).
- No new-client evaluation (``-nnc``): the evaluated model is not one `BaseHeadModel`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from fedjax_lib.algorithms.base import (Algorithm, SettingsContext, abstract_variables, check_bool,
                                        check_int, stack_clients)
from fedjax_lib.algorithms.registry import register
from fedjax_lib.config import MAX_FEATURE_DIM
from fedjax_lib.core.aggregate import uniform_average
from fedjax_lib.core.local import masked_cross_entropy, train_locally
from fedjax_lib.errors import ConfigError
from fedjax_lib.models.base import apply_train, model_state
from fedjax_lib.models.layers import TorchDense


@register("FedMRL")
@dataclasses.dataclass(frozen=True)
class FedMRL(Algorithm):
  """Private models fused with one small shared model through per-client projectors.

  Attributes:
    sub_feature_dim: s, the shared model's feature width and the part of the fused
      representation its head reads (``-sfd``; 128).
    pfllib_compat: reset every client's projector to its initial value each round, as
      HtFLlib does (its ``proj`` is never saved), and evaluate the shared model with its
      initial running statistics (HtFLlib's server never averages them).
    shared_model: the shared model (None: ``model`` pooled to ``sub_feature_dim``).
  """

  REFERENCE_SPLIT = True  # HtFLlib's main.py wraps the model in BaseHeadSplit

  sub_feature_dim: int = 128
  pfllib_compat: bool = False
  shared_model: Any = None

  TRAIN_MODE = True
  _STRUCTURAL: ClassVar[tuple[str, ...]] = ("model", "local", "shared_model")

  def __post_init__(self):
    check_int(self.name, "sub_feature_dim", self.sub_feature_dim, 1, MAX_FEATURE_DIM)
    check_bool(self.name, "pfllib_compat", self.pfllib_compat)
    if self.shared_model is None:
      object.__setattr__(self, "shared_model",
                         self.model.clone(feature_dim=int(self.sub_feature_dim)))

  # ------------------------------------------------------------------ shapes and state
  def feature_widths(self, sample_x, model_name: str = "") -> tuple[int, int]:
    """``(d, s)``: the private and the shared model's feature widths (traced abstractly).

    Raises:
      ConfigError: the shared model's width is not ``sub_feature_dim``, or ``d < s`` (the
        shared head reads the first s of the d fused features).
    """
    x = jax.ShapeDtypeStruct((1, *sample_x.shape), sample_x.dtype)
    widths = []
    for model in (self.model, self.shared_model):
      variables = abstract_variables(model, sample_x)
      widths.append(jax.eval_shape(
          lambda v, x, m=model: m.apply(v, x, method="features"), variables, x).shape[-1])
    d, s = widths
    if s != self.sub_feature_dim:
      raise ConfigError(f"FedMRL's shared model has {s} features but sub_feature_dim="
                        f"{self.sub_feature_dim}; give a shared model pooled to it")
    if d < s:
      raise ConfigError(f"FedMRL hyperparameter sub_feature_dim={s} exceeds the feature width "
                        f"{d} of {'model ' + model_name if model_name else 'the private model'}; "
                        f"use -sfd <= {d}")
    return d, s

  def init(self, key, sample_x, num_clients):
    k_private, k_shared, k_proj = jax.random.split(key, 3)
    d, s = self.feature_widths(sample_x)
    shared = self.shared_model.init(k_shared, sample_x[None])
    client = {"private": self.init_params(k_private, sample_x),
              "projector": TorchDense(d).init(k_proj, jnp.zeros((1, s + d)))["params"]}
    if model_state(shared):
      client["shared_state"] = model_state(shared)
    return {"shared": shared["params"]}, stack_clients(client, num_clients)

  # ------------------------------------------------------------------ the fused model
  def forward(self, params, states, x, key=None):
    """``((out, out_g), states)`` of the fused model on ``x``.

    Args:
      params: ``{'private', 'shared', 'projector'}`` parameter trees.
      states: ``(private_state, shared_state)``, the models' running statistics.
      x: a batch of inputs.
      key: a dropout key for training mode (batch statistics, states updated); None
        evaluates (running statistics, states returned unchanged).
    """
    private_state, shared_state = states
    private = {"params": params["private"], **private_state}
    shared = {"params": params["shared"], **shared_state}
    if key is None:
      f_shared = self.shared_model.apply(shared, x, method="features")
      f_private = self.model.apply(private, x, method="features")
    else:
      f_shared, shared_state = apply_train(self.shared_model, shared, x,
                                           jax.random.fold_in(key, 1), method="features")
      f_private, private_state = apply_train(self.model, private, x, key, method="features")
    d, s = f_private.shape[-1], f_shared.shape[-1]
    r = TorchDense(d).apply({"params": params["projector"]},
                            jnp.concatenate([f_shared, f_private], axis=-1))
    out = self.model.apply({"params": params["private"]}, r, method="classify")
    out_g = self.shared_model.apply({"params": params["shared"]}, r[:, :s], method="classify")
    return (out, out_g), (private_state, shared_state)

  def _params_and_states(self, server_state, client_state):
    private = client_state["private"]
    params = {"private": private["params"], "shared": server_state["shared"],
              "projector": client_state["projector"]}
    return params, (model_state(private), client_state.get("shared_state", {}))

  # ------------------------------------------------------------------ client
  def client_update(self, server_state, client_state, data, key):
    params, states = self._params_and_states(server_state, client_state)

    def loss_fn(params, batch, step_key, states):
      (out, out_g), states = self.forward(params, states, batch.x, step_key)
      loss = (masked_cross_entropy(out, batch.y, batch.mask)
              + masked_cross_entropy(out_g, batch.y, batch.mask))
      return loss, states

    params, _, stats = train_locally(params, data, key, self.local, loss_fn, aux=states)
    private_state, shared_state = stats.pop("aux")
    projector = client_state["projector"] if self.pfllib_compat else params["projector"]
    new_state = {"private": {"params": params["private"], **private_state},
                 "projector": projector}
    if shared_state:
      # HtFLlib's clients train a copy of the server's shared model, whose running statistics
      # stay the initial ones (see the module's docstring); compat keeps those.
      new_state["shared_state"] = (client_state["shared_state"] if self.pfllib_compat
                                   else shared_state)
    return new_state, params["shared"], stats

  # ------------------------------------------------------------------ server
  def server_update(self, server_state, uploads, weights, key):
    """The uniform mean of the uploaded shared models."""
    del key
    return {"shared": uniform_average(uploads, weights, server_state["shared"])}

  # ------------------------------------------------------------------ evaluation
  def client_model(self, server_state, client_state):
    """The client's private (heterogeneous) model (HtFLlib's saved ``model``; ``-sfn``/``-mfn``)."""
    del server_state
    return client_state['private']

  def predict(self, server_state, client_state, x):
    """The private head on the fused representation, with the server's shared model."""
    params, states = self._params_and_states(server_state, client_state)
    return self.forward(params, states, x)[0][0]

  def check_settings(self, context: SettingsContext) -> list[str]:
    """Refuses the feature widths :meth:`feature_widths` refuses."""
    self.feature_widths(context.sample_x, repr(context.model_name))
    return []
