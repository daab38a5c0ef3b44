"""The memory runs will need, read from their compiled programs, and what the machine has.

With the vmap or chunked executor, S runs side by side (a sweep, ``-t`` repetitions) are one
compiled program per phase (`fedjax_lib.core.engine.StackedPrograms`: init, round, evaluation),
and their memory grows with S × clients × what one client's local training keeps live; with
the local steps unrolled (``--unroll 0``) that is easily more than the machine has (a
4-combination Ditto sweep on digits once needed 11.5 GB of temporaries in one round).
:func:`estimate_runs` compiles those programs ahead of time — ``jax.jit`` keeps the compiled
executables in its cache and the run loop's calls reuse them (tested), so nothing is compiled
twice — and reads XLA's own account of each (``Compiled.memory_analysis()``)::

    program = arguments + outputs − outputs aliased to donated arguments + temporaries
              (+ on XLA:CPU, the run-time scratch of grouped convolutions, below)
    needed  = max over the programs (they run one after another) − the data already resident

:func:`check_fits` compares ``needed`` with :func:`available_bytes` (on CPU the machine's
available RAM, on an accelerator its free memory) and refuses, with both numbers, what does
not fit.

What the estimate covers:

- every buffer XLA allocates for the stacked programs: the states of all S runs, the data, the
  swept values and every temporary (per-step activations, gathered batches, index buffers);
- on XLA:CPU, a convolution vmapped over per-client kernels is a grouped convolution, and XLA
  runs it with scratch it allocates at run time, outside ``memory_analysis`` (about its im2col
  matrix: batch × output pixels × window × input channels, measured within 10% for one such
  convolution); the largest two are added, as independent ones run concurrently.

What it does not cover: compilation itself (it has happened by the time the estimate exists;
+0.4 to 0.8 GB of RSS for the digits CNN), host copies (metrics, checkpoints: one run's states)
and allocator slack. Runs one after another (the sequential executor, several devices) are
estimated by their states only (S × one run's states), without compiling anything; so is a
single run (S = 1, any executor): a lower bound, which refuses only what cannot fit, before
any state is made (the run's programs compile in round 0 as they always did).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lib.core import rng
from fedjax_lib.errors import ConfigError

GB = 1e9


# ---------------------------------------------------------------------------- the machine
def _meminfo() -> dict:
  """``/proc/meminfo`` in bytes (empty where there is none)."""
  try:
    with open("/proc/meminfo") as f:
      rows = (line.split() for line in f)
      return {row[0].rstrip(":"): int(row[1]) * 1024 for row in rows if len(row) >= 2}
  except OSError:
    return {}


def _sysconf(name: str) -> Optional[int]:
  try:
    value = os.sysconf(name) * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None
  return value if value > 0 else None


def _device(device=None):
  return jax.devices()[0] if device is None else device


def _device_stats(device) -> Optional[dict]:
  """An accelerator's ``memory_stats()`` when it reports a limit (None on CPU)."""
  if device.platform == "cpu":
    return None
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  (not every plugin implements it)
    return None
  return stats if stats and "bytes_limit" in stats else None


def available_bytes(device=None) -> Optional[int]:
  """Bytes a run can still allocate on ``device`` (default: the first device).

  CPU: the machine's available RAM (``MemAvailable`` of ``/proc/meminfo``: free memory plus
  what the kernel can reclaim; elsewhere ``os.sysconf``'s available pages). GPU/TPU:
  ``bytes_limit - bytes_in_use`` of ``device.memory_stats()``. None when it cannot be known.
  """
  device = _device(device)
  limit = memory_limit()
  if limit is not None:
    return limit - in_use_bytes(device)
  stats = _device_stats(device)
  if stats is not None:
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  if device.platform != "cpu":
    return None
  info = _meminfo()
  available = info.get("MemAvailable") or _sysconf("SC_AVPHYS_PAGES")
  cgroup = _cgroup_available()  # a container's limit, which /proc/meminfo does not show
  if cgroup is not None and (available is None or cgroup < available):
    return cgroup
  return available


LIMIT_VARIABLE = "FEDJAX_MEMORY_LIMIT_GB"


def memory_limit() -> Optional[int]:
  """``$FEDJAX_MEMORY_LIMIT_GB`` in bytes: the memory this process may use in all, when the
  machine's own number is not the one to plan with (a shared machine, a scheduler's limit).

  Raises:
    ConfigError: the variable is set but is not a positive number.
  """
  text = os.environ.get(LIMIT_VARIABLE)
  if text is None or not text.strip():
    return None
  try:
    value = float(text)
  except ValueError:
    value = float("nan")
  if not math.isfinite(value) or value <= 0:
    raise ConfigError(f"{LIMIT_VARIABLE}={text!r} is not a positive number of GB; unset it or "
                      "give e.g. 16")
  return int(value * GB)


def _cgroup_available() -> Optional[int]:
  """What the cgroup (v2) memory limit leaves, or None without one."""
  try:
    with open("/sys/fs/cgroup/memory.max") as f:
      limit = f.read().strip()
    with open("/sys/fs/cgroup/memory.current") as f:
      current = int(f.read().strip())
  except (OSError, ValueError):
    return None
  return None if limit == "max" else int(limit) - current


def total_bytes(device=None) -> Optional[int]:
  """The memory of ``device``: the machine's RAM on CPU, ``bytes_limit`` on an accelerator."""
  device = _device(device)
  stats = _device_stats(device)
  if stats is not None:
    return int(stats["bytes_limit"])
  if device.platform != "cpu":
    return None
  return _meminfo().get("MemTotal") or _sysconf("SC_PHYS_PAGES")


def in_use_bytes(device=None) -> int:
  """What this process already holds: its resident set on CPU, ``bytes_in_use`` elsewhere."""
  device = _device(device)
  stats = _device_stats(device)
  if stats is not None:
    return int(stats.get("bytes_in_use", 0))
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError, AttributeError):
    import resource  # pylint: disable=import-outside-toplevel
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak if os.uname().sysname == "Darwin" else peak * 1024


def peak_rss_bytes() -> int:
  """This process's peak resident set (``VmHWM``; ``ru_maxrss`` where there is no /proc,
  which Linux carries over from the parent across exec)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  import resource  # pylint: disable=import-outside-toplevel
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
  return peak if os.uname().sysname == "Darwin" else peak * 1024


# ---------------------------------------------------------------------------- one program
@dataclasses.dataclass(frozen=True)
class ProgramMemory:
  """XLA's account of one compiled program, in bytes.

  ``bytes = arguments + outputs - aliased + temporaries + scratch``: an output aliased to a
  donated argument (the round's states) is counted once; ``scratch`` is what XLA:CPU's grouped
  convolutions allocate at run time (see :func:`grouped_conv_scratch_bytes`).
  """
  name: str
  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  scratch: int = 0

  @property
  def bytes(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.scratch


def program_memory(name: str, compiled, platform: str = "cpu") -> ProgramMemory:
  """:class:`ProgramMemory` of a ``jax.stages.Compiled`` (``jit(f).lower(...).compile()``)
  for ``platform`` (the device's: ``cpu`` adds the grouped convolutions' scratch)."""
  analysis = compiled.memory_analysis()
  scratch = grouped_conv_scratch_bytes(compiled.as_text()) if platform == "cpu" else 0
  return ProgramMemory(name, int(analysis.argument_size_in_bytes),
                       int(analysis.output_size_in_bytes), int(analysis.alias_size_in_bytes),
                       int(analysis.temp_size_in_bytes), scratch)


_DEF = re.compile(r"%([\w.\-]+) = (\w+)\[([\d,]*)\]")
_CONV = re.compile(r"= (\w+)\[([\d,]*)\][^ ]* convolution\(%([\w.\-]+), %([\w.\-]+)\)(.*)")


def grouped_conv_scratch_bytes(hlo_text: str, concurrent: int = 2) -> int:
  """Run-time scratch of XLA:CPU's grouped convolutions in an optimized HLO module's text.

  XLA:CPU runs a convolution with ``feature_group_count > 1`` (what ``vmap`` makes of a
  convolution over per-client kernels) with buffers it allocates at run time, outside
  ``memory_analysis()``: about the im2col matrix, ``batch × output pixels × window × input
  channels`` elements (measured within 10% for single convolutions on XLA:CPU, jax 0.10).
  Returns the sum of the ``concurrent`` largest (independent convolutions run concurrently).
  """
  shapes = {m.group(1): (m.group(2), m.group(3)) for m in _DEF.finditer(hlo_text)}
  sizes = []
  for m in _CONV.finditer(hlo_text):
    dtype, out_dims, lhs, _, attrs = m.groups()
    groups = re.search(r"feature_group_count=(\d+)", attrs)
    if not groups or int(groups.group(1)) == 1 or lhs not in shapes:
      continue
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", attrs)
    window = re.search(r"size=([\dx]+)", attrs)
    if not labels or not window:
      continue
    lhs_dims = [int(d) for d in shapes[lhs][1].split(",") if d]
    out = [int(d) for d in out_dims.split(",") if d]
    lhs_labels, out_labels = labels.group(1), labels.group(3)
    in_features = lhs_dims[lhs_labels.index("f")]
    out_positions = math.prod(n for n, label in zip(out, out_labels) if label != "f")
    taps = math.prod(int(d) for d in window.group(1).split("x"))
    sizes.append(out_positions * taps * in_features * _ITEMSIZE.get(dtype, 4))
  return sum(sorted(sizes)[-concurrent:])


_ITEMSIZE = {"f64": 8, "f32": 4, "f16": 2, "bf16": 2}


# ---------------------------------------------------------------------------- the runs
@dataclasses.dataclass(frozen=True)
class Estimate:
  """The memory S runs will need on one device, in bytes.

  Attributes:
    programs: each compiled program's account (empty for runs one after another).
    resident: the data arguments already on the device, counted in ``programs`` too.
    states: the states of all S runs.
    in_use: what this process held when the estimate was made (its RSS on CPU).
    covers: one line on what the number includes.
    device: the device the runs use (None: the first).
  """
  programs: tuple
  resident: int
  states: int
  in_use: int
  covers: str
  device: Any = None

  @property
  def additional(self) -> int:
    """Bytes to allocate beyond what is in use: the largest program (or the states) less the
    data already resident."""
    if not self.programs:
      return self.states
    return max(max(p.bytes for p in self.programs) - self.resident, 0)

  @property
  def total(self) -> int:
    """What the process will hold at its peak: in use now plus :attr:`additional`."""
    return self.in_use + self.additional

  def describe(self) -> str:
    """One line: the total and the largest program's parts."""
    text = f"about {self.total / GB:.1f} GB ({self.in_use / GB:.1f} GB in use now"
    if self.programs:
      top = max(self.programs, key=lambda p: p.bytes)
      text += (f"; largest program: {top.name}, {top.temporaries / GB:.1f} GB temporaries, "
               f"{(top.arguments + top.outputs - top.aliased) / GB:.1f} GB arguments and "
               f"outputs")
      if top.scratch:
        text += f", {top.scratch / GB:.1f} GB convolution scratch"
    return text + f"; {self.covers})"

  def check(self, what: str, advice: Optional[str] = None) -> None:
    """:func:`check_fits` of this estimate against :func:`available_bytes` of its device;
    ``advice`` (default `DEFAULT_ADVICE`) ends the message.

    Raises:
      ConfigError: it does not fit; the message names both numbers and what to change.
    """
    advice = advice or DEFAULT_ADVICE
    top = max(self.programs, key=lambda p: p.bytes, default=None)
    if top is not None and "evaluation" in top.name:
      advice = "use a smaller --eval-chunk-size, " + advice
    needed, available, in_use = self.total, available_bytes(self.device), self.in_use
    own = True
    if jax.process_count() > 1:  # one verdict for every host: a host refusing alone would
      # leave the others waiting at the first collective
      needed, available, in_use, worst = _worst_process(needed, available, in_use)
      own = worst == jax.process_index()  # else its numbers, not this process's limit
      what = what if own else f"process {worst}: {what}"
    check_fits(needed, available, what, in_use=in_use, advice=advice, own=own)


def _worst_process(needed: int, available: Optional[int], in_use: int):
  """Every process's ``(needed, available, in_use)`` gathered: the numbers of the process
  short of the most memory (or of this one where none is short; an unknown ``available`` is
  never short), and its index."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  mine = np.array([needed, np.nan if available is None else available, in_use]) / GB
  rows = np.asarray(multihost_utils.process_allgather(mine.astype(np.float32)), np.float64)
  rows = rows.reshape(jax.process_count(), 3)
  short = np.where(np.isnan(rows[:, 1]), -np.inf, rows[:, 0] - rows[:, 2] - rows[:, 1])
  worst = int(np.argmax(short))
  if short[worst] <= 0:
    return needed, available, in_use, jax.process_index()
  return int(rows[worst, 0] * GB), int(rows[worst, 1] * GB), int(rows[worst, 2] * GB), worst


def _nbytes(tree) -> int:
  return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def _unique_nbytes(tree) -> int:
  seen = {id(a): a for a in jax.tree.leaves(tree)}
  return sum(a.nbytes for a in seen.values())


def _engine_device(engine):
  return next(iter(jax.tree.leaves(engine.data.x)[0].devices()))


def _stacked_inputs(num_runs: int, swept: Sequence[str]):
  """Abstract swept values and root keys of S runs, as `fedjax_lib.runner` makes them."""
  hparams = {k: jax.ShapeDtypeStruct((num_runs,), jnp.float32) for k in swept}
  roots = jax.eval_shape(lambda: jnp.stack([rng.root_key(0)] * num_runs))
  return hparams, roots


def estimate_stacked(engine, num_runs: int, swept: Sequence[str]) -> Estimate:
  """Compiles the stacked init, round and evaluation programs of S runs; their memory.

  The programs are lowered with abstract arguments shaped as the run loop passes them, so
  ``jax.jit`` reuses these compilations when the runs start. Compile time moves from round 0
  to here; nothing is allocated for the states.

  Args:
    engine: an engine with a traced executor on one device.
    num_runs: S, the runs side by side.
    swept: the names of the swept hyperparameters (``RunSpec.hparams``' keys).
  """
  hparams, roots = _stacked_inputs(num_runs, swept)
  compiled = engine.stacked().compile(hparams, roots, engine.data.x[0])
  server, clients = engine.state_shapes(engine.data.x[0])
  device = _engine_device(engine)
  return Estimate(tuple(program_memory(n, c, device.platform) for n, c in compiled),
                  resident=_unique_nbytes(engine.arrays),
                  states=num_runs * _nbytes((server, clients)),
                  in_use=in_use_bytes(device), device=device, covers=(
                      f"{num_runs} runs in one program: every XLA buffer of init, round and "
                      "evaluation; not compilation or host copies"))


def _shards_sharing_memory(engine, device) -> int:
  """How many of the engine's client shards share ``device``'s memory: one on an accelerator;
  on CPU every shard of this process (its devices are one machine's RAM)."""
  if engine.mesh is None or device.platform != "cpu":
    return 1
  return sum(d.process_index == jax.process_index() for d in engine.mesh.devices.flat)


def estimate_separate(engine, num_runs: int, swept: Sequence[str]) -> Estimate:
  """Runs one after another, or one run: the states of all S runs only (traced abstractly,
  no compile), per device — on CPU, per process."""
  del swept  # the swept values do not change any shape
  states = engine.state_shapes(engine.data.x[0])
  device = _engine_device(engine)
  per_device = (num_runs * _nbytes(states) * _shards_sharing_memory(engine, device)
                // engine.num_shards)  # sharded along clients
  runs = "one run" if num_runs == 1 else f"{num_runs} runs one after another"
  return Estimate((), resident=0, states=per_device, in_use=in_use_bytes(device), device=device,
                  covers=f"the states of {runs} only, a lower bound: not the programs")


def estimate_runs(engine, num_runs: int, swept: Sequence[str] = (),
                  stacked: Optional[bool] = None) -> Estimate:
  """:func:`estimate_stacked` for runs side by side in one program, else
  :func:`estimate_separate`; ``stacked`` defaults to `fedjax_lib.runner.runs_stacked`'s rule."""
  if stacked is None:
    stacked = num_runs > 1 and engine.executors[0].traced and engine.mesh is None
  if stacked:
    return estimate_stacked(engine, num_runs, swept)
  return estimate_separate(engine, num_runs, swept)


DEFAULT_ADVICE = ("run fewer combinations or repetitions at a time, use --executor sequential, "
                  "or --executor chunked with a smaller --chunk-size (and no --unroll 0)")
ONE_RUN_ADVICE = ("use fewer clients (-nc) or a smaller model (-m); on accelerators, more "
                  "devices (the clients' states are sharded across them)")


def check_fits(needed: int, available: Optional[int], what: str, in_use: int = 0,
               advice: str = DEFAULT_ADVICE, own: bool = True) -> None:
  """Refuses ``what`` when it needs more than there is.

  Args:
    needed: the bytes ``what`` will hold at its peak, ``in_use`` of them already held.
    available: the bytes that can still be allocated (None: unknown, nothing is refused).
    what: the subject of the message, e.g. ``"the sweep of 4 combinations"``.
    in_use: what is already held (on CPU this process's RSS, not part of ``available``).
    advice: what the user can change, ending the message.
    own: the numbers are this process's (False: another host's; this process's
      ``$FEDJAX_MEMORY_LIMIT_GB`` is not named).

  Raises:
    ConfigError: ``needed - in_use > available``; one line naming both numbers in GB.
  """
  if available is None or needed - in_use <= available:
    return
  held = f" ({in_use / GB:.1f} GB of it already in use)" if in_use else ""
  have = (f"{max(available, 0) / GB:.1f} GB {'more ' if in_use else ''}is available"
          if available > 0 else "no more is available")
  limit = memory_limit() if own else None
  source = f" (limit {LIMIT_VARIABLE}={limit / GB:g})" if limit is not None else ""
  raise ConfigError(f"{what} needs about {needed / GB:.1f} GB of memory{held} but {have}"
                    f"{source}; {advice}")
