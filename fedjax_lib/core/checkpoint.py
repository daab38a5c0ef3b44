"""Orbax checkpoints of one run: states, the next round, the metrics history and the config.

A checkpoint at step ``s`` holds everything needed to continue with round ``s``: the state
``{"server": server_state, "clients": {architecture: stacked client states}}`` (every
algorithm-specific leaf included; each architecture group's real clients, whatever the device
count), and a JSON item with the history so far, the config, the run's seed and the format
version (:data:`FORMAT`).

Formats: 2 (architecture groups) is written. 1 (before groups: ``"clients"`` one stacked
tree) is restored into a one-architecture run; for several architectures it is refused with a
one-line error. Nothing random is stored: every key
derives from ``(seed, round, client id)``, so a resumed run is identical to an uninterrupted
one. Saves are synchronous and atomic (Orbax writes a temporary directory and renames it when
complete), so a run killed mid-save leaves the previous checkpoint as the latest complete one;
a save holds `fedjax_lib.stopping.STOPPER`'s write lock, so a stop now waits for it. A
checkpoint that cannot be read is moved aside (``<step>.unreadable``) with one warning line in
favour of the one before it — unless the caller requires one (``--resume``) and none can be
read: then nothing is moved and a `ConfigError` names every unreadable checkpoint. Orbax's
background reads of a damaged checkpoint fail after the restore has given up; their "Event loop
is closed" reports are silenced (:func:`quiet_failed_reads`), nothing else is.
"""

from __future__ import annotations

import contextlib
import gc
import glob
import logging
import os
import re
import shutil
import sys
import threading
import time
import warnings
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from fedjax_lib.errors import ConfigError
from fedjax_lib.output import os_error
from fedjax_lib.stopping import STOPPER

FORMAT = 2
READABLE_FORMATS = (1, 2)


def _not_a_damaged_metadata_file(record: logging.LogRecord) -> bool:
  # Orbax logs every unparsable metadata file as an error each time it lists the steps; the
  # restore reports an unreadable checkpoint once, as one warning line.
  return not str(record.msg).startswith("Failed to json parse Metadata file")


logging.getLogger("absl").addFilter(_not_a_damaged_metadata_file)


def _like(restored: jax.Array, template) -> jax.Array:
  """``restored`` placed as ``template`` is: Orbax returns arrays committed to a device, and a
  compiled round called with committed arrays where it was compiled for uncommitted ones
  compiles again (seconds per program). An uncommitted template gets an uncommitted copy."""
  if (isinstance(template, jax.Array) and not template.committed and restored.committed
      and not jax.dtypes.issubdtype(restored.dtype, jax.dtypes.extended)):
    return jax.numpy.asarray(np.asarray(restored))
  return restored


class RunCheckpointer:
  """Saves and restores the checkpoints of one run in ``directory`` (keeps the last ``keep``)."""

  def __init__(self, directory: str, keep: int = 3):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, server_state, client_states, meta: dict) -> str:
    """Writes checkpoint ``step`` (the round to continue with); returns its path.

    Raises:
      ConfigError: the file system refused the write (no space, no permission); the partial
        checkpoint is removed and the previous ones are kept.
    """
    state = {"server": server_state, "clients": client_states}
    with STOPPER.writing(), _absl_silenced(), quiet_failed_reads():
      try:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave({**meta, "format": FORMAT, "step": step})), force=True)
        self.manager.wait_until_finished()
      except Exception as e:  # pylint: disable=broad-except
        _quiet_after_failed_write()
        self._remove_partial(step)
        error = _os_error_in(e)
        if error is None:
          raise
        raise os_error("save the checkpoint", self.path(step), error) from None
    return self.path(step)

  def _remove_partial(self, step: int) -> None:
    """Removes the temporary folder of a failed save. Orbax's other writer threads may still
    be writing into it for a moment: removed until it stays gone for half a second (at most
    five seconds); a rerun's `CheckpointManager` also cleans up what would remain."""
    pattern = os.path.join(glob.escape(self.directory), f"{step}.orbax-*")
    deadline, quiet_since = time.monotonic() + 5, time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - quiet_since < 0.5:
      leftovers = glob.glob(pattern)
      for tmp in leftovers:
        shutil.rmtree(tmp, ignore_errors=True)
      if leftovers:
        quiet_since = time.monotonic()
      time.sleep(0.05)

  def restore_latest(self, server_state, client_states, required: bool = False,
                     warn: Optional[Callable[[str], None]] = None
                     ) -> Optional[tuple[int, Any, Any, dict]]:
    """``(step, server_state, client_states, meta)`` of the newest readable checkpoint, or None.

    ``server_state``/``client_states`` (``{architecture: states}``) give the structure,
    shapes and dtypes to restore into. Each unreadable checkpoint gets one ``warn`` line
    (default: a Python warning) and is moved aside when an older one is read, or when none
    is and ``required`` is False.

    Raises:
      ConfigError: the checkpoint's format cannot be restored into these states, or
        ``required`` and there is no checkpoint, or none can be read.
    """
    unreadable = []
    found = None
    for step in reversed(self.steps()):
      try:
        with quiet_failed_reads():
          found = self._restore(step, server_state, client_states)
        break
      except ConfigError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:160]
        unreadable.append((step, reason))
    if found is None and required and not unreadable:
      raise ConfigError(f"resume=True but there is no checkpoint in {self.directory}; run "
                        "without --resume to start afresh")
    if found is None and required:
      raise ConfigError(
          f"resume=True but none of the {len(unreadable)} checkpoint(s) in {self.directory} "
          f"can be read ({'; '.join(f'{s}: {r}' for s, r in unreadable)}); run without "
          "--resume to start afresh")
    for step, reason in unreadable:
      aside = f"{self.path(step)}.unreadable"
      if not os.path.exists(aside):
        try:
          os.replace(self.path(step), aside)
        except OSError as e:
          raise os_error("move aside the unreadable checkpoint", self.path(step), e) from None
      line = (f"checkpoint {self.path(step)} could not be read ({reason}); moved it to "
              f"{aside}")
      if warn is None:
        warnings.warn(line, stacklevel=2)
      else:
        warn(line)
    if unreadable:
      self.manager.reload()
    return found

  def _restore(self, step: int, server_state, client_states):
    meta = dict(self.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore())).meta)
    self._check_format(meta, step, client_states)
    clients = client_states
    if meta["format"] == 1:  # one architecture's stacked states, not keyed by group
      (clients,) = client_states.values()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                            {"server": server_state, "clients": clients})
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))
    state = jax.tree.map(_like, restored.state, {"server": server_state, "clients": clients})
    clients = state["clients"]
    if meta["format"] == 1:
      clients = {next(iter(client_states)): clients}
    return step, state["server"], clients, meta

  def _check_format(self, meta: dict, step: int, client_states) -> None:
    if meta.get("step") != step:
      raise ValueError(f"unexpected metadata {sorted(meta)}")
    fmt = meta.get("format")
    if fmt not in READABLE_FORMATS:
      raise ConfigError(f"the checkpoint {self.path(step)} has format {fmt!r}; this version "
                        f"reads formats {', '.join(map(str, READABLE_FORMATS))}; use another "
                        "--out or the version that wrote it")
    if fmt == 1 and len(client_states) != 1:
      raise ConfigError(f"the checkpoint {self.path(step)} has format 1 (one architecture, "
                        f"written before architecture groups) but this run has "
                        f"{len(client_states)} architectures ({', '.join(client_states)}); "
                        "use another --out")

  def latest_meta(self) -> Optional[dict]:
    """The JSON item of the newest readable checkpoint (no arrays are read), or None."""
    for step in reversed(self.steps()):
      try:
        with quiet_failed_reads():
          meta = dict(self.manager.restore(step, args=ocp.args.Composite(
              meta=ocp.args.JsonRestore())).meta)
      except Exception:  # pylint: disable=broad-except
        continue
      if meta.get("format") in READABLE_FORMATS:
        return meta
    return None

  def close(self) -> None:
    self.manager.close()


def _os_error_in(error: BaseException) -> Optional[OSError]:
  """The OSError behind ``error`` (Orbax and TensorStore wrap them), or None."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, OSError):
      return error
    code = re.search(r"os_error_code='(\d+)'", str(error))  # TensorStore's wording
    if code:
      return OSError(int(code.group(1)), os.strerror(int(code.group(1))))
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return None


def _quiet_after_failed_write() -> None:
  """After a failed save, for the rest of the process: Orbax's other writes, still in flight,
  fail later on their own and report it — asyncio's "Task exception was never retrieved" (its
  logger, when the task is collected, possibly at exit) or an exception ending a writer
  thread — with tracebacks about the failure the save already raised as one line (seen in
  CI under load: the `error:` line, then eight lines of Orbax's ``async_serialize_from_host``).
  Reports from elsewhere pass."""
  logging.getLogger("asyncio").addFilter(_not_from_orbax)
  if not getattr(threading.excepthook, "_fedjax_orbax_filter", False):
    previous = threading.excepthook

    def hook(args):
      if not _from_orbax(args.exc_traceback):
        previous(args)

    hook._fedjax_orbax_filter = True  # pylint: disable=protected-access
    threading.excepthook = hook


def _in_orbax(filename: str) -> bool:
  """Whether a source file is Orbax's."""
  return f"{os.sep}orbax{os.sep}" in filename


def _from_orbax(tb) -> bool:
  """Whether a traceback passes through Orbax's code."""
  while tb is not None:
    if _in_orbax(tb.tb_frame.f_code.co_filename):
      return True
    tb = tb.tb_next
  return False


def _not_from_orbax(record: logging.LogRecord) -> bool:
  exc = record.exc_info[1] if record.exc_info else None  # asyncio's handler logs it so
  return exc is None or not _from_orbax(exc.__traceback__)


@contextlib.contextmanager
def _absl_silenced():
  """Orbax logs a failed write with a traceback from its writer threads, some of them only
  when the process ends; the save raises it as one line instead, and Orbax's log stays
  silenced after a failed save."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  yield
  logger.setLevel(level)


class quiet_failed_reads:  # pylint: disable=invalid-name
  """Silences the reports of Orbax's background reads (or writes) that failed (a context
  manager around an Orbax save or restore; also used for generator folders).

  When one array of a damaged checkpoint cannot be read (or written: a full disk), Orbax
  gives up while its other reads are still in flight; they end later on TensorStore's threads, after Orbax's event loop has
  closed, and Python reports each through `sys.unraisablehook` ("Event loop is closed", or an
  exception in an Orbax coroutine) — tracebacks about a failure already reported. The filter
  stays installed for the process (those reads end at unpredictable times) and lets every
  other report through.
  """

  installed = False

  def __enter__(self):
    self._absl = logging.getLogger("absl")
    self._level = self._absl.level
    self._absl.setLevel(logging.CRITICAL)  # Orbax logs each unparsable file as an error
    if not quiet_failed_reads.installed:
      previous = sys.unraisablehook

      def hook(unraisable):
        if not _is_failed_read(unraisable):
          previous(unraisable)

      sys.unraisablehook = hook
      quiet_failed_reads.installed = True
    return self

  def __exit__(self, *exc):
    if exc[0] is not None:
      with warnings.catch_warnings():
        # Reads never started are "never awaited": the same failure again.
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                                category=RuntimeWarning)
        gc.collect()  # the failed reads' coroutines are reported now, through the filter
    self._absl.setLevel(self._level)


def _is_failed_read(unraisable) -> bool:
  value = unraisable.exc_value
  if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
    return True
  code = getattr(unraisable.object, "cr_code", None)
  return code is not None and _in_orbax(code.co_filename)
