"""FedGen: data-free knowledge distillation with a server-side feature generator.

Zhu, Hong, Zhou, "Data-Free Knowledge Distillation for Heterogeneous Federated Learning",
ICML 2021 (arXiv:2105.10056). HtFLlib's ``-algo FedGen``: personal bases, one shared dense
head, and a generator of *features* (not images). Its ``total.sh`` runs ``-nd 32 -glr 0.1
-hd 512 -se 100``; the defaults here are its argparse ones (512, 0.005, 512, 100).

PFLlib's ``-algo FedGen`` is ``-algo FedGen-PFLlib`` here (`fedjax_lib.algorithms.fedgen_pfllib`):
its whole model is global (sent to every client, uploaded whole, averaged by samples,
evaluated as one model), its generator's Adam persists across rounds (``-ld`` decays its
rate), ``-se`` defaults to 1,000, and its ``-lf`` keeps the bases local (this shape, with
that Adam).

Each client keeps its own base ``f_i`` (any architecture, features pooled to one width d);
the head ``h = Linear(d, C)`` is global. The server owns a conditional feature generator
(:class:`Generator`)

    G(ε, y) = ReLU(BN([ε; onehot(y)] W₁ + b₁)) W₂ + b₂,    ε ~ U[0, 1)^nd,

``Linear(nd + C, hd) → BatchNorm1d → ReLU → Linear(hd, d)``, always in training mode
(BatchNorm normalises with the statistics of the batch it is given), as HtFLlib runs it.

The label pool is every training label of every client, i.e. the global class histogram
``n_c``; "B labels from the pool" are B independent draws with ``P(y = c) = n_c / Σ n``
(:func:`sample_labels`). Each client uploads its class counts once, in the initialisation
period before round 0 (:meth:`FedGen.warmup_client`); the server keeps their sum.

A round (B is the local batch size ``-lbs``):

1. Every client replaces its head with ``h``. A selected client trains base and head with
   plain SGD on, per step, ``CE(h_i(f_i(x)), y) + CE(h_i(G(ε, y_s)), y_s)`` with ``y_s`` B
   labels from the pool (G fixed: only the head gets the second term's gradient), and
   uploads its head ``(W_i, b_i)``: ``dC + C`` floats.
2. With the sample shares ``w_i = n_i / Σ_j n_j`` of the heads that arrived, the server
   trains G for ``server_epochs`` (``-se``) Adam steps at ``generator_learning_rate``
   (``-glr``), each on B fresh labels from the pool, minimising (:func:`ensemble_loss`)

       L_G = CE(Σ_i w_i (G(ε, y) W_i + b_i), y).

   The heads are linear and the weights sum to 1, so these are the logits of the averaged
   head: G learns features that the next round's global head classifies as their label.
3. ``h = Σ_i w_i (W_i, b_i)``.

Download per client: ``h`` and G's parameters, ``dC + C + (nd + C)·hd + hd + 2·hd + hd·d + d``
floats (nd = 32, C = 100, hd = d = 512: 51,300 + 68,096 + 1,024 + 262,656 = 383,076, the
reference's count). G's BatchNorm running statistics are never read (G never runs in
evaluation mode), so they are neither kept nor sent.

Measured (bundled digits, CNN + DNN clients, 10 clients, lr 0.05, 5 rounds, seeds 0/1): the
defaults reach .945/.934; ``pfllib_compat`` with the script's ``-nd 32 -glr 0.1`` .954/.947
(2026-12-01; .441/.422 on 2026-12-04 once ``--pfllib-compat`` also gave the DNN clients
HtFLlib's log-softmax features, `fedjax_lib.models.mlp`);
the script's values with G persisted only .687/.713: 100 Adam steps at 0.1 a round grow G's
output (mean norm 175 after one round, 885 after five; the real features' 11-47) and the
clients' second term then takes large, unstable steps on the head. HtFLlib's script values
were never run with a trained G; use a lower ``-glr`` with it.

Numerics: Adam's first steps move every parameter by about ``±lr`` whatever its gradient's
size, so a gradient entry that nearly cancels takes its sign from rounding. Uploads that
differ by 3e-8 (vmapped against sequential clients, nd = hd = 512) gave generators 0.17
apart after two rounds: executors and device counts agree in distribution, not digit (with
nd = 4, hd = 8 they agree to the bit).

Differences from HtFLlib (``servergen.py``/``clientgen.py``):

- **The trained generator persists across rounds and clients regularise with it** (the
  paper's method). HtFLlib's ``train_generator`` never saves what it trains: every round
  its server retrains the random initial G and throws it away, and its clients always
  regularise with that untrained G. ``pfllib_compat=True`` (``--pfllib-compat``) keeps that
  behaviour: G stays at its initialisation (the server's training, which would have no
  effect, is skipped).
- Adam is created afresh every round, as in HtFLlib (the paper's code keeps one optimiser
  across rounds and decays its rate by 0.98 a round).
- The label pool counts every training sample; HtFLlib counts over its drop_last loader
  without shuffling, leaving out each client's last ``n_i mod B`` samples (a class seen only
  there is missing from that client's counts). ``pfllib_compat=True`` counts HtFLlib's.
- Labels and noise come from the run's keys (HtFLlib: numpy's unseeded global RNG, torch's).
- fc1 sees batch-centred inputs and its bias is frozen (see :class:`Generator`): in
  training mode that is the same function; HtFLlib's Adam random-walks that bias, and the
  rows of a one-hot column constant over the batch, on rounding noise.
- A round in which no head arrives (all dropped) leaves G and h unchanged (HtFLlib asserts).
- ``train_loss`` is the cross-entropy of the evaluated model alone (HtFLlib's
  ``train_metrics`` adds the generator term on random labels).
- A batch size below 2 is refused: BatchNorm in training mode needs two rows (PyTorch
  raises; here every hidden unit would be 0 and G constant).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedjax_lib.algorithms.base import (SettingsContext, abstract_variables, check_bool, check_int,
                                        check_number)
from fedjax_lib.algorithms.prototypes import loader_samples
from fedjax_lib.algorithms.registry import register
from fedjax_lib.algorithms.split import SplitAlgorithm, dense_head_shape, split_parts
from fedjax_lib.config import MAX_FEATURE_DIM
from fedjax_lib.core.aggregate import normalized_weights, weighted_average
from fedjax_lib.core.local import class_counts, masked_cross_entropy, train_locally
from fedjax_lib.errors import ConfigError
from fedjax_lib.models.base import apply_train, model_state
from fedjax_lib.models.layers import TorchBatchNorm, TorchDense


# ---------------------------------------------------------------------------- pure pieces
class Generator(nn.Module):
  """``G(ε, y) = fc(ReLU(BN(fc1([ε; onehot(y)]))))`` in training mode: ``[B, nd]`` noise and
  ``[B]`` labels to ``[B, feature_dim]`` features (PyTorch's initialisation and BatchNorm).

  BatchNorm in training mode removes the batch mean of fc1's output, so fc1 is fed the
  batch-centred input ``z − z̄``: the same function, in which the directions BatchNorm
  cancels get an exactly-zero gradient instead of rounding noise that Adam would turn into
  full-size steps (a one-hot column constant over the batch; fc1's bias, whose gradient
  :func:`train_generator` zeroes). Two computations of the same steps that round
  differently then agree (at small sizes; for large ones see the module's Numerics).
  """
  num_classes: int
  hidden_dim: int
  feature_dim: int

  @nn.compact
  def __call__(self, noise: jax.Array, labels: jax.Array) -> jax.Array:
    onehot = jax.nn.one_hot(labels, self.num_classes, dtype=noise.dtype)
    z = jnp.concatenate([noise, onehot], axis=-1)
    h = TorchDense(self.hidden_dim, name="fc1")(z - z.mean(axis=0))
    h = nn.relu(TorchBatchNorm(name="bn")(h, train=True))
    return TorchDense(self.feature_dim, name="fc")(h)


def init_generator(key: jax.Array, noise_dim: int, num_classes: int, hidden_dim: int,
                   feature_dim: int):
  """G's parameters ``{'fc1', 'bn', 'fc'}`` (its running statistics are dropped)."""
  module = Generator(num_classes, hidden_dim, feature_dim)
  return module.init(key, jnp.zeros((2, noise_dim)), jnp.zeros((2,), jnp.int32))["params"]


def apply_generator(params, noise: jax.Array, labels: jax.Array, num_classes: int):
  """G in training mode: BatchNorm uses the batch's mean and biased variance."""
  hidden_dim, feature_dim = params["fc"]["kernel"].shape
  module = Generator(num_classes, hidden_dim, feature_dim)
  out, _ = module.apply({"params": params}, noise, labels, mutable=["batch_stats"])
  return out


def sample_labels(key: jax.Array, label_counts: jax.Array, num: int) -> jax.Array:
  """``num`` independent labels with ``P(c) = n_c / Σ n`` (uniform draws from the pool of
  every training label); uniform over classes while the histogram is empty."""
  logits = jnp.where(label_counts.sum() > 0, jnp.log(label_counts), 0.0)
  return jax.random.categorical(key, logits, shape=(num,)).astype(jnp.int32)


def generated_batch(params, label_counts: jax.Array, key: jax.Array, num: int):
  """``(labels [num], G(ε, labels) [num, d])``: labels from the pool, ε ~ U[0, 1)^nd."""
  num_classes = label_counts.shape[0]
  label_key, noise_key = jax.random.split(key)
  labels = sample_labels(label_key, label_counts, num)
  noise_dim = params["fc1"]["kernel"].shape[0] - num_classes
  noise = jax.random.uniform(noise_key, (num, noise_dim))
  return labels, apply_generator(params, noise, labels, num_classes)


def ensemble_logits(features: jax.Array, kernels: jax.Array, biases: jax.Array,
                    weights: jax.Array) -> jax.Array:
  """``Σ_k w̄_k (features W_k + b_k)`` with ``w̄ = weights / Σ weights``: ``[B, C]``.

  ``kernels [K, d, C]``, ``biases [K, C]``: the stacked uploaded heads, each applied as a
  plain dense layer (the server never needs a client's model).
  """
  per_head = jax.vmap(lambda w, b: features @ w + b)(kernels, biases)     # [K, B, C]
  return jnp.tensordot(normalized_weights(weights), per_head, axes=1)


def ensemble_loss(features, labels, kernels, biases, weights) -> jax.Array:
  """``CE(ensemble_logits(features), labels)``, the mean over the batch."""
  logits = ensemble_logits(features, kernels, biases, weights)
  return masked_cross_entropy(logits, labels, jnp.ones(labels.shape, jnp.float32))


def train_generator(params, heads, weights, label_counts, key, num_steps: int,
                    batch_size: int, learning_rate):
  """``num_steps`` steps of a fresh Adam (PyTorch's defaults: β = 0.9/0.999, ε = 1e-8) on
  :func:`ensemble_loss` of G's features, step s drawing its labels and noise from
  ``fold_in(key, s)``."""
  tx = generator_adam(learning_rate)
  params, _ = generator_steps(params, tx.init(params), tx, heads, weights, label_counts, key,
                              num_steps, batch_size)
  return params


def generator_adam(learning_rate) -> optax.GradientTransformation:
  """G's optimiser: ``torch.optim.Adam`` at its defaults (β = 0.9/0.999, ε = 1e-8)."""
  return optax.adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8)


def generator_steps(params, opt_state, tx, heads, weights, label_counts, key, num_steps: int,
                    batch_size: int):
  """``(params, opt_state)`` after ``num_steps`` steps of ``tx`` from ``opt_state`` on
  :func:`ensemble_loss` (see :func:`train_generator`)."""

  def loss_fn(p, step_key):
    labels, features = generated_batch(p, label_counts, step_key, batch_size)
    return ensemble_loss(features, labels, heads["kernel"], heads["bias"], weights)

  def step(s, carry):
    p, opt_state = carry
    grads = jax.grad(loss_fn)(p, jax.random.fold_in(key, s))
    # fc1's bias cancels in BatchNorm (see Generator): its exact gradient is 0.
    grads = {**grads, "fc1": {**grads["fc1"], "bias": jnp.zeros_like(grads["fc1"]["bias"])}}
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state

  return jax.lax.fori_loop(0, num_steps, step, (params, opt_state))


def head_shape(variables, model_name: str = "this model") -> tuple[int, int]:
  """``(d, C)`` of a one-dense-layer head; a ConfigError naming FedGen for any other head."""
  return dense_head_shape(
      variables, model_name, "FedGen shares one global head Linear(d, C) and trains its "
      "generator against every client's head as a dense layer")


# ---------------------------------------------------------------------------- the clients' side
class GeneratorClients:
  """What FedGen and FedGen-PFLlib share around the generator: hyperparameter checks, the
  server's generator and label pool, the label pool's initialisation period, the clients'
  regularised training and the settings checks. Mixed into an `Algorithm` dataclass (listed
  before it, so :meth:`check_settings` reaches the algorithm's own) with the fields
  ``noise_dim``, ``generator_learning_rate``, ``hidden_dim`` and ``server_epochs``."""

  def check_generator_hyperparameters(self):
    # (widths of the generator's layers: -nd 2**31 - 1 filled memory before anything ran)
    check_int(self.name, "noise_dim", self.noise_dim, 1, MAX_FEATURE_DIM)
    check_int(self.name, "hidden_dim", self.hidden_dim, 1, MAX_FEATURE_DIM)
    check_int(self.name, "server_epochs", self.server_epochs, 0)
    check_number(self.name, "generator_learning_rate", self.generator_learning_rate, 0.0)

  def generator_state(self, key, sample_x) -> dict:
    """``{"generator": G's initial parameters, "label_counts": zeros [C]}`` (G from
    ``fold_in(key, 1)``)."""
    dim, num_classes = head_shape(abstract_variables(self.model, sample_x))
    generator = init_generator(jax.random.fold_in(key, 1), self.noise_dim, num_classes,
                               self.hidden_dim, dim)
    return {"generator": generator, "label_counts": jnp.zeros((num_classes,), jnp.float32)}

  # ------------------------------------------------------------------ initialisation period
  def warmup_client(self, server_state, client_state, data, key):
    """Uploads the client's training samples per class, once."""
    del key
    return client_state, class_counts(data, server_state["label_counts"].shape[0])

  def warmup_server(self, server_state, uploads, weights, key):
    """``label_counts`` = the sum of every client's class counts (the label pool)."""
    del key
    counts = jnp.where((weights > 0)[:, None], uploads, 0.0).sum(axis=0)
    return {**server_state, "label_counts": counts}

  # ------------------------------------------------------------------ rounds
  def train_with_generator(self, server_state, variables, data, key):
    """SGD on every parameter of ``variables`` (training mode) with, per step,
    ``CE(model(x), y) + CE(head(G(ε, y_s)), y_s)``, G the server's (fixed) and ``y_s`` B
    labels from its pool. Returns ``(trained variables, stats)``."""
    generator, counts = server_state["generator"], server_state["label_counts"]
    model, batch_size = self.model, self.local.batch_size

    def loss_fn(params, batch, step_key, state):
      full = {"params": params, **state}
      (_, logits), state = apply_train(model, full, batch.x, step_key)
      labels, features = generated_batch(generator, counts, jax.random.fold_in(step_key, 1),
                                         batch_size)
      synthetic = model.apply(full, features, method="classify")
      loss = (masked_cross_entropy(logits, batch.y, batch.mask)
              + masked_cross_entropy(synthetic, labels, jnp.ones((batch_size,))))
      return loss, state

    params, _, stats = train_locally(variables["params"], data, key, self.local, loss_fn,
                                     aux=model_state(variables))
    return {"params": params, **stats.pop("aux")}, stats

  def check_settings(self, context: SettingsContext) -> list[str]:
    """Refuses a head that is not one dense layer, and batches G's BatchNorm cannot
    normalise (fewer than 2 labels); then the algorithm class's own checks."""
    head_shape(abstract_variables(self.model, context.sample_x),
               f"model {context.model_name!r}")
    if self.local.batch_size < 2:
      raise ConfigError(
          f"{self.name} runs its generator's BatchNorm in training mode on batches of "
          f"batch_size labels, but batch_size={self.local.batch_size}: a batch of one "
          "normalises every hidden unit to 0 (PyTorch raises); use batch_size >= 2 (-lbs)")
    return super().check_settings(context)


class GeneratorHeadClients(GeneratorClients):
  """The clients of a `SplitAlgorithm` sharing the head (``SHARED = "head"``) with the
  generator term: FedGen and FedGen-PFLlib's ``-lf``. Server state ``{"head", ...}``."""

  def variables(self, server_state, client_state):
    return super().variables({"head": server_state["head"]}, client_state)

  def client_update(self, server_state, client_state, data, key):
    """SGD on base and head: cross-entropy plus the head's on B generated features; the base
    stays, the head is uploaded."""
    trained, stats = self.train_with_generator(
        server_state, self.variables(server_state, client_state), data, key)
    return self._client_state(trained), {"head": split_parts(trained)["head"]}, stats

  def client_model(self, server_state, client_state):
    """The client's full model: its base with the server's head (HtFLlib's saved ``model``;
    ``-sfn``/``-mfn``: a loaded model's head is replaced by the server's from round 0 on)."""
    return self.variables(server_state, client_state)

  def download(self, server_state):
    """The global head and G's parameters (the label pool was sent once; a persistent Adam
    stays on the server)."""
    return {"head": server_state["head"], "generator": server_state["generator"]}


def zero_unweighted(uploads, weights):
  """``uploads`` with the slots of weight 0 (dropped, unselected, padding: they may hold
  anything) set to zeros."""
  keep = weights > 0
  return jax.tree.map(lambda a: jnp.where(keep.reshape((-1,) + (1,) * (a.ndim - 1)), a, 0),
                      uploads)


# ---------------------------------------------------------------------------- the algorithm
@register("FedGen")
@dataclasses.dataclass(frozen=True)
class FedGen(GeneratorHeadClients, SplitAlgorithm):
  """Personal bases, a global dense head, and a server generator of labelled features that
  regularises every client's head.

  Server state ``{"head", "generator", "label_counts"}``; client state: the base (and
  BatchNorm statistics), stacked.

  Attributes:
    noise_dim: nd, the width of G's uniform noise (``-nd``; HtFLlib 512, scripts 32).
    generator_learning_rate: G's Adam step size (``-glr``; 0.005, scripts 0.1).
    hidden_dim: hd, G's hidden width (``-hd``; 512).
    server_epochs: Adam steps on G per round, B labels each (``-se``; 100).
    pfllib_compat: keep G at its initialisation, as HtFLlib does (it never saves G), and
      count the label pool over HtFLlib's loader samples (each client's first ``⌊n/B⌋·B``).
  """

  REFERENCE_SPLIT = True  # HtFLlib's main.py wraps the model in BaseHeadSplit

  noise_dim: int = 512
  generator_learning_rate: float = 0.005
  hidden_dim: int = 512
  server_epochs: int = 100
  pfllib_compat: bool = False

  SHARED = "head"
  TRAIN_MODE = True

  def __post_init__(self):
    self.check_generator_hyperparameters()
    check_bool(self.name, "pfllib_compat", self.pfllib_compat)

  def init(self, key, sample_x, num_clients):
    server, clients = super().init(key, sample_x, num_clients)
    return {**server, **self.generator_state(key, sample_x)}, clients

  def warmup_client(self, server_state, client_state, data, key):
    """The client's class counts; with ``pfllib_compat`` over HtFLlib's loader samples."""
    if self.pfllib_compat:
      data = loader_samples(data, self.local.batch_size)
    return super().warmup_client(server_state, client_state, data, key)

  def server_update(self, server_state, uploads, weights, key):
    keep = weights > 0
    heads = zero_unweighted(uploads["head"], weights)
    generator = server_state["generator"]
    if not self.pfllib_compat:
      trained = train_generator(generator, heads, weights, server_state["label_counts"], key,
                                self.server_epochs, self.local.batch_size,
                                self.generator_learning_rate)
      generator = jax.tree.map(lambda a, b: jnp.where(keep.any(), a, b), trained, generator)
    head = weighted_average(heads, weights, fallback=server_state["head"])
    return {**server_state, "head": head, "generator": generator}
