"""FedL2G: Federated Learning-to-Guide (``FedL2G-feat`` and ``FedL2G-logit``).

Zhang, Liu, Hua, Cao, Yang, "FedL2G: Learning to Guide Local Training in Heterogeneous
Federated Learning", arXiv:2410.06490 (2024; its later version is titled "Adaptive Guidance
for Local Training in Heterogeneous Federated Learning"). HtFLlib's ``-algo FedL2G-feat`` /
``FedL2G-logit`` (``clientl2g_{feat,logit}.py``, ``serverl2g_{feat,logit}.py``).

The server owns trainable **guiding vectors** ``V [C, k]`` (``N(0, 1)``, as ``nn.Embedding``),
one per class: ``k = d`` guides the features ``g = f(x)`` (FedL2G-feat), ``k = C`` the logits
``g = h(f(x))`` (FedL2G-logit). Client i's training samples are split once
(:func:`split_quiz`): the **quiz** set is the first ``M_q·B`` of them (``M_q`` =
``meta_quiz_batches``, ``-mqb``), the **study** set the rest. A round, for a selected client:

1. regular local training (skipped during the first ``warmup_rounds`` rounds, ``-wu``):
   ``local_epochs`` of SGD over the study set on ``CE(h(f(x)), y) + MSE(g, V[y])``
   (:func:`guiding_mse`: the mean over the batch's ``B x k`` entries), the gradient clipped
   to global norm 100;
2. the meta step, on the model just trained: ``M_s`` (``meta_study_batches``, ``-mdb``)
   shuffled study batches give the pseudo-loss ``L_s(θ, V)`` = their mean of
   ``CE + MSE(g, V[y])``; one differentiable SGD step ``θ' = θ − η ∇_θ L_s(θ, V)`` (the whole
   model, η the local learning rate, unclipped); ``L_q(θ')`` = the mean CE over the ``M_q``
   shuffled quiz batches; the client uploads

       ∂L_q(θ − η ∇_θ L_s(θ, V)) / ∂V          (:func:`meta_gradient`, ``jax.grad`` through
                                                  the step; the model itself is not updated)

   for the classes whose row of it is non-zero (those in its study batches).

The server takes, per class, the unweighted mean of the rows sent (zero for a class nobody
sent), clips that ``[C, k]`` gradient to global norm 100 and takes one SGD step
``V ← V − η_s·clip(Ḡ)`` (η_s = ``server_learning_rate``, ``-slr``; :func:`server_step`); its
state also counts the rounds, which is how clients know the warm-up is over (one compiled
program: a ``lax.cond``). Clients keep their whole models (any architectures) and are
evaluated with them. BatchNorm and dropout run in training mode in both steps, as HtFLlib.

Communication per round: ``C_i·k`` floats up per aggregated client (``C_i``: its classes with
a non-zero gradient row), ``C·k`` down per client (V).

Differences from HtFLlib (no behaviour of it needs a ``pfllib_compat`` switch):

- Regular training reshuffles the study set every epoch (HtFLlib: a fixed order), as every
  algorithm here does unless ``--shuffle false``.
- With ``-fs`` (few-shot) the clients train and meta-learn on their few-shot subsets;
  HtFLlib's FedL2G clients read their training data without the ``few_shot`` argument, so
  they use every sample there.
- A client with fewer than ``M_s`` full study batches averages its pseudo-loss over those it
  has (HtFLlib divides by ``M_s``); one without any (fewer than ``(M_q + 1)·B`` training
  samples) never trains and sends nothing (HtFLlib's meta step fails on it).
  :meth:`FedL2G.check_settings` warns about both and refuses a run where every client is
  that small.
- As in HtFLlib the runner evaluates nothing before round ``-wu``
  (:meth:`FedL2G.first_evaluated_round`); a run with no round left to evaluate is refused.
  An engine driven directly evaluates when asked. ``local_loss`` is 0 in warm-up rounds;
  ``train_loss`` is over the whole training set (HtFLlib: the study set).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lib.algorithms.base import (Algorithm, SettingsContext, Traffic,
                                        abstract_variables, check_int, check_number,
                                        rows_traffic, stack_clients, untrained_new_clients)
from fedjax_lib.algorithms.prototypes import mean_of_uploads
from fedjax_lib.algorithms.registry import register
from fedjax_lib.core.local import (ClientData, LocalSpec, batch_schedule,
                                   masked_cross_entropy, masked_mse, train_model)
from fedjax_lib.errors import ConfigError
from fedjax_lib.models.base import apply_train, model_state, split_params

CLIP = 100.0  # HtFLlib's gradient-norm clip (clients' training and the server's step)


# ---------------------------------------------------------------------------- pure pieces
def split_quiz(data: ClientData, quiz_size: int) -> tuple[ClientData, ClientData]:
  """``(quiz, study)`` views of one client's training data: the quiz set is its first
  ``quiz_size`` samples (all of them if it has fewer), the study set the rest.

  Both keep the table's width (static shapes): the quiz view is the same table with the
  count cut to ``min(count, quiz_size)``; the study view's table is rotated left by
  ``quiz_size`` (the study samples first, the quiz ones behind its count).
  """
  quiz = data._replace(train_count=jnp.minimum(data.train_count, quiz_size))
  study = data._replace(train_idx=jnp.roll(data.train_idx, -quiz_size),
                        train_count=jnp.maximum(data.train_count - quiz_size, 0))
  return quiz, study


def draw_batches(data: ClientData, key: jax.Array, batch_size: int, num_batches: int):
  """``(rows [n, B], valid [n])``: the first ``n = num_batches`` batches of one shuffled
  pass over the view's samples, a batch valid when it is full (PyTorch's
  ``DataLoader(shuffle=True, drop_last=True)`` left after ``n`` batches)."""
  need = num_batches * batch_size
  width = data.train_idx.shape[0]
  if width < need:
    data = data._replace(train_idx=jnp.pad(data.train_idx, (0, need - width)))
  return batch_schedule(data, key, LocalSpec(batch_size=batch_size,
                                             steps_per_epoch=num_batches))


def guiding_mse(outputs: jax.Array, labels: jax.Array, mask: jax.Array,
                guide: jax.Array) -> jax.Array:
  """``Σ_i mask_i·‖g_i − V[y_i]‖² / (n·k)``, ``n = Σ mask`` (PyTorch's ``MSELoss`` over the
  batch's ``B x k`` entries); differentiable in ``V``."""
  return masked_mse(outputs, guide[labels], mask)


def meta_gradient(study_loss, quiz_loss, params, guide: jax.Array, learning_rate) -> jax.Array:
  """``∂/∂V L_q(θ − η ∇_θ L_s(θ, V))``: the gradient of the quiz loss after one SGD step on
  the study loss, w.r.t. the guiding vectors.

  Args:
    study_loss: ``(params, guide) -> scalar``; quiz_loss: ``params -> scalar``.
    params: θ; guide: V; learning_rate: η.
  """
  def after_one_step(guide):
    grads = jax.grad(study_loss)(params, guide)
    stepped = jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)
    return quiz_loss(stepped)

  return jax.grad(after_one_step)(guide)


def server_step(guide: jax.Array, grads: jax.Array, has: jax.Array, learning_rate,
                clip: float = CLIP) -> jax.Array:
  """``V − η_s·clip(Ḡ)``: ``Ḡ [C, k]`` is the per-class mean of ``grads [K, C, k]`` over the
  uploads with ``has [K, C]`` (zero for a class without one), clipped to global norm
  ``clip``."""
  grads = jnp.where(has[..., None], grads, 0.0)  # nothing from a slot that sent nothing
  mean, _ = mean_of_uploads(grads, has)
  clipped, _ = optax.clip_by_global_norm(clip).update(mean, optax.EmptyState())
  return guide - learning_rate * clipped


# ---------------------------------------------------------------------------- the algorithm
@dataclasses.dataclass(frozen=True)
class FedL2G(Algorithm):
  """Guiding vectors learned from the clients' meta-gradients; personal models.

  Subclasses set ``GUIDED``: which output of ``model.forward`` (0 features, 1 logits) the
  vectors guide.

  Attributes:
    meta_study_batches: study batches of the meta step's pseudo-loss (``-mdb``; 1).
    meta_quiz_batches: quiz batches; the quiz set is the first ``mqb·B`` samples (``-mqb``; 1).
    warmup_rounds: first rounds with meta steps only, no local training (``-wu``; 50).
    server_learning_rate: SGD step size on the guiding vectors (``-slr``; 0.01).
  """

  meta_study_batches: int = 1
  meta_quiz_batches: int = 1
  warmup_rounds: int = 50
  server_learning_rate: float = 0.01

  GUIDED: ClassVar[int]  # set by each subclass: 0 guides the features, 1 the logits

  def __post_init__(self):
    check_int(self.name, "meta_study_batches", self.meta_study_batches, 1)
    check_int(self.name, "meta_quiz_batches", self.meta_quiz_batches, 1)
    check_int(self.name, "warmup_rounds", self.warmup_rounds, 0)
    check_number(self.name, "server_learning_rate", self.server_learning_rate, 0.0)

  @property
  def quiz_size(self) -> int:
    return self.meta_quiz_batches * self.local.batch_size

  def init(self, key, sample_x, num_clients):
    x = jax.ShapeDtypeStruct((1, *sample_x.shape), sample_x.dtype)
    outputs = jax.eval_shape(lambda v, x: self.model.apply(v, x, method="forward"),
                             abstract_variables(self.model, sample_x), x)
    num_classes, width = outputs[1].shape[-1], outputs[self.GUIDED].shape[-1]
    guide = jax.random.normal(jax.random.fold_in(key, 1), (num_classes, width), jnp.float32)
    clients = {"params": stack_clients(self.init_params(key, sample_x), num_clients)}
    return {"guide": guide, "round": jnp.zeros((), jnp.int32)}, clients

  def objective(self, guide):
    """The regular local loss ``CE + MSE(g, V[y])`` (a `train_model` objective)."""
    def loss(features, logits, batch, carry):
      guided = (features, logits)[self.GUIDED]
      return (masked_cross_entropy(logits, batch.y, batch.mask)
              + guiding_mse(guided, batch.y, batch.mask, guide), carry)
    return loss

  def client_update(self, server_state, client_state, data, key):
    guide = server_state["guide"]
    _, study = split_quiz(data, self.quiz_size)
    train_key, meta_key = jax.random.split(key)
    tx = optax.chain(optax.clip_by_global_norm(CLIP), optax.sgd(self.local.learning_rate))

    def train(variables):
      variables, _, stats = train_model(self.model, variables, study, train_key, self.local,
                                        self.objective(guide), tx=tx)
      return variables, {"loss": stats["loss"].astype(jnp.float32),
                         "steps": stats["steps"].astype(jnp.int32)}

    def warm_up(variables):
      return variables, {"loss": jnp.zeros((), jnp.float32), "steps": jnp.zeros((), jnp.int32)}

    variables, stats = jax.lax.cond(server_state["round"] >= self.warmup_rounds, train,
                                    warm_up, client_state["params"])
    grads = self.guide_gradient(variables, guide, data, meta_key)
    upload = {"grads": grads, "present": jnp.any(grads != 0, axis=1)}
    return {"params": variables}, upload, stats

  def meta_batches(self, data: ClientData, key: jax.Array):
    """``((study_rows, study_valid), (quiz_rows, quiz_valid))`` of the meta step: ``M_s``
    shuffled study batches and the ``M_q`` shuffled quiz batches."""
    quiz, study = split_quiz(data, self.quiz_size)
    study_key, quiz_key = jax.random.split(key)
    b = self.local.batch_size
    return (draw_batches(study, study_key, b, self.meta_study_batches),
            draw_batches(quiz, quiz_key, b, self.meta_quiz_batches))

  def guide_gradient(self, variables, guide, data: ClientData, key: jax.Array) -> jax.Array:
    """The meta-gradient ``[C, k]`` of one client (see the module docstring); the batches
    come from ``key``'s first half, the dropout keys from its second."""
    batch_key, dropout_key = jax.random.split(key)
    (study_rows, study_valid), (quiz_rows, quiz_valid) = self.meta_batches(data, batch_key)
    state = model_state(variables)

    def mean_over_batches(loss_of_batch, params, rows, valid, stream):
      keys = jax.random.split(jax.random.fold_in(dropout_key, stream), rows.shape[0])

      def one(batch_rows, batch_key):
        outputs, _ = apply_train(self.model, {"params": params, **state}, data.x[batch_rows],
                                 batch_key)
        return loss_of_batch(outputs, data.y[batch_rows])

      losses = jax.vmap(one)(rows, keys)
      valid = valid.astype(jnp.float32)
      return (losses * valid).sum() / jnp.maximum(valid.sum(), 1.0)

    def study_loss(params, guide):
      ones = jnp.ones((self.local.batch_size,))
      pseudo = lambda out, y: (masked_cross_entropy(out[1], y, ones)
                               + guiding_mse(out[self.GUIDED], y, ones, guide))
      return mean_over_batches(pseudo, params, study_rows, study_valid, 0)

    def quiz_loss(params):
      ce = lambda out, y: masked_cross_entropy(out[1], y, jnp.ones(y.shape))
      return mean_over_batches(ce, params, quiz_rows, quiz_valid, 1)

    return meta_gradient(study_loss, quiz_loss, variables["params"], guide,
                         self.local.learning_rate)

  def server_update(self, server_state, uploads, weights, key):
    del key
    has = uploads["present"] & (weights > 0)[:, None]
    return {"guide": server_step(server_state["guide"], uploads["grads"], has,
                                 self.server_learning_rate),
            "round": server_state["round"] + 1}

  def first_evaluated_round(self) -> int:
    """No evaluation during the warm-up rounds (HtFLlib)."""
    return self.warmup_rounds

  def client_model(self, server_state, client_state):
    """The client's own model (HtFLlib's saved ``model``; ``-sfn``/``-mfn``)."""
    del server_state
    return client_state['params']

  def predict(self, server_state, client_state, x):
    """The client's own model (HtFLlib evaluates ``model(x)``)."""
    del server_state
    return self.model.apply(client_state["params"], x)

  def new_client_variables(self, server_state, client_state):
    """A new client trains its own freshly initialised model."""
    return client_state["params"]

  def download(self, server_state):
    return {"guide": server_state["guide"]}

  def upload_traffic(self, upload) -> Traffic:
    """The gradient rows of the classes it has a non-zero row for (``C_i x k``)."""
    return rows_traffic(upload["grads"], upload["present"])

  def check_settings(self, context: SettingsContext) -> list[str]:
    """Refuses clients that are all too small for a quiz set and a study batch; warns about
    those that are, and those with fewer than ``M_s`` study batches."""
    counts = np.asarray(context.train_counts, np.int64)
    b, quiz = self.local.batch_size, self.quiz_size
    idle = counts < quiz + b
    fix = "use a smaller batch_size or meta_quiz_batches (-mqb)"
    if idle.all():
      raise ConfigError(
          f"{self.name} needs meta_quiz_batches·batch_size = {quiz} quiz samples and a study "
          f"batch of {b} per client, {quiz + b} training samples, but the largest client has "
          f"{int(counts.max())}: nothing would be trained or guided; {fix}")
    out = []
    if idle.any():
      out.append(f"{self.name}: {int(idle.sum())} of {counts.size} clients have fewer than "
                 f"meta_quiz_batches·batch_size + batch_size = {quiz + b} training samples "
                 f"(the smallest has {int(counts.min())}): no study batch, so they never "
                 f"train and send no guidance; {fix}")
    short = ~idle & (counts < quiz + self.meta_study_batches * b)
    if short.any():
      out.append(f"{self.name} hyperparameter meta_study_batches={self.meta_study_batches}: "
                 f"{int(short.sum())} of {counts.size} clients have fewer study batches "
                 f"(fewer than {quiz + self.meta_study_batches * b} training samples); their "
                 "meta step uses those they have; use a smaller meta_study_batches (-mdb)")
    return out + untrained_new_clients(self.name, "model", context)


@register("FedL2G-feat")
@dataclasses.dataclass(frozen=True)
class FedL2GFeat(FedL2G):
  """FedL2G guiding the features ``f(x)`` (``V [C, d]``)."""

  REFERENCE_SPLIT = True  # HtFLlib's main.py wraps the model in BaseHeadSplit
  GUIDED: ClassVar[int] = 0
  TRAIN_MODE = True

  def check_settings(self, context: SettingsContext) -> list[str]:
    """Also refuses a model whose base has no parameters (its features are the inputs)."""
    base, _ = split_params(abstract_variables(self.model, context.sample_x))
    if not jax.tree.leaves(base):
      raise ConfigError(
          f"{self.name} guides the model's features, but model {context.model_name!r} has "
          "no feature extractor (its base has no parameters, so its features are the raw "
          "inputs and the guidance has no gradient); use FedL2G-logit or a model with a "
          "base (cnn, dnn, resnet18, ...)")
    return super().check_settings(context)


@register("FedL2G-logit")
@dataclasses.dataclass(frozen=True)
class FedL2GLogit(FedL2G):
  """FedL2G guiding the logits ``h(f(x))`` (``V [C, C]``)."""

  REFERENCE_SPLIT = True  # HtFLlib's main.py wraps the model in BaseHeadSplit
  GUIDED: ClassVar[int] = 1
  TRAIN_MODE = True
