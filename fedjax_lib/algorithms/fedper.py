"""FedPer: Federated Learning with Personalization Layers.

Arivazhagan, Aggarwal, Singh, Choudhary, arXiv:1912.00818, 2019.

Each client holds a personal head on top of a shared base. A selected client trains base and
head jointly on cross-entropy for ``local_epochs``, uploads its base, and keeps its head; the
server replaces the base with the sample-weighted average of the uploaded bases. A client is
evaluated with the global base and its own head.

Differences from PFLlib (``-algo FedPer``): none in the algorithm. PFLlib sends the base to
every client before evaluating; here the server base is combined with each client's head at
evaluation time, which gives the same model. All clients start from the same initial head
(PFLlib's seeded deep copies of one model).
"""

import dataclasses

from fedjax_lib.algorithms.registry import register
from fedjax_lib.algorithms.split import SplitAlgorithm


@register("FedPer")
@dataclasses.dataclass(frozen=True)
class FedPer(SplitAlgorithm):
  """Shared base, personal head, joint training."""

  REFERENCE_SPLIT = True  # PFLlib's main.py wraps the model in BaseHeadSplit
  DECAYED_RATES = ("local.learning_rate",)  # -ld: the one SGD optimizer

  SHARED = "base"
  TRAIN_MODE = True
