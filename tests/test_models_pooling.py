"""Tests for the common feature width of heterogeneous models (fedjax_lib.models.pooling)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lib.errors import ConfigError
from fedjax_lib.models import (AdaptiveAvgPool1d, BaseHeadModel, DNN, FedAvgCNN,
                               adaptive_avg_pool1d, adaptive_avg_pool_bins,
                               adaptive_avg_pool_matrix, architecture_of_clients, feature_dim,
                               init_model, make_model, merge_params, parse_model_names,
                               split_params)

IMAGE = (16, 16, 1)  # The smallest input the CNN accepts.


def _reference_pool(x: np.ndarray, out_dim: int) -> np.ndarray:
  """PyTorch's adaptive_avg_pool1d over the last axis, one bin at a time (float64)."""
  in_dim = x.shape[-1]
  out = np.empty((*x.shape[:-1], out_dim))
  for j in range(out_dim):
    start = int(np.floor(j * in_dim / out_dim))
    end = int(np.ceil((j + 1) * in_dim / out_dim))
    out[..., j] = x[..., start:end].mean(axis=-1)
  return out


def _reference_bins(in_dim, out_dim):
  return [(j * in_dim // out_dim, -(-(j + 1) * in_dim // out_dim)) for j in range(out_dim)]


# ---------------------------------------------------------------------------------------
# The pooling matrix.


@pytest.mark.parametrize('in_dim', [64, 100, 512, 768, 1024, 1280, 2048])
@pytest.mark.parametrize('out_dim', [512, 100, 10, 3])
def test_matrix_matches_reference_bins(in_dim, out_dim):
  rng = np.random.default_rng(in_dim * 1000 + out_dim)
  x = rng.normal(size=(3, in_dim)).astype(np.float32)
  matrix = adaptive_avg_pool_matrix(in_dim, out_dim)
  assert matrix.shape == (in_dim, out_dim)
  assert matrix.dtype == np.float32
  np.testing.assert_allclose(matrix.astype(np.float64).sum(axis=0), 1.0, rtol=1e-6)
  expected = _reference_pool(x.astype(np.float64), out_dim)
  np.testing.assert_allclose(x.astype(np.float64) @ matrix, expected, rtol=1e-6, atol=1e-6)
  pooled = np.asarray(AdaptiveAvgPool1d(out_dim).apply({}, jnp.asarray(x)))
  assert pooled.dtype == np.float32
  np.testing.assert_allclose(pooled, expected, rtol=1e-6, atol=1e-6)


def test_bins_use_exact_integer_arithmetic():
  for in_dim, out_dim in [(5, 3), (3, 5), (7, 7), (1, 4), (2048, 512), (1280, 512), (100, 512),
                          (10**6 + 3, 7)]:
    starts, ends = adaptive_avg_pool_bins(in_dim, out_dim)
    assert list(zip(starts.tolist(), ends.tolist())) == _reference_bins(in_dim, out_dim)
    assert np.all(ends > starts)
    assert starts[0] == 0 and ends[-1] == in_dim


def test_small_case_by_hand():
  # D=5, F=3: bins [0, 2), [1, 4), [3, 5); input 1 and 3 are shared by two bins.
  expected = np.array([[1 / 2, 0, 0],
                       [1 / 2, 1 / 3, 0],
                       [0, 1 / 3, 0],
                       [0, 1 / 3, 1 / 2],
                       [0, 0, 1 / 2]], np.float32)
  np.testing.assert_array_equal(adaptive_avg_pool_matrix(5, 3), expected)
  x = jnp.array([[1.0, 2.0, 3.0, 4.0, 5.0]])
  np.testing.assert_allclose(AdaptiveAvgPool1d(3).apply({}, x), [[1.5, 3.0, 4.5]], rtol=1e-6)


def test_fewer_inputs_than_outputs_replicates():
  # D=3, F=5: bins [0, 1), [0, 2), [1, 2), [1, 3), [2, 3).
  starts, ends = adaptive_avg_pool_bins(3, 5)
  assert starts.tolist() == [0, 0, 1, 1, 2]
  assert ends.tolist() == [1, 2, 2, 3, 3]
  x = jnp.array([[2.0, 4.0, 8.0], [1.0, 1.0, 1.0]])
  np.testing.assert_allclose(AdaptiveAvgPool1d(5).apply({}, x),
                             [[2.0, 3.0, 4.0, 6.0, 8.0], [1.0] * 5], rtol=1e-6)


def test_pool_applies_to_the_last_axis_of_any_rank():
  x = np.random.default_rng(0).normal(size=(2, 3, 10)).astype(np.float32)
  pooled = adaptive_avg_pool1d(jnp.asarray(x), 4)
  assert pooled.shape == (2, 3, 4)
  np.testing.assert_allclose(pooled, _reference_pool(x.astype(np.float64), 4), rtol=1e-6,
                             atol=1e-6)


def test_matrix_is_a_fresh_copy():
  matrix = adaptive_avg_pool_matrix(6, 4)
  matrix[:] = 0.0
  assert adaptive_avg_pool_matrix(6, 4).sum() == pytest.approx(4.0)


@pytest.mark.parametrize('in_dim, out_dim', [(64, 512), (100, 10), (768, 512), (5, 3), (3, 5)])
def test_matches_torch_when_available(in_dim, out_dim):
  torch = pytest.importorskip('torch')
  x = np.random.default_rng(1).normal(size=(2, in_dim)).astype(np.float32)
  expected = torch.nn.functional.adaptive_avg_pool1d(torch.from_numpy(x)[:, None, :], out_dim)
  np.testing.assert_allclose(AdaptiveAvgPool1d(out_dim).apply({}, jnp.asarray(x)),
                             expected[:, 0, :].numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('args, match', [
    ((0, 3), r'in_dim must be a positive integer, got 0'),
    ((5, -1), r'out_dim must be a positive integer, got -1'),
    ((5, 2.5), r'out_dim .* got 2\.5'),
    ((True, 3), r'in_dim .* got True'),
])
def test_matrix_rejects_bad_sizes(args, match):
  with pytest.raises(ConfigError, match=match):
    adaptive_avg_pool_matrix(*args)


# ---------------------------------------------------------------------------------------
# Identity and dtypes.


def test_identity_when_widths_match_is_bit_exact_and_has_no_matmul():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 7))
  assert adaptive_avg_pool1d(x, 7) is x
  np.testing.assert_array_equal(AdaptiveAvgPool1d(7).apply({}, x), x)
  jaxpr = str(jax.make_jaxpr(lambda x: AdaptiveAvgPool1d(7).apply({}, x))(x))
  assert 'dot_general' not in jaxpr
  jaxpr = str(jax.make_jaxpr(lambda x: AdaptiveAvgPool1d(5).apply({}, x))(x))
  assert 'dot_general' in jaxpr
  assert AdaptiveAvgPool1d(7).init(jax.random.PRNGKey(0), x) == {}  # No parameters.


def test_bfloat16_pool_averages_in_float32_and_returns_the_compute_dtype():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 9)), jnp.bfloat16)
  expected = _reference_pool(np.asarray(x, np.float64), 6)
  pooled = AdaptiveAvgPool1d(6, dtype=jnp.bfloat16).apply({}, x)
  assert pooled.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(pooled, np.float64), expected, rtol=2 ** -8)
  np.testing.assert_array_equal(np.asarray(pooled), np.asarray(expected.astype(jnp.bfloat16)))
  assert AdaptiveAvgPool1d(6).apply({}, x).dtype == jnp.bfloat16  # None: the input's dtype.
  assert AdaptiveAvgPool1d(6, dtype=jnp.bfloat16).apply({}, x.astype(jnp.float32)).dtype == (
      jnp.bfloat16)


# ---------------------------------------------------------------------------------------
# make_model(..., feature_dim=...).


def _init(model, sample_shape, seed=0):
  return init_model(model, jax.random.PRNGKey(seed), sample_shape)


def _assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize('name, direct', [
    ('cnn', lambda: FedAvgCNN(10)), ('dnn', lambda: DNN(10)),
])
def test_feature_dim_none_is_todays_model(name, direct):
  model = make_model(name, IMAGE, 10, feature_dim=None)
  assert model == make_model(name, IMAGE, 10) == direct()
  assert model.feature_dim is None
  variables = _init(model, IMAGE)
  _assert_trees_equal(variables, _init(direct(), IMAGE))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, *IMAGE))
  np.testing.assert_array_equal(model.apply(variables, x), direct().apply(variables, x))
  # The features are the raw base's output, untouched.
  base, _ = split_params(variables)
  np.testing.assert_array_equal(model.apply(variables, x, method='features'),
                                model.base.apply({'params': base}, x))


def test_feature_dim_equal_to_base_width_is_the_identity():
  plain = make_model('dnn', IMAGE, 10, hidden_dim=32)
  pooled = make_model('dnn', IMAGE, 10, hidden_dim=32, feature_dim=32)
  variables = _init(plain, IMAGE)
  _assert_trees_equal(_init(pooled, IMAGE), variables)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, *IMAGE))
  np.testing.assert_array_equal(pooled.apply(variables, x), plain.apply(variables, x))
  # With another width only the head changes: the base's parameters are drawn unchanged.
  other = _init(make_model('dnn', IMAGE, 10, hidden_dim=32, feature_dim=7), IMAGE)
  _assert_trees_equal(split_params(other)[0], split_params(variables)[0])
  assert split_params(other)[1]['kernel'].shape == (7, 10)


def _abstract_init(model, sample_shape):
  return jax.eval_shape(lambda: _init(model, sample_shape))


def _numpy_variables(abstract_variables, seed=0):
  """Concrete variables drawn with numpy (skips compiling JAX's PRNG for new shapes)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.uniform(-0.1, 0.1, s.shape), jnp.float32), abstract_variables)


@pytest.mark.parametrize('name', ('cnn', 'dnn', 'mlr'))  # the zoo: test_models_htfl_zoo.py
def test_heads_of_all_architectures_share_shapes(name):
  model = make_model(name, IMAGE, 10, feature_dim=512)
  assert isinstance(model, BaseHeadModel) and model.feature_dim == 512
  abstract = _abstract_init(model, IMAGE)
  # The layout and the base's shapes are those of the unpooled model.
  unpooled = _abstract_init(make_model(name, IMAGE, 10), IMAGE)
  assert (jax.tree_util.tree_structure(split_params(abstract)[0])
          == jax.tree_util.tree_structure(split_params(unpooled)[0]))
  assert (jax.tree_util.tree_leaves(split_params(abstract)[0])
          == jax.tree_util.tree_leaves(split_params(unpooled)[0]))
  variables = _numpy_variables(abstract)
  base, head = split_params(variables)
  assert set(variables['params']) == ({'head'} if name == 'mlr' else {'base', 'head'})
  assert head['kernel'].shape == (512, 10) and head['bias'].shape == (10,)
  assert feature_dim(model, IMAGE) == 512
  x = jax.random.normal(jax.random.PRNGKey(1), (3, *IMAGE))
  z = model.apply(variables, x, method='features')
  assert z.shape == (3, 512)
  raw = np.asarray(model.base.apply({'params': base} if base else {}, x), np.float64)
  np.testing.assert_allclose(z, _reference_pool(raw, 512), rtol=1e-5, atol=1e-6)
  logits = model.apply(variables, x)
  assert logits.shape == (3, 10)
  np.testing.assert_allclose(model.apply(variables, z, method='classify'), logits, rtol=1e-6,
                             atol=1e-6)
  assert merge_params(base, head) == variables


def test_heads_are_interchangeable_between_architectures():
  mlr_model = make_model('mlr', IMAGE, 10, feature_dim=48)  # 256 inputs pooled to 48.
  dnn_model = make_model('dnn', IMAGE, 10, feature_dim=48)  # 100 hidden units pooled to 48.
  mlr_base, mlr_head = split_params(_init(mlr_model, IMAGE, seed=0))
  dnn_base, dnn_head = split_params(_init(dnn_model, IMAGE, seed=1))
  assert jax.tree_util.tree_map(jnp.shape, mlr_head) == jax.tree_util.tree_map(jnp.shape,
                                                                               dnn_head)
  x = jax.random.normal(jax.random.PRNGKey(2), (2, *IMAGE))
  # The DNN runs with the MLR's head, and that head is really used.
  swapped = dnn_model.apply(merge_params(dnn_base, mlr_head), x)
  z = dnn_model.apply(merge_params(dnn_base, dnn_head), x, method='features')
  expected = z @ mlr_head['kernel'] + mlr_head['bias']
  np.testing.assert_allclose(swapped, expected, rtol=1e-5, atol=1e-6)
  averaged_head = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, mlr_head, dnn_head)
  assert mlr_model.apply(merge_params(mlr_base, averaged_head), x).shape == (2, 10)


def test_gradients_flow_through_the_pool_to_the_base():
  model = make_model('dnn', IMAGE, 10, hidden_dim=20, feature_dim=7)
  variables = _init(model, IMAGE)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, *IMAGE))
  grads = jax.grad(lambda v: model.apply(v, x).sum())(variables)
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(variables)
  assert np.abs(grads['params']['base']['fc1']['kernel']).sum() > 0
  assert grads['params']['head']['kernel'].shape == (7, 10)


def test_bfloat16_pooled_model_returns_float32():
  model = make_model('dnn', IMAGE, 10, dtype='bfloat16', feature_dim=40)
  f32_model = make_model('dnn', IMAGE, 10, feature_dim=40)
  variables = _init(f32_model, IMAGE)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, *IMAGE))
  z = model.apply(variables, x, method='features')
  logits = model.apply(variables, x)
  assert z.dtype == jnp.float32 and z.shape == (2, 40)
  assert logits.dtype == jnp.float32 and logits.shape == (2, 10)
  np.testing.assert_allclose(z, f32_model.apply(variables, x, method='features'), rtol=0.05,
                             atol=0.05)
  np.testing.assert_array_equal(model.apply(variables, z, method='classify'), logits)


@pytest.mark.parametrize('name', ('cnn', 'dnn', 'mlr'))  # the zoo: test_models_htfl_zoo.py
def test_bfloat16_pooled_model_shapes_and_dtypes(name):
  model = make_model(name, IMAGE, 10, dtype='bfloat16', hidden_dim=64, feature_dim=512) if (
      name != 'mlr') else make_model(name, IMAGE, 10, dtype='bfloat16', feature_dim=512)
  variables = jax.eval_shape(lambda: _init(model, IMAGE))
  assert variables['params']['head']['kernel'].dtype == jnp.float32
  x = jax.ShapeDtypeStruct((2, *IMAGE), jnp.float32)
  z = jax.eval_shape(lambda v, x: model.apply(v, x, method='features'), variables, x)
  logits = jax.eval_shape(model.apply, variables, x)
  assert (z.shape, z.dtype) == ((2, 512), jnp.float32)
  assert (logits.shape, logits.dtype) == ((2, 10), jnp.float32)


def test_vmapped_over_stacked_clients():
  model = make_model('dnn', IMAGE, 10, hidden_dim=12, feature_dim=5)
  stacked = jax.tree_util.tree_map(lambda *l: jnp.stack(l),
                                   *[_init(model, IMAGE, seed=s) for s in range(3)])
  xs = jax.random.normal(jax.random.PRNGKey(1), (3, 2, *IMAGE))
  out = jax.jit(jax.vmap(model.apply))(stacked, xs)
  assert out.shape == (3, 2, 10)
  single = model.apply(jax.tree_util.tree_map(lambda l: l[1], stacked), xs[1])
  np.testing.assert_allclose(out[1], single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('bad', [0, -3, 2.5, True, '512', 512.0])
def test_make_model_rejects_bad_feature_dim(bad):
  with pytest.raises(ConfigError, match=r'feature_dim must be a positive integer') as info:
    make_model('dnn', IMAGE, 10, feature_dim=bad)
  assert repr(bad) in str(info.value)
  assert '\n' not in str(info.value)


def test_make_model_accepts_numpy_feature_dim():
  assert make_model('dnn', IMAGE, 10, feature_dim=np.int64(16)) == make_model(
      'dnn', IMAGE, 10, feature_dim=16)


# ---------------------------------------------------------------------------------------
# Names of heterogeneous models.


@pytest.mark.parametrize('spec, expected', [
    ('cnn', ('cnn',)),
    ('CNN', ('cnn',)),
    ('cnn,dnn', ('cnn', 'dnn')),
    ('CNN, DNN', ('cnn', 'dnn')),
    ('FedAvgCNN,mlr', ('cnn', 'mlr')),
    (' cnn , cnn,DNN ', ('cnn', 'cnn', 'dnn')),
    ('mclr_logistic', ('mlr',)),
    (['Cnn', 'dnn'], ('cnn', 'dnn')),
    (('mlr',), ('mlr',)),
])
def test_parse_model_names(spec, expected):
  assert parse_model_names(spec) == expected


@pytest.mark.parametrize('spec, match', [
    ('cnn,,dnn', r"empty model name in 'cnn,,dnn'"),
    ('cnn,', r"empty model name in 'cnn,'"),
    ('', r"empty model name in ''"),
    ('  ', r"empty model name in '  '"),
    ('cnn,resnet7', r"unknown model 'resnet7' in 'cnn,resnet7'"),
    (['cnn', 7], r'unknown model 7'),
    ([], r'model names must be a string of comma-separated names, got \[\]'),
    (None, r'model names must be .* got None'),
])
def test_parse_model_names_errors(spec, match):
  with pytest.raises(ConfigError, match=match) as info:
    parse_model_names(spec)
  message = str(info.value)
  assert 'cnn, dnn, mlr' in message and 'fedavgcnn' in message
  assert '\n' not in message


def test_architecture_of_clients_follows_htfllib():
  assert architecture_of_clients(('cnn', 'dnn'), 5) == ['cnn', 'dnn', 'cnn', 'dnn', 'cnn']
  assert architecture_of_clients(('cnn', 'cnn', 'dnn'), 6) == ['cnn', 'cnn', 'dnn'] * 2
  assert architecture_of_clients(('dnn',), 3) == ['dnn'] * 3
  assert architecture_of_clients(('mlr', 'cnn', 'dnn'), 2) == ['mlr', 'cnn']
  assert architecture_of_clients('CNN, mlr', np.int64(3)) == ['cnn', 'mlr', 'cnn']
  assert architecture_of_clients(parse_model_names('FedAvgCNN,dnn'), 2) == ['cnn', 'dnn']


@pytest.mark.parametrize('names, num_clients, match', [
    (('cnn',), 0, r'num_clients must be a positive integer, got 0'),
    (('cnn',), 2.0, r'num_clients .* got 2\.0'),
    (('cnn',), True, r'num_clients .* got True'),
    ((), 3, r'model names must be .* got \(\)'),
    (('cnn', 'vgg'), 3, r"unknown model 'vgg'"),
])
def test_architecture_of_clients_errors(names, num_clients, match):
  with pytest.raises(ConfigError, match=match):
    architecture_of_clients(names, num_clients)
