"""The generator protocol FedKTL's server relies on: a latent prior and a pure decoder.

FedKTL (Zhang et al., CVPR 2024) uses a pre-trained generator only through two functions:

    w ~ p(w)                       ``Generator.sample(params, key, n)``  → ``[n, w_dim]``
    x = g(w),  x ∈ [-1, 1]^{H×W×C}  ``Generator.decode(params, w)``      → ``[n, H, W, C]``

A :class:`Generator` holds those functions and the shapes; the parameters travel separately,
so a generator is a static (hashable) argument of jitted code and its parameters are an
ordinary pytree. `fit_images` brings decoded images to the clients' sample shape as HtFLlib's
``Resize`` + ``CenterCrop`` does; `from_flax_decoder` turns any Flax ``linen`` module into a
`Generator` with a standard normal prior.

Hashing: the callables here (`NormalPrior`, `FlaxDecode`) are frozen dataclasses compared by
value, so two generators built from the same configuration are equal and share compiled code.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_lib.errors import ConfigError


def _positive_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_image_shape(image_shape, what: str) -> tuple[int, int, int]:
  """``image_shape`` as a tuple ``(H, W, C)`` of positive ints, or a `ConfigError`."""
  try:
    shape = tuple(image_shape)
  except TypeError:
    shape = None
  if shape is None or len(shape) != 3 or not all(_positive_int(d) for d in shape):
    raise ConfigError(f"{what}={image_shape!r} must be an (H, W, C) tuple of positive ints")
  return shape


@dataclasses.dataclass(frozen=True)
class Generator:
  """A generator as FedKTL sees it: a latent prior and a pure decoder; params are separate.

  Attributes:
    name: the kind or a user-chosen name (``'vae'``, ``'flax'``).
    w_dim: the latent width.
    image_shape: native ``(H, W, C)`` of decoded images.
    sample_fn: ``(params, key, n) -> float32 [n, w_dim]``, draws from the latent prior
      (``n`` a Python int: it is a shape).
    decode_fn: ``(params, w [n, w_dim]) -> float32 [n, H, W, C]`` in ``[-1, 1]``; a pure
      function of its arguments (no batch statistics, no randomness).

  The dataclass is frozen and its fields hashable, so ``jax.jit(f, static_argnums=...)``
  accepts a `Generator`; equal generators reuse one compilation.
  """

  name: str
  w_dim: int
  image_shape: tuple
  sample_fn: Callable
  decode_fn: Callable

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ConfigError(f"Generator name={self.name!r} must be a non-empty string")
    if not _positive_int(self.w_dim):
      raise ConfigError(f"Generator {self.name!r}: w_dim={self.w_dim!r} must be an int >= 1")
    object.__setattr__(self, "image_shape",
                       check_image_shape(self.image_shape, f"Generator {self.name!r}: "
                                         "image_shape"))
    for field in ("sample_fn", "decode_fn"):
      if not callable(getattr(self, field)):
        raise ConfigError(f"Generator {self.name!r}: {field} must be callable, got "
                          f"{type(getattr(self, field)).__name__}")

  def sample(self, params, key, n: int) -> jax.Array:
    """``n`` latents from the prior: float32 ``[n, w_dim]``."""
    return self.sample_fn(params, key, n)

  def decode(self, params, w) -> jax.Array:
    """Images for the latents ``w [n, w_dim]``: float32 ``[n, H, W, C]`` in ``[-1, 1]``."""
    return self.decode_fn(params, w)


@dataclasses.dataclass(frozen=True)
class NormalPrior:
  """The standard normal prior ``w ~ N(0, I_{w_dim})``; ignores the parameters."""

  w_dim: int

  def __call__(self, params, key, n: int) -> jax.Array:
    del params  # the prior has no parameters
    return jax.random.normal(key, (n, self.w_dim), jnp.float32)


def check_decoded(images: jax.Array, w: jax.Array, image_shape: tuple, name: str) -> jax.Array:
  """``images`` as float32 in ``[-1, 1]`` after checking (at trace time) their shape is
  ``[n, *image_shape]``."""
  expected = (w.shape[0], *image_shape)
  if tuple(images.shape) != expected:
    raise ConfigError(f"the decoder of generator {name!r} returned shape "
                      f"{tuple(images.shape)} for w of shape {tuple(w.shape)}; expected "
                      f"{expected} ([n, *image_shape])")
  return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class FlaxDecode:
  """``decode(variables, w) = clip(module.apply(variables, w, method=method), -1, 1)``.

  ``variables`` is what the module's ``apply`` takes (``{'params': ...}``); the output's shape
  is checked against ``image_shape`` when traced.
  """

  module: nn.Module
  image_shape: tuple
  name: str
  method: Any = None

  def __call__(self, variables, w) -> jax.Array:
    images = self.module.apply(variables, w, method=self.method)
    return check_decoded(images, w, self.image_shape, self.name)


def from_flax_decoder(module: nn.Module, w_dim: int, image_shape, name: str = "flax",
                      method: Optional[Any] = None) -> Generator:
  """A `Generator` for any Flax ``linen`` module that maps latents to images.

  ``decode(variables, w) = module.apply(variables, w, method=method)`` (cast to float32 and
  clipped to ``[-1, 1]``; an output shape other than ``[n, *image_shape]`` is a
  `ConfigError` when traced), and the prior is ``N(0, I_{w_dim})``. The caller owns the
  variables: pass exactly what ``module.apply`` takes, e.g.::

    module = MyDecoder()
    variables = module.init(key, jnp.zeros((1, 64)))        # or restored weights
    generator = from_flax_decoder(module, 64, (32, 32, 3))
    images = generator.decode(variables, generator.sample(variables, key, 16))

  Args:
    module: an unbound ``flax.linen.Module``, hashable (linen modules compare by field value).
    w_dim: latent width the module takes.
    image_shape: ``(H, W, C)`` of one decoded image.
    name: the generator's name.
    method: forwarded to ``module.apply`` (a method name or function; ``None``: ``__call__``).

  Returns:
    The `Generator`.
  """
  if not isinstance(module, nn.Module):
    raise ConfigError(f"from_flax_decoder takes a flax.linen.Module, got "
                      f"{type(module).__name__}")
  shape = check_image_shape(image_shape, "from_flax_decoder: image_shape")
  try:
    hash((module, method))
  except TypeError as e:
    raise ConfigError(f"from_flax_decoder: the module {type(module).__name__} or the method "
                      f"is not hashable ({e}); a Generator is a static argument of jitted "
                      "code") from None
  return Generator(name=name, w_dim=w_dim, image_shape=shape,
                   sample_fn=NormalPrior(w_dim),
                   decode_fn=FlaxDecode(module, shape, name, method))


def _covering_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
  """The size ``Resize`` gives before ``CenterCrop(target)``: the side that needs the larger
  scale is made equal to its target, the other scaled by the same factor (floored, as
  torchvision's ``int(size * long / short)``) and never below its target."""
  if target_h * width >= target_w * height:  # target_h / height >= target_w / width
    return target_h, max(target_w, target_h * width // height)
  return max(target_h, target_w * height // width), target_w


def fit_images(images, shape) -> jax.Array:
  """Decoded images ``[n, H, W, C]`` fitted to the clients' sample shape ``(h, w, c)``.

  As HtFLlib's ``transforms.Resize(h)`` + ``transforms.CenterCrop(h)``:

  1. channels: ``C = c`` unchanged; ``C = 3 → c = 1`` by the mean over channels; ``C = 1 →
     c = 3`` by repetition; anything else is a `ConfigError`;
  2. resize (``jax.image.resize``, ``'linear'``, antialiased) to ``(H', W')`` where the side
     needing the larger scale equals its target and the other is scaled alike (floored):
     for a square target, the shorter side becomes ``h``;
  3. centre crop ``(h, w)`` with offsets ``round((H' - h) / 2)``, ``round((W' - w) / 2)``
     (torchvision's rounding);
  4. clip to ``[-1, 1]`` (interpolation stays in range; the clip guards rounding).

  Jittable with ``shape`` static: ``jax.jit(fit_images, static_argnums=1)``.

  Args:
    images: float ``[n, H, W, C]`` in ``[-1, 1]``.
    shape: target ``(h, w, c)``.

  Returns:
    float32 ``[n, h, w, c]``.
  """
  target_h, target_w, target_c = check_image_shape(shape, "fit_images: shape")
  if images.ndim != 4:
    raise ConfigError(f"fit_images takes images [n, H, W, C], got shape {tuple(images.shape)}")
  images = jnp.asarray(images, jnp.float32)
  n, height, width, channels = images.shape
  if channels != target_c:
    if (channels, target_c) == (3, 1):
      images = images.mean(axis=-1, keepdims=True)
    elif (channels, target_c) == (1, 3):
      images = jnp.repeat(images, 3, axis=-1)
    else:
      raise ConfigError(f"fit_images cannot turn {channels}-channel images into {target_c} "
                        "channels; accepted: equal counts, 3 -> 1 (mean) and 1 -> 3 (repeat)")
  resized_h, resized_w = _covering_size(height, width, target_h, target_w)
  if (resized_h, resized_w) != (height, width):
    images = jax.image.resize(images, (n, resized_h, resized_w, target_c), "linear",
                              antialias=True)
  top = int(round((resized_h - target_h) / 2.0))
  left = int(round((resized_w - target_w) / 2.0))
  images = images[:, top:top + target_h, left:left + target_w, :]
  return jnp.clip(images, -1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class GeneratorKind:
  """A kind of generator the library can build, initialise and load by name.

  Attributes:
    name: the registry key (``generator.json``'s ``"kind"``).
    resolve: ``config -> config`` with every default filled in; a `ConfigError` for unknown
      keys or bad values.
    build: resolved ``config -> Generator``.
    init: ``(resolved config, key) -> params`` (also gives `load_generator` the structure,
      shapes and dtypes to restore).
  """

  name: str
  resolve: Callable[[dict], dict]
  build: Callable[[dict], Generator]
  init: Callable[[dict, jax.Array], Any]
