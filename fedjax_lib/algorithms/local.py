"""Local: every client trains its own model; nothing is communicated.

The baseline PFLlib ships as ``-algo Local``. All clients start from the same initial
parameters (as PFLlib's seeded deep copies do); the selected clients train on their own data
each round and every client is evaluated with its own model.
"""

import dataclasses

from fedjax_lib.algorithms.base import (Algorithm, SettingsContext, linear_server,
                                        stack_clients, untrained_new_clients)
from fedjax_lib.algorithms.registry import register
from fedjax_lib.core.local import cross_entropy_objective, train_model


@register("Local")
@dataclasses.dataclass(frozen=True)
class Local(Algorithm):
  """Purely local training (BatchNorm running statistics are part of each client's model)."""
  DECAYED_RATES = ("local.learning_rate",)  # -ld: the one SGD optimizer

  TRAIN_MODE = True


  def init(self, key, sample_x, num_clients):
    return {}, {"params": stack_clients(self.init_params(key, sample_x), num_clients)}

  def client_update(self, server_state, client_state, data, key):
    params, _, stats = train_model(self.model, client_state["params"], data, key, self.local,
                                   cross_entropy_objective)
    return {"params": params}, {}, stats

  @linear_server
  def server_update(self, server_state, uploads, weights, key):
    return server_state

  def client_model(self, server_state, client_state):
    """The client's own model (HtFLlib's saved ``model``; ``-sfn``/``-mfn``)."""
    del server_state
    return client_state['params']

  def predict(self, server_state, client_state, x):
    return self.model.apply(client_state["params"], x)

  def new_client_variables(self, server_state, client_state):
    """A new client trains its own freshly initialised model (PFLlib has no such tail)."""
    return client_state["params"]

  def check_settings(self, context: SettingsContext) -> list[str]:
    """Warns when new clients would be tested with their freshly initialised model."""
    return untrained_new_clients(self.name, "model", context)
