"""The algorithm contract.

An algorithm is a frozen dataclass: its fields are the model, the static local-training spec
and its own hyperparameters; its methods are pure functions over explicit state pytrees.

- ``init(key, sample_x, num_clients) -> (server_state, client_states)``; ``client_states`` is
  stacked over all N clients on the leading axis (an empty dict when clients keep no state).
- ``client_update(server_state, client_state, data, key) -> (client_state, upload, metrics)``
  for ONE client; the engine vmaps (or maps) it over the selected clients.
- ``server_update(server_state, uploads, weights, key) -> server_state``; ``uploads`` are
  stacked over the selected clients and ``weights`` are their training-sample counts, zero for
  clients that dropped out or were not selected.
- ``predict(server_state, client_state, x) -> logits``: the model a client is evaluated with.

Optional hooks (defaults here; override where the algorithm needs them):

- ``eval_views(server_state, client_state, data, key) -> {name: x -> logits}``: the models a
  client is evaluated with, for ONE client, given its training data (for evaluation after an
  adaptation step, Per-FedAvg) and an evaluation key. The first view gives ``test_acc``,
  ``test_auc`` and ``train_loss``; with more than one view every view ``name`` also gets
  ``test_acc_<name>`` / ``test_auc_<name>`` (e.g. ``personal`` and ``global``). Default: one
  view, :meth:`predict`.
- ``final_views(...)``: like ``eval_views``, for one extra evaluation after the last round
  (FedBABU's fine-tuning); used when ``HAS_FINAL_EVAL`` is True.
- ``new_client_variables(server_state, client_state) -> variables``: the full-model variables
  a client that never took part starts from in new-client evaluation (PFLlib's ``-nnc``); it is
  then fine-tuned with cross-entropy for ``-ften`` epochs and tested. ``client_state`` is a
  freshly initialised client state. Default: unsupported.
- ``warmup_client`` / ``warmup_server``: an initialisation period run once over ALL clients
  before round 0 (FedDBE's global mean); ``HAS_WARMUP`` switches it on.

Nothing is kept on ``self`` between calls; the engine owns every piece of state.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, ClassVar, Optional

import jax
import numpy as np

from fedjax_lib.core.local import Batch, LocalSpec, masked_cross_entropy
from fedjax_lib.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """Base class: the model, local training settings, and shared helpers."""

  model: Any
  local: LocalSpec

  name: ClassVar[str] = ""
  # True when ``server_update`` sees the uploads only through their weighted average
  # (`core.aggregate.weighted_average` with the given weights): the sequential executor then
  # keeps a running weighted sum instead of every client's upload (memory of one upload).
  LINEAR_AGGREGATION: ClassVar[bool] = False
  # Field names that are the model/spec rather than hyperparameters.
  _STRUCTURAL: ClassVar[tuple[str, ...]] = ("model", "local")

  @classmethod
  def hyperparameters(cls) -> dict[str, Any]:
    """The algorithm's own hyperparameters and their defaults."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.name not in cls._STRUCTURAL}

  # ------------------------------------------------------------------ helpers
  def init_params(self, key: jax.Array, sample_x: jax.Array):
    """Initial model variables for one sample ``sample_x`` (no batch axis)."""
    return self.model.init(key, sample_x[None])

  def ce_loss(self, params, batch: Batch, key: jax.Array) -> jax.Array:
    """Cross-entropy of the full model on a batch (the default local loss)."""
    del key
    return masked_cross_entropy(self.model.apply(params, batch.x), batch.y, batch.mask)

  # ------------------------------------------------------------------ contract
  def init(self, key, sample_x, num_clients):
    raise NotImplementedError

  def client_update(self, server_state, client_state, data, key):
    raise NotImplementedError

  def server_update(self, server_state, uploads, weights, key):
    raise NotImplementedError

  def predict(self, server_state, client_state, x):
    raise NotImplementedError

  # ------------------------------------------------------------------ optional hooks
  HAS_WARMUP: ClassVar[bool] = False
  HAS_FINAL_EVAL: ClassVar[bool] = False

  def eval_views(self, server_state, client_state, data, key) -> dict[str, Callable]:
    """``{view: x -> logits}`` of one client; the first view is the primary one."""
    del data, key
    return {"": functools.partial(self.predict, server_state, client_state)}

  def final_views(self, server_state, client_state, data, key) -> dict[str, Callable]:
    """Views of the extra evaluation after the last round (when ``HAS_FINAL_EVAL``)."""
    raise NotImplementedError

  @property
  def supports_new_clients(self) -> bool:
    return type(self).new_client_variables is not Algorithm.new_client_variables

  def new_client_variables(self, server_state, client_state):
    """Full-model variables a new client starts from (new-client evaluation)."""
    raise NotImplementedError

  def warmup_client(self, server_state, client_state, data, key):
    """One client's part of the initialisation period: ``(client_state, upload)``."""
    raise NotImplementedError

  def warmup_server(self, server_state, uploads, weights, key):
    """The server's part of the initialisation period (``weights``: sample counts)."""
    raise NotImplementedError


def _accepted(kind: str, minimum, maximum) -> str:
  return f"{kind} >= {minimum}" if maximum is None else f"{kind} in [{minimum}, {maximum}]"


def check_int(algorithm: str, name: str, value, minimum: int,
              maximum: Optional[int] = None) -> None:
  """Raises a ConfigError unless hyperparameter ``name`` is an integer in range."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum \
      or (maximum is not None and value > maximum):
    raise ConfigError(f"{algorithm} hyperparameter {name}={value!r} must be "
                      f"{_accepted('an integer', minimum, maximum)}")


def check_number(algorithm: str, name: str, value, minimum: float = 0,
                 maximum: Optional[float] = None, finite: bool = False) -> None:
  """Raises a ConfigError unless hyperparameter ``name`` is a number in range (never NaN)."""
  ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and value >= minimum
        and (maximum is None or value <= maximum) and (not finite or math.isfinite(value)))
  if not ok:
    kind = "a finite number" if finite else "a number"
    raise ConfigError(f"{algorithm} hyperparameter {name}={value!r} must be "
                      f"{_accepted(kind, minimum, maximum)}")


def stack_clients(tree, num_clients: int):
  """Copies one client's state ``num_clients`` times along a new leading axis."""
  return jax.tree.map(lambda a: jax.numpy.broadcast_to(a, (num_clients,) + a.shape), tree)
