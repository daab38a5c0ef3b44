"""FedGH: Heterogeneous Federated Learning with Generalized Global Header.

Yi, Wang, Liu, Shi, Yu, ACM Multimedia 2023 (arXiv:2303.13137). HtFLlib's ``-algo FedGH``
(its scripts: ``-slr 0.01 -se 1``).

Each client keeps its own base ``f_i`` (any architecture, features pooled to one width d);
the head ``h = Linear(d, C)`` is global and lives on the server. Every round the server
sends ``h`` to every client, which replaces its head with it (so clients are trained and
evaluated with ``h(f_i(x))``). A selected client then

1. trains its whole model ``h_i ∘ f_i`` (``h_i`` starting from ``h``) with cross-entropy for
   ``local_epochs``;
2. computes in evaluation mode its class prototypes ``P_i^c = mean f_i(x)`` over the class-c
   samples of HtFLlib's prototype loader (its first ``⌊n/B⌋·B`` training samples, in order:
   a ``drop_last`` loader without shuffling), and uploads those of the classes it has
   (``C_i x d`` floats).

The server gathers the (prototype, class) pairs ``(P_i^c, c)`` of the clients that uploaded
and trains ``h`` on them with plain SGD (lr ``server_learning_rate``, ``-slr``) for
``server_epochs`` epochs (``-se``), each a fresh shuffle in batches of ``-lbs`` (the last batch
holds the remainder; PyTorch's ``DataLoader(shuffle=True)``), minimising

    L(W, b) = (1/|batch|) Σ_{(p, c) ∈ batch} −log softmax(W^T p + b)_c .

The trained head persists on the server (initially client 0's initial head). Download:
``dC + C`` floats per client.

The head must be one dense layer of the same shape for every architecture (the server trains
that layer for all of them); other heads are refused (HtFLlib crashes on them, its issue #3).

Differences from HtFLlib (``clientgh.py``/``servergh.py``):

- The server's shuffles derive from the run's keys (HtFLlib: the unseeded global torch RNG);
  its SGD is stateless, so re-creating it every round, as HtFLlib does, is the same.
- ``server_epochs`` defaults to HtFLlib's argparse default 100; its ``total.sh`` uses ``-se 1``.
- Dropped clients (``-cdr``) upload nothing, as in HtFLlib.

PFLlib's ``-algo FedGH`` (``servergh.py``) differs from both: its server trains the head one
epoch per round whatever ``-se`` says (``-se 1`` here gives that count), and its head *is*
client 0's head module, so client 0's local training moves the server's head too. Not
reproduced: it changes nothing measurable (PFLlib with its server head a copy: last-10
accuracy 0.886 against 0.890 on the digits, 25 rounds, ``-slr 1 -se 1``; PFLlib's own torch
seeds spread 0.752–0.890 there: experiments/pfllib_agreement/RESULTS.md).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from fedjax_lib.algorithms.base import (SettingsContext, Traffic, abstract_variables,
                                        check_int, check_number, rows_traffic)
from fedjax_lib.algorithms.prototypes import eval_class_means, loader_samples, train_on_rows
from fedjax_lib.algorithms.registry import register
from fedjax_lib.algorithms.split import SplitAlgorithm, dense_head_shape, split_parts
from fedjax_lib.core.local import cross_entropy_objective, masked_cross_entropy, train_model
from fedjax_lib.errors import ConfigError


_PURPOSE = ("FedGH trains one global head Linear(d, C) on the server and every client replaces "
            "its head with it")


@register("FedGH")
@dataclasses.dataclass(frozen=True)
class FedGH(SplitAlgorithm):
  """Personal bases; a global dense head trained on the server from uploaded prototypes.

  Attributes:
    server_learning_rate: SGD step size of the server's head training (``-slr``; 0.01).
    server_epochs: epochs over the uploaded prototypes per round (``-se``; HtFLlib's default
      100, its scripts 1).
  """

  REFERENCE_SPLIT = True  # HtFLlib's main.py wraps the model in BaseHeadSplit

  server_learning_rate: float = 0.01
  server_epochs: int = 100

  SHARED = "head"
  TRAIN_MODE = True

  def __post_init__(self):
    check_number(self.name, "server_learning_rate", self.server_learning_rate, 0.0)
    check_int(self.name, "server_epochs", self.server_epochs, 0)

  def init(self, key, sample_x, num_clients):
    dense_head_shape(abstract_variables(self.model, sample_x), purpose=_PURPOSE)
    return super().init(key, sample_x, num_clients)

  def client_update(self, server_state, client_state, data, key):
    variables, _, stats = train_model(self.model, self.variables(server_state, client_state),
                                      data, key, self.local, cross_entropy_objective)
    num_classes = server_state["head"]["bias"].shape[0]
    protos, present = eval_class_means(
        lambda x: self.model.apply(variables, x, method="features"),
        loader_samples(data, self.local.batch_size), num_classes)
    # The trained head is dropped: the server's head replaces it before anything uses it.
    return self._client_state(variables), {"protos": protos, "present": present}, stats

  def server_update(self, server_state, uploads, weights, key):
    has = uploads["present"] & (weights > 0)[:, None]               # [K, C]
    num_classes, dim = uploads["protos"].shape[1:]
    valid = has.reshape(-1)
    # Rows that are not pairs may hold anything (dropped slots): zero them before use.
    points = jnp.where(valid[:, None], uploads["protos"].reshape(-1, dim), 0.0)
    labels = jnp.tile(jnp.arange(num_classes), has.shape[0])

    def loss_fn(head, rows, mask):
      logits = points[rows] @ head["kernel"] + head["bias"]
      return masked_cross_entropy(logits, labels[rows], mask)

    head = train_on_rows(server_state["head"], loss_fn, valid, self.local.batch_size,
                         self.server_epochs, optax.sgd(self.server_learning_rate), key)
    return {"head": head}

  def client_model(self, server_state, client_state):
    """The client's full model: its base with the server's head (HtFLlib's saved ``model``;
    ``-sfn``/``-mfn``: a loaded model's head is replaced by the server's from round 0 on)."""
    return self.variables(server_state, client_state)

  def upload_traffic(self, upload) -> Traffic:
    """The prototypes of the classes the client has (``C_i x d``)."""
    return rows_traffic(upload["protos"], upload["present"])

  def check_settings(self, context: SettingsContext) -> list[str]:
    """Refuses a model without a base (its features would be the raw inputs) or whose head
    is not one dense layer."""
    variables = abstract_variables(self.model, context.sample_x)
    dense_head_shape(variables, f"model {context.model_name!r}", _PURPOSE)
    if not jax.tree.leaves(split_parts(variables)["base"]):
      raise ConfigError(
          f"FedGH learns prototypes of the model's features, but model "
          f"{context.model_name!r} has no base/head split (its base has no parameters, so "
          "its features are the raw inputs); use a model with a feature extractor (cnn, dnn, "
          "resnet18, ...)")
    return super().check_settings(context)
