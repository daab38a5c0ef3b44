"""FedAS: Bridging Inconsistency in Personalized Federated Learning.

Yang, Huang, Ye, CVPR 2024. PFLlib's ``-algo FedAS`` (the authors' code, github.com/
xiyuanyang45/FedAS, is PFLlib's with ablation switches).

Every client keeps its whole model (base ``φ_i`` and head ``g_i``); the server keeps a global
model ``θ = (φ, g)``. A selected client, in a round:

1. **Parameter alignment.** Computes its local prototypes ``P_c`` — the mean feature
   ``φ_i(x)`` of each class over its training set, with its own (previous) base, evaluation
   mode — and trains a copy of the global base ``φ`` for ``alignment_epochs`` (1) epochs of
   SGD at ``alignment_learning_rate`` (0.01), batches of ``alignment_batch_size`` (16,
   drop_last), on the per-class MSE toward them (:func:`alignment_loss`)::

       Σ_{c in the batch} (1 / (n_c·d)) Σ_{i: y_i = c} ‖φ(x_i) − P_c‖²

   (PyTorch's ``MSELoss`` per class present in the batch, summed over classes). The aligned
   global base replaces its base; its head stays.
2. Trains the whole model on cross-entropy for ``local_epochs`` epochs.
3. **Client synchronisation.** Computes the trace of its (empirical) Fisher information,
   approximated as in the authors' code (:func:`fisher_trace`): over one shuffled drop_last
   pass of ``batch_size`` batches, evaluation mode, ``Σ_batches ‖∇_θ mean NLL(batch)‖²``
   over all parameters; it grows with the client's data and with how far its model is
   from fitting it.
4. Uploads its model and the trace ``F_i``.

The server's new global model is ``Σ_i F_i θ_i / Σ_i F_i`` over the clients that uploaded
(the old one if every trace is 0, e.g. when no client has a full batch). Clients are
evaluated with their own model (PFLlib's ``evaluate`` reads the clients' models; it has no
``send_models``). Only the global base reaches the clients; the global head is averaged but
only new clients use it. The global model and every client start from the same
parameters.

``alignment_epochs = 0`` is the authors' ``wo_local`` ablation (the global base replaces the
local one unaligned).

The paper's two modules are parameter alignment (the shared part "learns from the previous
model", so the received global parameters fit the client's own representation) and client
synchronisation (an aggregation that keeps stragglers' under-trained knowledge out of the
global model). Both are implemented as in the authors' code, which this module follows;
note that its "Fisher trace" squares each batch's *mean* gradient (the empirical Fisher's
trace would average per-sample squared gradients) and sums over batches, so it weighs a
client by its amount of data as well as by its gradients.

Differences from PFLlib (``serveras.py`` / ``clientas.py``): none in the procedure; no
``pfllib_compat`` is needed. Details:

- The prototypes are over all of a client's training samples (PFLlib's shuffled drop_last
  loader of batch 16 leaves out up to 15); a class the client lacks has none and adds no
  term (PFLlib's ``None``).
- PFLlib also computes the Fisher trace of every client that was not selected, only to print
  it; it is not computed here (it changes nothing).
- The alignment trains in training mode (BatchNorm batch statistics; the aligned copy's
  running statistics are discarded, as PFLlib copies parameters only). PFLlib's copy of the
  global model is in whatever mode the server's model was left in: training mode in round 0,
  evaluation mode (with the first uploader's running statistics) from round 1 on. Only models
  with BatchNorm or dropout notice.
- New clients (``-nnc``): PFLlib's FedAS crashes there (its ``set_parameters`` needs a
  ``progress`` argument the fine-tuning call does not pass); here a new client fine-tunes the
  global model, as in FedAvg.
- The authors' code aligns the server's own model in place, one selected client after the
  other (so each client aligns the previous client's result); PFLlib deep-copies it for
  every client, as here.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lib.algorithms.base import (Algorithm, SettingsContext, abstract_variables,
                                        check_int, check_number, stack_clients)
from fedjax_lib.algorithms.prototypes import eval_class_means
from fedjax_lib.algorithms.registry import register
from fedjax_lib.algorithms.split import split_parts
from fedjax_lib.core.aggregate import weighted_average
from fedjax_lib.core.local import (Batch, batch_schedule, cross_entropy_objective,
                                   masked_cross_entropy, train_model)
from fedjax_lib.errors import ConfigError
from fedjax_lib.models.base import model_state

# fold_in tags of the client's three random streams.
ALIGN_STREAM, TRAIN_STREAM, FISHER_STREAM = 0, 1, 2


def alignment_loss(features: jax.Array, labels: jax.Array, mask: jax.Array,
                   protos: jax.Array, present: jax.Array) -> jax.Array:
  """``Σ_c Σ_{i: y_i = c} ‖f_i − P_c‖² / (n_c·d)`` over the classes c of the batch (rows with
  ``mask``) that have a prototype (``present``); ``n_c`` counts class c's rows."""
  mask = mask.astype(jnp.float32)
  per_class = jax.nn.one_hot(labels, protos.shape[0], dtype=jnp.float32).T @ mask
  squared = jnp.square(features.astype(jnp.float32)
                       - jax.lax.stop_gradient(protos[labels])).mean(-1)
  weight = mask * present[labels].astype(jnp.float32) / jnp.maximum(per_class[labels], 1.0)
  return (weight * squared).sum()


def fisher_trace(loss_fn, params, data, key: jax.Array, spec) -> jax.Array:
  """``Σ_b ‖∇_params loss_fn(params, batch_b)‖²`` over one pass of ``spec.batch_size``
  batches (shuffled from ``key``, drop_last, as `batch_schedule` draws an epoch); float32.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (the batch's mean NLL).
    params: the parameters differentiated (any pytree).
    data: the client's data view.
    key: the shuffle key.
    spec: a `LocalSpec`: ``batch_size``, ``steps_per_epoch`` and ``loop`` are read.
  """
  spec = dataclasses.replace(spec, local_epochs=1)
  rows, valid = batch_schedule(data, key, spec)
  ones = jnp.ones((spec.batch_size,), jnp.float32)

  def squared_gradient(step_rows):
    grads = jax.grad(loss_fn)(params, Batch(data.x[step_rows], data.y[step_rows], ones))
    return sum((jnp.square(g.astype(jnp.float32)).sum() for g in jax.tree.leaves(grads)),
               jnp.zeros((), jnp.float32))

  if spec.loop == "valid":  # only the client's full batches
    steps = jnp.minimum(data.train_count // spec.batch_size, spec.steps_per_epoch)
    return jax.lax.fori_loop(0, steps, lambda i, acc: acc + squared_gradient(rows[i]),
                             jnp.zeros((), jnp.float32))

  def step(acc, inputs):
    step_rows, step_valid = inputs
    return acc + jnp.where(step_valid, squared_gradient(step_rows), 0.0), None

  total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32), (rows, valid))
  return total


@register("FedAS")
@dataclasses.dataclass(frozen=True)
class FedAS(Algorithm):
  """Personal models; the global base aligned to local prototypes before training; the
  server averages the models weighted by their Fisher-information traces.

  Attributes:
    alignment_learning_rate: SGD step size of the alignment (PFLlib: 0.01, fixed).
    alignment_batch_size: the alignment's batch size (PFLlib: 16, fixed).
    alignment_epochs: the alignment's epochs (PFLlib: 1, fixed); 0 skips it.
  """

  REFERENCE_SPLIT = True  # PFLlib's main.py wraps the model in BaseHeadSplit
  DECAYED_RATES = ("local.learning_rate",)  # -ld: local SGD; the alignment keeps its own rate

  alignment_learning_rate: float = 0.01
  alignment_batch_size: int = 16
  alignment_epochs: int = 1

  TRAIN_MODE = True

  def __post_init__(self):
    check_number(self.name, "alignment_learning_rate", self.alignment_learning_rate, 0.0)
    check_int(self.name, "alignment_batch_size", self.alignment_batch_size, 1)
    check_int(self.name, "alignment_epochs", self.alignment_epochs, 0)

  def init(self, key, sample_x, num_clients):
    variables = self.init_params(key, sample_x)
    return {"params": variables["params"]}, stack_clients({"model": variables}, num_clients)

  def alignment_spec(self, width: int):
    """The alignment's `LocalSpec` for clients of at most ``width`` training samples."""
    return dataclasses.replace(
        self.local, learning_rate=self.alignment_learning_rate,
        batch_size=self.alignment_batch_size, local_epochs=self.alignment_epochs,
        steps_per_epoch=width // self.alignment_batch_size)

  def aligned_base(self, global_params, local, data, key):
    """The global base after the alignment to ``local``'s prototypes (step 1)."""
    start = {"params": global_params, **model_state(local)}
    if self.alignment_epochs == 0:
      return split_parts(start)["base"], jnp.zeros((), jnp.float32)
    num_classes = jax.eval_shape(self.model.apply, local, data.x[:1]).shape[-1]
    protos, present = eval_class_means(
        lambda x: self.model.apply(local, x, method="features"), data, num_classes)

    def objective(features, logits, batch, carry):
      del logits
      return alignment_loss(features, batch.y, batch.mask, protos, present), carry

    aligned, _, stats = train_model(self.model, start, data, key,
                                    self.alignment_spec(data.train_idx.shape[0]),
                                    objective, trainable=("base",))
    return split_parts(aligned)["base"], stats["loss"]

  def client_update(self, server_state, client_state, data, key):
    local = client_state["model"]
    base, alignment = self.aligned_base(server_state["params"], local, data,
                                        jax.random.fold_in(key, ALIGN_STREAM))
    start = {"params": {**local["params"], "base": base}, **model_state(local)}
    trained, _, stats = train_model(self.model, start, data,
                                    jax.random.fold_in(key, TRAIN_STREAM), self.local,
                                    cross_entropy_objective)
    state = model_state(trained)
    nll = lambda params, batch: masked_cross_entropy(
        self.model.apply({"params": params, **state}, batch.x), batch.y, batch.mask)
    trace = fisher_trace(nll, trained["params"], data,
                         jax.random.fold_in(key, FISHER_STREAM), self.local)
    metrics = dict(stats, alignment_loss=alignment, fisher_trace=trace)
    return {"model": trained}, {"params": trained["params"], "fisher": trace}, metrics

  def server_update(self, server_state, uploads, weights, key):
    """``Σ F_i θ_i / Σ F_i`` over the uploads with weight > 0 (not the sample counts)."""
    del key
    fisher = jnp.where(jnp.asarray(weights) > 0, uploads["fisher"], 0.0)
    return {"params": weighted_average(uploads["params"], fisher,
                                       fallback=server_state["params"])}

  def predict(self, server_state, client_state, x):
    del server_state
    return self.model.apply(client_state["model"], x)

  def new_client_variables(self, server_state, client_state):
    """A new client fine-tunes the global model (with its own BatchNorm statistics)."""
    return {"params": server_state["params"], **model_state(client_state["model"])}

  def check_settings(self, context: SettingsContext) -> list[str]:
    """Refuses a model without base parameters (nothing to align or share); warns when
    clients have too few samples for one alignment batch."""
    parts = split_parts(abstract_variables(self.model, context.sample_x))
    if not jax.tree.leaves(parts["base"]):
      raise ConfigError(
          f"{self.name} aligns and shares the model's base, but model "
          f"{context.model_name!r} has no base parameters (its features are the raw "
          "inputs), so its clients would not collaborate; use a model with a feature "
          "extractor (cnn, dnn, resnet18, ...)")
    counts = np.asarray(context.train_counts)
    short = int((counts < self.alignment_batch_size).sum())
    if self.alignment_epochs and short:
      return [f"{self.name} hyperparameter alignment_batch_size={self.alignment_batch_size} "
              f"exceeds the training samples of {short} of {counts.size} clients: their "
              "alignment has no full batch (drop_last), so they start from the unaligned "
              "global base; use a smaller alignment_batch_size"]
    return []
