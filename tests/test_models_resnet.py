"""HtFLlib's ResNets (fedjax_lib.models.resnet): sizes, shapes, BatchNorm state, bf16, grads.

The big models are only traced (``jax.eval_shape``); only ResNet4 is ever compiled.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lib.errors import ConfigError
from fedjax_lib.models.base import apply_train, count_params, has_train_mode
from fedjax_lib.models.resnet import PENULTIMATE, RESNET_NAMES, resnet

KEY = jax.random.PRNGKey(0)

# Measured on HtFLlib's PyTorch models: BaseHeadSplit with feature_dim 512, head Linear(512, 10).
HTFLLIB_COUNTS = {
    'resnet4': 88_650,
    'resnet6': 318_794,
    'resnet8': 1_237_834,
    'resnet10': 4_910_922,
    'resnet18': 11_181_642,
}

# torchvision's published totals (1000-class fc included).
TORCHVISION_TOTALS = {
    'resnet18': 11_689_512,
    'resnet34': 21_797_672,
    'resnet50': 25_557_032,
    'resnet101': 44_549_160,
    'resnet152': 60_192_808,
}

HEAD = 512 * 10 + 10


def _basic(cin, planes, downsample):
  n = 9 * cin * planes + 9 * planes * planes + 2 * (2 * planes)
  return n + (cin * planes + 2 * planes if downsample else 0)


def _bottleneck(cin, planes, downsample):
  out = 4 * planes
  n = cin * planes + 9 * planes * planes + planes * out + 2 * (2 * planes) + 2 * out
  return n + (cin * out + 2 * out if downsample else 0)


def _formula(block, stages, in_channels=3):
  """Parameters of a torchvision-style ResNet base (no fc), from the block definitions."""
  block_params, expansion = {'basic': (_basic, 1), 'bottleneck': (_bottleneck, 4)}[block]
  n = 7 * 7 * in_channels * 64 + 2 * 64
  cin = 64
  for s, blocks in enumerate(stages):
    planes = (64, 128, 256, 512)[s]
    for b in range(blocks):
      stride = 2 if s > 0 and b == 0 else 1
      n += block_params(cin, planes, stride != 1 or cin != planes * expansion)
      cin = planes * expansion
  return n


FORMULA = {
    'resnet4': ('basic', [1]),
    'resnet6': ('basic', [1, 1]),
    'resnet8': ('basic', [1, 1, 1]),
    'resnet10': ('basic', [1, 1, 1, 1]),
    'resnet18': ('basic', [2, 2, 2, 2]),
    'resnet34': ('basic', [3, 4, 6, 3]),
    'resnet50': ('bottleneck', [3, 4, 6, 3]),
    'resnet101': ('bottleneck', [3, 4, 23, 3]),
    'resnet152': ('bottleneck', [3, 8, 36, 3]),
}


def _abstract_init(model, shape):
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.eval_shape(lambda x: model.init(KEY, x), x)


@pytest.mark.parametrize('name', RESNET_NAMES)
def test_param_counts(name):
  model = resnet(name, 10).clone(feature_dim=512)
  variables = _abstract_init(model, (1, 32, 32, 3))
  n = count_params(variables)
  expected = _formula(*FORMULA[name]) + HEAD
  assert n == expected
  if name in HTFLLIB_COUNTS:
    assert n == HTFLLIB_COUNTS[name]
  if name in TORCHVISION_TOTALS:
    width = PENULTIMATE[name]
    assert n == TORCHVISION_TOTALS[name] - (width * 1000 + 1000) + HEAD
  # One input channel: the stem conv loses 2 * 7 * 7 * 64 weights.
  if name == 'resnet18':
    v1 = _abstract_init(model, (1, 28, 28, 1))
    assert count_params(v1) == n - 2 * 49 * 64


def test_penultimate_and_formula_agree():
  assert PENULTIMATE == {'resnet4': 64, 'resnet6': 128, 'resnet8': 256, 'resnet10': 512,
                         'resnet18': 512, 'resnet34': 512, 'resnet50': 2048,
                         'resnet101': 2048, 'resnet152': 2048}
  # The head without feature_dim is Linear(PENULTIMATE, C).
  v = _abstract_init(resnet('resnet4', 10), (1, 32, 32, 3))
  assert v['params']['head']['kernel'].shape == (64, 10)
  assert count_params(v) == _formula('basic', [1]) + 64 * 10 + 10


@pytest.mark.parametrize('name', RESNET_NAMES)
@pytest.mark.parametrize('shape', [(2, 32, 32, 3), (2, 28, 28, 1)])
def test_base_output_shapes(name, shape):
  model = resnet(name, 10)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  z = jax.eval_shape(lambda x: model.base.init_with_output(KEY, x)[0], x)
  assert z.shape == (2, PENULTIMATE[name])
  pooled = model.clone(feature_dim=512)
  out = jax.eval_shape(
      lambda x: pooled.apply(pooled.init(KEY, x), x, method='forward'), x)
  assert out[0].shape == (2, 512) and out[1].shape == (2, 10)


def test_layout_names_and_downsamples():
  v = _abstract_init(resnet('resnet18', 10), (1, 32, 32, 3))
  base = v['params']['base']
  assert sorted(base) == sorted(['stem_conv', 'stem_bn'] + [
      f'layer{s}_{b}' for s in range(1, 5) for b in range(2)])
  assert 'downsample_conv' not in base['layer1_0']  # stage 1: 64 -> 64, stride 1
  for s in (2, 3, 4):
    assert base[f'layer{s}_0']['downsample_conv']['kernel'].shape[:2] == (1, 1)
    assert 'downsample_conv' not in base[f'layer{s}_1']
  assert sorted(base['layer1_0']) == ['bn1', 'bn2', 'conv1', 'conv2']
  assert base['stem_conv']['kernel'].shape == (7, 7, 3, 64)
  assert 'bias' not in base['stem_conv']
  assert sorted(v['batch_stats']['base']['stem_bn']) == ['mean', 'var']
  # ResNet4: a single stage without downsample.
  v4 = _abstract_init(resnet('ResNet4', 10), (1, 32, 32, 3))
  assert sorted(v4['params']['base']) == ['layer1_0', 'stem_bn', 'stem_conv']
  assert 'downsample_conv' not in v4['params']['base']['layer1_0']
  # Bottleneck: the first block widens 64 -> 256, so it has a downsample; stride on conv2.
  v50 = _abstract_init(resnet('resnet50', 10), (1, 32, 32, 3))
  b50 = v50['params']['base']
  assert b50['layer1_0']['downsample_conv']['kernel'].shape == (1, 1, 64, 256)
  assert b50['layer2_0']['conv2']['kernel'].shape == (3, 3, 128, 128)
  assert b50['layer2_0']['conv3']['kernel'].shape == (1, 1, 128, 512)
  assert 'downsample_conv' not in b50['layer1_1']


def test_unknown_name():
  with pytest.raises(ConfigError, match='unknown ResNet'):
    resnet('resnet7', 10)


# --- real runs, ResNet4 only ------------------------------------------------------------


@pytest.fixture(scope='module')
def resnet4():
  model = resnet('resnet4', 10).clone(feature_dim=512)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
  variables = jax.jit(model.init)(KEY, x)
  return model, variables, x


def test_init_distributions(resnet4):
  _, variables, _ = resnet4
  base = variables['params']['base']
  for kernel in (base['stem_conv']['kernel'], base['layer1_0']['conv1']['kernel']):
    kh, kw, _, out = kernel.shape
    std = float(np.std(np.asarray(kernel)))
    assert std == pytest.approx(np.sqrt(2.0 / (out * kh * kw)), rel=0.05)
  np.testing.assert_array_equal(base['stem_bn']['scale'], 1.0)
  np.testing.assert_array_equal(base['layer1_0']['bn2']['bias'], 0.0)
  np.testing.assert_array_equal(variables['batch_stats']['base']['stem_bn']['mean'], 0.0)
  np.testing.assert_array_equal(variables['batch_stats']['base']['stem_bn']['var'], 1.0)
  head = np.asarray(variables['params']['head']['kernel'])
  assert head.shape == (512, 10) and np.abs(head).max() <= 1 / np.sqrt(512)


def test_batchnorm_state(resnet4):
  model, variables, x = resnet4
  assert has_train_mode(model)
  (_, logits), state = apply_train(model, variables, x, KEY)
  assert logits.shape == (4, 10)
  old, new = variables['batch_stats'], state['batch_stats']
  assert jax.tree_util.tree_structure(old) == jax.tree_util.tree_structure(new)
  for a, b in zip(jax.tree_util.tree_leaves(old), jax.tree_util.tree_leaves(new)):
    assert not np.allclose(a, b)

  # Running-statistics update of the stem BN, by hand: momentum 0.1, unbiased variance.
  conv = jax.lax.conv_general_dilated(
      x, variables['params']['base']['stem_conv']['kernel'], (2, 2), ((3, 3), (3, 3)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision='highest')
  flat = np.asarray(conv, np.float64).reshape(-1, 64)
  stem = new['base']['stem_bn']
  np.testing.assert_allclose(stem['mean'], 0.1 * flat.mean(0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stem['var'], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-4)

  # Evaluation normalises with the running statistics: check the stem BN's output.
  perturbed = {**variables, **state}
  _, inter = model.apply(perturbed, x, capture_intermediates=True)
  bn_in = np.asarray(inter['intermediates']['base']['stem_conv']['__call__'][0], np.float64)
  bn_out = np.asarray(inter['intermediates']['base']['stem_bn']['__call__'][0])
  expected = (bn_in - np.asarray(stem['mean'])) / np.sqrt(np.asarray(stem['var']) + 1e-5)
  np.testing.assert_allclose(bn_out, expected, rtol=1e-4, atol=1e-4)

  # Eval output depends on batch_stats; train output does not.
  eval_old = model.apply(variables, x)
  eval_new = model.apply(perturbed, x)
  assert not np.allclose(eval_old, eval_new)
  (_, train_new), _ = apply_train(model, perturbed, x, KEY)
  np.testing.assert_allclose(train_new, logits, rtol=1e-5, atol=1e-5)


def test_bfloat16(resnet4):
  model32, variables, x = resnet4
  model = resnet('resnet4', 10, dtype=jnp.bfloat16).clone(feature_dim=512)
  logits = model.apply(variables, x)
  assert logits.dtype == jnp.float32 and logits.shape == (4, 10)
  assert np.all(np.isfinite(logits))
  (features, train_logits), state = apply_train(model, variables, x, KEY)
  assert features.dtype == jnp.float32 and train_logits.dtype == jnp.float32
  assert np.all(np.isfinite(train_logits))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(state))
  reference = model32.apply(variables, x)
  np.testing.assert_allclose(logits, reference, atol=0.1 * float(np.abs(reference).max()) + 0.05)


def test_gradients_finite(resnet4):
  model, variables, x = resnet4
  labels = jnp.arange(4) % 10

  def loss(params):
    (_, logits), _ = apply_train(model, {**variables, 'params': params}, x, KEY)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  grads = jax.jit(jax.grad(loss))(variables['params'])
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in leaves)
  assert float(np.abs(grads['base']['stem_conv']['kernel']).max()) > 0
  assert float(np.abs(grads['base']['layer1_0']['bn2']['scale']).max()) > 0
