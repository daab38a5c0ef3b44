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


def view_metrics(views: dict, x_all, y_all, test_idx, test_count, train_idx, train_count,
                 loss_view: Optional[str] = None):
  """:func:`client_metrics` of every view of one client.

  The first view gives ``correct`` and ``auc``, and ``loss_sum`` unless ``loss_view`` names
  another view; with several views each view ``name`` also gives ``correct_<name>`` and
  ``auc_<name>``.
  """
  out = {}
  loss_view = next(iter(views)) if loss_view is None else loss_view
  for i, (name, predict) in enumerate(views.items()):
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
