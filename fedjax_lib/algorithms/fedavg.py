"""FedAvg: Communication-Efficient Learning of Deep Networks from Decentralized Data.

McMahan, Moore, Ramage, Hampson, Agüera y Arcas, AISTATS 2017.

Each selected client starts from the global parameters ``w``, runs local SGD on cross-entropy
and uploads its parameters ``w_k``; the server replaces ``w`` with the sample-weighted average
``Σ_k n_k w_k / Σ_k n_k`` over the clients that did not drop out. Clients keep no state, and
every client is evaluated with the global model (PFLlib: the model is sent to all clients before
evaluation).

Models with BatchNorm or dropout (ResNet, LSTM, Transformer ...) train in training mode
(`fedjax_lib.core.local.train_model`). As in PFLlib, only parameters are communicated: each
client keeps its own BatchNorm running statistics (``client_state['model_state']``; PFLlib's
``set_parameters`` and ``aggregate_parameters`` loop over ``model.parameters()``, never the
buffers), updated when it trains and used when it is evaluated with the global parameters.
The subclasses do not inherit this: each declares its own support (FedProx through
:meth:`FedAvg.penalty`, Ditto, SCAFFOLD, FedDyn and FedLC with their own training-mode paths;
MOON, FedNTD and the others refuse such models).
"""

import dataclasses
import functools

from fedjax_lib.algorithms.base import (Algorithm, SettingsContext, abstract_variables,
                                        has_hook, linear_server, stack_clients,
                                        untrained_new_clients)
from fedjax_lib.algorithms.registry import register
from fedjax_lib.core.aggregate import weighted_average
from fedjax_lib.core.local import cross_entropy_objective, train_locally, train_model
from fedjax_lib.models.base import has_train_mode, model_state


@register("FedAvg")
@dataclasses.dataclass(frozen=True)
class FedAvg(Algorithm):
  """Federated averaging of the whole model."""

  REFERENCE_SPLIT = True  # PFLlib's main.py wraps the model in BaseHeadSplit
  TRAIN_MODE = True
  DECAYED_RATES = ("local.learning_rate",)  # -ld: clientavg's one SGD optimizer

  def init(self, key, sample_x, num_clients):
    variables = self.init_params(key, sample_x)
    state = model_state(variables)
    if not state:
      return {"params": variables}, {}
    return ({"params": {"params": variables["params"]}},
            stack_clients({"model_state": state}, num_clients))

  def variables(self, server_state, client_state):
    """A client's model: the global parameters with its own running statistics, if any."""
    return {**server_state["params"], **client_state.get("model_state", {})}

  def shared_views(self, server_state, client_state):
    """The global model, for every client, unless the client keeps running statistics or a
    subclass evaluates something else (its own ``predict``, ``variables`` or ``eval_views``)."""
    own = type(self)
    if ("model_state" in client_state or own.predict is not FedAvg.predict
        or own.variables is not FedAvg.variables or has_hook(self, "eval_views")):
      return None
    return {"": functools.partial(self.model.apply, server_state["params"])}

  def local_loss(self, server_state):
    """The local training loss given the received server state (a hook: FedProx adds μ)."""
    del server_state
    return self.ce_loss

  def penalty(self, server_state):
    """For a model with a training mode, the parameter penalty added to cross-entropy
    (``penalty({'base', 'head'}) -> scalar``; a hook: FedProx's proximal term); None: none."""
    del server_state
    return None

  def train_global_copy(self, server_state, client_state, data, key,
                        objective=cross_entropy_objective, penalty=None, tx=None):
    """Training mode (BatchNorm, dropout) from the global parameters with the client's running
    statistics (`fedjax_lib.core.local.train_model`; ``objective``, ``penalty``, ``tx`` as
    there): ``(params, state, stats)`` with ``params = {'params': ...}`` (what is sent) and
    ``state`` the client's new ``{'model_state': ...}`` (``{}`` without BatchNorm). For the
    classes declaring ``TRAIN_MODE``."""
    variables, _, stats = train_model(self.model, self.variables(server_state, client_state),
                                      data, key, self.local, objective, penalty=penalty, tx=tx)
    running = model_state(variables)
    return ({"params": variables["params"]}, {"model_state": running} if running else {},
            stats)

  def client_update(self, server_state, client_state, data, key):
    if has_train_mode(self.model):  # only classes declaring TRAIN_MODE get here (not inherited)
      params, state, stats = self.train_global_copy(server_state, client_state, data, key,
                                                    penalty=self.penalty(server_state))
      return state, params, stats
    params, _, stats = train_locally(server_state["params"], data, key, self.local,
                                     self.local_loss(server_state))
    return client_state, params, stats

  @linear_server
  def server_update(self, server_state, uploads, weights, key):
    del key
    return {"params": weighted_average(uploads, weights, fallback=server_state["params"])}

  def predict(self, server_state, client_state, x):
    return self.model.apply(self.variables(server_state, client_state), x)

  def check_settings(self, context: SettingsContext) -> list[str]:
    """Warns when new clients would test the global parameters with the freshly initialised
    running statistics of a BatchNorm model (they are kept per client, never sent)."""
    if not model_state(abstract_variables(self.model, context.sample_x)):
      return []
    return untrained_new_clients(self.name, "copy of the BatchNorm running statistics (mean 0, "
                                 "variance 1; they are never sent)", context)

  def new_client_variables(self, server_state, client_state):
    """A new client fine-tunes a copy of the global model (with its own running statistics)."""
    return self.variables(server_state, client_state)
