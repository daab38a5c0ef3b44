"""SCAFFOLD: Stochastic Controlled Averaging for Federated Learning.

Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, ICML 2020.

Control variates correct the client drift of local SGD. The server keeps the global model
``x`` and a server control ``c``; every client keeps its own control ``c_i`` (all zero at the
start). A selected client receives ``(x, c)`` and

1. runs local SGD from ``y = x`` with the corrected step ``y ← y − lr·(g + c − c_i)``, where
   ``g`` is the mini-batch cross-entropy gradient (:func:`control_correction`, an optax
   transform in front of the shared routine's SGD: the reported local loss is plain
   cross-entropy);
2. updates its control with the paper's option II,
   ``c_i⁺ = c_i − c + (x − y_i)/(K·lr)``, ``K`` the number of local steps it actually took
   (``count // batch_size`` per epoch, drop_last, as the shared routine counts valid steps;
   :func:`updated_control`);
3. uploads ``Δy = y_i − x`` and ``Δc = c_i⁺ − c_i``.

The server, over the set ``S`` of clients whose uploads arrived (weight > 0), takes the
unweighted means the paper prescribes:

    x ← x + η_g · Σ_{i∈S} Δy_i / |S|,        c ← c + Σ_{i∈S} Δc_i / N,

``η_g`` = ``server_learning_rate`` (PFLlib ``-slr``, default 1.0) and ``N`` the number of
(training) clients, kept in the server state from ``init``. Every client is evaluated with
the global model ``x``, as FedAvg. A round in which no upload arrives changes nothing.

State: server ``{"params": x, "control": c, "num_clients": N, "num_join_clients":
int(N·join_ratio)}`` (the counts are int32 scalars, not sent); client ``{"control": c_i}``
stacked over all clients. The download is ``(x, c)``, the upload ``(Δy, Δc)``: twice the
model each way, as in the paper.

Differences from PFLlib:

- PFLlib divides the server's model step by the planned join count ``num_join_clients =
  int(N·join_ratio)``, not by the number of uploads that arrived; with ``client_drop_rate``
  > 0 (or ``random_join_ratio``) its server step is scaled by ``|S|/num_join_clients``. Here
  it is ``1/|S|`` (the paper's mean). ``pfllib_compat=True`` (``--pfllib-compat``) divides by
  ``int(N·join_ratio)``; it needs ``join_ratio`` to be the run's ``-jr`` (the runner fills it).
  Identical when every planned client arrives (the default ``-jr 1 -cdr 0``).
- A client with fewer training samples than ``batch_size`` takes no step (K = 0); PFLlib
  would divide by zero. Here it keeps its control and uploads zero changes (``c_i⁺ = c_i``,
  ``Δy = Δc = 0``).
- A client that trained but dropped out keeps its new ``c_i`` (the engine keeps a dropped
  client's state, as PFLlib's clients keep theirs) while the server never adds its ``Δc``, so
  ``c`` is then no longer the mean of the ``c_i``. PFLlib does the same.
- Models with BatchNorm or dropout train in training mode; the controls, ``Δy`` and ``Δc``
  cover the parameters only and each client keeps its running statistics
  (``client_state['model_state']``), as PFLlib's loops over ``model.parameters()`` do.
- The gradient correction is a transform in front of SGD, ``−lr·(g + (c − c_i))``; PFLlib's
  optimizer computes ``−lr·((g + c) − c_i)`` (float rounding only).
- Learning-rate decay (``-ld``): PFLlib decays its ``SCAFFOLDOptimizer`` but divides the
  control's drift by the undecayed ``self.learning_rate``, so in a client's (k+1)-th training
  ``c_i⁺`` holds γ^k times the mean corrected gradient. Here option II divides by the rate the
  client stepped with (``lr·γ^k``); ``pfllib_compat=True`` divides by the undecayed one.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lib.algorithms.base import check_bool, check_number, check_positive
from fedjax_lib.algorithms.fedavg import FedAvg
from fedjax_lib.algorithms.registry import register
from fedjax_lib.core.aggregate import arrived_sum
from fedjax_lib.core.local import train_locally
from fedjax_lib.errors import ConfigError
from fedjax_lib.models.base import has_train_mode


class _NoState(NamedTuple):
  """The (empty) state of :func:`control_correction`."""


def control_correction(correction) -> optax.GradientTransformation:
  """An optax transform adding the constant pytree ``correction`` to every gradient.

  Chained in front of ``optax.sgd(lr)`` it gives SCAFFOLD's client step
  ``y ← y − lr·(g + correction)`` with ``correction = c − c_i``.
  """

  def init(params):
    del params
    return _NoState()

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda g, d: g + d.astype(g.dtype), updates, correction), state

  return optax.GradientTransformation(init, update)


def updated_control(client_control, server_control, x, y, num_steps, learning_rate):
  """SCAFFOLD's option II: ``c_i⁺ = c_i − c + (x − y)/(K·lr)``, float32, every leaf.

  Args:
    client_control: ``c_i``.
    server_control: ``c``.
    x: the model the client started from (the received global model).
    y: the client's model after its ``K = num_steps`` local steps.
    num_steps: K, a scalar; with K = 0 the client learned nothing and keeps ``c_i``.
    learning_rate: the local SGD step size.

  Returns:
    ``c_i⁺`` (a pytree shaped like ``c_i``).
  """
  trained = num_steps > 0
  scale = jnp.where(trained, 1.0 / (jnp.maximum(num_steps, 1).astype(jnp.float32)
                                    * learning_rate), 0.0)

  def leaf(ci, c, xl, yl):
    drift = (xl.astype(jnp.float32) - yl.astype(jnp.float32)) * scale
    new = ci.astype(jnp.float32) - c.astype(jnp.float32) + drift
    return jnp.where(trained, new, ci.astype(jnp.float32)).astype(ci.dtype)

  return jax.tree.map(leaf, client_control, server_control, x, y)


def check_join_ratio(algorithm: str, value) -> None:
  """Raises a ConfigError unless ``join_ratio`` is in (0, 1]."""
  check_number(algorithm, "join_ratio", value, 0.0, 1.0)
  if not value > 0:
    raise ConfigError(f"{algorithm} hyperparameter join_ratio={value!r} must be a number in "
                      "(0, 1] (-jr)")


def planned_join_count(num_clients: int, join_ratio: float) -> int:
  """PFLlib's ``num_join_clients = int(N·join_ratio)`` (at least 1), computed in Python as
  PFLlib does, so 0.29·100 gives 28 like it."""
  return max(int(num_clients * join_ratio), 1)


def client_counts(num_clients: int, join_ratio: float) -> dict:
  """The int32 scalars ``N`` and PFLlib's planned join count (:func:`planned_join_count`)
  kept in the server state."""
  return {"num_clients": jnp.int32(num_clients),
          "num_join_clients": jnp.int32(planned_join_count(num_clients, join_ratio))}


@register("SCAFFOLD")
@dataclasses.dataclass(frozen=True)
class SCAFFOLD(FedAvg):
  """FedAvg with server and client control variates correcting every local step.

  Attributes:
    server_learning_rate: η_g of the server's model step (PFLlib ``-slr``, default 1.0).
    join_ratio: the run's ``-jr``, only read with ``pfllib_compat`` (the planned join count
      ``int(N·join_ratio)`` PFLlib divides by); the runner fills it.
    pfllib_compat: divide the model step by the planned join count, not by the number of
      uploads that arrived, and (with ``-ld``) the control's drift by the undecayed rate
      (see the module docstring).
  """

  server_learning_rate: float = 1.0
  join_ratio: float = 1.0
  pfllib_compat: bool = False

  def __post_init__(self):
    check_positive(self.name, "server_learning_rate", self.server_learning_rate, "-slr")
    check_join_ratio(self.name, self.join_ratio)
    check_bool(self.name, "pfllib_compat", self.pfllib_compat)

  TRAIN_MODE = True
  DECAYED_RATES = ("local.learning_rate",)  # -ld: SCAFFOLDOptimizer (see the docstring)

  def init(self, key, sample_x, num_clients):
    server, clients = super().init(key, sample_x, num_clients)  # FedAvg's: statistics apart
    params = server["params"]
    zeros = jax.tree.map(jnp.zeros_like, params)
    server = {"params": params, "control": zeros,
              **client_counts(num_clients, self.join_ratio)}
    clients = {"control": jax.tree.map(
        lambda a: jnp.zeros((num_clients,) + a.shape, a.dtype), params), **clients}
    return server, clients

  def download(self, server_state):
    return {"params": server_state["params"], "control": server_state["control"]}

  def client_update(self, server_state, client_state, data, key):
    x, c, ci = server_state["params"], server_state["control"], client_state["control"]
    correction = jax.tree.map(lambda a, b: a - b, c, ci)
    sgd = optax.sgd(self.local.learning_rate)
    new_state = {}
    if has_train_mode(self.model):  # x = {'params': ...}; statistics stay on the client
      y, new_state, stats = self.train_global_copy(
          server_state, client_state, data, key,
          tx=optax.chain(control_correction(correction["params"]), sgd))
    else:
      tx = optax.chain(control_correction(correction), sgd)
      y, _, stats = train_locally(x, data, key, self.local, self.ce_loss, tx=tx)
    divisor = self.local.learning_rate  # the rate of the steps taken (-ld: decayed)
    if self.pfllib_compat:
      divisor = self.undecayed("local.learning_rate")
    new_ci = updated_control(ci, c, x, y, stats["steps"], divisor)
    upload = {"delta_params": jax.tree.map(lambda a, b: a - b, y, x),
              "delta_control": jax.tree.map(lambda a, b: a - b, new_ci, ci)}
    return {"control": new_ci, **new_state}, upload, stats

  def server_update(self, server_state, uploads, weights, key):
    """``x ← x + η_g·ΣΔy/|S|``, ``c ← c + ΣΔc/N`` over the uploads that arrived."""
    del key
    arrived = jnp.sum(jnp.asarray(weights) > 0)
    if self.pfllib_compat:
      denominator = server_state["num_join_clients"]
    else:
      denominator = jnp.maximum(arrived, 1)
    step = self.server_learning_rate / denominator.astype(jnp.float32)
    num_clients = server_state["num_clients"].astype(jnp.float32)
    sum_dy = arrived_sum(uploads["delta_params"], weights)
    sum_dc = arrived_sum(uploads["delta_control"], weights)
    params = jax.tree.map(lambda p, d: (p.astype(jnp.float32) + step * d).astype(p.dtype),
                          server_state["params"], sum_dy)
    control = jax.tree.map(lambda p, d: (p.astype(jnp.float32) + d / num_clients).astype(
        p.dtype), server_state["control"], sum_dc)
    return dict(server_state, params=params, control=control)
