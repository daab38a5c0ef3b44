"""Federated algorithms, one file each, registered under PFLlib's ``-algo`` names."""

from fedjax_lib.algorithms import (  # noqa: F401  (registration)
    apfl, dbe, ditto, fd, fedala, fedavg, fedbabu, fedbn, fedcp, feddyn, fedgen, fedgh, fedkd,
    fedktl, fedl2g, fedlc, fedmrl, fedmtl, fedntd, fedper, fedproto, fedprox, fedrep, fedrod,
    fedtgp, fml, gpfl, lgfedavg, local, moon, perfedavg, pfedme, pflda, scaffold)
from fedjax_lib.algorithms.base import Algorithm, stack_clients
from fedjax_lib.algorithms.registry import (algorithm_names, get_algorithm, make_algorithm,
                                            register)

__all__ = ["Algorithm", "stack_clients", "algorithm_names", "get_algorithm", "make_algorithm",
           "register"]
