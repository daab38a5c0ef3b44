"""Models chosen by name, with their inputs validated at the boundary.

Names are case-insensitive and include PFLlib's ``-m`` names:

=========  =====================  ============================================
name       aliases                model
=========  =====================  ============================================
``cnn``    ``fedavgcnn``          :func:`~fedjax_lib.models.cnn.FedAvgCNN`
``dnn``                           :func:`~fedjax_lib.models.mlp.DNN`
``mlr``    ``mclr_logistic``      :func:`~fedjax_lib.models.mlp.MLR`
=========  =====================  ============================================

Every model takes ``dtype='bfloat16'`` for mixed precision and ``feature_dim=F`` for a
common feature width across architectures (HtFLlib's ``--feature_dim``: the base's output
is adaptively average-pooled to ``F`` and the head is ``F -> num_classes``; see
:func:`make_model`).

Heterogeneous FL takes a comma-separated list of architectures (:func:`parse_model_names`,
e.g. ``'cnn,dnn'``); client ``i`` gets architecture ``i mod K``
(:func:`architecture_of_clients`).

Example::

  model = make_model('CNN', sample_shape=(28, 28, 1), num_classes=10)
  variables = init_model(model, jax.random.PRNGKey(0), (28, 28, 1))
  names = architecture_of_clients(parse_model_names('cnn,dnn'), num_clients=20)
  models = {n: make_model(n, (28, 28, 1), 10, feature_dim=512) for n in set(names)}
"""

from collections.abc import Sequence
import functools
import numbers
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lib.config import DTYPES
from fedjax_lib.errors import ConfigError
from fedjax_lib.models import cnn
from fedjax_lib.models import mlp
from fedjax_lib.models.base import BaseHeadModel, Variables
from fedjax_lib.models.layers import CONV_IMPLS

#: Canonical model names accepted by :func:`make_model`.
MODEL_NAMES = ('cnn', 'dnn', 'mlr')

_ALIASES = {'fedavgcnn': 'cnn', 'mclr_logistic': 'mlr'}

#: Keyword options each model accepts.
_OPTIONS = {
    'cnn': ('conv_impl', 'hidden_dim'),
    'dnn': ('hidden_dim',),
    'mlr': (),
}


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


def _canonical_name(name) -> Optional[str]:
  """The canonical model name of ``name`` (case-insensitive, alias-resolved), or None."""
  if not isinstance(name, str):
    return None
  key = name.strip().lower()
  key = _ALIASES.get(key, key)
  return key if key in MODEL_NAMES else None


def _accepted_names() -> str:
  aliases = ', '.join(f'{alias} ({name})' for alias, name in _ALIASES.items())
  return f'{", ".join(MODEL_NAMES)}; aliases: {aliases}'


def parse_model_names(spec: str | Sequence[str]) -> tuple[str, ...]:
  """Parses one model name or a comma-separated list of them (heterogeneous models).

  Names are case-insensitive, surrounding whitespace is ignored and aliases are resolved,
  so ``'CNN, FedAvgCNN,mlr'`` gives ``('cnn', 'cnn', 'mlr')``. Repeats are kept: they set
  the proportions of architectures (see :func:`architecture_of_clients`).

  Args:
    spec: a string such as ``'cnn'`` or ``'cnn,dnn'``, or a sequence of names.

  Returns:
    The canonical names (members of :data:`MODEL_NAMES`), in order, at least one.

  Raises:
    ConfigError: for an empty entry or an unknown name (naming it and the accepted names).
  """
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
      raise ConfigError(f'unknown model {entry!r} in {spec!r}; accepted names: '
                        f'{_accepted_names()}')
    names.append(key)
  return tuple(names)


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


def make_model(name: str, sample_shape: tuple[int, ...], num_classes: int,
               dtype='float32', feature_dim: Optional[int] = None,
               **kwargs) -> BaseHeadModel:
  """Builds the model called ``name`` for inputs of shape ``sample_shape``.

  Args:
    name: a model name (see the module docstring), case-insensitive.
    sample_shape: shape of one input without the batch axis: ``(H, W, C)`` for the CNN,
      anything for the fully connected models (they flatten it).
    num_classes: number of classes, at least 2.
    dtype: the computation dtype, ``'float32'`` or ``'bfloat16'`` (mixed precision: float32
      parameters, convolutions, matmuls and activations in bfloat16, features and logits
      returned in float32). ``'float32'`` builds exactly the plain float32 model.
    feature_dim: ``None`` (the model as is: features are the base's output) or a positive
      integer ``F``: the base's output is adaptively average-pooled to width ``F`` (PyTorch's
      ``AdaptiveAvgPool1d(F)``, as HtFLlib does for heterogeneous models) and the head is a
      dense ``F -> num_classes`` layer, so heads of all architectures have the same shapes.
      The pool has no parameters; the base's parameters are unchanged.
    **kwargs: model options: ``conv_impl`` (``'lax'`` or ``'patches'``) and
      ``hidden_dim`` for ``cnn``; ``hidden_dim`` for ``dnn``; none for ``mlr``.

  Returns:
    A :class:`BaseHeadModel`.

  Raises:
    ConfigError: for an unknown name, option or dtype, or an invalid shape or value.
  """
  key = _canonical_name(name)
  if key is None:
    raise ConfigError(f'unknown model {name!r}; choose one of: {", ".join(MODEL_NAMES)}')
  if not _is_int(num_classes) or num_classes < 2:
    raise ConfigError(f'num_classes must be an integer >= 2, got {num_classes!r}')
  if feature_dim is not None and (not _is_int(feature_dim) or feature_dim < 1):
    raise ConfigError(f'feature_dim must be a positive integer or None, got {feature_dim!r}')
  _check_sample_shape(key, sample_shape)
  options = {}
  for option, value in kwargs.items():
    if option not in _OPTIONS[key]:
      accepted = ', '.join(_OPTIONS[key]) or 'none'
      raise ConfigError(f'unknown option {option!r} for model {key!r}; accepted: {accepted}')
    if option == 'hidden_dim':
      if not _is_int(value) or value < 1:
        raise ConfigError(f'hidden_dim must be a positive integer, got {value!r}')
      value = int(value)
    if option == 'conv_impl' and value not in CONV_IMPLS:
      raise ConfigError(f'unknown conv_impl {value!r}; choose one of: {", ".join(CONV_IMPLS)}')
    options[option] = value
  options['dtype'] = compute_dtype(dtype)
  if key == 'cnn':
    model = cnn.FedAvgCNN(int(num_classes), **options)
  elif key == 'dnn':
    model = mlp.DNN(int(num_classes), **options)
  else:
    model = mlp.MLR(int(num_classes), **options)
  if feature_dim is None:
    return model
  # Every head is a TorchDense(num_classes) whose fan-in is read from its input, so pooling
  # in front of it makes it a dense F -> num_classes layer.
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
