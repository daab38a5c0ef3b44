"""Adaptive average pooling of feature vectors to a common width (HtFLlib's ``feature_dim``).

In heterogeneous FL (HtFLlib), clients run different architectures whose bases emit
features of different widths ``D``. HtFLlib follows every base with PyTorch's
``nn.AdaptiveAvgPool1d(F)`` so that all clients produce features of one width ``F``
(``--feature_dim``, 512 by default) and all heads are ``Linear(F, num_classes)``, hence
interchangeable (and aggregatable) across architectures.

PyTorch's adaptive pooling splits the ``D`` inputs into ``F`` bins; output ``j`` is the
mean of inputs ``[floor(j*D/F), ceil((j+1)*D/F))``. Bins overlap when ``F`` does not
divide ``D``, and inputs are replicated when ``D < F``. The pooling is linear, so here it
is one matmul with the constant ``[D, F]`` matrix of :func:`adaptive_avg_pool_matrix`.

Usage::

  z = AdaptiveAvgPool1d(512).apply({}, features)      # (batch, D) -> (batch, 512)
  model = make_model('dnn', (28, 28, 1), 10, feature_dim=512)  # pooled inside the model

Inside a :class:`~fedjax_lib.models.base.BaseHeadModel` the pool is applied between base
and head (its ``feature_dim`` field), so it adds no parameters and leaves the
``{'params': {'base': ..., 'head': ...}}`` layout unchanged.
"""

import functools
import numbers
from typing import Any, Optional

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from fedjax_lib.errors import ConfigError


def _check_positive_int(value, what: str) -> int:
  if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)) or value < 1:
    raise ConfigError(f'{what} must be a positive integer, got {value!r}')
  return int(value)


def adaptive_avg_pool_bins(in_dim: int, out_dim: int) -> tuple[np.ndarray, np.ndarray]:
  """The bins of PyTorch's ``AdaptiveAvgPool1d(out_dim)`` over ``in_dim`` inputs.

  Exact integer arithmetic: ``start_j = floor(j * D / F)``, ``end_j = ceil((j+1) * D / F)``.

  Args:
    in_dim: the input width ``D``, a positive integer.
    out_dim: the output width ``F``, a positive integer.

  Returns:
    ``(starts, ends)``, int64 arrays of length ``out_dim``; output ``j`` averages inputs
    ``starts[j]:ends[j]`` (never empty).

  Raises:
    ConfigError: if ``in_dim`` or ``out_dim`` is not a positive integer.
  """
  in_dim = _check_positive_int(in_dim, 'in_dim')
  out_dim = _check_positive_int(out_dim, 'out_dim')
  j = np.arange(out_dim, dtype=np.int64)
  starts = (j * in_dim) // out_dim
  ends = -((-(j + 1) * in_dim) // out_dim)
  return starts, ends


@functools.lru_cache(maxsize=64)
def _pool_matrix(in_dim: int, out_dim: int) -> np.ndarray:
  starts, ends = adaptive_avg_pool_bins(in_dim, out_dim)
  rows = np.arange(in_dim, dtype=np.int64)[:, None]
  in_bin = (rows >= starts[None, :]) & (rows < ends[None, :])
  matrix = in_bin / (ends - starts)[None, :].astype(np.float64)
  matrix = matrix.astype(np.float32)
  matrix.flags.writeable = False
  return matrix


def adaptive_avg_pool_matrix(in_dim: int, out_dim: int) -> np.ndarray:
  """The ``[in_dim, out_dim]`` matrix ``M`` with ``features @ M == adaptive_avg_pool(features)``.

  Column ``j`` holds ``1 / len(bin_j)`` on the rows of bin ``j`` (see
  :func:`adaptive_avg_pool_bins`) and zeros elsewhere, so each column sums to 1.

  Args:
    in_dim: the input width ``D``, a positive integer.
    out_dim: the output width ``F``, a positive integer.

  Returns:
    A new float32 array of shape ``(in_dim, out_dim)``.

  Raises:
    ConfigError: if ``in_dim`` or ``out_dim`` is not a positive integer.
  """
  in_dim = _check_positive_int(in_dim, 'in_dim')
  out_dim = _check_positive_int(out_dim, 'out_dim')
  return _pool_matrix(in_dim, out_dim).copy()


def adaptive_avg_pool1d(x: jax.Array, features: int, dtype: Optional[Any] = None) -> jax.Array:
  """Adaptive average pooling of the last axis of ``x`` to width ``features``.

  The functional form of :class:`AdaptiveAvgPool1d` (same semantics and dtypes).

  Args:
    x: an array ``(..., D)``.
    features: the output width ``F``.
    dtype: the computation dtype of the model (``None``: float32), the dtype of the result.

  Returns:
    ``x`` itself when ``D == features``; otherwise the pooled ``(..., features)`` array.
  """
  features = _check_positive_int(features, 'features')
  in_dim = x.shape[-1]
  if in_dim == features:
    return x
  matrix = jnp.asarray(_pool_matrix(int(in_dim), features))
  y = jnp.matmul(x.astype(jnp.float32), matrix, precision=lax.Precision.HIGHEST)
  return y.astype(x.dtype if dtype is None else dtype)


class AdaptiveAvgPool1d(nn.Module):
  """PyTorch's ``nn.AdaptiveAvgPool1d(features)`` on the last axis; no parameters.

  ``(..., D) -> (..., features)``: output ``j`` is the mean of inputs
  ``[floor(j*D/F), ceil((j+1)*D/F))``, computed as ``x @ adaptive_avg_pool_matrix(D, F)``
  with the matrix as a compile-time constant. When ``D == features`` the input is returned
  as is (bit-exact, no matmul; PyTorch's pool is the identity there too).

  Precision: the matmul always runs in float32 at ``Precision.HIGHEST``, whatever the
  input dtype, and the result is then cast to ``dtype`` (or back to the input's dtype).
  The bin weights ``1/n`` are mostly not representable in bfloat16 (e.g. 1/3, 1/5), and
  TF32 would round the inputs, so this gives the correctly rounded mean of the inputs;
  the cost (``D * F`` multiply-adds per example) is negligible next to any base, so there
  is nothing to gain from a lower-precision matmul.

  Attributes:
    features: the output width ``F``, a positive integer.
    dtype: the model's computation dtype (e.g. ``jnp.bfloat16``), the dtype of the pooled
      output, like any other activation of the model. ``None`` returns the input's dtype
      (float32 for a float32 model).
  """
  features: int
  dtype: Optional[Any] = None

  def __call__(self, x: jax.Array) -> jax.Array:
    return adaptive_avg_pool1d(x, self.features, self.dtype)


def log_softmax_features(z: jax.Array, enabled: bool, pool_to: Optional[int] = None) -> jax.Array:
  """The references' log-softmax quirk on a base's features ``z`` (``(batch, D)``): when
  ``enabled``, ``log_softmax`` of ``z`` pooled to ``pool_to`` first (HtFLlib's split puts
  its ``AdaptiveAvgPool1d(feature_dim)`` where ``fc`` was, before the forward's last
  ``log_softmax`` line); ``z`` unchanged otherwise. See `fedjax_lib.models.text`."""
  if not enabled:
    return z
  if pool_to is not None:
    z = adaptive_avg_pool1d(z, pool_to)
  return jax.nn.log_softmax(z.astype(jnp.float32), axis=-1)
