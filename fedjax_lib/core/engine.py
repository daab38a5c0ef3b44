"""The round engine: one implementation of a federated round for every algorithm and model mix.

Clients are grouped by architecture. A :class:`Group` is one architecture's algorithm instance
(``dataclasses.replace(algorithm, model=models[arch])``) and the global ids of the clients
that use it; the client states are ``{group name: states stacked over that group's clients}``
(row i of a group is client ``ids[i]``). A homogeneous run is one group with ids ``0..N-1``.

A round (:meth:`Engine._round_fn`, written once, as in PFLlib's server loop; evaluation is
separate, see :meth:`Engine.evaluate`):

1. **plan** over global ids: seeded client selection (``join_ratio`` or
   ``random_join_ratio``) and drop-outs (``client_drop_rate``) from the round's selection key;
   each group gets its cohort members, in cohort order, in ``min(K, n_g)`` static slots;
2. **train** each group with the executor (`fedjax_lib.core.executors`): one compiled program
   per group; the per-client step (:meth:`Engine._step`) masks unselected, dropped and
   non-finite clients the same way for every executor;
3. **aggregate** once: ``server_update`` of every group's uploads, concatenated group after
   group, with sample-count weights (zero for dropped and padding slots).

Before anything runs, :meth:`Engine.check_compatible` traces every group's ``init`` and
``client_update`` with ``jax.eval_shape`` and refuses groups whose server state or upload
differ in structure or shape (e.g. FedAvg across two architectures).

**Several devices.** Given a mesh with a ``clients`` axis (:func:`client_mesh`), each group's
stacked states and index tables are sharded along it (padded with masked rows to a multiple
of the device count). Each device trains its block of slots inside ``shard_map``; the server
update then runs on global arrays, so XLA partitions it and its result is the same on every
device whatever it computes (per-class means, a few SGD steps...).

**Runs side by side.** Every program takes the swept hyperparameters as an argument
(``{path: value}``, empty for a plain run; see `Algorithm.with_hyperparameter_values`), and
with a traced executor :meth:`Engine.stacked` gives init, rounds and evaluation ``vmap``-ped
over a leading axis of S runs (:class:`StackedPrograms`, used by `fedjax_lib.runner`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import warnings
from typing import Any, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjax_lib.algorithms.base import (FeatureViews, has_hook, has_warmup,
                                        init_clients_from_models, is_linear_server)
from fedjax_lib.core import evaluate as evaluate_lib
from fedjax_lib.core import executors as executors_lib
from fedjax_lib.core import rng
from fedjax_lib.core.executors import CLIENTS, GroupSlots, SlotOutputs
from fedjax_lib.core.local import (ClientData, SampleFeatures, cross_entropy_objective,
                                   train_locally, train_model)
from fedjax_lib.errors import ConfigError, FedJaxWarning
from fedjax_lib.models.base import has_train_mode


class DeviceData(NamedTuple):
  """The federated arrays on the device (see `fedjax_lib.data.FederatedData`)."""
  x: jax.Array
  y: jax.Array
  train_idx: jax.Array
  train_count: jax.Array
  test_idx: jax.Array
  test_count: jax.Array

  @classmethod
  def from_federated(cls, data) -> "DeviceData":
    # tree.map: ``x`` may be a pytree (QuantizedImages: its uint8 pixels go to the device)
    return cls(*(jax.tree.map(jnp.asarray, getattr(data, f)) for f in cls._fields))


def client_mesh(num_devices: Optional[int] = None) -> Mesh:
  """A one-axis mesh ``('clients',)`` over the first ``num_devices`` devices (all by default).

  With several processes (``jax.distributed.initialize``) ``jax.devices()`` lists every
  process's devices, so the mesh spans hosts.
  """
  devices = jax.devices()
  num_devices = len(devices) if num_devices is None else num_devices
  if not 1 <= num_devices <= len(devices):
    raise ValueError(f"num_devices={num_devices}: this machine has {len(devices)} "
                     f"{jax.default_backend()} device(s); use 1..{len(devices)}")
  return Mesh(np.asarray(devices[:num_devices]), (CLIENTS,))


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _put(array, sharding):
  """``array`` (the same host value on every process) as a global array with ``sharding``."""
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


class RoundPlan(NamedTuple):
  """Who trains this round: cohort ids, which slots are selected, which are aggregated."""
  cohort: jax.Array   # [K] client ids
  active: jax.Array   # [K] bool: selected this round (all True unless random_join_ratio)
  kept: jax.Array     # [K] bool: selected and not dropped


@dataclasses.dataclass(frozen=True)
class Participation:
  """Static participation settings (PFLlib's ``-jr -rjr -cdr``)."""
  num_clients: int
  join_ratio: float = 1.0
  random_join_ratio: bool = False
  client_drop_rate: float = 0.0

  @property
  def min_join(self) -> int:
    return int(self.num_clients * self.join_ratio)

  @property
  def cohort_size(self) -> int:
    return self.num_clients if self.random_join_ratio else self.min_join


def plan_round(rkey: jax.Array, p: Participation) -> RoundPlan:
  """Selects this round's clients and drop-outs from ``selection_key(rkey)``.

  ``k`` clients are drawn without replacement (``k = int(N·join_ratio)``, or uniform in
  ``[int(N·join_ratio), N]`` with ``random_join_ratio``); ``int((1 - drop_rate)·k)`` of them,
  chosen uniformly, are aggregated (PFLlib's ``random.sample`` in ``receive_models``).
  """
  k_perm, k_num, k_drop = jax.random.split(rng.selection_key(rkey), 3)
  size = p.cohort_size
  cohort = jax.random.permutation(k_perm, p.num_clients)[:size].astype(jnp.int32)
  if p.random_join_ratio:
    num_join = jax.random.randint(k_num, (), p.min_join, p.num_clients + 1)
  else:
    num_join = jnp.asarray(size)
  active = jnp.arange(size) < num_join
  # int() truncation as in PFLlib; the epsilon guards float32 rounding such as 2.9999998.
  num_kept = jnp.floor((1.0 - p.client_drop_rate) * num_join.astype(jnp.float32) + 1e-4)
  scores = jnp.where(active, jax.random.uniform(k_drop, (size,)), 2.0)
  rank = jnp.argsort(jnp.argsort(scores))
  kept = rank < num_kept
  return RoundPlan(cohort, active, kept)


def default_unroll(backend: str, num_steps: int) -> int:
  """Local steps unrolled per iteration of the ``'scan'`` local loop: 1 (a rolled loop).

  (XLA:CPU once needed full unrolling, its convolutions being ~10x slower inside loops; the
  CPU default convolution, `fedjax_lib.models.layers.resolve_conv_impl`, has no such penalty,
  and the CPU default loop is ``'valid'``, which does not unroll.)
  """
  del backend, num_steps
  return 1


def default_local_loop(backend: str) -> str:
  """How local steps run (`fedjax_lib.core.local.LocalSpec.loop`), chosen from measurements.

  XLA:CPU trains one client at a time (the sequential executor), so each client runs only its
  own steps (``'valid'``): on the 20-client digits partition (Dir 0.1) every client otherwise
  runs the largest client's 11 steps where the mean is 6.2. Vmapped clients on accelerators
  share one static shape (``'scan'``). See experiments/benchmarks/RESULTS.md.
  """
  return "valid" if backend == "cpu" else "scan"


def default_executor(backend: str) -> str:
  """The executor ``auto`` resolves to, chosen from measurements.

  On XLA:CPU, vmapping convolutions over per-client kernels lowers them to grouped
  convolutions, which ran ~1.6x slower per client-step than one client's plain convolutions
  (and padded steps of small clients cost as much as real ones), so CPU loops over clients with
  one compiled per-client program. Accelerators vmap the whole cohort in one program.
  See experiments/benchmarks/RESULTS.md.
  """
  return "sequential" if backend == "cpu" else "vmap"


def default_client_threads(backend: str) -> int:
  """Clients the sequential executor trains at once by default, chosen from measurements:
  2 on XLA:CPU where the process may use two cores or more (one client's batches of 10 leave
  a core idle between small ops: FedAvg's digits round trained 1.2x faster on a 2-core VM),
  else 1. See experiments/benchmarks/RESULTS.md."""
  if backend != "cpu":
    return 1
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    cores = os.cpu_count() or 1
  return 2 if cores >= 2 else 1


def _tree_where(mask, on_true, on_false):
  def pick(a, b):
    m = jnp.reshape(mask, jnp.shape(mask) + (1,) * (a.ndim - jnp.ndim(mask)))
    return jnp.where(m, a, b)
  return jax.tree.map(pick, on_true, on_false)


def _finite(tree) -> jax.Array:
  """Whether every floating-point entry of ``tree`` (one client's outputs) is finite."""
  flags = [jnp.isfinite(a).all() for a in jax.tree.leaves(tree)
           if jnp.issubdtype(a.dtype, jnp.inexact)]
  return functools.reduce(jnp.logical_and, flags) if flags else jnp.asarray(True)


@dataclasses.dataclass(frozen=True)
class Group:
  """One architecture group: its algorithm instance and the global ids of its clients.

  Attributes:
    name: the architecture's name (the key of its client states and checkpoints).
    algorithm: ``dataclasses.replace(algorithm, model=model_of_this_architecture)``.
    ids: the global client ids using this architecture, ascending.
    chunk_size: clients per ``lax.map`` chunk for the chunked executor (None: the engine's).
  """
  name: str
  algorithm: Any
  ids: tuple
  chunk_size: Optional[int] = None

  @property
  def size(self) -> int:
    return len(self.ids)


class _Phase(NamedTuple):
  """A round-shaped pass: the training round, the initialisation period (warm-up), or every
  client receiving the new server state (`Algorithm.receive_client`)."""
  name: str
  counter: str


ROUND = _Phase("round", "client_update")
WARMUP = _Phase("warmup", "warmup")
RECEIVE = _Phase("receive", "receive")
# Passes over every client, in place, all of them active.
_ALL_CLIENTS = (WARMUP.name, RECEIVE.name)

#: The ``hparams`` entry of PFLlib's learning-rate decay (``-ld``): see `Engine._step`.
LR_DECAY = "lr_decay"


class Engine:
  """Runs rounds and evaluations of one algorithm over architecture groups on federated data.

  Args:
    algorithm: an `fedjax_lib.algorithms.Algorithm` (one group, ids ``0..N-1``) or a sequence
      of :class:`Group` covering ids ``0..N-1`` exactly once.
    data: the federated arrays on the device.
    participation: selection and drop-out settings.
    executor: ``vmap`` | ``chunked`` | ``sequential``.
    chunk_size: clients per ``lax.map`` chunk for ``chunked``.
    eval_chunk_size: clients evaluated per compiled call.
    skip_nonfinite: drop the updates of clients whose upload, new state or loss is not finite
      (they are not aggregated and keep their previous state); otherwise they are only
      reported (``round_metrics["nonfinite"]``) and the caller decides.
    mesh: shard clients over this mesh's ``clients`` axis.
    model_cycle: the group index of architecture ``i mod K`` (HtFLlib's client-to-model rule),
      used to place new clients (ids >= N); default: the group of ``id mod N``.
    shared_eval: evaluate a group whose views depend on the server state alone
      (`Algorithm.shared_views`), or are personal heads on features of the server state
      (`Algorithm.feature_views`), by one forward pass per sample instead of per-client
      padded tables, and (sequential executor) hand `Algorithm.receive_client` those
      features where it asks for them (`Algorithm.receive_features`) (same metrics and
      states up to float rounding; False: always per client, as a check).
    client_threads: clients the sequential executor trains at once, each on a thread of its
      own (the same results to the bit; `executors.SequentialExecutor`: one at a time where
      the client program calls LAPACK); None: per backend (:func:`default_client_threads`);
      ignored by the traced executors.
  """

  def __init__(self, algorithm: Union[Any, Sequence[Group]], data: DeviceData,
               participation: Participation, executor: str = "vmap", chunk_size: int = 8,
               eval_chunk_size: int = 64, skip_nonfinite: bool = False,
               mesh: Optional[Mesh] = None, model_cycle: Optional[Sequence[int]] = None,
               shared_eval: bool = True, client_threads: Optional[int] = None):
    if executor not in ("vmap", "chunked", "sequential"):
      raise ValueError(f"unknown executor {executor!r}")
    if mesh is not None and executor == "sequential":
      raise ValueError("the sequential executor runs on one device; shard with vmap or chunked")
    n = participation.num_clients
    if isinstance(algorithm, (list, tuple)):
      groups = tuple(algorithm)
    else:
      groups = (Group("model", algorithm, tuple(range(n))),)
    covered = sorted(i for g in groups for i in g.ids)
    if covered != list(range(n)) or len({g.name for g in groups}) != len(groups):
      raise ValueError(f"groups must have distinct names and cover client ids 0..{n - 1} "
                       "exactly once")
    self.groups = groups
    self.algorithm = groups[0].algorithm  # the server side (shared by every group)
    # Each group's clients' models to start from ({group name: variables stacked over its
    # clients}; `Algorithm.client_model`, HtFLlib's -mfn), or None: `init` initialises them.
    self.initial_models: Optional[dict] = None
    self.participation = participation
    if client_threads is None:
      client_threads = default_client_threads(jax.default_backend())
    if client_threads < 1:
      raise ValueError(f"client_threads={client_threads}; accepted: 1 or more")
    self.executors = [executors_lib.make_executor(executor, g.chunk_size or chunk_size,
                                                  client_threads) for g in groups]
    self.client_threads = client_threads if executor == "sequential" else 1
    self.executor = executor
    self.chunk_size = chunk_size
    self.skip_nonfinite = skip_nonfinite
    self.linear = is_linear_server(self.algorithm)
    self.num_clients = n
    self.eval_chunk_size = min(eval_chunk_size, n)
    # Host copies of the counts (a sharded array may not be readable from every process).
    self._train_count = np.asarray(data.train_count)
    self._test_count = np.asarray(data.test_count)
    self._total_clients = int(self._train_count.shape[0])
    self.mesh = mesh
    self.num_shards = 1 if mesh is None else int(mesh.shape[CLIENTS])
    # Every group's cohort is all its rows (masked) whenever the cohort is N: trained in place.
    self._in_place = mesh is not None and participation.cohort_size == n
    self._group_of = np.zeros(n, np.int32)
    self._row_of = np.zeros(n, np.int32)
    for gi, g in enumerate(groups):
      self._group_of[list(g.ids)] = gi
      self._row_of[list(g.ids)] = np.arange(g.size)
    # Rows of a group's stacked states: its clients, padded to a multiple of the device count.
    self.rows = [_round_up(g.size, self.num_shards) for g in groups]
    self.slots = [rows if self._in_place else
                  _round_up(min(participation.cohort_size, g.size), self.num_shards)
                  for g, rows in zip(groups, self.rows)]
    self.data = data if mesh is None else self._shard_samples(data)
    # Every array a compiled program reads, passed as an argument (never closed over):
    # samples, all index tables (new clients), and each group's index tables by row.
    self.arrays = {"data": self.data,
                   "tables": [self._group_tables(data, gi) for gi in range(len(groups))],
                   "server_inputs": self._server_inputs()}
    self._model_cycle = None if model_cycle is None else tuple(model_cycle)
    # Incremented while tracing: a compile counter for tests and a guard against retracing.
    self.trace_counts: collections.Counter = collections.Counter()
    self._round_program = self._stage_round(ROUND)
    self._warmup_program = self._stage_round(WARMUP)
    self._plan = jax.jit(self._plan_fn, static_argnames=("phase",))
    self._finish = jax.jit(self._finish_fn, static_argnames=("phase",))
    self._receive_vmapped = jax.jit(self._receive_vmapped_fn, donate_argnums=(2,),
                                    static_argnames=("gi",))
    self._row = jax.jit(lambda states, row: jax.tree.map(lambda a: a[row], states))
    self._client = jax.jit(self._client_fn, static_argnames=("gi", "phase"))
    self._write = jax.jit(self._write_fn, donate_argnums=(0, 1), static_argnames=("linear",))
    self._eval_chunk = jax.jit(self._eval_chunk_fn, static_argnames=("gi", "final"))
    self._eval_sharded = jax.jit(self._eval_sharded_fn, static_argnames=("gi", "final"))
    self._shared_forward = jax.jit(self._shared_forward_fn, static_argnames=("gi",))
    self._shared_same = jax.jit(self._shared_same_fn, static_argnames=("gi",))
    self._shared_metrics = jax.jit(self._shared_metrics_fn,
                                   static_argnames=("gi", "names", "loss_view"))
    self._shared_tables: dict = {}
    # Per group: the shared features of the last server state they were computed for
    # (`_shared_features`), and whether its algorithm's receive_client reads them.
    self._features_cache: dict = {}
    self._receive_reads: dict = {}
    # Most samples per forward pass of the shared evaluation (see _shared_group_tables).
    self.shared_eval_block = 128 if jax.default_backend() == "cpu" else 1024
    # Samples per forward pass when the sequential executor evaluates a client on its own
    # (`evaluate_lib.blocked_logits`: the client's samples only, not its table's padding),
    # for views of at least eval_block_min_flops per sample.
    self.eval_block = 64 if jax.default_backend() == "cpu" else 256
    self.eval_block_min_flops = evaluate_lib.BLOCKED_MIN_FLOPS
    self.shared_eval = shared_eval
    self._new_client = jax.jit(self._new_client_fn, static_argnames=("gi", "epochs"))
    self._init_jit = jax.jit(self._init_fn)
    self._step_shapes: dict = {}
    self._overlappable: dict = {}  # {(group, phase): bool}, `_SequentialWriter.overlappable`
    self._init_shapes: dict = {}  # {(shape, dtype) of sample_x: [(server, clients) per group]}
    self._stacked: dict = {}
    if mesh is not None:
      self._export = jax.jit(self._export_fn, out_shardings=NamedSharding(mesh, P()))

  # ------------------------------------------------------------------ layout
  def _shard_samples(self, data: DeviceData) -> DeviceData:
    """Samples replicated on every device; index tables padded and sharded along clients."""
    rows = _round_up(self._total_clients, self.num_shards)
    replicated = NamedSharding(self.mesh, P())
    sharded = NamedSharding(self.mesh, P(CLIENTS))

    def table(a):
      a = np.asarray(a)
      pad = np.zeros((rows - a.shape[0],) + a.shape[1:], a.dtype)
      return _put(np.concatenate([a, pad]), sharded)

    return DeviceData(jax.tree.map(lambda a: _put(a, replicated), data.x),
                      _put(data.y, replicated),
                      table(data.train_idx), table(data.train_count),
                      table(data.test_idx), table(data.test_count))

  def _server_inputs(self):
    """The algorithm's constant server inputs (`Algorithm.server_inputs`, e.g. a pretrained
    generator's parameters): loaded once, an argument of every round (never closed over),
    replicated over a mesh; ``{}`` for an algorithm without them."""
    if not has_hook(self.algorithm, "server_inputs"):
      return {}
    # Through host memory: arrays restored by Orbax are committed to a device, and mixing
    # committed with the engine's uncommitted arrays would make each round's outputs
    # committed one round after another, recompiling every program (measured: 3 rounds).
    inputs = jax.tree.map(np.asarray, self.algorithm.server_inputs())
    if self.mesh is None:
      return jax.tree.map(jnp.asarray, inputs)
    return jax.tree.map(lambda a: _put(a, NamedSharding(self.mesh, P())), inputs)

  def _group_tables(self, data: DeviceData, gi: int):
    """``(train_idx, train_count, test_idx, test_count)`` of a group's rows (padding: empty)."""
    ids = np.asarray(self.groups[gi].ids, np.int64)
    if self.mesh is None and len(self.groups) == 1 and self._total_clients == self.num_clients:
      return (data.train_idx, data.train_count, data.test_idx, data.test_count)
    out = []
    for a in (data.train_idx, data.train_count, data.test_idx, data.test_count):
      a = np.asarray(a)[ids]
      pad = np.zeros((self.rows[gi] - a.shape[0],) + a.shape[1:], a.dtype)
      a = np.concatenate([a, pad])
      out.append(jnp.asarray(a) if self.mesh is None
                 else _put(a, NamedSharding(self.mesh, P(CLIENTS))))
    return tuple(out)

  def place_states(self, client_states):
    """``{group: N_g stacked states}`` → the engine's layout (padded rows, sharded on a mesh)."""
    if self.mesh is None:
      return client_states
    sharding = NamedSharding(self.mesh, P(CLIENTS))

    def pad(rows):
      def leaf(a):
        a = np.asarray(a)
        extra = np.take(a, np.arange(rows - a.shape[0]) % a.shape[0], axis=0)
        return _put(np.concatenate([a, extra]), sharding)
      return leaf

    return {g.name: jax.tree.map(pad(rows), client_states[g.name])
            for g, rows in zip(self.groups, self.rows)}

  def place(self, server_state, client_states):
    """States as checkpointed (each group's real clients) → the engine's layout."""
    if self.mesh is None:
      return server_state, client_states
    replicated = NamedSharding(self.mesh, P())
    server_state = jax.tree.map(lambda a: _put(a, replicated), server_state)
    return server_state, self.place_states(client_states)

  def client_models(self, server_state, client_states) -> dict:
    """Every client's model (`Algorithm.client_model`) on the host: ``{client id:
    (architecture, variables)}``; ``client_states`` as `export_states` gives them."""
    out = {}
    for gi, g in enumerate(self.groups):
      alg = self._alg(gi, None)
      # axis_size: a client state may have no arrays (a split algorithm's personal base of a
      # model whose base has no parameters, e.g. LG-FedAvg with `mlr`).
      models = jax.vmap(alg.client_model, in_axes=(None, 0), axis_size=g.size)
      stacked = jax.device_get(jax.jit(models)(server_state, client_states[g.name]))
      for row, cid in enumerate(g.ids):
        out[int(cid)] = (g.name, jax.tree.map(lambda a, row=row: np.asarray(a[row]), stacked))
    return out

  def export_states(self, client_states):
    """The engine's layout → each group's real clients' stacked states (checkpoints, users).

    On a mesh the result is replicated, so every process can read (and Orbax write) it.
    """
    if self.mesh is None:
      return client_states
    return self._export(client_states)

  def _export_fn(self, client_states):
    return {g.name: jax.tree.map(lambda a, n=g.size: a[:n], client_states[g.name])
            for g in self.groups}

  # ------------------------------------------------------------------ compatibility
  def check_compatible(self, sample_x) -> None:
    """Refuses groups whose server state or upload differ (structure, shapes or dtypes), and
    several groups for an algorithm whose clients keep their id (a client state ``"id"``:
    its server banks are indexed by it, and ids restart in every group).

    Every group's ``init`` and ``client_update`` are traced abstractly (``jax.eval_shape``,
    nothing compiled or run). Raises a ConfigError naming two architectures and a leaf.
    """
    if len(self.groups) == 1:
      return
    sample_x = jnp.asarray(sample_x)
    key = rng.root_key(0)
    shapes = []
    for gi, (g, (server, clients)) in enumerate(zip(self.groups,
                                                    self._group_init_shapes(sample_x))):
      one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), clients)
      tables = self.arrays["tables"][gi]
      client_data = ClientData(self.data.x, self.data.y, tables[0][0], tables[1][0])
      upload = jax.eval_shape(g.algorithm.client_update, server, one, client_data, key)[1]
      shapes.append((server, upload))
      self._step_shapes[gi, ROUND.name] = upload, _STEP_STATS  # the sequential executor's too
      if isinstance(clients, dict) and "id" in clients:
        raise ConfigError(
            f"algorithm {self.algorithm.name} keeps server-side state per client, indexed by "
            "the client's id within its architecture group, so it runs one architecture; "
            f"use one -m model (got {len(self.groups)}: "
            f"{', '.join(x.name for x in self.groups)})")
    first = self.groups[0]
    for g, (server, upload) in zip(self.groups[1:], shapes[1:]):
      for what, a, b in (("upload", shapes[0][1], upload), ("server state", shapes[0][0],
                                                             server)):
        diff = _first_difference(a, b)
        if diff and what == "upload" and diff.startswith("head/"):
          raise ConfigError(
              f"algorithm {self.algorithm.name} shares the head, but architectures "
              f"{first.name} and {g.name} have different heads (their uploads differ at "
              f"{diff}); HtFLlib crashes here (its issue #3). Use an algorithm that shares "
              "no head (Local, FedProto, FedTGP) or a model list whose heads are the same")
        if diff:
          raise ConfigError(
              f"algorithm {self.algorithm.name} cannot mix architectures {first.name} and "
              f"{g.name}: their {what}s differ at {diff}; every client must upload the same "
              "structure (use an algorithm that shares only architecture-independent parts, "
              "e.g. LG-FedAvg's head over --feature-dim features, or Local)")

  # ------------------------------------------------------------------ the round (traced parts)
  def _alg(self, gi: int, hparams):
    values = {k: v for k, v in (hparams or {}).items() if k != LR_DECAY}
    return self.groups[gi].algorithm.with_hyperparameter_values(values)

  def _plan_fn(self, root, round_index, phase):
    """The plan and every group's slots and keys (``phase`` WARMUP or RECEIVE: every
    client, kept)."""
    if phase in _ALL_CLIENTS:
      rkey = (rng.warmup_key(root) if phase == WARMUP.name
              else rng.receive_round_key(rng.round_key(root, round_index)))
      active = jnp.ones((self.num_clients,), bool)
      plan = RoundPlan(jnp.arange(self.num_clients, dtype=jnp.int32), active, active)
      in_place = True
    else:
      rkey = rng.round_key(root, round_index)
      plan = plan_round(rkey, self.participation)
      in_place = self._in_place
    slots, keys = [], []
    for gi in range(len(self.groups)):
      s = self._slots_in_place(plan, gi) if in_place else self._slots_gathered(plan, gi)
      slots.append(s)
      keys.append(jax.vmap(rng.client_key, (None, 0))(rkey, s.ids))
    return plan, slots, keys

  def _slots_gathered(self, plan: RoundPlan, gi: int) -> GroupSlots:
    """The group's cohort members in cohort order, then padding (out-of-range rows)."""
    g = self.groups[gi]
    pad_row = self.rows[gi]
    if len(self.groups) == 1:
      rows, ids, active, kept = plan.cohort, plan.cohort, plan.active, plan.kept
    else:
      member = jnp.asarray(self._group_of)[plan.cohort] == gi
      count = min(plan.cohort.shape[0], g.size)
      pos = jnp.argsort(~member, stable=True)[:count]
      valid = member[pos]
      ids = plan.cohort[pos]
      rows = jnp.where(valid, jnp.asarray(self._row_of)[ids], pad_row)
      active, kept = plan.active[pos] & valid, plan.kept[pos] & valid
    pad = self.slots[gi] - rows.shape[0]
    if pad:
      rows = jnp.concatenate([rows, jnp.full((pad,), pad_row, jnp.int32)])
      ids = jnp.concatenate([ids, jnp.full((pad,), self.num_clients, jnp.int32)])
      active = jnp.concatenate([active, jnp.zeros(pad, bool)])
      kept = jnp.concatenate([kept, jnp.zeros(pad, bool)])
    return GroupSlots(rows.astype(jnp.int32), ids.astype(jnp.int32), active, kept)

  def _slots_in_place(self, plan: RoundPlan, gi: int) -> GroupSlots:
    """Every row of the group, in row order; the selection becomes masks."""
    g = self.groups[gi]
    rows = self.rows[gi]
    ids = np.full(rows, self.num_clients, np.int32)
    ids[: g.size] = g.ids
    ids = jnp.asarray(ids)
    by_client = lambda m: jnp.zeros(self.num_clients + 1, bool).at[plan.cohort].set(m)[ids]
    return GroupSlots(jnp.arange(rows, dtype=jnp.int32), ids, by_client(plan.active),
                      by_client(plan.kept))

  def _step(self, gi: int, hparams, server_state, x, y, per_slot, phase: str,
            features: Optional[SampleFeatures] = None):
    """One client's update, masked: the same for every executor (traced).

    ``per_slot = (state, train_idx, train_count, key, active, kept, client_id)``;
    ``hparams[LR_DECAY]`` (with ``-ld``): ``{"client": [N + 1] factors by client id (the last,
    for padding, 1), "server": factor}`` by which the algorithm's `Algorithm.DECAYED_RATES`
    and `Algorithm.SERVER_DECAYED_RATES` are multiplied this round; ``features``: see
    :meth:`_receive_features`. Returns
    ``(new_state, upload, weight, (active, kept, nonfinite, loss, upload_floats,
    upload_bytes))``: an unselected slot keeps
    its state and weighs 0; a dropped one keeps its new state and weighs 0; a non-finite one
    is reported, and with ``skip_nonfinite`` keeps its state and weighs 0. A slot of weight 0
    uploads zeros.
    """
    state, idx, count, key, active, kept, cid = per_slot
    alg = self._alg(gi, hparams)
    if LR_DECAY in hparams and phase == ROUND.name:  # -ld: this client's decayed rates
      alg = alg.with_decayed_rates(hparams[LR_DECAY]["client"][cid])
    client_data = ClientData(x, y, idx, count, features)
    if phase == WARMUP.name:
      self.trace_counts[WARMUP.counter] += 1
      new_state, upload = alg.warmup_client(server_state, state, client_data, key)
      metrics = {}
    elif phase == RECEIVE.name:
      self.trace_counts[RECEIVE.counter] += 1
      new_state, upload = alg.receive_client(server_state, state, client_data, key), {}
      metrics = {}
    else:
      self.trace_counts[ROUND.counter] += 1
      new_state, upload, metrics = alg.client_update(server_state, state, client_data, key)
    loss = metrics.get("loss")
    bad = active & ~_finite((new_state, upload, loss))
    if self.skip_nonfinite:  # neither aggregated nor kept
      active, kept = active & ~bad, kept & ~bad
    weight = jnp.where(kept, count.astype(jnp.float32), 0.0)
    # A slot of weight 0 (unselected, dropped, skipped, or without samples) uploads zeros, so
    # that no server sees what it computed: 0 · NaN would otherwise reach a weighted sum, and
    # the executors would disagree (the chunked running sum selected such slots out).
    upload = _tree_where(weight > 0, upload, jax.tree.map(jnp.zeros_like, upload))
    new_state = _tree_where(active, new_state, state)
    loss = jnp.where(active, jnp.zeros(()) if loss is None else loss, 0.0)
    traffic = alg.upload_traffic(upload)
    sent = lambda amount: jnp.where(kept, jnp.asarray(amount, jnp.float32), 0.0)
    return new_state, upload, weight, (active, kept, bad, loss, sent(traffic.floats),
                                       sent(traffic.bytes))

  def _program(self, gi, hparams, server_state, arrays, phase, features=None):
    step = lambda shared, per_slot: self._step(gi, *shared, per_slot, phase, features)
    return executors_lib.GroupProgram(
        step=step, shared=(hparams, server_state, arrays["data"].x, arrays["data"].y),
        tables=arrays["tables"][gi][:2], in_place=self._in_place or phase in _ALL_CLIENTS,
        mesh=self.mesh, write=_SequentialWriter(self, gi, hparams, server_state, arrays, phase))

  def _round_fn(self, hparams, server_state, client_states, arrays, root, round_index, phase):
    """One round (or the warm-up) of every group: plan → train each group → aggregate →
    (with `Algorithm.receive_client`) every client receives the new server state."""
    plan, slots, keys = self._plan(root, round_index, phase=phase)
    linear = self.linear and phase == ROUND.name
    new_states, outputs = {}, []
    for gi, g in enumerate(self.groups):
      new_states[g.name], out = self.executors[gi].train(
          self._program(gi, hparams, server_state, arrays, phase), client_states[g.name], slots[gi],
          keys[gi], linear)
      outputs.append(out)
    server_state, metrics = self._finish(hparams, server_state, arrays["server_inputs"],
                                         outputs, [s.ids for s in slots], plan, root,
                                         round_index, phase=phase)
    if phase == ROUND.name and has_hook(self.algorithm, "receive_client"):
      _, slots, keys = self._plan(root, round_index, phase=RECEIVE.name)
      for gi, g in enumerate(self.groups):
        features = self._receive_features(hparams, server_state, new_states[g.name], gi)
        if features is not None:
          new_states[g.name] = self._receive_vmapped(hparams, server_state, new_states[g.name],
                                                     arrays, slots[gi], keys[gi], features,
                                                     gi=gi)
          continue
        new_states[g.name], _ = self.executors[gi].train(
            self._program(gi, hparams, server_state, arrays, RECEIVE.name), new_states[g.name],
            slots[gi], keys[gi], False)
    if self.mesh is not None:  # fixed layouts in and out: every round reuses one program
      server_state = self._constrain(server_state, P())
      new_states = self._constrain(new_states, P(CLIENTS))
      metrics = self._constrain(metrics, P())
    return server_state, new_states, metrics

  def _receive_vmapped_fn(self, hparams, server_state, states, arrays, slots, keys, features,
                         gi):
    """Every client of group ``gi`` receives the server state in one program, vmapped, the
    states updated in place: what the sequential executor runs when the clients'
    `Algorithm.receive_client` reads shared ``features`` (:meth:`_receive_features`), whose
    per-client work is then light (FedALA's head-only ALA: 20 digits clients in ~6 ms
    against ~16 ms as 20 per-client programs, and 100 in ~17 ms against ~77 ms, the same
    states to the bit or float rounding; a ``lax.map`` over chunks copied the stacked
    states every chunk and took ~80 ms for 100)."""
    program = self._program(gi, hparams, server_state, arrays, RECEIVE.name, features)
    return executors_lib.VmapExecutor().train(program, states, slots, keys, False)[0]

  def _cohort_order(self, ids: jax.Array, plan: RoundPlan) -> jax.Array:
    """The permutation that puts in-place slots (each group's rows in client order: a mesh
    with every client in the cohort) in the order `_slots_gathered` gives them on one device:
    group after group, each group's cohort members in cohort order, then its padding. ``ids``:
    the slots' client ids, group after group (``num_clients`` for padding)."""
    size = plan.cohort.shape[0]
    position = jnp.full(self.num_clients + 1, size, jnp.int32).at[plan.cohort].set(
        jnp.arange(size, dtype=jnp.int32))
    group = np.repeat(np.arange(len(self.rows), dtype=np.int32), self.rows)
    return jnp.argsort(group * (size + 1) + position[ids], stable=True)

  def _finish_fn(self, hparams, server_state, server_inputs, outputs, slot_ids, plan, root,
                 round_index, phase):
    """Aggregation over every group's uploads, and the round's metrics (traced)."""
    cat = lambda *xs: xs[0] if len(xs) == 1 else jnp.concatenate(xs)
    out = jax.tree.map(cat, *outputs) if len(outputs) > 1 else outputs[0]
    ids = cat(*slot_ids)
    if self._in_place and phase == ROUND.name and not self.linear:
      # The slots in the order the gathered ones have (`_cohort_order`): a server that
      # shuffles or trains on its uploads (FedTGP, FedGH, FedPAC, FedKTL) then sees them in
      # one order whatever the device count.
      order = self._cohort_order(ids, plan)
      out, ids = jax.tree.map(lambda a: a[order], out), ids[order]
    alg = self._alg(0, hparams)
    if LR_DECAY in hparams and phase == ROUND.name:  # -ld on the server's own rates (FedGen)
      alg = alg.with_decayed_rates(hparams[LR_DECAY]["server"], server=True)
    # Sent at the start of this round to every client (PFLlib and HtFLlib broadcast to all).
    download = alg.download_traffic(server_state)
    if phase == WARMUP.name:
      server_state = alg.warmup_server(server_state, out.uploads, out.weights,
                                       rng.server_key(rng.warmup_key(root)))
    else:
      skey = rng.server_key(rng.round_key(root, round_index))
      extra = {"inputs": server_inputs} if has_hook(alg, "server_inputs") else {}
      server_state = alg.server_update(server_state, out.uploads, out.weights, skey, **extra)
    metrics = {
        "nonfinite": jnp.where(out.nonfinite, ids, -1),
        "num_nonfinite": out.nonfinite.sum(),
        "num_selected": plan.active.sum(),
        # Who trained this round (ids; -1: not selected): the privacy accountant's record.
        "selected": jnp.where(plan.active, plan.cohort, -1),
        "num_aggregated": out.kept.sum(),
        "local_loss": out.loss.sum() / jnp.maximum(out.active.sum(), 1),
        "upload_floats": out.upload_floats.sum(),
        "upload_bytes": out.upload_bytes.sum(),
        "download_floats": jnp.asarray(download.floats, jnp.float32) * self.num_clients,
        "download_bytes": jnp.asarray(download.bytes, jnp.float32) * self.num_clients,
    }
    return server_state, metrics

  def _constrain(self, tree, spec):
    sharding = NamedSharding(self.mesh, spec)
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, sharding), tree)

  # ------------------------------------------------------------------ sequential pieces
  def _client_fn(self, hparams, server_state, x, y, state, tables, slot, row, keys, kept, gi,
                 phase):
    """Trains the client of group row ``row`` from its ``state`` (read out of the stacked
    states by `_row`): `_step`'s outputs. The sequential executor's per-client program, which
    reads nothing else of the states, so several can run at once while others are written.

    ``keys`` are all the slots' keys (indexed here: slicing them on the host would be one more
    dispatch per client).
    """
    cid = jnp.asarray(self.groups[gi].ids, jnp.int32)[row]
    per_slot = (state, tables[0][row], tables[1][row], keys[slot], jnp.asarray(True), kept,
                cid)
    return self._step(gi, hparams, server_state, x, y, per_slot, phase)

  def _write_fn(self, states, buffers, slot, row, outputs, linear):
    """Writes a client's new state into its row of the (donated) states and its outputs
    into slot ``slot`` of the (donated) buffers."""
    new_state, upload, weight, stats = outputs
    uploads, weights, slot_stats = buffers
    if linear:
      uploads = jax.tree.map(lambda acc, u: acc + weight * u.astype(jnp.float32), uploads,
                             upload)
      weights = weights + weight
    else:
      uploads = jax.tree.map(lambda b, u: b.at[slot].set(u), uploads, upload)
      weights = weights.at[slot].set(weight)
    slot_stats = jax.tree.map(lambda b, v: b.at[slot].set(v), slot_stats, stats)
    states = jax.tree.map(lambda a, r: a.at[row].set(r), states, new_state)
    return states, (uploads, weights, slot_stats)

  # ------------------------------------------------------------------ staging
  def _stage_round(self, phase: _Phase):
    def round_fn(hparams, server_state, client_states, arrays, root, round_index):
      if self.executors[0].traced:
        self.trace_counts["round" if phase is ROUND else "warmup_round"] += 1
      return self._round_fn(hparams, server_state, client_states, arrays, root, round_index,
                            phase.name)
    return self.executors[0].stage(round_fn, donate=(1, 2))

  # ------------------------------------------------------------------ public
  def _init_fn(self, hparams, root, sample_x, initial_models=None):
    """Every group's ``init`` from the run's init key; the server state of group 0. With
    ``initial_models`` (see ``initial_models``) the clients start from those models
    (`fedjax_lib.algorithms.base.init_clients_from_models`). Each architecture initialises
    from its own key (`_init_key`): architectures never share a draw."""
    server_state, client_states = None, {}
    for gi, g in enumerate(self.groups):
      key = self._init_key(root, gi)
      alg = self._alg(gi, hparams)
      if initial_models is None or server_state is None:  # (later groups: clients only)
        server, clients = alg.init(key, sample_x, g.size)
        server_state = server if server_state is None else server_state
      if initial_models is not None:
        clients = init_clients_from_models(alg, key, sample_x, initial_models[g.name])
      client_states[g.name] = clients
    return server_state, client_states

  def _init_key(self, root, gi):
    """Group ``gi``'s initialisation key: `fedjax_lib.core.rng.group_init_key` of the first
    group with an equal model, so groups of one architecture start from one draw (as
    HtFLlib's clients of one architecture do) and different architectures from their own."""
    model = self.groups[gi].algorithm.model

    def same(other):
      try:  # Flax modules compare as dataclasses; one holding arrays cannot be compared
        return other is model or bool(other == model)
      except (TypeError, ValueError):
        return False

    first = next(j for j, g in enumerate(self.groups) if same(g.algorithm.model))
    return rng.group_init_key(root, first)

  def _group_init_shapes(self, sample_x) -> list:
    """Every group's ``init`` traced abstractly, ``[(server, clients)]``; traced once per
    engine (a family of deep architectures takes seconds: HtFE-img-8's eight, ~15 s)."""
    sample_x = jnp.asarray(sample_x) if not hasattr(sample_x, "shape") else sample_x
    signature = (tuple(sample_x.shape), str(sample_x.dtype))
    if signature not in self._init_shapes:
      key = rng.root_key(0)
      self._init_shapes[signature] = [
          jax.eval_shape(functools.partial(g.algorithm.init, num_clients=g.size), key, sample_x)
          for g in self.groups]
    return self._init_shapes[signature]

  def state_shapes(self, sample_x, hparams=None):
    """The shapes of one run's ``(server_state, client_states)`` (traced, nothing computed),
    as :meth:`_init_fn` makes them: group 0's server state, every group's clients. Without
    ``hparams`` the traces of :meth:`check_compatible` are reused."""
    if hparams:
      return jax.eval_shape(self._init_fn, hparams, rng.root_key(0), sample_x)
    shapes = self._group_init_shapes(sample_x)
    return shapes[0][0], {g.name: clients for g, (_, clients) in zip(self.groups, shapes)}

  def init(self, root: jax.Array, sample_x, hparams=None):
    """``(server_state, client_states)`` from the run's root key.

    For an algorithm with an initialisation period (the warm-up hooks), every client runs
    ``warmup_client`` once and the server ``warmup_server`` with sample-count weights.
    """
    sample_x = jnp.asarray(sample_x)
    hparams = hparams or {}
    if self.executors[0].traced:
      server_state, client_states = self._init_jit(hparams, root, sample_x, self.initial_models)
    else:
      server_state, client_states = self._init_fn(hparams, root, sample_x, self.initial_models)
    server_state, client_states = self.place(server_state, client_states)
    if not has_warmup(self.algorithm):
      return server_state, client_states
    server_state, client_states, _ = self._warmup_program(hparams, server_state, client_states,
                                                          self.arrays, root, jnp.int32(0))
    return server_state, client_states

  def run_round(self, server_state, client_states, root: jax.Array, round_index: int,
                hparams=None):
    """One round of training and aggregation (then, with `Algorithm.receive_client`, every
    client receives the new server state); returns the new states and round metrics.

    The input states are donated (their buffers may be reused): use the returned ones.
    """
    return self._round_program(hparams or {}, server_state, client_states, self.arrays, root,
                               jnp.asarray(round_index, jnp.int32))

  # ------------------------------------------------------------------ evaluation
  def _eval_client(self, gi, hparams, server_state, state, arrays, row, cid, rkey, final,
                   blocked=False):
    alg = self._alg(gi, hparams)
    data = arrays["data"]
    train_idx, train_count, test_idx, test_count = arrays["tables"][gi]
    client_data = ClientData(data.x, data.y, train_idx[row], train_count[row])
    hook = alg.final_views if final else alg.eval_views
    views = hook(server_state, state, client_data, rng.eval_key(rkey, cid))
    loss_view = alg.TRAIN_LOSS_VIEW if alg.TRAIN_LOSS_VIEW in views else None
    block = self.eval_block if blocked and alg.rowwise_views() else None
    return evaluate_lib.view_metrics(views, data.x, data.y, test_idx[row], test_count[row],
                                     train_idx[row], train_count[row], loss_view=loss_view,
                                     block=block, min_flops=self.eval_block_min_flops)

  def _group_ids(self, gi):
    g = self.groups[gi]
    return np.r_[np.asarray(g.ids, np.int32),
                 np.full(self.rows[gi] - g.size, self.num_clients, np.int32)]

  def _eval_chunk_fn(self, hparams, server_state, states, arrays, rows, root, round_index, gi,
                     final):
    self.trace_counts["evaluate"] += 1
    rkey = rng.round_key(root, round_index)
    ids = jnp.asarray(self._group_ids(gi))[rows]
    one = lambda state, row, cid, blocked=False: self._eval_client(
        gi, hparams, server_state, state, arrays, row, cid, rkey, final, blocked)
    if rows.ndim == 0:  # one client (sequential executor): its own samples, in blocks
      return one(jax.tree.map(lambda a: a[rows], states), rows, ids, blocked=True)
    return jax.vmap(one)(executors_lib.gather(states, rows), rows, ids)

  def _eval_sharded_fn(self, hparams, server_state, states, arrays, root, round_index, gi,
                       final):
    """Every row of the group, evaluated where it lives (chunked per device)."""
    self.trace_counts["evaluate"] += 1
    rkey = rng.round_key(root, round_index)
    rows = jnp.arange(self.rows[gi], dtype=jnp.int32)
    ids = jnp.asarray(self._group_ids(gi))

    def per_device(shared, states, rows, ids):
      hparams, server_state, arrays, rkey = shared
      one = lambda args: self._eval_client(gi, hparams, server_state, args[0], arrays,
                                           args[1], args[2], rkey, final)
      return jax.lax.map(one, (states, rows, ids), batch_size=self.eval_chunk_size)

    # Index tables are small: replicated here so a client's test samples can be gathered.
    shared = (hparams, server_state, arrays, rkey)
    spec = lambda tree, s: jax.tree.map(lambda _: s, tree)
    return jax.shard_map(per_device, mesh=self.mesh,
                         in_specs=(spec(shared, P()), spec(states, P(CLIENTS)), P(CLIENTS),
                                   P(CLIENTS)),
                         out_specs=P(CLIENTS), check_vma=False)(shared, states, rows, ids)

  # ---------------------------------------------- evaluation of views shared by all clients
  def _one_client(self, states):
    """One client's state, abstract (shapes only): what `Algorithm.shared_views` inspects."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), states)

  def _shared_group_tables(self, gi) -> Optional["_SharedTables"]:
    """Host-built tables of group ``gi``'s shared evaluation (cached): the samples of its
    clients, each once (training samples first, then the other test samples, each part
    sorted), in equal blocks of at most ``shared_eval_block`` (as few as that allows; the
    last one padded by repeating samples: 1,797 samples in 15 blocks of 120, not 128),
    and every client's test and train entries as positions among them; None when the group
    has no samples."""
    if gi not in self._shared_tables:
      train_idx, train_count, test_idx, test_count = (
          np.asarray(a) for a in self.arrays["tables"][gi])
      listed = lambda idx, count: idx[np.arange(idx.shape[1])[None] < count[:, None]]
      train_rows = np.unique(listed(train_idx, train_count))
      rows = np.concatenate([train_rows, np.setdiff1d(listed(test_idx, test_count),
                                                      train_rows)]).astype(np.int64)
      if rows.size == 0:
        self._shared_tables[gi] = None
      else:
        block = -(-rows.size // -(-rows.size // self.shared_eval_block))
        blocks = np.resize(rows, -(-rows.size // block) * block).reshape(-1, block)
        position = np.zeros(int(self.arrays["data"].x.shape[0]), np.int32)
        position[rows] = np.arange(rows.size, dtype=np.int32)
        # Padding entries of a table (beyond a client's count) point at position 0: masked.
        place = lambda idx: jnp.asarray(position[np.minimum(idx, position.size - 1)])
        self._shared_tables[gi] = _SharedTables(
            [jnp.asarray(b, jnp.int32) for b in blocks], place(train_idx), place(test_idx),
            -(-train_rows.size // block), jnp.asarray(position))
    return self._shared_tables[gi]

  def _shared_views(self, hparams, server_state, states, gi) -> Optional[FeatureViews]:
    """Group ``gi``'s views as features of the server state and per-client heads, or None
    where the views are per client: the global model's views (`Algorithm.shared_views`) are
    features ``[samples, views, classes]`` whose heads pick their column; otherwise
    `Algorithm.feature_views` (personal heads on the global features)."""
    alg, one = self._alg(gi, hparams), self._one_client(states)
    views = alg.shared_views(server_state, one)
    if views is None:
      return alg.feature_views(server_state, one)
    return FeatureViews(
        features=lambda x: jnp.stack([view(x) for view in views.values()], axis=1),
        heads={name: functools.partial(lambda state, z, v: z[:, v], v=v)
               for v, name in enumerate(views)})

  def _shared_forward_fn(self, hparams, server_state, states, arrays, block, gi):
    """The shared features of one block of samples."""
    self.trace_counts["evaluate_forward"] += 1
    return self._shared_views(hparams, server_state, states, gi).features(
        arrays["data"].x[block])

  def _shared_features(self, hparams, server_state, states, gi, num_blocks: int) -> tuple:
    """The shared features of the first ``num_blocks`` blocks of group ``gi``'s samples,
    from the cache where they were computed for this very server state (the same arrays:
    the receive phase's before the evaluation that follows it), else forwarded now."""
    key = jax.tree.leaves((hparams, server_state))
    cached = self._features_cache.get(gi)
    if cached is None or len(cached[0]) != len(key) or any(
        a is not b for a, b in zip(cached[0], key)):
      cached = self._features_cache[gi] = (key, {})
    blocks, done = self._shared_group_tables(gi).blocks, cached[1]
    for i in range(num_blocks):
      if i not in done:
        done[i] = self._shared_forward(hparams, server_state, states, self.arrays, blocks[i],
                                       gi=gi)
    return tuple(done[i] for i in range(num_blocks))

  def _receive_features(self, hparams, server_state, states, gi) -> Optional[SampleFeatures]:
    """The server state's features of every training sample of group ``gi``, for an
    algorithm whose `Algorithm.receive_client` reads them (`Algorithm.receive_features`,
    e.g. FedALA's head-only ALA), on the sequential executor: computed once, in the shared
    evaluation's blocks, and kept for the evaluation that follows (which forwards only the
    remaining test samples); the receive phase then runs vmapped in one program
    (:meth:`_receive_vmapped_fn`). None elsewhere: the traced executors' clients compute
    their own inside the round's program, and so does every client without ``shared_eval``
    (one program per client). One server state's features are kept per group: a sweep's runs,
    trained one after another before they are evaluated, find theirs replaced and forward
    them again."""
    if self.executors[gi].traced or not self.shared_eval or self.mesh is not None:
      return None
    if gi not in self._receive_reads:
      x = self.arrays["data"].x
      self._receive_reads[gi] = bool(self._alg(gi, hparams).receive_features(
          jax.ShapeDtypeStruct(x.shape[1:], x.dtype)))
    if not self._receive_reads[gi]:
      return None
    alg, one = self._alg(gi, hparams), self._one_client(states)
    tables = self._shared_group_tables(gi)
    if (tables is None or alg.shared_views(server_state, one) is not None
        or alg.feature_views(server_state, one) is None):
      return None
    features = self._shared_features(hparams, server_state, states, gi, tables.train_blocks)
    return SampleFeatures(jnp.concatenate(features), tables.position)

  def _shared_same_fn(self, hparams, server_state, states, gi):
    """Per row of the group: whether its client's feature extractor is the shared one."""
    self.trace_counts["evaluate_check"] += 1
    return jax.vmap(self._shared_views(hparams, server_state, states, gi).same)(states)

  def _shared_metrics_fn(self, hparams, server_state, states, features, arrays, blocks,
                         train_pos, test_pos, gi, names, loss_view):
    """Every client's metrics: its heads on the features of its rows, gathered by position
    (as `evaluate.view_metrics` of its per-client views), ``eval_chunk_size`` clients at a
    time."""
    self.trace_counts["evaluate"] += 1
    heads = self._shared_views(hparams, server_state, states, gi).heads
    z = jnp.concatenate(features)   # [samples, ...], in `blocks` order
    labels = arrays["data"].y[jnp.concatenate(blocks)]
    _, train_count, _, test_count = arrays["tables"][gi]

    def one(args):
      state, trp, trc, tep, tec = args
      views = {name: functools.partial(heads[name], state) for name in names}
      return evaluate_lib.view_metrics(views, z, labels, tep, tec, trp, trc,
                                       loss_view=loss_view)

    return jax.lax.map(one, (states, train_pos, train_count, test_pos, test_count),
                       batch_size=self.eval_chunk_size)

  def _shared_group_metrics(self, hparams, server_state, states, gi):
    """Group ``gi``'s per-client metrics by the shared path, or None where it does not apply
    (no shared views, or a client whose feature extractor is not the shared one: then the
    group is evaluated per client).

    On XLA:CPU the per-client path forwards each client's tables padded to the largest
    client's (2,960 forward passes for digits' 1,797 samples over 20 clients under Dir(0.1));
    here every sample is forwarded once, in blocks of one compiled program, and each client's
    heads are applied to the outputs of its samples.
    """
    shared = self._shared_views(hparams, server_state, states, gi)
    tables = self._shared_group_tables(gi) if shared is not None else None
    if tables is None:
      return None
    if shared.same is not None:
      same = np.asarray(self._shared_same(hparams, server_state, states, gi=gi))
      if not same[: self.groups[gi].size].all():
        return None
    blocks, train_pos, test_pos = tables.blocks, tables.train_pos, tables.test_pos
    features = self._shared_features(hparams, server_state, states, gi, len(blocks))
    self._features_cache.pop(gi, None)  # used: not kept through the next round
    names = tuple(shared.heads)
    loss_view = self._alg(gi, hparams).TRAIN_LOSS_VIEW
    return self._shared_metrics(hparams, server_state, states, features, self.arrays, blocks,
                                train_pos, test_pos, gi=gi, names=names,
                                loss_view=loss_view if loss_view in names else None)

  def _group_metrics(self, hparams, server_state, client_states, root, round_index, final,
                     gi):
    """Per-client metric arrays of group ``gi``'s real clients (host numpy)."""
    g = self.groups[gi]
    states = client_states[g.name]
    shared = None
    if self.shared_eval and self.mesh is None and not final:
      shared = self._shared_group_metrics(hparams, server_state, states, gi)
    if shared is not None:
      parts = [shared]
    elif self.mesh is not None:
      part = self._eval_sharded(hparams, server_state, states, self.arrays, root, round_index,
                                gi=gi, final=final)
      if jax.process_count() > 1:  # other hosts' clients: gather the small metric arrays
        part = multihost_utils.process_allgather(part, tiled=True)
      parts = [part]
    else:
      chunk = 1 if not self.executors[gi].traced else min(self.eval_chunk_size, g.size)
      parts = []
      for start in range(0, g.size, chunk):
        rows = np.arange(start, start + chunk) % g.size  # pad the last chunk
        rows = jnp.asarray(rows[0] if chunk == 1 else rows, jnp.int32)
        parts.append(self._eval_chunk(hparams, server_state, states, self.arrays, rows, root,
                                      round_index, gi=gi, final=final))
    parts = [jax.tree.map(lambda a: np.atleast_1d(np.asarray(a)), p) for p in parts]
    return {k: np.concatenate([p[k] for p in parts])[: g.size] for k in parts[0]}

  def _summarize(self, per_group: list[dict], groups_ids: list, ids: np.ndarray) -> dict:
    """Per-client arrays of every group, placed by client id, reduced over ``ids``."""
    per_client = {}
    for part, gids in zip(per_group, groups_ids):
      for k, v in part.items():
        if k not in per_client:
          per_client[k] = np.zeros((len(ids),) + v.shape[1:], v.dtype)
        per_client[k][np.searchsorted(ids, gids)] = v
    test_count = self._test_count[ids]
    train_count = self._train_count[ids]
    summary = evaluate_lib.summarize(per_client, test_count, train_count)
    with np.errstate(invalid="ignore", divide="ignore"):
      summary["client_test_acc"] = np.where(test_count > 0, per_client["correct"]
                                            / np.maximum(test_count, 1), np.nan)
    return summary

  def evaluate(self, server_state, client_states, root: Optional[jax.Array] = None,
               round_index: int = 0, final: bool = False, hparams=None) -> Optional[dict]:
    """Evaluates every client; returns PFLlib's round metrics plus per-client arrays.

    Clients are evaluated ``eval_chunk_size`` at a time with vmap, or — with the sequential
    executor — one at a time by one compiled per-client program (on XLA:CPU a vmapped forward
    pass ran ~3x slower than the same samples in per-client calls), which forwards only the
    client's own samples, ``eval_block`` at a time, where a view costs at least
    ``eval_block_min_flops`` per sample and maps rows alone (`Algorithm.rowwise_views`;
    `evaluate_lib.blocked_logits`), else its padded tables. A group whose views
    depend on the server state alone (`Algorithm.shared_views`, e.g. FedAvg's global model),
    or are personal heads on the global features (`Algorithm.feature_views`, e.g. FedPer's),
    is evaluated by forwarding every sample once instead (``shared_eval``; not with a mesh,
    not for ``final``). ``root`` and
    ``round_index`` derive the evaluation keys (views that adapt or sample); ``final`` uses the
    algorithm's ``final_views`` (returns None when it has none).
    """
    if final and not has_hook(self.algorithm, "final_views"):
      return None
    root = rng.root_key(0) if root is None else root
    round_index = jnp.asarray(round_index, jnp.int32)
    per_group = [self._group_metrics(hparams or {}, server_state, client_states, root,
                                     round_index, final, gi)
                 for gi in range(len(self.groups))]
    return self._summarize(per_group, [np.asarray(g.ids) for g in self.groups],
                           np.arange(self.num_clients))

  # ------------------------------------------------------------------ new clients
  @property
  def num_new_clients(self) -> int:
    """Clients in the data beyond ``num_clients``: never trained, for new-client evaluation."""
    return self._total_clients - self.num_clients

  def _new_client_fn(self, hparams, server_state, template, arrays, cid, key, gi, epochs):
    self.trace_counts["new_client"] += 1
    alg = self._alg(gi, hparams)
    data = arrays["data"]
    variables = alg.new_client_variables(server_state, template)
    if epochs > 0:
      spec = dataclasses.replace(alg.local, local_epochs=epochs)
      client_data = ClientData(data.x, data.y, data.train_idx[cid], data.train_count[cid])
      if hasattr(alg.model, "base") and has_train_mode(alg.model):
        # PFLlib fine-tunes in train() mode: batch statistics, running statistics updated
        # (not trained by SGD), dropout on.
        variables, _, _ = train_model(alg.model, variables, client_data, key, spec,
                                      cross_entropy_objective)
      else:
        variables, _, _ = train_locally(variables, client_data, key, spec, alg.ce_loss)
    variables = alg.new_client_tested_variables(server_state, template, variables)
    return evaluate_lib.view_metrics(
        {"": functools.partial(alg.model.apply, variables)}, data.x, data.y,
        data.test_idx[cid], data.test_count[cid], data.train_idx[cid], data.train_count[cid])

  def new_client_group(self, cid: int) -> int:
    """The group of a (new) client id: ``model_cycle[id mod K]``, else that of ``id mod N``."""
    if self._model_cycle is not None:
      return self._model_cycle[cid % len(self._model_cycle)]
    return int(self._group_of[cid % self.num_clients])

  def evaluate_new_clients(self, server_state, root: jax.Array, sample_x, epochs: int,
                           hparams=None) -> dict[str, Any]:
    """PFLlib's new-client evaluation (``-nnc``, ``-ften``) of the clients never trained.

    Each new client starts from ``algorithm.new_client_variables`` (the global model, with
    freshly initialised personal parts), is fine-tuned with plain SGD on cross-entropy for
    ``epochs`` epochs over its training split (none when 0) and tested on its test split.
    """
    hparams = hparams or {}
    ids = np.arange(self.num_clients, self.num_clients + self.num_new_clients)
    templates = {}
    parts = []
    for cid in ids:
      gi = self.new_client_group(int(cid))
      if gi not in templates:
        _, fresh = self._alg(gi, hparams).init(self._init_key(root, gi),
                                               jnp.asarray(sample_x), 1)
        templates[gi] = jax.tree.map(lambda a: a[0], fresh)
      parts.append(self._new_client(hparams, server_state, templates[gi], self.arrays,
                                    jnp.int32(cid),
                                    rng.new_client_key(root, int(cid)), gi=gi, epochs=epochs))
    parts = [jax.tree.map(lambda a: np.atleast_1d(np.asarray(a)), p) for p in parts]
    per_client = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return self._summarize([per_client], [ids], ids)

  # ------------------------------------------------------------------ S runs side by side
  def stacked(self) -> "StackedPrograms":
    """Init, round and evaluation vmapped over a leading axis of runs (traced executors)."""
    if not self.executors[0].traced or self.mesh is not None:
      raise ValueError("runs side by side need the vmap or chunked executor on one device")
    if "programs" not in self._stacked:
      self._stacked["programs"] = StackedPrograms(self)
    return self._stacked["programs"]


class _SharedTables(NamedTuple):
  """`Engine._shared_group_tables`: ``blocks`` of sample rows (the first ``train_blocks``
  hold every training sample), clients' ``train_pos``/``test_pos`` among the blocks' rows,
  and ``position`` of every sample row among them (`SampleFeatures.position`)."""
  blocks: list
  train_pos: jax.Array
  test_pos: jax.Array
  train_blocks: int
  position: jax.Array


# The shapes of a client step's statistics (`SlotOutputs`' fields after the upload and weight).
_STEP_STATS = ((jax.ShapeDtypeStruct((), jnp.bool_),) * 3
               + (jax.ShapeDtypeStruct((), jnp.float32),) * 3)


class _SequentialWriter:
  """The sequential executor's view of one group in one round: buffers and the jitted write."""

  def __init__(self, engine: Engine, gi: int, hparams, server_state, arrays, phase: str):
    self.engine, self.gi, self.hparams = engine, gi, hparams
    self.server_state, self.arrays, self.phase = server_state, arrays, phase

  def _shapes(self, states=None):
    """``(upload, stats)`` shapes of one client's step (traced abstractly once per group)."""
    eng, key = self.engine, (self.gi, self.phase)
    cache = eng._step_shapes  # pylint: disable=protected-access
    if key not in cache:
      alg = eng._alg(self.gi, self.hparams)  # pylint: disable=protected-access
      hook = {WARMUP.name: alg.warmup_client, ROUND.name: alg.client_update,
              RECEIVE.name: lambda *args: (alg.receive_client(*args), {})}[self.phase]
      tables, data = self.arrays["tables"][self.gi], self.arrays["data"]
      one = jax.tree.map(lambda a: a[0], states)
      client_data = ClientData(data.x, data.y, tables[0][0], tables[1][0])
      upload = jax.eval_shape(hook, self.server_state, one, client_data, rng.root_key(0))[1]
      cache[key] = upload, _STEP_STATS
    return cache[key]

  def init(self, states, slots, linear):
    upload, stats = self._shapes(states)
    size = slots.rows.shape[0]
    zeros = lambda shape, lead: jnp.zeros(lead + shape.shape, shape.dtype)
    if linear:
      uploads = jax.tree.map(lambda a: zeros(a, ()).astype(jnp.float32), upload)
      weights = jnp.zeros((), jnp.float32)
    else:
      uploads = jax.tree.map(lambda a: zeros(a, (size,)), upload)
      weights = jnp.zeros((size,), jnp.float32)
    return uploads, weights, jax.tree.map(lambda a: zeros(a, (size,)), stats)

  def row(self, states, row):
    """A client's state, read out of the stacked states (on the calling thread)."""
    return self.engine._row(states, row)  # pylint: disable=protected-access

  def _client_args(self, state, slot, row, keys, kept):
    data, tables = self.arrays["data"], self.arrays["tables"][self.gi][:2]
    return (self.hparams, self.server_state, data.x, data.y, state, tables, slot, row, keys,
            kept)

  def train(self, state, slot, row, keys, kept):
    """One client's outputs (`Engine._client_fn`), dispatched from the calling thread."""
    return self.engine._client(*self._client_args(state, slot, row, keys, kept),  # pylint: disable=protected-access
                               gi=self.gi, phase=self.phase)

  def overlappable(self, state, slot, row, keys, kept) -> bool:
    """Whether two clients' trainings may run at once: not where the program calls LAPACK
    (`executors.lapack_calls`: XLA:CPU would wait forever), said once in a warning. Read
    from the lowered program once per group and phase (no compilation)."""
    eng, key = self.engine, (self.gi, self.phase)
    cache = eng._overlappable  # pylint: disable=protected-access
    if key not in cache:
      lowered = eng._client.lower(*self._client_args(state, slot, row, keys, kept),  # pylint: disable=protected-access
                                  gi=self.gi, phase=self.phase)
      calls = executors_lib.lapack_calls(lowered.as_text())
      if calls:
        name = type(eng.groups[self.gi].algorithm).__name__
        warnings.warn(f"{name}'s client program calls LAPACK ({', '.join(calls)}), which "
                      "XLA:CPU cannot run in two programs at once: its clients train one at "
                      "a time (--client-threads 1)", FedJaxWarning, stacklevel=2)
      cache[key] = not calls
    return cache[key]

  def write(self, states, buffers, slot, row, outputs, linear):
    """The outputs written into the (donated) states and buffers."""
    return self.engine._write(states, buffers, slot, row, outputs, linear=linear)  # pylint: disable=protected-access

  def finish(self, buffers, linear) -> SlotOutputs:
    uploads, weights, stats = buffers
    if linear:
      dtypes = tuple(a.dtype.name for a in jax.tree.leaves(self._shapes()[0]))
      uploads, weights = _mean_row(uploads, weights, dtypes)
    return SlotOutputs(uploads, weights, *stats)


@functools.partial(jax.jit, static_argnums=2)
def _mean_row(sums, total, dtypes):
  """`executors.mean_row` as one program; ``dtypes``: the leaves' dtype names, in order."""
  treedef = jax.tree.structure(sums)
  return executors_lib.mean_row(sums, total, jax.tree.unflatten(treedef,
                                                                 [jnp.dtype(d) for d in dtypes]))


class StackedPrograms:
  """An engine's programs vmapped over a leading axis of S runs (one compilation for all).

  Each run has its own root key and hyperparameter values (``{path: [S] array}``); a run whose
  ``running`` flag is False keeps its states unchanged through a round (a stopped run, or one
  resumed at a later round waiting for the others).
  """

  def __init__(self, engine: Engine):
    self.engine = engine

    def round_fn(hparams, server_state, client_states, arrays, root, round_index):
      return engine._round_fn(hparams, server_state, client_states, arrays, root,  # pylint: disable=protected-access
                              round_index, ROUND.name)

    def masked_round(hparams, server_state, client_states, arrays, roots, round_index,
                     running):
      engine.trace_counts["round_stacked"] += 1
      new = jax.vmap(round_fn, in_axes=(0, 0, 0, None, 0, None))(
          hparams, server_state, client_states, arrays, roots, round_index)
      kept = _tree_where(running, new[:2], (server_state, client_states))
      return kept + (new[2],)

    self._round = jax.jit(masked_round, donate_argnums=(1, 2))

    def init(hparams, arrays, roots, sample_x, initial_models):
      def one(hp, root):
        server_state, client_states = engine._init_fn(hp, root, sample_x, initial_models)  # pylint: disable=protected-access
        if has_warmup(engine.algorithm):
          server_state, client_states, _ = engine._round_fn(  # pylint: disable=protected-access
              hp, server_state, client_states, arrays, root, jnp.int32(0), WARMUP.name)
        return server_state, client_states
      return jax.vmap(one)(hparams, roots)

    self._init = jax.jit(init)
    self._eval = {}

  def _eval_program(self, gi: int, final: bool):
    if (gi, final) not in self._eval:
      fn = functools.partial(self.engine._eval_chunk_fn, gi=gi, final=final)  # pylint: disable=protected-access
      self._eval[gi, final] = jax.jit(jax.vmap(fn, in_axes=(0, 0, 0, None, None, 0, 0)))
    return self._eval[gi, final]

  def init(self, hparams, roots, sample_x):
    return self._init(hparams, self.engine.arrays, roots, jnp.asarray(sample_x),
                      self.engine.initial_models)

  def compile(self, hparams, roots, sample_x) -> list:
    """Compiles init, the round and every evaluation ahead of time: ``[(name, Compiled)]``.

    The arguments may be abstract (``jax.ShapeDtypeStruct``); they are shaped as :meth:`init`,
    :meth:`run_round` and :meth:`evaluate` pass them, so those calls find these compilations
    in ``jax.jit``'s cache instead of compiling again (`fedjax_lib.memory` reads their
    ``memory_analysis()`` before the runs start).
    """
    return [(name, lowered.compile()) for name, lowered in self.lower(hparams, roots, sample_x)]

  def lower(self, hparams, roots, sample_x) -> list:
    """Traces and lowers init, the round and every evaluation: ``[(name, Lowered)]``, as
    :meth:`compile` compiles them (nothing is compiled)."""
    return [(name, traced.lower()) for name, traced in self.trace(hparams, roots, sample_x)]

  def trace(self, hparams, roots, sample_x) -> list:
    """Traces init, the round and every evaluation: ``[(name, jax.stages.Traced)]``, as
    :meth:`lower` lowers them (a Python branch on a traced value fails here)."""
    eng, arrays = self.engine, self.engine.arrays
    size = roots.shape[0]
    sample_x = jax.ShapeDtypeStruct(jnp.shape(sample_x), sample_x.dtype)
    models = eng.initial_models
    init = self._init.trace(hparams, arrays, roots, sample_x, models)
    out = [("init", init)]
    server_state, client_states = init.out_info  # the states' shapes, from the one trace
    scalar = lambda dtype, shape=(): jax.ShapeDtypeStruct(shape, dtype)
    out.append(("round", self._round.trace(hparams, server_state, client_states, arrays, roots,
                                           scalar(jnp.int32), scalar(bool, (size,)))))
    finals = (False, True) if has_hook(eng.algorithm, "final_views") else (False,)
    for gi, g in enumerate(eng.groups):
      rows = scalar(jnp.int32, (min(eng.eval_chunk_size, g.size),))
      for final in finals:
        name = ("final evaluation" if final else "evaluation") + (
            f" of {g.name}" if len(eng.groups) > 1 else "")
        out.append((name, self._eval_program(gi, final).trace(
            hparams, server_state, client_states[g.name], arrays, rows, roots,
            scalar(jnp.int32, (size,)))))
    return out

  def run_round(self, hparams, server_state, client_states, roots, round_index, running):
    return self._round(hparams, server_state, client_states, self.engine.arrays, roots,
                       jnp.asarray(round_index, jnp.int32), jnp.asarray(running, bool))

  def evaluate(self, hparams, server_state, client_states, roots, round_index,
               final: bool = False) -> Optional[list[dict]]:
    """Every run's evaluation (as `Engine.evaluate`), one list entry per run; ``round_index``
    is one round for all runs or one per run (the round each run stopped at)."""
    eng = self.engine
    if final and not has_hook(eng.algorithm, "final_views"):
      return None
    size = roots.shape[0]
    round_index = jnp.broadcast_to(jnp.asarray(round_index, jnp.int32), (size,))
    per_group = []
    for gi, g in enumerate(eng.groups):
      chunk = min(eng.eval_chunk_size, g.size)
      parts = []
      for start in range(0, g.size, chunk):
        rows = jnp.asarray(np.arange(start, start + chunk) % g.size, jnp.int32)
        parts.append(self._eval_program(gi, final)(hparams, server_state,
                                                   client_states[g.name], eng.arrays, rows,
                                                   roots, round_index))
      parts = jax.device_get(parts)
      per_group.append([{k: np.concatenate([p[k][s] for p in parts])[: g.size]
                         for k in parts[0]} for s in range(size)])
    ids = [np.asarray(g.ids) for g in eng.groups]
    return [eng._summarize([pg[s] for pg in per_group], ids, np.arange(eng.num_clients))  # pylint: disable=protected-access
            for s in range(size)]


def _first_difference(a, b) -> Optional[str]:
  """The first leaf path where two abstract pytrees differ (structure, shape or dtype)."""
  flat_a = dict(jax.tree_util.tree_flatten_with_path(a)[0])
  flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
  name = lambda path: "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
  for path in list(flat_a) + [p for p in flat_b if p not in flat_a]:
    if path not in flat_a or path not in flat_b:
      return f"{name(path)} (present in one only)"
    x, y = flat_a[path], flat_b[path]
    if x.shape != y.shape or x.dtype != y.dtype:
      return f"{name(path)} ({x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)})"
  return None
