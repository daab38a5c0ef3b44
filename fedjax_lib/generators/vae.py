"""The built-in generator: a compact convolutional VAE (kind ``'vae'``).

Why a VAE and not a GAN: it trains stably in minutes on a few CPU cores (one loss, no
adversarial balance), and its latent prior is explicitly ``N(0, I)``, the distribution FedKTL's
MMD alignment samples from.

Model (Kingma & Welling, ICLR 2014), for an image ``x ∈ [-1, 1]^{r×r×c}``:

    encoder:  (μ, log σ²) = E(x)                 strided convolutions, then Dense → 2·w_dim
    latent:   w = μ + σ ⊙ ε,  ε ~ N(0, I)         (reparameterisation)
    decoder:  x̂ = D(w) = tanh(...)               Dense → 4×4 map, (×2 nearest resize, 3×3
                                                 conv, GroupNorm, leaky ReLU) per doubling

and the loss per image, averaged over the batch, is the negative ELBO

    L(x) = Σ_pixels (x − x̂)²  +  β · ½ Σ_j (μ_j² + σ_j² − 1 − log σ_j²).

The first term is the Gaussian negative log-likelihood ``−log N(x; x̂, ½ I)`` up to a constant,
so ``β = 1`` (the default) is the ELBO of that model; ``β < 1`` trades prior fit for sharper
reconstructions (samples drift away from the prior), ``β > 1`` the reverse.

Widths: with ``k = log2(r / 4)`` doublings (``r`` = 16, 32, 64: k = 2, 3, 4) the encoder's
stage ``i`` (0-based) has ``width·2^(i+1)`` channels and the decoder mirrors it, from a
``4×4×(width·2^k)`` map down to ``width`` channels before the output convolution. GroupNorm
(``gcd(8, channels)`` groups), not BatchNorm: decoding is a pure function of ``(params, w)``,
one image at a time. Nearest-neighbour upsampling followed by a convolution instead of a
transposed convolution: no checkerboard artefacts (Odena et al., Distill 2016), and about 1.6×
faster per training step on XLA:CPU here.

Parameters: ``{'encoder': ..., 'decoder': ...}``; the generator's ``decode`` uses
``params['decoder']`` only (FedKTL needs no encoder), and both are saved so training can be
inspected or continued.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_lib.errors import ConfigError
from fedjax_lib.generators.base import check_decoded
from fedjax_lib.generators.base import Generator
from fedjax_lib.generators.base import GeneratorKind
from fedjax_lib.generators.base import NormalPrior

#: The configuration of kind ``'vae'`` and its defaults.
DEFAULT_CONFIG = {"w_dim": 64, "resolution": 32, "channels": 3, "width": 16}
RESOLUTIONS = (16, 32, 64)
CHANNELS = (1, 3)
_LOG_VAR_RANGE = (-30.0, 20.0)  # keeps exp(log σ²) finite early in training


def _doublings(resolution: int) -> int:
  return int(math.log2(resolution // 4))


def _group_norm(channels: int) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=math.gcd(8, channels))


def lecun_normal_flat(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """Flax's default kernel initialiser, LeCun normal (a normal truncated at ±2 standard
  deviations, variance ``1 / fan_in``, ``fan_in = prod(shape[:-1])``), drawn as a vector and
  reshaped: the same distribution, but XLA:CPU compiles a rank-1 draw several times faster
  than a rank-4 one (initialising this VAE took 5.5 s with Flax's, 1 s with this)."""
  size, fan_in = math.prod(shape), math.prod(shape[:-1])
  std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # std of N(0, 1) truncated at ±2
  return (jax.random.truncated_normal(key, -2.0, 2.0, (size,), dtype) * std).reshape(shape)


def _conv(channels: int, kernel: int, stride: int = 1) -> nn.Conv:
  return nn.Conv(channels, (kernel, kernel), strides=(stride, stride), padding="SAME",
                 kernel_init=lecun_normal_flat)


def _dense(features: int) -> nn.Dense:
  return nn.Dense(features, kernel_init=lecun_normal_flat)


class VAEEncoder(nn.Module):
  """``x [n, r, r, c] -> (μ, log σ²)``, each ``[n, w_dim]``."""

  w_dim: int
  resolution: int
  width: int

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    for stage in range(_doublings(self.resolution)):
      channels = self.width * 2 ** (stage + 1)
      x = _conv(channels, 4, stride=2)(x)
      x = nn.leaky_relu(_group_norm(channels)(x), 0.2)
    stats = _dense(2 * self.w_dim)(x.reshape(x.shape[0], -1))
    return stats[:, :self.w_dim], stats[:, self.w_dim:]


class VAEDecoder(nn.Module):
  """``w [n, w_dim] -> x̂ [n, r, r, c]`` in ``[-1, 1]`` (tanh)."""

  w_dim: int
  resolution: int
  channels: int
  width: int

  @nn.compact
  def __call__(self, w: jax.Array) -> jax.Array:
    doublings = _doublings(self.resolution)
    top = self.width * 2 ** doublings
    x = _dense(4 * 4 * top)(w).reshape(w.shape[0], 4, 4, top)
    x = nn.leaky_relu(_group_norm(top)(x), 0.2)
    for stage in range(doublings):
      channels = self.width * 2 ** (doublings - 1 - stage)
      n, height, width, depth = x.shape
      x = jax.image.resize(x, (n, 2 * height, 2 * width, depth), "nearest")
      x = _conv(channels, 3)(x)
      x = nn.leaky_relu(_group_norm(channels)(x), 0.2)
    return jnp.tanh(_conv(self.channels, 3)(x))


def resolve_config(config: dict) -> dict:
  """``config`` with `DEFAULT_CONFIG`'s defaults filled in, validated.

  Raises:
    ConfigError: an unknown key, or a value outside what is accepted.
  """
  if not isinstance(config, dict):
    raise ConfigError(f"a 'vae' generator config must be a dict, got {type(config).__name__}")
  unknown = sorted(set(config) - set(DEFAULT_CONFIG))
  if unknown:
    raise ConfigError(f"unknown 'vae' generator config key(s) {', '.join(map(repr, unknown))}; "
                      f"accepted: {', '.join(DEFAULT_CONFIG)}")
  resolved = {**DEFAULT_CONFIG, **config}
  for key, value in resolved.items():
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ConfigError(f"'vae' generator config {key}={value!r} must be an int >= 1")
  if resolved["resolution"] not in RESOLUTIONS:
    raise ConfigError(f"'vae' generator resolution={resolved['resolution']!r} is not "
                      f"supported; accepted: {', '.join(map(str, RESOLUTIONS))}")
  if resolved["channels"] not in CHANNELS:
    raise ConfigError(f"'vae' generator channels={resolved['channels']!r} is not supported; "
                      f"accepted: {', '.join(map(str, CHANNELS))}")
  return resolved


def modules(config: dict) -> tuple[VAEEncoder, VAEDecoder]:
  """The encoder and decoder of a resolved ``config``."""
  encoder = VAEEncoder(config["w_dim"], config["resolution"], config["width"])
  decoder = VAEDecoder(config["w_dim"], config["resolution"], config["channels"],
                       config["width"])
  return encoder, decoder


@functools.lru_cache(maxsize=16)
def _jitted_init(config_items: tuple) -> Callable[[jax.Array], dict]:
  config = dict(config_items)
  encoder, decoder = modules(config)
  side, channels = config["resolution"], config["channels"]

  def init(key):
    encoder_key, decoder_key = jax.random.split(key)
    return {"encoder": encoder.init(encoder_key,
                                    jnp.zeros((1, side, side, channels)))["params"],
            "decoder": decoder.init(decoder_key, jnp.zeros((1, config["w_dim"])))["params"]}

  return jax.jit(init)


def init_params(config: dict, key: jax.Array) -> dict:
  """``{'encoder': ..., 'decoder': ...}`` initialised from ``key`` (Flax's defaults, kernels
  by `lecun_normal_flat`); compiled once per config (op by op it is three times slower)."""
  return _jitted_init(tuple(sorted(config.items())))(key)


def kl_to_standard_normal(mean: jax.Array, log_var: jax.Array) -> jax.Array:
  """``KL(N(μ, σ²) ‖ N(0, I)) = ½ Σ_j (μ_j² + σ_j² − 1 − log σ_j²)``, one value per row."""
  return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(log_var) - 1.0 - log_var, axis=-1)


def negative_elbo(config: dict, params: dict, images: jax.Array, key: jax.Array,
                  beta: float = 1.0) -> tuple[jax.Array, dict]:
  """The batch mean of ``Σ (x − x̂)² + β·KL`` with one reparameterised draw per image.

  Args:
    config: a resolved config.
    params: ``{'encoder': ..., 'decoder': ...}``.
    images: ``[n, r, r, c]`` in ``[-1, 1]``.
    key: the key of the draws ``ε``.
    beta: the KL weight ``β``.

  Returns:
    ``(loss, {'loss', 'reconstruction', 'kl'})``, each a batch mean.
  """
  encoder, decoder = modules(config)
  mean, log_var = encoder.apply({"params": params["encoder"]}, images)
  log_var = jnp.clip(log_var, *_LOG_VAR_RANGE)
  w = mean + jnp.exp(0.5 * log_var) * jax.random.normal(key, mean.shape, mean.dtype)
  decoded = decoder.apply({"params": params["decoder"]}, w)
  reconstruction = jnp.sum(jnp.square(images - decoded), axis=(1, 2, 3)).mean()
  kl = kl_to_standard_normal(mean, log_var).mean()
  loss = reconstruction + beta * kl
  return loss, {"loss": loss, "reconstruction": reconstruction, "kl": kl}


def reconstruct(config: dict, params: dict, images: jax.Array) -> jax.Array:
  """``D(μ(x))``: the decoded posterior means (deterministic), ``[n, r, r, c]``."""
  encoder, decoder = modules(config)
  mean, _ = encoder.apply({"params": params["encoder"]}, images)
  return decoder.apply({"params": params["decoder"]}, mean)


@dataclasses.dataclass(frozen=True)
class VAEDecode:
  """``decode(params, w) = D_{params['decoder']}(w)``; hashable by value."""

  decoder: VAEDecoder

  def __call__(self, params, w) -> jax.Array:
    images = self.decoder.apply({"params": params["decoder"]}, w)
    shape = (self.decoder.resolution, self.decoder.resolution, self.decoder.channels)
    return check_decoded(images, w, shape, "vae")


def build(config: dict) -> Generator:
  """The `Generator` of a resolved ``config``: prior ``N(0, I_{w_dim})``, decoder `VAEDecoder`."""
  _, decoder = modules(config)
  side = config["resolution"]
  return Generator(name="vae", w_dim=config["w_dim"],
                   image_shape=(side, side, config["channels"]),
                   sample_fn=NormalPrior(config["w_dim"]), decode_fn=VAEDecode(decoder))


KIND = GeneratorKind(name="vae", resolve=resolve_config, build=build, init=init_params)
