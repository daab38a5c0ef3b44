"""FedProto: Federated Prototype Learning across Heterogeneous Clients.

Tan, Long, Liu, Zhou, Lu, Jiang, Zhang, AAAI 2022. HtFLlib's ``-algo FedProto``.

Every client keeps its whole model (any architecture; only prototypes cross the network). A
selected client trains for ``local_epochs`` on

    L = CE(h(f(x)), y) + λ·MSE(f(x), P̄[y])          (λ = ``lam``, HtFLlib's ``-lam``)

where ``P̄`` are the global prototypes (the regulariser is 0 for classes without one, and
absent in round 0), and collects its local prototypes *during* that training: ``P_i^c`` is
the mean of the features ``f(x)`` of class-c samples over every training step (training
mode, the model changing as it trains). It uploads ``{P_i^c : c present}``. The server's new
global prototypes are, per class, the unweighted mean over the clients that uploaded it;
classes no client uploaded this round have none. A client is evaluated by the nearest global
prototype of ``f(x)`` (MSE), and, as a second view, by its head (``test_acc_head``).

Communication per round: ``C_i·d`` floats up per aggregated client, ``C·d`` down per client
(the prototypes of the classes the server has).

Differences from HtFLlib (``clientproto.py``/``serverproto.py``):

- Before the first aggregation there are no prototypes: HtFLlib reports accuracy 0 (0 correct
  of 1e-5 samples); here every class scores 0 and the argmax is class 0, so round 0 shows
  the share of class-0 test samples. ``test_acc_head`` is the untrained head's.
- ``train_loss`` is the head's cross-entropy over the training samples (HtFLlib adds
  ``λ·MSE`` to it).
- Dropped clients (``-cdr``) upload nothing. HtFLlib's ``receive_protos`` reads every
  *selected* client's prototypes, so its ``-cdr`` does not apply to FedProto (nor FedTGP);
  the same at the default ``-cdr 0``.
"""

import dataclasses

import jax

from fedjax_lib.algorithms.prototypes import PrototypeAlgorithm, class_mean_server, class_sums
from fedjax_lib.algorithms.registry import register
from fedjax_lib.core.local import train_model


@register("FedProto")
@dataclasses.dataclass(frozen=True)
class FedProto(PrototypeAlgorithm):
  """Prototype regularisation; prototypes averaged per class on the server."""

  REFERENCE_SPLIT = True  # PFLlib's main.py wraps the model in BaseHeadSplit
  TRAIN_MODE = True

  def init(self, key, sample_x, num_clients):
    return self.empty_prototypes(sample_x), self.init_clients(key, sample_x, num_clients)

  def client_update(self, server_state, client_state, data, key):
    regularised = self.objective(server_state)
    num_classes = server_state["present"].shape[0]

    def objective(features, logits, batch, carry):
      loss, _ = regularised(features, logits, batch, None)
      sums, counts = class_sums(jax.lax.stop_gradient(features), batch.y, batch.mask,
                                num_classes)
      return loss, (carry[0] + sums, carry[1] + counts)

    zeros = (jax.numpy.zeros_like(server_state["protos"]),
             jax.numpy.zeros_like(server_state["present"], jax.numpy.float32))
    variables, (sums, counts), stats = train_model(self.model, client_state["params"], data,
                                                   key, self.local, objective, carry=zeros)
    upload = {"protos": sums / jax.numpy.maximum(counts, 1.0)[:, None], "present": counts > 0}
    return {"params": variables}, upload, stats

  def server_update(self, server_state, uploads, weights, key):
    del server_state, key
    return class_mean_server(uploads, weights)
