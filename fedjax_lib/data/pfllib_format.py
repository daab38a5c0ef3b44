"""Reading and writing PFLlib's dataset folders, of every modality.

Layout (PFLlib ``dataset/<Name>/``)::

  config.json          optional metadata; PFLlib's runtime never reads it (Shakespeare has none)
  train/<id>.npz       id = 0 .. K-1
  test/<id>.npz

Each ``.npz`` is written with ``np.savez_compressed(f, data={'x': x, 'y': y})``: the dict is
stored as a pickled 0-d object array, so reading needs ``allow_pickle=True`` and ``.tolist()``.
A plain npz with arrays ``x`` and ``y`` is read too. Labels ``y`` are integers (PFLlib: int64).
What ``x`` holds, and what `read_pfllib_folder` makes of it (every ``x`` ends up float32 in
`FederatedData`):

=======================  ====================================  ==========================
PFLlib folders           stored ``x``                          read as (one sample)
=======================  ====================================  ==========================
images (MNIST, Cifar10,  float32 ``[N, C, H, W]`` (NCHW),      ``(H, W, C)`` (NHWC)
TinyImagenet, Digit5 …)  normalised
HAR                      float32 ``[N, 9, 1, 128]``            ``(1, 128, 9)``
PAMAP2                   float32 ``[N, 9, 3, 256]``            ``(3, 256, 9)``
AG News, Sogou News      ``(token_ids, length)`` pairs: an     ``(max_len,)`` token ids
                         object array ``[N, 2]`` (or a list)
                         of (list of max_len ints, int)
Shakespeare              int ``[N, 80]`` character ids         ``(80,)`` ids
AmazonReview             float32 ``[N, 5000]``                 ``(5000,)``
=======================  ====================================  ==========================

Every 4-D ``x`` is transposed ``[N, C, H, W] → [N, H, W, C]`` on the way in and back on the
way out: images become this library's NHWC, and the sensor windows (9 channels of 1 × 128 or
3 × 256 steps) the NHWC windows the HARCNN models (`fedjax_lib.models.sensor`) take. Other
ranks (flat features ``[N, D]``, token ids ``[N, L]``) are kept as they are.

Text pairs: PFLlib's generators store every sequence ``<cls>`` + tokens, zero-padded or cut
to ``max_len`` (200), paired with its length measured *after* padding, so the length always
equals ``max_len`` and carries nothing; it is dropped (the text models here read every
position, id 0 being padding). All sequences of a file must have one length, every id must
be an integer in ``[0, 2**24)`` (float32 holds them exactly) and every stored length an
integer in ``[0, max_len]``; anything else is a one-line `DataError` naming the file.
PFLlib's runtime picks its text reader by the folder's name (``"News"`` in it), this reader
by what the file holds.

`write_pfllib_folder` writes the same formats (see its ``x_format``), so a folder written
here reads back to the same arrays, here and in PFLlib.

Security: ``allow_pickle=True`` can run code embedded in a file; read only folders you trust
(PFLlib's format needs it).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from typing import Any
import zipfile

import numpy as np

from fedjax_lib.data import registry
from fedjax_lib.data.federated import FederatedData
from fedjax_lib.errors import DataError
from fedjax_lib.output import OLD_PREFIX, stale_temps, temp_path

CONFIG_FILE = "config.json"
SIZES_KEY = "Size of samples for labels in clients"
_CLIENT_FILE = re.compile(r"^(\d+)\.npz$")


def partition_meta(scheme: str | None, *, balance: bool = False, alpha: float = 0.1,
                   batch_size: int = 10) -> dict[str, Any]:
  """PFLlib's config.json description of a partition scheme.

  PFLlib's generator CLI records ``non_iid`` (``iid`` → false) and ``partition``
  (``"pat" | "dir" | "exdir"``, ``None`` for ``iid``).
  """
  return {
      "non_iid": scheme not in (None, "iid"),
      "balance": bool(balance),
      "partition": None if scheme in (None, "iid") else scheme,
      "alpha": alpha,
      "batch_size": batch_size,
  }


def _to_storage_layout(x: np.ndarray) -> np.ndarray:
  """NHWC → NCHW for 4-D image arrays; anything else unchanged."""
  return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if x.ndim == 4 else x


def _from_storage_layout(x: np.ndarray) -> np.ndarray:
  """NCHW → NHWC for 4-D image arrays; anything else unchanged."""
  return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if x.ndim == 4 else x


#: ``x`` layouts `write_pfllib_folder` writes (see its ``x_format``).
X_FORMATS = ("float32", "token_pairs", "token_ids")
#: Token ids above this are not exact in float32 (`FederatedData` keeps ``x`` float32).
MAX_TOKEN_ID = 2 ** 24 - 1


def default_x_format(name: str) -> str:
  """The ``x_format`` PFLlib stores dataset ``name`` in: ``token_pairs`` for its text sets
  (AG News, Sogou News), ``token_ids`` for Shakespeare, ``float32`` for everything else (a
  name the registry does not know included)."""
  spec = registry.resolve(name)
  if spec is None or spec.modality != "text":
    return "float32"
  return "token_ids" if spec.name == "shakespeare" else "token_pairs"


def _token_matrix(ids: np.ndarray, what: str) -> np.ndarray:
  """``ids`` as ``[N, L]`` int64 token ids; a DataError naming ``what`` unless ``ids`` is 2-D
  and every id an integer in ``[0, MAX_TOKEN_ID]``."""
  if ids.ndim != 2 or not (np.issubdtype(ids.dtype, np.number) or ids.dtype == bool):
    raise DataError(f"{what}: token ids must be a numeric [N, max_len] array, got shape "
                    f"{ids.shape} and dtype {ids.dtype}")
  if not ids.size:
    return ids.astype(np.int64)
  if not np.issubdtype(ids.dtype, np.integer) and not np.all(np.mod(ids, 1) == 0):
    bad = np.flatnonzero(np.mod(ids, 1) != 0)[0] // ids.shape[1]
    raise DataError(f"{what}: token ids must be integers, sample {bad} has "
                    f"{ids[bad][np.mod(ids[bad], 1) != 0][0].item()!r}")
  if ids.min() < 0:
    bad = int(np.flatnonzero(ids.min(axis=1) < 0)[0])
    raise DataError(f"{what}: negative token id {ids[bad].min().item()!r} in sample {bad}; token "
                    "ids must be >= 0")
  if ids.max() > MAX_TOKEN_ID:
    raise DataError(f"{what}: token id {ids.max().item()!r} is above {MAX_TOKEN_ID} (float32 holds "
                    "ids exactly only up to 2**24)")
  return ids.astype(np.int64)


def _text_token_ids(path: str, x: Any) -> np.ndarray:
  """PFLlib's text ``x`` (AG News, Sogou News: a list, or an ``[N, 2]`` or ``[N]`` object
  array, of ``(token ids, length)`` pairs) as ``[N, max_len]`` int64 ids; the lengths are
  checked to lie in ``[0, max_len]`` and dropped."""
  if isinstance(x, np.ndarray) and x.ndim == 2 and x.shape[1] == 2:
    tokens, lengths = list(x[:, 0]), list(x[:, 1])
  else:
    try:
      items = list(x)
      if not all(len(item) == 2 for item in items):
        raise TypeError("not pairs")
    except TypeError as e:
      raise DataError(f"{path!r}: x is neither a numeric array nor PFLlib's text format (a "
                      "list of (token ids, length) pairs)") from e
    tokens, lengths = [item[0] for item in items], [item[1] for item in items]
  if not tokens:
    return np.zeros((0, 0), np.int64)
  try:
    sizes = [len(t) for t in tokens]
  except TypeError as e:
    raise DataError(f"{path!r}: x holds pairs whose first item is not a list of token ids; "
                    "PFLlib's text format is (token ids, length) pairs") from e
  ragged = next((i for i, n in enumerate(sizes) if n != sizes[0]), None)
  if ragged is not None:
    raise DataError(f"{path!r}: text sequences have different lengths (sample 0 has "
                    f"{sizes[0]} tokens, sample {ragged} has {sizes[ragged]}); PFLlib pads or "
                    "cuts every sequence to max_len")
  try:
    ids = np.array(tokens)
  except ValueError as e:
    raise DataError(f"{path!r}: token lists must be flat lists of integer ids") from e
  ids = _token_matrix(ids, repr(path))
  lengths = np.asarray(lengths)
  max_len = ids.shape[1]
  if (lengths.ndim != 1 or not np.issubdtype(lengths.dtype, np.number)
      or not np.all(np.mod(lengths, 1) == 0) or lengths.min() < 0 or lengths.max() > max_len):
    raise DataError(f"{path!r}: the stored text lengths must be integers in [0, {max_len}] "
                    "(the second item of each (token ids, length) pair)")
  return ids


def _to_pairs(ids: np.ndarray) -> np.ndarray:
  """PFLlib's text ``x``: an ``[N, 2]`` object array of (list of ids, length), as its
  generators' ``np.array([(text, len(text)), ...], dtype=object)`` makes it."""
  pairs = np.empty((ids.shape[0], 2), dtype=object)
  for i, row in enumerate(ids):
    pairs[i, 0], pairs[i, 1] = row.tolist(), int(ids.shape[1])
  return pairs


def _save_client(path: str, x: np.ndarray, y: np.ndarray, x_format: str, what: str) -> None:
  """Writes one client file; ``what`` names the client in errors."""
  if x_format == "token_pairs":
    stored = _to_pairs(_token_matrix(x, what))
  elif x_format == "token_ids":
    stored = _token_matrix(x, what)
  else:
    stored = _to_storage_layout(x).astype(np.float32)
  with open(path, "wb") as f:
    np.savez_compressed(f, data={"x": stored, "y": y.astype(np.int64)})


def write_pfllib_folder(data: FederatedData, folder: str | os.PathLike, *,
                        partition_meta: dict[str, Any] | None = None,
                        overwrite: bool = False, x_format: str | None = None) -> None:
  """Writes ``data`` as a PFLlib dataset folder (config.json, train/<id>.npz, test/<id>.npz).

  The folder is first written next to the target under a temporary name
  (``.tmp-<pid>-<hex>-<name>``) and then renamed, so an interrupted write leaves no
  half-written dataset folder; with ``overwrite`` the old folder is first moved aside
  (``.old-<pid>-<hex>-<name>``) and removed after the swap. What a process killed while it
  wrote left (SIGKILL, the out-of-memory killer) is dealt with by the next write to the same
  path: its temporary folder removed, and an old folder put back where the kill fell between
  the two renames (the target then missing), so the target holds the old dataset or the new
  one, never neither.

  config.json holds ``num_clients``, ``num_classes``, ``non_iid``, ``balance``, ``partition``,
  ``"Size of samples for labels in clients"`` (per client, ``[label, count]`` pairs over its
  train and test samples, labels it holds only), ``alpha`` and ``batch_size``, the fields
  PFLlib's generator writes; extra ``partition_meta`` keys are written after them.

  ``x`` is stored as PFLlib stores the dataset (``x_format``):

  * ``"float32"``: float32, 4-D arrays transposed to NCHW (images, sensor windows), others as
    they are (tabular features);
  * ``"token_pairs"``: AG News / Sogou News: an ``[N, 2]`` object array of (list of the
    ``max_len`` token ids, ``max_len``), what PFLlib's text reader unzips;
  * ``"token_ids"``: Shakespeare: an int64 ``[N, max_len]`` array.

  Either way `read_pfllib_folder` gives back the same arrays. PFLlib's runtime reads text
  pairs only from folders whose name contains ``"News"`` (and int ids only from names with
  ``"Shakespeare"``): name the folder accordingly to use it there.

  Args:
    data: the federated dataset.
    folder: target folder; must not exist unless ``overwrite``.
    partition_meta: ``non_iid``, ``balance``, ``partition``, ``alpha``, ``batch_size`` (see
      `partition_meta`); missing fields are written as null.
    overwrite: replace an existing folder.
    x_format: ``"float32"``, ``"token_pairs"`` or ``"token_ids"`` (see above); ``None``: the
      format PFLlib uses for ``data.name`` (`default_x_format`: ``token_pairs`` for AG News
      and Sogou News, ``token_ids`` for Shakespeare, else ``float32``).

  Raises:
    DataError: the target exists and ``overwrite`` is false, its parent does not exist, an
      unknown ``x_format``, or a token format for ``x`` that is not ``[N, L]`` integer ids
      in ``[0, 2**24)``.
  """
  x_format = default_x_format(data.name) if x_format is None else x_format
  if x_format not in X_FORMATS:
    raise DataError(f"x_format={x_format!r}; choose one of {', '.join(X_FORMATS)}")
  folder = os.path.abspath(os.fspath(folder))
  parent = os.path.dirname(folder)
  if os.path.isdir(parent):
    _finish_killed_writes(folder)
  if os.path.exists(folder) and not overwrite:
    raise DataError(f"dataset folder {folder!r} already exists; choose a new path or pass "
                    "overwrite=True")
  if not os.path.isdir(parent):
    raise DataError(f"cannot write dataset folder {folder!r}: parent directory {parent!r} "
                    "does not exist")
  meta = dict(partition_meta or {})
  counts = data.label_counts()
  config: dict[str, Any] = {
      "num_clients": data.num_clients,
      "num_classes": data.num_classes,
      "non_iid": meta.pop("non_iid", None),
      "balance": meta.pop("balance", None),
      "partition": meta.pop("partition", None),
      SIZES_KEY: [[[int(c), int(row[c])] for c in np.flatnonzero(row)] for row in counts],
      "alpha": meta.pop("alpha", None),
      "batch_size": meta.pop("batch_size", None),
  }
  config.update(meta)

  staging = temp_path(folder)
  os.mkdir(staging)
  try:
    for split in ("train", "test"):
      os.mkdir(os.path.join(staging, split))
      for client in range(data.num_clients):
        x, y = data.client_arrays(client, split)
        _save_client(os.path.join(staging, split, f"{client}.npz"), x, y, x_format,
                     f"x_format={x_format!r}, dataset {data.name!r}, {split} client {client}")
    with open(os.path.join(staging, CONFIG_FILE), "w") as f:
      json.dump(config, f)
    if os.path.exists(folder):  # overwrite: move the old folder aside, then swap
      trash = temp_path(folder, OLD_PREFIX)
      os.rename(folder, trash)
      try:
        os.rename(staging, folder)
      except BaseException:
        os.rename(trash, folder)
        raise
      shutil.rmtree(trash, ignore_errors=True)
    else:
      os.rename(staging, folder)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def _finish_killed_writes(folder: str) -> None:
  """Cleans up after writers of ``folder`` that were killed (see `write_pfllib_folder`): an
  old folder moved aside comes back if ``folder`` is missing (the most recently moved one, if
  several), every other one and every temporary folder is removed."""
  olds = stale_temps(folder, OLD_PREFIX)
  if olds and not os.path.exists(folder):
    newest = max(olds, key=lambda path: os.stat(path).st_ctime if os.path.exists(path) else 0)
    try:
      os.rename(newest, folder)
      olds.remove(newest)
    except OSError:  # another process finishing the same write first
      pass
  for stale in olds + stale_temps(folder):
    shutil.rmtree(stale, ignore_errors=True)


def _client_ids(split_dir: str) -> list[int]:
  """Sorted ids of the ``<id>.npz`` files in ``split_dir`` (hidden files ignored)."""
  ids = []
  for entry in os.listdir(split_dir):
    if entry.startswith("."):
      continue
    match = _CLIENT_FILE.match(entry)
    if match:
      ids.append(int(match.group(1)))
    elif entry.endswith(".npz"):
      raise DataError(f"unexpected file {os.path.join(split_dir, entry)!r}; client files must "
                      "be named <id>.npz with id = 0, 1, ...")
  return sorted(ids)


def _load_client(path: str) -> tuple[np.ndarray, np.ndarray]:
  """``(x, y)`` of one client file: a PFLlib pickled ``data`` dict or a plain npz with x/y."""
  try:
    loaded = np.load(path, allow_pickle=True)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError,
          TypeError, AttributeError, ImportError) as e:  # what np.load raises on bad files
    raise DataError(f"{path!r} is not a valid .npz file: {type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}") from e
  if not isinstance(loaded, np.lib.npyio.NpzFile):
    raise DataError(f"{path!r} is not a .npz archive (np.load returned "
                    f"{type(loaded).__name__}); expected np.savez_compressed output")
  with loaded as npz:
    keys = set(npz.files)
    try:
      if "data" in keys:
        payload = npz["data"]
        payload = payload.tolist() if payload.dtype == object and payload.ndim == 0 else None
        if not isinstance(payload, dict) or "x" not in payload or "y" not in payload:
          raise DataError(f"{path!r}: 'data' must be a pickled dict with keys 'x' and 'y'")
        x, y = payload["x"], payload["y"]
      elif {"x", "y"} <= keys:
        x, y = npz["x"], npz["y"]
      else:
        raise DataError(f"{path!r} lacks the arrays 'x' and 'y' (found keys "
                        f"{sorted(keys)}); expected np.savez_compressed(f, data={{'x': ..., "
                        "'y': ...}}) or keys x, y")
    except DataError:
      raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError,
            TypeError, AttributeError, ImportError) as e:  # a corrupt member
      raise DataError(f"{path!r} is not a valid .npz file: {type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}") from e
  if isinstance(x, (list, tuple)):  # a list of rows, or PFLlib's list of text pairs
    try:
      rows = np.asarray(x)
    except ValueError:  # ragged: (token list, length) pairs
      rows = None
    x = x if rows is None else rows
  if not isinstance(x, np.ndarray) or x.dtype == object:
    x = _text_token_ids(path, x)
  y = np.asarray(y)
  if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
    raise DataError(f"{path!r}: x has non-numeric dtype {x.dtype}")
  if y.ndim != 1:
    raise DataError(f"{path!r}: y must be 1-D labels, got shape {y.shape}")
  if x.ndim == 0 or x.shape[0] != y.shape[0]:
    raise DataError(f"{path!r}: x has {x.shape[0] if x.ndim else 0} samples (shape {x.shape}) "
                    f"but y has {y.shape[0]} labels")
  if y.size and not np.issubdtype(y.dtype, np.integer):
    if not (np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0)):
      raise DataError(f"{path!r}: labels must be integers, got dtype {y.dtype}")
  if x.size and not np.all(np.isfinite(x)):
    raise DataError(f"{path!r}: x contains NaN or inf values")
  return _from_storage_layout(x).astype(np.float32, copy=False), y.astype(np.int64)


def _read_config(folder: str) -> dict[str, Any] | None:
  path = os.path.join(folder, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      config = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(f"{path!r} is not valid JSON: {e}") from e
  if not isinstance(config, dict):
    raise DataError(f"{path!r} must hold a JSON object, got {type(config).__name__}")
  for key in ("num_clients", "num_classes"):
    value = config.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 1):
      raise DataError(f"{path!r}: {key} must be a positive integer, got {value!r}")
  return config


def read_pfllib_folder(folder: str | os.PathLike, *, num_clients: int | None = None,
                       num_classes: int | None = None,
                       name: str | None = None) -> FederatedData:
  """Reads a PFLlib dataset folder into a `FederatedData`.

  Clients are the files ``train/0.npz .. train/{K-1}.npz`` (ids must be consecutive from 0),
  each with a matching ``test/<id>.npz``. The flat ``x`` holds every client's train samples
  (clients in order) followed by every client's test samples. 4-D NCHW arrays become NHWC,
  PFLlib's text pairs ``[N, max_len]`` token ids (see the module docstring for each modality).

  ``num_classes`` is, in order: the argument, config.json's value, ``max label + 1``. A
  config.json is optional, but when present its ``num_clients``/``num_classes`` must agree with
  the files and with the arguments.

  Args:
    folder: the dataset folder.
    num_clients: expected number of clients (``None``: as many as the folder has).
    num_classes: number of classes (``None``: from config.json or the labels).
    name: dataset name (``None``: the folder's base name).

  Returns:
    The `FederatedData`.

  Raises:
    DataError: with a one-line message naming the offending path or value when the folder is
      missing, incomplete, inconsistent or malformed.
  """
  folder = os.fspath(folder)
  if not os.path.exists(folder):
    raise DataError(f"dataset folder {folder!r} does not exist; expected a PFLlib folder with "
                    "train/<id>.npz and test/<id>.npz")
  if not os.path.isdir(folder):
    raise DataError(f"dataset path {folder!r} is not a directory; expected a PFLlib folder "
                    "with train/ and test/ subfolders")
  for split in ("train", "test"):
    if not os.path.isdir(os.path.join(folder, split)):
      raise DataError(f"dataset folder {folder!r} has no {split}/ subfolder; a PFLlib folder "
                      "holds train/<id>.npz and test/<id>.npz")
  name = name or os.path.basename(os.path.normpath(os.path.abspath(folder)))
  config = _read_config(folder)
  config_path = os.path.join(folder, CONFIG_FILE)

  train_dir, test_dir = os.path.join(folder, "train"), os.path.join(folder, "test")
  train_ids, test_ids = _client_ids(train_dir), _client_ids(test_dir)
  if not train_ids:
    raise DataError(f"{train_dir!r} contains no client files (<id>.npz)")
  for expected, found in enumerate(train_ids):
    if expected != found:
      raise DataError(f"client ids in {train_dir!r} must be consecutive from 0; "
                      f"{os.path.join(train_dir, f'{expected}.npz')!r} is missing")
  count = len(train_ids)
  missing_test = sorted(set(train_ids) - set(test_ids))
  if missing_test:
    raise DataError(f"{os.path.join(test_dir, f'{missing_test[0]}.npz')!r} is missing (every "
                    f"train/<id>.npz needs a test/<id>.npz)")
  extra_test = sorted(set(test_ids) - set(train_ids))
  if extra_test:
    raise DataError(f"{os.path.join(test_dir, f'{extra_test[0]}.npz')!r} has no matching "
                    f"train/{extra_test[0]}.npz")
  if num_clients is not None and num_clients != count:
    raise DataError(f"dataset folder {folder!r} has {count} clients but num_clients="
                    f"{num_clients} was requested; pass {count} or leave it unset")
  if config is not None:
    if config.get("num_clients") is not None and config["num_clients"] != count:
      raise DataError(f"{config_path!r} says num_clients={config['num_clients']} but the "
                      f"folder has {count} clients (train/0.npz .. train/{count - 1}.npz)")
    config_classes = config.get("num_classes")
    if config_classes is not None:
      if num_classes is not None and num_classes != config_classes:
        raise DataError(f"num_classes={num_classes} was requested but {config_path!r} says "
                        f"num_classes={config_classes}")
      num_classes = config_classes if num_classes is None else num_classes
  if num_classes is not None and num_classes < 1:
    raise DataError(f"num_classes must be >= 1, got {num_classes}")

  arrays: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "test": []}
  sample_shape: tuple[int, ...] | None = None
  shape_source = ""
  for split, split_dir in (("train", train_dir), ("test", test_dir)):
    for client in range(count):
      path = os.path.join(split_dir, f"{client}.npz")
      x, y = _load_client(path)
      if y.size:
        if y.min() < 0:
          raise DataError(f"{path!r} has negative label {int(y.min())}; labels must be >= 0")
        if num_classes is not None and y.max() >= num_classes:
          raise DataError(f"{path!r} has label {int(y.max())} but num_classes={num_classes}; "
                          f"labels must be in [0, {num_classes - 1}]")
      if x.shape[0]:
        if sample_shape is None:
          sample_shape, shape_source = x.shape[1:], path
        elif x.shape[1:] != sample_shape:
          raise DataError(f"{path!r} has samples of shape {x.shape[1:]} but {shape_source!r} "
                          f"has {sample_shape}; all clients must share one sample shape")
      arrays[split].append((x, y))

  if sum(y.size for _, y in arrays["train"]) == 0:
    raise DataError(f"every client in {train_dir!r} has 0 training samples")
  for client, ((_, y_train), (_, y_test)) in enumerate(zip(arrays["train"], arrays["test"])):
    if not y_train.size and not y_test.size:
      raise DataError(f"client {client} is empty: {os.path.join(train_dir, f'{client}.npz')!r} "
                      f"and its test file hold no samples; every client needs training or test "
                      "samples (regenerate the dataset, or remove the client and renumber)")
  all_labels = [y for split in arrays.values() for _, y in split]
  if num_classes is None:
    num_classes = int(max(int(y.max()) for y in all_labels if y.size)) + 1

  xs, ys, index_lists = [], [], {"train": [], "test": []}
  offset = 0
  for split in ("train", "test"):
    for x, y in arrays[split]:
      n = y.shape[0]
      xs.append(x.reshape((n, *sample_shape)))
      ys.append(y)
      index_lists[split].append(np.arange(offset, offset + n, dtype=np.int64))
      offset += n
  return FederatedData.from_client_indices(
      name, np.concatenate(xs), np.concatenate(ys), index_lists["train"],
      index_lists["test"], num_classes)
