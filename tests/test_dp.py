"""Differential privacy: DP-SGD in `train_locally`, the accountant, the flags and the results.

References: the clipped, noised gradient against a numpy per-example loop on softmax
regression (hand-derived gradients); the accountant against TF-Privacy's published MNIST
setting (tensorflow/privacy, ``tutorials/README.md``, "Select Parameters", first row: noise
multiplier 1.12, batch 256 of 60,000, 60 epochs → ε = 2.92 at δ = 1e-5, computed by
``tutorials/mnist_dpsgd_tutorial.py``'s ``compute_epsilon`` with the RDP accountant and the
classic RDP → (ε, δ) conversion).
"""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lib import Config, privacy
from fedjax_lib.algorithms import algorithm_names, make_algorithm
from fedjax_lib.algorithms.fedavg import FedAvg
from fedjax_lib.core import engine as engine_lib
from fedjax_lib.core import rng
from fedjax_lib.core.local import (Batch, ClientData, LocalSpec, gaussian_noise,
                                   masked_cross_entropy, private_value_and_grad, train_locally)
from fedjax_lib.errors import ConfigError
from fedjax_lib.models import make_model
from fedjax_lib.results import _jsonable
from fedjax_lib.runner import build, run_experiment
from tests.helpers import assert_cli_refuses
from tests.test_engine import _small_data


# ------------------------------------------------------------------ the private gradient
def _softmax_regression(params, batch, key):
  del key
  logits = batch.x @ params["w"] + params["b"]
  return masked_cross_entropy(logits, batch.y, batch.mask)


def _numpy_private_grad(params, x, y, clip, batch_size):
  """Σ_b clip_C(∇ℓ_b) / batch_size, looping over examples in numpy (softmax regression:
  ∇_w ℓ = x (p − onehot(y))ᵀ, ∇_b ℓ = p − onehot(y))."""
  w, b = np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)
  total_w, total_b = np.zeros_like(w), np.zeros_like(b)
  for xb, yb in zip(np.asarray(x, np.float64), np.asarray(y)):
    z = xb @ w + b
    p = np.exp(z - z.max())
    p /= p.sum()
    p[yb] -= 1.0
    gw, gb = np.outer(xb, p), p
    norm = math.sqrt((gw ** 2).sum() + (gb ** 2).sum())
    scale = min(1.0, clip / norm)
    total_w += scale * gw
    total_b += scale * gb
  return {"w": total_w / batch_size, "b": total_b / batch_size}


def _toy(batch=6, dim=4, classes=3, seed=0):
  r = np.random.default_rng(seed)
  x = r.normal(size=(batch, dim)).astype(np.float32)
  x[1] *= 40.0  # one example whose gradient is far beyond the clip norm
  y = r.integers(0, classes, batch)
  params = {"w": jnp.asarray(r.normal(size=(dim, classes)).astype(np.float32) * 0.3),
            "b": jnp.zeros((classes,), jnp.float32)}
  return params, Batch(jnp.asarray(x), jnp.asarray(y), jnp.ones((batch,), jnp.float32))


def test_clipped_gradient_matches_a_numpy_per_example_loop():
  params, batch = _toy()
  clip = 0.7
  loss, grads = jax.jit(private_value_and_grad(_softmax_regression, clip, 0.0, 6))(
      params, batch, jax.random.key(0))
  expected = _numpy_private_grad(params, batch.x, batch.y, clip, 6)
  for name in ("w", "b"):
    np.testing.assert_allclose(grads[name], expected[name], rtol=1e-5, atol=1e-6)
  # The reported loss is the batch's mean loss.
  np.testing.assert_allclose(loss, _softmax_regression(params, batch, None), rtol=1e-6)


def test_noise_is_sigma_times_clip_from_the_steps_noise_key():
  params, batch = _toy()
  clip, sigma, key = 0.7, 1.3, jax.random.key(5)
  _, clean = jax.jit(private_value_and_grad(_softmax_regression, clip, 0.0, 6))(params, batch,
                                                                               key)
  _, noisy = jax.jit(private_value_and_grad(_softmax_regression, clip, sigma, 6))(params, batch,
                                                                                 key)
  noise = jax.jit(gaussian_noise, static_argnums=2)(clean, rng.dp_noise_key(key), sigma * clip)
  for name in ("w", "b"):
    np.testing.assert_allclose(noisy[name], clean[name] + noise[name] / 6, rtol=1e-5,
                               atol=1e-6)
  # Statistically N(0, (σC)²) per coordinate: 20,000 draws.
  big = {"v": jnp.zeros((20000,), jnp.float32)}
  draws = np.asarray(jax.jit(gaussian_noise, static_argnums=2)(big, jax.random.key(1),
                                                              sigma * clip)["v"])
  assert abs(draws.mean()) < 0.03 and abs(draws.std() / (sigma * clip) - 1) < 0.02


def test_clipping_binds_on_a_large_gradient():
  params, batch = _toy()
  one = Batch(batch.x[1:2], batch.y[1:2], batch.mask[1:2])  # the large example alone
  raw = jax.jit(jax.grad(_softmax_regression))(params, one, None)
  raw_norm = math.sqrt(sum(float(np.sum(np.square(g))) for g in jax.tree.leaves(raw)))
  assert raw_norm > 10
  _, clipped = jax.jit(private_value_and_grad(_softmax_regression, 1.0, 0.0, 1))(
      params, one, jax.random.key(0))
  norm = math.sqrt(sum(float(np.sum(np.square(g))) for g in jax.tree.leaves(clipped)))
  assert norm == pytest.approx(1.0, rel=1e-5)
  for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(raw)):  # same direction
    np.testing.assert_allclose(a, b / raw_norm, rtol=1e-4, atol=1e-6)


def _client(n=23, dim=4, classes=3, seed=1):
  r = np.random.default_rng(seed)
  x = jnp.asarray(r.normal(size=(40, dim)).astype(np.float32))
  y = jnp.asarray(r.integers(0, classes, 40))
  idx = jnp.asarray(r.permutation(40)[:30])
  return ClientData(x, y, idx, jnp.asarray(n))


@pytest.mark.parametrize("loop", ["scan", "valid"])
def test_dp_without_noise_or_clipping_equals_plain_training(loop):
  params, _ = _toy()
  data = _client()
  spec = LocalSpec(learning_rate=0.3, batch_size=5, local_epochs=2, steps_per_epoch=6, loop=loop)
  train = jax.jit(lambda p, k, spec: train_locally(p, data, k, spec, _softmax_regression),
                  static_argnums=2)
  plain, _, plain_stats = train(params, jax.random.key(2), spec)
  private, _, private_stats = train(params, jax.random.key(2),
                                    dataclasses.replace(spec, dp_clip=1e9, dp_sigma=0.0))
  for a, b in zip(jax.tree.leaves(private), jax.tree.leaves(plain)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(private_stats["loss"], plain_stats["loss"], rtol=1e-5)
  assert int(private_stats["steps"]) == int(plain_stats["steps"]) == 8  # 23 // 5 per epoch


def test_dp_loops_agree_masked_steps_change_nothing_and_aux_is_carried():
  """'scan' (masked steps computed, discarded) equals 'valid' with noise on; the aux carry
  comes from the full batch (here: a count of the samples trained on)."""
  params, _ = _toy()
  data = _client(n=13)

  def loss_fn(params, batch, key, seen):
    return _softmax_regression(params, batch, key), seen + batch.mask.sum()

  out = {}
  for loop in ("scan", "valid"):
    spec = LocalSpec(learning_rate=0.3, batch_size=4, local_epochs=2, steps_per_epoch=7,
                     loop=loop, dp_clip=0.5, dp_sigma=0.8)
    out[loop] = jax.jit(lambda p, k, spec=spec: train_locally(
        p, data, k, spec, loss_fn, aux=jnp.zeros(())))(params, jax.random.key(3))
  (p_scan, _, s_scan), (p_valid, _, s_valid) = out["scan"], out["valid"]
  for a, b in zip(jax.tree.leaves(p_scan), jax.tree.leaves(p_valid)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert int(s_scan["steps"]) == 6 and float(s_scan["aux"]) == float(s_valid["aux"]) == 24.0
  np.testing.assert_allclose(s_scan["loss"], s_valid["loss"], rtol=1e-5)


def test_vmap_and_sequential_executors_agree_with_dp():
  data = _small_data()
  model = make_model("mlr", data.sample_shape, data.num_classes)
  results = []
  for executor, loop in (("vmap", "scan"), ("sequential", "valid")):
    spec = LocalSpec(learning_rate=0.1, batch_size=4, local_epochs=1,
                     steps_per_epoch=int(data.train_count.max()) // 4, loop=loop,
                     dp_clip=0.5, dp_sigma=1.0)
    eng = engine_lib.Engine(make_algorithm("FedAvg", model, spec, {}),
                            engine_lib.DeviceData.from_federated(data),
                            engine_lib.Participation(data.num_clients, 0.5), executor=executor)
    root = rng.root_key(0)
    server, clients = eng.init(root, eng.data.x[0])
    selected = []
    for r in range(2):
      server, clients, metrics = eng.run_round(server, clients, root, r)
      selected.append(np.asarray(metrics["selected"]))
    results.append((jax.device_get((server, clients)), selected))
  (a, sel_a), (b, sel_b) = results
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6)
  assert all((s == t).all() and (s >= 0).sum() == 3 for s, t in zip(sel_a, sel_b))


# ------------------------------------------------------------------ the accountant
def test_rdp_matches_tf_privacy_published_epsilon():
  """TF-Privacy's MNIST DP-SGD: q = 256/60000, σ = 1.12, 60 epochs of 60000 // 256 steps,
  δ = 1e-5 → ε = 2.92 (classic conversion over its orders). Our accountant's conversion is
  dp-accounting's tighter one: never larger, and equal to dp-accounting's RdpAccountant."""
  import dp_accounting  # pylint: disable=import-outside-toplevel
  q, sigma, steps, delta = 256 / 60000, 1.12, 60 * (60000 // 256), 1e-5
  orders = tuple([1 + x / 10 for x in range(1, 100)] + list(range(12, 64)))
  rdp = steps * np.asarray(privacy.subsampled_gaussian_rdp(q, sigma, orders))
  classic = np.min(rdp + np.log(1 / delta) / (np.asarray(orders) - 1))
  assert round(float(classic), 2) == 2.92

  plan = privacy.Plan(batch_sizes=(256,), round_steps=np.array([[60000 // 256]]),
                      warmup_steps=np.zeros((1, 1), np.int64),
                      step_rdp=np.asarray(privacy.subsampled_gaussian_rdp(q, sigma))[None, None],
                      sigma=sigma, delta=delta)
  accountant = privacy.Accountant(plan)
  accountant.start()
  for _ in range(60):  # one epoch per "round"
    accountant.record_round([0])
  reference = dp_accounting.rdp.RdpAccountant(list(privacy.ORDERS))
  reference.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
      q, dp_accounting.GaussianDpEvent(sigma)), steps))
  assert accountant.epsilon() == pytest.approx(reference.get_epsilon(delta), rel=1e-9)
  assert 2.4 < accountant.epsilon() < 2.92


def test_accountant_counts_participation_only():
  counts = np.array([50, 20, 5])  # client 2 is smaller than a batch: never a step
  rdp = [privacy.subsampled_gaussian_rdp(min(1.0, 10 / n), 1.0) for n in counts]
  round_steps = (counts // 10)[:, None]
  plan = privacy.Plan((10,), round_steps, np.zeros_like(round_steps), np.asarray(rdp)[:, None],
                      1.0, 1e-5)
  accountant = privacy.Accountant(plan)
  accountant.start()
  assert accountant.epsilon() == 0.0
  accountant.record_round([0, 2, -1])
  accountant.record_round([0])
  eps = accountant.client_epsilons()
  assert accountant.steps.ravel().tolist() == [10, 0, 0]
  assert eps[0] > 0 and eps[1] == eps[2] == 0.0 and accountant.epsilon() == eps[0]
  accountant.record_round([1])
  assert accountant.client_epsilons()[0] == eps[0]  # client 0 spent nothing more
  # σ = 0: unbounded, written to JSON as null.
  loose = privacy.Accountant(dataclasses.replace(plan, sigma=0.0))
  loose.record_round([1])
  assert loose.client_epsilons().tolist() == [0.0, math.inf, 0.0]
  assert _jsonable(loose.summary())["epsilon"] is None


# ------------------------------------------------------------------ flags, refusals, results
@pytest.mark.parametrize("argv,words", [
    (["-dp", "-dps", "-1"], ["dp_sigma=-1.0", ">= 0"]),
    (["-dp", "-dps", "inf"], ["dp_sigma=inf", "finite"]),
    (["-dp", "--dp-clip", "0"], ["dp_clip=0.0", "> 0"]),
    (["-dp", "--dp-clip", "nan"], ["dp_clip=nan", "finite"]),
    (["-dp", "--dp-delta", "1"], ["dp_delta=1.0", "(0.0, 1.0)"]),
    (["-dp", "maybe"], ["invalid boolean", "maybe"]),
    (["-dp", "-algo", "FedProto", "-m", "dnn"], ["FedProto", "prototypes", "FedAvg"]),
    (["-dp", "-algo", "PerAvg"], ["PerAvg", "FedAvg"]),
    (["-dp", "-algo", "Local", "-m", "resnet4"], ["resnet4", "BatchNorm"]),
])
def test_bad_dp_flags_exit_2_with_one_line(argv, words, tmp_path, capsys):
  assert_cli_refuses(argv, words, tmp_path, capsys)


def test_reviewed_names_are_algorithms_and_unreviewed_ones_are_refused():
  assert set(privacy.REVIEWED) <= set(algorithm_names())

  @dataclasses.dataclass(frozen=True)
  class Unreviewed(FedAvg):
    name = "Unreviewed"

  model = make_model("dnn", (8,), 3)
  alg = Unreviewed(model=model, local=LocalSpec())
  with pytest.raises(ConfigError, match="not been reviewed"):
    privacy.check(Config(privacy=True), np.array([20]), alg, {"dnn": model},
                  np.zeros((8,), np.float32))


def test_private_steps_are_read_from_the_algorithm():
  """Ditto trains its personal model (-pls epochs) and the global track: both count."""
  config = Config(dataset="digits", num_clients=5, model="dnn", algorithm="Ditto",
                  algo_params={"plocal_epochs": 2}, local_epochs=1, privacy=True,
                  dp_sigma=1.0, global_rounds=1, progress=False, plot=False)
  built = build(config)
  counts = np.asarray(built.data.train_count[:5])
  assert built.privacy.batch_sizes == (10,)
  np.testing.assert_array_equal(built.privacy.round_steps[:, 0], 3 * (counts // 10))


def test_results_record_epsilon_per_evaluated_round(tmp_path):
  config = Config(dataset="digits", num_clients=5, model="dnn", global_rounds=2, privacy=True,
                  dp_sigma=1.0, dp_clip=1.0, out=str(tmp_path), progress=False, plot=False)
  lines = []
  results = run_experiment(config, log=lines.append)
  record = json.loads((tmp_path / "digits_FedAvg_test_0.json").read_text())
  eps = record["epsilon"]
  assert len(eps) == len(record["rounds"]) == 3 and eps[0] == 0.0 and 0 < eps[1] < eps[2]
  final = record["privacy"]
  assert final["epsilon"] > eps[2]  # the last round trains after the last evaluation
  assert final["epsilon"] == max(final["client_epsilon"]) and len(final["client_epsilon"]) == 5
  assert final["delta"] == 1e-5 and final["sigma"] == 1.0
  assert any("| ε " in line for line in lines)
  assert any(line.startswith("differential privacy: ε = ") for line in results.summary_lines())
