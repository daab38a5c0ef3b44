"""FedLC: Federated Learning with Label Distribution Skew via Logits Calibration.

Zhang, Li, Li, Xu, Wu, Ding, Wu, ICML 2022 (PFLlib ``-algo FedLC``).

FedAvg whose local loss is cross-entropy on calibrated logits: before the softmax every logit
is lowered by a class-dependent margin that is larger for rarer classes,

    CE(f(x) − Δ, y),   Δ_c = τ · n_c^(−1/4),

where ``n_c`` is the number of training samples of class c on the client
(:func:`calibrated_cross_entropy`). A sample of a rare class must beat the other logits by a
wider margin, and a rare or missing class's logit is pushed down less by the other classes'
samples, which counters the over-fitting of local models to their label skew. The client
uploads its model; the server is FedAvg's sample-weighted average and every client is
evaluated with the global model (uncalibrated logits).

A class the client has no samples of (``n_c = 0``) gets the margin of a class with one sample,
``Δ_c = τ``: the formula's value there is infinite, which removes the class from the local
softmax altogether, and then a client never learns to tell its classes from the ones it lacks.
Measured on the bundled digits (20 clients, Dirichlet α = 0.1, DNN, lr 0.05, τ = 1, seeds
0/1/2), best accuracy after 20 rounds: FedAvg .904 / .910 / .917, FedLC with this rule
.901 / .913 / .910, with infinite margins .851 / .794 / .851 (after 5 rounds: .686 / .503 /
.621, against FedAvg's .700 / .689 / .667).

Procedure: an initialisation period (the engine's warm-up hooks) counts every training
client's samples per class once before round 0 and the server stores their sum,
``class_counts``; each round is then FedAvg with the calibrated loss.

State: server ``{"params", "class_counts" [C]}`` (the total over all training clients, used by
``pfllib_compat``); clients keep none (each client counts its own labels from its data).

Hyperparameters: ``tau`` (``-tau``, default 1.0 as PFLlib's): the calibration strength τ >= 0;
τ = 0 is FedAvg. ``pfllib_compat`` (default False): see below.

Differences from PFLlib:

- PFLlib calibrates with the *global* class counts, summed over all clients at start-up and
  given to every client, instead of each client's own counts as the paper does (its
  ``n_{m,c}``, client m's label distribution; FL-bench and fluke do the same). Under label
  skew the global counts are nearly balanced, so PFLlib's margin is nearly the same for every
  class, i.e. nearly a constant shift of the logits that the softmax ignores, and its FedLC is
  close to FedAvg. The default here follows the paper; ``pfllib_compat=True``
  (``--pfllib-compat``) calibrates with the global counts (the initialisation period's
  ``class_counts``), and, as PFLlib's ``0^(−1/4) = inf`` does, gives a class no training
  client has an infinite margin (a ``−inf`` logit in training).
- PFLlib counts one shuffled drop_last pass over each client's training data, which may miss
  up to ``batch_size − 1`` samples per client; the counts here are exact.
- New clients (``-nnc``) fine-tune the global model with plain cross-entropy (PFLlib's new
  FedLC clients never receive a calibration).
- The paper writes the loss's denominator over the classes other than y; PFLlib, FL-bench and
  fluke all use the full softmax, as here.
- Models with BatchNorm or dropout train in training mode, each client keeping its running
  statistics (``client_state['model_state']``, never sent, as in FedAvg).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fedjax_lib.algorithms.base import check_bool, check_number, linear_server
from fedjax_lib.algorithms.fedavg import FedAvg
from fedjax_lib.algorithms.registry import register
from fedjax_lib.core.aggregate import weighted_average
from fedjax_lib.core.local import class_counts, masked_cross_entropy, train_locally
from fedjax_lib.models.base import has_train_mode


def calibration_margin(counts: jax.Array, tau, exclude_absent: bool = False) -> jax.Array:
  """FedLC's margins ``Δ_c = τ · n_c^(−1/4)``, float32 ``[C]``.

  Args:
    counts: ``[C]`` training samples per class.
    tau: the calibration strength τ >= 0.
    exclude_absent: a class with ``n_c = 0`` gets ``+inf`` (PFLlib's value; 0 when τ = 0)
      instead of the margin of a class with one sample, ``τ``.
  """
  counts = jnp.asarray(counts, jnp.float32)
  margin = tau * jnp.maximum(counts, 1.0) ** -0.25
  if exclude_absent:
    margin = jnp.where((counts > 0) | (jnp.asarray(tau) <= 0), margin, jnp.inf)
  return margin.astype(jnp.float32)


def calibrated_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array,
                             counts: jax.Array, tau, exclude_absent: bool = False) -> jax.Array:
  """FedLC's loss: mean softmax cross-entropy of ``logits − Δ`` over the rows with ``mask``,
  ``Δ`` from :func:`calibration_margin`.

  Args:
    logits: ``[B, C]``.
    labels: ``[B]`` integer classes.
    mask: ``[B]``, 1 for real samples.
    counts: ``[C]`` training samples per class.
    tau: the calibration strength τ >= 0.
    exclude_absent: a class without samples gets a ``−inf`` logit (PFLlib) instead of the
      margin ``τ``.

  Returns:
    A float32 scalar.
  """
  calibrated = logits.astype(jnp.float32) - calibration_margin(counts, tau, exclude_absent)
  return masked_cross_entropy(calibrated, labels, mask)


@register("FedLC")
@dataclasses.dataclass(frozen=True)
class FedLC(FedAvg):
  """FedAvg with cross-entropy on logits calibrated by ``τ·n_c^(−1/4)``.

  Server state ``{"params", "class_counts"}``; no client state (BatchNorm models: the
  running statistics).

  Attributes:
    tau: calibration strength τ (PFLlib ``-tau``, default 1.0); 0 is FedAvg.
    pfllib_compat: calibrate with the global class counts, as PFLlib does, instead of each
      client's own (see the module docstring).
  """

  REFERENCE_SPLIT = True  # PFLlib's main.py wraps the model in BaseHeadSplit
  DECAYED_RATES = ("local.learning_rate",)  # -ld: the one SGD optimizer

  tau: float = 1.0
  pfllib_compat: bool = False

  def __post_init__(self):
    check_number(self.name, "tau", self.tau)
    check_bool(self.name, "pfllib_compat", self.pfllib_compat)

  TRAIN_MODE = True

  def init(self, key, sample_x, num_clients):
    server, clients = super().init(key, sample_x, num_clients)  # statistics per client
    num_classes = jax.eval_shape(self.model.apply, self.init_params(key, sample_x),
                                 sample_x[None]).shape[-1]
    counts = jnp.zeros((num_classes,), jnp.float32)
    return {"params": server["params"], "class_counts": counts}, clients

  # ---------------------------------------------------------------- initialisation period
  def warmup_client(self, server_state, client_state, data, key):
    """Uploads the client's training samples per class."""
    del key
    return client_state, class_counts(data, server_state["class_counts"].shape[0])

  def warmup_server(self, server_state, uploads, weights, key):
    """``class_counts`` = the sum of every training client's counts; params unchanged."""
    del key
    taken = (jnp.asarray(weights) > 0).astype(jnp.float32)
    return {"params": server_state["params"],
            "class_counts": jnp.tensordot(taken, uploads, axes=1)}

  # ---------------------------------------------------------------- rounds
  def client_update(self, server_state, client_state, data, key):
    params = server_state["params"]
    if self.pfllib_compat:
      counts = server_state["class_counts"]
    else:
      counts = class_counts(data, server_state["class_counts"].shape[0])

    if has_train_mode(self.model):  # BatchNorm/dropout: training mode, statistics kept
      def objective(features, logits, batch, carry):
        del features
        return calibrated_cross_entropy(logits, batch.y, batch.mask, counts, self.tau,
                                        exclude_absent=self.pfllib_compat), carry

      params, state, stats = self.train_global_copy(server_state, client_state, data, key,
                                                    objective=objective)
      return state, params, stats

    def loss(params, batch, key):
      del key
      return calibrated_cross_entropy(self.model.apply(params, batch.x), batch.y, batch.mask,
                                      counts, self.tau, exclude_absent=self.pfllib_compat)

    params, _, stats = train_locally(params, data, key, self.local, loss)
    return client_state, params, stats

  @linear_server
  def server_update(self, server_state, uploads, weights, key):
    del key
    return {"params": weighted_average(uploads, weights, fallback=server_state["params"]),
            "class_counts": server_state["class_counts"]}

  def download(self, server_state):
    """The global model; the counts are given once, in the initialisation period."""
    return {"params": server_state["params"]}
