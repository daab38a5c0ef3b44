"""Weighted averages of stacked pytrees (the server side of FedAvg and friends).

Inside the engine's sharded round (``shard_map`` over a ``clients`` mesh axis) every device
holds only its block of the cohort; there :func:`client_axis` names the mesh axis and the
averages below reduce with ``lax.psum`` over it, so an algorithm's ``server_update`` is the
same code on one device and on many.
"""

import contextlib
import contextvars
from typing import Optional

import jax
import jax.numpy as jnp

_CLIENT_AXIS: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "fedjax_client_axis", default=None)


@contextlib.contextmanager
def client_axis(name: Optional[str]):
  """While tracing inside ``shard_map``: the stacked axis is split over mesh axis ``name``."""
  token = _CLIENT_AXIS.set(name)
  try:
    yield
  finally:
    _CLIENT_AXIS.reset(token)


def client_sum(x: jax.Array, axis: int = 0) -> jax.Array:
  """Sum over the stacked client axis — across devices when inside :func:`client_axis`."""
  total = jnp.sum(x, axis=axis)
  name = _CLIENT_AXIS.get()
  return total if name is None else jax.lax.psum(total, name)


def normalized_weights(weights: jax.Array) -> jax.Array:
  """``w / Σw`` in float32, all zeros when ``Σw == 0`` (Σ over all shards when sharded)."""
  weights = jnp.asarray(weights, jnp.float32)
  total = client_sum(weights)
  return jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 0.0)


def weighted_average(stacked, weights: jax.Array, fallback=None):
  """``Σ_k w_k θ_k / Σ_k w_k`` over the leading axis of every leaf of ``stacked``.

  When sharded (:func:`client_axis`), each device sums its own clients and one weighted
  ``psum`` completes the average.

  Args:
    stacked: a pytree whose leaves have a leading axis of length K (one slice per client).
    weights: ``[K]`` non-negative weights (sample counts; zero for dropped clients).
    fallback: returned (leaf-wise) when all weights are zero; defaults to the unweighted mean.

  Returns:
    The averaged pytree, leaves without the leading axis, in each leaf's dtype.
  """
  weights = jnp.asarray(weights, jnp.float32)
  total = client_sum(weights)
  norm = normalized_weights(weights)
  count = client_sum(jnp.ones_like(weights))

  def avg(leaf, fb=None):
    mean = client_sum(jnp.tensordot(norm, leaf.astype(jnp.float32), axes=1)[None])
    mean = mean.astype(leaf.dtype)
    if fb is None:
      fb = (client_sum(leaf.astype(jnp.float32)) / count).astype(leaf.dtype)
    return jnp.where(total > 0, mean, fb)

  if fallback is None:
    return jax.tree.map(avg, stacked)
  return jax.tree.map(avg, stacked, fallback)
