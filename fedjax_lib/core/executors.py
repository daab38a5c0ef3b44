"""Executors: how the clients of one architecture group are iterated, behind one interface.

A round (`fedjax_lib.core.engine`) is written once; for every architecture group it calls
``executor.train(...)``, and the executor decides how that group's cohort slots run:

=============  ============================================================================
``vmap``       one program for the whole group: ``jax.vmap`` over the slots (accelerators)
``chunked``    ``lax.map`` over the slots, ``chunk_size`` clients vmapped at a time (memory;
               a linear server's uploads are summed chunk by chunk, not held for every slot)
``sequential`` a host loop over the selected clients, one compiled per-client program,
               each client's new state written into the donated stacked states in place
               (XLA:CPU, where per-client programs beat grouped convolutions); with
               ``threads`` > 1, that many clients trained at once on host threads
=============  ============================================================================

``vmap`` and ``chunked`` are traced: the whole round (plan, every group, aggregation) is one
jitted program (:meth:`Executor.stage`). ``sequential`` stages the round as a host loop around
small jitted pieces. They are interchangeable and tested to agree (fedjax's
``ForEachClientBackend`` idea), and none of them knows what an algorithm does: each runs the
engine's per-client step, which already masks inactive, dropped and non-finite clients.

Every ``train`` returns the group's new stacked states and a :class:`SlotOutputs`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import re
import threading
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

CLIENTS = "clients"


class GroupSlots(NamedTuple):
  """The cohort slots of one architecture group in one round (static length S).

  ``rows`` index the group's stacked states (a padding slot has an out-of-range row: gathers
  clip it, scatters drop it); ``ids`` are global client ids (keys derive from them).
  """
  rows: jax.Array
  ids: jax.Array
  active: jax.Array   # selected this round
  kept: jax.Array     # selected and not dropped: aggregated


class SlotOutputs(NamedTuple):
  """What a group's training hands to the aggregation.

  ``uploads``/``weights`` are stacked over the group's slots, except for a linear server on
  the sequential or chunked executor, which gets one row: the weighted mean with the total
  weight (`mean_row`; one row per device under a mesh).
  The per-slot statistics are always over the S slots; ``upload_floats``/``upload_bytes``
  are what each slot's upload puts on the network (`Algorithm.upload_traffic`).
  """
  uploads: Any
  weights: jax.Array
  active: jax.Array
  kept: jax.Array
  nonfinite: jax.Array
  loss: jax.Array
  upload_floats: jax.Array
  upload_bytes: jax.Array


def gather(tree, rows):
  return jax.tree.map(lambda a: jnp.take(a, rows, axis=0, mode="clip"), tree)


def scatter(tree, rows, new):
  return jax.tree.map(lambda a, n: a.at[rows].set(n, mode="drop"), tree, new)


@dataclasses.dataclass(frozen=True)
class GroupProgram:
  """What an executor needs of the engine to train one group in one round.

  ``step(shared, per_slot) -> (new_state, upload, weight, stats)`` runs ONE client (traced):
  ``shared`` is the same for every client (server state, samples, swept values), ``per_slot``
  is ``(state, train_idx, train_count, key, active, kept, client_id)``; ``stats`` is
  ``(active, kept, nonfinite, loss)`` after masking. ``write`` is the sequential executor's
  per-client program (a `fedjax_lib.core.engine` object with ``init``/``__call__``/``finish``).
  """
  step: Callable
  shared: Any
  tables: Any            # (train_idx, train_count) of the group's rows
  in_place: bool         # the slots are the group's rows (no gather / scatter)
  mesh: Any = None
  write: Any = None


class Executor:
  """Iterates a group's slots. Subclasses implement ``map`` (traced) or :meth:`train`."""

  name: str = ""
  #: The whole round is traced into one jitted program.
  traced: bool = True

  def stage(self, round_fn: Callable, donate: tuple[int, ...]) -> Callable:
    """The round as it is called: one jitted program, or (sequential) a host function."""
    return jax.jit(round_fn, donate_argnums=donate) if self.traced else round_fn

  #: With a linear server, :meth:`map_linear` sums the uploads as they are made.
  streams_linear: bool = False

  def map(self, fn: Callable, per_slot):
    raise NotImplementedError

  def map_linear(self, fn: Callable, per_slot):
    """Like :meth:`map`, for a linear server: the uploads and weights come back as one row,
    the weighted mean and the total weight (`mean_row`), instead of one row per slot."""
    raise NotImplementedError

  def train(self, program: GroupProgram, states, slots: GroupSlots, keys, linear: bool):
    """Trains the group's slots; returns ``(states, SlotOutputs)``."""
    train_idx, train_count = program.tables
    if program.in_place:
      per_slot = (states, train_idx, train_count, keys, slots.active, slots.kept, slots.ids)
    else:
      per_slot = (gather(states, slots.rows), *gather((train_idx, train_count), slots.rows),
                  keys, slots.active, slots.kept, slots.ids)
    mapper = self.map_linear if linear and self.streams_linear else self.map
    run = lambda shared, per_slot: mapper(lambda args: program.step(shared, args), per_slot)
    if program.mesh is None:
      new_states, uploads, weights, stats = run(program.shared, per_slot)
    else:
      # Each device trains its block of slots (XLA's partitioner would replicate vmapped,
      # i.e. grouped, convolutions). The outputs are per slot, so no value crosses devices
      # here; the server update runs outside, on global arrays. check_vma=False: algorithm
      # code (scan carries starting from replicated server parameters) need not annotate
      # device-varying values; every output is per slot.
      replicated = jax.tree.map(lambda _: P(), program.shared)
      sharded = jax.tree.map(lambda _: P(CLIENTS), per_slot)
      new_states, uploads, weights, stats = jax.shard_map(
          run, mesh=program.mesh, in_specs=(replicated, sharded), out_specs=P(CLIENTS),
          check_vma=False)(program.shared, per_slot)
    states = new_states if program.in_place else scatter(states, slots.rows, new_states)
    return states, SlotOutputs(uploads, weights, *stats)


class VmapExecutor(Executor):
  name = "vmap"

  def map(self, fn, per_slot):
    return jax.vmap(lambda args: fn(args))(per_slot)


@dataclasses.dataclass(frozen=True)
class ChunkedExecutor(Executor):
  chunk_size: int = 8
  name = "chunked"

  streams_linear = True

  def map(self, fn, per_slot):
    return jax.lax.map(fn, per_slot, batch_size=self.chunk_size)

  def map_linear(self, fn, per_slot):
    """``lax.map``'s chunks (a scan over whole chunks, then the remainder), each chunk's
    weighted uploads added to a float32 running sum: the round holds one chunk's uploads
    instead of every slot's (500 clients of the Cifar-100 CNN: 3.7 MB against 1.85 GB)."""
    n = jax.tree.leaves(per_slot)[0].shape[0]
    whole, rest = divmod(n, self.chunk_size)
    vfn = jax.vmap(fn)
    upload_shapes = jax.eval_shape(vfn, jax.tree.map(lambda a: a[:1], per_slot))[1]
    sums = jax.tree.map(lambda a: jnp.zeros(a.shape[1:], jnp.float32), upload_shapes)
    total = jnp.zeros((), jnp.float32)

    def add(carry, upload, weight):
      sums, total = carry
      kept = weight > 0  # a slot of weight 0 adds nothing, whatever its upload holds

      def leaf(acc, u):
        u = jnp.where(kept.reshape((-1,) + (1,) * (u.ndim - 1)), u.astype(jnp.float32), 0.0)
        return acc + jnp.tensordot(weight, u, axes=1)

      return jax.tree.map(leaf, sums, upload), total + weight.sum()

    def body(carry, chunk):
      new_state, upload, weight, stats = vfn(chunk)
      return add(carry, upload, weight), (new_state, stats)

    parts = []
    carry = (sums, total)
    if whole:
      chunks = jax.tree.map(
          lambda a: a[:whole * self.chunk_size].reshape(whole, self.chunk_size, *a.shape[1:]),
          per_slot)
      carry, out = jax.lax.scan(body, carry, chunks)
      parts.append(jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), out))
    if rest:
      carry, out = body(carry, jax.tree.map(lambda a: a[whole * self.chunk_size:], per_slot))
      parts.append(out)
    new_states, stats = (parts[0] if len(parts) == 1 else
                         jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts))
    uploads, total = mean_row(*carry, jax.tree.map(lambda a: a.dtype, upload_shapes))
    return new_states, uploads, total, stats


@dataclasses.dataclass(frozen=True)
class SequentialExecutor(Executor):
  """A host loop over the selected clients, one compiled per-client program.

  Memory: each client's new state is written into the (donated) stacked states in place, so
  a round holds the client states once. Uploads go into one preallocated ``[S, ...]`` buffer,
  or, for a linear server, into a running weighted sum (the memory of one upload).

  Each client is three programs: its state row read out of the stacked states, its training
  (which reads nothing else of them), and the write of its outputs into the states and the
  buffers, in slot order. ``threads`` > 1 runs the trainings of that many clients at once,
  each on a worker thread that waits for its outputs (one client's program, run on XLA:CPU's
  intra-op pool, leaves a core idle between its small ops on batches of 10; two in flight
  fill it), while this thread reads rows and writes outputs: the same programs, written in
  the same order, so every number is the same to the bit whatever ``threads`` is
  (`tests/test_engine.py`). The first client of a call runs on this thread, so any
  compilation happens here; a training program that calls LAPACK (:func:`lapack_calls`) then
  runs its clients one at a time whatever ``threads`` is.
  """

  threads: int = 1
  name = "sequential"
  traced = False

  def map(self, fn, per_slot):  # where a traced map is needed: one client at a time
    return jax.lax.map(fn, per_slot)

  def train(self, program, states, slots, keys, linear):
    writer = program.write
    rows = np.asarray(slots.rows)
    kept = np.asarray(slots.kept)
    buffers = writer.init(states, slots, linear)
    waiting = collections.deque(int(k) for k in np.flatnonzero(np.asarray(slots.active)))
    args = lambda k, state: (state, np.int32(k), rows[k], keys, kept[k])
    write = lambda states, buffers, k, outputs: writer.write(states, buffers, np.int32(k),
                                                             rows[k], outputs, linear)
    threads = self.threads
    if waiting:  # the first client on this thread: any compilation happens here
      k = waiting.popleft()
      state = writer.row(states, rows[k])
      if threads > 1 and not writer.overlappable(*args(k, state)):
        threads = 1
      states, buffers = write(states, buffers, k, writer.train(*args(k, state)))
    while waiting and threads == 1:  # with one thread, every client here
      k = waiting.popleft()
      states, buffers = write(states, buffers, k,
                              writer.train(*args(k, writer.row(states, rows[k]))))
    pool, pending = _pool(threads) if waiting else None, collections.deque()
    # A worker waits for its client's outputs, so that the next one it takes runs beside it.
    worker = lambda k, state: jax.block_until_ready(writer.train(*args(k, state)))
    while waiting or pending:
      # Two clients per thread in flight: a thread that finishes early finds the next one read.
      while waiting and len(pending) < 2 * threads:
        k = waiting.popleft()
        pending.append((k, pool.submit(worker, k, writer.row(states, rows[k]))))
      k, future = pending.popleft()
      states, buffers = write(states, buffers, k, future.result())
    return states, writer.finish(buffers, linear)


#: A LAPACK call in a lowered (StableHLO) program. jaxlib's CPU kernels for a batch of
#: matrices (SVD, eigh, LU, QR, and the solves and inverses built on them) split the batch
#: over XLA's intra-op thread pool and wait for the pieces on the pool thread they run on:
#: two such programs at once, on a pool of two threads (a two-core CPU), wait for each other
#: forever (JAX 0.10.2, 2026-12-06: `tests/test_engine.py`, FedKD's per-slice SVDs
#: with ``--pfllib-compat``). Cholesky did not hang in that check; every LAPACK call is kept
#: apart all the same, so the check need not know which kernels split their batch (FedKD's
#: default one-matrix SVDs, which never hung, train faster one at a time: benchmarks/RESULTS.md).
#: Within one program XLA:CPU runs independent operations at once on the same pool, so
#: FedKD's SVDs hand LAPACK one matrix per call (`fedjax_lib.algorithms.fedkd.svd`), which
#: never waits: its vmapped and sharded rounds need that.
_LAPACK_CALL = re.compile(r"custom_call @(lapack_\w+)")


def lapack_calls(program_text: str) -> list:
  """The LAPACK calls (custom-call targets, sorted) in a lowered program's text: where any,
  the sequential executor trains one client at a time."""
  return sorted(set(_LAPACK_CALL.findall(program_text)))


_POOLS: dict = {}
_POOLS_LOCK = threading.Lock()


def _pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
  """A process-wide pool of ``threads`` workers (kept for the next round)."""
  with _POOLS_LOCK:
    if threads not in _POOLS:
      _POOLS[threads] = concurrent.futures.ThreadPoolExecutor(threads, "fedjax_lib-client")
    return _POOLS[threads]


def mean_row(sums, total, dtypes):
  """One slot holding the weighted mean ``sums / total`` (leaves cast to ``dtypes``, a pytree
  of dtypes shaped like ``sums``), and ``[total]``: a linear server's weighted average of this
  row is the weighted average of the uploads that were summed."""
  mean = jax.tree.map(lambda acc, dt: (acc / jnp.maximum(total, 1e-30)).astype(dt)[None], sums,
                      dtypes)
  return mean, total[None]


def make_executor(name: str, chunk_size: int = 8, threads: int = 1) -> Executor:
  if name == "vmap":
    return VmapExecutor()
  if name == "chunked":
    return ChunkedExecutor(chunk_size)
  if name == "sequential":
    return SequentialExecutor(threads)
  raise ValueError(f"unknown executor {name!r}; choose one of: vmap, chunked, sequential")
