"""FedBABU: Toward Enhanced Representation for Federated Image Classification.

Oh, Kim, Yun, ICLR 2022.

The head (classifier) is fixed at its random initialisation — the same for every client — and
only the base (body) is trained and shared: a selected client trains the base for
``local_epochs`` with the head frozen and uploads it; the server averages the bases weighted by
sample count. During training every client is evaluated with the global base and the frozen
head. After the last round every client fine-tunes the whole model (base and head) for
``fine_tuning_epochs`` epochs (PFLlib ``-fte``, default 10) on its training data, and one more
evaluation of the fine-tuned models is appended to the history (as PFLlib appends it to
``rs_test_acc``).

Server state ``{"base": averaged base, "head": the initial head (never changes)}``; clients keep
no state (their fine-tuned models exist only inside the final evaluation), except a model with
BatchNorm, whose running statistics each client keeps (``{"model_state"}``, never sent, as
PFLlib's parameter loops leave them) and uses in its evaluations and fine-tuning; such models,
and those with dropout, train in training mode.

Differences from PFLlib: none in the procedure. PFLlib keeps a frozen head copy on every client;
since all of them are the same initial head, it is held once in the server state here. The
fine-tuned models are not kept after the final evaluation (PFLlib keeps them in memory but never
uses them again).
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from fedjax_lib.algorithms.base import (Algorithm, SettingsContext, abstract_variables,
                                        check_int, linear_server, stack_clients)
from fedjax_lib.algorithms.registry import register
from fedjax_lib.algorithms.split import PARTS, merge_parts, split_parts, train_parts
from fedjax_lib.core.aggregate import weighted_average
from fedjax_lib.core.local import cross_entropy_objective, train_model
from fedjax_lib.errors import ConfigError
from fedjax_lib.models.base import has_train_mode, model_state


@register("FedBABU")
@dataclasses.dataclass(frozen=True)
class FedBABU(Algorithm):
  """Shared base trained under a frozen random head; fine-tuning after the last round.

  Attributes:
    fine_tuning_epochs: epochs of whole-model fine-tuning after the last round (PFLlib ``-fte``).
  """

  REFERENCE_SPLIT = True  # PFLlib's main.py wraps the model in BaseHeadSplit


  TRAIN_MODE = True

  fine_tuning_epochs: int = 10

  def __post_init__(self):
    check_int(self.name, "fine_tuning_epochs", self.fine_tuning_epochs, 0)

  def init(self, key, sample_x, num_clients):
    variables = self.init_params(key, sample_x)
    state = model_state(variables)
    clients = stack_clients({"model_state": state}, num_clients) if state else {}
    return split_parts(variables), clients

  def variables(self, server_state, client_state):
    """The global base and head with the client's running statistics (if any)."""
    return {**merge_parts(server_state), **client_state.get("model_state", {})}

  def _train(self, variables, parts, data, key, spec):
    """``(variables, stats)`` after training ``parts`` on cross-entropy; BatchNorm/dropout
    models in training mode."""
    if has_train_mode(self.model):
      variables, _, stats = train_model(self.model, variables, data, key, spec,
                                        cross_entropy_objective, trainable=parts)
      return variables, stats
    return train_parts(variables, parts, data, key, spec, self.ce_loss)

  def client_update(self, server_state, client_state, data, key):
    variables, stats = self._train(self.variables(server_state, client_state), ("base",), data,
                                   key, self.local)
    state = model_state(variables)
    return ({"model_state": state} if state else client_state,
            {"base": split_parts(variables)["base"]}, stats)

  @linear_server
  def server_update(self, server_state, uploads, weights, key):
    del key
    base = weighted_average(uploads["base"], weights, fallback=server_state["base"])
    return {"base": base, "head": server_state["head"]}

  def predict(self, server_state, client_state, x):
    return self.model.apply(self.variables(server_state, client_state), x)

  def fine_tune(self, server_state, client_state, data, key):
    """The client's whole model fine-tuned for ``fine_tuning_epochs`` epochs on its data."""
    variables = self.variables(server_state, client_state)
    if self.fine_tuning_epochs == 0:
      return variables
    spec = dataclasses.replace(self.local, local_epochs=self.fine_tuning_epochs)
    variables, _ = self._train(variables, PARTS, data, key, spec)
    return variables

  def final_views(self, server_state, client_state, data, key):
    return {"": functools.partial(self.model.apply,
                                  self.fine_tune(server_state, client_state, data, key))}

  def new_client_variables(self, server_state, client_state):
    return self.variables(server_state, client_state)

  def check_settings(self, context: SettingsContext) -> list[str]:
    """Refuses a model without base parameters: the rounds would train nothing."""
    if not jax.tree.leaves(split_parts(abstract_variables(self.model, context.sample_x))["base"]):
      raise ConfigError(
          f"{self.name} trains only the base, but model {context.model_name!r} has no base "
          "parameters, so every round would train nothing (only the fine-tuning after the "
          "last round would); use a model with a base (cnn, dnn)")
    return []
