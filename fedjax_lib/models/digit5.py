"""PFLlib's ``Digit5CNN`` (from KD3A), for the 32x32x3 Digit-5 domains.

Architecture (inputs NHWC; PFLlib's ``models.py``, chosen by ``-m CNN`` on a dataset named
``Digit5*``):

* base: three blocks ``conv 5x5 pad 2 -> BatchNorm -> ReLU`` with 64, 64 and 128 channels,
  the first two followed by ``MaxPool2d(3, stride=2, padding=1)`` (32 -> 16 -> 8); flatten
  (8192 for 32x32); ``fc1`` Linear(8192, 3072) -> BatchNorm1d -> ReLU -> dropout 0.5;
  ``fc2`` Linear(3072, 2048) -> BatchNorm1d -> ReLU. Output: 2048-d features.
* head: ``fc`` Linear(2048, C).

31,805,898 parameters for 32x32x3 inputs and 10 classes (PyTorch's count of the reference
module; BatchNorm's running statistics are state, not parameters).

Differences from the reference: the head has ``num_classes`` outputs (the reference
hard-codes 10, Digit-5's count) and ``fc1``'s width is read from the input (the reference
hard-codes 8192, i.e. 32x32 inputs); the flatten is NHWC-ordered; initialisation follows
PyTorch's distributions, not its random stream. BatchNorm and dropout make the base
train-mode (see :func:`fedjax_lib.models.base.apply_train`).
"""

from typing import Any, Optional

import jax
import flax.linen as nn

from fedjax_lib.models.base import BaseHeadModel
from fedjax_lib.models.layers import TorchBatchNorm, TorchConv, TorchDense


class Digit5CNNBase(nn.Module):
  """The feature extractor of :func:`Digit5CNN`: NHWC images -> ``(batch, 2048)``."""
  conv_impl: str = 'auto'
  dropout_rate: float = 0.5
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i, features in enumerate((64, 64, 128)):
      x = TorchConv(features, 5, padding=((2, 2), (2, 2)), conv_impl=self.conv_impl,
                    dtype=self.dtype, name=f'conv{i + 1}')(x)
      x = nn.relu(TorchBatchNorm(dtype=self.dtype, name=f'bn{i + 1}')(x, train))
      if i < 2:
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(TorchBatchNorm(dtype=self.dtype, name='bn4')(
        TorchDense(3072, dtype=self.dtype, name='fc1')(x), train))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.relu(TorchBatchNorm(dtype=self.dtype, name='bn5')(
        TorchDense(2048, dtype=self.dtype, name='fc2')(x), train))


def Digit5CNN(num_classes: int = 10, conv_impl: str = 'auto',  # pylint: disable=invalid-name
              dtype: Optional[Any] = None) -> BaseHeadModel:
  """Builds PFLlib's ``Digit5CNN`` as a :class:`BaseHeadModel`.

  Args:
    num_classes: number of logits (10 for Digit-5).
    conv_impl: see :class:`~fedjax_lib.models.layers.TorchConv`.
    dtype: the computation dtype (``None``: float32).

  Returns:
    The model; ``params = {'base': {conv1..3, bn1..5, fc1, fc2}, 'head': {kernel, bias}}``
    and ``batch_stats`` for the five BatchNorms.
  """
  return BaseHeadModel(base=Digit5CNNBase(conv_impl=conv_impl, dtype=dtype),
                       head=TorchDense(num_classes, dtype=dtype), dtype=dtype)
