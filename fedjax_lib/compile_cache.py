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

Runs may share the folder at the same time. JAX writes an entry without a lock (it locks only
with its size limit): a run that reads an entry while another is still writing it, or after
:func:`prune` removed it, warns (``Error reading persistent compilation cache entry``) and
compiles the program itself, so its results are the same either way. The folder is trusted
code: JAX loads what it holds as executables, so it is created readable by its owner only and
must not be writable by others. The setting is process-wide and stays on after the run.

Off by default: the folder grows with every configuration run (up to the limit), and on some
CPUs XLA refuses to load what it wrote (JAX issue #38445: the CPU's tuning flags taken for
instruction sets; such a process logs one error per program and compiles as without the cache).
"""

from __future__ import annotations

import os
import stat
from typing import Optional

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
  return path


def entries(path: str) -> int:
  """How many executables the folder holds."""
  try:
    return sum(name.endswith("-cache") for name in os.listdir(path))
  except OSError:
    return 0


def prune(path: str, max_bytes: int) -> int:
  """Removes executables from the folder, least recently used first (the later of a file's
  access and write times), until it holds at most ``max_bytes``; returns how many."""
  found = []
  with os.scandir(path) as listing:
    for entry in listing:
      if entry.name.endswith("-cache") and entry.is_file(follow_symlinks=False):
        info = entry.stat(follow_symlinks=False)
        found.append((max(info.st_atime, info.st_mtime), info.st_size, entry.path))
  total, removed = sum(size for _, size, _ in found), 0
  for _, size, name in sorted(found):
    if total <= max_bytes:
      break
    for victim in (name, name[:-len("-cache")] + "-atime"):  # JAX's access record, if any
      try:
        os.remove(victim)
      except FileNotFoundError:
        pass
    total, removed = total - size, removed + 1
  return removed

