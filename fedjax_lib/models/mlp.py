"""PFLlib's fully connected models: ``DNN``, ``Mclr_Logistic`` (``-m MLR``) and ``AmazonMLP``.

Both flatten their input (NHWC images or flat vectors) after the batch axis.

* ``DNN``: base = flatten, ``fc1`` dense ``in -> 100``, ReLU; head = dense
  ``100 -> num_classes``. 79,510 parameters for 784 inputs and 10 classes.
* ``MLR`` (multinomial logistic regression): base = flatten (identity features, no
  parameters); head = dense ``in -> num_classes``. 7,850 parameters for 784 / 10.

* ``AmazonMLP`` (Amazon Review: 5000-d bag-of-words, 2 classes): base = flatten, dense
  layers of ``hidden_dims`` with ReLU, then dense -> 100 with ReLU; head = dense
  ``100 -> num_classes``. PFLlib's has ``hidden_dims = (1000, 500)`` (5,551,802 parameters);
  HtFLlib's ``AmazonMLP(feature_dim=[...])`` takes the list, and its families ``MLPs``,
  ``MLP_1layer`` and ``MLP_layers`` use ``[]``, ``[200]``, ``[500]``, ``[1000, 500]`` and
  ``[1000, 500, 200]``: the names ``amazonmlp_0``, ``amazonmlp_200``, ``amazonmlp_500``,
  ``amazonmlp`` and ``amazonmlp_1000_500_200`` (:func:`parse_amazonmlp_name`). Under
  HtFLlib's ``feature_dim`` (512) the 100-d features are pooled (replicated) to 512 and the
  head is ``512 -> 2``: bases 500,100 / 1,020,300 / 2,550,600 / 5,551,600 / 5,621,800
  parameters, head 1,026 (PyTorch's counts of the reference modules).

Deliberate difference: PFLlib ends both forwards with ``log_softmax`` and then applies
``CrossEntropyLoss``, i.e. a second log-softmax. ``log_softmax`` is idempotent
(``log_softmax(log_softmax(z)) == log_softmax(z)``), so that loss equals cross-entropy
on the raw logits, and argmax predictions are unchanged; these models therefore output
raw logits. PFLlib's ``BaseHeadSplit`` (FedAvg, FedPer, MOON, ...: the algorithms whose
reference splits the model) replaces ``fc`` by an identity and keeps that last line, so
DNN's base emits ``log_softmax`` of its hidden features and MLR's ``log_softmax`` of the
flattened input; here the bases emit the ReLU features and the input, as for every other
model, and ``log_softmax_features=True`` (the runner's ``--pfllib-compat`` where the
reference splits, as for the text models: `fedjax_lib.models.text`) reproduces PFLlib's.

Initialisation follows PyTorch's defaults (see :mod:`fedjax_lib.models.layers`).
"""

import re
from typing import Any, Optional

import jax
import flax.linen as nn

from fedjax_lib.models.base import BaseHeadModel
from fedjax_lib.models.layers import TorchDense
from fedjax_lib.models.pooling import log_softmax_features


class Flatten(nn.Module):
  """Flattens everything after the batch axis: ``(batch, ...) -> (batch, prod(...))``.

  Attributes:
    log_softmax_features: return ``log_softmax`` of the flattened input (PFLlib's split
      ``Mclr_Logistic``, see the module docstring).
    pool_to: with ``log_softmax_features``, the width pooled to first (``feature_dim``).
  """
  log_softmax_features: bool = False
  pool_to: Optional[int] = None

  def __call__(self, x: jax.Array) -> jax.Array:
    return log_softmax_features(x.reshape(x.shape[0], -1), self.log_softmax_features,
                                self.pool_to)


class MLPBase(nn.Module):
  """Flatten, then one dense layer with ReLU: the base of :func:`DNN`.

  Attributes:
    hidden_dim: output width (100 in PFLlib).
    dtype: the computation dtype (``None``: float32); parameters stay float32.
    log_softmax_features: return ``log_softmax`` of the ReLU features (PFLlib's split
      ``DNN``, see the module docstring).
    pool_to: with ``log_softmax_features``, the width pooled to first (``feature_dim``).
  """
  hidden_dim: int = 100
  dtype: Optional[Any] = None
  log_softmax_features: bool = False
  pool_to: Optional[int] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.relu(TorchDense(self.hidden_dim, dtype=self.dtype, name='fc1')(Flatten()(x)))
    return log_softmax_features(h, self.log_softmax_features, self.pool_to)


def DNN(num_classes: int, hidden_dim: int = 100,  # pylint: disable=invalid-name
        dtype: Optional[Any] = None, log_softmax_features: bool = False,
        feature_dim: Optional[int] = None) -> BaseHeadModel:
  """Builds PFLlib's ``DNN`` (one hidden layer) as a :class:`BaseHeadModel`.

  Args:
    num_classes: number of output logits.
    hidden_dim: width of the hidden layer, the feature dimension.
    dtype: the computation dtype, e.g. ``jnp.bfloat16`` for mixed precision (float32
      parameters, float32 features and logits out); ``None`` is plain float32.
    log_softmax_features: features = ``log_softmax`` of the hidden layer, as PFLlib's
      ``BaseHeadSplit`` of its DNN (the module docstring).
    feature_dim: with ``log_softmax_features``, the common feature width the hidden layer
      is pooled to before the ``log_softmax`` (HtFLlib's order); the caller still sets the
      model's own ``feature_dim`` (`fedjax_lib.models.make_model` does).

  Returns:
    The model; parameters ``{'base': {'fc1': ...}, 'head': ...}``.
  """
  base = MLPBase(hidden_dim=hidden_dim, dtype=dtype,
                 log_softmax_features=bool(log_softmax_features), pool_to=feature_dim)
  return BaseHeadModel(base=base, head=TorchDense(num_classes, dtype=dtype), dtype=dtype)


def MLR(num_classes: int,  # pylint: disable=invalid-name
        dtype: Optional[Any] = None, log_softmax_features: bool = False,
        feature_dim: Optional[int] = None) -> BaseHeadModel:
  """Builds multinomial logistic regression (PFLlib's ``Mclr_Logistic``).

  Args:
    num_classes: number of output logits.
    dtype: the computation dtype of the head (``None``: float32); the features are the
      flattened inputs themselves.
    log_softmax_features: features = ``log_softmax`` of the flattened input, as PFLlib's
      ``BaseHeadSplit`` of its ``Mclr_Logistic`` (the module docstring).
    feature_dim: as for :func:`DNN`.

  Returns:
    The model; its base is the identity on flattened inputs, so its parameters are
    ``{'head': ...}`` only.
  """
  return BaseHeadModel(base=Flatten(log_softmax_features=bool(log_softmax_features),
                                    pool_to=feature_dim),
                       head=TorchDense(num_classes, dtype=dtype), dtype=dtype)


#: PFLlib's ``AmazonMLP``: hidden widths before the 100-d output layer.
AMAZON_HIDDEN = (1000, 500)
#: The width of ``AmazonMLP``'s features.
AMAZON_FEATURES = 100

_AMAZON_NAME = re.compile(r'^amazonmlp((?:_\d+)*)$')


def parse_amazonmlp_name(key: str) -> Optional[tuple[int, ...]]:
  """The hidden widths of a lower-case ``AmazonMLP`` name, or None.

  ``'amazonmlp'`` is PFLlib's ``(1000, 500)``; ``'amazonmlp_500'`` → ``(500,)``,
  ``'amazonmlp_1000_500_200'`` → ``(1000, 500, 200)``; ``'amazonmlp_0'`` → ``()`` (no hidden
  layer: 5000 -> 100 directly, HtFLlib's ``feature_dim=[]``).
  """
  match = _AMAZON_NAME.match(key)
  if match is None:
    return None
  widths = tuple(int(w) for w in match.group(1).split('_')[1:])
  if not widths:
    return AMAZON_HIDDEN
  if widths == (0,):
    return ()
  return widths if all(w >= 1 for w in widths) else None


def amazonmlp_name(hidden_dims: tuple[int, ...]) -> str:
  """The canonical name of ``AmazonMLP(hidden_dims)``; inverse of :func:`parse_amazonmlp_name`."""
  if tuple(hidden_dims) == AMAZON_HIDDEN:
    return 'amazonmlp'
  return 'amazonmlp_' + ('_'.join(str(w) for w in hidden_dims) if hidden_dims else '0')


class AmazonMLPBase(nn.Module):
  """Flatten, dense + ReLU layers of ``hidden_dims``, dense -> ``out_dim`` + ReLU: the base of
  :func:`AmazonMLP` (layers ``fc1``, ``fc2``, ...; PyTorch's ``encoder.0``, ``encoder.2``, ...).

  Attributes:
    hidden_dims: the hidden widths.
    out_dim: the feature width (100).
    dtype: the computation dtype (``None``: float32).
  """
  hidden_dims: tuple = AMAZON_HIDDEN
  out_dim: int = AMAZON_FEATURES
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = Flatten()(x)
    for i, width in enumerate((*self.hidden_dims, self.out_dim)):
      x = nn.relu(TorchDense(width, dtype=self.dtype, name=f'fc{i + 1}')(x))
    return x


def AmazonMLP(num_classes: int = 2,  # pylint: disable=invalid-name
              hidden_dims: tuple = AMAZON_HIDDEN,
              dtype: Optional[Any] = None) -> BaseHeadModel:
  """Builds PFLlib's / HtFLlib's ``AmazonMLP`` as a :class:`BaseHeadModel`.

  Args:
    num_classes: number of logits (2 for Amazon Review; the reference hard-codes 2).
    hidden_dims: the hidden widths before the 100-d feature layer (PFLlib: (1000, 500);
      HtFLlib's ``feature_dim`` list).
    dtype: the computation dtype (``None``: float32).

  Returns:
    The model; parameters ``{'base': {'fc1', ...}, 'head': ...}``.
  """
  return BaseHeadModel(base=AmazonMLPBase(tuple(hidden_dims), dtype=dtype),
                       head=TorchDense(num_classes, dtype=dtype), dtype=dtype)
