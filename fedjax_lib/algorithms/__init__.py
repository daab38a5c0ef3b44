"""Federated algorithms, one file each, registered under PFLlib's ``-algo`` names."""

from fedjax_lib.algorithms import (  # noqa: F401  (registration)
    dbe, ditto, fedala, fedavg, fedbabu, fedcp, fedper, fedproto, fedprox, fedrep, fedrod,
    fedktl, fedtgp, gpfl, lgfedavg, local, perfedavg)
from fedjax_lib.algorithms.base import Algorithm, stack_clients
from fedjax_lib.algorithms.registry import (algorithm_names, get_algorithm, make_algorithm,
                                            register)

__all__ = ["Algorithm", "stack_clients", "algorithm_names", "get_algorithm", "make_algorithm",
           "register"]
