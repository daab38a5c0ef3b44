"""The shared local-training routine: epochs of shuffled, masked mini-batch steps.

Every algorithm trains through :func:`train_locally`, parameterised by a loss function and an
optax transform; no algorithm contains its own loop.

Semantics (PFLlib's, so results are comparable): ``local_epochs`` passes over the client's
training samples, reshuffled every epoch from the client's key, batches of ``batch_size`` with
drop_last. Clients have different sizes, but a compiled program needs one shape, so every client
runs ``steps_per_epoch`` steps per epoch — the largest ``count // batch_size`` over all clients —
and the steps past a client's own ``count // batch_size`` are masked: a masked step leaves the
parameters, the optimizer state and the loss statistics unchanged.

How the steps run is a static choice (``LocalSpec.loop``) with the same result: ``'scan'`` runs
all ``steps_per_epoch`` steps of every epoch in a ``lax.scan`` and discards the masked ones
(one static shape: the choice for vmapped clients on accelerators); ``'valid'`` runs only the
client's own steps in a loop with a dynamic trip count (no work on masked steps: the choice for
one client at a time on XLA:CPU, where the smallest client of a Dirichlet partition would
otherwise pay for the largest's steps).

**DP-SGD** (``LocalSpec.dp_clip`` set; `fedjax_lib.privacy` accounts for it): every step's
gradient is replaced by Abadi et al.'s private gradient (:func:`private_value_and_grad`): each
example's gradient, computed alone through the same ``loss_fn`` as a batch of one, is clipped
to L2 norm ``dp_clip`` over the whole trained tree; the clipped gradients are summed, Gaussian
noise ``N(0, (dp_sigma·dp_clip)²)`` is added to every coordinate and the sum is divided by the
batch size. The optimizer then applies it as any gradient. Masked steps still change nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from fedjax_lib.core import rng
from fedjax_lib.models.base import apply_train, model_state


class Batch(NamedTuple):
  """One mini-batch gathered from the shared sample arrays.

  ``mask[b]`` is 1 for real samples; losses average over real samples only.
  """
  x: jax.Array
  y: jax.Array
  mask: jax.Array


class SampleFeatures(NamedTuple):
  """Features of the server state's feature extractor for samples (rows of ``x``), computed
  once for every client: ``values[position[i]]`` are sample ``i``'s (`take`)."""
  values: jax.Array     # [samples, ...]
  position: jax.Array   # [all samples] int32

  def take(self, rows: jax.Array) -> jax.Array:
    return self.values[self.position[rows]]


class ClientData(NamedTuple):
  """One client's view of the federated data, as `client_update` receives it.

  ``x``/``y`` are the shared arrays of all samples (not per-client copies); ``train_idx`` are
  this client's rows, of which the first ``train_count`` are valid. ``features``: the
  server state's features of every training sample (`SampleFeatures`), which the engine
  passes to `Algorithm.receive_client` where the algorithm asks for them
  (`Algorithm.receive_features`); None otherwise.
  """
  x: jax.Array
  y: jax.Array
  train_idx: jax.Array
  train_count: jax.Array
  features: Optional[SampleFeatures] = None


@dataclasses.dataclass(frozen=True)
class LocalSpec:
  """Static description of local training (hashable; never a pytree leaf).

  Attributes:
    learning_rate: SGD step size.
    batch_size: samples per step.
    local_epochs: passes over the client's data per round.
    steps_per_epoch: steps every client runs per epoch (the largest ``count // batch_size``
      over all clients; smaller clients' extra steps are masked).
    unroll: local steps unrolled per compiled loop iteration of the ``'scan'`` loop; 0
      unrolls all of them.
    loop: ``'scan'`` (every step of every epoch, masked steps computed and discarded) or
      ``'valid'`` (only the client's valid steps, a dynamic trip count; ``unroll`` does not
      apply). Equal results; see the module docstring and
      `fedjax_lib.core.engine.default_local_loop`.
    dp_clip: None (plain SGD gradients), or DP-SGD's per-example clipping norm C > 0.
    dp_sigma: DP-SGD's noise multiplier σ >= 0 (the noise's standard deviation is σ·C); read
      only when ``dp_clip`` is set.
    shuffle: reshuffle the client's samples every epoch (PFLlib's loader); False: every epoch
      in the order of the client's ``train_idx`` (HtFLlib's ``shuffle=False`` loader).
  """
  learning_rate: float = 0.005
  batch_size: int = 10
  local_epochs: int = 1
  steps_per_epoch: int = 1
  unroll: int = 1
  loop: str = "scan"
  dp_clip: Optional[float] = None
  dp_sigma: float = 0.0
  shuffle: bool = True

  @property
  def num_steps(self) -> int:
    return self.local_epochs * self.steps_per_epoch


LossFn = Callable[[Any, Batch, jax.Array], jax.Array]


def class_counts(data: ClientData, num_classes: int) -> jax.Array:
  """Training samples per class of one client (padding excluded), float32 ``[C]``."""
  valid = (jnp.arange(data.train_idx.shape[0]) < data.train_count).astype(jnp.float32)
  return jax.nn.one_hot(data.y[data.train_idx], num_classes, dtype=jnp.float32).T @ valid


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy over the samples with ``mask == 1`` (0 if there are none)."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  mask = mask.astype(jnp.float32)
  return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def epoch_order(key: jax.Array, count: jax.Array, width: int) -> jax.Array:
  """A uniformly random permutation of positions ``[0, count)``, padded to ``width``.

  Positions ``>= count`` sort last, so the first ``count`` entries are a permutation of the
  client's valid positions.
  """
  scores = jax.random.uniform(key, (width,))
  scores = jnp.where(jnp.arange(width) < count, scores, 2.0)
  return jnp.argsort(scores)


def batch_schedule(data: ClientData, key: jax.Array, spec: LocalSpec):
  """Sample rows and validity of every local step: ``rows [T, B]``, ``valid [T]``.

  ``T = local_epochs * steps_per_epoch``; epoch ``e`` is shuffled with ``fold_in(key, e)``
  (``spec.shuffle``; else every epoch takes ``train_idx`` in order). A step is valid when its
  whole batch lies within the client's samples (drop_last).
  """
  width = data.train_idx.shape[0]
  b, s = spec.batch_size, spec.steps_per_epoch
  rows, valid = [], []
  for epoch in range(spec.local_epochs):
    if spec.shuffle:
      order = epoch_order(jax.random.fold_in(key, epoch), data.train_count, width)
    else:  # the valid positions come first in train_idx
      order = jnp.arange(width)
    positions = order[: s * b].reshape(s, b)
    rows.append(data.train_idx[positions])
    valid.append((jnp.arange(s) + 1) * b <= data.train_count)
  return jnp.concatenate(rows), jnp.concatenate(valid)


class DPTrainingCall(NamedTuple):
  """One DP-SGD `train_locally` call of a traced client update (see :func:`record_dp_training`).

  ``full_data``: it trains on exactly the client's training set (the ``train_idx`` and
  ``train_count`` the client update received), so its sampling rate is ``batch_size / n``.
  """
  spec: LocalSpec
  full_data: bool


# (client data of the traced client update, list of DPTrainingCall), while recording.
_DP_RECORDER: contextvars.ContextVar = contextvars.ContextVar("fedjax_dp_recorder", default=None)


@contextlib.contextmanager
def record_dp_training(client_data: ClientData):
  """Collects the DP-SGD calls of `train_locally` traced inside the block.

  The privacy accountant traces one client update abstractly (``jax.eval_shape``) inside this
  block, with ``client_data`` the data it passes, and reads from the yielded list how many
  private steps of which batch size a client takes per round. Recording observes tracing
  only; it changes nothing that is computed. (A call inside a traced loop would be recorded
  once: an algorithm is accounted correctly when it calls `train_locally` at the top level of
  its update, which reviewing it for `fedjax_lib.privacy.REVIEWED` includes.)
  """
  calls: list = []
  token = _DP_RECORDER.set((client_data, calls))
  try:
    yield calls
  finally:
    _DP_RECORDER.reset(token)


def _note_dp_call(data: ClientData, spec: LocalSpec) -> None:
  recording = _DP_RECORDER.get()
  if recording is not None:
    client_data, calls = recording
    full = (data.train_idx is client_data.train_idx
            and data.train_count is client_data.train_count)
    calls.append(DPTrainingCall(spec, full))


def clip_factors(per_example, clip: float) -> jax.Array:
  """``[B]``: ``C / max(‖g_b‖₂, C)`` of each example's gradient ``g_b`` (a tree whose leaves
  have a leading batch axis), the norm taken over all leaves together: multiplying ``g_b``
  by it clips it to norm at most ``C`` (and leaves it unchanged when it is within ``C``)."""
  leaves = jax.tree.leaves(per_example)
  squares = sum(jnp.square(g.astype(jnp.float32)).reshape(g.shape[0], -1).sum(1)
                for g in leaves)
  return clip / jnp.maximum(jnp.sqrt(squares), clip)


def gaussian_noise(tree, key: jax.Array, stddev):
  """Independent ``N(0, stddev²)`` noise shaped like every leaf of ``tree`` (float32 draws,
  cast to each leaf's dtype); leaf ``i`` draws from ``split(key, L)[i]``."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  noise = [(stddev * jax.random.normal(k, g.shape, jnp.float32)).astype(g.dtype)
           for k, g in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, noise)


def private_value_and_grad(loss_fn: LossFn, clip: float, sigma: float, batch_size: int,
                           has_aux: bool = False):
  """DP-SGD's gradient of ``loss_fn`` (Abadi et al., CCS 2016), with the call signature and
  return value of ``jax.value_and_grad(loss_fn, has_aux)``.

  For a batch of B examples and step key ``k``::

      ℓ_b = loss_fn(θ, (x_b, y_b, mask_b), dp_example_key(k, b)[, aux])   (a batch of one)
      g   = (Σ_b ∇ℓ_b · C / max(‖∇ℓ_b‖₂, C)  +  σ·C·ξ) / batch_size

  with ``ξ ~ N(0, I)`` drawn from ``dp_noise_key(k)``.

  ``‖·‖₂`` is over the whole trained tree. The per-example gradients are one ``jax.vmap``
  over the batch; they give the clip factors ``f_b = C / max(‖∇ℓ_b‖₂, C)``, and the clipped
  sum is then the gradient of ``Σ_b f_b·ℓ_b`` (``f`` constant; each ``ℓ_b`` depends on
  example b alone), one more pass over the batch (on XLA:CPU, scaling and summing the stored
  per-example gradients instead, which XLA fuses into one loop, ran ~10x slower). The sum is
  divided by the *expected* batch size ``batch_size`` (Opacus's and TF-Privacy's convention;
  every valid step here holds exactly that many examples), never by a count that depends on
  the data. σ = 0 adds no noise.

  Reported loss: the mean of the examples' losses (``mask``-weighted). With ``has_aux``
  every example's pass receives the carried ``aux``; the new ``aux`` comes from one more pass
  of ``loss_fn`` over the whole batch (no gradient), whose loss is then reported — unless
  the new ``aux`` has no array leaves (the usual case: no BatchNorm, no accumulators), when
  that pass is skipped. Such a full-batch ``aux`` is computed from the raw batch and is NOT
  privatised: an algorithm whose gradients read it is not private (`fedjax_lib.privacy`).
  """

  def value_and_grad(params, batch: Batch, step_key, *aux):
    index = jnp.arange(batch.x.shape[0])
    mask = batch.mask.astype(jnp.float32)

    def example_loss(params, x, y, m, i):
      example = Batch(x[None], y[None], m[None])
      return loss_fn(params, example, rng.dp_example_key(step_key, i), *aux)

    per_example = jax.vmap(jax.value_and_grad(example_loss, has_aux=has_aux),
                           (None, 0, 0, 0, 0))
    outs, grads = per_example(params, batch.x, batch.y, mask, index)
    factors = jax.lax.stop_gradient(clip_factors(grads, clip))

    def clipped_sum(params):
      outs = jax.vmap(example_loss, (None, 0, 0, 0, 0))(params, batch.x, batch.y, mask, index)
      return (factors * (outs[0] if has_aux else outs)).sum()

    summed = jax.grad(clipped_sum)(params)
    if not (isinstance(sigma, (int, float)) and sigma == 0):
      noise = gaussian_noise(summed, rng.dp_noise_key(step_key), sigma * clip)
      summed = jax.tree.map(jnp.add, summed, noise)
    grads = jax.tree.map(lambda g: g / batch_size, summed)
    losses, new_aux = outs if has_aux else (outs, None)
    loss = (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    if not has_aux:
      return loss, grads
    if jax.tree.leaves(new_aux):
      loss, new_aux = jax.lax.stop_gradient(loss_fn(params, batch, step_key, *aux))
    else:  # no array to carry: keep the (leafless) structure
      new_aux = jax.tree.map(lambda a: a[0], new_aux)
    return (loss, new_aux), grads

  return value_and_grad


def sgd_by_part(learning_rate, part_rates: dict) -> optax.GradientTransformation:
  """Plain SGD over a dict of parts: the parts named in ``part_rates`` step at their own rate,
  the others at ``learning_rate`` (PFLlib's one optimizer per module, where ``-ld`` decays only
  some of them); with equal rates the same steps as ``optax.sgd(learning_rate)``."""
  def update(updates, state, params=None):
    del params
    return {part: jax.tree.map(lambda u, r=part_rates.get(part, learning_rate): -r * u, sub)
            for part, sub in updates.items()}, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def train_locally(params, data: ClientData, key: jax.Array, spec: LocalSpec, loss_fn: LossFn,
                  tx: Optional[optax.GradientTransformation] = None, opt_state=None,
                  aux: Any = None):
  """Runs one client's local training.

  Args:
    params: the parameters being trained (any pytree).
    data: the client's data view.
    key: the client's key for this round (shuffling and any loss-side randomness).
    spec: static local-training settings; with ``spec.dp_clip`` set every step uses the
      DP-SGD gradient of :func:`private_value_and_grad` (loss-side keys then differ per
      example, see `fedjax_lib.core.rng`).
    loss_fn: ``loss_fn(params, batch, key) -> scalar``; must average over ``batch.mask``.
    tx: the optax transform; defaults to plain SGD at ``spec.learning_rate``.
    opt_state: optimizer state to continue from (e.g. persisted per client); a fresh
      ``tx.init(params)`` when None.
    aux: an optional non-trained carry (e.g. a running mean of features). When given,
      ``loss_fn(params, batch, key, aux) -> (loss, new_aux)``; ``new_aux`` (taken without
      gradient) is carried to the next valid step, and masked steps leave it unchanged.

  Returns:
    ``(params, opt_state, stats)`` where ``stats = {"loss": mean loss over the valid steps,
    "steps": number of valid steps}``, plus ``"aux"``: the final carry when ``aux`` is given.
  """
  if spec.loop not in ("scan", "valid"):
    raise ValueError(f"unknown local loop {spec.loop!r}; choose 'scan' or 'valid'")
  tx = tx if tx is not None else optax.sgd(spec.learning_rate)
  opt_state = tx.init(params) if opt_state is None else opt_state
  shuffle_key, loss_key = jax.random.split(key)
  rows, valid = batch_schedule(data, shuffle_key, spec)
  has_aux = aux is not None
  if spec.dp_clip is None:
    grad_fn = jax.value_and_grad(loss_fn, has_aux=has_aux)
  else:
    if not (spec.dp_clip > 0 and math.isfinite(spec.dp_clip) and spec.dp_sigma >= 0):
      raise ValueError(f"DP-SGD needs dp_clip > 0 (finite) and dp_sigma >= 0, got "
                       f"dp_clip={spec.dp_clip!r}, dp_sigma={spec.dp_sigma!r}")
    _note_dp_call(data, spec)
    grad_fn = private_value_and_grad(loss_fn, spec.dp_clip, spec.dp_sigma, spec.batch_size,
                                     has_aux)
  ones = jnp.ones((spec.batch_size,), jnp.float32)

  def sgd_step(carry, step_rows, step_index):
    params, opt_state, loss_sum, aux = carry
    batch = Batch(data.x[step_rows], data.y[step_rows], ones)
    step_key = jax.random.fold_in(loss_key, step_index)
    if has_aux:
      (loss, aux), grads = grad_fn(params, batch, step_key, aux)
      aux = jax.lax.stop_gradient(aux)
    else:
      loss, grads = grad_fn(params, batch, step_key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss_sum + loss, aux

  def masked_step(carry, inputs):
    step_rows, step_valid, step_index = inputs
    # A masked step is computed and discarded by a select: one static shape for all clients.
    new_carry = sgd_step(carry, step_rows, step_index)
    carry = jax.tree.map(lambda new, old: jnp.where(step_valid, new, old), new_carry, carry)
    return carry, None

  init = (params, opt_state, jnp.zeros((), jnp.float32), aux)
  num_steps = spec.num_steps
  if spec.loop == "valid":
    # Epoch e's valid steps are its first count // batch_size ones: run exactly those, as
    # the scan below would keep them (same rows, same step keys, same order).
    per_epoch = jnp.minimum(data.train_count // spec.batch_size, spec.steps_per_epoch)
    divisor = jnp.maximum(per_epoch, 1)

    def valid_step(i, carry):
      index = (i // divisor) * spec.steps_per_epoch + i % divisor
      return sgd_step(carry, rows[index], index)

    params, opt_state, loss_sum, aux = jax.lax.fori_loop(
        0, per_epoch * spec.local_epochs, valid_step, init)
  else:
    unroll = num_steps if spec.unroll == 0 else max(1, min(spec.unroll, num_steps))
    (params, opt_state, loss_sum, aux), _ = jax.lax.scan(
        masked_step, init, (rows, valid, jnp.arange(num_steps)), unroll=unroll)
  steps = valid.sum()
  stats = {"loss": loss_sum / jnp.maximum(steps, 1), "steps": steps}
  if has_aux:
    stats["aux"] = aux
  return params, opt_state, stats


Objective = Callable[[jax.Array, jax.Array, Batch, Any], tuple[jax.Array, Any]]


def train_model(model, variables, data: ClientData, key: jax.Array, spec: LocalSpec,
                objective: Objective, trainable: Optional[tuple[str, ...]] = None,
                carry: Any = None, tx: Optional[optax.GradientTransformation] = None,
                penalty: Optional[Callable[[Any], jax.Array]] = None):
  """Trains a `BaseHeadModel` in training mode: BatchNorm and dropout as in PyTorch.

  Each step runs ``model.forward`` with ``train=True``: BatchNorm normalises with the batch's
  statistics and its running statistics (the collections of ``variables`` other than
  ``params``) are carried from step to step; dropout draws from the step's key. The loss is
  ``objective(features, logits, batch, carry) -> (loss, new_carry)``, whose carry (taken
  without gradient, e.g. per-class feature sums) goes on to the next valid step; masked
  steps change nothing. A model without BatchNorm or dropout trains as through
  :func:`train_locally` with the loss on ``model.apply``.

  Args:
    model: a `fedjax_lib.models.BaseHeadModel`.
    variables: its variables ``{'params': {'base', 'head'}, ...}``.
    data, key, spec, tx: as for :func:`train_locally`.
    objective: the loss on one batch's ``(features, logits)``, averaging over ``batch.mask``.
    trainable: the parameter parts trained (``('base', 'head')`` by default; e.g.
      ``('head',)``); the others are constants.
    carry: the objective's initial carry (None: none).
    penalty: ``penalty({part: params}) -> scalar`` added to every step's loss, a function of
      the trained parameter parts only (FedProx's proximal term, PFL-DA's head regulariser;
      under DP-SGD part of every example's loss). None: no penalty.

  Returns:
    ``(variables, carry, stats)``: the trained variables with their new running
    statistics, the final carry, and ``stats`` as :func:`train_locally` returns them.
  """
  params = variables["params"]
  names = tuple(params) if trainable is None else tuple(trainable)
  train = {k: v for k, v in params.items() if k in names}
  frozen = {k: v for k, v in params.items() if k not in names}

  def loss_fn(train_params, batch, step_key, aux):
    state, objective_carry = aux
    full = {"params": {**frozen, **train_params}, **state}
    (features, logits), state = apply_train(model, full, batch.x, step_key)
    loss, objective_carry = objective(features, logits, batch, objective_carry)
    if penalty is not None:
      loss = loss + penalty(train_params)
    return loss, (state, objective_carry)

  train, _, stats = train_locally(train, data, key, spec, loss_fn, tx=tx,
                                  aux=(model_state(variables), carry))
  state, carry = stats.pop("aux")
  return {"params": {**frozen, **train}, **state}, carry, stats


def cross_entropy_objective(features, logits, batch: Batch, carry):
  """The plain cross-entropy objective of :func:`train_model` (``carry`` passes through)."""
  del features
  return masked_cross_entropy(logits, batch.y, batch.mask), carry


def clip_each(transforms: dict[str, optax.GradientTransformation],
              clip: float) -> optax.GradientTransformation:
  """``transforms[part]`` on each part of a ``{part: tree}``, each part's gradient first
  clipped to global norm ``clip`` on its own (PyTorch's ``clip_grad_norm_`` called once per
  module, as the references do for models trained together); each part has its own
  optimizer state."""
  parts = {p: optax.chain(optax.clip_by_global_norm(clip), tx) for p, tx in transforms.items()}
  return optax.multi_transform(parts, {p: p for p in transforms})


def masked_mse(a: jax.Array, b: jax.Array, mask: jax.Array) -> jax.Array:
  """PyTorch's ``nn.MSELoss()`` over the rows with ``mask``: ``Σ (a − b)² / (rows · width)``
  in float32 (0 without rows)."""
  mask = mask.astype(jnp.float32)
  rows = (jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)).sum(-1) * mask).sum()
  return rows / (jnp.maximum(mask.sum(), 1.0) * a.shape[-1])


def kl_div_mean(log_input: jax.Array, log_target: jax.Array, mask: jax.Array) -> jax.Array:
  """PyTorch's ``nn.KLDivLoss()(log_input, exp(log_target))`` (reduction ``'mean'``) over the
  rows with ``mask``: ``Σ q (log q − log_input) / (rows · C)``, ``q = exp(log_target)``.

  Taken from the target's log-probabilities, so a probability that underflows to 0 gives a
  zero term and a zero gradient, not ``0 · log 0``.
  """
  pointwise = jnp.exp(log_target) * (log_target - log_input)
  mask = mask.astype(jnp.float32)
  return (pointwise.sum(-1) * mask).sum() / (jnp.maximum(mask.sum(), 1.0) * log_input.shape[-1])
