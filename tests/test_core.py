"""Unit tests of the engine's parts against numpy / hand-derived references."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.metrics import roc_auc_score

from fedjax_lib.core import aggregate, engine, evaluate, local, rng


# ---------------------------------------------------------------- aggregation
def test_weighted_average_matches_numpy():
  r = np.random.default_rng(0)
  stacked = {"w": r.normal(size=(5, 3, 4)).astype(np.float32),
             "b": r.normal(size=(5, 2)).astype(np.float32)}
  weights = np.array([3.0, 0.0, 1.0, 7.0, 2.0])
  got = aggregate.weighted_average(jax.tree.map(jnp.asarray, stacked), jnp.asarray(weights))
  for k in stacked:
    want = np.einsum("k,k...->...", weights / weights.sum(), stacked[k])
    np.testing.assert_allclose(got[k], want, rtol=1e-5, atol=1e-6)


def test_weighted_average_all_zero_weights_returns_fallback():
  stacked = {"w": jnp.ones((3, 2))}
  fallback = {"w": jnp.full((2,), 5.0)}
  got = aggregate.weighted_average(stacked, jnp.zeros(3), fallback=fallback)
  np.testing.assert_array_equal(got["w"], [5.0, 5.0])


# ---------------------------------------------------------------- AUC
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_micro_auc_matches_sklearn(seed):
  r = np.random.default_rng(seed)
  n, c = 37, 5
  scores = r.normal(size=(n, c)).astype(np.float32)
  scores[:5] = np.round(scores[:5])  # some ties
  labels = r.integers(0, c, n)
  labels[:c] = np.arange(c)
  want = roc_auc_score(np.eye(c)[labels], scores, average="micro")
  got = evaluate.micro_auc(jnp.asarray(scores), jnp.asarray(labels), jnp.ones(n))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_micro_auc_ignores_masked_rows():
  r = np.random.default_rng(3)
  scores = r.normal(size=(20, 4)).astype(np.float32)
  labels = r.integers(0, 4, 20)
  mask = np.arange(20) < 12
  want = roc_auc_score(np.eye(4)[labels[:12]], scores[:12], average="micro")
  scores[12:] = 100.0  # garbage in padded rows must not matter
  got = evaluate.micro_auc(jnp.asarray(scores), jnp.asarray(labels), jnp.asarray(mask))
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("test_count,train_count,block", [
    (7, 19, 4), (7, 19, 5), (0, 19, 4), (7, 0, 3), (9, 23, 32), (1, 1, 1)])
def test_blocked_view_metrics_match_numpy(test_count, train_count, block):
  """A client's own samples forwarded in blocks (the sequential executor's evaluation) give
  the metrics of its unpadded samples: accuracy, micro AUC (sklearn) and the train-loss sum,
  whatever garbage the padding of the tables points at; the loop runs only the blocks the
  client's samples need."""
  r = np.random.default_rng(test_count * 100 + train_count + block)
  n, dim, c = 60, 6, 4
  x = r.normal(size=(n, dim)).astype(np.float32)
  y = r.integers(0, c, n)
  w = r.normal(size=(dim, c)).astype(np.float32)
  test_idx = np.r_[r.permutation(30)[:test_count], np.full(9 - test_count, 59)]
  train_idx = np.r_[30 + r.permutation(29)[:train_count], np.full(23 - train_count, 0)]
  calls = []

  def predict(v):
    calls.append(v.shape)
    return v @ w

  out = jax.jit(lambda *a: evaluate.view_metrics({"": predict, "other": predict}, *a,
                                                 block=block, min_flops=0.0))(
      x, y, test_idx, test_count, train_idx, train_count)
  # the loss view forwards test and train rows together, the other view the test rows
  assert {shape[0] for shape in calls} == {min(block, 9 + 23), min(block, 9)}
  test_x, test_y = x[test_idx[:test_count]], y[test_idx[:test_count]]
  logits = test_x @ w
  assert int(out["correct"]) == int((logits.argmax(-1) == test_y).sum())
  assert int(out["correct_other"]) == int(out["correct"])
  if test_count > 1 and 0 < (np.eye(c)[test_y]).sum() < test_count * c:
    want = roc_auc_score(np.eye(c)[test_y], logits, average="micro")
    np.testing.assert_allclose(out["auc"], want, rtol=1e-5)
    np.testing.assert_allclose(out["auc_other"], want, rtol=1e-5)
  train_logits = (x[train_idx[:train_count]] @ w).astype(np.float64)
  shifted = train_logits - train_logits.max(-1, keepdims=True)
  losses = np.log(np.exp(shifted).sum(-1)) - shifted[np.arange(train_count),
                                                     y[train_idx[:train_count]]]
  np.testing.assert_allclose(out["loss_sum"], losses.sum(), rtol=1e-5, atol=1e-6)
  unblocked = jax.jit(lambda *a: evaluate.view_metrics({"": predict, "other": predict}, *a))(
      x, y, test_idx, test_count, train_idx, train_count)
  for k in unblocked:
    np.testing.assert_allclose(out[k], unblocked[k], rtol=1e-6, err_msg=k)


def test_cheap_views_are_forwarded_padded():
  """Below ``min_flops`` per sample a view forwards the padded tables, as client_metrics
  does (the same numbers to the bit): a loop's iterations would cost more than the padding."""
  x, y = jnp.ones((40, 6)), jnp.zeros(40, jnp.int32)
  w = jnp.ones((6, 4))
  args = (x, y, jnp.arange(9), 5, jnp.arange(9, 32), 20)
  # batches traced: 4 (the FLOP count's, whose trace the blocks reuse), or the padded 9 test
  # and 23 train rows
  for min_flops, want in ((49.0, {4, 9, 23}), (48.0, {4})):
    calls = []
    predict = lambda v, calls=calls: calls.append(v.shape) or v @ w  # 48 FLOPs per sample
    jax.jit(lambda *a, m=min_flops, predict=predict: evaluate.view_metrics(
        {"": predict, "other": predict}, *a, block=4, min_flops=m))(*args)
    assert {shape[0] for shape in calls} == want


def test_jaxpr_flops_counts_products_and_convolutions():
  """2 per multiply-add: PFLlib's digits CNN forward is 8.53 MFLOP per sample (its two
  convolutions and two dense layers, counted by hand), whichever lowering its convolutions
  take; nested jaxprs count."""
  from fedjax_lib.models.cnn import FedAvgCNN  # pylint: disable=import-outside-toplevel
  hand = 2 * (24 * 24 * 32 * 25 + 8 * 8 * 64 * 32 * 25 + 1024 * 512 + 512 * 10)
  for impl, batch in (("lax", 3), ("slices", 3), ("hybrid", 3), ("auto", 48)):
    model = FedAvgCNN(10, conv_impl=impl)
    v = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    jaxpr = jax.make_jaxpr(model.apply)(v, jax.ShapeDtypeStruct((batch, 28, 28, 1),
                                                                jnp.float32))
    assert evaluate.jaxpr_flops(jaxpr.jaxpr) == batch * hand, impl
  f = jax.jit(lambda a, b: jnp.einsum("bij,bjk->bik", a, b))
  jaxpr = jax.make_jaxpr(lambda a, b: f(a, b) + 1)(jnp.ones((2, 3, 5)), jnp.ones((2, 5, 7)))
  assert evaluate.jaxpr_flops(jaxpr.jaxpr) == 2 * 2 * 3 * 5 * 7


def test_blocked_logits_runs_only_the_needed_blocks():
  """The trip count is the client's: rows past ``count`` stay zero (never forwarded)."""
  x = jnp.arange(1.0, 11.0)[:, None]
  idx = jnp.arange(10)
  got = jax.jit(evaluate.blocked_logits, static_argnums=(0, 4))(lambda v: v * 2, x, idx, 5, 3)
  np.testing.assert_array_equal(np.asarray(got)[:, 0],
                                [2, 4, 6, 8, 10, 12, 0, 0, 0, 0, 0, 0])


def test_summarize_is_sample_weighted():
  per_client = {"correct": np.array([9, 1, 0]), "auc": np.array([0.9, 0.5, 0.0]),
                "loss_sum": np.array([10.0, 30.0, 0.0])}
  out = evaluate.summarize(per_client, test_count=np.array([10, 10, 0]),
                           train_count=np.array([20, 20, 0]))
  assert out["test_acc"] == pytest.approx(10 / 20)
  assert out["test_auc"] == pytest.approx((0.9 * 10 + 0.5 * 10) / 20)
  assert out["test_acc_std"] == pytest.approx(np.std([0.9, 0.1]))
  assert out["train_loss"] == pytest.approx(40 / 40)


# ---------------------------------------------------------------- local training
def _toy_problem(num_samples=23, dim=3, seed=0):
  r = np.random.default_rng(seed)
  x = jnp.asarray(r.normal(size=(num_samples, dim)).astype(np.float32))
  y = jnp.asarray(r.integers(0, 2, num_samples).astype(np.int32))
  return x, y


def _linear_loss(params, batch, key):
  del key
  logits = batch.x @ params["w"] + params["b"]
  return local.masked_cross_entropy(logits, batch.y, batch.mask)


def _manual_sgd(params, x, y, rows, learning_rate):
  """Plain SGD over the given batches of rows, written out step by step."""
  for step_rows in np.asarray(rows):
    batch = local.Batch(x[step_rows], y[step_rows], jnp.ones(len(step_rows)))
    grads = jax.grad(_linear_loss)(params, batch, None)
    params = jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)
  return params


def test_epoch_order_is_a_permutation_of_valid_positions():
  order = np.asarray(local.epoch_order(jax.random.key(0), jnp.asarray(7), 12))
  assert sorted(order[:7]) == list(range(7))
  assert sorted(order[7:]) == list(range(7, 12))


@pytest.mark.parametrize("loop", ["scan", "valid"])
def test_train_locally_matches_hand_written_sgd(loop):
  """SGD over the schedule's batches equals a numpy-free manual loop over the same rows."""
  x, y = _toy_problem()
  idx = jnp.asarray(np.r_[np.arange(17), np.zeros(5)].astype(np.int32))
  data = local.ClientData(x, y, idx, jnp.asarray(17))
  spec = local.LocalSpec(learning_rate=0.1, batch_size=4, local_epochs=2, steps_per_epoch=4,
                         loop=loop)
  params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
  key = jax.random.key(1)
  got, _, stats = local.train_locally(params, data, key, spec, _linear_loss)
  rows, valid = local.batch_schedule(data, jax.random.split(key)[0], spec)
  assert np.asarray(valid).all()  # 17 // 4 = 4 full steps per epoch
  want = _manual_sgd(params, x, y, rows, 0.1)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
  assert int(stats["steps"]) == 8


@pytest.mark.parametrize("loop", ["scan", "valid"])
def test_unshuffled_epochs_take_the_clients_order(loop):
  """shuffle=False (HtFLlib's loader): every epoch the client's rows in train_idx order,
  drop_last, the same for any key; SGD over them as the hand-written loop."""
  x, y = _toy_problem()
  order = np.random.default_rng(0).permutation(17).astype(np.int32)
  idx = jnp.asarray(np.r_[order, np.zeros(5, np.int32)])
  data = local.ClientData(x, y, idx, jnp.asarray(17))
  spec = local.LocalSpec(learning_rate=0.1, batch_size=4, local_epochs=2, steps_per_epoch=5,
                         loop=loop, shuffle=False)
  rows, valid = local.batch_schedule(data, jax.random.key(3), spec)
  epoch = np.r_[order, [0, 0, 0]].reshape(5, 4)  # the padding rows (0) form invalid steps
  np.testing.assert_array_equal(rows, np.concatenate([epoch, epoch]))
  np.testing.assert_array_equal(valid, [True] * 4 + [False] + [True] * 4 + [False])
  again, _ = local.batch_schedule(data, jax.random.key(4), spec)
  np.testing.assert_array_equal(again, rows)
  shuffled, _ = local.batch_schedule(data, jax.random.key(3),
                                     dataclasses.replace(spec, shuffle=True))
  assert not np.array_equal(shuffled, rows)
  params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
  got, _, stats = local.train_locally(params, data, jax.random.key(1), spec, _linear_loss)
  want = _manual_sgd(params, x, y, np.concatenate([epoch[:4], epoch[:4]]), 0.1)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
  assert int(stats["steps"]) == 8


@pytest.mark.parametrize("loop", ["scan", "valid"])
def test_masked_steps_change_nothing_and_padding_is_invariant(loop):
  """A client with 9 samples does 2 steps of 4 whether it is padded to 3 or to 8 steps."""
  x, y = _toy_problem()
  params = {"w": jnp.ones((3, 2)) * 0.1, "b": jnp.zeros(2)}
  key = jax.random.key(5)
  idx_short = jnp.asarray(np.r_[np.arange(9), np.zeros(3)].astype(np.int32))
  idx_long = jnp.asarray(np.r_[np.arange(9), np.zeros(23)].astype(np.int32))
  out = []
  for idx, steps in ((idx_short, 3), (idx_long, 8)):
    spec = local.LocalSpec(learning_rate=0.5, batch_size=4, local_epochs=1,
                           steps_per_epoch=steps, loop=loop)
    data = local.ClientData(x, y, idx, jnp.asarray(9))
    rows, valid = local.batch_schedule(data, jax.random.split(key)[0], spec)
    assert np.asarray(valid).sum() == 2
    out.append(local.train_locally(params, data, key, spec, _linear_loss))
  # Shuffles differ with the table width, so compare against a direct 2-step reference.
  for (p, _, stats), idx, steps in zip(out, (idx_short, idx_long), (3, 8)):
    spec = local.LocalSpec(learning_rate=0.5, batch_size=4, local_epochs=1,
                           steps_per_epoch=steps)
    data = local.ClientData(x, y, idx, jnp.asarray(9))
    rows, _ = local.batch_schedule(data, jax.random.split(key)[0], spec)
    want = _manual_sgd(params, x, y, np.asarray(rows)[:2], 0.5)
    for k in want:
      np.testing.assert_allclose(p[k], want[k], rtol=1e-5, atol=1e-6)
    assert int(stats["steps"]) == 2


@pytest.mark.parametrize("loop", ["scan", "valid"])
def test_client_with_no_full_batch_is_untouched(loop):
  x, y = _toy_problem()
  params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
  spec = local.LocalSpec(learning_rate=1.0, batch_size=4, local_epochs=3, steps_per_epoch=2,
                         loop=loop)
  data = local.ClientData(x, y, jnp.arange(8, dtype=jnp.int32), jnp.asarray(3))
  got, _, stats = local.train_locally(params, data, jax.random.key(0), spec, _linear_loss)
  jax.tree.map(np.testing.assert_array_equal, got, params)
  assert int(stats["steps"]) == 0


def test_unrolled_and_looped_local_training_agree():
  x, y = _toy_problem()
  params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
  data = local.ClientData(x, y, jnp.arange(23, dtype=jnp.int32), jnp.asarray(23))
  outs = []
  for unroll in (0, 1, 3):
    spec = local.LocalSpec(0.1, 5, 2, 4, unroll=unroll)
    outs.append(local.train_locally(params, data, jax.random.key(2), spec, _linear_loss)[0])
  for other in outs[1:]:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 outs[0], other)


def test_valid_loop_equals_masked_scan_for_uneven_clients_epochs_and_carry():
  """'valid' runs only each client's own steps: the same parameters, optimizer state, loss,
  step count, per-step keys and carry as the masked scan, for clients of 0..23 samples over
  3 epochs, under jit and vmapped over clients (where its trip count differs per client)."""
  x, y = _toy_problem()
  counts = [0, 3, 5, 9, 14, 23]
  idx = jnp.stack([jnp.asarray(np.r_[np.arange(c), np.zeros(23 - c)].astype(np.int32))
                   for c in counts])
  params = {"w": jnp.ones((3, 2)) * 0.1, "b": jnp.zeros(2)}
  tx = optax.sgd(0.1, momentum=0.9)

  def loss(p, batch, key, carry):  # uses the step key and a carry: both must line up
    noise = jax.random.normal(key, ()) * 1e-3
    return _linear_loss(p, batch, key) + noise, carry + batch.x.sum()

  def run(loop, i, count, key):
    spec = local.LocalSpec(0.1, 5, 3, 4, loop=loop)
    data = local.ClientData(x, y, i, count)
    return local.train_locally(params, data, key, spec, loss, tx=tx, aux=jnp.zeros(()))

  keys = jax.random.split(jax.random.key(7), len(counts))
  for c, i, k in zip(counts, idx, keys):
    a = jax.jit(run, static_argnums=0)("scan", i, jnp.asarray(c), k)
    b = jax.jit(run, static_argnums=0)("valid", i, jnp.asarray(c), k)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7), a, b)
    assert int(b[2]["steps"]) == 3 * min(c // 5, 4)
  vmapped = jax.vmap(lambda i, c, k: run("valid", i, c, k))(idx, jnp.asarray(counts), keys)
  for n, (c, i, k) in enumerate(zip(counts, idx, keys)):
    one = jax.tree.map(lambda a: a[n], vmapped)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7),
                 one, run("scan", i, jnp.asarray(c), k))


def test_unknown_local_loop_is_refused():
  x, y = _toy_problem()
  data = local.ClientData(x, y, jnp.arange(8, dtype=jnp.int32), jnp.asarray(8))
  with pytest.raises(ValueError, match="unknown local loop 'while'"):
    local.train_locally({"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}, data, jax.random.key(0),
                        local.LocalSpec(loop="while"), _linear_loss)


def test_train_locally_accepts_optax_transform_and_state():
  x, y = _toy_problem()
  params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
  data = local.ClientData(x, y, jnp.arange(23, dtype=jnp.int32), jnp.asarray(23))
  spec = local.LocalSpec(0.1, 5, 1, 4)
  tx = optax.sgd(0.1, momentum=0.9)
  _, opt_state, _ = local.train_locally(params, data, jax.random.key(0), spec, _linear_loss, tx)
  assert jax.tree.leaves(opt_state)  # momentum buffers are returned for persisting


# ---------------------------------------------------------------- selection
@pytest.mark.parametrize("jr,rjr,cdr", [(1.0, False, 0.0), (0.5, False, 0.3),
                                        (0.2, True, 0.5)])
def test_plan_round_counts(jr, rjr, cdr):
  p = engine.Participation(num_clients=20, join_ratio=jr, random_join_ratio=rjr,
                           client_drop_rate=cdr)
  seen_sizes = set()
  for r in range(20):
    plan = engine.plan_round(rng.round_key(rng.root_key(0), r), p)
    cohort, active, kept = map(np.asarray, plan)
    assert len(cohort) == p.cohort_size
    assert len(set(cohort.tolist())) == len(cohort)  # without replacement
    k = int(active.sum())
    assert p.min_join <= k <= 20
    assert int(kept.sum()) == int((1 - cdr) * k + 1e-9)
    assert not (kept & ~active).any()
    seen_sizes.add(k)
  if rjr:
    assert len(seen_sizes) > 1


def test_plan_round_is_deterministic_and_seed_dependent():
  p = engine.Participation(num_clients=30, join_ratio=0.3)
  a = engine.plan_round(rng.round_key(rng.root_key(1), 4), p)
  b = engine.plan_round(rng.round_key(rng.root_key(1), 4), p)
  c = engine.plan_round(rng.round_key(rng.root_key(2), 4), p)
  np.testing.assert_array_equal(a.cohort, b.cohort)
  assert not np.array_equal(a.cohort, c.cohort)


def test_backend_defaults_of_the_local_loop():
  assert engine.default_local_loop("cpu") == "valid"
  assert engine.default_local_loop("gpu") == "scan"
  assert engine.default_unroll("cpu", 20) == engine.default_unroll("gpu", 20) == 1
