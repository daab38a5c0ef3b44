"""The training command's pictures: ``samples.png`` and ``reconstructions.png``."""

from __future__ import annotations

import os

import jax
import numpy as np

from fedjax_lib.generators import vae
from fedjax_lib.output import os_error
from fedjax_lib.results import write_image_grid

SAMPLES_PNG = "samples.png"
RECONSTRUCTIONS_PNG = "reconstructions.png"


def write_pngs(out: str, config: dict, params: dict, images: np.ndarray, seed: int,
               columns: int = 8) -> tuple[str, str]:
  """Writes ``samples.png`` (``columns²`` decoded prior samples) and ``reconstructions.png``
  (``columns²/2`` training images, each row followed by the row of their reconstructions
  ``D(μ(x))``); returns the two paths."""
  generator = vae.build(config)
  key = jax.random.fold_in(jax.random.key(seed), 3)
  count = min(len(images), columns * columns // 2)
  chosen = np.sort(np.random.default_rng(seed).choice(len(images), count, replace=False))
  inputs = images[chosen]

  @jax.jit
  def draw(params, inputs):
    samples = generator.decode(params, generator.sample(params, key, columns * columns))
    return samples, vae.reconstruct(config, params, inputs)

  samples, rebuilt = jax.device_get(draw(params, inputs))
  pairs = [block for start in range(0, count, columns)
           for block in (inputs[start:start + columns], rebuilt[start:start + columns])]
  paths = os.path.join(out, SAMPLES_PNG), os.path.join(out, RECONSTRUCTIONS_PNG)
  try:
    write_image_grid(paths[0], np.asarray(samples), columns)
    write_image_grid(paths[1], np.concatenate(pairs), columns)
  except OSError as e:
    raise os_error("write the sample images in", out, e) from None
  return paths
