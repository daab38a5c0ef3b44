"""Every dataset name ``-data`` accepts: what it is, where it comes from, how it is prepared.

One `DatasetSpec` per dataset, looked up by `resolve` (case, ``-``, ``_`` and spaces are
ignored, and PFLlib's folder names are aliases: ``FashionMNIST``, ``Cifar10``,
``TinyImagenet``, ``AGNews``, ``StanfordCars`` ...). A spec's ``kind`` says how it loads:

=================  ==========================================================================
``builtin``        bundled or generated in memory (`sources.BUILTIN_DATASETS`): no download
``tfds``           a tfds image set, label-skew partitioned (`tfds_arrays.load_arrays`)
``text``           a tfds text set, tokenised as PFLlib does (`text`), label-skew partitioned
``domains``        feature shift: one tfds source per domain, each domain a client
                   (`feature_shift.load_feature_shift`)
``natural``        a natural split: clients from a property of the samples (Omniglot's
                   drawers; `feature_shift.load_natural`)
``pfllib-folder``  PFLlib/HtFLlib datasets that tfds does not have: read from PFLlib's
                   folder ``../dataset/<pfllib_folder>`` (or ``<data_dir>/...``) when it
                   exists, else the error says which PFLlib script generates it
=================  ==========================================================================

The preprocessing follows PFLlib's ``dataset/generate_*.py`` (see `images` for resizing and
scaling, `text` for tokenising); converted arrays are cached under the tfds data directory
(`cache`). `list_datasets` reports every spec with whether its arrays are cached, and
`format_table` prints that list.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

from fedjax_lib.data import cache
from fedjax_lib.data import text

# Bump an entry kind's version whenever what it computes changes: old cache files are then
# never read again (the version is part of the file name).
IMAGE_VERSION = 1
TEXT_VERSION = 1

LABEL_SKEW = "label skew"
FEATURE_SHIFT = "feature shift"
NATURAL = "natural split"


@dataclasses.dataclass(frozen=True)
class Domain:
  """One domain of a feature-shift dataset: its tfds source and how its images are read.

  Attributes:
    name: the domain's name (``clipart``, ``mnist`` ...), in the order clients are numbered.
    tfds_name: the tfds dataset (with config), e.g. ``domainnet/clipart``.
    splits: tfds splits read, concatenated in this order (PFLlib: train then test).
    upright: transpose each image (EMNIST is stored transposed).
  """
  name: str
  tfds_name: str
  splits: tuple[str, ...] = ("train", "test")
  upright: bool = False


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What a dataset name means.

  Attributes:
    name: the canonical name (lower case).
    kind: ``builtin``, ``tfds``, ``text``, ``domains``, ``natural`` or ``pfllib-folder``.
    modality: ``image``, ``text``, ``sensor`` or ``tabular``.
    shape: one sample's shape after preprocessing (NHWC images: ``(H, W, C)``; sensor
      windows NHWC too, PFLlib's 9×1×128 read as ``(1, 128, 9)``; text: ``(max_len,)``
      token ids); ``None`` where unknown.
    num_classes: number of classes.
    scenario: `LABEL_SKEW`, `FEATURE_SHIFT` or `NATURAL`.
    source: where the data come from, in words.
    preprocessing: what is done to it, in words.
    aliases: other accepted spellings.
    tfds_name: the tfds dataset (``tfds``, ``text``, ``natural`` kinds).
    splits: tfds splits read and concatenated (PFLlib merges the official splits).
    value_range: ``"pm1"`` (Normalize(0.5, 0.5) → [-1, 1]) or ``"unit"`` ([0, 1]).
    domains: the domains of a feature-shift dataset, in client order.
    classes: a subset of the source's class names, relabelled 0..len-1 in this order.
    domain_cap: ``(train, test)``: at most this many samples of each domain's official train
      split (a random subset) and test split (the first ones), as PFLlib's Digit5.
    train_augment: PFLlib's DomainNet: each official-train image is RandomResizedCrop'ed
      (scale 0.75-1) and flipped once, at conversion (then frozen in the cache).
    num_natural_clients: clients of a ``natural`` split.
    pfllib_command: ``pfllib-folder`` kind: the command, run in PFLlib's ``dataset/``,
      that writes the folder ``dataset/<pfllib_folder>``.
    pfllib_folder: see ``pfllib_command``.
    missing_from_tfds: tfds names checked absent (``pfllib-folder`` kind; tested).
    builtin_key: ``builtin`` kind: the `sources.BUILTIN_DATASETS` key.
    vocab_size: text: the token ids lie in ``[0, vocab_size)`` (the text models' default).
  """
  name: str
  kind: str
  modality: str
  shape: Optional[tuple[int, ...]]
  num_classes: Optional[int]
  scenario: str
  source: str
  preprocessing: str
  aliases: tuple[str, ...] = ()
  tfds_name: Optional[str] = None
  splits: tuple[str, ...] = ("train", "test")
  value_range: str = "pm1"
  domains: tuple[Domain, ...] = ()
  classes: Optional[tuple[str, ...]] = None
  domain_cap: Optional[tuple[int, int]] = None
  train_augment: bool = False
  num_natural_clients: Optional[int] = None
  pfllib_command: Optional[str] = None
  pfllib_folder: Optional[str] = None
  missing_from_tfds: tuple[str, ...] = ()
  builtin_key: Optional[str] = None
  vocab_size: Optional[int] = None

  @property
  def available(self) -> bool:
    """Whether this library can make it by itself (``pfllib-folder`` datasets need the folder
    PFLlib's generator writes; `loading.load_federated` finds it by name in the usual
    places)."""
    return self.kind != "pfllib-folder"

  @property
  def needs_tfds(self) -> bool:
    return self.kind in ("tfds", "text", "domains", "natural")


# ------------------------------------------------------------------ cache entry names


def _slug(tfds_name: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", tfds_name.lower()).strip("-")


def image_entry(tfds_name: str, shape: tuple[int, int, int], *, upright: bool = False,
                augment: bool = False) -> str:
  """Cache entry of a tfds image source converted to uint8 ``shape``:
  ``<tfds name>-<H>x<W>x<C>[-upright][-rrc]`` (``rrc``: official train split augmented)."""
  height, width, channels = shape
  return (f"{_slug(tfds_name)}-{height}x{width}x{channels}" + ("-upright" if upright else "")
          + ("-rrc" if augment else ""))


def text_entry(tfds_name: str, max_len: int, max_tokens: int) -> str:
  """Cache entry of a tokenised tfds text source: ``<tfds name>-tok<L>-vocab<V>``."""
  return f"{_slug(tfds_name)}-tok{max_len}-vocab{max_tokens}"


def cache_entries(spec: DatasetSpec) -> list[tuple[str, int]]:
  """``(entry, version)`` of every cache file ``spec`` loads from (none for builtin/folder)."""
  if spec.kind in ("tfds", "natural"):
    return [(image_entry(spec.tfds_name, spec.shape), IMAGE_VERSION)]
  if spec.kind == "text":
    return [(text_entry(spec.tfds_name, spec.shape[0], text.MAX_TOKENS), TEXT_VERSION)]
  if spec.kind == "domains":
    return [(image_entry(d.tfds_name, spec.shape, upright=d.upright,
                         augment=spec.train_augment), IMAGE_VERSION) for d in spec.domains]
  return []


# ------------------------------------------------------------------ the specs

_NORMALIZE = "ToTensor + Normalize(0.5, 0.5) → [-1, 1]"
_RESIZE64 = ("PIL bilinear resize to 64×64 (torchvision Resize((64, 64)) on PIL images), "
             + _NORMALIZE)

# FedBN's (Li et al., ICLR 2021) 10 DomainNet classes, the subset most federated papers use.
DOMAINNET10_CLASSES = ("bird", "feather", "headphones", "ice_cream", "teapot", "tiger", "whale",
                       "windmill", "wine_glass", "zebra")

_DOMAINNET_DOMAINS = tuple(
    Domain(d, f"domainnet/{d}")
    for d in ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"))

_DOMAINNET_PREP = ("official train split: RandomResizedCrop(64, scale 0.75-1) + horizontal flip "
                   "drawn once at conversion (seeded) and frozen; test split: PIL bilinear "
                   "resize to 64×64; ToTensor only → [0, 1] (PFLlib applies no Normalize "
                   "here)")


def _specs() -> list[DatasetSpec]:
  builtin = dict(kind="builtin", scenario=LABEL_SKEW, preprocessing="-")
  tfds_image = dict(kind="tfds", modality="image", scenario=LABEL_SKEW)
  folder = dict(kind="pfllib-folder", preprocessing="-")
  return [
      # ---- bundled, no download
      DatasetSpec("digits", modality="image", shape=(28, 28, 1), num_classes=10,
                  source="scikit-learn's bundled 8×8 digits (1,797)", builtin_key="digits",
                  **builtin),
      DatasetSpec("digits32", modality="image", shape=(32, 32, 3), num_classes=10,
                  source="scikit-learn's bundled 8×8 digits (1,797)", builtin_key="digits32",
                  **builtin),
      DatasetSpec("synthetic-cifar", modality="image", shape=(32, 32, 3), num_classes=10,
                  source="generated (class-mean Gaussians, 6,000)",
                  builtin_key="synthetic-cifar", **builtin),
      # ---- tfds, label skew (PFLlib's label-skew list)
      DatasetSpec("mnist", shape=(28, 28, 1), num_classes=10, source="tfds mnist (train+test)",
                  tfds_name="mnist", preprocessing=_NORMALIZE, **tfds_image),
      DatasetSpec("emnist", shape=(28, 28, 1), num_classes=10,
                  source="tfds emnist/digits (train+test)", tfds_name="emnist/digits",
                  preprocessing=_NORMALIZE + "; images kept transposed as stored (as "
                  "torchvision's EMNIST, which PFLlib uses)", aliases=("emnist-digits",),
                  **tfds_image),
      DatasetSpec("fashion_mnist", shape=(28, 28, 1), num_classes=10,
                  source="tfds fashion_mnist (train+test)", tfds_name="fashion_mnist",
                  preprocessing=_NORMALIZE, aliases=("fmnist",), **tfds_image),
      DatasetSpec("cifar10", shape=(32, 32, 3), num_classes=10,
                  source="tfds cifar10 (train+test)", tfds_name="cifar10",
                  preprocessing=_NORMALIZE, **tfds_image),
      DatasetSpec("cifar100", shape=(32, 32, 3), num_classes=100,
                  source="tfds cifar100 (train+test)", tfds_name="cifar100",
                  preprocessing=_NORMALIZE, **tfds_image),
      DatasetSpec("svhn", shape=(32, 32, 3), num_classes=10,
                  source="tfds svhn_cropped (train+test, not extra)", tfds_name="svhn_cropped",
                  preprocessing=_NORMALIZE, aliases=("svhn_cropped",), **tfds_image),
      DatasetSpec("flowers102", shape=(64, 64, 3), num_classes=102,
                  source="tfds oxford_flowers102 (train+validation+test)",
                  tfds_name="oxford_flowers102", splits=("train", "validation", "test"),
                  preprocessing=_RESIZE64, aliases=("oxford_flowers102",), **tfds_image),
      DatasetSpec("stanford_cars", shape=(64, 64, 3), num_classes=196,
                  source="tfds cars196 (train+test)", tfds_name="cars196",
                  preprocessing=_RESIZE64, aliases=("cars196",), **tfds_image),
      DatasetSpec("ag_news", kind="text", modality="text", shape=(200,), num_classes=4,
                  scenario=LABEL_SKEW, source="tfds ag_news_subset (train+test)",
                  tfds_name="ag_news_subset",
                  preprocessing="title + ' ' + description; torchtext basic_english "
                  "tokens; vocabulary of 32,000 by frequency over all texts (specials <pad> "
                  "cls <unk> <eos>); [<cls> lookup (= <unk>, as PFLlib)] + ids, 0-padded or "
                  "cut to 200; int32 ids",
                  aliases=("agnews", "ag_news_subset"), vocab_size=32000),
      # ---- natural split
      DatasetSpec("omniglot", kind="natural", modality="image", shape=(105, 105, 1),
                  num_classes=50, scenario=NATURAL,
                  source="tfds omniglot (train+test: background + evaluation)",
                  tfds_name="omniglot", value_range="unit", num_natural_clients=20,
                  preprocessing="first plane of the stored RGB, ToTensor only → {0, 1} (PFLlib "
                  "stores the raw 1-bit images); label = alphabet (50); client j = the j-th "
                  "drawing of every character (20 drawers)"),
      # ---- feature shift
      DatasetSpec("domainnet", kind="domains", modality="image", shape=(64, 64, 3),
                  num_classes=345, scenario=FEATURE_SHIFT,
                  source="tfds domainnet/{clipart,infograph,painting,quickdraw,real,sketch} "
                  "(train+test)", value_range="unit", domains=_DOMAINNET_DOMAINS,
                  train_augment=True, preprocessing=_DOMAINNET_PREP + "; all 345 classes"),
      DatasetSpec("domainnet10", kind="domains", modality="image", shape=(64, 64, 3),
                  num_classes=10, scenario=FEATURE_SHIFT,
                  source="tfds domainnet/<6 domains>, FedBN's 10 classes "
                  "(bird..zebra)", value_range="unit", domains=_DOMAINNET_DOMAINS,
                  classes=DOMAINNET10_CLASSES, train_augment=True,
                  preprocessing=_DOMAINNET_PREP + "; FedBN's 10 classes relabelled 0-9",
                  aliases=("domainnet-10", "domainnet_sub")),
      DatasetSpec("digits-fs", kind="domains", modality="image", shape=(32, 32, 3),
                  num_classes=10, scenario=FEATURE_SHIFT,
                  source="tfds mnist, svhn_cropped, emnist/digits (the Digit-5 domains tfds "
                  "has, plus EMNIST)",
                  domains=(Domain("mnist", "mnist"), Domain("svhn", "svhn_cropped"),
                           Domain("emnist", "emnist/digits", upright=True)),
                  domain_cap=(25000, 9000),
                  preprocessing="grey → 3 planes, PIL bilinear resize to 32×32 (Digit5's "
                  "Resize(32)), EMNIST transposed upright, " + _NORMALIZE + "; per domain "
                  "a random 25,000 of train + the first 9,000 of test (as PFLlib's Digit5)",
                  aliases=("digit-fs", "digits_tfds")),
      # ---- PFLlib / HtFLlib datasets that tfds does not have
      DatasetSpec("digit5", modality="image", shape=(32, 32, 3), num_classes=10,
                  scenario=FEATURE_SHIFT,
                  source="PFLlib folder (tfds has mnist and svhn_cropped, not mnistm, syn, "
                  "usps; for a tfds-only digit feature shift use digits-fs)",
                  pfllib_command="python generate_Digit5.py", pfllib_folder="Digit5",
                  missing_from_tfds=("usps", "mnistm", "mnist_m", "syn_digits", "digit5"),
                  **folder),
      DatasetSpec("tiny_imagenet", modality="image", shape=(64, 64, 3), num_classes=200,
                  scenario=LABEL_SKEW,
                  source="PFLlib folder (not in tfds; tfds' imagenet_resized/64x64 is the "
                  "1000-class ImageNet, not Tiny-ImageNet)",
                  pfllib_command="python generate_TinyImagenet.py noniid - dir",
                  pfllib_folder="TinyImagenet", aliases=("tinyimagenet", "tiny-imagenet"),
                  missing_from_tfds=("tiny_imagenet", "tinyimagenet"), **folder),
      DatasetSpec("femnist", modality="image", shape=(28, 28, 1), num_classes=62,
                  scenario=LABEL_SKEW, source="PFLlib folder (LEAF; not in tfds)",
                  pfllib_command="python generate_FEMNIST.py noniid - dir",
                  pfllib_folder="FEMNIST", missing_from_tfds=("femnist",), **folder),
      DatasetSpec("country211", modality="image", shape=(64, 64, 3), num_classes=211,
                  scenario=LABEL_SKEW, source="PFLlib folder (not in tfds)",
                  pfllib_command="python generate_Country211.py noniid - dir",
                  pfllib_folder="Country211", missing_from_tfds=("country211",), **folder),
      DatasetSpec("gtsrb", modality="image", shape=(32, 32, 3), num_classes=43,
                  scenario=LABEL_SKEW, source="PFLlib folder (not in tfds)",
                  pfllib_command="python generate_GTSRB.py noniid - dir",
                  pfllib_folder="GTSRB", missing_from_tfds=("gtsrb",), **folder),
      DatasetSpec("sogou_news", modality="text", shape=(200,), num_classes=5,
                  scenario=LABEL_SKEW, source="PFLlib folder (not in tfds)",
                  pfllib_command="python generate_SogouNews.py noniid - dir",
                  pfllib_folder="SogouNews", aliases=("sogounews",), vocab_size=32000,
                  missing_from_tfds=("sogou_news",), **folder),
      DatasetSpec("shakespeare", modality="text", shape=(80,), num_classes=80,
                  scenario=NATURAL, source="PFLlib folder (LEAF; not in tfds)",
                  pfllib_command="python generate_Shakespeare.py",
                  pfllib_folder="Shakespeare", missing_from_tfds=("shakespeare",),
                  vocab_size=80, **folder),
      DatasetSpec("covidx", modality="image", shape=(64, 64, 3), num_classes=2,
                  scenario=LABEL_SKEW, source="PFLlib folder (Kaggle; not in tfds)",
                  pfllib_command="python generate_COVIDx.py noniid - dir",
                  pfllib_folder="COVIDx-0.1", missing_from_tfds=("covidx",), **folder),
      DatasetSpec("kvasir", modality="image", shape=(64, 64, 3), num_classes=8,
                  scenario=LABEL_SKEW, source="PFLlib folder (not in tfds)",
                  pfllib_command="python generate_kvasir.py noniid - dir",
                  pfllib_folder="kvasir-0.1", missing_from_tfds=("kvasir",), **folder),
      DatasetSpec("camelyon17", modality="image", shape=(96, 96, 3), num_classes=2,
                  scenario=NATURAL, source="PFLlib folder (WILDS; not in tfds)",
                  pfllib_command="python generate_Camelyon17.py", pfllib_folder="Camelyon17",
                  missing_from_tfds=("camelyon17", "wilds"), **folder),
      DatasetSpec("iwildcam", modality="image", shape=(64, 64, 3), num_classes=158,
                  scenario=NATURAL, source="PFLlib folder (WILDS; not in tfds)",
                  pfllib_command="python generate_iWildCam.py", pfllib_folder="iWildCam",
                  missing_from_tfds=("iwildcam", "wilds"), **folder),
      DatasetSpec("har", modality="sensor", shape=(1, 128, 9), num_classes=6,
                  scenario=NATURAL, source="PFLlib folder (UCI HAR; not in tfds)",
                  pfllib_command="python generate_HAR.py", pfllib_folder="HAR",
                  missing_from_tfds=("har", "uci_har"), **folder),
      DatasetSpec("pamap2", modality="sensor", shape=(3, 256, 9), num_classes=12,
                  scenario=NATURAL, source="PFLlib folder (not in tfds)",
                  pfllib_command="python generate_PAMAP2.py", pfllib_folder="PAMAP2",
                  missing_from_tfds=("pamap2",), **folder),
      DatasetSpec("amazon_review", modality="tabular", shape=(5000,), num_classes=2,
                  scenario=FEATURE_SHIFT,
                  source="PFLlib folder (4 domains, 5000-d features; not in tfds)",
                  pfllib_command="python generate_AmazonReview.py",
                  pfllib_folder="AmazonReview", aliases=("amazonreview",),
                  missing_from_tfds=("amazon_review",), **folder),
  ]


SPECS: tuple[DatasetSpec, ...] = tuple(_specs())
DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in SPECS}


def _normalise(name: str) -> str:
  return re.sub(r"[\s_\-]+", "", name.strip().lower())


def _lookup_table() -> dict[str, DatasetSpec]:
  table: dict[str, DatasetSpec] = {}
  for spec in SPECS:
    for spelling in (spec.name, *spec.aliases, *([spec.pfllib_folder] if spec.pfllib_folder
                                                  else [])):
      key = _normalise(spelling)
      if key in table and table[key] is not spec:
        raise AssertionError(f"dataset spelling {spelling!r} names both {table[key].name!r} "
                             f"and {spec.name!r}")
      table[key] = spec
  return table


_LOOKUP = _lookup_table()


def resolve(name: str) -> Optional[DatasetSpec]:
  """The spec ``name`` means (case, ``-``, ``_``, spaces ignored; aliases and PFLlib folder
  names accepted), or ``None``.

  ``"FashionMNIST"`` → ``fashion_mnist``, ``"Tiny-ImageNet"`` → ``tiny_imagenet``,
  ``"AGNews"`` → ``ag_news``, ``"svhn_cropped"`` → ``svhn``.
  """
  return _LOOKUP.get(_normalise(name))


def names(available_only: bool = True) -> list[str]:
  """Canonical names, in registry order (loadable ones only by default)."""
  return [spec.name for spec in SPECS if spec.available or not available_only]


def folder_hint(spec: DatasetSpec) -> str:
  """How to get a ``pfllib-folder`` dataset: the PFLlib command and the path to pass."""
  return (f"generate it with PFLlib (in PFLlib's dataset/ folder run `{spec.pfllib_command}`), "
          "then run from PFLlib's system/ folder or pass the folder: "
          f"-data /path/to/PFLlib/dataset/{spec.pfllib_folder}")


# ------------------------------------------------------------------ listing


def _shape_text(spec: DatasetSpec) -> str:
  if spec.shape is None:
    return "?"
  if spec.modality == "text":
    return f"{spec.shape[0]} tokens"
  return "x".join(str(d) for d in spec.shape)


def _cached_text(spec: DatasetSpec, data_dir: Optional[str]) -> str:
  entries = cache_entries(spec)
  if not entries:
    return "-"
  present = sum(cache.is_cached(entry, version, data_dir) for entry, version in entries)
  if present == len(entries):
    return "yes"
  return "no" if present == 0 else f"partly ({present}/{len(entries)} domains)"


def list_datasets(data_dir: Optional[str] = None) -> list[dict]:
  """One row per dataset name: what ``--list-datasets`` prints.

  Args:
    data_dir: the tfds data directory whose cache is inspected (see `cache.resolve_data_dir`).

  Returns:
    Dicts with ``name``, ``modality``, ``shape`` (text), ``classes``, ``scenario``,
    ``source``, ``cached`` (``yes``/``no``/``partly (k/n domains)``; ``-`` where nothing is
    cached: built-in and PFLlib-folder datasets), ``available`` (loadable by name) and
    ``preprocessing``. Needs neither tfds nor network access.
  """
  rows = []
  for spec in SPECS:
    rows.append({
        "name": spec.name,
        "modality": spec.modality,
        "shape": _shape_text(spec),
        "classes": spec.num_classes,
        "scenario": spec.scenario,
        "source": spec.source,
        "cached": _cached_text(spec, data_dir),
        "available": spec.available,
        "preprocessing": spec.preprocessing,
    })
  return rows


_COLUMNS = ("name", "modality", "shape", "classes", "scenario", "cached", "source")


def format_table(rows: list[dict], data_dir: Optional[str] = None) -> str:
  """`list_datasets` rows as a fixed-width text table, with the cache folder underneath."""
  cells = [[str(row[column]) if row[column] is not None else "?" for column in _COLUMNS]
           for row in rows]
  widths = [max(len(column), *(len(cell[i]) for cell in cells))
            for i, column in enumerate(_COLUMNS)]
  widths[-1] = len(_COLUMNS[-1])  # the last column is not padded
  def line(values):
    return "  ".join(value.ljust(width) for value, width in zip(values, widths)).rstrip()
  lines = [line(_COLUMNS), line(["-" * w for w in widths[:-1]] + ["------"])]
  lines += [line(cell) for cell in cells]
  lines.append("")
  lines.append(f"cache: {cache.resolve_data_dir(data_dir)}/{cache.CACHE_FOLDER}  "
               "(source 'PFLlib folder': -data NAME reads ../dataset/<Folder>, or pass the "
               "generated folder's path as -data)")
  return "\n".join(lines)
