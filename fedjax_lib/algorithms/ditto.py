"""Ditto: Fair and Robust Federated Learning Through Personalization.

Li, Hu, Beirami, Smith, ICML 2021.

Every client keeps a personal model ``v`` next to the global model ``w``. A selected client
receiving ``w_g`` each round

1. trains ``v`` for ``plocal_epochs`` epochs on ``CE(v) + (μ/2)·‖v − w_g‖²`` (PFLlib's
   ``ptrain`` with ``PerturbedGradientDescent`` toward the received global model), and
2. trains a copy of ``w_g`` with plain cross-entropy for ``local_epochs`` epochs and uploads it.

The server is FedAvg's sample-weighted average of the uploads, so the global track is exactly
FedAvg. Clients are evaluated with their personal model ``v`` (the personalized accuracy);
:meth:`Ditto.predict_global` gives the global model's predictions. All personal models start
from the same initial parameters as the global model (PFLlib deep-copies one seeded model).
``mu`` defaults to 0.0 and ``plocal_epochs`` to 1, as PFLlib's ``-mu`` and ``-pls``; with μ = 0
the personal model is trained purely locally.

Key derivation: the global track uses the client's round key unchanged (so its numbers equal
FedAvg's), the personal track ``fold_in(key, PERSONAL_STREAM)``.

Differences from PFLlib:

- PFLlib's Ditto appends both its global evaluation (``evaluate``) and its personalized one
  (``evaluate_personalized``) to the same ``rs_test_acc`` list, so its h5 files hold two
  interleaved entries per evaluation round and the reported best accuracy is the maximum over
  both. We report them separately: ``test_acc_personal`` (the personal models, also
  ``test_acc``) and ``test_acc_global`` (:meth:`Ditto.predict_global`).
- The μ term is part of the differentiated loss rather than of the optimizer (the same SGD
  step). ``client_update`` returns the personal track's mean loss as the ``personal_loss``
  metric; the engine's round ``local_loss`` is the global track's.
- The personal model's optimizer state is not kept across rounds (plain SGD has none).
- Models with BatchNorm or dropout train in training mode, and each client keeps two sets of
  running statistics, as PFLlib's two module copies do: its personal model's (inside
  ``client_state['params']``, used by the personalized evaluation) and those of its copy of the
  global model (``client_state['model_state']``, used by the global evaluation and updated by
  the global track); the proximal term covers the parameters only.
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from fedjax_lib.algorithms.base import check_int, check_number, stack_clients
from fedjax_lib.algorithms.fedavg import FedAvg
from fedjax_lib.algorithms.fedprox import proximal_penalty, with_proximal_term
from fedjax_lib.algorithms.registry import register
from fedjax_lib.core.local import cross_entropy_objective, train_locally, train_model
from fedjax_lib.models.base import has_train_mode

# fold_in tag of the personal-model training stream (the global track uses the key as is).
PERSONAL_STREAM = 0xD1770


@register("Ditto")
@dataclasses.dataclass(frozen=True)
class Ditto(FedAvg):
  """Global FedAvg model plus per-client personal models regularized toward it.

  Server state ``{"params": w}``; client state ``{"params": v}`` stacked over all clients.
  ``server_update`` is FedAvg's (inherited).

  Attributes:
    mu: proximal coefficient μ pulling ``v`` toward the received global model (PFLlib ``-mu``).
    plocal_epochs: epochs of personal-model training per round (PFLlib ``-pls``).
  """
  DECAYED_RATES = ("local.learning_rate",)  # -ld: both optimizers (global copy, personal)

  TRAIN_MODE = True

  mu: float = 0.0
  plocal_epochs: int = 1

  def __post_init__(self):
    check_number(self.name, "mu", self.mu)
    check_int(self.name, "plocal_epochs", self.plocal_epochs, 1)

  def init(self, key, sample_x, num_clients):
    params = self.init_params(key, sample_x)
    server, clients = super().init(key, sample_x, num_clients)  # FedAvg's global track
    return server, {"params": stack_clients(params, num_clients), **clients}

  def personal_spec(self):
    """The local-training spec of the personal model: ``plocal_epochs`` epochs."""
    return dataclasses.replace(self.local, local_epochs=self.plocal_epochs)

  def client_update(self, server_state, client_state, data, key):
    personal_key = jax.random.fold_in(key, PERSONAL_STREAM)
    if has_train_mode(self.model):
      personal, _, personal_stats = train_model(
          self.model, client_state["params"], data, personal_key, self.personal_spec(),
          cross_entropy_objective,
          penalty=proximal_penalty(self.mu, server_state["params"]["params"]))
    else:
      personal_loss = with_proximal_term(self.ce_loss, self.mu, server_state["params"])
      personal, _, personal_stats = train_locally(
          client_state["params"], data, personal_key, self.personal_spec(), personal_loss)
    # The global track is FedAvg's client update, with the unchanged key.
    global_state, params, stats = super().client_update(server_state, client_state, data, key)
    metrics = dict(stats, personal_loss=personal_stats["loss"])
    state = {"params": personal}
    if "model_state" in global_state:  # the global track's running statistics
      state["model_state"] = global_state["model_state"]
    return state, params, metrics

  def predict(self, server_state, client_state, x):
    """The personal model's logits (the personalized evaluation)."""
    return self.model.apply(client_state["params"], x)

  def eval_views(self, server_state, client_state, data, key):
    """The personal model (``test_acc``, ``test_acc_personal``) and the global one."""
    del data, key
    return {"personal": functools.partial(self.predict, server_state, client_state),
            "global": functools.partial(self.predict_global, server_state, client_state)}

  def predict_global(self, server_state, client_state, x):
    """The global model's logits (PFLlib's ``evaluate`` of Ditto; with BatchNorm, the
    client's running statistics of its global-track copy)."""
    return self.model.apply(self.variables(server_state, client_state), x)
