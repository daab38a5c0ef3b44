"""DLG privacy evaluation: how much of a client's training data its upload gives away.

Zhu, Liu, Han, "Deep Leakage from Gradients", NeurIPS 2019, as PFLlib offers it (``-dlg``,
``-dlgg``, ``-bnpc``; its ``call_dlg`` and ``utils/dlg.py``): every ``dlg_gap`` rounds, for each
client whose model is aggregated that round, the server treats the model delta as a gradient
and reconstructs the client's first ``batch_num_per_client`` training batches by gradient
matching. The reported number is the PSNR of the reconstructions (higher: more leakage).

**The attack** (:func:`reconstruct`, one batch; jitted and vmapped over a client's batches).
With θ the global model the client started from, Δ = θ − θ_client its model delta, η the
learning rate and T the client's local steps this round, the target gradient is
``g = Δ / (η·T)`` (exactly the batch gradient after one SGD step). Dummy inputs
``x̂ = lo + (hi − lo)·sigmoid(z)`` (``z ~ N(0, 1)``; ``[lo, hi]`` the data's value range) and
dummy soft labels ``softmax(ŷ)`` (``ŷ ~ N(0, 1)``) minimise the matching loss
(:func:`matching_loss`)::

    D(z, ŷ) = Σ_leaves ‖∇_θ CE(f_θ(x̂), softmax(ŷ)) − g‖²

with L-BFGS (``optax.lbfgs``, zoom line search) for ``iterations`` steps (PFLlib's 100; its
``torch.optim.LBFGS`` runs up to 20 inner iterations per step without a line search).

**PSNR** (:func:`psnr`) on the data's own range: ``10·log10((hi − lo)² / MSE)``, the MSE over
every pixel of the batch, after pairing each reconstructed example with a real one
(:func:`match_order`: the gradient of a batch does not depend on its order, so the attack
recovers the examples in any order; the pairing minimising the total squared error is taken).

**Differences from PFLlib**, each a bug or a weakness of its attack there:

- PFLlib reconstructs ``sigmoid(z)`` in [0, 1] while its images are normalised to [−1, 1],
  feeds the network that [0, 1] image, and reports ``20·log10(1/√(MSE/3))``: the ranges
  differ (an exact reconstruction of a −1 pixel is impossible), the division by 3 adds
  4.8 dB and the peak 1 is half the range. Here the reconstruction lives in the data's range
  and the peak is that range's width (``--pfllib-compat`` does not bring the formula back: on
  this attack it would reproduce neither PFLlib's numbers nor a meaningful PSNR).
- PFLlib matches with ``MSELoss(f(x̂), ŷ)`` against a random output vector although the
  clients trained with cross-entropy; here the dummy loss is the clients' own cross-entropy
  (the original DLG's soft-label loss).
- PFLlib differentiates at the client's model θ_client and matches the raw delta Δ; the
  delta comes from gradients taken from θ onwards and is η·T times their mean, so here the
  gradient is taken at θ and the target is Δ/(η·T).
- PFLlib compares positions; here reconstructions are paired with the examples first.
- The batches attacked are the first ``batch_num_per_client`` batches of the client's first
  epoch, as it drew them (a ``train_locally`` shuffle from its round key) — PFLlib draws a
  fresh shuffle.

**What the attack can do.** After one local SGD step (``-ls 1`` on a client with one batch)
the delta is one batch's gradient and DLG recovers the batch on small fully connected models.
After several steps the delta mixes several batches' gradients, taken at different points;
the attack then recovers at best a blend, and PSNRs are low — PFLlib runs it anyway, and so
does this, as an evaluation, not a proof of privacy.

**Which algorithms.** Those whose upload is the whole model (the structure and shapes of
``model.init``'s variables) and whose server state holds the global model as ``params``
(:func:`check`): the FedAvg family. Others — partial models, prototypes, logits, deltas,
nothing — are refused with one line. The attacked parameters are the model's ``params``
collection, evaluated in inference mode.

**How the upload is obtained.** The engine aggregates inside one compiled round and does not
return per-client uploads. The runner keeps the server state and the attacked clients'
states from before the round; after it, :class:`Evaluator` re-runs those clients'
``client_update`` with the same round key, client id and data — the same seeded computation
the engine ran, so the upload is the one aggregated (up to floating-point reassociation of a
different compilation; tested). The dummy inputs draw from their own stream
(``fold_in(client_key, DLG_STREAM)``), so the attack changes nothing in training.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lib.config import Config
from fedjax_lib.core import engine as engine_lib
from fedjax_lib.core import rng
from fedjax_lib.core.local import ClientData, batch_schedule
from fedjax_lib.errors import ConfigError

#: The stream tag of the dummy inputs' keys (``fold_in(client_key, DLG_STREAM)``).
DLG_STREAM = 0xD16
#: PFLlib's reported value for a perfect reconstruction (it returns 100 when MSE = 0).
PSNR_CAP = 100.0
OPTIMIZERS = ("lbfgs", "adam")


# ------------------------------------------------------------------ the attack (pure)
def soft_cross_entropy(logits: jax.Array, label_logits: jax.Array) -> jax.Array:
  """Mean over the batch of ``−Σ_c softmax(ŷ)_c · log softmax(z)_c`` (DLG's soft labels)."""
  targets = jax.nn.softmax(label_logits.astype(jnp.float32), axis=-1)
  return -(targets * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)).sum(-1).mean()


def to_range(latent: jax.Array, low, high) -> jax.Array:
  """``low + (high − low)·sigmoid(latent)``: an unconstrained variable mapped into the data's
  value range."""
  return low + (high - low) * jax.nn.sigmoid(latent)


def dummy_gradient(apply_fn: Callable, params, x: jax.Array, label_logits: jax.Array):
  """``∇_θ CE(f_θ(x), softmax(ŷ))`` at ``params`` (``apply_fn(params, x) -> logits``)."""
  return jax.grad(lambda p: soft_cross_entropy(apply_fn(p, x), label_logits))(params)


def gradient_distance(a, b) -> jax.Array:
  """``Σ_leaves ‖a − b‖²`` (float32)."""
  return sum(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)).sum()
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def matching_loss(apply_fn: Callable, params, target, x: jax.Array,
                  label_logits: jax.Array) -> jax.Array:
  """DLG's objective ``Σ_leaves ‖∇_θ CE(f_θ(x), softmax(ŷ)) − target‖²``."""
  return gradient_distance(dummy_gradient(apply_fn, params, x, label_logits), target)


class Reconstruction(NamedTuple):
  """One attacked batch: the dummy inputs (in the data's range), the soft labels and the
  final matching loss."""
  x: jax.Array
  labels: jax.Array
  loss: jax.Array


def _optimizer(name: str) -> optax.GradientTransformation:
  if name == "lbfgs":
    return optax.lbfgs()
  if name == "adam":
    return optax.adam(0.1)
  raise ValueError(f"unknown DLG optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def reconstruct(apply_fn: Callable, params, target, key: jax.Array, x_shape: tuple,
                num_classes: int, low, high, iterations: int = 100,
                optimizer: str = "lbfgs") -> Reconstruction:
  """Reconstructs one batch from the gradient ``target`` by gradient matching (pure).

  Args:
    apply_fn: ``apply_fn(params, x) -> logits`` (static).
    params: the parameters the gradient was taken at (the global model).
    target: the gradient to match, shaped like ``params``.
    key: draws ``z ~ N(0, 1)`` (``x_shape``) and ``ŷ ~ N(0, 1)`` (``[B, num_classes]``).
    x_shape: the batch's input shape ``(B, ...)`` (static).
    num_classes: the label width (static).
    low, high: the data's value range; the reconstruction is ``to_range(z, low, high)``.
    iterations: optimizer steps (static; L-BFGS steps each include a line search).
    optimizer: ``'lbfgs'`` (PFLlib's) or ``'adam'`` (step 0.1; see the README's measurements).

  Returns:
    The :class:`Reconstruction`.
  """
  key_x, key_y = jax.random.split(key)
  dummy = (jax.random.normal(key_x, x_shape, jnp.float32),
           jax.random.normal(key_y, (x_shape[0], num_classes), jnp.float32))

  def objective(variables):
    latent, label_logits = variables
    return matching_loss(apply_fn, params, target, to_range(latent, low, high), label_logits)

  tx = _optimizer(optimizer)
  if optimizer == "lbfgs":
    value_and_grad = optax.value_and_grad_from_state(objective)
  else:
    value_and_grad = lambda variables, state: jax.value_and_grad(objective)(variables)

  def step(carry, _):
    variables, state = carry
    value, grad = value_and_grad(variables, state=state)
    updates, state = tx.update(grad, state, variables, value=value, grad=grad,
                               value_fn=objective)
    variables = optax.apply_updates(variables, updates)
    return (variables, state), None

  (dummy, _), _ = jax.lax.scan(step, (dummy, tx.init(dummy)), None, length=iterations)
  latent, label_logits = dummy
  return Reconstruction(to_range(latent, low, high), jax.nn.softmax(label_logits, -1),
                        objective(dummy))


def psnr(truth, reconstruction, peak: float) -> float:
  """``10·log10(peak² / MSE)`` over every entry (PFLlib's 100 when MSE = 0; NaN stays NaN).

  ``peak`` is the width of the data's value range (2 for images normalised to [−1, 1]).
  """
  mse = float(np.mean(np.square(np.asarray(truth, np.float64)
                                - np.asarray(reconstruction, np.float64))))
  if mse == 0:
    return PSNR_CAP
  return float(10.0 * np.log10(peak ** 2 / mse))


def match_order(truth, reconstruction) -> np.ndarray:
  """``reconstruction`` reordered along its first axis so that example i is paired with
  ``truth[i]``, minimising the total squared error (Hungarian algorithm)."""
  from scipy.optimize import linear_sum_assignment  # pylint: disable=import-outside-toplevel
  truth = np.asarray(truth, np.float64).reshape(len(truth), -1)
  rec = np.asarray(reconstruction)
  flat = rec.astype(np.float64).reshape(len(rec), -1)
  cost = np.square(truth[:, None, :] - flat[None, :, :]).sum(-1)
  if not np.isfinite(cost).all():
    return rec
  rows, cols = linear_sum_assignment(cost)
  return rec[cols[np.argsort(rows)]]


# ------------------------------------------------------------------ which algorithms
def _same_shapes(a, b) -> bool:
  return (jax.tree.structure(a) == jax.tree.structure(b)
          and all(x.shape == y.shape for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def _describe(tree) -> str:
  if isinstance(tree, dict):
    return ("nothing" if not tree else ", ".join(sorted(map(str, tree))))
  return type(tree).__name__


def check(config: Config, data, algorithm, models: dict) -> list[str]:
  """Refuses DLG for algorithms that do not upload their whole model; warns about settings.

  Reads shapes only (``jax.eval_shape`` of ``init`` and ``client_update`` per architecture).

  Args:
    config: the validated config.
    data: the `FederatedData`.
    algorithm: the algorithm instance (its ``model`` is the first architecture's).
    models: architecture name → Flax model.

  Returns:
    One-line warnings (no ``warning:`` prefix).

  Raises:
    ConfigError: ``dlg_eval`` with an algorithm whose upload is not its whole model.
  """
  defaults = Config()
  if not config.dlg_eval:
    given = [f"{name}={getattr(config, name)!r}" for name in ("dlg_gap", "batch_num_per_client")
             if getattr(config, name) != getattr(defaults, name)]
    if given:
      return [f"{', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect without "
              "dlg_eval; add -dlg to run the DLG attack"]
    return []
  sample_x = np.asarray(data.x[0])
  key = rng.root_key(0)
  client_data = ClientData(np.asarray(data.x), np.asarray(data.y),
                           np.asarray(data.train_idx[0]), np.asarray(data.train_count[0]))
  for model in models.values():
    alg = dataclasses.replace(algorithm, model=model)
    variables = jax.eval_shape(model.init, key, sample_x[None])
    server, clients = jax.eval_shape(functools.partial(alg.init, num_clients=1), key, sample_x)
    one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), clients)
    upload = jax.eval_shape(alg.client_update, server, one, client_data, key)[1]
    held = (isinstance(server, dict) and "params" in server
            and _same_shapes(server["params"], variables))
    if not (_same_shapes(upload, variables) and held):
      raise ConfigError(
          f"the DLG attack (-dlg) is not available for {alg.name}: it attacks an uploaded "
          f"whole model, but {alg.name}'s upload holds {_describe(upload)}"
          + ("" if held else " and keeps no global model as params")
          + "; use an algorithm that uploads its model (FedAvg, FedProx, Ditto, MOON, ...)")
  out = []
  if config.global_rounds >= 1 and config.dlg_gap > config.global_rounds:
    out.append(f"dlg_gap={config.dlg_gap} is larger than global_rounds={config.global_rounds}: "
               "the DLG attack runs only on round 0's uploads (from the untrained model); use "
               f"dlg_gap <= {config.global_rounds}")
  return out


# ------------------------------------------------------------------ in the run loop
class Snapshot(NamedTuple):
  """What the attack needs from before a round: its global model and attacked clients."""
  round_index: int
  server_state: Any
  ids: np.ndarray                 # the clients aggregated this round (ids)
  client_states: list             # [(group index, that client's state before the round)]
  client_keys: list               # each client's training key of this round
  hparams: dict


class Evaluator:
  """Runs the DLG attack for the runner: a snapshot before a round, the attack after it.

  One compiled upload program and one compiled attack program per architecture group,
  reused every DLG round.
  """

  def __init__(self, engine, config: Config, low: float, high: float,
               iterations: int = 100, optimizer: str = "lbfgs"):
    self.engine = engine
    self.gap = config.dlg_gap
    self.batches = config.batch_num_per_client
    self.low, self.high = float(low), float(high)
    self.iterations = iterations
    self.optimizer = optimizer
    self._upload = {}
    self._attack = {}

  def due(self, round_index: int) -> bool:
    return round_index % self.gap == 0

  def snapshot(self, server_state, client_states, root, round_index: int,
               hparams) -> Snapshot:
    """Copies what the attack of round ``round_index`` needs before the round donates it.

    The attacked clients are the round's aggregated ones, planned exactly as the engine
    plans them (`fedjax_lib.core.engine.plan_round` from the round key).
    """
    eng = self.engine
    rkey = rng.round_key(root, round_index)
    plan = jax.device_get(engine_lib.plan_round(rkey, eng.participation))
    ids = np.asarray(plan.cohort)[np.asarray(plan.kept)]
    states = []
    for cid in ids:
      gi = next(i for i, g in enumerate(eng.groups) if int(cid) in g.ids)
      row = eng.groups[gi].ids.index(int(cid))
      states.append((gi, jax.tree.map(lambda a, r=row: jnp.array(a[r], copy=True),
                                      client_states[eng.groups[gi].name])))
    return Snapshot(round_index, jax.tree.map(lambda a: jnp.array(a, copy=True), server_state),
                    ids, states, [rng.client_key(rkey, int(c)) for c in ids], hparams)

  def _upload_program(self, gi: int):
    if gi not in self._upload:
      group = self.engine.groups[gi]

      def upload(hparams, server_state, client_state, x, y, idx, count, key):
        alg = group.algorithm.with_hyperparameter_values(hparams)
        return alg.client_update(server_state, client_state, ClientData(x, y, idx, count),
                                 key)[1]
      self._upload[gi] = jax.jit(upload)
    return self._upload[gi]

  def _attack_program(self, gi: int):
    if gi not in self._attack:
      group = self.engine.groups[gi]
      model = group.algorithm.model
      num_classes = int(jax.eval_shape(model.apply, jax.eval_shape(
          model.init, rng.root_key(0), self.engine.data.x[:1]), self.engine.data.x[:1]
      ).shape[-1])
      iterations, optimizer, low, high = self.iterations, self.optimizer, self.low, self.high

      def attack(hparams, variables, upload, x, y, rows, count, key):
        alg = group.algorithm.with_hyperparameter_values(hparams)
        spec = alg.local
        params = variables["params"]
        steps = spec.local_epochs * jnp.minimum(count // spec.batch_size,
                                                spec.steps_per_epoch)
        scale = 1.0 / (spec.learning_rate * jnp.maximum(steps, 1))
        target = jax.tree.map(lambda g, u: (g - u) * scale, params, upload["params"])
        apply_fn = lambda p, batch: model.apply({**variables, "params": p}, batch)
        truth = x[rows]  # [batches, B, ...]
        keys = jax.random.split(jax.random.fold_in(key, DLG_STREAM), rows.shape[0])
        one = lambda k: reconstruct(apply_fn, params, target, k, truth.shape[1:], num_classes,
                                    low, high, iterations, optimizer)
        return truth, jax.vmap(one)(keys)
      self._attack[gi] = jax.jit(attack)
    return self._attack[gi]

  def attack(self, snap: Snapshot) -> dict:
    """The attack of the snapshot's round: ``{"psnr": mean over clients, "client_psnr":
    {id: mean over its batches}, "seconds"}`` (``psnr`` None when no batch was attacked)."""
    t0 = time.perf_counter()
    eng = self.engine
    data = eng.data
    counts = np.asarray(data.train_count)
    per_client = {}
    for cid, (gi, state), key in zip(snap.ids, snap.client_states, snap.client_keys):
      cid = int(cid)
      spec = eng.groups[gi].algorithm.local
      usable = min(self.batches, int(counts[cid]) // spec.batch_size, spec.steps_per_epoch)
      if usable < 1:
        continue  # no full batch: the client took no step
      upload = self._upload_program(gi)(snap.hparams, snap.server_state, state, data.x, data.y,
                                        data.train_idx[cid], data.train_count[cid], key)
      client_data = ClientData(data.x, data.y, data.train_idx[cid], data.train_count[cid])
      rows, _ = batch_schedule(client_data, jax.random.split(key)[0], spec)
      truth, rec = self._attack_program(gi)(snap.hparams, snap.server_state["params"], upload,
                                            data.x, data.y, rows[:usable],
                                            data.train_count[cid], key)
      truth, rec_x = np.asarray(truth), np.asarray(rec.x)
      values = [psnr(t, match_order(t, r), self.high - self.low) for t, r in zip(truth, rec_x)]
      values = [v for v in values if np.isfinite(v)]
      if values:
        per_client[cid] = float(np.mean(values))
    mean = float(np.mean(list(per_client.values()))) if per_client else None
    return {"psnr": mean, "client_psnr": per_client, "seconds": time.perf_counter() - t0}


def data_range(x) -> tuple[float, float]:
  """The data's value range ``(min, max)`` over every sample (the PSNR's peak is its width)."""
  x = np.asarray(x)
  low, high = float(x.min()), float(x.max())
  if not high > low:
    raise ConfigError(f"the DLG attack (-dlg) needs inputs with a value range; every input "
                      f"value is {low}")
  return low, high


def describe(result: dict) -> str:
  """``DLG PSNR 12.34 dB (4 clients, 3.1 s)``: one attacked round, for its log line."""
  if result["psnr"] is None:
    return "DLG: no aggregated client had a full batch to attack"
  n = len(result["client_psnr"])
  return (f"DLG PSNR {result['psnr']:.2f} dB ({n} client{'s' if n != 1 else ''}, "
          f"{result['seconds']:.1f} s)")


def summary_line(attacks: list) -> str:
  """One line for the final summary from ``[(round, mean PSNR)]``."""
  values = [v for _, v in attacks if v is not None]
  if not values:
    return "DLG attack: no aggregated client had a full batch to attack"
  last_round, last = next((r, v) for r, v in reversed(attacks) if v is not None)
  return (f"DLG attack: mean PSNR {np.mean(values):.2f} dB over {len(values)} attacked "
          f"round(s) (max {max(values):.2f}, round {last_round}: {last:.2f}); higher means "
          "more leakage")
