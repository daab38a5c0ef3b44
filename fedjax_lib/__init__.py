"""fedjax_lib: personalized and heterogeneous federated learning, simulated in JAX.

Public API::

    from fedjax_lib import Config, run_experiment
    results = run_experiment(Config(dataset="digits", algorithm="FedAvg", global_rounds=50))

The names below are imported on first use, so that ``python -m fedjax_lib`` can install its
signal handlers before JAX is imported (see `fedjax_lib.stopping`).
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {"Config": "fedjax_lib.config", "ConfigError": "fedjax_lib.errors",
            "DataError": "fedjax_lib.errors", "FedJaxError": "fedjax_lib.errors",
            "PartitionError": "fedjax_lib.errors", "Results": "fedjax_lib.runner",
            "RunResult": "fedjax_lib.runner", "run_experiment": "fedjax_lib.runner"}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
  if name in _EXPORTS:
    # Once per public name (then it is a global): ~2.5 ms of package metadata.
    from fedjax_lib import versions  # pylint: disable=import-outside-toplevel
    versions.check()
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'fedjax_lib' has no attribute {name!r}")


def __dir__():
  return __all__
