"""PFLlib's fully connected models: ``DNN`` and ``Mclr_Logistic`` (``-m MLR``).

Both flatten their input (NHWC images or flat vectors) after the batch axis.

* ``DNN``: base = flatten, ``fc1`` dense ``in -> 100``, ReLU; head = dense
  ``100 -> num_classes``. 79,510 parameters for 784 inputs and 10 classes.
* ``MLR`` (multinomial logistic regression): base = flatten (identity features, no
  parameters); head = dense ``in -> num_classes``. 7,850 parameters for 784 / 10.

Deliberate difference: PFLlib ends both forwards with ``log_softmax`` and then applies
``CrossEntropyLoss``, i.e. a second log-softmax. ``log_softmax`` is idempotent
(``log_softmax(log_softmax(z)) == log_softmax(z)``), so that loss equals cross-entropy
on the raw logits, and argmax predictions are unchanged; these models therefore output
raw logits. (PFLlib's split also makes DNN's base emit ``log_softmax`` of its hidden
features; here the base emits the ReLU features, as for every other model.)

Initialisation follows PyTorch's defaults (see :mod:`fedjax_lib.models.layers`).
"""

from typing import Any, Optional

import jax
import flax.linen as nn

from fedjax_lib.models.base import BaseHeadModel
from fedjax_lib.models.layers import TorchDense


class Flatten(nn.Module):
  """Flattens everything after the batch axis: ``(batch, ...) -> (batch, prod(...))``."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1)


class MLPBase(nn.Module):
  """Flatten, then one dense layer with ReLU: the base of :func:`DNN`.

  Attributes:
    hidden_dim: output width (100 in PFLlib).
    dtype: the computation dtype (``None``: float32); parameters stay float32.
  """
  hidden_dim: int = 100
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.relu(TorchDense(self.hidden_dim, dtype=self.dtype, name='fc1')(Flatten()(x)))


def DNN(num_classes: int, hidden_dim: int = 100,  # pylint: disable=invalid-name
        dtype: Optional[Any] = None) -> BaseHeadModel:
  """Builds PFLlib's ``DNN`` (one hidden layer) as a :class:`BaseHeadModel`.

  Args:
    num_classes: number of output logits.
    hidden_dim: width of the hidden layer, the feature dimension.
    dtype: the computation dtype, e.g. ``jnp.bfloat16`` for mixed precision (float32
      parameters, float32 features and logits out); ``None`` is plain float32.

  Returns:
    The model; parameters ``{'base': {'fc1': ...}, 'head': ...}``.
  """
  return BaseHeadModel(base=MLPBase(hidden_dim=hidden_dim, dtype=dtype),
                       head=TorchDense(num_classes, dtype=dtype), dtype=dtype)


def MLR(num_classes: int,  # pylint: disable=invalid-name
        dtype: Optional[Any] = None) -> BaseHeadModel:
  """Builds multinomial logistic regression (PFLlib's ``Mclr_Logistic``).

  Args:
    num_classes: number of output logits.
    dtype: the computation dtype of the head (``None``: float32); the features are the
      flattened inputs themselves.

  Returns:
    The model; its base is the identity on flattened inputs, so its parameters are
    ``{'head': ...}`` only.
  """
  return BaseHeadModel(base=Flatten(), head=TorchDense(num_classes, dtype=dtype), dtype=dtype)
