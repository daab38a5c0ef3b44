"""GPFL: Simultaneously Learning Global and Personalized Feature Information for pFL.

Zhang, Hua, Wang, Song, Xue, Ma, Guan, ICCV 2023.

The model is split into a shared feature extractor (base) φ and a personal head h. GPFL adds
two shared modules between them:

- GCE (Global Category Embedding): a table ``E [C, D]`` (PyTorch ``nn.Embedding`` init,
  N(0, 1)). Its loss :func:`gce_loss` is the softmax cross-entropy over the cosine
  similarities ``cos(f, E_c)`` (no scale or temperature).
- CoV (Conditional Valve, :func:`cov_apply`): ``γ = LN(ReLU(Dense_γ(ctx)))``,
  ``β = LN(ReLU(Dense_β(ctx)))``, ``CoV(f, ctx) = ReLU(f ⊙ (γ + 1) + β)`` for a context
  vector ``ctx [D]``; both Dense layers are D→D with PyTorch's default init and the
  LayerNorms have PyTorch's affine parameters (scale 1, bias 0, eps 1e-5).

Every client keeps a generic conditional input ``g_in`` and a personalized one ``p_in``
(zeros before its first training). A selected client receives the global base, GCE and CoV,
and trains base, head, GCE and CoV jointly for ``local_epochs`` with, per batch
(``f = φ(x)``, ``f_P = CoV(f, p_in)``, ``f_G = CoV(f, g_in)``)::

    CE(h(f_P), y) + gce_loss(f_G, y, E) + λ·‖f_G − E_frozen[y]‖_F

where ``E_frozen`` is the received global GCE (constant) and the last term is the Frobenius
norm over the whole batch (:func:`alignment_term`: not squared, not averaged). The GCE and
CoV parameters also get SGD weight decay μ (PyTorch's ``weight_decay``: ``grad += μ·w``),
the base and head none (:func:`sgd_with_decay`). After training the client recomputes
``(g_in, p_in) = conditional_inputs(E_own, p)`` (:func:`conditional_inputs`: the mean of
its own trained embeddings and their mean under its training-label frequencies ``p``,
:func:`label_frequencies`), keeps its head, and uploads base, GCE and CoV. The server
replaces each with the sample-weighted average of the uploads.

A client is evaluated with the personal route ``h(CoV(φ(x), p_in))``: the server's base and
CoV, its own head and ``p_in`` (:meth:`GPFL.predict`). GPFL has no separately evaluated
global model, so there is one view.

Hyperparameters (PFLlib defaults and flags): ``lam`` λ = 1.0 (``-lam``), the weight of the
alignment term; ``mu`` μ = 0.0 (``-mu``), the weight decay of the GCE and CoV optimizers.
The GPFL repository recommends ``-lam 0.01 -mu 0.1`` for the 4-layer CNN and 3-layer MLP,
``-lam 0.0001 -mu 0.0`` for ResNet-18 and fastText and ``-lam 0.01 -mu 1.0`` for HAR-CNN.

State: server ``{"base", "gce": E [C, D], "cov": {...}}``; client ``{"head", "g_in" [D],
"p_in" [D]}`` stacked over clients. Uploads ``{"base", "gce", "cov"}``.

Differences from PFLlib (``-algo GPFL``):

- Conditional inputs of clients that did not train: PFLlib recomputes ``g_in``/``p_in`` of
  EVERY client at the end of every round from the embeddings the client holds (a trained
  client: its own trained GCE; an unselected one: the previous round's global GCE) and then
  installs the new global GCE. Here a client's inputs change only when it trains (from its
  own trained embeddings); an unselected client keeps those of its last training (zeros if
  it never trained). With ``join_ratio`` 1 (and no drop-out) the two are identical.
- Label frequencies ``p_c`` are counted from all of the client's training samples
  (``data.y[data.train_idx]`` masked by ``train_count``) every time the client trains;
  PFLlib counts them once at client construction over one shuffled drop_last pass, which
  skips up to ``batch_size − 1`` random samples.
- Aggregation weights: PFLlib's GPFL averages base, GCE and CoV over all selected clients
  (its ``receive_models`` has no drop-out or time filter); here the engine's weights apply,
  so clients dropped by ``-cdr`` are left out of the average, as for every algorithm.
- The evaluated ``train_loss`` is the cross-entropy of the personal route; PFLlib's
  ``train_metrics`` reports the full GPFL loss (CE + GCE loss + λ·alignment). The per-step
  training loss (``local_loss`` round metric) is the full loss.
- :meth:`GPFL.predict` returns ``log_softmax`` of the head's logits: the same predictions
  and cross-entropy, and the micro AUC equals PFLlib's, which GPFL scores on softmax
  probabilities (a monotone transform of log-probabilities).
- New clients (``-nnc``; PFLlib does not support them for GPFL): the global base with a
  freshly initialised head, a plain model without CoV, fine-tuned with cross-entropy.
- The Frobenius norm and the row normalisation are written so that their gradients at a
  zero vector are 0 (PyTorch's convention) instead of NaN.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from fedjax_lib.algorithms.base import (Algorithm, FeatureViews, SettingsContext,
                                        check_number, linear_server, stack_clients,
                                        untrained_new_clients)
from fedjax_lib.algorithms.registry import register
from fedjax_lib.algorithms.split import merge_parts, split_parts
from fedjax_lib.core.aggregate import weighted_average
from fedjax_lib.core.local import (ClientData, class_counts, masked_cross_entropy, sgd_by_part,
                                   train_locally)
from fedjax_lib.models.layers import torch_uniform_init

# fold_in tags of the GCE and CoV initialisation streams (the model uses the init key as is).
GCE_STREAM = 0x6CE
COV_STREAM = 0xC0F
# PyTorch defaults: F.normalize's eps and nn.LayerNorm's eps.
NORMALIZE_EPS = 1e-12
LAYER_NORM_EPS = 1e-5
# Trainable parts that receive weight decay μ (the parts with PFLlib's GCE/CoV optimizers).
DECAYED_PARTS = ("gce", "cov")


# ---------------------------------------------------------------------------- modules
def init_gce(key: jax.Array, num_classes: int, dim: int) -> jax.Array:
  """The GCE table ``E [C, D]`` drawn from N(0, 1) (PyTorch ``nn.Embedding``'s init)."""
  return jax.random.normal(key, (num_classes, dim), jnp.float32)


def init_cov(key: jax.Array, dim: int) -> dict:
  """CoV parameters: two D→D dense layers (PyTorch default init) and two LayerNorms.

  Returns:
    ``{"gamma": {"kernel" [D, D], "bias" [D]}, "gamma_norm": {"scale", "bias"},
    "beta": {...}, "beta_norm": {...}}``; kernels are ``(in, out)``; LayerNorm scales are
    ones and biases zeros.
  """
  init = torch_uniform_init(dim)
  keys = jax.random.split(key, 4)

  def dense(k_kernel, k_bias):
    return {"kernel": init(k_kernel, (dim, dim)), "bias": init(k_bias, (dim,))}

  def norm():
    return {"scale": jnp.ones((dim,), jnp.float32), "bias": jnp.zeros((dim,), jnp.float32)}

  return {"gamma": dense(keys[0], keys[1]), "gamma_norm": norm(),
          "beta": dense(keys[2], keys[3]), "beta_norm": norm()}


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array,
               eps: float = LAYER_NORM_EPS) -> jax.Array:
  """PyTorch ``nn.LayerNorm`` over the last axis (biased variance, eps inside the root)."""
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def cov_apply(cov_params: dict, f: jax.Array, ctx: jax.Array) -> jax.Array:
  """The Conditional Valve ``ReLU(f ⊙ (γ(ctx) + 1) + β(ctx))``.

  Args:
    cov_params: parameters from :func:`init_cov`.
    f: features ``[B, D]``.
    ctx: a conditional input ``[D]``, broadcast over the batch.

  Returns:
    ``[B, D]`` gated features.
  """
  def branch(dense, norm):
    h = jax.nn.relu(ctx @ dense["kernel"] + dense["bias"])
    return layer_norm(h, norm["scale"], norm["bias"])

  gamma = branch(cov_params["gamma"], cov_params["gamma_norm"])
  beta = branch(cov_params["beta"], cov_params["beta_norm"])
  return jax.nn.relu(f * (gamma + 1.0) + beta)


def _safe_norm(x: jax.Array, axis=None, keepdims: bool = False) -> jax.Array:
  """The Euclidean norm with gradient 0 (not NaN) where it is 0."""
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=keepdims)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def normalize_rows(x: jax.Array, eps: float = NORMALIZE_EPS) -> jax.Array:
  """PyTorch ``F.normalize(x, dim=-1)``: ``x / max(‖x‖₂, eps)`` row by row."""
  return x / jnp.maximum(_safe_norm(x, axis=-1, keepdims=True), eps)


def gce_loss(features: jax.Array, labels: jax.Array, embeddings: jax.Array,
             mask: jax.Array) -> jax.Array:
  """GCE's loss: mean softmax cross-entropy over the cosine similarities to the embeddings.

  Args:
    features: ``[B, D]`` (the generic route ``f_G``).
    labels: ``[B]`` integer labels.
    embeddings: the GCE table ``[C, D]``.
    mask: ``[B]``, 1 for real samples.

  Returns:
    ``mean_b −log softmax_c(cos(f_b, E_c))[y_b]`` over the samples with ``mask == 1``.
  """
  cosine = normalize_rows(features.astype(jnp.float32)) @ normalize_rows(
      embeddings.astype(jnp.float32)).T
  return masked_cross_entropy(cosine, labels, mask)


def conditional_inputs(embeddings: jax.Array, label_freq: jax.Array):
  """``(g_in, p_in)``: the mean embedding and the label-frequency-weighted sum.

  Args:
    embeddings: a GCE table ``[C, D]``.
    label_freq: ``[C]`` label frequencies ``p_c`` (summing to 1, or all zero).

  Returns:
    ``g_in = (1/C)·Σ_c E_c`` and ``p_in = Σ_c p_c·E_c``, both ``[D]``.
  """
  embeddings = embeddings.astype(jnp.float32)
  return embeddings.mean(0), label_freq.astype(jnp.float32) @ embeddings


def alignment_term(f_g: jax.Array, e_frozen: jax.Array, labels: jax.Array,
                   mask: jax.Array) -> jax.Array:
  """``‖f_G − E_frozen[y]‖_F`` over the batch: the norm of the whole difference matrix.

  Not squared and not averaged (PFLlib's ``torch.norm(feat_G − emb, 2)``); rows with
  ``mask == 0`` are left out. ``e_frozen`` is a constant (no gradient flows into it).

  Args:
    f_g: generic-route features ``[B, D]``.
    e_frozen: the received global GCE table ``[C, D]``.
    labels: ``[B]`` integer labels.
    mask: ``[B]``, 1 for real samples.

  Returns:
    A float32 scalar.
  """
  target = jax.lax.stop_gradient(e_frozen.astype(jnp.float32))[labels]
  diff = (f_g.astype(jnp.float32) - target) * mask.astype(jnp.float32)[:, None]
  return _safe_norm(diff)


def label_frequencies(data: ClientData, num_classes: int) -> jax.Array:
  """Frequencies ``p_c`` of the labels of the client's ``train_count`` training samples.

  Positions of ``train_idx`` at or past ``train_count`` are padding and are not counted.
  Returns all zeros for a client without training samples.
  """
  counts = class_counts(data, num_classes)
  return counts / jnp.maximum(counts.sum(), 1.0)


def sgd_with_decay(learning_rate: float, mu: float, decayed=DECAYED_PARTS,
                   module_learning_rate=None) -> optax.GradientTransformation:
  """Plain SGD over a dict of parts; the parts ``decayed`` get PyTorch weight decay μ.

  One step is ``w ← w − lr·(g + μ·w)`` for the leaves under ``decayed`` and
  ``w ← w − lr·g`` for the others (PFLlib: one SGD per module, GCE and CoV with
  ``weight_decay = μ``, the model without). ``module_learning_rate``: the ``decayed`` parts'
  own rate (``-ld``: PFLlib's GCE and CoV optimizers have no scheduler); None: the same.
  """
  def mask(params):
    return {part: jax.tree.map(lambda _, p=part: p in decayed, sub)
            for part, sub in params.items()}

  if module_learning_rate is None:
    step = optax.sgd(learning_rate)
  else:
    step = sgd_by_part(learning_rate, {part: module_learning_rate for part in decayed})
  return optax.chain(optax.masked(optax.add_decayed_weights(mu), mask), step)


# ---------------------------------------------------------------------------- algorithm
@register("GPFL")
@dataclasses.dataclass(frozen=True)
class GPFL(Algorithm):
  """Shared base, GCE and CoV; personal head and conditional input.

  Attributes:
    lam: weight λ of the alignment term ``‖f_G − E_frozen[y]‖_F`` (PFLlib ``-lam``).
    mu: weight decay μ of the GCE and CoV parameters (PFLlib ``-mu``).
  """

  REFERENCE_SPLIT = True  # PFLlib's main.py wraps the model in BaseHeadSplit
  # -ld: the model optimizer; GCE/CoV keep the undecayed rate
  DECAYED_RATES = ("local.learning_rate",)


  lam: float = 1.0
  mu: float = 0.0

  def __post_init__(self):
    check_number(self.name, "lam", self.lam)
    check_number(self.name, "mu", self.mu)

  def init(self, key, sample_x, num_clients):
    params = self.init_params(key, sample_x)
    out = jax.eval_shape(
        lambda p: (self.model.apply(p, sample_x[None], method="features"),
                   self.model.apply(p, sample_x[None])), params)
    dim, num_classes = out[0].shape[-1], out[1].shape[-1]
    parts = split_parts(params)
    server = {"base": parts["base"],
              "gce": init_gce(jax.random.fold_in(key, GCE_STREAM), num_classes, dim),
              "cov": init_cov(jax.random.fold_in(key, COV_STREAM), dim)}
    zeros = jnp.zeros((dim,), jnp.float32)
    client = {"head": parts["head"], "g_in": zeros, "p_in": zeros}
    return server, stack_clients(client, num_clients)

  def loss_terms(self, trainable, batch, g_in, p_in, e_frozen):
    """``(ce, gce, alignment)`` of one batch (the local loss is ``ce + gce + λ·alignment``).

    Args:
      trainable: ``{"base", "head", "gce", "cov"}``.
      batch: the mini-batch.
      g_in, p_in: the client's conditional inputs ``[D]``.
      e_frozen: the received global GCE ``[C, D]``.
    """
    variables = merge_parts({"base": trainable["base"], "head": trainable["head"]})
    f = self.model.apply(variables, batch.x, method="features")
    f_p = cov_apply(trainable["cov"], f, p_in)
    logits = self.model.apply(variables, f_p, method="classify")
    f_g = cov_apply(trainable["cov"], f, g_in)
    return (masked_cross_entropy(logits, batch.y, batch.mask),
            gce_loss(f_g, batch.y, trainable["gce"], batch.mask),
            alignment_term(f_g, e_frozen, batch.y, batch.mask))

  def local_loss(self, trainable, batch, key, g_in, p_in, e_frozen):
    """The GPFL loss ``CE(h(f_P), y) + gce_loss(f_G, y) + λ·alignment`` of one batch."""
    del key
    ce, gce, align = self.loss_terms(trainable, batch, g_in, p_in, e_frozen)
    return ce + gce + self.lam * align

  def optimizer(self) -> optax.GradientTransformation:
    """SGD at the local learning rate with weight decay μ on the GCE and CoV (``-ld``: only
    the model's rate decays, as PFLlib's GCE and CoV optimizers have no scheduler)."""
    module = self.undecayed("local.learning_rate") if self.is_decayed() else None
    return sgd_with_decay(self.local.learning_rate, self.mu, module_learning_rate=module)

  def client_update(self, server_state, client_state, data, key):
    trainable = {"base": server_state["base"], "head": client_state["head"],
                 "gce": server_state["gce"], "cov": server_state["cov"]}
    loss = functools.partial(self.local_loss, g_in=client_state["g_in"],
                             p_in=client_state["p_in"], e_frozen=server_state["gce"])
    trained, _, stats = train_locally(trainable, data, key, self.local, loss,
                                      tx=self.optimizer())
    freq = label_frequencies(data, trained["gce"].shape[0])
    g_in, p_in = conditional_inputs(trained["gce"], freq)
    new_state = {"head": trained["head"], "g_in": g_in, "p_in": p_in}
    upload = {"base": trained["base"], "gce": trained["gce"], "cov": trained["cov"]}
    return new_state, upload, stats

  @linear_server
  def server_update(self, server_state, uploads, weights, key):
    del key
    return weighted_average(uploads, weights, fallback=server_state)

  def predict(self, server_state, client_state, x):
    """Log-probabilities of the personal route ``h(CoV(φ(x), p_in))``."""
    variables = merge_parts({"base": server_state["base"]}, {"head": client_state["head"]})
    f = self.model.apply(variables, x, method="features")
    f_p = cov_apply(server_state["cov"], f, client_state["p_in"])
    logits = self.model.apply(variables, f_p, method="classify")
    return jax.nn.log_softmax(logits.astype(jnp.float32))

  def feature_views(self, server_state, client_state):
    """The personal route on the global base's features: the client's CoV context and head
    (as :meth:`predict`)."""
    del client_state
    base = merge_parts({"base": server_state["base"]})

    def personal(state, z):
      f_p = cov_apply(server_state["cov"], z, state["p_in"])
      logits = self.model.apply(merge_parts({"head": state["head"]}), f_p, method="classify")
      return jax.nn.log_softmax(logits.astype(jnp.float32))

    return FeatureViews(features=lambda x: self.model.apply(base, x, method="features"),
                        heads={"": personal})

  def new_client_variables(self, server_state, client_state):
    """The global base with a freshly initialised head: a plain model without CoV."""
    return merge_parts({"base": server_state["base"]}, {"head": client_state["head"]})

  def check_settings(self, context: SettingsContext) -> list[str]:
    """Warns when new clients would be tested with their freshly initialised head."""
    return untrained_new_clients(self.name, "head", context)
