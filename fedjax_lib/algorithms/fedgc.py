"""FedGC: Federated Learning for Face Recognition with Gradient Correction.

Niu, Deng, AAAI 2022 (arXiv:2112.07246). PFLlib's ``-algo FedGC``.

The base f is shared; every client k has a private, bias-free head ``W_k [d, C]`` of which only
the columns of its own classes ``C_k`` (those it has training samples of) exist: its logits
are ``W_k[:, c]·f(x)`` for ``c ∈ C_k``, and the other classes are not in its softmax. The
heads live on the server (it corrects all of them every round) and are sent to their clients.

A round:

1. A selected client k receives the global base and its head ``W_k``, trains both for
   ``local_epochs`` on the cross-entropy over its own classes, ``CE(softmax_{C_k}(W_kᵀf(x)),
   y)``, and uploads the base and the columns ``C_k`` of ``W_k``.
2. The server averages the bases weighted by sample count (FedAvg), stores each arrived head,
   then takes one SGD step of size ``η·λ`` (``η`` = ``-lr``, ``λ`` = ``lam``, PFLlib's ``-lam``)
   on all N heads for the regulariser (:func:`correction_loss`)

       Reg = Σ_k Σ_{c ∈ C_k} ℓ_c,
       ℓ_c = −log( e^{ē_c·ē_c} / (e^{ē_c·ē_c} + Σ_{j: c ∉ C_j} Σ_{r ∈ C_j} e^{W_j[:, r]·ē_c}) ),

   where ``ē_c`` = mean of ``W_k[:, c]`` over the clients that have class c, taken as a
   constant (no gradient). Since ``ℓ_c`` does not depend on k, ``Reg = Σ_c n_c·ℓ_c`` with
   ``n_c`` the number of clients having class c, and its gradient reaches only the *negative*
   columns: ``∂Reg/∂W_j[:, r] = Σ_{c ∉ C_j} n_c·p_c(j, r)·ē_c`` for ``r ∈ C_j``, ``p_c`` the
   softmax weight of ``(j, r)`` in ``ℓ_c``. This is the paper's gradient correction: the
   cross-client term a centralised softmax would have given each class embedding (pushed away
   from the embeddings of classes its client never sees), with the class embedding ``ē_c``
   standing in for the features of those classes. The paper has disjoint classes per client
   (face identities); PFLlib's version for overlapping label sets averages a class's columns
   into ``ē_c`` and takes the negatives from the clients lacking the class.

A client is evaluated with the global base and its head over its own classes (a class it has
no training samples of gets the logit ``ABSENT_LOGIT`` and is never predicted).

Which classes each client has is known to the server before round 0: an initialisation period
(``warmup_client`` / ``warmup_server``) has every client send its class-presence vector (PFLlib
reads it from the client objects when it builds the server). Until then every client is
taken to have no classes. The client id is stored in the client state to find the client's
head.

State: server ``{"base", "heads" [N, d, C], "classes" [N, C] bool}``; client ``{"id"}``, plus
``"model_state"`` (running statistics, kept per client as PFLlib keeps BatchNorm buffers) for
models with BatchNorm. Every head starts from the model's initial head kernel (PFLlib builds a
fresh ``Linear(d, |C_k|, bias=False)`` per client). The head must be one dense layer (its
kernel is the head; its bias is held at 0 and never trained). Traffic per client and round:
down the base and ``d·|C_k|`` head floats, up the same.

Differences from PFLlib (``clientgc.py``/``servergc.py``):

- ``ℓ_c`` is computed as a log-sum-exp; PFLlib exponentiates the dot products directly, which
  overflows to inf/NaN once a dot product exceeds ~88.
- A client's classes are those of all its training samples; PFLlib counts one shuffled
  drop_last pass at start-up, which may miss a class whose samples all fall into the dropped
  remainder (such a sample, met in a later epoch, is then trained as the client's first class).
- PFLlib maps every test label to its index among the client's training classes, so a test
  sample of a class the client has no training samples of counts as the client's first class
  (and is correct when that class is predicted). Here it is counted wrong: the client cannot
  predict it. The AUC is taken over all C classes (absent ones scoring ``ABSENT_LOGIT``);
  PFLlib's over the client's classes only.
- New clients (``-nnc``) are not supported: PFLlib's fine-tuning passes the raw labels to the
  ``|C_k|``-way head, which fails for any label ``>= |C_k|``.
- Initial heads: every PFLlib client re-seeds torch with 0 before building its head, so row k
  of every client's head starts as the same vector, whichever class it stands for. Here class
  c's row starts from the global initial head's column c (different classes, different
  vectors). Only early rounds can notice.
- PFLlib's DNN emits ``log_softmax`` of its hidden features once ``fc`` is removed; here the
  head sees the ReLU features (see `fedjax_lib.models.mlp`), and PFLlib's under
  ``--pfllib-compat``.
- ``lam`` is validated (``>= 0``, finite); ``lam = 0`` keeps the uploaded heads uncorrected.

There is no ``pfllib_compat`` switch: nothing above changes what PFLlib computes where it
works. In particular the class embeddings ``ē_c`` stay detached, as in PFLlib: that makes the
correction act on the negative columns only, which is the cross-client gradient term the
paper injects (the positive pull is left to the clients' own training).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from fedjax_lib.algorithms.base import (Algorithm, SettingsContext, Traffic,
                                        abstract_variables, check_number, stack_clients,
                                        tree_traffic)
from fedjax_lib.algorithms.registry import register
from fedjax_lib.algorithms.split import dense_head_shape, split_parts
from fedjax_lib.core.aggregate import weighted_average
from fedjax_lib.core.local import class_counts, masked_cross_entropy, train_model
from fedjax_lib.errors import ConfigError
from fedjax_lib.models.base import model_state

# The logit of a class a client has no training samples of: it never wins an argmax and its
# softmax weight is exactly 0 in float32 (a finite stand-in for -inf).
ABSENT_LOGIT = -1e9

_PURPOSE = "FedGC keeps one bias-free dense head per client (its kernel, one column per class)"


def restricted_logits(logits: jax.Array, present: jax.Array) -> jax.Array:
  """``logits [..., C]`` with the classes outside ``present [C]`` set to ``ABSENT_LOGIT``."""
  return jnp.where(present, logits.astype(jnp.float32), ABSENT_LOGIT)


def correction_loss(heads: jax.Array, classes: jax.Array) -> jax.Array:
  """FedGC's server regulariser ``Reg`` of all N heads (module docstring), in float32.

  Args:
    heads: ``[N, d, C]`` the clients' head kernels (column c = class c's embedding).
    classes: ``[N, C]`` bool, whether client k has class c; a column of a class the client
      lacks is neither an anchor nor a negative.

  Returns:
    ``Σ_c n_c·(logsumexp(s_cc, {W_j[:, r]·ē_c}) − s_cc)``, ``s_cc = ē_c·ē_c``, the negatives
    over the clients j lacking c and their classes r. Gradient: into the negative columns only
    (the anchors ``ē_c`` are constants); 0 for a class no client has or every client has.
  """
  heads = heads.astype(jnp.float32)
  has = classes.astype(jnp.float32)
  holders = has.sum(0)                                                     # n_c
  anchors = jnp.einsum("kdc,kc->cd", heads, has) / jnp.maximum(holders, 1.0)[:, None]
  anchors = jax.lax.stop_gradient(anchors)                                 # ē_c [C, d]
  positive = jnp.square(anchors).sum(-1)                                   # s_cc [C]
  scores = jnp.einsum("jdr,cd->jrc", heads, anchors)                       # [N, r, c]
  negative = classes[:, :, None] & ~classes[:, None, :]                    # j has r, lacks c
  num_classes = heads.shape[-1]
  terms = jnp.concatenate([positive[None], scores.reshape(-1, num_classes)])
  valid = jnp.concatenate([jnp.ones((1, num_classes), bool),
                           negative.reshape(-1, num_classes)])
  per_class = jax.nn.logsumexp(terms, axis=0, where=valid) - positive
  return (holders * per_class).sum()


def corrected_heads(heads: jax.Array, classes: jax.Array, learning_rate) -> jax.Array:
  """One SGD step of size ``learning_rate`` on :func:`correction_loss` (PFLlib's
  ``reg_train``: one step per head's SGD optimiser, all at the same rate)."""
  grad = jax.grad(correction_loss)(heads, classes)
  return (heads.astype(jnp.float32) - learning_rate * grad).astype(heads.dtype)


@register("FedGC")
@dataclasses.dataclass(frozen=True)
class FedGC(Algorithm):
  """Shared base, private class-restricted heads corrected on the server.

  Attributes:
    lam: λ, the server's correction step is ``λ·lr`` (PFLlib's ``-lam``, default 1.0).
  """

  REFERENCE_SPLIT = True  # PFLlib's main.py wraps the model in BaseHeadSplit
  # -ld: the client SGD; the server correction lr·λ stays undecayed
  DECAYED_RATES = ("local.learning_rate",)

  lam: float = 1.0

  TRAIN_MODE = True

  def __post_init__(self):
    check_number(self.name, "lam", self.lam, 0.0)

  # ---------------------------------------------------------------- state
  def init(self, key, sample_x, num_clients):
    dense_head_shape(abstract_variables(self.model, sample_x), purpose=_PURPOSE)
    variables = self.init_params(key, sample_x)
    parts = split_parts(variables)
    kernel = parts["head"]["kernel"]
    server = {"base": parts["base"],
              "heads": jnp.array(stack_clients(kernel, num_clients)),
              "classes": jnp.zeros((num_clients, kernel.shape[-1]), bool)}
    client = {"id": jnp.arange(num_clients, dtype=jnp.int32)}
    if model_state(variables):
      client["model_state"] = stack_clients(model_state(variables), num_clients)
    return server, client

  def variables(self, server_state, client_state):
    """Client's full model: the global base, its head kernel, a zero bias, its statistics."""
    kernel = server_state["heads"][client_state["id"]]
    head = {"kernel": kernel, "bias": jnp.zeros(kernel.shape[-1:], kernel.dtype)}
    return {"params": {**({"base": server_state["base"]} if server_state["base"] else {}),
                       "head": head}, **client_state.get("model_state", {})}

  # ---------------------------------------------------------------- initialisation period
  def warmup_client(self, server_state, client_state, data, key):
    """Sends which classes the client has training samples of."""
    del key
    present = class_counts(data, server_state["classes"].shape[-1]) > 0
    return client_state, {"id": client_state["id"], "present": present}

  def warmup_server(self, server_state, uploads, weights, key):
    del key
    rows = _rows(uploads["id"], weights, server_state["classes"].shape[0])
    classes = server_state["classes"].at[rows].set(uploads["present"], mode="drop")
    return {**server_state, "classes": classes}

  # ---------------------------------------------------------------- rounds
  def client_update(self, server_state, client_state, data, key):
    cid = client_state["id"]
    present = server_state["classes"][cid]
    variables = self.variables(server_state, client_state)

    def objective(features, logits, batch, carry):
      del features
      return masked_cross_entropy(restricted_logits(logits, present), batch.y,
                                  batch.mask), carry

    # The bias stays 0: its updates are zeroed (PFLlib's head has no bias).
    labels = jax.tree.map(lambda _: "train", variables["params"])
    labels["head"]["bias"] = "frozen"
    tx = optax.multi_transform({"train": optax.sgd(self.local.learning_rate),
                                "frozen": optax.set_to_zero()}, labels)
    variables, _, stats = train_model(self.model, variables, data, key, self.local, objective,
                                      tx=tx)
    parts = split_parts(variables)
    # Columns of absent classes receive no gradient; keep them bit-identical (DP noise).
    kernel = jnp.where(present[None, :], parts["head"]["kernel"], server_state["heads"][cid])
    state = {"id": cid}
    if model_state(variables):
      state["model_state"] = model_state(variables)
    upload = {"id": cid, "base": parts["base"], "kernel": kernel, "present": present}
    return state, upload, stats

  def server_update(self, server_state, uploads, weights, key):
    del key
    arrived = weights > 0
    # A slot of weight 0 may hold anything (a dropped client's NaN): zero it before use.
    clean = lambda u: jnp.where(arrived.reshape((-1,) + (1,) * (u.ndim - 1)), u, 0)
    base = weighted_average(jax.tree.map(clean, uploads["base"]), weights,
                            fallback=server_state["base"])
    heads = server_state["heads"]
    rows = _rows(uploads["id"], weights, heads.shape[0])
    heads = heads.at[rows].set(uploads["kernel"].astype(heads.dtype), mode="drop")
    heads = corrected_heads(heads, server_state["classes"],
                            self.local.learning_rate * self.lam)
    return {"base": base, "heads": heads, "classes": server_state["classes"]}

  def predict(self, server_state, client_state, x):
    logits = self.model.apply(self.variables(server_state, client_state), x)
    return restricted_logits(logits, server_state["classes"][client_state["id"]])

  # ---------------------------------------------------------------- communication
  def download_traffic(self, server_state) -> Traffic:
    """The base and the client's own head columns (``d·|C_k|``), averaged over clients."""
    base = tree_traffic(server_state["base"])
    heads = server_state["heads"]
    columns = server_state["classes"].astype(jnp.float32).sum() / heads.shape[0]
    floats = columns * heads.shape[1]
    return Traffic(base.floats + floats, base.bytes + floats * heads.dtype.itemsize)

  def upload_traffic(self, upload) -> Traffic:
    """The base and the head columns of the client's classes (``d·|C_k|``); the
    initialisation period's class-presence vector counts no floats."""
    if "kernel" not in upload:
      return tree_traffic(upload)
    base = tree_traffic(upload["base"])
    kernel = upload["kernel"]
    floats = upload["present"].astype(jnp.float32).sum() * kernel.shape[0]
    return Traffic(base.floats + floats, base.bytes + floats * kernel.dtype.itemsize)

  def divergence_advice(self) -> str:
    return "lower the learning rate (-lr) or the server's correction step (-lam)"

  def check_settings(self, context: SettingsContext) -> list[str]:
    """Refuses a head that is not one dense layer, or a model without a base (nothing would
    be shared)."""
    variables = abstract_variables(self.model, context.sample_x)
    dense_head_shape(variables, f"model {context.model_name!r}", _PURPOSE)
    if not jax.tree.leaves(split_parts(variables)["base"]):
      raise ConfigError(
          f"FedGC shares the model's base, but model {context.model_name!r} has no base "
          "parameters, so nothing would be shared (its clients would train only private "
          "heads); use a model with a base (cnn, dnn, resnet18, ...)")
    return []


def _rows(ids: jax.Array, weights: jax.Array, num_clients: int) -> jax.Array:
  """The client rows of the uploads that arrived; ``num_clients`` (dropped by a
  ``mode='drop'`` scatter) for the others."""
  return jnp.where(weights > 0, ids, num_clients)
