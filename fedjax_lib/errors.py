"""Error types raised at the library's boundaries.

Every error a user can cause by bad input (a flag, a config field, a dataset folder) is a
:class:`FedJaxError`. Its message is one line that names the bad value and says what is
accepted; the CLI prints it as ``error: <message>`` and exits with status 2.
"""

import sys


class FedJaxError(ValueError):
  """Base class for user-facing errors (bad config, bad data)."""


class ConfigError(FedJaxError):
  """A configuration value is invalid."""


class DataError(FedJaxError):
  """A dataset or dataset folder is missing, malformed or inconsistent."""


class PartitionError(DataError):
  """A partition cannot be produced with the requested settings."""


class PeerError(RuntimeError):
  """Another process of a multi-process run (``--distributed``) failed or was interrupted
  where every process waits for it; the message names it, and its own output has the
  details. The CLI prints ``error: <message>`` and exits with status 1."""


class FedJaxWarning(UserWarning):
  """A one-line notice about the data, a file or the execution that the run works around (a
  class no client gets, a cache file rebuilt, clients trained one at a time). The runner turns
  those raised while it builds a run into the run's ``warning:`` lines and its results'
  ``warnings``, and those of a round into ``warning:`` lines; library callers see Python
  warnings."""


def out_of_memory(error: BaseException) -> "str | None":
  """One line for an allocation that failed (``MemoryError``, or XLA's ``RESOURCE_EXHAUSTED``
  runtime error), else None: what the command lines print instead of a traceback from deep
  inside JAX or numpy when a run needs more memory than the machine or device has."""
  text = str(error).strip()
  if isinstance(error, MemoryError):
    what = f"numpy: {text}" if text else "an allocation failed"
  elif type(error).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and text.startswith(
      "RESOURCE_EXHAUSTED"):
    what = text.splitlines()[0]
  else:
    return None
  return f"out of memory ({what}); the settings need more memory than this machine or device has"


def exit_out_of_memory(error: BaseException, advice: str) -> int:
  """A command line's ``except`` branch for `out_of_memory`: prints ``error: <its line>:
  <advice>`` on stderr and returns exit status 2; any other error is raised again."""
  message = out_of_memory(error)
  if message is None:
    raise error
  print(f"error: {message}: {advice}", file=sys.stderr)
  return 2
