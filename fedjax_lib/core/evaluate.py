"""Vectorised evaluation of every client: accuracy, micro AUC, train loss.

PFLlib's protocol (§5.3 of the reference notes): all clients are evaluated on their own test
split; accuracy is pooled over all test samples (sample-weighted), AUC is each client's micro
AUC (one-vs-rest over the flattened one-hot labels, scored with the model's raw outputs)
weighted by its test-sample count, and the train loss is the sample-weighted cross-entropy over
the clients' training samples. The per-client standard deviations are unweighted, over clients
with at least one test sample.

Difference from PFLlib: the train loss averages over *all* training samples rather than a
freshly shuffled drop_last pass (which skips up to ``batch_size - 1`` random samples per client).
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np
import optax


def micro_auc(scores: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Micro-averaged one-vs-rest ROC AUC of ``scores [n, C]`` for integer ``labels [n]``.

  Equals ``sklearn.metrics.roc_auc_score(one_hot(labels), scores, average='micro')`` over the
  rows with ``mask == 1``: the AUC of the ``n·C`` flattened (score, is-true-class) pairs, by the
  rank-sum (Mann–Whitney) formula with tied scores given their average rank.
  Returns 0 when there are no valid rows.
  """
  n, num_classes = scores.shape
  flat = scores.astype(jnp.float32).reshape(-1)
  positive = jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_).reshape(-1)
  valid = jnp.repeat(mask.astype(jnp.bool_), num_classes)
  # Invalid entries sort to the end (+inf) and are never counted below a finite score.
  keyed = jnp.where(valid, flat, jnp.inf)
  ordered = jnp.sort(keyed)
  below = jnp.searchsorted(ordered, keyed, side="left")
  at_or_below = jnp.searchsorted(ordered, keyed, side="right")
  avg_rank = (below + at_or_below + 1).astype(jnp.float32) / 2.0  # 1-based average rank
  pos = (positive & valid).astype(jnp.float32)
  num_pos = pos.sum()
  num_neg = valid.sum().astype(jnp.float32) - num_pos
  rank_sum = (avg_rank * pos).sum()
  auc = (rank_sum - num_pos * (num_pos + 1) / 2.0) / jnp.maximum(num_pos * num_neg, 1.0)
  return jnp.where(num_pos * num_neg > 0, auc, 0.0)


def client_metrics(predict: Callable, x_all, y_all, test_idx, test_count, train_idx,
                   train_count, train_loss: bool = True):
  """Per-client sums for one client: correct, AUC, train-loss sum (host reduces them)."""
  test_mask = jnp.arange(test_idx.shape[0]) < test_count
  logits = predict(x_all[test_idx])
  labels = y_all[test_idx]
  correct = ((jnp.argmax(logits, -1) == labels) & test_mask).sum()
  auc = micro_auc(logits, labels, test_mask)
  if not train_loss:
    return {"correct": correct, "auc": auc}
  train_mask = jnp.arange(train_idx.shape[0]) < train_count
  train_logits = predict(x_all[train_idx])
  losses = optax.softmax_cross_entropy_with_integer_labels(
      train_logits.astype(jnp.float32), y_all[train_idx])
  loss_sum = jnp.where(train_mask, losses, 0.0).sum()
  return {"correct": correct, "auc": auc, "loss_sum": loss_sum}


#: Forward FLOPs per sample from which the sequential executor's evaluation forwards a
#: client's own samples in blocks (:func:`blocked_logits`) rather than its padded tables
#: (:func:`client_metrics`). Below it the loop costs more than the padding's samples: on
#: the PFLlib digits folder (20 clients) the DNN (0.3 MFLOP per sample) evaluated in 10.1 ms
#: in blocks of 48 against 7.7 ms with its padded rows in one batch, the CNN (8.5 MFLOP) in
#: 143 ms in blocks of 64 against 175 ms (experiments/benchmarks/RESULTS.md, run 19).
BLOCKED_MIN_FLOPS = 1e6


def jaxpr_flops(jaxpr) -> float:
  """FLOPs (2 per multiply-add) of the matrix products and convolutions of a jaxpr.

  Nested jaxprs (jit, custom derivatives, branches) count once each; a loop's body counts
  once, whatever its trip count.
  """
  total = 0.0
  for eqn in jaxpr.eqns:
    out = np.prod(eqn.outvars[0].aval.shape) if eqn.outvars else 0
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * out * np.prod([lhs[d] for d in contract])
    elif eqn.primitive.name == "conv_general_dilated":
      kernel = eqn.invars[1].aval.shape
      spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
      total += 2.0 * out * np.prod([kernel[d] for d in spec[1:]])
    for sub in jax_core.jaxprs_in_params(eqn.params):
      total += jaxpr_flops(sub)
  return total


def blocked_logits(predict: Callable, x_all, idx, count, block: int) -> jax.Array:
  """``predict`` of the first ``count`` rows of ``x_all[idx]``, ``block`` rows at a time.

  Returns ``[ceil(len(idx) / block) * block, ...]`` logits, zeros in the blocks past
  ``count``: the loop runs ``ceil(count / block)`` times (a dynamic trip count), so a client's
  cost follows its own sample count rather than the largest client's that ``idx`` is padded
  to. ``predict`` must map each row alone (no batch statistics, no noise drawn per call).
  """
  n = idx.shape[0]
  blocks = -(-n // block)
  idx = jnp.pad(idx, (0, blocks * block - n), mode="edge")
  out = jax.eval_shape(predict, jax.ShapeDtypeStruct((block,) + x_all.shape[1:], x_all.dtype))

  def body(i, logits):
    rows = jax.lax.dynamic_slice_in_dim(idx, i * block, block)
    return jax.lax.dynamic_update_slice_in_dim(logits, predict(x_all[rows]), i * block, 0)

  return jax.lax.fori_loop(0, (count + block - 1) // block, body,
                           jnp.zeros((blocks * block,) + out.shape[1:], out.dtype))


def _blocked_metrics(predict: Callable, predict_block: Callable, x_all, y_all, test_idx,
                     test_count, train_idx, train_count, block: int, train_loss: bool) -> dict:
  """:func:`client_metrics` by :func:`blocked_logits`: the test rows, then (for the train
  loss) the train rows right after them, forwarded together (``predict_block``: ``predict``
  for batches of ``block`` rows)."""
  if train_loss:  # [test rows | train rows | padding]
    pos = jnp.arange(test_idx.shape[0] + train_idx.shape[0])
    idx = jnp.where(pos < test_count, test_idx[jnp.minimum(pos, test_idx.shape[0] - 1)],
                    train_idx[jnp.clip(pos - test_count, 0, train_idx.shape[0] - 1)])
    count = test_count + train_count
  else:
    idx, count = test_idx, test_count
    pos = jnp.arange(idx.shape[0])
  if idx.shape[0] <= block:  # one block: the padded rows in one batch
    logits = predict(x_all[idx])
  else:
    logits = blocked_logits(predict_block, x_all, idx, count, block)[: idx.shape[0]]
  labels = y_all[idx]
  # The test rows lie within the first len(test_idx) rows: the AUC sorts no more than
  # client_metrics's does.
  n_test = test_idx.shape[0]
  test_mask = jnp.arange(n_test) < test_count
  out = {"correct": ((jnp.argmax(logits[:n_test], -1) == labels[:n_test]) & test_mask).sum(),
         "auc": micro_auc(logits[:n_test], labels[:n_test], test_mask)}
  if train_loss:
    train_mask = (pos >= test_count) & (pos < count)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    out["loss_sum"] = jnp.where(train_mask, losses, 0.0).sum()
  return out


def view_metrics(views: dict, x_all, y_all, test_idx, test_count, train_idx, train_count,
                 loss_view: Optional[str] = None, block: Optional[int] = None,
                 min_flops: float = BLOCKED_MIN_FLOPS):
  """:func:`client_metrics` of every view of one client.

  The first view gives ``correct`` and ``auc``, and ``loss_sum`` unless ``loss_view`` names
  another view; with several views each view ``name`` also gives ``correct_<name>`` and
  ``auc_<name>``. With ``block``, each view whose forward pass costs at least ``min_flops``
  per sample forwards only the client's own samples, ``block`` at a time
  (:func:`blocked_logits`; for one client, not under vmap, whose loop would run the largest
  trip count for all): the same metrics, rounded differently.
  """
  out = {}
  loss_view = next(iter(views)) if loss_view is None else loss_view
  for i, (name, predict) in enumerate(views.items()):
    if block is not None:  # traced once for a block: its FLOPs, and the loop's body
      traced = jax.make_jaxpr(predict)(
          jax.ShapeDtypeStruct((block,) + x_all.shape[1:], x_all.dtype))
    if block is not None and jaxpr_flops(traced.jaxpr) >= min_flops * block:
      m = _blocked_metrics(predict, lambda rows, t=traced: jax_core.jaxpr_as_fun(t)(rows)[0],
                           x_all, y_all, test_idx, test_count, train_idx, train_count, block,
                           train_loss=name == loss_view)
    else:
      m = client_metrics(predict, x_all, y_all, test_idx, test_count, train_idx, train_count,
                         train_loss=name == loss_view)
    if name == loss_view:
      out["loss_sum"] = m.pop("loss_sum")
    if i == 0:
      out.update(m)
    if len(views) > 1:
      out[f"correct_{name}"], out[f"auc_{name}"] = m["correct"], m["auc"]
  return out


def summarize(per_client: dict, test_count: np.ndarray, train_count: np.ndarray) -> dict:
  """Reduces per-client arrays (host numpy) to PFLlib's round metrics.

  Per-view sums ``correct_<name>`` / ``auc_<name>`` become ``test_acc_<name>`` /
  ``test_auc_<name>``.
  """
  test_count = np.asarray(test_count, np.float64)
  train_count = np.asarray(train_count, np.float64)
  correct = np.asarray(per_client["correct"], np.float64)
  auc = np.asarray(per_client["auc"], np.float64)
  has_test = test_count > 0
  total = max(test_count.sum(), 1.0)
  accs = correct[has_test] / test_count[has_test]
  views = {}
  for key in per_client:
    if key.startswith("correct_"):
      name = key[len("correct_"):]
      views[f"test_acc_{name}"] = float(np.asarray(per_client[key], np.float64).sum() / total)
      views[f"test_auc_{name}"] = float(
          (np.asarray(per_client[f"auc_{name}"], np.float64) * test_count).sum() / total)
  return {**views,
      "test_acc": float(correct.sum() / total),
      "test_auc": float((auc * test_count).sum() / total),
      "test_acc_std": float(accs.std()) if accs.size else 0.0,
      "test_auc_std": float(auc[has_test].std()) if accs.size else 0.0,
      "train_loss": float(np.asarray(per_client["loss_sum"], np.float64).sum()
                          / max(train_count.sum(), 1.0)),
  }
