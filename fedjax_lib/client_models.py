"""Per-client model folders: HtFLlib's ``-sfn`` / ``-mfn`` ("pre-trained model support").

HtFLlib keeps each client's model in ``<save_folder_name>/<dataset>/<algorithm>/`` as
``Client_<id>_model.pt`` and, given ``-mfn <that folder>``, starts every client of a later run
from its file instead of a fresh initialisation (another algorithm, the same model family).
Here a finished run with ``-sfn DIR`` writes its clients' models (`Algorithm.client_model`)
to ``DIR/<dataset>/<algorithm>/`` as ``Client_<id>_model.msgpack`` (flax's msgpack of the
variables) with ``models.json`` (the format, dataset, algorithm, model, and each client's
architecture), all files together or none (`fedjax_lib.results.FileSet`); ``-mfn`` reads such
a folder and checks every client's architecture and every array's shape against the run's
models before anything is trained or written. PyTorch ``.pt`` files cannot be read here.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from flax import serialization, traverse_util

from fedjax_lib import results as results_lib
from fedjax_lib.errors import ConfigError
from fedjax_lib.output import os_error

FORMAT = "fedjax_lib client models 1"
MANIFEST = "models.json"


def file_name(client: int) -> str:
  """HtFLlib's ``Client_<id>_model`` name, with this format's suffix."""
  return f"Client_{client}_model.msgpack"


def kept(save_folder_name: str) -> bool:
  """Whether ``-sfn`` keeps the models: a folder is given, and not HtFLlib's working folder
  (a name containing ``temp``, which HtFLlib deletes when the run ends)."""
  return bool(save_folder_name) and "temp" not in save_folder_name


def folder(save_folder_name: str, dataset_tag: str, algorithm: str) -> str:
  """HtFLlib's layout: ``<save_folder_name>/<dataset>/<algorithm>``."""
  return os.path.join(save_folder_name, dataset_tag, algorithm)


def add_files(files: results_lib.FileSet, path: str, models: dict, info: dict) -> None:
  """Registers ``models`` ({client id: (architecture, variables)}) and the manifest as files
  of folder ``path`` (created now if missing) in ``files``, which writes them together with
  the rest of its files; they replace what a previous run wrote there. ``info``: manifest
  entries (dataset, algorithm, model).

  Raises:
    ConfigError: the folder cannot be created.
  """
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise os_error("create the models folder", path, e) from None
  for client, (_, variables) in sorted(models.items()):
    data = serialization.msgpack_serialize(
        jax.tree.map(np.asarray, serialization.to_state_dict(variables)))
    files.add(os.path.join(path, file_name(client)),
              lambda tmp, data=data: _write_bytes(tmp, data))
  manifest = {"format": FORMAT, **info,
              "clients": {str(c): arch for c, (arch, _) in sorted(models.items())}}
  text = json.dumps(manifest, indent=1)
  files.add(os.path.join(path, MANIFEST), lambda tmp: _write_bytes(tmp, text.encode()))


def write(path: str, models: dict, info: dict) -> list[str]:
  """:func:`add_files` and commit: writes the folder; returns its files."""
  files = results_lib.FileSet()
  add_files(files, path, models, info)
  return files.commit()


def _write_bytes(path: str, data: bytes) -> None:
  with open(path, "wb") as f:
    f.write(data)


def read(path: str, expected: dict) -> dict:
  """Every client's variables from folder ``path``.

  Args:
    path: a folder written by :func:`write` (``-sfn``).
    expected: ``{client id: (architecture, abstract variables)}`` of the run (shapes and
      dtypes, e.g. ``jax.eval_shape`` of the model's init).

  Returns:
    ``{client id: variables}`` with ``expected``'s structure (numpy arrays of its dtypes).

  Raises:
    ConfigError: a missing or foreign folder, a client without a file, another
      architecture, or an array of another shape (one line naming the file and what differs).
  """
  manifest_path = os.path.join(path, MANIFEST)
  if not os.path.isdir(path):
    raise ConfigError(f"models folder {path!r} (-mfn) does not exist; give the folder a run "
                      "with -sfn DIR wrote: DIR/<dataset>/<algorithm>")
  try:
    with open(manifest_path, encoding="utf-8") as f:
      manifest = json.load(f)
  except FileNotFoundError:
    torch = sorted(n for n in os.listdir(path) if n.endswith(".pt"))
    what = (f"holds PyTorch files ({torch[0]}, ...), which cannot be read here"
            if torch else f"has no {MANIFEST}")
    raise ConfigError(f"models folder {path!r} (-mfn) {what}; give a folder a fedjax_lib run "
                      "wrote with -sfn DIR (DIR/<dataset>/<algorithm>)") from None
  except (OSError, ValueError) as e:
    raise ConfigError(f"cannot read {manifest_path!r} (-mfn): {e}") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise ConfigError(f"{manifest_path!r} (-mfn) is not a fedjax_lib models manifest "
                      f"(format {FORMAT!r})")
  saved = manifest.get("clients", {})
  missing = [c for c in sorted(expected) if str(c) not in saved]
  if missing:
    raise ConfigError(
        f"models folder {path!r} (-mfn) holds {len(saved)} clients' models "
        f"({manifest.get('algorithm')} on {manifest.get('dataset')}, model "
        f"{manifest.get('model')}) but this run's client {missing[0]} has none; give a folder "
        f"with a model for each of the {len(expected)} clients")
  out = {}
  for client, (arch, shapes) in sorted(expected.items()):
    if saved[str(client)] != arch:
      raise ConfigError(
          f"client {client}'s saved model in {path!r} (-mfn) is a {saved[str(client)]}, but "
          f"this run gives client {client} a {arch}; use the -m the models were trained with "
          f"({manifest.get('model')})")
    out[client] = _read_client(os.path.join(path, file_name(client)), client, shapes)
  return out


def _read_client(path: str, client: int, shapes: Any):
  try:
    with open(path, "rb") as f:
      state = serialization.msgpack_restore(f.read())
  except OSError as e:
    raise ConfigError(f"cannot read client {client}'s model {path!r} (-mfn): "
                      f"{e.strerror or e}") from None
  except Exception as e:  # pylint: disable=broad-except  (msgpack's own errors)
    raise ConfigError(f"client {client}'s model file {path!r} (-mfn) is damaged "
                      f"({type(e).__name__}); write the folder again with -sfn") from None
  flat = traverse_util.flatten_dict(state) if isinstance(state, dict) else {(): state}
  wanted = traverse_util.flatten_dict(serialization.to_state_dict(shapes))
  for key, spec in wanted.items():
    got = flat.get(key)
    if not isinstance(got, np.ndarray) or got.shape != tuple(spec.shape):
      have = "missing" if got is None else f"shape {list(np.shape(got))}"
      raise ConfigError(f"client {client}'s model file {path!r} (-mfn) does not fit this "
                        f"run's model: {'/'.join(key)} is {have}, expected shape "
                        f"{list(spec.shape)}")
  extra = sorted(set(flat) - set(wanted))
  if extra:
    raise ConfigError(f"client {client}'s model file {path!r} (-mfn) does not fit this run's "
                      f"model: it has {'/'.join(extra[0])}, which the model lacks")
  return jax.tree_util.tree_map_with_path(
      lambda path, spec: np.asarray(flat[tuple(str(k.key) for k in path)], spec.dtype), shapes)
