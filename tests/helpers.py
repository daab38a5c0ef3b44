"""Shared test fixtures that are not pytest fixtures: a tiny generator for FedKTL.

`tiny_generator` is a randomly initialised built-in VAE decoder (w_dim 4, 16×16×3, width 4):
a real `fedjax_lib.generators` generator, small enough that FedKTL's server compiles in
seconds. `tiny_generator_path` writes it once per process as a generator folder (what
``-GPath`` reads).
"""

import functools
import tempfile

import jax

from fedjax_lib import generators
from fedjax_lib.generators import vae

TINY_CONFIG = {"w_dim": 4, "resolution": 16, "channels": 3, "width": 4}


@functools.lru_cache(maxsize=None)
def tiny_generator():
  """``(generator, params)`` of a randomly initialised tiny VAE."""
  config = vae.resolve_config(TINY_CONFIG)
  return (generators.build_generator("vae", config),
          vae.init_params(config, jax.random.key(0)))


@functools.lru_cache(maxsize=None)
def tiny_generator_path() -> str:
  """A generator folder holding :func:`tiny_generator` (written once per process)."""
  path = tempfile.mkdtemp(prefix="fedjax_tiny_generator_")
  generators.save_generator(path, "vae", TINY_CONFIG, tiny_generator()[1])
  return path


def fedktl_params(**overrides) -> dict:
  """FedKTL hyperparameters for fast tests: the tiny generator, two server epochs."""
  return {"generator_path": tiny_generator_path(), "server_epochs": 2,
          "server_batch_size": 8, **overrides}


def as_images(data, shape=(2, 2, 3)):
  """``data`` (flat toy features) with every sample reshaped to a tiny image: FedKTL generates
  images, so it runs the shared suites on image-shaped samples."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  return dataclasses.replace(data, x=data.x.reshape(-1, *shape))
