"""Shared pieces of the prototype algorithms (FedProto, FedTGP): class prototypes as arrays.

A set of class prototypes is a pair of arrays: ``protos [C, d]`` (one feature vector per
class) and ``present [C]`` (bool: whether class c has a prototype). A client uploads the
prototypes of the classes it has; HtFLlib sends a dict ``{class: vector}``, so only the
present rows count as traffic (:func:`~fedjax_lib.algorithms.base.rows_traffic`).

- :func:`class_sums` — per-class feature sums and counts (segment sums as a one-hot matmul).
- :func:`prototype_mse` — HtFLlib's regulariser ``MSE(f(x), P[y])``: the mean over the
  batch's ``B x d`` entries, where samples of a class without a prototype contribute 0 (HtFLlib
  puts the sample's own detached feature there) but still count in the mean.
- :func:`nearest_prototype_logits` — scores ``-MSE(f(x), P[c])`` for the nearest-prototype
  evaluation of FedProto and FedTGP (classes without a prototype score ``-inf``).
- :func:`eval_class_means` — a client's per-class mean embedding over its training set, in
  evaluation mode (FedTGP's features, FedKTL's normalised head outputs).
- :func:`mean_of_uploads` — the server's per-class unweighted mean over the clients that
  uploaded the class (weight 0 — dropped or padding — uploads nothing).
- :func:`train_on_rows` — a server's epochs over its uploaded rows (FedGH's head, FedTGP's
  TGP), shuffled by :func:`valid_row_order` independently of where padding slots sit.
- :class:`PrototypeAlgorithm` — what the two algorithms share: personal models (the whole
  model stays on the client, BatchNorm statistics included), the prototype-regularised loss,
  the two evaluation views (nearest prototype first, as HtFLlib reports it, then the head:
  FedTGP issue #6) and the prototype traffic.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar

import jax
import jax.numpy as jnp
import optax

from fedjax_lib.algorithms.base import (Algorithm, SettingsContext, Traffic,
                                        abstract_variables, check_number, rows_traffic,
                                        stack_clients, untrained_new_clients)
from fedjax_lib.core.local import Batch, epoch_order, masked_cross_entropy
from fedjax_lib.errors import ConfigError
from fedjax_lib.models.base import split_params


def class_sums(features: jax.Array, labels: jax.Array, mask: jax.Array, num_classes: int):
  """``(sums [C, d], counts [C])`` of the rows with ``mask == 1``, by label."""
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * mask.astype(
      jnp.float32)[:, None]
  return onehot.T @ features.astype(jnp.float32), onehot.sum(0)


def prototype_mse(features: jax.Array, labels: jax.Array, mask: jax.Array, protos: jax.Array,
                  present: jax.Array) -> jax.Array:
  """``Σ_i mask_i·present[y_i]·‖f_i − P[y_i]‖² / (n·d)`` with ``n = Σ mask`` (HtFLlib's
  ``MSELoss(proto_new, rep)``: samples without a prototype have ``proto_new = rep``)."""
  target = protos[labels]
  weight = mask.astype(jnp.float32) * present[labels].astype(jnp.float32)
  squared = jnp.square(features - jax.lax.stop_gradient(target)).sum(-1)
  n = jnp.maximum(mask.astype(jnp.float32).sum(), 1.0)
  return (weight * squared).sum() / (n * features.shape[-1])


def nearest_prototype_logits(features: jax.Array, protos: jax.Array,
                             present: jax.Array) -> jax.Array:
  """Scores ``-MSE(f, P[c])`` (mean over d) for every class; ``-inf`` for a class without a
  prototype; all 0 (argmax: class 0) while no class has one."""
  dist = jnp.square(features[:, None, :] - protos[None]).mean(-1)
  logits = jnp.where(present[None], -dist, -jnp.inf)
  return jnp.where(present.any(), logits, 0.0)


def eval_class_means(embed, data, num_classes: int, chunk: int = 50):
  """``(means [C, k], present [C])``: per-class means of ``embed(x) [n, k]`` over a client's
  whole training set (evaluation mode: ``embed`` is a fixed function), ``chunk`` samples at a
  time; a class the client lacks has a zero row and ``present`` False."""
  width = data.train_idx.shape[0]
  rows = -(-width // chunk) * chunk
  idx = jnp.pad(data.train_idx, (0, rows - width))
  valid = jnp.arange(rows) < data.train_count

  def chunk_sums(args):
    chunk_idx, chunk_valid = args
    return class_sums(embed(data.x[chunk_idx]), data.y[chunk_idx], chunk_valid, num_classes)

  sums, counts = jax.lax.map(chunk_sums, (idx.reshape(-1, chunk), valid.reshape(-1, chunk)))
  sums, counts = sums.sum(0), counts.sum(0)
  return sums / jnp.maximum(counts, 1.0)[:, None], counts > 0


def loader_samples(data, batch_size: int):
  """``data`` restricted to the samples HtFLlib's prototype loader visits: its training
  loader is ``DataLoader(batch_size, drop_last=True, shuffle=False)``, so a client's first
  ``⌊n/B⌋·B`` training samples, in order (none when ``n < B``). FedTGP, FedGH and FedKTL
  average their prototypes over these (HtFLlib's ``collect_protos``)."""
  return data._replace(train_count=data.train_count // batch_size * batch_size)


def shuffled_loader_samples(data, key: jax.Array, batch_size: int):
  """``data`` restricted to the samples one epoch of PFLlib's training loader visits,
  ``DataLoader(batch_size, drop_last=True, shuffle=True)``: ``⌊n/B⌋·B`` of the client's
  training samples drawn at random (from ``key``), in the epoch's order."""
  order = epoch_order(key, data.train_count, data.train_idx.shape[0])
  return loader_samples(data._replace(train_idx=data.train_idx[order]), batch_size)


def mean_of_uploads(protos: jax.Array, has: jax.Array):
  """Per-class unweighted mean of ``protos [K, C, d]`` over the uploads with ``has [K, C]``;
  returns ``(mean [C, d], present [C])``."""
  has = has.astype(jnp.float32)
  count = has.sum(0)
  mean = jnp.einsum("kc,kcd->cd", has, protos.astype(jnp.float32)) / jnp.maximum(count, 1.0)[:, None]
  return mean, count > 0


def class_mean_server(uploads, weights) -> dict:
  """``{'protos', 'present'}``: per class, the unweighted mean of the rows uploaded with
  weight > 0 (FedProto's prototypes, FD's logits); no row for a class nobody uploaded."""
  has = uploads["present"] & (weights > 0)[:, None]
  protos, present = mean_of_uploads(uploads["protos"], has)
  return {"protos": protos, "present": present}


def valid_row_order(key: jax.Array, valid: jax.Array) -> jax.Array:
  """A uniformly random order of the rows with ``valid``, followed by the others.

  Row i's shuffle score is drawn from ``fold_in(key, rank_i)``, ``rank_i`` its position among
  the valid rows, never its position in ``valid``: the uploads of several devices come with
  padding slots elsewhere, and the order of the valid rows must not depend on that.
  """
  rank = jnp.cumsum(valid) - 1
  scores = jax.vmap(lambda r: jax.random.uniform(jax.random.fold_in(key, r)))(rank)
  return jnp.argsort(jnp.where(valid, scores, 2.0))


def train_on_rows(params, loss_fn: Callable, valid: jax.Array, batch_size: int,
                  num_epochs: int, tx: optax.GradientTransformation, key: jax.Array):
  """``num_epochs`` epochs of ``tx`` over the rows with ``valid`` (a server's training set).

  Epoch e visits the valid rows in the order :func:`valid_row_order` draws from
  ``fold_in(key, e)``, in ``ceil(n / batch_size)`` batches (``n`` valid rows; the last batch
  holds the remainder and is masked beyond it). The optimizer state starts fresh and runs on
  through the epochs. No valid row: ``params`` unchanged.

  Args:
    params: the parameters trained.
    loss_fn: ``loss_fn(params, rows [B] int, mask [B] float) -> scalar``; must average over
      ``mask`` (rows under ``mask == 0`` are arbitrary).
    valid: ``[n_rows]`` bool.
    batch_size, num_epochs: static.
    tx: the optax transform.
    key: the round's server key.
  """
  total = valid.shape[0]
  count = valid.sum()
  padded = (-(-total // batch_size) + 1) * batch_size
  grad_fn = jax.grad(loss_fn)

  def epoch(e, carry):
    order = jnp.pad(valid_row_order(jax.random.fold_in(key, e), valid), (0, padded - total))

    def step(s, carry):
      params, opt_state = carry
      rows = jax.lax.dynamic_slice(order, (s * batch_size,), (batch_size,))
      mask = (s * batch_size + jnp.arange(batch_size) < count).astype(jnp.float32)
      updates, opt_state = tx.update(grad_fn(params, rows, mask), opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    return jax.lax.fori_loop(0, -(-count // batch_size), step, carry)

  params, _ = jax.lax.fori_loop(0, num_epochs, epoch, (params, tx.init(params)))
  return params


@dataclasses.dataclass(frozen=True)
class PrototypeAlgorithm(Algorithm):
  """Personal models trained with ``CE + lam·MSE(f(x), P[y])`` against the server's
  prototypes ``{'protos', 'present'}``; evaluated by the nearest prototype and by the head.

  Subclasses define ``init``, ``client_update`` and ``server_update``.

  Attributes:
    lam: weight of the prototype regulariser (HtFLlib's ``-lam``; its scripts use 10).
  """

  lam: float = 1.0
  # The train loss is the head's cross-entropy (the nearest-prototype view scores -inf for
  # classes without a prototype).
  TRAIN_LOSS_VIEW: ClassVar[str] = "head"

  def __post_init__(self):
    check_number(self.name, "lam", self.lam, 0.0)

  def shapes(self, sample_x):
    """``(num_classes, feature_dim)`` of the model (traced abstractly)."""
    variables = abstract_variables(self.model, sample_x)
    x = jax.ShapeDtypeStruct((1, *sample_x.shape), sample_x.dtype)
    features, logits = jax.eval_shape(
        lambda v, x: self.model.apply(v, x, method="forward"), variables, x)
    return logits.shape[-1], features.shape[-1]

  def init_clients(self, key, sample_x, num_clients):
    """Every client's model (the same initial parameters), stacked."""
    return {"params": stack_clients(self.init_params(key, sample_x), num_clients)}

  def empty_prototypes(self, sample_x):
    num_classes, dim = self.shapes(sample_x)
    return {"protos": jnp.zeros((num_classes, dim), jnp.float32),
            "present": jnp.zeros((num_classes,), bool)}

  def objective(self, server_state):
    """``CE(logits, y) + lam·prototype_mse`` against the server's prototypes."""
    def loss(features, logits, batch: Batch, carry):
      ce = masked_cross_entropy(logits, batch.y, batch.mask)
      reg = prototype_mse(features, batch.y, batch.mask, server_state["protos"],
                          server_state["present"])
      return ce + self.lam * reg, carry
    return loss

  def client_model(self, server_state, client_state):
    """The client's own model (HtFLlib's saved ``model``; ``-sfn``/``-mfn``)."""
    del server_state
    return client_state['params']

  def predict(self, server_state, client_state, x):
    """The nearest global prototype of the client's features (HtFLlib's evaluation)."""
    features = self.model.apply(client_state["params"], x, method="features")
    return nearest_prototype_logits(features, server_state["protos"], server_state["present"])

  def eval_views(self, server_state, client_state, data, key):
    del data, key
    return {"proto": lambda x: self.predict(server_state, client_state, x),
            "head": lambda x: self.model.apply(client_state["params"], x)}

  def new_client_variables(self, server_state, client_state):
    """A new client trains its own freshly initialised model; it is tested with its head."""
    return client_state["params"]

  def download(self, server_state):
    return {"protos": server_state["protos"], "present": server_state["present"]}

  def download_traffic(self, server_state) -> Traffic:
    """The prototypes of the classes the server has (HtFLlib sends a dict of them)."""
    return rows_traffic(server_state["protos"], server_state["present"])

  def upload_traffic(self, upload) -> Traffic:
    """The prototypes of the classes the client has (``C_i x d``)."""
    return rows_traffic(upload["protos"], upload["present"])

  def check_settings(self, context: SettingsContext) -> list[str]:
    """Refuses a model whose base has no parameters: its "features" are the raw inputs, so
    there is no representation to align with prototypes."""
    base, _ = split_params(abstract_variables(self.model, context.sample_x))
    if not jax.tree.leaves(base):
      raise ConfigError(
          f"{self.name} learns prototypes of the model's features, but model "
          f"{context.model_name!r} has no base/head split (its base has no parameters, so "
          "its features are the raw inputs); use a model with a feature extractor (cnn, dnn, "
          "resnet18, ...)")
    return untrained_new_clients(self.name, "model", context)
