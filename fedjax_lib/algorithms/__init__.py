"""Federated algorithms, one file each, registered under PFLlib's ``-algo`` names."""

from fedjax_lib.algorithms import (  # noqa: F401  (registration)
    apfl, apple, dbe, ditto, fd, fedala, fedamp, fedas, fedavg, fedbabu, fedbn, fedcac, fedcp,
    fedcross, feddyn, fedfomo, fedgc, fedgen, fedgen_pfllib, fedgh, fedkd, fedktl, fedl2g, fedlc,
    fedmrl, fedmtl, fedntd, fedpac, fedpcl, fedper, fedphp, fedproto, fedprox, fedrep, fedrod,
    fedtgp, fml, gpfl, lgfedavg, local, moon, perfedavg, pfedme, pflda, scaffold)
from fedjax_lib.algorithms.base import Algorithm, stack_clients
from fedjax_lib.algorithms.registry import (algorithm_names, get_algorithm, make_algorithm,
                                            register)

__all__ = ["Algorithm", "stack_clients", "algorithm_names", "get_algorithm", "make_algorithm",
           "register"]
