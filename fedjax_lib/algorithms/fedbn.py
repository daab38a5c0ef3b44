"""FedBN: Federated Learning on Non-IID Features via Local Batch Normalization.

Li, Jiang, Zhang, Kamp, Dou, ICLR 2021.

FedAvg in which every BatchNorm layer stays on its client. A model's parameters are split in
two: the *local* part, the affine ``scale``/``bias`` of every BatchNorm layer, and the
*shared* part, everything else. Each client keeps its local part and its BatchNorm running
statistics (``batch_stats``) in its state; the server keeps the shared part ``w``. A selected
client trains the model ``(w, its BatchNorm)`` on cross-entropy in training mode (batch
statistics, running statistics updated, `fedjax_lib.core.local.train_model`), uploads the
shared part ``w_k`` and keeps its BatchNorm; the server sets ``w ← Σ_k n_k w_k / Σ_k n_k``
over the uploads that arrived. A client is evaluated with ``w`` and its own BatchNorm
(running statistics, evaluation mode). All clients start from the same initial model.

A BatchNorm layer is recognised by what it is, not by its name: a layer that keeps running
statistics (a ``batch_stats`` entry at the same path as its parameters,
:func:`batchnorm_layers`) — every `fedjax_lib.models.layers.TorchBatchNorm`, wherever it sits
(the ResNets' stems, blocks and downsample shortcuts, GoogLeNet, MobileNetV2, a head). With a
model without BatchNorm (``cnn``, ``dnn``) nothing is local and FedBN is FedAvg;
:meth:`FedBN.check_settings` warns.

State: server ``{"params": w}`` (the shared part, the nested parameter dict without the
BatchNorm leaves); client ``{"bn": BatchNorm scale/bias, "model_state": {"batch_stats": ...}}``
stacked over all clients (either key absent when the model has none). Download and upload:
the shared part only. A new client (``-nnc``) starts from ``w`` and its freshly initialised
BatchNorm, as in PFLlib.

Differences from PFLlib (``-algo FedBN``; ``pfllib_compat=True``, ``--pfllib-compat``, gives
PFLlib's choice of layers):

- PFLlib keeps a parameter local when its PyTorch name contains ``"bn"``
  (`clientbn.set_parameters`), so a BatchNorm layer whose name lacks it is averaged: the
  downsample shortcut's BatchNorm of torchvision's and PFLlib's ResNets
  (``layer2.0.downsample.1``) and every BatchNorm of MobileNetV2 (``features.i.1``,
  ``features.i.conv.k``). Default: every BatchNorm layer is local (the paper's rule);
  compat: those layers' scale and bias are averaged (:func:`pytorch_name_has_bn` maps this
  codebase's names to PyTorch's). Their running statistics stay local in both modes, as
  PFLlib never sends buffers.
- PFLlib's server also averages the uploaded BatchNorm parameters into a global model that
  no client reads (its ``set_parameters`` skips them); here the server does not keep them.
- PFLlib's FedBN uses the raw model; the base/head split of this codebase changes no
  parameter and no computation.
"""

from __future__ import annotations

import dataclasses

from flax import traverse_util
import jax

from fedjax_lib.algorithms.base import (Algorithm, SettingsContext, abstract_variables,
                                        check_bool, linear_server, stack_clients)
from fedjax_lib.algorithms.registry import register
from fedjax_lib.core.aggregate import weighted_average
from fedjax_lib.core.local import cross_entropy_objective, train_model
from fedjax_lib.models.base import model_state

Path = tuple[str, ...]


def batchnorm_layers(variables) -> frozenset[Path]:
  """The paths (inside ``params``) of the layers that keep running statistics: the BatchNorm
  layers. Works on concrete or abstract variables."""
  stats = traverse_util.flatten_dict(dict(variables.get("batch_stats", {})))
  return frozenset(path[:-1] for path in stats)


def pytorch_name_has_bn(path: Path) -> bool:
  """Whether the PyTorch name of the BatchNorm layer at ``path`` (this codebase's names)
  contains ``"bn"``, PFLlib's test for a local parameter.

  torchvision's and PFLlib's ResNets call the downsample shortcut's BatchNorm
  ``downsample.1`` (here ``downsample_bn``); MobileNetV2's BatchNorms are unnamed entries of
  ``nn.Sequential`` blocks (``features.i.1``, ``features.i.conv.k``; here ``features_i/.../bn``
  and ``project_bn``). Every other BatchNorm of the zoo carries ``bn`` in both spellings
  (``bn1``, ``stem_bn`` for ``bn1``, GoogLeNet's ``bn``).
  """
  if path[-1] == "downsample_bn" or any(p.startswith("features_") for p in path):
    return False
  return "bn" in path[-1]


def split_local(params, local_layers: frozenset[Path]):
  """``(shared, local)``: ``params`` without and with the leaves of the layers in
  ``local_layers`` (nested dicts; a part without leaves is ``{}``)."""
  flat = traverse_util.flatten_dict(dict(params))
  shared = {p: v for p, v in flat.items() if p[:-1] not in local_layers}
  local = {p: v for p, v in flat.items() if p[:-1] in local_layers}
  return traverse_util.unflatten_dict(shared), traverse_util.unflatten_dict(local)


def merge_local(shared, local):
  """The full parameter dict from its two parts (inverse of :func:`split_local`)."""
  flat = traverse_util.flatten_dict(dict(shared))
  flat.update(traverse_util.flatten_dict(dict(local)))
  return traverse_util.unflatten_dict(flat)


@register("FedBN")
@dataclasses.dataclass(frozen=True)
class FedBN(Algorithm):
  """FedAvg of everything but the BatchNorm layers, which stay on each client.

  Attributes:
    pfllib_compat: average the BatchNorm layers whose PyTorch name lacks ``"bn"`` (the
      ResNets' downsample BatchNorm, MobileNetV2's), as PFLlib does; see the module
      docstring.
  """
  DECAYED_RATES = ("local.learning_rate",)  # -ld: the one SGD optimizer

  pfllib_compat: bool = False

  TRAIN_MODE = True

  def __post_init__(self):
    check_bool(self.name, "pfllib_compat", self.pfllib_compat)

  def local_layers(self, variables) -> frozenset[Path]:
    """The layers kept on the clients: every BatchNorm (compat: PFLlib's ``"bn"`` names)."""
    layers = batchnorm_layers(variables)
    if self.pfllib_compat:
      layers = frozenset(p for p in layers if pytorch_name_has_bn(p))
    return layers

  def _client_state(self, variables, local):
    state = {}
    if jax.tree.leaves(local):
      state["bn"] = local
    if model_state(variables):
      state["model_state"] = model_state(variables)
    return state

  def init(self, key, sample_x, num_clients):
    variables = self.init_params(key, sample_x)
    shared, local = split_local(variables["params"], self.local_layers(variables))
    return {"params": shared}, stack_clients(self._client_state(variables, local), num_clients)

  def variables(self, server_state, client_state):
    """A client's model: the shared parameters, its BatchNorm and its running statistics."""
    params = merge_local(server_state["params"], client_state.get("bn", {}))
    return {"params": params, **client_state.get("model_state", {})}

  def client_update(self, server_state, client_state, data, key):
    variables, _, stats = train_model(self.model, self.variables(server_state, client_state),
                                      data, key, self.local, cross_entropy_objective)
    local_layers = frozenset(p[:-1] for p in traverse_util.flatten_dict(
        dict(client_state.get("bn", {}))))
    shared, local = split_local(variables["params"], local_layers)
    return self._client_state(variables, local), shared, stats

  @linear_server
  def server_update(self, server_state, uploads, weights, key):
    del key
    return {"params": weighted_average(uploads, weights, fallback=server_state["params"])}

  def predict(self, server_state, client_state, x):
    return self.model.apply(self.variables(server_state, client_state), x)

  def new_client_variables(self, server_state, client_state):
    """The shared parameters with the new client's freshly initialised BatchNorm (PFLlib's
    ``set_parameters`` leaves a new client's BatchNorm as initialised)."""
    return self.variables(server_state, client_state)

  def check_settings(self, context: SettingsContext) -> list[str]:
    """Warns when nothing is local (a model without BatchNorm, or with compat one whose
    BatchNorm names lack ``"bn"``): FedBN is then FedAvg."""
    variables = abstract_variables(self.model, context.sample_x)
    if not self.local_layers(variables):
      if batchnorm_layers(variables):
        return [f"pfllib_compat=True: no BatchNorm layer of model {context.model_name!r} has "
                "'bn' in its PyTorch name, so FedBN averages every parameter and runs as "
                "FedAvg; drop --pfllib-compat to keep its BatchNorm layers local"]
      return [f"FedBN keeps BatchNorm layers local, but model {context.model_name!r} has none: "
              "FedBN runs as FedAvg; use a model with BatchNorm (resnet4, resnet18, "
              "googlenet, mobilenet_v2, digit5cnn) or -algo FedAvg"]
    if context.num_new_clients and not context.fine_tuning_epoch_new:
      return [f"num_new_clients={context.num_new_clients} with fine_tuning_epoch_new=0: a new "
              "FedBN client is tested with the global layers and a freshly initialised "
              "BatchNorm (scale 1, bias 0, running statistics 0 and 1) that they were never "
              "trained with; set fine_tuning_epoch_new >= 1 (-ften)"]
    return []
