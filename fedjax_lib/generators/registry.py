"""Generator kinds by name: ``generator.json``'s ``"kind"`` → `GeneratorKind`."""

from __future__ import annotations

from fedjax_lib.errors import ConfigError
from fedjax_lib.generators import vae
from fedjax_lib.generators.base import Generator
from fedjax_lib.generators.base import GeneratorKind

#: The kinds `build_generator`, `save_generator` and `load_generator` accept.
GENERATOR_KINDS: dict[str, GeneratorKind] = {"vae": vae.KIND}


def generator_kind(kind: str) -> GeneratorKind:
  """The registered `GeneratorKind` called ``kind``, or a `ConfigError` listing them."""
  found = GENERATOR_KINDS.get(kind) if isinstance(kind, str) else None
  if found is None:
    raise ConfigError(f"unknown generator kind {kind!r}; accepted: "
                      f"{', '.join(GENERATOR_KINDS)}")
  return found


def build_generator(kind: str, config: dict) -> Generator:
  """The `Generator` of a registered ``kind`` with ``config`` (defaults filled in).

  Example: ``build_generator('vae', {'w_dim': 32})``.

  Raises:
    ConfigError: an unknown kind, or a config the kind does not accept.
  """
  spec = generator_kind(kind)
  return spec.build(spec.resolve(config))
