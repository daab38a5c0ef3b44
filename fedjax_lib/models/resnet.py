"""HtFLlib's ResNets: the small ResNet4/6/8/10 and torchvision's ResNet18/34/50/101/152.

HtFLlib (TsingZ0/HtFLlib) builds its heterogeneous image model families from two sources:
``resnet4`` .. ``resnet10`` of its own ``system/flcore/trainmodel/resnet.py``, and
``torchvision.models.resnet18`` .. ``resnet152(pretrained=False, num_classes=C)``. Its
``BaseHeadSplit`` then takes the network's ``fc`` as the head and puts a parameter-free
``AdaptiveAvgPool1d(feature_dim)`` in its place, and finally replaces the head by a fresh
``nn.Linear(feature_dim, C)``. Here, ``base`` is the network without ``fc`` (NHWC images ->
the globally averaged last feature map, ``(batch, PENULTIMATE[name])``); the pool is
:class:`~fedjax_lib.models.base.BaseHeadModel`'s ``feature_dim`` and the head a
:class:`~fedjax_lib.models.layers.TorchDense` (PyTorch's default ``nn.Linear`` init).

Architecture (all of them):

* stem: conv 7x7 stride 2 pad 3, 64 channels, no bias -> BN -> ReLU -> max-pool 3x3
  stride 2 pad 1 (padding with -inf, as PyTorch). Kept on 32x32 inputs, as HtFLlib does
  (no CIFAR-style 3x3 stem), so a 32x32 image reaches the first stage at 8x8 and the last
  (of four stages) at 1x1; 28x28 -> 7x7 -> 1x1.
* stages ``s = 1..S`` of width ``64, 128, 256, 512``; stage 1 has stride 1, the others
  stride 2 in their first block. A stage's first block gets a downsample shortcut (conv 1x1
  with the block's stride, no bias -> BN) when the stride is not 1 or the channel count
  changes; otherwise the shortcut is the identity.
* BasicBlock (expansion 1): conv 3x3 (stride) -> BN -> ReLU -> conv 3x3 -> BN, plus the
  shortcut, ReLU.
* Bottleneck (expansion 4, torchvision's "v1.5": the stride sits on the 3x3 conv):
  conv 1x1 -> BN -> ReLU -> conv 3x3 (stride) -> BN -> ReLU -> conv 1x1 (4x width) -> BN,
  plus the shortcut, ReLU.
* global average pool over H, W and flatten: the base's output.

=============  ===========  ============  ===========  =============================
name           block        blocks/stage  penultimate  params (C=10, feature_dim 512)
=============  ===========  ============  ===========  =============================
``resnet4``    BasicBlock   [1]           64                  88,650
``resnet6``    BasicBlock   [1, 1]        128                318,794
``resnet8``    BasicBlock   [1, 1, 1]     256              1,237,834
``resnet10``   BasicBlock   [1, 1, 1, 1]  512              4,910,922
``resnet18``   BasicBlock   [2, 2, 2, 2]  512             11,181,642
``resnet34``   BasicBlock   [3, 4, 6, 3]  512             21,289,802
``resnet50``   Bottleneck   [3, 4, 6, 3]  2048            23,513,162
``resnet101``  Bottleneck   [3, 4, 23, 3] 2048            42,505,290
``resnet152``  Bottleneck   [3, 8, 36, 3] 2048            58,148,938
=============  ===========  ============  ===========  =============================

Every count is the base (3 input channels) plus the head ``Linear(512, 10)`` (5,130
parameters); the pool has none. The first five equal the counts of HtFLlib's PyTorch
models; the torchvision ones are torchvision's published totals less their 1000-class
``fc`` (e.g. resnet50: 25,557,032 - 2048*1000 - 1000 = 23,508,032) plus 5,130. With 1 input
channel the stem conv has 2 * 7*7*64 = 6,272 fewer parameters. Without ``feature_dim`` the
head is ``Linear(PENULTIMATE[name], C)`` (ResNet4: 64*10 + 10 instead of 5,130).

Initialisation (torchvision's, which HtFLlib's ``resnet.py`` copies): every conv, the
downsample convs included, ``kaiming_normal_(mode='fan_out', nonlinearity='relu')``; BN
scale 1, bias 0; ``zero_init_residual=False`` by default (True zeroes the scale of each
block's last BN). The head has PyTorch's default ``nn.Linear`` init, as HtFLlib's fresh
``nn.Linear(feature_dim, C)``.

BatchNorm is :class:`~fedjax_lib.models.layers.TorchBatchNorm` (PyTorch semantics: batch
statistics in training, running statistics with momentum 0.1 and eps 1e-5 at evaluation);
its running statistics live in the ``batch_stats`` collection, so the model must be trained
through :func:`fedjax_lib.models.base.apply_train` (``train=True``).

Parameter names: ``stem_conv``, ``stem_bn``, then ``layer{s}_{b}`` for block ``b`` of stage
``s`` (torchvision's ``layer{s}.{b}``) holding ``conv1, bn1, conv2, bn2[, conv3, bn3]`` and,
for a stage's first block, ``downsample_conv, downsample_bn`` (torchvision's
``downsample.0``/``.1``). Conv kernels are HWIO (PyTorch ``weight.transpose(2, 3, 1, 0)``);
BN ``scale``/``bias`` are PyTorch's ``weight``/``bias``, ``batch_stats`` ``mean``/``var`` its
``running_mean``/``running_var``. The global pool leaves a ``(1, 1, C)`` map (or is a mean),
so there is no NHWC/NCHW flatten permutation to worry about.

Differences from the references:

* Input channels are taken from the input; both HtFLlib's and torchvision's stem convs are
  hard-wired to 3 input channels (a 1-channel 28x28 input would fail there).
* HtFLlib's own ``resnet.py`` names a BasicBlock's BNs ``bn2``/``bn3`` (not ``bn1``/``bn2``),
  keeps all blocks in one flat list ``layer_0, layer_1, ...`` rather than per-stage
  ``layer1..layer4``, and has unused options (``has_bn``, ``bn_block_num``, a ``features``
  width list) whose defaults (BN everywhere, widths 64/128/256/512) are what is built here.
  Only the names differ; the computation is the same. Its ``ResNet4..10`` use the same stem,
  BasicBlock, and stage rule as torchvision (stage 1: 64 -> 64, stride 1, no downsample).
* ``num_batches_tracked`` (PyTorch's BN counter, unused with a fixed momentum) is not kept.
* The random values differ from PyTorch's (same distributions, different generator).
"""

from typing import Any, Optional, Sequence

import jax
import flax.linen as nn

from fedjax_lib.errors import ConfigError
from fedjax_lib.models.base import BaseHeadModel
from fedjax_lib.models.layers import TorchBatchNorm, TorchConv, TorchDense
from fedjax_lib.models.layers import kaiming_normal_fan_out, zeros_init

#: ``name -> (block, blocks per stage)``; stage widths are ``64, 128, 256, 512``.
ARCHITECTURES = {
    'resnet4': ('basic', (1,)),
    'resnet6': ('basic', (1, 1)),
    'resnet8': ('basic', (1, 1, 1)),
    'resnet10': ('basic', (1, 1, 1, 1)),
    'resnet18': ('basic', (2, 2, 2, 2)),
    'resnet34': ('basic', (3, 4, 6, 3)),
    'resnet50': ('bottleneck', (3, 4, 6, 3)),
    'resnet101': ('bottleneck', (3, 4, 23, 3)),
    'resnet152': ('bottleneck', (3, 8, 36, 3)),
}

#: Canonical names accepted by :func:`resnet`.
RESNET_NAMES = tuple(ARCHITECTURES)

#: Stage widths (``planes``) of torchvision's and HtFLlib's ResNets.
STAGE_WIDTHS = (64, 128, 256, 512)

#: Channel multiplier of a block's output over its ``planes``.
EXPANSION = {'basic': 1, 'bottleneck': 4}

#: Width of the base's output (the penultimate vector) of each ResNet.
PENULTIMATE = {name: STAGE_WIDTHS[len(stages) - 1] * EXPANSION[block]
               for name, (block, stages) in ARCHITECTURES.items()}


def _conv(features: int, kernel_size: int, strides: int, dtype, conv_impl: str,
          name: str) -> TorchConv:
  """A bias-free conv with torchvision's padding (``kernel_size // 2``) and init."""
  pad = kernel_size // 2
  return TorchConv(features, kernel_size, strides=strides, padding=((pad, pad), (pad, pad)),
                   use_bias=False, kernel_init=kaiming_normal_fan_out, conv_impl=conv_impl,
                   dtype=dtype, name=name)


class ResidualBlock(nn.Module):
  """One BasicBlock (``block='basic'``) or Bottleneck (``block='bottleneck'``).

  Attributes:
    planes: the block's width; its output has ``planes * EXPANSION[block]`` channels.
    block: ``'basic'`` or ``'bottleneck'``.
    strides: the stride of the first 3x3 conv (and of the downsample).
    downsample: whether the shortcut is conv 1x1 + BN (else the identity).
    zero_init_residual: start the last BN's scale at 0 (torchvision's option).
    conv_impl: see :class:`TorchConv`.
    dtype: the computation dtype (``None``: float32).
  """
  planes: int
  block: str = 'basic'
  strides: int = 1
  downsample: bool = False
  zero_init_residual: bool = False
  conv_impl: str = 'auto'
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    conv = lambda f, k, s, name: _conv(f, k, s, self.dtype, self.conv_impl, name)
    bn = lambda name, last=False: TorchBatchNorm(
        dtype=self.dtype, name=name,
        scale_init=zeros_init if (last and self.zero_init_residual) else nn.initializers.ones)
    out_channels = self.planes * EXPANSION[self.block]
    if self.block == 'basic':
      y = nn.relu(bn('bn1')(conv(self.planes, 3, self.strides, 'conv1')(x), train))
      y = bn('bn2', last=True)(conv(self.planes, 3, 1, 'conv2')(y), train)
    elif self.block == 'bottleneck':
      y = nn.relu(bn('bn1')(conv(self.planes, 1, 1, 'conv1')(x), train))
      y = nn.relu(bn('bn2')(conv(self.planes, 3, self.strides, 'conv2')(y), train))
      y = bn('bn3', last=True)(conv(out_channels, 1, 1, 'conv3')(y), train)
    else:
      raise ConfigError(f"unknown residual block {self.block!r}; choose 'basic' or 'bottleneck'")
    shortcut = x
    if self.downsample:
      shortcut = bn('downsample_bn')(
          conv(out_channels, 1, self.strides, 'downsample_conv')(x), train)
    return nn.relu(y + shortcut.astype(y.dtype))


class ResNetBase(nn.Module):
  """A ResNet without its ``fc``: NHWC images -> ``(batch, widths[-1] * expansion)``.

  Attributes:
    block: ``'basic'`` or ``'bottleneck'``.
    stage_sizes: the number of blocks of each stage (1 to 4 stages).
    zero_init_residual: torchvision's option (default False, as HtFLlib uses it).
    conv_impl: see :class:`TorchConv`.
    dtype: the computation dtype (``None``: float32); parameters and BN statistics stay
      float32.
  """
  block: str = 'basic'
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  zero_init_residual: bool = False
  conv_impl: str = 'auto'
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f'ResNet expects NHWC images of rank 4, got shape {x.shape}')
    if not 1 <= len(self.stage_sizes) <= len(STAGE_WIDTHS):
      raise ConfigError(f'a ResNet has 1 to {len(STAGE_WIDTHS)} stages, got '
                        f'{tuple(self.stage_sizes)}')
    x = _conv(64, 7, 2, self.dtype, self.conv_impl, 'stem_conv')(x)
    x = nn.relu(TorchBatchNorm(dtype=self.dtype, name='stem_bn')(x, train))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    in_channels = 64
    for s, num_blocks in enumerate(self.stage_sizes):
      planes = STAGE_WIDTHS[s]
      for b in range(num_blocks):
        strides = 2 if (s > 0 and b == 0) else 1
        out_channels = planes * EXPANSION[self.block]
        x = ResidualBlock(
            planes, block=self.block, strides=strides,
            downsample=strides != 1 or in_channels != out_channels,
            zero_init_residual=self.zero_init_residual, conv_impl=self.conv_impl,
            dtype=self.dtype, name=f'layer{s + 1}_{b}')(x, train)
        in_channels = out_channels
    return x.mean(axis=(1, 2))


def resnet(name: str, num_classes: int, dtype: Optional[Any] = None, *,
           zero_init_residual: bool = False, conv_impl: str = 'auto') -> BaseHeadModel:
  """Builds one of HtFLlib's ResNets as a :class:`BaseHeadModel`.

  Args:
    name: one of :data:`RESNET_NAMES` (case-insensitive).
    num_classes: number of output logits.
    dtype: the computation dtype of every layer (``jnp.bfloat16`` for mixed precision:
      float32 parameters and statistics, float32 features and logits out); ``None`` is
      plain float32.
    zero_init_residual: torchvision's option; HtFLlib leaves it False.
    conv_impl: ``'lax'`` or ``'patches'`` (see :class:`TorchConv`).

  Returns:
    The model; ``base`` outputs ``PENULTIMATE[name]`` features, the head is
    ``TorchDense(num_classes)`` on them (on ``feature_dim`` after
    ``model.clone(feature_dim=...)``, HtFLlib's setting).
  """
  key = name.lower() if isinstance(name, str) else name
  if key not in ARCHITECTURES:
    raise ConfigError(f'unknown ResNet {name!r}; choose one of: {", ".join(RESNET_NAMES)}')
  block, stage_sizes = ARCHITECTURES[key]
  return BaseHeadModel(
      base=ResNetBase(block=block, stage_sizes=stage_sizes,
                      zero_init_residual=zero_init_residual, conv_impl=conv_impl, dtype=dtype),
      head=TorchDense(num_classes, dtype=dtype), dtype=dtype)
