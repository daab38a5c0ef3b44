"""Tests for HtFLlib's non-ResNet image models: GoogLeNet, MobileNetV2, ViT-B/16, ViT-B/32.

The full-size models are only traced (``jax.eval_shape``: no compilation, no parameters
materialised); real computation uses reduced configurations of the same modules.
Expected parameter counts are derived here from the architecture definitions, block by
block, and those formulas are checked against the counts torchvision publishes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lib.errors import ConfigError
from fedjax_lib.models import googlenet as googlenet_lib
from fedjax_lib.models import mobilenet as mobilenet_lib
from fedjax_lib.models import vit as vit_lib
from fedjax_lib.models.base import BaseHeadModel, apply_train, count_params, has_train_mode
from fedjax_lib.models.layers import TorchDense

IMAGE = (32, 32, 3)
NUM_CLASSES = 10
FEATURE_DIM = 512

# ---------------------------------------------------------------------------------------
# Parameter counts from the architecture definitions (PyTorch modules, params only).


def _linear(fan_in, out):
  return fan_in * out + out


def _conv_bn(cin, cout, k, groups=1):
  """Conv without bias + BatchNorm's weight and bias."""
  return cin // groups * cout * k * k + 2 * cout


def _googlenet_count(num_classes=None):
  """torchvision googlenet(aux_logits=False); ``fc`` included when num_classes is given."""
  total = _conv_bn(3, 64, 7) + _conv_bn(64, 64, 1) + _conv_bn(64, 192, 3)
  # (in, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5 (a 3x3 kernel in torchvision), pool_proj)
  blocks = [(192, 64, 96, 128, 16, 32, 32), (256, 128, 128, 192, 32, 96, 64),
            (480, 192, 96, 208, 16, 48, 64), (512, 160, 112, 224, 24, 64, 64),
            (512, 128, 128, 256, 24, 64, 64), (512, 112, 144, 288, 32, 64, 64),
            (528, 256, 160, 320, 32, 128, 128), (832, 256, 160, 320, 32, 128, 128),
            (832, 384, 192, 384, 48, 128, 128)]
  for cin, c1, c3r, c3, c5r, c5, pool in blocks:
    total += (_conv_bn(cin, c1, 1) + _conv_bn(cin, c3r, 1) + _conv_bn(c3r, c3, 3)
              + _conv_bn(cin, c5r, 1) + _conv_bn(c5r, c5, 3) + _conv_bn(cin, pool, 1))
    assert c1 + c3 + c5 + pool in (256, 480, 512, 528, 832, 1024)
  if num_classes is not None:
    total += _linear(1024, num_classes)
  return total


def _mobilenet_v2_count(num_classes=None):
  """HtFLlib's MobileNetV2 (width 1.0); ``fc`` included when num_classes is given."""
  total = _conv_bn(3, 32, 3)
  cin = 32
  for t, c, n, _ in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                     (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:
    for _ in range(n):
      hidden = cin * t
      if t != 1:
        total += _conv_bn(cin, hidden, 1)
      total += _conv_bn(hidden, hidden, 3, groups=hidden) + _conv_bn(hidden, c, 1)
      cin = c
  total += _conv_bn(320, 1280, 1)
  if num_classes is not None:
    total += _linear(1280, num_classes)
  return total


def _vit_b_count(patch, image_size, num_classes=None):
  """torchvision ViT-B (12 layers, 12 heads, 768, MLP 3072); ``heads`` included when
  num_classes is given."""
  d, mlp = 768, 3072
  tokens = (image_size // patch) ** 2 + 1
  layer = (2 * d                      # ln_1
           + 3 * d * d + 3 * d        # in_proj_weight, in_proj_bias
           + _linear(d, d)            # out_proj
           + 2 * d                    # ln_2
           + _linear(d, mlp) + _linear(mlp, d))
  total = 3 * patch * patch * d + d + d + tokens * d + 12 * layer + 2 * d
  if num_classes is not None:
    total += _linear(d, num_classes)
  return total


def _vit_head_count(num_classes):
  return _linear(FEATURE_DIM, 768) + _linear(768, num_classes)


def test_formulas_reproduce_published_counts():
  assert _googlenet_count(1000) == 6_624_904          # torchvision, aux_logits=False
  assert _mobilenet_v2_count(1000) == 3_504_872       # torchvision mobilenet_v2
  assert _vit_b_count(16, 224, 1000) == 86_567_656     # torchvision ViT_B_16 meta
  assert _vit_b_count(32, 224, 1000) == 88_224_232     # torchvision ViT_B_32 meta
  # HtFLlib (C=10, feature_dim 512, head Linear(512, 10)).
  assert _mobilenet_v2_count() + _linear(FEATURE_DIM, 10) == 2_229_002


# name -> (constructor, expected base params, expected head params with feature_dim 512,
#          penultimate width)
MODELS = {
    'googlenet': (lambda dtype=None: googlenet_lib.googlenet(NUM_CLASSES, dtype=dtype),
                  _googlenet_count(), _linear(FEATURE_DIM, NUM_CLASSES), 1024),
    'mobilenet_v2': (lambda dtype=None: mobilenet_lib.mobilenet_v2(NUM_CLASSES, dtype=dtype),
                     _mobilenet_v2_count(), _linear(FEATURE_DIM, NUM_CLASSES), 1280),
    'vit_b_16': (lambda dtype=None: vit_lib.vit('vit_b_16', NUM_CLASSES, dtype=dtype),
                 _vit_b_count(16, 32), _vit_head_count(NUM_CLASSES), 768),
    'vit_b_32': (lambda dtype=None: vit_lib.vit('vit_b_32', NUM_CLASSES, dtype=dtype),
                 _vit_b_count(32, 32), _vit_head_count(NUM_CLASSES), 768),
}

PENULTIMATE = {**googlenet_lib.PENULTIMATE, **mobilenet_lib.PENULTIMATE, **vit_lib.PENULTIMATE}


def _abstract_init(model, batch=2, shape=IMAGE):
  x = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x), x


@pytest.mark.parametrize('name', sorted(MODELS))
def test_param_counts_and_shapes(name):
  make, base_count, head_count, width = MODELS[name]
  model = make()
  assert isinstance(model, BaseHeadModel)
  assert PENULTIMATE[name] == width
  pooled = model.clone(feature_dim=FEATURE_DIM)
  variables, x = _abstract_init(pooled)
  assert count_params(variables['params']['base']) == base_count
  assert count_params(variables['params']['head']) == head_count
  assert count_params(variables) == base_count + head_count
  base_out = jax.eval_shape(lambda v, x: model.base.apply({'params': v['params']['base'],
                                                           **_state(v, 'base')}, x),
                            variables, x)
  assert base_out.shape == (2, width)
  z, logits = jax.eval_shape(lambda v, x: pooled.apply(v, x, method='forward'), variables, x)
  assert z.shape == (2, FEATURE_DIM) and logits.shape == (2, NUM_CLASSES)


def _state(variables, part):
  return {k: v[part] for k, v in variables.items() if k != 'params'}


def test_htfl_parameter_totals():
  """The totals quoted in the module docstrings (C=10, feature_dim 512)."""
  totals = {'googlenet': 5_605_034, 'mobilenet_v2': 2_229_002, 'vit_b_16': 86_052_874,
            'vit_b_32': 87_820_042}
  for name, total in totals.items():
    _, base_count, head_count, _ = MODELS[name]
    assert base_count + head_count == total, name


@pytest.mark.parametrize('name', ['vit_b_16', 'googlenet'])
def test_bf16_gives_float32_outputs(name):
  model = MODELS[name][0](jnp.bfloat16).clone(feature_dim=FEATURE_DIM)
  variables, x = _abstract_init(model)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
  z, logits = jax.eval_shape(lambda v, x: model.apply(v, x, method='forward'), variables, x)
  assert z.dtype == jnp.float32 and logits.dtype == jnp.float32


# ---------------------------------------------------------------------------------------
# Input validation.


def test_vit_rejects_other_image_sizes():
  model = vit_lib.vit('vit_b_16', NUM_CLASSES)
  with pytest.raises(ConfigError, match='image_size=32'):
    _abstract_init(model, shape=(28, 28, 3))
  with pytest.raises(ConfigError, match='image_size=32'):
    vit_lib.check_input_shape((64, 64, 3))
  vit_lib.check_input_shape((32, 32, 3))
  with pytest.raises(ConfigError, match='unknown ViT'):
    vit_lib.vit('vit_l_16', NUM_CLASSES)
  with pytest.raises(ConfigError, match='multiple of its patch size'):
    vit_lib.vit('vit_b_32', NUM_CLASSES, image_size=48)


def test_googlenet_rejects_tiny_inputs():
  _abstract_init(googlenet_lib.googlenet(NUM_CLASSES), shape=(15, 15, 3))
  with pytest.raises(ConfigError, match='15x15'):
    _abstract_init(googlenet_lib.googlenet(NUM_CLASSES), shape=(14, 14, 3))


# ---------------------------------------------------------------------------------------
# GoogLeNet pieces.


def _torch_ceil_max_pool(x, k, s, p):
  """PyTorch MaxPool2d(k, s, p, ceil_mode=True) on NHWC, loop by loop."""
  def out_size(n):
    o = -(-(n + 2 * p - k) // s) + 1
    if (o - 1) * s >= n + p:
      o -= 1
    return o
  b, h, w, c = x.shape
  oh, ow = out_size(h), out_size(w)
  y = np.full((b, oh, ow, c), -np.inf, np.float32)
  for i in range(oh):
    for j in range(ow):
      r0, c0 = i * s - p, j * s - p
      window = x[:, max(r0, 0):min(r0 + k, h), max(c0, 0):min(c0 + k, w)]
      y[:, i, j] = window.max(axis=(1, 2))
  return y


@pytest.mark.parametrize('size,k,s,p', [(16, 3, 2, 0), (8, 3, 2, 0), (4, 3, 2, 0),
                                        (2, 2, 2, 0), (7, 3, 2, 0), (14, 2, 2, 0),
                                        (5, 3, 1, 1), (1, 3, 1, 1), (9, 2, 2, 0)])
def test_max_pool_ceil_matches_pytorch(size, k, s, p):
  x = np.random.default_rng(size * 10 + k).normal(size=(2, size, size + 1, 3)).astype(np.float32)
  y = np.asarray(googlenet_lib.max_pool_ceil(jnp.asarray(x), k, s, p))
  np.testing.assert_array_equal(y, _torch_ceil_max_pool(x, k, s, p))


def test_googlenet_spatial_sizes_for_32x32():
  sizes = [32]
  sizes.append((sizes[-1] + 6 - 7) // 2 + 1)                         # conv1
  for k, s in [(3, 2), (3, 2), (3, 2), (2, 2)]:                       # maxpool1..4
    sizes.append(googlenet_lib.pool_output_size(sizes[-1], k, s))
  assert sizes == [32, 16, 8, 4, 2, 1]


def test_basic_conv_uses_eps_1e3_and_trunc_normal_init():
  block = googlenet_lib.BasicConv2d(64, 3, padding=1)
  x = jnp.ones((1, 6, 6, 16))
  variables = block.init(jax.random.PRNGKey(0), x)
  kernel = np.asarray(variables['params']['conv']['kernel'])
  assert kernel.shape == (3, 3, 16, 64)
  assert abs(kernel.std() - 0.01) < 0.001 and np.abs(kernel).max() < 0.05
  # Identity 1x1 kernel, running stats (0, 1): eval output is relu(x / sqrt(1 + 1e-3)).
  block1 = googlenet_lib.BasicConv2d(4, 1)
  v = block1.init(jax.random.PRNGKey(0), jnp.ones((1, 2, 2, 4)))
  v = {**v, 'params': {**v['params'], 'conv': {'kernel': jnp.eye(4)[None, None]}}}
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 2, 2, 4)), jnp.float32)
  np.testing.assert_allclose(block1.apply(v, x), np.maximum(x, 0) / np.sqrt(1 + 1e-3),
                             rtol=1e-6)


def _small_googlenet():
  base = googlenet_lib.GoogLeNetBase(blocks=(('inception3a', (8, 8, 8, 4, 4, 4)),
                                             ('maxpool3', (3, 2))))
  return BaseHeadModel(base=base, head=TorchDense(NUM_CLASSES), feature_dim=16)


def _small_mobilenet():
  base = mobilenet_lib.MobileNetV2Base(inverted_residual_setting=((1, 8, 1, 1), (6, 8, 2, 2)))
  return BaseHeadModel(base=base, head=TorchDense(NUM_CLASSES), feature_dim=16)


@pytest.mark.parametrize('make', [_small_googlenet, _small_mobilenet],
                         ids=['googlenet', 'mobilenet_v2'])
def test_train_mode_dropout_and_batch_stats(make):
  model = make()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, *IMAGE)), jnp.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  assert set(variables) == {'params', 'batch_stats'}

  @jax.jit
  def run(variables, key):
    (z, logits), state = apply_train(model, variables, x, key, method='forward')
    evaluated = model.apply(variables, x, method='features')
    return z, logits, state, evaluated

  z1, logits1, state1, eval1 = run(variables, jax.random.PRNGKey(1))
  z2, _, state2, eval2 = run(variables, jax.random.PRNGKey(2))
  assert z1.shape == (4, 16) and logits1.shape == (4, NUM_CLASSES)
  assert np.all(np.isfinite(np.asarray(logits1)))
  assert not np.allclose(z1, z2)                       # dropout draws from the key
  np.testing.assert_array_equal(eval1, eval2)          # evaluation is deterministic
  # Running statistics move, identically for both keys (dropout comes after the last BN).
  for a, b, old in zip(jax.tree_util.tree_leaves(state1['batch_stats']),
                       jax.tree_util.tree_leaves(state2['batch_stats']),
                       jax.tree_util.tree_leaves(variables['batch_stats'])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert any(not np.allclose(a, o) for a, o in
             zip(jax.tree_util.tree_leaves(state1['batch_stats']),
                 jax.tree_util.tree_leaves(variables['batch_stats'])))


# ---------------------------------------------------------------------------------------
# MobileNetV2 pieces.


def test_mobilenet_structure_and_init():
  model = mobilenet_lib.mobilenet_v2(NUM_CLASSES, feature_dim=FEATURE_DIM)
  variables, _ = _abstract_init(model)
  base = variables['params']['base']
  assert sorted(base, key=lambda n: int(n.split('_')[1])) == [f'features_{i}' for i in range(19)]
  assert base['features_0']['conv']['kernel'].shape == (3, 3, 3, 32)
  assert 'expand' not in base['features_1']                       # t = 1
  assert base['features_2']['expand']['conv']['kernel'].shape == (1, 1, 16, 96)
  assert base['features_2']['depthwise']['conv']['kernel'].shape == (3, 3, 1, 96)
  assert base['features_18']['conv']['kernel'].shape == (1, 1, 320, 1280)
  assert mobilenet_lib.make_divisible(32 * 0.5, 8) == 16
  assert mobilenet_lib.make_divisible(1280 * 1.0, 8) == 1280
  # kaiming_normal_(mode='fan_out'): std sqrt(2 / (out * kh * kw)), depthwise included.
  block = mobilenet_lib.ConvBNReLU6(64, 3, groups=64)
  v = block.init(jax.random.PRNGKey(0), jnp.ones((1, 4, 4, 64)))
  kernel = np.asarray(v['params']['conv']['kernel'])
  assert kernel.shape == (3, 3, 1, 64)
  assert abs(kernel.std() / np.sqrt(2 / (64 * 9)) - 1) < 0.1
  y = block.apply(v, 100 * jnp.ones((1, 4, 4, 64)))
  assert float(y.max()) <= 6.0                                      # ReLU6


def test_mobilenet_strides_for_32x32():
  """HtFLlib keeps the ImageNet strides: 32x32 inputs reach 1x1 before the last conv."""
  base = mobilenet_lib.MobileNetV2Base()
  x = jax.ShapeDtypeStruct((1, *IMAGE), jnp.float32)
  variables = jax.eval_shape(lambda x: base.init(jax.random.PRNGKey(0), x), x)

  def last_map(v, x):
    _, inter = base.apply(v, x, capture_intermediates=lambda m, _: m.name == 'features_18',
                          mutable=['intermediates'])
    return inter['intermediates']['features_18']['__call__'][0]

  assert jax.eval_shape(last_map, variables, x).shape == (1, 1, 1, 1280)


# ---------------------------------------------------------------------------------------
# ViT pieces (a reduced ViT for real computation).


def _tiny_vit(dtype=None):
  base = vit_lib.ViTBase(patch_size=16, num_layers=1, num_heads=4, hidden_dim=32, mlp_dim=64,
                         dtype=dtype)
  return BaseHeadModel(base=base, head=vit_lib.ViTHead(NUM_CLASSES, hidden_dim=24, dtype=dtype),
                       dtype=dtype, feature_dim=16)


def _torch_mha(x, w_in, b_in, w_out, b_out, heads):
  """nn.MultiheadAttention(batch_first=True)(x, x, x) in float64, PyTorch weight layout."""
  b, n, e = x.shape
  d = e // heads
  qkv = x @ w_in.T + b_in
  q, k, v = (qkv[..., i * e:(i + 1) * e].reshape(b, n, heads, d).transpose(0, 2, 1, 3)
             for i in range(3))
  a = (q / np.sqrt(d)) @ k.transpose(0, 1, 3, 2)
  a = np.exp(a - a.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  o = (a @ v).transpose(0, 2, 1, 3).reshape(b, n, e)
  return o @ w_out.T + b_out


def test_self_attention_matches_pytorch_layout():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 32)).astype(np.float32)
  layer = vit_lib.SelfAttention(num_heads=4)
  v = layer.init(jax.random.PRNGKey(0), jnp.asarray(x))['params']
  assert v['in_proj']['kernel'].shape == (32, 96)
  assert not np.any(v['in_proj']['bias']) and not np.any(v['out_proj']['bias'])
  v = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.2, a.dtype), v)
  y = np.asarray(layer.apply({'params': v}, jnp.asarray(x)))
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), v)
  expected = _torch_mha(x.astype(np.float64), p['in_proj']['kernel'].T, p['in_proj']['bias'],
                        p['out_proj']['kernel'].T, p['out_proj']['bias'], 4)
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


def test_tiny_vit_init_and_bf16():
  model = _tiny_vit()
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, *IMAGE)), jnp.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  base = variables['params']['base']
  assert not vit_lib._layer_norm(None, 'ln').use_fast_variance
  assert base['class_token'].shape == (1, 1, 32) and not np.any(base['class_token'])
  assert base['encoder']['pos_embedding'].shape == (1, 5, 32)
  assert base['conv_proj']['kernel'].shape == (16, 16, 3, 32)
  assert not np.any(base['conv_proj']['bias'])
  assert abs(float(base['conv_proj']['kernel'].std()) * np.sqrt(3 * 16 * 16) - 1) < 0.05
  layer = base['encoder']['encoder_layer_0']
  assert float(np.abs(layer['linear_1']['bias']).max()) < 1e-5
  xavier = np.sqrt(6 / (32 + 96))
  assert float(np.abs(layer['self_attention']['in_proj']['kernel']).max()) <= xavier
  assert set(variables) == {'params'}
  assert not has_train_mode(model)                   # dropout 0: no train mode

  f32 = jax.jit(lambda v, x: model.apply(v, x, method='forward'))(variables, x)
  bf16 = _tiny_vit(jnp.bfloat16)
  out = jax.jit(lambda v, x: bf16.apply(v, x, method='forward'))(variables, x)
  for a, b in zip(f32, out):
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(b, a, rtol=0.1, atol=0.05)
