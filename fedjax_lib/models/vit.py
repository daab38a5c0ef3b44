"""torchvision's ViT-B/16 and ViT-B/32 at image size 32, as HtFLlib uses them.

HtFLlib (``system/main.py``) builds ``torchvision.models.vit_b_16(image_size=32,
num_classes=C)`` and ``vit_b_32(image_size=32, num_classes=C)``. ``BaseHeadSplit``
(``system/flcore/trainmodel/models.py``) takes the model's ``heads`` away, puts
``AdaptiveAvgPool1d(feature_dim)`` in its place, and -- because the model name contains
``'vit'`` -- uses as head ``Sequential(Linear(feature_dim, 768), Tanh(), Linear(768, C))``
with PyTorch's default ``nn.Linear`` initialisation. Here:

* base (:class:`ViTBase`, NHWC 32x32 images -> ``(batch, 768)``):

  - ``conv_proj``: patch embedding, a ``p x p`` conv with stride ``p`` (``p`` = 16 or 32)
    and bias, to 768 channels; the ``(32/p)²`` patches in row-major order;
  - a learned ``class_token`` prepended, a learned ``encoder/pos_embedding`` added
    (``(32/p)² + 1`` tokens: 5 for B/16, 2 for B/32);
  - 12 pre-LN encoder blocks ``encoder/encoder_layer_i``:
    ``x + MHA(LN(x))`` then ``x + MLP(LN(x))``, with 12-head self-attention (hidden 768,
    ``nn.MultiheadAttention`` layout: one ``in_proj`` 768 -> 3·768 and ``out_proj``),
    MLP 768 -> 3072 -> 768 with exact (erf) GELU, LayerNorm eps 1e-6;
  - ``encoder/ln`` (final LayerNorm); output: the class token.
* head (:class:`ViTHead`): ``fc1`` Linear(feature_dim, 768) -> tanh -> ``fc2`` Linear(768, C).

Initialisation (torchvision and ``nn.MultiheadAttention``): ``conv_proj`` kernel
``trunc_normal_(std=sqrt(1/fan_in))`` (fan_in = 3·p·p), bias 0; class token 0; position
embedding ``N(0, 0.02²)``; ``in_proj`` weight ``xavier_uniform_`` over the whole
``(3·768, 768)`` matrix (bound ``sqrt(6 / (768 + 3·768))``), bias 0; ``out_proj`` weight
PyTorch's Linear default ``U(±1/sqrt(768))``, bias 0; MLP weights ``xavier_uniform_``,
biases ``N(0, 1e-6²)``; LayerNorm 1/0; head layers PyTorch's Linear default
(torchvision's zero init of ``heads.head`` is irrelevant: HtFLlib discards ``heads``).

Parameter counts (``params``), ``feature_dim=512`` and 10 classes:
ViT-B/16 86,052,874 (base 85,651,200 + head 401,674); ViT-B/32 87,820,042 (base
87,418,368 + head 401,674). For comparison torchvision's image-size-224, 1000-class models
have 86,567,656 and 88,224,232: at size 32 the position embedding has 5 (2) tokens
instead of 197 (50), and ``heads`` (769,000) gives way to the 2-layer head.

Differences from the reference:

* No dropout layers: torchvision's ``dropout`` and ``attention_dropout`` default to 0 and
  HtFLlib does not set them, so the base is deterministic and has no train mode.
* The input channel count is taken from the input (the reference fixes 3); height and
  width must equal ``image_size`` (as torchvision asserts), else
  :class:`~fedjax_lib.errors.ConfigError`.
* Mixed precision (``dtype``) is an addition: matmuls and LayerNorm outputs in ``dtype``,
  but the residual stream, the attention softmax and LayerNorm statistics in float32.
* Layouts: the ``in_proj`` kernel is ``(768, 3·768)`` with columns ``[q | k | v]``
  (PyTorch's ``in_proj_weight.T``); dense kernels are ``(in, out)``; ``conv_proj`` is HWIO;
  the MLP's layers are ``linear_1``/``linear_2`` (PyTorch ``mlp.0``/``mlp.3``); the head's
  ``fc1``/``fc2`` are PyTorch's ``head.0``/``head.2``.
"""

from typing import Any, Optional

import numpy as np
import jax
from jax import lax
import jax.numpy as jnp
import flax.linen as nn

from fedjax_lib.errors import ConfigError
from fedjax_lib.models.base import BaseHeadModel
from fedjax_lib.models.layers import TorchDense, normal_init, trunc_normal_init, zeros_init

#: Width of the base's output (the class token) per architecture.
PENULTIMATE = {'vit_b_16': 768, 'vit_b_32': 768}

#: Patch size of each architecture (all are ViT-B: 12 layers, 12 heads, 768, MLP 3072).
PATCH_SIZES = {'vit_b_16': 16, 'vit_b_32': 32}

#: The image size HtFLlib passes (``image_size=32``).
IMAGE_SIZE = 32

LN_EPS = 1e-6


def _layer_norm(dtype, name: str) -> nn.LayerNorm:
  # Two-pass variance (E[(x - mean)²]) as PyTorch computes it; statistics in float32.
  return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, use_fast_variance=False, name=name)


def check_input_shape(sample_shape: tuple[int, ...], image_size: int = IMAGE_SIZE,
                      name: str = 'vit') -> None:
  """Raises :class:`ConfigError` unless ``sample_shape`` is ``(image_size, image_size, C)``."""
  shape = tuple(sample_shape)
  if len(shape) != 3 or shape[0] != image_size or shape[1] != image_size:
    raise ConfigError(f'model {name!r} is built for image_size={image_size}: it needs '
                      f'inputs of shape ({image_size}, {image_size}, C), got {shape}')


class PatchEmbedding(nn.Module):
  """torchvision's ``conv_proj``: a ``p x p`` conv with stride ``p`` and bias.

  Kernel ``trunc_normal_(std=sqrt(1 / (C·p·p)), a=-2, b=2)``, bias 0.

  Attributes:
    features: output channels (hidden dim).
    patch_size: ``p``.
    dtype: the computation dtype (``None``: float32).
  """
  features: int
  patch_size: int
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.patch_size
    fan_in = x.shape[-1] * p * p
    kernel = self.param('kernel', trunc_normal_init(float(np.sqrt(1.0 / fan_in)), 2.0),
                        (p, p, x.shape[-1], self.features))
    bias = self.param('bias', zeros_init, (self.features,))
    if self.dtype is not None:
      x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
    y = lax.conv_general_dilated(x, kernel, window_strides=(p, p), padding='VALID',
                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y + bias


class SelfAttention(nn.Module):
  """``nn.MultiheadAttention(hidden, num_heads, batch_first=True)`` applied as
  ``attn(x, x, x)``: one ``in_proj`` to q, k, v, scaled dot-product attention per head,
  ``out_proj``.

  Attributes:
    num_heads: number of heads (must divide the hidden width).
    dtype: the computation dtype (``None``: float32); the softmax is float32.
  """
  num_heads: int
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, length, width = x.shape
    heads = self.num_heads
    if width % heads:
      raise ConfigError(f'hidden width {width} is not divisible by num_heads={heads}')
    head_dim = width // heads
    qkv = TorchDense(3 * width, kernel_init=nn.initializers.xavier_uniform(),
                     bias_init=zeros_init, dtype=self.dtype, name='in_proj')(x)
    q, k, v = (t.reshape(batch, length, heads, head_dim) for t in jnp.split(qkv, 3, axis=-1))
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) * (1.0 / np.sqrt(head_dim))
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(batch, length, width)
    return TorchDense(width, bias_init=zeros_init, dtype=self.dtype, name='out_proj')(out)


class EncoderBlock(nn.Module):
  """torchvision's pre-LN ``EncoderBlock`` (dropout 0).

  Attributes:
    num_heads: attention heads.
    mlp_dim: MLP hidden width.
    dtype: the computation dtype (``None``: float32); the residual stream stays float32.
  """
  num_heads: int
  mlp_dim: int
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    y = _layer_norm(self.dtype, 'ln_1')(x)
    y = SelfAttention(self.num_heads, dtype=self.dtype, name='self_attention')(y)
    x = x + y.astype(x.dtype)
    y = _layer_norm(self.dtype, 'ln_2')(x)
    dense = lambda features, name: TorchDense(
        features, kernel_init=nn.initializers.xavier_uniform(), bias_init=normal_init(1e-6),
        dtype=self.dtype, name=name)
    y = nn.gelu(dense(self.mlp_dim, 'linear_1')(y), approximate=False)
    y = dense(width, 'linear_2')(y)
    return x + y.astype(x.dtype)


class Encoder(nn.Module):
  """torchvision's ``Encoder``: position embedding, the blocks, final LayerNorm.

  Attributes:
    num_layers, num_heads, mlp_dim: the blocks' shape.
    dtype: the computation dtype (``None``: float32).
  """
  num_layers: int
  num_heads: int
  mlp_dim: int
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pos = self.param('pos_embedding', normal_init(0.02), (1, *x.shape[1:]))
    x = x + pos
    for i in range(self.num_layers):
      x = EncoderBlock(self.num_heads, self.mlp_dim, dtype=self.dtype,
                       name=f'encoder_layer_{i}')(x)
    return _layer_norm(self.dtype, 'ln')(x)


class ViTBase(nn.Module):
  """torchvision's ``VisionTransformer`` without ``heads``: NHWC images ->
  ``(batch, hidden_dim)`` (the class token after the final LayerNorm).

  Attributes:
    patch_size: 16 (B/16) or 32 (B/32).
    image_size: the only accepted input height and width (32 in HtFLlib).
    num_layers, num_heads, hidden_dim, mlp_dim: 12, 12, 768, 3072 for ViT-B.
    dtype: the computation dtype (``None``: float32); parameters stay float32.
  """
  patch_size: int = 16
  image_size: int = IMAGE_SIZE
  num_layers: int = 12
  num_heads: int = 12
  hidden_dim: int = 768
  mlp_dim: int = 3072
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.image_size % self.patch_size:
      raise ConfigError(f'image_size {self.image_size} is not divisible by patch_size '
                        f'{self.patch_size}')
    if x.ndim != 4:
      raise ConfigError(f'ViT expects NHWC images of rank 4, got shape {x.shape}')
    check_input_shape(x.shape[1:], self.image_size)
    x = PatchEmbedding(self.hidden_dim, self.patch_size, dtype=self.dtype, name='conv_proj')(x)
    batch = x.shape[0]
    # Patches in row-major (h, w) order; the token sequence is float32 (residual stream).
    x = x.reshape(batch, -1, self.hidden_dim).astype(jnp.float32)
    cls = self.param('class_token', zeros_init, (1, 1, self.hidden_dim))
    cls = jnp.broadcast_to(cls, (batch, 1, self.hidden_dim))
    x = jnp.concatenate([cls, x], axis=1)
    x = Encoder(self.num_layers, self.num_heads, self.mlp_dim, dtype=self.dtype,
                name='encoder')(x)
    return x[:, 0]


class ViTHead(nn.Module):
  """HtFLlib's ViT head: ``Linear(feature_dim, hidden) -> tanh -> Linear(hidden, C)``.

  Attributes:
    num_classes: number of logits.
    hidden_dim: 768.
    dtype: the computation dtype (``None``: float32).
  """
  num_classes: int
  hidden_dim: int = 768
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    z = jnp.tanh(TorchDense(self.hidden_dim, dtype=self.dtype, name='fc1')(z))
    return TorchDense(self.num_classes, dtype=self.dtype, name='fc2')(z)


def vit(name: str, num_classes: int, dtype: Optional[Any] = None,
        feature_dim: Optional[int] = None, image_size: int = IMAGE_SIZE) -> BaseHeadModel:
  """HtFLlib's ``torchvision.models.<name>(image_size=32, num_classes=C)`` with its ViT head.

  Args:
    name: ``'vit_b_16'`` or ``'vit_b_32'``.
    num_classes: number of output logits.
    dtype: the computation dtype, e.g. ``jnp.bfloat16`` (float32 parameters, float32
      features and logits out); ``None`` is float32.
    feature_dim: HtFLlib's ``--feature_dim``: the 768-d class token is adaptively
      average-pooled to this width before the head (``None``: no pooling).
    image_size: input height and width (HtFLlib: 32).

  Returns:
    The model; ``params = {'base': {conv_proj, class_token, encoder}, 'head': {fc1, fc2}}``.

  Raises:
    ConfigError: for an unknown ``name`` or an ``image_size`` the patch size does not
      divide.
  """
  key = str(name).lower()
  if key not in PATCH_SIZES:
    raise ConfigError(f'unknown ViT {name!r}; choose one of: {", ".join(PATCH_SIZES)}')
  patch = PATCH_SIZES[key]
  if not isinstance(image_size, int) or image_size < patch or image_size % patch:
    raise ConfigError(f'{key} needs an image_size that is a positive multiple of its patch '
                      f'size {patch}, got {image_size!r}')
  return BaseHeadModel(
      base=ViTBase(patch_size=patch, image_size=image_size, dtype=dtype),
      head=ViTHead(num_classes, dtype=dtype), dtype=dtype, feature_dim=feature_dim)
