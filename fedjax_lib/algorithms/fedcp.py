"""FedCP: Separating Feature Information for Personalized Federated Learning via Conditional Policy.

Zhang, Hua, Wang, Song, Xue, Ma, Guan, KDD 2023.

A split model (base φ, head h) is extended with a Conditional Policy Network (CPN) that splits
every feature vector into a personalized and a global part. Each client keeps a personal head
``h_p`` and a context vector ``c`` (D = the feature dimension); the server holds the global base
φ, a global head ``h_g`` and the global CPN. The forward pass (:func:`fedcp_logits`) is

    rep = φ(x);  gate_in = rep ⊙ normalize(c);  (pm, gm) = CPN(gate_in)
    output = h_p(rep ⊙ pm) + h_g(rep ⊙ gm)

where the CPN (:class:`ConditionalSelection`, :func:`cpn_masks`) is ``Dense(D→2D)`` (PyTorch
default init), ``LayerNorm(2D)``, ReLU, reshaped to ``[B, 2, D]`` and a softmax over the size-2
axis with Gumbel noise (τ = 1, soft), so ``pm + gm = 1`` element-wise.

A selected client receiving ``{φ, h_g, CPN}``

1. trains φ, ``h_p`` and the CPN jointly (one plain SGD at the local learning rate, ``h_g``
   frozen) for ``local_epochs`` epochs on ``CE(output, y) + λ·MMD(rep, φ_frozen(x))``
   (:func:`fedcp_loss`), where ``φ_frozen`` is the received global base (no gradient) and
   :func:`mmd_rbf` is the RBF-kernel MMD with bandwidths {10, 15, 20, 50};
2. uploads its φ, the mixed head ``0.5·h_p + 0.5·h_g`` and its CPN;
3. keeps its trained ``h_p`` and recomputes its context from it
   (:func:`context_from_head`: the head's weight matrix summed over the class axis).

The server replaces φ, ``h_g`` and the CPN with the sample-weighted averages of the uploads.
Every client starts from the same initial model: ``h_p = h_g`` = the initial head, the same
initial CPN, and ONE uniform[0, 1) context vector of shape ``[D]`` shared by all clients
(PFLlib seeds torch with 0 before drawing every client's context).

Hyperparameters (PFLlib defaults): ``lam`` λ, the MMD weight (``-lam``, 1.0; the FedCP
repository uses ``-lam 5`` on MNIST); ``pfllib_compat`` (False): with True, evaluation adds
Gumbel noise to the policy as PFLlib does (see below). The MMD term is stiff at large learning
rates: on the bundled digits with the DNN and lr 0.05, λ = 1 makes the base oscillate and learn
slowly (λ = 0.1, or PFLlib's lr 0.005, learn well).

Evaluated: a client's ensemble with the server's latest base, global head and CPN plus its own
personal head and context. The paper intends a deterministic policy at test time, so evaluation
uses the noise-free softmax by default.

Differences from PFLlib:

- Test-time policy: PFLlib calls ``F.gumbel_softmax`` in eval mode too, so its test
  predictions are stochastic. By default the noise-free softmax is used here; with
  ``pfllib_compat=True`` Gumbel noise drawn from the evaluation key is added (the eval view).
- PFLlib installs the new global head and CPN only on the round's selected clients (the
  unselected keep stale copies between rounds); here every client is evaluated with the
  server's latest ones. Identical with ``join_ratio`` 1.
- PFLlib's FedCP aggregates every selected client (no drop-out filter, weights
  ``train_samples`` normalised over the selected ones); the engine gives dropped clients
  (``client_drop_rate``) weight 0, as for every algorithm. Identical with drop rate 0.
- PFLlib's FedCP evaluation reports test accuracy and AUC only; here the engine also reports
  the train loss (cross-entropy of the evaluated ensemble). The evaluation views return
  log-probabilities (``log_softmax`` of the ensemble's logits): argmax and cross-entropy are
  unchanged, and the micro AUC equals PFLlib's FedCP AUC, which is scored with softmax
  probabilities (not raw logits as in most PFLlib algorithms). :meth:`FedCP.predict` returns
  raw logits.
- The MMD term uses all samples of a batch (training batches are always full: drop_last).
  Squared distances come from Gram matrices as in PFLlib, at highest matmul precision.
- ``train_slow`` clients (PFLlib's random shortening of local epochs) are not modelled.
- New clients (``-nnc``): PFLlib does not support them for FedCP. Here a new client has no
  personal head or policy; it fine-tunes the global base + global head ``h_g`` as a plain
  model (:meth:`FedCP.new_client_variables`).
- :func:`context_from_head` supports heads with one dense kernel (every head in the model zoo);
  PFLlib multiplies the weight matrices of a multi-layer head from last to first.

Key derivation: the model parameters come from the init key unchanged (the same initial model
as FedAvg's), the CPN from ``fold_in(key, CPN_STREAM)``, the shared context from
``fold_in(key, CONTEXT_STREAM)``. In training, the Gumbel noise of each step comes from the
per-step key that `train_locally` passes to the loss.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_lib.algorithms.base import (Algorithm, FeatureViews, check_number, known_zero,
                                        linear_server, stack_clients)
from fedjax_lib.algorithms.registry import register
from fedjax_lib.algorithms.split import split_parts
from fedjax_lib.core.aggregate import weighted_average
from fedjax_lib.core.local import Batch, masked_cross_entropy, train_locally
from fedjax_lib.errors import ConfigError
from fedjax_lib.models.base import merge_params
from fedjax_lib.models.layers import TorchDense

# fold_in tags of the initialisation streams.
CPN_STREAM = 0xC9A
CONTEXT_STREAM = 0xC07E

#: Bandwidths of the RBF kernels summed in :func:`mmd_rbf` (PFLlib's ``rbf`` kernel).
MMD_BANDWIDTHS = (10.0, 15.0, 20.0, 50.0)


class ConditionalSelection(nn.Module):
  """The CPN's network: ``Dense(D→2D)``, ``LayerNorm(2D)``, ReLU, reshaped to ``[B, 2, D]``.

  Returns the policy logits; :func:`cpn_masks` turns them into the masks. The dense layer has
  PyTorch's default initialisation and the LayerNorm PyTorch's ``eps = 1e-5`` and unit
  scale / zero bias.

  Attributes:
    features: D, the feature dimension.
  """
  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = TorchDense(2 * self.features, name="fc")(x)
    h = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="ln")(h)
    return nn.relu(h).reshape(x.shape[0], 2, self.features)


def init_cpn(key: jax.Array, features: int):
  """Initial CPN parameters for feature dimension ``features`` (the ``params`` collection)."""
  return ConditionalSelection(features).init(key, jnp.zeros((1, features), jnp.float32))["params"]


def cpn_masks(cpn_params, gate_in: jax.Array, key: jax.Array | None = None,
              tau: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """The personalized and global feature masks ``(pm, gm)`` of a batch.

  ``softmax((logits + g) / τ)`` over the size-2 axis of the CPN's ``[B, 2, D]`` logits, with
  ``g`` standard Gumbel noise drawn from ``key`` (PyTorch's soft ``F.gumbel_softmax``), or no
  noise when ``key`` is None.

  Args:
    cpn_params: the CPN's parameters (see :func:`init_cpn`).
    gate_in: ``[B, D]`` gate inputs.
    key: the noise key, or None for the deterministic policy.
    tau: the softmax temperature (1 in FedCP).

  Returns:
    ``pm, gm``, each ``[B, D]``, in [0, 1] with ``pm + gm == 1`` element-wise.
  """
  logits = ConditionalSelection(gate_in.shape[-1]).apply({"params": cpn_params}, gate_in)
  if key is not None:
    logits = logits + jax.random.gumbel(key, logits.shape, logits.dtype)
  probs = jax.nn.softmax(logits / tau, axis=1)
  return probs[:, 0, :], probs[:, 1, :]


def context_from_head(head_params) -> jax.Array:
  """The context of a personal head: its weight matrix summed over the class axis, ``[D]``.

  For a single dense head (Flax kernel ``[D, C]``, PyTorch weight ``[C, D]``) this is PFLlib's
  ``set_head_g`` context. Not normalised; :func:`fedcp_logits` L2-normalises it.

  Args:
    head_params: the head's parameters, containing exactly one 2-D ``kernel``.

  Returns:
    A ``[D]`` array.

  Raises:
    ConfigError: when the head has not exactly one 2-D kernel.
  """
  kernels = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(head_params)[0]
             if getattr(path[-1], "key", None) == "kernel" and leaf.ndim == 2]
  if len(kernels) != 1:
    raise ConfigError(f"FedCP needs a head with one dense kernel, got {len(kernels)} "
                      "2-D kernels")
  return kernels[0].sum(axis=1)


def l2_normalize(v: jax.Array, eps: float = 1e-12) -> jax.Array:
  """``v / max(‖v‖₂, eps)`` over the last axis (PyTorch's ``F.normalize``)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=-1, keepdims=True))
  return v / jnp.maximum(norm, eps)


def mmd_rbf(x: jax.Array, y: jax.Array, bandwidths=MMD_BANDWIDTHS) -> jax.Array:
  """RBF-kernel maximum mean discrepancy of two equally sized samples (PFLlib's ``MMD``).

  With ``k(u, v) = Σ_a exp(−0.5·‖u − v‖²/a)`` over the bandwidths ``a``, returns the mean over
  ``i, j`` of ``k(x_i, x_j) + k(y_i, y_j) − 2·k(x_i, y_j)``. Squared distances are taken from
  Gram matrices (``‖u‖² + ‖v‖² − 2u·v``) at highest matmul precision, so ``mmd_rbf(x, x)`` is
  exactly 0.

  Args:
    x: ``[B, D]`` samples of the first distribution.
    y: ``[B, D]`` samples of the second.
    bandwidths: the kernel bandwidths ``a``.

  Returns:
    A float32 scalar.
  """
  x = x.astype(jnp.float32)
  y = y.astype(jnp.float32)
  gram = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
  xx, yy, xy = gram(x, x.T), gram(y, y.T), gram(x, y.T)
  rx, ry = jnp.diagonal(xx), jnp.diagonal(yy)
  dxx = rx[:, None] + rx[None, :] - 2.0 * xx
  dyy = ry[:, None] + ry[None, :] - 2.0 * yy
  dxy = rx[:, None] + ry[None, :] - 2.0 * xy
  kernel = lambda d: sum(jnp.exp(-0.5 * d / a) for a in bandwidths)
  return jnp.mean(kernel(dxx) + kernel(dyy) - 2.0 * kernel(dxy))


def base_features(model, base_params, x: jax.Array) -> jax.Array:
  """``φ(x)``: the model's features under base parameters ``base_params``."""
  return model.apply(merge_params(base_params, {}), x, method="features")


def head_logits(model, head_params, z: jax.Array) -> jax.Array:
  """``h(z)``: the model's head under parameters ``head_params``."""
  return model.apply(merge_params({}, head_params), z, method="classify")


def fedcp_logits(model, rep: jax.Array, head_p, head_g, cpn_params, context: jax.Array,
                 key: jax.Array | None = None) -> jax.Array:
  """The FedCP ensemble ``h_p(rep ⊙ pm) + h_g(rep ⊙ gm)`` of features ``rep``.

  Args:
    model: the split model (its ``classify`` method applies a head).
    rep: ``[B, D]`` features ``φ(x)``.
    head_p: the personal head's parameters.
    head_g: the global head's parameters.
    cpn_params: the CPN's parameters.
    context: the client's ``[D]`` context (L2-normalised here).
    key: the Gumbel-noise key of the policy, or None for the noise-free one.

  Returns:
    ``[B, C]`` logits.
  """
  gate_in = rep * l2_normalize(context)[None, :]
  pm, gm = cpn_masks(cpn_params, gate_in, key)
  return head_logits(model, head_p, rep * pm) + head_logits(model, head_g, rep * gm)


def fedcp_loss(model, trainable, head_g, frozen_base, context: jax.Array, lam: float,
               batch: Batch, key: jax.Array) -> jax.Array:
  """The local objective ``CE(output, y) + λ·MMD(φ(x), φ_frozen(x))``.

  Args:
    model: the split model.
    trainable: ``{"base": φ, "head": h_p, "cpn": CPN}``, the parameters being trained.
    head_g: the frozen global head (no gradient flows into it).
    frozen_base: the frozen global base ``φ_frozen`` (no gradient flows into it).
    context: the client's ``[D]`` context.
    lam: λ; with 0 the MMD term is left out.
    batch: the mini-batch.
    key: the Gumbel-noise key of this step.

  Returns:
    A float32 scalar.
  """
  head_g = jax.lax.stop_gradient(head_g)
  frozen_base = jax.lax.stop_gradient(frozen_base)
  rep = base_features(model, trainable["base"], batch.x)
  logits = fedcp_logits(model, rep, trainable["head"], head_g, trainable["cpn"], context, key)
  loss = masked_cross_entropy(logits, batch.y, batch.mask)
  if not known_zero(lam):
    loss = loss + lam * mmd_rbf(rep, base_features(model, frozen_base, batch.x))
  return loss


def mix_heads(head_p, head_g):
  """The uploaded head ``0.5·h_p + 0.5·h_g`` (PFLlib's ``generate_upload_head``)."""
  return jax.tree.map(lambda p, g: 0.5 * p + 0.5 * g, head_p, head_g)


@register("FedCP")
@dataclasses.dataclass(frozen=True)
class FedCP(Algorithm):
  """Global base, head and CPN; personal head and context per client.

  Server state ``{"base": φ, "head": h_g, "cpn": CPN}``; client state
  ``{"head": h_p, "context": [D]}`` stacked over all clients.

  Attributes:
    lam: λ, the weight of the MMD term (PFLlib ``-lam``).
    pfllib_compat: add Gumbel noise to the policy at evaluation time, as PFLlib does.
  """

  REFERENCE_SPLIT = True  # PFLlib's main.py wraps the model in BaseHeadSplit
  DECAYED_RATES = ()  # -ld: PFLlib trains with its own optimizer, never the decayed one


  lam: float = 1.0
  pfllib_compat: bool = False

  def __post_init__(self):
    check_number(self.name, "lam", self.lam)
    if not isinstance(self.pfllib_compat, bool):
      raise ConfigError(f"{self.name} hyperparameter pfllib_compat={self.pfllib_compat!r} "
                        "must be True or False")

  def init(self, key, sample_x, num_clients):
    parts = split_parts(self.init_params(key, sample_x))
    dim = base_features(self.model, parts["base"], sample_x[None]).shape[-1]
    context_from_head(parts["head"])  # fails early on an unsupported head
    cpn = init_cpn(jax.random.fold_in(key, CPN_STREAM), dim)
    context = jax.random.uniform(jax.random.fold_in(key, CONTEXT_STREAM), (dim,), jnp.float32)
    server = {"base": parts["base"], "head": parts["head"], "cpn": cpn}
    client = {"head": parts["head"], "context": context}
    return server, stack_clients(client, num_clients)

  def local_loss(self, server_state, client_state):
    """The local objective over ``{"base", "head", "cpn"}`` given the received states."""
    def loss(params, batch, key):
      return fedcp_loss(self.model, params, server_state["head"], server_state["base"],
                        client_state["context"], self.lam, batch, key)
    return loss

  def client_update(self, server_state, client_state, data, key):
    trainable = {"base": server_state["base"], "head": client_state["head"],
                 "cpn": server_state["cpn"]}
    loss = self.local_loss(server_state, client_state)
    trained, _, stats = train_locally(trainable, data, key, self.local, loss)
    upload = {"base": trained["base"], "head": mix_heads(trained["head"], server_state["head"]),
              "cpn": trained["cpn"]}
    new_state = {"head": trained["head"],
                 "context": context_from_head(trained["head"]).astype(
                     client_state["context"].dtype)}
    return new_state, upload, stats

  @linear_server
  def server_update(self, server_state, uploads, weights, key):
    del key
    return weighted_average(uploads, weights, fallback=server_state)

  def predict(self, server_state, client_state, x, key=None):
    """The client's ensemble logits; Gumbel noise on the policy when ``key`` is given."""
    rep = base_features(self.model, server_state["base"], x)
    return fedcp_logits(self.model, rep, client_state["head"], server_state["head"],
                        server_state["cpn"], client_state["context"], key)

  def rowwise_views(self) -> bool:
    """With ``pfllib_compat`` the view draws the policy's noise for the batch it is given."""
    return not self.pfllib_compat

  def eval_views(self, server_state, client_state, data, key):
    """One view: the ensemble's log-probabilities (noisy policy with ``pfllib_compat``)."""
    del data
    noise_key = key if self.pfllib_compat else None

    def view(x):
      return jax.nn.log_softmax(self.predict(server_state, client_state, x, noise_key), axis=-1)

    return {"": view}

  def feature_views(self, server_state, client_state):
    """The noise-free ensemble on the global base's features (None with ``pfllib_compat``,
    whose evaluation policy draws per-client noise)."""
    del client_state
    if self.pfllib_compat:
      return None

    def ensemble(state, z):
      return jax.nn.log_softmax(fedcp_logits(self.model, z, state["head"], server_state["head"],
                                             server_state["cpn"], state["context"]), axis=-1)

    return FeatureViews(features=lambda x: base_features(self.model, server_state["base"], x),
                        heads={"": ensemble})

  def new_client_variables(self, server_state, client_state):
    """A new client fine-tunes the global base + global head as a plain model."""
    del client_state
    return merge_params(server_state["base"], server_state["head"])
