"""The algorithm contract.

An algorithm is a frozen dataclass: its fields are the model, the static local-training spec
and its own hyperparameters; its methods are pure functions over explicit state pytrees.

- ``init(key, sample_x, num_clients) -> (server_state, client_states)``; ``client_states`` is
  stacked over all N clients on the leading axis (an empty dict when clients keep no state).
- ``client_update(server_state, client_state, data, key) -> (client_state, upload, metrics)``
  for ONE client; the engine vmaps (or maps) it over the selected clients.
- ``server_update(server_state, uploads, weights, key) -> server_state``; ``uploads`` are
  stacked over the cohort's slots and ``weights`` are their training-sample counts, zero for
  slots that dropped out, were not selected or are padding; a slot of weight 0 must not
  change the result (its upload is whatever that slot computed). The server always sees every
  upload as one logical array, on one device or many (on a mesh XLA partitions the
  computation), so any rule works, linear or not. Slots come architecture group by group,
  each group's in cohort order. Mark a server that only takes the weighted average of the
  uploads with :func:`linear_server` (the sequential executor then keeps a running sum).
- ``predict(server_state, client_state, x) -> logits``: the model a client is evaluated with;
  needed only by the default :meth:`eval_views`.

Optional hooks. A hook exists exactly when the algorithm's class defines it (see
:func:`has_hook`); there are no flags to keep in step with them:

- ``eval_views(server_state, client_state, data, key) -> {name: x -> logits}``: the models a
  client is evaluated with, for ONE client, given its training data (for evaluation after an
  adaptation step, Per-FedAvg) and an evaluation key. The first view gives ``test_acc``,
  ``test_auc`` and ``train_loss``; with more than one view every view ``name`` also gets
  ``test_acc_<name>`` / ``test_auc_<name>`` (e.g. ``personal`` and ``global``). Default: one
  view, :meth:`predict`.
- ``final_views(...)``: like ``eval_views``, for one extra evaluation after the last round
  (FedBABU's fine-tuning).
- ``new_client_variables(server_state, client_state) -> variables``: the full-model variables
  a client that never took part starts from in new-client evaluation (PFLlib's ``-nnc``); it is
  then fine-tuned with :meth:`ce_loss` for ``-ften`` epochs and tested (with
  :meth:`Algorithm.new_client_tested_variables` of the fine-tuned variables: themselves,
  unless a compat mode reproduces a reference that tests something else). ``client_state``
  is a freshly initialised client state.
- ``warmup_client`` / ``warmup_server`` (both or neither): an initialisation period run once
  over ALL clients before round 0 (FedDBE's global mean).
- ``receive_client(server_state, client_state, data, key) -> client_state``: what EVERY
  client does with the new server state at the end of each round, after the aggregation —
  selected or not (PFLlib's ``send_models`` where it changes client state: FedALA's local
  initialisation). The result is what the client is evaluated with and starts its next
  update from; so work done here is not repeated by the evaluation and the update. Before
  round 0 nothing is received (the clients hold ``init``'s state).
- ``server_inputs() -> pytree``: constant inputs of the server that are not state (FedKTL's
  pretrained generator parameters), loaded once on the host. The engine passes them to
  ``server_update(..., inputs=...)`` as an argument of the compiled round (never a constant
  captured by a closure), replicated over a mesh; they are not checkpointed (they are
  loaded again on resume).
- ``generated_images(server_state) -> [n, H, W, C] or None``: images the server made (FedKTL's
  one image per class), which the runner writes as a PNG grid after every round in which
  they exist (``<run>_generated.png``, recorded in the results JSON).
- ``client_model(server_state, client_state) -> variables``: the model variables of ONE
  client (HtFLlib's per-client ``model``): what ``-sfn`` writes after a run and ``-mfn``
  reads back into the initial states (`fedjax_lib.client_models`). A run started from saved
  models builds its client states as ``init`` would had :meth:`Algorithm.init_params`
  returned each client's saved variables (:func:`init_clients_from_models`); so an algorithm
  defining this hook builds its clients' models through ``init_params``.

What the engine reads from an algorithm, besides these functions: ``model`` (its architecture
group's Flax model; `dataclasses.replace(algorithm, model=...)` makes the instance of another
group), ``local`` (the `LocalSpec`), :meth:`ce_loss` (new-client fine-tuning), ``name``, and
the float fields :meth:`hyperparameter_values` lists (a sweep passes them as arrays, see
:meth:`with_hyperparameter_values`). Server-side functions (``server_update``,
``warmup_server``) must not depend on ``model``: one server serves every group.

Settings checks: :meth:`Algorithm.check_settings` runs once per architecture before anything is
trained (`fedjax_lib.checks`). It raises a ConfigError for hyperparameters the model or the
clients cannot support and returns one-line warnings about settings that waste work; the
default finds nothing. It reads shapes only (``jax.eval_shape``) and the clients' sizes
(:class:`SettingsContext`).

Models with a training mode (BatchNorm, dropout; `fedjax_lib.models.base.has_train_mode`):
an algorithm whose class body sets ``TRAIN_MODE = True`` trains them through
`fedjax_lib.core.local.train_model` (batch statistics in training, running statistics kept
per client as PyTorch does, dropout from the client's key); the declaration is not
inherited (:func:`supports_train_mode`), because a subclass with its own loss would
otherwise train such models in evaluation mode without anyone noticing. The others refuse
those models before anything runs.

Communication (:meth:`Algorithm.upload_traffic`, :meth:`Algorithm.download_traffic`): the
floats and bytes one client sends and receives per round, from the actual pytrees; the
defaults count every leaf of the upload and of ``download(server_state)``.

Learning-rate decay (PFLlib's ``-ld``/``-ldg``): PFLlib's clients put some of their optimizers
under an ``ExponentialLR`` stepped once per local training, so client k's rates in its
(k+1)-th round of training are γ^k times the given ones. An algorithm names those rates in its
class attribute ``DECAYED_RATES`` (hyperparameter paths as :meth:`hyperparameter_values` names
them, e.g. ``local.learning_rate``), and the server rates PFLlib decays once per round in
``SERVER_DECAYED_RATES``; the engine multiplies them per client with the factors the runner
counts (`fedjax_lib.core.engine.LR_DECAY`). A rate PFLlib reads undecayed (an optimizer without
a scheduler, a formula reading ``self.learning_rate``) must then be a path of its own.

Nothing is kept on ``self`` between calls; the engine owns every piece of state.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from typing import Any, Callable, ClassVar, NamedTuple, Optional

import jax
import numpy as np

from fedjax_lib.config import MAX_INT
from fedjax_lib.core.local import Batch, LocalSpec, masked_cross_entropy
from fedjax_lib.errors import ConfigError


class SettingsContext(NamedTuple):
  """What :meth:`Algorithm.check_settings` checks an algorithm against: one architecture.

  Attributes:
    model_name: the architecture's name (``'cnn'``), for messages.
    sample_x: one input sample without the batch axis (for shapes; see
      :func:`abstract_variables`).
    train_counts: ``[n]`` training-sample counts of this architecture's training clients.
    num_new_clients: this architecture's new clients (``-nnc``), tested after training.
    fine_tuning_epoch_new: their fine-tuning epochs before the test (``-ften``).
  """
  model_name: str
  sample_x: Any
  train_counts: np.ndarray
  num_new_clients: int = 0
  fine_tuning_epoch_new: int = 0


class FeatureViews(NamedTuple):
  """Evaluation views that share one feature extractor of the server state
  (:meth:`Algorithm.feature_views`): client ``k``'s view ``name`` maps samples ``x`` to
  ``heads[name](state_k, features(x))``.

  Attributes:
    features: ``x -> z``, reading the server state only (the engine forwards every sample
      through it once).
    heads: ``{view: (client_state, z) -> logits}``, the same names in the same order as
      ``eval_views``.
    same: ``client_state -> bool scalar``: whether this client's own feature extractor is, bit
      for bit, the one ``features`` applies (then its views equal ``eval_views``'); None when
      that holds by construction. The engine checks every client first and evaluates the
      group per client when one fails.
  """
  features: Callable
  heads: dict
  same: Optional[Callable] = None


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """Base class: the model, local training settings, and shared helpers."""

  model: Any
  local: LocalSpec

  name: ClassVar[str] = ""
  # Whether this class's client updates train models with BatchNorm or dropout properly
  # (see the module docstring); read through supports_train_mode, never inherited.
  TRAIN_MODE: ClassVar[bool] = False
  # The evaluation view whose cross-entropy is reported as train_loss (None: the first).
  TRAIN_LOSS_VIEW: ClassVar[Optional[str]] = None
  # Field names that are the model/spec rather than hyperparameters.
  _STRUCTURAL: ClassVar[tuple[str, ...]] = ("model", "local")
  # PFLlib's learning-rate decay (-ld; see the module docstring): the hyperparameter paths
  # multiplied by γ^k in a client's (k+1)-th local training (the rates PFLlib's client puts
  # under an ExponentialLR), and those of the server multiplied by γ^r in round r's server
  # update. None: PFLlib's client never steps a scheduler (or the reference is HtFLlib, which
  # parses -ld and never reads it), so -ld is refused. Not inherited (:meth:`decayed_rates`):
  # a subclass with other optimizers must say which of them decay.
  DECAYED_RATES: ClassVar[Optional[tuple[str, ...]]] = None
  SERVER_DECAYED_RATES: ClassVar[tuple[str, ...]] = ()
  # Scheduler steps every client has taken before round 0 (FedDBE's start-up training).
  LR_DECAY_START: ClassVar[int] = 0
  # Whether the reference runs the model as BaseHeadSplit(base, head) (PFLlib's main.py for
  # FedAvg, FedPer, ... and every HtFLlib algorithm): a reference model whose forward ends in
  # log_softmax then has log-probability features, which --pfllib-compat reproduces (the
  # models' ``log_softmax_features``). Not inherited (:func:`reference_splits`).
  REFERENCE_SPLIT: ClassVar[bool] = False

  @classmethod
  def hyperparameters(cls) -> dict[str, Any]:
    """The algorithm's own hyperparameters and their defaults."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.name not in cls._STRUCTURAL}

  # ------------------------------------------------------------------ helpers
  def init_params(self, key: jax.Array, sample_x: jax.Array):
    """Initial model variables for one sample ``sample_x`` (no batch axis)."""
    return self.model.init(key, sample_x[None])

  def ce_loss(self, params, batch: Batch, key: jax.Array) -> jax.Array:
    """Cross-entropy of the full model on a batch (the default local loss)."""
    del key
    return masked_cross_entropy(self.model.apply(params, batch.x), batch.y, batch.mask)

  # ------------------------------------------------------------------ contract
  def init(self, key, sample_x, num_clients):
    raise NotImplementedError

  def client_update(self, server_state, client_state, data, key):
    raise NotImplementedError

  def server_update(self, server_state, uploads, weights, key):
    raise NotImplementedError

  def predict(self, server_state, client_state, x):
    raise NotImplementedError

  # ------------------------------------------------------------------ optional hooks
  def eval_views(self, server_state, client_state, data, key) -> dict[str, Callable]:
    """``{view: x -> logits}`` of one client; the first view is the primary one."""
    del data, key
    return {"": functools.partial(self.predict, server_state, client_state)}

  def rowwise_views(self) -> bool:
    """Whether each view of :meth:`eval_views` and :meth:`final_views` maps every input row
    to its output row alone (no batch statistics, no noise drawn per call), so that a
    client's samples may be forwarded in blocks of any size with the same results (the
    sequential executor does: `evaluate_lib.blocked_logits`). Default: True."""
    return True

  def shared_views(self, server_state, client_state) -> Optional[dict[str, Callable]]:
    """The evaluation views when they depend on the server state alone, else None.

    When this returns views (the same names, in the same order, as :meth:`eval_views`
    would), the engine evaluates every sample once with them instead of each client's padded
    tables through :meth:`eval_views` (``Engine.evaluate``: same metrics, fewer forward
    passes). ``client_state`` is one client's state, possibly abstract (shapes only): it may
    decide *whether* the views are shared (e.g. a client-held BatchNorm state makes them
    per-client), but the returned views must not read it. Default: None (per-client views).
    """
    del server_state, client_state
    return None

  def feature_views(self, server_state, client_state) -> Optional[FeatureViews]:
    """The evaluation views as personal heads on features of the server state, else None.

    For algorithms whose clients evaluate their own head on the global feature extractor
    (FedPer, FedRep; FedALA's head-only ALA): the engine then forwards every sample once
    through ``features`` and applies each client's heads to the features of its samples
    (``Engine.evaluate``: the same metrics as :meth:`eval_views`, up to float rounding, with
    one forward pass of the base per sample instead of one per client and padded table row).
    ``client_state`` is as for :meth:`shared_views`: it may decide whether the views apply,
    and the returned callables read it only through their ``client_state`` argument.
    Default: None.
    """
    del server_state, client_state
    return None

  def final_views(self, server_state, client_state, data, key) -> dict[str, Callable]:
    """Views of the extra evaluation after the last round (a hook: see :func:`has_hook`)."""
    raise NotImplementedError

  @property
  def supports_new_clients(self) -> bool:
    return has_hook(self, "new_client_variables")

  def new_client_variables(self, server_state, client_state):
    """Full-model variables a new client starts from (new-client evaluation)."""
    raise NotImplementedError

  def new_client_tested_variables(self, server_state, client_state, tuned):
    """The variables a new client is tested with, given ``tuned``, its fine-tuned
    :meth:`new_client_variables` (default: ``tuned``; APFL's ``pfllib_compat`` tests
    PFLlib's untrained personal model instead)."""
    del server_state, client_state
    return tuned

  def server_inputs(self):
    """Constant server inputs (a hook: see :func:`has_hook`), passed to ``server_update`` as
    ``inputs``."""
    raise NotImplementedError

  def generated_images(self, server_state):
    """Images the server generated, or None (a hook: see :func:`has_hook`)."""
    raise NotImplementedError

  def client_model(self, server_state, client_state):
    """The model variables of one client (a hook: see :func:`has_hook`; HtFLlib's saved
    per-client ``model``, written by ``-sfn`` and read by ``-mfn``)."""
    raise NotImplementedError

  def receive_client(self, server_state, client_state, data, key):
    """One client's new state after it receives the new server state (a hook: see
    :func:`has_hook`)."""
    raise NotImplementedError

  def receive_features(self, sample_x) -> bool:
    """Whether :meth:`receive_client` reads ``data.features``: the features of every
    training sample through the server state's feature extractor, i.e. the ``features`` of
    :meth:`feature_views` (`fedjax_lib.core.local.SampleFeatures`). The sequential executor
    then computes them once per round for all clients (in the shared evaluation's blocks,
    kept for the evaluation that follows) instead of each client forwarding its own samples;
    elsewhere ``data.features`` is None and ``receive_client`` computes what it needs.
    ``sample_x``: one sample (its ``shape`` and ``dtype``). Default: False."""
    del sample_x
    return False

  def warmup_client(self, server_state, client_state, data, key):
    """One client's part of the initialisation period: ``(client_state, upload)``."""
    raise NotImplementedError

  def warmup_server(self, server_state, uploads, weights, key):
    """The server's part of the initialisation period (``weights``: sample counts)."""
    raise NotImplementedError

  # ------------------------------------------------------------------ communication
  def download(self, server_state):
    """What the server sends every client at the start of a round (default: its whole
    state; algorithms whose server keeps things it never sends override this)."""
    return server_state

  def upload_traffic(self, upload) -> "Traffic":
    """``(floats, bytes)`` one client's ``upload`` puts on the network (traced; default:
    every leaf)."""
    return tree_traffic(upload)

  def download_traffic(self, server_state) -> "Traffic":
    """``(floats, bytes)`` the server sends one client per round (traced; default: every
    leaf of :meth:`download`)."""
    return tree_traffic(self.download(server_state))

  def divergence_advice(self) -> str:
    """What to change when this algorithm's updates turn non-finite (appended to the
    runner's stop message)."""
    return "lower the learning rate (-lr)"

  def first_evaluated_round(self) -> int:
    """The first round the runner evaluates (HtFLlib's FedL2G evaluates nothing during its
    warm-up rounds); 0 for every other algorithm."""
    return 0

  # ------------------------------------------------------------------ settings checks
  def check_settings(self, context: SettingsContext) -> list[str]:
    """Checks the hyperparameters against ``self.model`` and the clients of ``context``.

    Called once per architecture (with that architecture's model) before anything runs.

    Returns:
      One-line warnings (without a ``warning:`` prefix) about settings that waste work or
      make the reported numbers misleading, each naming the hyperparameter, its value, the
      numbers and what to do. The default finds nothing.

    Raises:
      ConfigError: a setting this algorithm cannot work with on this model or these clients.
    """
    del context
    return []


  # ------------------------------------------------------------------ swept values
  def hyperparameter_values(self) -> dict[str, Any]:
    """``{"path.to.field": value}`` of every field, nested dataclasses (``local``) expanded."""
    return _fields(self)

  @classmethod
  def decayed_rates(cls) -> Optional[tuple[str, ...]]:
    """This class's own `DECAYED_RATES` (never a base class's); None: ``-ld`` is refused."""
    return cls.__dict__.get("DECAYED_RATES")

  def with_decayed_rates(self, factor, server: bool = False) -> "Algorithm":
    """A copy whose `DECAYED_RATES` (``server``: `SERVER_DECAYED_RATES`) are multiplied by
    ``factor`` (traced: γ^k, the k-th power of ``-ldg``)."""
    paths = type(self).SERVER_DECAYED_RATES if server else (self.decayed_rates() or ())
    if not paths:
      return self
    values = self.hyperparameter_values()
    new = self.with_hyperparameter_values({p: values[p] * factor for p in paths})
    # What undecayed() reads: PFLlib reads some rates undecayed (an attribute, not the
    # optimizer's), which the code can then ask for.
    object.__setattr__(new, "_undecayed", {**{p: values[p] for p in paths},
                                           **getattr(self, "_undecayed", {})})
    return new

  def is_decayed(self) -> bool:
    """Whether this copy's rates were scaled by ``-ld`` (:meth:`with_decayed_rates`)."""
    return bool(getattr(self, "_undecayed", None))

  def undecayed(self, path: str):
    """Hyperparameter ``path``'s value before ``-ld``'s decay (`with_decayed_rates`); its
    value when nothing decayed it."""
    kept = getattr(self, "_undecayed", {})
    return kept[path] if path in kept else self.hyperparameter_values()[path]

  def with_hyperparameter_values(self, values: dict[str, Any]) -> "Algorithm":
    """A copy with the fields at ``values``' paths (as :meth:`hyperparameter_values` names
    them) replaced; ``self`` is unchanged.

    This is how swept hyperparameters reach a compiled program: the engine passes them as
    arguments (``[S]`` arrays under ``vmap``, or one combination's scalars) and binds them to
    a copy of the algorithm while tracing. Validation (``__post_init__``) is skipped: the
    values may be tracers, and every combination was validated when its own algorithm was
    built (`fedjax_lib.sweep`).
    """
    if not values:
      return self
    return _substitute(self, {tuple(k.split(".")): v for k, v in values.items()})


class Traffic(NamedTuple):
  """Numbers sent over the network: scalar ``floats`` and ``bytes`` (float32 arrays, so they
  add up inside compiled code)."""
  floats: Any
  bytes: Any


def tree_traffic(tree) -> Traffic:
  """Every floating-point leaf of ``tree``, counted whole (integer leaves, such as sample
  counts or class indices, are metadata and are not counted)."""
  floats = nbytes = 0
  for leaf in jax.tree.leaves(tree):
    if jax.numpy.issubdtype(leaf.dtype, jax.numpy.inexact):
      size = int(np.prod(leaf.shape))
      floats += size
      nbytes += size * leaf.dtype.itemsize
  return Traffic(jax.numpy.float32(floats), jax.numpy.float32(nbytes))


def rows_traffic(rows: jax.Array, present: jax.Array) -> Traffic:
  """The rows of ``rows [C, ...]`` whose ``present [C]`` flag is set (e.g. the prototypes of
  the classes a client has), counted as sent; the others are not."""
  per_row = int(np.prod(rows.shape[1:]))
  count = jax.numpy.sum(present.astype(jax.numpy.float32)) * per_row
  return Traffic(count, count * rows.dtype.itemsize)


def reference_splits(algorithm) -> bool:
  """Whether ``algorithm``'s own class (or ``algorithm``, a class) declares
  ``REFERENCE_SPLIT = True``: its reference wraps the model in ``BaseHeadSplit``, so the
  models' log-softmax quirk applies under ``--pfllib-compat`` (`fedjax_lib.models.text`). The
  declaration is not inherited (FedProx's reference does not split, FedAvg's does)."""
  cls = algorithm if isinstance(algorithm, type) else type(algorithm)
  return bool(cls.__dict__.get("REFERENCE_SPLIT", False))


def supports_train_mode(algorithm) -> bool:
  """Whether ``algorithm``'s own class (or ``algorithm``, a class) declares
  ``TRAIN_MODE = True``; the declaration is not inherited."""
  cls = algorithm if isinstance(algorithm, type) else type(algorithm)
  return bool(cls.__dict__.get("TRAIN_MODE", False))


HOOKS = ("eval_views", "final_views", "new_client_variables", "warmup_client",
         "warmup_server", "receive_client", "server_inputs", "generated_images",
         "client_model")


def has_hook(algorithm, name: str) -> bool:
  """Whether ``algorithm``'s class (or ``algorithm``, a class) defines hook ``name``
  (overrides `Algorithm`'s default)."""
  if name not in HOOKS:
    raise ValueError(f"unknown hook {name!r}; hooks: {', '.join(HOOKS)}")
  cls = algorithm if isinstance(algorithm, type) else type(algorithm)
  return getattr(cls, name) is not getattr(Algorithm, name)


def has_warmup(algorithm) -> bool:
  """Whether the algorithm has an initialisation period (both warm-up hooks defined)."""
  client, server = has_hook(algorithm, "warmup_client"), has_hook(algorithm, "warmup_server")
  if client != server:
    raise TypeError(f"{type(algorithm).__name__} defines only one of warmup_client and "
                    "warmup_server; an initialisation period needs both")
  return client


def linear_server(server_update: Callable) -> Callable:
  """Marks ``server_update`` as using the uploads only through their weighted average.

  Such a server gives the same state for the stacked uploads ``U`` with weights ``w`` as for
  the single row ``Σ w_k U_k / Σ w_k`` with weight ``Σ w_k`` (a conformance check), so the
  sequential executor keeps a running weighted sum instead of every upload. The mark belongs
  to the function: a subclass that overrides ``server_update`` is non-linear unless it marks
  its own.
  """
  server_update.linear_aggregation = True
  return server_update


def is_linear_server(algorithm) -> bool:
  return bool(getattr(type(algorithm).server_update, "linear_aggregation", False))


def _fields(obj, prefix: str = "") -> dict[str, Any]:
  out = {}
  for f in dataclasses.fields(obj):
    if not f.compare:  # not part of the settings (FedKTL's generator and its parameters)
      continue
    value = getattr(obj, f.name)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
      out.update(_fields(value, f"{prefix}{f.name}."))
    else:
      out[prefix + f.name] = value
  return out


def _substitute(obj, values: dict[tuple, Any]):
  new = copy.copy(obj)
  heads: dict[str, dict] = {}
  for path, value in values.items():
    heads.setdefault(path[0], {})[path[1:]] = value
  for name, rest in heads.items():
    value = rest[()] if () in rest else _substitute(getattr(obj, name), rest)
    object.__setattr__(new, name, value)
  return new


def _accepted(kind: str, minimum, maximum) -> str:
  return f"{kind} >= {minimum}" if maximum is None else f"{kind} in [{minimum}, {maximum}]"


def check_int(algorithm: str, name: str, value, minimum: int,
              maximum: Optional[int] = None) -> None:
  """Raises a ConfigError unless hyperparameter ``name`` is an integer in range, and never
  above `config.MAX_INT` (it may travel into a compiled program as int32)."""
  ok = not isinstance(value, bool) and isinstance(value, (int, np.integer))
  if ok and maximum is None and value > MAX_INT:
    maximum = MAX_INT
  if not ok or value < minimum or (maximum is not None and value > maximum):
    raise ConfigError(f"{algorithm} hyperparameter {name}={value!r} must be "
                      f"{_accepted('an integer', minimum, maximum)}")


def check_bool(algorithm: str, name: str, value) -> None:
  """Raises a ConfigError unless hyperparameter ``name`` is True or False."""
  if not isinstance(value, bool):
    raise ConfigError(f"{algorithm} hyperparameter {name}={value!r} must be true or false")


def check_number(algorithm: str, name: str, value, minimum: float = 0,
                 maximum: Optional[float] = None) -> None:
  """Raises a ConfigError unless hyperparameter ``name`` is a finite number in range.

  (Until 2026-12-07 some algorithms accepted ``inf``, e.g. FedProx's and Ditto's ``mu``, and ran
  to a non-finite stop.)"""
  ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and value >= minimum
        and (maximum is None or value <= maximum) and math.isfinite(value))
  if not ok:
    kind = "a finite number" if maximum is None else "a number"
    raise ConfigError(f"{algorithm} hyperparameter {name}={value!r} must be "
                      f"{_accepted(kind, minimum, maximum)}")


def check_positive(algorithm: str, name: str, value, flag: str) -> None:
  """Raises a ConfigError unless ``value`` is a finite number > 0."""
  check_number(algorithm, name, value, 0.0)
  if not value > 0:
    raise ConfigError(f"{algorithm} hyperparameter {name}={value!r} must be a finite number "
                      f"> 0 ({flag})")


def known_zero(weight) -> bool:
  """Whether a loss term's ``weight`` is known to be 0 while the program is traced: a Python
  number equal to 0. A swept weight is a traced array (`Algorithm.with_hyperparameter_values`)
  and never is, so a term skipped for 0 must be computed (and weighted) for it rather than
  tested with ``if weight:``, which a tracer refuses."""
  return isinstance(weight, (int, float)) and weight == 0


def abstract_variables(model, sample_x):
  """``model``'s variables for one sample, as ``jax.ShapeDtypeStruct`` leaves (no FLOPs)."""
  x = jax.ShapeDtypeStruct((1, *np.shape(sample_x)), sample_x.dtype)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)


def untrained_new_clients(algorithm: str, fresh: str, context: SettingsContext) -> list[str]:
  """The warning for new clients tested untrained: they start from a freshly initialised
  ``fresh`` (e.g. ``'head'``) and are not fine-tuned (``fine_tuning_epoch_new = 0``)."""
  if not context.num_new_clients or context.fine_tuning_epoch_new:
    return []
  return [f"num_new_clients={context.num_new_clients} with fine_tuning_epoch_new=0: a new "
          f"{algorithm} client starts from a freshly initialised {fresh}, so it is tested "
          "untrained (near chance); set fine_tuning_epoch_new >= 1 (-ften)"]


def stack_clients(tree, num_clients: int):
  """Copies one client's state ``num_clients`` times along a new leading axis."""
  return jax.tree.map(lambda a: jax.numpy.broadcast_to(a, (num_clients,) + a.shape), tree)


def init_clients_from_models(algorithm, key, sample_x, models):
  """Client states as ``algorithm.init(key, sample_x, n)`` builds them, had
  :meth:`Algorithm.init_params` returned client k's row of ``models`` for client k (HtFLlib's
  ``-mfn``: each client's model loaded instead of initialised). Everything else in the
  states (projectors, optimizer states, ...) is initialised from ``key`` as usual.

  Args:
    algorithm: an algorithm with the ``client_model`` hook.
    key, sample_x: as for ``init``.
    models: model variables stacked over the n clients (the structure ``init_params``
      returns).
  """
  def one(variables):
    loaded = copy.copy(algorithm)
    # this instance only: its init builds the client from ``variables``
    object.__setattr__(loaded, "init_params", lambda key, sample_x: variables)
    _, clients = loaded.init(key, sample_x, 1)
    return jax.tree.map(lambda a: a[0], clients)
  return jax.vmap(one)(models)
