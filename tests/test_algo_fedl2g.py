"""FedL2G (feat and logit): the guiding MSE, the server step and the meta-gradient against numpy
(a closed form on logistic regression, finite differences on an MLP), the quiz/study split,
warm-up rounds, the communication against HtFLlib's formulas (reference §6), settings checks
and learning on the bundled digits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lib import Config, run_experiment
from fedjax_lib.algorithms import fedl2g  # importing registers "FedL2G-feat"/"FedL2G-logit"
from fedjax_lib.algorithms import get_algorithm, make_algorithm
from fedjax_lib.algorithms.base import SettingsContext, is_linear_server
from fedjax_lib.core import engine as engine_lib
from fedjax_lib.core import rng
from fedjax_lib.core.local import LocalSpec, batch_schedule
from fedjax_lib.errors import ConfigError
from fedjax_lib.models import make_model
from tests.test_algo_proto import _alg, _client, _toy

QUIET = dict(log=lambda msg: None)
NAMES = ("FedL2G-feat", "FedL2G-logit")


def _init(alg, data):
  return alg.init(rng.root_key(0), jnp.asarray(data.x[0]), data.num_clients)


def _engine(alg, data):
  return engine_lib.Engine(alg, engine_lib.DeviceData.from_federated(data),
                           engine_lib.Participation(data.num_clients), executor="vmap")


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


# ---------------------------------------------------------------- pure pieces
def test_guiding_mse_matches_numpy():
  r = np.random.default_rng(0)
  out, guide = r.normal(size=(6, 5)), r.normal(size=(4, 5))
  labels, mask = np.array([0, 3, 1, 1, 2, 3]), np.array([1, 1, 0, 1, 1, 0], np.float32)
  want = sum(((out[i] - guide[labels[i]]) ** 2).sum() for i in range(6) if mask[i]) / (4 * 5)
  got = fedl2g.guiding_mse(jnp.asarray(out, jnp.float32), jnp.asarray(labels), jnp.asarray(mask),
                           jnp.asarray(guide, jnp.float32))
  assert float(got) == pytest.approx(want, rel=1e-5)
  assert float(fedl2g.guiding_mse(jnp.ones((2, 3)), jnp.zeros(2, int), jnp.zeros(2),
                                  jnp.zeros((1, 3)))) == 0.0


def test_split_quiz_is_the_first_samples_and_study_the_rest():
  data = _toy()
  cd = _client(data, 2)
  count, idx = int(cd.train_count), np.asarray(cd.train_idx)
  quiz, study = fedl2g.split_quiz(cd, 6)
  assert int(quiz.train_count) == 6 and int(study.train_count) == count - 6
  q = np.asarray(quiz.train_idx)[:6].tolist()
  s = np.asarray(study.train_idx)[: count - 6].tolist()
  assert q == idx[:6].tolist() and s == idx[6:count].tolist()     # nothing lost or shared
  assert study.train_idx.shape == cd.train_idx.shape               # static width kept
  small_quiz, small_study = fedl2g.split_quiz(cd, 40)             # fewer samples than the quiz
  assert int(small_quiz.train_count) == count and int(small_study.train_count) == 0
  # the meta step draws its quiz batches from the quiz set (all of it: mqb·B samples) and its
  # study batches from the rest; regular training visits the study set only
  alg = _alg("FedL2G-feat", data, meta_quiz_batches=2, meta_study_batches=3)
  (s_rows, s_valid), (q_rows, q_valid) = alg.meta_batches(cd, jax.random.PRNGKey(4))
  assert sorted(np.asarray(q_rows).ravel().tolist()) == sorted(idx[:6].tolist())
  assert set(np.asarray(s_rows).ravel().tolist()) <= set(idx[6:count].tolist())
  assert len(set(np.asarray(s_rows).ravel().tolist())) == 9 and bool(s_valid.all())
  rows, valid = batch_schedule(study, jax.random.PRNGKey(5), alg.local)
  visited = np.asarray(rows)[np.asarray(valid)].ravel().tolist()
  assert sorted(visited) == sorted(idx[6:count].tolist())          # 18 = 6 full batches


def test_server_step_is_a_clipped_sgd_step_on_the_per_class_mean():
  data = _toy()
  alg = _alg("FedL2G-feat", data, server_learning_rate=0.3)
  server, _ = _init(alg, data)
  r = np.random.default_rng(1)
  grads = r.normal(size=(4, 4, 8)).astype(np.float32)
  grads[3] = np.nan                                 # a dropped slot's upload: ignored
  present = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], bool)
  weights = np.array([3.0, 5.0, 2.0, 0.0])
  guide = np.asarray(server["guide"], np.float64)
  for scale in (1.0, 500.0):                        # under and over the clip norm of 100
    out = jax.jit(alg.server_update)(server, {"grads": jnp.asarray(scale * grads),
                                     "present": jnp.asarray(present)},
                            jnp.asarray(weights), jax.random.PRNGKey(0))
    mean = np.zeros((4, 8))
    for c in range(4):
      senders = [k for k in range(4) if present[k, c] and weights[k] > 0]
      if senders:                                   # unweighted; zero for class 3
        mean[c] = np.mean([scale * grads[k, c] for k in senders], 0)
    norm = np.linalg.norm(mean)
    assert (norm > 100) == (scale > 1)
    want = guide - 0.3 * mean * min(1.0, 100.0 / norm)
    np.testing.assert_allclose(np.asarray(out["guide"]), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out["guide"])[3], guide[3])
    assert int(out["round"]) == int(server["round"]) + 1
  assert not is_linear_server(alg)


def test_meta_gradient_matches_the_closed_form_on_logistic_regression():
  """Logits z = x̃Θ (x̃ = [x, 1]), FedL2G-logit, N study and M quiz samples (full batches):
  L_s = CE + Σ‖z − V[y]‖²/(N·C), so Θ' = Θ − η X̃ᵀ[(P − Y)/N + 2(Z − YV)/(N·C)] is affine in V
  and ∂L_q(Θ')/∂V = 2η/(N·C) · Yᵀ X̃ G with G = X̃_qᵀ(P_q' − Y_q)/M."""
  data = _toy()
  model = make_model("mlr", data.sample_shape, data.num_classes)
  spec = LocalSpec(learning_rate=0.7, batch_size=3, steps_per_epoch=8)
  alg = make_algorithm("FedL2G-logit", model, spec,
                       {"meta_quiz_batches": 2, "meta_study_batches": 3})
  cd = _client(data, 2)
  variables = alg.init_params(jax.random.PRNGKey(0), jnp.asarray(data.x[0]))
  guide = np.random.default_rng(2).normal(size=(4, 4)).astype(np.float32)
  key = jax.random.PRNGKey(11)
  got = np.asarray(jax.jit(alg.guide_gradient)(variables, jnp.asarray(guide), cd, key))

  (s_rows, s_valid), (q_rows, q_valid) = alg.meta_batches(cd, jax.random.split(key)[0])
  assert bool(s_valid.all()) and bool(q_valid.all())
  s_rows, q_rows = np.asarray(s_rows).ravel(), np.asarray(q_rows).ravel()
  head = variables["params"]["head"]
  theta = np.vstack([np.asarray(head["kernel"]), np.asarray(head["bias"])[None]]).astype(
      np.float64)
  aug = lambda rows: np.hstack([data.x[rows].astype(np.float64), np.ones((len(rows), 1))])
  onehot = lambda rows: np.eye(4)[data.y[rows]]
  xs, ys, xq, yq = aug(s_rows), onehot(s_rows), aug(q_rows), onehot(q_rows)
  n, m, c, lr = len(s_rows), len(q_rows), 4, 0.7
  zs = xs @ theta
  theta_new = theta - lr * xs.T @ ((np.exp(np_log_softmax(zs)) - ys) / n
                                   + 2 * (zs - ys @ guide) / (n * c))
  g = xq.T @ (np.exp(np_log_softmax(xq @ theta_new)) - yq) / m
  want = 2 * lr / (n * c) * ys.T @ xs @ g
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
  assert np.abs(want).max() > 1e-3
  # rows of classes absent from the study batches are exactly zero
  absent = ~np.isin(np.arange(4), data.y[s_rows])
  assert np.all(got[absent] == 0)


def test_feature_meta_gradient_matches_finite_differences_on_an_mlp():
  """FedL2G-feat on the MLP (ReLU, pooled 8-d features): ⟨∂F/∂V, u⟩ against the central
  difference of F(V) = L_q(θ − η ∇_θ L_s(θ, V)) along random directions u."""
  data = _toy()
  alg = _alg("FedL2G-feat", data, lr=0.5, meta_quiz_batches=2, meta_study_batches=3)
  cd = _client(data, 2)
  variables = alg.init_params(jax.random.PRNGKey(1), jnp.asarray(data.x[0]))
  guide = jnp.asarray(np.random.default_rng(3).normal(size=(4, 8)), jnp.float32)
  key = jax.random.PRNGKey(12)
  got = np.asarray(jax.jit(alg.guide_gradient)(variables, guide, cd, key))
  (s_rows, _), (q_rows, _) = alg.meta_batches(cd, jax.random.split(key)[0])
  xs, ys = jnp.asarray(data.x)[s_rows.ravel()], jnp.asarray(data.y)[s_rows.ravel()]
  xq, yq = jnp.asarray(data.x)[q_rows.ravel()], jnp.asarray(data.y)[q_rows.ravel()]

  def ce(logits, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1).mean()

  def study(params, v):
    f, z = alg.model.apply({"params": params}, xs, method="forward")
    return ce(z, ys) + jnp.square(f - v[ys]).mean()

  def after_step(v):
    grads = jax.grad(study)(variables["params"], v)
    params = jax.tree.map(lambda p, g: p - 0.5 * g, variables["params"], grads)
    return ce(alg.model.apply({"params": params}, xq), yq)

  after_step = jax.jit(after_step)
  r = np.random.default_rng(4)
  for _ in range(3):
    u = jnp.asarray(r.normal(size=(4, 8)), jnp.float32)
    eps = 1e-2
    numeric = (float(after_step(guide + eps * u)) - float(after_step(guide - eps * u))) / (2 * eps)
    assert float((got * np.asarray(u)).sum()) == pytest.approx(numeric, rel=1e-2, abs=1e-5)
  assert np.abs(got).max() > 1e-3


# ---------------------------------------------------------------- rounds
@pytest.mark.parametrize("name,width", [("FedL2G-feat", 8), ("FedL2G-logit", 4)])
def test_warmup_rounds_and_traffic(name, width):
  """warmup_rounds=2: rounds 0 and 1 only take meta steps (models unchanged, V moves); round 2
  trains the models. Traffic (reference §6) per client: up the gradient rows of the classes in
  its study batches (C_i·d, or C_i·C), down V (C·d or C·C); here the study batches cover every
  study sample (mqb 1, B 3: quiz 3, study 9, 9, 21 and 3 samples; mdb 7)."""
  data = _toy()  # C = 4, d = 8
  n, c = data.num_clients, 4
  classes = sum(len(set(data.y[data.train_idx[i][3:int(data.train_count[i])]]))
                for i in range(n))
  assert classes == 9
  alg = _alg(name, data, warmup_rounds=2, meta_study_batches=7, server_learning_rate=1.0)
  eng = _engine(alg, data)
  root = rng.root_key(0)
  server, clients = eng.init(root, data.x[0])
  initial = jax.tree.map(np.array, clients)   # the engine donates the state it is given
  for r in range(3):
    guide = np.array(server["guide"])
    server, clients, metrics = eng.run_round(server, clients, root, r)
    assert int(server["round"]) == r + 1
    assert not np.allclose(server["guide"], guide), r
    same = all(jax.tree.leaves(jax.tree.map(np.array_equal, clients, initial)))
    assert same == (r < 2), r
    assert (float(metrics["local_loss"]) == 0.0) == (r < 2)
    assert float(metrics["upload_floats"]) == classes * width, r
    assert float(metrics["upload_bytes"]) == 4 * classes * width
    assert float(metrics["download_floats"]) == n * c * width
    assert float(metrics["download_bytes"]) == 4 * n * c * width


# ---------------------------------------------------------------- settings
def test_registry_names_and_defaults():
  assert get_algorithm("fedl2g-feat") is fedl2g.FedL2GFeat
  assert get_algorithm("FedL2G-logit") is fedl2g.FedL2GLogit
  defaults = {"meta_study_batches": 1, "meta_quiz_batches": 1, "warmup_rounds": 50,
              "server_learning_rate": 0.01}
  for name in NAMES:
    assert get_algorithm(name).hyperparameters() == defaults
  data = _toy()
  shapes = {name: _init(_alg(name, data), data)[0]["guide"].shape for name in NAMES}
  assert shapes == {"FedL2G-feat": (4, 8), "FedL2G-logit": (4, 4)}


@pytest.mark.parametrize("params", [
    {"meta_study_batches": 0}, {"meta_quiz_batches": 1.5}, {"warmup_rounds": -1},
    {"warmup_rounds": True}, {"server_learning_rate": -0.1},
    {"server_learning_rate": float("inf")}])
def test_bad_hyperparameters_are_one_line_config_errors(params):
  with pytest.raises(ConfigError) as err:
    _alg("FedL2G-feat", _toy(), **params)
  assert "\n" not in str(err.value) and list(params)[0] in str(err.value)


def test_settings_refuse_clients_too_small_for_a_quiz_and_a_study_batch():
  """B = 3, mqb = 1, mdb = 2: a client needs 6 samples to train, 9 for two study batches."""
  data = _toy()
  sample = jnp.asarray(data.x[0])
  alg = _alg("FedL2G-logit", data, meta_study_batches=2)
  ctx = lambda counts: SettingsContext("dnn", sample, np.array(counts))
  with pytest.raises(ConfigError, match="6 training samples"):
    alg.check_settings(ctx([5, 3, 0]))
  warnings = alg.check_settings(ctx([5, 7, 20]))
  assert len(warnings) == 2 and "1 of 3 clients" in warnings[0] and "never train" in warnings[0]
  assert "meta_study_batches=2" in warnings[1] and "1 of 3 clients" in warnings[1]
  assert alg.check_settings(ctx([9, 20])) == []
  mlr = make_model("mlr", data.sample_shape, data.num_classes)
  with pytest.raises(ConfigError, match="FedL2G-logit"):
    make_algorithm("FedL2G-feat", mlr, alg.local).check_settings(ctx([20]))
  assert make_algorithm("FedL2G-logit", mlr, alg.local).check_settings(ctx([20])) == []


@pytest.mark.xla_optimized  # runs long enough to repay it: tests/conftest.py
def test_two_architectures_learn_on_digits(tmp_path):
  """CNN and DNN clients on the bundled digits (10 clients, Dir(0.1), lr 0.05, 5 rounds,
  warmup_rounds 1, otherwise the defaults -mdb 1 -mqb 1 -slr 0.01). Measured over seeds 0/1
  (round 1, the first evaluated, → round 5): FedL2G-feat .070/.082 → .936/.903 (FedL2G-logit .070/.082 →
  .896/.843); the bar sits below the smaller one (the test runs seed 0, ~26 s)."""
  res = run_experiment(Config(model="cnn,dnn", algorithm="FedL2G-feat", num_clients=10,
                              learning_rate=0.05, global_rounds=5, eval_gap=1,
                              algo_params={"warmup_rounds": 1}, out=str(tmp_path),
                              progress=False), **QUIET)
  history = res.runs[0].history
  assert history["rounds"] == [1, 2, 3, 4, 5], "no evaluation during the warm-up, as HtFLlib"
  acc = history["test_acc"]
  assert acc[0] < 0.3 and acc[-1] >= 0.88, acc


def test_a_run_that_is_all_warm_up_is_refused(tmp_path):
  """-wu at or beyond the last evaluated round leaves nothing to evaluate: one line, exit 2,
  nothing written."""
  import subprocess, sys  # pylint: disable=import-outside-toplevel,multiple-imports
  out = tmp_path / "out"
  proc = subprocess.run([sys.executable, "-m", "fedjax_lib", "-algo", "FedL2G-feat", "-m", "dnn",
                         "-gr", "4", "-eg", "2", "-wu", "5", "--out", str(out)],
                        capture_output=True, text=True, check=False)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines() == [
      "error: FedL2G-feat hyperparameter warmup_rounds=5: the run has global_rounds=4 and "
      "evaluates nothing before round 5 (its warm-up), so no round would be evaluated; use "
      "warmup_rounds <= 4 (-wu) or more rounds"]
  assert not out.exists()
