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

Nothing is kept on ``self`` between calls; the engine owns every piece of state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax

from fedjax_lib.core.local import Batch, LocalSpec, masked_cross_entropy


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """Base class: the model, local training settings, and shared helpers."""

  model: Any
  local: LocalSpec

  name: ClassVar[str] = ""
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


def stack_clients(tree, num_clients: int):
  """Copies one client's state ``num_clients`` times along a new leading axis."""
  return jax.tree.map(lambda a: jax.numpy.broadcast_to(a, (num_clients,) + a.shape).copy(), tree)
