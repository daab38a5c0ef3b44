"""Ctrl-C and SIGTERM at any moment: one line at once, a consistent state on disk, exit 130.

A run is stopped in one of two ways:

- **After this round.** The first SIGINT/SIGTERM while rounds have been trained since the
  last save asks the run loop to stop at its next safe point (the end of the round, or before
  the final evaluation or the results files): it saves a checkpoint of every unfinished run
  and raises :class:`Interrupted`; the CLI exits with status 130 and a rerun of the same
  command continues from there.
- **Now.** A second signal, or a first one while nothing would be lost (during start-up and
  the first round's compilation, or right after a save; not with several processes, which
  stop together at a safe point), ends the process at once with
  status 130. Files being written are finished first (writes hold :data:`STOPPER`'s write
  lock), so what is on disk is always whole: the previous checkpoints, complete results
  files or none, and no lock file. A SIGTERM that cannot reach a safe point within
  :data:`TERM_GRACE_S` seconds (10, or ``$FEDJAX_TERM_GRACE_S``: a long compilation or round)
  also stops now: schedulers send SIGKILL soon after.

The CLI installs the handlers as its first statement (:meth:`Stopper.install`, with
``exit_now=True``): a watcher thread woken through :func:`signal.set_wakeup_fd` reacts within
milliseconds, even while the main thread is inside a long XLA compilation or computation, and
the process ends with :func:`os._exit` — never a ``KeyboardInterrupt`` raised into JAX (which
could be swallowed by a callback, or crash the interpreter at exit). From Python,
`run_experiment` installs handlers for the duration of the run only when it is called in the
main thread and none are installed yet: the first signal prints the line and stops after the
round, a second raises ``KeyboardInterrupt`` as usual.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Callable, Iterator, Optional

# Seconds a SIGTERM waits for the round to end before stopping now.
TERM_GRACE_S = float(os.environ.get("FEDJAX_TERM_GRACE_S", "10"))
EXIT_STATUS = 130
NOTHING_YET = "no round had finished, so there is nothing to save"


class Interrupted(KeyboardInterrupt):
  """A run stopped by SIGINT/SIGTERM; ``checkpoint`` is where it was saved (or None)."""

  def __init__(self, message: str, checkpoint: Optional[str]):
    super().__init__(message)
    self.checkpoint = checkpoint


def _say(line: str) -> None:
  try:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
  except (OSError, ValueError):  # a closed or broken stream: nothing to tell
    pass


class Stopper:
  """The process's record of stop requests and of what a stop now would lose.

  The run loop reports its progress with :meth:`progress` (rounds trained since the last
  save) and :meth:`saved`; it polls :attr:`requested` at its safe points. Writers of files
  hold :meth:`writing` so that a stop now never leaves a file half written.
  """

  def __init__(self):
    self.requested: Optional[str] = None  # the signal's name once one arrived
    self.count = 0
    self.unsaved = False
    self.where = NOTHING_YET
    self.cleanups: list = []  # run (in order) before the process ends by `stop_now`
    # With several processes (multi-host) a first signal never stops now: the processes
    # stop together at a safe point (`fedjax_lib.runner.agreed_stop`).
    self.shared = False
    self._write_lock = threading.RLock()
    self._installed = False
    self._exit_now = False
    self._read_fd = self._write_fd = -1
    self._previous: dict = {}
    self._exit: Callable[[int], None] = os._exit

  # ------------------------------------------------------------------ the run's side
  def progress(self, where: str) -> None:
    """Rounds have been trained that a stop now would lose; ``where`` names the moment."""
    self.unsaved, self.where = True, where

  def saved(self, where: str) -> None:
    """Everything done so far is on disk; ``where`` says what, as a clause ("the results
    files are written")."""
    self.unsaved, self.where = False, where

  @contextlib.contextmanager
  def writing(self) -> Iterator[None]:
    """Held while a file or a checkpoint is written: a stop now waits for it."""
    with self._write_lock:
      yield

  def reset(self) -> None:
    self.requested, self.count, self.unsaved, self.where = None, 0, False, NOTHING_YET

  # ------------------------------------------------------------------ signals
  def install(self, exit_now: bool) -> bool:
    """Installs SIGINT/SIGTERM handlers; returns whether it did (main thread only).

    ``exit_now=True`` (the CLI): a watcher thread reacts at once and ends the process when
    stopping now. ``exit_now=False`` (a Python caller): the handlers only run between Python
    bytecodes of the main thread, and a second signal raises ``KeyboardInterrupt``.
    """
    if self._installed or threading.current_thread() is not threading.main_thread():
      return False
    self._exit_now = exit_now
    if exit_now:
      self._read_fd, self._write_fd = os.pipe()
      os.set_blocking(self._write_fd, False)
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, _ignore_in_main_thread)
      self._previous["wakeup"] = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
      threading.Thread(target=self._watch, name="fedjax-stop-watcher", daemon=True).start()
    else:
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle_in_main_thread)
    self._installed = True
    return True

  def reclaim(self) -> None:
    """Installs the handlers again where something replaced them since :meth:`install`
    (``jax.distributed.initialize`` installs its preemption notifier's SIGTERM handler, which
    would swallow the signal)."""
    if not self._installed:
      return
    handler = _ignore_in_main_thread if self._exit_now else self._handle_in_main_thread
    for sig in (signal.SIGINT, signal.SIGTERM):
      signal.signal(sig, handler)

  def finish(self, status: int) -> int:
    """Ignores SIGINT/SIGTERM from now on and returns ``status``: the process has done its
    work and is exiting. (Python restores the default handlers while it shuts down, and a
    signal in that moment would end the process with the signal's status instead.)"""
    for sig in (signal.SIGINT, signal.SIGTERM):
      signal.signal(sig, signal.SIG_IGN)
    return status

  def uninstall(self) -> None:
    """Restores the previous handlers (Python callers; the CLI keeps its own to the end)."""
    if not self._installed or self._exit_now:
      return
    for sig in (signal.SIGINT, signal.SIGTERM):
      signal.signal(sig, self._previous.pop(sig))
    self._installed = False

  @property
  def installed(self) -> bool:
    return self._installed

  def _watch(self) -> None:
    while True:
      try:
        data = os.read(self._read_fd, 64)
      except OSError:
        return
      for signum in data:
        if signum in (signal.SIGINT, signal.SIGTERM):
          self._react(signal.Signals(signum).name)

  def _handle_in_main_thread(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.requested is not None:
      _say(f"{name} again: stopping now")
      raise KeyboardInterrupt
    self.requested, self.count = name, 1
    later = self.unsaved or self.shared
    _say(self._first_line(name) if later else f"{name}: stopping now; {self.where}")
    if not later:
      raise KeyboardInterrupt

  def _first_line(self, name: str) -> str:
    grace = (f" (or in {TERM_GRACE_S:.0f} s if it has not ended)"
             if name == "SIGTERM" and self._exit_now else "")
    again = "Ctrl-C again stops" if name == "SIGINT" else "a second signal stops"
    return (f"{name}: stopping after this round{grace} and saving a checkpoint to continue "
            f"from; {again} now (losing the rounds since the last save)")

  def _react(self, name: str) -> None:
    """The watcher's reaction to one signal (runs in the watcher thread)."""
    self.count += 1
    if self.count > 1:
      self.stop_now(f"{name} again: stopping now; the last checkpoint (if any) is kept")
      return
    self.requested = name
    if not self.unsaved and not self.shared:
      self.stop_now(f"{name}: stopping now; {self.where}")
      return
    _say(self._first_line(name))
    if name == "SIGTERM":
      threading.Thread(target=self._grace, daemon=True).start()

  def _grace(self) -> None:
    time.sleep(TERM_GRACE_S)
    self.stop_now(f"SIGTERM: the round did not end within {TERM_GRACE_S:.0f} s; stopping now; "
                  "the last checkpoint (if any) is kept")

  def stop_now(self, line: str) -> None:
    """Says ``line``, waits for a file being written, and ends the process (status 130)."""
    _say(line)
    with self._write_lock:
      for cleanup in self.cleanups:
        try:
          cleanup()
        except Exception:  # pylint: disable=broad-except
          pass
      try:
        sys.stdout.flush()
      except (OSError, ValueError):
        pass
      self._exit(EXIT_STATUS)


def _ignore_in_main_thread(signum, frame) -> None:
  """The Python-level handler under the watcher: the watcher thread does the work."""
  del signum, frame


STOPPER = Stopper()
