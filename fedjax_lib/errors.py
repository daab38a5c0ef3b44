"""Error types raised at the library's boundaries.

Every error a user can cause by bad input (a flag, a config field, a dataset folder) is a
:class:`FedJaxError`. Its message is one line that names the bad value and says what is
accepted; the CLI prints it as ``error: <message>`` and exits with status 2.
"""


class FedJaxError(ValueError):
  """Base class for user-facing errors (bad config, bad data)."""


class ConfigError(FedJaxError):
  """A configuration value is invalid."""


class DataError(FedJaxError):
  """A dataset or dataset folder is missing, malformed or inconsistent."""


class PartitionError(DataError):
  """A partition cannot be produced with the requested settings."""


class FedJaxWarning(UserWarning):
  """A one-line notice about the data, a file or the execution that the run works around (a
  class no client gets, a cache file rebuilt, clients trained one at a time). The runner turns
  those raised while it builds a run into the run's ``warning:`` lines and its results'
  ``warnings``, and those of a round into ``warning:`` lines; library callers see Python
  warnings."""
