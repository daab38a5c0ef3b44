"""What FML and FedKD share: private models trained beside one shared model.

Every client keeps its **private model** (its own architecture, ``model``) and a copy of one
**shared model** (``shared_model``; the same architecture for every client: HtFLlib's
``global_model``). When ``shared_model`` is None it is the ``model`` the algorithm is
constructed with: the runner constructs it with architecture 0's model (or the family's own
global model, `fedjax_lib.models.family_global_model`) and makes the other groups with
``dataclasses.replace(algorithm, model=...)``, which keeps the field. The server holds the
shared model's parameters (``server_state['shared']``); each client keeps its running
statistics (``client_state['shared_state']``, only for a model with BatchNorm), since only
parameters are communicated. Clients are evaluated with their private model, and a new client
fine-tunes a freshly initialised private model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax

from fedjax_lib.algorithms.base import (Algorithm, SettingsContext, abstract_variables,
                                        untrained_new_clients)
from fedjax_lib.errors import ConfigError
from fedjax_lib.models.base import model_state


@dataclasses.dataclass(frozen=True)
class SharedModelAlgorithm(Algorithm):
  """Private models and one shared model (module docstring). Subclasses define
  ``client_update`` and ``server_update`` and call ``super().__post_init__()``.

  Attributes:
    shared_model: the shared model (None: ``model``).
  """

  shared_model: Any = None

  # What the shared model is called in messages (FedKD: the mentee).
  SHARED_ROLE: ClassVar[str] = "shared model"
  _STRUCTURAL: ClassVar[tuple[str, ...]] = ("model", "local", "shared_model")

  def __post_init__(self):
    if self.shared_model is None:
      object.__setattr__(self, "shared_model", self.model)

  def init_private_and_shared(self, key, sample_x):
    """``(client, shared_params)``: one client's ``{'private', ['shared_state']}`` and the
    shared model's initial parameters (the server's)."""
    k_private, k_shared = jax.random.split(key)
    shared = self.shared_model.init(k_shared, sample_x[None])
    client = {"private": self.init_params(k_private, sample_x)}
    if model_state(shared):
      client["shared_state"] = model_state(shared)
    return client, shared["params"]

  def shared_variables(self, server_state, client_state):
    """The server's shared parameters with this client's running statistics."""
    return {"params": server_state["shared"], **client_state.get("shared_state", {})}

  def trained_client_state(self, client_state, private_params, private_state, shared_state):
    """``client_state`` with the trained private model and the shared model's statistics."""
    new_state = {**client_state, "private": {"params": private_params, **private_state}}
    if shared_state:
      new_state["shared_state"] = shared_state
    return new_state

  def client_model(self, server_state, client_state):
    """The client's private model (HtFLlib's saved ``model``; ``-sfn``/``-mfn``)."""
    del server_state
    return client_state['private']

  def predict(self, server_state, client_state, x):
    """The client's private model."""
    return self.model.apply(client_state["private"], x)

  def new_client_variables(self, server_state, client_state):
    """A new client fine-tunes its freshly initialised private model."""
    del server_state
    return client_state["private"]

  def check_settings(self, context: SettingsContext) -> list[str]:
    """Refuses a shared model whose logits differ in width from the private model's."""
    x = jax.ShapeDtypeStruct((1, *context.sample_x.shape), context.sample_x.dtype)
    widths = []
    for model in (self.model, self.shared_model):
      variables = abstract_variables(model, context.sample_x)
      widths.append(jax.eval_shape(model.apply, variables, x).shape[-1])
    if widths[0] != widths[1]:
      raise ConfigError(f"{self.name}'s {self.SHARED_ROLE} has {widths[1]} outputs but model "
                        f"{context.model_name!r} has {widths[0]}; both must predict the same "
                        "classes")
    return untrained_new_clients(self.name, "private model", context)
