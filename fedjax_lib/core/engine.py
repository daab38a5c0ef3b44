"""The round engine: one implementation of a federated round for every algorithm.

A round, as in PFLlib's server loop (evaluation is separate, see :meth:`Engine.evaluate`):

1. **plan**: seeded client selection (``join_ratio`` or ``random_join_ratio``) and seeded
   drop-outs (``client_drop_rate``) from the round's selection key;
2. **gather** the cohort's slices of the stacked client states and index tables;
3. **train** every selected client at once — ``vmap``, chunked ``lax.map`` or a sequential
   debug loop (executors give the same numbers);
4. **scatter** the new client states back (unselected slots keep theirs);
5. **aggregate**: ``server_update`` with sample-count weights, zero for dropped clients.

The cohort has a static size (``int(N·join_ratio)``, or N with ``random_join_ratio``, whose
unselected slots are masked) so one compiled program serves every round.

**Several devices.** Given a mesh with a ``clients`` axis (:func:`client_mesh`), the stacked
client states and per-client index tables are sharded along it (padded with masked clients to
a multiple of the device count), each device trains its block of the cohort inside
``shard_map`` (XLA's automatic partitioner would replicate vmapped, i.e. grouped, convolutions)
and ``server_update`` aggregates with a weighted ``psum`` (`fedjax_lib.core.aggregate`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjax_lib.core import aggregate
from fedjax_lib.core import evaluate as evaluate_lib
from fedjax_lib.core import rng
from fedjax_lib.core.local import ClientData, train_locally


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
    return cls(*(jnp.asarray(getattr(data, f)) for f in cls._fields))


CLIENTS = "clients"


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
  """Local steps unrolled per loop iteration, chosen from measurements.

  On XLA:CPU a convolution training step inside a ``lax.scan`` loop ran ~6x slower than the
  same steps fully unrolled (experiments/benchmarks/RESULTS.md), so CPU unrolls every step up
  to 128 steps (compile time grows with the step count beyond that). Accelerators keep the loop.
  """
  if backend == "cpu":
    return 0 if num_steps <= 128 else 8
  return 1


def default_executor(backend: str) -> str:
  """The executor ``auto`` resolves to, chosen from measurements.

  On XLA:CPU, vmapping convolutions over per-client kernels lowers them to grouped
  convolutions, which ran ~1.6x slower per client-step than one client's plain convolutions
  (and padded steps of small clients cost as much as real ones), so CPU loops over clients with
  one compiled per-client program. Accelerators vmap the whole cohort in one program.
  See experiments/benchmarks/RESULTS.md.
  """
  return "sequential" if backend == "cpu" else "vmap"


def _tree_where(mask, on_true, on_false):
  def pick(a, b):
    m = mask.reshape(mask.shape + (1,) * (a.ndim - 1))
    return jnp.where(m, a, b)
  return jax.tree.map(pick, on_true, on_false)


def _all_finite(tree) -> jax.Array:
  """Per leading-axis slot: whether every floating-point entry of ``tree`` is finite."""
  flags = [jnp.isfinite(a).reshape(a.shape[0], -1).all(axis=1) for a in jax.tree.leaves(tree)
           if jnp.issubdtype(a.dtype, jnp.inexact)]
  return functools.reduce(jnp.logical_and, flags) if flags else True


def _round_metrics(plan: RoundPlan, slots) -> dict:
  """A round's metrics from the per-slot ``(active, kept, nonfinite, loss)`` after masking;
  ``num_selected`` counts the plan's selection before non-finite clients were dropped."""
  active, kept, nonfinite, loss = slots
  return {
      "nonfinite": jnp.where(nonfinite, plan.cohort, -1),
      "num_nonfinite": nonfinite.sum(),
      "num_selected": plan.active.sum(),
      "num_aggregated": kept.sum(),
      "local_loss": loss.sum() / jnp.maximum(active.sum(), 1),
  }


def _gather(tree, ids):
  return jax.tree.map(lambda a: jnp.take(a, ids, axis=0, mode="clip"), tree)


class Engine:
  """Runs rounds and evaluations of one algorithm on one federated dataset.

  Args:
    algorithm: an `fedjax_lib.algorithms.Algorithm`.
    data: the federated arrays on the device.
    participation: selection and drop-out settings.
    executor: ``vmap`` | ``chunked`` | ``sequential``.
    chunk_size: clients per ``lax.map`` chunk for ``chunked``.
    eval_chunk_size: clients evaluated per compiled call.
    skip_nonfinite: drop the updates of clients whose upload, new state or loss is not finite
      (they are not aggregated and keep their previous state); otherwise they are only
      reported (``round_metrics["nonfinite"]``) and the caller decides.
  """

  def __init__(self, algorithm, data: DeviceData, participation: Participation,
               executor: str = "vmap", chunk_size: int = 8, eval_chunk_size: int = 64,
               skip_nonfinite: bool = False, mesh: Optional[Mesh] = None):
    if executor not in ("vmap", "chunked", "sequential"):
      raise ValueError(f"unknown executor {executor!r}")
    if mesh is not None and executor == "sequential":
      raise ValueError("the sequential executor runs on one device; shard with vmap or chunked")
    self.algorithm = algorithm
    self.participation = participation
    self.executor = executor
    self.chunk_size = chunk_size
    self.skip_nonfinite = skip_nonfinite
    self.num_clients = participation.num_clients
    self.eval_chunk_size = min(eval_chunk_size, self.num_clients)
    # Host copies of the counts (a sharded array may not be readable from every process).
    self._train_count = np.asarray(data.train_count)
    self._test_count = np.asarray(data.test_count)
    self._total_clients = int(self._train_count.shape[0])
    self.mesh = mesh
    self.num_shards = 1 if mesh is None else int(mesh.shape[CLIENTS])
    # Rows of the stacked client states: N, padded to a multiple of the device count.
    self.padded_clients = _round_up(self.num_clients, self.num_shards)
    # The cohort is all N clients (masked) whenever its size is N: trained in place, no gather.
    self._in_place = mesh is not None and participation.cohort_size == self.num_clients
    self.cohort_slots = (self.padded_clients if self._in_place
                         else _round_up(participation.cohort_size, self.num_shards))
    self.data = data if mesh is None else self._shard_data(data)
    # Incremented while tracing: a compile counter for tests and a guard against retracing.
    self.trace_counts: collections.Counter = collections.Counter()
    self._round = jax.jit(self._round_impl, donate_argnums=(0, 1))
    self._plan = jax.jit(self._plan_impl)
    self._train_one = jax.jit(self._train_one_impl)
    self._output_shapes = None
    self._plan_only = jax.jit(self._plan_only_impl)
    self._train_write = jax.jit(self._train_write_impl, donate_argnums=(1, 2))
    self._finish_sequential = jax.jit(self._finish_sequential_impl, donate_argnums=(0, 1))
    self._eval_chunk = jax.jit(self._eval_chunk_impl, static_argnames=("final",))
    self._eval_sharded = jax.jit(self._eval_sharded_impl, static_argnames=("final",))
    if mesh is not None:
      self._export = jax.jit(self._export_impl, out_shardings=NamedSharding(mesh, P()))
    self._warmup_one = jax.jit(self._warmup_one_impl)
    self._warmup_all = jax.jit(self._warmup_all_impl)
    self._warmup_finish = jax.jit(self._warmup_finish_impl)
    self._new_client = jax.jit(self._new_client_impl, static_argnames=("epochs",))

  # ------------------------------------------------------------------ pieces
  def _plan_impl(self, client_states, data, root, round_index):
    rkey = rng.round_key(root, round_index)
    plan = plan_round(rkey, self.participation)
    if self.mesh is not None:
      plan = self._pad_plan(plan)
    keys = jax.vmap(rng.client_key, (None, 0))(rkey, plan.cohort)
    if self._in_place:
      return plan, client_states, keys
    return plan, _gather(client_states, plan.cohort), keys

  # ------------------------------------------------------------------ sharding
  def _shard_data(self, data: DeviceData) -> DeviceData:
    """Samples replicated on every device; index tables padded and sharded along clients."""
    rows = _round_up(self._total_clients, self.num_shards)
    replicated = NamedSharding(self.mesh, P())
    sharded = NamedSharding(self.mesh, P(CLIENTS))

    def table(a):
      a = np.asarray(a)
      pad = np.zeros((rows - a.shape[0],) + a.shape[1:], a.dtype)
      return _put(np.concatenate([a, pad]), sharded)

    return DeviceData(_put(data.x, replicated), _put(data.y, replicated),
                      table(data.train_idx), table(data.train_count),
                      table(data.test_idx), table(data.test_count))

  def _pad_plan(self, plan: RoundPlan) -> RoundPlan:
    """The plan over ``cohort_slots`` slots: masked padding, or every row in place.

    In place (cohort of all N clients) slot i is client i and the selection becomes masks.
    Otherwise the extra slots get the out-of-range id ``padded_clients``: gathers clip it,
    the scatter drops it, and the slot is neither active nor aggregated.
    """
    if self._in_place:
      rows = self.padded_clients
      active = jnp.zeros(rows, bool).at[plan.cohort].set(plan.active)
      kept = jnp.zeros(rows, bool).at[plan.cohort].set(plan.kept)
      return RoundPlan(jnp.arange(rows, dtype=jnp.int32), active, kept)
    pad = self.cohort_slots - plan.cohort.shape[0]
    return RoundPlan(
        jnp.concatenate([plan.cohort, jnp.full((pad,), self.padded_clients, jnp.int32)]),
        jnp.concatenate([plan.active, jnp.zeros(pad, bool)]),
        jnp.concatenate([plan.kept, jnp.zeros(pad, bool)]))

  def _shard_clients(self, fn, replicated, sharded, out_replicated):
    """``fn(*replicated, *sharded)`` per device on its block of the client axis (shard_map).

    ``out_replicated`` is a pytree prefix of booleans for ``fn``'s output: True for outputs
    equal on every device (e.g. reduced with ``psum``), False for per-client outputs.
    """
    specs = lambda tree, spec: jax.tree.map(lambda _: spec, tree)
    in_specs = (specs(replicated, P()), specs(sharded, P(CLIENTS)))
    out_specs = jax.tree.map(lambda r: P() if r else P(CLIENTS), out_replicated)

    def body(rep, shd):
      with aggregate.client_axis(CLIENTS):
        return fn(*rep, *shd)

    # check_vma=False: algorithm code (scan carries that start from replicated server
    # parameters) need not annotate device-varying values; replicated outputs are psum'd.
    return jax.shard_map(body, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)(
        tuple(replicated), tuple(sharded))

  def place_states(self, client_states):
    """N stacked client states → the engine's layout (padded rows, sharded on a mesh)."""
    if self.mesh is None:
      return client_states
    sharding = NamedSharding(self.mesh, P(CLIENTS))

    def pad(a):
      a = np.asarray(a)
      extra = np.take(a, np.arange(self.padded_clients - a.shape[0]) % a.shape[0], axis=0)
      return _put(np.concatenate([a, extra]), sharding)

    return jax.tree.map(pad, client_states)

  def place(self, server_state, client_states):
    """States as checkpointed (N clients) → the engine's layout and shardings."""
    if self.mesh is None:
      return server_state, client_states
    replicated = NamedSharding(self.mesh, P())
    server_state = jax.tree.map(lambda a: _put(a, replicated), server_state)
    return server_state, self.place_states(client_states)

  def export_states(self, client_states):
    """The engine's layout → the N real clients' stacked states (for checkpoints, users).

    On a mesh the result is replicated, so every process can read (and Orbax write) it.
    """
    if self.mesh is None:
      return client_states
    return self._export(client_states)

  def _export_impl(self, client_states):
    return jax.tree.map(lambda a: a[: self.num_clients], client_states)

  def _train_one_impl(self, server_state, client_state, x, y, train_idx, train_count, key):
    self.trace_counts["client_update"] += 1
    client_data = ClientData(x, y, train_idx, train_count)
    return self.algorithm.client_update(server_state, client_state, client_data, key)

  def _warmup_one_impl(self, server_state, client_state, x, y, train_idx, train_count, key):
    self.trace_counts["warmup"] += 1
    client_data = ClientData(x, y, train_idx, train_count)
    return self.algorithm.warmup_client(server_state, client_state, client_data, key)

  def _map_clients(self, fn, server_state, states, data, idx, count, keys):
    """``fn`` over stacked clients with the vmap or chunked executor (traced, one device)."""
    def one(args):
      state, i, c, key = args
      return fn(server_state, state, data.x, data.y, i, c, key)
    args = (states, idx, count, keys)
    if self.executor == "vmap":
      return jax.vmap(one)(args)
    return jax.lax.map(one, args, batch_size=self.chunk_size)

  def _update(self, server_state, cohort_states, outputs, plan, counts, skey):
    """Masks the cohort's outputs and aggregates them: ``server_update`` (traced).

    Runs on the whole cohort, or per device inside ``shard_map`` where the weighted averages
    of ``server_update`` complete with a ``psum``.
    """
    new_states, uploads, metrics = outputs
    nonfinite = plan.active & ~_all_finite((new_states, uploads, metrics.get("loss")))
    server_state, slots = self._aggregate(server_state, uploads, metrics, nonfinite, plan,
                                          counts, skey)
    new_states = _tree_where(slots[0], new_states, cohort_states)
    return server_state, new_states, slots

  def _aggregate(self, server_state, uploads, metrics, nonfinite, plan, counts, skey,
                 update=True):
    """``server_update`` with sample-count weights of the kept, finite slots (traced);
    ``update=False`` only masks the per-slot metrics."""
    if self.skip_nonfinite:  # their updates are neither aggregated nor kept
      plan = RoundPlan(plan.cohort, plan.active & ~nonfinite, plan.kept & ~nonfinite)
    if update:
      if self.skip_nonfinite:
        uploads = _tree_where(nonfinite, jax.tree.map(jnp.zeros_like, uploads), uploads)
      weights = jnp.where(plan.kept, counts.astype(jnp.float32), 0.0)
      server_state = self.algorithm.server_update(server_state, uploads, weights, skey)
    loss = jnp.where(plan.active, metrics.get("loss", jnp.zeros(plan.active.shape)), 0.0)
    return server_state, (plan.active, plan.kept, nonfinite, loss)

  def _scatter(self, client_states, plan, new_states, slots):
    """Writes the cohort's states back and reduces the per-slot round metrics."""
    if self._in_place:
      client_states = new_states
    else:
      client_states = jax.tree.map(lambda all_, new: all_.at[plan.cohort].set(new, mode="drop"),
                                   client_states, new_states)
    return client_states, _round_metrics(plan, slots)

  def _finish_impl(self, server_state, client_states, data, plan, cohort_states, new_states,
                   uploads, metrics, root, round_index):
    skey = rng.server_key(rng.round_key(root, round_index))
    counts = data.train_count[plan.cohort]
    server_state, new_states, slots = self._update(
        server_state, cohort_states, (new_states, uploads, metrics), plan, counts, skey)
    client_states, round_metrics = self._scatter(client_states, plan, new_states, slots)
    return server_state, client_states, round_metrics

  def _round_impl(self, server_state, client_states, data, root, round_index):
    self.trace_counts["round"] += 1
    plan, cohort_states, keys = self._plan_impl(client_states, data, root, round_index)
    if self.mesh is None:
      outputs = self._map_clients(self._train_one_impl, server_state, cohort_states, data,
                                  data.train_idx[plan.cohort], data.train_count[plan.cohort],
                                  keys)
      return self._finish_impl(server_state, client_states, data, plan, cohort_states,
                               *outputs, root, round_index)
    skey = rng.server_key(rng.round_key(root, round_index))
    take = lambda a: jnp.take(a, plan.cohort, axis=0, mode="clip")
    idx, counts = take(data.train_idx), take(data.train_count)

    def per_device(server_state, local, skey, cohort_states, plan, idx, counts, keys):
      outputs = self._map_clients(self._train_one_impl, server_state, cohort_states, local,
                                  idx, counts, keys)
      return self._update(server_state, cohort_states, outputs, plan, counts, skey)

    server_state, new_states, slots = self._shard_clients(
        per_device, (server_state, data, skey),
        (cohort_states, plan, idx, counts, keys), out_replicated=(True, False, False))
    client_states, round_metrics = self._scatter(client_states, plan, new_states, slots)
    # Fixed layouts in and out, so every round reuses the first round's program.
    return (self._constrain(server_state, P()), self._constrain(client_states, P(CLIENTS)),
            self._constrain(round_metrics, P()))

  def _constrain(self, tree, spec):
    sharding = NamedSharding(self.mesh, spec)
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, sharding), tree)

  # ------------------------------------------------------------------ public
  def init(self, root: jax.Array, sample_x):
    """``(server_state, client_states)`` from the run's root key.

    For an algorithm with an initialisation period (``HAS_WARMUP``), every client runs
    ``warmup_client`` once and the server ``warmup_server`` with sample-count weights.
    """
    server_state, client_states = self.algorithm.init(rng.init_key(root), jnp.asarray(sample_x),
                                                      self.num_clients)
    server_state, client_states = self.place(server_state, client_states)
    if not self.algorithm.HAS_WARMUP:
      return server_state, client_states
    ids = jnp.arange(self.num_clients, dtype=jnp.int32)
    wkey = rng.warmup_key(root)
    if self.executor != "sequential":
      return self._warmup_all(server_state, client_states, self.data, wkey)
    outputs = []
    for cid in range(self.num_clients):
      state = jax.tree.map(lambda a: a[cid], client_states)  # pylint: disable=cell-var-from-loop
      outputs.append(self._warmup_one(server_state, state, self.data.x, self.data.y,
                                      self.data.train_idx[cid], self.data.train_count[cid],
                                      rng.client_key(wkey, cid)))
    new_states, uploads = jax.tree.map(lambda *xs: jnp.stack(xs), *outputs)
    return self._warmup_finish(server_state, new_states, uploads, self.data, ids, wkey)

  def _warmup_all_impl(self, server_state, client_states, data, wkey):
    rows = self.padded_clients
    ids = jnp.arange(rows, dtype=jnp.int32)
    keys = jax.vmap(rng.client_key, (None, 0))(wkey, ids)
    # Padding rows (id >= N) warm up on a real client's data and get zero weight.
    data_ids = ids % self.num_clients
    idx, counts = data.train_idx[data_ids], data.train_count[data_ids]
    weights = jnp.where(ids < self.num_clients, counts.astype(jnp.float32), 0.0)
    skey = rng.server_key(wkey)

    def warm(server_state, data, skey, states, idx, counts, keys, weights):
      new_states, uploads = self._map_clients(self._warmup_one_impl, server_state, states,
                                              data, idx, counts, keys)
      return self.algorithm.warmup_server(server_state, uploads, weights, skey), new_states

    if self.mesh is None:
      return warm(server_state, data, skey, client_states, idx, counts, keys, weights)
    return self._shard_clients(warm, (server_state, data, skey),
                               (client_states, idx, counts, keys, weights),
                               out_replicated=(True, False))

  def _warmup_finish_impl(self, server_state, client_states, uploads, data, ids, wkey):
    weights = data.train_count[ids].astype(jnp.float32)
    server_state = self.algorithm.warmup_server(server_state, uploads, weights,
                                                rng.server_key(wkey))
    return server_state, client_states

  def run_round(self, server_state, client_states, root: jax.Array, round_index: int):
    """One round of training and aggregation; returns the new states and round metrics.

    The input states are donated (their buffers may be reused): use the returned ones.
    """
    round_index = jnp.asarray(round_index, jnp.int32)
    if self.executor != "sequential":
      return self._round(server_state, client_states, self.data, root, round_index)
    return self._sequential_round(server_state, client_states, root, round_index)

  def _sequential_round(self, server_state, client_states, root, round_index):
    """A Python loop over the selected clients, each running one compiled client update.

    Memory: each client's new state is written into the (donated) stacked states in place,
    so a round holds the client states once — no gathered copy of the cohort, no list of
    outputs. Uploads go into one preallocated ``[K, ...]`` buffer, or, for an algorithm with
    ``LINEAR_AGGREGATION``, into a running weighted sum (the memory of one upload). The
    per-client program is compiled once; selection and aggregation are the same functions the
    other executors use, so the numbers agree (to float rounding for the running sum).
    """
    data = self.data
    plan, keys = self._plan_only(root, round_index)
    active = np.asarray(plan.active)
    cohort = np.asarray(plan.cohort)
    size = len(cohort)
    first = int(np.flatnonzero(active)[0])
    if self._output_shapes is None:  # (upload, metrics) of one client; traced once per engine
      self._output_shapes = jax.eval_shape(
          self.algorithm.client_update, server_state,
          jax.tree.map(lambda a: a[0], client_states), self._client_data(data, 0),
          keys[first])[1:]
    upload_shape, metric_shape = self._output_shapes
    linear = self.algorithm.LINEAR_AGGREGATION
    zeros = lambda shape, lead: jnp.zeros(lead + shape.shape, shape.dtype)
    uploads = jax.tree.map(
        lambda a: zeros(a, ()).astype(jnp.float32) if linear else zeros(a, (size,)),
        upload_shape)
    outputs = (uploads, jnp.zeros((), jnp.float32),
               jax.tree.map(lambda a: zeros(a, (size,)), metric_shape), jnp.zeros(size, bool))
    for k in np.flatnonzero(active):
      client_states, outputs = self._train_write(
          server_state, client_states, outputs, data.x, data.y, data.train_idx,
          data.train_count, plan.kept, jnp.int32(cohort[k]), jnp.int32(k), keys[k])
    return self._finish_sequential(server_state, client_states, outputs, data.train_count,
                                   plan, root, round_index)

  def _plan_only_impl(self, root, round_index):
    rkey = rng.round_key(root, round_index)
    plan = plan_round(rkey, self.participation)
    return plan, jax.vmap(rng.client_key, (None, 0))(rkey, plan.cohort)

  def _train_write_impl(self, server_state, client_states, outputs, x, y, train_idx,
                        train_count, kept, cid, slot, key):
    """Trains client ``cid``; writes its new state (row cid) and its outputs (slot)."""
    uploads, weight_sum, metrics, nonfinite = outputs
    state = jax.tree.map(lambda a: a[cid], client_states)
    new_state, upload, m = self._train_one_impl(server_state, state, x, y, train_idx[cid],
                                                train_count[cid], key)
    bad = ~_all_finite(jax.tree.map(lambda a: a[None], (new_state, upload, m.get("loss"))))
    bad = bad.reshape(())
    if self.skip_nonfinite:  # a non-finite update is neither kept nor aggregated
      new_state = jax.tree.map(lambda n, o: jnp.where(bad, o, n), new_state, state)
    put = lambda buf, row: jax.tree.map(lambda b, r: b.at[slot].set(r), buf, row)
    if self.algorithm.LINEAR_AGGREGATION:
      w = jnp.where(kept[slot], train_count[cid].astype(jnp.float32), 0.0)
      if self.skip_nonfinite:
        w = jnp.where(bad, 0.0, w)
        upload = jax.tree.map(lambda u: jnp.where(bad, jnp.zeros_like(u), u), upload)
      uploads = jax.tree.map(lambda acc, u: acc + w * u.astype(jnp.float32), uploads, upload)
      weight_sum = weight_sum + w
    else:
      uploads = put(uploads, upload)
    client_states = jax.tree.map(lambda a, r: a.at[cid].set(r), client_states, new_state)
    return client_states, (uploads, weight_sum, put(metrics, m), nonfinite.at[slot].set(bad))

  def _finish_sequential_impl(self, server_state, client_states, outputs, train_count, plan,
                              root, round_index):
    uploads, weight_sum, metrics, nonfinite = outputs
    skey = rng.server_key(rng.round_key(root, round_index))
    counts = train_count[plan.cohort]
    if self.algorithm.LINEAR_AGGREGATION:
      # One slot holding the weighted mean, with the total weight: server_update's weighted
      # average of it is the cohort's weighted average.
      mean = jax.tree.map(lambda acc, shape: (acc / jnp.maximum(weight_sum, 1e-30)).astype(
          shape.dtype)[None], uploads, self._output_shapes[0])
      _, slots = self._aggregate(server_state, None, metrics, nonfinite, plan, counts, skey,
                                 update=False)
      server_state = self.algorithm.server_update(server_state, mean, weight_sum[None], skey)
    else:
      server_state, slots = self._aggregate(server_state, uploads, metrics, nonfinite, plan,
                                            counts, skey)
    return server_state, client_states, _round_metrics(plan, slots)

  @staticmethod
  def _client_data(data, cid):
    return ClientData(data.x, data.y, data.train_idx[cid], data.train_count[cid])

  @staticmethod
  def _metrics(views, data, cid):
    return evaluate_lib.view_metrics(views, data.x, data.y, data.test_idx[cid],
                                     data.test_count[cid], data.train_idx[cid],
                                     data.train_count[cid])

  def _eval_client(self, server_state, state, data, cid, rkey, final):
    hook = self.algorithm.final_views if final else self.algorithm.eval_views
    views = hook(server_state, state, self._client_data(data, cid), rng.eval_key(rkey, cid))
    return self._metrics(views, data, cid)

  def _eval_chunk_impl(self, server_state, client_states, data, ids, root, round_index, final):
    self.trace_counts["evaluate"] += 1
    rkey = rng.round_key(root, round_index)
    if self.executor == "sequential":  # ids is one client id
      return self._eval_client(server_state, jax.tree.map(lambda a: a[ids], client_states),
                               data, ids, rkey, final)
    fn = functools.partial(self._eval_client, server_state, data=data, rkey=rkey, final=final)
    return jax.vmap(fn)(_gather(client_states, ids), cid=ids)

  def _eval_sharded_impl(self, server_state, client_states, data, root, round_index, final):
    """Every row of the sharded client states, evaluated where it lives (chunked per device)."""
    self.trace_counts["evaluate"] += 1
    rkey = rng.round_key(root, round_index)
    ids = jnp.arange(self.padded_clients, dtype=jnp.int32)

    def per_device(server_state, local, rkey, states, ids):
      one = lambda args: self._eval_client(server_state, args[0], local, args[1], rkey, final)
      return jax.lax.map(one, (states, ids), batch_size=self.eval_chunk_size)

    # Index tables are small: replicated here so a client's test samples can be gathered.
    return self._shard_clients(per_device, (server_state, data, rkey), (client_states, ids),
                               out_replicated=False)

  def _collect(self, parts, ids):
    """Concatenates per-chunk metrics and reduces them over the clients ``ids``."""
    parts = [jax.tree.map(jnp.atleast_1d, p) for p in parts]
    per_client = {k: np.concatenate([np.asarray(p[k]) for p in parts])[: len(ids)]
                  for k in parts[0]}
    test_count = self._test_count[ids]
    train_count = self._train_count[ids]
    summary = evaluate_lib.summarize(per_client, test_count, train_count)
    with np.errstate(invalid="ignore", divide="ignore"):
      summary["client_test_acc"] = np.where(test_count > 0, per_client["correct"]
                                            / np.maximum(test_count, 1), np.nan)
    return summary

  def evaluate(self, server_state, client_states, root: Optional[jax.Array] = None,
               round_index: int = 0, final: bool = False) -> dict[str, Any]:
    """Evaluates every client; returns PFLlib's round metrics plus per-client arrays.

    Clients are evaluated ``eval_chunk_size`` at a time with vmap, or — with the sequential
    executor — one at a time by one compiled per-client program (on XLA:CPU a vmapped forward
    pass ran ~3x slower than the same samples in per-client calls). ``root`` and
    ``round_index`` derive the evaluation keys (views that adapt or sample); ``final`` uses the
    algorithm's ``final_views`` (returns None when it has none).
    """
    if final and not self.algorithm.HAS_FINAL_EVAL:
      return None
    root = rng.root_key(0) if root is None else root
    round_index = jnp.asarray(round_index, jnp.int32)
    if self.mesh is not None:
      part = self._eval_sharded(server_state, client_states, self.data, root, round_index,
                                final=final)
      if jax.process_count() > 1:  # other hosts' clients: gather the small metric arrays
        part = multihost_utils.process_allgather(part, tiled=True)
      parts = [part]
      return self._collect(parts, np.arange(self.num_clients))
    chunk = 1 if self.executor == "sequential" else self.eval_chunk_size
    parts = []
    for start in range(0, self.num_clients, chunk):
      ids = np.arange(start, start + chunk) % self.num_clients  # pad the last chunk
      ids = jnp.asarray(ids[0] if chunk == 1 else ids, jnp.int32)
      parts.append(self._eval_chunk(server_state, client_states, self.data, ids, root,
                                    round_index, final=final))
    return self._collect(parts, np.arange(self.num_clients))

  @property
  def num_new_clients(self) -> int:
    """Clients in the data beyond ``num_clients``: never trained, for new-client evaluation."""
    return self._total_clients - self.num_clients

  def _new_client_impl(self, server_state, template, data, cid, key, epochs):
    self.trace_counts["new_client"] += 1
    variables = self.algorithm.new_client_variables(server_state, template)
    if epochs > 0:
      spec = dataclasses.replace(self.algorithm.local, local_epochs=epochs)
      variables, _, _ = train_locally(variables, self._client_data(data, cid), key, spec,
                                      self.algorithm.ce_loss)
    return self._metrics({"": functools.partial(self.algorithm.model.apply, variables)},
                         data, cid)

  def evaluate_new_clients(self, server_state, root: jax.Array, sample_x,
                           epochs: int) -> dict[str, Any]:
    """PFLlib's new-client evaluation (``-nnc``, ``-ften``) of the clients never trained.

    Each new client starts from ``algorithm.new_client_variables`` (the global model, with
    freshly initialised personal parts), is fine-tuned with plain SGD on cross-entropy for
    ``epochs`` epochs over its training split (none when 0) and tested on its test split.
    """
    ids = np.arange(self.num_clients, self.num_clients + self.num_new_clients)
    _, fresh = self.algorithm.init(rng.init_key(root), jnp.asarray(sample_x), 1)
    template = jax.tree.map(lambda a: a[0], fresh)
    parts = [self._new_client(server_state, template, self.data, jnp.int32(cid),
                              rng.new_client_key(root, int(cid)), epochs=epochs)
             for cid in ids]
    return self._collect(parts, ids)
