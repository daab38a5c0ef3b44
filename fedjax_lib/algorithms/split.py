"""Shared pieces of the base/head ("split") algorithms: FedPer, FedRep, LG-FedAvg.

Every model's variables are ``{'params': {'base': ..., 'head': ...}}`` (see
`fedjax_lib.models.base`). A split algorithm communicates one *part* (``'base'`` or ``'head'``)
and keeps the other on each client. Here a set of parts is a dict keyed by part name, e.g.
``{'base': base_params}``; a part without parameters (the identity base of logistic
regression) is ``{}``.

- :func:`split_parts` / :func:`merge_parts` convert between variables and parts.
- :func:`train_parts` trains only some parts: gradients are taken w.r.t. the trainable parts
  alone, with the frozen parts closed over as constants (PFLlib's ``requires_grad=False``).
- :class:`SplitAlgorithm` holds the shared part on the server (``{SHARED: ...}``) and the
  personal part per client (``{PERSONAL: ...}`` stacked over clients, all clients starting
  from the same initial parameters); the server averages the uploaded shared parts weighted by
  sample count, and a client predicts with the server's shared part plus its own personal part.
  A model with BatchNorm keeps its running statistics on the client (``'model_state'``), as
  PFLlib and HtFLlib do (they communicate parameters only, never buffers).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Iterable, Optional

import jax
import optax

from fedjax_lib.algorithms.base import (Algorithm, FeatureViews, SettingsContext,
                                        abstract_variables, has_hook, linear_server,
                                        stack_clients, untrained_new_clients)
from fedjax_lib.core.aggregate import weighted_average
from fedjax_lib.core.local import (ClientData, LocalSpec, LossFn, cross_entropy_objective,
                                   train_locally, train_model)
from fedjax_lib.errors import ConfigError
from fedjax_lib.models.base import merge_params, model_state, split_params

PARTS = ("base", "head")


def split_parts(variables) -> dict[str, Any]:
  """``{'base': base_params, 'head': head_params}`` of model variables (``{}`` if absent)."""
  base, head = split_params(variables)
  return {"base": base, "head": head}


def merge_parts(*parts: dict[str, Any]):
  """Model variables from one or more part dicts (inverse of :func:`split_parts`).

  Args:
    *parts: dicts keyed by ``'base'``/``'head'``; together they name each part at most once.

  Returns:
    ``{'params': {...}}`` with empty parts left out, as `merge_params` builds it.
  """
  merged = {}
  for p in parts:
    if set(p) - set(PARTS) or set(p) & set(merged):
      raise ValueError(f"expected disjoint base/head parts, got {[sorted(q) for q in parts]}")
    merged.update(p)
  return merge_params(merged.get("base", {}), merged.get("head", {}))


def train_parts(variables, trainable: Iterable[str], data: ClientData, key: jax.Array,
                spec: LocalSpec, loss_fn: LossFn,
                tx: Optional[optax.GradientTransformation] = None):
  """Local training of the parts named in ``trainable``; the other parts stay bit-identical.

  Args:
    variables: the full model variables.
    trainable: part names to train (``'base'``, ``'head'`` or both).
    data, key, spec, tx: as for `fedjax_lib.core.local.train_locally`.
    loss_fn: ``loss_fn(variables, batch, key)`` over the FULL variables.

  Returns:
    ``(variables, stats)``: the updated full variables and the training statistics.
  """
  trainable = tuple(trainable)
  parts = split_parts(variables)
  train = {k: v for k, v in parts.items() if k in trainable}
  frozen = {k: v for k, v in parts.items() if k not in trainable}

  def part_loss(train_parts_, batch, step_key):
    return loss_fn(merge_parts(train_parts_, frozen), batch, step_key)

  train, _, stats = train_locally(train, data, key, spec, part_loss, tx=tx)
  return merge_parts(train, frozen), stats


@dataclasses.dataclass(frozen=True)
class SplitAlgorithm(Algorithm):
  """A server-side shared part and a per-client personal part; joint local training.

  Subclasses set ``SHARED`` (``'base'`` or ``'head'``) and may override
  :meth:`train_client`, which maps full variables to trained full variables.
  """


  SHARED: ClassVar[str] = "base"

  @property
  def personal(self) -> str:
    return "head" if self.SHARED == "base" else "base"

  def init(self, key, sample_x, num_clients):
    variables = self.init_params(key, sample_x)
    parts = split_parts(variables)
    server = {self.SHARED: parts[self.SHARED]}
    return server, stack_clients(self._client_state(variables), num_clients)

  def _client_state(self, variables):
    """The personal part of ``variables`` and, for BatchNorm models, the running statistics."""
    state = {self.personal: split_parts(variables)[self.personal]}
    if model_state(variables):
      state["model_state"] = model_state(variables)
    return state

  def variables(self, server_state, client_state):
    """A client's full model: the shared part, its personal part and running statistics."""
    personal = {self.personal: client_state[self.personal]}
    return {**merge_parts(server_state, personal), **client_state.get("model_state", {})}

  def feature_views(self, server_state, client_state):
    """With a shared base (FedPer, FedRep): each client's personal head on the shared
    base's features (its model is exactly that). None for a personal base (LG-FedAvg),
    client-held running statistics, or a subclass that predicts otherwise."""
    own = type(self)
    if (self.SHARED != "base" or "model_state" in client_state
        or own.predict is not SplitAlgorithm.predict
        or own.variables is not SplitAlgorithm.variables or has_hook(self, "eval_views")):
      return None
    shared = merge_parts(server_state)
    return FeatureViews(
        features=lambda x: self.model.apply(shared, x, method="features"),
        heads={"": lambda state, z: self.model.apply(
            merge_parts({self.personal: state[self.personal]}), z, method="classify")})

  def train_client(self, variables, data, key):
    """Joint cross-entropy training of base and head (FedPer, LG-FedAvg)."""
    variables, _, stats = train_model(self.model, variables, data, key, self.local,
                                      cross_entropy_objective)
    return variables, stats

  def client_update(self, server_state, client_state, data, key):
    variables, stats = self.train_client(self.variables(server_state, client_state), data, key)
    upload = {self.SHARED: split_parts(variables)[self.SHARED]}
    return self._client_state(variables), upload, stats

  @linear_server
  def server_update(self, server_state, uploads, weights, key):
    del key
    return weighted_average(uploads, weights, fallback=server_state)

  def predict(self, server_state, client_state, x):
    return self.model.apply(self.variables(server_state, client_state), x)

  def new_client_variables(self, server_state, client_state):
    """The global shared part with a freshly initialised personal part."""
    return self.variables(server_state, client_state)

  def check_settings(self, context: SettingsContext) -> list[str]:
    """Refuses a model whose shared part is empty (nothing would be communicated); warns
    when the personal part is empty (no personalization) or new clients are tested with an
    untrained personal part."""
    parts = split_parts(abstract_variables(self.model, context.sample_x))
    if not jax.tree.leaves(parts[self.SHARED]):
      raise ConfigError(
          f"{self.name} shares the model's {self.SHARED}, but model {context.model_name!r} has "
          f"no {self.SHARED} parameters, so nothing would be communicated (the run would be "
          f"Local); use a model with a {self.SHARED} (cnn, dnn) or -algo Local")
    if not jax.tree.leaves(parts[self.personal]):
      return [f"{self.name} keeps the {self.personal} personal, but model "
              f"{context.model_name!r} has no {self.personal} parameters: its clients are "
              f"not personalized (they run FedAvg on the {self.SHARED}); use a model with a "
              f"{self.personal} (cnn, dnn)"]
    return untrained_new_clients(self.name, self.personal, context)


def dense_head_shape(variables, model_name: str = "this model",
                     purpose: str = "this algorithm shares one global head Linear(d, C)"
                     ) -> tuple[int, int]:
  """``(d, C)`` of a head that is one dense layer ``{'kernel': [d, C], 'bias': [C]}``; a
  ConfigError saying ``purpose`` for any other head (shapes only: works on abstract
  variables). FedGH and FedGen share such a head across architectures."""
  head = split_parts(variables)["head"]
  shapes = {k: tuple(v.shape) for k, v in head.items() if hasattr(v, "shape")}
  if set(head) == {"kernel", "bias"} and len(shapes) == 2 and len(shapes["kernel"]) == 2 \
      and shapes["bias"] == shapes["kernel"][1:]:
    return shapes["kernel"]
  structure = jax.tree.map(lambda a: list(a.shape), head)
  raise ConfigError(
      f"{purpose}, but {model_name}'s head is {structure}; HtFLlib crashes here too (its "
      "issue #3). Use models whose head is one dense layer (no +head suffix, no ViT), or an "
      "algorithm that shares no head (Local, FD, FedProto, FedTGP)")
