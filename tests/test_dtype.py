"""Mixed precision (``dtype="bfloat16"``): bf16 compute, float32 parameters, every algorithm."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lib import cli
from fedjax_lib.algorithms import algorithm_names, make_algorithm
from fedjax_lib.algorithms.base import has_hook, has_warmup
from fedjax_lib.config import DTYPES, Config
from fedjax_lib.core import engine as engine_lib
from fedjax_lib.core import rng
from fedjax_lib.core.local import ClientData, LocalSpec
from fedjax_lib.errors import ConfigError
from fedjax_lib.models import init_model, make_model
from fedjax_lib.runner import build
from tests.helpers import as_images, suite_params, traced_eqns
from tests.test_engine import _small_data


# PFLlib's models; HtFLlib's zoo has its own tests (tests/test_models_resnet.py,
# tests/test_models_htfl_zoo.py), which trace its large models instead of compiling them.
PFLLIB_MODELS = ('cnn', 'dnn', 'mlr')

MNIST = (28, 28, 1)
COMPUTE_PRIMITIVES = ("conv_general_dilated", "dot_general")


def _compute_dtypes(fn, *args):
  """``{primitive: {operand dtypes}}`` of the convs and matmuls in ``fn``'s jaxpr."""
  found = {}
  for eqn in traced_eqns(fn, *args):
    if eqn.primitive.name in COMPUTE_PRIMITIVES:
      found.setdefault(eqn.primitive.name, set()).update(str(v.aval.dtype) for v in eqn.invars)
  return found


def _floating_dtypes(tree):
  return {str(a.dtype) for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.floating)}


def _abstract_init(model, shape):
  """The model's variables as shapes and dtypes (nothing compiled or computed)."""
  return jax.eval_shape(lambda: init_model(model, jax.random.PRNGKey(0), shape))


@pytest.mark.parametrize("name", PFLLIB_MODELS)
def test_bf16_forward_and_backward_compute_in_bf16_with_float32_params(name):
  shape = MNIST
  # The convolution op itself ('auto' is 'slices', all matmuls, on CPU: tested below).
  options = {"conv_impl": "lax"} if name == "cnn" else {}
  model = make_model(name, shape, 10, dtype="bfloat16", **options)
  variables = _abstract_init(model, shape)
  assert _floating_dtypes(variables) == {"float32"}
  x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
  found = _compute_dtypes(lambda v, x: model.apply(v, x), variables, x)
  if name == "cnn":
    assert found["conv_general_dilated"] == {"bfloat16"}
  assert found["dot_general"] == {"bfloat16"}
  # the outputs leaving the model are float32: logits, features and classify
  apply = lambda method, x: jax.eval_shape(
      lambda v, x: model.apply(v, x, **({"method": method} if method else {})), variables, x)
  assert apply(None, x).dtype == jnp.float32
  z = apply("features", x)
  assert z.dtype == jnp.float32
  assert apply("classify", z).dtype == jnp.float32
  # the backward pass runs in bf16 too, and the gradients are float32 like the parameters
  loss = lambda v: model.apply(v, jnp.ones(x.shape, x.dtype)).sum()
  backward = _compute_dtypes(jax.grad(loss), variables)
  assert backward["dot_general"] == {"bfloat16"}
  if name == "cnn":
    assert backward["conv_general_dilated"] == {"bfloat16"}
  assert _floating_dtypes(jax.eval_shape(jax.grad(loss), variables)) == {"float32"}


@pytest.mark.parametrize("conv_impl", ["patches", "slices", "hybrid"])
def test_bf16_other_conv_impls(conv_impl):
  model = make_model("cnn", MNIST, 10, dtype="bfloat16", conv_impl=conv_impl)
  x = jax.ShapeDtypeStruct((2, *MNIST), jnp.float32)
  found = _compute_dtypes(lambda v, x: model.apply(v, x), _abstract_init(model, MNIST), x)
  assert set().union(*found.values()) == {"bfloat16"}, found


def test_bf16_logits_are_close_to_float32():
  model32 = make_model("cnn", MNIST, 10)
  model16 = make_model("cnn", MNIST, 10, dtype="bfloat16")
  variables = init_model(model32, jax.random.PRNGKey(0), MNIST)
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, *MNIST), minval=-1.0, maxval=1.0)
  logits16 = jax.jit(model16.apply)(variables, x)
  assert logits16.dtype == jnp.float32
  np.testing.assert_allclose(logits16, jax.jit(model32.apply)(variables, x), atol=0.05)


def test_float32_is_the_unchanged_default():
  assert Config().dtype == "float32"
  assert Config() == Config(dtype="float32")
  for name in PFLLIB_MODELS:
    default = make_model(name, MNIST, 10)
    assert make_model(name, MNIST, 10, dtype="float32") == default
    assert make_model(name, MNIST, 10, dtype=jnp.float32) == default
    assert default.dtype is None
    x = jax.ShapeDtypeStruct((2, *MNIST), jnp.float32)
    assert _compute_dtypes(lambda v, x, m=default: m.apply(v, x),
                           _abstract_init(default, MNIST), x)["dot_general"] == {"float32"}


def test_make_model_rejects_unknown_dtypes():
  for bad in ("float16", "bf16", "int32", None, 3):
    with pytest.raises(ConfigError, match="float32, bfloat16"):
      make_model("dnn", (4,), 3, dtype=bad)


def test_config_rejects_a_bad_dtype_in_one_line():
  with pytest.raises(ConfigError) as e:
    Config(dtype="float16").validate()
  message = str(e.value)
  assert "\n" not in message and "'float16'" in message
  assert all(d in message for d in DTYPES)
  Config(dtype="bfloat16").validate()


def test_cli_dtype_flag(capsys, tmp_path):
  parse = lambda argv: cli.config_from_args(cli.build_parser().parse_args(argv))
  assert parse(["--dtype", "bfloat16"]).dtype == "bfloat16"
  assert parse([]).dtype == "float32"
  out = tmp_path / "out"
  with pytest.raises(SystemExit) as exc:
    sys.exit(cli.main(["--dtype", "float16", "--out", str(out), "--no-progress"]))
  assert exc.value.code == 2
  lines = [l for l in capsys.readouterr().err.strip().splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "float16" in lines[0] and "bfloat16" in lines[0], lines
  assert not out.exists()
  # a config file bypasses argparse's choices; Config.validate still refuses the value
  config = tmp_path / "c.json"
  config.write_text('{"dtype": "fp8"}')
  assert cli.main(["--config", str(config), "--out", str(out), "--no-progress"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error:") and "fp8" in err[0], err
  assert not out.exists()


def test_resume_of_a_checkpoint_written_before_the_dtype_field():
  saved = Config().to_dict()
  del saved["dtype"]
  assert Config().resume_mismatch(saved) == []
  assert Config(dtype="bfloat16").resume_mismatch(saved) == ["dtype: 'float32' → 'bfloat16'"]


def test_runner_builds_the_bf16_model():
  config = Config(model="dnn", dtype="bfloat16", num_clients=4, global_rounds=1,
                  progress=False)
  model = build(config)[1]
  assert model == make_model("dnn", (28, 28, 1), 10, dtype="bfloat16")


@pytest.fixture(scope="module")
def data():
  return _small_data(num_clients=4, seed=2)


def _spec():
  # two local steps keep the compilations small; the point is dtypes and finiteness
  return LocalSpec(learning_rate=0.1, batch_size=4, local_epochs=1, steps_per_epoch=2,
                   unroll=1)


def _assert_finite(tree):
  for leaf in jax.tree.leaves(tree):
    assert np.all(np.isfinite(np.asarray(leaf, np.float64)))


def _one_round(name, data):
  """One round of ``name``'s contract for one client, as a function of a key.

  init, the warm-up period (FedDBE), client_update, server_update, every evaluation view and
  the final views (FedBABU), with the bf16 model: a dtype clash between bf16 features and
  float32 parameters fails while tracing it.
  """
  params = ({"fine_tuning_epochs": 1} if name == "FedBABU" else suite_params(name) or {})
  if name == "FedKTL":  # generates images: image-shaped samples
    data = as_images(data)
  model = make_model("dnn", data.sample_shape, data.num_classes, dtype="bfloat16")
  algorithm = make_algorithm(name, model, _spec(), params)
  x, y = jnp.asarray(data.x), jnp.asarray(data.y)
  client_data = ClientData(x, y, jnp.asarray(data.train_idx[0]),
                           jnp.asarray(data.train_count[0]))
  test_x = x[jnp.asarray(data.test_idx[0][:4])]
  stack = lambda tree: jax.tree.map(lambda a: a[None], tree)

  def one_round(key):
    server, clients = algorithm.init(key, x[0], 2)
    init_states = (server, clients)
    client = jax.tree.map(lambda a: a[0], clients)
    if has_warmup(algorithm):
      client, upload = algorithm.warmup_client(server, client, client_data, key)
      server = algorithm.warmup_server(server, stack(upload), jnp.ones(1), key)
    client, upload, stats = algorithm.client_update(server, client, client_data, key)
    server = algorithm.server_update(server, stack(upload), jnp.ones(1), key)
    views = dict(algorithm.eval_views(server, client, client_data, key))
    if has_hook(algorithm, "final_views"):
      views.update({f"final{k}": v for k, v in
                    algorithm.final_views(server, client, client_data, key).items()})
    logits = {k: view(test_x) for k, view in views.items()}
    return init_states, (server, client), stats, logits

  return one_round


# Algorithms per compiled program: one program for all 45 took 99 s to compile, one per
# algorithm 72 s, chunks of 4 61 s (2026-12-03, 2-core VM in a slow phase; later that evening
# this file took 51.6 s with one program, 34.3 s with chunks of 4); chunks also let each test
# worker compile only the chunks of the algorithms it runs.
_CHUNK = 4


@pytest.fixture(scope="module")
def bf16_rounds(data):
  """``name -> (init_states, states, stats, logits)``, compiling a chunk of rounds on demand."""
  names = algorithm_names()
  chunks = [tuple(names[i:i + _CHUNK]) for i in range(0, len(names), _CHUNK)]
  results = {}

  def run_chunk(chunk):
    rounds = {name: _one_round(name, data) for name in chunk}

    def chunk_rounds(key):
      out = {}
      for name, one_round in rounds.items():
        try:
          out[name] = one_round(key)
        except Exception as e:  # name the algorithm that cannot be traced in bf16
          raise AssertionError(f"{name} fails with the bfloat16 model: {e}") from e
      return out

    results.update(jax.jit(chunk_rounds)(rng.root_key(0)))

  def get(name):
    if name not in results:
      run_chunk(next(c for c in chunks if name in c))
    return results[name]

  return get


@pytest.mark.parametrize("name", algorithm_names())
def test_every_algorithm_trains_and_evaluates_in_bf16(name, bf16_rounds):
  init_states, states, stats, logits = bf16_rounds(name)
  # master weights and every algorithm-side state stay float32
  assert _floating_dtypes(init_states) == _floating_dtypes(states) == {"float32"}
  assert {str(v.dtype) for v in logits.values()} == {"float32"}
  _assert_finite((states, stats, logits))


def test_engine_round_and_evaluation_in_bf16(data):
  """A vmapped FedAvg round (aggregation included) and the Engine's evaluation metrics."""
  model = make_model("dnn", data.sample_shape, data.num_classes, dtype="bfloat16")
  eng = engine_lib.Engine(make_algorithm("FedAvg", model, _spec()),
                          engine_lib.DeviceData.from_federated(data),
                          engine_lib.Participation(data.num_clients), executor="vmap")
  root = rng.root_key(0)
  server, clients = eng.init(root, data.x[0])
  server, clients, metrics = eng.run_round(server, clients, root, 0)
  assert _floating_dtypes((server, clients)) == {"float32"}
  _assert_finite((server, clients, metrics))
  summary = eng.evaluate(server, clients, root, 1)
  keys = [k for k in summary if k.startswith(("test_", "train_")) and k != "client_test_acc"]
  assert "test_auc" in keys and np.isfinite([summary[k] for k in keys]).all(), summary
