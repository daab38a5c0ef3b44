"""FedPHP: Federated Personalization with Inherited Private Models.

Li, Zhan, Shao, Li, Song, ECML PKDD 2021 (PFLlib ``-algo FedPHP``).

FedAvg whose clients each keep an inherited private model ``θ_p`` (the paper's HPM), a moving
average of their own locally trained models that serves as a teacher. In round R a selected
client receives the global model ``θ_g`` and

1. trains ``θ`` from ``θ_g`` by local SGD on

       (1 − λ)·CE(head(base_θ(x)), y) + λ·MMD(base_θ(x), base_θp(x))

   with the private model's features as constants (:func:`mmd`, PFLlib's kernel below);
2. updates its private model ``θ_p ← (1 − μ_R)·θ + μ_R·θ_p`` with ``μ_R = μ·R/R_total``
   (``R_total`` = ``global_rounds``), so the private model inherits more of its history as
   training goes on (``μ_0 = 0``: in round 0 it becomes the trained model);
3. uploads ``θ``; the server is FedAvg's sample-weighted average (and counts the rounds).

Every private model starts as the initial global model. A client is evaluated with its private
model ``θ_p`` (the ``personal`` view, ``test_acc``; ``global`` is the server model).

MMD (PFLlib's ``MMD(x, y, 'rbf')``): the biased estimate of the squared maximum mean
discrepancy between the batch's features ``X`` and the teacher's ``Y`` under a sum of four
Gaussian kernels,

    k(a, b) = Σ_{s ∈ (10, 15, 20, 50)} exp(−‖a − b‖²/(2s)),
    MMD = mean_{i,j} [ k(x_i, x_j) + k(y_i, y_j) − 2·k(x_i, y_j) ].

State: server ``{"params": θ_g, "round": R (int32)}``; client ``{"private": θ_p}`` (and
``"local"``: the last trained ``θ``, with ``pfllib_compat``).

Hyperparameters: ``mu`` μ in [0, 1] (``-mu``, 0.9), ``lam`` λ in [0, 1] (``-lam``, 0.01), and
``global_rounds`` (``-gr``, which the runner fills in).

Differences from PFLlib (``pfllib_compat=True``, ``--pfllib-compat``, evaluates as PFLlib):

- **The evaluated model.** PFLlib evaluates, after local training, each client's local model
  ``θ`` (the global model after one round of local SGD; clients not selected: the global
  model), never the private model. The paper and its authors' code (FedRepo) evaluate the
  private model. Default: ``θ_p`` (views ``personal``, ``global``). Compat: the client's last
  trained ``θ`` (views ``local``, then ``personal``; a client not selected in the previous
  round shows its last ``θ`` where PFLlib shows the global model: the same with ``-jr 1``).
  The engine evaluates before each round's training, so the state PFLlib reports at round r
  is reported here at round r + 1, and PFLlib's last entry (the models trained in its final
  round) has no counterpart: a compat run's "last" accuracy is PFLlib's second-to-last.
- **Defaults.** ``mu = 0.9, lam = 0.01``, the values PFLlib's author recommends for FedPHP
  (PFLlib issue #102; 0.9 is also the authors' cap on μ). PFLlib's shared defaults ``-mu 0
  -lam 1`` make ``(1 − λ) = 0``: its local models never see a label, and ``θ_p = θ``.
- The authors' code sets ``μ = 0.9·n_c/⌊jr·R_total⌋`` (at most 0.9) from the client's number
  ``n_c`` of earlier participations; PFLlib's ``μ·R/R_total`` from the global round is kept
  (the same with ``-jr 1``). Their gradient clipping and data-dependent MMD bandwidths are
  not in PFLlib, nor here.
- Models with BatchNorm or dropout are refused (PFLlib runs the teacher in training mode).
- ``train_loss`` is the cross-entropy of the evaluated model; PFLlib's is the training
  objective ``(1 − λ)·CE + λ·MMD`` of ``θ``. The round's ``local_loss`` is that objective.
- New clients (``-nnc``) fine-tune the global model, as PFLlib does.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from fedjax_lib.algorithms.base import (SettingsContext, check_bool, check_int, check_number,
                                        linear_server, stack_clients)
from fedjax_lib.algorithms.fedavg import FedAvg
from fedjax_lib.algorithms.registry import register
from fedjax_lib.core.aggregate import weighted_average
from fedjax_lib.core.local import masked_cross_entropy, train_locally

BANDWIDTHS = (10.0, 15.0, 20.0, 50.0)  # PFLlib's 'rbf' kernel scales s: exp(−d²/(2s))


def _squared_distances(a: jax.Array, b: jax.Array) -> jax.Array:
  """``‖a_i − b_j‖²`` [B, B] as PFLlib computes it: ``‖a_i‖² + ‖b_j‖² − 2⟨a_i, b_j⟩``."""
  inner = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.sum(a * a, -1)[:, None] + jnp.sum(b * b, -1)[None, :] - 2.0 * inner


def mmd(x: jax.Array, y: jax.Array, mask=None, bandwidths=BANDWIDTHS) -> jax.Array:
  """PFLlib's MMD of features ``x`` and ``y`` [B, d] (module docstring), in float32.

  With ``mask`` [B] the means run over the pairs of real samples only (weights
  ``m_i·m_j/(Σm)²``); without it over all ``B²`` pairs, as PFLlib's ``torch.mean``. Gradients
  flow into both arguments; the caller stops the teacher's.
  """
  x = x.reshape(x.shape[0], -1).astype(jnp.float32)
  y = y.reshape(y.shape[0], -1).astype(jnp.float32)
  distances = {"xx": _squared_distances(x, x), "yy": _squared_distances(y, y),
               "xy": _squared_distances(x, y)}
  kernel = {k: sum(jnp.exp(-0.5 * d / s) for s in bandwidths) for k, d in distances.items()}
  pointwise = kernel["xx"] + kernel["yy"] - 2.0 * kernel["xy"]
  if mask is None:
    return jnp.mean(pointwise)
  m = mask.astype(jnp.float32)
  return (m @ pointwise @ m) / jnp.maximum(m.sum(), 1.0) ** 2


def inherit(local, private, weight):
  """``(1 − weight)·local + weight·private`` leaf-wise (the private model's update)."""
  return jax.tree.map(lambda l, p: ((1.0 - weight) * l + weight * p).astype(p.dtype),
                      local, private)


@register("FedPHP")
@dataclasses.dataclass(frozen=True)
class FedPHP(FedAvg):
  """FedAvg plus per-client inherited private models, used as MMD teachers and evaluated.

  Attributes:
    mu: μ, the private model's final inheritance weight (``-mu``).
    lam: λ, the MMD weight; cross-entropy has 1 − λ (``-lam``).
    global_rounds: R_total of ``μ_R = μ·R/R_total`` (``-gr``; the runner fills it).
    pfllib_compat: evaluate the locally trained model, as PFLlib (module docstring).
  """

  REFERENCE_SPLIT = True  # PFLlib's main.py wraps the model in BaseHeadSplit
  DECAYED_RATES = ("local.learning_rate",)  # -ld: the one SGD optimizer

  mu: float = 0.9
  lam: float = 0.01
  global_rounds: int = 2000
  pfllib_compat: bool = False

  def __post_init__(self):
    check_number(self.name, "mu", self.mu, 0.0, 1.0)
    check_number(self.name, "lam", self.lam, 0.0, 1.0)
    check_int(self.name, "global_rounds", self.global_rounds, 1)
    check_bool(self.name, "pfllib_compat", self.pfllib_compat)

  def check_settings(self, context: SettingsContext) -> list[str]:
    """Warns when ``lam = 1``: cross-entropy then weighs ``1 − λ = 0`` and no model ever
    trains on a label (PFLlib's shared default ``-lam 1``, its issue #102)."""
    del context
    if self.lam < 1.0:
      return []
    return [f"FedPHP lam={self.lam} weighs cross-entropy by 1 - lam = 0: the local models train "
            "on the MMD to the private models alone and never see a label; use lam < 1 "
            "(e.g. -lam 0.01, the default)"]

  def init(self, key, sample_x, num_clients):
    variables = self.init_params(key, sample_x)
    client = {"private": variables}
    if self.pfllib_compat:
      client["local"] = variables
    return {"params": variables, "round": jnp.int32(0)}, stack_clients(client, num_clients)

  def inheritance(self, round_index) -> jax.Array:
    """``μ_R = μ·min(R, R_total)/R_total``."""
    return self.mu * jnp.minimum(round_index, self.global_rounds) / self.global_rounds

  def php_loss(self, teacher):
    """``(1 − λ)·CE + λ·MMD(base_θ(x), base_θp(x))`` with the teacher ``θ_p`` constant."""
    def loss(params, batch, key):
      del key
      features = self.model.apply(params, batch.x, method="features")
      logits = self.model.apply(params, features, method="classify")
      targets = jax.lax.stop_gradient(self.model.apply(teacher, batch.x, method="features"))
      return ((1.0 - self.lam) * masked_cross_entropy(logits, batch.y, batch.mask)
              + self.lam * mmd(features, targets, batch.mask))
    return loss

  def client_update(self, server_state, client_state, data, key):
    private = client_state["private"]
    params, _, stats = train_locally(server_state["params"], data, key, self.local,
                                     self.php_loss(private))
    new_state = {"private": inherit(params, private,
                                    self.inheritance(server_state["round"]))}
    if self.pfllib_compat:
      new_state["local"] = params
    return new_state, params, stats

  @linear_server
  def server_update(self, server_state, uploads, weights, key):
    del key
    return {"params": weighted_average(uploads, weights, fallback=server_state["params"]),
            "round": server_state["round"] + 1}

  def download(self, server_state):
    """The global model (the round counter is the clock both sides share)."""
    return server_state["params"]

  def predict(self, server_state, client_state, x):
    """The evaluated model: the private model (compat: the last locally trained one)."""
    del server_state
    return self.model.apply(client_state["local" if self.pfllib_compat else "private"], x)

  def eval_views(self, server_state, client_state, data, key):
    """``personal`` (θ_p) then ``global``; compat: ``local`` (θ) then ``personal``."""
    del data, key
    private = functools.partial(self.model.apply, client_state["private"])
    if self.pfllib_compat:
      return {"local": functools.partial(self.model.apply, client_state["local"]),
              "personal": private}
    return {"personal": private,
            "global": functools.partial(self.model.apply, server_state["params"])}
