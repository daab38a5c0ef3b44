"""fedjax_lib: personalized and heterogeneous federated learning, simulated in JAX.

Public API::

    from fedjax_lib import Config, run_experiment
    results = run_experiment(Config(dataset="digits", algorithm="FedAvg", global_rounds=50))
"""

from fedjax_lib.config import Config
from fedjax_lib.errors import ConfigError, DataError, FedJaxError, PartitionError
from fedjax_lib.runner import Results, RunResult, run_experiment

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "DataError", "FedJaxError", "PartitionError", "Results",
           "RunResult", "run_experiment", "__version__"]
