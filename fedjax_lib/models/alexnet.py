"""torchvision's AlexNet, PFLlib's ``-m AlexNet``.

PFLlib (``system/main.py``) builds ``torchvision.models.alexnet(pretrained=False,
num_classes=C)``. Here (NHWC images):

* base (:class:`AlexNetBase`, ``(batch, H, W, C)`` -> ``(batch, 4096)``):

  - ``features``: conv 11x11/4 pad 2 -> 64, ReLU, max-pool 3/2; conv 5x5 pad 2 -> 192, ReLU,
    max-pool 3/2; conv 3x3 pad 1 -> 384, ReLU; conv 3x3 pad 1 -> 256, ReLU; conv 3x3 pad 1
    -> 256, ReLU, max-pool 3/2;
  - ``AdaptiveAvgPool2d((6, 6))`` (PyTorch's bins: a 1x1 map is repeated 36 times), flatten
    (9,216);
  - ``classifier`` up to its last layer: dropout 0.5, ``fc6`` 9216 -> 4096, ReLU, dropout 0.5,
    ``fc7`` 4096 -> 4096, ReLU.
* head: ``TorchDense(num_classes)``, torchvision's ``classifier[6]``.

Every layer has PyTorch's default initialisation (torchvision's AlexNet has no
``_initialize_weights``). Parameters: 57,044,810 for 10 classes (torchvision's 61,100,840
for 1000, minus 4,097·990), whatever the input size, thanks to the adaptive pool.

Input size: the three max-pools need a feature map of at least 3x3 each time, so H and W
must be at least 63 (PyTorch fails on smaller inputs too); PFLlib's 64x64 datasets
(Tiny-ImageNet, Flowers102, Stanford Cars, DomainNet) fit, 32x32 ones do not.

Differences from the reference:

* PFLlib's ``BaseHeadSplit`` moves a model's ``fc`` into the head; torchvision's AlexNet has
  no ``fc`` (its last layer is ``classifier[6]``), so PFLlib's algorithms that split the model
  fail with ``-m AlexNet``. Here the head is that last layer and every algorithm runs.
* The flatten is NHWC ``(h, w, c)`` order (PyTorch's is ``(c, h, w)``): ``fc6``'s input rows are
  permuted, which changes nothing when training from scratch.
* The input channel count is taken from the input (torchvision fixes 3).
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from fedjax_lib.errors import ConfigError
from fedjax_lib.models.base import BaseHeadModel
from fedjax_lib.models.layers import TorchConv, TorchDense
from fedjax_lib.models.pooling import adaptive_avg_pool_matrix

#: Smallest height/width for which every max-pool has a window: see the module docstring.
MIN_SPATIAL = 63
POOLED = 6  # AdaptiveAvgPool2d((6, 6))
WIDTH = 4096
DROPOUT = 0.5


def _max_pool(x: jax.Array) -> jax.Array:
  """``MaxPool2d(3, 2)`` (no padding, floor mode) over NHWC ``x``."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


def adaptive_avg_pool2d(x: jax.Array, size: int) -> jax.Array:
  """PyTorch's ``AdaptiveAvgPool2d((size, size))`` over NHWC ``x``: each output cell is the
  mean of its rectangular bin, computed as the 1-D pool along H and then along W (the mean
  of a rectangle is the mean of its rows' means), in float32."""
  height, width = x.shape[1], x.shape[2]
  rows = jnp.asarray(adaptive_avg_pool_matrix(height, size))  # [H, size]
  cols = jnp.asarray(adaptive_avg_pool_matrix(width, size))  # [W, size]
  y = jnp.einsum('nhwc,hi,wj->nijc', x.astype(jnp.float32), rows, cols,
                 precision=lax.Precision.HIGHEST)
  return y.astype(x.dtype)


class AlexNetBase(nn.Module):
  """``features``, the adaptive pool and the classifier up to ``fc7``: ``(batch, 4096)``.

  Attributes:
    dtype: the computation dtype (``None``: float32); parameters stay float32.
  """
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if min(x.shape[1:3]) < MIN_SPATIAL:
      raise ConfigError(f'AlexNet needs images of at least {MIN_SPATIAL}x{MIN_SPATIAL} (its '
                        f'three 3x3/2 max-pools), got {x.shape[1]}x{x.shape[2]}; use a 64x64 '
                        'dataset (tiny_imagenet, flowers102) or another model')
    conv = lambda features, kernel, stride, pad, name: TorchConv(  # noqa: E731
        features, kernel, strides=stride, padding=((pad, pad), (pad, pad)), dtype=self.dtype,
        name=name)
    x = _max_pool(nn.relu(conv(64, 11, 4, 2, 'conv1')(x)))
    x = _max_pool(nn.relu(conv(192, 5, 1, 2, 'conv2')(x)))
    x = nn.relu(conv(384, 3, 1, 1, 'conv3')(x))
    x = nn.relu(conv(256, 3, 1, 1, 'conv4')(x))
    x = _max_pool(nn.relu(conv(256, 3, 1, 1, 'conv5')(x)))
    x = adaptive_avg_pool2d(x, POOLED).reshape(x.shape[0], -1)
    x = nn.Dropout(DROPOUT, deterministic=not train)(x)
    x = nn.relu(TorchDense(WIDTH, dtype=self.dtype, name='fc6')(x))
    x = nn.Dropout(DROPOUT, deterministic=not train)(x)
    return nn.relu(TorchDense(WIDTH, dtype=self.dtype, name='fc7')(x))


def alexnet(num_classes: int, dtype: Optional[Any] = None,
            feature_dim: Optional[int] = None) -> BaseHeadModel:
  """PFLlib's ``torchvision.models.alexnet(pretrained=False, num_classes=C)``.

  Args:
    num_classes: number of output logits.
    dtype: the computation dtype, e.g. ``jnp.bfloat16``; ``None`` is float32.
    feature_dim: HtFLlib's ``--feature_dim``: the 4096-d features are adaptively
      average-pooled to this width before the head (``None``: no pooling).

  Returns:
    The model; ``params = {'base': {conv1 .. conv5, fc6, fc7}, 'head': ...}``. It has dropout:
    train it through :func:`fedjax_lib.models.base.apply_train`.
  """
  return BaseHeadModel(base=AlexNetBase(dtype=dtype), head=TorchDense(num_classes, dtype=dtype),
                       dtype=dtype, feature_dim=feature_dim)
