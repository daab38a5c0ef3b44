"""PFLlib's FedGen: the whole model shared, regularised by a server generator of features.

PFLlib's ``-algo FedGen`` (``servergen.py``/``clientgen.py``) is ``-algo FedGen-PFLlib`` here;
``-algo FedGen`` is HtFLlib's variant (personal bases, a shared head, G's Adam created afresh
every round: :mod:`fedjax_lib.algorithms.fedgen`, whose generator, label pool and ensemble
loss this module reuses). Zhu, Hong, Zhou, ICML 2021 (arXiv:2105.10056).

The server owns a conditional feature generator (`fedjax_lib.algorithms.fedgen.Generator`,
``Linear(nd + C, hd) → BatchNorm1d → ReLU → Linear(hd, d)``, always in training mode, noise
``ε ~ U[0, 1)^nd``) and the label pool, the global class histogram that every client uploads
once before round 0 (:meth:`FedGenPFLlib.warmup_client`). A round (B = ``-lbs``):

1. Every client receives the global model ``w`` and G. A selected client trains the whole
   model with SGD on, per step, ``CE(model(x), y) + CE(head(G(ε, y_s)), y_s)`` with ``y_s``
   B labels from the pool (G fixed), and uploads its model.
2. With the sample shares ``w_i = n_i / Σ_j n_j`` of the models that arrived, the server
   trains G for ``server_epochs`` (``-se``, 1,000) Adam steps at ``generator_learning_rate``
   (``-glr``) on ``CE(Σ_i w_i head_i(G(ε, y)), y)`` (`fedjax_lib.algorithms.fedgen.ensemble_loss`)
   with B fresh labels each. **One Adam runs the whole training**: its moments persist from
   round to round (server state ``"adam"``), and with ``-ld`` its rate decays by ``-ldg``
   once per round (PFLlib's ``ExponentialLR`` on the generator's optimizer).
3. ``w = Σ_i w_i w_i`` (FedAvg).

Every client is evaluated with the global model (BatchNorm models with their own running
statistics: parameters are sent, never buffers, as in PFLlib). Download per client: the model
and G's parameters; upload: the model.

**``-lf``** (``localize_feature_extractor=True``, PFLlib's ``-lf True``): every client keeps its
own base, only heads travel — :class:`FedGenPFLlibLocal`, which the registry builds for it.
Each client replaces its head with the global head ``h``, trains base and head on the same
loss, and uploads its head; the server trains G as above against the arrived heads (the same
persistent Adam) and averages them into ``h``. Each client is evaluated with its own base and
``h``. Download per client: ``h`` and G's parameters; upload: the head. (``-algo FedGen`` is
HtFLlib's variant of this shape: G's Adam fresh every round, ``-se`` 100.)

Differences from PFLlib:

- ``-lf`` is read as a boolean (``-lf False`` is False); PFLlib's ``type=bool`` makes any
  non-empty value, ``False`` included, True.
- ``-nnc`` with this algorithm: new clients fine-tune the global model (with ``-lf``: their
  untrained base and ``h``) as the other algorithms' do; PFLlib's ``fine_tuning_new_clients``
  calls ``set_parameters`` with an argument too many and stops with a TypeError.
- The label pool counts every training sample; PFLlib counts over one epoch of its shuffled
  ``drop_last`` loader, leaving out ``n_i mod B`` random samples of each client (a class seen
  only there is missing from that client's counts). ``pfllib_compat=True``
  (``--pfllib-compat``) counts such an epoch, its samples drawn from the run's keys.
- Labels and noise come from the run's keys (PFLlib: numpy's and torch's unseeded RNGs).
- fc1 sees batch-centred inputs and its bias is frozen (see the generator's docstring): the
  same function in training mode, without Adam random-walking directions BatchNorm cancels.
- A round in which no model arrives leaves G, its Adam and ``w`` unchanged (PFLlib asserts).
- ``train_loss`` is the cross-entropy of the evaluated model alone (PFLlib's ``train_metrics``
  adds the generator term on random labels).
- A batch size below 2 is refused: BatchNorm in training mode needs two rows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fedjax_lib.algorithms.base import check_bool
from fedjax_lib.algorithms.fedavg import FedAvg
from fedjax_lib.algorithms.fedgen import (GeneratorClients, GeneratorHeadClients,
                                          generator_adam, generator_steps, zero_unweighted)
from fedjax_lib.algorithms.prototypes import shuffled_loader_samples
from fedjax_lib.algorithms.registry import register
from fedjax_lib.algorithms.split import SplitAlgorithm, split_parts
from fedjax_lib.core.aggregate import weighted_average
from fedjax_lib.errors import ConfigError
from fedjax_lib.models.base import model_state


@dataclasses.dataclass(frozen=True)
class PersistentGenerator(GeneratorClients):
  """PFLlib's generator side, for both shapes: the hyperparameters, G with one Adam whose
  state the server keeps (``"adam"``), and the server's G steps per round. Listed before the
  algorithm class it is mixed into.

  Attributes:
    noise_dim: nd, the width of G's uniform noise (``-nd``; 512).
    generator_learning_rate: G's Adam step size (``-glr``; 0.005), decayed per round by
      ``-ld``.
    hidden_dim: hd, G's hidden width (``-hd``; 512).
    server_epochs: Adam steps on G per round, B labels each (``-se``; PFLlib's 1,000).
    localize_feature_extractor: PFLlib's ``-lf``: bases stay on the clients, heads travel
      (:class:`FedGenPFLlibLocal`).
    pfllib_compat: count the label pool over one shuffled ``drop_last`` epoch of each
      client's samples, as PFLlib does (module docstring).
  """

  noise_dim: int = 512
  generator_learning_rate: float = 0.005
  hidden_dim: int = 512
  server_epochs: int = 1000
  localize_feature_extractor: bool = False
  pfllib_compat: bool = False

  SERVER_DECAYED_RATES = ("generator_learning_rate",)  # -ld: the generator's ExponentialLR

  def __post_init__(self):
    self.check_generator_hyperparameters()
    check_bool(self.name, "localize_feature_extractor", self.localize_feature_extractor)
    check_bool(self.name, "pfllib_compat", self.pfllib_compat)
    if self.localize_feature_extractor != isinstance(self, SplitAlgorithm):
      raise ConfigError(
          f"{type(self).__name__} has {'global' if self.localize_feature_extractor else 'local'}"
          f" bases, but localize_feature_extractor={self.localize_feature_extractor}; build "
          f"{self.name} with make_algorithm, which picks the class for -lf")

  def init(self, key, sample_x, num_clients):
    server, clients = super().init(key, sample_x, num_clients)
    server = {**server, **self.generator_state(key, sample_x)}
    return {**server, "adam": generator_adam(self.generator_learning_rate).init(
        server["generator"])}, clients

  def warmup_client(self, server_state, client_state, data, key):
    """The client's class counts; with ``pfllib_compat`` over one shuffled ``drop_last``
    epoch (PFLlib's ``sample_per_class``)."""
    if self.pfllib_compat:
      data = shuffled_loader_samples(data, key, self.local.batch_size)
    return super().warmup_client(server_state, client_state, data, key)

  def generator_round(self, server_state, heads, weights, key) -> dict:
    """``{"generator", "adam"}`` after G's Adam steps from its persisted moments against the
    arrived ``heads`` (``{"kernel" [K, d, C], "bias" [K, C]}``, zero-weight slots zeroed);
    both unchanged when nothing arrived."""
    generator, adam = generator_steps(
        server_state["generator"], server_state["adam"],
        generator_adam(self.generator_learning_rate), heads, weights,
        server_state["label_counts"], key, self.server_epochs, self.local.batch_size)
    arrived = (weights > 0).any()
    return jax.tree.map(lambda new, old: jnp.where(arrived, new, old),
                        {"generator": generator, "adam": adam},
                        {"generator": server_state["generator"], "adam": server_state["adam"]})


@register("FedGen-PFLlib")
@dataclasses.dataclass(frozen=True)
class FedGenPFLlib(PersistentGenerator, FedAvg):
  """FedAvg of the whole model, its head regularised by a server generator trained with one
  persistent Adam (attributes: :class:`PersistentGenerator`).

  Server state ``{"params", "generator", "adam", "label_counts"}``; client state: BatchNorm
  running statistics (``{"model_state"}``) for a model that has them, else nothing.
  """

  REFERENCE_SPLIT = True  # PFLlib's main.py wraps the model in BaseHeadSplit
  TRAIN_MODE = True
  DECAYED_RATES = ("local.learning_rate",)  # -ld: the clients' SGD

  @classmethod
  def variant(cls, params: dict) -> type:
    """:class:`FedGenPFLlibLocal` for ``localize_feature_extractor=True`` (``-lf``)."""
    return FedGenPFLlibLocal if params.get("localize_feature_extractor") else cls

  def client_update(self, server_state, client_state, data, key):
    """SGD on the whole model: cross-entropy plus the head's on B generated features."""
    trained, stats = self.train_with_generator(
        server_state, self.variables(server_state, client_state), data, key)
    running = model_state(trained)
    return ({"model_state": running} if running else {}), {"params": trained["params"]}, stats

  def server_update(self, server_state, uploads, weights, key):
    """G's Adam steps against the arrived heads (from its persisted moments), then FedAvg."""
    uploads = zero_unweighted(uploads, weights)
    return {**server_state,
            **self.generator_round(server_state, split_parts(uploads)["head"], weights, key),
            "params": weighted_average(uploads, weights, fallback=server_state["params"])}

  def download(self, server_state):
    """The global model and G's parameters (the label pool was sent once; Adam stays)."""
    return {"params": server_state["params"], "generator": server_state["generator"]}


@dataclasses.dataclass(frozen=True)
class FedGenPFLlibLocal(PersistentGenerator, GeneratorHeadClients, SplitAlgorithm):
  """PFLlib's FedGen with ``-lf``: personal bases, a global dense head, the server generator
  with its persistent Adam (attributes: :class:`PersistentGenerator`). Built by the registry
  for ``-algo FedGen-PFLlib -lf`` (:meth:`FedGenPFLlib.variant`).

  Server state ``{"head", "generator", "adam", "label_counts"}``; client state: the base (and
  BatchNorm statistics), stacked.
  """

  REFERENCE_SPLIT = True  # as FedGenPFLlib (these declarations are not inherited)
  TRAIN_MODE = True
  DECAYED_RATES = ("local.learning_rate",)
  SHARED = "head"

  name = "FedGen-PFLlib"

  localize_feature_extractor: bool = True

  def server_update(self, server_state, uploads, weights, key):
    """G's Adam steps against the arrived heads (from its persisted moments), then their
    sample-weighted average."""
    heads = zero_unweighted(uploads["head"], weights)
    return {**server_state, **self.generator_round(server_state, heads, weights, key),
            "head": weighted_average(heads, weights, fallback=server_state["head"])}
