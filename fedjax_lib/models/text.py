"""PFLlib's and HtFLlib's text classifiers over token ids, with a base/head split.

Inputs are batches of token ids ``[batch, L]`` (``L`` = PFLlib's ``max_len``, 200 for AG
News), id 0 being the padding token PFLlib's tokenizer appends. The federated data layer
stores every sample as float32, so the ids may arrive as floats (exact up to 2^24); every
base casts them to int32. An id outside ``[0, vocab_size)`` looks up NaN, so a too small
``vocab_size`` shows as a non-finite loss, not as silently clamped or wrapped ids.
``vocab_size`` is PFLlib's ``-vs`` (default 80, Shakespeare's; AG News and Sogou News need
32000) and the width ``W`` of the embeddings and hidden states is its
``-fd`` (``--feature_dim``, default 512): with HtFLlib's ``feature_dim`` the width *is* the
feature dimension, so the pool of :class:`~fedjax_lib.models.base.BaseHeadModel` is the
identity for these models.

==============  ===========================================================================
name            base (features) -> head
==============  ===========================================================================
``fasttext``    embedding (padding 0), mean over positions, ``fc1`` W -> W (no activation)
``textlr``      HtFLlib's ``TextLogisticRegression``: embedding, mean over positions
``textcnn``     PFLlib's ``TextCNN``: embedding (padding 0), three convolutions over time
                (100 channels, kernels 3/4/5) with ReLU and max over time, concatenated
                (300), dropout 0.8
``lstm``        ``LSTMNet``: embedding (padding 0), 2-layer LSTM (dropout 0.2 between
                layers), output at the last position, ReLU, dropout 0.2
``gru``         HtFLlib's ``GRUNet``: as ``lstm`` with a GRU and no ReLU
``bilstm``      ``BiLSTM_TextClassification`` (as main.py builds it: 1 layer, dropouts 0):
                embedding, bidirectional LSTM, output at the last position (2W), ``fc1``
                2W -> W
``transformer`` ``TransformerModel``: embedding · sqrt(W) + sinusoidal positions, dropout
                0.1, post-LN encoder layers (ReLU FFN of 2048, dropout 0.1), first token.
                ``transformer_h<H>_l<N>``: H heads, N layers; plain ``transformer`` is
                PFLlib's ``nhead=8, nlayers=2``
==============  ===========================================================================

The head is one dense layer ``features -> num_classes`` (PyTorch's ``fc``). ``textcnn``,
``lstm``, ``gru`` and ``transformer`` have dropout, so they train through
:func:`~fedjax_lib.models.base.apply_train` (algorithms with a train mode). The input shape
``(L,)`` is checked when a model is first traced (a ConfigError for any other rank), not by
``make_model``.

Parameter counts (W = 512, vocab 80, 10 classes; PyTorch's, counted with the reference
modules): fasttext 308,746; textlr 46,090; textcnn 658,670; lstm 4,248,586;
gru 3,197,962; bilstm 4,773,386; transformer 6,350,858 (``_h8_l1`` 3,198,474, ``_l4``
12,655,626, ``_l8`` 25,265,162, ``_l16`` 50,484,234; the number of heads does not change
the count).

**The log-softmax quirk** (option ``log_softmax_features``, default False). PFLlib's and
HtFLlib's ``fastText``, ``TextLogisticRegression``, ``TextCNN``, ``LSTMNet`` and ``GRUNet``
end their ``forward`` in ``log_softmax``; their ``BaseHeadSplit`` replaces ``fc`` by an
identity (PFLlib) or by ``AdaptiveAvgPool1d(feature_dim)`` (HtFLlib) and keeps that last
line, so the base emits ``log_softmax`` of the hidden representation and the head is a
linear map of log-probabilities. Default here: the paper's intent, features = the hidden
representation, head = logits. ``make_model(name, ..., log_softmax_features=True)`` (a model
option, like ``conv_impl``; the runner sets it under ``--pfllib-compat`` when the reference
splits the model, `fedjax_lib.runner.log_softmax_quirk`: PFLlib's whole-model algorithms
such as FedProx end in ``log_softmax`` of the logits, i.e. raw logits) reproduces the
references: features = ``log_softmax`` of the
hidden representation (after the pool to ``feature_dim``, as HtFLlib orders them: only
``textcnn``'s 300-d features are pooled at all). ``bilstm`` and ``transformer`` have no
such line in the references and do not take the option.

Recurrent layers are written here on PyTorch's parameterisation (Flax's cells have one
bias vector per gate instead of two, so their counts differ): per layer and direction
``kernel_ih`` ``(in, G·W)`` (PyTorch's ``weight_ih_l<k>`` transposed), ``kernel_hh``
``(W, G·W)``, ``bias_ih`` and ``bias_hh`` ``(G·W,)``, gates in PyTorch's order (LSTM
``i, f, g, o``: G = 4; GRU ``r, z, n``: G = 3), all initialised ``U(±1/sqrt(W))`` as PyTorch
does. The inputs' contribution is one matmul over all positions; ``lax.scan`` runs the
recurrence.

Differences from the references:

* Initialisation follows PyTorch's distributions, not its random stream (embeddings
  ``N(0, 1)`` with a zero padding row; the Transformer's ``U(±0.1)``, its attention
  ``xavier_uniform_``). ``nn.TransformerEncoder`` deep-copies one layer, so the reference's
  layers all start equal; here each layer draws its own values.
* The padding row of an embedding (``padding_idx=0``) is masked in the lookup: padding
  positions embed to zero and the row gets no gradient, as PyTorch's ``padding_idx``
  gives; the row itself stays in ``params`` (and in the counts).
* ``LSTMNet``/``GRUNet`` pack the sequences with the lengths PFLlib stores, which are all
  ``max_len`` (its generator measures them after padding), so no packing happens there;
  here the whole sequence is always read. Likewise ``bilstm`` takes the output at position
  ``L - 1``, where its backward direction has read one token, as the reference does.
* The Transformer's positional table covers the input's length (the reference's
  ``max_len`` only bounds it); ``textcnn``'s max over time covers all positions (the
  reference's ``MaxPool1d(max_len - k + 1)`` does when ``L = max_len``, the only case it
  accepts).
* Under ``feature_dim`` HtFLlib's head is a fresh ``nn.Linear``; without it PFLlib keeps
  the model's own ``fc``, which for the Transformer is ``U(±0.1)`` with zero bias: both are
  reproduced.
* PFLlib's ``TextCNN`` is the one here (``fc`` 300 -> C); HtFLlib's adds ``fc1`` 300 -> W
  but no family uses it.
"""

import re
from typing import Any, Optional

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from fedjax_lib.errors import ConfigError
from fedjax_lib.models.base import BaseHeadModel
from fedjax_lib.models.layers import TorchConv, TorchDense, torch_uniform_init, zeros_init
from fedjax_lib.models.pooling import adaptive_avg_pool1d, log_softmax_features

#: PFLlib's padding token id (its tokenizer's ``'<pad>'``).
PADDING_ID = 0
#: PFLlib's and HtFLlib's ``-vs`` default.
DEFAULT_VOCAB_SIZE = 80
#: PFLlib's and HtFLlib's ``-fd`` default: the width when no ``feature_dim`` is given.
DEFAULT_WIDTH = 512
#: The architectures of this module (canonical names, without variants).
TEXT_MODELS = ('fasttext', 'textlr', 'textcnn', 'lstm', 'bilstm', 'gru', 'transformer')
#: The architectures whose references end in ``log_softmax`` (see the module docstring).
LOG_SOFTMAX_MODELS = ('fasttext', 'textlr', 'textcnn', 'lstm', 'gru')
#: PFLlib's ``TransformerModel(nhead=8, nlayers=2)``.
TRANSFORMER_DEFAULTS = (8, 2)
TRANSFORMER_FFN_DIM = 2048
LN_EPS = 1e-5

_TRANSFORMER_NAME = re.compile(r'^transformer_h(\d+)_l(\d+)$')


def parse_name(key: str) -> Optional[tuple[str, dict]]:
  """``(architecture, constructor arguments)`` of a lower-case text model name, or None.

  ``'lstm'`` → ``('lstm', {})``; ``'transformer_h4_l2'`` →
  ``('transformer', {'num_heads': 4, 'num_layers': 2})``.
  """
  if key in TEXT_MODELS:
    return key, {}
  match = _TRANSFORMER_NAME.match(key)
  if match is None:
    return None
  heads, layers = int(match.group(1)), int(match.group(2))
  if heads < 1 or layers < 1:
    return None
  return 'transformer', {'num_heads': heads, 'num_layers': layers}


def canonical_name(key: str) -> str:
  """The one spelling of a name :func:`parse_name` accepts: ``transformer_h8_l2`` →
  ``transformer``, leading zeros dropped."""
  arch, kwargs = parse_name(key)
  if arch != 'transformer' or not kwargs:
    return arch
  shape = (kwargs['num_heads'], kwargs['num_layers'])
  return 'transformer' if shape == TRANSFORMER_DEFAULTS else 'transformer_h%d_l%d' % shape


def token_ids(x: jax.Array) -> jax.Array:
  """``x`` as int32 token ids ``[batch, L]``; a ConfigError for any other rank."""
  if x.ndim != 2:
    raise ConfigError(f'text models take token ids of shape (batch, L) (sample_shape (L,)), '
                      f'got shape {x.shape}')
  return x if x.dtype == jnp.int32 else x.astype(jnp.int32)


def _normal_embedding_init(padding_idx: Optional[int]):
  """PyTorch's ``nn.Embedding`` init: ``N(0, 1)``, the padding row zero."""
  def init(key, shape, dtype=jnp.float32):
    table = jax.random.normal(key, shape, dtype)
    return table if padding_idx is None else table.at[padding_idx].set(0)
  return init


def _uniform_init(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _cast(dtype, *arrays):
  return arrays if dtype is None else tuple(a.astype(dtype) for a in arrays)


class Embedding(nn.Module):
  """``nn.Embedding(vocab_size, features, padding_idx)``: ``[batch, L]`` ids -> ``[batch, L,
  features]`` (float32, or ``dtype``).

  Attributes:
    vocab_size: rows of the table.
    features: the embedding width.
    padding_idx: the id that embeds to zero and gets no gradient (None: none).
    init_bound: None for PyTorch's ``N(0, 1)``; a bound ``b`` for ``U(±b)`` (the
      Transformer's ``init_weights``).
    dtype: the output dtype (``None``: float32).
  """
  vocab_size: int
  features: int
  padding_idx: Optional[int] = PADDING_ID
  init_bound: Optional[float] = None
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    init = (_normal_embedding_init(self.padding_idx) if self.init_bound is None
            else _uniform_init(self.init_bound))
    table = self.param('embedding', init, (self.vocab_size, self.features))
    # Out-of-vocabulary ids (negative ones too, which take() would wrap) look up NaN.
    out = jnp.take(table, jnp.where(ids < 0, self.vocab_size, ids), axis=0, mode='fill',
                   fill_value=jnp.nan)
    if self.padding_idx is not None:
      out = jnp.where((ids == self.padding_idx)[..., None], jnp.zeros((), out.dtype), out)
    return out if self.dtype is None else out.astype(self.dtype)


# ---------------------------------------------------------------------------------------
# Recurrent cells (PyTorch's parameterisation and gate order).


def lstm_step(carry: tuple[jax.Array, jax.Array], input_gates: jax.Array,
              kernel_hh: jax.Array, bias_hh: jax.Array):
  """One step of PyTorch's LSTM cell.

  With ``input_gates = x_t @ kernel_ih + bias_ih`` and gates in the order ``i, f, g, o``::

    [i, f, g, o] = input_gates + h @ kernel_hh + bias_hh
    c' = σ(f)·c + σ(i)·tanh(g);   h' = σ(o)·tanh(c')

  Returns ``((h', c'), h')``; the gates and the state are float32.
  """
  h, c = carry
  hidden, kernel = _cast(input_gates.dtype if input_gates.dtype != jnp.float32 else None,
                         h, kernel_hh)
  gates = (input_gates.astype(jnp.float32) + jnp.matmul(hidden, kernel).astype(jnp.float32)
           + bias_hh)
  i, f, g, o = jnp.split(gates, 4, axis=-1)
  c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
  h = jax.nn.sigmoid(o) * jnp.tanh(c)
  return (h, c), h


def gru_step(h: jax.Array, input_gates: jax.Array, kernel_hh: jax.Array, bias_hh: jax.Array):
  """One step of PyTorch's GRU cell.

  With ``input_gates = x_t @ kernel_ih + bias_ih = [x_r, x_z, x_n]`` and
  ``h @ kernel_hh + bias_hh = [h_r, h_z, h_n]``::

    r = σ(x_r + h_r);  z = σ(x_z + h_z);  n = tanh(x_n + r·h_n);  h' = (1 - z)·n + z·h

  Returns ``(h', h')``; float32.
  """
  hidden, kernel = _cast(input_gates.dtype if input_gates.dtype != jnp.float32 else None,
                         h, kernel_hh)
  recurrent = jnp.matmul(hidden, kernel).astype(jnp.float32) + bias_hh
  x_r, x_z, x_n = jnp.split(input_gates.astype(jnp.float32), 3, axis=-1)
  h_r, h_z, h_n = jnp.split(recurrent, 3, axis=-1)
  r = jax.nn.sigmoid(x_r + h_r)
  z = jax.nn.sigmoid(x_z + h_z)
  n = jnp.tanh(x_n + r * h_n)
  h = (1.0 - z) * n + z * h
  return h, h


_GATES = {'lstm': 4, 'gru': 3}


class RecurrentLayer(nn.Module):
  """One layer and direction of ``nn.LSTM`` / ``nn.GRU``: ``[batch, L, in]`` ->
  ``[batch, L, hidden]`` (float32), the output at every position, zero initial state.

  Attributes:
    cell: ``'lstm'`` or ``'gru'``.
    hidden: the state width W.
    reverse: read the sequence from its end (the ``_reverse`` direction); outputs stay
      aligned with the input positions.
    dtype: the matmuls' dtype (``None``: float32); gates and state are float32.
  """
  cell: str
  hidden: int
  reverse: bool = False
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = _GATES[self.cell] * self.hidden
    init = torch_uniform_init(self.hidden)
    kernel_ih = self.param('kernel_ih', init, (x.shape[-1], width))
    kernel_hh = self.param('kernel_hh', init, (self.hidden, width))
    bias_ih = self.param('bias_ih', init, (width,))
    bias_hh = self.param('bias_hh', init, (width,))
    inputs, kernel = _cast(self.dtype, x, kernel_ih)
    input_gates = jnp.matmul(inputs, kernel) + _cast(self.dtype, bias_ih)[0]
    zeros = jnp.zeros((x.shape[0], self.hidden), jnp.float32)
    if self.cell == 'lstm':
      step, carry = lstm_step, (zeros, zeros)
    else:
      step, carry = gru_step, zeros
    _, outputs = lax.scan(lambda c, g: step(c, g, kernel_hh, bias_hh), carry,
                          jnp.swapaxes(input_gates, 0, 1), reverse=self.reverse)
    return jnp.swapaxes(outputs, 0, 1)


class Recurrent(nn.Module):
  """``nn.LSTM`` / ``nn.GRU(batch_first=True)``: stacked layers, optionally bidirectional
  (outputs ``[forward, backward]`` concatenated), dropout between layers in training.

  Parameters per layer ``k``: ``l<k>`` and, bidirectional, ``l<k>_reverse`` (PyTorch's
  ``*_l<k>`` and ``*_l<k>_reverse``), each a :class:`RecurrentLayer`.

  Attributes:
    cell: ``'lstm'`` or ``'gru'``.
    hidden: the state width.
    num_layers: stacked layers.
    bidirectional: add a reverse direction per layer.
    dropout_rate: dropout on every layer's output but the last (training only).
    dtype: the matmuls' dtype (``None``: float32).
  """
  cell: str
  hidden: int
  num_layers: int = 1
  bidirectional: bool = False
  dropout_rate: float = 0.0
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for k in range(self.num_layers):
      if k and self.dropout_rate:
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
      out = RecurrentLayer(self.cell, self.hidden, dtype=self.dtype, name=f'l{k}')(x)
      if self.bidirectional:
        back = RecurrentLayer(self.cell, self.hidden, reverse=True, dtype=self.dtype,
                              name=f'l{k}_reverse')(x)
        out = jnp.concatenate([out, back], axis=-1)
      x = out
    return x


# ---------------------------------------------------------------------------------------
# Bases.


class FastTextBase(nn.Module):
  """``fastText`` without ``fc``: ids -> ``fc1(mean_t embed(ids))``, ``(batch, width)``."""
  vocab_size: int = DEFAULT_VOCAB_SIZE
  width: int = DEFAULT_WIDTH
  log_softmax_features: bool = False
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    embedded = Embedding(self.vocab_size, self.width, name='embedding')(token_ids(x))
    h = TorchDense(self.width, dtype=self.dtype, name='fc1')(embedded.mean(axis=1))
    return log_softmax_features(h, self.log_softmax_features)


class TextLRBase(nn.Module):
  """``TextLogisticRegression`` without ``fc``: ids -> mean embedding (no padding id)."""
  vocab_size: int = DEFAULT_VOCAB_SIZE
  width: int = DEFAULT_WIDTH
  log_softmax_features: bool = False
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    embedded = Embedding(self.vocab_size, self.width, padding_idx=None,
                         name='embedding')(token_ids(x))
    return log_softmax_features(embedded.mean(axis=1), self.log_softmax_features)


class TextCNNBase(nn.Module):
  """PFLlib's ``TextCNN`` without ``fc``: ids -> ``(batch, channels · len(kernel_sizes))``.

  Attributes:
    pool_to: with ``log_softmax_features``, the width the features are pooled to before the
      ``log_softmax`` (HtFLlib's order; ``make_model`` passes ``feature_dim``).
  """
  vocab_size: int = DEFAULT_VOCAB_SIZE
  width: int = DEFAULT_WIDTH
  channels: int = 100
  kernel_sizes: tuple = (3, 4, 5)
  dropout_rate: float = 0.8
  log_softmax_features: bool = False
  pool_to: Optional[int] = None
  conv_impl: str = 'auto'
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    ids = token_ids(x)
    if ids.shape[1] < max(self.kernel_sizes):
      raise ConfigError(f'textcnn needs sequences of at least {max(self.kernel_sizes)} '
                        f'tokens, got length {ids.shape[1]}')
    embedded = Embedding(self.vocab_size, self.width, dtype=self.dtype,
                         name='embedding')(ids)[:, None]     # [batch, 1, L, width]: NHWC
    pooled = []
    for i, k in enumerate(self.kernel_sizes):
      y = TorchConv(self.channels, (1, k), conv_impl=self.conv_impl, dtype=self.dtype,
                    name=f'conv{i + 1}')(embedded)
      pooled.append(nn.relu(y).max(axis=(1, 2)))
    z = nn.Dropout(self.dropout_rate, deterministic=not train)(jnp.concatenate(pooled, -1))
    return log_softmax_features(z, self.log_softmax_features, self.pool_to)


class LSTMBase(nn.Module):
  """``LSTMNet`` (``cell='lstm'``) or ``GRUNet`` (``cell='gru'``) without ``fc``: ids ->
  the top layer's output at the last position (ReLU'd for the LSTM), dropout."""
  cell: str = 'lstm'
  vocab_size: int = DEFAULT_VOCAB_SIZE
  width: int = DEFAULT_WIDTH
  num_layers: int = 2
  dropout_rate: float = 0.2
  log_softmax_features: bool = False
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    embedded = Embedding(self.vocab_size, self.width, name='embedding')(token_ids(x))
    out = Recurrent(self.cell, self.width, self.num_layers, dropout_rate=self.dropout_rate,
                    dtype=self.dtype, name=self.cell)(embedded, train)[:, -1]
    if self.cell == 'lstm':
      out = nn.relu(out)
    out = nn.Dropout(self.dropout_rate, deterministic=not train)(out)
    return log_softmax_features(out, self.log_softmax_features)


class BiLSTMBase(nn.Module):
  """``BiLSTM_TextClassification`` (1 layer, dropouts 0, no attention) without ``fc``: ids
  -> ``fc1`` of the bidirectional output at the last position, ``(batch, width)``."""
  vocab_size: int = DEFAULT_VOCAB_SIZE
  width: int = DEFAULT_WIDTH
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    embedded = Embedding(self.vocab_size, self.width, padding_idx=None,
                         name='word_embeddings')(token_ids(x))
    out = Recurrent('lstm', self.width, bidirectional=True, dtype=self.dtype,
                    name='lstm_layer')(embedded)[:, -1]
    return TorchDense(self.width, dtype=self.dtype, name='fc1')(out)


def positional_encoding(length: int, width: int) -> np.ndarray:
  """The sinusoidal table ``[length, width]``: ``sin`` in even, ``cos`` in odd columns of
  ``position · 10000^(-2i / width)``."""
  position = np.arange(length, dtype=np.float64)[:, None]
  rates = np.exp(np.arange(0, width, 2, dtype=np.float64) * (-np.log(10000.0) / width))
  table = np.zeros((length, width))
  table[:, 0::2] = np.sin(position * rates)
  table[:, 1::2] = np.cos(position * rates)[:, :width // 2]
  return table.astype(np.float32)


class SelfAttention(nn.Module):
  """``nn.MultiheadAttention(width, num_heads, dropout)`` as ``attn(x, x, x)`` (no mask):
  ``in_proj`` to q, k, v (``xavier_uniform_``, bias 0), softmax attention per head with
  dropout on the weights, ``out_proj`` (PyTorch's Linear default, bias 0)."""
  num_heads: int
  dropout_rate: float = 0.1
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    batch, length, width = x.shape
    if width % self.num_heads:
      raise ConfigError(f'transformer width {width} is not divisible by its '
                        f'{self.num_heads} heads')
    head_dim = width // self.num_heads
    qkv = TorchDense(3 * width, kernel_init=nn.initializers.xavier_uniform(),
                     bias_init=zeros_init, dtype=self.dtype, name='in_proj')(x)
    q, k, v = (t.reshape(batch, length, self.num_heads, head_dim)
               for t in jnp.split(qkv, 3, axis=-1))
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) * (1.0 / np.sqrt(head_dim))
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights = nn.Dropout(self.dropout_rate, deterministic=not train)(weights).astype(v.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(batch, length, width)
    return TorchDense(width, bias_init=zeros_init, dtype=self.dtype, name='out_proj')(out)


class EncoderLayer(nn.Module):
  """``nn.TransformerEncoderLayer(width, num_heads, ffn_dim, dropout, batch_first=True)``:
  post-LN, ReLU::

    x = norm1(x + dropout(attn(x)));  x = norm2(x + dropout(linear2(dropout(relu(linear1(x))))))
  """
  num_heads: int
  ffn_dim: int = TRANSFORMER_FFN_DIM
  dropout_rate: float = 0.1
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    drop = lambda y: nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    norm = lambda name: nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, use_fast_variance=False,
                                     name=name)
    y = SelfAttention(self.num_heads, self.dropout_rate, dtype=self.dtype,
                      name='self_attn')(x, train)
    x = norm('norm1')(x + drop(y).astype(x.dtype)).astype(jnp.float32)
    y = nn.relu(TorchDense(self.ffn_dim, dtype=self.dtype, name='linear1')(x))
    y = TorchDense(x.shape[-1], dtype=self.dtype, name='linear2')(drop(y))
    return norm('norm2')(x + drop(y).astype(x.dtype)).astype(jnp.float32)


class TransformerBase(nn.Module):
  """``TransformerModel`` without ``fc``: ids -> the encoder's output at position 0."""
  vocab_size: int = DEFAULT_VOCAB_SIZE
  width: int = DEFAULT_WIDTH
  num_heads: int = TRANSFORMER_DEFAULTS[0]
  num_layers: int = TRANSFORMER_DEFAULTS[1]
  ffn_dim: int = TRANSFORMER_FFN_DIM
  dropout_rate: float = 0.1
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    ids = token_ids(x)
    x = Embedding(self.vocab_size, self.width, padding_idx=None, init_bound=0.1,
                  name='embedding')(ids) * np.sqrt(self.width)
    x = x + positional_encoding(ids.shape[1], self.width)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    for i in range(self.num_layers):
      x = EncoderLayer(self.num_heads, self.ffn_dim, self.dropout_rate, dtype=self.dtype,
                       name=f'layers_{i}')(x, train)
    return x[:, 0]


# ---------------------------------------------------------------------------------------
# Constructors.


def text_model(arch: str, num_classes: int, vocab_size: int = DEFAULT_VOCAB_SIZE,
               feature_dim: Optional[int] = None, log_softmax_features: bool = False,
               num_heads: int = TRANSFORMER_DEFAULTS[0],
               num_layers: int = TRANSFORMER_DEFAULTS[1],
               conv_impl: str = 'auto', dtype: Optional[Any] = None) -> BaseHeadModel:
  """Builds the text model ``arch`` (one of :data:`TEXT_MODELS`).

  Args:
    arch: the architecture.
    num_classes: number of logits.
    vocab_size: PFLlib's ``-vs``: rows of the embedding table (ids ``0 .. vocab_size-1``).
    feature_dim: HtFLlib's ``--feature_dim``, the width of embeddings and hidden states
      (None: PFLlib's default 512). It also selects HtFLlib's head initialisation (see the
      module docstring); the caller sets ``BaseHeadModel.feature_dim``.
    log_softmax_features: the references' quirk (module docstring); only for
      :data:`LOG_SOFTMAX_MODELS`.
    num_heads, num_layers: the Transformer's ``nhead``, ``nlayers``.
    conv_impl: ``textcnn``'s convolution implementation (see ``TorchConv``).
    dtype: the computation dtype (``None``: float32).

  Returns:
    The model: ``params = {'base': {embedding, ...}, 'head': {kernel, bias}}``.
  """
  if arch not in TEXT_MODELS:
    raise ConfigError(f'unknown text model {arch!r}; choose one of: {", ".join(TEXT_MODELS)}')
  if log_softmax_features and arch not in LOG_SOFTMAX_MODELS:
    raise ConfigError(f'{arch} has no log_softmax in its reference; log_softmax_features '
                      f'applies to {", ".join(LOG_SOFTMAX_MODELS)}')
  width = DEFAULT_WIDTH if feature_dim is None else int(feature_dim)
  common = dict(vocab_size=int(vocab_size), width=width, dtype=dtype)
  quirk = dict(log_softmax_features=bool(log_softmax_features))
  if arch == 'fasttext':
    base = FastTextBase(**common, **quirk)
  elif arch == 'textlr':
    base = TextLRBase(**common, **quirk)
  elif arch == 'textcnn':
    base = TextCNNBase(**common, **quirk, pool_to=feature_dim, conv_impl=conv_impl)
  elif arch in ('lstm', 'gru'):
    base = LSTMBase(cell=arch, **common, **quirk)
  elif arch == 'bilstm':
    base = BiLSTMBase(**common)
  else:
    if width % num_heads:
      raise ConfigError(f'transformer width {width} (feature_dim) is not divisible by '
                        f'num_heads={num_heads}')
    base = TransformerBase(**common, num_heads=int(num_heads), num_layers=int(num_layers))
  if arch == 'transformer' and feature_dim is None:
    # PFLlib keeps the model's own fc: init_weights() draws it U(±0.1) with a zero bias.
    head = TorchDense(num_classes, kernel_init=_uniform_init(0.1), bias_init=zeros_init,
                      dtype=dtype)
  else:
    head = TorchDense(num_classes, dtype=dtype)
  return BaseHeadModel(base=base, head=head, dtype=dtype)
