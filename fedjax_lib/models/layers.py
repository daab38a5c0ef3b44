"""Dense and convolution layers initialised like PyTorch's defaults.

PyTorch's ``nn.Linear`` and ``nn.Conv2d`` initialise their weights with
``kaiming_uniform_(w, a=sqrt(5))`` and their biases with ``U(-b, b)``, where
``b = 1/sqrt(fan_in)``. The Kaiming bound with ``a = sqrt(5)`` is
``gain * sqrt(3 / fan_in)`` with ``gain = sqrt(2 / (1 + a^2)) = sqrt(1/3)``, which is
again ``1/sqrt(fan_in)``. So both weights and biases are drawn from

    U(-1/sqrt(fan_in), 1/sqrt(fan_in)),

with ``fan_in = in_features`` for a dense layer and ``in_channels * kh * kw`` for a
convolution. :class:`TorchDense` and :class:`TorchConv` reproduce that distribution
(mean 0, standard deviation ``1/sqrt(3 * fan_in)``). Flax's own defaults (LeCun normal
weights, zero biases) train noticeably differently in the small-model regime PFLlib
reports on, hence these layers.

What is *not* reproduced:

* The random stream: the values differ from ``torch.manual_seed(0)``; only the
  distribution matches.
* Weight layout: Flax stores a dense kernel as ``(in, out)`` (PyTorch ``weight`` is
  ``(out, in)``: transpose it) and a conv kernel as HWIO ``(kh, kw, in, out)`` (PyTorch is
  OIHW: ``weight.transpose(2, 3, 1, 0)``).
* Flatten order: images here are NHWC, so flattening a feature map gives ``(h, w, c)``
  order, whereas PyTorch flattens NCHW in ``(c, h, w)`` order. The first dense layer after
  a flatten therefore sees its input rows permuted relative to PyTorch. This is irrelevant
  when training from scratch but matters when loading PyTorch weights; use
  :func:`torch_fc1_permutation` to reorder them.

Loading a PyTorch ``FedAvgCNN`` state dict therefore takes ``conv*.0.weight``
transposed ``(2, 3, 1, 0)``, ``fc.weight.T``, and ``fc1.0.weight.T[perm]`` with
``perm = torch_fc1_permutation(*cnn.feature_map_shape(H, W))``; done that way, both conv
implementations reproduce PyTorch's logits to about 1e-7 (checked once on an H100 at
highest matmul precision, 28x28x1 and 32x32x3 inputs).
"""

import functools
from typing import Any, Callable, Optional, Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from fedjax_lib.config import CONV_IMPLS  # accepted values of ``TorchConv.conv_impl``
from fedjax_lib.errors import ConfigError


#: Largest batch for which ``'auto'`` picks ``'slices'`` on XLA:CPU (``'hybrid'`` above).
SLICES_MAX_BATCH = 16

#: Largest output map (``out_h * out_w``) for which ``'auto'`` picks ``'slices'`` on XLA:CPU
#: at any batch size: XLA:CPU's convolution runs 3–27 GFLOP/s on 1×1 and 2×2 outputs.
SLICES_MAX_OUTPUT_AREA = 4


def resolve_conv_impl(conv_impl: str, feature_group_count: int = 1, batch: int = 1,
                      output_area: Optional[int] = None, depthwise: bool = False) -> str:
  """The implementation ``'auto'`` stands for, given the backend computations run on.

  Accelerators, and grouped convolutions other than depthwise ones anywhere: ``'lax'``;
  depthwise ones (``groups = in = out``, MobileNetV2's) on XLA:CPU: ``'slices'``, a sum of
  shifted views times per-channel weights (XLA:CPU's grouped convolution: MobileNetV2's
  forward 1.4 ms per sample against 0.14 ms). XLA:CPU runs its convolution
  ops fast only outside loops, and their gradients slowly everywhere: a FedAvgCNN SGD step
  (batch 10, 28x28x1) took 1.8 ms unrolled and ~20 ms inside a ``fori_loop`` or ``lax.cond``
  (jax-ml/jax#12868 is one such report), against 1.2 ms with ``'slices'`` in either. But
  ``'slices'`` forward passes over large batches of large maps are slow (111 samples: 21 ms
  against 2.6 ms). So on XLA:CPU ``'auto'`` is ``'slices'`` up to :data:`SLICES_MAX_BATCH`
  samples (training steps: the weight gradient reuses the forward's patches) and ``'hybrid'``
  above it (evaluation: XLA's convolution forward) — except for outputs of at most
  :data:`SLICES_MAX_OUTPUT_AREA` positions (a ResNet's last stages on 32×32 inputs), where
  XLA:CPU's convolution is two orders of magnitude slower than im2col (a 3×3 convolution of
  256 channels on a 2×2 map, batch 100: 635 µs per sample against 11 µs), so ``'slices'``
  at any batch size. Measurements: experiments/benchmarks/RESULTS.md.
  """
  if conv_impl != 'auto':
    return conv_impl
  if jax.default_backend() != 'cpu':
    return 'lax'
  if feature_group_count != 1:
    return 'slices' if depthwise else 'lax'
  if output_area is not None and output_area <= SLICES_MAX_OUTPUT_AREA:
    return 'slices'
  return 'slices' if batch <= SLICES_MAX_BATCH else 'hybrid'


def torch_uniform_init(fan_in: int) -> Callable[..., jax.Array]:
  """Returns an initializer drawing from ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.

  Args:
    fan_in: number of inputs feeding one output unit.

  Returns:
    A Flax-style initializer ``init(key, shape, dtype) -> array``.
  """
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

  return init


def torch_fc1_permutation(height: int, width: int, channels: int) -> np.ndarray:
  """Maps NHWC flatten positions to PyTorch's NCHW flatten positions.

  ``perm[i]`` is the PyTorch (``(c, h, w)``-ordered) index of the feature that sits at
  position ``i`` of an NHWC (``(h, w, c)``-ordered) flattened feature map. A PyTorch
  ``Linear`` weight ``W`` of shape ``(out, c*h*w)`` that follows ``torch.flatten``
  becomes the Flax kernel ``W.T[perm]`` of shape ``(h*w*c, out)``.

  Args:
    height: feature-map height before the flatten.
    width: feature-map width before the flatten.
    channels: feature-map channels before the flatten.

  Returns:
    An int array of length ``height * width * channels``.
  """
  torch_index = np.arange(channels * height * width).reshape(channels, height, width)
  return torch_index.transpose(1, 2, 0).reshape(-1)


class TorchDense(nn.Module):
  """A dense layer ``y = x @ kernel + bias`` with PyTorch's default initialisation.

  Attributes:
    features: number of output features.
    use_bias: whether to add a bias.
    dtype: the computation dtype (e.g. ``jnp.bfloat16``): the input, kernel and bias are
      cast to it and the output has it. ``None`` computes in the inputs' and parameters'
      own dtype (float32). The parameters are float32 either way.
    kernel_init, bias_init: initializers replacing PyTorch's default ``U(±1/sqrt(fan_in))``
      (for architectures whose PyTorch constructor re-initialises, e.g. torchvision's).
  """
  features: int
  use_bias: bool = True
  dtype: Optional[Any] = None
  kernel_init: Optional[Callable[..., jax.Array]] = None
  bias_init: Optional[Callable[..., jax.Array]] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = x.shape[-1]
    init = torch_uniform_init(fan_in)
    kernel = self.param('kernel', self.kernel_init or init, (fan_in, self.features))
    x, kernel = _cast(self.dtype, x, kernel)
    y = jnp.matmul(x, kernel)
    if self.use_bias:
      bias = self.param('bias', self.bias_init or init, (self.features,))
      y = y + _cast(self.dtype, bias)[0]
    return y


def _cast(dtype: Optional[Any], *arrays: jax.Array) -> tuple[jax.Array, ...]:
  """``arrays`` cast to the computation ``dtype``; unchanged when ``dtype`` is None."""
  if dtype is None:
    return arrays
  return tuple(a.astype(dtype) for a in arrays)


def _pair(value: int | Sequence[int], what: str) -> tuple[int, int]:
  if isinstance(value, int):
    return (value, value)
  value = tuple(value)
  if len(value) != 2:
    raise ConfigError(f'{what} must be an int or a pair of ints, got {value!r}')
  return value


class TorchConv(nn.Module):
  """A 2-D convolution over NHWC inputs with PyTorch's default initialisation.

  The kernel is HWIO ``(kh, kw, in, out)``; ``fan_in = in * kh * kw``.

  Numerically equivalent implementations (equal up to float rounding):

  * ``'auto'`` (default): ``'slices'`` on XLA:CPU, ``'lax'`` elsewhere
    (:func:`resolve_conv_impl`).
  * ``'lax'``: ``lax.conv_general_dilated``.
  * ``'slices'``: im2col from shifted (strided) views of the padded input (the ``kw``
    column shifts stacked, then the ``kh`` row shifts of those), then a matmul: no
    convolution op at all, which XLA:CPU runs fast inside loops too.
  * ``'hybrid'``: ``lax.conv_general_dilated`` forward, ``'slices'``'s gradient; on
    XLA:CPU a 3-channel input of a convolution into 17-32 channels gets a zero fourth
    channel first (:func:`pads_input_channels`: the same values, 3-7x faster there).
  * ``'patches'``: im2col with ``lax.conv_general_dilated_patches`` followed by a
    matmul. ``jax.vmap`` over per-client kernels turns a convolution into a grouped
    convolution, which is slow on some backends; with patches the kernel only enters a
    matmul, which vmaps into a batched matmul. Neither is uniformly faster: on one
    H100 (10 vmapped SGD steps, batch 10) patches was faster for 20 MNIST clients and
    slower for 20 CIFAR clients, so ``'lax'`` is the default. The patch extraction uses
    ``Precision.HIGHEST`` so that it copies inputs exactly (it is itself a convolution
    with a one-hot filter, which TF32 would otherwise round).

  Attributes:
    features: number of output channels.
    kernel_size: ``kh`` or ``(kh, kw)``.
    strides: stride, an int or a pair.
    padding: ``'VALID'``, ``'SAME'`` or explicit ``((lo, hi), (lo, hi))`` pairs.
    use_bias: whether to add a per-channel bias.
    conv_impl: ``'auto'``, ``'lax'``, ``'patches'``, ``'slices'`` or ``'hybrid'``.
    dtype: the computation dtype, as for :class:`TorchDense` (``None``: float32).
    feature_group_count: PyTorch's ``groups`` (depthwise convolutions: ``groups = in``);
      the kernel is ``(kh, kw, in / groups, out)``. ``'lax'``, and ``'slices'`` for
      depthwise convolutions (``groups = in = out``).
    kernel_init: an initializer replacing PyTorch's default (e.g. torchvision's
      :func:`kaiming_normal_fan_out`).
  """
  features: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] = 1
  padding: str | Sequence[tuple[int, int]] = 'VALID'
  use_bias: bool = True
  conv_impl: str = 'auto'
  dtype: Optional[Any] = None
  feature_group_count: int = 1
  kernel_init: Optional[Callable[..., jax.Array]] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.conv_impl not in CONV_IMPLS:
      raise ConfigError(f'unknown conv_impl {self.conv_impl!r}; choose one of: '
                        f'{", ".join(CONV_IMPLS)}')
    if x.ndim != 4:
      raise ValueError(f'TorchConv expects NHWC input of rank 4, got shape {x.shape}')
    kh, kw = _pair(self.kernel_size, 'kernel_size')
    strides = _pair(self.strides, 'strides')
    in_channels = x.shape[-1] // self.feature_group_count
    fan_in = in_channels * kh * kw
    init = torch_uniform_init(fan_in)
    kernel = self.param('kernel', self.kernel_init or init,
                        (kh, kw, in_channels, self.features))
    x, kernel = _cast(self.dtype, x, kernel)
    padding = self.padding if isinstance(self.padding, str) else tuple(
        tuple(p) for p in self.padding)
    dimension_numbers = ('NHWC', 'HWIO', 'NHWC')
    depthwise = (self.feature_group_count == x.shape[-1] and in_channels == 1
                 and self.features == x.shape[-1])
    impl = resolve_conv_impl(self.conv_impl, self.feature_group_count, x.shape[0],
                             _output_area(x.shape[1:3], (kh, kw), strides, padding),
                             depthwise)
    if impl == 'lax':
      y = lax.conv_general_dilated(
          x, kernel, window_strides=strides, padding=padding,
          dimension_numbers=dimension_numbers, feature_group_count=self.feature_group_count)
    elif self.feature_group_count != 1:
      if impl != 'slices' or not depthwise:
        raise ConfigError(f'conv_impl={self.conv_impl!r} does not support this grouped '
                          "convolution; use conv_impl='lax' ('slices' implements depthwise "
                          'ones)')
      y = _depthwise_conv(x, kernel, strides, padding)
    elif impl == 'slices':
      y = _slices_conv(x, kernel, strides, padding)
    elif impl == 'hybrid':
      y = _hybrid_conv(x, kernel, strides, padding)
    else:
      patches = lax.conv_general_dilated_patches(
          x, filter_shape=(kh, kw), window_strides=strides, padding=padding,
          dimension_numbers=dimension_numbers, precision=lax.Precision.HIGHEST)
      # The patch features are ordered (in_channel, kh, kw), channel-major.
      kernel_matrix = kernel.transpose(2, 0, 1, 3).reshape(fan_in, self.features)
      y = jnp.einsum('nhwp,po->nhwo', patches, kernel_matrix)
    if self.use_bias:
      y = y + _cast(self.dtype, self.param('bias', init, (self.features,)))[0]
    return y


def _output_area(spatial, window, strides, padding) -> int:
  """``out_h * out_w`` of a convolution (no dilation) of an input map ``spatial``."""
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(spatial, window, strides, padding)
  area = 1
  for size, k, s, (lo, hi) in zip(spatial, window, strides, padding):
    area *= max((size + lo + hi - k) // s + 1, 0)
  return area


def _padded(x: jax.Array, window, strides, padding) -> tuple[jax.Array, int, int]:
  """The NHWC ``x`` padded as ``padding`` says, and the convolution's output height and
  width."""
  (kh, kw) = window
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(x.shape[1:3], (kh, kw), strides, padding)
  if any(p != 0 for pair in padding for p in pair):
    x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  (sh, sw), (h, w) = strides, x.shape[1:3]
  out_h, out_w = (h - kh) // sh + 1, (w - kw) // sw + 1
  if out_h < 1 or out_w < 1:
    raise ValueError(f'kernel {kh}x{kw} is larger than the padded input {h}x{w}')
  return x, out_h, out_w


def _shifted_views(x: jax.Array, window, strides, padding) -> list:
  """The ``kh * kw`` strided views of the padded NHWC ``x`` that a convolution's window
  positions read, ordered (kh, kw)."""
  (kh, kw), (sh, sw) = window, strides
  x, out_h, out_w = _padded(x, window, strides, padding)
  return [x[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw, :]
          for i in range(kh) for j in range(kw)]


def _im2col(x: jax.Array, window, strides, padding) -> jax.Array:
  """The NHWC ``x``'s convolution patches, ``(n, out_h, out_w, kh * kw * c)`` ordered
  (kh, kw, c) like an HWIO kernel's rows, built in two passes: the ``kw`` column shifts
  stacked (``(n, h, out_w, kw * c)``), then the ``kh`` row shifts of that.

  The same values as concatenating the ``kh * kw`` shifted views (the form before
  2026-12-02), but faster on XLA:CPU: the digits FedAvg training round (the 4-layer CNN's
  two 5×5 convolutions, batch 10) ~6 % faster, programs with 3×3 convolutions compiled
  15–30 % faster (`experiments/benchmarks/bench_slices_forms.py`); the gradient, a col2im,
  becomes two passes of ``kw`` and ``kh`` shifted sums instead of one of ``kh * kw``.
  """
  (kh, kw), (sh, sw) = window, strides
  x, out_h, out_w = _padded(x, window, strides, padding)
  n, h, _, c = x.shape
  if kh * kw == 1:
    return x[:, :sh * (out_h - 1) + 1:sh, :sw * (out_w - 1) + 1:sw, :]
  cols = jnp.stack([x[:, :, j:j + sw * (out_w - 1) + 1:sw, :] for j in range(kw)], axis=-2)
  cols = cols.reshape(n, h, out_w, kw * c)
  patches = jnp.stack([cols[:, i:i + sh * (out_h - 1) + 1:sh] for i in range(kh)], axis=-2)
  return patches.reshape(n, out_h, out_w, kh * kw * c)


def _depthwise_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                    padding) -> jax.Array:
  """A depthwise convolution (``groups = in = out``, kernel ``(kh, kw, 1, C)``) as a sum of
  the shifted views times their per-channel weights: no convolution op (XLA:CPU's grouped
  convolution is slow)."""
  kh, kw, _, _ = kernel.shape
  views = _shifted_views(x, (kh, kw), strides, padding)
  weights = kernel.reshape(kh * kw, -1)
  out = views[0] * weights[0]
  for view, weight in zip(views[1:], weights[1:]):
    out = out + view * weight
  return out


def _slices_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                 padding) -> jax.Array:
  """``lax.conv_general_dilated`` (NHWC, HWIO, no dilation, no groups) as im2col + matmul."""
  kh, kw, fan, out = kernel.shape
  patches = _im2col(x, (kh, kw), strides, padding)
  n, out_h, out_w, width = patches.shape
  y = _patch_matmul(patches.reshape(n * out_h * out_w, width), kernel.reshape(width, out))
  return y.reshape(n, out_h, out_w, out)


@jax.custom_vjp
def _patch_matmul(patches: jax.Array, kernel: jax.Array) -> jax.Array:
  """``patches @ kernel`` whose kernel gradient is ``patches.T @ dy`` as written.

  JAX's own transpose of the matmul computes the kernel gradient as ``(dy.T @ patches).T``,
  and XLA:CPU then copies ``dy`` into a transposed layout before every weight gradient (the
  4-layer CNN's two convolutions: 41k and 184k floats per SGD step); contracting both
  operands over their rows needs no copy. Same values (the same sums in the same order):
  the parameters are bit-identical, and the digits FedAvg training round ran another ~4 %
  faster (`experiments/benchmarks/bench_slices_forms.py`). Reverse mode only (``jax.grad``
  of any order), like :func:`max_pool_2x2`.
  """
  return patches @ kernel


def _patch_matmul_fwd(patches, kernel):
  return patches @ kernel, (patches, kernel)


def _patch_matmul_bwd(residuals, dy):
  patches, kernel = residuals
  return dy @ kernel.T, patches.T @ dy


_patch_matmul.defvjp(_patch_matmul_fwd, _patch_matmul_bwd)


def pads_input_channels(in_channels: int, out_channels: int) -> bool:
  """Whether ``'hybrid'``'s forward pass on XLA:CPU adds a zero fourth input channel.

  XLA:CPU's (Eigen's) convolution of 3 input channels into 17-32 output channels runs 3-7x
  slower than the same convolution with a fourth, zero input channel, whatever the kernel
  size, stride and map (a 5×5 convolution of 32×32 RGB images into 32 channels, batch 64:
  5.2 against 1.6 ms; 3×3 into 24 channels: 6.3 against 1.1 ms), while with 8-16 or
  36-192 output channels the zero channel gains at most 12 % and mostly loses (up to 1.9x),
  and one input channel (MNIST's) runs 2.3x slower with three zero channels. The zero
  channel adds exact zeros to every sum, so the outputs equal the unpadded convolution's up
  to float rounding (the summation blocks differ). It halves the forward pass of the 4-layer
  CNN on CIFAR-shaped images (140 -> 70 µs per sample). Measurements:
  experiments/benchmarks/RESULTS.md ("Three input channels").
  """
  return in_channels == 3 and 16 < out_channels <= 32 and jax.default_backend() == 'cpu'


def _conv_forward(x, kernel, strides, padding):
  """``lax.conv_general_dilated`` (NHWC, HWIO), with a zero input channel where
  :func:`pads_input_channels` says XLA:CPU needs one."""
  # 'hybrid' convolutions are ungrouped: the kernel's input channels are x's.
  if pads_input_channels(kernel.shape[2], kernel.shape[3]):
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, 1)))
    kernel = jnp.pad(kernel, ((0, 0), (0, 0), (0, 1), (0, 0)))
  return lax.conv_general_dilated(x, kernel, window_strides=strides, padding=padding,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _hybrid_conv(x, kernel, strides, padding):
  return _conv_forward(x, kernel, strides, padding)


def _hybrid_fwd(x, kernel, strides, padding):
  return _hybrid_conv(x, kernel, strides, padding), (x, kernel)


def _hybrid_bwd(strides, padding, residuals, dy):
  x, kernel = residuals
  _, vjp = jax.vjp(lambda a, k: _slices_conv(a, k, strides, padding), x, kernel)
  return vjp(dy)


_hybrid_conv.defvjp(_hybrid_fwd, _hybrid_bwd)


def _pool_windows(x: jax.Array) -> jax.Array:
  """NHWC → ``(batch, h//2, w//2, 4, channels)``: the 2×2 windows, row-major inside each."""
  b, h, w, c = x.shape
  h2, w2 = h // 2, w // 2
  x = x[:, : 2 * h2, : 2 * w2]
  return x.reshape(b, h2, 2, w2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h2, w2, 4, c)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
  """``nn.max_pool(x, (2, 2), strides=(2, 2))`` (VALID, NHWC) with the same values and the
  same gradient: each window's gradient goes to its first maximum (row-major), as XLA's
  select-and-scatter and PyTorch's ``MaxPool2d`` do.

  Written with reshapes because XLA:CPU turns ``max_pool``'s gradient into a scatter with
  int32 index buffers; with the local steps unrolled those buffers are all live at once (a
  4-combination Ditto sweep on digits: 11.5 GB of temporaries per round; 1.4 GB with this).
  """
  return _pool_windows(x).max(axis=3)


def _max_pool_fwd(x):
  windows = _pool_windows(x)
  return windows.max(axis=3), (jnp.argmax(windows, axis=3).astype(jnp.int8), x.shape)


def _max_pool_bwd(residuals, g):
  first, shape = residuals
  b, h, w, c = shape
  h2, w2 = h // 2, w // 2
  hit = first[:, :, :, None, :] == jnp.arange(4, dtype=jnp.int8)[None, None, None, :, None]
  windows = jnp.where(hit, g[:, :, :, None, :], jnp.zeros((), g.dtype))
  dx = windows.reshape(b, h2, w2, 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(
      b, 2 * h2, 2 * w2, c)
  if (2 * h2, 2 * w2) != (h, w):  # VALID pooling drops the last odd row / column
    dx = jnp.pad(dx, ((0, 0), (0, h - 2 * h2), (0, w - 2 * w2), (0, 0)))
  return (dx,)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


def kaiming_normal_fan_out(key, shape, dtype=jnp.float32):
  """PyTorch's ``kaiming_normal_(w, mode='fan_out', nonlinearity='relu')`` for an HWIO conv
  kernel: ``N(0, 2 / fan_out)`` with ``fan_out = out_channels * kh * kw`` (torchvision's
  ResNet and MobileNetV2 initialisation)."""
  kh, kw, _, out = shape
  return jax.random.normal(key, shape, dtype) * np.sqrt(2.0 / (out * kh * kw))


def normal_init(stddev: float) -> Callable[..., jax.Array]:
  """``N(0, stddev²)`` (PyTorch's ``nn.init.normal_(w, 0, stddev)``)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.normal(key, shape, dtype) * stddev
  return init


def trunc_normal_init(stddev: float, bound: float = 2.0) -> Callable[..., jax.Array]:
  """PyTorch's ``trunc_normal_(w, std=stddev, a=-bound, b=bound)``: ``N(0, stddev²)``
  truncated to ``[-bound, bound]`` in absolute units (torchvision's GoogLeNet uses
  ``std=0.01, a=-2, b=2``, so the truncation never bites)."""
  def init(key, shape, dtype=jnp.float32):
    lo, hi = -bound / stddev, bound / stddev
    return jax.random.truncated_normal(key, lo, hi, shape, dtype) * stddev
  return init


def zeros_init(key, shape, dtype=jnp.float32):
  del key
  return jnp.zeros(shape, dtype)


class TorchBatchNorm(nn.Module):
  """``nn.BatchNorm2d`` / ``nn.BatchNorm1d`` with PyTorch's semantics, over the last axis.

  Training (``train=True``): normalise with the batch mean and the *biased* batch variance,
  and update the running statistics (collection ``batch_stats``) with PyTorch's rule

      running_mean ← (1 − m)·running_mean + m·mean
      running_var  ← (1 − m)·running_var + m·var·n/(n − 1)      (unbiased variance)

  with ``m = momentum = 0.1`` (Flax's ``nn.BatchNorm`` would use the biased variance and
  ``momentum`` as the weight of the old value). Evaluation: normalise with the running
  statistics. ``eps = 1e-5``; the affine ``scale``/``bias`` start at 1/0. Statistics are
  computed in float32 whatever the computation ``dtype``.

  A masked (padding) sample is impossible here: the local-training batches are always full
  (drop_last), so every row counts, as in PyTorch.
  """
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Optional[Any] = None
  scale_init: Callable[..., jax.Array] = nn.initializers.ones

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    features = x.shape[-1]
    scale = self.param('scale', self.scale_init, (features,))
    bias = self.param('bias', zeros_init, (features,))
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((features,), jnp.float32))
    axes = tuple(range(x.ndim - 1))
    if train:
      xf = x.astype(jnp.float32)
      mean = xf.mean(axes)
      var = jnp.square(xf - mean).mean(axes)
      n = int(np.prod([x.shape[a] for a in axes]))
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = (1 - m) * ra_mean.value + m * mean
        ra_var.value = (1 - m) * ra_var.value + m * var * (n / max(n - 1, 1))
    else:
      mean, var = ra_mean.value, ra_var.value
    inv = jax.lax.rsqrt(var + self.epsilon) * scale
    y = (x.astype(jnp.float32) - mean) * inv + bias
    return y.astype(self.dtype or x.dtype)
