"""PFLlib's ``HARCNN`` and HtFLlib's ``HARCNN1``/``HARCNN3``, for inertial-sensor windows.

PFLlib stores a HAR window as ``9 x 1 x 128`` (NCHW: 9 sensor channels, height 1, 128
time steps) and a PAMAP2 window as ``9 x 3 x 256``; the PFLlib-folder reader turns them
NHWC, so the sample shapes here are ``(1, 128, 9)`` and ``(3, 256, 9)``.

Architecture (one block = conv ``(1, k)`` with stride ``s`` in both directions, ReLU,
max-pool window ``(1, 2)`` with stride 2 in both directions, as PyTorch's
``MaxPool2d(kernel_size=(1, 2), stride=2)``):

==================  =========================================  ===========================
name                base: blocks (channels, k), then flatten   features (HAR, PAMAP2)
==================  =========================================  ===========================
``harcnn``          (32, 9), (64, 9)                           1664, 3712
``harcnn1``         (32, 9)                                    1920 (HAR)
``harcnn3``         (32, 5), (64, 5), (128, 5)                 1536 (HAR)
==================  =========================================  ===========================

``harcnn_s2``, ``harcnn1_s3``, ... are the same with stride 2 or 3 (HtFLlib's ``stride``
argument; HAR features 320 / 128 for ``harcnn``, 960 / 640 for ``harcnn1``, 128 for
``harcnn3_s2``).

Head: PFLlib's ``fc``, ``Linear(D, 1024) → ReLU → Linear(1024, 512) → ReLU → Linear(512,
C)`` (parameters ``fc1``, ``fc2``, ``fc3``), where ``D`` is the flattened base output (PFLlib
hard-codes it as ``dim_hidden``: 1664 for HAR, 3712 for PAMAP2; here it is read from the
input). With HtFLlib's ``feature_dim`` (``make_model(..., feature_dim=F)``) the head is
instead ``Linear(F, C)``: HtFLlib's ``BaseHeadSplit`` replaces the whole ``fc`` by the pool,
so the three-layer MLP is gone and the ``dim_hidden`` HtFLlib passes (1664 even for strides
2 and 3, 832 for ``HARCNN1``, 3328 for ``HARCNN3``, none of them the true width) is
never used.

Parameter counts (PyTorch's, counted with the reference modules): PFLlib ``HARCNN`` on HAR
with 6 classes 2,253,958 (PAMAP2, 12 classes: 4,354,188); with ``feature_dim=512`` and 6
classes, base + head: ``harcnn*`` 21,120 + 3,078, ``harcnn1*`` 2,624 + 3,078, ``harcnn3*``
52,864 + 3,078 (strides do not change the counts).

Differences from the references: the flatten is NHWC ``(h, w, c)``-ordered (PyTorch's is
``(c, h, w)``), so ``fc1``'s input rows are permuted relative to PyTorch's; initialisation
follows PyTorch's distributions, not its random stream.
"""

import re
from typing import Any, Optional

import jax
import flax.linen as nn

from fedjax_lib.errors import ConfigError
from fedjax_lib.models.base import BaseHeadModel
from fedjax_lib.models.layers import TorchConv, TorchDense

#: ``(channels per block, kernel width)`` of each architecture.
ARCHITECTURES = {'harcnn': ((32, 64), 9), 'harcnn1': ((32,), 9), 'harcnn3': ((32, 64, 128), 5)}
#: PFLlib's ``fc`` hidden widths.
HEAD_HIDDEN = (1024, 512)

_NAME = re.compile(r'^(harcnn[13]?)(?:_s(\d+))?$')


def parse_name(key: str) -> Optional[tuple[str, dict]]:
  """``(architecture, constructor arguments)`` of a lower-case sensor model name, or None:
  ``'harcnn'`` → ``('harcnn', {})``, ``'harcnn3_s2'`` → ``('harcnn3', {'stride': 2})``."""
  match = _NAME.match(key)
  if match is None:
    return None
  if match.group(2) is None:
    return match.group(1), {}
  stride = int(match.group(2))
  return (match.group(1), {'stride': stride}) if stride >= 1 else None


def canonical_name(key: str) -> str:
  """The one spelling of a name :func:`parse_name` accepts (``harcnn_s1`` → ``harcnn``)."""
  arch, kwargs = parse_name(key)
  stride = kwargs.get('stride', 1)
  return arch if stride == 1 else f'{arch}_s{stride}'


def _pool(x: jax.Array) -> jax.Array:
  """``MaxPool2d(kernel_size=(1, 2), stride=2)`` on NHWC: every other row, the max of each
  pair of columns (a trailing odd column dropped), written with a reshape (XLA:CPU's
  ``max_pool`` gradient is a scatter)."""
  x = x[:, ::2]
  b, h, w, c = x.shape
  return x[:, :, :2 * (w // 2)].reshape(b, h, w // 2, 2, c).max(axis=3)


class HARCNNBase(nn.Module):
  """The conv blocks of ``HARCNN``/``HARCNN1``/``HARCNN3`` and the flatten: NHWC windows ->
  ``(batch, D)``.

  Attributes:
    channels: output channels per block (``conv1``, ``conv2``, ...).
    kernel_width: ``k`` of the ``(1, k)`` kernels.
    stride: the convolutions' stride (both directions).
    conv_impl: see :class:`~fedjax_lib.models.layers.TorchConv`.
    dtype: the computation dtype (``None``: float32).
  """
  channels: tuple = ARCHITECTURES['harcnn'][0]
  kernel_width: int = 9
  stride: int = 1
  conv_impl: str = 'auto'
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4:
      raise ConfigError(f'HARCNN takes NHWC windows (sample_shape (H, T, channels), e.g. '
                        f'(1, 128, 9) for HAR), got shape {x.shape}')
    for i, features in enumerate(self.channels):
      if x.shape[2] < self.kernel_width:
        raise ConfigError(f'HARCNN (kernel 1x{self.kernel_width}, stride {self.stride}, '
                          f'{len(self.channels)} blocks) needs longer windows: block {i + 1} '
                          f'gets {x.shape[2]} time steps')
      x = TorchConv(features, (1, self.kernel_width), strides=self.stride,
                    conv_impl=self.conv_impl, dtype=self.dtype, name=f'conv{i + 1}')(x)
      x = _pool(nn.relu(x))
      if x.shape[2] == 0:
        raise ConfigError(f'HARCNN (kernel 1x{self.kernel_width}, stride {self.stride}) needs '
                          f'longer windows: block {i + 1} leaves one time step to pool')
    return x.reshape(x.shape[0], -1)


class HARHead(nn.Module):
  """PFLlib's ``HARCNN.fc``: ``fc1`` D -> 1024, ReLU, ``fc2`` -> 512, ReLU, ``fc3`` -> C."""
  num_classes: int
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    for i, width in enumerate(HEAD_HIDDEN):
      z = nn.relu(TorchDense(width, dtype=self.dtype, name=f'fc{i + 1}')(z))
    return TorchDense(self.num_classes, dtype=self.dtype, name=f'fc{len(HEAD_HIDDEN) + 1}')(z)


def harcnn(arch: str, num_classes: int, stride: int = 1, feature_dim: Optional[int] = None,
           conv_impl: str = 'auto', dtype: Optional[Any] = None) -> BaseHeadModel:
  """Builds ``HARCNN`` (``arch='harcnn'``), ``HARCNN1`` or ``HARCNN3``.

  Args:
    arch: ``'harcnn'``, ``'harcnn1'`` or ``'harcnn3'``.
    num_classes: number of logits.
    stride: the convolutions' stride (HtFLlib's ``stride``; PFLlib's is 1).
    feature_dim: None: PFLlib's three-layer head; an int: HtFLlib's ``Linear(F, C)`` head
      (the caller sets ``BaseHeadModel.feature_dim`` to pool the base to F).
    conv_impl: see :class:`~fedjax_lib.models.layers.TorchConv`.
    dtype: the computation dtype (``None``: float32).

  Returns:
    The model; ``params = {'base': {conv1, ...}, 'head': {fc1, fc2, fc3} or {kernel, bias}}``.
  """
  if arch not in ARCHITECTURES:
    raise ConfigError(f'unknown sensor model {arch!r}; choose one of: '
                      f'{", ".join(ARCHITECTURES)}')
  if not isinstance(stride, int) or stride < 1:
    raise ConfigError(f'HARCNN stride must be a positive integer, got {stride!r}')
  channels, kernel_width = ARCHITECTURES[arch]
  base = HARCNNBase(channels, kernel_width, stride, conv_impl=conv_impl, dtype=dtype)
  head = (HARHead(num_classes, dtype=dtype) if feature_dim is None
          else TorchDense(num_classes, dtype=dtype))
  return BaseHeadModel(base=base, head=head, dtype=dtype)
