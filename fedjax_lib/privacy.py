"""Differential privacy: which algorithms DP-SGD makes private, and the privacy accountant.

With ``Config.privacy`` (``-dp``) every `fedjax_lib.core.local.train_locally` call runs DP-SGD
(Abadi et al., "Deep Learning with Differential Privacy", CCS 2016): per-example gradients
clipped to L2 norm C (``dp_clip``), summed, plus Gaussian noise of standard deviation σ·C
(``dp_sigma`` = σ), divided by the batch size B. The guarantee is example-level DP of each
client's own training set, against anyone who sees what the client uploads (the server, the
other clients) and anything computed from it.

**Which algorithms.** DP-SGD protects what the noisy steps produce and anything computed from
it afterwards (post-processing), nothing else. An algorithm is private when every upload, and
every piece of client state that shapes a later upload, comes from the client's data only
through `train_locally` steps. :data:`REVIEWED` lists the algorithms read for this, each with
what DP-SGD changes in it or why it is refused; an algorithm not listed (a new one) is
refused until someone reads it and adds it. BatchNorm in training mode normalises each
example with its batch's statistics, so one example's gradient depends on the others and
per-example clipping bounds nothing: models with BatchNorm are refused (dropout is fine: each
example draws its own mask).

**Accounting** (:class:`Accountant`, on the host). Client k's local training is a sequence of
steps, each a Gaussian mechanism on a batch of B of its n_k samples, accounted as the
Poisson-subsampled Gaussian mechanism with sampling rate q = B / n_k and noise multiplier σ —
the assumption Opacus and TF-Privacy make for shuffled fixed-size batches (the shuffled
batches themselves are not Poisson samples; this is the standard approximation, not a
proof). Its steps compose over every round it was selected in (a client not selected adds
nothing; a selected client that is later dropped still trained and is counted), with Google's
``dp-accounting`` RDP accountant (integer orders 2…256; RDP composes additively, and
``compute_epsilon`` converts to (ε, δ)). How many private steps a client takes per round is
read from the algorithm itself: its client update is traced abstractly with
`fedjax_lib.core.local.record_dp_training`, which lists every DP-SGD call (epochs, batch size,
steps per epoch); the client takes ``epochs · min(n_k // B, steps per epoch)`` steps per call.
The reported ε of a round is the maximum over clients (the worst-off client) of the ε spent
before that round's evaluation; σ = 0 gives ε = ∞ (JSON: ``null``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import numpy as np

from fedjax_lib.algorithms.base import abstract_variables, has_warmup
from fedjax_lib.config import Config
from fedjax_lib.core import rng
from fedjax_lib.core.local import ClientData, record_dp_training
from fedjax_lib.errors import ConfigError
from fedjax_lib.models.base import model_state

#: RDP orders of the accountant: integers, whose RDP of the subsampled Gaussian is exact
#: (fractional orders fail to converge for the large sampling rates of small clients); up to
#: 256, which serves every ε above log(1/δ)/255 (0.045 at δ = 1e-5) and keeps each sampling
#: rate's RDP at ~7 ms to compute.
ORDERS = tuple(range(2, 65)) + (80, 96, 128, 192, 256)

#: Algorithms read for DP-SGD: ``name: (private, note)``. ``private`` algorithms upload only
#: DP-SGD outputs (``note``: what DP-SGD changes in them); the others are refused (``note``:
#: why, completing "privacy (-dp) is not available for NAME: ...").
REVIEWED: dict[str, tuple[bool, str]] = {
    "FedAvg": (True, "the uploaded model is DP-SGD's output"),
    "FedProx": (True, "the proximal term μ/2·‖w − w_g‖² is part of each example's loss, so "
                "its gradient is clipped with the example's"),
    "Ditto": (True, "both the personal model and the global track train with DP-SGD; both "
              "count"),
    "FedPer": (True, "base and head train jointly with DP-SGD"),
    "LG-FedAvg": (True, "base and head train jointly with DP-SGD"),
    "FedRep": (True, "the head phase and the base phase both train with DP-SGD; both count"),
    "FedBABU": (True, "the base trains with DP-SGD under the fixed head; the fine-tuning after "
                "the last round also runs DP-SGD but is evaluation only and not accounted"),
    "Local": (True, "nothing is uploaded; the local models train with DP-SGD"),
    "FedCP": (True, "the MMD term is computed per example (between its two representations), "
              "not over the batch"),
    "FML": (True, "private and shared models train together with DP-SGD; the per-model "
            "gradient clip at 10 applies after the noise (post-processing)"),
    "FedKD": (True, "mentor, mentee and projector train together with DP-SGD; the per-part "
              "gradient clip and the SVD compression apply after the noise (post-processing)"),
    "FedMRL": (True, "private model, shared model and projector train together with DP-SGD"),
    "SCAFFOLD": (True, "the control correction c − c_i is added to the noised gradient and "
                 "the new c_i is computed from the DP-SGD output (post-processing)"),
    "FedDyn": (True, "its regulariser (α/2)‖w − w_g‖² − ⟨w, h_i⟩ is part of each example's "
               "loss; h_i is computed from the DP-SGD output"),
    "MOON": (True, "the contrastive term compares each example's own features (global and "
             "previous bases are DP outputs or public), so it is clipped with the example's"),
    "FedNTD": (True, "the not-true distillation term is each example's KL to the received "
               "global model"),
    "APFL": (True, "w, v and α all move by the noised gradient of one per-example loss"),
    "PFL-DA": (True, "both phases train with DP-SGD; the head regulariser depends on "
               "parameters only, so it is part of each example's clipped loss"),
    "FedMTL": (True, "its regulariser depends on parameters only (its own and the other "
               "clients' DP outputs), so it is part of each example's clipped loss"),
    "FedBN": (True, "without BatchNorm it is FedAvg; models with BatchNorm are refused "
              "under -dp anyway"),
    "FedAMP": (True, "its pull toward the attentive message depends on parameters only, and "
               "the messages are mixtures of DP outputs (post-processing)"),
    "FedPHP": (True, "the MMD to the private model's features is computed per example under "
               "DP-SGD; the private model is a mixture of DP outputs (post-processing)"),
    "FedCAC": (True, "its critical-parameter mask is computed from the DP-SGD output and the "
               "customised models are mixtures of DP outputs (post-processing)"),
    "FedCross": (True, "each middleware model trains with DP-SGD; cross-aggregation and the "
                 "similarities are computed from DP outputs (post-processing)"),
    "APPLE": (True, "the core model and the relationship vector p train together with DP-SGD; "
              "p's starting point comes from the sample counts, which are public"),
    "FedLC": (False, "its calibrated loss puts the client's raw class counts into every "
              "gradient"),
    "FedFomo": (False, "its aggregation weights are raw validation-loss differences on the "
                "client's data, uploaded to the server's affinity matrix"),
    "FedAS": (False, "its uploaded Fisher trace and its alignment of the received base to "
              "the client's class prototypes take plain gradients on raw data"),
    "FedPAC": (False, "it uploads class prototypes and feature statistics of raw client "
               "data"),
    "FedGC": (False, "the server learns each client's set of classes from raw labels and "
              "corrects the heads with it"),
    "FedPCL": (False, "it uploads class prototypes of raw client data"),
    "pFedMe": (False, "its K inner steps take plain gradients on the batch and carry the "
               "result into later gradients"),
    "PerAvg": (False, "its meta-gradient of an example depends on the other half-batch's "
               "adaptation step (and its loss needs batches of 2·B), so per-example clipping "
               "does not bound one example's influence"),
    "FedALA": (False, "its ALA weights are learnt with plain gradients on raw client data and "
               "shape the uploaded model"),
    "FedDBE": (False, "its initialisation period uploads each client's raw mean "
               "representation, and the mean regularisation carries the batches' running "
               "mean into later gradients"),
    "GPFL": (False, "its conditional inputs come from each client's raw label frequencies and "
             "enter every gradient"),
    "FedROD": (False, "its balanced-softmax loss puts the client's raw class counts into every "
               "gradient"),
    "FedProto": (False, "it uploads class prototypes (feature means) of raw client data"),
    "FedTGP": (False, "it uploads class prototypes (feature means) of raw client data"),
    "FedGH": (False, "it uploads class prototypes (feature means) of raw client data"),
    "FedKTL": (False, "it uploads class prototypes of raw client data"),
    "FD": (False, "it uploads per-class mean logits of raw client data"),
    "FedGen": (False, "each client uploads its raw class counts"),
    "FedGen-PFLlib": (False, "each client uploads its raw class counts"),
    "FedL2G-feat": (False, "its meta step takes plain gradients on the quiz samples and uploads "
                    "a gradient of them"),
    "FedL2G-logit": (False, "its meta step takes plain gradients on the quiz samples and "
                     "uploads a gradient of them"),
}


def private_algorithms() -> list[str]:
  """The algorithms DP-SGD makes private (those :data:`REVIEWED` as private)."""
  return [name for name, (private, _) in REVIEWED.items() if private]


def trained_models(algorithm, models: dict) -> dict[str, Any]:
  """``name → Flax model`` of every model the algorithm trains: the architectures in
  ``models`` and any model-valued field of the algorithm (e.g. FML's ``shared_model``)."""
  out = dict(models)
  for field in dataclasses.fields(algorithm):
    value = getattr(algorithm, field.name)
    if field.name != "model" and isinstance(value, nn.Module):
      out.setdefault(field.name, value)
  return out


def check(config: Config, train_counts: np.ndarray, algorithm, models: dict,
          sample_x) -> list[str]:
  """Refuses DP for algorithms and models it cannot make private; warns about DP settings.

  Args:
    config: the validated config.
    train_counts: the training clients' sample counts.
    algorithm: the algorithm instance.
    models: architecture name → Flax model.
    sample_x: one input sample (shapes only).

  Returns:
    One-line warnings (no ``warning:`` prefix).

  Raises:
    ConfigError: DP for an algorithm or a model it does not make private.
  """
  defaults = Config()
  if not config.privacy:
    given = [f"{name}={getattr(config, name)!r}" for name in ("dp_sigma", "dp_clip", "dp_delta")
             if getattr(config, name) != getattr(defaults, name)]
    if given:
      return [f"{', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect without "
              "privacy; add -dp (--privacy) to train with DP-SGD"]
    return []
  name = algorithm.name
  private, note = REVIEWED.get(name, (False, "its privacy has not been reviewed (see "
                                              "fedjax_lib.privacy.REVIEWED)"))
  if not private:
    raise ConfigError(f"privacy (-dp) is not available for {name}: {note}; DP-SGD makes "
                      f"private only {', '.join(private_algorithms())}")
  for label, model in trained_models(algorithm, models).items():
    if model_state(abstract_variables(model, sample_x)):
      raise ConfigError(
          f"privacy (-dp) cannot train model {label}: its BatchNorm normalises each example "
          "with its batch's statistics, so one example's gradient depends on the others and "
          "per-example clipping bounds nothing; use a model without BatchNorm (cnn, dnn, mlr)")
  out = []
  if config.dp_sigma == 0:
    out.append("privacy with dp_sigma=0 clips the per-example gradients but adds no noise, "
               "so ε = ∞ (no privacy); set the noise multiplier -dps (e.g. 1.0)")
  counts = np.asarray(train_counts, np.int64)
  trained = counts[counts >= config.batch_size]
  loose = int((trained * config.dp_delta >= 1).sum())
  if loose:
    out.append(f"dp_delta={config.dp_delta} is not below 1/n for {loose} of {counts.size} "
               f"clients (the largest has n = {int(counts.max())} samples): δ >= 1/n allows "
               f"releasing one example outright; use dp_delta < {1 / counts.max():.2g}")
  return out


# ------------------------------------------------------------------ how many private steps
@dataclasses.dataclass(frozen=True)
class Plan:
  """Private steps per client, read from the algorithm; the per-step RDP of each.

  Attributes:
    batch_sizes: ``[M]`` the batch sizes of the algorithm's DP-SGD calls (one column each).
    round_steps: ``[N, M]`` steps client k takes per round it is selected in.
    warmup_steps: ``[N, M]`` steps of the initialisation period (every client, once).
    step_rdp: ``[N, M, len(ORDERS)]`` RDP of one step of client k's column m.
    sigma, delta: noise multiplier and δ.
  """
  batch_sizes: tuple
  round_steps: np.ndarray
  warmup_steps: np.ndarray
  step_rdp: np.ndarray
  sigma: float
  delta: float


def _dp_calls(algorithm, hook: str, server_state, client_state, client_data, key) -> list:
  """The DP-SGD calls of ``algorithm.<hook>`` for one client (traced abstractly)."""
  found: list = []

  def traced(server_state, client_state, client_data, key):
    with record_dp_training(client_data) as calls:
      out = getattr(algorithm, hook)(server_state, client_state, client_data, key)
    found.extend(calls)
    return out

  jax.eval_shape(traced, server_state, client_state, client_data, key)
  return found


def _steps(calls: list, count: int, batch_sizes: tuple) -> np.ndarray:
  steps = np.zeros(len(batch_sizes), np.int64)
  for call in calls:
    spec = call.spec
    steps[batch_sizes.index(spec.batch_size)] += (
        spec.local_epochs * min(count // spec.batch_size, spec.steps_per_epoch))
  return steps


@functools.lru_cache(maxsize=4096)
def subsampled_gaussian_rdp(q: float, sigma: float, orders: tuple = ORDERS) -> tuple:
  """RDP at ``orders`` of one Poisson-subsampled Gaussian step (rate q, multiplier σ), from
  dp-accounting's ``RdpAccountant``."""
  import dp_accounting  # pylint: disable=import-outside-toplevel
  accountant = dp_accounting.rdp.RdpAccountant(list(orders))
  accountant.compose(dp_accounting.PoissonSampledDpEvent(
      q, dp_accounting.GaussianDpEvent(sigma)))
  return tuple(float(v) for v in accountant.rdp)


def plan(engine, train_counts: np.ndarray, config: Config) -> Plan:
  """Reads the private steps per client from every group's client update (and warm-up).

  Raises:
    ConfigError: a DP-SGD call trains on something other than the client's training set,
      so its sampling rate is unknown.
  """
  sample_x = engine.data.x[0]
  key = rng.root_key(0)
  per_group = []
  for gi, group in enumerate(engine.groups):
    alg = group.algorithm
    server, clients = jax.eval_shape(functools.partial(alg.init, num_clients=group.size),
                                     key, sample_x)
    one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), clients)
    tables = engine.arrays["tables"][gi]
    client_data = ClientData(engine.data.x, engine.data.y, tables[0][0], tables[1][0])
    hooks = ("client_update",) + (("warmup_client",) if has_warmup(alg) else ())
    calls = {hook: _dp_calls(alg, hook, server, one, client_data, key) for hook in hooks}
    for hook, found in calls.items():
      if not all(call.full_data for call in found):
        raise ConfigError(f"privacy (-dp) cannot account for {alg.name}: its {hook} trains "
                          "with DP-SGD on a part of the client's data, whose sampling rate "
                          "is unknown")
    per_group.append((group.ids, calls.get("client_update", []), calls.get("warmup_client", [])))
  batch_sizes = tuple(sorted({c.spec.batch_size for _, r, w in per_group for c in r + w}))
  n = engine.num_clients
  counts = np.asarray(train_counts, np.int64)[:n]
  round_steps = np.zeros((n, len(batch_sizes)), np.int64)
  warmup_steps = np.zeros_like(round_steps)
  for ids, round_calls, warmup_calls in per_group:
    for k in ids:
      round_steps[k] = _steps(round_calls, int(counts[k]), batch_sizes)
      warmup_steps[k] = _steps(warmup_calls, int(counts[k]), batch_sizes)
  step_rdp = np.zeros((n, len(batch_sizes), len(ORDERS)))
  sigma = float(config.dp_sigma)
  for k in range(n):
    for m, b in enumerate(batch_sizes):
      if (round_steps[k, m] or warmup_steps[k, m]) and sigma > 0:
        step_rdp[k, m] = subsampled_gaussian_rdp(float(min(1.0, b / counts[k])), sigma)
  return Plan(batch_sizes, round_steps, warmup_steps, step_rdp, sigma, float(config.dp_delta))


# ------------------------------------------------------------------ the accountant
def epsilon_from_rdp(rdp: np.ndarray, delta: float, orders=ORDERS) -> float:
  """ε at ``delta`` of a mechanism with RDP ``rdp`` at ``orders`` (dp-accounting's
  conversion, the tightest of the RDP → (ε, δ) bounds it implements)."""
  from dp_accounting.rdp import compute_epsilon  # pylint: disable=import-outside-toplevel
  rdp = np.asarray(rdp, np.float64)
  if not np.isfinite(rdp).any():
    return float("inf")
  return float(compute_epsilon(list(orders), rdp.tolist(), delta)[0])


class Accountant:
  """One run's privacy spent, per client, from the selection record (host-side).

  ``steps[k, m]`` counts client k's private steps of batch size ``plan.batch_sizes[m]``;
  :meth:`record_round` adds a round's steps for the clients selected in it. RDP composes
  additively, so client k's RDP is ``Σ_m steps[k, m] · step_rdp[k, m]``.
  """

  def __init__(self, plan_: Plan):
    self.plan = plan_
    self.steps = np.zeros_like(plan_.round_steps)

  def start(self) -> None:
    """A fresh run: the initialisation period's steps (every client once)."""
    self.steps = self.plan.warmup_steps.copy()

  def record_round(self, selected) -> None:
    """Adds one round's private steps of the clients in ``selected`` (ids; -1 is ignored)."""
    ids = np.asarray(selected, np.int64)
    ids = ids[(ids >= 0) & (ids < self.steps.shape[0])]
    self.steps[ids] += self.plan.round_steps[ids]

  def client_epsilons(self) -> np.ndarray:
    """``[N]``: each client's ε at δ (0 before its first private step; ∞ with σ = 0)."""
    out = np.zeros(self.steps.shape[0])
    for k, steps in enumerate(self.steps):
      if not steps.any():
        continue
      if self.plan.sigma == 0:
        out[k] = np.inf
        continue
      rdp = (steps[:, None] * self.plan.step_rdp[k]).sum(0)
      out[k] = epsilon_from_rdp(rdp, self.plan.delta)
    return out

  def epsilon(self) -> float:
    """The worst-off client's ε (the reported one)."""
    return float(self.client_epsilons().max(initial=0.0))

  def summary(self) -> dict:
    """What the results JSON records: δ, σ, the per-client ε and steps, and their maximum."""
    eps = self.client_epsilons()
    return {"epsilon": float(eps.max(initial=0.0)), "delta": self.plan.delta,
            "sigma": self.plan.sigma, "client_epsilon": eps.tolist(),
            "client_steps": self.steps.sum(1).tolist(),
            "accountant": "RDP (dp-accounting), Poisson-subsampled Gaussian, q = B/n_k"}

  def state(self) -> list:
    """The steps, for a checkpoint's metadata."""
    return self.steps.tolist()

  def load(self, state: Optional[list]) -> None:
    """Restores :meth:`state` (a checkpoint's); a missing or misshapen record is an error."""
    steps = np.asarray(state if state is not None else [], np.int64)
    if steps.shape != self.steps.shape:
      raise ConfigError(f"the checkpoint's privacy record has shape {steps.shape}, expected "
                        f"{self.steps.shape}; rerun with --overwrite to start afresh")
    self.steps = steps


def describe(summary: dict, dp_clip: float) -> str:
  """One line for the final summary."""
  eps = np.asarray(summary["client_epsilon"], np.float64)
  trained = eps[np.asarray(summary["client_steps"]) > 0]
  median = f"{np.median(trained):.3g}" if trained.size else "0"
  return (f"differential privacy: ε = {summary['epsilon']:.3g} at δ = {summary['delta']:.3g} "
          f"for the worst-off client (median client {median}) after all rounds; σ = "
          f"{summary['sigma']:g}, clip C = {dp_clip:g}")
