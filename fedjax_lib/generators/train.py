"""Training the built-in VAE generator and writing its folder.

``python -m fedjax_lib.generators train --data NAME --out DIR`` (see ``__main__.py``) is
`train_to_folder`: load the images (`load_training_images`), train (`train_generator`: one
jitted Adam step on the negative ELBO of `fedjax_lib.generators.vae`, its state donated),
save the folder every ``checkpoint_every`` steps and at the end (`save_generator`), then draw
``samples.png`` (decoded prior samples) and ``reconstructions.png`` (inputs and their
reconstructions, alternate rows; `figures.write_pngs`).

Keys: ``k = key(seed)``; the parameters start from ``fold_in(k, 0)``; step ``t`` takes its
batch from the permutation ``fold_in(fold_in(k, 1), epoch)`` and its ``ε`` from
``fold_in(fold_in(k, 2), t)``; the PNGs' prior samples use ``fold_in(k, 3)`` (their
reconstructed images are chosen by ``numpy.random.default_rng(seed)``). Same seed, same
generator.

Measured on 2026-12-01, 2-core AMD EPYC VM, CPU only (jax 0.10.2), defaults (w_dim 64,
width 16, resolution 32, batch 64, 2,000 steps, lr 1e-3, beta 1):

* ``python -m fedjax_lib.generators train --data sample-photos --out /tmp/w/gen-photos``:
  3.5 min wall clock (3.4 min of training at ~9.7 steps/s, the rest start-up, 4,096 crops,
  compilation and writing); final loss 123.1 (reconstruction 87.1 + KL 36.0). Samples:
  blurry orange-petal, teal-foliage, sky and brown-roof patches; reconstructions keep the
  colours and layout, not the fine texture.
* ``python -m fedjax_lib.generators train --data digits32 --out /tmp/w/gen-digits``:
  3.6 min wall clock (3.5 min of training); final loss 63.7 (reconstruction 27.1 + KL 36.6).
  Samples: blurry, mostly recognisable white-on-black digits; reconstructions are close.

Peak memory about 0.8 GB in both. ``--width 8`` makes a step about 3× faster (less sharp).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lib.config import MAX_FEATURE_DIM, MAX_INT, MAX_SEED
from fedjax_lib.data import sources
from fedjax_lib.data.loading import is_folder_path
from fedjax_lib.data.pfllib_format import read_pfllib_folder
from fedjax_lib.errors import ConfigError
from fedjax_lib.errors import DataError
from fedjax_lib.generators import figures
from fedjax_lib.generators import photos
from fedjax_lib.generators import vae
from fedjax_lib.generators.base import fit_images
from fedjax_lib.generators.storage import check_output_folder
from fedjax_lib.generators.storage import save_generator

_FIT_CHUNK = 1024  # images fitted per compiled call (one compilation, bounded memory)
_REPORT_EVERY = 10  # steps between progress-bar updates (each one waits for the device)
_LOSS_WINDOW = 50  # steps the reported losses average over



def load_training_images(data: str, resolution: int, channels: int | str = "auto", *,
                         num_photos: int = photos.DEFAULT_NUM_CROPS, seed: int = 0
                         ) -> np.ndarray:
  """The images to train a generator on, fitted to ``resolution × resolution × channels``.

  ``data`` is ``sample-photos`` (`photos.sample_photos` with ``num_photos`` crops and
  ``seed``), a built-in dataset name (`sources.BUILTIN_DATASETS`, any accepted spelling), or
  the path of a PFLlib dataset folder (every client's training and test images). Images are
  brought to the shape by `fit_images` (resize the shorter side, centre crop, 3 ↔ 1 channels).

  Args:
    data: the dataset.
    resolution: side of the returned images.
    channels: ``1``, ``3`` or ``'auto'`` (the dataset's own count, which must be 1 or 3).
    num_photos: number of crops for ``sample-photos``.
    seed: seed of the ``sample-photos`` crops.

  Returns:
    float32 ``[N, resolution, resolution, channels]`` in ``[-1, 1]``.

  Raises:
    DataError: an unknown name, an unreadable folder, or data that are not images.
  """
  if data.strip().lower() == photos.NAME:
    images = photos.sample_photos(num_photos, resolution, seed)
  elif is_folder_path(data):
    images = read_pfllib_folder(data).x
  elif sources.resolve_builtin(data) is not None:
    images = sources.load_builtin(data)[0]
  else:
    raise DataError(f"unknown --data {data!r}; accepted: {photos.NAME}, a built-in dataset "
                    f"({', '.join(sources.BUILTIN_DATASETS)}; case-insensitive) or the path "
                    "of a PFLlib dataset folder")
  if images.ndim != 4 or images.shape[0] == 0:
    raise DataError(f"--data {data!r} holds samples of shape {images.shape[1:]} ({len(images)} "
                    "of them); a generator trains on images [N, H, W, C]")
  native = images.shape[-1]
  if channels == "auto":
    channels = native
  if channels not in vae.CHANNELS or native not in vae.CHANNELS:
    raise DataError(f"--data {data!r} has {native}-channel images and {channels} channels were "
                    f"asked for; accepted: {' or '.join(map(str, vae.CHANNELS))} channels")
  return fit_to_shape(images, (resolution, resolution, channels))


def fit_to_shape(images: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
  """`fit_images` over ``images`` in chunks of a fixed size (padded), as numpy."""
  if tuple(images.shape[1:]) == tuple(shape):
    return np.asarray(images, np.float32)
  fit = jax.jit(fit_images, static_argnums=1)
  chunks = []
  for start in range(0, len(images), _FIT_CHUNK):
    chunk = np.asarray(images[start:start + _FIT_CHUNK], np.float32)
    padded = np.pad(chunk, ((0, _FIT_CHUNK - len(chunk)),) + ((0, 0),) * 3)
    chunks.append(np.asarray(fit(padded, shape))[:len(chunk)])
  return np.concatenate(chunks)


def batch_indices(key: jax.Array, step: jax.Array, num_images: int,
                  batch_size: int) -> jax.Array:
  """The rows of step ``step``'s batch: epochs of ``floor(N / B)`` batches, each epoch a fresh
  permutation ``permutation(fold_in(key, epoch), N)`` (the last ``N mod B`` rows of an epoch
  are skipped, as ``drop_last=True``)."""
  steps_per_epoch = num_images // batch_size
  order = jax.random.permutation(jax.random.fold_in(key, step // steps_per_epoch), num_images)
  return jax.lax.dynamic_slice(order, ((step % steps_per_epoch) * batch_size,), (batch_size,))


def make_train_step(config: dict, optimizer: optax.GradientTransformation, beta: float,
                    batch_size: int, seed: int) -> Callable:
  """The jitted step ``(state, images, step) -> (state, metrics)``, ``state = (params,
  opt_state)`` donated."""
  root = jax.random.key(seed)
  order_key, noise_key = jax.random.fold_in(root, 1), jax.random.fold_in(root, 2)

  def step_fn(state, images, step):
    params, opt_state = state
    batch = images[batch_indices(order_key, step, images.shape[0], batch_size)]
    grads, metrics = jax.grad(vae.negative_elbo, argnums=1, has_aux=True)(
        config, params, batch, jax.random.fold_in(noise_key, step), beta)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), metrics

  return jax.jit(step_fn, donate_argnums=0)


def _progress_bar(total: int, enabled: bool):
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, desc="generator", dynamic_ncols=True, file=sys.stderr,
              disable=not enabled)


def train_generator(images, *, steps: int = 2000, batch_size: int = 64, lr: float = 1e-3,
                    w_dim: int = 64, resolution: int = 32, seed: int = 0, beta: float = 1.0,
                    progress: bool = True, width: int = vae.DEFAULT_CONFIG["width"],
                    checkpoint_every: int = 0,
                    on_checkpoint: Optional[Callable[[int, dict, dict], None]] = None) -> dict:
  """Trains a ``'vae'`` generator on ``images``; returns its params.

  Adam (``lr``) on `vae.negative_elbo` with weight ``beta``, ``steps`` steps of
  ``batch_size`` images (`batch_indices`); the config is ``{'w_dim', 'resolution', 'width',
  'channels': images' channel count}``. Images of another size are fitted first
  (`fit_images`).

  Args:
    images: float ``[N, H, W, C]`` in ``[-1, 1]``, ``C`` 1 or 3, ``N >= batch_size``.
    steps, batch_size, lr, w_dim, resolution, seed, beta, width: as named (see
      `fedjax_lib.generators.vae`).
    progress: show a tqdm bar with the loss on stderr.
    checkpoint_every: call ``on_checkpoint`` every so many steps (0: only at the end).
    on_checkpoint: ``(step, params, metrics)``, called at those steps and after the last
      one with host (numpy) copies of the params and the metrics averaged over the last
      steps (up to 50): ``{'loss', 'reconstruction', 'kl'}``.

  Returns:
    ``{'encoder': ..., 'decoder': ...}``.

  Raises:
    ConfigError: a setting outside what is accepted, or a loss that became non-finite.
    DataError: images that are not ``[N, H, W, 1 or 3]`` or fewer than ``batch_size``.
  """
  options = TrainOptions(data="(images)", out="(none)", steps=steps, batch_size=batch_size,
                         lr=lr, w_dim=w_dim, resolution=resolution, seed=seed, beta=beta,
                         width=width, checkpoint_every=checkpoint_every)
  options.check()
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or images.shape[-1] not in vae.CHANNELS:
    raise DataError(f"train_generator takes images [N, H, W, C] with C in "
                    f"{vae.CHANNELS}, got shape {images.shape}")
  if len(images) < batch_size:
    raise DataError(f"batch_size={batch_size} is larger than the {len(images)} training "
                    "images; lower --batch-size")
  images = fit_to_shape(images, (resolution, resolution, images.shape[-1]))
  config = options.vae_config(images.shape[-1])
  optimizer = optax.adam(lr)
  params = vae.init_params(config, jax.random.fold_in(jax.random.key(seed), 0))
  state = (params, jax.jit(optimizer.init)(params))
  step_fn = make_train_step(config, optimizer, beta, batch_size, seed)
  device_images = jnp.asarray(images)
  history, pending = [], []
  with _progress_bar(steps, progress) as bar:
    for step in range(steps):
      state, metrics = step_fn(state, device_images, jnp.int32(step))
      pending.append(metrics)
      done = step + 1
      checkpoint = done == steps or (checkpoint_every and done % checkpoint_every == 0)
      if done % _REPORT_EVERY and not checkpoint:
        continue
      history = (history + jax.device_get(pending))[-_LOSS_WINDOW:]
      recent = {name: float(np.mean([m[name] for m in history])) for name in history[0]}
      if not math.isfinite(recent["loss"]):
        raise ConfigError(f"generator training diverged at step {done} (loss "
                          f"{recent['loss']}); lower --lr (was {lr}) or --beta")
      bar.set_postfix(loss=f"{recent['loss']:.1f}", kl=f"{recent['kl']:.1f}", refresh=False)
      bar.update(len(pending))
      pending = []
      if checkpoint and on_checkpoint is not None:
        on_checkpoint(done, jax.device_get(state[0]), recent)
  return state[0]


MAX_VAE_WIDTH = 256  # --width: the default is 16; 256 at resolution 64 is 289M parameters


@dataclasses.dataclass(frozen=True)
class TrainOptions:
  """The training command's settings (its flags, one field each)."""

  data: str
  out: str
  steps: int = 2000
  batch_size: int = 64
  lr: float = 1e-3
  w_dim: int = vae.DEFAULT_CONFIG["w_dim"]
  resolution: int = vae.DEFAULT_CONFIG["resolution"]
  channels: int | str = "auto"
  seed: int = 0
  beta: float = 1.0
  width: int = vae.DEFAULT_CONFIG["width"]
  num_photos: int = photos.DEFAULT_NUM_CROPS
  checkpoint_every: int = 500
  progress: bool = True

  def check(self) -> "TrainOptions":
    """Returns ``self``, or raises a `ConfigError` naming the first value not accepted."""
    # (integers may travel into a compiled program as int32; the VAE's stages have up to
    # 16·width channels, and its shapes overflowed at width 2**31 - 1)
    for name, low, high in (("steps", 1, MAX_INT), ("batch_size", 1, MAX_INT),
                            ("w_dim", 1, MAX_FEATURE_DIM), ("width", 1, MAX_VAE_WIDTH),
                            ("num_photos", 1, MAX_INT), ("checkpoint_every", 0, MAX_INT)):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"--{name.replace('_', '-')} {value!r} must be an int >= {low}")
      if value > high:
        raise ConfigError(f"--{name.replace('_', '-')} {value!r} must be an int in [{low}, "
                          f"{high}]")
    if (not isinstance(self.seed, int) or isinstance(self.seed, bool)
        or not 0 <= self.seed <= MAX_SEED):
      raise ConfigError(f"--seed {self.seed!r} must be an int in [0, {MAX_SEED}] (seeds are "
                        "32-bit: JAX's keys keep a seed's low 32 bits)")
    if self.resolution not in vae.RESOLUTIONS:
      raise ConfigError(f"--resolution {self.resolution!r} is not supported; accepted: "
                        f"{', '.join(map(str, vae.RESOLUTIONS))}")
    if self.channels != "auto" and self.channels not in vae.CHANNELS:
      raise ConfigError(f"--channels {self.channels!r} is not supported; accepted: auto, "
                        f"{', '.join(map(str, vae.CHANNELS))}")
    if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
      raise ConfigError(f"--lr {self.lr!r} must be a finite number > 0")
    if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta)
            and self.beta >= 0):
      raise ConfigError(f"--beta {self.beta!r} must be a finite number >= 0")
    return self

  def vae_config(self, channels: int) -> dict:
    return vae.resolve_config({"w_dim": self.w_dim, "resolution": self.resolution,
                               "channels": channels, "width": self.width})


def write_generator_folder(out: str, config: dict, params: dict, images: np.ndarray, *,
                           seed: int = 0, info: dict | None = None) -> tuple[str, str]:
  """A trained ``'vae'``'s folder: `save_generator` then `write_pngs`; returns the PNGs'
  paths."""
  save_generator(out, "vae", config, params, info=info)
  return figures.write_pngs(out, config, params, images, seed)


def train_to_folder(options: TrainOptions,
                    log: Callable[[str], None] = print) -> dict:
  """The training command: checks ``options``, loads the data, trains, writes ``out``.

  Nothing is written before the data are loaded and every setting is checked; the folder is
  then saved every ``checkpoint_every`` steps and at the end, with the PNGs.

  Returns:
    The final metrics (averaged over the last steps) with ``'seconds'``.

  Raises:
    ConfigError, DataError: a setting or dataset not accepted (one line).
  """
  options.check()
  out = check_output_folder(options.out)
  images = load_training_images(options.data, options.resolution, options.channels,
                                num_photos=options.num_photos, seed=options.seed)
  if len(images) < options.batch_size:
    raise DataError(f"--batch-size {options.batch_size} is larger than the {len(images)} "
                    f"images of --data {options.data!r}; lower --batch-size")
  config = options.vae_config(images.shape[-1])
  settings = {name: getattr(options, name) for name in
              ("data", "steps", "batch_size", "lr", "seed", "beta", "num_photos")}
  final = {}
  start = time.perf_counter()

  def checkpoint(step, params, metrics):
    info = {"training": settings, "step": step, "num_images": len(images),
            **{name: round(value, 4) for name, value in metrics.items()}}
    save_generator(out, "vae", config, params, info=info)
    final.update(metrics, step=step)

  params = train_generator(images, steps=options.steps, batch_size=options.batch_size,
                           lr=options.lr, w_dim=options.w_dim, resolution=options.resolution,
                           seed=options.seed, beta=options.beta, progress=options.progress,
                           width=options.width, checkpoint_every=options.checkpoint_every,
                           on_checkpoint=checkpoint)
  seconds = time.perf_counter() - start
  samples, reconstructions = figures.write_pngs(out, config, params, images, options.seed)
  log(f"trained a 'vae' generator on {len(images)} images of --data {options.data!r} "
      f"({config['resolution']}x{config['resolution']}x{config['channels']}, w_dim "
      f"{config['w_dim']}) for {options.steps} steps in {seconds / 60:.1f} min")
  log(f"final loss {final['loss']:.2f} (reconstruction {final['reconstruction']:.2f} + beta "
      f"{options.beta:g} x KL {final['kl']:.2f}; mean of the last steps)")
  log(f"generator: {out} (load_generator / -GPath)")
  log(f"samples: {samples}")
  log(f"reconstructions: {reconstructions}")
  return {**final, "seconds": seconds}
