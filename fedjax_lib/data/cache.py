"""An on-disk cache of converted datasets: one uncompressed ``.npz`` per entry.

Converting a tfds dataset (decoding every image, resizing, tokenising) takes minutes; reading
the converted arrays back takes seconds. The first load of an entry writes them to ::

  <data_dir>/fedjax_arrays/<entry>-p<version>.npz

where ``<data_dir>`` is the ``data_dir`` argument, else ``$TFDS_DATA_DIR``, else tfds's
default ``~/tensorflow_datasets`` (`resolve_data_dir`), ``<entry>`` names the source and its
preprocessing (``mnist-28x28x1``, ``domainnet-clipart-64x64x3``), and ``<version>`` is the
preprocessing version of that entry: changing how an entry is computed means bumping it, so
stale files are never read.

Each file holds the entry's arrays plus ``__meta__``, a JSON string (no pickled objects, so
files load with ``allow_pickle=False``) recording the entry, the version, the tfds name and
version and the split sizes. A file is written to a temporary name in the same folder and
renamed over the target (atomic on POSIX), so a reader sees either no file or a whole one,
and two processes converting the same entry at once both succeed; the temporary file of a
process killed while it wrote is removed by the next write of that entry. A file that cannot
be read (truncated, bad CRC, missing arrays, a different entry) is reported with one warning
line and rebuilt.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Mapping
import warnings
import zipfile

import numpy as np

from fedjax_lib.errors import FedJaxWarning
from fedjax_lib.output import create_temp, remove_stale_temps

CACHE_FOLDER = "fedjax_arrays"
_META_KEY = "__meta__"

Arrays = dict[str, np.ndarray]


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> str:
  """The tfds data directory: ``data_dir``, else ``$TFDS_DATA_DIR``, else
  ``~/tensorflow_datasets`` (tfds's own default)."""
  if data_dir:
    return os.path.expanduser(os.fspath(data_dir))
  env = os.environ.get("TFDS_DATA_DIR")
  if env:
    return os.path.expanduser(env)
  return os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


def cache_path(entry: str, version: int, data_dir: str | os.PathLike | None = None) -> str:
  """``<data_dir>/fedjax_arrays/<entry>-p<version>.npz`` (see the module docstring)."""
  return os.path.join(resolve_data_dir(data_dir), CACHE_FOLDER, f"{entry}-p{version}.npz")


def is_cached(entry: str, version: int, data_dir: str | os.PathLike | None = None) -> bool:
  """Whether the entry's file exists (not whether it is readable)."""
  return os.path.isfile(cache_path(entry, version, data_dir))


def _read(path: str, entry: str, version: int, required: tuple[str, ...],
          also: tuple[str, ...]) -> Arrays:
  """Reads every array of ``path``; raises ValueError if the file is not a whole entry."""
  with open(path, "rb") as f:
    archive = np.load(f, allow_pickle=False)
    if not isinstance(archive, np.lib.npyio.NpzFile):
      raise ValueError("not an .npz archive")
    with archive:
      arrays = {name: archive[name] for name in archive.files}  # reads and CRC-checks all
  meta_array = arrays.pop(_META_KEY, None)
  if meta_array is None:
    raise ValueError("no metadata")
  meta = json.loads(str(meta_array))
  if not isinstance(meta, dict):
    raise ValueError("malformed metadata")
  if meta.get("entry") != entry or meta.get("version") != version:
    raise ValueError(f"it holds entry {meta.get('entry')!r} version {meta.get('version')}")
  missing = [name for name in (*required, *also) if name not in arrays]
  if missing:
    raise ValueError(f"arrays {missing} are missing")
  lengths = {name: len(arrays[name]) for name in required}
  if len(set(lengths.values())) > 1:
    raise ValueError(f"arrays of different lengths {lengths}")
  return arrays


def _write(path: str, arrays: Mapping[str, np.ndarray], meta: Mapping) -> None:
  """Writes ``arrays`` and ``meta`` to ``path`` atomically (temporary file, then rename).

  The temporary file is `output.create_temp`'s ``.tmp-<pid>-<hex>-<name>`` (mode 0666 minus the
  umask, as the results files); those of a writer that has ended (a conversion killed while it
  wrote: entries can be gigabytes) are removed first."""
  folder = os.path.dirname(path)
  os.makedirs(folder, exist_ok=True)
  remove_stale_temps(path)
  tmp_path = create_temp(path)
  try:
    with open(tmp_path, "wb") as f:
      np.savez(f, **arrays, **{_META_KEY: np.array(json.dumps(dict(meta)))})
    os.replace(tmp_path, path)
  except BaseException:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    raise


def cached_arrays(entry: str, version: int, build: Callable[[], tuple[Arrays, dict]], *,
                  data_dir: str | os.PathLike | None = None, required: tuple[str, ...] = (),
                  also: tuple[str, ...] = (), write: bool = True) -> Arrays:
  """The entry's arrays: read from the cache, or built with ``build()`` and written there.

  Args:
    entry: the entry's name (source + preprocessing), a valid file-name stem.
    version: the entry's preprocessing version (part of the file name).
    build: returns ``(arrays, meta)``: the arrays to cache (all with the same leading
      length) and JSON-serialisable facts about their source.
    data_dir: see `resolve_data_dir`.
    required: per-sample arrays a cached file must hold to be used (same leading length).
    also: other arrays it must hold (any length: a vocabulary, class names).
    write: store what ``build`` returns (``False``: build without touching the cache).

  Returns:
    ``{name: array}`` (without the metadata).
  """
  path = cache_path(entry, version, data_dir)
  if write and os.path.isfile(path):
    try:
      return _read(path, entry, version, required, also)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
      warnings.warn(f"dataset cache file {path} is unreadable ({type(e).__name__}: "
                    f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); "
                    "rebuilding it", FedJaxWarning, stacklevel=2)
  arrays, meta = build()
  if write:
    _write(path, arrays, {"entry": entry, "version": version, **meta})
  return dict(arrays)
