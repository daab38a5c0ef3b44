"""The base/head model split shared by every model in the zoo.

PFLlib wraps models in ``BaseHeadSplit``: ``base`` is the feature extractor and
``head`` (PyTorch attribute ``fc``) the classifier, ``model(x) = head(base(x))``. Many
personalised-FL algorithms (FedPer, FedRep, FedBABU, LG-FedAvg, FedProto, GPFL, ...)
communicate, train or aggregate the two parts separately, so every model here is a
:class:`BaseHeadModel` and its variables always have the layout::

    {'params': {'base': {...}, 'head': {...}}}

(a part without parameters, such as the identity base of logistic regression, is simply
absent from ``params``).

Heterogeneous models (HtFLlib's ``--feature_dim``) set ``feature_dim``: the base's output is
then adaptively average-pooled to that width (:mod:`fedjax_lib.models.pooling`) before
``features`` returns it and before the head sees it. The pool has no parameters, so the
layout above is unchanged and ``base`` stays the raw, unpooled base module.

Usage::

  logits = model.apply(variables, x)
  z = model.apply(variables, x, method='features')
  logits = model.apply(variables, z, method='classify')
  base, head = split_params(variables)
  variables = merge_params(base, head)
"""

import inspect
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from fedjax_lib.models.pooling import adaptive_avg_pool1d

Variables = dict[str, Any]
Params = dict[str, Any]


class BaseHeadModel(nn.Module):
  """A model ``head(pool(base(x)))`` whose two parts can be used separately.

``pool`` is the identity unless ``feature_dim`` is set, in which case it is PyTorch's
``AdaptiveAvgPool1d(feature_dim)`` over the base's output (HtFLlib's common feature width
for heterogeneous models); it belongs to neither part's parameters (it has none).

  Mixed precision: when ``base`` and ``head`` compute in a lower precision (their layers'
  ``dtype``, e.g. bfloat16, with float32 parameters), ``dtype`` names it, and the features
  and logits leaving the model are cast back to float32. Losses, metrics and whatever an
  algorithm computes on features (running means, gates, kernels) therefore stay float32,
  and the state derived from features keeps float32 leaves.

  Attributes:
    base: the feature extractor, mapping a batch of inputs to ``(batch, feature_dim)``.
    head: the classifier, mapping features to ``(batch, num_classes)`` logits.
    dtype: the computation dtype of ``base`` and ``head``; ``None`` (float32) leaves their
      outputs untouched.
    feature_dim: ``None`` (features are the base's output, unchanged) or the width ``F``
      the base's output is pooled to; ``features`` then returns ``(batch, F)`` and the head
      (and ``classify``) takes ``F``-dim features.
  """
  base: nn.Module
  head: nn.Module
  dtype: Optional[Any] = None
  feature_dim: Optional[int] = None

  def _out(self, y: jax.Array) -> jax.Array:
    return y if self.dtype is None else y.astype(jnp.float32)

  def _features(self, x: jax.Array, train: bool) -> jax.Array:
    z = self.base(x, train=train) if _takes_train(self.base) else self.base(x)
    if self.feature_dim is not None:
      z = adaptive_avg_pool1d(z, self.feature_dim, self.dtype)
    return z

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Logits ``head(pool(base(x)))``."""
    return self._out(self.head(self._features(x, train)))

  def features(self, x: jax.Array, train: bool = False) -> jax.Array:
    """The feature representation ``pool(base(x))`` (``base(x)`` without ``feature_dim``)."""
    return self._out(self._features(x, train))

  def forward(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    """``(features, logits)`` of one pass: ``pool(base(x))`` and ``head`` of it."""
    z = self._features(x, train)
    return self._out(z), self._out(self.head(z))

  def classify(self, z: jax.Array) -> jax.Array:
    """Logits ``head(z)`` of features ``z`` (``feature_dim`` wide when that is set)."""
    return self._out(self.head(z))


def _takes_train(module: nn.Module) -> bool:
  """Whether a base's ``__call__`` has a ``train`` argument (BatchNorm or dropout inside)."""
  return 'train' in inspect.signature(type(module).__call__).parameters


def model_state(variables: Variables) -> Variables:
  """The collections of ``variables`` that are not trained: ``{'batch_stats': ...}`` for a
  model with BatchNorm, ``{}`` for the others."""
  return {k: v for k, v in variables.items() if k != 'params'}


def has_train_mode(model: BaseHeadModel) -> bool:
  """Whether ``model`` behaves differently in training: BatchNorm (batch statistics, and
  running statistics to keep) or dropout in its base. Such a model must be trained through
  :func:`apply_train` (`fedjax_lib.core.local.train_model`)."""
  return _takes_train(model.base)


def apply_train(model: BaseHeadModel, variables: Variables, x: jax.Array, key: jax.Array,
                method: str = 'forward'):
  """``model``'s ``method`` in training mode: ``(output, new_model_state)``.

  BatchNorm normalises with the batch's statistics and updates its running statistics
  (returned in ``new_model_state``, the collections other than ``params``); dropout draws
  from ``key``. For a model without either this is ``model.apply`` and ``{}``.
  """
  state = model_state(variables)
  if not state:
    out = model.apply(variables, x, train=True, rngs={'dropout': key}, method=method)
    return out, {}
  out, updates = model.apply(variables, x, train=True, rngs={'dropout': key}, method=method,
                             mutable=list(state))
  return out, {**state, **updates}


def _params_of(variables: Variables) -> Params:
  """Returns the ``params`` collection, accepting a bare params dict too."""
  if 'params' in variables:
    return variables['params']
  return variables


def split_params(variables: Variables) -> tuple[Params, Params]:
  """Splits variables into the base's and the head's parameter trees.

  Works unchanged on parameters stacked over clients (leading axis on every leaf).

  Args:
    variables: ``{'params': {'base': ..., 'head': ...}}`` (a bare
      ``{'base': ..., 'head': ...}`` is accepted too).

  Returns:
    ``(base_params, head_params)``; a part without parameters gives ``{}``.
  """
  params = _params_of(variables)
  unknown = set(params) - {'base', 'head'}
  if unknown:
    raise ValueError(f'expected params with keys base/head, got {sorted(params)}')
  return params.get('base', {}), params.get('head', {})


def merge_params(base: Params, head: Params) -> Variables:
  """Inverse of :func:`split_params`: builds ``{'params': {'base': .., 'head': ..}}``.

  An empty part (``{}``) is left out, so ``merge_params(*split_params(v)) == v``.

  Args:
    base: the base's parameter tree.
    head: the head's parameter tree.

  Returns:
    A variables dict usable with ``model.apply``.
  """
  params = {}
  if base:
    params['base'] = base
  if head:
    params['head'] = head
  return {'params': params}


def count_params(variables: Variables) -> int:
  """Number of scalar parameters (the ``params`` collection if present).

  Accepts concrete arrays or abstract ``jax.ShapeDtypeStruct`` leaves (e.g. from
  ``jax.eval_shape``). Stacked parameters count every copy.

  Args:
    variables: a variables dict or any parameter pytree.

  Returns:
    The total number of scalars.
  """
  tree = variables['params'] if isinstance(variables, dict) and 'params' in variables else variables
  return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree)))


def feature_dim(model: BaseHeadModel, sample_shape: tuple[int, ...]) -> int:
  """Size of ``model``'s feature vector for inputs of shape ``sample_shape``.

  Computed abstractly (no FLOPs, no parameters materialised).

  Args:
    model: the model.
    sample_shape: shape of one input, without the batch axis.

  Returns:
    The last dimension of ``model.features``.
  """
  x = jax.ShapeDtypeStruct((1, *sample_shape), jnp.float32)

  def features(x):
    variables = model.init(jax.random.PRNGKey(0), x)
    return model.apply(variables, x, method='features')

  return int(jax.eval_shape(features, x).shape[-1])
