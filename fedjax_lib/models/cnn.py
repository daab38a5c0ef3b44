"""PFLlib's ``FedAvgCNN``, the "4-layer CNN" (2 conv + 2 dense) of its benchmarks.

Architecture (inputs NHWC; PFLlib's ``models.py``, ``-m CNN``):

* base: conv 5x5 VALID -> 32, ReLU, max-pool 2x2/2; conv 5x5 VALID -> 64, ReLU,
  max-pool 2x2/2; flatten; ``fc1`` dense -> 512, ReLU. Output: 512-d features.
* head: dense 512 -> ``num_classes`` (PyTorch's ``fc``), raw logits.

Parameter counts: 582,026 for 28x28x1 inputs and 10 classes (flatten dim 1024),
878,538 for 32x32x3 / 10 classes (dim 1600), 924,708 for 32x32x3 / 100 classes.

Initialisation follows PyTorch's defaults (see :mod:`fedjax_lib.models.layers`). The
flatten is in NHWC ``(h, w, c)`` order, so ``fc1``'s input rows are a permutation of
PyTorch's ``(c, h, w)`` order; :func:`torch_fc1_permutation` with
:func:`feature_map_shape` gives the permutation needed to load PyTorch weights.
"""

from typing import Any, Optional

import jax
import flax.linen as nn

from fedjax_lib.models.base import BaseHeadModel
from fedjax_lib.models.layers import TorchConv, TorchDense, max_pool_2x2

#: Smallest height/width that survives two (conv 5x5 VALID, pool 2) stages with a
#: non-empty output: floor((H - 4) / 2) - 4 >= 2.
MIN_SPATIAL = 16


def _stage_size(size: int) -> int:
  """Spatial size after one conv-5x5-VALID + max-pool-2 stage."""
  return (size - 4) // 2


def feature_map_shape(height: int, width: int) -> tuple[int, int, int]:
  """``(h, w, c)`` of the last feature map before the flatten, e.g. (4, 4, 64) for 28x28."""
  return _stage_size(_stage_size(height)), _stage_size(_stage_size(width)), 64


class FedAvgCNNBase(nn.Module):
  """The feature extractor of :func:`FedAvgCNN`: NHWC images -> ``(batch, hidden_dim)``.

  Attributes:
    hidden_dim: width of ``fc1``, the feature dimension (512 in PFLlib).
    conv_impl: ``'auto'``, ``'lax'``, ``'patches'``, ``'slices'`` or ``'hybrid'`` (see
      :class:`TorchConv`).
    dtype: the computation dtype (``None``: float32); parameters stay float32.
  """
  hidden_dim: int = 512
  conv_impl: str = 'auto'
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = TorchConv(32, 5, conv_impl=self.conv_impl, dtype=self.dtype, name='conv1')(x)
    x = max_pool_2x2(nn.relu(x))
    x = TorchConv(64, 5, conv_impl=self.conv_impl, dtype=self.dtype, name='conv2')(x)
    x = max_pool_2x2(nn.relu(x))
    x = x.reshape(x.shape[0], -1)
    return nn.relu(TorchDense(self.hidden_dim, dtype=self.dtype, name='fc1')(x))


def FedAvgCNN(num_classes: int, hidden_dim: int = 512,  # pylint: disable=invalid-name
              conv_impl: str = 'auto', dtype: Optional[Any] = None) -> BaseHeadModel:
  """Builds PFLlib's FedAvgCNN as a :class:`BaseHeadModel`.

  Inputs are batches of NHWC images whose height and width are at least
  :data:`MIN_SPATIAL`; :func:`fedjax_lib.models.zoo.make_model` validates that.

  Args:
    num_classes: number of output logits.
    hidden_dim: feature dimension (``fc1`` width).
    conv_impl: ``'auto'`` (``'slices'`` on XLA:CPU, ``'lax'`` elsewhere), ``'lax'``
      (``lax.conv_general_dilated``), ``'patches'`` or ``'slices'`` (im2col and a matmul),
      ``'hybrid'`` (lax forward, im2col gradient);
      see :class:`fedjax_lib.models.layers.TorchConv`.
    dtype: the computation dtype of every layer, e.g. ``jnp.bfloat16`` for mixed precision
      (float32 parameters, float32 features and logits out); ``None`` is plain float32.

  Returns:
    The model; its parameters are ``{'base': {'conv1', 'conv2', 'fc1'}, 'head': ...}``.
  """
  return BaseHeadModel(
      base=FedAvgCNNBase(hidden_dim=hidden_dim, conv_impl=conv_impl, dtype=dtype),
      head=TorchDense(num_classes, dtype=dtype), dtype=dtype)
