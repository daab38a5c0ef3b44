"""The output folder: one writer per run family, no silent overwrite, OS errors as one line.

A run writes files named ``<dataset>_<algorithm>_<goal>_*`` (its *family*; a sweep's are
``..._sweep_*``) under ``--out``. :class:`OutputLock` makes one process at a time the writer
of a family: a second one is refused with a one-line error naming the first (its pid and
command), while runs of different families share a folder freely. The lock is an advisory
``flock`` on ``<out>/.<family>.lock``, so it is released by the operating system whenever the
holder ends, even by SIGKILL; the file is removed when the run ends.

:func:`check_overwrite` refuses to replace results files written with a different
configuration unless ``overwrite`` is set. :func:`os_error` turns an operating-system error
(no permission, a full disk, a path that is a file) into the library's one-line
`ConfigError`. :func:`leftovers` lists what a run that has ended must not leave in a folder
(temporary files, lock files, Orbax's temporary folders).
"""

from __future__ import annotations

import errno
import glob
import json
import os
import re
import secrets
import shutil
import sys
import threading
import time
from typing import Iterable, Optional

from fedjax_lib.errors import ConfigError

try:
  import fcntl
except ImportError:  # Windows: no advisory locks; one writer is then the user's business
  fcntl = None

# A file or folder being written is `<TEMP_PREFIX><pid>-<8 hex digits>-<its name>` next to its
# target (`temp_path`: results files, converted datasets, PFLlib dataset folders), renamed onto
# the target once complete; a folder being replaced is moved aside under `OLD_PREFIX` first.
TEMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
LOCK_SUFFIX = ".lock"
ORBAX_TEMP_MARK = "orbax-checkpoint-tmp"  # in the name of a checkpoint Orbax is writing

# Config fields that change how a run executes or where it writes, not its results.
EXECUTION_FIELDS = ("out", "progress", "resume", "checkpoint_every", "keep_checkpoints",
                    "times", "devices", "distributed", "eval_chunk_size", "chunk_size",
                    "executor", "unroll", "local_loop", "overwrite", "plot")


def os_error(what: str, path: str, error: OSError) -> ConfigError:
  """A one-line error for an operating-system failure on ``path``."""
  reason = " ".join(str(error.strerror or error).split())  # one line, however it was raised
  if len(reason) > 160:
    reason = reason[:157] + "..."
  code = errno.errorcode.get(error.errno, "") if error.errno else ""
  hint = {errno.ENOSPC: "free some space or use another --out",
          errno.EDQUOT: "free some space or use another --out",
          errno.EACCES: "use a folder you can write to (--out)",
          errno.EPERM: "use a folder you can write to (--out)",
          errno.EROFS: "use a folder on a writable file system (--out)",
          errno.ENOTDIR: "--out must be a folder (or a path that does not exist yet)",
          errno.EEXIST: "--out must be a folder (or a path that does not exist yet)",
          errno.EFBIG: "the file size limit (ulimit -f) is too small for the results"}.get(
              error.errno, "check the path and the file system")
  return ConfigError(f"cannot {what} {path!r}: {reason}{f' ({code})' if code else ''}; {hint}")


def prepare_folder(out: str) -> tuple[str, bool]:
  """Makes ``out`` (and its parents) if needed; returns its absolute path and whether it
  was created.

  ``out`` is a validated `Config.out` (a non-empty path).

  Raises:
    ConfigError: a path that is a file, or a folder that cannot be created or written to.
  """
  path = os.path.abspath(out)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f"out={out!r} is a file, not a folder; give a folder for the results")
  created = not os.path.exists(path)
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise os_error("create the output folder", path, e) from None
  if not os.access(path, os.W_OK | os.X_OK):
    remove_if_created(path, created)
    raise ConfigError(f"cannot write in the output folder {path!r}: permission denied; use a "
                      "folder you can write to (--out)")
  return path, created


def remove_if_created(path: str, created: bool) -> None:
  """Removes the folder ``path`` if this run created it and it is still empty."""
  if created:
    try:
      os.rmdir(path)
    except OSError:
      pass


class OutputLock:
  """An exclusive, process-wide lock on one run family's files in a folder."""

  def __init__(self, folder: str, family: str):
    self.folder = folder
    self.family = family
    self.path = os.path.join(folder, f".{family}{LOCK_SUFFIX}")
    self._fd: Optional[int] = None
    self._releasing = threading.Lock()

  def acquire(self) -> "OutputLock":
    """Takes the lock or raises `ConfigError` naming the process that holds it."""
    if fcntl is None:
      return self
    while True:
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
      except OSError as e:
        raise os_error("create the lock file", self.path, e) from None
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._fd = fd  # from here on `release` removes the file
      except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise ConfigError(
            f"another process ({holder}) is writing the {self.family}_* files in "
            f"{self.folder}; wait for it to end, or use another --out or -go") from None
      # The holder before us may have removed the file between our open and our flock.
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      self._fd = None
      os.close(fd)
    info = f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: " + " ".join(
        sys.argv)
    try:
      os.ftruncate(fd, 0)
      os.write(fd, info[:1000].encode("utf-8", "replace"))
    except OSError as e:
      self.release()
      raise os_error("write the lock file", self.path, e) from None
    return self

  def release(self) -> None:
    """Removes the lock file and releases the lock (the main thread and a stop now may both
    call it)."""
    with self._releasing:
      fd, self._fd = self._fd, None
      if fd is None:
        return
      try:
        os.remove(self.path)
      except OSError:
        pass
      os.close(fd)  # closing releases the flock

  def __enter__(self) -> "OutputLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def leftovers(folder: str) -> list[str]:
  """What a run that has ended (finished, failed or stopped) must not leave under ``folder``:
  temporary files of results being written, lock files, and Orbax's temporary checkpoint
  folders; their paths, sorted. (While a run goes on, its own lock file is there, and briefly
  its temporary files.) A process killed with SIGKILL leaves its lock file, and may leave
  temporary files or an Orbax folder; the next run of the same files removes them (the lock
  when it ends, the temporary files in `results.FileSet.commit`, the Orbax folder when it
  opens the checkpoints)."""
  found = []
  for root, dirs, files in os.walk(folder):
    found += [os.path.join(root, name) for name in files + dirs
              if name.startswith(TEMP_PREFIX) or name.endswith(LOCK_SUFFIX)
              or ORBAX_TEMP_MARK in name]
  return sorted(found)


def temp_path(path: str, prefix: str = TEMP_PREFIX) -> str:
  """A new name next to ``path`` for it while it is written: ``<prefix><pid>-<8 hex
  digits>-<name>`` (this process's id, so `stale_temps` can tell when its writer has ended)."""
  folder, name = os.path.split(os.path.abspath(path))
  return os.path.join(folder, f"{prefix}{os.getpid()}-{secrets.token_hex(4)}-{name}")


def stale_temps(path: str, prefix: str = TEMP_PREFIX) -> list[str]:
  """The `temp_path` names of ``path`` (with ``prefix``) whose writer has ended, sorted: what a
  process killed while it wrote (SIGKILL, the out-of-memory killer, a job's time limit) left.
  A running process's names, ours included, and every other name are left out."""
  folder, name = os.path.split(os.path.abspath(path))
  own = re.compile(f"{re.escape(prefix)}(\\d+)-[0-9a-f]{{8}}-{re.escape(name)}\\Z")
  return sorted(found for found in glob.glob(os.path.join(glob.escape(folder),
                                                          f"{prefix}*-{glob.escape(name)}"))
                if (match := own.match(os.path.basename(found)))
                and not process_running(int(match.group(1))))


def create_temp(path: str) -> str:
  """An empty new file under a `temp_path` name of ``path`` (mode 0666 minus the umask);
  returns its path."""
  tmp = temp_path(path)
  os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
  return tmp


def remove_stale_temps(path: str) -> list[str]:
  """Removes the temporary files of ``path`` whose writer has ended (`stale_temps`); returns
  their paths. A file that cannot be removed is left (it does no harm: a later write never
  reuses a name)."""
  removed = []
  for tmp in stale_temps(path):
    try:
      os.remove(tmp)
      removed.append(tmp)
    except OSError:
      pass
  return removed


def process_running(pid: int) -> bool:
  """Whether process ``pid`` exists on this machine (another user's included)."""
  try:
    os.kill(pid, 0)
  except (ProcessLookupError, OverflowError):  # none, or a number larger than any pid
    return False
  except PermissionError:  # another user's
    return True
  return True


def _read_holder(fd: int) -> str:
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 2000).decode("utf-8", "replace").strip()
  except OSError:
    text = ""
  return text or "its pid is unknown"


def config_difference(saved: dict, now: dict, ignore: Iterable[str] = ()) -> list[str]:
  """``field: saved → now`` for every field that changes results (not execution fields, nor
  ``ignore``). A field missing from ``saved`` (a file written before the field existed)
  counts as its default, as a checkpoint's does (`Config.resume_mismatch`)."""
  from fedjax_lib.config import Config  # pylint: disable=import-outside-toplevel
  saved = Config.with_defaults(saved)
  keys = sorted((set(saved) | set(now)) - set(EXECUTION_FIELDS) - set(ignore))
  return [f"{k}: {saved.get(k)!r} → {now.get(k)!r}" for k in keys
          if _canonical(saved.get(k)) != _canonical(now.get(k))]


def _canonical(value):
  return json.loads(json.dumps(value, sort_keys=True, default=str))


def check_overwrite(files: Iterable[tuple[str, dict, Iterable[str]]], overwrite: bool) -> None:
  """Refuses to replace a results JSON of a different configuration.

  ``files`` are ``(path, config dict, fields allowed to differ)`` for the results JSON files
  this run will write (a run continued from its checkpoint may change the fields a resume
  may change, e.g. extend ``global_rounds``). An unreadable file counts as different; with
  ``overwrite`` every file may be replaced.

  Raises:
    ConfigError: a file holds results of a different configuration and ``overwrite`` is
      False; the message names the file and the fields that differ.
  """
  if overwrite:
    return
  for path, config, ignore in files:
    if not os.path.exists(path):
      continue
    try:
      with open(path, encoding="utf-8") as f:
        saved = json.load(f).get("config")
      diff = config_difference(saved, config, ignore) if isinstance(saved, dict) else [
          "no config in the file"]
    except (OSError, ValueError, AttributeError) as e:
      diff = [f"unreadable: {type(e).__name__}"]
    if diff:
      shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
      raise ConfigError(f"{path} holds results of a different config ({shown}); use "
                        "--overwrite to replace them, or another --out or -go")


def remove_tree(path: str) -> None:
  """Removes a folder (a checkpoint folder replaced with ``overwrite``), OS errors as one line."""
  try:
    shutil.rmtree(path)
  except FileNotFoundError:
    pass
  except OSError as e:
    raise os_error("remove", path, e) from None
