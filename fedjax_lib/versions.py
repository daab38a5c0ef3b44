"""The oldest versions of the libraries fedjax_lib calls into, and a check of the installed ones.

``pyproject.toml`` declares these floors, so ``pip install`` upgrades an older JAX. An
environment that keeps one anyway (``pip install --no-deps``, a conda or cluster module's
pinned JAX) would otherwise fail deep inside a run, e.g. ``AttributeError: module
'jax.extend.core' has no attribute 'jaxprs_in_params'`` (JAX has it since 0.10.0) or a
segmentation fault (jaxlib 0.4.35; both seen when the floors said ``jax>=0.4.35``). The
command lines (``python -m fedjax_lib``, ``python -m fedjax_lib.generators``) check first and
print one ``error:`` line with exit status 2; ``from fedjax_lib import Config`` (the
package's public names) raises `ImportError` with the same sentence.

The floors are the versions the whole test suite passed with (`.ci/minimum-versions.txt`
pins them; `.ci/run` runs part of the suite there; README "Supported versions"). JAX is the
newest release, 0.10.2: under jaxlib 0.10.0 and 0.10.1 every program loaded from the
persistent compilation cache printed XLA:CPU's ``cpu_aot_loader`` "Target machine feature
+prefer-no-gather is not supported" lines on stderr, and their grouped convolutions used less
than half the scratch that the memory estimate (`fedjax_lib.memory`) is calibrated on.
"""

from __future__ import annotations

import importlib.metadata
import re
from typing import Optional

#: distribution → oldest version tested. Keep equal to pyproject.toml's floors
#: (tests/test_versions.py compares them).
MINIMUM = {
    "jax": "0.10.2",
    "jaxlib": "0.10.2",
    "flax": "0.12.0",
    "optax": "0.2.3",
    "chex": "0.1.87",
    "orbax-checkpoint": "0.11.20",
    "numpy": "2.0.2",
}


def release(version: str) -> tuple[int, ...]:
  """The numeric release of a version string: ``"0.10.2.dev20261130+cuda"`` → ``(0, 10, 2)``."""
  match = re.match(r"\d+(\.\d+)*", version.strip())
  return tuple(int(p) for p in match.group(0).split(".")) if match else ()


def installed(name: str) -> Optional[str]:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def problem(version_of=None) -> Optional[str]:
  """One sentence naming the first installed library older than its floor, or None.

  A library that is not installed is left to its import (``jaxlib`` may come under another
  distribution name in some builds).
  """
  for name, floor in MINIMUM.items():
    have = (version_of or installed)(name)
    if have is not None and release(have) < release(floor):
      return (f"fedjax_lib needs {name} >= {floor}, but this environment has {name} {have}; "
              f"upgrade it (pip install -U '{name}>={floor}')")
  return None


def check() -> None:
  """Raises `ImportError` if an installed library is older than fedjax_lib's floor."""
  message = problem()
  if message:
    raise ImportError(message)
