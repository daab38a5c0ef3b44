"""HtFLlib's MobileNetV2 (``system/flcore/trainmodel/mobilenet_v2.py``).

HtFLlib ships its own copy of torchvision's (pre-0.13) MobileNetV2 in which the classifier
``Sequential(Dropout(0.2), Linear)`` is split into ``self.dropout`` and ``self.fc``, so that
``BaseHeadSplit`` can take ``fc`` as the head and leave the dropout in the base. HtFLlib
builds it as ``mobilenet_v2(pretrained=False, num_classes=C)`` (all other arguments at
their defaults). Here:

* base (:class:`MobileNetV2Base`, NHWC images -> ``(batch, 1280)``):

  - ``features_0``: ConvBNReLU 3x3 **stride 2** -> 32 (the ImageNet stem, unchanged for
    32x32 CIFAR inputs: HtFLlib does not adapt the strides, so a 32x32 image ends as a
    1x1 feature map);
  - 17 inverted residual blocks ``features_1`` .. ``features_17`` from the setting
    ``(t, c, n, s)`` = (1,16,1,1), (6,24,2,2), (6,32,3,2), (6,64,4,2), (6,96,3,1),
    (6,160,3,2), (6,320,1,1): optional 1x1 expansion ConvBNReLU to ``round(in * t)``
    channels (only when ``t != 1``), depthwise 3x3 ConvBNReLU (stride ``s`` for the
    first block of a group), 1x1 linear projection conv + BN; identity shortcut when
    the stride is 1 and the channel count is unchanged;
  - ``features_18``: ConvBNReLU 1x1 -> 1280;
  - global average pool, dropout 0.2.

  ConvBNReLU = conv (no bias, padding ``(k - 1) // 2``) -> ``BatchNorm2d`` (eps 1e-5,
  momentum 0.1) -> ReLU6. Channel counts are ``_make_divisible(c * width_mult, 8)``;
  the last is ``_make_divisible(1280 * max(1, width_mult), 8)``.
* head: ``TorchDense(num_classes)`` (HtFLlib's ``nn.Linear(feature_dim, C)``, PyTorch's
  default initialisation; the file's own ``fc`` init ``N(0, 0.01)``/zeros is replaced
  together with ``fc``).

Initialisation (the file's loop over modules): conv kernels
``kaiming_normal_(mode='fan_out')`` (``N(0, 2 / (out * kh * kw))``, depthwise included);
BatchNorm scale 1, bias 0.

Parameter counts (``params``): base 2,223,872; with ``feature_dim=512`` and 10 classes
2,229,002 (HtFLlib's count); without ``feature_dim`` and 10 classes 2,236,682; with 1000
classes and no pooling 3,504,872 (torchvision's published count).

Differences from the reference:

* The input channel count is taken from the input (the reference fixes 3).
* ``dtype`` (mixed precision) is an addition.
* Parameter names: ``features_i`` is ``features.i``; a ConvBNReLU has ``conv``/``bn``
  (PyTorch ``.0``/``.1``); an inverted residual has ``expand`` (``conv.0``, absent when
  ``t = 1``), ``depthwise`` (the next ``conv.k``), ``project`` and ``project_bn`` (the
  last two entries of ``conv``). Kernels are HWIO (PyTorch's OIHW transposed
  ``(2, 3, 1, 0)``; a depthwise kernel is ``(3, 3, 1, C)``).
"""

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from fedjax_lib.errors import ConfigError
from fedjax_lib.models.base import BaseHeadModel
from fedjax_lib.models.layers import (TorchBatchNorm, TorchConv, TorchDense,
                                      kaiming_normal_fan_out)

#: Width of the base's output (the input of ``fc``) at ``width_mult <= 1``.
PENULTIMATE = {'mobilenet_v2': 1280}

#: ``(t, c, n, s)``: expansion factor, output channels, repeats, stride of the first repeat.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)

INPUT_CHANNEL = 32
LAST_CHANNEL = 1280
DROPOUT = 0.2


def make_divisible(value: float, divisor: int, min_value: Optional[int] = None) -> int:
  """The channel rounding of the TF MobileNet code (``_make_divisible``): ``value`` to the
  nearest multiple of ``divisor`` (at least ``min_value``, default ``divisor``), bumped up
  one ``divisor`` if rounding lost more than 10%."""
  if min_value is None:
    min_value = divisor
  rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * value:
    rounded += divisor
  return rounded


class ConvBNReLU6(nn.Module):
  """Conv (no bias, ``(k - 1) // 2`` padding) -> BatchNorm -> ReLU6.

  Attributes:
    features: output channels.
    kernel_size: square kernel size.
    strides: stride.
    groups: PyTorch's ``groups`` (the input channel count for a depthwise conv).
    dtype: the computation dtype (``None``: float32).
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  groups: int = 1
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    p = (self.kernel_size - 1) // 2
    x = TorchConv(self.features, self.kernel_size, strides=self.strides,
                  padding=((p, p), (p, p)), use_bias=False,
                  feature_group_count=self.groups, kernel_init=kaiming_normal_fan_out,
                  dtype=self.dtype, name='conv')(x)
    x = TorchBatchNorm(dtype=self.dtype, name='bn')(x, train)
    return jnp.clip(x, 0, 6)


class InvertedResidual(nn.Module):
  """MobileNetV2's inverted residual block.

  Attributes:
    features: output channels.
    strides: 1 or 2 (the depthwise conv's stride).
    expand_ratio: ``t``; the hidden width is ``round(in * t)``.
    dtype: the computation dtype (``None``: float32).
  """
  features: int
  strides: int
  expand_ratio: int
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.strides not in (1, 2):
      raise ConfigError(f'InvertedResidual stride must be 1 or 2, got {self.strides}')
    inp = x.shape[-1]
    hidden = int(round(inp * self.expand_ratio))
    y = x
    if self.expand_ratio != 1:
      y = ConvBNReLU6(hidden, 1, dtype=self.dtype, name='expand')(y, train)
    y = ConvBNReLU6(hidden, 3, strides=self.strides, groups=hidden, dtype=self.dtype,
                    name='depthwise')(y, train)
    y = TorchConv(self.features, 1, use_bias=False, kernel_init=kaiming_normal_fan_out,
                  dtype=self.dtype, name='project')(y)
    y = TorchBatchNorm(dtype=self.dtype, name='project_bn')(y, train)
    if self.strides == 1 and inp == self.features:
      return x + y
    return y


class MobileNetV2Base(nn.Module):
  """HtFLlib's MobileNetV2 without ``fc``: NHWC images -> ``(batch, last_channel)``.

  Attributes:
    width_mult: channel multiplier (1.0 in HtFLlib).
    inverted_residual_setting: ``(t, c, n, s)`` rows (default: the paper's).
    round_nearest: channel rounding multiple (8).
    dropout_rate: dropout before ``fc`` (0.2), kept in the base.
    dtype: the computation dtype (``None``: float32); parameters stay float32.
  """
  width_mult: float = 1.0
  inverted_residual_setting: Sequence[tuple[int, int, int, int]] = INVERTED_RESIDUAL_SETTING
  round_nearest: int = 8
  dropout_rate: float = DROPOUT
  dtype: Optional[Any] = None

  @property
  def last_channel(self) -> int:
    return make_divisible(LAST_CHANNEL * max(1.0, self.width_mult), self.round_nearest)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if x.ndim != 4:
      raise ConfigError(f'MobileNetV2 expects NHWC images of rank 4, got shape {x.shape}')
    setting = tuple(tuple(row) for row in self.inverted_residual_setting)
    if not setting or any(len(row) != 4 for row in setting):
      raise ConfigError('inverted_residual_setting must be a non-empty list of (t, c, n, s) '
                        f'rows, got {self.inverted_residual_setting!r}')
    stem = make_divisible(INPUT_CHANNEL * self.width_mult, self.round_nearest)
    x = ConvBNReLU6(stem, 3, strides=2, dtype=self.dtype, name='features_0')(x, train)
    index = 1
    for t, c, n, s in setting:
      out = make_divisible(c * self.width_mult, self.round_nearest)
      for i in range(n):
        x = InvertedResidual(out, s if i == 0 else 1, t, dtype=self.dtype,
                             name=f'features_{index}')(x, train)
        index += 1
    x = ConvBNReLU6(self.last_channel, 1, dtype=self.dtype, name=f'features_{index}')(x, train)
    x = x.astype(jnp.float32).mean(axis=(1, 2)).astype(x.dtype)
    return nn.Dropout(self.dropout_rate, deterministic=not train)(x)


def mobilenet_v2(num_classes: int, dtype: Optional[Any] = None,
                 feature_dim: Optional[int] = None, width_mult: float = 1.0) -> BaseHeadModel:
  """HtFLlib's ``mobilenet_v2(pretrained=False, num_classes=C)`` as a base/head model.

  Args:
    num_classes: number of output logits.
    dtype: the computation dtype, e.g. ``jnp.bfloat16`` (float32 parameters, float32
      features and logits out); ``None`` is float32.
    feature_dim: HtFLlib's ``--feature_dim``: the base's 1280-d output is adaptively
      average-pooled to this width before the head (``None``: no pooling).
    width_mult: the channel multiplier (HtFLlib leaves it at 1.0).

  Returns:
    The model; ``params = {'base': {features_0 .. features_18}, 'head': ...}`` and a
    ``batch_stats`` collection. Train it through
    :func:`fedjax_lib.models.base.apply_train` (BatchNorm and dropout).
  """
  return BaseHeadModel(base=MobileNetV2Base(width_mult=width_mult, dtype=dtype),
                       head=TorchDense(num_classes, dtype=dtype), dtype=dtype,
                       feature_dim=feature_dim)
