"""FedKD: communication-efficient federated learning via knowledge distillation.

Wu, Wu, Lyu, Huang, Xie, Nature Communications 13, 2032 (2022). HtFLlib's ``-algo FedKD``
(its scripts: ``-mlr 0.01 -Ts 0.95 -Te 0.98``).

Every client keeps its **mentor** (the private model, its own architecture), a copy of one
shared **mentee** (`fedjax_lib.algorithms.shared_model`: architecture 0 for the runner) and
its own ``W_h = Linear(d_g, d, bias=False)`` from the mentee's features to
the mentor's (HtFLlib: ``Linear(fd, fd)``). Per batch, with logits ``out``/``out_g``, their
softmax ``p``/``p_g`` and features ``f`` [B, d], ``f_g`` [B, d_g]:

    S = CE(out, y) + CE(out_g, y)
    L_d = KL(p_g ‖ p)/S    L_d_g = KL(p ‖ p_g)/S    L_h = MSE(f, W_h f_g)/S
    loss = CE(out, y) + L_d + L_h            loss_g = CE(out_g, y) + L_d_g + L_h

(KL as PyTorch's ``nn.KLDivLoss()``, divided by B·C; MSE by B·d). Nothing is detached, as in
HtFLlib and the paper's code: every module steps on ∇(loss + loss_g), targets and S included,
its gradient clipped to norm 10; SGD at ``-lr`` (mentor, ``W_h``) and ``-mlr`` (mentee).

Compression (:func:`compress`): a tensor of ≥ 2 dims is a matrix ``A = U diag(σ) Vᵀ``
[m, n]; the sender sends ``U_k, σ_k, V_k`` (``k·(m + n + 1)`` floats) for the smallest rank

    k = min{k ≥ 1 : Σ_{i≤k} σ_i² ≥ T · Σ_i σ_i²}                  (:func:`choose_rank`)

and the receiver rebuilds ``U_k diag(σ_k) V_kᵀ``; 1-D tensors are sent raw. Flax kernels keep
the output axis last (dense ``(in, out)``, conv ``(kh, kw, in, out)``), so the matrix is
``reshape(-1, out)``: PyTorch's ``weight.reshape(out, -1)`` (PFLlib PR #265) transposed, its
columns permuted, which changes neither σ nor the truncation. Round r = 0 … R (R =
``global_rounds``) keeps ``T_r = T_start + min(r, R)/R · (T_end − T_start)`` (:func:`energy_at`;
HtFLlib sets ``T_start + (i+1)/R · (…)`` after round i).

A round: the client starts from the server's mentee ``W``, trains, and uploads the compressed
update ``W' − W`` (the paper's "dynamic gradient approximation"); the server takes the uniform
mean (1/#clients that trained, as HtFLlib) of the rebuilt updates, compresses it with ``T_r``
and adds it to ``W``, which every client loads next round. Shapes are static in JAX, so
uploads carry the rebuilt tensors and the ranks, and the traffic, up and down, is counted
from the ranks (:func:`compressed_traffic`); round 0's download is the raw initial mentee.
Clients are evaluated with their mentor; BatchNorm statistics of both models stay on each
client.

Differences from HtFLlib (``clientkd.py``/``serverkd.py``):

- **The update is compressed, not the parameters** (as in the paper and its code). HtFLlib
  compresses the mentee's parameters, truncating the model itself to ``T`` of its energy
  every round; ``pfllib_compat=True`` (``--pfllib-compat``) does that.
- **A conv kernel is one (out, kh·kw·in) matrix** (PFLlib PR #265). HtFLlib SVDs every
  (out, in) slice's kh×kw kernel with one pooled rank, so 5×5 kernels at k ≥ 3 cost more than
  raw; ``pfllib_compat=True`` does that too.
- 1 ≤ k ≤ min(m, n). HtFLlib's loop takes the first k < min(m, n) with ``Σ_{i<k} σ_i² >
  T Σ σ²``, else k = 0, which zeroes the tensor (e.g. σ = (1, 1), T = 0.95); a zero matrix
  gets k = 1 (HtFLlib: raw). A matrix with a side of 1 is raw (HtFLlib: only out = 1).
  ``pfllib_compat`` reproduces all of it (:func:`choose_rank`, rank :data:`ZEROED`: the
  tensor arrives as zeros and costs nothing on the wire): every tensor whose energy HtFLlib's
  loop cannot reach is zeroed, e.g. 1×1 and 1×9 conv kernels (GoogLeNet's, resnet10's
  downsampling, HARCNN's: the mentees of HtFE-img-5, -img-3 and HtFE-sen-*) and often
  FedAvgCNN's 10×512 head at T = 0.95 (its 9 largest singular values rarely hold 95 %).
  Not reproduced: HtFLlib's SVD of 3-D tensors (Conv1d kernels) pools over the wrong axis and
  then fails to rebuild them; compat treats them as the default rule does.
- An SVD that fails on finite input sends the tensor raw; non-finite parameters stay
  non-finite, so the engine's guard stops the run (HtFLlib: ``LinAlgError: SVD did not
  converge``, PFLlib #229).
- S is floored at 1e-6 and the KL is computed from log-probabilities
  (`fedjax_lib.core.local.kl_div_mean`): both
  CE exactly 0 in float32 would give MSE/0, and a probability that underflows to 0 a NaN
  gradient through the target; HtFLlib has neither guard (a plausible, unverified cause of
  PFLlib #229).
- After R rounds the energy stays at ``T_end``; a round nobody trained in keeps the mentee.
- ``train_loss`` is the mentor's cross-entropy (HtFLlib: ``CE + L_d + L_h``). New-client
  evaluation (``-nnc``, not in HtFLlib) fine-tunes a freshly initialised mentor.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lib.algorithms.base import (Traffic, check_bool, check_int, check_number,
                                        stack_clients)
from fedjax_lib.algorithms.registry import register
from fedjax_lib.algorithms.shared_model import SharedModelAlgorithm
from fedjax_lib.core.aggregate import uniform_average
from fedjax_lib.core.local import (clip_each, kl_div_mean, masked_cross_entropy, masked_mse,
                                   train_locally)
from fedjax_lib.models.base import apply_train, feature_dim, model_state
from fedjax_lib.models.layers import TorchDense

CLIP_NORM = 10.0  # HtFLlib's clip_grad_norm_ on each module
LOSS_FLOOR = 1e-6  # floor of S = CE + CE_g (0/0 when both models fit a batch exactly)


# ---------------------------------------------------------------------------- the losses
def distillation_losses(out, out_shared, features, projected, labels, mask):
  """``(loss, loss_g)`` of one batch (module docstring); ``projected = W_h f_g``."""
  out, out_shared = out.astype(jnp.float32), out_shared.astype(jnp.float32)
  ce = masked_cross_entropy(out, labels, mask)
  ce_shared = masked_cross_entropy(out_shared, labels, mask)
  scale = jnp.maximum(ce + ce_shared, LOSS_FLOOR)
  log_p, log_p_shared = jax.nn.log_softmax(out), jax.nn.log_softmax(out_shared)
  hidden = masked_mse(features, projected, mask) / scale
  loss = ce + kl_div_mean(log_p, log_p_shared, mask) / scale + hidden
  loss_shared = ce_shared + kl_div_mean(log_p_shared, log_p, mask) / scale + hidden
  return loss, loss_shared


# ---------------------------------------------------------------------------- compression
def energy_at(round_index, energy_start, energy_end, global_rounds):
  """``T_start + min(r, R)/R · (T_end − T_start)``: the energy kept in round ``r``."""
  progress = jnp.minimum(round_index, global_rounds) / global_rounds
  return energy_start + progress * (energy_end - energy_start)


#: The rank of a tensor HtFLlib's loop truncates to nothing (``pfllib_compat``): zeros, and
#: no floats on the wire. Rank 0 is a tensor sent raw.
ZEROED = -1


def choose_rank(singular_values: jax.Array, energy, htfllib: bool = False) -> jax.Array:
  """The smallest ``k ≥ 1`` whose first k singular values hold ``energy`` of Σσ².

  ``singular_values [..., r]`` are descending; leading axes (HtFLlib's per-slice SVD) are
  pooled into one rank. Returns an int32 in ``[1, r]``. Tested as ``Σ_{i>k} σ_i² ≤ (1 − T)·Σσ²``
  (the same condition): summed from the small end, float32 keeps the tail that a prefix sum
  would round away near T = 1.

  ``htfllib=True``: HtFLlib's loop, the first ``k`` in ``1 … r − 1`` with ``Σ_{i<k} σ_i² >
  T·Σσ²``, else :data:`ZEROED` (its ``threshold = 0``: the tensor is sent as empty factors
  and rebuilt as zeros). The caller handles Σσ² = 0 (HtFLlib: raw).
  """
  r = singular_values.shape[-1]
  squares = jnp.square(singular_values.astype(jnp.float32)).reshape(-1, r).sum(0)
  tails = jnp.cumsum(squares[::-1])[::-1]  # tails[j] = Σ_{i>=j} σ_i²
  if htfllib:  # Σ_{i<k} > T·Σ  <=>  tails[k] < (1 − T)·tails[0]
    k = jnp.sum(tails[1:] >= (1.0 - energy) * tails[0]) + 1
    return jnp.where(k <= r - 1, k, ZEROED).astype(jnp.int32)
  above = jnp.sum(tails[1:] > (1.0 - energy) * tails[0])
  return jnp.clip(above + 1, 1, r).astype(jnp.int32)


def _matrices(shape: tuple, htfllib: bool):
  """How a tensor of ``shape`` is decomposed: ``(to, back, matrix shape, slices)`` or None
  for a tensor sent raw. Default: one ``(-1, out)`` matrix when both sides are ≥ 2.
  ``htfllib``: HtFLlib's rule, every tensor of ≥ 2 dims whose PyTorch first axis (``out``,
  Flax's last) is > 1, a conv kernel ``(kh, kw, in, out)`` as one kh×kw matrix per (out, in)
  slice."""
  if len(shape) < 2:
    return None
  if htfllib and len(shape) == 4:
    kh, kw, cin, cout = shape
    to = lambda a: jnp.transpose(a, (3, 2, 0, 1))  # PyTorch's (out, in, kh, kw)
    back = lambda a: jnp.transpose(a, (2, 3, 1, 0))
    m, n, slices = kh, kw, cin * cout
  else:
    m, n, slices = int(np.prod(shape[:-1])), shape[-1], 1
    to, back = (lambda a: a.reshape(m, n)), (lambda a: a.reshape(shape))
  if htfllib:
    return None if shape[-1] < 2 else (to, back, (m, n), slices)
  return None if min(m, n) < 2 else (to, back, (m, n), slices)


@jax.custom_batching.custom_vmap
def _svd_one_matrix_per_call(a: jax.Array):
  """``(u, s, vt)`` of every matrix of ``a [..., m, n]`` (``full_matrices=False``), one
  LAPACK call per matrix (a loop over the leading axes)."""
  lead, (m, n) = a.shape[:-2], a.shape[-2:]
  one = lambda x: tuple(jnp.linalg.svd(x, full_matrices=False))
  if not lead:
    return one(a)
  out = jax.lax.map(one, a.reshape((-1, m, n)))
  return tuple(o.reshape(lead + o.shape[1:]) for o in out)


@_svd_one_matrix_per_call.def_vmap
def _svd_vmap(axis_size, in_batched, a):
  """Under ``vmap`` (a batch of clients) the batch axis joins the loop: still one matrix
  per LAPACK call."""
  del axis_size
  return _svd_one_matrix_per_call(a), (in_batched[0],) * 3


def svd(a: jax.Array):
  """``jnp.linalg.svd(a, full_matrices=False)`` of ``a [..., m, n]``; on XLA:CPU one matrix
  per LAPACK call, under ``vmap`` too (the same numbers to the bit).

  jaxlib 0.10's CPU SVD of a batch of matrices splits the batch over XLA's intra-op thread
  pool and waits for the pieces on the pool thread it runs on; XLA runs independent
  operations, the architecture groups' trainings and the devices' programs at once on that
  pool, so as many batched SVDs at once as the pool has threads wait for each other forever
  (2026-12-07: ``-algo FedKD -m cnn -nc 3 --executor vmap`` on the bundled digits, whose
  vmapped round holds one SVD per tensor, each a batch of one matrix per client; HtFLlib's
  per-slice SVDs with ``--pfllib-compat``). A single matrix is decomposed where the call
  runs. Measured on this 2-core CPU (benchmarks/RESULTS.md): a loop of 2,048 5×5 SVDs 8.1
  ms against 6.3 batched, 36,864 3×3 80 against 52 ms, 3 × 1600×512 226 against 322 ms.
  """
  if jax.default_backend() == "cpu":
    return _svd_one_matrix_per_call(a)
  return tuple(jnp.linalg.svd(a, full_matrices=False))


def compress_leaf(leaf: jax.Array, energy, htfllib: bool = False):
  """``(rebuilt, rank)``: ``leaf`` truncated to :func:`choose_rank`'s rank and rebuilt, or
  ``(leaf, 0)`` when it is sent raw (1-D, a side of 1, or an SVD that failed).
  ``htfllib``: HtFLlib's decomposition (:func:`_matrices`, :func:`choose_rank`): zeros and
  rank :data:`ZEROED` where its loop finds no rank, raw for an all-zero tensor."""
  plan = _matrices(leaf.shape, htfllib)
  if plan is None:
    return leaf, jnp.int32(0)
  to, back, _, _ = plan
  u, s, vt = svd(to(leaf.astype(jnp.float32)))
  rank = choose_rank(s, energy, htfllib)
  kept = jnp.where(jnp.arange(s.shape[-1]) < rank, s, 0.0)
  rebuilt = back((u * kept[..., None, :]) @ vt).astype(leaf.dtype)
  ok = jnp.isfinite(rebuilt).all()  # else: raw (a failed SVD; NaN input stays NaN)
  if htfllib:
    ok &= jnp.any(s > 0)  # HtFLlib sends an all-zero tensor raw
  return jnp.where(ok, rebuilt, leaf), jnp.where(ok, rank, 0)


def compress(tree, energy, htfllib: bool = False):
  """``(rebuilt tree, ranks tree)``: :func:`compress_leaf` on every leaf."""
  pairs = jax.tree.map(lambda a: compress_leaf(a, energy, htfllib), tree)
  return (jax.tree.map(lambda _, p: p[0], tree, pairs),
          jax.tree.map(lambda _, p: p[1], tree, pairs))


def compressed_traffic(rebuilt, ranks, htfllib: bool = False) -> Traffic:
  """Floats (and bytes) on the wire: ``k·slices·(m + n + 1)`` per decomposed tensor, the
  whole tensor for rank 0 (sent raw), nothing for :data:`ZEROED`."""
  floats = nbytes = jnp.float32(0)
  for leaf, rank in zip(jax.tree.leaves(rebuilt), jax.tree.leaves(ranks)):
    plan = _matrices(leaf.shape, htfllib)
    raw = float(np.prod(leaf.shape))
    count = raw if plan is None else jnp.where(
        rank > 0, rank.astype(jnp.float32) * plan[3] * (sum(plan[2]) + 1),
        jnp.where(rank == 0, raw, 0.0))
    floats, nbytes = floats + count, nbytes + count * leaf.dtype.itemsize
  return Traffic(floats, nbytes)


@register("FedKD")
@dataclasses.dataclass(frozen=True)
class FedKD(SharedModelAlgorithm):
  """Mentors distilled to and from a shared mentee whose updates travel SVD-compressed.

  Attributes:
    mentee_learning_rate: the mentee's SGD step size (``-mlr``; 0.01).
    energy_start, energy_end: T_start, T_end, the singular-value energy kept in round 0
      and in round ``global_rounds`` (``-Ts`` 0.95, ``-Te`` 0.98).
    global_rounds: R of the energy schedule (HtFLlib's ``-gr``; the runner fills it).
    pfllib_compat: compress parameters, conv kernels per (out, in) slice, with HtFLlib's rank
      rule (zeroing what it cannot reach), as HtFLlib does.
    shared_model: the mentee (None: ``model``).
  """

  REFERENCE_SPLIT = True  # HtFLlib's main.py wraps the model in BaseHeadSplit

  mentee_learning_rate: float = 0.01
  energy_start: float = 0.95
  energy_end: float = 0.98
  global_rounds: int = 2000
  pfllib_compat: bool = False

  TRAIN_MODE = True
  SHARED_ROLE: ClassVar[str] = "shared model (mentee)"

  def __post_init__(self):
    check_number(self.name, "mentee_learning_rate", self.mentee_learning_rate, 0.0)
    for name in ("energy_start", "energy_end"):
      check_number(self.name, name, getattr(self, name), 0.0, 1.0)
    check_int(self.name, "global_rounds", self.global_rounds, 1)
    check_bool(self.name, "pfllib_compat", self.pfllib_compat)
    super().__post_init__()

  def energy(self, server_state):
    return energy_at(server_state["round"], self.energy_start, self.energy_end,
                     self.global_rounds)

  # ------------------------------------------------------------------ state
  def init(self, key, sample_x, num_clients):
    k_models, k_proj = jax.random.split(key)
    client, shared = self.init_private_and_shared(k_models, sample_x)
    d_shared = feature_dim(self.shared_model, sample_x.shape)
    client["projector"] = TorchDense(feature_dim(self.model, sample_x.shape), use_bias=False
                                     ).init(k_proj, jnp.zeros((1, d_shared)))["params"]
    server = {"shared": shared, "round": jnp.int32(0),
              # round 0's mentee reaches the clients uncompressed (rank 0: raw)
              "ranks": jax.tree.map(lambda _: jnp.int32(0), shared)}
    return server, stack_clients(client, num_clients)

  # ------------------------------------------------------------------ client
  def client_update(self, server_state, client_state, data, key):
    private = client_state["private"]
    shared = self.shared_variables(server_state, client_state)

    def loss_fn(params, batch, step_key, states):
      private_state, shared_state = states
      (features, out), private_state = apply_train(
          self.model, {"params": params["private"], **private_state}, batch.x, step_key)
      (features_shared, out_shared), shared_state = apply_train(
          self.shared_model, {"params": params["shared"], **shared_state}, batch.x,
          jax.random.fold_in(step_key, 1))
      projected = TorchDense(features.shape[-1], use_bias=False).apply(
          {"params": params["projector"]}, features_shared)
      loss, loss_shared = distillation_losses(out, out_shared, features, projected, batch.y,
                                              batch.mask)
      return loss + loss_shared, (private_state, shared_state)

    lr = self.local.learning_rate
    params = {"private": private["params"], "projector": client_state["projector"],
              "shared": shared["params"]}
    params, _, stats = train_locally(
        params, data, key, self.local, loss_fn,
        tx=clip_each({"private": optax.sgd(lr), "projector": optax.sgd(lr),
                      "shared": optax.sgd(self.mentee_learning_rate)}, CLIP_NORM),
        aux=(model_state(private), model_state(shared)))
    private_state, shared_state = stats.pop("aux")
    new_state = self.trained_client_state({**client_state, "projector": params["projector"]},
                                          params["private"], private_state, shared_state)
    sent = params["shared"] if self.pfllib_compat else jax.tree.map(
        jnp.subtract, params["shared"], server_state["shared"])
    values, ranks = compress(sent, self.energy(server_state), htfllib=self.pfllib_compat)
    return new_state, {"values": values, "ranks": ranks}, stats

  # ------------------------------------------------------------------ server
  def server_update(self, server_state, uploads, weights, key):
    """The uniform mean of the rebuilt uploads, compressed at this round's energy: the new
    mentee (compat) or its update; a round nobody trained in keeps the mentee."""
    del key
    old = server_state["shared"]
    fallback = old if self.pfllib_compat else jax.tree.map(jnp.zeros_like, old)
    mean = uniform_average(uploads["values"], weights, fallback)
    sent, ranks = compress(mean, self.energy(server_state), htfllib=self.pfllib_compat)
    shared = sent if self.pfllib_compat else jax.tree.map(jnp.add, old, sent)
    trained = jnp.any(jnp.asarray(weights) > 0)
    keep = lambda new, before: jax.tree.map(lambda a, b: jnp.where(trained, a, b), new, before)
    return {"shared": keep(shared, old), "ranks": keep(ranks, server_state["ranks"]),
            "round": server_state["round"] + 1}

  # ------------------------------------------------------------------ communication
  def upload_traffic(self, upload) -> Traffic:
    """The compressed update (compat: parameters) of the mentee."""
    return compressed_traffic(upload["values"], upload["ranks"], self.pfllib_compat)

  def download_traffic(self, server_state) -> Traffic:
    """What the server last broadcast, compressed (round 0: the raw initial mentee)."""
    return compressed_traffic(server_state["shared"], server_state["ranks"],
                              self.pfllib_compat)

  def divergence_advice(self) -> str:
    """PFLlib #229 ('SVD did not converge') is this divergence in PyTorch."""
    return ("diverged parameters cannot be SVD-compressed (HtFLlib: 'SVD did not converge'); "
            "lower -lr or -mlr")
