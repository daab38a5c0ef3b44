"""FedNTD: Preservation of the Global Knowledge by Not-True Distillation in Federated Learning.

Lee, Jeong, Shin, Yun, NeurIPS 2022 (PFLlib ``-algo FedNTD``).

FedAvg whose local loss adds a distillation term from the received global model restricted to
the *not-true* classes. For a sample of class y, drop the y-th logit of the local model's
``f(x)`` and of the global model's ``f_g(x)`` (held fixed), and soften what remains with the
temperature τ: ``p̃ = softmax(f_{−y}(x)/τ)``, ``q̃ = softmax(f_g,−y(x)/τ)`` over the C − 1
other classes. The local loss is

    CE(f(x), y) + β · τ² · (1/B) Σ_i KL(q̃_i ‖ p̃_i)

(:func:`not_true_distillation`): the client learns its own labels freely while keeping the
global model's view of how the other classes relate, which is what forgetting destroys under
label skew. The client uploads its model; the server is FedAvg's sample-weighted average (the
paper's), and every client is evaluated with the global model.

Hyperparameters: ``beta`` (``-bt``) the distillation weight β >= 0, default 1.0 (the paper's;
see below); ``tau`` (``-tau``, default 1.0 as PFLlib's and the paper's) the temperature τ > 0;
``pfllib_compat`` (default False).

Differences from PFLlib:

- Default β: PFLlib's ``-bt`` defaults to 0.0, which removes the distillation term and makes
  its FedNTD exactly FedAvg. Because that default disables the algorithm, β defaults to the
  paper's 1 here; ``-bt 0`` gives PFLlib's default behaviour.
- Aggregation: PFLlib's FedNTD server adds every upload with weight ``1/num_join_clients``,
  a uniform average instead of FedAvg's sample-weighted one. (It divides by the planned
  number of participants rather than by the number of uploads, so its weights do not sum to
  1 when clients drop out, ``-cdr``, and the model shrinks, or with ``-rjr``, which selects
  more clients than planned, and the model grows.) The default here is the paper's
  sample-weighted FedAvg; ``pfllib_compat=True`` (``--pfllib-compat``) reproduces PFLlib's
  ``Σ_k w_k / int(N·join_ratio)`` over the uploads that arrived (as SCAFFOLD's and FedDyn's
  compat modes divide; it needs ``join_ratio`` to be the run's ``-jr``, which the runner
  fills). It stays a linear server: each client uploads ``w_k / n_k`` (``n_k`` its training
  samples, the weight the engine gives its upload), whose sample-weighted mean times the
  weights' sum ``Σ n`` is ``Σ_k w_k``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fedjax_lib.algorithms.base import check_bool, check_number, check_positive, linear_server
from fedjax_lib.algorithms.fedavg import FedAvg
from fedjax_lib.algorithms.registry import register
from fedjax_lib.algorithms.scaffold import check_join_ratio, client_counts
from fedjax_lib.core.aggregate import weighted_average
from fedjax_lib.core.local import masked_cross_entropy, train_locally


def not_true_logits(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """``logits [B, C]`` without each row's true class: ``[B, C − 1]``, order kept."""
  num_classes = logits.shape[-1]
  others = jnp.arange(num_classes - 1)[None, :]
  positions = others + (others >= labels[:, None])
  return jnp.take_along_axis(logits, positions, axis=-1)


def not_true_distillation(logits: jax.Array, global_logits: jax.Array, labels: jax.Array,
                          mask: jax.Array, tau) -> jax.Array:
  """FedNTD's not-true distillation loss, ``τ² · KL(q̃ ‖ p̃)`` averaged over the rows with
  ``mask`` (PyTorch's ``KLDivLoss(reduction="batchmean")``).

  ``p̃ = softmax(f_{−y}/τ)`` of the local ``logits`` and ``q̃ = softmax(f_g,−y/τ)`` of the
  ``global_logits`` (a constant: no gradient flows into it), both over the classes other
  than the row's label.

  Args:
    logits: ``[B, C]`` logits of the model being trained.
    global_logits: ``[B, C]`` logits of the received global model.
    labels: ``[B]`` integer classes.
    mask: ``[B]``, 1 for real samples.
    tau: the temperature τ > 0.

  Returns:
    A float32 scalar (0 without real samples).
  """
  local = not_true_logits(logits.astype(jnp.float32), labels) / tau
  target = not_true_logits(jax.lax.stop_gradient(global_logits).astype(jnp.float32),
                           labels) / tau
  log_p, log_q = jax.nn.log_softmax(local), jax.nn.log_softmax(target)
  # From log q, so a target probability that underflows to 0 gives a 0 term (as PyTorch's
  # xlogy-based KLDivLoss), never 0 · (−inf).
  per_sample = jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)
  mask = mask.astype(jnp.float32)
  return tau ** 2 * (per_sample * mask).sum() / jnp.maximum(mask.sum(), 1.0)


@register("FedNTD")
@dataclasses.dataclass(frozen=True)
class FedNTD(FedAvg):
  """FedAvg whose local loss adds β times the not-true distillation from the global model.

  Server state ``{"params"}``; no client state.

  Attributes:
    beta: weight β of the not-true distillation (PFLlib ``-bt``; default 1.0, the paper's,
      where PFLlib's 0.0 would be FedAvg).
    tau: distillation temperature τ (PFLlib ``-tau``, default 1.0), > 0.
    join_ratio: the run's ``-jr``, for PFLlib's divisor ``int(N·join_ratio)`` (compat only;
      the runner fills it).
    pfllib_compat: sum the uploads and divide by ``int(N·join_ratio)``, as PFLlib's FedNTD
      server does, instead of averaging them by sample count.
  """
  DECAYED_RATES = ("local.learning_rate",)  # -ld: the one SGD optimizer

  beta: float = 1.0
  tau: float = 1.0
  join_ratio: float = 1.0
  pfllib_compat: bool = False

  def __post_init__(self):
    check_number(self.name, "beta", self.beta)
    check_positive(self.name, "tau", self.tau, "-tau")
    check_join_ratio(self.name, self.join_ratio)
    check_bool(self.name, "pfllib_compat", self.pfllib_compat)

  def init(self, key, sample_x, num_clients):
    server, clients = super().init(key, sample_x, num_clients)
    if self.pfllib_compat:  # PFLlib's planned join count int(N·jr)
      server["num_join_clients"] = client_counts(num_clients, self.join_ratio)[
          "num_join_clients"]
    return server, clients

  def download(self, server_state):
    return {"params": server_state["params"]}

  def local_loss(self, server_state):
    """``CE + β·NTD`` against the received global model."""
    global_params = server_state["params"]

    def loss(params, batch, key):
      del key
      logits = self.model.apply(params, batch.x)
      global_logits = self.model.apply(global_params, batch.x)
      distillation = not_true_distillation(logits, global_logits, batch.y, batch.mask,
                                           self.tau)
      return masked_cross_entropy(logits, batch.y, batch.mask) + self.beta * distillation
    return loss

  def client_update(self, server_state, client_state, data, key):
    params, _, stats = train_locally(server_state["params"], data, key, self.local,
                                     self.local_loss(server_state))
    if not self.pfllib_compat:
      return client_state, params, stats
    # The engine weighs this upload by n_k: dividing by n_k makes the weighted sum Σ_k w_k.
    inv = 1.0 / jnp.maximum(data.train_count.astype(jnp.float32), 1.0)
    return client_state, jax.tree.map(lambda p: (p * inv).astype(p.dtype), params), stats

  @linear_server
  def server_update(self, server_state, uploads, weights, key):
    del key
    old = server_state["params"]
    if not self.pfllib_compat:
      return {"params": weighted_average(uploads, weights, fallback=old)}
    total = jnp.sum(jnp.asarray(weights, jnp.float32))  # Σ n_k over the uploads that arrived
    scale = total / server_state["num_join_clients"].astype(jnp.float32)
    params = jax.tree.map(lambda m, o: jnp.where(total > 0, m * scale, o).astype(o.dtype),
                          weighted_average(uploads, weights), old)
    return dict(server_state, params=params)
