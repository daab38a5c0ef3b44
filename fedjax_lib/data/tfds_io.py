"""Reading TensorFlow Datasets splits one example at a time, with errors that say what to do.

Two read paths, chosen by what is installed (as `sources.load_tfds`):

* with ``tensorflow``: ``tfds.load(name, split=...)`` then ``tfds.as_numpy``;
* without it: ``tfds.data_source(name, split=...)``, tfds's TensorFlow-free random-access
  reader over ArrayRecord files (needs ``tensorflow-datasets`` and ``array_record``).

Examples are streamed (images can have any size, e.g. DomainNet's), so a converter can resize
each one as it arrives and never holds a whole split of full-size images.

Datasets that tfds cannot download itself (``MANUAL_DOWNLOAD_INSTRUCTIONS`` set on the
builder, e.g. ``imagenet2012``) are checked before anything is downloaded: if the dataset is
not prepared and its manual folder (``<data_dir>/downloads/manual``) is empty, a `DataError`
names that folder and quotes the builder's instructions (which files to put there).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Iterator

from fedjax_lib.errors import DataError

_INSTALL_HINT = "run: pip install 'fedjax_lib[tfds]'"


def import_tfds(what: str):
  """``tensorflow_datasets``, or a `DataError` saying how to install it."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError(f"{what} needs tensorflow-datasets, which is not installed; "
                    f"{_INSTALL_HINT}") from e
  return tfds


def has_tensorflow() -> bool:
  """Whether ``tensorflow`` is importable (selects the read path)."""
  return importlib.util.find_spec("tensorflow") is not None


def under_tfds_mock() -> bool:
  """Whether ``tfds.testing.mock_data`` is active: it always replaces
  ``DatasetBuilder.download_and_prepare`` by a function of ``tensorflow_datasets.testing``."""
  try:
    from tensorflow_datasets.core import dataset_builder  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  method = dataset_builder.DatasetBuilder.download_and_prepare
  return getattr(method, "__module__", "").startswith("tensorflow_datasets.testing")


def one_line(error: BaseException) -> str:
  """``Type: first line of the message``."""
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0] if text else ''}"


def _squash(text: str) -> str:
  return " ".join(text.split())


def manual_dir(data_dir: str | None, builder: Any) -> str:
  """tfds's default manual-download folder: ``<data_dir root>/downloads/manual``."""
  root = data_dir if data_dir else os.fspath(builder.data_dir_root)
  return os.path.join(os.path.expanduser(root), "downloads", "manual")


def manual_download_error(name: str, builder: Any, data_dir: str | None) -> DataError:
  """The `DataError` for a dataset whose files must be placed by hand (one line)."""
  folder = manual_dir(data_dir, builder)
  instructions = _squash(builder.MANUAL_DOWNLOAD_INSTRUCTIONS or "")
  return DataError(f"tfds dataset {name!r} must be downloaded by hand: put its files in "
                   f"{folder} (tfds' manual_dir; create it), then load again. tfds says: "
                   f"{instructions}")


def _needs_manual_files(builder: Any, data_dir: str | None) -> bool:
  if not getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None) or builder.is_prepared():
    return False
  folder = manual_dir(data_dir, builder)
  return not (os.path.isdir(folder) and os.listdir(folder))


def builder(name: str, data_dir: str | None) -> Any:
  """``tfds.builder(name, data_dir=...)``, refusing up front when manual files are missing.

  Raises:
    DataError: tfds is not installed, the name is unknown to tfds, or the dataset needs
      manually downloaded files that are not there.
  """
  tfds = import_tfds(f"the tfds dataset {name!r}")
  try:
    found = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except  (boundary: any tfds failure)
    raise DataError(f"tfds cannot build dataset {name!r} (data_dir {data_dir!r}): "
                    f"{one_line(e)}") from e
  if not under_tfds_mock() and _needs_manual_files(found, data_dir):
    raise manual_download_error(name, found, data_dir)
  return found


def iter_split(name: str, split: str, data_dir: str | None) -> Iterator[dict]:
  """The examples of one split, as dicts of numpy values, in tfds' stored order.

  Downloads and prepares the dataset on first use (tfds' own behaviour).
  """
  tfds = import_tfds(f"the tfds dataset {name!r}")
  found = builder(name, data_dir)

  def read():
    if has_tensorflow():
      dataset = tfds.load(name, split=split, data_dir=data_dir, shuffle_files=False)
      yield from tfds.as_numpy(dataset)
    else:
      source = tfds.data_source(name, split=split, data_dir=data_dir)
      for i in range(len(source)):
        yield source[i]

  try:
    yield from read()
  except Exception as e:  # pylint: disable=broad-except  (boundary: any tfds failure)
    if ("manual" in str(e).lower()
        and getattr(found, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)):
      raise manual_download_error(name, found, data_dir) from e
    raise DataError(f"could not read tfds dataset {name!r} split {split!r} (data_dir "
                    f"{data_dir!r}): {one_line(e)}") from e


def text_of(value: Any) -> str:
  """A tfds ``Text`` feature as ``str`` (numpy reads give bytes, mocks give str)."""
  if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
    value = value.item()
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def known_builders() -> set[str]:
  """The builder names of the installed tfds (without the online community index, which
  ``tfds.list_builders()`` fetches and which needs network access)."""
  tfds = import_tfds("listing tfds builders")
  return set(tfds.list_builders(with_community_datasets=False))
