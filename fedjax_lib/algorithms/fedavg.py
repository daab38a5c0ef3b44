"""FedAvg: Communication-Efficient Learning of Deep Networks from Decentralized Data.

McMahan, Moore, Ramage, Hampson, Agüera y Arcas, AISTATS 2017.

Each selected client starts from the global parameters ``w``, runs local SGD on cross-entropy
and uploads its parameters ``w_k``; the server replaces ``w`` with the sample-weighted average
``Σ_k n_k w_k / Σ_k n_k`` over the clients that did not drop out. Clients keep no state, and
every client is evaluated with the global model (PFLlib: the model is sent to all clients before
evaluation).
"""

import dataclasses

from fedjax_lib.algorithms.base import Algorithm, linear_server
from fedjax_lib.algorithms.registry import register
from fedjax_lib.core.aggregate import weighted_average
from fedjax_lib.core.local import train_locally


@register("FedAvg")
@dataclasses.dataclass(frozen=True)
class FedAvg(Algorithm):
  """Federated averaging of the whole model."""


  def init(self, key, sample_x, num_clients):
    return {"params": self.init_params(key, sample_x)}, {}

  def local_loss(self, server_state):
    """The local training loss given the received server state (a hook: FedProx adds μ)."""
    del server_state
    return self.ce_loss

  def client_update(self, server_state, client_state, data, key):
    params, _, stats = train_locally(server_state["params"], data, key, self.local,
                                     self.local_loss(server_state))
    return client_state, params, stats

  @linear_server
  def server_update(self, server_state, uploads, weights, key):
    del key
    return {"params": weighted_average(uploads, weights, fallback=server_state["params"])}

  def predict(self, server_state, client_state, x):
    return self.model.apply(server_state["params"], x)

  def new_client_variables(self, server_state, client_state):
    """A new client fine-tunes a copy of the global model."""
    del client_state
    return server_state["params"]
