"""Generators for FedKTL: a latent prior, a pure decoder, folders, and a trainable VAE.

* `Generator`: ``sample(params, key, n) -> [n, w_dim]`` and ``decode(params, w) -> [n, H, W,
  C]`` in ``[-1, 1]``; hashable, a static argument of jitted code.
* `fit_images`: decoded images to the clients' sample shape (HtFLlib's Resize + CenterCrop).
* `build_generator` / `GENERATOR_KINDS`: generators by kind (``'vae'``).
* `save_generator` / `load_generator`: a folder with ``generator.json`` and an Orbax
  checkpoint; `load_generator`'s errors are one-line `ConfigError`s.
* `from_flax_decoder`: any Flax ``linen`` decoder as a `Generator` with a ``N(0, I)`` prior.
* `train_generator` (``python -m fedjax_lib.generators train``): the built-in VAE
  (`fedjax_lib.generators.vae`) on a dataset or on ``sample-photos``.
"""

from fedjax_lib.generators.base import fit_images
from fedjax_lib.generators.base import from_flax_decoder
from fedjax_lib.generators.base import Generator
from fedjax_lib.generators.base import GeneratorKind
from fedjax_lib.generators.photos import sample_photos
from fedjax_lib.generators.registry import build_generator
from fedjax_lib.generators.registry import GENERATOR_KINDS
from fedjax_lib.generators.storage import load_generator
from fedjax_lib.generators.storage import save_generator
from fedjax_lib.generators.train import load_training_images
from fedjax_lib.generators.train import train_generator
from fedjax_lib.generators.train import write_generator_folder

__all__ = [
    "GENERATOR_KINDS",
    "Generator",
    "GeneratorKind",
    "build_generator",
    "fit_images",
    "from_flax_decoder",
    "load_generator",
    "load_training_images",
    "sample_photos",
    "save_generator",
    "train_generator",
    "write_generator_folder",
]
