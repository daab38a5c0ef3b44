"""Generator folders: ``generator.json`` plus an Orbax checkpoint of the parameters.

Layout of a folder written by `save_generator` (and by ``python -m fedjax_lib.generators
train``, which adds ``samples.png`` and ``reconstructions.png``)::

    <path>/generator.json   {"kind": "vae", "config": {...}, "format": 1, "info": {...}}
    <path>/params/          orbax.checkpoint StandardCheckpointHandler (synchronous)

``generator.json`` is written last and replaced atomically (a temporary file, then
``os.replace``); a save removes it before it swaps in new parameters. So a run killed at any
moment leaves either a complete generator (the previous or the new one) or a folder without
``generator.json``, which `load_generator` refuses; a killed save's leftovers
(``params.new*``, ``params.old``, ``generator.json.tmp``) are cleared by the next save.

`load_generator` restores into the structure, shapes and dtypes the kind's ``init`` gives for
the stored config, and checks them; every problem is one `ConfigError` line naming the path.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fedjax_lib.core.checkpoint import quiet_failed_reads
from fedjax_lib.errors import ConfigError
from fedjax_lib.generators.base import Generator
from fedjax_lib.generators.registry import generator_kind
from fedjax_lib.output import os_error

FORMAT = 1
READABLE_FORMATS = (1,)
CONFIG_FILE = "generator.json"
PARAMS_DIR = "params"
# What a generator folder holds besides CONFIG_FILE: the parameters, the training command's
# images, and a killed save's leftovers (Orbax's own temporary folder is params.new<suffix>).
_OWN_FILES = (PARAMS_DIR, "samples.png", "reconstructions.png", f"{CONFIG_FILE}.tmp")
_LEFTOVER_PREFIXES = (f"{PARAMS_DIR}.new", f"{PARAMS_DIR}.old")
_ACCEPTED = ("a generator folder is one written by `python -m fedjax_lib.generators train` or "
             "save_generator (generator.json and params/)")


def _one_line(error: BaseException, limit: int = 200) -> str:
  text = " ".join(f"{type(error).__name__}: {error}".split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


def is_generator_folder(path: str) -> bool:
  """Whether ``path`` is a folder holding a ``generator.json`` (complete or not)."""
  return os.path.isfile(os.path.join(path, CONFIG_FILE))


def check_output_folder(path: str) -> str:
  """The absolute ``path`` if a generator may be written there: it does not exist, or is an
  empty folder, or a generator folder (replaced), or holds only a killed save's leftovers.

  Raises:
    ConfigError: ``path`` is a file, or a folder with other contents.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.exists(path):
    return path
  if not os.path.isdir(path):
    raise ConfigError(f"generator output {path!r} is a file; give a new or empty folder, or "
                      "a generator folder to replace")
  entries = set(os.listdir(path))
  foreign = {name for name in entries
             if name not in _OWN_FILES and not name.startswith(_LEFTOVER_PREFIXES)}
  if not is_generator_folder(path) and foreign:
    shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
    raise ConfigError(f"generator output {path!r} is a non-empty folder that is not a "
                      f"generator folder (it holds {shown}); give a new or empty folder, or a "
                      "generator folder to replace")
  return path


def _check_params(params, abstract, where: str) -> None:
  """``params`` has ``abstract``'s tree structure, shapes and dtypes, or a `ConfigError`."""
  expected = jax.tree_util.tree_structure(abstract)
  found = jax.tree_util.tree_structure(params)
  if expected != found:
    raise ConfigError(f"{where}: the parameter tree's structure does not match the "
                      f"config's ({expected.num_leaves} leaves expected, {found.num_leaves} "
                      "found)")
  for (keys, want), have in zip(jax.tree_util.tree_flatten_with_path(abstract)[0],
                                jax.tree.leaves(params)):
    shape, dtype = tuple(np.shape(have)), jnp.result_type(have)
    if shape != tuple(want.shape) or dtype != want.dtype:
      raise ConfigError(f"{where}: parameter {jax.tree_util.keystr(keys)} has shape {shape} "
                        f"{dtype}, the config needs {tuple(want.shape)} {want.dtype}")


def _abstract_params(spec, config: dict):
  return jax.eval_shape(lambda: spec.init(config, jax.random.key(0)))


def _write_json(path: str, content: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(content, f, indent=2, sort_keys=True)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def save_generator(path: str, kind: str, config: dict, params, *, info: dict | None = None
                   ) -> None:
  """Writes a generator folder that `load_generator` reads back.

  ``generator.json`` holds ``{"kind", "config" (defaults filled in), "format": 1, "info"}``;
  ``params/`` an Orbax checkpoint of ``params``. An existing generator folder is replaced
  (see the module docstring for why a killed save never leaves a half-written generator).

  Args:
    path: the folder (created if needed).
    kind: a registered kind (``'vae'``).
    config: the kind's config.
    params: the parameters; checked against the kind's structure, shapes and dtypes.
    info: JSON-serialisable extras (training settings, step, loss).

  Raises:
    ConfigError: unknown kind, bad config, parameters that do not fit it, ``path`` a file or
      someone else's folder, or the file system refused a write.
  """
  spec = generator_kind(kind)
  config = spec.resolve(config)
  path = check_output_folder(path)
  _check_params(params, _abstract_params(spec, config), f"save_generator({path!r})")
  content = {"kind": kind, "config": config, "format": FORMAT, "info": info or {}}
  try:
    json.dumps(content)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"save_generator({path!r}): info is not JSON-serialisable "
                      f"({_one_line(e)})") from None
  config_path = os.path.join(path, CONFIG_FILE)
  final, new, old = (os.path.join(path, name) for name in
                     (PARAMS_DIR, f"{PARAMS_DIR}.new", f"{PARAMS_DIR}.old"))
  try:
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
      if name.startswith(_LEFTOVER_PREFIXES):
        shutil.rmtree(os.path.join(path, name), ignore_errors=True)
    with quiet_failed_reads(), ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
      checkpointer.save(new, args=ocp.args.StandardSave(params))
    if os.path.exists(config_path):
      os.remove(config_path)  # from here until the new one is written, the folder is refused
    if os.path.exists(final):
      os.replace(final, old)
    os.replace(new, final)
    _write_json(config_path, content)
    shutil.rmtree(old, ignore_errors=True)
  except Exception as e:  # pylint: disable=broad-except  (boundary: OS and Orbax failures)
    shutil.rmtree(new, ignore_errors=True)
    cause = _os_error_in(e)
    if cause is not None:
      raise os_error("write the generator folder", path, cause) from None
    raise ConfigError(f"cannot write the generator folder {path!r} ({_one_line(e)})") from None


def _os_error_in(error: BaseException) -> OSError | None:
  """The OSError ``error`` is or wraps (Orbax re-raises them as other types), or None."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, OSError):
      return error
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return None


def _read_config(path: str) -> dict:
  """``generator.json`` of the folder ``path``, checked to have a kind, config and format."""
  config_path = os.path.join(path, CONFIG_FILE)
  if not os.path.exists(path):
    raise ConfigError(f"generator path {path!r} does not exist; {_ACCEPTED}")
  if not os.path.isdir(path):
    raise ConfigError(f"generator path {path!r} is a file, not a folder; {_ACCEPTED}")
  if not os.path.isfile(config_path):
    raise ConfigError(f"generator path {path!r} has no {CONFIG_FILE} (not a generator folder, "
                      f"or a save that was interrupted); {_ACCEPTED}")
  try:
    with open(config_path, encoding="utf-8") as f:
      content = json.load(f)
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise ConfigError(f"cannot read {config_path!r} ({_one_line(e)}); {_ACCEPTED}") from None
  if not isinstance(content, dict) or not {"kind", "config", "format"} <= set(content):
    raise ConfigError(f"{config_path!r} is not a generator description (it needs the keys "
                      f"kind, config and format); {_ACCEPTED}")
  if content["format"] not in READABLE_FORMATS:
    raise ConfigError(f"{config_path!r} has format {content['format']!r}; this version reads "
                      f"format(s) {', '.join(map(str, READABLE_FORMATS))}")
  return content


def read_generator_info(path: str) -> dict:
  """The ``info`` a saved generator's ``generator.json`` holds (``{}`` when none)."""
  info = _read_config(os.path.abspath(os.fspath(path))).get("info", {})
  return info if isinstance(info, dict) else {}


def load_generator(path: str) -> tuple[Generator, Any]:
  """Reads a generator folder written by `save_generator` or the training command.

  Args:
    path: the folder.

  Returns:
    ``(generator, params)``; ``params`` as the kind's ``init`` structures them (for ``'vae'``:
    ``{'encoder': ..., 'decoder': ...}``), as jax arrays.

  Raises:
    ConfigError: one line naming the path when it is missing, not a generator folder, its
      ``generator.json`` is unreadable or names an unknown kind or a bad config, or its
      parameters are missing, unreadable or do not fit the config.
  """
  path = os.path.abspath(os.fspath(path))
  content = _read_config(path)
  config_path = os.path.join(path, CONFIG_FILE)
  try:
    spec = generator_kind(content["kind"])
    config = spec.resolve(content["config"])
  except ConfigError as e:
    raise ConfigError(f"{config_path!r}: {e}") from None
  params_path = os.path.join(path, PARAMS_DIR)
  if not os.path.isdir(params_path):
    raise ConfigError(f"generator path {path!r} has no {PARAMS_DIR}/ checkpoint; {_ACCEPTED}")
  abstract = _abstract_params(spec, config)
  try:
    with quiet_failed_reads(), ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
      params = checkpointer.restore(params_path, args=ocp.args.StandardRestore(abstract))
  except Exception as e:  # pylint: disable=broad-except  (boundary: any Orbax failure)
    raise ConfigError(f"cannot read the parameters {params_path!r} ({_one_line(e)}); "
                      f"{_ACCEPTED}") from None
  _check_params(params, abstract, f"generator path {path!r}")
  return spec.build(config), jax.tree.map(jnp.asarray, params)
