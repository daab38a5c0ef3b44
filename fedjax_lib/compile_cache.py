"""A persistent compilation cache for runs: ``--compile-cache [DIR]`` (``Config.compile_cache``).

A run compiles every program it runs before its first round: the initialisation (op by op on
the sequential executor), the round, the evaluation. On this project's 2-core CPU that is most
of a short run's wall time (FedAvg's CNN on the bundled digits: ~6 s of ~12 s for one round).
With the cache, XLA's executables are written to a folder and the next process that compiles
the same program (same computation, XLA flags, devices, jax and jaxlib versions: JAX's cache
key) loads it instead; the values it computes are the same to the bit, since the executable is.
So a second run of a configuration, runs that differ only in their seed (an input of every
program; the partition fixed by ``partition_seed``, since a new partition has new table
sizes), and every resumed run start in seconds. A single run compiles its learning rate and
hyperparameters into its round's training program: a run with another ``-lr`` loads all the
others.

This is JAX's own persistent cache (``jax_compilation_cache_dir``) with every program written,
whatever it took to compile (JAX's default keeps only those that took a second or more, which on
a CPU is almost none of ours). JAX's own size limit (``jax_compilation_cache_max_size``) is not
used: with it JAX lists the whole folder at every write, which is quadratic in the programs a
run compiles (1,600 writes took 79 s here, 0.15 s without the limit; an HtFE-img-8 run writes
~1,600). Instead :func:`enable` keeps the folder under :data:`DEFAULT_MAX_BYTES` once per run,
removing the executables least recently used (by their files' access and write times). A
limit the user sets for JAX is JAX's to enforce and :func:`enable` leaves the folder alone.

Runs may share the folder at the same time, and a run may be killed at any moment. JAX's own
folder cache writes an entry in place, without a lock: a process killed during the write
(SIGKILL, a job's time limit, a Ctrl-C that stopped the run at once) or a full disk left a
truncated entry, which every later run read, warned about (``UserWarning: Error reading
persistent compilation cache entry``, two lines per program) and compiled anew, and which JAX
never replaced (it writes nothing over an existing entry). :func:`enable` therefore hands JAX
:class:`FolderCache`, the same folder and file names with two differences: an entry is written
to a temporary file and renamed into place (a reader sees all of it or none of it; a stop now
waits for it), and an entry that does not decompress whole is removed when read and counts as a
miss, so the program is compiled and written again, silently. A run that reads an entry
:func:`prune` removes at that moment compiles the program too; its results are the same either
way. JAX's own cache stays where its internals differ from what this expects (a JAX release that
moved them), and where the user set JAX's size limit or its content check, which JAX's cache
enforces. The folder is trusted code: JAX loads what it holds as executables, so it is created
readable by its owner only and must not be writable by others. The setting is process-wide and
stays on after the run.

Off by default: the folder grows with every configuration run (up to the limit), and on some
CPUs XLA refuses to load what it wrote (JAX issue #38445: the CPU's tuning flags taken for
instruction sets; such a process logs one error per program and compiles as without the cache).
"""

from __future__ import annotations

import os
import secrets
import stat
from typing import Callable, Optional

from fedjax_lib.output import process_running
from fedjax_lib.stopping import STOPPER

#: The folder's size limit (:func:`prune`) unless ``jax_compilation_cache_max_size`` is set.
DEFAULT_MAX_BYTES = 2 << 30

#: ``compile_cache`` value that means the default folder (:func:`default_folder`).
DEFAULT = "auto"


def default_folder() -> str:
  """``$XDG_CACHE_HOME/fedjax_lib/xla``, or ``~/.cache/fedjax_lib/xla``."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "fedjax_lib", "xla")


def resolve(value: str) -> str:
  """The folder ``value`` names: '' (off) stays '', ``auto`` is :func:`default_folder`."""
  if not value:
    return ""
  return os.path.abspath(os.path.expanduser(default_folder() if value == DEFAULT else value))


def problem(value) -> Optional[str]:
  """Why ``value`` cannot be the cache folder (one line), or None; checks, creates nothing."""
  if not isinstance(value, str):
    return "is not a folder path"
  path = resolve(value)
  if not path:
    return None
  if os.path.exists(path):
    if not os.path.isdir(path):
      return "is a file, not a folder"
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
      return "is a folder this user cannot read and write"
    info = os.stat(path)
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
      return "belongs to another user (JAX runs what the folder holds)"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
      return "is writable by other users (JAX runs what the folder holds)"
    return None
  parent = os.path.dirname(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
    return f"cannot be created ({parent} is not a folder this user can write to)"
  return None


def enable(value: str) -> str:
  """Turns the cache on in this process, in the folder ``value`` names (created, owner-only);
  returns the folder. A cache already on in another folder is switched to this one."""
  # pylint: disable=import-outside-toplevel
  import jax
  from jax.experimental.compilation_cache import compilation_cache
  # pylint: enable=import-outside-toplevel
  path = resolve(value)
  os.makedirs(path, mode=0o700, exist_ok=True)
  if jax.config.jax_compilation_cache_max_size == -1:  # no limit of the user's: ours
    prune(path, DEFAULT_MAX_BYTES)
  settings = {"jax_compilation_cache_dir": path, "jax_enable_compilation_cache": True,
              "jax_persistent_cache_min_compile_time_secs": 0.0}
  if any(getattr(jax.config, name) != want for name, want in settings.items()):
    compilation_cache.reset_cache()  # JAX opens its cache once, at its first compilation
    for name, want in settings.items():
      jax.config.update(name, want)
  if (jax.config.jax_compilation_cache_max_size == -1
      and not getattr(jax.config, "jax_compilation_cache_check_contents", False)):
    install(path)
  return path


_SUFFIX = "-cache"  # JAX's names: <key>-cache (and <key>-atime with JAX's size limit)
_TEMP_MARK = "-cache.tmp-"  # .<key>-cache.tmp-<pid>-<8 hex digits>: an entry being written


class FolderCache:
  """JAX's persistent cache in a folder (JAX's ``CacheInterface``: ``get`` and ``put``), with
  whole entries only: written to a temporary file and renamed into place; an entry that does
  not decompress (``decompress``: JAX's own) is removed when read and reported as a miss."""

  def __init__(self, path: str, decompress: Callable[[bytes], bytes]):
    self.path = self._path = path  # (JAX logs ``_path``)
    self._decompress = decompress

  def _entry(self, key: str) -> str:
    if not key or os.sep in key or key.startswith("."):
      raise ValueError(f"cache key {key!r} is not a file name")
    return os.path.join(self.path, key + _SUFFIX)

  def get(self, key: str) -> Optional[bytes]:
    entry = self._entry(key)
    try:
      with open(entry, "rb") as f:
        value = f.read()
    except FileNotFoundError:  # not written yet, or pruned a moment ago
      return None
    try:
      self._decompress(value)
    except Exception:  # pylint: disable=broad-except  # truncated: written by a killed process
      try:
        os.remove(entry)
      except OSError:
        pass
      return None
    return value

  def put(self, key: str, value: bytes) -> None:
    entry = self._entry(key)
    if os.path.exists(entry):  # as JAX: the first writer's entry stays
      return
    tmp = os.path.join(self.path,
                       f".{key}{_TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    with STOPPER.writing():  # a Ctrl-C that stops the run now waits for the entry
      try:
        with open(tmp, "xb") as f:
          f.write(value)
        os.replace(tmp, entry)
      finally:
        if os.path.exists(tmp):  # the write failed (a full disk): JAX warns about it
          os.remove(tmp)


def install(path: str) -> bool:
  """Makes :class:`FolderCache` in ``path`` JAX's persistent cache (the cache must be on, in
  ``path``: :func:`enable` does both); returns whether it could. False where this JAX keeps
  its cache elsewhere than ``jax._src.compilation_cache._cache`` (JAX's own then stays)."""
  # pylint: disable=protected-access,import-outside-toplevel
  try:
    from jax._src import compilation_cache as jax_cache
  except ImportError:
    return False
  names = ("_cache", "_cache_initialized", "_cache_initialized_mutex", "decompress_executable")
  if not all(hasattr(jax_cache, name) for name in names):
    return False
  with jax_cache._cache_initialized_mutex:
    current = jax_cache._cache
    if not (isinstance(current, FolderCache) and current.path == path):
      jax_cache._cache = FolderCache(path, jax_cache.decompress_executable)
      jax_cache._cache_initialized = True
  return True


def entries(path: str) -> int:
  """How many executables the folder holds."""
  try:
    return sum(name.endswith(_SUFFIX) and not name.startswith(".") for name in os.listdir(path))
  except OSError:
    return 0


def prune(path: str, max_bytes: int) -> int:
  """Removes executables from the folder, least recently used first (the later of a file's
  access and write times), until it holds at most ``max_bytes``; returns how many. Also
  removes the temporary files of writers that have ended (:class:`FolderCache`'s, of a
  process killed while it wrote)."""
  found = []
  with os.scandir(path) as listing:
    for entry in listing:
      if entry.name.startswith(".") and _TEMP_MARK in entry.name:
        pid = entry.name.rsplit(_TEMP_MARK, 1)[1].split("-")[0]
        if pid.isdigit() and not process_running(int(pid)):
          try:
            os.remove(entry.path)
          except OSError:
            pass
      elif entry.name.endswith(_SUFFIX) and entry.is_file(follow_symlinks=False):
        info = entry.stat(follow_symlinks=False)
        found.append((max(info.st_atime, info.st_mtime), info.st_size, entry.path))
  total, removed = sum(size for _, size, _ in found), 0
  for _, size, name in sorted(found):
    if total <= max_bytes:
      break
    for victim in (name, name[:-len(_SUFFIX)] + "-atime"):  # JAX's access record, if any
      try:
        os.remove(victim)
      except FileNotFoundError:
        pass
    total, removed = total - size, removed + 1
  return removed

