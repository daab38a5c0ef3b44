"""Algorithm lookup by name (PFLlib's ``-algo`` names, case-insensitive)."""

from __future__ import annotations

from typing import Any, Callable

from fedjax_lib.errors import ConfigError

_REGISTRY: dict[str, type] = {}
_CANONICAL: dict[str, str] = {}


def register(name: str, *aliases: str) -> Callable[[type], type]:
  """Class decorator registering an algorithm under ``name`` and ``aliases``."""

  def wrap(cls: type) -> type:
    cls.name = name
    for key in (name, *aliases):
      _REGISTRY[key.lower()] = cls
    _CANONICAL[name.lower()] = name
    return cls

  return wrap


def algorithm_names() -> list[str]:
  """Canonical names of every registered algorithm."""
  return sorted(_CANONICAL.values(), key=str.lower)


# The references' algorithm names for what cannot run here, and what to use instead.
_NOT_HERE = {
    name.lower(): f"{name} is HtFLlib's FedKTL with its PyTorch {generator}, which cannot run "
                  "here; use -algo FedKTL -GPath <a generator folder> (a Flax generator: python "
                  "-m fedjax_lib.generators train ..., or your own through "
                  "generators.from_flax_decoder)"
    for name, generator in (("FedKTL-stylegan-xl", "StyleGAN-XL"),
                            ("FedKTL-stylegan-3", "StyleGAN3"),
                            ("FedKTL-stable-diffusion", "Stable Diffusion"))}


def get_algorithm(name: str) -> type:
  """The algorithm class for ``name``; a ConfigError listing valid names on a typo."""
  cls = _REGISTRY.get(str(name).lower())
  if cls is None and str(name).lower() in _NOT_HERE:
    raise ConfigError(_NOT_HERE[str(name).lower()])
  if cls is None:
    raise ConfigError(f"unknown algorithm {name!r}; choose one of: "
                      f"{', '.join(algorithm_names())} (case-insensitive)")
  return cls


def make_algorithm(name: str, model: Any, local: Any, params: dict | None = None):
  """Instantiates algorithm ``name`` with hyperparameters ``params`` (validated)."""
  cls = get_algorithm(name)
  accepted = cls.hyperparameters()
  params = dict(params or {})
  unknown = sorted(set(params) - set(accepted))
  if unknown:
    listing = ", ".join(f"{k} (default {v})" for k, v in accepted.items()) or "none"
    takers = [f"{k} is taken by {', '.join(names)}" for k in unknown
              if (names := [n for n in algorithm_names()
                            if k in _REGISTRY[n.lower()].hyperparameters()])]
    elsewhere = f" ({'; '.join(takers)})" if takers else ""
    raise ConfigError(f"algorithm {cls.name} does not take hyperparameter(s) "
                      f"{', '.join(unknown)}{elsewhere}; it accepts: {listing}")
  for key, value in params.items():
    default = accepted[key]
    if isinstance(default, (int, float)) and not isinstance(default, bool):
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{cls.name} hyperparameter {key}={value!r} must be a number")
      if isinstance(default, float) and isinstance(value, int):
        params[key] = float(value)  # mu=0 is the float 0.0 (a sweep mu=0,0.1 stays one program)
  variant = getattr(cls, "variant", None)  # a hyperparameter that changes the state's shape
  if variant is not None:
    cls = variant(params)
  return cls(model=model, local=local, **params)
