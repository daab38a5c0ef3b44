"""Models chosen by name, with their inputs validated at the boundary.

Names are case-insensitive and include PFLlib's and HtFLlib's spellings (``CNN``,
``ResNet18``, ``resnet18``, ``MobileNetV2``):

==================================  ===================================================
name                                model
==================================  ===================================================
``cnn`` (``fedavgcnn``)             PFLlib's FedAvgCNN (:mod:`~fedjax_lib.models.cnn`)
``dnn``, ``mlr``                    PFLlib's DNN and logistic regression (:mod:`~.mlp`)
``resnet4/6/8/10``                  HtFLlib's small ResNets (:mod:`~.resnet`)
``resnet18/34/50/101/152``          torchvision's ImageNet ResNets (:mod:`~.resnet`)
``googlenet``                       torchvision's GoogLeNet, aux heads off (:mod:`~.googlenet`)
``mobilenet_v2`` (``mobilenetv2``,  HtFLlib's MobileNetV2, PFLlib's ``MobileNet``
``mobilenet``)                      (:mod:`~.mobilenet`)
``alexnet``                         torchvision's AlexNet, PFLlib's ``-m AlexNet``; 63x63
                                    images or larger (:mod:`~.alexnet`)
``vit_b_16``, ``vit_b_32``          torchvision's ViT-B at image size 32, HtFLlib's 2-layer
                                    ViT head (:mod:`~.vit`)
``digit5cnn``                       PFLlib's Digit5CNN (:mod:`~.digit5`); what ``CNN``
                                    builds on a Digit5 dataset
                                    (:func:`dataset_architectures`)
``amazonmlp`` (``amazonmlp_500``,   PFLlib's/HtFLlib's AmazonMLP; the suffix lists the hidden
``amazonmlp_0``, ...)               widths (:mod:`~.mlp`)
``harcnn``, ``harcnn1``,            PFLlib's HARCNN, HtFLlib's HARCNN1/HARCNN3; ``_s2``,
``harcnn3`` (``harcnn_s2``, ...)    ``_s3``: conv stride (:mod:`~.sensor`)
``fasttext``, ``textlr``,           PFLlib's and HtFLlib's text models over token ids
``textcnn``, ``lstm``, ``bilstm``,  ``(L,)``; ``transformer_h4_l2``: 4 heads, 2 layers
``gru``, ``transformer``            (:mod:`~.text`)
==================================  ===================================================

A name may carry one of HtFLlib's heterogeneous heads: ``resnet34+head512-256`` is ResNet34
with ``Head(hidden_dims=[512, 256])`` (:mod:`~fedjax_lib.models.heads`) instead of the dense
head.

The text models take ``vocab_size`` (PFLlib's ``-vs``, default 80) and, those whose reference
ends in ``log_softmax``, ``log_softmax_features=True`` to reproduce that quirk (see
:mod:`~fedjax_lib.models.text`); their width is ``feature_dim`` (default 512). ``dnn`` and
``mlr`` take ``log_softmax_features`` too (PFLlib's DNN and Mclr_Logistic end in
``log_softmax``: :mod:`~.mlp`).

Every model takes ``dtype='bfloat16'`` for mixed precision and ``feature_dim=F`` for a
common feature width across architectures (HtFLlib's ``--feature_dim``: the base's output
is adaptively average-pooled to ``F`` and the head is ``F -> num_classes``; see
:func:`make_model`).

Heterogeneous FL takes a comma-separated list of architectures (:func:`parse_model_names`,
e.g. ``'cnn,dnn'``) or one of HtFLlib's model families by name (:data:`FAMILIES`,
``'HtFE-img-8'``); client ``i`` gets architecture ``i mod K``
(:func:`architecture_of_clients`).

Example::

  model = make_model('CNN', sample_shape=(28, 28, 1), num_classes=10)
  variables = init_model(model, jax.random.PRNGKey(0), (28, 28, 1))
  names = architecture_of_clients(parse_model_names('HtFE-img-8'), num_clients=20)
  models = {n: make_model(n, (32, 32, 3), 10, feature_dim=512) for n in set(names)}
"""

from collections.abc import Sequence
import functools
import numbers
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lib.config import DTYPES
from fedjax_lib.errors import ConfigError
from fedjax_lib.models import alexnet
from fedjax_lib.models import cnn
from fedjax_lib.models import digit5
from fedjax_lib.models import googlenet
from fedjax_lib.models import mlp
from fedjax_lib.models import mobilenet
from fedjax_lib.models import resnet
from fedjax_lib.models import sensor
from fedjax_lib.models import text
from fedjax_lib.models import vit
from fedjax_lib.models import base as base_lib
from fedjax_lib.models import heads
from fedjax_lib.models.base import BaseHeadModel, Variables
from fedjax_lib.models.layers import CONV_IMPLS

#: Canonical architecture names accepted by :func:`make_model` (without a head suffix).
MODEL_NAMES = ('cnn', 'dnn', 'mlr', 'resnet4', 'resnet6', 'resnet8', 'resnet10', 'resnet18',
               'resnet34', 'resnet50', 'resnet101', 'resnet152', 'googlenet', 'mobilenet_v2',
               'alexnet', 'vit_b_16', 'vit_b_32', 'digit5cnn', 'amazonmlp', 'harcnn', 'harcnn1', 'harcnn3',
               *text.TEXT_MODELS)

_ALIASES = {'fedavgcnn': 'cnn', 'mclr_logistic': 'mlr', 'mobilenetv2': 'mobilenet_v2',
            'mobilenet': 'mobilenet_v2',  # PFLlib's -m MobileNet: its custom MobileNetV2
            'vit_b16': 'vit_b_16', 'vit_b32': 'vit_b_32', 'textlogisticregression': 'textlr',
            'lstmnet': 'lstm', 'grunet': 'gru', 'bilstm_textclassification': 'bilstm',
            'transformermodel': 'transformer'}

#: Architectures that take images ``(H, W, C)`` (HARCNN: sensor windows laid out NHWC). The
#: text models' ``(L,)`` is checked when they are first traced, not here: the runner builds
#: every model on an image shape to list those without a train mode.
_IMAGE_MODELS = frozenset(MODEL_NAMES) - {'dnn', 'mlr', 'amazonmlp', *text.TEXT_MODELS}

#: Keyword options each model accepts.
_OPTIONS = {name: () for name in MODEL_NAMES}
_OPTIONS.update({'cnn': ('conv_impl', 'hidden_dim'),
                 'dnn': ('hidden_dim', 'log_softmax_features'), 'mlr': ('log_softmax_features',),
                 'digit5cnn': ('conv_impl',), 'harcnn': ('conv_impl',),
                 'harcnn1': ('conv_impl',), 'harcnn3': ('conv_impl',)})
_OPTIONS.update({name: ('vocab_size',) + (('log_softmax_features',)
                                          if name in text.LOG_SOFTMAX_MODELS else ())
                 for name in text.TEXT_MODELS})
_OPTIONS['textcnn'] += ('conv_impl',)

#: HtFLlib's four heterogeneous heads (the HtC families), ``Head(hidden_dims)``.
_HTC_HEADS = ('head512', 'head512-512', 'head512-256', 'head512-128')
_HTFE_8 = ('cnn', 'googlenet', 'mobilenet_v2', 'resnet18', 'resnet34', 'resnet50', 'resnet101',
           'resnet152')

#: HtFLlib's image model families (``-m``): ``(architectures, heads)``; client i uses
#: architecture ``i mod K`` and, in the HtC families, head ``i mod 4`` (heads None: the
#: dense head, or the ViT head for ViTs).
FAMILIES = {
    'HtFE-img-2': (('cnn', 'resnet18'), None),
    'HtFE-img-3': (('resnet10', 'resnet18', 'resnet34'), None),
    'HtFE-img-4': (('cnn', 'googlenet', 'mobilenet_v2', 'resnet18'), None),
    'HtFE-img-5': (('googlenet', 'mobilenet_v2', 'resnet18', 'resnet34', 'resnet50'), None),
    'HtFE-img-8': (_HTFE_8, None),
    'HtFE-img-9': (('resnet4', 'resnet6', 'resnet8', 'resnet10', 'resnet18', 'resnet34',
                    'resnet50', 'resnet101', 'resnet152'), None),
    'HtFE-img-8-HtC-img-4': (_HTFE_8, _HTC_HEADS),
    'Res34-HtC-img-4': (('resnet34',), _HTC_HEADS),
    'HtM-img-10': (_HTFE_8 + ('vit_b_16', 'vit_b_32'), None),
    # Text (token ids (L,)); the models' width is feature_dim.
    'HtFE-txt-2': (('fasttext', 'textlr'), None),
    'HtFE-txt-4': (('fasttext', 'textlr', 'lstm', 'bilstm'), None),
    'HtFE-txt-5-1': (('transformer_h8_l1', 'transformer', 'transformer_h8_l4',
                      'transformer_h8_l8', 'transformer_h8_l16'), None),
    'HtFE-txt-5-2': (('transformer_h1_l4', 'transformer_h2_l4', 'transformer_h4_l4',
                      'transformer_h8_l4', 'transformer_h16_l4'), None),
    'HtFE-txt-5-3': (('transformer_h1_l1', 'transformer_h2_l2', 'transformer_h4_l4',
                      'transformer_h8_l8', 'transformer_h16_l16'), None),
    'HtFE-txt-6': (('fasttext', 'lstm', 'bilstm', 'transformer', 'textlr', 'gru'), None),
    # Sensor windows (HAR: (1, 128, 9)).
    'HtFE-sen-2': (('harcnn', 'harcnn_s2'), None),
    'HtFE-sen-3': (('harcnn', 'harcnn_s2', 'harcnn_s3'), None),
    'HtFE-sen-5': (('harcnn', 'harcnn_s2', 'harcnn_s3', 'harcnn1', 'harcnn3'), None),
    'HtFE-sen-8': (('harcnn', 'harcnn_s2', 'harcnn_s3', 'harcnn1', 'harcnn1_s2', 'harcnn1_s3',
                    'harcnn3', 'harcnn3_s2'), None),
    # Tabular (Amazon Review, 5000-d).
    'MLPs': (('amazonmlp_0', 'amazonmlp_500', 'amazonmlp', 'amazonmlp_1000_500_200'), None),
    'MLP_1layer': (('amazonmlp_200', 'amazonmlp_500'), None),
    'MLP_layers': (('amazonmlp_500', 'amazonmlp', 'amazonmlp_1000_500_200'), None),
}

#: The families that name their own ``global_model`` (the shared model of FML, FedKD and
#: FedMRL); every other family, and a model list, shares its architecture 0 (HtFLlib's
#: ``BaseHeadSplit(args, 0)``). HtFLlib's ``BaseHeadSplit(args, is_global=True)`` gives that
#: FedAvgCNN the family's first head, ``Head(hidden_dims=[512])`` (a Linear to the classes and
#: a ReLU on the logits), as it gives client 0.
FAMILY_GLOBAL_MODELS = {'HtFE-img-8-HtC-img-4': 'cnn+head512', 'Res34-HtC-img-4': 'cnn+head512'}

#: The families' names in the FedTGP and FedKTL repositories (before HtFLlib renamed them).
_FAMILY_ALIASES = {'htfe2': 'HtFE-img-2', 'htfe3': 'HtFE-img-3', 'htfe4': 'HtFE-img-4',
                   'htfe5': 'HtFE-img-5', 'htfe8': 'HtFE-img-8', 'htfe9': 'HtFE-img-9',
                   'htfe8-htc4': 'HtFE-img-8-HtC-img-4', 'res34-htc4': 'Res34-HtC-img-4',
                   'htm10': 'HtM-img-10'}


def family_architectures(family: str) -> tuple[str, ...]:
  """The architecture of every model index of a family: ``base[j mod K]`` with
  ``head[j mod H]`` for ``j < lcm(K, H)``, so that ``i mod len(result)`` gives client i
  HtFLlib's base ``i mod K`` and head ``i mod H``."""
  bases, heads = FAMILIES[family]
  if heads is None:
    return bases
  period = int(np.lcm(len(bases), len(heads)))
  return tuple(f'{bases[j % len(bases)]}+{heads[j % len(heads)]}' for j in range(period))


def family_global_model(spec) -> Optional[str]:
  """The architecture HtFLlib's ``args.global_model`` is for the family ``spec`` (the HtC
  families: FedAvgCNN with the family's first head, ``cnn+head512``), or None: the shared
  model is architecture 0."""
  return FAMILY_GLOBAL_MODELS.get(_family_name(spec))


def _family_name(spec) -> Optional[str]:
  """The canonical family name of ``spec`` (case-insensitive, old names too), or None."""
  if not isinstance(spec, str):
    return None
  key = spec.strip().lower()
  by_lower = {name.lower(): name for name in FAMILIES}
  return by_lower.get(key) or _FAMILY_ALIASES.get(key)


def _parse_head(suffix: str) -> Optional[tuple[int, ...]]:
  """``'head512-256'`` → ``(512, 256)``; None when it is not a head spec."""
  if not suffix.startswith('head'):
    return None
  parts = suffix[len('head'):].split('-')
  if not all(p.isdigit() and int(p) > 0 for p in parts):
    return None
  return tuple(int(p) for p in parts)


def _is_int(value) -> bool:
  """True for Python and numpy integers, False for bools."""
  return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _check_sample_shape(name: str, sample_shape) -> None:
  try:
    shape = tuple(sample_shape)
  except TypeError:
    shape = None
  if not shape or not all(_is_int(d) and d >= 1 for d in shape):
    raise ConfigError(f'sample_shape must be a non-empty tuple of positive ints, '
                      f'got {sample_shape!r}')
  shape = tuple(int(d) for d in shape)
  if name == 'cnn':
    if len(shape) != 3 or min(shape[:2]) < cnn.MIN_SPATIAL:
      raise ConfigError(
          f"model 'cnn' needs sample_shape (H, W, C) with H, W >= {cnn.MIN_SPATIAL}, "
          f'got {shape}')
  if name in _IMAGE_MODELS and len(shape) != 3:
    raise ConfigError(f'model {name!r} needs images: sample_shape (H, W, C), got {shape}')
  if name == 'alexnet' and min(shape[:2]) < alexnet.MIN_SPATIAL:
    raise ConfigError(f"model 'alexnet' needs images of at least {alexnet.MIN_SPATIAL}x"
                      f"{alexnet.MIN_SPATIAL} (its three 3x3/2 max-pools; PyTorch fails there "
                      f"too), got {shape[0]}x{shape[1]}; use a 64x64 dataset (tiny_imagenet, "
                      "flowers102, stanford_cars) or another model")
  if name.startswith('vit') and shape[:2] != (32, 32):
    raise ConfigError(f'model {name!r} is HtFLlib\'s ViT at image size 32: it needs 32x32 '
                      f'images, got {shape[0]}x{shape[1]} (use a 32x32 dataset such as '
                      'digits32 or cifar10)')


def compute_dtype(dtype) -> Optional[Any]:
  """The layers' ``dtype`` for a compute dtype name: None for float32, else the jnp dtype.

  Args:
    dtype: one of :data:`~fedjax_lib.config.DTYPES` (``'float32'``, ``'bfloat16'``), or the
      corresponding numpy / jnp dtype.

  Returns:
    ``None`` for float32 (the plain float32 model, unchanged) or ``jnp.bfloat16``.

  Raises:
    ConfigError: for any other value.
  """
  try:
    canonical = jnp.dtype(dtype).name if not isinstance(dtype, bool) else None
  except (TypeError, ValueError):
    canonical = None
  if canonical not in DTYPES:
    raise ConfigError(f'unknown dtype {dtype!r}; choose one of: {", ".join(DTYPES)}')
  return None if canonical == 'float32' else getattr(jnp, canonical)


def _variant(key: str) -> Optional[tuple[str, dict, str]]:
  """``(architecture, its constructor arguments, canonical name)`` of a lower-case model name
  with a variant suffix (``transformer_h4_l2``, ``harcnn_s2``, ``amazonmlp_500``), or None."""
  for module in (text, sensor):
    found = module.parse_name(key)
    if found is not None:
      return (*found, module.canonical_name(key))
  hidden = mlp.parse_amazonmlp_name(key)
  if hidden is None:
    return None
  return 'amazonmlp', {'hidden_dims': hidden}, mlp.amazonmlp_name(hidden)


def _architecture(key: str) -> tuple[str, dict]:
  """``(architecture, constructor arguments)`` of a canonical name (``('cnn', {})``)."""
  return (key, {}) if key in MODEL_NAMES and key != 'amazonmlp' else _variant(key)[:2]


def model_option_names(name: str) -> tuple[str, ...]:
  """The options `make_model` accepts for model ``name`` (empty for an unknown name)."""
  parts = _split_name(name)
  return () if parts is None else _OPTIONS[_architecture(parts[0])[0]]


def _split_name(name) -> Optional[tuple[str, Optional[tuple[int, ...]]]]:
  """``(canonical architecture, head dims or None)`` of a model name, or None if unknown."""
  if not isinstance(name, str):
    return None
  key, _, suffix = name.strip().lower().partition('+')
  key = _ALIASES.get(key.strip(), key.strip())
  if key not in MODEL_NAMES:
    variant = _variant(key)
    if variant is None:
      return None
    key = variant[2]
  if not suffix:
    return key, None
  head = _parse_head(suffix.strip())
  return None if head is None else (key, head)


def _canonical_name(name) -> Optional[str]:
  """The canonical model name of ``name`` (case-insensitive, alias-resolved), or None."""
  parts = _split_name(name)
  if parts is None:
    return None
  key, head = parts
  return key if head is None else f'{key}+head{"-".join(map(str, head))}'


def _accepted_names() -> str:
  aliases = ', '.join(f'{alias} ({name})' for alias, name in _ALIASES.items())
  return (f'{", ".join(MODEL_NAMES)} (a head suffix such as +head512-256 gives HtFLlib\'s '
          f'Head(hidden_dims=[512, 256]); variants: transformer_h<heads>_l<layers>, '
          f'harcnn[1|3]_s<stride>, amazonmlp_<hidden widths> or amazonmlp_0); aliases: '
          f'{aliases}; or one family: '
          f'{", ".join(FAMILIES)}')


def parse_model_names(spec: str | Sequence[str]) -> tuple[str, ...]:
  """Parses one model name, a comma-separated list of them, or a family name.

  Names are case-insensitive, surrounding whitespace is ignored and aliases are resolved,
  so ``'CNN, FedAvgCNN,mlr'`` gives ``('cnn', 'cnn', 'mlr')``. Repeats are kept: they set
  the proportions of architectures (see :func:`architecture_of_clients`). A family of
  :data:`FAMILIES` (``'HtFE-img-8'``, or its old name ``'HtFE8'``) gives its architectures
  in HtFLlib's order (:func:`family_architectures`).

  Args:
    spec: a string such as ``'cnn'``, ``'cnn,resnet4+head512-256'`` or ``'HtFE-img-8'``, or
      a sequence of names.

  Returns:
    The canonical names (members of :data:`MODEL_NAMES`, with a ``+head...`` suffix for a
    heterogeneous head), in order, at least one.

  Raises:
    ConfigError: for an empty entry or an unknown name (naming it and the accepted names).
  """
  family = _family_name(spec)
  if family is not None:
    return family_architectures(family)
  if isinstance(spec, str):
    entries = spec.split(',')
  elif isinstance(spec, Sequence) and spec:
    entries = list(spec)
  else:
    raise ConfigError(f'model names must be a string of comma-separated names, got {spec!r}; '
                      f'accepted names: {_accepted_names()}')
  names = []
  for entry in entries:
    if isinstance(entry, str) and not entry.strip():
      raise ConfigError(f'empty model name in {spec!r}; accepted names: {_accepted_names()}')
    key = _canonical_name(entry)
    if key is None:
      family = _family_name(entry)
      if family is not None:
        raise ConfigError(f'model family {family!r} must be the whole -m value, not one entry '
                          f'of the list {spec!r}')
      raise ConfigError(f'unknown model {entry!r} in {spec!r}; accepted names: '
                        f'{_accepted_names()}')
    names.append(key)
  return tuple(names)


def dataset_architectures(spec: str | Sequence[str], dataset: str) -> tuple[str, ...]:
  """:func:`parse_model_names` with PFLlib's one dataset-dependent model: ``CNN`` on Digit5.

  PFLlib's ``main.py`` builds ``-m CNN`` as FedAvgCNN sized to the images, except on a
  dataset whose name contains ``Digit5``, where it builds ``Digit5CNN`` (BatchNorm, dropout).
  This does the same for the name ``cnn`` alone (any case) on a dataset named ``*digit5*``
  (a registry name or a folder's base name, any case); ``FedAvgCNN`` spelled out, a list or a
  family keep FedAvgCNN (HtFLlib names its models explicitly).

  Args:
    spec: the model names, as :func:`parse_model_names` accepts them.
    dataset: the dataset's registry name or folder path.

  Returns:
    The canonical names, ``('digit5cnn',)`` in the case above.
  """
  names = parse_model_names(spec)
  tag = os.path.basename(os.path.normpath(str(dataset))).lower()
  if isinstance(spec, str) and spec.strip().lower() == 'cnn' and 'digit5' in tag:
    return ('digit5cnn',)
  return names


def architecture_of_clients(names: str | Sequence[str], num_clients: int) -> list[str]:
  """The architecture of each client: client ``i`` gets ``names[i % len(names)]``.

  This is HtFLlib's rule (``args.models[i % len(args.models)]``): with ``('cnn', 'dnn')``
  even clients run the CNN and odd clients the DNN; repeating a name in ``names`` raises
  its share (``('cnn', 'cnn', 'dnn')``: two thirds CNN).

  Args:
    names: model names, as accepted by :func:`parse_model_names` (a comma-separated string
      or a sequence of names).
    num_clients: the number of clients, a positive integer.

  Returns:
    A list of ``num_clients`` canonical model names.

  Raises:
    ConfigError: for an invalid name list or number of clients.
  """
  names = parse_model_names(names)
  if not _is_int(num_clients) or num_clients < 1:
    raise ConfigError(f'num_clients must be a positive integer, got {num_clients!r}')
  return [names[i % len(names)] for i in range(int(num_clients))]


def _build(key: str, num_classes: int, options: dict,
           feature_dim: Optional[int]) -> BaseHeadModel:
  key, variant = _architecture(key)
  options = {**options, **variant}
  if key in text.TEXT_MODELS:
    return text.text_model(key, num_classes, feature_dim=feature_dim, **options)
  if key in sensor.ARCHITECTURES:
    return sensor.harcnn(key, num_classes, feature_dim=feature_dim, **options)
  if key == 'amazonmlp':
    return mlp.AmazonMLP(num_classes, **options)
  if key == 'digit5cnn':
    return digit5.Digit5CNN(num_classes, **options)
  if key == 'cnn':
    return cnn.FedAvgCNN(num_classes, **options)
  if key == 'dnn':
    return mlp.DNN(num_classes, feature_dim=feature_dim, **options)
  if key == 'mlr':
    return mlp.MLR(num_classes, feature_dim=feature_dim, **options)
  if key.startswith('resnet'):
    return resnet.resnet(key, num_classes, **options)
  if key == 'googlenet':
    return googlenet.googlenet(num_classes, **options)
  if key == 'mobilenet_v2':
    return mobilenet.mobilenet_v2(num_classes, **options)
  if key == 'alexnet':
    return alexnet.alexnet(num_classes, **options)
  return vit.vit(key, num_classes, **options)


def architecture_has_train_mode(name: str) -> bool:
  """Whether architecture ``name`` (a `MODEL_NAMES` entry) has BatchNorm or dropout
  (`fedjax_lib.models.base.has_train_mode`), without an input shape to validate."""
  return base_lib.has_train_mode(_build(name, 2, {}, None))


def make_model(name: str, sample_shape: tuple[int, ...], num_classes: int,
               dtype='float32', feature_dim: Optional[int] = None,
               **kwargs) -> BaseHeadModel:
  """Builds the model called ``name`` for inputs of shape ``sample_shape``.

  Args:
    name: a model name (see the module docstring), case-insensitive, optionally with a head
      suffix (``resnet34+head512-256``).
    sample_shape: shape of one input without the batch axis: ``(H, W, C)`` for the image
      models (32x32 for the ViTs), anything for the fully connected models (they flatten it).
    num_classes: number of classes, at least 2.
    dtype: the computation dtype, ``'float32'`` or ``'bfloat16'`` (mixed precision: float32
      parameters, convolutions, matmuls and activations in bfloat16, features and logits
      returned in float32). ``'float32'`` builds exactly the plain float32 model.
    feature_dim: ``None`` (the model as is: features are the base's output) or a positive
      integer ``F``: the base's output is adaptively average-pooled to width ``F`` (PyTorch's
      ``AdaptiveAvgPool1d(F)``, as HtFLlib does for heterogeneous models) and the head is a
      dense ``F -> num_classes`` layer, so heads of all architectures have the same shapes.
      The pool has no parameters; the base's parameters are unchanged.
    **kwargs: model options: ``conv_impl`` (``'auto'``, ``'lax'``, ``'patches'``,
      ``'slices'``, ``'hybrid'``; see `fedjax_lib.models.layers.TorchConv`) and
      ``hidden_dim`` for ``cnn``; ``hidden_dim`` for ``dnn``; ``conv_impl`` for
      ``digit5cnn``, the ``harcnn`` models and ``textcnn``; ``vocab_size`` (PFLlib's ``-vs``,
      default 80) for the text models, and ``log_softmax_features`` (default False) for
      ``fasttext``, ``textlr``, ``textcnn``, ``lstm``, ``gru``, ``dnn`` and ``mlr``: True
      makes their features the ``log_softmax`` of the hidden representation (``mlr``: of
      the input), as PFLlib's and HtFLlib's split models compute them
      (`fedjax_lib.models.text`, `fedjax_lib.models.mlp`); none for the others.

  Returns:
    A :class:`BaseHeadModel`.

  Raises:
    ConfigError: for an unknown name, option or dtype, or an invalid shape or value.
  """
  parts = _split_name(name)
  if parts is None:
    raise ConfigError(f'unknown model {name!r}; accepted names: {_accepted_names()}')
  key, head_dims = parts
  arch = _architecture(key)[0]
  if not _is_int(num_classes) or num_classes < 2:
    raise ConfigError(f'num_classes must be an integer >= 2, got {num_classes!r}')
  if feature_dim is not None and (not _is_int(feature_dim) or feature_dim < 1):
    raise ConfigError(f'feature_dim must be a positive integer or None, got {feature_dim!r}')
  _check_sample_shape(arch, sample_shape)
  options = {}
  for option, value in kwargs.items():
    if option not in _OPTIONS[arch]:
      accepted = ', '.join(_OPTIONS[arch]) or 'none'
      raise ConfigError(f'unknown option {option!r} for model {key!r}; accepted: {accepted}')
    if option in ('hidden_dim', 'vocab_size'):
      if not _is_int(value) or value < 1:
        raise ConfigError(f'{option} must be a positive integer, got {value!r}')
      value = int(value)
    if option == 'log_softmax_features' and not isinstance(value, (bool, np.bool_)):
      raise ConfigError(f'log_softmax_features must be True or False, got {value!r}')
    if option == 'conv_impl' and value not in CONV_IMPLS:
      raise ConfigError(f'unknown conv_impl {value!r}; choose one of: {", ".join(CONV_IMPLS)}')
    options[option] = value
  options['dtype'] = compute_dtype(dtype)
  model = _build(key, int(num_classes), options,
                 None if feature_dim is None else int(feature_dim))
  if head_dims is not None:
    width = feature_dim
    if width is None:
      width = base_lib.feature_dim(model, tuple(sample_shape))
    if head_dims[0] != width:
      raise ConfigError(f'model {name!r}: the head\'s first dimension {head_dims[0]} must be '
                        f'the feature dimension {width} (HtFLlib\'s Head(hidden_dims=[...]) '
                        'starts with the features\' width)')
    model = model.clone(head=heads.MLPHead(head_dims, int(num_classes),
                                           dtype=options['dtype']))
  if feature_dim is None:
    return model
  # Every head reads its fan-in from its input, so pooling in front of it makes it a
  # F -> num_classes head.
  return model.clone(feature_dim=int(feature_dim))


def init_model(model: BaseHeadModel, key: jax.Array,
               sample_shape: tuple[int, ...]) -> Variables:
  """Initialises ``model`` on a dummy batch of one zero input.

  Args:
    model: the model.
    key: a PRNG key.
    sample_shape: shape of one input without the batch axis.

  Returns:
    ``{'params': {'base': ..., 'head': ...}}``.
  """
  return _jitted_init(model, key, jnp.zeros((1, *sample_shape), jnp.float32))


# Flax modules hash by their fields, so equal models share one compilation.
@functools.partial(jax.jit, static_argnums=0)
def _jitted_init(model: BaseHeadModel, key: jax.Array, x: jax.Array) -> Variables:
  return model.init(key, x)
