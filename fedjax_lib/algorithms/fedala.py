"""FedALA: Adaptive Local Aggregation for Personalized Federated Learning.

Zhang, Hua, Wang, Song, Xue, Ma, Guan, AAAI 2023.

Every client keeps its own local model ``θ``. When it receives the global model ``θ_g``, the
client mixes it into ``θ`` with learned element-wise weights ``W`` (Adaptive Local
Aggregation, ALA); that model is evaluated, and a selected client trains it with plain SGD on
cross-entropy and uploads it; the server is FedAvg's sample-weighted average of the uploaded
full models.

ALA of one client (PFLlib ``utils/ALA.py``), with the "upper" tensors being the last
``layer_idx`` parameter tensors in PyTorch ``.parameters()`` order (:func:`parameter_order`,
:func:`upper_paths`; ``layer_idx = 0`` selects every tensor):

1. Sample ``n = int(rand_percent/100 · count)`` training samples: a contiguous slice of the
   client's training list starting at a uniformly random offset in ``[0, count − n]``, taken
   in order, in batches of ``batch_size`` that keep the last partial batch
   (:func:`sample_window`).
2. Round-0 guard: if ``Σ(θ_g[0] − θ[0]) == 0`` over the FIRST parameter tensor only, change
   nothing (in round 0 every local model equals the global initialisation).
3. The lower tensors are replaced by the global ones.
4. The temporary model takes the upper tensors ``θ_t = θ + (θ_g − θ) ⊙ W`` (:func:`ala_mix`);
   ``W`` starts as ones and persists across rounds.
5. Weight learning: per batch, in order, the cross-entropy gradient w.r.t. ``θ_t`` gives
   ``W ← clip(W − η·(∇θ_t ⊙ (θ_g − θ)), 0, 1)`` (:func:`weight_step`), then ``θ_t`` is
   recomputed. The loss of each epoch's last batch is recorded. Outside the start phase one
   epoch is run; in the start phase epochs repeat until more than ``num_pre_loss`` losses are
   recorded and the population standard deviation of the last ``num_pre_loss`` is below
   ``threshold`` (:func:`losses_converged`), or ``max_start_epochs`` epochs have run.
6. The start phase ends; the local model's upper tensors become ``θ_t``.

:func:`adaptive_local_aggregation` is the whole procedure as one pure function.

Hyperparameters (PFLlib defaults and flags): ``eta`` = 1.0 (``-et``), ``rand_percent`` = 80
(``-s``, an integer in (0, 100]), ``layer_idx`` = 2 (``-p``, >= 0; 2 = the classifier's weight
and bias), ``threshold`` = 0.1 and ``num_pre_loss`` = 10 (hard-coded in PFLlib), and
``max_start_epochs`` = 100 (ours, see below).

State: server ``{"params": θ_g}``; client ``{"params": θ (its ALA-initialised model: the last
trained one after the ALA of the global model received since; the initial model before round
0),
"weights": W (ones shaped like the upper tensors only, nested like the variables),
"start_phase": bool scalar (True until the first ALA that passes the round-0 guard)}``.

When ALA runs: PFLlib's ``send_models`` runs it on EVERY client at the start of each round,
before the evaluation and the training. Here it is :meth:`FedALA.receive_client`, which the
engine runs on every client, selected or not, right after each round's aggregation (the
next round's ``send_models``; before round 0 PFLlib's ALA changes nothing, by the round-0
guard, and here nothing runs). So ALA runs once per client and round, and the model
evaluated is the one trained next: ``client_update`` is local SGD from the stored model.

Views: ``personal`` (``test_acc``) is the client's stored, ALA-initialised model, i.e. what
PFLlib evaluates; ``global`` is the server model.

Key derivation: ALA's sample uses the key of `receive_client` (the engine's receive stream,
`fedjax_lib.core.rng.receive_round_key`); local SGD uses the client's round key unchanged (its
shuffling equals FedAvg's).

Differences from PFLlib:

- PFLlib's start phase loops until the std criterion holds, possibly forever;
  ``max_start_epochs`` caps it (100 epochs by default).
- The sample window uses the key instead of Python's unseeded ``random``.
- The std is computed in float32 from float32 losses (PFLlib: float64 ``np.std`` of
  ``loss.item()`` values); the population std (``ddof = 0``) as ``np.std``.
- A client whose window is empty (``n = 0``) changes no weight and records a loss of 0 per
  epoch (PFLlib would fail on an undefined loss); its upper tensors become ``θ + (θ_g − θ)⊙W``.
- The last partial weight-learning batch is kept (masked mean over its real samples), as the
  reference report states for snapshot ``d832e76``; another PFLlib version (``2b077c1``) builds
  that loader with ``drop_last=True``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lib.algorithms.base import (FeatureViews, SettingsContext, check_int,
                                        check_number, stack_clients)
from fedjax_lib.algorithms.fedavg import FedAvg
from fedjax_lib.algorithms.registry import register
from fedjax_lib.core.local import Batch, ClientData, masked_cross_entropy, train_locally
from fedjax_lib.errors import ConfigError
from fedjax_lib.models.base import model_state

Path = tuple[str, ...]


# ---------------------------------------------------------------- parameter order
def _creation_order(tree: Mapping, prefix: Path = ()) -> list[Path]:
  """Leaf paths of nested mappings in their insertion (creation) order, without sorting."""
  paths = []
  for name, value in tree.items():
    if isinstance(value, Mapping):
      paths.extend(_creation_order(value, prefix + (name,)))
    else:
      paths.append(prefix + (name,))
  return paths


def pytorch_order(variables: Mapping) -> tuple[Path, ...]:
  """Leaf paths in PyTorch ``.parameters()`` order, from variables in creation order.

  Modules (a leaf's path without its last key) come in the order their first parameter was
  created, i.e. definition order for the zoo's models; within a module every parameter other
  than ``bias`` comes first in creation order (``kernel`` = PyTorch's ``weight``), then
  ``bias``. ``jax.tree`` leaves are sorted by key instead (``bias`` before ``kernel``).

  Args:
    variables: nested dicts as returned by ``model.init`` (insertion order = creation order;
      any ``jax`` transform re-sorts the keys, so pass what ``init`` built).

  Returns:
    The leaf paths, e.g. ``('params', 'head', 'kernel')``.
  """
  modules: dict[Path, list[Path]] = {}
  for path in _creation_order(variables):
    modules.setdefault(path[:-1], []).append(path)
  ordered = []
  for paths in modules.values():
    ordered += [p for p in paths if p[-1] != "bias"] + [p for p in paths if p[-1] == "bias"]
  return tuple(ordered)


def parameter_order(model: Any, sample_shape: Sequence[int], dtype=jnp.float32) -> tuple[Path, ...]:
  """:func:`pytorch_order` of ``model``'s variables, initialised abstractly (no FLOPs)."""
  order = []

  def init(x):
    variables = model.init(jax.random.PRNGKey(0), x)
    order.extend(pytorch_order(variables))
    return variables

  jax.eval_shape(init, jax.ShapeDtypeStruct((1, *sample_shape), dtype))
  return tuple(order)


def upper_paths(order: Sequence[Path], layer_idx: int) -> tuple[Path, ...]:
  """The last ``layer_idx`` tensors of ``order`` (all of them when 0, as ``params[-0:]``)."""
  return tuple(order[-layer_idx:]) if layer_idx > 0 else tuple(order)


def _get(tree, path: Path):
  for name in path:
    tree = tree[name]
  return tree


def take(tree, paths: Sequence[Path]) -> dict:
  """The leaves at ``paths`` of ``tree`` as nested dicts (a sub-tree)."""
  sub: dict = {}
  for path in paths:
    node = sub
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = _get(tree, path)
  return sub


def put(tree, sub) -> Any:
  """``tree`` with the leaves present in the sub-tree ``sub`` replaced (a new tree)."""
  if not isinstance(sub, Mapping):
    return sub
  return {name: put(value, sub[name]) if name in sub else value for name, value in tree.items()}


def upper_mask(variables, order: Sequence[Path], layer_idx: int):
  """A pytree like ``variables`` of Python bools: True at the upper (ALA-weighted) tensors."""
  upper = set(upper_paths(order, layer_idx))
  return jax.tree_util.tree_map_with_path(
      lambda path, _: tuple(k.key for k in path) in upper, variables)


# ---------------------------------------------------------------- ALA pieces
def ala_mix(local, global_, weights):
  """``θ + (θ_g − θ) ⊙ W`` leaf-wise (the temporary/initialised upper tensors)."""
  return jax.tree.map(lambda l, g, w: l + (g - l) * w, local, global_, weights)


def weight_step(weights, grads, local, global_, eta: float):
  """One weight-learning step ``W ← clip(W − η·(∇θ_t ⊙ (θ_g − θ)), 0, 1)``.

  Args:
    weights: ``W``, shaped like the upper tensors.
    grads: the loss gradient w.r.t. the mixed upper tensors ``θ_t = ala_mix(θ, θ_g, W)``.
    local: the local upper tensors ``θ``.
    global_: the global upper tensors ``θ_g``.
    eta: the weight learning rate η.

  Returns:
    The new ``W``, in ``[0, 1]``.
  """
  return jax.tree.map(lambda w, gr, l, g: jnp.clip(w - eta * (gr * (g - l)), 0.0, 1.0),
                      weights, grads, local, global_)


def window_sizes(rand_percent: int, width: int) -> np.ndarray:
  """``int(rand_percent/100 · c)`` for ``c = 0..width`` (float64, exactly as PFLlib)."""
  return np.array([int(rand_percent / 100 * c) for c in range(width + 1)], np.int32)


def sample_window(key: jax.Array, count, rand_percent: int, width: int):
  """ALA's sample: ``(start, n)`` of a contiguous slice of ``count`` training samples.

  ``n = int(rand_percent/100 · count)``; ``start`` is uniform in ``[0, count − n]``.
  ``width`` (static) bounds ``count``.
  """
  count = jnp.clip(jnp.asarray(count, jnp.int32), 0, width)
  n = jnp.asarray(window_sizes(rand_percent, width))[count]
  start = jax.random.randint(key, (), 0, count - n + 1)
  return start, n


def losses_converged(last_losses: jax.Array, num_losses, threshold: float) -> jax.Array:
  """PFLlib's start-phase stop: ``len(losses) > k`` and ``np.std(losses[-k:]) < threshold``.

  Args:
    last_losses: ``[k]`` the last ``k = num_pre_loss`` recorded losses (oldest first; only
      meaningful once ``num_losses >= k``).
    num_losses: how many losses have been recorded.
    threshold: the std threshold.
  """
  return (num_losses > last_losses.shape[0]) & (jnp.std(last_losses) < threshold)


def _window_features(features: Callable, x, rows, n, batch_size: int, buckets: bool):
  """``features(x[rows])`` for the first ``n`` of ``rows`` (later rows: zeros, or features).

  With ``buckets`` (the ``valid`` loop, one client at a time on XLA:CPU) only the smallest of
  the window sizes ``batch_size · 2^k`` (capped at ``len(rows)``) holding ``n`` rows is
  forwarded, picked by ``lax.switch``: a client whose window is a quarter of the largest
  client's pays about a quarter of the forward pass. Under vmap a switch evaluates every
  branch, so the traced executors (``scan`` loop) forward the whole window once.
  """
  window = rows.shape[0]
  sizes, size = [], batch_size
  while size < window:
    sizes.append(size)
    size *= 2
  sizes.append(window)
  if not buckets or len(sizes) == 1:
    return features(x[rows])

  def branch(size):
    def forward(rows):
      z = features(x[rows[:size]])
      return jnp.concatenate([z, jnp.zeros((window - size,) + z.shape[1:], z.dtype)])
    return forward

  which = jnp.searchsorted(jnp.asarray(sizes), jnp.minimum(n, window))
  return jax.lax.switch(which, [branch(size) for size in sizes], rows)


def adaptive_local_aggregation(local, global_, weights, start_phase, data: ClientData,
                               key: jax.Array, *, loss_fn: Callable, order: Sequence[Path],
                               layer_idx: int, eta: float, rand_percent: int, batch_size: int,
                               threshold: float, num_pre_loss: int, max_start_epochs: int,
                               unroll: int = 1, loop: str = "scan",
                               head_split: Optional[tuple[Callable, Callable]] = None):
  """One client's ALA (module docstring, steps 1-6).

  Args:
    local: the client's local model variables ``θ``.
    global_: the received global model variables ``θ_g``.
    weights: ``W``, nested like ``take(local, upper_paths(order, layer_idx))``.
    start_phase: bool scalar; True until the first ALA that passes the round-0 guard.
    data: the client's data view (training rows in order).
    key: the sample-window key.
    loss_fn: ``loss_fn(variables, batch) -> scalar``, the masked mean loss.
    order: every parameter path in PyTorch order (:func:`parameter_order`).
    layer_idx, eta, rand_percent, threshold, num_pre_loss, max_start_epochs: see
      :class:`FedALA`.
    batch_size: weight-learning batch size.
    unroll: batches unrolled per loop iteration; 0 unrolls the whole epoch.
    loop: ``'scan'`` (every client the largest window's batches, the extra ones masked) or
      ``'valid'`` (only the batches holding the client's window; equal results), as
      `fedjax_lib.core.local.LocalSpec.loop`.
    head_split: ``(features, head_loss)`` when every upper tensor is in the head: then the
      lower layers, all global, give the same features in every batch and epoch, so
      ``features(x)`` (the global model's) is computed once for the whole window, in one
      batch, and the weights are learned on ``head_loss(variables, z, batch)``. The same
      procedure, fewer FLOPs (exact up to float rounding); None: the full model per batch.
      With ``head_split``, ``data.features`` (when given: the engine's features of every
      sample through the global model, `fedjax_lib.core.local.SampleFeatures`) replaces the
      window's forward pass.

  Returns:
    ``(new_local, new_weights, new_start_phase, epochs)``; ``epochs`` (int32) is the number of
    weight-learning epochs run (0 when the round-0 guard holds, which changes nothing).
  """
  upper = upper_paths(order, layer_idx)
  first = order[0]
  skip = jnp.sum(_get(global_, first) - _get(local, first)) == 0
  start_phase = jnp.asarray(start_phase, bool)

  width = data.train_idx.shape[0]
  start, n = sample_window(key, data.train_count, rand_percent, width)
  num_batches = max(1, -(-int(rand_percent / 100 * width) // batch_size))
  unroll = num_batches if unroll == 0 else max(1, min(unroll, num_batches))
  offsets = jnp.arange(batch_size)
  lu, gu = take(local, upper), take(global_, upper)

  window = num_batches * batch_size
  rows_at = lambda pos: data.train_idx[jnp.minimum(start + pos, width - 1)]
  if head_split is None:
    def upper_loss(mixed, batch, pos):
      del pos
      return loss_fn(put(global_, mixed), batch)  # lower tensors from the global model
  else:
    features, head_loss = head_split
    if data.features is not None:  # the global features of every sample, computed once
      z = data.features.take(rows_at(jnp.arange(window)))
    else:
      z = _window_features(features, data.x, rows_at(jnp.arange(window)), n, batch_size,
                           buckets=loop == "valid")

    def upper_loss(mixed, batch, pos):
      return head_loss(put(global_, mixed), z[pos], batch)

  grad_fn = jax.value_and_grad(upper_loss)

  def batch_step(carry, b):
    w, last = carry
    pos = b * batch_size + offsets
    rows = rows_at(pos)
    batch = Batch(data.x[rows], data.y[rows], (pos < n).astype(jnp.float32))
    loss, grads = grad_fn(ala_mix(lu, gu, w), batch, pos)
    valid = b * batch_size < n
    w = jax.tree.map(lambda new, old: jnp.where(valid, new, old),
                     weight_step(w, grads, lu, gu, eta), w)
    return (w, jnp.where(valid, loss, last)), None

  def epoch(carry):
    w, last_losses, epochs, _ = carry
    if loop == "valid":
      (w, last) = jax.lax.fori_loop(0, (n + batch_size - 1) // batch_size,
                                    lambda b, c: batch_step(c, b)[0],
                                    (w, jnp.zeros((), jnp.float32)))
    else:
      (w, last), _ = jax.lax.scan(batch_step, (w, jnp.zeros((), jnp.float32)),
                                  jnp.arange(num_batches), unroll=unroll)
    last_losses = jnp.concatenate([last_losses[1:], last[None]])
    epochs = epochs + 1
    done = (~start_phase | losses_converged(last_losses, epochs, threshold)
            | (epochs >= max_start_epochs))
    return w, last_losses, epochs, done

  init = (weights, jnp.zeros((num_pre_loss,), jnp.float32), jnp.zeros((), jnp.int32), skip)
  w, _, epochs, _ = jax.lax.while_loop(lambda c: ~c[3], epoch, init)

  new_local = put(global_, ala_mix(lu, gu, w))
  pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(skip, x, y), a, b)
  return (pick(local, new_local), pick(weights, w), skip & start_phase,
          jnp.where(skip, 0, epochs))


# ---------------------------------------------------------------- the algorithm
@register("FedALA")
@dataclasses.dataclass(frozen=True)
class FedALA(FedAvg):
  """FedAvg server; clients initialise local training by adaptive local aggregation.

  ``server_update`` (sample-weighted average of the uploaded full models) and
  ``new_client_variables`` (the global model) are FedAvg's.

  Attributes:
    eta: weight learning rate η (PFLlib ``-et``).
    rand_percent: percent of the training samples ALA learns the weights on (``-s``), an
      integer in (0, 100].
    layer_idx: how many parameter tensors, counted from the end in PyTorch order, ALA weights
      (``-p``); 0 weights all of them.
    threshold: start-phase stop: std of the recorded losses below this.
    num_pre_loss: how many of the last recorded losses the std is taken over.
    max_start_epochs: cap on the start phase's epochs (PFLlib has none).
  """
  DECAYED_RATES = ("local.learning_rate",)  # -ld: local SGD (ALA has its own undecayed eta)

  eta: float = 1.0
  rand_percent: int = 80
  layer_idx: int = 2
  threshold: float = 0.1
  num_pre_loss: int = 10
  max_start_epochs: int = 100

  def __post_init__(self):
    check_number(self.name, "eta", self.eta)
    check_int(self.name, "rand_percent", self.rand_percent, 1, 100)
    check_int(self.name, "layer_idx", self.layer_idx, 0)
    check_number(self.name, "threshold", self.threshold)
    check_int(self.name, "num_pre_loss", self.num_pre_loss, 1)
    check_int(self.name, "max_start_epochs", self.max_start_epochs, 1)

  def check_settings(self, context: SettingsContext) -> list[str]:
    """Refuses a ``layer_idx`` beyond the model's parameter tensors and a ``rand_percent``
    that leaves every client's ALA sample empty; warns about clients with an empty sample,
    ``eta = 0`` and start-phase settings under which ``threshold`` never acts."""
    order = parameter_order(self.model, np.shape(context.sample_x), context.sample_x.dtype)
    if self.layer_idx > len(order):
      raise ConfigError(
          f"{self.name} hyperparameter layer_idx={self.layer_idx} exceeds the {len(order)} "
          f"parameter tensors of model {context.model_name!r}; use 0 (all of them) to "
          f"{len(order)} (-p)")
    warnings = []
    counts = np.asarray(context.train_counts, np.int64)
    with_data = counts[counts > 0]
    if with_data.size:
      sizes = window_sizes(self.rand_percent, int(with_data.max()))
      empty = int((sizes[with_data] == 0).sum())

      def percent_for(n):  # the smallest rand_percent giving n samples a non-empty window
        return next(p for p in range(1, 101) if int(p / 100 * n) >= 1)

      if empty == with_data.size:
        raise ConfigError(
            f"{self.name} hyperparameter rand_percent={self.rand_percent} gives every client "
            f"int({self.rand_percent}/100·n) = 0 ALA samples (the largest client has "
            f"n={int(with_data.max())}), so ALA would learn nothing; use rand_percent >= "
            f"{percent_for(int(with_data.max()))} (-s)")
      if empty:
        warnings.append(
            f"{self.name} hyperparameter rand_percent={self.rand_percent} gives {empty} of the "
            f"{with_data.size} clients with training data 0 ALA samples (those with fewer "
            f"than {int(np.argmax(sizes > 0))} samples): their ALA learns no weights; use "
            f"rand_percent >= {percent_for(int(with_data.min()))} (-s)")
    if self.eta == 0:
      warnings.append(f"{self.name} hyperparameter eta=0 never changes the ALA weights (they "
                      "stay 1), so every client starts each round from the global model, as "
                      "in FedAvg; use eta > 0 (-et)")
    if self.threshold == 0:
      warnings.append(f"{self.name} hyperparameter threshold=0 never ends the start phase "
                      "early (a standard deviation is never below 0): each client's first ALA "
                      f"runs max_start_epochs={self.max_start_epochs} epochs; use threshold > 0")
    elif self.max_start_epochs <= self.num_pre_loss:
      warnings.append(
          f"{self.name} hyperparameter max_start_epochs={self.max_start_epochs} <= "
          f"num_pre_loss={self.num_pre_loss}: the start phase always runs to the cap (its "
          f"loss test needs more than {self.num_pre_loss} epochs), so threshold="
          f"{self.threshold} is never used; use max_start_epochs > {self.num_pre_loss}")
    return warnings

  def init(self, key, sample_x, num_clients):
    params = self.init_params(key, sample_x)
    order = parameter_order(self.model, sample_x.shape, sample_x.dtype)
    weights = jax.tree.map(jnp.ones_like, take(params, upper_paths(order, self.layer_idx)))
    client = {"params": params, "weights": weights, "start_phase": jnp.ones((), bool)}
    return {"params": params}, stack_clients(client, num_clients)

  def ala(self, server_state, client_state, data, key):
    """:func:`adaptive_local_aggregation` of one client with this algorithm's settings."""
    order = parameter_order(self.model, data.x.shape[1:], data.x.dtype)
    return adaptive_local_aggregation(
        client_state["params"], server_state["params"], client_state["weights"],
        client_state["start_phase"], data, key,
        loss_fn=lambda variables, batch: self.ce_loss(variables, batch, None),
        order=order,
        layer_idx=self.layer_idx, eta=self.eta, rand_percent=self.rand_percent,
        batch_size=self.local.batch_size, threshold=self.threshold,
        num_pre_loss=self.num_pre_loss, max_start_epochs=self.max_start_epochs,
        unroll=self.local.unroll, loop=self.local.loop, head_split=self._head_split(
            server_state["params"], order))

  def _head_only(self, order) -> bool:
    return all(path[:2] == ("params", "head") for path in upper_paths(order, self.layer_idx))

  def _head_split(self, global_variables, order):
    """ALA on the head alone when its upper tensors are all head tensors (the default
    ``layer_idx`` = 2: the classifier's weight and bias); see `adaptive_local_aggregation`."""
    if not self._head_only(order):
      return None
    features = lambda x: self.model.apply(global_variables, x, method="features")
    head_loss = lambda variables, z, batch: masked_cross_entropy(
        self.model.apply(variables, z, method="classify"), batch.y, batch.mask)
    return features, head_loss

  def receive_features(self, sample_x) -> bool:
    """With ALA on the head alone (the default ``layer_idx`` = 2), ALA learns its weights on
    the global model's features of the client's sample window: the engine may compute those
    once for every sample (the sequential executor does, and its evaluation reuses them)."""
    return self._head_only(parameter_order(self.model, sample_x.shape, sample_x.dtype))

  def receive_client(self, server_state, client_state, data, key):
    """ALA of the received global model into the client's model (every client, every round:
    PFLlib's ``send_models``); the result is evaluated and trained next."""
    local, weights, start_phase, _ = self.ala(server_state, client_state, data, key)
    return {"params": local, "weights": weights, "start_phase": start_phase}

  def client_update(self, server_state, client_state, data, key):
    """Local SGD from the stored, already ALA-initialised model; uploads it."""
    del server_state
    params, _, stats = train_locally(client_state["params"], data, key, self.local,
                                     self.ce_loss)
    return dict(client_state, params=params), params, stats

  def predict(self, server_state, client_state, x):
    """The client's stored model: ALA-initialised with the last global model it received."""
    del server_state
    return self.model.apply(client_state["params"], x)

  def eval_views(self, server_state, client_state, data, key):
    """The stored ALA-initialised model (``personal``) and the global model."""
    del data, key
    return {"personal": functools.partial(self.predict, server_state, client_state),
            "global": functools.partial(self.model.apply, server_state["params"])}

  def feature_views(self, server_state, client_state):
    """Both views as heads on the global model's features: after ALA with upper tensors in
    the head only (the default ``layer_idx`` = 2), every client's lower layers are the
    global model's (PFLlib copies them), so ``personal`` is the client's head on the global
    features. The engine checks that per client (``same``: the ``base`` tensors equal the
    global ones bit for bit; not so, e.g., for ``layer_idx`` reaching into the base, or a
    client whose ALA was skipped) and otherwise evaluates per client. None for models with
    running statistics."""
    if model_state(client_state["params"]):
      return None
    global_ = server_state["params"]
    base = lambda variables: variables["params"].get("base", {})
    classify = lambda variables, z: self.model.apply(variables, z, method="classify")

    def same(state):
      pairs = zip(jax.tree.leaves(base(state["params"])), jax.tree.leaves(base(global_)))
      return jnp.all(jnp.stack([jnp.array_equal(a, b) for a, b in pairs] or [True]))

    return FeatureViews(
        features=lambda x: self.model.apply(global_, x, method="features"),
        heads={"personal": lambda state, z: classify(state["params"], z),
               "global": lambda state, z: classify(global_, z)},
        same=same)
