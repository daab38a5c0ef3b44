"""FedRep: Exploiting Shared Representations for Personalized Federated Learning.

Collins, Hassani, Mokhtari, Shakkottai, ICML 2021.

Each client keeps a personal head on top of a shared base (representation). Per round a
selected client first trains ONLY its head for ``plocal_epochs`` epochs with the received base
frozen, then ONLY the base for ``local_epochs`` epochs with the new head frozen; it uploads the
base and keeps the head. The server averages the bases weighted by sample count. A client is
evaluated with the global base and its own head.

Differences from PFLlib (``-algo FedRep``): none in the algorithm. PFLlib keeps two SGD
optimizers with the same learning rate (stateless, so equivalent to one plain SGD per phase) and
freezes parts with ``requires_grad``; here each phase takes gradients w.r.t. its part only.
BatchNorm models train in training mode in both phases (running statistics per client).
The two phases shuffle with independent keys (``fold_in(key, 0)`` and ``fold_in(key, 1)``).
The reported local loss is the base phase's; ``head_loss`` is the head phase's.
"""

import dataclasses

import jax

from fedjax_lib.algorithms.base import check_int
from fedjax_lib.algorithms.registry import register
from fedjax_lib.algorithms.split import SplitAlgorithm
from fedjax_lib.core.local import cross_entropy_objective, train_model


@register("FedRep")
@dataclasses.dataclass(frozen=True)
class FedRep(SplitAlgorithm):
  """Shared base, personal head; head phase then base phase.

  Attributes:
    plocal_epochs: epochs of head-only training per round (PFLlib ``-pls``).
  """

  REFERENCE_SPLIT = True  # PFLlib's main.py wraps the model in BaseHeadSplit
  DECAYED_RATES = ("local.learning_rate",)  # -ld: both optimizers (base, head)

  plocal_epochs: int = 1

  SHARED = "base"
  TRAIN_MODE = True

  def __post_init__(self):
    check_int(self.name, "plocal_epochs", self.plocal_epochs, 1)

  def train_client(self, variables, data, key):
    head_spec = dataclasses.replace(self.local, local_epochs=self.plocal_epochs)
    variables, _, head_stats = train_model(self.model, variables, data,
                                           jax.random.fold_in(key, 0), head_spec,
                                           cross_entropy_objective, trainable=("head",))
    variables, _, stats = train_model(self.model, variables, data, jax.random.fold_in(key, 1),
                                      self.local, cross_entropy_objective, trainable=("base",))
    stats = {"loss": stats["loss"], "head_loss": head_stats["loss"],
             "steps": stats["steps"] + head_stats["steps"]}
    return variables, stats
