"""Tests for the model zoo (fedjax_lib.models)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lib.errors import ConfigError
from fedjax_lib.models import (BaseHeadModel, FedAvgCNN, TorchConv, count_params,
                               feature_dim, init_model, make_model, merge_params, split_params,
                               torch_fc1_permutation)
from fedjax_lib.models import cnn
from tests.helpers import traced_eqns

# PFLlib's models; HtFLlib's zoo has its own tests (tests/test_models_resnet.py,
# tests/test_models_htfl_zoo.py), which trace its large models instead of compiling them.
PFLLIB_MODELS = ('cnn', 'dnn', 'mlr')

MNIST = (28, 28, 1)
CIFAR = (32, 32, 3)


def _batch(key, sample_shape, n=4):
  return jax.random.normal(key, (n, *sample_shape))


def _abstract_variables(model, sample_shape):
  return jax.eval_shape(lambda: init_model(model, jax.random.PRNGKey(0), sample_shape))


def _numpy_variables(abstract_variables, seed=0):
  """Concrete variables drawn with numpy (skips compiling JAX's PRNG for new shapes)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.uniform(-0.1, 0.1, s.shape), jnp.float32), abstract_variables)


@pytest.mark.parametrize('name, sample_shape, num_classes, expected', [
    ('CNN', MNIST, 10, 582_026),
    ('CNN', CIFAR, 10, 878_538),
    ('CNN', CIFAR, 100, 924_708),
    ('DNN', MNIST, 10, 79_510),
    ('DNN', (784,), 10, 79_510),
    ('MLR', MNIST, 10, 7_850),
    ('MLR', (784,), 10, 7_850),
])
def test_parameter_counts_match_pfllib(name, sample_shape, num_classes, expected):
  model = make_model(name, sample_shape, num_classes)
  assert count_params(_abstract_variables(model, sample_shape)) == expected


def test_count_params_on_concrete_variables():
  model = make_model('mlr', MNIST, 10)
  assert count_params(init_model(model, jax.random.PRNGKey(0), MNIST)) == 7_850


@pytest.mark.parametrize('name, features', [('cnn', 512), ('dnn', 100), ('mlr', 784)])
def test_output_and_feature_shapes(name, features):
  model = make_model(name, MNIST, 10)
  variables = init_model(model, jax.random.PRNGKey(0), MNIST)
  x = _batch(jax.random.PRNGKey(1), MNIST, n=3)
  assert model.apply(variables, x).shape == (3, 10)
  assert model.apply(variables, x, method='features').shape == (3, features)
  assert feature_dim(model, MNIST) == features


@pytest.mark.parametrize('name, sample_shape, features', [
    ('cnn', CIFAR, 512), ('cnn', (64, 48, 3), 512), ('dnn', CIFAR, 100), ('mlr', CIFAR, 3072),
])
def test_output_and_feature_shapes_abstract(name, sample_shape, features):
  model = make_model(name, sample_shape, 100)
  variables = _abstract_variables(model, sample_shape)
  x = jax.ShapeDtypeStruct((3, *sample_shape), jnp.float32)
  assert jax.eval_shape(model.apply, variables, x).shape == (3, 100)
  features_fn = lambda v, x: model.apply(v, x, method='features')
  assert jax.eval_shape(features_fn, variables, x).shape == (3, features)


@pytest.mark.parametrize('name, sample_shape', [('cnn', MNIST), ('dnn', MNIST), ('mlr', MNIST)])
def test_head_of_features_equals_forward(name, sample_shape):
  model = make_model(name, sample_shape, 10)
  variables = init_model(model, jax.random.PRNGKey(0), sample_shape)
  x = _batch(jax.random.PRNGKey(1), sample_shape)
  z = model.apply(variables, x, method='features')
  composed = model.apply(variables, z, method='classify')
  np.testing.assert_allclose(composed, model.apply(variables, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('name', PFLLIB_MODELS)
def test_split_merge_round_trip(name):
  model = make_model(name, MNIST, 10)
  variables = init_model(model, jax.random.PRNGKey(0), MNIST)
  base, head = split_params(variables)
  assert set(head) == {'kernel', 'bias'}
  if name == 'mlr':
    assert base == {}  # Identity features: no base parameters.
  else:
    assert 'fc1' in base
  merged = merge_params(base, head)
  assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(variables)
  for a, b in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(variables)):
    assert a is b
  # A different head is really used by the forward pass.
  other_head = jax.tree_util.tree_map(jnp.zeros_like, head)
  logits = model.apply(merge_params(base, other_head), _batch(jax.random.PRNGKey(1), MNIST))
  np.testing.assert_array_equal(logits, 0.0)


def _fan_in(kernel):
  return int(np.prod(kernel.shape[:-1]))  # Dense (in, out); conv HWIO (kh, kw, in, out).


@pytest.mark.parametrize('name, sample_shape', [('cnn', MNIST), ('dnn', MNIST)])
def test_init_matches_pytorch_default_distribution(name, sample_shape):
  model = make_model(name, sample_shape, 10)
  variables = init_model(model, jax.random.PRNGKey(0), sample_shape)
  base, head = split_params(variables)
  layers = dict(base, head=head)
  for layer_name, layer in layers.items():
    bound = 1.0 / np.sqrt(_fan_in(layer['kernel']))
    for leaf in ('kernel', 'bias'):
      values = np.asarray(layer[leaf])
      assert np.all(np.abs(values) <= bound), (layer_name, leaf)
      assert np.abs(values).max() > 0.8 * bound, (layer_name, leaf)  # Uses the full range.
  fc1 = np.asarray(base['fc1']['kernel'])
  bound = 1.0 / np.sqrt(fc1.shape[0])
  assert fc1.std() == pytest.approx(bound / np.sqrt(3.0), rel=0.02)
  assert abs(fc1.mean()) < 0.02 * bound


def test_init_differs_across_keys_and_layers():
  model = make_model('cnn', MNIST, 10)
  v0 = init_model(model, jax.random.PRNGKey(0), MNIST)
  v1 = init_model(model, jax.random.PRNGKey(1), MNIST)
  assert not np.allclose(v0['params']['head']['kernel'], v1['params']['head']['kernel'])
  assert np.any(v0['params']['base']['conv1']['bias'] != 0.0)


def test_patches_conv_equals_lax_conv():
  lax_model = FedAvgCNN(10, conv_impl='lax')
  patch_model = FedAvgCNN(10, conv_impl='patches')
  variables = init_model(lax_model, jax.random.PRNGKey(0), MNIST)
  x = _batch(jax.random.PRNGKey(1), MNIST, n=5)
  np.testing.assert_allclose(patch_model.apply(variables, x), lax_model.apply(variables, x),
                             rtol=1e-4, atol=1e-5)


def test_torch_conv_patches_with_stride_and_padding():
  x = _batch(jax.random.PRNGKey(1), (9, 11, 3), n=2)
  lax_conv = TorchConv(4, (3, 2), strides=2, padding='SAME')
  variables = _numpy_variables(jax.eval_shape(lax_conv.init, jax.random.PRNGKey(0), x))
  patch_conv = TorchConv(4, (3, 2), strides=2, padding='SAME', conv_impl='patches')
  np.testing.assert_allclose(patch_conv.apply(variables, x), lax_conv.apply(variables, x),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel,strides,padding", [
    ((3, 2), 2, 'SAME'), (7, 2, ((3, 3), (3, 3))), (1, 2, 'VALID'), ((5, 5), 1, 'VALID')])
@pytest.mark.parametrize("impl", ['slices', 'hybrid'])
def test_slices_and_hybrid_convs_equal_lax_values_and_gradients(impl, kernel, strides,
                                                                 padding):
  x = _batch(jax.random.PRNGKey(1), (9, 11, 3), n=2)
  lax_conv = TorchConv(4, kernel, strides=strides, padding=padding, conv_impl='lax')
  variables = _numpy_variables(jax.eval_shape(lax_conv.init, jax.random.PRNGKey(0), x))
  conv = TorchConv(4, kernel, strides=strides, padding=padding, conv_impl=impl)
  np.testing.assert_allclose(conv.apply(variables, x), lax_conv.apply(variables, x),
                             rtol=1e-5, atol=1e-5)
  loss = lambda m: lambda v, x: jnp.sum(jnp.sin(m.apply(v, x)))
  got = jax.grad(loss(conv), argnums=(0, 1))(variables, x)
  want = jax.grad(loss(lax_conv), argnums=(0, 1))(variables, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)


@pytest.mark.parametrize("features,kernel,strides,padding", [
    (32, 5, 1, 'VALID'), (17, 3, 2, 'SAME'), (24, (3, 2), 1, ((1, 0), (2, 1)))])
def test_hybrid_conv_with_a_zero_input_channel_equals_lax(features, kernel, strides, padding):
  """On XLA:CPU 3 -> 17..32 channel convolutions run forward with a zero fourth input
  channel (`pads_input_channels`); values and gradients stay lax's."""
  from fedjax_lib.models.layers import pads_input_channels
  x = _batch(jax.random.PRNGKey(4), (12, 13, 3), n=20)
  lax_conv = TorchConv(features, kernel, strides=strides, padding=padding, conv_impl='lax')
  variables = _numpy_variables(jax.eval_shape(lax_conv.init, jax.random.PRNGKey(0), x))
  conv = TorchConv(features, kernel, strides=strides, padding=padding, conv_impl='hybrid')
  convs = [e for e in traced_eqns(conv.apply, variables, x)
           if e.primitive.name == 'conv_general_dilated']
  padded = jax.default_backend() == 'cpu'
  assert pads_input_channels(3, features) == padded
  assert [e.invars[0].aval.shape[-1] for e in convs] == [4 if padded else 3]
  np.testing.assert_allclose(conv.apply(variables, x), lax_conv.apply(variables, x),
                             rtol=1e-5, atol=1e-5)
  loss = lambda m: lambda v, x: jnp.sum(jnp.tanh(m.apply(v, x) / 10))
  got = jax.grad(loss(conv), argnums=(0, 1))(variables, x)
  want = jax.grad(loss(lax_conv), argnums=(0, 1))(variables, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)


def test_zero_input_channel_rule_bounds():
  from fedjax_lib.models.layers import pads_input_channels
  cpu = jax.default_backend() == 'cpu'
  for out, want in ((16, False), (17, cpu), (32, cpu), (33, False), (64, False)):
    assert pads_input_channels(3, out) == want, out
  assert not pads_input_channels(1, 32) and not pads_input_channels(4, 32)


def test_slices_conv_second_order_gradients_equal_lax():
  """The patch matmul's custom VJP is differentiable again (DLG, Per-FedAvg's HF variant
  differentiate through gradients): grad of a function of the parameter gradient."""
  x = _batch(jax.random.PRNGKey(3), (9, 11, 3), n=2)
  convs = {impl: TorchConv(4, 3, strides=1, padding='SAME', conv_impl=impl)
           for impl in ('lax', 'slices')}
  variables = _numpy_variables(jax.eval_shape(convs['lax'].init, jax.random.PRNGKey(0), x))

  def outer(impl):
    def inner(v, x):
      return jnp.sum(jnp.tanh(convs[impl].apply(v, x)))
    def gradient_norm(x):
      g = jax.grad(inner)(variables, x)
      return sum(jnp.sum(leaf ** 2) for leaf in jax.tree.leaves(g))
    return jax.grad(gradient_norm)(x)

  np.testing.assert_allclose(outer('slices'), outer('lax'), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window,strides,padding", [
    ((3, 2), (2, 1), 'SAME'), ((5, 5), (1, 1), 'VALID'), ((1, 1), (2, 2), 'VALID'),
    ((4, 3), (3, 2), ((2, 1), (0, 3)))])
def test_im2col_copies_every_window_in_kh_kw_c_order(window, strides, padding):
  from fedjax_lib.models.layers import _im2col
  x = np.asarray(_batch(jax.random.PRNGKey(2), (9, 11, 3), n=2))
  (kh, kw), (sh, sw) = window, strides
  pads = (jax.lax.padtype_to_pads(x.shape[1:3], window, strides, padding)
          if isinstance(padding, str) else padding)
  xp = np.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
  out_h, out_w = (xp.shape[1] - kh) // sh + 1, (xp.shape[2] - kw) // sw + 1
  want = np.stack([np.stack([xp[:, a * sh:a * sh + kh, b * sw:b * sw + kw, :].reshape(2, -1)
                             for b in range(out_w)], axis=1) for a in range(out_h)], axis=1)
  got = np.asarray(jax.jit(lambda v: _im2col(v, window, strides, padding))(x))
  assert got.shape == (2, out_h, out_w, kh * kw * 3)
  np.testing.assert_array_equal(got, want)


def test_auto_conv_impl_per_backend_group_count_and_batch():
  from fedjax_lib.models.layers import (SLICES_MAX_BATCH, SLICES_MAX_OUTPUT_AREA,
                                        resolve_conv_impl)
  assert resolve_conv_impl('lax', 1, 4) == 'lax'
  assert resolve_conv_impl('auto', 4, 4) == 'lax'  # grouped, not depthwise: only lax
  if jax.default_backend() == 'cpu':
    assert resolve_conv_impl('auto', 1, SLICES_MAX_BATCH) == 'slices'
    assert resolve_conv_impl('auto', 1, SLICES_MAX_BATCH + 1) == 'hybrid'
    assert resolve_conv_impl('auto', 1, SLICES_MAX_BATCH + 1, 16) == 'hybrid'
    # XLA:CPU's convolution is slow on tiny output maps, at any batch size.
    assert resolve_conv_impl('auto', 1, 100, SLICES_MAX_OUTPUT_AREA) == 'slices'
    assert resolve_conv_impl('auto', 4, 100, 16, depthwise=True) == 'slices'
  else:
    assert resolve_conv_impl('auto', 1, 4) == 'lax'
    assert resolve_conv_impl('auto', 4, 100, 4, depthwise=True) == 'lax'


@pytest.mark.parametrize("strides,padding", [(1, ((1, 1), (1, 1))), (2, ((1, 1), (1, 1))),
                                             (1, 'VALID')])
def test_depthwise_slices_conv_equals_lax_values_and_gradients(strides, padding):
  x = _batch(jax.random.PRNGKey(1), (7, 6, 5), n=3)
  def conv(impl):
    return TorchConv(5, 3, strides=strides, padding=padding, feature_group_count=5,
                     conv_impl=impl)
  variables = _numpy_variables(jax.eval_shape(conv('lax').init, jax.random.PRNGKey(0), x))
  np.testing.assert_allclose(conv('slices').apply(variables, x),
                             conv('lax').apply(variables, x), rtol=1e-5, atol=1e-5)
  loss = lambda m: lambda v, x: jnp.sum(jnp.sin(m.apply(v, x)))
  got = jax.grad(loss(conv('slices')), argnums=(0, 1))(variables, x)
  want = jax.grad(loss(conv('lax')), argnums=(0, 1))(variables, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)
  grouped = TorchConv(10, 3, padding=padding, feature_group_count=5, conv_impl='slices')
  with pytest.raises(ConfigError, match="'slices' implements depthwise"):
    grouped.init(jax.random.PRNGKey(0), x)


def test_patches_conv_equals_lax_conv_vmapped_over_stacked_params():
  lax_model = FedAvgCNN(10, conv_impl='lax')
  patch_model = FedAvgCNN(10, conv_impl='patches')
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  stacked = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves),
                                   *[init_model(lax_model, k, MNIST) for k in keys])
  xs = jax.random.normal(jax.random.PRNGKey(1), (3, 4, *MNIST))  # One batch per client.

  def forward(model):
    return jax.jit(jax.vmap(model.apply))(stacked, xs)

  out_lax, out_patches = forward(lax_model), forward(patch_model)
  assert out_lax.shape == (3, 4, 10)
  np.testing.assert_allclose(out_patches, out_lax, rtol=1e-4, atol=1e-5)
  # Clients really have different parameters.
  assert not np.allclose(out_lax[0], out_lax[1])
  # Vmapped equals one client at a time.
  single = lax_model.apply(jax.tree_util.tree_map(lambda l: l[2], stacked), xs[2])
  np.testing.assert_allclose(out_lax[2], single, rtol=1e-4, atol=1e-5)


def test_torch_fc1_permutation_maps_nchw_flatten_to_nhwc_flatten():
  rng = np.random.default_rng(0)
  h, w, c, out = 4, 3, 5, 6
  feature_map_nchw = rng.normal(size=(2, c, h, w))
  torch_weight = rng.normal(size=(out, c * h * w))  # PyTorch Linear layout (out, in).
  torch_out = feature_map_nchw.reshape(2, -1) @ torch_weight.T
  flax_kernel = torch_weight.T[torch_fc1_permutation(h, w, c)]
  flax_out = feature_map_nchw.transpose(0, 2, 3, 1).reshape(2, -1) @ flax_kernel
  np.testing.assert_allclose(flax_out, torch_out, rtol=1e-12)
  assert cnn.feature_map_shape(28, 28) == (4, 4, 64)
  assert cnn.feature_map_shape(32, 32) == (5, 5, 64)


@pytest.mark.parametrize('name', ['CNN', 'cnn', 'FedAvgCNN', ' Cnn ', 'DNN', 'dnn', 'MLR', 'Mlr'])
def test_names_are_case_insensitive(name):
  assert isinstance(make_model(name, MNIST, 10), BaseHeadModel)


def test_unknown_model_name():
  with pytest.raises(ConfigError, match=r"unknown model 'resnet7'; accepted names: cnn, dnn, mlr, resnet4"):
    make_model('resnet7', MNIST, 10)


@pytest.mark.parametrize('sample_shape, bad', [
    ((15, 28, 1), '(15, 28, 1)'), ((28, 12, 1), '(28, 12, 1)'), ((28, 28), '(28, 28)'),
    ((784,), '(784,)'),
])
def test_cnn_rejects_too_small_or_wrong_rank_shapes(sample_shape, bad):
  with pytest.raises(ConfigError, match=r'H, W >= 16') as info:
    make_model('cnn', sample_shape, 10)
  assert bad in str(info.value)
  assert "'cnn'" in str(info.value)


def test_cnn_minimum_shape_runs():
  model = make_model('cnn', (16, 16, 1), 10)
  variables = _numpy_variables(_abstract_variables(model, (16, 16, 1)))
  assert variables['params']['base']['fc1']['kernel'].shape == (64, 512)  # 1x1x64.
  assert model.apply(variables, jnp.ones((2, 16, 16, 1))).shape == (2, 10)


@pytest.mark.parametrize('kwargs, match', [
    (dict(sample_shape=(0, 28, 1), num_classes=10), r'sample_shape .* got \(0, 28, 1\)'),
    (dict(sample_shape=(), num_classes=10), r'sample_shape .* got \(\)'),
    (dict(sample_shape=MNIST, num_classes=1), r'num_classes must be an integer >= 2, got 1'),
    (dict(sample_shape=MNIST, num_classes=2.5), r'num_classes .* got 2\.5'),
    (dict(sample_shape=MNIST, num_classes=10, conv_impl='fft'),
     r"unknown conv_impl 'fft'; choose one of: auto, lax, patches, slices, hybrid"),
    (dict(sample_shape=MNIST, num_classes=10, hidden_dim=0), r'hidden_dim .* got 0'),
    (dict(sample_shape=MNIST, num_classes=10, width=3),
     r"unknown option 'width' for model 'cnn'; accepted: conv_impl, hidden_dim"),
])
def test_bad_values_raise_config_error(kwargs, match):
  with pytest.raises(ConfigError, match=match) as info:
    make_model('cnn', **kwargs)
  assert '\n' not in str(info.value)


def test_numpy_integers_are_accepted():
  model = make_model('cnn', tuple(np.array(MNIST)), np.int64(10), hidden_dim=np.int32(64))
  assert model == make_model('cnn', MNIST, 10, hidden_dim=64)
  with pytest.raises(ConfigError, match=r'got \(15, 28, 1\)'):
    make_model('cnn', tuple(np.array((15, 28, 1))), 10)


def test_mlr_rejects_options():
  with pytest.raises(ConfigError, match=r"unknown option 'hidden_dim' for model 'mlr'"):
    make_model('mlr', MNIST, 10, hidden_dim=5)


def test_options_are_applied():
  model = make_model('dnn', MNIST, 10, hidden_dim=32)
  assert feature_dim(model, MNIST) == 32
  model = make_model('cnn', MNIST, 10, hidden_dim=64, conv_impl='patches')
  assert model.base.conv_impl == 'patches'
  assert feature_dim(model, MNIST) == 64


@pytest.mark.parametrize('name', PFLLIB_MODELS)
def test_sgd_steps_reduce_loss(name):
  model = make_model(name, MNIST, 10)
  variables = init_model(model, jax.random.PRNGKey(0), MNIST)
  x = _batch(jax.random.PRNGKey(1), MNIST, n=16)
  y = jnp.arange(16) % 10

  def loss_fn(variables):
    logits = model.apply(variables, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  optimizer = optax.sgd(0.1)

  @jax.jit
  def step(variables, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(variables)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(variables, updates), opt_state, loss

  opt_state = optimizer.init(variables)
  initial = float(loss_fn(variables))
  for _ in range(10):
    variables, opt_state, _ = step(variables, opt_state)
  final = float(loss_fn(variables))
  assert np.isfinite(final)
  assert final < 0.8 * initial


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 7, 9, 2)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_max_pool_2x2_equals_flax_max_pool_in_value_and_gradient(shape, dtype):
  """Values and gradients bit-identical to nn.max_pool, ties included (rounded inputs make
  many windows hold equal maxima; the gradient goes to the first, row-major)."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from fedjax_lib.models.layers import max_pool_2x2  # pylint: disable=import-outside-toplevel
  x = jnp.round(jax.random.normal(jax.random.key(0), shape) * 2).astype(dtype)
  g = jax.random.normal(jax.random.key(1), (shape[0], shape[1] // 2, shape[2] // 2, shape[3]))
  reference = lambda v: nn.max_pool(v, (2, 2), strides=(2, 2))
  np.testing.assert_array_equal(np.asarray(max_pool_2x2(x), np.float32),
                                np.asarray(reference(x), np.float32))
  loss = lambda f: lambda v: jnp.sum(f(v).astype(jnp.float32) * g)
  ours, theirs = jax.grad(loss(max_pool_2x2))(x), jax.grad(loss(reference))(x)
  np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(theirs, np.float32))
  batched = jax.vmap(jax.grad(loss(max_pool_2x2)))(jnp.stack([x, -x]))
  np.testing.assert_array_equal(np.asarray(batched[0], np.float32), np.asarray(ours, np.float32))
