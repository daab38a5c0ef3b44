"""LG-FedAvg: Think Locally, Act Globally: Federated Learning with Local and Global Representations.

Liang, Liu, Ziyin, Allen, Auerbach, Brent, Salakhutdinov, Morency, arXiv:2001.01523, 2020.

The mirror image of FedPer: each client keeps a personal base (local representation) and the
head is global. A selected client trains base and head jointly on cross-entropy for
``local_epochs``, uploads its head, and keeps its base; the server's model is the
sample-weighted average of the uploaded heads. A client is evaluated with its own base and the
global head.

Differences from PFLlib (``-algo LG-FedAvg``): none in the algorithm. As in PFLlib the
representation is trained on plain cross-entropy only (the paper's optional auxiliary
representation objectives are not part of PFLlib either), and all clients start from the same
initial base.
"""

import dataclasses

from fedjax_lib.algorithms.registry import register
from fedjax_lib.algorithms.split import SplitAlgorithm


@register("LG-FedAvg", "LGFedAvg")
@dataclasses.dataclass(frozen=True)
class LGFedAvg(SplitAlgorithm):
  """Personal base, shared head, joint training."""

  REFERENCE_SPLIT = True  # PFLlib's main.py wraps the model in BaseHeadSplit
  DECAYED_RATES = ("local.learning_rate",)  # -ld: the one SGD optimizer

  SHARED = "head"
  TRAIN_MODE = True

  def client_model(self, server_state, client_state):
    """The client's full model: its base with the server's head (HtFLlib's saved ``model``;
    ``-sfn``/``-mfn``: a loaded model's head is replaced by the server's from round 0 on)."""
    return self.variables(server_state, client_state)
