"""MOON: Model-Contrastive Federated Learning.

Li, He, Song, CVPR 2021 (PFLlib ``-algo MOON``).

FedAvg with a contrastive term on the base's features. A selected client receives the global
model ``w_g``, keeps the model ``w_prev`` it ended its previous local training with, and runs
local SGD from ``w_g`` on

    CE(head(z), y) + μ · mean_i ℓ_con(z_i, z_g,i, z_prev,i),
    ℓ_con = −log( e^{sim(z, z_g)/τ} / (e^{sim(z, z_g)/τ} + e^{sim(z, z_prev)/τ}) )
          = logsumexp(sim(z, z_g)/τ, sim(z, z_prev)/τ) − sim(z, z_g)/τ,

where ``z = base(x)`` is the model being trained, ``z_g`` the received global base's and
``z_prev`` the previous local base's features of the same batch (both constants), and ``sim``
the cosine similarity (:func:`cosine_similarity`). The term pulls the local representation
toward the global one and away from the client's previous one. After training the client
keeps its new base as ``w_prev`` and uploads the whole model; the server is FedAvg's
sample-weighted average and every client is evaluated with the global model.

State: server ``{"params"}``; client ``{"prev_base"}``, the base parameters of the client's
previous local model, stacked over all clients. Every client starts from the initial global
model's base (PFLlib deep-copies the client's model, which is the initial global model, into
``old_model`` at construction). In round 0 therefore ``z_prev = z_g``, and the term has zero
gradient until the global model has moved.

Hyperparameters (PFLlib flags and defaults): ``tau`` (``-tau``, 1.0) the temperature τ > 0;
``mu`` (``-mu``, 0.0) the weight μ >= 0. With the default μ = 0 MOON is exactly FedAvg (the
paper uses τ = 0.5 and μ ∈ {0.1, 1, 5, 10}).

Cosine similarity follows PyTorch's ``F.cosine_similarity`` (``eps = 1e-8``) as its source
computes it (ATen ``cosine_similarity``): each vector is divided by its own norm clamped from
below at ``eps``, ``Σ (a / max(‖a‖, ε)) · (b / max(‖b‖, ε))``. (The PyTorch documentation's
``a·b / max(‖a‖·‖b‖, ε)`` is an older form.) The two agree unless a norm is below ε; the
clamped norm is computed as ``sqrt(max(Σa², ε²))``, so an all-zero feature vector (a sample
on which every ReLU of the base is off) gives a similarity of 0 and a finite gradient.

Differences from PFLlib:

- PFLlib's ``train_metrics`` adds the contrastive term to the reported train loss; the
  evaluated ``train_loss`` here is plain cross-entropy of the global model. The reported
  ``local_loss`` includes μ·ℓ_con.
- Only the previous model's base is kept per client (the head does not enter the loss);
  PFLlib keeps the whole previous model.
- The paper's projection head on top of the base is not part of PFLlib's MOON either: the
  features are the base's output (for the DNN, its ReLU features; PFLlib's split DNN emits
  ``log_softmax`` of them, which ``--pfllib-compat`` reproduces: `fedjax_lib.models.mlp`).
  Features with more than one axis per sample are flattened before the similarity.
- As in PFLlib, a client whose upload is dropped (``-cdr``) still trained, so it keeps its
  new ``prev_base``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fedjax_lib.algorithms.base import (SettingsContext, abstract_variables, check_number,
                                        check_positive, known_zero, stack_clients)
from fedjax_lib.algorithms.fedavg import FedAvg
from fedjax_lib.algorithms.registry import register
from fedjax_lib.algorithms.split import merge_parts, split_parts
from fedjax_lib.core.local import masked_cross_entropy, train_locally

# PyTorch's default eps of F.cosine_similarity.
COSINE_EPS = 1e-8


def cosine_similarity(a: jax.Array, b: jax.Array, eps: float = COSINE_EPS) -> jax.Array:
  """Row-wise cosine similarity of ``a, b [B, ...]`` as PyTorch computes it.

  ``Σ_j (a_j / max(‖a‖, ε)) · (b_j / max(‖b‖, ε))`` over everything after the batch axis,
  in float32; the clamped norm is ``sqrt(max(Σ a², ε²))`` (finite gradient at ``a = 0``).

  Returns:
    ``[B]`` similarities in [−1, 1].
  """
  def unit(v):
    v = v.reshape(v.shape[0], -1).astype(jnp.float32)
    return v / jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(v), -1, keepdims=True), eps * eps))
  return jnp.sum(unit(a) * unit(b), -1)


def model_contrastive_loss(z: jax.Array, z_global: jax.Array, z_prev: jax.Array, tau,
                           mask: jax.Array) -> jax.Array:
  """MOON's contrastive loss, averaged over the rows with ``mask``.

  ``ℓ_i = logsumexp(s_g/τ, s_prev/τ) − s_g/τ`` with ``s_g = sim(z_i, z_global,i)`` and
  ``s_prev = sim(z_i, z_prev,i)`` (:func:`cosine_similarity`); ``z_global`` and ``z_prev``
  are constants (no gradient flows into them).

  Args:
    z: ``[B, D]`` features of the model being trained.
    z_global: ``[B, D]`` features of the received global model.
    z_prev: ``[B, D]`` features of the client's previous local model.
    tau: the temperature τ > 0.
    mask: ``[B]``, 1 for real samples.

  Returns:
    A float32 scalar (0 without real samples).
  """
  s_global = cosine_similarity(z, jax.lax.stop_gradient(z_global)) / tau
  s_prev = cosine_similarity(z, jax.lax.stop_gradient(z_prev)) / tau
  per_sample = jnp.logaddexp(s_global, s_prev) - s_global
  mask = mask.astype(jnp.float32)
  return (per_sample * mask).sum() / jnp.maximum(mask.sum(), 1.0)


@register("MOON")
@dataclasses.dataclass(frozen=True)
class MOON(FedAvg):
  """FedAvg whose local loss adds μ times the model-contrastive loss on base features.

  Server state ``{"params"}``; client state ``{"prev_base"}`` stacked over clients.

  Attributes:
    tau: temperature τ of the contrastive loss (PFLlib ``-tau``, default 1.0), > 0.
    mu: weight μ of the contrastive loss (PFLlib ``-mu``, default 0.0 = FedAvg).
  """

  REFERENCE_SPLIT = True  # PFLlib's main.py wraps the model in BaseHeadSplit
  DECAYED_RATES = ("local.learning_rate",)  # -ld: the one SGD optimizer

  tau: float = 1.0
  mu: float = 0.0

  def __post_init__(self):
    check_positive(self.name, "tau", self.tau, "-tau")
    check_number(self.name, "mu", self.mu)

  def check_settings(self, context: SettingsContext) -> list[str]:
    """Warns when the model's base has no parameters: the features are the inputs, every
    similarity is 1 and the contrastive term has no gradient (MOON is FedAvg)."""
    base = split_parts(abstract_variables(self.model, context.sample_x))["base"]
    if self.mu != 0 and not jax.tree.leaves(base):
      return [f"{self.name} compares base features, but model {context.model_name!r} has no "
              f"base parameters (its features are the inputs), so mu={self.mu} has no effect "
              "and the run is FedAvg; use a model with a base (cnn, dnn)"]
    return []

  def init(self, key, sample_x, num_clients):
    params = self.init_params(key, sample_x)
    prev_base = split_parts(params)["base"]
    return {"params": params}, stack_clients({"prev_base": prev_base}, num_clients)

  def features(self, base, x):
    """The base's features of ``x`` from the base parameters alone."""
    return self.model.apply(merge_parts({"base": base}), x, method="features")

  def moon_loss(self, global_params, prev_base):
    """``CE + μ·ℓ_con`` against the received global model and the previous local base."""
    global_base = split_parts(global_params)["base"]

    def loss(params, batch, key):
      del key
      z = self.model.apply(params, batch.x, method="features")
      logits = self.model.apply(params, z, method="classify")
      ce = masked_cross_entropy(logits, batch.y, batch.mask)
      if known_zero(self.mu):  # FedAvg: skip two base passes
        return ce
      contrastive = model_contrastive_loss(z, self.features(global_base, batch.x),
                                           self.features(prev_base, batch.x), self.tau,
                                           batch.mask)
      return ce + self.mu * contrastive
    return loss

  def client_update(self, server_state, client_state, data, key):
    params, _, stats = train_locally(
        server_state["params"], data, key, self.local,
        self.moon_loss(server_state["params"], client_state["prev_base"]))
    return {"prev_base": split_parts(params)["base"]}, params, stats
