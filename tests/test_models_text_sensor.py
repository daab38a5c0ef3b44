"""Tests for the text, sensor and tabular models and HtFLlib's text/sensor/MLP families.

Parameter counts are traced (``jax.eval_shape``: nothing compiled or materialised) and
compared with PyTorch's. Those were obtained outside the test suite (CI has no torch) by
instantiating the reference modules with torch 2.13 (CPU) and summing
``p.numel() for p in model.parameters()``:

* PFLlib (``system/flcore/trainmodel/models.py``, ``bilstm.py``, ``transformer.py``; the
  constructor arguments of ``system/main.py`` with ``-fd 512 -vs 80 -ml 200``, 10 classes;
  ``HARCNN`` on HAR (6 classes) and PAMAP2 (12); ``AmazonMLP()``; ``Digit5CNN()``);
* HtFLlib (``system/main.py``'s family lists, ``BaseHeadSplit(args, i)`` for every member i
  with ``feature_dim=512, vocab_size=80, max_len=200``; text 10 classes, HAR 6, MLPs 2),
  counted as ``(base, head)``.

The same PyTorch modules, loaded with the same weights, give the logits and features of
these models to about 1e-7 (checked once, outside CI, for fastText, TextLogisticRegression,
LSTMNet, GRUNet, BiLSTM, TransformerModel(nhead 4, nlayers 2), TextCNN and HARCNN).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lib.errors import ConfigError
from fedjax_lib.models import (count_params, dataset_architectures, has_train_mode,
                               make_model, parse_model_names, split_params)
from fedjax_lib.models import text as text_lib

TEXT = (200,)            # PFLlib's max_len: token ids
HAR = (1, 128, 9)        # PFLlib's 9x1x128 (NCHW) as the PFLlib-folder reader lays it out
PAMAP2 = (3, 256, 9)     # 9x3x256
AMAZON = (5000,)
DIGIT5 = (32, 32, 3)

# (name, sample shape, classes, options) -> PyTorch's total parameter count.
PFLLIB_COUNTS = [
    ('lstm', TEXT, 10, {}, 4_248_586),
    ('bilstm', TEXT, 10, {}, 4_773_386),
    ('fasttext', TEXT, 10, {}, 308_746),
    ('textcnn', TEXT, 10, {}, 658_670),
    ('transformer', TEXT, 10, {}, 6_350_858),
    ('lstm', TEXT, 4, {'vocab_size': 32000}, 20_588_548),
    ('amazonmlp', AMAZON, 2, {}, 5_551_802),
    ('harcnn', HAR, 6, {}, 2_253_958),
    ('harcnn', PAMAP2, 12, {}, 4_354_188),
    ('digit5cnn', DIGIT5, 10, {}, 31_805_898),
]

# PFLlib's feature widths (base outputs without feature_dim).
PFLLIB_FEATURES = {'lstm': 512, 'bilstm': 512, 'fasttext': 512, 'textcnn': 300,
                   'transformer': 512, 'amazonmlp': 100, 'harcnn': None, 'digit5cnn': 2048}

_TXT = ((303_616, 5_130), (40_960, 5_130), (4_243_456, 5_130), (4_768_256, 5_130))
_TRANSFORMER = {1: (3_193_344, 5_130), 2: (6_345_728, 5_130), 4: (12_650_496, 5_130),
                8: (25_260_032, 5_130), 16: (50_479_104, 5_130)}   # by nlayers
_HAR, _HAR1, _HAR3 = (21_120, 3_078), (2_624, 3_078), (52_864, 3_078)

# family -> (sample shape, classes, members, PyTorch's (base, head) counts per member).
HTFLLIB_FAMILIES = {
    'HtFE-txt-2': (TEXT, 10, ('fasttext', 'textlr'), _TXT[:2]),
    'HtFE-txt-4': (TEXT, 10, ('fasttext', 'textlr', 'lstm', 'bilstm'), _TXT),
    'HtFE-txt-5-1': (TEXT, 10, ('transformer_h8_l1', 'transformer', 'transformer_h8_l4',
                                'transformer_h8_l8', 'transformer_h8_l16'),
                     tuple(_TRANSFORMER[n] for n in (1, 2, 4, 8, 16))),
    'HtFE-txt-5-2': (TEXT, 10, ('transformer_h1_l4', 'transformer_h2_l4', 'transformer_h4_l4',
                                'transformer_h8_l4', 'transformer_h16_l4'),
                     (_TRANSFORMER[4],) * 5),
    'HtFE-txt-5-3': (TEXT, 10, ('transformer_h1_l1', 'transformer_h2_l2', 'transformer_h4_l4',
                                'transformer_h8_l8', 'transformer_h16_l16'),
                     tuple(_TRANSFORMER[n] for n in (1, 2, 4, 8, 16))),
    'HtFE-txt-6': (TEXT, 10, ('fasttext', 'lstm', 'bilstm', 'transformer', 'textlr', 'gru'),
                   (_TXT[0], _TXT[2], _TXT[3], _TRANSFORMER[2], _TXT[1], (3_192_832, 5_130))),
    'HtFE-sen-2': (HAR, 6, ('harcnn', 'harcnn_s2'), (_HAR,) * 2),
    'HtFE-sen-3': (HAR, 6, ('harcnn', 'harcnn_s2', 'harcnn_s3'), (_HAR,) * 3),
    'HtFE-sen-5': (HAR, 6, ('harcnn', 'harcnn_s2', 'harcnn_s3', 'harcnn1', 'harcnn3'),
                   (_HAR,) * 3 + (_HAR1, _HAR3)),
    'HtFE-sen-8': (HAR, 6, ('harcnn', 'harcnn_s2', 'harcnn_s3', 'harcnn1', 'harcnn1_s2',
                            'harcnn1_s3', 'harcnn3', 'harcnn3_s2'),
                   (_HAR,) * 3 + (_HAR1,) * 3 + (_HAR3,) * 2),
    'MLPs': (AMAZON, 2, ('amazonmlp_0', 'amazonmlp_500', 'amazonmlp', 'amazonmlp_1000_500_200'),
             ((500_100, 1_026), (2_550_600, 1_026), (5_551_600, 1_026), (5_621_800, 1_026))),
    'MLP_1layer': (AMAZON, 2, ('amazonmlp_200', 'amazonmlp_500'),
                   ((1_020_300, 1_026), (2_550_600, 1_026))),
    'MLP_layers': (AMAZON, 2, ('amazonmlp_500', 'amazonmlp', 'amazonmlp_1000_500_200'),
                   ((2_550_600, 1_026), (5_551_600, 1_026), (5_621_800, 1_026))),
}


@functools.lru_cache(maxsize=None)
def _trace(name, sample_shape, num_classes, feature_dim=None, options=()):
  """Abstract ``(base count, head count, features shape, logits shape, classify shape)``."""
  model = make_model(name, sample_shape, num_classes, feature_dim=feature_dim, **dict(options))
  x = jax.ShapeDtypeStruct((2, *sample_shape), jnp.float32)

  def run(x):   # one trace of the base: init and forward together
    (z, logits), variables = model.init_with_output(jax.random.PRNGKey(0), x, method='forward')
    return variables, z, logits, model.apply(variables, z, method='classify')

  variables, z, logits, classified = jax.eval_shape(run, x)
  base, head = split_params(variables)
  return count_params(base), count_params(head), z.shape, logits.shape, classified.shape


@pytest.mark.parametrize('name, shape, classes, options, expected', PFLLIB_COUNTS)
def test_pfllib_parameter_counts_and_shapes(name, shape, classes, options, expected):
  base, head, z, logits, classified = _trace(name, shape, classes,
                                             options=tuple(options.items()))
  assert base + head == expected
  width = PFLLIB_FEATURES[name] or {HAR: 1664, PAMAP2: 3712}[shape]   # PFLlib's dim_hidden
  assert z == (2, width)
  assert logits == classified == (2, classes)


@pytest.mark.parametrize('family', sorted(HTFLLIB_FAMILIES))
def test_htfllib_family_members_and_counts(family):
  shape, classes, members, expected = HTFLLIB_FAMILIES[family]
  assert parse_model_names(family) == members
  for name, counts in zip(members, expected):
    base, head, z, logits, classified = _trace(name, shape, classes, 512)
    assert (base, head) == counts, name
    assert z == (2, 512) and logits == classified == (2, classes), name


@pytest.mark.parametrize('spelling, canonical', [
    ('Transformer_h8_l2', 'transformer'), ('TransformerModel', 'transformer'),
    ('transformer_h08_l4', 'transformer_h8_l4'), ('HARCNN_s1', 'harcnn'),
    ('harcnn3_s2', 'harcnn3_s2'), ('AmazonMLP_1000_500', 'amazonmlp'),
    ('amazonmlp_0', 'amazonmlp_0'), ('TextLogisticRegression', 'textlr'),
    ('LSTMNet', 'lstm'), ('GRUNet', 'gru'), ('fastText', 'fasttext'),
])
def test_names_are_canonicalised(spelling, canonical):
  assert parse_model_names(spelling) == (canonical,)


@pytest.mark.parametrize('name', ['transformer_h0_l2', 'transformer_h8', 'harcnn2',
                                  'harcnn_s0', 'amazonmlp_0_500', 'amazonmlp_'])
def test_unknown_variants_are_refused(name):
  with pytest.raises(ConfigError, match='unknown model'):
    make_model(name, TEXT, 10)


@pytest.mark.parametrize('name, options, match', [
    ('bilstm', {'log_softmax_features': True}, 'unknown option'),
    ('transformer', {'log_softmax_features': True}, 'unknown option'),
    ('lstm', {'vocab_size': 0}, 'vocab_size must be a positive integer'),
    ('gru', {'log_softmax_features': 1}, 'True or False'),
    ('harcnn', {'vocab_size': 80}, 'unknown option'),
])
def test_bad_options_are_refused(name, options, match):
  with pytest.raises(ConfigError, match=match):
    make_model(name, TEXT if name != 'harcnn' else HAR, 10, **options)


def test_bad_inputs_are_refused_when_traced():
  image = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  model = make_model('lstm', (32, 32, 3), 10)   # built (the runner does that), not traced
  with pytest.raises(ConfigError, match=r'token ids of shape \(batch, L\)'):
    jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), image)
  with pytest.raises(ConfigError, match='not divisible'):
    make_model('transformer_h3_l1', TEXT, 10)
  short = jax.ShapeDtypeStruct((2, 1, 20, 9), jnp.float32)
  model = make_model('harcnn3_s2', (1, 20, 9), 6, feature_dim=16)
  with pytest.raises(ConfigError, match='longer windows'):
    jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), short)


def test_train_mode_follows_dropout_and_batchnorm():
  with_train = {name for name in ('fasttext', 'textlr', 'textcnn', 'lstm', 'gru', 'bilstm',
                                  'transformer', 'harcnn', 'amazonmlp', 'digit5cnn')
                if has_train_mode(make_model(name, DIGIT5, 10))}
  assert with_train == {'textcnn', 'lstm', 'gru', 'transformer', 'digit5cnn'}


# ---------------------------------------------------------------------------------------
# Recurrent cells against numpy, PyTorch's layout (weight (G·H, in)) and gate order.


def _sigmoid(v):
  return 1 / (1 + np.exp(-v))


def _torch_weights(rng, gates, hidden, inputs):
  shapes = {'weight_ih': (gates * hidden, inputs), 'weight_hh': (gates * hidden, hidden),
            'bias_ih': (gates * hidden,), 'bias_hh': (gates * hidden,)}
  return {k: rng.uniform(-0.5, 0.5, s).astype(np.float32) for k, s in shapes.items()}


def _numpy_lstm_step(w, x, h, c):
  i, f, g, o = np.split(w['weight_ih'] @ x + w['bias_ih'] + w['weight_hh'] @ h + w['bias_hh'], 4)
  c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
  return _sigmoid(o) * np.tanh(c), c


def _numpy_gru_step(w, x, h):
  x_r, x_z, x_n = np.split(w['weight_ih'] @ x + w['bias_ih'], 3)
  h_r, h_z, h_n = np.split(w['weight_hh'] @ h + w['bias_hh'], 3)
  r, z = _sigmoid(x_r + h_r), _sigmoid(x_z + h_z)
  n = np.tanh(x_n + r * h_n)
  return (1 - z) * n + z * h


def _flax_params(w):
  return {'kernel_ih': w['weight_ih'].T, 'kernel_hh': w['weight_hh'].T,
          'bias_ih': w['bias_ih'], 'bias_hh': w['bias_hh']}


@pytest.mark.parametrize('cell', ['lstm', 'gru'])
def test_one_cell_step_matches_numpy(cell):   # eager: a handful of small ops
  rng = np.random.default_rng(0)
  hidden, inputs = 3, 2
  w = _torch_weights(rng, text_lib._GATES[cell], hidden, inputs)
  x, h, c = (rng.normal(size=n).astype(np.float32) for n in (inputs, hidden, hidden))
  p = _flax_params(w)
  input_gates = x @ p['kernel_ih'] + p['bias_ih']
  if cell == 'lstm':
    (h_new, c_new), out = text_lib.lstm_step((h, c), input_gates, p['kernel_hh'], p['bias_hh'])
    h_ref, c_ref = _numpy_lstm_step(w, x, h, c)
    np.testing.assert_allclose(c_new, c_ref, rtol=1e-5, atol=1e-6)
  else:
    h_new, out = text_lib.gru_step(h, input_gates, p['kernel_hh'], p['bias_hh'])
    h_ref = _numpy_gru_step(w, x, h)
  np.testing.assert_allclose(h_new, h_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out, h_new)


@pytest.mark.parametrize('cell', ['lstm', 'gru'])
def test_bidirectional_layer_matches_numpy(cell):
  """Both directions over a 3-step sequence from a zero state; outputs aligned to positions."""
  rng = np.random.default_rng(1)
  hidden, inputs, length = 3, 2, 3
  forward, backward = (_torch_weights(rng, text_lib._GATES[cell], hidden, inputs)
                       for _ in range(2))
  x = rng.normal(size=(1, length, inputs)).astype(np.float32)
  module = text_lib.Recurrent(cell, hidden, bidirectional=True)
  params = {'l0': _flax_params(forward), 'l0_reverse': _flax_params(backward)}
  out = np.asarray(jax.jit(module.apply)({'params': params}, x))

  def run(w, steps):
    h = c = np.zeros(hidden, np.float32)
    outputs = {}
    for t in steps:
      if cell == 'lstm':
        h, c = _numpy_lstm_step(w, x[0, t], h, c)
      else:
        h = _numpy_gru_step(w, x[0, t], h)
      outputs[t] = h
    return np.stack([outputs[t] for t in range(length)])

  expected = np.concatenate([run(forward, range(length)),
                             run(backward, reversed(range(length)))], axis=-1)
  np.testing.assert_allclose(out[0], expected, rtol=1e-5, atol=1e-6)


def test_padding_embeds_to_zero_without_gradient_and_unknown_ids_to_nan():
  module = text_lib.Embedding(5, 3)
  table = jnp.arange(15, dtype=jnp.float32).reshape(5, 3) + 1
  ids, unknown = jnp.array([[2, 0, 4]]), jnp.array([[5, -1]])
  embed = lambda t, ids: module.apply({'params': {'embedding': t}}, ids)
  out, grad, nans = jax.jit(lambda t: (embed(t, ids), jax.grad(lambda t: embed(t, ids).sum())(t),
                                       embed(t, unknown)))(table)
  np.testing.assert_array_equal(out[0, 1], 0)
  np.testing.assert_array_equal(out[0, 0], table[2])
  np.testing.assert_array_equal(grad[:, 0], [0, 0, 1, 0, 1])
  assert np.isnan(nans).all()


def test_log_softmax_quirk_switch():
  ids = jnp.array([[1, 2, 3, 0], [4, 4, 1, 0]], jnp.float32)
  plain = make_model('fasttext', (4,), 3, feature_dim=8, vocab_size=6)
  quirk = make_model('fasttext', (4,), 3, feature_dim=8, vocab_size=6,
                     log_softmax_features=True)

  @jax.jit
  def run(ids):
    variables = plain.init(jax.random.PRNGKey(0), ids)
    zq, logits = quirk.apply(variables, ids, method='forward')
    return (plain.apply(variables, ids, method='features'), zq, logits,
            quirk.apply(variables, zq, method='classify'))

  z, zq, logits, classified = run(ids)
  np.testing.assert_allclose(zq, jax.nn.log_softmax(z), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(logits, classified, rtol=1e-6)


@pytest.mark.parametrize('name', ['dnn', 'mlr'])
@pytest.mark.parametrize('feature_dim', [None, 160])
def test_pfllib_split_dnn_and_mlr_emit_log_softmax_features(name, feature_dim):
  """PFLlib's DNN and Mclr_Logistic end in log_softmax; its BaseHeadSplit keeps that line, so
  the base emits log_softmax of the hidden ReLU features (MLR: of the flattened input) and
  the head is a linear map of them; under HtFLlib's feature_dim the pool comes first (it
  replaces fc): numpy, float64."""
  from fedjax_lib.models import adaptive_avg_pool_matrix  # pylint: disable=C0415
  x = np.random.default_rng(0).normal(size=(3, 4, 4, 1)).astype(np.float32)
  quirk = make_model(name, (4, 4, 1), 5, log_softmax_features=True, feature_dim=feature_dim)
  plain = make_model(name, (4, 4, 1), 5, feature_dim=feature_dim)
  variables = plain.init(jax.random.PRNGKey(1), x[:1])
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables['params'])
  h = x.reshape(3, -1).astype(np.float64)
  if name == 'dnn':
    h = np.maximum(h @ p['base']['fc1']['kernel'] + p['base']['fc1']['bias'], 0.0)
  if feature_dim is not None:
    h = h @ adaptive_avg_pool_matrix(h.shape[1], feature_dim)
  h = h - h.max(1, keepdims=True)
  f = h - np.log(np.exp(h).sum(1, keepdims=True))
  features, logits = quirk.apply(variables, x, method='forward')
  np.testing.assert_allclose(features, f, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits, f @ p['head']['kernel'] + p['head']['bias'], rtol=1e-5,
                             atol=1e-5)
  assert not np.allclose(plain.apply(variables, x), logits, atol=1e-3)


# ---------------------------------------------------------------------------------------
# Tiny learning checks, one per modality, with the smallest model of each.


def _learns(model, x, y, steps=30, learning_rate=0.5):
  """The full-batch SGD losses of ``steps`` steps from a fresh init (one compiled program)."""
  optimizer = optax.sgd(learning_rate)

  def loss_fn(v):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply(v, x), y).mean()

  def step(carry, _):
    variables, state = carry
    loss, grads = jax.value_and_grad(loss_fn)(variables)
    updates, state = optimizer.update(grads, state)
    return (optax.apply_updates(variables, updates), state), loss

  @jax.jit
  def train():
    variables = model.init(jax.random.PRNGKey(0), x[:1])
    return jax.lax.scan(step, (variables, optimizer.init(variables)), None, length=steps)[1]

  return [float(loss) for loss in train()]


def test_text_model_learns_token_presence():
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 8, size=(32, 6))
  y = (ids == 3).any(axis=1).astype(np.int32)
  model = make_model('textlr', (6,), 2, feature_dim=8, vocab_size=8)
  losses = _learns(model, jnp.asarray(ids, jnp.float32), jnp.asarray(y))
  assert losses[-1] < 0.6 * losses[0], losses


def test_sensor_model_learns_channel_sign():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(32, 1, 20, 9)).astype(np.float32)
  y = (x[..., 0].mean(axis=(1, 2)) > 0).astype(np.int32)
  x[..., 0] += np.where(y, 2.0, -2.0)[:, None, None]
  model = make_model('harcnn1', (1, 20, 9), 2, feature_dim=16)
  losses = _learns(model, jnp.asarray(x), jnp.asarray(y), learning_rate=0.1)
  assert losses[-1] < 0.6 * losses[0], losses


def test_tabular_model_learns_feature_sign():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(32, 20)).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int32)
  model = make_model('amazonmlp_0', (20,), 2)
  losses = _learns(model, jnp.asarray(x), jnp.asarray(y), learning_rate=0.2)
  assert losses[-1] < 0.6 * losses[0], losses


def test_every_pfllib_model_name_resolves():
  """PFLlib's -m strings (reference §4) name this library's models."""
  pfllib = ("MLR, CNN, DNN, ResNet18, ResNet10, ResNet34, AlexNet, GoogleNet, MobileNet, LSTM, "
            "BiLSTM, fastText, TextCNN, Transformer, AmazonMLP, HARCNN")
  assert parse_model_names(pfllib.replace(" ", "")) == (
      "mlr", "cnn", "dnn", "resnet18", "resnet10", "resnet34", "alexnet", "googlenet",
      "mobilenet_v2", "lstm", "bilstm", "fasttext", "textcnn", "transformer", "amazonmlp",
      "harcnn")


@pytest.mark.parametrize('spec, dataset, expected', [
    ('CNN', 'Digit5', ('digit5cnn',)),          # PFLlib main.py: "Digit5" in args.dataset
    ('cnn', '/data/pfl/Digit5-dir0.1/', ('digit5cnn',)),
    ('cnn', 'digit5', ('digit5cnn',)),
    ('FedAvgCNN', 'Digit5', ('cnn',)),          # spelled out: FedAvgCNN
    ('cnn,dnn', 'Digit5', ('cnn', 'dnn')),      # lists and families name their models
    ('CNN', 'Cifar10', ('cnn',)),
    ('CNN', '/data/Digit5/../Cifar10', ('cnn',)),
    ('ResNet18', 'Digit5', ('resnet18',)),
])
def test_pfllib_cnn_on_digit5_is_digit5cnn(spec, dataset, expected):
  assert dataset_architectures(spec, dataset) == expected


def test_alexnet_counts_pools_and_input_size():
  """torchvision's AlexNet: 61,100,840 parameters at 1000 classes, so 57,044,810 at 10;
  AdaptiveAvgPool2d((6, 6)) against PyTorch's bin rule in numpy; 63x63 is the smallest input
  (three 3x3/2 max-pools), as in PyTorch; dropout makes it a training-mode model."""
  from fedjax_lib.models import alexnet  # pylint: disable=import-outside-toplevel
  for classes, count in ((1000, 61_100_840), (10, 57_044_810)):
    model = make_model("AlexNet", (64, 64, 3), classes)
    variables = jax.eval_shape(lambda m=model: m.init(jax.random.key(0),
                                                      jnp.zeros((1, 64, 64, 3))))
    assert count_params(variables) == count
  assert has_train_mode(make_model("alexnet", (64, 64, 3), 10))
  x = np.random.default_rng(0).normal(size=(2, 5, 3, 4)).astype(np.float32)
  expected = np.zeros((2, 6, 6, 4))
  for i in range(6):
    for j in range(6):
      rows = slice(i * 5 // 6, -(-(i + 1) * 5 // 6))
      cols = slice(j * 3 // 6, -(-(j + 1) * 3 // 6))
      expected[:, i, j] = x[:, rows, cols].mean(axis=(1, 2))
  np.testing.assert_allclose(alexnet.adaptive_avg_pool2d(jnp.asarray(x), 6), expected,
                             rtol=1e-6, atol=1e-6)
  features = jax.eval_shape(
      lambda: make_model("alexnet", (63, 63, 3), 10).init_with_output(
          jax.random.key(0), jnp.zeros((2, 63, 63, 3)), method="features")[0])
  assert features.shape == (2, 4096)
  with pytest.raises(ConfigError, match="at least 63x63"):
    make_model("alexnet", (62, 62, 3), 10)
