"""FedKTL: Federated Knowledge-Transfer Loop with a server-side pretrained generator.

Zhang, Hua, Cao, Guan, CVPR 2024 (arXiv:2403.15760). HtFLlib's ``-algo FedKTL``.

Clients (any architectures) classify against fixed **ETF anchors** ``A [C, K]`` (K = C, the
head's width; :func:`etf_anchors`) with an ArcFace-style margin loss on ``z = h(f(x))``:

    L^A = CE(s·[cos θ_k + (cos(θ_y + m) − cos θ_y)·[k = y]]_k, y),   cos θ_k = ⟨ẑ, A_k⟩

(m = 0.5, s = 64; :func:`margin_logits`) and predict by the highest cosine. After training
each uploads its **normalised class prototypes** ``P_i^c = normalise(mean ẑ)`` of the classes
it has, ``C_i × C`` floats (the "upload-efficient" part); the mean is over the samples of
HtFLlib's prototype loader (the client's first ``⌊n/B⌋·B`` training samples, in order: a
``drop_last`` loader without shuffling, so a class seen only in the last ``n mod B`` is not
uploaded), as FedGH's and FedTGP's.

The server owns a **feature transformer** ``F`` (Linear(K, K) → BatchNorm → ReLU →
Linear(K, w)) and **class centroids** ``Q̄ [C, w]`` in the generator's latent space. Each
round (:meth:`FedKTL.server_update`):

1. ``Q̄^c`` ← mean of ``F(P_i^c)`` (F in evaluation mode) over the uploads of class c;
2. ``-se`` epochs, batches of ``-sbs`` shuffled uploads, Adam(``-slr``) (re-created each
   round, gradient norm clipped to 100 per part) on F and Q̄ of
   ``MMD(F(P), W) + λ·MSE(F(P), Q̄[y])`` with ``W`` fresh latents from the generator's prior
   (:func:`mmd`, RBF mixture over bandwidths {10, 15, 20, 50} on squared distances);
3. step 1 again; the generator decodes one image per class from ``Q̄`` (chunks of ``-gbs``),
   resized/centre-cropped to the clients' sample shape.

Clients download the C (image, latent) pairs and add ``μ·MSE(h'(f(x_G)), Q̄[c])`` on batches
of B generated pairs drawn cyclically (reshuffled per pass) to every local step, with a
projector ``h' = Linear(d, w)``; only the base and ``h'`` get this gradient (not the head).

Communication per round: up ``C_i·C`` floats per aggregated client; down
``C·(H·W·channels + w)`` per client once images exist (the ETF anchors and the initial
projector, sent once before round 0, are not counted).

The generator is an explicit server input (`fedjax_lib.generators`): ``-GPath DIR`` loads a
folder written by ``python -m fedjax_lib.generators train``; from Python pass ``generator``
and ``generator_params``. Its parameters reach the compiled round as an argument
(:meth:`FedKTL.server_inputs`), never as constants.

Differences from HtFLlib (``clientktl.py``/``serverktl_*.py``):

- **The projector h' is each client's own and persists across rounds** (the paper's
  trainable projector). HtFLlib never saves it, so every client restarts every round from the
  server's initial projection; ``pfllib_compat=True`` (``--pfllib-compat``) restores that.
- ``arccos`` is taken of the cosine clipped to ``[−1 + 1e-7, 1 − 1e-7]`` (HtFLlib: unclipped,
  an infinite gradient at ±1).
- ETF: QR of a uniform ``[K, C]`` matrix from the run's key (HtFLlib: numpy's unseeded RNG,
  redrawn until orthonormal within 1e-7 — Householder QR in float32 already is).
- Batches of one upload are skipped in server training wherever they fall (HtFLlib drops the
  last batch when it has one element: BatchNorm needs two).
- Generated images keep the clients' value range ``[-1, 1]`` and are converted to the clients'
  channel count (mean of RGB for one channel); HtFLlib's clients are always RGB.
- ``train_loss`` is the cross-entropy of the margin-free scaled cosines ``s·cos θ_k``.
- HtFLlib's ``-algo FedKTL-stylegan-xl`` / ``-stylegan-3`` / ``-stable-diffusion`` name its
  pretrained generators; here the generator is given with ``-GPath`` (a Flax bridge), and
  those names are refused.
- New clients (``-nnc``) are not evaluated (HtFLlib evaluates none): every model is a
  client's own, with nothing global to start a new client from, so a new client could only
  fine-tune an untrained model.

Numerics: with s = 64 the clients' gradient norms are in the thousands (1,204 for the CNN's
first digits batch), so nearly every step is clipped to norm 100, a normalised-gradient
descent whose trajectories separate quickly. Rounding differences between executors (5e-7
relative in a vmapped gradient) therefore grow to visibly different runs after a round; each
executor is exactly reproducible from the seed, and they agree in distribution, not digit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lib.algorithms.base import (Algorithm, SettingsContext, Traffic, abstract_variables,
                                        check_bool, check_int, check_number, rows_traffic,
                                        stack_clients)
from fedjax_lib.algorithms.prototypes import eval_class_means, loader_samples, valid_row_order
from fedjax_lib.algorithms.registry import register
from fedjax_lib.core.local import Batch, clip_each, masked_mse, train_locally
from fedjax_lib.errors import ConfigError
from fedjax_lib.models.base import apply_train, model_state, split_params

BANDWIDTHS = (10.0, 15.0, 20.0, 50.0)
_COS_EPS = 1e-7
_CLIP = 100.0  # HtFLlib's gradient-norm clip (clients and server)
_BN_EPS, _BN_MOMENTUM = 1e-5, 0.1  # PyTorch's BatchNorm1d


# ---------------------------------------------------------------------------- pure pieces
def etf_anchors(key: jax.Array, num_classes: int, dim: int) -> jax.Array:
  """The simplex-ETF class anchors ``[C, K]``, rows of unit norm.

  ``P [K, C]`` has orthonormal columns (QR of a uniform ``[K, C]`` matrix); the ETF is
  ``sqrt(C / (C − 1)) · P (I − 11ᵀ / C)``; row c of its transpose, normalised, anchors class c.
  Any two anchors have cosine ``−1 / (C − 1)``. Needs ``K >= C``.
  """
  if dim < num_classes:
    raise ConfigError(f"FedKTL's ETF needs a head width K >= the number of classes; got "
                      f"K={dim}, C={num_classes}")
  p, _ = jnp.linalg.qr(jax.random.uniform(key, (dim, num_classes)))
  c = num_classes
  etf = jnp.sqrt(c / (c - 1.0)) * p @ (jnp.eye(c) - jnp.ones((c, c)) / c)
  rows = etf.T
  return rows / jnp.linalg.norm(rows, axis=1, keepdims=True)


def normalize(z: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Rows scaled to unit L2 norm (PyTorch's ``F.normalize``: divided by ``max(‖z‖, eps)``)."""
  return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), eps)


def cosines(z: jax.Array, anchors: jax.Array) -> jax.Array:
  """``[n, C]`` cosines of the rows of ``z`` with the (unit) anchors: the prediction scores."""
  return normalize(z.astype(jnp.float32)) @ anchors.T


def margin_logits(z: jax.Array, labels: jax.Array, anchors: jax.Array, margin: float,
                  scale: float) -> jax.Array:
  """ArcFace logits ``s·cos θ_k``, with ``cos(θ_y + m)`` for the true class."""
  cos = jnp.clip(cosines(z, anchors), -1.0 + _COS_EPS, 1.0 - _COS_EPS)
  true = jax.nn.one_hot(labels, anchors.shape[0], dtype=bool)
  return scale * jnp.where(true, jnp.cos(jnp.arccos(cos) + margin), cos)


def margin_loss(z, labels, mask, anchors, margin: float, scale: float) -> jax.Array:
  """Mean cross-entropy of :func:`margin_logits` over the rows with ``mask``."""
  losses = optax.softmax_cross_entropy_with_integer_labels(
      margin_logits(z, labels, anchors, margin, scale), labels)
  mask = mask.astype(jnp.float32)
  return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def squared_distances(a: jax.Array, b: jax.Array) -> jax.Array:
  """``[n, m]`` squared Euclidean distances ``‖a_i‖² + ‖b_j‖² − 2⟨a_i, b_j⟩``."""
  return (jnp.square(a).sum(-1)[:, None] + jnp.square(b).sum(-1)[None]
          - 2.0 * a @ b.T)


def mmd(x: jax.Array, y: jax.Array, mask: jax.Array, bandwidths=BANDWIDTHS) -> jax.Array:
  """Biased MMD² between the rows of ``x`` and ``y`` with ``mask`` (the same rows of both):
  ``mean(K_xx + K_yy − 2K_xy)`` over the valid pairs, ``k(u, v) = Σ_a exp(−‖u − v‖² / 2a)``."""
  kernel = lambda d: sum(jnp.exp(-0.5 * d / a) for a in bandwidths)
  m = mask.astype(jnp.float32)
  pairs = m[:, None] * m[None]
  total = (kernel(squared_distances(x, x)) + kernel(squared_distances(y, y))
           - 2.0 * kernel(squared_distances(x, y)))
  return (pairs * total).sum() / jnp.maximum(m.sum() ** 2, 1.0)


def torch_linear_init(key: jax.Array, fan_in: int, fan_out: int) -> dict:
  """PyTorch's ``nn.Linear`` initialisation: weight and bias ``U(±1/sqrt(fan_in))``."""
  bound = 1.0 / np.sqrt(fan_in)
  kw, kb = jax.random.split(key)
  return {"w": jax.random.uniform(kw, (fan_in, fan_out), minval=-bound, maxval=bound),
          "b": jax.random.uniform(kb, (fan_out,), minval=-bound, maxval=bound)}


def linear(params: dict, x: jax.Array) -> jax.Array:
  return x @ params["w"] + params["b"]


def transformer_init(key: jax.Array, dim: int, w_dim: int):
  """``(params, stats)`` of F = Linear(K, K) → BatchNorm1d(K) → ReLU → Linear(K, w)."""
  k0, k1 = jax.random.split(key)
  params = {"fc0": torch_linear_init(k0, dim, dim),
            "bn": {"scale": jnp.ones((dim,)), "bias": jnp.zeros((dim,))},
            "fc1": torch_linear_init(k1, dim, w_dim)}
  return params, {"mean": jnp.zeros((dim,)), "var": jnp.ones((dim,))}


def transformer_apply(params, stats, x, mask=None):
  """F on ``x``. With ``mask`` (training mode) BatchNorm normalises with the statistics of
  the masked rows and returns updated running statistics (momentum 0.1, unbiased variance,
  as PyTorch); without (evaluation mode) it uses the running ones: ``(out, stats)``."""
  if mask is None:
    centred = linear(params["fc0"], x) - stats["mean"]
    var = stats["var"]
  else:
    # fc0's bias cancels in training mode; it is left out of the centred values so that its
    # gradient is exactly 0 (a rounding-noise gradient would get full-size Adam steps).
    h = x @ params["fc0"]["w"]
    m = mask.astype(jnp.float32)[:, None]
    n = jnp.maximum(m.sum(), 1.0)
    mean = (h * m).sum(0) / n
    centred = h - mean
    var = (jnp.square(centred) * m).sum(0) / n
    unbiased = var * n / jnp.maximum(n - 1.0, 1.0)
    batch_mean = jax.lax.stop_gradient(mean + params["fc0"]["b"])
    stats = {"mean": (1 - _BN_MOMENTUM) * stats["mean"] + _BN_MOMENTUM * batch_mean,
             "var": (1 - _BN_MOMENTUM) * stats["var"]
                    + _BN_MOMENTUM * jax.lax.stop_gradient(unbiased)}
  h = centred / jnp.sqrt(var + _BN_EPS) * params["bn"]["scale"] + params["bn"]["bias"]
  return linear(params["fc1"], jax.nn.relu(h)), stats


def reset_centroids(transformed: jax.Array, labels: jax.Array, valid: jax.Array,
                    centroids: jax.Array) -> jax.Array:
  """Row c ← the mean of the ``transformed`` rows of class c (``valid`` ones); classes
  without one keep their row."""
  onehot = jax.nn.one_hot(labels, centroids.shape[0]) * valid.astype(jnp.float32)[:, None]
  counts = onehot.sum(0)
  means = onehot.T @ transformed / jnp.maximum(counts, 1.0)[:, None]
  return jnp.where((counts > 0)[:, None], means, centroids)


def generated_rows(key: jax.Array, step: jax.Array, num_images: int, batch: int):
  """``(rows [B], mask [B])`` of step ``step`` of a cyclic, per-pass reshuffled loader over
  ``num_images`` generated pairs (the last batch of a pass holds the remainder)."""
  per_pass = -(-num_images // batch)
  order = jax.random.permutation(jax.random.fold_in(key, step // per_pass), num_images)
  positions = (step % per_pass) * batch + jnp.arange(batch)
  mask = positions < num_images
  return order[jnp.minimum(positions, num_images - 1)], mask


# ---------------------------------------------------------------------------- the algorithm
@register("FedKTL")
@dataclasses.dataclass(frozen=True)
class FedKTL(Algorithm):
  """ETF-anchored clients, a server that maps their prototypes into a generator's latent
  space, and generated (image, latent) pairs as the clients' additional task.

  Attributes:
    generator_path: a generator folder (``-GPath``; see `fedjax_lib.generators`).
    lam: weight of the server's centroid MSE (``-lam``; HtFLlib's StyleGAN-XL script: 1).
    mu: weight of the clients' generated-pair MSE (``-mu``; 50).
    server_learning_rate: Adam step size of F and the centroids (``-slr``; 0.01).
    server_batch_size: uploads per server step (``-sbs``; 100).
    server_epochs: server epochs per round (``-se``; 100).
    generation_batch_size: centroids decoded per generator call (``-gbs``; 4).
    margin, scale: ArcFace's m and s (HtFLlib: 0.5 and 64, fixed).
    pfllib_compat: restart every client's projector from the server's initial one each
      round, as HtFLlib does (its ``proj_fc`` is never saved).
    generator, generator_params: the generator and its parameters (from ``generator_path``
      when not given).
  """

  REFERENCE_SPLIT = True  # HtFLlib's main.py wraps the model in BaseHeadSplit

  generator_path: Optional[str] = None
  lam: float = 1.0
  mu: float = 50.0
  server_learning_rate: float = 0.01
  server_batch_size: int = 100
  server_epochs: int = 100
  generation_batch_size: int = 4
  margin: float = 0.5
  scale: float = 64.0
  pfllib_compat: bool = False
  generator: Any = dataclasses.field(default=None, compare=False)
  generator_params: Any = dataclasses.field(default=None, compare=False, repr=False)

  TRAIN_MODE = True
  TRAIN_LOSS_VIEW: ClassVar = None
  _STRUCTURAL: ClassVar[tuple[str, ...]] = ("model", "local", "generator", "generator_params")

  def __post_init__(self):
    for name in ("lam", "mu", "server_learning_rate", "margin"):
      check_number(self.name, name, getattr(self, name), 0.0)
    check_number(self.name, "scale", self.scale, 0.0)
    if not self.scale > 0:
      raise ConfigError(f"FedKTL hyperparameter scale={self.scale!r} must be > 0")
    for name in ("server_batch_size", "generation_batch_size"):
      check_int(self.name, name, getattr(self, name), 1)
    check_int(self.name, "server_epochs", self.server_epochs, 0)
    check_bool(self.name, "pfllib_compat", self.pfllib_compat)
    if self.generator_path is not None and not isinstance(self.generator_path, str):
      raise ConfigError(f"{self.name} hyperparameter generator_path={self.generator_path!r} "
                        "must be a folder path (-GPath)")
    if self.generator is None:
      if not self.generator_path:
        raise ConfigError(
            "FedKTL needs a generator: -GPath DIR (a folder written by `python -m "
            "fedjax_lib.generators train --data sample-photos --out DIR`), or generator= and "
            "generator_params= from Python")
      from fedjax_lib import generators  # pylint: disable=import-outside-toplevel
      generator, params = generators.load_generator(self.generator_path)
      object.__setattr__(self, "generator", generator)
      object.__setattr__(self, "generator_params", params)
    elif self.generator_params is None:
      raise ConfigError("FedKTL: generator= was given without generator_params=")

  # ------------------------------------------------------------------ shapes and state
  def shapes(self, sample_x):
    """``(num_classes, head width K, feature width d)`` of the model (traced abstractly)."""
    variables = abstract_variables(self.model, sample_x)
    x = jax.ShapeDtypeStruct((1, *sample_x.shape), sample_x.dtype)
    features, logits = jax.eval_shape(
        lambda v, x: self.model.apply(v, x, method="forward"), variables, x)
    return logits.shape[-1], logits.shape[-1], features.shape[-1]

  def init(self, key, sample_x, num_clients):
    num_classes, dim, feature_dim = self.shapes(sample_x)
    w_dim = self.generator.w_dim
    k_etf, k_f, k_centroids, k_proj, k_model = jax.random.split(key, 5)
    transformer, stats = transformer_init(k_f, dim, w_dim)
    projector = torch_linear_init(k_proj, feature_dim, w_dim)
    server = {
        "anchors": etf_anchors(k_etf, num_classes, dim),
        "transformer": transformer, "transformer_stats": stats,
        "centroids": jax.random.normal(k_centroids, (num_classes, w_dim)),  # Embedding init
        "images": jnp.zeros((num_classes, *np.shape(sample_x)), jnp.float32),
        "generated": jnp.zeros((), bool),
        "projector": projector,
    }
    clients = {"params": stack_clients(self.init_params(k_model, sample_x), num_clients),
               "projector": stack_clients(projector, num_clients)}
    return server, clients

  def server_inputs(self):
    """The generator's parameters (loaded from ``-GPath`` or given from Python)."""
    return self.generator_params

  # ------------------------------------------------------------------ client
  def client_update(self, server_state, client_state, data, key):
    model, anchors = self.model, server_state["anchors"]
    num_images = server_state["images"].shape[0]
    projector = (server_state["projector"] if self.pfllib_compat
                 else client_state["projector"])
    params = {"model": client_state["params"]["params"], "projector": projector}
    gen_key = jax.random.fold_in(key, 1)
    generated = server_state["generated"]

    def loss_fn(train, batch: Batch, step_key, aux):
      state, gen_step = aux
      (_, logits), state = apply_train(
          model, {"params": train["model"], **state}, batch.x, step_key)
      loss = margin_loss(logits, batch.y, batch.mask, anchors, self.margin, self.scale)
      rows, mask = generated_rows(gen_key, gen_step, num_images, self.local.batch_size)
      features, state_g = apply_train(model, {"params": train["model"], **state},
                                      server_state["images"][rows],
                                      jax.random.fold_in(step_key, 1), method="features")
      extra = masked_mse(linear(train["projector"], features),
                         server_state["centroids"][rows], mask)
      # Round 0 has no generated pairs: no extra term, and no extra forward pass.
      state = jax.tree.map(lambda g, s: jnp.where(generated, g, s), state_g, state)
      return loss + jnp.where(generated, self.mu * extra, 0.0), (state, gen_step + 1)

    tx = clip_each(dict.fromkeys(("model", "projector"), optax.sgd(self.local.learning_rate)),
                   _CLIP)
    variables = client_state["params"]
    params, _, stats = train_locally(params, data, key, self.local, loss_fn, tx=tx,
                                     aux=(model_state(variables), jnp.zeros((), jnp.int32)))
    state, _ = stats.pop("aux")
    new_variables = {"params": params["model"], **state}
    protos, present = eval_class_means(
        lambda x: normalize(model.apply(new_variables, x).astype(jnp.float32)),
        loader_samples(data, self.local.batch_size), anchors.shape[0])
    upload = {"protos": normalize(protos), "present": present}
    return {"params": new_variables, "projector": params["projector"]}, upload, stats

  # ------------------------------------------------------------------ server
  def server_update(self, server_state, uploads, weights, key, inputs=None):
    """Steps 1–3 of the module docstring; ``inputs`` are the generator's parameters
    (:meth:`server_inputs` when None)."""
    generator_params = self.server_inputs() if inputs is None else inputs
    num_classes, dim = server_state["anchors"].shape
    has = uploads["present"] & (weights > 0)[:, None]
    points = uploads["protos"].reshape(-1, dim).astype(jnp.float32)
    labels = jnp.tile(jnp.arange(num_classes), has.shape[0])
    valid = has.reshape(-1)
    params, stats = server_state["transformer"], server_state["transformer_stats"]

    def reset(params, stats, centroids):
      transformed, _ = transformer_apply(params, stats, points)
      return reset_centroids(transformed, labels, valid, centroids)

    centroids = reset(params, stats, server_state["centroids"])
    params, stats, centroids = self.train_transformer(
        params, stats, centroids, points, labels, valid, generator_params, key)
    centroids = reset(params, stats, centroids)
    images = self.generate(generator_params, centroids, server_state["images"].shape[1:])
    any_upload = valid.any()
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(any_upload, a, b), new, old)
    return {**server_state,
            "transformer": keep(params, server_state["transformer"]),
            "transformer_stats": keep(stats, server_state["transformer_stats"]),
            "centroids": keep(centroids, server_state["centroids"]),
            "images": keep(images, server_state["images"]),
            "generated": server_state["generated"] | any_upload}

  def train_transformer(self, params, stats, centroids, points, labels, valid,
                        generator_params, key):
    """``server_epochs`` epochs of Adam on ``MMD(F(P), W) + λ·MSE(F(P), Q̄[y])`` over the
    valid uploads, shuffled per epoch, ``ceil(n / sbs)`` batches (the last holds the rest)."""
    batch = self.server_batch_size
    total = points.shape[0]
    count = valid.sum()
    num_steps = -(-count // batch)
    padded = -(-total // batch) * batch + batch
    tx = clip_each(dict.fromkeys(("f", "q"), optax.adam(self.server_learning_rate)), _CLIP)

    def loss_fn(trained, stats, rows, mask, latents):
      out, stats = transformer_apply(trained["f"], stats, points[rows], mask)
      loss = mmd(out, latents, mask) + self.lam * masked_mse(
          out, trained["q"][labels[rows]], mask)
      return loss, stats

    def epoch(e, carry):
      epoch_key = jax.random.fold_in(key, e)
      order = jnp.pad(valid_row_order(epoch_key, valid), (0, padded - total))

      def step(s, carry):
        trained, opt_state, stats = carry
        rows = jax.lax.dynamic_slice(order, (s * batch,), (batch,))
        mask = s * batch + jnp.arange(batch) < count
        latents = self.generator.sample(generator_params,
                                        jax.random.fold_in(epoch_key, -1 - s), batch)
        grads, new_stats = jax.grad(loss_fn, has_aux=True)(trained, stats, rows, mask, latents)
        updates, new_opt = tx.update(grads, opt_state, trained)
        new = (optax.apply_updates(trained, updates), new_opt, new_stats)
        usable = mask.sum() > 1  # BatchNorm needs two rows
        return jax.tree.map(lambda a, b: jnp.where(usable, a, b), new, carry)

      return jax.lax.fori_loop(0, num_steps, step, carry)

    trained = {"f": params, "q": centroids}
    trained, _, stats = jax.lax.fori_loop(0, self.server_epochs, epoch,
                                          (trained, tx.init(trained), stats))
    return trained["f"], stats, trained["q"]

  def generate(self, generator_params, centroids, shape):
    """One image per class decoded from the centroids, ``-gbs`` at a time, fitted to the
    clients' sample ``shape``."""
    from fedjax_lib import generators  # pylint: disable=import-outside-toplevel
    images = jax.lax.map(lambda w: self.generator.decode(generator_params, w[None])[0],
                         centroids, batch_size=self.generation_batch_size)
    return generators.fit_images(images, tuple(shape)).astype(jnp.float32)

  def generated_images(self, server_state):
    """The class images of the last round (None before the first generation)."""
    if not bool(server_state["generated"]):
      return None
    return np.asarray(server_state["images"])

  # ------------------------------------------------------------------ evaluation, traffic
  def client_model(self, server_state, client_state):
    """The client's own model (HtFLlib's saved ``model``; ``-sfn``/``-mfn``)."""
    del server_state
    return client_state['params']

  def predict(self, server_state, client_state, x):
    """``s·cos`` with the ETF anchors: the prediction is their argmax (AUC ranks them, the
    train loss is their cross-entropy)."""
    return self.scale * cosines(self.model.apply(client_state["params"], x),
                                server_state["anchors"])

  def download(self, server_state):
    """The generated (image, latent) pairs."""
    return {"images": server_state["images"], "latents": server_state["centroids"]}

  def download_traffic(self, server_state) -> Traffic:
    """``C·(H·W·channels + w)`` floats once images exist (0 before)."""
    pairs = self.download(server_state)
    size = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(pairs))
    floats = jnp.where(server_state["generated"], float(size), 0.0).astype(jnp.float32)
    return Traffic(floats, floats * 4.0)

  def upload_traffic(self, upload) -> Traffic:
    """The prototypes of the classes the client has (``C_i × C``)."""
    return rows_traffic(upload["protos"], upload["present"])

  def check_settings(self, context: SettingsContext) -> list[str]:
    """Refuses a model without a feature extractor (the projector reads its features)."""
    base, _ = split_params(abstract_variables(self.model, context.sample_x))
    if not jax.tree.leaves(base):
      raise ConfigError(
          f"FedKTL trains a projector on the model's features, but model "
          f"{context.model_name!r} has no base/head split; use a model with a feature "
          "extractor (cnn, resnet18, ...)")
    num_classes, dim, _ = self.shapes(context.sample_x)
    if dim < num_classes:
      raise ConfigError(f"FedKTL's ETF anchors need a head width >= the number of classes "
                        f"({num_classes}); model {context.model_name!r} has {dim}")
    return []
