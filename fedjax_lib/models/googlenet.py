"""torchvision's GoogLeNet (Inception v1 with BatchNorm), as HtFLlib uses it.

HtFLlib (``system/main.py``) builds ``torchvision.models.googlenet(pretrained=False,
aux_logits=False, num_classes=C)`` and ``BaseHeadSplit`` moves its ``fc`` into the head,
putting ``AdaptiveAvgPool1d(feature_dim)`` in its place. Here:

* base (:class:`GoogLeNetBase`, NHWC images -> ``(batch, 1024)``):

  - stem: ``conv1`` 7x7/2 pad 3 -> 64, max-pool 3/2 (ceil mode), ``conv2`` 1x1 -> 64,
    ``conv3`` 3x3 pad 1 -> 192, max-pool 3/2 (ceil mode);
  - ``inception3a``, ``inception3b``, max-pool 3/2 (ceil mode), ``inception4a`` ..
    ``inception4e``, max-pool 2/2 (ceil mode), ``inception5a``, ``inception5b`` (1024
    channels);
  - global average pool, dropout 0.2 (torchvision's ``dropout`` default; it stays in the
    base because HtFLlib replaces only ``fc``).

  Every convolution is a ``BasicConv2d``: conv without bias, ``BatchNorm2d(eps=0.001)``
  (not PyTorch's default 1e-5), ReLU. An inception block concatenates four branches:
  1x1; 1x1 -> 3x3; 1x1 -> 3x3 (torchvision's "5x5" branch really is 3x3, its documented
  bug pytorch/vision#906, kept here); max-pool 3/1 pad 1 (ceil mode) -> 1x1.
* head: ``TorchDense(num_classes)`` (HtFLlib's ``nn.Linear(feature_dim, C)``, PyTorch's
  default initialisation).

Initialisation (torchvision's ``_initialize_weights``): every conv kernel
``trunc_normal_(std=0.01, a=-2, b=2)``; BatchNorm scale 1, bias 0.

Parameter counts (``params`` only; BatchNorm running statistics are in ``batch_stats``):
base 5,599,904; with ``feature_dim=512`` and 10 classes the model has 5,605,034
(torchvision's 6,624,904 for 1000 classes, minus ``fc`` 1,025,000, plus the 5,130 of
``Linear(512, 10)``); without ``feature_dim`` and 10 classes 5,610,154.

Differences from the reference:

* Only ``aux_logits=False`` (what HtFLlib uses): no auxiliary classifiers.
* ``transform_input`` is False (torchvision's default when not pretrained): no ImageNet
  re-normalisation of the input.
* The input channel count is taken from the input (torchvision fixes ``conv1`` to 3 input
  channels).
* ``dtype`` (mixed precision) is an addition; max-pools pad with ``-inf`` exactly as
  PyTorch's do.
* Parameter names follow PyTorch's module names (``conv1/conv``, ``conv1/bn``,
  ``inception3a/branch2_1/conv``, ...; ``branchK_i`` is PyTorch's ``branchK.i``, and the
  pooling branch's conv is ``branch4_1``). Kernels are HWIO (PyTorch's OIHW transposed
  ``(2, 3, 1, 0)``).

Inputs must be at least :data:`MIN_SPATIAL` (15) pixels high and wide (as torchvision
documents); smaller inputs raise :class:`~fedjax_lib.errors.ConfigError`. For 32x32
inputs the spatial sizes are 16 (conv1), 8, 4 (inception3), 2 (inception4), 1 (inception5).
"""

from typing import Any, Optional, Sequence

import jax
from jax import lax
import jax.numpy as jnp
import flax.linen as nn

from fedjax_lib.errors import ConfigError
from fedjax_lib.models.base import BaseHeadModel
from fedjax_lib.models.layers import (TorchBatchNorm, TorchConv, TorchDense,
                                      trunc_normal_init)

#: Width of the base's output (the input of torchvision's ``fc``).
PENULTIMATE = {'googlenet': 1024}

#: Smallest input height/width (torchvision: "The required minimum input size of the model
#: is 15x15").
MIN_SPATIAL = 15

#: BatchNorm epsilon of torchvision's ``BasicConv2d``.
BN_EPS = 1e-3

#: Dropout before torchvision's ``fc``.
DROPOUT = 0.2

#: Inception blocks: ``name: (ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj)``, in
#: order; ``'pool'`` entries are torchvision's ``maxpool3`` (3/2) and ``maxpool4`` (2/2).
INCEPTION_BLOCKS = (
    ('inception3a', (64, 96, 128, 16, 32, 32)),
    ('inception3b', (128, 128, 192, 32, 96, 64)),
    ('maxpool3', (3, 2)),
    ('inception4a', (192, 96, 208, 16, 48, 64)),
    ('inception4b', (160, 112, 224, 24, 64, 64)),
    ('inception4c', (128, 128, 256, 24, 64, 64)),
    ('inception4d', (112, 144, 288, 32, 64, 64)),
    ('inception4e', (256, 160, 320, 32, 128, 128)),
    ('maxpool4', (2, 2)),
    ('inception5a', (256, 160, 320, 32, 128, 128)),
    ('inception5b', (384, 192, 384, 48, 128, 128)),
)


def pool_output_size(size: int, window: int, stride: int, padding: int = 0) -> int:
  """Output length of PyTorch's ``MaxPool2d(window, stride, padding, ceil_mode=True)``.

  ``ceil((size + 2p - window) / stride) + 1``, less one when the last window would start
  inside the right padding (PyTorch's rule); may be < 1 for inputs that are too small.
  """
  out = (size + 2 * padding - window + stride - 1) // stride + 1
  if (out - 1) * stride >= size + padding:
    out -= 1
  return out


def max_pool_ceil(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
  """PyTorch's ``MaxPool2d(window, stride, padding, ceil_mode=True)`` over NHWC ``x``.

  Padding (both the explicit ``padding`` and the extra right/bottom margin of ceil mode) is
  ``-inf``, so it never wins a window.

  Raises:
    ConfigError: if the output would be empty (input too small).
  """
  pads = []
  for axis in (1, 2):
    size = x.shape[axis]
    out = pool_output_size(size, window, stride, padding)
    if out < 1:
      raise ConfigError(f'GoogLeNet input too small: a {window}x{window}/{stride} max-pool '
                        f'gets a feature map of size {size}; inputs must be at least '
                        f'{MIN_SPATIAL}x{MIN_SPATIAL}')
    hi = (out - 1) * stride + window - size - padding
    if hi < 0:  # the last rows/columns are never covered (window < stride)
      x = lax.slice_in_dim(x, 0, size + hi, axis=axis)
      hi = 0
    pads.append((padding, hi))
  # flax's max_pool pads with -inf and lowers to lax's differentiable reduce_window_max.
  return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pads)


class BasicConv2d(nn.Module):
  """torchvision's ``BasicConv2d``: conv (no bias) -> ``BatchNorm2d(eps=0.001)`` -> ReLU.

  Attributes:
    features: output channels.
    kernel_size: square kernel size.
    strides: stride.
    padding: symmetric zero padding.
    dtype: the computation dtype (``None``: float32).
  """
  features: int
  kernel_size: int
  strides: int = 1
  padding: int = 0
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    p = self.padding
    x = TorchConv(self.features, self.kernel_size, strides=self.strides,
                  padding=((p, p), (p, p)), use_bias=False,
                  kernel_init=trunc_normal_init(0.01, 2.0), dtype=self.dtype, name='conv')(x)
    x = TorchBatchNorm(epsilon=BN_EPS, dtype=self.dtype, name='bn')(x, train)
    return nn.relu(x)


class Inception(nn.Module):
  """torchvision's ``Inception`` block: four branches concatenated over channels.

  Attributes:
    channels: ``(ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj)``; the output has
      ``ch1x1 + ch3x3 + ch5x5 + pool_proj`` channels.
    dtype: the computation dtype (``None``: float32).
  """
  channels: tuple[int, int, int, int, int, int]
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    ch1, ch3r, ch3, ch5r, ch5, pool_proj = self.channels
    conv = lambda f, k, name, p=0: BasicConv2d(f, k, padding=p, dtype=self.dtype, name=name)
    b1 = conv(ch1, 1, 'branch1')(x, train)
    b2 = conv(ch3, 3, 'branch2_1', 1)(conv(ch3r, 1, 'branch2_0')(x, train), train)
    # torchvision's "5x5" branch uses a 3x3 kernel (pytorch/vision#906).
    b3 = conv(ch5, 3, 'branch3_1', 1)(conv(ch5r, 1, 'branch3_0')(x, train), train)
    b4 = conv(pool_proj, 1, 'branch4_1')(max_pool_ceil(x, 3, 1, 1), train)
    return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class GoogLeNetBase(nn.Module):
  """GoogLeNet without ``fc``: NHWC images -> ``(batch, 1024)`` (after dropout 0.2).

  Attributes:
    dropout_rate: torchvision's ``dropout`` (0.2).
    blocks: the inception blocks and pools after the stem (default
      :data:`INCEPTION_BLOCKS`; a shorter list gives a reduced network, for tests).
    dtype: the computation dtype (``None``: float32); parameters stay float32.
  """
  dropout_rate: float = DROPOUT
  blocks: Sequence[tuple[str, tuple[int, ...]]] = INCEPTION_BLOCKS
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if x.ndim != 4:
      raise ConfigError(f'GoogLeNet expects NHWC images of rank 4, got shape {x.shape}')
    if min(x.shape[1:3]) < MIN_SPATIAL:
      raise ConfigError(f'GoogLeNet needs inputs of at least {MIN_SPATIAL}x{MIN_SPATIAL}, '
                        f'got {x.shape[1]}x{x.shape[2]}')
    x = BasicConv2d(64, 7, strides=2, padding=3, dtype=self.dtype, name='conv1')(x, train)
    x = max_pool_ceil(x, 3, 2)
    x = BasicConv2d(64, 1, dtype=self.dtype, name='conv2')(x, train)
    x = BasicConv2d(192, 3, padding=1, dtype=self.dtype, name='conv3')(x, train)
    x = max_pool_ceil(x, 3, 2)
    for name, spec in self.blocks:
      if name.startswith('maxpool'):
        x = max_pool_ceil(x, *spec)
      else:
        x = Inception(spec, dtype=self.dtype, name=name)(x, train)
    x = x.astype(jnp.float32).mean(axis=(1, 2)).astype(x.dtype)
    return nn.Dropout(self.dropout_rate, deterministic=not train)(x)


def googlenet(num_classes: int, dtype: Optional[Any] = None,
              feature_dim: Optional[int] = None) -> BaseHeadModel:
  """HtFLlib's ``torchvision.models.googlenet(pretrained=False, aux_logits=False)``.

  Args:
    num_classes: number of output logits.
    dtype: the computation dtype, e.g. ``jnp.bfloat16`` (float32 parameters, float32
      features and logits out); ``None`` is float32.
    feature_dim: HtFLlib's ``--feature_dim``: the base's 1024-d output is adaptively
      average-pooled to this width before the head (``None``: no pooling).

  Returns:
    The model; ``params = {'base': {conv1, conv2, conv3, inception3a, ...}, 'head': ...}``
    and a ``batch_stats`` collection. Train it through
    :func:`fedjax_lib.models.base.apply_train` (BatchNorm and dropout).
  """
  return BaseHeadModel(base=GoogLeNetBase(dtype=dtype),
                       head=TorchDense(num_classes, dtype=dtype), dtype=dtype,
                       feature_dim=feature_dim)
